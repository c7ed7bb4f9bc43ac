//! The only code of the `keel` binary that calls the C library.
#![allow(unsafe_code)]

/// Restores the default SIGPIPE disposition, so that `keel export ... | head` ends quietly
/// as Unix tools do instead of failing a write to stdout.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether a process with this id exists (signal 0 checks without sending anything; a
/// process of another user answers EPERM, which still means it exists). Off Unix: assumed.
pub fn process_exists(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        if pid <= 0 {
            return false;
        }
        // SAFETY: kill with signal 0 performs only the existence and permission checks.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}
