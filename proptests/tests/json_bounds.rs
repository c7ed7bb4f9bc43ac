//! Bounded JSON, as a property: every generated JSON value the depth check accepts
//! round-trips byte-equal (canonical text) through the engine's record (journal encode),
//! the store's decode, a JSONL export and its import (what `keel replay --from` reads);
//! every value it refuses gives the typed error, at submit and as a handler's output.
//! Values: nesting near the limit (62..=66) and far past it, big and tiny numbers,
//! unicode, escapes and control characters in strings and keys.
//!
//! Seeded: `KEEL_SEED` reruns one seed; `PROPTEST_CASES` sets the number of values.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_engine::*;
use keel_proptests::cases;
use keel_proptests::rng::Rng;
use keel_store::json::{check_depth, JSON_DEPTH_MAX};
use keel_store::MemStore;
use serde_json::{json, Map, Number, Value};
use std::sync::{Arc, Mutex};

const STRINGS: &[&str] = &[
    "",
    "plain",
    "quote \" backslash \\ slash /",
    "controls \u{0} \u{1} \u{8} \u{c} \n \r \t \u{1f} \u{7f}",
    "é ü ß 日本語 🦀 \u{2028} \u{2029} \u{fffd}",
    "\u{10ffff}",
    "brackets [[[ {{{ ]]] }}} \"[\" ",
];

fn number(rng: &mut Rng) -> Value {
    let fixed = [
        json!(0),
        json!(-1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(i64::MAX),
        json!(1e308),
        json!(-1.7976931348623157e308),
        json!(5e-324),
        json!(0.1),
        json!(-0.0),
        json!(123456789.12345679),
        json!(2.2250738585072014e-308),
    ];
    if rng.chance(50) {
        return rng.pick(&fixed).clone();
    }
    match rng.below(3) {
        0 => json!(rng.next_u64()),
        1 => json!(rng.next_u64() as i64),
        _ => {
            let f = f64::from_bits(rng.next_u64());
            Number::from_f64(f).map(Value::Number).unwrap_or(json!(0.5))
        }
    }
}

fn scalar(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => number(rng),
        _ => Value::String(rng.pick(STRINGS).to_string()),
    }
}

/// A small value of nesting at most `depth`.
fn small(rng: &mut Rng, depth: usize) -> Value {
    if depth == 0 || rng.chance(40) {
        return scalar(rng);
    }
    let n = rng.below(4) as usize;
    if rng.chance(50) {
        Value::Array((0..n).map(|_| small(rng, depth - 1)).collect())
    } else {
        let mut m = Map::new();
        for i in 0..n {
            m.insert(format!("{}{i}", rng.pick(STRINGS)), small(rng, depth - 1));
        }
        Value::Object(m)
    }
}

/// A value whose deepest path nests exactly `depth` levels, with small siblings.
fn deep(rng: &mut Rng, depth: usize) -> Value {
    let mut v = scalar(rng);
    for level in 0..depth {
        let sibling = small(rng, level.min(2));
        v = if rng.chance(50) {
            let mut items = vec![v];
            if rng.chance(30) {
                items.push(sibling);
            }
            Value::Array(items)
        } else {
            let mut m = Map::new();
            m.insert(rng.pick(STRINGS).to_string(), v);
            if rng.chance(30) {
                m.insert("~sibling".to_owned(), sibling);
            }
            Value::Object(m)
        };
    }
    v
}

fn depth_of_case(rng: &mut Rng) -> usize {
    match rng.below(6) {
        0 => rng.below(4) as usize,
        1 | 2 => JSON_DEPTH_MAX - 2 + rng.below(5) as usize,
        3 => JSON_DEPTH_MAX,
        4 => JSON_DEPTH_MAX + 1,
        _ => *rng.pick(&[100usize, 129, 300, 5_000]),
    }
}

/// A handler answering the run's input as its output.
struct Echo(Mutex<Option<Value>>);
impl TaskHandler for Echo {
    fn call(&self, _call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let v = self.0.lock().unwrap().take().unwrap_or(Value::Null);
        Box::pin(async move { Ok(TaskOutput { output: v, usage: Usage::default() }) })
    }
}

struct OnePlan;
impl Planner for OnePlan {
    fn plan(&self, _r: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let mut t = TaskSpec::new("echo", TaskKind::Tool, "echo");
        t.retry.max_attempts = 1;
        Box::pin(async move { Ok(Plan { tasks: vec![t], rationale: "echo".into() }) })
    }
}

struct Pass;
impl Evaluator for Pass {
    fn evaluate(&self, _r: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        Box::pin(async { Ok(Evaluation { verdict: Verdict::Pass, notes: String::new(), usage: Usage::default() }) })
    }
}

