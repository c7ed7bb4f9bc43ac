//! The run queue and the workers: which run is driven next, and by whom.
//!
//! Runs are claimed highest priority first, then oldest (acceptance time, then queue
//! order), within two limits: the engine's `workers` (runs driven at once) and each
//! workflow type's `max_concurrent_runs`. A run is driven by at most one driver at a time
//! (the `active` set); an event appended from outside while it is driven (resolve,
//! cancel) wakes its driver, and marks it to be queued again when the driver ends.

use crate::api::IdleReport;
use crate::error::EngineError;
use crate::model::fsm::RunStatus;
use crate::model::state::RunState;
use crate::shell::driver::{DriveOutcome, Phase};
use crate::shell::fold::load_state;
use crate::shell::heartbeat;
use crate::shell::lease::Held;
use crate::shell::queue::until_due;
use crate::shell::runtime::Inner;
use crate::shell::shared;
use keel_store::RunId;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Queue a run (after submit, resolve, or a scan).
pub(crate) fn enqueue(inner: &Inner, s: &RunState) {
    if !shared::push(inner, s) {
        inner.sched().push(s.run, s.workflow.clone(), s.priority, s.accepted_at_us);
    }
    inner.wake.notify_one();
}

/// Something was appended to `run` from outside its driver: wake the driver if there is
/// one (it re-reads the log), else queue the run.
pub(crate) fn poke(inner: &Inner, run: RunId) {
    let mut sched = inner.sched();
    if let Some((_, wake)) = sched.active.get(&run) {
        wake.notify_one();
        sched.dirty.insert(run);
        return;
    }
    drop(sched);
    match load_state(inner.log.as_ref(), run) {
        Ok(Some(s)) if !s.status.is_terminal() => enqueue(inner, &s),
        Ok(_) => {}
        Err(e) => tracing::warn!(%run, error = %e, "cannot queue run"),
    }
}

