//! What handler code with side effects may rely on (issue 13), on recorded events:
//!
//! - the stable effect key: a handler that performs its side effect and then times out is
//!   retried under the same effect key (and a new attempt key), so deduplicating on the
//!   effect key performs the effect once; a replan keeps the key of an unchanged task and
//!   gives a changed one a new key;
//! - redelivery accounting and quarantine: a dispatch found without a result by a driver
//!   that did not make it is recorded (`TaskRedelivered`) before the handler runs again;
//!   past the limit the task fails as `quarantined` and the ordinary recovery follows;
//! - optional dependencies: a dependent runs when an optional upstream is skipped and
//!   sees that it was.
//!
//! Every run is also checked with the determinism check (`keel replay --check`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;
use keel_engine::*;
use keel_replay::check::{check_run, CheckOptions};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The run passes the determinism check with the engine's policy and handlers.
fn passes_check(engine: &Engine, events: &[Logged]) {
    let ctx = engine.context();
    let opts = CheckOptions { policy: ctx.policy, handlers: Some(ctx.handlers) };
    let report = check_run(events, &opts).unwrap();
    assert!(report.divergence.is_none(), "{:?}", report.divergence);
}

/// A payment service: a payment posted under a key it already has is not posted again.
#[derive(Default)]
struct Ledger {
    /// Payments by the key they were deduplicated on.
    by_key: Mutex<BTreeMap<String, u32>>,
}

impl Ledger {
    /// Posts a payment under `key`; `true` if it was posted (not a duplicate).
    fn post(&self, key: &str) -> bool {
        let mut m = self.by_key.lock().unwrap();
        let n = m.entry(key.to_owned()).or_default();
        *n += 1;
        *n == 1
    }
    fn posted(&self) -> usize {
        self.by_key.lock().unwrap().len()
    }
}

/// Posts the payment (deduplicated on the effect key into `stable`, and on the attempt key
/// into `per_attempt`, which is what following the old docs did), then, on attempt 1,
/// answers only after its timeout: the engine records a timeout and retries.
struct PayHandler {
    stable: Arc<Ledger>,
    per_attempt: Arc<Ledger>,
    seen: Mutex<Vec<(u32, u32, String, String)>>,
}

impl TaskHandler for PayHandler {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        self.stable.post(&call.effect_key);
        self.per_attempt.post(&call.attempt_key);
        self.seen.lock().unwrap().push((
            call.attempt,
            call.revision,
            call.effect_key.clone(),
            call.attempt_key.clone(),
        ));
        let late = call.attempt == 1;
        let timeout_ms = call.timeout_ms;
        Box::pin(async move {
            if late {
                tokio::time::sleep(Duration::from_millis(timeout_ms * 5)).await;
            }
            Ok(TaskOutput { output: json!({"paid": true}), usage: Usage::default() })
        })
    }
}

