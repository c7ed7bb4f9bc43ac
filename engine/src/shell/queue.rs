//! The run queue: which run is driven next. Plain data (no I/O, no tokio tasks), held by
//! the runtime under a mutex; the scheduler ([`crate::shell::sched`]) claims from it.

use keel_store::RunId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) struct QueueKey {
    /// Negated priority: the smallest key is the highest priority.
    neg_priority: i64,
    accepted_at_us: i64,
    pub(crate) ticket: u64,
}

/// The run queue and the set of runs being driven (plain data under the runtime's mutex).
#[derive(Default)]
pub(crate) struct Scheduler {
    pub(crate) queue: BTreeMap<QueueKey, (RunId, String)>,
    pub(crate) queued: BTreeMap<RunId, QueueKey>,
    pub(crate) active: BTreeMap<RunId, (String, Arc<Notify>)>,
    pub(crate) active_per_workflow: BTreeMap<String, usize>,
    /// Active runs that something appended to while they were driven: queue again on release.
    pub(crate) dirty: BTreeSet<RunId>,
    /// Runs waiting for an escalation deadline or a timer (a retry backoff, the run's
    /// deadline), driven by no one until then (service workers only): run -> due time.
    pub(crate) parked: BTreeMap<RunId, i64>,
    /// With a shared queue: the due times this process wrote to the store's due-time index
    /// (run -> due time), so its service loop reads the index when they fall due instead of
    /// at its next poll (`shell::shared::done`).
    pub(crate) due_here: BTreeMap<RunId, i64>,
    /// With a shared queue: when the service loop last read the store's due-time index.
    pub(crate) due_read_at: Option<std::time::Instant>,
    /// With a shared queue: since when the service loop has put off a claim for a worker
    /// that is free (`shell::shared::claim_now`).
    pub(crate) claim_put_off_at: Option<std::time::Instant>,
    /// With a shared queue: the last claim took fewer runs than it asked for (the queue had
    /// no more for this engine then), so the next is not put off.
    pub(crate) claim_came_short: bool,
    pub(crate) ticket: u64,
}

impl Scheduler {
    pub(crate) fn push(&mut self, run: RunId, workflow: String, priority: i32, accepted_at_us: i64) {
        if self.active.contains_key(&run) {
            self.dirty.insert(run);
            return;
        }
        if self.queued.contains_key(&run) {
            return;
        }
        self.parked.remove(&run);
        self.ticket += 1;
        let key = QueueKey { neg_priority: -i64::from(priority), accepted_at_us, ticket: self.ticket };
        self.queue.insert(key, (run, workflow));
        self.queued.insert(run, key);
    }

    /// The next run to drive within the limits, marked active.
    /// `workers`: runs driven at once; `limit_of`: a workflow type's `max_concurrent_runs`
    /// (0 = no limit of its own).
    pub(crate) fn claim(&mut self, workers: usize, limit_of: impl Fn(&str) -> usize) -> Option<(RunId, Arc<Notify>)> {
        if self.active.len() >= workers {
            return None;
        }
        let mut chosen = None;
        for (key, (run, wf)) in &self.queue {
            let limit = limit_of(wf);
            let busy = self.active_per_workflow.get(wf).copied().unwrap_or(0);
            if limit == 0 || busy < limit {
                chosen = Some((*key, *run));
                break;
            }
        }
        let (key, run) = chosen?;
        let (_, wf) = self.queue.remove(&key)?;
        self.queued.remove(&run);
        self.activate(run, wf).map(|wake| (run, wake))
    }

    /// Marks `run` (of workflow type `wf`) driven here: its driver's wake-up, or `None`
    /// if it is driven here already. A run claimed from a shared queue comes in this way.
    pub(crate) fn activate(&mut self, run: RunId, wf: String) -> Option<Arc<Notify>> {
        if self.active.contains_key(&run) {
            return None;
        }
        *self.active_per_workflow.entry(wf.clone()).or_insert(0) += 1;
        let wake = Arc::new(Notify::new());
        self.active.insert(run, (wf, wake.clone()));
        Some(wake)
    }

    /// Ends a drive; returns whether the run must be queued again.
    pub(crate) fn release(&mut self, run: RunId) -> bool {
        if let Some((wf, _)) = self.active.remove(&run) {
            if let Some(n) = self.active_per_workflow.get_mut(&wf) {
                *n = n.saturating_sub(1);
            }
        }
        self.dirty.remove(&run)
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }
}

/// How long to sleep towards a timer due at `due_us` (at most `TIMER_SLICE_MS`).
pub(crate) fn until_due(due_us: i64, now_us: i64) -> std::time::Duration {
    let ms = (due_us.saturating_sub(now_us).saturating_add(999) / 1000).clamp(1, TIMER_SLICE_MS);
    std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(1))
}

/// Longest sleep towards a timer before the clock is read again.
const TIMER_SLICE_MS: i64 = 100;
