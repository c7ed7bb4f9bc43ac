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
