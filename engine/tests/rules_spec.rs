//! The core's rules as given / when / then specs (`keel_engine::testing`): given a
//! recorded history, what `decide` records next, and what `apply` makes of one more event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_engine::sim::{accepted, task};
use keel_engine::testing::{given, SPEC_RUN};
use keel_engine::*;
use serde_json::json;
use std::collections::BTreeMap;

fn ctx() -> Context {
    Context { policy: Policy::default(), handlers: ["h".to_owned()].into_iter().collect() }
}

fn start() -> Event {
    accepted("wf", 7, Budget::default())
}

fn plan_requested() -> Event {
    Event::PlanRequested { revision: 0, reason: PlanReason::Initial }
}

fn planned(tasks: Vec<TaskSpec>) -> Event {
    Event::Planned { revision: 0, plan: Plan { tasks, rationale: "spec".into() } }
}

fn dispatched(spec: &TaskSpec, attempt: u32) -> Event {
    Event::TaskDispatched {
        task: spec.id.clone(),
        attempt,
        effect_key: effect_key(SPEC_RUN, &spec.id, 0),
        attempt_key: attempt_key(SPEC_RUN, 0, &spec.id, attempt),
        model: None,
        input: TaskInput { input: spec.input.clone(), upstream: BTreeMap::new(), note: None, skipped: Vec::new() },
        reserved: Usage { cost_micros: spec.cost_estimate_micros, tokens: spec.token_estimate },
    }
}

fn executed(id: &str, attempt: u32, output: serde_json::Value) -> Event {
    Event::TaskExecuted {
        task: TaskId::from(id),
        attempt,
        output: Json::new(&output),
        usage: Usage::default(),
        cached: false,
    }
}

fn failed(id: &str, attempt: u32, class: ErrorClass, source: FailureSource) -> Event {
    Event::TaskFailed {
        task: TaskId::from(id),
        attempt,
        class,
        error: "boom".into(),
        usage: Usage::default(),
        source,
        note: None,
    }
}

#[test]
fn an_accepted_run_asks_for_its_first_plan() {
    given([start()]).when_decided().then_records([plan_requested()]).then_asks([]);
}

#[test]
fn a_planning_run_asks_the_planner_for_the_revision_it_requested() {
    given([start(), plan_requested()]).with_context(ctx()).when_decided().then_asks([Command::Plan { revision: 0 }]);
}

#[test]
fn a_new_plan_dispatches_the_tasks_without_dependencies_first() {
    let a = task("a", "h", &[]);
    let b = task("b", "h", &["a"]);
    given([start(), plan_requested(), planned(vec![a.clone(), b])])
        .with_context(ctx())
        .when_decided()
        .then_records([dispatched(&a, 1)]);
}

#[test]
fn a_dispatched_task_is_executed_again_after_a_restart_with_the_same_attempt() {
    let a = task("a", "h", &[]);
    given([start(), plan_requested(), planned(vec![a.clone()]), dispatched(&a, 1)])
        .with_context(ctx())
        .when_decided()
        .then_records([])
        .then_asks([Command::Execute { task: TaskId::from("a"), attempt: 1 }]);
}

#[test]
fn the_schema_gate_refuses_an_output_by_a_stable_code_and_keeps_the_validators_text_as_a_note() {
    let mut a = task("a", "h", &[]);
    a.output_schema = Some(Json::new(&json!({"type": "object", "required": ["reply"]})));
    given([start(), plan_requested(), planned(vec![a.clone()]), dispatched(&a, 1), executed("a", 1, json!({}))])
        .with_context(ctx())
        .when_decided()
        .then_records_one("the gate's refusal", |e| {
            matches!(e, Event::TaskFailed {
                class: ErrorClass::Semantic, source: FailureSource::Gate, error, note: Some(note), attempt: 1, ..
            } if error == "schema_mismatch" && note.contains("reply"))
        });
}

#[test]
fn an_output_that_passes_its_schema_and_has_no_criteria_is_accepted_by_the_core() {
    let mut a = task("a", "h", &[]);
    a.output_schema = Some(Json::new(&json!({"type": "object", "required": ["reply"]})));
    given([
        start(),
        plan_requested(),
        planned(vec![a.clone()]),
        dispatched(&a, 1),
        executed("a", 1, json!({"reply": "hi"})),
    ])
    .with_context(ctx())
    .when_decided()
    .then_records([Event::TaskEvaluated {
        task: TaskId::from("a"),
        attempt: 1,
        verdict: Verdict::Pass,
        notes: "no success criteria: accepted".into(),
        model: None,
        usage: Usage::default(),
    }]);
}

#[test]
fn a_transient_failure_schedules_the_next_attempt() {
    let a = task("a", "h", &[]);
    given([
        start(),
        plan_requested(),
        planned(vec![a.clone()]),
        dispatched(&a, 1),
        failed("a", 1, ErrorClass::Transient, FailureSource::Handler),
    ])
    .with_context(ctx())
    .when_decided()
    .then_records_one("a retry of attempt 2", |e| matches!(e, Event::RetryScheduled { next_attempt: 2, .. }));
}

