//! What can stop `keel bench`.

use keel_engine::EngineError;
use keel_replay::error::ReplayError;
use keel_store::StoreError;
use std::path::{Path, PathBuf};

/// Why a bench did not produce its report. Infrastructure failures (`Io`, `Store`,
/// `RawSled`) are kept apart from a measurement whose result cannot be trusted
/// (`Invalid`: e.g. a resumed run folded to another state than the one written).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or directory of the bench (a temporary database, an export, stdout).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The raw sled floor (sled used directly, without keel) failed.
    #[error("raw sled: {0}")]
    RawSled(#[from] sled::Error),
    /// keel's event log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// keel's engine failed (including a state machine that refuses a folded event).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Exporting or reading an export back failed (the replay section).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The bench could not run as planned, or a measurement did not check out.
    #[error("{0}")]
    Invalid(String),
}

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        BenchError::Io { path: path.as_ref().to_path_buf(), source }
    }
}