/// `(attempt, effect_key, attempt_key)` of every dispatch of `task`, in log order.
fn keys_of(events: &[Logged], task: &str) -> Vec<(u32, String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskDispatched { task: t, attempt, effect_key, attempt_key, .. } if t.0 == task => {
                Some((*attempt, effect_key.clone(), attempt_key.clone()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_timed_out_after_posting_is_posted_once_when_deduped_on_the_effect_key() {
    let dir = tempdir();
    let mut pay = task("pay", TaskKind::Tool, "pay", &[]);
    pay.timeout_ms = 100;
    let wf = workflow("w", planner(vec![plan(vec![pay])]), pass_evaluator());
    let (stable, per_attempt) = (Arc::new(Ledger::default()), Arc::new(Ledger::default()));
    let h = Arc::new(PayHandler { stable: stable.clone(), per_attempt: per_attempt.clone(), seen: Mutex::default() });
    let engine = open_engine(dir.path(), wf, &[("pay", h.clone())], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed, "{:?}", kinds(&ev));

    // Recorded: attempt 1 timed out (its payment was posted), attempt 2 answered.
    let failed: Vec<(u32, String)> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskFailed { attempt, error, source: FailureSource::Handler, .. } => Some((*attempt, error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![(1, "timeout after 100 ms".to_owned())]);
    assert!(ev.iter().any(|e| matches!(e.event, Event::TaskExecuted { attempt: 2, .. })));
    let keys = keys_of(&ev, "pay");
    assert_eq!(keys.len(), 2, "dispatched twice");
    // One effect key across the retry; a new attempt key per attempt.
    assert_eq!(keys[0].1, keys[1].1, "the effect key is stable across the retry");
    assert_ne!(keys[0].2, keys[1].2, "the attempt key is per attempt");
    assert_eq!(keys[0].1, effect_key(run, &TaskId::from("pay"), 0));
    // The handler saw exactly the recorded keys and the revision.
    let seen = h.seen.lock().unwrap().clone();
    let recorded: Vec<(u32, u32, String, String)> =
        keys.iter().map(|(a, e, k)| (*a, 0, e.clone(), k.clone())).collect();
    assert_eq!(seen, recorded);
    // Exactly one payment when deduplicating on the effect key; two on the attempt key.
    assert_eq!(stable.posted(), 1, "deduplicated on the effect key: one payment");
    assert_eq!(per_attempt.posted(), 2, "deduplicated on the attempt key: the retry pays again");
    passes_check(&engine, &ev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replan_keeps_the_effect_key_of_an_unchanged_task_and_renews_a_changed_one() {
    let dir = tempdir();
    // Revision 0: `pay` fails for good (one attempt, transient) -> replan; `note` runs.
    // Revision 1: `pay` unchanged (same id and spec), `note` with another input.
    let mut pay = task("pay", TaskKind::Tool, "pay", &[]);
    pay.retry.max_attempts = 1;
    let note0 = task("note", TaskKind::Tool, "note", &[]).with_input(&json!({"text": "v0"}));
    let note1 = task("note", TaskKind::Tool, "note", &[]).with_input(&json!({"text": "v1"}));
    let wf = workflow("w", planner(vec![plan(vec![pay.clone(), note0]), plan(vec![pay, note1])]), pass_evaluator());
    let pay_h = handler(|c| {
        if c.revision == 0 {
            Err(transient("gateway timeout"))
        } else {
            Ok(TaskOutput { output: json!({"paid": true}), usage: Usage::default() })
        }
    });
    let engine = open_engine(dir.path(), wf, &[("pay", pay_h), ("note", ok_handler(Usage::default()))], |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed, "{:?}", kinds(&ev));
    assert_eq!(count(&ev, "Replanned"), 1);

    let pay_keys = keys_of(&ev, "pay");
    assert_eq!(pay_keys.len(), 2, "pay dispatched once per revision");
    assert_eq!(pay_keys[0].1, pay_keys[1].1, "an unchanged task keeps its effect key across the replan");
    assert_eq!(pay_keys[1].1, effect_key(run, &TaskId::from("pay"), 0), "the revision that first planned it");
    assert_ne!(pay_keys[0].2, pay_keys[1].2, "each attempt has its own key");

    let note_keys = keys_of(&ev, "note");
    assert_eq!(note_keys.len(), 2, "note dispatched once per revision (its spec changed)");
    assert_ne!(note_keys[0].1, note_keys[1].1, "a changed spec is a new effect with a new key");
    assert_eq!(note_keys[1].1, effect_key(run, &TaskId::from("note"), 1));
    passes_check(&engine, &ev);
}

/// Drives `run` with the service workers until its task `task` is in its handler, then
/// stops the workers (the dispatch is durable, its result never comes): what a crash of
/// the process does to it.
async fn stop_while_in_flight(engine: &Engine, h: &FnHandler, calls_before: u64) {
    let workers = engine.start();
    for _ in 0..1000 {
        if h.calls() > calls_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(h.calls() > calls_before, "the handler was called");
    workers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_whose_worker_keeps_dying_is_redelivered_then_quarantined_and_escalated() {
    let dir = tempdir();
    let mut boom = task("boom", TaskKind::Tool, "hang", &[]);
    boom.timeout_ms = 3_600_000;
    let wf = workflow("w", planner(vec![plan(vec![boom])]), pass_evaluator());
    // The handler never answers (a process that dies mid-call never does either).
    let hang = slow_handler(3_600_000, |_| Ok(TaskOutput { output: json!(1), usage: Usage::default() }));
    let limit = 2;
    let engine = open_engine(dir.path(), wf, &[("hang", hang.clone())], |b| b.redelivery_limit(limit));
    let run = engine.submit(req("w", json!({}))).await.unwrap().run;
    // The first delivery, then `limit` redeliveries, each cut off with its worker.
    for n in 0..=u64::from(limit) {
        stop_while_in_flight(&engine, &hang, n).await;
    }
    assert_eq!(hang.calls(), 1 + u64::from(limit));
    // The next drive records redelivery limit+1 and quarantines instead of calling again.
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    assert_eq!(hang.calls(), 1 + u64::from(limit), "a quarantined task is not handed to its handler again");
    let ev = engine.events(run).unwrap();
    let redeliveries: Vec<(u32, u32, u32)> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskRedelivered { attempt, redelivery, limit, .. } => Some((*attempt, *redelivery, *limit)),
            _ => None,
        })
        .collect();
    assert_eq!(redeliveries, vec![(1, 1, limit), (1, 2, limit), (1, 3, limit)]);
    // Each redelivery was recorded before the handler ran again: one dispatch, attempt 1.
    assert_eq!(dispatches(&ev), vec![("boom".to_owned(), 1)]);
    let quarantined = ev
        .iter()
        .find_map(|e| match &e.event {
            Event::TaskFailed { class, error, source, note, .. } => {
                Some((*class, error.clone(), *source, note.clone()))
            }
            _ => None,
        })
        .expect("the task failed");
    assert_eq!(
        (quarantined.0, quarantined.1.as_str(), quarantined.2),
        (ErrorClass::Fatal, QUARANTINED, FailureSource::Engine)
    );
    assert!(quarantined.3.unwrap().contains("crashed the worker 3 times"));
    // The ordinary recovery: a critical task escalates.
    let state = engine.state(run).unwrap();
    assert_eq!(state.status, RunStatus::AwaitingHuman);
    assert_eq!(state.escalations[0].escalation.cause, EscalationCause::FatalError);
    let tail: Vec<&str> = kinds(&ev).into_iter().skip_while(|k| *k != "TaskFailed").collect();
    assert_eq!(tail, vec!["TaskFailed", "Escalated", "EscalationNotified"]);
    assert_eq!(kinds(&ev).iter().rev().nth(3), Some(&"TaskRedelivered"), "the quarantine follows the last redelivery");
    passes_check(&engine, &ev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_non_critical_task_is_skipped_and_the_run_completes_partial() {
    let dir = tempdir();
    let mut boom = task("boom", TaskKind::Tool, "hang", &[]);
    boom.timeout_ms = 3_600_000;
    boom.critical = false;
    // Only this task is in flight when the workers stop (any other would be redelivered too).
    let wf = workflow("w", planner(vec![plan(vec![boom])]), pass_evaluator());
    let hang = slow_handler(3_600_000, |_| Ok(TaskOutput { output: json!(1), usage: Usage::default() }));
    let engine = open_engine(dir.path(), wf, &[("hang", hang.clone())], |b| b.redelivery_limit(0));
    let run = engine.submit(req("w", json!({}))).await.unwrap().run;
    stop_while_in_flight(&engine, &hang, 0).await;
    engine.run_until_idle().await.unwrap();
    assert_eq!(hang.calls(), 1, "limit 0: the first redelivery quarantines");
    let state = engine.state(run).unwrap();
    let ev = engine.events(run).unwrap();
    assert_eq!(
        (state.status, state.partial),
        (RunStatus::Completed, true),
        "{:#?}",
        ev.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    assert!(ev.iter().any(
        |e| matches!(&e.event, Event::TaskSkipped { task, reason } if task.0 == "boom" && reason.contains(QUARANTINED))
    ));
    passes_check(&engine, &ev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_runs_when_its_optional_upstream_is_skipped_and_sees_that_it_was() {
    let dir = tempdir();
    // `enrich` fails fatally and is not critical: skipped. `reply` needs `classify` and
    // takes `enrich` optionally; `audit` needs `enrich` (not optional): skipped with it.
    let mut enrich = task("enrich", TaskKind::Tool, "enrich", &[]);
    enrich.critical = false;
    let reply = task("reply", TaskKind::Tool, "reply", &["classify"]).with_optional_deps(&["enrich"]);
    let audit = task("audit", TaskKind::Tool, "ok", &["enrich"]);
    let classify = task("classify", TaskKind::Tool, "ok", &[]);
    let wf = workflow("w", planner(vec![plan(vec![classify, enrich, reply, audit])]), pass_evaluator());
    let seen: Arc<Mutex<Vec<TaskInput>>> = Arc::default();
    let seen2 = seen.clone();
    let reply_h = handler(move |c| {
        seen2.lock().unwrap().push(c.input.clone());
        Ok(TaskOutput { output: json!({"sent": true}), usage: Usage::default() })
    });
    let handlers: [(&str, Arc<dyn TaskHandler>); 3] = [
        ("ok", ok_handler(Usage::default())),
        ("enrich", handler(|_| Err(HandlerError::fatal("no sentiment model for this locale")))),
        ("reply", reply_h),
    ];
    let engine = open_engine(dir.path(), wf, &handlers, |b| b);
    let (run, ev) = run_one(&engine, "w").await;
    let state = engine.state(run).unwrap();
    assert_eq!((state.status, state.partial), (RunStatus::Completed, true), "{:?}", kinds(&ev));
    let status = |id: &str| state.tasks[state.task_index[&TaskId::from(id)]].status;
    assert_eq!(status("reply"), TaskStatus::Done, "the dependent of a skipped optional upstream ran");
    assert_eq!(status("audit"), TaskStatus::Skipped, "a required upstream skipped still skips");
    // Recorded: reply's dispatch lists enrich as skipped, with classify's output upstream.
    let input = ev
        .iter()
        .find_map(|e| match &e.event {
            Event::TaskDispatched { task, input, .. } if task.0 == "reply" => Some(input.clone()),
            _ => None,
        })
        .expect("reply dispatched");
    assert_eq!(input.skipped, vec![TaskId::from("enrich")]);
    assert_eq!(input.upstream.keys().cloned().collect::<BTreeSet<_>>(), BTreeSet::from([TaskId::from("classify")]));
    assert_eq!(seen.lock().unwrap().clone(), vec![input], "the handler saw what was recorded");
    passes_check(&engine, &ev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_naming_an_optional_dependency_outside_depends_on_is_rejected() {
    let dir = tempdir();
    let mut bad = task("b", TaskKind::Tool, "ok", &[]);
    bad.optional_deps = vec![TaskId::from("a")];
    let wf = workflow("w", planner(vec![plan(vec![task("a", TaskKind::Tool, "ok", &[]), bad])]), pass_evaluator());
    let engine = open_engine(dir.path(), wf, &[("ok", ok_handler(Usage::default()))], |b| b);
    let (_, ev) = run_one(&engine, "w").await;
    let rejections = plan_rejections(&ev);
    assert!(rejections[0].iter().any(|e| e.contains("optional dependency a is not in depends_on")), "{rejections:?}");
}

/// A dispatch recorded before effect keys existed (the committed golden demo-v1, payload
/// version 1): its `idempotency_key` is the attempt key, and the fold derives the effect
/// key exactly as `decide` computes it now.
#[test]
fn a_version_1_dispatch_upcasts_to_its_attempt_key_and_the_fold_derives_its_effect_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/demo-v1.jsonl");
    let mut runs: BTreeMap<String, Vec<Logged>> = BTreeMap::new();
    let mut dispatches = 0;
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let kind = v["kind"].as_str().unwrap();
        let bytes = hex::decode(v["bincode"].as_str().unwrap()).unwrap();
        let event = keel_engine::model::upcast::decode(kind, 1, &bytes).unwrap();
        if let Event::TaskDispatched { effect_key, attempt_key, .. } = &event {
            assert_eq!(effect_key, "", "version 1 had no effect key");
            assert_eq!(attempt_key, v["fields"]["idempotency_key"].as_str().unwrap());
            dispatches += 1;
        }
        let run: RunId = v["run"].as_str().unwrap().parse().unwrap();
        let logged = Logged { run, seq: Seq(v["seq"].as_u64().unwrap()), at_us: v["at_us"].as_i64().unwrap(), event };
        runs.entry(run.to_string()).or_default().push(logged);
    }
    assert!(dispatches > 0);
    for events in runs.values() {
        let mut state: Option<RunState> = None;
        for e in events {
            state = Some(apply(state.as_ref(), e).unwrap());
            let (Event::TaskDispatched { task, .. }, Some(s)) = (&e.event, &state) else { continue };
            let t = &s.tasks[s.task_index[task]];
            assert_eq!(t.effect_key.as_deref(), Some(effect_key(e.run, task, t.planned_in).as_str()));
        }
    }
}
