//! The executor's recovery paths, end to end on a real sled db: what gets recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use serde_json::json;
use std::sync::Arc;

fn tool(id: &str, deps: &[&str]) -> TaskSpec {
    task(id, TaskKind::Tool, id, deps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_with_growing_jittered_backoff_then_succeed() {
    trace();
    let dir = tempdir();
    // Five independent tasks, each failing twice before it succeeds.
    let ids = ["a", "b", "c", "d", "e"];
    let specs: Vec<TaskSpec> = ids.iter().map(|id| task(id, TaskKind::Tool, "flaky", &[])).collect();
    let flaky = handler(|c| {
        if c.attempt < 3 {
            Err(transient("503"))
        } else {
            Ok(TaskOutput { output: json!({"ok": c.attempt}), usage: Usage::default() })
        }
    });
    let wf = workflow("w", planner(vec![plan(specs)]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("flaky", flaky.clone())], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed, "{:?}", kinds(&ev));
    assert_eq!(flaky.calls(), 15);
    let retry = RetryPolicy { max_attempts: 3, backoff_base_ms: 10, backoff_max_ms: 80, jitter_ms: 7 };
    let mut jitters = Vec::new();
    for id in ids {
        let delays: Vec<(u32, u64, i64)> = ev
            .iter()
            .filter_map(|e| match &e.event {
                Event::RetryScheduled { task, next_attempt, delay_ms } if task.0 == id => {
                    Some((*next_attempt, *delay_ms, e.at_us))
                }
                _ => None,
            })
            .collect();
        assert_eq!(delays.len(), 2, "task {id}: two retries");
        for (next_attempt, delay, at) in &delays {
            let base = (retry.backoff_base_ms << (next_attempt - 2)).min(retry.backoff_max_ms);
            assert!(
                *delay >= base && *delay <= base + retry.jitter_ms,
                "task {id}: delay {delay} not in [{base}, {base}+jitter]"
            );
            jitters.push(delay - base);
            // The re-dispatch happens no earlier than the recorded delay.
            let redispatch = ev
                .iter()
                .find(|e| matches!(&e.event, Event::TaskDispatched { task, attempt, .. } if task.0 == id && attempt == next_attempt))
                .expect("re-dispatch");
            assert!(redispatch.at_us >= at + (*delay as i64) * 1000, "task {id}: dispatched before its backoff");
        }
        assert!(
            delays[1].1 - jitters[jitters.len() - 1] > delays[0].1 - jitters[jitters.len() - 2],
            "task {id}: backoff grows"
        );
    }
    assert!(jitters.iter().any(|j| *j > 0), "jitter is drawn from the seed: {jitters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_leads_to_a_replan_that_succeeds() {
    let dir = tempdir();
    let down = handler(|_| Err(transient("connection refused")));
    let up = ok_handler(Usage::default());
    let p0 = plan(vec![task("fetch", TaskKind::DataFetch, "primary", &[]), tool("use", &["fetch"])]);
    let p1 = plan(vec![task("fetch", TaskKind::DataFetch, "replica", &[]), tool("use", &["fetch"])]);
    let wf = workflow("w", planner(vec![p0, p1]), pass_evaluator());
    let engine = open_engine(
        dir.path(),
        wf,
        &[("primary", down.clone()), ("replica", up.clone()), ("use", ok_handler(Usage::default()))],
        |b| b,
    );
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(down.calls(), 3, "max_attempts calls to the failing handler");
    assert_eq!(count(&ev, "ReplanRequested"), 1);
    assert_eq!(count(&ev, "Replanned"), 1);
    let replanned = ev.iter().find_map(|e| match &e.event {
        Event::Replanned { superseded, .. } => Some(superseded.clone()),
        _ => None,
    });
    assert_eq!(replanned.unwrap(), vec![TaskId::from("fetch"), TaskId::from("use")]);
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::Completed);
    assert!(!st.partial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replans_exhausted_escalates_then_a_resolution_completes_the_run() {
    let dir = tempdir();
    let wrong = handler(|_| Err(HandlerError::semantic("the answer contradicts the account data")));
    let wf = workflow("w", planner(vec![plan(vec![tool("answer", &[])])]), pass_evaluator());
    let sink = Arc::new(CountingSink::default());
    let engine = open_engine(dir.path(), wf, &[("answer", wrong.clone())], |b| {
        b.policy(Policy { max_replans: 1, ..Policy::default() }).escalation_sink(sink.clone())
    });
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(wrong.calls(), 2, "one call per plan revision");
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::AwaitingHuman, "{:?}", kinds(&ev));
    let esc = &st.escalations[0];
    assert_eq!(esc.escalation.cause, EscalationCause::ReplansExhausted);
    assert!(esc.notified);
    assert_eq!(sink.notified.lock().unwrap().as_slice(), &[(run, 1)]);
    assert!(!esc.escalation.alternatives_tried.is_empty(), "the escalation says what was tried");
    let pending = engine.escalations().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].run, run);

    let supplied = Json::new(&json!({"answer": "42"}));
    engine
        .resolve(
            run,
            Resolution {
                decision: Decision::SupplyOutput(supplied.clone()),
                by: "alice".into(),
                reason: "checked".into(),
            },
        )
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::Completed);
    assert_eq!(st.tasks[0].output.as_ref(), Some(&supplied));
    let ev = engine.events(run).unwrap();
    assert!(ev.iter().any(|e| matches!(&e.event, Event::HumanResolved { by, defaulted: false, .. } if by == "alice")));
    assert_eq!(ev.last().unwrap().event.kind_name(), "RunCompleted");

    // Resolving it again: it is not waiting any more.
    let err = engine
        .resolve(run, Resolution { decision: Decision::Approve, by: "bob".into(), reason: "checked".into() })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotAwaitingHuman { status: RunStatus::Completed, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_for_a_run_that_is_not_waiting_is_a_typed_error_and_writes_nothing() {
    let dir = tempdir();
    let wf = workflow("w", planner(vec![plan(vec![tool("t", &[])])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("t", ok_handler(Usage::default()))], |b| b);
    let s = engine.submit(Request::new("w", json!({}))).await.unwrap();
    let before = engine.events(s.run).unwrap().len();
    let err = engine
        .resolve(s.run, Resolution { decision: Decision::Approve, by: "x".into(), reason: "checked".into() })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotAwaitingHuman { status: RunStatus::Accepted, .. }), "{err}");
    assert_eq!(engine.events(s.run).unwrap().len(), before);
    let unknown = RunId(uuid::Uuid::from_u128(7));
    assert!(matches!(
        engine
            .resolve(unknown, Resolution { decision: Decision::Approve, by: "x".into(), reason: "checked".into() })
            .await,
        Err(EngineError::UnknownRun { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_noncritical_task_is_skipped_and_the_result_is_partial() {
    let dir = tempdir();
    let mut extra = tool("enrich", &[]);
    extra.critical = false;
    let mut after = tool("after_enrich", &["enrich"]);
    after.critical = false;
    let wf = workflow("w", planner(vec![plan(vec![tool("main", &[]), extra, after])]), pass_evaluator());
    let engine = open_engine(
        dir.path(),
        wf,
        &[
            ("main", ok_handler(Usage::default())),
            ("enrich", handler(|_| Err(HandlerError::fatal("unsupported")))),
            ("after_enrich", ok_handler(Usage::default())),
        ],
        |b| b,
    );
    let (run, ev) = run_one(&engine, "w").await;
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::Completed);
    assert!(st.partial);
    let skipped: Vec<String> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskSkipped { task, .. } => Some(task.0.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(skipped, vec!["enrich", "after_enrich"], "the failed task and its dependent");
    assert!(matches!(&ev.last().unwrap().event, Event::RunCompleted { partial: true, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_gate_keeps_a_bad_output_from_every_downstream_task() {
    let dir = tempdir();
    let mut produce = tool("produce", &[]);
    produce.output_schema = Some(Json::new(
        &json!({"type": "object", "required": ["amount"], "properties": {"amount": {"type": "integer"}}}),
    ));
    let p0 = plan(vec![produce.clone(), tool("consume", &["produce"])]);
    let mut produce1 = produce.clone();
    produce1.input = Json::new(&json!({"format": "strict"}));
    let p1 = plan(vec![produce1, tool("consume", &["produce"])]);
    let producer = handler(|c| {
        let strict = c.input.input.as_str().contains("strict");
        let out = if strict { json!({"amount": 12}) } else { json!({"amount": "POISON-twelve"}) };
        Ok(TaskOutput { output: out, usage: Usage::default() })
    });
    let consumer = ok_handler(Usage::default());
    let wf = workflow("w", planner(vec![p0, p1]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("produce", producer), ("consume", consumer.clone())], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
    let gate = ev.iter().find(|e| matches!(&e.event, Event::TaskFailed { class: ErrorClass::Semantic, error, .. } if error.contains("schema")));
    assert!(gate.is_some(), "the gate records a semantic failure: {:?}", kinds(&ev));
    assert_eq!(consumer.calls(), 1, "the consumer ran once, after the replan");
    for e in &ev {
        if let Event::TaskDispatched { task, input, .. } = &e.event {
            if task.0 == "consume" {
                let seen = serde_json::to_string(input).unwrap();
                assert!(!seen.contains("POISON"), "downstream input contains the bad output: {seen}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cyclic_and_over_budget_plans_are_rejected_and_never_dispatched() {
    let dir = tempdir();
    let cyclic = plan(vec![tool("a", &["b"]), tool("b", &["a"])]);
    let mut pricey = tool("pricey", &[]);
    pricey.cost_estimate_micros = 1_000_000;
    let over = plan(vec![pricey]);
    let wf = {
        let mut w = workflow("w", planner(vec![cyclic, over]), pass_evaluator());
        w.budget = Budget { cost_micros: Some(1_000), ..Budget::default() };
        w
    };
    let engine = open_engine(
        dir.path(),
        wf,
        &[
            ("a", ok_handler(Usage::default())),
            ("b", ok_handler(Usage::default())),
            ("pricey", ok_handler(Usage::default())),
        ],
        |b| b.policy(Policy { max_replans: 1, ..Policy::default() }),
    );
    let (run, ev) = run_one(&engine, "w").await;
    let rejected = plan_rejections(&ev);
    assert_eq!(rejected.len(), 2, "{:?}", kinds(&ev));
    assert!(rejected[0].iter().any(|e| e.contains("cycle")), "{:?}", rejected[0]);
    assert!(rejected[1].iter().any(|e| e.contains("budget")), "{:?}", rejected[1]);
    assert_eq!(count(&ev, "TaskDispatched"), 0);
    assert_eq!(count(&ev, "Planned"), 0);
    assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_timeout_is_a_transient_failure() {
    let dir = tempdir();
    let mut t = tool("slow", &[]);
    t.timeout_ms = 50;
    t.retry.max_attempts = 2;
    let slow = slow_handler(2_000, |_| Ok(TaskOutput { output: json!(1), usage: Usage::default() }));
    let wf = workflow("w", planner(vec![plan(vec![t])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("slow", slow.clone())], |b| {
        b.policy(Policy { max_replans: 0, ..Policy::default() })
    });
    let started = std::time::Instant::now();
    let (_run, ev) = run_one(&engine, "w").await;
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1_500),
        "the engine did not wait for the slow handler"
    );
    let failures: Vec<String> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskFailed { class: ErrorClass::Transient, error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(failures, vec!["timeout after 50 ms", "timeout after 50 ms"]);
    assert_eq!(slow.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_drops_its_in_flight_result_and_ends_with_run_cancelled() {
    let dir = tempdir();
    let slow = slow_handler(400, |_| Ok(TaskOutput { output: json!("late"), usage: Usage::default() }));
    let wf = workflow("w", planner(vec![plan(vec![tool("slow", &[]), tool("next", &["slow"])])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("slow", slow.clone()), ("next", ok_handler(Usage::default()))], |b| b);
    let s = engine.submit(Request::new("w", json!({}))).await.unwrap();
    let e2 = engine.clone();
    let driving = tokio::spawn(async move { e2.run_until_idle().await });
    // Wait until the slow task is in flight.
    for _ in 0..200 {
        if slow.calls() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(slow.calls(), 1);
    engine.cancel(s.run, "ops", "customer withdrew").await.unwrap();
    let report = driving.await.unwrap().unwrap();
    assert_eq!(report.cancelled, 1, "{report:?}");
    // Give a late result every chance to (wrongly) land.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let ev = engine.events(s.run).unwrap();
    assert!(matches!(&ev.last().unwrap().event, Event::RunCancelled { by, .. } if by == "ops"), "{:?}", kinds(&ev));
    assert_eq!(count(&ev, "TaskExecuted"), 0);
    assert_eq!(engine.state(s.run).unwrap().status, RunStatus::Cancelled);
    let err = engine.cancel(s.run, "ops", "again").await.unwrap_err();
    assert!(matches!(err, EngineError::AlreadyTerminal { .. }));
}

fn critical_refund_workflow() -> WorkflowType {
    let mut t = tool("refund", &[]);
    t.success_criteria = Some("within limit".into());
    let eval = evaluator(|_| {
        Ok(Evaluation { verdict: Verdict::Critical, notes: "too large".into(), usage: Usage::default() })
    });
    workflow("w", planner(vec![plan(vec![t, tool("notify", &["refund"])])]), eval)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_deadline_default_applies_even_when_the_process_was_down() {
    let dir = tempdir();
    let clock = FakeClock::at(1_700_000_000_000_000);
    let policy = Policy {
        escalation_deadline_ms: Some(60_000),
        escalation_default: Some(Decision::Reject),
        ..Policy::default()
    };
    let handlers: Vec<(&str, Arc<dyn TaskHandler>)> =
        vec![("refund", ok_handler(Usage::default())), ("notify", ok_handler(Usage::default()))];
    let run = {
        let engine = open_engine(dir.path(), critical_refund_workflow(), &handlers, |b| {
            b.clock(clock.clone()).policy(policy.clone())
        });
        let (run, _) = run_one(&engine, "w").await;
        assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
        // Not due yet: run_until_idle does not wait for it.
        clock.advance_ms(30_000);
        engine.run_until_idle().await.unwrap();
        assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
        run
    }; // the process goes away
    clock.advance_ms(31_000);
    let engine = open_engine(dir.path(), critical_refund_workflow(), &handlers, |b| {
        b.clock(clock.clone()).policy(policy.clone())
    });
    engine.run_until_idle().await.unwrap();
    let ev = engine.events(run).unwrap();
    let resolved = ev.iter().find(|e| matches!(e.event, Event::HumanResolved { .. })).expect("default applied");
    match &resolved.event {
        Event::HumanResolved { decision, by, defaulted, .. } => {
            assert_eq!(decision, &Decision::Reject);
            assert_eq!(by, "deadline");
            assert!(*defaulted);
        }
        _ => unreachable!(),
    }
    let escalated_at = ev.iter().find(|e| matches!(e.event, Event::Escalated(_))).unwrap().at_us;
    assert!(resolved.at_us >= escalated_at + 60_000_000, "applied no earlier than the deadline");
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::Completed);
    assert!(st.partial, "the rejected task was skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_is_told_again_after_a_restart_when_the_notification_was_not_recorded() {
    let dir = tempdir();
    let handlers: Vec<(&str, Arc<dyn TaskHandler>)> =
        vec![("refund", ok_handler(Usage::default())), ("notify", ok_handler(Usage::default()))];
    let down = Arc::new(CountingSink::default());
    down.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let run = {
        let engine =
            open_engine(dir.path(), critical_refund_workflow(), &handlers, |b| b.escalation_sink(down.clone()));
        let (run, ev) = run_one(&engine, "w").await;
        assert_eq!(count(&ev, "Escalated"), 1);
        assert_eq!(count(&ev, "EscalationNotified"), 0);
        assert!(!engine.escalations().unwrap()[0].notified);
        run
    };
    let up = Arc::new(CountingSink::default());
    let engine = open_engine(dir.path(), critical_refund_workflow(), &handlers, |b| b.escalation_sink(up.clone()));
    engine.run_until_idle().await.unwrap();
    assert_eq!(up.notified.lock().unwrap().as_slice(), &[(run, 1)]);
    let ev = engine.events(run).unwrap();
    assert_eq!(count(&ev, "EscalationNotified"), 1);
    assert!(engine.escalations().unwrap()[0].notified);
    // Once recorded, never again.
    engine.run_until_idle().await.unwrap();
    assert_eq!(up.notified.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_recorded_as_a_fatal_failure_instead_of_leaving_the_run_waiting() {
    let dir = tempdir();
    let boom = handler(|_: &TaskCall| -> Result<TaskOutput, HandlerError> { panic!("boom") });
    let wf = workflow("w", planner(vec![plan(vec![tool("boom", &[])])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("boom", boom.clone())], |b| {
        b.policy(Policy { max_replans: 0, ..Policy::default() })
    });
    let (_run, ev) = tokio::time::timeout(std::time::Duration::from_secs(30), run_one(&engine, "w"))
        .await
        .expect("the run must not wait forever for a handler that panicked");
    let failures: Vec<(ErrorClass, String)> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskFailed { class, error, .. } => Some((*class, error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(failures, vec![(ErrorClass::Fatal, "handler panicked: boom".to_owned())], "{:?}", kinds(&ev));
    assert_eq!(boom.calls(), 1, "a fatal failure is not retried");
    assert_eq!(count(&ev, "Escalated"), 1, "{:?}", kinds(&ev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_planner_is_recorded_as_a_rejected_plan() {
    let dir = tempdir();
    let p = Arc::new(FnPlanner(Box::new(|_: &PlanRequest| -> Result<Plan, HandlerError> { panic!("no plan today") })));
    let wf = workflow("w", p, pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[], |b| b.policy(Policy { max_replans: 0, ..Policy::default() }));
    let (_run, ev) = tokio::time::timeout(std::time::Duration::from_secs(30), run_one(&engine, "w"))
        .await
        .expect("the run must not wait forever for a planner that panicked");
    let rejected = plan_rejections(&ev);
    assert!(!rejected.is_empty(), "{:?}", kinds(&ev));
    assert!(rejected.iter().all(|e| e == &vec!["planner: planner panicked: no plan today".to_owned()]), "{rejected:?}");
}
