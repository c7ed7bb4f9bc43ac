//! The shared work queue: runnable runs that several processes on one store claim from.
//!
//! An embedded store (sled, memory) is opened by one process, whose engine keeps its run
//! queue in memory: [`crate::Coordination::work_queue`] is `None` there, on purpose. A
//! store shared by several processes (PostgreSQL) returns its [`WorkQueue`], and the
//! engine's workers claim runs through it, so priority order and each workflow type's
//! `max_concurrent_runs` hold across every process, and a run queued by one process is
//! driven by whichever claims it first.

use crate::coordination::Lease;
use crate::error::StoreError;
use crate::types::RunId;
use std::collections::BTreeMap;

/// Longest workflow name the queue keeps, in bytes (`TooLarge { what: "workflow name" }`).
pub const WORKFLOW_BYTES_MAX: usize = 256;

/// Most runs one [`WorkQueue::claim`] may take.
pub const CLAIM_RUNS_MAX: usize = 1024;

/// A runnable run as the queue orders it: highest `priority` first, then oldest
/// `accepted_at_us`, then the order pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runnable {
    /// The run.
    pub run: RunId,
    /// Its workflow type (the unit of `max_concurrent_runs`).
    pub workflow: String,
    /// Its priority (higher first).
    pub priority: i32,
    /// When it was accepted, microseconds since the Unix epoch.
    pub accepted_at_us: i64,
}

/// A run taken by [`WorkQueue::claim`]: its lease (granted in the claim's transaction) and
/// its workflow type.
#[derive(Debug)]
pub struct Claimed {
    /// The lease on the run, as [`crate::Coordination::try_lease`] grants it.
    pub lease: Lease,
    /// The run's workflow type.
    pub workflow: String,
}

/// A queue of runnable runs shared by the processes of one store (see the module docs).
/// A run is in the queue from [`WorkQueue::push`] until [`WorkQueue::done`] by the owner
/// that claimed it; while its lease is live no one else claims it, and when the lease
/// expires (its worker died or stalled) it is claimable again.
pub trait WorkQueue: Send + Sync {
    /// Queues `runnable` (nothing if it is queued and unclaimed). A run claimed at the
    /// time is marked to be queued again when its driver is done with it (something was
    /// appended to it meanwhile). Wakes the claimers of every process.
    fn push(&self, runnable: &Runnable) -> Result<(), StoreError>;

    /// Takes up to `max` (at most [`CLAIM_RUNS_MAX`]) queued runs whose lease is free at
    /// `now_us`, in queue order, granting `owner` each run's lease for `ttl_ms` in the same
    /// transaction; a run of a workflow type with a limit in `limits` is taken only while
    /// fewer than that many of its runs hold a live lease, counted across all processes.
    fn claim(
        &self,
        owner: &str,
        ttl_ms: u64,
        now_us: i64,
        max: usize,
        limits: &BTreeMap<String, usize>,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// `owner`'s drive of `run` ended: the run leaves the queue, or is queued again if it
    /// was pushed while driven (returns true then). With `due_at_us` the run's due time
    /// is set in the store's due-time index ([`crate::Coordination::put_due`]) in the same
    /// step, for whichever process takes it ([`WorkQueue::take_due`]). Nothing if `owner`
    /// no longer has the run (its lease was lost and the run claimed again).
    fn done(&self, run: RunId, owner: &str, due_at_us: Option<i64>) -> Result<bool, StoreError>;

    /// Removes and returns up to `limit` runs whose due time is `<= now_us`, earliest
    /// first; each is taken by one caller only (the caller queues it).
    fn take_due(&self, now_us: i64, limit: usize) -> Result<Vec<RunId>, StoreError>;

    /// Calls `wake` whenever a run may have become claimable (a push, a drive done, a
    /// lease released) in any process, as far as the store can tell; callers also poll.
    fn on_wake(&self, wake: Box<dyn Fn() + Send + Sync>);
}
