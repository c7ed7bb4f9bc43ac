//! Background workers (`Engine::start`): runs are driven as they arrive, a resolution
//! wakes its run, an escalation deadline that falls due while the service runs is
//! applied, and shutdown stops everything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn settle(engine: &Engine, want: impl Fn(&[RunSummary]) -> bool) -> Vec<RunSummary> {
    for _ in 0..500 {
        let runs = engine.runs().unwrap();
        if want(&runs) {
            return runs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("runs did not settle: {:?}", engine.runs().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_drive_new_runs_wake_resolved_ones_and_apply_due_deadlines() {
    let dir = tempdir();
    let clock = FakeClock::at(1_800_000_000_000_000);
    let mut t = task("refund", TaskKind::Tool, "refund", &[]);
    t.success_criteria = Some("small".into());
    let eval = evaluator(|r| {
        let big = r.run_input.value().unwrap()["big"].as_bool().unwrap_or(false);
        Ok(Evaluation {
            verdict: if big { Verdict::Critical } else { Verdict::Pass },
            notes: String::new(),
            usage: Usage::default(),
        })
    });
    let wf = workflow("w", planner(vec![plan(vec![t])]), eval);
    let policy = Policy {
        escalation_deadline_ms: Some(10_000),
        escalation_default: Some(Decision::Approve),
        ..Policy::default()
    };
    let engine = open_engine(dir.path(), wf, &[("refund", ok_handler(Usage::default()))], |b| {
        b.clock(clock.clone()).policy(policy)
    });
    let workers = engine.start();

    let small = engine.submit(Request::new("w", json!({"big": false}))).await.unwrap().run;
    let big1 = engine.submit(Request::new("w", json!({"big": true}))).await.unwrap().run;
    let big2 = engine.submit(Request::new("w", json!({"big": true}))).await.unwrap().run;
    settle(&engine, |rs| {
        rs.len() == 3 && rs.iter().all(|r| r.status.is_terminal() || r.status == RunStatus::AwaitingHuman)
    })
    .await;
    assert_eq!(engine.state(small).unwrap().status, RunStatus::Completed);
    assert_eq!(engine.escalations().unwrap().len(), 2);

    // A human resolves one; the workers pick it up without being asked.
    engine
        .resolve(big1, Resolution { decision: Decision::Reject, by: "ann".into(), reason: "checked".into() })
        .await
        .unwrap();
    settle(&engine, |_| engine.state(big1).unwrap().status == RunStatus::Completed).await;
    assert_eq!(engine.state(big2).unwrap().status, RunStatus::AwaitingHuman);

    // The other one's deadline falls due while the service runs.
    clock.advance_ms(10_001);
    settle(&engine, |_| engine.state(big2).unwrap().status == RunStatus::Completed).await;
    let ev = engine.events(big2).unwrap();
    assert!(ev.iter().any(|e| matches!(&e.event, Event::HumanResolved { by, defaulted: true, decision: Decision::Approve, .. } if by == "deadline")));

    let report = workers.shutdown().await;
    assert!(report.stopped.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_in_flight_work_to_be_resumed() {
    let dir = tempdir();
    let slow = slow_handler(300, |_| Ok(TaskOutput { output: json!(1), usage: Usage::default() }));
    let wf = workflow("w", planner(vec![plan(vec![task("slow", TaskKind::Tool, "slow", &[])])]), pass_evaluator());
    let run = {
        let engine = open_engine(dir.path(), wf.clone(), &[("slow", slow.clone())], |b| b);
        let workers = engine.start();
        let run = engine.submit(Request::new("w", json!({}))).await.unwrap().run;
        settle(&engine, |_| slow.calls() > 0).await;
        workers.shutdown().await;
        let ev = engine.events(run).unwrap();
        assert_eq!(ev.last().unwrap().event.kind_name(), "TaskDispatched", "{:?}", kinds(&ev));
        run
    };
    let engine = open_engine(dir.path(), wf, &[("slow", slow.clone())], |b| b);
    engine.run_until_idle().await.unwrap();
    let ev = engine.events(run).unwrap();
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
    // Same dispatch (attempt 1, same key) redelivered: at-least-once.
    assert_eq!(dispatches(&ev), vec![("slow".to_owned(), 1)]);
    assert_eq!(slow.calls(), 2);
}

/// A handler whose call never answers; `dropped` is set when the engine lets go of the
/// call's future.
struct Hang {
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

struct SetOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        // Letting go of a call takes a moment (a client closing its connection): long
        // enough that nothing but waiting for it sees it done.
        std::thread::sleep(Duration::from_millis(200));
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TaskHandler for Hang {
    fn call(&self, _call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let guard = SetOnDrop(self.dropped.clone());
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<Result<TaskOutput, HandlerError>>().await
        })
    }
}

/// Regression: calls run on the engine's call pool, and each holds the engine (and so the
/// store) while it lives. A drive that ended used to drop its calls without waiting, so
/// they lingered on the pool after `shutdown` returned and a store reopened at once in the
/// same process was sometimes still locked. Now `shutdown` returns only once the calls of
/// its drives are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_only_once_the_calls_in_flight_are_gone() {
    let dir = tempdir();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hang: std::sync::Arc<dyn TaskHandler> =
        std::sync::Arc::new(Hang { calls: calls.clone(), dropped: dropped.clone() });
    let mut t = task("hang", TaskKind::Tool, "hang", &[]);
    t.timeout_ms = 600_000;
    let wf = workflow("w", planner(vec![plan(vec![t])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("hang", hang)], |b| b);
    let workers = engine.start();
    engine.submit(Request::new("w", json!({}))).await.unwrap();
    for _ in 0..500 {
        if calls.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
    workers.shutdown().await;
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the call was still alive on the call pool after shutdown returned"
    );
}

/// Waits until the run's task is dispatched (its call in flight).
async fn dispatched(engine: &Engine, run: RunId) {
    for _ in 0..1000 {
        if count(&engine.events(run).unwrap(), "TaskDispatched") > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never dispatched: {:?}", kinds(&engine.events(run).unwrap()));
}

/// A stop of the workers, then a restart that finishes the run: the events of the run.
async fn stop_then_restart(dir: &std::path::Path, delay_ms: u64, stop: impl AsyncFnOnce(Workers)) -> Vec<Logged> {
    let wf = workflow("wf", planner(vec![plan(vec![task("t", TaskKind::Tool, "slow", &[])])]), pass_evaluator());
    let run = {
        let slow =
            slow_handler(delay_ms, |c| Ok(TaskOutput { output: json!({"t": c.task.0}), usage: Usage::default() }));
        let engine = open_engine(dir, wf.clone(), &[("slow", slow)], |b| b);
        let workers = engine.start();
        let run = engine.submit(req("wf", json!({}))).await.unwrap().run;
        dispatched(&engine, run).await;
        stop(workers).await;
        run
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // the store's lock, released after drop
    let fast = slow_handler(0, |c| Ok(TaskOutput { output: json!({"t": c.task.0}), usage: Usage::default() }));
    let engine = open_engine(dir, wf, &[("slow", fast)], |b| b);
    let report = engine.run_until_idle().await.unwrap();
    assert_eq!(report.completed, 1, "{report:?}");
    engine.events(run).unwrap()
}

/// `Workers::drain` lets the call in flight answer and records it: the restart redelivers
/// nothing (a rolling deploy does not count toward the task's quarantine), where
/// `Workers::shutdown` drops the call and the restart records a redelivery. A drain whose
/// grace passes stops as a shutdown does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_records_the_calls_in_flight_and_the_restart_redelivers_nothing() {
    let dir = tempdir();
    let drained = stop_then_restart(&dir.path().join("drain"), 400, async |w: Workers| {
        let t = std::time::Instant::now();
        w.drain(Duration::from_secs(20)).await;
        assert!(t.elapsed() < Duration::from_secs(10), "the drain waited {:?}", t.elapsed());
    })
    .await;
    assert_eq!(count(&drained, "TaskRedelivered"), 0, "{:?}", kinds(&drained));
    assert_eq!(count(&drained, "TaskExecuted"), 1, "{:?}", kinds(&drained));
    assert_eq!(count(&drained, "TaskDispatched"), 1, "{:?}", kinds(&drained));
    assert_eq!(kinds(&drained).last(), Some(&"RunCompleted"));

    let stopped = stop_then_restart(&dir.path().join("shutdown"), 400, async |w: Workers| {
        w.shutdown().await;
    })
    .await;
    assert_eq!(count(&stopped, "TaskRedelivered"), 1, "{:?}", kinds(&stopped));

    let late = stop_then_restart(&dir.path().join("late"), 10_000, async |w: Workers| {
        let t = std::time::Instant::now();
        w.drain(Duration::from_millis(200)).await;
        assert!(t.elapsed() < Duration::from_secs(5), "the drain took {:?} past its grace", t.elapsed());
    })
    .await;
    assert_eq!(count(&late, "TaskRedelivered"), 1, "{:?}", kinds(&late));
}

/// Holds the first append that records a `TaskDispatched` until `release` (at most 10 s),
/// after saying so in `reached`.
struct HoldFirstDispatch {
    reached: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    held: AtomicBool,
}

impl keel_store::AppendObserver for HoldFirstDispatch {
    type Ticket = ();
    fn before(&self, _run: RunId, _expected: Seq, records: &[keel_store::NewRecord]) {
        if records.iter().any(|r| r.kind == "TaskDispatched") && !self.held.swap(true, Ordering::SeqCst) {
            self.reached.store(true, Ordering::SeqCst);
            let t = std::time::Instant::now();
            while !self.release.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    fn after(&self, _run: RunId, _ticket: (), _result: Result<&keel_store::Head, &keel_store::StoreError>) {}
}

/// A drain asked while the driver appends a dispatch (between the append and the call's
/// start) still makes that call and records its answer: the restart redelivers nothing
/// (found by a review: the driver ended with the dispatch recorded and no call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_asked_during_a_dispatch_still_makes_the_call() {
    let mem: Arc<dyn keel_store::Store> = Arc::new(keel_store::MemStore::new());
    let (reached, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let hold = HoldFirstDispatch { reached: reached.clone(), release: release.clone(), held: AtomicBool::new(false) };
    let observed: Arc<dyn keel_store::Store> = Arc::new(keel_store::Observed::new(mem.clone(), hold));
    let wf = workflow("wf", planner(vec![plan(vec![task("t", TaskKind::Tool, "h", &[])])]), pass_evaluator());
    let h = ok_handler(Usage::default());
    let engine = Engine::builder().store(observed).workflow(wf.clone()).handler("h", h.clone()).open().unwrap();
    let workers = engine.start();
    let run = engine.submit(req("wf", json!({}))).await.unwrap().run;
    for _ in 0..2000 {
        if reached.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(reached.load(Ordering::SeqCst), "the dispatch was never appended");
    let drain = tokio::spawn(workers.drain(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await; // the drain is asked before the append returns
    release.store(true, Ordering::SeqCst);
    drain.await.unwrap();
    assert_eq!(h.calls(), 1, "the dispatched call was not made: {:?}", kinds(&engine.events(run).unwrap()));
    drop(engine);
    let engine = Engine::builder().store(mem).workflow(wf).handler("h", ok_handler(Usage::default())).open().unwrap();
    engine.run_until_idle().await.unwrap();
    let events = engine.events(run).unwrap();
    assert_eq!(count(&events, "TaskRedelivered"), 0, "{:?}", kinds(&events));
    assert_eq!(kinds(&events).last(), Some(&"RunCompleted"), "{:?}", kinds(&events));
}
