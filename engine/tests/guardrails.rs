//! Guardrails (issue 4): budgets, retry bounds, ingestion, dedup, priority, concurrency
//! limits, response cache, routing. Asserts on recorded events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn llm(id: &str, cost: u64) -> TaskSpec {
    let mut t = task(id, TaskKind::Llm, "llm", &[]);
    t.cost_estimate_micros = cost;
    t.complexity = Some(Complexity::Extraction);
    t
}

/// splitmix64: a seeded generator for randomized tests (the seed is printed).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn test_seed() -> u64 {
    std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_always_fails_transiently_is_called_at_most_the_retry_budget() {
    let dir = tempdir();
    let mut a = task("a", TaskKind::Tool, "down", &[]);
    a.retry.max_attempts = 5;
    let mut b = task("b", TaskKind::Tool, "down", &[]);
    b.retry.max_attempts = 5;
    let down = handler(|_| Err(transient("429")));
    let mut wf = workflow("w", planner(vec![plan(vec![a, b])]), pass_evaluator());
    wf.budget = Budget { retries: Some(3), ..Budget::default() };
    let engine = open_engine(dir.path(), wf, &[("down", down.clone())], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    // Two first attempts plus the run's global retry budget of 3, at most (a retry that is
    // scheduled when the budget runs out on the other task is never dispatched).
    assert!(down.calls() <= 5, "{:?}", kinds(&ev));
    assert_eq!(down.calls() as usize, count(&ev, "TaskDispatched"));
    assert_eq!(count(&ev, "RetryScheduled"), 3);
    let exhausted = ev.iter().find_map(|e| match &e.event {
        Event::BudgetExhausted { budget, limit, used, needed } => Some((*budget, *limit, *used, *needed)),
        _ => None,
    });
    assert_eq!(exhausted, Some((BudgetKind::Retries, 3, 3, 1)));
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::Completed);
    assert!(st.partial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_cost_never_exceeds_the_budget_and_exhaustion_says_by_how_much() {
    let seed = test_seed();
    println!("KEEL_TEST_SEED={seed}");
    for round in 0..4u64 {
        let dir = tempdir();
        let mut rng = seed ^ round.wrapping_mul(0x1234_5678);
        let n = 3 + (splitmix(&mut rng) % 5) as usize;
        let tasks: Vec<TaskSpec> = (0..n).map(|i| llm(&format!("t{i}"), 500 + splitmix(&mut rng) % 1_000)).collect();
        let estimate: u64 = tasks.iter().map(|t| t.cost_estimate_micros).sum();
        let fail_first = splitmix(&mut rng);
        let estimates: std::collections::BTreeMap<String, u64> =
            tasks.iter().map(|t| (t.id.0.clone(), t.cost_estimate_micros)).collect();
        let h = handler(move |c| {
            let est = estimates[&c.task.0];
            // Usage never above the task's estimate; some first attempts fail after spending.
            let bit = (fail_first >> (c.task.0[1..].parse::<u32>().unwrap_or(0) % 64)) & 1 == 1;
            let spent = Usage { cost_micros: est * 3 / 4, tokens: 10 };
            if c.attempt == 1 && bit {
                Err(transient("timeout mid-generation").with_usage(spent))
            } else {
                Ok(TaskOutput { output: json!({"n": c.attempt}), usage: spent })
            }
        });
        let mut wf = workflow("w", planner(vec![plan(tasks)]), pass_evaluator());
        wf.budget = Budget { cost_micros: Some(estimate), ..Budget::default() };
        let engine = open_engine(dir.path(), wf, &[("llm", h)], |b| b);
        let (run, ev) = run_one(&engine, "w").await;
        let st = engine.state(run).unwrap();
        assert!(
            st.totals.cost_micros <= estimate,
            "seed {seed} round {round}: cost {} > budget {estimate}",
            st.totals.cost_micros
        );
        let recorded: u64 = ev
            .iter()
            .map(|e| match &e.event {
                Event::TaskExecuted { usage, .. }
                | Event::TaskFailed { usage, .. }
                | Event::TaskEvaluated { usage, .. } => usage.cost_micros,
                _ => 0,
            })
            .sum();
        assert_eq!(recorded, st.totals.cost_micros);
        for e in &ev {
            if let Event::BudgetExhausted { budget, limit, used, needed } = &e.event {
                assert_eq!(*budget, BudgetKind::Cost);
                assert_eq!(*limit, estimate);
                assert!(used + needed > *limit, "seed {seed}: exhaustion without a shortfall");
                assert!(st.partial);
                // Nothing is dispatched after the budget ran out.
                let after = ev
                    .iter()
                    .skip_while(|x| x.seq != e.seq)
                    .filter(|x| x.event.kind_name() == "TaskDispatched")
                    .count();
                assert_eq!(after, 0);
            }
        }
        assert_eq!(st.status, RunStatus::Completed, "seed {seed} round {round}: {:?}", kinds(&ev));
        let stats = engine.stats().unwrap();
        assert_eq!(stats[0].totals.cost_micros, st.totals.cost_micros);
        assert_eq!(stats[0].cost_per_run_micros, st.totals.cost_micros);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_call_budget_stops_dispatching_and_the_handler_is_never_called_past_it() {
    let dir = tempdir();
    let calls = ok_handler(Usage { cost_micros: 1, tokens: 1 });
    let mut wf = workflow("w", planner(vec![plan(vec![llm("a", 10), llm("b", 10), llm("c", 10)])]), pass_evaluator());
    wf.max_parallel_tasks = 1;
    wf.budget = Budget { llm_calls: Some(2), ..Budget::default() };
    let engine = open_engine(dir.path(), wf, &[("llm", calls.clone())], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(calls.calls(), 2);
    assert!(ev.iter().any(|e| matches!(
        e.event,
        Event::BudgetExhausted { budget: BudgetKind::LlmCalls, limit: 2, used: 2, needed: 1 }
    )));
    let st = engine.state(run).unwrap();
    assert_eq!((st.status, st.partial), (RunStatus::Completed, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_escalates_when_the_workflow_says_so() {
    let dir = tempdir();
    let mut wf = workflow("w", planner(vec![plan(vec![llm("a", 10), llm("b", 10)])]), pass_evaluator());
    wf.max_parallel_tasks = 1;
    wf.budget = Budget { llm_calls: Some(1), ..Budget::default() };
    wf.on_exhausted = ExhaustionPolicy::Escalate;
    let engine = open_engine(dir.path(), wf, &[("llm", ok_handler(Usage::default()))], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    let st = engine.state(run).unwrap();
    assert_eq!(st.status, RunStatus::AwaitingHuman, "{:?}", kinds(&ev));
    assert_eq!(st.escalations[0].escalation.cause, EscalationCause::BudgetExhausted);
    engine
        .resolve(run, Resolution { decision: Decision::Approve, by: "lead".into(), reason: "checked".into() })
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let st = engine.state(run).unwrap();
    assert_eq!((st.status, st.partial), (RunStatus::Completed, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_submissions_with_one_key_create_exactly_one_run() {
    let dir = tempdir();
    let wf = workflow("w", planner(vec![plan(vec![task("t", TaskKind::Tool, "t", &[])])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("t", ok_handler(Usage::default()))], |b| b);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let e = engine.clone();
        set.spawn(async move {
            let mut r = Request::new("w", json!({"same": "webhook"}));
            r.idempotency_key = Some("evt_123".into());
            e.submit(r).await
        });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.push(r.unwrap().unwrap());
    }
    let fresh: Vec<&Submitted> = results.iter().filter(|s| !s.duplicate).collect();
    assert_eq!(fresh.len(), 1);
    assert!(results.iter().all(|s| s.run == fresh[0].run));
    assert_eq!(engine.store().runs().unwrap(), vec![fresh[0].run]);
    // The same key with another input is another request: refused (issue 13, item 6; it
    // used to return the run as a duplicate).
    let other =
        engine.submit(Request { idempotency_key: Some("evt_123".into()), ..Request::new("w", json!({})) }).await;
    assert!(matches!(other, Err(EngineError::IdempotencyConflict { run, .. }) if run == fresh[0].run), "{other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_claimed_highest_priority_first_then_oldest() {
    let dir = tempdir();
    let order: Arc<Mutex<Vec<i64>>> = Arc::new(Mutex::new(Vec::new()));
    let o2 = order.clone();
    let h = handler(move |c| {
        let p = c.run_input.value().unwrap()["p"].as_i64().unwrap();
        o2.lock().unwrap().push(p);
        Ok(TaskOutput { output: json!(p), usage: Usage::default() })
    });
    let wf = workflow("w", planner(vec![plan(vec![task("t", TaskKind::Tool, "t", &[])])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("t", h)], |b| b.workers(1));
    for (p, i) in [(0, 1), (5, 2), (0, 3), (9, 4), (5, 5)] {
        let mut r = Request::new("w", json!({"p": p * 10 + i}));
        r.priority = p;
        engine.submit(r).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    engine.run_until_idle().await.unwrap();
    assert_eq!(*order.lock().unwrap(), vec![94, 52, 55, 1, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_workflow_concurrency_limit_holds() {
    let dir = tempdir();
    let active = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    struct Gauge {
        active: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }
    impl TaskHandler for Gauge {
        fn call(&self, _c: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
            let (active, peak) = (self.active.clone(), self.peak.clone());
            Box::pin(async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                active.fetch_sub(1, Ordering::SeqCst);
                Ok(TaskOutput { output: json!(1), usage: Usage::default() })
            })
        }
    }
    let mut wf = workflow("w", planner(vec![plan(vec![task("t", TaskKind::Tool, "g", &[])])]), pass_evaluator());
    wf.max_concurrent_runs = 2;
    let g: Arc<dyn TaskHandler> = Arc::new(Gauge { active: active.clone(), peak: peak.clone() });
    let engine = open_engine(dir.path(), wf, &[("g", g)], |b| b.workers(8));
    for i in 0..6 {
        engine.submit(Request::new("w", json!({ "i": i }))).await.unwrap();
    }
    let report = engine.run_until_idle().await.unwrap();
    assert_eq!(report.completed, 6);
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_skips_the_handler_and_costs_nothing() {
    let dir = tempdir();
    let mut t = llm("summarise", 1_000);
    t.cacheable = true;
    let h = ok_handler(Usage { cost_micros: 700, tokens: 90 });
    let wf = workflow("w", planner(vec![plan(vec![t])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("llm", h.clone())], |b| b.workers(1));
    let first = engine.submit(Request::new("w", json!({"doc": 1}))).await.unwrap();
    let second = engine.submit(Request::new("w", json!({"doc": 2}))).await.unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(h.calls(), 1, "the second run was served from the cache");
    let executed = |run| {
        engine.events(run).unwrap().into_iter().find_map(|e| match e.event {
            Event::TaskExecuted { cached, usage, output, .. } => Some((cached, usage, output)),
            _ => None,
        })
    };
    let (c1, u1, o1) = executed(first.run).unwrap();
    let (c2, u2, o2) = executed(second.run).unwrap();
    assert!(!c1 && c2);
    assert_eq!(u1.cost_micros, 700);
    assert_eq!(u2, Usage::default());
    assert_eq!(o1, o2);
    let st = engine.state(second.run).unwrap();
    assert_eq!((st.totals.cost_micros, st.totals.cache_hits, st.totals.llm_calls), (0, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_routed_by_complexity_and_the_evaluator_gets_its_own() {
    let dir = tempdir();
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let h = handler(move |c| {
        s2.lock().unwrap().push((c.task.0.clone(), c.model.clone()));
        Ok(TaskOutput { output: json!(1), usage: Usage::default() })
    });
    let eval_seen: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(Vec::new()));
    let e2 = eval_seen.clone();
    let ev = evaluator(move |r| {
        e2.lock().unwrap().push(r.model.clone());
        Ok(Evaluation { verdict: Verdict::Pass, notes: String::new(), usage: Usage::default() })
    });
    let mut hard = llm("hard", 0);
    hard.complexity = Some(Complexity::Reasoning);
    hard.success_criteria = Some("correct".into());
    let easy = llm("easy", 0);
    let wf = workflow("w", planner(vec![plan(vec![hard, easy])]), ev);
    let engine = open_engine(dir.path(), wf, &[("llm", h)], |b| b);
    let (_run, events) = run_one(&engine, "w").await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![("easy".to_owned(), Some("small".to_owned())), ("hard".to_owned(), Some("large".to_owned()))]
    );
    assert_eq!(*eval_seen.lock().unwrap(), vec![Some("eval-small".to_owned())]);
    assert!(events.iter().any(|e| matches!(&e.event, Event::TaskEvaluated { task, model: Some(m), .. } if task.0 == "hard" && m == "eval-small")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_and_unknown_workflows_are_rejected_with_nothing_written() {
    let dir = tempdir();
    let mut wf = workflow("w", planner(vec![plan(vec![task("t", TaskKind::Tool, "t", &[])])]), pass_evaluator());
    wf.input_schema = Some(json!({
        "type": "object",
        "required": ["ticket"],
        "properties": { "ticket": { "type": "string" }, "n": { "type": "integer", "maximum": 3 } }
    }));
    let engine = open_engine(dir.path(), wf, &[("t", ok_handler(Usage::default()))], |b| b);

    let err = engine.submit(Request::new("nope", json!({"ticket": "x"}))).await.unwrap_err();
    assert!(matches!(&err, EngineError::UnknownWorkflow { name } if name == "nope"), "{err}");

    let err = engine.submit(Request::new("w", json!({"ticket": 5, "n": 9}))).await.unwrap_err();
    match &err {
        EngineError::InvalidInput { workflow, errors } => {
            assert_eq!(workflow, "w");
            assert_eq!(errors.len(), 2, "{errors:?}");
            assert!(errors.iter().any(|e| e.contains("/ticket")), "{errors:?}");
            assert!(errors.iter().any(|e| e.contains("/n")), "{errors:?}");
        }
        other => panic!("expected InvalidInput, got {other}"),
    }
    let err = engine.submit(Request::new("w", json!({}))).await.unwrap_err();
    assert!(matches!(&err, EngineError::InvalidInput { errors, .. } if errors[0].contains("ticket")), "{err}");

    let huge = "x".repeat(ShellLimits::default().input_bytes_max);
    let err = engine.submit(Request::new("w", json!({ "ticket": huge }))).await.unwrap_err();
    assert!(matches!(&err, EngineError::InvalidInput { errors, .. } if errors[0].contains("limit")), "{err}");

    assert!(engine.store().runs().unwrap().is_empty(), "nothing was written");
    assert!(engine.runs().unwrap().is_empty());
    let ok = engine.submit(Request::new("w", json!({"ticket": "fine"}))).await.unwrap();
    assert_eq!(engine.store().runs().unwrap(), vec![ok.run]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_survives_a_restart() {
    let dir = tempdir();
    let mut t = llm("summarise", 1_000);
    t.cacheable = true;
    let h = ok_handler(Usage { cost_micros: 700, tokens: 90 });
    let wf = || workflow("w", planner(vec![plan(vec![t.clone()])]), pass_evaluator());
    {
        let engine = open_engine(dir.path(), wf(), &[("llm", h.clone())], |b| b.workers(1));
        engine.submit(Request::new("w", json!({"doc": 1}))).await.unwrap();
        engine.run_until_idle().await.unwrap();
    }
    assert_eq!(h.calls(), 1);
    // A new process (a new engine on the same db) still hits: the entry is in the store.
    let engine = open_engine(dir.path(), wf(), &[("llm", h.clone())], |b| b.workers(1));
    let second = engine.submit(Request::new("w", json!({"doc": 2}))).await.unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(h.calls(), 1, "the run after the restart was served from the persisted cache");
    let st = engine.state(second.run).unwrap();
    assert_eq!((st.totals.cache_hits, st.totals.cost_micros), (1, 0));
}
