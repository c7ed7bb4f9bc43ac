//! The only code of the `keel` binary that calls the C library.
#![allow(unsafe_code)]

/// Ends the process as killed by `sig` (its default action), as a shell expects of a
/// command that caught the signal only to clean up first (crate::safe_file).
pub fn die_of(sig: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: SIG_DFL is a valid disposition for any catchable signal; raise only sends
    // the signal to this thread, whose default action ends the process.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    std::process::exit(128_i32.saturating_add(sig))
}

/// Whether `sig` is ignored in this process (SIG_IGN, e.g. inherited from `nohup` or from
/// a shell starting a background job): a watcher must then leave it ignored.
pub fn signal_ignored(sig: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: a null new action only reads the current one into `old`, a zeroed
        // sigaction that the call fills in.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
        }
    }
    #[cfg(not(unix))]
    {
        let _ = sig;
        false
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

/// SIGINT (Ctrl-C) or, on Unix, SIGTERM (`keel serve`, `keel work`): the handlers are
/// installed when this is called, so a signal sent as soon as the "to stop" line is read
/// is not missed; the future ends at the first of them. A handler that cannot be
/// installed is one signal fewer to wait for, not a reason to stop.
pub(crate) fn stop_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (int, term) = (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok());
        async move {
            tokio::select! {
                () = recv_or_never(int) => {}
                () = recv_or_never(term) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(unix)]
async fn recv_or_never(s: Option<tokio::signal::unix::Signal>) {
    match s {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
