//! Golden demo log (schema v1): the events of a small demo batch, committed in
//! `tests/golden/demo-v1.jsonl`, must fold forever into the states committed in
//! `tests/golden/demo-v1.expected.json`. Each line carries the event twice: as JSON
//! fields (rebuilt with `Event::from_fields`) and as the store codec's bincode bytes
//! (hex), so both a renamed field and a reordered one are caught.
//!
//! Regenerate (only for a deliberate new version, as demo-v2.*): `KEEL_BLESS=1 cargo test
//! -p keel-engine --test golden`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
use keel_demo as demo;
use keel_engine::*;
use keel_store::codec;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn expected_of(state: &RunState) -> Value {
    let tasks: BTreeMap<String, &str> = state.tasks.iter().map(|t| (t.spec.id.0.clone(), t.status.name())).collect();
    json!({
        "index": state.input.value().unwrap()["index"],
        "status": state.status.name(),
        "partial": state.partial,
        "revision": state.revision,
        "tasks": tasks,
        "cost_micros": state.totals.cost_micros,
        "events": state.next_seq.0,
    })
}

fn bless() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let engine =
        demo::register(Engine::builder().store(std::sync::Arc::new(keel_store::MemStore::new()))).open().unwrap();
    let summary = rt.block_on(demo::run_demo(&engine, 8, 2024)).unwrap();
    let mut lines = String::new();
    let mut expected = Vec::new();
    for r in &summary.runs {
        for e in engine.events(r.run).unwrap() {
            let fields = keel_store::Payload::fields(&e.event);
            let line = json!({
                "run": r.run.to_string(),
                "seq": e.seq.0,
                "at_us": e.at_us,
                "kind": e.event.kind_name(),
                "fields": fields,
                "bincode": hex::encode(codec::encode(&e.event).unwrap()),
            });
            lines.push_str(&serde_json::to_string(&line).unwrap());
            lines.push('\n');
        }
        expected.push(expected_of(&engine.state(r.run).unwrap()));
    }
    std::fs::write(golden("demo-v1.jsonl"), lines).unwrap();
    std::fs::write(golden("demo-v1.expected.json"), serde_json::to_string_pretty(&expected).unwrap() + "\n").unwrap();
}

#[test]
fn the_v1_golden_demo_log_still_folds_to_its_recorded_states() {
    if std::env::var("KEEL_BLESS").is_ok() {
        bless();
    }
    let text = std::fs::read_to_string(golden("demo-v1.jsonl")).unwrap();
    let mut runs: BTreeMap<String, Vec<Logged>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        let kind = v["kind"].as_str().unwrap();
        let fields = v["fields"].as_object().unwrap().clone();
        let from_json =
            Event::from_fields(kind, fields).unwrap_or_else(|e| panic!("line {}: {kind} does not rebuild: {e}", n + 1));
        let bytes = hex::decode(v["bincode"].as_str().unwrap()).unwrap();
        let from_bincode: Event =
            codec::decode(&bytes).unwrap_or_else(|e| panic!("line {}: {kind} bincode does not decode: {e}", n + 1));
        assert_eq!(from_json, from_bincode, "line {}: JSON and bincode forms disagree", n + 1);
        assert_eq!(from_json.kind_name(), kind);
        let run_s = v["run"].as_str().unwrap().to_owned();
        let run: RunId = run_s.parse().unwrap();
        runs.entry(run_s).or_default().push(Logged {
            run,
            seq: Seq(v["seq"].as_u64().unwrap()),
            at_us: v["at_us"].as_i64().unwrap(),
            event: from_json,
        });
    }
    let expected: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden("demo-v1.expected.json")).unwrap()).unwrap();
    let mut got: Vec<Value> = runs.values().map(|events| expected_of(&fold(events).unwrap().unwrap())).collect();
    got.sort_by_key(|v| v["index"].as_u64());
    assert_eq!(got.len(), 8);
    assert_eq!(got, expected);
    // The batch shows every scenario's signature outcome.
    let statuses: Vec<&str> = got.iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert!(statuses.contains(&"AwaitingHuman"));
    assert!(got.iter().any(|v| v["partial"] == json!(true)));
    assert!(got.iter().any(|v| v["revision"] == json!(1)));
}