/// Queue every non-terminal run of the log that is not already queued or driven: the runs
/// of the index's non-terminal status ranges (finished runs are never read). A run
/// waiting for a human needs no driver until it is resolved (a resolution pokes it) or its
/// escalation's default falls due: with `park_waiting` (the service's workers) it is
/// parked until then from its open-escalation entry, without being folded; only one whose
/// sink was not told yet is driven now. Without it (`run_until_idle`, which reports the
/// runs left waiting and applies the defaults already due) every waiting run is driven.
async fn scan(inner: &Arc<Inner>, park_waiting: bool) -> Result<(), EngineError> {
    let (runs, parked) = inner.blocking(move |log| to_resume(log, park_waiting)).await?;
    // With a shared queue, a run in it is someone's to claim: only the others (a push lost
    // with its process, a run waiting for a timer) are folded and queued.
    let runs = inner
        .blocking(move |log| match log.work_queue() {
            Some(q) => Ok(q.unqueued(&runs)?),
            None => Ok(runs),
        })
        .await?;
    {
        let mut sched = inner.sched();
        for (run, due_us) in parked {
            if !sched.active.contains_key(&run) && !sched.queued.contains_key(&run) {
                sched.parked.insert(run, due_us);
            }
        }
    }
    for run in runs {
        {
            let sched = inner.sched();
            if sched.active.contains_key(&run) || sched.queued.contains_key(&run) {
                continue;
            }
        }
        match inner.load(run).await {
            Ok(Some(s)) if !s.status.is_terminal() => {
                inner.cache.fill_from(&s);
                if shared::is_shared(inner) {
                    // One blocking store call per run, off the runtime's threads (the
                    // drivers' heartbeats share them).
                    let inner2 = inner.clone();
                    let queued = inner.blocking(move |_| {
                        enqueue(&inner2, &s);
                        Ok(())
                    });
                    let _ = queued.await;
                } else {
                    enqueue(inner, &s);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(%run, error = %e, "cannot resume run: its log does not fold"),
        }
    }
    Ok(())
}

/// From the index alone: the non-terminal runs to fold and queue, and the runs waiting
/// for a human to park until their escalation's default falls due.
type ToResume = (Vec<RunId>, Vec<(RunId, i64)>);

fn to_resume(log: &dyn keel_store::Store, park_waiting: bool) -> Result<ToResume, EngineError> {
    use crate::shell::index;
    let mut runs = Vec::new();
    for status in RunStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
        if park_waiting && status == RunStatus::AwaitingHuman {
            continue;
        }
        runs.extend(index::runs_in(log, status)?);
    }
    if !park_waiting {
        runs.sort();
        runs.dedup();
        return Ok((runs, Vec::new()));
    }
    let open: BTreeMap<RunId, index::OpenEscalation> = index::open_escalations(log)?.into_iter().collect();
    let mut parked = Vec::new();
    for run in index::runs_in(log, RunStatus::AwaitingHuman)? {
        match open.get(&run) {
            Some(e) if e.notified => parked.extend(e.default_due_us.map(|due| (run, due))),
            // Its sink was not told yet (or no entry): a driver does it.
            _ => runs.push(run),
        }
    }
    runs.sort();
    runs.dedup();
    Ok((runs, parked))
}

type Drives = JoinSet<(RunId, DriveOutcome)>;

/// Starts drivers for the runs this engine may take now: from the store's shared queue if
/// it has one (`shell::shared`), else from the queue here. With `gather` (the service
/// loop), a claim from the shared queue may be put off to take several runs at once
/// (`shared::claim_now`): then the time within which to look again.
async fn spawn_claimed(
    inner: &Arc<Inner>,
    set: &mut Drives,
    stop: &watch::Receiver<Phase>,
    gather: bool,
) -> Option<Duration> {
    if !shared::is_shared(inner) {
        spawn_local(inner, set, stop);
        return None;
    }
    let (claimed, put_off) = shared::claim(inner, gather).await;
    for c in claimed {
        let run = c.lease.run();
        // A claim that was on its way when the workers were told to stop (it may hold a
        // run this engine's drain just handed back, still active here): handed back
        // again, so the other processes take it at once.
        if *stop.borrow() != Phase::Run {
            let (inner2, mut lease) = (inner.clone(), c.lease);
            let _ = inner
                .blocking(move |log| {
                    if let Some(q) = log.work_queue() {
                        shared::hand_back(&inner2, q, run, Some(&mut lease));
                    }
                    Ok(())
                })
                .await;
            continue;
        }
        let Some(wake) = inner.sched().activate(run, c.workflow) else { continue };
        spawn_drive(inner, set, stop, run, wake, Arc::new(Held::new(c.lease)));
    }
    put_off
}

fn spawn_drive(
    inner: &Arc<Inner>,
    set: &mut Drives,
    stop: &watch::Receiver<Phase>,
    run: RunId,
    wake: Arc<tokio::sync::Notify>,
    held: Arc<Held>,
) {
    let inner2 = inner.clone();
    let stop = stop.clone();
    set.spawn(async move {
        let out = heartbeat::drive_leased(inner2, run, wake, stop, held).await;
        (run, out)
    });
}

fn spawn_local(inner: &Arc<Inner>, set: &mut Drives, stop: &watch::Receiver<Phase>) {
    loop {
        let claimed = inner
            .sched()
            .claim(inner.workers, |wf| inner.workflows.get(wf).map(|r| r.wf.max_concurrent_runs).unwrap_or(0));
        let Some((run, wake)) = claimed else { break };
        // One driver per run, also across processes sharing a store: a short lease renewed
        // by a heartbeat, every append fenced with it (`shell::lease`, `shell::heartbeat`).
        let held = match heartbeat::take(inner, run) {
            Ok(Some(held)) => held,
            Ok(None) => {
                tracing::debug!(%run, "run is driven elsewhere (lease held)");
                inner.sched().release(run);
                continue;
            }
            Err(e) => {
                tracing::warn!(%run, error = %e, "cannot take the run's lease");
                inner.sched().release(run);
                continue;
            }
        };
        spawn_drive(inner, set, stop, run, wake, held);
    }
}

fn finish(inner: &Arc<Inner>, run: RunId, out: &DriveOutcome, report: &mut IdleReport, service: bool) {
    report.driven += 1;
    match out {
        DriveOutcome::Idle(RunStatus::Completed) => report.completed += 1,
        DriveOutcome::Idle(RunStatus::Failed) => report.failed += 1,
        DriveOutcome::Idle(RunStatus::Cancelled) => report.cancelled += 1,
        DriveOutcome::Idle(RunStatus::AwaitingHuman) => report.awaiting_human += 1,
        DriveOutcome::Idle(_) | DriveOutcome::Shutdown => {}
        DriveOutcome::Parked { until_us } => {
            report.awaiting_human += 1;
            if service && !shared::is_shared(inner) {
                inner.sched().parked.insert(run, *until_us);
            }
        }
        // A run waiting for a timer: the service's workers drive it again when it falls
        // due (`run_until_idle` keeps its own list).
        DriveOutcome::Waiting { until_us } => {
            if service && !shared::is_shared(inner) {
                inner.sched().parked.insert(run, *until_us);
            }
        }
        DriveOutcome::Stopped(e) => report.stopped.push((run, e.clone())),
        DriveOutcome::LeaseLost => report.lease_lost += 1,
    }
    // (The shared queue was told by the drive itself, before its lease went:
    // `heartbeat::drive_leased`.)
    let again = inner.sched().release(run);
    let stopped = matches!(out, DriveOutcome::Stopped(_) | DriveOutcome::Shutdown | DriveOutcome::LeaseLost);
    if again && !stopped {
        poke(inner, run);
    }
    inner.wake.notify_one();
}

pub(crate) async fn run_until_idle(inner: &Arc<Inner>) -> Result<IdleReport, EngineError> {
    scan(inner, false).await?;
    let (_stop_tx, stop) = watch::channel(Phase::Run);
    let mut set = JoinSet::new();
    let mut report = IdleReport::default();
    // Runs waiting for a timer (retry backoff, deadline): driven again when it falls due,
    // their workers free for other runs meanwhile.
    let mut timers: BTreeMap<RunId, i64> = BTreeMap::new();
    // Runs whose lease this engine lost (another process took them over).
    let mut lost: Vec<RunId> = Vec::new();
    loop {
        spawn_claimed(inner, &mut set, &stop, false).await;
        if set.is_empty() {
            let (queued, others_active) = {
                let s = inner.sched();
                (s.has_queued(), !s.active.is_empty())
            };
            if !queued && !timers.is_empty() {
                wait_for_timers(inner, &mut timers).await;
                continue;
            }
            if !queued {
                // With a shared queue, runs this engine could not claim may still be queued:
                // driven by another process, or leased by one that died (claimable once its
                // lease expires, which no notification announces). Idle only when none is,
                // the runs this engine lost its lease on aside (the process that took them
                // over drives them).
                if shared::any_queued(inner, lost.clone()).await {
                    let _ = tokio::time::timeout(inner.queue_poll, inner.wake.notified()).await;
                    continue;
                }
                break;
            }
            if others_active {
                // Queued runs wait for runs driven by service workers: wait for a release.
                let _ = tokio::time::timeout(Duration::from_millis(50), inner.wake.notified()).await;
                continue;
            }
            // Queued but unclaimable with nothing active: cannot happen (limits >= 1).
            break;
        }
        let joined = if timers.is_empty() {
            set.join_next().await
        } else {
            // A timer may fall due while other runs are driven.
            let next = timers.values().copied().min().unwrap_or(0);
            tokio::select! {
                j = set.join_next() => j,
                _ = tokio::time::sleep(until_due(next, inner.clock.now_us())) => {
                    queue_due(inner, &mut timers);
                    continue;
                }
            }
        };
        match joined {
            Some(Ok((run, out))) => {
                match out {
                    DriveOutcome::Waiting { until_us } => {
                        timers.insert(run, until_us);
                    }
                    DriveOutcome::LeaseLost => lost.push(run),
                    _ => {}
                }
                finish(inner, run, &out, &mut report, false)
            }
            Some(Err(e)) => return Err(EngineError::Internal(format!("driver task: {e}"))),
            None => {}
        }
    }
    Ok(report)
}

/// Sleeps until the earliest of `timers` falls due by the engine's clock (in slices, so a
/// test's fake clock may jump), then queues every run that is due.
async fn wait_for_timers(inner: &Arc<Inner>, timers: &mut BTreeMap<RunId, i64>) {
    let now = inner.clock.now_us();
    let earliest = timers.values().copied().min().unwrap_or(now);
    if earliest > now {
        tokio::time::sleep(until_due(earliest, now)).await;
    }
    queue_due(inner, timers);
}

/// Queues every run of `timers` whose timer fell due.
fn queue_due(inner: &Arc<Inner>, timers: &mut BTreeMap<RunId, i64>) {
    let now = inner.clock.now_us();
    let due: Vec<RunId> = timers.iter().filter(|(_, t)| **t <= now).map(|(r, _)| *r).collect();
    for run in due {
        timers.remove(&run);
        poke(inner, run);
    }
}

/// Background workers started by [`crate::Engine::start`].
pub struct Workers {
    stop: watch::Sender<Phase>,
    handle: Option<tokio::task::JoinHandle<IdleReport>>,
}

impl Workers {
    /// Stops claiming runs, stops every driver at its next wait (in-flight calls are
    /// dropped: their dispatches are durable and resume re-dispatches them, a
    /// redelivery that counts toward the task's quarantine), and waits. Returns what
    /// the workers did.
    pub async fn shutdown(mut self) -> IdleReport {
        let _ = self.stop.send(Phase::Stop);
        match self.handle.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => IdleReport::default(),
        }
    }

    /// A graceful stop: claims no more runs and starts no new call, lets the calls in
    /// flight answer (their results are recorded) for at most `grace`, then stops as
    /// [`Workers::shutdown`] does with whatever is still in flight. A restart after a
    /// drain that ended in time redelivers nothing: a rolling deploy does not count
    /// toward any task's quarantine. Returns what the workers did.
    pub async fn drain(mut self, grace: std::time::Duration) -> IdleReport {
        let _ = self.stop.send(Phase::Drain);
        let Some(mut handle) = self.handle.take() else {
            return IdleReport::default();
        };
        match tokio::time::timeout(grace, &mut handle).await {
            Ok(report) => report.unwrap_or_default(),
            Err(_) => {
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "calls still in flight at the end of the drain: dropped"
                );
                let _ = self.stop.send(Phase::Stop);
                handle.await.unwrap_or_default()
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.stop.send(Phase::Stop);
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").finish_non_exhaustive()
    }
}

pub(crate) fn start(inner: Arc<Inner>) -> Workers {
    let (stop_tx, stop) = watch::channel(Phase::Run);
    let handle = tokio::spawn(service(inner, stop));
    Workers { stop: stop_tx, handle: Some(handle) }
}

/// Queues the log's unfinished runs for the service workers. With a shared queue the runs
/// are in it already (the scan is a safety net, and on a large database it takes a while):
/// it runs beside the workers, which claim from the queue at once.
async fn scan_for_service(inner: &Arc<Inner>) {
    if shared::is_shared(inner) {
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Err(e) = scan(&inner, true).await {
                tracing::warn!(error = %e, "workers: cannot list runs");
            }
        });
    } else if let Err(e) = scan(inner, true).await {
        tracing::error!(error = %e, "workers: cannot list runs to resume");
    }
}

