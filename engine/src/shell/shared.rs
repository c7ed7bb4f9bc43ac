//! The run queue of a store shared by several processes ([`keel_store::WorkQueue`],
//! PostgreSQL): runnable runs are pushed to the store, and the workers of every process
//! claim them from it (each claim grants the run's lease), so priority order and each
//! workflow type's `max_concurrent_runs` hold across processes. Timers go to the store's
//! due-time index, so a timer set by one process fires in whichever takes it. A store one
//! process opens (sled, memory) has no shared queue: `shell::queue` is the queue then.

use crate::model::state::RunState;
use crate::shell::driver::DriveOutcome;
use crate::shell::runtime::Inner;
use keel_store::{Claimed, Lease, RunId, Runnable};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Whether `inner`'s store shares its run queue with other processes.
pub(crate) fn is_shared(inner: &Inner) -> bool {
    inner.log.work_queue().is_some()
}

/// Pushes `s` to the shared queue; false if the store has none (queue it here then).
pub(crate) fn push(inner: &Inner, s: &RunState) -> bool {
    let Some(q) = inner.log.work_queue() else { return false };
    let r =
        Runnable { run: s.run, workflow: s.workflow.clone(), priority: s.priority, accepted_at_us: s.accepted_at_us };
    if let Err(e) = q.push(&r) {
        // The run stays runnable in its log: the next scan queues it.
        tracing::warn!(run = %s.run, error = %e, "cannot queue the run in the shared queue");
    }
    true
}

/// The workflow types with a `max_concurrent_runs` of their own.
fn limits(inner: &Inner) -> BTreeMap<String, usize> {
    inner
        .workflows
        .iter()
        .filter(|(_, r)| r.wf.max_concurrent_runs > 0)
        .map(|(name, r)| (name.clone(), r.wf.max_concurrent_runs))
        .collect()
}

/// How long the service loop puts off a claim for fewer free workers than
/// [`claim_now`]'s batch, at most.
pub(crate) const CLAIM_GATHER: Duration = Duration::from_millis(10);

/// Whether to claim now for the free workers (`workers - active`), or to put the claim off
/// for at most `left`. A claim costs the same whether it takes one run or several (in
/// PostgreSQL: its locks, the count of live leases of each limited workflow type, the
/// candidates, the grant, a WAL barrier), so while most workers are busy the service loop
/// gathers free workers, up to half of them, before it claims; for at most
/// [`CLAIM_GATHER`] after it first put a claim off (`put_off_for`), so a worker is never
/// left idle longer than that while runs wait (half since session 13, a quarter before:
/// with the fold and `done` of a run gone from the statements a run costs, the claim's
/// four were a larger share; docs/PERFORMANCE.md). An engine with nothing driving, or
/// fewer than 4 workers, claims at once; so does one whose last claim `came_short` (took fewer
/// runs than asked: the queue had no more for it, and the loop claims again when woken,
/// not on a timer).
pub(crate) fn claim_now(workers: usize, active: usize, put_off_for: Option<Duration>, came_short: bool) -> ClaimNow {
    let room = workers.saturating_sub(active);
    if room == 0 {
        return ClaimNow::NoRoom;
    }
    let batch = (workers / 2).max(1);
    if active == 0 || room >= batch || came_short {
        return ClaimNow::Claim(room);
    }
    match put_off_for {
        Some(waited) if waited >= CLAIM_GATHER => ClaimNow::Claim(room),
        Some(waited) => ClaimNow::PutOff { left: CLAIM_GATHER.saturating_sub(waited) },
        None => ClaimNow::PutOff { left: CLAIM_GATHER },
    }
}

/// What [`claim_now`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClaimNow {
    /// Every worker is busy.
    NoRoom,
    /// Claim this many runs.
    Claim(usize),
    /// Put the claim off; decide again within `left`.
    PutOff { left: Duration },
}

