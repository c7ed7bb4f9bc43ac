//! The replay boundary's error type.

use keel_engine::{EngineError, TransitionError};
use keel_store::{RunId, StoreError};
use std::path::PathBuf;

/// Everything a keel-replay call can fail with.
///
/// Problems with what the user pointed at (a db in use, an unknown run, an export line that
/// does not parse, a redacted field) are kept apart from infrastructure failures (`Store`,
/// `Io`) and from history the current code refuses (`Fold`).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// sled holds a lock per database directory: only one process may open it.
    #[error("database {} is in use by another process (close it or copy the directory)", path.display())]
    DbLocked { path: PathBuf },

    /// No keel database at the path.
    #[error("no keel database at {} (run `keel demo` to create one, or pass --db DIR)", path.display())]
    DbNotFound { path: PathBuf },

    /// The path exists but is not a keel database.
    #[error("{} is not a keel database: {reason}", path.display())]
    NotADb { path: PathBuf, reason: String },

    /// No run with that id (or id prefix).
    #[error("unknown run {0}")]
    UnknownRun(String),

    /// A run id prefix that matches more than one run.
    #[error("run prefix {prefix} is ambiguous: it matches {count} runs ({examples})")]
    AmbiguousRun { prefix: String, count: usize, examples: String },

    /// An export file line that cannot be used.
    #[error("{}: line {line}: {reason}", path.display())]
    Export { path: PathBuf, line: u64, reason: String },

    /// The event's field was redacted in the export: it cannot be rebuilt or replayed.
    #[error("run {run} seq {seq}: field {kind}.{field} is redacted, so this event cannot be replayed (`keel verify` still checks it)")]
    Redacted { run: RunId, seq: u64, kind: String, field: String },

    /// The current code's state machine refuses a recorded event.
    #[error("run {run} seq {seq}: the state machine refuses the recorded {kind}: {source}")]
    Fold { run: RunId, seq: u64, kind: String, source: TransitionError },

    /// A sequence number past the end of a run.
    #[error("run {run} has no seq {seq} (its last seq is {last})")]
    SeqOutOfRange { run: RunId, seq: u64, last: u64 },

    /// A `--policy` setting that does not apply.
    #[error("invalid policy setting {setting:?}: {reason}")]
    Policy { setting: String, reason: String },

    /// Anything else the caller asked for that cannot be done, with why.
    #[error("{0}")]
    Invalid(String),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ReplayError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ReplayError::Io { path: path.into(), source }
    }
}
