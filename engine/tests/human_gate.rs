//! Human decisions through the same gates (issue 13, item 7): an output a human supplies
//! passes the escalated task's output schema before anything is recorded, and the
//! escalation sink gets the run's context and a handle that resolves the escalation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use serde_json::json;
use std::sync::Arc;

/// A critical task with an output schema whose handler fails fatally: the run escalates
/// and offers `supply_output`.
fn escalating(dir: &std::path::Path, sink: Arc<CountingSink>) -> Engine {
    let mut pay = task("pay", TaskKind::Tool, "pay", &[]);
    pay.output_schema = Some(Json::new(&json!({
        "type": "object", "required": ["amount"], "properties": {"amount": {"type": "integer"}}
    })));
    let wf = workflow("w", planner(vec![plan(vec![pay])]), pass_evaluator());
    let fatal = handler(|_| Err(HandlerError::fatal("card declined")));
    open_engine(dir, wf, &[("pay", fatal)], |b| b.escalation_sink(sink))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplied_output_that_fails_the_tasks_schema_is_refused_and_nothing_is_recorded() {
    let dir = tempdir();
    let engine = escalating(dir.path(), Arc::new(CountingSink::default()));
    let (run, before) = run_one(&engine, "w").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
    let supply = |v: serde_json::Value| Resolution {
        decision: Decision::SupplyOutput(Json::new(&v)),
        by: "ann".into(),
        reason: "checked".into(),
    };

    for bad in [json!({"amount": "ten"}), json!({"note": "paid by hand"})] {
        match engine.resolve(run, supply(bad)).await {
            Err(EngineError::SuppliedOutputRejected { run: r, task, code, detail }) => {
                assert_eq!((r, task.0.as_str(), code.as_str()), (run, "pay", "schema_mismatch"));
                assert!(!detail.is_empty());
            }
            other => panic!("expected SuppliedOutputRejected, got {other:?}"),
        }
    }
    assert_eq!(engine.events(run).unwrap(), before, "nothing recorded for a refused output");

    engine.resolve(run, supply(json!({"amount": 10}))).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let state = engine.state(run).unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(state.result.unwrap().value().unwrap(), json!({"pay": {"amount": 10}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_gets_the_runs_context_and_a_resolver_that_resolves_only_its_escalation() {
    let dir = tempdir();
    let sink = Arc::new(CountingSink::default());
    let engine = escalating(dir.path(), sink.clone());
    let input = json!({"invoice": "inv-7", "amount": 10});
    let run = engine.submit(req("w", input.clone())).await.unwrap().run;
    engine.run_until_idle().await.unwrap();
    let ctx = sink.contexts.lock().unwrap().last().cloned().expect("the sink was told");
    assert_eq!((ctx.run, ctx.workflow.as_str()), (run, "w"));
    assert_eq!(ctx.input, Json::new(&input));
    use sha2::Digest;
    assert_eq!(ctx.input_digest, hex::encode(sha2::Sha256::digest(Json::new(&input).0.as_bytes())));
    assert_eq!(ctx.escalation.cause, EscalationCause::FatalError);
    assert_eq!(ctx.escalation, engine.state(run).unwrap().escalations[0].escalation);
    assert_eq!((ctx.resolver.run(), ctx.resolver.number()), (run, 1));

    // The resolver goes through the same gates as Engine::resolve.
    let bad = Resolution {
        decision: Decision::SupplyOutput(Json::new(&json!({}))),
        by: "bot".into(),
        reason: "checked".into(),
    };
    assert!(matches!(ctx.resolver.resolve(bad).await, Err(EngineError::SuppliedOutputRejected { .. })));
    let good = Resolution {
        decision: Decision::SupplyOutput(Json::new(&json!({"amount": 10}))),
        by: "bot".into(),
        reason: "checked".into(),
    };
    ctx.resolver.resolve(good.clone()).await.unwrap();
    let ev = engine.events(run).unwrap();
    assert!(ev.iter().any(|e| matches!(&e.event, Event::HumanResolved { number: 1, by, .. } if by == "bot")));
    // Once resolved, the escalation is closed to it.
    assert!(matches!(ctx.resolver.resolve(good.clone()).await, Err(EngineError::EscalationClosed { number: 1, .. })));
    engine.run_until_idle().await.unwrap();
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
    // It holds the engine weakly: with the engine gone, it says so instead of keeping it.
    drop(engine);
    assert!(matches!(ctx.resolver.resolve(good).await, Err(EngineError::EscalationClosed { .. })));
}
