//! The store boundary's error type.

use crate::types::{RunId, Seq};
use std::path::PathBuf;

/// Everything an [`EventLog`](crate::EventLog) operation can fail with.
///
/// Domain outcomes (`Conflict`, `DuplicateKey`, `TooLarge`, ...) are kept apart from data
/// damage (`Corrupted`, `CorruptSnapshot`, `UnknownVersion`, `Decode`) and from
/// infrastructure failures (`Io`, `Sled`, `Poisoned`, `Panicked`).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the caller's expected next seq is not the run's next seq.
    /// Nothing of the batch was written.
    #[error("append conflict on run {run}: expected next seq {expected}, log is at {actual}")]
    Conflict {
        /// The run concerned.
        run: RunId,
        /// The next seq the caller expected.
        expected: Seq,
        /// The run's next seq in the log.
        actual: Seq,
    },

    /// The idempotency key is held, unexpired, by another run. Nothing was written.
    #[error("idempotency key already claimed by run {existing}")]
    DuplicateKey {
        /// The run holding the key.
        existing: RunId,
    },

    /// A size limit was exceeded (`what` names the limit; `bytes` is the offending size,
    /// a record count for `what = "batch records"`). Nothing was written.
    #[error("{what} too large: {bytes} > max {max}")]
    TooLarge {
        /// Which limit (`"event"`, `"batch records"`, `"snapshot"`, ...).
        what: &'static str,
        /// The offending size in bytes (a record count for `"batch records"`).
        bytes: usize,
        /// The limit it exceeded.
        max: usize,
    },

    /// A fenced append ([`crate::Coordination::append_fenced`]) whose lease epoch is no
    /// longer the run's: the lease was renewed, released or taken over since. Nothing was
    /// written.
    #[error("append to run {run} fenced: lease epoch {fence} is stale, the run is at epoch {current}")]
    Fenced {
        /// The run concerned.
        run: RunId,
        /// The epoch the append was fenced with.
        fence: u64,
        /// The run's current lease epoch.
        current: u64,
    },

    /// An append with no records.
    #[error("append of an empty batch to run {run}")]
    EmptyBatch {
        /// The run concerned.
        run: RunId,
    },

    /// A stored record failed its checksum, does not decode, or breaks the chain
    /// (link / gap). Records before `seq` are intact and readable.
    #[error("corrupted record run {run} seq {seq}: {reason}")]
    Corrupted {
        /// The run concerned.
        run: RunId,
        /// The seq of the record concerned.
        seq: Seq,
        /// What was seen, in words.
        reason: String,
    },

    /// A stored payload (the payload store beside the log) is damaged: a chunk is missing
    /// or of the wrong length, its manifest is malformed, or its bytes do not hash to the
    /// digest it is stored under.
    #[error("corrupt payload sha256:{digest}: {reason}")]
    CorruptPayload {
        /// The payload's SHA-256 (hex), as referenced.
        digest: String,
        /// What was seen, in words.
        reason: String,
    },

    /// The stored snapshot of a run is damaged or does not match the log.
    #[error("corrupt snapshot for run {run}: {reason}")]
    CorruptSnapshot {
        /// The run concerned.
        run: RunId,
        /// What was seen, in words.
        reason: String,
    },

    /// A snapshot was saved for seqs the log does not have yet.
    #[error("snapshot for run {run} covers seqs < {next_seq} but the log is at {head}")]
    SnapshotBeyondHead {
        /// The run concerned.
        run: RunId,
        /// The first seq the snapshot does not cover.
        next_seq: Seq,
        /// The run's next seq in the log.
        head: Seq,
    },

    /// A record envelope carries a schema version this build cannot decode or upcast.
    #[error("record run {run} seq {seq} has unknown schema version {version}")]
    UnknownVersion {
        /// The run concerned.
        run: RunId,
        /// The seq of the record concerned.
        seq: Seq,
        /// The schema version found.
        version: u16,
    },

    /// A record's payload does not decode as the requested payload type.
    #[error("cannot decode payload of run {run} seq {seq}: {reason}")]
    Decode {
        /// The run concerned.
        run: RunId,
        /// The seq of the record concerned.
        seq: Seq,
        /// What was seen, in words.
        reason: String,
    },

    /// A value could not be encoded (or, outside any record, decoded) by the codec.
    #[error("codec error: {0}")]
    Encode(String),

    /// The database is opened by another process (or another handle in this process).
    #[error("store at {path} is in use by another process or handle (lock held)")]
    Locked {
        /// The store directory.
        path: PathBuf,
    },

    /// The path exists but is not a keel store.
    #[error("{path} is not a keel store: {reason}")]
    NotAStore {
        /// The store directory.
        path: PathBuf,
        /// What was seen, in words.
        reason: String,
    },

    /// The path holds a keel store whose database is damaged beyond what sled reports.
    #[error("keel store at {path} is damaged: {reason}")]
    CorruptStore {
        /// The store directory.
        path: PathBuf,
        /// What was seen, in words.
        reason: String,
    },

    /// `create: false` and there is no store at the path.
    #[error("no keel store at {path}")]
    NotFound {
        /// The store directory.
        path: PathBuf,
    },

    /// A stored idempotency-key claim does not decode.
    #[error("corrupt idempotency claim: {reason}")]
    CorruptClaim {
        /// What was seen, in words.
        reason: String,
    },

    /// A stored entry of the due-time index does not decode.
    #[error("corrupt due-time index: {reason}")]
    CorruptDue {
        /// What was seen, in words.
        reason: String,
    },

    /// A configuration value is out of range.
    #[error("invalid store config: {reason}")]
    InvalidConfig {
        /// What was seen, in words.
        reason: String,
    },

    /// A flush failed earlier; the outcome of in-flight appends is unknown and every later
    /// append is refused. Reopen the store and read the heads.
    #[error("store poisoned by an earlier failed flush; reopen it")]
    Poisoned,

    /// An I/O error (opening, flushing, fsyncing).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// An error reported by sled (other than plain I/O).
    #[error("sled error: {0}")]
    Sled(String),

    /// Records the store's manifest says were committed are gone (or differ): sled's
    /// recovery dropped them. The store is refused for writing; `evidence` is the copy of
    /// sled's files as they were found before sled recovered them, when one was made.
    #[error("{}", lost_message(path, lost, evidence.as_deref()))]
    LostCommitted {
        /// The store directory.
        path: PathBuf,
        /// What is lost, per run.
        lost: Vec<LostRecords>,
        /// Where sled's files as found were copied before sled recovered them.
        evidence: Option<PathBuf>,
    },

    /// A file of the store could not be read or copied (`action` says what was tried).
    #[error("cannot {action} {path}: {source}")]
    File {
        /// What was tried, e.g. "read", "copy to".
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// sled panicked (e.g. on a corrupt database while opening); the panic was caught.
    #[error("sled panicked: {0}")]
    Panicked(String),
}

