//! The determinism check: does the current code still decide what the log says it did?
//!
//! For every recorded event `i >= 1`, fold `events[..i]` into `s` and ask
//! `decide(&s, &ctx)` what to do. Each event is one of:
//!
//! - a **decision** of the core (PlanRequested, ReplanRequested, TaskDispatched,
//!   RetryScheduled, TaskSkipped, BudgetExhausted, Escalated, RunCompleted, RunFailed, a
//!   deadline's default HumanResolved, the schema gate's TaskFailed, an auto-pass
//!   TaskEvaluated): it must EQUAL one of the `Command::Record` events of that `decide`
//!   call (a set: the shell appends one call's records as a batch, timers when due);
//! - an **outcome** of a call the core asked for: Planned/Replanned/PlanRejected need
//!   `Plan{revision}` (and a recorded plan must still pass `validate_plan`, a Replanned
//!   must carry exactly `replan_outcome`), TaskExecuted/TaskFailed of a dispatched task
//!   need `Execute{task, attempt}`, an evaluator's TaskEvaluated (or its failure) needs
//!   `Evaluate{task, attempt}`, EscalationNotified needs `Notify{number}`, a
//!   TaskRedelivered (what a driver observed after a restart) needs `Execute{task,
//!   attempt}` (a quarantine's TaskFailed after it is a decision), a RunSizeWarning (what
//!   a driver observed of the log's size) must name the count of events before it (its
//!   bytes are not compared: they follow the encoding of the code that recorded it);
//! - **external** (RunAccepted, a human's HumanResolved, RunCancelled, the `RunFailed` the
//!   shell records when the store refused one of the core's records as too large):
//!   allowed whenever the state machine accepts it.
//!
//! The first event that does not fit is the [`Divergence`].

use crate::error::ReplayError;
use crate::format::{command_json, command_line, event_json, event_line};
use keel_engine::{
    apply, apply_mut, decide, replan_outcome, replan_outcome_same_spec, validate_plan, Command, Context, Event,
    FailureSource, Logged, PlanReason, Policy, RunState, QUARANTINED,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;

/// What `decide` runs with during a check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// The code-level policy to check against (default: `Policy::default()`, what the
    /// engine runs with unless configured otherwise).
    pub policy: Policy,
    /// Registered handler names (plan validation). `None`: the handlers named in the run's
    /// own accepted plans, so a handler the checking binary does not know is no false
    /// divergence.
    pub handlers: Option<BTreeSet<String>>,
}

/// How an event relates to `decide`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventClass {
    /// Decided by the core itself.
    Decision,
    /// The answer of a call the core asked for.
    Outcome,
    /// Came from outside (a request, a human, a cancellation).
    External,
}

/// The first recorded event the current code would not have produced.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Divergence {
    /// The run (id).
    pub run: String,
    /// Seq of the recorded event that diverges.
    pub seq: u64,
    /// Whether the core decided it, answered a call, or it came from outside.
    pub class: EventClass,
    /// Kind of the recorded event.
    pub kind: String,
    /// The recorded event: `{"kind", "payload"}`.
    pub recorded: Value,
    /// What the current code decides at that point (the commands of `decide`).
    pub decided: Vec<Value>,
    /// One line per decided command, for humans.
    #[serde(skip)]
    pub decided_lines: Vec<String>,
    /// Why they do not match.
    pub reason: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "run {} diverges at seq {} ({} {}): {}",
            self.run,
            self.seq,
            self.class_name(),
            self.kind,
            self.reason
        )?;
        writeln!(f, "  recorded: {}", self.recorded)?;
        if self.decided_lines.is_empty() {
            writeln!(f, "  decided:  (nothing)")?;
        }
        for (i, l) in self.decided_lines.iter().enumerate() {
            writeln!(f, "  {} {l}", if i == 0 { "decided: " } else { "          " })?;
        }
        Ok(())
    }
}

impl Divergence {
    fn class_name(&self) -> &'static str {
        match self.class {
            EventClass::Decision => "decision",
            EventClass::Outcome => "outcome",
            EventClass::External => "external event",
        }
    }
}