/// Claims as many runs as this engine has free workers, each with its lease. With
/// `gather` (the service loop), a claim for a few free workers while most are busy is put
/// off ([`claim_now`]): nothing is claimed, and the loop should look again within the
/// duration returned.
pub(crate) async fn claim(inner: &Arc<Inner>, gather: bool) -> (Vec<Claimed>, Option<Duration>) {
    let room = {
        let mut sched = inner.sched();
        let active = sched.active.len();
        let put_off_for = sched.claim_put_off_at.map(|at| at.elapsed());
        // Without gathering, every claim is made at once (as after one that came short).
        let decided = claim_now(inner.workers, active, put_off_for, sched.claim_came_short || !gather);
        match decided {
            ClaimNow::NoRoom => {
                sched.claim_put_off_at = None;
                return (Vec::new(), None);
            }
            ClaimNow::PutOff { left } => {
                sched.claim_put_off_at.get_or_insert_with(std::time::Instant::now);
                return (Vec::new(), Some(left));
            }
            ClaimNow::Claim(room) => {
                sched.claim_put_off_at = None;
                room
            }
        }
    };
    let l = &inner.leasing;
    let (owner, ttl_ms, now_us, limits) = (l.owner.clone(), l.ttl_ms, l.clock.now_us(), limits(inner));
    let claimed = inner
        .blocking(move |log| match log.work_queue() {
            Some(q) => Ok(q.claim(&owner, ttl_ms, now_us, room, &limits)?),
            None => Ok(Vec::new()),
        })
        .await;
    let claimed = claimed.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot claim runs from the shared queue");
        Vec::new()
    });
    inner.sched().claim_came_short = claimed.len() < room;
    (claimed, None)
}

/// Whether the shared queue holds a run of this engine's workflow types other than
/// `except` (false without a shared queue, or when the store cannot tell: logged).
pub(crate) async fn any_queued(inner: &Arc<Inner>, except: Vec<RunId>) -> bool {
    if !is_shared(inner) {
        return false;
    }
    let names: Vec<String> = inner.workflows.keys().cloned().collect();
    let queued = inner
        .blocking(move |log| match log.work_queue() {
            Some(q) => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                Ok(q.any_queued(&names, &except)?)
            }
            None => Ok(false),
        })
        .await;
    queued.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot tell whether the shared queue holds runs");
        false
    })
}

/// Tells the shared queue that this engine's drive of `run` ended as `out`: the run
/// leaves it (a timer's due time goes to the due-time index), or goes round again if it
/// was pushed meanwhile; `lease` (the drive's) is released in the same step. A drive that
/// lost its lease leaves the run to the next claimer. A drive that this engine's stop
/// ended (a drain, or a shutdown) hands its run back: queued, unclaimed, its lease
/// released, and every process told, so another one takes it over at once (left claimed
/// and unannounced, it waited for another process's poll or rescan). Whether `lease` was
/// released.
pub(crate) fn done(inner: &Inner, run: RunId, out: &DriveOutcome, lease: &mut Lease) -> bool {
    let Some(q) = inner.log.work_queue() else { return false };
    let due = match out {
        DriveOutcome::Waiting { until_us } | DriveOutcome::Parked { until_us } => Some(*until_us),
        // Tried again after a lease's time (as a scan would).
        DriveOutcome::Stopped(_) => Some(inner.clock.now_us().saturating_add(ttl_us(inner))),
        DriveOutcome::Idle(_) => None,
        DriveOutcome::LeaseLost => return false,
        DriveOutcome::Shutdown => return hand_back(inner, q, run, Some(lease)),
    };
    match q.done(run, &inner.leasing.owner, due, Some(lease)) {
        Ok(_) => {
            if let Some(due) = due {
                inner.sched().due_here.insert(run, due);
            }
            true
        }
        Err(e) => {
            tracing::warn!(%run, error = %e, "cannot mark the run done in the shared queue (its claim expires)");
            false
        }
    }
}

/// A run whose drive this engine's stop ended, handed back to the shared queue in one
/// step (`WorkQueue::hand_back`): still queued, unclaimed, the drive's lease released, and
/// every process told at the commit. Whether `lease` was released.
pub(crate) fn hand_back(inner: &Inner, q: &dyn keel_store::WorkQueue, run: RunId, lease: Option<&mut Lease>) -> bool {
    match q.hand_back(run, &inner.leasing.owner, lease) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(%run, error = %e, "cannot hand the run back to the shared queue (its claim expires)");
            false
        }
    }
}

