//! Crash-loop protection with real processes (issue 13, item 2): a service whose handler
//! aborts the process (`std::process::abort()`, as a stack overflow would) is restarted
//! until it stays up. Each restart records the redelivery before the handler runs again;
//! after the default limit the task is quarantined, the (critical) task's run escalates,
//! and the service keeps running: the next incarnation finishes its work and exits cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;
use keel_engine::*;
use keel_replay::check::{check_run, CheckOptions};
use keel_store::{EventLog, SledStore, StoreConfig};
use serde_json::json;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

const CHILD: &str = "KEEL_QUARANTINE_CHILD";

fn engine_at(db: &std::path::Path) -> Engine {
    let boom = workflow("boom", planner(vec![plan(vec![task("pay", TaskKind::Tool, "abort", &[])])]), pass_evaluator());
    let healthy =
        workflow("healthy", planner(vec![plan(vec![task("ok", TaskKind::Tool, "ok", &[])])]), pass_evaluator());
    Engine::builder()
        .path(db)
        .workflow(boom)
        .workflow(healthy)
        .handler("abort", handler(|_| std::process::abort()))
        .handler("ok", ok_handler(Usage::default()))
        .open()
        .unwrap()
}

/// The child: a service that submits its two requests (deduplicated by key across
/// restarts), one after the other, and drives each until idle.
#[test]
fn quarantine_child() {
    let Ok(db) = std::env::var(CHILD) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let engine = engine_at(db.as_ref());
        // The healthy run is driven to its end before the aborting one is submitted: a
        // process crash counts a redelivery against every dispatch in flight at that
        // instant (nothing in the log tells which call crashed the process), so a healthy
        // call caught in flight by the abort would be counted too (docs/ENGINE.md).
        for wf in ["healthy", "boom"] {
            let mut r = req(wf, json!({}));
            r.idempotency_key = Some(format!("{wf}-1"));
            engine.submit(r).await.unwrap();
            let report = engine.run_until_idle().await.unwrap();
            assert!(report.stopped.is_empty(), "{:?}", report.stopped);
        }
    });
}

#[test]
fn an_aborting_handler_is_quarantined_after_the_default_limit_and_the_service_stays_up() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let tmp = tempdir();
    let db = tmp.path().join("db");
    let exe = std::env::current_exe().unwrap();
    let limit = REDELIVERY_LIMIT_DEFAULT;
    let mut aborted = 0u32;
    let mut clean = false;
    for _ in 0..limit + 3 {
        let status = Command::new(&exe)
            .args(["quarantine_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, &db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            clean = true;
            break;
        }
        assert_eq!(status.signal(), Some(6), "the child dies by SIGABRT, nothing else: {status}");
        aborted += 1;
    }
    // The first delivery and `limit` redeliveries each took the process down; the next
    // incarnation quarantined the task instead of running it, and finished.
    assert!(clean, "the service never came up again after {aborted} aborts");
    assert_eq!(aborted, limit + 1);

    let store = Arc::new(SledStore::open(&db, StoreConfig::default()).unwrap());
    let mut by_workflow = std::collections::BTreeMap::new();
    for run in store.runs().unwrap() {
        let events: Vec<Logged> = read_logged(store.as_ref(), run, Seq(0)).unwrap().map(|r| r.unwrap()).collect();
        let state = fold(&events).unwrap().unwrap();
        let opts = CheckOptions { policy: Policy::default(), handlers: Some(["abort", "ok"].map(String::from).into()) };
        let report = check_run(&events, &opts).unwrap();
        assert!(report.divergence.is_none(), "{:?}", report.divergence);
        by_workflow.insert(state.workflow.clone(), (state, events));
    }
    let (healthy, _) = &by_workflow["healthy"];
    assert_eq!(healthy.status, RunStatus::Completed, "the other run finished");
    let (boom, events) = &by_workflow["boom"];
    assert_eq!(boom.status, RunStatus::AwaitingHuman);
    assert_eq!(boom.escalations[0].escalation.cause, EscalationCause::FatalError);
    let redeliveries: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskRedelivered { redelivery, limit, .. } => Some((*redelivery, *limit)),
            _ => None,
        })
        .collect();
    let want: Vec<(u32, u32)> = (1..=limit + 1).map(|n| (n, limit)).collect();
    assert_eq!(redeliveries, want);
    assert_eq!(dispatches(events), vec![("pay".to_owned(), 1)], "one dispatch, redelivered");
    let failed = events
        .iter()
        .find_map(|e| match &e.event {
            Event::TaskFailed { error, source, class, note, .. } => {
                Some((error.clone(), *source, *class, note.clone()))
            }
            _ => None,
        })
        .unwrap();
    assert_eq!((failed.0.as_str(), failed.1, failed.2), (QUARANTINED, FailureSource::Engine, ErrorClass::Fatal));
    assert!(failed.3.unwrap().contains(&format!("crashed the worker {} times", limit + 1)));
}
