//! A deterministic, single-threaded driver of the pure core with scripted answers.
//!
//! It runs `decide` → `apply` exactly as the shell does, but answers `Plan`, `Execute`,
//! `Evaluate` and `Notify` from a [`Script`] and keeps time on a fake clock. Tests use it
//! to pin the core's semantics without I/O; property tests use it as the engine-side of
//! their reference comparisons. Answers become events through [`event_of`], as in the
//! engine's driver. Offline replay does not use it: replay folds the recorded events.

use super::answer::{event_of, Answer, Failure, Judgement, Output};
use super::apply::{apply, fold};
use super::decide::decide;
use super::types::{Command, Context, TransitionError};
use crate::model::event::{Event, Logged};
use crate::model::fsm::RunStatus;
use crate::model::state::RunState;
use crate::model::workflow::*;
use keel_store::{RunId, Seq};

/// The reason recorded on a simulated human's decision.
const SIM_REASON: &str = "a simulated decision";

/// What a scripted handler call returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handler returned this output, spending this much.
    Output(serde_json::Value, Usage),
    /// The handler failed: class, message, what it spent.
    Error(ErrorClass, String, Usage),
}

/// Answers the outside world would give.
pub trait Script {
    /// The planner's answer for `revision` (an `Err` is the planner failing).
    fn plan(&mut self, state: &RunState, revision: u32) -> Result<Plan, String>;
    /// The handler's answer for the attempt.
    fn execute(&mut self, state: &RunState, task: &TaskId, attempt: u32) -> Outcome;
    /// The evaluator's verdict, notes and usage for the attempt's output.
    fn evaluate(&mut self, state: &RunState, task: &TaskId, attempt: u32) -> (Verdict, String, Usage);
    /// A human's answer to the open escalation; `None` leaves the run waiting.
    fn human(&mut self, state: &RunState) -> Option<(Decision, String)>;
}

/// Why a simulation stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The core produced an event its own tables refuse (a bug).
    #[error("the core produced an event its own tables refuse: {0}")]
    Transition(#[from] TransitionError),
    /// The run made no progress within the step bound.
    #[error("no progress after {0} steps")]
    Runaway(usize),
}

/// Drive one run from `accepted` until it is terminal, waits for a human the script will
/// not answer, or `max_events` events were recorded. Returns the whole log.
pub fn simulate(
    run: RunId,
    accepted: Event,
    ctx: &Context,
    script: &mut dyn Script,
    max_events: usize,
) -> Result<Vec<Logged>, SimError> {
    let first = Logged { run, seq: Seq(0), at_us: 1_000_000, event: accepted };
    resume(vec![first], ctx, script, max_events)
}