fn engine(store: Arc<MemStore>, echo: Arc<Echo>) -> Engine {
    Engine::builder()
        .store(store)
        .workflow(WorkflowType::new("json", Arc::new(OnePlan), Arc::new(Pass)))
        .handler("echo", echo)
        .open()
        .unwrap()
}

/// Exports `run` from `store` to a JSONL file, verifies it, and imports it back.
fn export_and_import(store: &MemStore, run: RunId, dir: &std::path::Path) -> Vec<Logged> {
    let path = dir.join(format!("{run}.jsonl"));
    let file = std::fs::File::create(&path).unwrap();
    let mut w = keel_replay::JsonlWriter::new(file, keel_replay::Redaction::default(), json!({}), 0).unwrap();
    w.write_run(store, run).unwrap();
    w.finish().unwrap();
    let v = keel_replay::verify_export(&path).unwrap();
    assert!(v.ok(), "export verifies: {:?}", v.failure);
    let mut runs = keel_replay::export_runs(&path).unwrap();
    let (r, events) = runs.next().unwrap().unwrap();
    assert_eq!(r, run);
    events
}

fn json_of(events: &[Logged], kind: &str) -> Option<String> {
    events.iter().find_map(|e| match (&e.event, kind) {
        (Event::RunAccepted { input, .. }, "RunAccepted") => Some(input.0.clone()),
        (Event::TaskExecuted { output, .. }, "TaskExecuted") => Some(output.0.clone()),
        _ => None,
    })
}

#[test]
fn accepted_json_round_trips_byte_equal_and_refused_json_is_a_typed_error() {
    let seed = keel_proptests::env_u64("KEEL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("json_bounds seed: {seed} (rerun: KEEL_SEED={seed})");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..cases(48) {
        let depth = depth_of_case(&mut rng);
        // Copies of a value too deep are made by generating it again (`Value::clone`
        // recurses, as `Drop` does).
        let case_seed = rng.next_u64();
        let make = || deep(&mut Rng::new(case_seed), depth);
        let v = make();
        let canonical = String::from_utf8(keel_store::digest::canonical_json(&v)).unwrap();
        let ok = check_depth(&v).is_ok();
        assert_eq!(ok, depth <= JSON_DEPTH_MAX, "case {case}: depth {depth}");
        let store = Arc::new(MemStore::new());
        let echo = Arc::new(Echo(Mutex::new(None)));
        let e = engine(store.clone(), echo.clone());
        rt.block_on(async {
            // As a request input.
            let submitted = e.submit(Request::new("json", make())).await;
            if !ok {
                refused += 1;
                let err = submitted.expect_err("refused at submit");
                assert!(matches!(err, EngineError::JsonTooDeep { what: "input", max: JSON_DEPTH_MAX }), "{err}");
                // As a handler's output, through a run whose input is small.
                *echo.0.lock().unwrap() = Some(make());
                let s = e.submit(Request::new("json", json!({"case": case}))).await.unwrap();
                e.run_until_idle().await.unwrap();
                let events = e.events(s.run).unwrap();
                let failed = events.iter().any(|l| {
                    matches!(&l.event, Event::TaskFailed { error, source: FailureSource::Engine, .. } if error == "json_too_deep")
                });
                assert!(failed, "case {case} (seed {seed}): output refused with json_too_deep");
                // (The replan's attempt gets `null` from the echo.)
                assert_ne!(json_of(&events, "TaskExecuted").as_deref(), Some(canonical.as_str()));
                return;
            }
            accepted += 1;
            let s = submitted.unwrap_or_else(|err| panic!("case {case} (seed {seed}): {err}"));
            *echo.0.lock().unwrap() = Some(v.clone());
            e.run_until_idle().await.unwrap();
            // Record -> decode: the store's events, read back and decoded.
            let events = e.events(s.run).unwrap();
            assert_eq!(e.state(s.run).unwrap().status, RunStatus::Completed, "case {case} (seed {seed})");
            for kind in ["RunAccepted", "TaskExecuted"] {
                assert_eq!(json_of(&events, kind).as_deref(), Some(canonical.as_str()), "case {case} {kind} (seed {seed})");
            }
            // Export -> import.
            let imported = export_and_import(&store, s.run, dir.path());
            assert_eq!(imported.len(), events.len());
            for kind in ["RunAccepted", "TaskExecuted"] {
                assert_eq!(
                    json_of(&imported, kind).as_deref(),
                    Some(canonical.as_str()),
                    "case {case} {kind} after export/import (seed {seed})"
                );
            }
            // And the text parses back to the same value.
            let back: Value = serde_json::from_str(&canonical).unwrap();
            assert_eq!(keel_store::digest::canonical_json(&back), canonical.as_bytes(), "case {case} (seed {seed})");
        });
        keel_store::json::dismantle(v);
    }
    println!("json_bounds: {accepted} accepted, {refused} refused");
}
