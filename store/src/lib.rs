//! keel-store: the append-only, tamper-evident, crash-safe event log that keel's engine
//! writes every transition to before acting on it.
//!
//! The store knows nothing of workflows: it stores opaque, bincode-encoded payloads that
//! implement [`Payload`], chains them with SHA-256, and hands them back in order.
//!
//! CONTRACT (shared with keel-engine; helpers implement behind it, do not rename):
//! - [`RunId`], [`Seq`] newtypes. Seq is 0-based: a run's first record has seq 0, and an
//!   append to an empty run passes `expected = Seq(0)`.
//! - [`Payload`]: what a record carries. `kind()` and `payload_version()` are stored in
//!   the envelope; `fields()` gives the JSON object whose top-level fields are digested one
//!   by one (the unit of redaction).
//! - [`EventLog`] (the log) and [`Coordination`] (leases with epochs and fenced appends,
//!   claims, snapshots, aux entries, due times, the shared [`WorkQueue`] if any), held
//!   together as [`Store`]: the narrow, object-safe seam the engine talks to. No method has
//!   a default.
//! - `SledStore` (the `sled` feature, on by default): the embedded backend; [`MemStore`]:
//!   in-memory (tests). Both pass `keel-store-conformance`.
//!
//! Byte layout, hash formulas, durability steps and limits: `docs/STORE.md`.
//!
//! ```
//! use keel_store::{prepare, EventLog, MemStore, Payload, RunId, Seq};
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Hello { name: String }
//! impl Payload for Hello {
//!     fn kind(&self) -> &'static str { "Hello" }
//!     fn payload_version(&self) -> u16 { 1 }
//!     fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
//!         let mut m = serde_json::Map::new();
//!         m.insert("name".into(), self.name.clone().into());
//!         m
//!     }
//! }
//! # fn main() -> Result<(), keel_store::StoreError> {
//! let log = MemStore::new();
//! let run = RunId::from_bytes([7; 16]);
//! let head = log.append(run, Seq(0), vec![prepare(&Hello { name: "a".into() }, 0)?], None)?;
//! assert_eq!(head.next_seq, Seq(1));
//! let first = log.read(run, Seq(0))?.next().transpose()?.map(|r| r.decode::<Hello>());
//! assert_eq!(first.transpose()?.map(|h| h.name), Some("a".to_string()));
//! # Ok(()) }
//! ```

#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]

pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
mod coordination;
pub mod envelope;
mod error;
pub mod json;
mod kv;
mod log;
mod observed;
mod payloads;
#[cfg(feature = "sled")]
mod sled;
pub mod stats;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;
pub mod verify;

pub use coordination::{
    counter_add, counter_delta, counter_value, merge_aux, AuxEntry, AuxWrite, Coordination, Fence, Lease,
    ReleaseOnDrop, Store, COUNTER_PREFIX, OWNER_BYTES_MAX,
};
pub use coordination::{
    AppendFuture, AsyncAppend, Claimed, EndingFuture, FoldFuture, FoldSource, Runnable, WorkQueue, CLAIM_RUNS_MAX,
    WORKFLOW_BYTES_MAX,
};
pub use envelope::record::FORMAT_MARKER;
pub use envelope::{codec, digest};
pub use error::{LostRecords, StoreError};
pub use kv::mem::MemStore;
pub use log::{
    prepare, prepare_within, read_runs_in_turn, Claim, Durability, EventLog, Head, Level, Limits, NewRecord, Record,
    RecordIter, RunRecords, StoreConfig, KIND_BYTES_MAX, SCHEMA_VERSION,
};
pub use observed::{AppendObserver, Observed};
pub use payloads::{verify_payloads, PayloadRef, Payloads, PAYLOAD_BYTES_MAX, PAYLOAD_CHUNK_BYTES};
#[cfg(feature = "sled")]
pub use sled::manifest::MANIFEST_FILE;
#[cfg(all(feature = "sled", any(feature = "testing", feature = "bench")))]
pub use sled::RawPair;
#[cfg(feature = "sled")]
pub use sled::{SledStore, CREATING_FILE, MARKER_FILE, SEGMENT_BYTES};
pub use types::*;
pub use verify::{verify_run, VerifyError, VerifyReport};