#[test]
fn a_fatal_failure_of_a_critical_task_escalates() {
    let a = task("a", "h", &[]);
    given([
        start(),
        plan_requested(),
        planned(vec![a.clone()]),
        dispatched(&a, 1),
        failed("a", 1, ErrorClass::Fatal, FailureSource::Handler),
    ])
    .with_context(ctx())
    .when_decided()
    .then_records_one("an escalation for a fatal error", |e| {
        matches!(e, Event::Escalated(x) if x.cause == EscalationCause::FatalError && x.task == Some(TaskId::from("a")))
    });
}

#[test]
fn an_evaluator_failure_is_an_answer_that_fails_the_attempt() {
    let mut a = task("a", "h", &[]);
    a.success_criteria = Some("polite".into());
    given([start(), plan_requested(), planned(vec![a.clone()]), dispatched(&a, 1), executed("a", 1, json!({}))])
        .when_applied(failed("a", 1, ErrorClass::Transient, FailureSource::Evaluator))
        .then_task("a", TaskStatus::AttemptFailed)
        .then_state(|s| assert_eq!(s.tasks[0].last_error, Some((ErrorClass::Transient, "boom".to_owned()))));
}

#[test]
fn a_plan_before_it_was_asked_for_is_refused_and_changes_nothing() {
    given([start()])
        .when_applied(planned(vec![task("a", "h", &[])]))
        .then_refused(|e| matches!(e, TransitionError::IllegalRun { kind: "Planned", .. }));
}

#[test]
fn an_execution_of_an_attempt_that_was_not_dispatched_is_refused() {
    let a = task("a", "h", &[]);
    given([start(), plan_requested(), planned(vec![a.clone()]), dispatched(&a, 1)])
        .when_applied(executed("a", 2, json!({})))
        .then_refused(|e| matches!(e, TransitionError::Invalid { kind: "TaskExecuted", .. }));
}

#[test]
fn approving_a_human_review_task_gives_it_the_output_approved_true() {
    let review = TaskSpec::new("review", TaskKind::HumanReview, "person");
    let escalation = Escalation {
        number: 1,
        cause: EscalationCause::HumanReviewTask,
        task: Some(TaskId::from("review")),
        attempted: Vec::new(),
        why: "task review is a human review".into(),
        alternatives_tried: Vec::new(),
        question: "?".into(),
        options: vec!["approve".into()],
        deadline_ms: None,
        default_decision: None,
    };
    given([start(), plan_requested(), planned(vec![review]), Event::Escalated(escalation)])
        .when_applied(Event::HumanResolved {
            number: 1,
            decision: Decision::Approve,
            by: "alice".into(),
            defaulted: false,
            reason: "looks right".into(),
        })
        .then_status(RunStatus::Running)
        .then_task("review", TaskStatus::Done)
        .then_state(|s| {
            assert_eq!(s.tasks[0].output, Some(Json::new(&json!({"approved": true}))));
            assert_eq!(s.tasks[0].verdict, Some(Verdict::Pass));
        });
}

fn redelivered(id: &str, redelivery: u32, limit: u32) -> Event {
    Event::TaskRedelivered { task: TaskId::from(id), attempt: 1, redelivery, limit }
}

#[test]
fn a_redelivered_dispatch_within_its_limit_is_executed_again() {
    let a = task("a", "h", &[]);
    given([start(), plan_requested(), planned(vec![a.clone()]), dispatched(&a, 1), redelivered("a", 1, 1)])
        .with_context(ctx())
        .when_decided()
        .then_records([])
        .then_asks([Command::Execute { task: TaskId::from("a"), attempt: 1 }]);
}

#[test]
fn a_dispatch_redelivered_past_its_limit_is_quarantined_not_executed() {
    let a = task("a", "h", &[]);
    given([
        start(),
        plan_requested(),
        planned(vec![a.clone()]),
        dispatched(&a, 1),
        redelivered("a", 1, 1),
        redelivered("a", 2, 1),
    ])
    .with_context(ctx())
    .when_decided()
    .then_records([Event::TaskFailed {
        task: TaskId::from("a"),
        attempt: 1,
        class: ErrorClass::Fatal,
        error: QUARANTINED.into(),
        usage: Usage::default(),
        source: FailureSource::Engine,
        note: Some(
            "attempt 1 crashed the worker 2 times (dispatched, then redelivered 1 times with no result; limit 1)"
                .into(),
        ),
    }])
    .then_asks([]);
}

#[test]
fn a_redelivery_out_of_order_or_of_another_attempt_is_refused() {
    let a = task("a", "h", &[]);
    let history = [start(), plan_requested(), planned(vec![a.clone()]), dispatched(&a, 1)];
    let invalid = |e: &TransitionError| matches!(e, TransitionError::Invalid { .. });
    given(history.clone()).when_applied(redelivered("a", 2, 3)).then_refused(invalid);
    given(history)
        .when_applied(Event::TaskRedelivered { task: TaskId::from("a"), attempt: 2, redelivery: 1, limit: 3 })
        .then_refused(invalid);
    // A task that is not in flight cannot be redelivered.
    let b = task("b", "h", &[]);
    given([start(), plan_requested(), planned(vec![b])])
        .when_applied(Event::TaskRedelivered { task: TaskId::from("b"), attempt: 0, redelivery: 1, limit: 3 })
        .then_refused(|e| matches!(e, TransitionError::IllegalTask { .. }));
}