/// Continue a run from a recorded prefix of its log (as after a crash): fold the prefix,
/// then drive it exactly as [`simulate`] does. Returns the prefix plus what followed.
pub fn resume(
    prefix: Vec<Logged>,
    ctx: &Context,
    script: &mut dyn Script,
    max_events: usize,
) -> Result<Vec<Logged>, SimError> {
    let mut log = prefix;
    let Some(mut state) = fold(&log)? else {
        return Ok(log);
    };
    let mut now: i64 = log.last().map(|l| l.at_us).unwrap_or(1_000_000);
    // Each event is stamped 1 ms after the previous one, or at its timer if later.
    fn push(
        state: &mut RunState,
        log: &mut Vec<Logged>,
        now: &mut i64,
        at: Option<i64>,
        event: Event,
    ) -> Result<(), SimError> {
        *now = (*now).max(at.unwrap_or(*now)).saturating_add(1_000);
        let logged = Logged { run: state.run, seq: state.next_seq, at_us: *now, event };
        *state = apply(Some(state), &logged)?;
        log.push(logged);
        Ok(())
    }
    let mut steps = 0usize;
    while log.len() < max_events {
        steps += 1;
        if steps > max_events.saturating_mul(4).max(64) {
            return Err(SimError::Runaway(steps));
        }
        let cmds = decide(&state, ctx);
        // Due records first (all of them, in order), as the shell does.
        let due: Vec<&Command> = cmds
            .iter()
            .filter(|c| matches!(c, Command::Record { not_before_us, .. } if not_before_us.is_none_or(|t| t <= now)))
            .collect();
        if !due.is_empty() {
            for c in due {
                if let Command::Record { event, not_before_us } = c {
                    push(&mut state, &mut log, &mut now, *not_before_us, event.clone())?;
                }
            }
            continue;
        }
        // Then one effect (the first: a deterministic interleaving).
        if let Some(effect) = cmds.iter().find(|c| !matches!(c, Command::Record { .. })) {
            if let Some(event) = answer(&state, ctx, script, effect) {
                push(&mut state, &mut log, &mut now, None, event)?;
            }
            continue;
        }
        // Nothing due and nothing to call: a human, or the earliest timer.
        if state.status == RunStatus::AwaitingHuman {
            if let Some((decision, by)) = script.human(&state) {
                let number = state.escalations.last().map(|e| e.escalation.number).unwrap_or(0);
                push(
                    &mut state,
                    &mut log,
                    &mut now,
                    None,
                    Event::HumanResolved { number, decision, by, defaulted: false, reason: SIM_REASON.to_owned() },
                )?;
                continue;
            }
        }
        let timer = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Record { event, not_before_us: Some(t) } => Some((*t, event.clone())),
                _ => None,
            })
            .min_by_key(|(t, _)| *t);
        match timer {
            Some((t, event)) => push(&mut state, &mut log, &mut now, Some(t), event)?,
            None => break,
        }
    }
    Ok(log)
}

/// Asks `script` what the outside world answers to `effect` on `state` (`None` for a
/// `Record`, which is no call). The event that records it is [`event_of`]'s.
pub fn ask(script: &mut dyn Script, state: &RunState, effect: &Command) -> Option<Answer> {
    Some(match effect {
        Command::Plan { revision } => Answer::Plan(script.plan(state, *revision).map_err(|message| Failure {
            class: ErrorClass::Fatal,
            message,
            usage: Usage::default(),
        })),
        Command::Execute { task, attempt } => Answer::Output(match script.execute(state, task, *attempt) {
            Outcome::Output(v, usage) => Ok(Output { output: Json::new(&v), usage, cached: false }),
            Outcome::Error(class, message, usage) => Err(Failure { class, message, usage }),
        }),
        Command::Evaluate { task, attempt } => {
            let (verdict, notes, usage) = script.evaluate(state, task, *attempt);
            Answer::Evaluation(Ok(Judgement { verdict, notes, usage }))
        }
        Command::Notify { .. } => Answer::Notified,
        Command::Record { .. } => return None,
    })
}

fn answer(state: &RunState, ctx: &Context, script: &mut dyn Script, effect: &Command) -> Option<Event> {
    let answer = ask(script, state, effect)?;
    event_of(state, ctx, effect, answer)
}

/// A `RunAccepted` with defaults, for tests and examples.
pub fn accepted(workflow: &str, seed: u64, budget: Budget) -> Event {
    Event::RunAccepted {
        workflow: workflow.to_owned(),
        workflow_version: 1,
        input: Json::new(&serde_json::json!({})),
        idempotency_key: None,
        priority: 0,
        seed,
        budget,
        on_exhausted: ExhaustionPolicy::Partial,
        routes: vec![(Complexity::Extraction, "small".to_owned()), (Complexity::Reasoning, "large".to_owned())],
        evaluator_model: Some("small".to_owned()),
        max_parallel_tasks: 4,
    }
}

/// A task spec with defaults, for tests and examples.
pub fn task(id: &str, handler: &str, deps: &[&str]) -> TaskSpec {
    let mut t =
        TaskSpec::new(id, TaskKind::Tool, handler).with_deps(deps).with_input(&serde_json::json!({ "task": id }));
    t.timeout_ms = 1_000;
    t
}
