//! Outputs of any size, events of bounded size (issue 13, item 5): large values travel by
//! reference to the payload store beside the log, `RunCompleted` refers to outputs, the
//! output limits are recorded task failures, and a decision the store refuses fails the
//! run instead of stopping its driver. Every test asserts on recorded events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::*;
use keel_engine::*;
use keel_store::{Limits, MemStore, Store};
use serde_json::{json, Value};
use std::sync::Arc;

/// A handler whose output is `{"task": id, "text": <n bytes>}`.
fn sized_handler(n: usize) -> Arc<FnHandler> {
    handler(move |c| {
        let fill: String = std::iter::repeat_n(c.task.0.chars().next().unwrap_or('x'), n).collect();
        Ok(TaskOutput { output: json!({ "task": c.task.0, "text": fill }), usage: Usage::default() })
    })
}

/// `n` independent tasks `t0..` and, if `fan_in`, a task `join` depending on all of them.
fn fan_plan(n: usize, fan_in: bool) -> Plan {
    let mut tasks: Vec<TaskSpec> = (0..n).map(|i| task(&format!("t{i}"), TaskKind::Tool, "big", &[])).collect();
    if fan_in {
        let deps: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        tasks.push(task("join", TaskKind::Tool, "small", &deps));
    }
    plan(tasks)
}

fn wf(p: Plan) -> WorkflowType {
    let mut w = workflow("fan", planner(vec![p]), pass_evaluator());
    w.max_parallel_tasks = 16;
    w
}

/// Every stored record of `run`, decoded as written (references not inflated).
fn stored(store: &dyn Store, run: RunId) -> Vec<(usize, Event)> {
    store
        .read(run, Seq(0))
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            let ev = keel_engine::model::upcast::decode(&r.kind, r.payload_version(), &r.payload).unwrap();
            (r.payload.len(), ev)
        })
        .collect()
}

fn is_ref(j: &Json) -> bool {
    j.0.starts_with("@sha256:")
}

fn completed(events: &[Logged]) -> Option<&Logged> {
    events.iter().find(|e| matches!(e.event, Event::RunCompleted { .. }))
}

/// The reproduction of item 5: five tasks of 15 KB outputs (each within the old 16 KiB
/// output limit) made a `RunCompleted` of 75 KB, over the store's 64 KiB event limit: the
/// driver stopped and the run stayed Running. Now the run completes, `RunCompleted` names
/// the outputs, and the state's result holds all five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_tasks_of_15_kb_outputs_complete_and_run_completed_refers_to_them() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let engine = Engine::builder()
        .store(store.clone())
        .workflow(wf(fan_plan(5, false)))
        .handler("big", sized_handler(15_000))
        .open()
        .unwrap();
    let s = engine.submit(req("fan", json!({}))).await.unwrap();
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "a driver stopped: {:?}", report.stopped);
    let events = engine.events(s.run).unwrap();
    let Some(Logged { event: Event::RunCompleted { partial: false, outputs, .. }, .. }) = completed(&events) else {
        panic!("no RunCompleted: {:?}", kinds(&events));
    };
    assert_eq!(outputs.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), ["t0", "t1", "t2", "t3", "t4"]);
    let state = engine.state(s.run).unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    let result = state.result.unwrap().value().unwrap();
    for i in 0..5 {
        assert_eq!(result[format!("t{i}")]["text"].as_str().unwrap().len(), 15_000);
    }
    // As stored: every output is a reference, every record far below the event limit.
    for (bytes, ev) in stored(store.as_ref(), s.run) {
        assert!(bytes < 4 * 1024, "{} of {bytes} bytes", ev.kind_name());
        if let Event::TaskExecuted { output, .. } = &ev {
            assert!(is_ref(output), "stored output is not a reference: {}", &output.0[..40.min(output.0.len())]);
        }
    }
}

