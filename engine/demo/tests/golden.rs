//! Golden demo logs: the events of a small demo batch, committed per payload format, must
//! fold forever into the states committed beside them and pass the determinism check of
//! the current code. Each line carries the event twice: as JSON fields (rebuilt with
//! `Event::from_fields`) and as the store codec's bincode bytes (hex, decoded by the
//! engine's upcaster at the line's payload version), so both a renamed field and a
//! reordered one are caught.
//!
//! - `demo-v1.*`: every event at payload version 1 (before `TaskFailed.source`); the
//!   lines carry no `payload_version`. Never regenerated.
//! - `demo-v2.*`: `TaskFailed` at payload version 2 (`source`, `note`); the lines carry
//!   `payload_version`.
//! - `demo-v3.*`: `RunCompleted` at payload version 2 (`outputs` instead of `result`).
//!
//! Write a new format's golden (only for a deliberate new version, as demo-v3.*, after
//! changing `CURRENT` below): `KEEL_BLESS=1 cargo test -p keel-demo --test golden`. An
//! existing golden file is never rewritten.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
use keel_demo as demo;
use keel_engine::model::upcast;
use keel_engine::*;
use keel_replay::check::{check_run, CheckOptions};
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

/// The golden written by `bless`: the current payload format.
const CURRENT: &str = "demo-v3";

fn bless() {
    if golden(&format!("{CURRENT}.jsonl")).exists() {
        return;
    }
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
                "payload_version": e.event.payload_version(),
                "fields": fields,
                "bincode": hex::encode(codec::encode(&e.event).unwrap()),
            });
            lines.push_str(&serde_json::to_string(&line).unwrap());
            lines.push('\n');
        }
        expected.push(expected_of(&engine.state(r.run).unwrap()));
    }
    std::fs::write(golden(&format!("{CURRENT}.jsonl")), lines).unwrap();
    std::fs::write(
        golden(&format!("{CURRENT}.expected.json")),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
}

/// The runs of a golden log, each as its events in seq order.
fn load(name: &str) -> BTreeMap<String, Vec<Logged>> {
    let text = std::fs::read_to_string(golden(&format!("{name}.jsonl"))).unwrap();
    let mut runs: BTreeMap<String, Vec<Logged>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        let kind = v["kind"].as_str().unwrap();
        // Lines written before payload versions existed are version 1.
        let version = v["payload_version"].as_u64().map_or(1, |n| u16::try_from(n).unwrap());
        let fields = v["fields"].as_object().unwrap().clone();
        let from_json =
            Event::from_fields(kind, fields).unwrap_or_else(|e| panic!("line {}: {kind} does not rebuild: {e}", n + 1));
        let bytes = hex::decode(v["bincode"].as_str().unwrap()).unwrap();
        let from_bincode = upcast::decode(kind, version, &bytes)
            .unwrap_or_else(|e| panic!("line {}: {kind} v{version} bincode does not decode: {e}", n + 1));
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
    runs
}

/// Folds every run of golden `name` and compares with its recorded states; checks every
/// run against the current code (the determinism check with the demo's handlers).
fn folds_and_checks(name: &str) -> Vec<Value> {
    let runs = load(name);
    let expected: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{name}.expected.json"))).unwrap()).unwrap();
    let mut got: Vec<Value> = runs.values().map(|events| expected_of(&fold(events).unwrap().unwrap())).collect();
    got.sort_by_key(|v| v["index"].as_u64());
    assert_eq!(got.len(), 8);
    assert_eq!(got, expected);
    let handlers = demo::HANDLERS.iter().map(|h| (*h).to_owned()).collect();
    for opts in [CheckOptions::default(), CheckOptions { policy: Policy::default(), handlers: Some(handlers) }] {
        for (run, events) in &runs {
            let report = check_run(events, &opts).unwrap();
            let Some(d) = &report.divergence else { continue };
            // demo-v1 was recorded before escalations and replans quoted the evaluator's
            // notes (397b72d, a change of `decide`, not of the format): its two runs with
            // a hard or critical verdict diverge there, and only there.
            let known = name == "demo-v1"
                && matches!(d.kind.as_str(), "ReplanRequested" | "Escalated")
                && d.recorded.to_string().contains("evaluator verdict")
                && d.decided.iter().any(|v| v.to_string().contains("evaluator verdict"));
            assert!(known, "{name} run {run} diverges: {d}");
            assert!(
                !events.iter().any(|e| matches!(&e.event, Event::TaskFailed { source: FailureSource::Gate, .. })),
                "{name} run {run}: a run with a schema-gate failure must pass the check: {d}"
            );
        }
    }
    got
}

