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
