//! keel-store-postgres: keel's event log and coordination ([`keel_store::EventLog`],
//! [`keel_store::Coordination`]) on PostgreSQL, so several keel processes can share one
//! database.
//!
//! - The same record values as the embedded backends, byte for byte (sealed and checked
//!   by [`keel_store::backend`]), in an `events` table keyed by `(run, seq)`: exports,
//!   `verify` and replay read the same bytes on either backend.
//! - Appends are decided by the database: a flush locks the heads of its runs, so an
//!   append at a taken seq is `Conflict` whatever process made it; concurrent appends
//!   share one transaction per flush (group commit, `synchronous_commit` on).
//! - Leases are rows with an owner, an epoch and an expiry; a fenced append checks its
//!   epoch under the lease row's lock inside the append's transaction (`Fenced` otherwise).
//! - A `work` table of runnable runs shared by every process's workers, claimed with
//!   `FOR UPDATE SKIP LOCKED` (each claim grants the run's lease in its transaction),
//!   woken by `LISTEN/NOTIFY` (polling as the fallback).
//! - The tables are created and migrated at open ([`SCHEMA_VERSION`]); a schema migrated by
//!   a newer build is refused ([`OpenError::SchemaTooNew`]).
//! - Sessions come from a `deadpool-postgres` pool; one that lost its connection or was
//!   abandoned mid-statement is never reused. Every call is bounded (connect, statement,
//!   call timeouts in [`PgConfig`]), each ending in [`PgError::Timeout`] naming [`Timed`].
//!
//! Schema, durability and fencing: `docs/STORE.md`, "PostgreSQL".

#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]

mod cached;
mod error;
mod group;
mod herald;
mod pool;
mod queue;
mod schema;
mod store;
mod tokens;
mod wakers;

pub use error::{OpenError, PgError, Timed};
pub use schema::SCHEMA_VERSION;
pub use store::{PgConfig, PgStats, PgStore};
pub use tokens::{TokenRow, TOKENS_MAX};
