//! Bounded JSON and bounded effects (issue 13, items 3 and 4), asserted on recorded events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `[[...[0]...]]` with `depth` arrays, built without recursion.
fn nested(depth: usize) -> Value {
    let mut v = json!(0);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

/// Drops a deep value without recursion (the test's own copies).
fn drop_deep(v: Value) {
    keel_store::json::dismantle(v);
}

fn one_task(handler_name: &str) -> Plan {
    plan(vec![task("t", TaskKind::Tool, handler_name, &[])])
}

fn task_failures(events: &[Logged]) -> Vec<(String, ErrorClass, FailureSource)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskFailed { error, class, source, .. } => Some((error.clone(), *class, *source)),
            _ => None,
        })
        .collect()
}

// ---- bounded JSON ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_output_nested_100000_deep_is_a_recorded_failure_not_a_crash() {
    let dir = tempdir();
    // Before: the canonical writer recursed once per level and overflowed the stack
    // (the process aborted).
    let deep = handler(|_| Ok(TaskOutput { output: nested(100_000), usage: Usage::default() }));
    let wf = workflow("w", planner(vec![one_task("deep")]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("deep", deep)], |b| b);
    let (_, ev) = run_one(&engine, "w").await;
    let failures = task_failures(&ev);
    assert!(!failures.is_empty(), "{:?}", kinds(&ev));
    assert_eq!(failures[0], ("json_too_deep".to_owned(), ErrorClass::Semantic, FailureSource::Engine));
    assert_eq!(count(&ev, "TaskExecuted"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_nested_200_deep_is_refused_and_one_at_the_limit_reads_back() {
    let dir = tempdir();
    // Before: 200 deep was recorded, and read back as null (serde_json's limit is 128).
    let deep = handler(|_| Ok(TaskOutput { output: nested(200), usage: Usage::default() }));
    let at_limit =
        handler(|_| Ok(TaskOutput { output: nested(keel_store::json::JSON_DEPTH_MAX), usage: Usage::default() }));
    let p = plan(vec![task("deep", TaskKind::Tool, "deep", &[]), task("ok", TaskKind::Tool, "ok", &[])]);
    let wf = workflow("w", planner(vec![p]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("deep", deep), ("ok", at_limit)], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert!(task_failures(&ev).iter().all(|f| f.0 == "json_too_deep"), "{:?}", task_failures(&ev));
    assert!(!task_failures(&ev).is_empty());
    let out = ev
        .iter()
        .find_map(|e| match &e.event {
            Event::TaskExecuted { task, output, .. } if task.0 == "ok" => Some(output.clone()),
            _ => None,
        })
        .expect("the output at the limit is recorded");
    let v = out.value().expect("it reads back");
    assert_eq!(v, nested(keel_store::json::JSON_DEPTH_MAX));
    // Every recorded JSON document of the run reads back.
    let st = engine.state(run).unwrap();
    for t in &st.tasks {
        if let Some(o) = &t.output {
            o.value().expect("recorded output reads back");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_input_nested_too_deep_is_refused_by_submit_and_nothing_is_written() {
    let dir = tempdir();
    let wf = workflow("w", planner(vec![one_task("ok")]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b);
    for depth in [65, 300, 100_000] {
        let err = engine.submit(Request::new("w", nested(depth))).await.expect_err("too deep");
        assert!(matches!(err, EngineError::JsonTooDeep { what: "input", max: 64 }), "{err}");
        assert!(err.to_string().starts_with("json_too_deep"), "{err}");
    }
    assert!(engine.runs().unwrap().is_empty(), "nothing written");
    let s = engine.submit(Request::new("w", nested(64))).await.expect("at the limit");
    engine.run_until_idle().await.unwrap();
    assert_eq!(engine.state(s.run).unwrap().status, RunStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_with_a_task_input_nested_too_deep_is_rejected() {
    let dir = tempdir();
    // User code building a plan calls `Json::new`: it must not overflow on any depth.
    let deep_in = nested(100_000);
    assert_eq!(Json::new(&deep_in).as_str().len(), 200_001);
    drop_deep(deep_in);
    let mut bad = task("t", TaskKind::Tool, "ok", &[]);
    bad.input = Json::new(&nested(100));
    let mut bad_schema = task("u", TaskKind::Tool, "ok", &[]);
    bad_schema.output_schema = Some(Json::new(&nested(70)));
    let wf = workflow("w", planner(vec![plan(vec![bad, bad_schema]), one_task("ok")]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    let rejected = plan_rejections(&ev);
    assert_eq!(rejected.len(), 1, "{:?}", kinds(&ev));
    assert!(rejected[0].iter().any(|e| e.contains("task t: input nests deeper than 64")), "{rejected:?}");
    assert!(rejected[0].iter().any(|e| e.contains("task u: output schema nests deeper than 64")), "{rejected:?}");
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplied_output_nested_too_deep_is_refused_and_nothing_is_recorded() {
    let dir = tempdir();
    let review = task("r", TaskKind::HumanReview, "review", &[]);
    let wf = workflow("w", planner(vec![plan(vec![review])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman, "{:?}", kinds(&ev));
    let before = engine.events(run).unwrap().len();
    let deep = nested(100_000);
    let supplied = Json::new(&deep);
    drop_deep(deep);
    let err = engine
        .resolve(
            run,
            Resolution { decision: Decision::SupplyOutput(supplied), by: "ann".into(), reason: "checked".into() },
        )
        .await
        .expect_err("too deep");
    assert!(matches!(err, EngineError::JsonTooDeep { what: "supplied output", .. }), "{err}");
    assert_eq!(engine.events(run).unwrap().len(), before, "nothing recorded");
    engine
        .resolve(
            run,
            Resolution {
                decision: Decision::SupplyOutput(Json::new(&nested(64))),
                by: "ann".into(),
                reason: "checked".into(),
            },
        )
        .await
        .expect("at the limit");
}

// ---- bounded effects ----

/// A sink that never answers.
struct HungSink(AtomicU64);
impl EscalationSink for HungSink {
    fn notify(&self, _ctx: EscalationContext) -> BoxFuture<Result<(), String>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::pending())
    }
}

/// A sink that blocks its thread for a long time.
struct BlockingSink;
impl EscalationSink for BlockingSink {
    fn notify(&self, _ctx: EscalationContext) -> BoxFuture<Result<(), String>> {
        Box::pin(async {
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        })
    }
}

async fn wait_status(engine: &Engine, run: RunId, want: RunStatus, secs: u64) -> RunStatus {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let st = engine.state(run).unwrap().status;
        if st == want || std::time::Instant::now() > end {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hung_sinks_do_not_keep_a_new_run_from_completing(sink: Arc<dyn EscalationSink>) {
    let dir = tempdir();
    let review = plan(vec![task("r", TaskKind::HumanReview, "review", &[])]);
    let wf_h = workflow("h", planner(vec![review]), pass_evaluator());
    let wf_w = workflow("w", planner(vec![one_task("ok")]), pass_evaluator());
    let limits = ShellLimits { sink_timeout_ms: 300, ..ShellLimits::default() };
    let engine = Engine::builder()
        .path(dir.path())
        .workflow(wf_h)
        .workflow(wf_w)
        .handler("ok", ok_handler(Usage::default()))
        .escalation_sink(sink)
        .limits(limits)
        .workers(2)
        .open()
        .unwrap();
    let workers = engine.start();
    let h1 = engine.submit(Request::new("h", json!({}))).await.unwrap();
    let h2 = engine.submit(Request::new("h", json!({}))).await.unwrap();
    assert_eq!(wait_status(&engine, h1.run, RunStatus::AwaitingHuman, 20).await, RunStatus::AwaitingHuman);
    assert_eq!(wait_status(&engine, h2.run, RunStatus::AwaitingHuman, 20).await, RunStatus::AwaitingHuman);
    // Both workers are (or were) busy telling a hung sink; a new run must still complete.
    let w = engine.submit(Request::new("w", json!({}))).await.unwrap();
    let st = wait_status(&engine, w.run, RunStatus::Completed, 30).await;
    let ev = engine.events(w.run).unwrap();
    assert_eq!(st, RunStatus::Completed, "{:?}", kinds(&ev));
    assert_eq!(count(&ev, "RunCompleted"), 1);
    // The hung sinks recorded nothing.
    for h in [h1.run, h2.run] {
        assert_eq!(count(&engine.events(h).unwrap(), "EscalationNotified"), 0);
    }
    workers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hung_sinks_with_two_workers_do_not_keep_a_new_run_in_accepted() {
    hung_sinks_do_not_keep_a_new_run_from_completing(Arc::new(HungSink(AtomicU64::new(0)))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_blocking_their_threads_do_not_keep_a_new_run_in_accepted() {
    hung_sinks_do_not_keep_a_new_run_from_completing(Arc::new(BlockingSink)).await;
}

/// A handler that blocks its thread for `ms` before it answers Ok.
struct Blocking {
    ms: u64,
}
impl TaskHandler for Blocking {
    fn call(&self, _call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let ms = self.ms;
        Box::pin(async move {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(TaskOutput { output: json!({"late": true}), usage: Usage::default() })
        })
    }
}

async fn blocking_handler_is_a_timeout() {
    let dir = tempdir();
    let mut t = task("t", TaskKind::Tool, "block", &[]);
    t.timeout_ms = 300;
    t.retry.max_attempts = 1;
    let wf = workflow("w", planner(vec![plan(vec![t])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("block", Arc::new(Blocking { ms: 1_500 }))], |b| b);
    let (_, ev) = run_one(&engine, "w").await;
    let failures = task_failures(&ev);
    assert_eq!(count(&ev, "TaskExecuted"), 0, "the late answer is discarded: {:?}", kinds(&ev));
    assert!(!failures.is_empty(), "{:?}", kinds(&ev));
    assert_eq!(failures[0], ("timeout after 300 ms".to_owned(), ErrorClass::Transient, FailureSource::Handler));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_thread_past_its_timeout_is_recorded_as_a_timeout() {
    blocking_handler_is_a_timeout().await;
}

#[tokio::test]
async fn a_blocking_handler_cannot_hold_a_current_thread_runtime_past_its_timeout() {
    blocking_handler_is_a_timeout().await;
}

/// A handler that never answers (its timeout is an hour).
struct Hang;
impl TaskHandler for Hang {
    fn call(&self, _call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_deadline_cuts_calls_in_flight_and_is_recorded_when_it_fires() {
    let dir = tempdir();
    let mut slow = task("slow", TaskKind::Tool, "hang", &[]);
    slow.timeout_ms = 3_600_000;
    let mut blocked = task("blocked", TaskKind::Tool, "block", &[]);
    blocked.timeout_ms = 3_600_000;
    let wf = workflow("w", planner(vec![plan(vec![slow, blocked])]), pass_evaluator());
    let handlers: [(&str, Arc<dyn TaskHandler>); 2] =
        [("hang", Arc::new(Hang)), ("block", Arc::new(Blocking { ms: 5_000 }))];
    let engine = open_engine(dir.path(), wf, &handlers, |b| b);
    let mut r = Request::new("w", json!({}));
    r.budget = Some(Budget { deadline_ms: Some(300), ..Budget::default() });
    let s = engine.submit(r).await.unwrap();
    // Before: the driver waited for the calls' hour-long timeouts.
    let report = tokio::time::timeout(Duration::from_secs(30), engine.run_until_idle())
        .await
        .expect("the deadline ends the run, not the calls' timeouts")
        .unwrap();
    assert!(report.stopped.is_empty());
    let ev = engine.events(s.run).unwrap();
    let accepted = ev[0].at_us;
    let deadline = ev
        .iter()
        .find(|e| matches!(e.event, Event::BudgetExhausted { budget: BudgetKind::Deadline, .. }))
        .expect("deadline recorded");
    // Recorded at the deadline: no earlier than 300 ms after acceptance, and before any
    // task's answer (both calls were cut, not answered).
    assert!(deadline.at_us >= accepted + 300_000);
    // ... and when it fires, not at some later wake-up: within a second of the deadline
    // (generous for a loaded two-core machine; the calls' timeouts are an hour).
    assert!(
        deadline.at_us <= accepted + 300_000 + 1_000_000,
        "deadline recorded {} us after acceptance (deadline 300 ms)",
        deadline.at_us - accepted
    );
    let cut: Vec<_> = task_failures(&ev).into_iter().filter(|f| f.0 == "cut at the run's deadline").collect();
    assert_eq!(cut.len(), 2, "{:?}", task_failures(&ev));
    assert!(cut.iter().all(|f| f.2 == FailureSource::Engine && f.1 == ErrorClass::Transient));
    assert_eq!(count(&ev, "TaskExecuted"), 0);
    let last = ev.last().unwrap();
    assert!(matches!(last.event.kind_name(), "RunCompleted" | "RunFailed"), "{:?}", kinds(&ev));
    assert!(engine.state(s.run).unwrap().status.is_terminal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_validation_bounds_backoff_jitter_and_timeouts() {
    let dir = tempdir();
    let mut a = task("a", TaskKind::Tool, "ok", &[]);
    a.retry.backoff_base_ms = u64::MAX;
    let mut b = task("b", TaskKind::Tool, "ok", &[]);
    b.retry.backoff_max_ms = 3_600_001;
    let mut c = task("c", TaskKind::Tool, "ok", &[]);
    c.retry.jitter_ms = 60_001;
    let mut d = task("d", TaskKind::Tool, "ok", &[]);
    d.timeout_ms = 3_600_001;
    let wf = workflow("w", planner(vec![plan(vec![a, b, c, d]), one_task("ok")]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    let rejected = plan_rejections(&ev);
    assert_eq!(rejected.len(), 1, "{:?}", kinds(&ev));
    let errs = &rejected[0];
    for want in [
        "task a: retry.backoff_base_ms 18446744073709551615 is more than 3600000",
        "task b: retry.backoff_max_ms 3600001 is more than 3600000",
        "task c: retry.jitter_ms 60001 is more than 60000",
        "task d: timeout_ms 3600001 must be 1 to 3600000",
    ] {
        assert!(errs.iter().any(|e| e == want), "missing {want:?} in {errs:?}");
    }
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
}

/// Fails its first attempt (transient), then succeeds.
fn flaky_once() -> Arc<FnHandler> {
    handler(|c| {
        if c.attempt == 1 {
            Err(transient("503"))
        } else {
            Ok(TaskOutput { output: json!({"ok": c.attempt}), usage: Usage::default() })
        }
    })
}

/// [`flaky_once`] that also notes the wall-clock time of each call (attempt, time).
fn flaky_once_timed(calls: Arc<std::sync::Mutex<Vec<(u32, i64)>>>) -> Arc<FnHandler> {
    handler(move |c| {
        calls.lock().unwrap().push((c.attempt, wall_us()));
        if c.attempt == 1 {
            Err(transient("503"))
        } else {
            Ok(TaskOutput { output: json!({"ok": c.attempt}), usage: Usage::default() })
        }
    })
}

fn backoff_plan(backoff_ms: u64) -> Plan {
    let mut t = task("t", TaskKind::Tool, "flaky", &[]);
    t.retry = RetryPolicy { max_attempts: 2, backoff_base_ms: backoff_ms, backoff_max_ms: backoff_ms, jitter_ms: 0 };
    plan(vec![t])
}

/// Wall-clock time in microseconds (the clock leases and recorded times are read on).
fn wall_us() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(since.as_micros()).unwrap()
}

/// Takes `run`'s lease as another owner (polling for up to a second: the driver that
/// recorded the retry releases it when it ends) and gives it back at once. Returns the
/// wall-clock time it was taken, or `None` if it stayed held.
async fn lease_taken_by_another_owner(engine: &Engine, run: RunId) -> Option<i64> {
    let store = engine.store();
    let end = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < end {
        let now = wall_us();
        if let Some(lease) = store.try_lease(run, "another-owner", 60_000, now).unwrap() {
            store.release_lease(&lease).unwrap();
            return Some(now);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_backoff_frees_its_worker_and_a_second_run_completes_first() {
    let dir = tempdir();
    let wf_b = workflow("b", planner(vec![backoff_plan(1_500)]), pass_evaluator());
    let wf_w = workflow("w", planner(vec![one_task("ok")]), pass_evaluator());
    let engine = Engine::builder()
        .path(dir.path())
        .workflow(wf_b)
        .workflow(wf_w)
        .handler("flaky", flaky_once())
        .handler("ok", ok_handler(Usage::default()))
        .workers(1)
        .open()
        .unwrap();
    let workers = engine.start();
    let b = engine.submit(Request::new("b", json!({}))).await.unwrap();
    // Wait until the first run is in its backoff, then submit the second.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while count(&engine.events(b.run).unwrap(), "RetryScheduled") == 0 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While it waits, the run holds no lease: another owner takes it (and gives it back).
    let taken = lease_taken_by_another_owner(&engine, b.run).await.expect("the run's lease is held in its backoff");
    let w = engine.submit(Request::new("w", json!({}))).await.unwrap();
    assert_eq!(wait_status(&engine, w.run, RunStatus::Completed, 30).await, RunStatus::Completed);
    assert_eq!(wait_status(&engine, b.run, RunStatus::Completed, 30).await, RunStatus::Completed);
    workers.shutdown().await;
    let ev_b = engine.events(b.run).unwrap();
    let ev_w = engine.events(w.run).unwrap();
    let redispatch =
        ev_b.iter().find(|e| matches!(&e.event, Event::TaskDispatched { attempt: 2, .. })).expect("re-dispatch").at_us;
    let retry = ev_b.iter().find(|e| e.event.kind_name() == "RetryScheduled").unwrap().at_us;
    let done_w = ev_w.last().unwrap().at_us;
    // With one worker, the second run completed while the first waited out its backoff
    // (before: the waiting run held the only worker until its re-dispatch).
    assert!(done_w < redispatch, "second run done at {done_w}, first re-dispatched at {redispatch}");
    assert!(redispatch >= retry + 1_500_000, "woke no earlier than its backoff");
    assert!(
        retry <= taken && taken < retry + 1_500_000,
        "lease taken at {taken}, retry recorded at {retry}: not during the backoff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_backoff_wakes_and_finishes_after_an_engine_restart() {
    let dir = tempdir();
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let open = |dir: &std::path::Path| {
        Engine::builder()
            .path(dir)
            .workflow(workflow("b", planner(vec![backoff_plan(1_000)]), pass_evaluator()))
            .handler("flaky", flaky_once_timed(calls.clone()))
            .workers(1)
            .open()
            .unwrap()
    };
    let run = {
        let engine = open(dir.path());
        let workers = engine.start();
        let b = engine.submit(Request::new("b", json!({}))).await.unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while count(&engine.events(b.run).unwrap(), "RetryScheduled") == 0 && std::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        workers.shutdown().await;
        let ev = engine.events(b.run).unwrap();
        assert_eq!(count(&ev, "RetryScheduled"), 1);
        assert_eq!(dispatches(&ev), vec![("t".to_owned(), 1)], "still waiting: {:?}", kinds(&ev));
        b.run
    };
    let reopened = wall_us();
    let engine = open(dir.path());
    let workers = engine.start();
    assert_eq!(wait_status(&engine, run, RunStatus::Completed, 30).await, RunStatus::Completed);
    workers.shutdown().await;
    let ev = engine.events(run).unwrap();
    assert_eq!(dispatches(&ev), vec![("t".to_owned(), 1), ("t".to_owned(), 2)]);
    // Re-dispatched on time by the new engine: not before the backoff ends (the restart
    // came before it did), and within 2 s of it; the second call (wall clock, not a
    // recorded time, which is never stamped before its due time) no earlier either.
    let retry = ev.iter().find(|e| e.event.kind_name() == "RetryScheduled").unwrap().at_us;
    let redispatch =
        ev.iter().find(|e| matches!(&e.event, Event::TaskDispatched { attempt: 2, .. })).expect("re-dispatch").at_us;
    assert!(reopened < retry + 1_000_000, "the restart came after the backoff ended: nothing waited");
    assert!(redispatch >= retry + 1_000_000, "re-dispatched {} us after the retry (backoff 1 s)", redispatch - retry);
    assert!(
        redispatch <= retry + 1_000_000 + 2_000_000,
        "re-dispatched {} us after the retry (backoff 1 s): late",
        redispatch - retry
    );
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2], "{calls:?}");
    assert!(calls[1].1 >= retry + 1_000_000, "called again {} us after the retry (backoff 1 s)", calls[1].1 - retry);
}

/// A planner that blocks its thread on the first plan, then answers at once.
struct BlockingFirstPlan {
    plan: Plan,
}
impl Planner for BlockingFirstPlan {
    fn plan(&self, req: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let plan = self.plan.clone();
        Box::pin(async move {
            if req.revision == 0 {
                std::thread::sleep(Duration::from_millis(2_500));
            }
            Ok(plan)
        })
    }
}

#[tokio::test]
async fn a_planner_blocking_its_thread_is_recorded_as_its_timeout() {
    let dir = tempdir();
    let wf = workflow("w", Arc::new(BlockingFirstPlan { plan: one_task("ok") }), pass_evaluator());
    let limits = ShellLimits { planner_timeout_ms: 200, ..ShellLimits::default() };
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b.limits(limits));
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(plan_rejections(&ev), vec![vec!["planner: planner timeout after 200 ms".to_owned()]]);
    // The late answer to revision 0 is discarded; revision 1 (asked at once) is the plan.
    let planned: Vec<u32> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::Planned { revision, .. } | Event::Replanned { revision, .. } => Some(*revision),
            _ => None,
        })
        .collect();
    assert_eq!(planned, vec![1], "{:?}", kinds(&ev));
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
}

#[tokio::test]
async fn an_evaluator_blocking_its_thread_is_recorded_as_its_timeout() {
    let dir = tempdir();
    let mut t = task("t", TaskKind::Tool, "ok", &[]);
    t.timeout_ms = 200;
    t.retry.max_attempts = 1;
    t.success_criteria = Some("anything".into());
    let blocking = evaluator(|_| {
        std::thread::sleep(Duration::from_millis(2_500));
        Ok(Evaluation { verdict: Verdict::Pass, notes: "late".into(), usage: Usage::default() })
    });
    let wf = workflow("w", planner(vec![plan(vec![t])]), blocking);
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b);
    let s = engine.submit(Request::new("w", json!({}))).await.unwrap();
    // The evaluator blocks inside `evaluate` (before its future exists): the driver's
    // timer still ends the call.
    let _ = tokio::time::timeout(Duration::from_secs(20), engine.run_until_idle()).await.expect("not held");
    let ev = engine.events(s.run).unwrap();
    let failures = task_failures(&ev);
    assert!(!failures.is_empty(), "{:?}", kinds(&ev));
    assert_eq!(failures[0], ("timeout after 200 ms".to_owned(), ErrorClass::Transient, FailureSource::Evaluator));
    assert_eq!(count(&ev, "TaskEvaluated"), 0, "{:?}", kinds(&ev));
}