/// A fan-in of 8 tasks with 1 MB outputs each on a real sled db: the run completes, the
/// join task sees all eight outputs in full, and each output is stored once although it
/// is referenced by its `TaskExecuted` and by the join's `TaskDispatched`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_in_of_8_outputs_of_1_mb_completes_on_sled_and_stores_each_output_once() {
    let dir = tempdir();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let join = handler(move |c| {
        let sizes: Vec<usize> = c.input.upstream.values().map(|j| j.0.len()).collect();
        seen2.lock().unwrap().extend(sizes);
        Ok(TaskOutput { output: json!({"joined": c.input.upstream.len()}), usage: Usage::default() })
    });
    let engine =
        open_engine(dir.path(), wf(fan_plan(8, true)), &[("big", sized_handler(1_000_000)), ("small", join)], |b| {
            b.durability(keel_store::Durability::None)
        });
    let s = engine.submit(req("fan", json!({}))).await.unwrap();
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "a driver stopped: {:?}", report.stopped);
    let events = engine.events(s.run).unwrap();
    assert!(matches!(completed(&events).map(|e| &e.event), Some(Event::RunCompleted { partial: false, .. })));
    let sizes = seen.lock().unwrap().clone();
    assert_eq!(sizes.len(), 8);
    assert!(sizes.iter().all(|&n| n > 1_000_000), "{sizes:?}");
    let store = engine.store();
    let recorded = stored(store.as_ref(), s.run);
    let join_input = recorded
        .iter()
        .find_map(|(_, e)| match e {
            Event::TaskDispatched { task, input, .. } if task.0 == "join" => Some(input.clone()),
            _ => None,
        })
        .unwrap();
    assert!(join_input.upstream.values().all(is_ref));
    // 8 outputs, each once (the join's inputs refer to the same payloads).
    assert_eq!(store.payload_digests().unwrap().len(), 8);
    assert_eq!(keel_store::verify_payloads(store.as_ref()).unwrap(), 8);
    let result = engine.state(s.run).unwrap().result.unwrap().value().unwrap();
    assert_eq!(result.as_object().unwrap().len(), 9);
}

/// An output over `ShellLimits::output_bytes_max` is a recorded task failure with a
/// stable code, not a stopped driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_per_task_limit_is_a_recorded_task_failure() {
    let mut p = fan_plan(1, false);
    p.tasks[0].critical = false;
    p.tasks[0].retry.max_attempts = 1;
    let engine = Engine::builder()
        .store(Arc::new(MemStore::new()))
        .workflow(wf(p))
        .handler("big", sized_handler(20_000))
        .limits(ShellLimits { output_bytes_max: 10_000, ..ShellLimits::default() })
        .policy(Policy { max_replans: 0, ..Policy::default() })
        .open()
        .unwrap();
    let s = engine.submit(req("fan", json!({}))).await.unwrap();
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    let events = engine.events(s.run).unwrap();
    let failure = events
        .iter()
        .find_map(|e| match &e.event {
            Event::TaskFailed { error, source, class, note, .. } => {
                Some((error.clone(), *source, *class, note.clone()))
            }
            _ => None,
        })
        .expect("a TaskFailed");
    assert_eq!(
        (failure.0.as_str(), failure.1, failure.2),
        (OUTPUT_TOO_LARGE, FailureSource::Engine, ErrorClass::Semantic)
    );
    assert!(failure.3.unwrap().contains("output_bytes_max 10000"));
    assert!(engine.state(s.run).unwrap().status.is_terminal());
}

/// Outputs that would take the run over `ShellLimits::run_payload_bytes_max` are a fatal
/// task failure of their own (the task is skipped: it is not critical).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_over_the_run_total_are_a_recorded_fatal_task_failure() {
    let mut p = fan_plan(3, false);
    for t in &mut p.tasks {
        t.critical = false;
    }
    let engine = Engine::builder()
        .store(Arc::new(MemStore::new()))
        .workflow(wf(p))
        .handler("big", sized_handler(20_000))
        .limits(ShellLimits { run_payload_bytes_max: 50_000, ..ShellLimits::default() })
        .open()
        .unwrap();
    let s = engine.submit(req("fan", json!({}))).await.unwrap();
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    let events = engine.events(s.run).unwrap();
    let fails: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskFailed { error, source, class, .. } => Some((error.clone(), *source, *class)),
            _ => None,
        })
        .collect();
    assert_eq!(fails, vec![(RUN_PAYLOAD_TOO_LARGE.to_owned(), FailureSource::Engine, ErrorClass::Fatal)]);
    assert_eq!(count(&events, "TaskSkipped"), 1);
    assert!(matches!(completed(&events).map(|e| &e.event), Some(Event::RunCompleted { partial: true, .. })));
}

