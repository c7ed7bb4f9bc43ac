//! The pure core's semantics, pinned as specs: given a plan and scripted answers, the
//! recorded events are exactly the recovery hierarchy of docs/ARCHITECTURE.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_engine::sim::{accepted, simulate, task, Outcome, Script};
use keel_engine::*;
use std::collections::{BTreeMap, BTreeSet};

type ExecFn = Box<dyn FnMut(&TaskId, u32) -> Outcome>;
type EvalFn = Box<dyn FnMut(&TaskId, u32) -> Verdict>;

struct Scripted {
    plans: Vec<Plan>,
    exec: ExecFn,
    eval: EvalFn,
    human: Vec<Decision>,
    calls: BTreeMap<String, u32>,
}

impl Scripted {
    fn new(plans: Vec<Plan>) -> Self {
        Scripted {
            plans,
            exec: Box::new(|t, _| {
                Outcome::Output(serde_json::json!({ "from": t.0 }), Usage { cost_micros: 10, tokens: 5 })
            }),
            eval: Box::new(|_, _| Verdict::Pass),
            human: Vec::new(),
            calls: BTreeMap::new(),
        }
    }
}

impl Script for Scripted {
    fn plan(&mut self, _s: &RunState, revision: u32) -> Result<Plan, String> {
        let i = (revision as usize).min(self.plans.len() - 1);
        Ok(self.plans[i].clone())
    }
    fn execute(&mut self, _s: &RunState, t: &TaskId, attempt: u32) -> Outcome {
        *self.calls.entry(t.0.clone()).or_default() += 1;
        (self.exec)(t, attempt)
    }
    fn evaluate(&mut self, _s: &RunState, t: &TaskId, attempt: u32) -> (Verdict, String, Usage) {
        ((self.eval)(t, attempt), "scripted".into(), Usage::default())
    }
    fn human(&mut self, _s: &RunState) -> Option<(Decision, String)> {
        if self.human.is_empty() {
            None
        } else {
            Some((self.human.remove(0), "alice".into()))
        }
    }
}

fn ctx(handlers: &[&str]) -> Context {
    Context { policy: Policy::default(), handlers: handlers.iter().map(|h| h.to_string()).collect::<BTreeSet<_>>() }
}

fn plan(tasks: Vec<TaskSpec>) -> Plan {
    Plan { tasks, rationale: "test".into() }
}

fn kinds(log: &[Logged]) -> Vec<&'static str> {
    log.iter().map(|l| l.event.kind_name()).collect()
}

fn run(budget: Budget, script: &mut Scripted, handlers: &[&str]) -> (Vec<Logged>, RunState) {
    let log = simulate(RunId(uuid::Uuid::nil()), accepted("wf", 7, budget), &ctx(handlers), script, 500).unwrap();
    let state = fold(&log).unwrap().unwrap();
    (log, state)
}

#[test]
fn happy_path_dispatches_in_dependency_order_and_completes() {
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[]), task("b", "h", &["a"])])]);
    let (log, st) = run(Budget::default(), &mut s, &["h"]);
    assert_eq!(
        kinds(&log),
        [
            "RunAccepted",
            "PlanRequested",
            "Planned",
            "TaskDispatched",
            "TaskExecuted",
            "TaskEvaluated",
            "TaskDispatched",
            "TaskExecuted",
            "TaskEvaluated",
            "RunCompleted"
        ]
    );
    assert_eq!(st.status, RunStatus::Completed);
    assert!(!st.partial);
    // b saw a's output.
    let Event::TaskDispatched { input, .. } = &log[6].event else { panic!() };
    assert!(input.upstream.contains_key(&TaskId::from("a")));
}

#[test]
fn transient_errors_retry_with_growing_backoff_then_succeed() {
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[])])]);
    s.exec = Box::new(|_, attempt| {
        if attempt < 3 {
            Outcome::Error(ErrorClass::Transient, "rate limited".into(), Usage::default())
        } else {
            Outcome::Output(serde_json::json!(1), Usage::default())
        }
    });
    let (log, st) = run(Budget::default(), &mut s, &["h"]);
    assert_eq!(st.status, RunStatus::Completed);
    let delays: Vec<u64> = log
        .iter()
        .filter_map(|l| match &l.event {
            Event::RetryScheduled { delay_ms, .. } => Some(*delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 2);
    // base 100ms doubling, jitter 0..=50ms
    assert!((100..=150).contains(&delays[0]) && (200..=250).contains(&delays[1]), "{delays:?}");
    // The retry is dispatched no earlier than its delay.
    let retry_at = log.iter().find(|l| matches!(l.event, Event::RetryScheduled { .. })).unwrap().at_us;
    let next = log.iter().filter(|l| matches!(l.event, Event::TaskDispatched { .. })).nth(1).unwrap().at_us;
    assert!(next >= retry_at + delays[0] as i64 * 1000);
}

#[test]
fn exhausted_retries_replan_then_exhausted_replans_escalate_then_resolve_completes() {
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[])])]);
    s.exec = Box::new(|_, _| Outcome::Error(ErrorClass::Transient, "down".into(), Usage::default()));
    s.human = vec![Decision::SupplyOutput(Json::new(&serde_json::json!("by hand")))];
    let (log, st) = run(Budget::default(), &mut s, &["h"]);
    let k = kinds(&log);
    assert_eq!(k.iter().filter(|k| **k == "ReplanRequested").count(), 2, "{k:?}");
    assert_eq!(k.iter().filter(|k| **k == "Replanned").count(), 2);
    assert!(k.contains(&"Escalated") && k.contains(&"EscalationNotified") && k.contains(&"HumanResolved"));
    assert_eq!(st.status, RunStatus::Completed);
    // 3 plan revisions x 3 attempts each, no more.
    assert_eq!(s.calls["a"], 9);
    let Event::Escalated(e) = &log.iter().find(|l| l.event.kind_name() == "Escalated").unwrap().event else { panic!() };
    assert_eq!(e.cause, EscalationCause::ReplansExhausted);
    assert_eq!(e.alternatives_tried.len(), 2);
}