/// Committed records of one run that the database no longer holds (or holds differently).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LostRecords {
    /// The run concerned.
    pub run: RunId,
    /// The first seq that is missing or differs.
    pub from: Seq,
    /// The manifest's next seq for the run: records `from..committed_next` are lost.
    pub committed_next: Seq,
    /// What was seen, in words.
    pub reason: String,
}

impl std::fmt::Display for LostRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.committed_next.0.saturating_sub(1);
        write!(f, "run {} seqs {}..={} ({})", self.run, self.from.0, last, self.reason)
    }
}

/// The text of [`StoreError::LostCommitted`]: the first runs, then a count.
fn lost_message(path: &std::path::Path, lost: &[LostRecords], evidence: Option<&std::path::Path>) -> String {
    const SHOWN: usize = 5;
    let mut s = format!("committed records lost from the keel store at {}: ", path.display());
    let shown: Vec<String> = lost.iter().take(SHOWN).map(ToString::to_string).collect();
    s.push_str(&shown.join("; "));
    if lost.len() > SHOWN {
        s.push_str(&format!("; and {} more runs", lost.len() - SHOWN));
    }
    if let Some(e) = evidence {
        s.push_str(&format!("; sled's files as found are kept in {}", e.display()));
    }
    s
}

/// Maps a sled error into the store's error, keeping I/O errors typed.
#[cfg(feature = "sled")]
pub(crate) fn sled_err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => StoreError::Io(os_error_of_sled_clone(io)),
        other => StoreError::Sled(other.to_string()),
    }
}

/// sled hands later callers a clone of an I/O error that is a new error whose text is the
/// original's debug format (`Os { code: 28, kind: StorageFull, message: "No space left
/// on device" }`): the OS error again, so that it reads as words.
#[cfg(feature = "sled")]
fn os_error_of_sled_clone(e: std::io::Error) -> std::io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    let text = e.to_string();
    let code = text
        .strip_prefix("Os { code: ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse::<i32>().ok());
    match code {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => e,
    }
}

/// The text of a caught panic's payload.
#[cfg(feature = "sled")]
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic payload".to_string())
}

#[cfg(all(test, feature = "sled"))]
mod sled_clone_tests {
    #[test]
    fn a_cloned_sled_io_error_reads_as_words() {
        let original = std::io::Error::from_raw_os_error(28);
        let cloned = std::io::Error::new(original.kind(), format!("{original:?}"));
        let e = super::sled_err(sled::Error::Io(cloned));
        assert_eq!(e.to_string(), "I/O error: No space left on device (os error 28)");
    }
}