/// How long the service loop may sleep: until the earliest due time this process wrote
/// falls due (one passed already: no wait, the next turn reads the index), at most
/// `poll`, the fallback for the timers of other processes and for missed notifications.
/// Without it a run's retry backoff waited for the next poll (an hour, if so configured).
pub(crate) fn next_look(inner: &Inner, poll: Duration) -> Duration {
    let now = inner.clock.now_us();
    let s = inner.sched();
    // Entries are forgotten by the read that covers them (`take_due`), not here: one that
    // passed since is looked at on the next turn (a wait of 0).
    match s.due_here.values().copied().min() {
        Some(due) => crate::shell::queue::until_due(due, now).min(poll),
        None => poll,
    }
}

fn ttl_us(inner: &Inner) -> i64 {
    i64::try_from(inner.leasing.ttl_ms).unwrap_or(i64::MAX).saturating_mul(1000)
}

/// The runs whose due time passed (set by any process), each taken by one process: the
/// caller queues them. The index is read at most once per [`DUE_READ_EVERY`] unless a due
/// time this process wrote has passed: the service loop goes round on every drive that
/// ends and every notification of any process, and a read per round was a round trip to
/// the database per run driven. (The timers of other processes are found by the next read
/// on a turn of the loop, as before: a wake-up, or the poll.)
pub(crate) async fn take_due(inner: &Arc<Inner>) -> Vec<RunId> {
    let now = inner.clock.now_us();
    {
        let mut s = inner.sched();
        let mine_due = s.due_here.values().any(|due| *due <= now);
        let recent = s.due_read_at.is_some_and(|at| at.elapsed() < DUE_READ_EVERY);
        if recent && !mine_due {
            return Vec::new();
        }
        s.due_read_at = Some(std::time::Instant::now());
        // This read covers them.
        s.due_here.retain(|_, due| *due > now);
    }
    let due = inner
        .blocking(move |log| match log.work_queue() {
            Some(q) => Ok(q.take_due(now, DUE_PER_TICK)?),
            None => Ok(Vec::new()),
        })
        .await;
    due.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the due-time index");
        Vec::new()
    })
}

/// Least time between two reads of the due-time index (see [`take_due`]).
const DUE_READ_EVERY: Duration = Duration::from_millis(20);

/// Due runs queued per tick at most.
const DUE_PER_TICK: usize = 256;

/// Wakes `inner`'s service workers on the store's notifications.
pub(crate) fn listen(inner: &Inner) {
    if let Some(q) = inner.log.work_queue() {
        let wake = inner.wake.clone();
        q.on_wake(Box::new(move || wake.notify_one()));
    }
}

#[cfg(test)]
mod tests {
    use super::{claim_now, ClaimNow, CLAIM_GATHER};
    use std::time::Duration;

    #[test]
    fn a_claim_for_few_free_workers_waits_for_more_but_not_for_long() {
        let ms = Duration::from_millis;
        // Every worker busy: nothing to claim.
        assert_eq!(claim_now(16, 16, None, false), ClaimNow::NoRoom);
        // Nothing driving: at once, whatever the room.
        assert_eq!(claim_now(16, 0, None, false), ClaimNow::Claim(16));
        // Half of the workers free: at once.
        assert_eq!(claim_now(16, 8, None, false), ClaimNow::Claim(8));
        // Fewer: put off, for at most CLAIM_GATHER since it was first put off.
        assert_eq!(claim_now(16, 9, None, false), ClaimNow::PutOff { left: CLAIM_GATHER });
        assert_eq!(claim_now(16, 15, Some(ms(4)), false), ClaimNow::PutOff { left: CLAIM_GATHER - ms(4) });
        assert_eq!(claim_now(16, 15, Some(CLAIM_GATHER), false), ClaimNow::Claim(1));
        // Fewer than 4 workers: a batch of one, so at once; 4: a batch of two.
        assert_eq!(claim_now(3, 2, None, false), ClaimNow::Claim(1));
        assert_eq!(claim_now(1, 0, None, false), ClaimNow::Claim(1));
        assert_eq!(claim_now(4, 3, None, false), ClaimNow::PutOff { left: CLAIM_GATHER });
        // The last claim came short (the queue had no more): at once, no timer.
        assert_eq!(claim_now(16, 15, None, true), ClaimNow::Claim(1));
    }
}