#[test]
fn failed_noncritical_task_is_skipped_with_its_dependents_and_the_result_is_partial() {
    let mut opt = task("opt", "h", &[]);
    opt.critical = false;
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[]), opt, task("after", "h", &["opt"])])]);
    s.exec = Box::new(|t, _| {
        if t.0 == "opt" {
            Outcome::Error(ErrorClass::Fatal, "forbidden".into(), Usage::default())
        } else {
            Outcome::Output(serde_json::json!(1), Usage::default())
        }
    });
    let (log, st) = run(Budget::default(), &mut s, &["h"]);
    assert_eq!(st.status, RunStatus::Completed);
    assert!(st.partial);
    assert_eq!(kinds(&log).iter().filter(|k| **k == "TaskSkipped").count(), 2);
    assert!(!s.calls.contains_key("after"));
}

#[test]
fn schema_gate_blocks_a_bad_output_from_downstream_tasks() {
    let mut a = task("a", "h", &[]);
    a.output_schema = Some(Json::new(&serde_json::json!({"type": "object", "required": ["answer"]})));
    let p = plan(vec![a, task("b", "h", &["a"])]);
    let mut s = Scripted::new(vec![p]);
    s.exec = Box::new(|t, attempt| {
        if t.0 == "a" && attempt == 1 {
            Outcome::Output(serde_json::json!({"garbage": true}), Usage::default())
        } else {
            Outcome::Output(serde_json::json!({"answer": 42}), Usage::default())
        }
    });
    let (log, _) = run(Budget::default(), &mut s, &["h"]);
    let failed =
        log.iter().find(|l| matches!(&l.event, Event::TaskFailed { class: ErrorClass::Semantic, .. })).unwrap();
    assert!(matches!(&failed.event, Event::TaskFailed { error, .. } if error.contains("schema")));
    for l in &log {
        if let Event::TaskDispatched { task, input, .. } = &l.event {
            if task.0 == "b" {
                assert!(!input.upstream[&TaskId::from("a")].0.contains("garbage"));
            }
        }
    }
}

#[test]
fn cyclic_and_over_budget_plans_are_rejected_never_dispatched() {
    let cyclic = plan(vec![task("a", "h", &["b"]), task("b", "h", &["a"])]);
    let mut pricey = task("a", "h", &[]);
    pricey.cost_estimate_micros = 1_000_000;
    let mut s = Scripted::new(vec![cyclic, plan(vec![pricey])]);
    let (log, st) = run(Budget { cost_micros: Some(1_000), ..Budget::default() }, &mut s, &["h"]);
    let rejected: Vec<&Vec<String>> = log
        .iter()
        .filter_map(|l| match &l.event {
            Event::PlanRejected { errors, .. } => Some(errors),
            _ => None,
        })
        .collect();
    assert!(rejected[0].iter().any(|e| e.contains("cycle")), "{rejected:?}");
    assert!(rejected[1].iter().any(|e| e.contains("cost")), "{rejected:?}");
    assert!(!kinds(&log).contains(&"TaskDispatched"));
    assert_eq!(st.status, RunStatus::AwaitingHuman);
}

#[test]
fn critical_verdict_escalates_and_approval_accepts_the_output() {
    let mut a = task("a", "h", &[]);
    a.success_criteria = Some("refund within policy".into());
    let mut s = Scripted::new(vec![plan(vec![a])]);
    s.eval = Box::new(|_, _| Verdict::Critical);
    s.human = vec![Decision::Approve];
    let (log, st) = run(Budget::default(), &mut s, &["h"]);
    assert_eq!(st.status, RunStatus::Completed);
    assert!(!st.partial);
    assert!(kinds(&log).contains(&"HumanResolved"));
}