/// What a check of one run found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckReport {
    /// The run checked (id).
    pub run: String,
    /// Its workflow type.
    pub workflow: String,
    /// Events in its history.
    pub events: u64,
    /// Events `decide` produced (each compared).
    pub decisions: u64,
    /// Answers to calls the core asked for (each checked to answer a call it asked for).
    pub outcomes: u64,
    /// Events that came from outside (a request, a human, a cancellation).
    pub externals: u64,
    /// `None`: the run replays exactly under the current code.
    pub divergence: Option<Divergence>,
}

impl CheckReport {
    /// Whether the run replays exactly under the current code.
    pub fn ok(&self) -> bool {
        self.divergence.is_none()
    }
}

/// Handler names of a run's accepted plans.
pub fn plan_handlers(events: &[Logged]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in events {
        if let Event::Planned { plan, .. } | Event::Replanned { plan, .. } = &e.event {
            out.extend(plan.tasks.iter().map(|t| t.handler.clone()));
        }
    }
    out
}

/// Classifies `event` given the state before it.
pub fn classify(state: &RunState, event: &Event) -> EventClass {
    match event {
        Event::RunAccepted { .. } | Event::RunCancelled { .. } => EventClass::External,
        // The shell failed the run because the store refused one of the core's records as
        // too large (engine shell/oversize.rs): a fact of the shell, not a decision.
        Event::RunFailed { reason } if reason.starts_with(keel_engine::RECORD_TOO_LARGE) => EventClass::External,
        Event::HumanResolved { defaulted, .. } => {
            if *defaulted {
                EventClass::Decision
            } else {
                EventClass::External
            }
        }
        Event::Planned { .. } | Event::Replanned { .. } | Event::PlanRejected { .. } | Event::TaskExecuted { .. } => {
            EventClass::Outcome
        }
        Event::EscalationNotified { .. } => EventClass::Outcome,
        // What a driver observed: a dispatch without a result that it did not make.
        Event::TaskRedelivered { .. } => EventClass::Outcome,
        // What a driver observed of the log's size.
        Event::RunSizeWarning { .. } => EventClass::Outcome,
        // The schema gate's refusal and a quarantine are decisions; every other failure
        // answers a call.
        Event::TaskFailed { source, error, .. } => {
            if *source == FailureSource::Gate || (*source == FailureSource::Engine && error == QUARANTINED) {
                EventClass::Decision
            } else {
                EventClass::Outcome
            }
        }
        Event::TaskEvaluated { task, .. } => {
            let criteria =
                state.task_index.get(task).and_then(|&i| state.tasks.get(i)).map(|t| t.spec.success_criteria.is_some());
            if criteria == Some(true) {
                EventClass::Outcome
            } else {
                EventClass::Decision
            }
        }
        _ => EventClass::Decision,
    }
}

/// Checks one run's history against the current code.
pub fn check_run(events: &[Logged], opts: &CheckOptions) -> Result<CheckReport, ReplayError> {
    let Some(first) = events.first() else {
        return Err(ReplayError::Invalid("a run with no events cannot be checked".to_owned()));
    };
    let ctx = Context {
        policy: opts.policy.clone(),
        handlers: opts.handlers.clone().unwrap_or_else(|| plan_handlers(events)),
    };
    let mut report = CheckReport {
        run: first.run.to_string(),
        workflow: String::new(),
        events: events.len() as u64,
        decisions: 0,
        outcomes: 0,
        externals: 1,
        divergence: None,
    };
    let mut state = match apply(None, first) {
        Ok(s) => s,
        Err(e) => {
            report.divergence =
                Some(divergence(first, EventClass::External, &[], format!("the state machine refuses it: {e}")));
            return Ok(report);
        }
    };
    report.workflow = state.workflow.clone();
    // The decisions of one `decide` call are appended as one batch, in order: a decision
    // recorded mid-batch was made on the state at the batch's start (a cascade of skips
    // names the upstream task skipped before the batch, not one skipped earlier in it).
    // So the records `decide` returned at the start of a batch are consumed one by one as
    // the batch's events arrive; a decision that is not among them is checked against
    // what `decide` says on the state just before it (a new batch).
    let mut batch: Vec<Event> = Vec::new();
    for e in events.iter().skip(1) {
        let mut cmds = decide(&state, &ctx);
        let class = classify(&state, &e.event);
        // Compared as decided now; folded and reported as recorded.
        let bounded = bounded_history(&state, &e.event);
        let event = bounded.as_ref().unwrap_or(&e.event);
        match class {
            EventClass::Decision => report.decisions += 1,
            EventClass::Outcome => report.outcomes += 1,
            EventClass::External => report.externals += 1,
        }
        if class == EventClass::Decision {
            if let Some(i) = batch.iter().position(|d| event.same_decision(d)) {
                batch.remove(i);
                cmds.push(Command::Record { event: event.clone(), not_before_us: None });
            } else {
                batch = records(&cmds).cloned().collect();
                if let Some(i) = batch.iter().position(|d| event.same_decision(d)) {
                    batch.remove(i);
                }
            }
        } else {
            batch.clear();
        }
        if let Err(reason) = fits(&state, &ctx, &cmds, class, event) {
            report.divergence = Some(divergence(e, class, &cmds, reason));
            return Ok(report);
        }
        // In place: a refused event leaves the state unchanged (no copy per event).
        match apply_mut(&mut state, e) {
            Ok(()) => {}
            Err(err) => {
                report.divergence = Some(divergence(e, class, &cmds, format!("the state machine refuses it: {err}")));
                return Ok(report);
            }
        }
    }
    Ok(report)
}