#[test]
fn the_v1_golden_demo_log_still_folds_to_its_recorded_states() {
    if std::env::var("KEEL_BLESS").is_ok() {
        bless();
    }
    let got = folds_and_checks("demo-v1");
    // The batch shows every scenario's signature outcome.
    let statuses: Vec<&str> = got.iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert!(statuses.contains(&"AwaitingHuman"));
    assert!(got.iter().any(|v| v["partial"] == json!(true)));
    assert!(got.iter().any(|v| v["revision"] == json!(1)));
}

#[test]
fn the_v1_golden_upcasts_task_failed_sources_from_the_old_message_prefixes() {
    let failed: Vec<(String, FailureSource)> = load("demo-v1")
        .values()
        .flatten()
        .filter_map(|e| match &e.event {
            Event::TaskFailed { error, source, note, .. } => {
                assert_eq!(*note, None, "version 1 had no note");
                Some((error.clone(), *source))
            }
            _ => None,
        })
        .collect();
    assert!(!failed.is_empty());
    for (error, source) in &failed {
        let want =
            if error.starts_with(event::LEGACY_GATE_PREFIX) { FailureSource::Gate } else { FailureSource::Handler };
        assert_eq!(*source, want, "{error}");
    }
    assert!(failed.iter().any(|(_, s)| *s == FailureSource::Gate));
}

#[test]
fn the_v2_golden_demo_log_folds_to_its_recorded_states_and_records_the_gate_by_code() {
    let got = folds_and_checks("demo-v2");
    assert!(got.iter().any(|v| v["revision"] == json!(1)));
    let gate: Vec<Event> = load("demo-v2")
        .into_values()
        .flatten()
        .map(|e| e.event)
        .filter(|e| matches!(e, Event::TaskFailed { source: FailureSource::Gate, .. }))
        .collect();
    assert!(!gate.is_empty(), "the demo batch has a schema-gate failure");
    for e in gate {
        let Event::TaskFailed { error, note, class, .. } = e else { unreachable!() };
        assert_eq!(error, "schema_mismatch");
        assert_eq!(class, ErrorClass::Semantic);
        assert!(note.unwrap().contains("required"), "the validator's text is kept as a note");
    }
}

#[test]
fn the_v3_golden_demo_log_folds_to_its_recorded_states_and_run_completed_refers_to_outputs() {
    folds_and_checks("demo-v3");
    let mut completed = 0;
    for events in load("demo-v3").values() {
        let Some(Event::RunCompleted { outputs, .. }) = events.last().map(|e| &e.event) else { continue };
        completed += 1;
        let state = fold(events).unwrap().unwrap();
        let mut done: Vec<TaskId> =
            state.tasks.iter().filter(|t| t.status == TaskStatus::Done).map(|t| t.spec.id.clone()).collect();
        done.sort();
        assert_eq!(outputs, &done, "RunCompleted names the done tasks, in id order");
        let result = state.result.unwrap().value().unwrap();
        for t in &state.tasks {
            if t.status == TaskStatus::Done {
                assert_eq!(result[&t.spec.id.0], t.output.as_ref().unwrap().value().unwrap());
            }
        }
    }
    assert!(completed >= 4, "{completed} completed runs");
    let text = std::fs::read_to_string(golden("demo-v3.jsonl")).unwrap();
    assert!(text.lines().any(|l| l.contains("\"kind\":\"RunCompleted\"") && l.contains("\"payload_version\":2")));
}
