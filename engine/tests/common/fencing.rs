//! Two drivers of one run on one store (two engines, as two processes would be): the
//! scenarios of docs/ENGINE.md "Leases", run on any backend (MemStore in keel-engine's
//! tests, PostgreSQL in keel-cli's). Another process taking a run over is played by the
//! test itself: it takes the run's lease at a time past the first driver's expiry (the
//! first driver looks paused past its lease), then hands the run to a second engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs, dead_code)]

use crate::common::*;
use keel_engine::*;
use keel_store::{Lease, Store};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a stalling handler records: its gate, calls entered, calls dropped before they
/// answered (their future cancelled).
#[derive(Default)]
pub struct StallState {
    pub open: AtomicBool,
    pub entered: AtomicU64,
    pub dropped: AtomicU64,
}

/// A handler that stalls until its gate opens.
pub struct Stall(pub Arc<StallState>);

struct DropCount(Arc<StallState>, bool);
impl Drop for DropCount {
    fn drop(&mut self) {
        if !self.1 {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl TaskHandler for Stall {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        self.0.entered.fetch_add(1, Ordering::SeqCst);
        let mut guard = DropCount(self.0.clone(), false);
        Box::pin(async move {
            while !guard.0.open.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            guard.1 = true;
            drop(guard);
            Ok(TaskOutput { output: json!({"task": call.task.0}), usage: Usage::default() })
        })
    }
}

fn one_task_workflow() -> WorkflowType {
    let mut t = task("t", TaskKind::Tool, "work", &[]);
    t.timeout_ms = 600_000;
    workflow("w", planner(vec![plan(vec![t])]), pass_evaluator())
}

fn engine(store: Arc<dyn Store>, h: Arc<dyn TaskHandler>, ttl_ms: u64) -> Engine {
    Engine::builder().store(store).workflow(one_task_workflow()).handler("work", h).lease_ttl_ms(ttl_ms).open().unwrap()
}

fn now_us() -> i64 {
    SystemClock.now_us()
}

/// What a scenario measured.
#[derive(Debug)]
pub struct Figures {
    pub runs: usize,
    pub fenced: u64,
    pub renewals_lost: u64,
    pub drives_lost: u64,
    pub dropped_calls: u64,
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Checks every run: seqs 0.. without gap or duplicate, completed exactly once, its one
/// task completed exactly once.
fn check_completed_once(store: &Arc<dyn Store>, runs: &[RunId]) {
    let reader = Engine::builder().store(store.clone()).workflow(one_task_workflow()).open().unwrap();
    for run in runs {
        let events = reader.events(*run).unwrap();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq.0, i as u64, "run {run}: seq gap or duplicate at {i}");
        }
        assert_eq!(count(&events, "RunCompleted"), 1, "run {run}: {:?}", kinds(&events));
        assert_eq!(count(&events, "TaskExecuted"), 1, "run {run}: {:?}", kinds(&events));
        assert_eq!(reader.state(*run).unwrap().status, RunStatus::Completed);
    }
}

/// Another process takes every run's lease, as it would once `a`'s leases expired (its
/// clock is a day ahead: `a` looks paused past its lease).
fn take_over(store: &Arc<dyn Store>, runs: &[RunId]) -> Vec<Lease> {
    runs.iter()
        .map(|r| {
            store.try_lease(*r, "another-process", 60_000, now_us() + 86_400_000_000).unwrap().expect("lease expired")
        })
        .collect()
}

fn heads(store: &Arc<dyn Store>, runs: &[RunId]) -> BTreeMap<RunId, u64> {
    runs.iter().map(|r| (*r, store.head(*r).unwrap().next_seq.0)).collect()
}

/// Engine A drives `n` runs, each stalled in its handler; another process takes the runs
/// over; A's handlers answer: every append of A is refused as `Fenced`, A appends nothing
/// and stops; engine B then completes every run exactly once. `a_store` and `b_store` are
/// two handles on one store (the same handle for an in-process store).
pub async fn stale_driver_is_fenced(a_store: Arc<dyn Store>, b_store: Arc<dyn Store>, n: usize) -> Figures {
    let s = Arc::new(StallState::default());
    // A long lease: no renewal happens during the test, A's appends meet the takeover.
    let a = engine(a_store.clone(), Arc::new(Stall(s.clone())), 600_000);
    let mut runs = Vec::new();
    for i in 0..n {
        runs.push(a.submit(req("w", json!({ "i": i }))).await.unwrap().run);
    }
    let a2 = a.clone();
    let driving = tokio::spawn(async move { a2.run_until_idle().await.unwrap() });
    until("A's calls to start", || s.entered.load(Ordering::SeqCst) == n as u64).await;
    let others = take_over(&b_store, &runs);
    let before = heads(&b_store, &runs);
    s.open.store(true, Ordering::SeqCst);
    let report = driving.await.unwrap();
    assert_eq!(heads(&b_store, &runs), before, "a driver without its lease appended");
    assert_eq!(report.lease_lost, n, "{report:?}");
    let stats = a.lease_stats();
    assert_eq!(stats.fenced, n as u64, "{stats:?}");
    for l in &others {
        b_store.release_lease(l).unwrap();
    }
    drop(others);
    let b = engine(b_store.clone(), ok_handler(Usage::default()), 10_000);
    let report = b.run_until_idle().await.unwrap();
    assert_eq!(report.completed, n, "{report:?}");
    check_completed_once(&b_store, &runs);
    Figures {
        runs: n,
        fenced: stats.fenced,
        renewals_lost: stats.renewals_lost,
        drives_lost: stats.drives_lost,
        dropped_calls: s.dropped.load(Ordering::SeqCst),
    }
}

/// Engine A drives `n` runs with a short lease, each stalled in its handler; another
/// process takes the runs over; A's next heartbeat fails to renew: A stops driving at
/// once, its in-flight calls dropped, nothing appended; engine B completes every run once.
pub async fn lost_renewal_stops_the_driver(a_store: Arc<dyn Store>, b_store: Arc<dyn Store>, n: usize) -> Figures {
    let s = Arc::new(StallState::default());
    let a = engine(a_store.clone(), Arc::new(Stall(s.clone())), 300);
    let mut runs = Vec::new();
    for i in 0..n {
        runs.push(a.submit(req("w", json!({ "i": i }))).await.unwrap().run);
    }
    let a2 = a.clone();
    let driving = tokio::spawn(async move { a2.run_until_idle().await.unwrap() });
    until("A's calls to start", || s.entered.load(Ordering::SeqCst) == n as u64).await;
    // A's heartbeats keep renewing meanwhile (several TTLs pass).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(a.lease_stats().drives_lost, 0, "a renewing driver lost its lease");
    let before = heads(&b_store, &runs);
    let others = take_over(&b_store, &runs);
    let report = driving.await.unwrap();
    assert_eq!(report.lease_lost, n, "{report:?}");
    // The calls run on the engine's call pool: their cancellation lands there a moment later.
    until("A's in-flight calls to be dropped", || s.dropped.load(Ordering::SeqCst) == n as u64).await;
    assert_eq!(heads(&b_store, &runs), before, "a driver without its lease appended");
    let stats = a.lease_stats();
    assert_eq!(stats.renewals_lost, n as u64, "{stats:?}");
    for l in &others {
        b_store.release_lease(l).unwrap();
    }
    drop(others);
    let b = engine(b_store.clone(), ok_handler(Usage::default()), 10_000);
    let report = b.run_until_idle().await.unwrap();
    assert_eq!(report.completed, n, "{report:?}");
    check_completed_once(&b_store, &runs);
    Figures {
        runs: n,
        fenced: stats.fenced,
        renewals_lost: stats.renewals_lost,
        drives_lost: stats.drives_lost,
        dropped_calls: s.dropped.load(Ordering::SeqCst),
    }
}