#[test]
fn budget_stops_dispatch_and_finishes_partial() {
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut t = task(&format!("t{i}"), "h", &[]);
        t.cost_estimate_micros = 100;
        tasks.push(t);
    }
    // The plan (500) exceeds the budget (250) so it is rejected; use a plan of 2 then more.
    let mut s = Scripted::new(vec![plan(tasks[..2].to_vec())]);
    s.exec = Box::new(|_, _| Outcome::Output(serde_json::json!(1), Usage { cost_micros: 100, tokens: 0 }));
    let b = Budget { cost_micros: Some(250), llm_calls: None, ..Budget::default() };
    let (_log, st) = run(b, &mut s, &["h"]);
    assert_eq!(st.status, RunStatus::Completed);
    assert!(st.totals.cost_micros <= 250);

    // Tool-call budget: 3 tasks, 2 calls allowed.
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[]), task("b", "h", &[]), task("c", "h", &[])])]);
    let b = Budget { tool_calls: Some(2), ..Budget::default() };
    let (log, st) = run(b, &mut s, &["h"]);
    let ex = log.iter().find_map(|l| match &l.event {
        Event::BudgetExhausted { budget, limit, used, needed } => Some((*budget, *limit, *used, *needed)),
        _ => None,
    });
    assert_eq!(ex, Some((BudgetKind::ToolCalls, 2, 2, 1)));
    assert_eq!(s.calls.values().sum::<u32>(), 2);
    assert!(st.partial);
}

#[test]
fn retry_budget_bounds_handler_calls() {
    // Calls of an always-failing handler are bounded by 1 + retries + replans: each plan
    // revision makes one first attempt, every further attempt draws on the retry budget.
    for (retries, replans) in [(4u64, 0u64), (4, 2), (0, 0), (10, 1)] {
        let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[])])]);
        s.exec = Box::new(|_, _| Outcome::Error(ErrorClass::Transient, "flaky".into(), Usage::default()));
        let b = Budget { retries: Some(retries), replans: Some(replans), ..Budget::default() };
        let (log, st) = run(b, &mut s, &["h"]);
        let calls = u64::from(s.calls["a"]);
        assert!(calls <= 1 + retries + replans, "retries {retries} replans {replans}: {calls} calls");
        assert!(st.totals.retries <= retries);
        assert!(st.totals.replans <= replans);
        assert!(kinds(&log).contains(&"Escalated") || kinds(&log).contains(&"BudgetExhausted"));
    }
}

#[test]
fn folding_a_log_twice_gives_equal_states() {
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[]), task("b", "h", &["a"])])]);
    let (log, _) = run(Budget::default(), &mut s, &["h"]);
    assert_eq!(fold(&log).unwrap(), fold(&log).unwrap());
}

#[test]
fn illegal_events_are_refused_and_leave_state_unchanged() {
    let mut s = Scripted::new(vec![plan(vec![task("a", "h", &[])])]);
    let (log, st) = run(Budget::default(), &mut s, &["h"]);
    let bogus = Logged {
        run: st.run,
        seq: st.next_seq,
        at_us: 0,
        event: Event::TaskExecuted {
            task: "a".into(),
            attempt: 1,
            output: Json::null(),
            usage: Usage::default(),
            cached: false,
        },
    };
    let mut copy = st.clone();
    assert!(matches!(apply_mut(&mut copy, &bogus), Err(TransitionError::IllegalRun { .. })));
    assert_eq!(copy, st);
    assert_eq!(log.len() as u64, st.next_seq.0);
}

// The same core, as given / when / then specs (`keel_engine::testing`): the late answer
// of a call a cancellation overtook is refused, so the executor drops it.
#[test]
fn a_late_answer_after_a_cancellation_is_refused() {
    use keel_engine::testing::given;
    let a = task("a", "h", &[]);
    let dispatched = given([
        accepted("wf", 7, Budget::default()),
        Event::PlanRequested { revision: 0, reason: PlanReason::Initial },
        Event::Planned { revision: 0, plan: plan(vec![a.clone()]) },
    ])
    .with_context(ctx(&["h"]))
    .when_decided()
    .records()
    .into_iter()
    .cloned()
    .collect::<Vec<_>>();
    assert!(matches!(dispatched.as_slice(), [Event::TaskDispatched { attempt: 1, .. }]));
    let mut history = vec![
        accepted("wf", 7, Budget::default()),
        Event::PlanRequested { revision: 0, reason: PlanReason::Initial },
        Event::Planned { revision: 0, plan: plan(vec![a]) },
    ];
    history.extend(dispatched);
    history.push(Event::RunCancelled { by: "bob".into(), reason: "no longer needed".into() });
    keel_engine::testing::given(history.clone()).when_decided().then_nothing();
    keel_engine::testing::given(history)
        .when_applied(Event::TaskExecuted {
            task: TaskId::from("a"),
            attempt: 1,
            output: Json::new(&serde_json::json!({})),
            usage: Usage::default(),
            cached: false,
        })
        .then_refused(|e| matches!(e, TransitionError::IllegalRun { kind: "TaskExecuted", .. }));
}
