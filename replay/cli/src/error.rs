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
            other => CliError::Failed(other.to_string()),
        }
    }
}
impl From<keel_engine::EngineError> for CliError {
    fn from(e: keel_engine::EngineError) -> Self {
        CliError::Failed(e.to_string())
    }
}
impl From<keel_bench::BenchError> for CliError {
    fn from(e: keel_bench::BenchError) -> Self {
        CliError::Failed(e.to_string())
    }
}
impl From<keel_store::StoreError> for CliError {
    fn from(e: keel_store::StoreError) -> Self {
        CliError::Failed(e.to_string())
    }
}

/// An I/O failure while doing `what` (a path, "waiting for a signal", ...), in words.
pub(crate) fn io_err(what: &str, e: std::io::Error) -> CliError {
    CliError::Failed(format!("{what}: {}", crate::output::io_words(&e)))
}

/// What every command returns: its exit code, or the failure main prints.
pub(crate) type CmdResult = Result<ExitCode, CliError>;