/// A decision recorded before events carried only the latest lines of the run's revision
/// history ([`keel_engine::HISTORY_SHOWN`]), as it is decided now: an `Escalated` whose
/// `alternatives_tried`, or a failure `ReplanRequested` whose `tried`, is the state's whole
/// history (or, for a replan after a rejected plan, the rejection's), with the
/// [`keel_engine::recent_history`] of it. `None` for every other event, which is compared
/// as recorded. Only a list equal to what the state holds is shortened, so a changed line
/// of it, even one the short form leaves out, is still a divergence.
fn bounded_history(state: &RunState, event: &Event) -> Option<Event> {
    let long = |lines: &[String]| {
        lines.len() > keel_engine::HISTORY_SHOWN
            && (lines == state.history.as_slice()
                || state.last_failure.as_ref().is_some_and(|f| f.tried.as_slice() == lines))
    };
    match event {
        Event::Escalated(x) if long(&x.alternatives_tried) => {
            let mut x = x.clone();
            x.alternatives_tried = keel_engine::recent_history(&x.alternatives_tried);
            Some(Event::Escalated(x))
        }
        Event::ReplanRequested { revision, reason: PlanReason::Failure(f) } if long(&f.tried) => {
            let mut f = f.clone();
            f.tried = keel_engine::recent_history(&f.tried);
            Some(Event::ReplanRequested { revision: *revision, reason: PlanReason::Failure(f) })
        }
        _ => None,
    }
}

fn divergence(e: &Logged, class: EventClass, cmds: &[Command], reason: String) -> Divergence {
    Divergence {
        run: e.run.to_string(),
        seq: e.seq.0,
        class,
        kind: e.event.kind_name().to_owned(),
        recorded: event_json(&e.event),
        decided: cmds.iter().map(command_json).collect(),
        decided_lines: cmds.iter().map(command_line).collect(),
        reason,
    }
}

fn records(cmds: &[Command]) -> impl Iterator<Item = &Event> {
    cmds.iter().filter_map(|c| match c {
        Command::Record { event, .. } => Some(event),
        _ => None,
    })
}

/// Does `event` fit what `decide` returned? Err: why not.
fn fits(state: &RunState, ctx: &Context, cmds: &[Command], class: EventClass, event: &Event) -> Result<(), String> {
    match class {
        EventClass::External => Ok(()),
        EventClass::Decision => fits_decision(cmds, event),
        EventClass::Outcome => fits_outcome(state, ctx, cmds, event),
    }
}

/// A recorded decision fits when `decide` returned the same record.
fn fits_decision(cmds: &[Command], event: &Event) -> Result<(), String> {
    let recorded_decision = records(cmds).any(|d| event.same_decision(d));
    if recorded_decision {
        return Ok(());
    }
    let same_kind: Vec<String> = records(cmds).filter(|d| d.kind_name() == event.kind_name()).map(event_line).collect();
    if same_kind.is_empty() {
        Err(format!("the current code does not decide {} here", event.kind_name()))
    } else {
        Err(format!("the current code decides a different {}: {}", event.kind_name(), same_kind.join(" | ")))
    }
}

