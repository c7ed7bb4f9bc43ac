//! keel-replay: offline replay, the determinism check, time travel, fork and diff of runs,
//! audit export (JSONL / CSV / HTML) and verification. The `keel` command line is the
//! keel-cli crate (replay/cli); this library opens no database itself: callers hand it a
//! store (`&dyn EventLog`).
//!
//! Everything here reads a run's history — from a keel database
//! ([`source::load_run_from_db`]) or from an export file ([`source::export_runs`]) — and
//! folds it with the engine's pure core. Nothing here changes a recorded run: a fork is a
//! new run.
//!
//! - [`timeline`]: the state at any seq; step forward and back.
//! - [`check`]: does the current code decide what the log says it did? The first
//!   divergence (`keel replay --check`, the CI gate for code changes).
//! - [`fork`]: continue a copy of a run from seq N live, with another policy, reusing the
//!   recorded answers where the same call comes again; [`diff`]: compare two runs.
//! - [`export`], [`html`], [`verify`]: the audit trail (docs/EXPORT.md, docs/AUDIT.md).

#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]

pub mod anchor;
pub mod archive;
pub mod check;
pub mod diff;
pub mod error;
pub mod export;
pub mod fork;
pub mod format;
pub mod html;
pub mod payloads;
pub mod policy;
pub mod sign;
pub mod source;
pub mod timeline;
pub mod verify;
pub mod views;

pub use check::{check_run, CheckOptions, CheckReport, Divergence, EventClass};
pub use diff::{diff, diff_events, Diff};
pub use error::ReplayError;
pub use export::{select_runs, CsvWriter, JsonlWriter, Redaction};
pub use fork::{continue_run, fork, save_run, ForkConfig, ForkReport, Forked};
pub use html::HtmlWriter;
pub use policy::apply_settings;
pub use source::{
    export_runs, load_run_from_db, load_runs_from_db, read_export, resolve_run, ExportLine, ExportRecord,
};
pub use timeline::{Cursor, Replay};
pub use verify::{verify_db, verify_export, Failure, Tamper, Verification};
