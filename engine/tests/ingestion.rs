//! Strict ingestion (issue 13, item 6): an idempotency key names one request. The same
//! request again returns its run; a different one (input, priority) is refused with both
//! request digests, and nothing is written; `Engine::run_by_key` finds the run while the
//! key is within the workflow type's dedup window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use serde_json::json;

fn keyed(input: serde_json::Value, priority: i32) -> Request {
    Request { idempotency_key: Some("evt_1".into()), priority, ..Request::new("w", input) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_a_different_request_is_an_idempotency_conflict_and_writes_nothing() {
    let dir = tempdir();
    let clock = FakeClock::at(1_000_000_000);
    let mut wf = workflow("w", planner(vec![plan(vec![task("a", TaskKind::Tool, "ok", &[])])]), pass_evaluator());
    wf.dedup_window_ms = 60_000;
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b.clock(clock.clone()));
    let first = engine.submit(keyed(json!({"amount": 10}), 0)).await.unwrap();
    assert!(!first.duplicate);

    // The same request again: the same run.
    let again = engine.submit(keyed(json!({"amount": 10}), 0)).await.unwrap();
    assert_eq!(again, Submitted { run: first.run, duplicate: true });

    // Another input, another priority: refused, naming both digests.
    let original = request_digest("w", &Json::new(&json!({"amount": 10})), 0);
    for (input, priority) in [(json!({"amount": 99}), 0), (json!({"amount": 10}), 5)] {
        let wanted = request_digest("w", &Json::new(&input), priority);
        match engine.submit(keyed(input, priority)).await {
            Err(EngineError::IdempotencyConflict { workflow, key, run, existing_digest, request_digest }) => {
                assert_eq!((workflow.as_str(), key.as_str(), run), ("w", "evt_1", first.run));
                assert_eq!((existing_digest, request_digest), (original.clone(), wanted));
            }
            other => panic!("expected IdempotencyConflict, got {other:?}"),
        }
    }
    let events = engine.events(first.run).unwrap();
    assert_eq!(kinds(&events), vec!["RunAccepted"], "nothing recorded for the refused requests");
    assert_eq!(engine.runs().unwrap().len(), 1);

    // Lookup by key, within the dedup window.
    assert_eq!(engine.run_by_key("w", "evt_1").await.unwrap(), Some(first.run));
    assert_eq!(engine.run_by_key("w", "evt_2").await.unwrap(), None);
    assert_eq!(engine.run_by_key("other", "evt_1").await.unwrap(), None, "keys are scoped to their workflow type");
    // After the window the key is free: no run by it, and a request with it is a new run.
    clock.advance_ms(60_001);
    assert_eq!(engine.run_by_key("w", "evt_1").await.unwrap(), None);
    let later = engine.submit(keyed(json!({"amount": 99}), 0)).await.unwrap();
    assert!(!later.duplicate);
    assert_ne!(later.run, first.run);
    assert_eq!(engine.run_by_key("w", "evt_1").await.unwrap(), Some(later.run));
}

/// A configuration the engine refuses is refused before the store is opened: nothing is
/// created on disk (a review as an embedder found a new database left behind by each).
/// `dedup_window_ms = 0` (a key expiring as it is made: idempotency silently off) and
/// `call_threads = 0` are refused too.
#[test]
fn a_configuration_error_creates_nothing_on_disk() {
    let dir = tempdir();
    let db = dir.path().join("db");
    let wf = || workflow("wf", planner(vec![]), pass_evaluator());
    let builder = || Engine::builder().path(&db).workflow(wf());
    let cases: Vec<(&str, EngineBuilder)> = vec![
        ("workers must be at least 1", builder().workers(0)),
        (
            "call_threads must be at least 1",
            builder().limits(ShellLimits { call_threads: 0, ..ShellLimits::default() }),
        ),
        ("max_parallel_tasks", Engine::builder().path(&db).workflow(WorkflowType { max_parallel_tasks: 0, ..wf() })),
        (
            "dedup_window_ms must be at least 1",
            Engine::builder().path(&db).workflow(WorkflowType { dedup_window_ms: 0, ..wf() }),
        ),
        (
            "invalid input schema",
            Engine::builder().path(&db).workflow(WorkflowType { input_schema: Some(json!({"type": 7})), ..wf() }),
        ),
        ("registered twice", builder().workflow(wf())),
        ("lease_ttl_ms", builder().lease_ttl_ms(1)),
        ("queue_poll_ms", builder().queue_poll_ms(0)),
        ("checkpoint_every_ms", builder().checkpoint_every_ms(0)),
    ];
    for (want, b) in cases {
        match b.open() {
            Err(EngineError::Config(e)) => assert!(e.contains(want), "{want}: {e}"),
            other => panic!("{want}: {other:?}"),
        }
        assert!(!db.exists(), "{want}: the refused configuration created {}", db.display());
    }
    let engine = builder().open().expect("the same builder without the error opens");
    assert!(db.exists());
    drop(engine);
}