async fn service(inner: Arc<Inner>, mut stop: watch::Receiver<Phase>) -> IdleReport {
    let mut report = IdleReport::default();
    shared::listen(&inner);
    scan_for_service(&inner).await;
    let mut set = JoinSet::new();
    let mut scanned = tokio::time::Instant::now();
    loop {
        // A drain or a stop: nothing more is claimed; the drives still going end below.
        if *stop.borrow() != Phase::Run {
            break;
        }
        // Runs submitted, released or orphaned by other processes sharing the store (a
        // run whose lease is held elsewhere is skipped until the next scan).
        if scanned.elapsed() >= heartbeat::rescan_every(&inner) {
            scanned = tokio::time::Instant::now();
            scan_for_service(&inner).await;
        }
        let tick = if shared::is_shared(&inner) {
            // Timers and escalation deadlines of every process, from the due-time index.
            for run in shared::take_due(&inner).await {
                poke(&inner, run);
            }
            let next = shared::next_look(&inner, inner.queue_poll);
            match spawn_claimed(&inner, &mut set, &stop, true).await {
                Some(put_off) => next.min(put_off),
                None => next,
            }
        } else {
            // Escalation deadlines that fell due.
            let now = inner.clock.now_us();
            let due: Vec<RunId> = inner.sched().parked.iter().filter(|(_, t)| **t <= now).map(|(r, _)| *r).collect();
            for run in due {
                inner.sched().parked.remove(&run);
                poke(&inner, run);
            }
            spawn_claimed(&inner, &mut set, &stop, true).await;
            // Sleep until the next parked run falls due (timers wake on time), at most a tick.
            let next = inner.sched().parked.values().copied().min();
            next.map_or(Duration::from_millis(100), |t| until_due(t, inner.clock.now_us()))
        };
        if let Some(c) = &inner.checkpoints {
            c.tick(inner.log.as_ref(), inner.clock.now_us());
        }
        tokio::select! {
            _ = stop.changed() => break,
            Some(joined) = set.join_next(), if !set.is_empty() => {
                // Every drive that ended is finished before the next claim, so one claim
                // fills every freed worker (not one claim per ended drive).
                let mut joined = Some(joined);
                while let Some(j) = joined.take().or_else(|| set.try_join_next()) {
                    match j {
                        Ok((run, out)) => finish(&inner, run, &out, &mut report, true),
                        Err(e) => tracing::error!(error = %e, "driver task failed"),
                    }
                }
            }
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
    while let Some(joined) = set.join_next().await {
        if let Ok((run, out)) = joined {
            finish(&inner, run, &out, &mut report, true);
        }
    }
    if let Some(Err(e)) = inner.checkpoints.as_ref().map(|c| c.write_now(inner.log.as_ref(), inner.clock.now_us())) {
        tracing::warn!(error = %e, "cannot write the last signed head checkpoint");
    }
    report
}