/// A decision of the core that the store refuses as too large (here a dispatch whose
/// input copies two upstream outputs, on a store with a 3,000-byte event limit) used to
/// stop the driver with the run Running, to be tried again on every drive. Now the run
/// fails, on record, and no driver stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_too_large_to_record_fails_the_run_instead_of_stopping_the_driver() {
    let limits = Limits { event_bytes_max: 3_000, ..Limits::default() };
    let engine = Engine::builder()
        .store(Arc::new(MemStore::with_limits(limits)))
        .workflow(wf(fan_plan(2, true)))
        .handler("big", sized_handler(2_000))
        .handler("small", ok_handler(Usage::default()))
        .open()
        .unwrap();
    let s = engine.submit(req("fan", json!({}))).await.unwrap();
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "a driver stopped: {:?}", report.stopped);
    let events = engine.events(s.run).unwrap();
    let Some(Event::RunFailed { reason }) = events.last().map(|e| &e.event) else {
        panic!("last event is not RunFailed: {:?}", kinds(&events));
    };
    assert!(reason.starts_with(RECORD_TOO_LARGE), "{reason}");
    assert!(reason.contains("TaskDispatched"), "{reason}");
    assert_eq!(engine.state(s.run).unwrap().status, RunStatus::Failed);
}

/// A large request input is stored by reference too, and the planner sees it in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_input_is_stored_by_reference_and_read_back_in_full() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    // Over the 16 KiB request inputs were capped at before the payload store, within the
    // default limit of 1 MiB.
    let big: String = "q".repeat(600_000);
    let engine = Engine::builder()
        .store(store.clone())
        .workflow(wf(fan_plan(1, false)))
        .handler("big", sized_handler(10))
        .open()
        .unwrap();
    let s = engine.submit(req("fan", json!({ "text": big }))).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let events = engine.events(s.run).unwrap();
    let Event::RunAccepted { input, .. } = &events[0].event else { panic!() };
    assert_eq!(input.value().unwrap()["text"], Value::String(big.clone()));
    let (_, first) = &stored(store.as_ref(), s.run)[0];
    let Event::RunAccepted { input, .. } = first else { panic!() };
    assert!(is_ref(input), "{}", input.0);
    // One byte over the limit is refused, and nothing is written.
    let runs_before = store.runs().unwrap().len();
    let over = "q".repeat(ShellLimits::default().input_bytes_max);
    let e = engine.submit(req("fan", json!({ "text": over }))).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidInput { .. }), "{e}");
    assert_eq!(store.runs().unwrap().len(), runs_before);
}

/// A supplied value that merely looks like a reference (`Json` is a public tuple struct,
/// so a caller can build one that is not canonical JSON) is stored by reference itself and
/// reads back as written: it is never taken for a reference to another payload.
#[test]
fn a_value_that_looks_like_a_reference_reads_back_as_itself() {
    use keel_engine::model::payload;
    let store = MemStore::new();
    let victim = keel_store::Payloads::put_payload(&store, br#"{"secret":1}"#).unwrap();
    let fake = payload::ref_json(&victim);
    let mut event = Event::TaskExecuted {
        task: TaskId("t".into()),
        attempt: 1,
        output: fake.clone(),
        usage: Usage::default(),
        cached: false,
    };
    let moved =
        payload::outline(&mut event, payload::INLINE_JSON_BYTES_MAX, |b| keel_store::Payloads::put_payload(&store, b))
            .unwrap();
    assert_eq!(moved.len(), 1, "a slot beginning with '@' is always moved out");
    payload::inflate(
        &mut event,
        |r| Ok::<_, String>(keel_store::Payloads::get_payload(&store, &r.digest, 1 << 20).unwrap().unwrap()),
        |why| why,
    )
    .unwrap();
    let Event::TaskExecuted { output, .. } = event else { unreachable!() };
    assert_eq!(output, fake, "read back as written, not as the payload it names");
}
