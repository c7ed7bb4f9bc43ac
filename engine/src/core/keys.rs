//! The two keys a handler gets for a dispatch (docs/ENGINE.md, "The effects contract").
//!
//! - [`effect_key`]: one per side effect. The same for every attempt, retry, crash and
//!   redelivery of a task while its spec is the one first planned in revision
//!   `planned_in`; a replan that keeps the task's id and spec keeps it, a changed spec is a
//!   new effect with a new key. Handlers with side effects dedupe on this one.
//! - [`attempt_key`]: one per attempt (new on every retry, the same on a redelivery of the
//!   attempt), for what is per attempt (a log line, a per-try request id). Deduplicating a
//!   side effect on it repeats the effect when an attempt that already acted is retried.

use crate::model::workflow::TaskId;
use keel_store::RunId;
use sha2::{Digest, Sha256};

/// The side effect's key: SHA-256("keel/effect", run, task id, the revision in which the
/// task's current spec was first planned), first 16 bytes as hex.
pub fn effect_key(run: RunId, task: &TaskId, planned_in: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"keel/effect");
    h.update(run.as_bytes());
    h.update(planned_in.to_le_bytes());
    h.update(task.0.as_bytes());
    let d: [u8; 32] = h.finalize().into();
    hex::encode(d.first_chunk::<16>().copied().unwrap_or_default())
}

/// The attempt's key: SHA-256("keel/dispatch", run, revision, task id, attempt), first 16
/// bytes as hex (what payload version 1 of `TaskDispatched` called `idempotency_key`).
pub fn attempt_key(run: RunId, revision: u32, task: &TaskId, attempt: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"keel/dispatch");
    h.update(run.as_bytes());
    h.update(revision.to_le_bytes());
    h.update(task.0.as_bytes());
    h.update(attempt.to_le_bytes());
    let d: [u8; 32] = h.finalize().into();
    hex::encode(d.first_chunk::<16>().copied().unwrap_or_default())
}
