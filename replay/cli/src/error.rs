//! A command's failure and how it maps to an exit code.

use keel_replay::error::ReplayError;
use std::process::ExitCode;

/// A command's failure: usage (exit 2) or anything else (exit 1). The message is printed
/// as one line after `error: `.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The command line asks for something that cannot be done as asked (exit 2).
    Usage(String),
    /// The command failed (exit 1).
    Failed(String),
    /// The database is held by another process (exit 1); kept apart so that a command
    /// that can go through `keel serve` names that route (crate::remote).
    Locked(std::path::PathBuf),
    /// Writing to standard output failed (crate::output): a closed pipe ends the command
    /// quietly with exit 0, anything else is one line and exit 1.
    Stdout(std::io::Error),
}

impl From<ReplayError> for CliError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::DbLocked { path } => CliError::Locked(path),
            // An argument that cannot be used: a usage error, exit 2.
            e @ ReplayError::BadDbUrl { .. } => CliError::Usage(e.to_string()),
            ReplayError::Store(e) => e.into(),
            other => CliError::Failed(other.to_string()),
        }
    }
}
impl From<keel_engine::EngineError> for CliError {
    fn from(e: keel_engine::EngineError) -> Self {
        match e {
            keel_engine::EngineError::Store(e) => e.into(),
            other => CliError::Failed(other.to_string()),
        }
    }
}
impl From<keel_bench::BenchError> for CliError {
    fn from(e: keel_bench::BenchError) -> Self {
        CliError::Failed(e.to_string())
    }
}
impl From<keel_store::StoreError> for CliError {
    fn from(e: keel_store::StoreError) -> Self {
        match e {
            // Found when a run is first used (a store opened after a clean close checks
            // each run then): the same pointer as a loss found at open.
            lost @ keel_store::StoreError::LostCommitted { .. } => {
                CliError::Failed(format!("{lost}; `keel doctor` explains what can be restored"))
            }
            other => CliError::Failed(other.to_string()),
        }
    }
}

/// An I/O failure while doing `what` (a path, "waiting for a signal", ...), in words.
pub(crate) fn io_err(what: &str, e: std::io::Error) -> CliError {
    CliError::Failed(format!("{what}: {}", io_words(&e)))
}

/// What every command returns: its exit code, or the failure main prints.
pub(crate) type CmdResult = Result<ExitCode, CliError>;

/// An I/O error in words, without Rust's `(os error N)` suffix: `No space left on device`.
pub(crate) fn io_words(e: &std::io::Error) -> String {
    without_os_codes(&e.to_string())
}

/// `text` without the ` (os error N)` Rust appends to an OS error's words.
pub(crate) fn without_os_codes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" (os error ") {
        let (before, from) = rest.split_at(at);
        let tail = from.get(" (os error ".len()..).unwrap_or_default();
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(before);
        match tail.get(digits..) {
            Some(after) if digits > 0 && after.starts_with(')') => rest = after.get(1..).unwrap_or_default(),
            _ => {
                out.push_str(" (os error ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::io_words;

    #[test]
    fn io_errors_are_words_without_the_os_code() {
        let e = std::io::Error::from_raw_os_error(28);
        assert_eq!(io_words(&e), "No space left on device");
        let e = std::io::Error::other("plain words");
        assert_eq!(io_words(&e), "plain words");
        assert_eq!(
            super::without_os_codes("run r: I/O error: File too large (os error 27); x (os error y)"),
            "run r: I/O error: File too large; x (os error y)"
        );
    }
}