/// A recorded outcome fits when `decide` asked for the call it answers (and a plan still
/// validates).
fn fits_outcome(state: &RunState, ctx: &Context, cmds: &[Command], event: &Event) -> Result<(), String> {
    let recorded_decision = records(cmds).any(|d| event.same_decision(d));
    let has = |want: &Command| cmds.iter().any(|c| c == want);
    match event {
        Event::Planned { revision, plan } | Event::Replanned { revision, plan, .. } => {
            if !has(&Command::Plan { revision: *revision }) {
                return Err(format!("the current code does not ask the planner for revision {revision} here"));
            }
            fits_plan(state, ctx, plan, event)
        }
        Event::PlanRejected { revision, .. } => {
            if has(&Command::Plan { revision: *revision }) {
                Ok(())
            } else {
                Err(format!("the current code does not ask the planner for revision {revision} here"))
            }
        }
        Event::TaskExecuted { task, attempt, .. } => {
            if has(&Command::Execute { task: task.clone(), attempt: *attempt }) {
                Ok(())
            } else {
                Err(format!("the current code does not execute {task} attempt {attempt} here"))
            }
        }
        Event::TaskFailed { task, attempt, .. } => {
            let exec = Command::Execute { task: task.clone(), attempt: *attempt };
            let eval = Command::Evaluate { task: task.clone(), attempt: *attempt };
            if has(&exec) || has(&eval) || recorded_decision {
                Ok(())
            } else {
                Err(format!("the current code neither executes nor evaluates {task} attempt {attempt} here"))
            }
        }
        Event::TaskEvaluated { task, attempt, .. } => {
            if has(&Command::Evaluate { task: task.clone(), attempt: *attempt }) {
                Ok(())
            } else {
                Err(format!("the current code does not call the evaluator on {task} attempt {attempt} here"))
            }
        }
        Event::TaskRedelivered { task, attempt, .. } => {
            if has(&Command::Execute { task: task.clone(), attempt: *attempt }) {
                Ok(())
            } else {
                Err(format!("the current code does not execute {task} attempt {attempt} here: nothing to redeliver"))
            }
        }
        Event::EscalationNotified { number } => {
            if has(&Command::Notify { number: *number }) {
                Ok(())
            } else {
                Err(format!("the current code does not notify escalation {number} here"))
            }
        }
        Event::RunSizeWarning { events, .. } => {
            if *events == state.next_seq.0 {
                Ok(())
            } else {
                Err(format!("a size warning of {events} events recorded after {} events", state.next_seq.0))
            }
        }
        other => Err(format!("{} is not an outcome", other.kind_name())),
    }
}

/// A recorded plan (or replan) still validates, and a replan carries over and supersedes
/// what `replan_outcome` says.
fn fits_plan(state: &RunState, ctx: &Context, plan: &keel_engine::Plan, event: &Event) -> Result<(), String> {
    // The replan's outcome first: one recorded under the earlier carry-over rule is named
    // as such (the plan's cost check below counts the tasks the current rule runs again).
    if let Event::Replanned { carried_over, superseded, .. } = event {
        let (c, s) = replan_outcome(state, plan);
        if (carried_over, superseded) != (&c, &s) {
            let (old_c, old_s) = replan_outcome_same_spec(state, plan);
            if (carried_over, superseded) == (&old_c, &old_s) {
                let rerun: Vec<&keel_engine::TaskId> = carried_over.iter().filter(|t| !c.contains(t)).collect();
                return Err(format!(
                    "recorded under the earlier carry-over rule: {rerun:?} kept their outputs although a task they depend on runs again; the current code runs them again"
                ));
            }
            return Err(format!(
                "carried_over/superseded differ from replan_outcome: recorded {carried_over:?} / {superseded:?}, now {c:?} / {s:?}"
            ));
        }
    }
    let errors = validate_plan(plan, state, ctx);
    if !errors.is_empty() {
        return Err(format!("the recorded plan no longer validates: {}", errors.join("; ")));
    }
    Ok(())
}
