//! Resume from a snapshot plus the log's tail equals a full fold, on the demo's runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_demo as demo;
use keel_engine::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_deterministic_snapshot_plus_tail_equals_a_full_fold() {
    let dir = tempdir();
    let engine = demo::register(Engine::builder().path(dir.path()).snapshot_every(5)).open().unwrap();
    let summary = demo::run_demo(&engine, 16, 7).await.unwrap();
    let log = engine.store();
    for r in &summary.runs {
        let a = fold_full(log.as_ref(), r.run).unwrap().unwrap();
        let b = fold_full(log.as_ref(), r.run).unwrap().unwrap();
        assert_eq!(a, b, "folding twice gives the same state");
        let snap = load_state(log.as_ref(), r.run).unwrap().unwrap();
        assert_eq!(a, snap, "snapshot + tail equals the full fold");
        assert!(log.load_snapshot(r.run).unwrap().is_some(), "snapshots were saved");
    }
    // Running the same batch again adds no runs and changes no terminal run.
    let before = engine.runs().unwrap();
    let again = demo::run_demo(&engine, 16, 7).await.unwrap();
    assert!(again.runs.iter().all(|r| r.duplicate));
    let after = engine.runs().unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(before, after);
}
