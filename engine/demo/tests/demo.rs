#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;
use keel_demo as demo;
use keel_engine::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_batch_shows_every_scenario() {
    trace();
    let dir = tempdir();
    let engine = demo::register(Engine::builder().path(dir.path())).open().unwrap();
    let summary = demo::run_demo(&engine, 8, 42).await.unwrap();
    println!("{summary}");
    for r in &summary.runs {
        let ev = engine.events(r.run).unwrap();
        println!("{} {}: {:?}", r.index, r.scenario, kinds(&ev));
    }
}
