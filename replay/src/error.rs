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
    DbLocked {
        /// The database directory.
        path: PathBuf,
    },

    /// No keel database at the path.
    #[error("no keel database at {} (run `keel demo` to create one, or pass --db DIR)", path.display())]
    DbNotFound {
        /// The path asked for.
        path: PathBuf,
    },

    /// The path exists but is not a keel database.
    #[error("{} is not a keel database: {reason}", path.display())]
    NotADb {
        /// The path asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// `--db` is written as a database URL that cannot be used: another scheme than
    /// PostgreSQL's, a URL the driver cannot parse, a schema name keel refuses. Nothing
    /// was opened or created.
    #[error("{} is not a usable database URL: {reason}", path.display())]
    BadDbUrl {
        /// The URL given (its password shown as `***`).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The database could not be reached or opened (a PostgreSQL server refusing the
    /// connection, a database or role that does not exist, a statement failing at open).
    #[error("cannot open the database at {}: {reason}", path.display())]
    DbUnreachable {
        /// The URL asked for (its password shown as `***`).
        path: PathBuf,
        /// What failed, in the server's or the driver's words.
        reason: String,
    },

    /// No run with that id (or id prefix).
    #[error("unknown run {0}")]
    UnknownRun(String),

    /// A run id prefix that matches more than one run.
    #[error("run prefix {prefix} is ambiguous: it matches {count} runs ({examples})")]
    AmbiguousRun {
        /// The prefix given.
        prefix: String,
        /// How many runs it matches.
        count: usize,
        /// A few of them, comma-separated.
        examples: String,
    },

    /// An export file line that cannot be used.
    #[error("{}: line {line}: {reason}", path.display())]
    Export {
        /// The export file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with the line.
        reason: String,
    },

    /// The event's field was redacted in the export: it cannot be rebuilt or replayed.
    #[error("run {run} seq {seq}: field {kind}.{field} is redacted, so this event cannot be replayed (`keel verify` still checks it)")]
    Redacted {
        /// The run.
        run: RunId,
        /// The event's seq.
        seq: u64,
        /// The event kind.
        kind: String,
        /// The redacted payload field.
        field: String,
    },

    /// The current code's state machine refuses a recorded event.
    #[error("run {run} seq {seq}: the state machine refuses the recorded {kind}: {source}")]
    Fold {
        /// The run.
        run: RunId,
        /// The refused event's seq.
        seq: u64,
        /// The refused event's kind.
        kind: String,
        /// Why the state machine refuses it.
        source: TransitionError,
    },

    /// A sequence number past the end of a run.
    #[error("run {run} has no seq {seq} (its last seq is {last})")]
    SeqOutOfRange {
        /// The run.
        run: RunId,
        /// The seq asked for.
        seq: u64,
        /// The run's last seq.
        last: u64,
    },

    /// A `--policy` setting that does not apply.
    #[error("invalid policy setting {setting:?}: {reason}")]
    Policy {
        /// The `KEY=VALUE` setting given.
        setting: String,
        /// Why it does not apply.
        reason: String,
    },

    /// Anything else the caller asked for that cannot be done, with why.
    #[error("{0}")]
    Invalid(String),

    /// Reading or writing a file (an export, a report) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (or `<export output>` for a writer's output).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The event log failed (reading a run, a corrupt record).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The engine failed (loading a state, a fork's engine).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ReplayError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ReplayError::Io { path: path.into(), source }
    }
}
