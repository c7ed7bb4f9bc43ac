//! What the outside world answered, turned into the event that records it.
//!
//! The core asks for calls (`Command::Plan`, `Execute`, `Evaluate`, `Notify`); whoever
//! performs them (the engine's driver, the simulator, the proptests' shuffled driver)
//! hands the answer to [`event_of`], the one function that says which event records it.
//! Pure: a plan is validated here (so a bad plan is recorded as rejected, never run), and
//! a failure keeps its class, message and usage as given.

use super::apply::replan_outcome;
use super::plan::validate_plan;
use super::types::{Command, Context};
use crate::model::event::{Event, FailureSource};
use crate::model::state::RunState;
use crate::model::workflow::{ErrorClass, Json, Plan, TaskId, Usage, Verdict};

/// A call out of the engine that did not answer as asked: the callee's error, a timeout,
/// a panic.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Failure {
    /// How it is recovered from (retry, replan, skip or escalate).
    pub class: ErrorClass,
    /// What went wrong, for people (recorded; never read by `decide`).
    pub message: String,
    /// What the call spent before it failed (a failed model call still costs).
    pub usage: Usage,
}

impl Failure {
    /// The callee did not answer within `after_ms` milliseconds (a late answer is
    /// discarded): transient, so the attempt may be retried.
    pub fn timed_out(after_ms: u64) -> Failure {
        Failure {
            class: ErrorClass::Transient,
            message: format!("timeout after {after_ms} ms"),
            usage: Usage::default(),
        }
    }

    /// The callee (`what`: "handler", "evaluator", "planner") panicked with `detail`:
    /// fatal, a bug that retrying will not fix.
    pub fn panicked(what: &str, detail: &str) -> Failure {
        Failure { class: ErrorClass::Fatal, message: format!("{what} panicked: {detail}"), usage: Usage::default() }
    }
}

/// A handler's output, as the engine records it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Output {
    /// The output as canonical JSON text.
    pub output: Json,
    /// What the call spent.
    pub usage: Usage,
    /// Served by the response cache (no handler call, no usage).
    pub cached: bool,
}

/// An evaluator's judgement of a task's output.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Judgement {
    /// Accept (pass, soft) or reject (hard, critical).
    pub verdict: Verdict,
    /// Why, for a person deciding.
    pub notes: String,
    /// What the evaluation spent (every try of it).
    pub usage: Usage,
}

/// What came back from one call the core asked for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Answer {
    /// The planner's answer to `Command::Plan`.
    Plan(Result<Plan, Failure>),
    /// The handler's answer to `Command::Execute`.
    Output(Result<Output, Failure>),
    /// The evaluator's answer to `Command::Evaluate`.
    Evaluation(Result<Judgement, Failure>),
    /// The escalation sink took `Command::Notify`'s escalation.
    Notified,
    /// The sink could not be told: nothing is recorded (the escalation is notified again
    /// on the run's next drive: at least once).
    NotNotified,
    /// The engine failed an `Execute` itself: no handler is registered for the task, or
    /// the output is over the engine's size limit.
    EngineFailure(Failure),
}

/// The event that records `answer` to `effect`, asked on `state`; `None` if there is
/// nothing to record (the sink could not be told, or the answer is not one to `effect`:
/// a bug of the caller).
pub fn event_of(state: &RunState, ctx: &Context, effect: &Command, answer: Answer) -> Option<Event> {
    match (effect, answer) {
        (Command::Plan { revision }, Answer::Plan(plan)) => Some(planned(state, ctx, *revision, plan)),
        (Command::Execute { task, attempt }, Answer::Output(Ok(out))) => Some(Event::TaskExecuted {
            task: task.clone(),
            attempt: *attempt,
            output: out.output,
            usage: out.usage,
            cached: out.cached,
        }),
        (Command::Execute { task, attempt }, Answer::Output(Err(f))) => {
            Some(failed(task, *attempt, f, FailureSource::Handler))
        }
        (Command::Execute { task, attempt }, Answer::EngineFailure(f)) => {
            Some(failed(task, *attempt, f, FailureSource::Engine))
        }
        (Command::Evaluate { task, attempt }, Answer::Evaluation(Ok(j))) => Some(Event::TaskEvaluated {
            task: task.clone(),
            attempt: *attempt,
            verdict: j.verdict,
            notes: j.notes,
            model: state.evaluator_model.clone(),
            usage: j.usage,
        }),
        (Command::Evaluate { task, attempt }, Answer::Evaluation(Err(f))) => {
            Some(failed(task, *attempt, f, FailureSource::Evaluator))
        }
        (Command::Notify { number }, Answer::Notified) => Some(Event::EscalationNotified { number: *number }),
        _ => None,
    }
}

fn failed(task: &TaskId, attempt: u32, f: Failure, source: FailureSource) -> Event {
    Event::TaskFailed {
        task: task.clone(),
        attempt,
        class: f.class,
        error: f.message,
        usage: f.usage,
        source,
        note: None,
    }
}

/// The planner's answer: a valid first plan is `Planned`, a valid replacement
/// `Replanned` (carrying exactly [`replan_outcome`]), anything else `PlanRejected`.
fn planned(state: &RunState, ctx: &Context, revision: u32, answer: Result<Plan, Failure>) -> Event {
    let plan = match answer {
        Ok(plan) => plan,
        Err(f) => return Event::PlanRejected { revision, errors: vec![format!("planner: {}", f.message)], plan: None },
    };
    let errors = validate_plan(&plan, state, ctx);
    if !errors.is_empty() {
        return Event::PlanRejected { revision, errors, plan: Some(plan) };
    }
    if state.revision.is_none() {
        return Event::Planned { revision, plan };
    }
    let (carried_over, superseded) = replan_outcome(state, &plan);
    Event::Replanned { revision, plan, carried_over, superseded }
}
