//! `decide`: the business rules. Reads the folded state and the code-level policy and
//! returns what to do next (docs/ARCHITECTURE.md, "The core's semantics").
//!
//! Pure: the only inputs are the state (built from recorded events) and the context.
//! Pseudo-random choices (retry jitter) hash the run's recorded seed.

use super::apply::next_revision;
use super::keys::{attempt_key, effect_key};
use super::types::{Command, Context};
use crate::model::event::{
    recent_history, Escalation, EscalationCause, Event, FailureContext, FailureSource, PlanReason,
};
use crate::model::fsm::{RunStatus, TaskStatus};
use crate::model::state::{RunState, TaskState};
use crate::model::workflow::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// What to do next, in a deterministic order.
pub fn decide(s: &RunState, ctx: &Context) -> Vec<Command> {
    match s.status {
        RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled => Vec::new(),
        RunStatus::Accepted => vec![record(Event::PlanRequested { revision: 0, reason: PlanReason::Initial })],
        RunStatus::Planning => decide_planning(s, ctx),
        RunStatus::AwaitingHuman => decide_awaiting(s),
        RunStatus::Running => decide_running(s, ctx),
    }
}

fn record(event: Event) -> Command {
    Command::Record { event, not_before_us: None }
}

fn record_at(event: Event, not_before_us: i64) -> Command {
    Command::Record { event, not_before_us: Some(not_before_us) }
}

/// Replans the run may still make.
pub(crate) fn replans_left(s: &RunState, ctx: &Context) -> bool {
    let limit = s.budget.replans.unwrap_or(u64::from(ctx.policy.max_replans)).saturating_add(s.replans_granted);
    s.totals.replans < limit
}

fn decide_planning(s: &RunState, ctx: &Context) -> Vec<Command> {
    if s.exhausted.is_some() {
        // The deadline passed while planning: finish (or escalate) with what was done.
        return match s.on_exhausted {
            ExhaustionPolicy::Partial => vec![record(Event::RunFailed {
                reason: format!("{:?} budget exhausted while planning", s.exhausted.unwrap_or(BudgetKind::Deadline)),
            })],
            ExhaustionPolicy::Escalate => vec![record(Event::Escalated(escalation(
                s,
                ctx,
                EscalationCause::BudgetExhausted,
                None,
                "a budget ran out while planning".to_owned(),
                "A budget is exhausted. Approve to finish with a partial result, reject or abort to fail the run.",
                &["approve", "reject", "abort"],
            )))],
        };
    }
    if !s.planning_rejected {
        let mut cmds = match s.planning_revision {
            Some(revision) => vec![Command::Plan { revision }],
            None => Vec::new(),
        };
        cmds.extend(deadline_check(s));
        return cmds;
    }
    // The plan of this round was rejected: ask again, or a human must step in.
    if replans_left(s, ctx) {
        let failure = match &s.last_failure {
            Some(f) => FailureContext {
                task: f.task.clone(),
                handler: f.handler.clone(),
                reason: f.reason.clone(),
                attempts: f.attempts,
                tried: recent_history(&f.tried),
            },
            None => FailureContext {
                task: None,
                handler: None,
                reason: "plan rejected".to_owned(),
                attempts: 0,
                tried: recent_history(&s.history),
            },
        };
        return vec![record(Event::ReplanRequested {
            revision: next_revision(s),
            reason: PlanReason::Failure(failure),
        })];
    }
    let why = s.last_failure.as_ref().map(|f| f.reason.clone()).unwrap_or_else(|| "plan rejected".to_owned());
    vec![record(Event::Escalated(escalation(
        s,
        ctx,
        EscalationCause::ReplansExhausted,
        None,
        why,
        "No valid plan could be made within the replan budget. Approve to finish with nothing done, reject or abort to fail the run, or replan with a hint.",
        &["replan_with_hint", "approve", "reject", "abort"],
    )))]
}

fn decide_awaiting(s: &RunState) -> Vec<Command> {
    let Some(open) = s.escalations.last() else {
        return Vec::new();
    };
    if open.resolution.is_some() {
        return Vec::new();
    }
    let mut cmds = Vec::new();
    if !open.notified {
        cmds.push(Command::Notify { number: open.escalation.number });
    }
    // The default applies at the deadline even if the sink could never be told.
    if let (Some(ms), Some(default)) = (&open.escalation.deadline_ms, &open.escalation.default_decision) {
        let due = open.escalated_at_us.saturating_add(ms_to_us(*ms));
        cmds.push(record_at(
            Event::HumanResolved {
                number: open.escalation.number,
                decision: default.clone(),
                by: "deadline".to_owned(),
                defaulted: true,
                reason: crate::model::event::DEFAULT_REASON.to_owned(),
            },
            due,
        ));
    }
    cmds
}

fn ms_to_us(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX / 1000).saturating_mul(1000)
}

/// The run's wall-clock deadline, as a future-dated `BudgetExhausted`.
fn deadline_check(s: &RunState) -> Option<Command> {
    if s.exhausted.is_some() {
        return None;
    }
    let ms = s.budget.deadline_ms?;
    let due = s.accepted_at_us.saturating_add(ms_to_us(ms));
    Some(record_at(Event::BudgetExhausted { budget: BudgetKind::Deadline, limit: ms, used: ms, needed: 0 }, due))
}

/// What a task needs from the run (beyond its own next step).
enum RunLevel {
    Replan(FailureContext),
    Escalate(EscalationCause, TaskId, String),
}

/// A running run, in phases: a human's run-level decision first; then what each task's
/// state asks for (skips, the gate, evaluations, executions, recovery); then a spent
/// budget or a run-level step (replan, escalation) once nothing is in flight; then
/// dispatches within the parallelism bound and the budgets; then completion.
fn decide_running(s: &RunState, ctx: &Context) -> Vec<Command> {
    if let Some((decision, by)) = &s.pending_decision {
        return carry_out(s, decision, by);
    }
    let in_flight =
        s.tasks.iter().filter(|t| matches!(t.status, TaskStatus::Dispatched | TaskStatus::Executed)).count();
    let settled = match settle(s, ctx) {
        Ok(settled) => settled,
        Err(early) => return early,
    };
    let Settled { mut records, effects, run_level, .. } = settled;
    if !records.is_empty() {
        records.extend(effects);
        return records;
    }
    if let Some(kind) = s.exhausted {
        return if in_flight > 0 { effects } else { vec![exhausted_step(s, ctx, kind)] };
    }
    // Run-level steps wait until nothing is in flight: no work is thrown away, and no
    // new work starts that a replan might supersede.
    if let Some(level) = run_level {
        return if in_flight > 0 { effects } else { vec![run_level_step(s, ctx, level)] };
    }
    let dispatches = match dispatch_ready(s, in_flight) {
        Ok(d) => d,
        Err(early) => return early,
    };
    if !dispatches.records.is_empty() {
        let mut records = dispatches.records;
        records.extend(effects);
        return records;
    }
    finish_or_wait(s, ctx, in_flight, dispatches, effects)
}

/// What the tasks' states ask for, gathered in plan order.
#[derive(Default)]
struct Settled {
    /// Events to record now (skips, gate refusals, auto-passes, retries).
    records: Vec<Command>,
    /// Calls still owed (an `Execute` per dispatched task, an `Evaluate` per output).
    effects: Vec<Command>,
    /// The first run-level step a task needs (replan or escalation).
    run_level: Option<RunLevel>,
    /// Retries scheduled in this call: two tasks failing at once must not both take the
    /// last retry.
    retries_scheduled: u64,
}

/// Each task's next step, in plan order. `Err`: the whole decision (the retry budget
/// ran out).
fn settle(s: &RunState, ctx: &Context) -> Result<Settled, Vec<Command>> {
    let mut acc = Settled::default();
    for t in &s.tasks {
        let id = &t.spec.id;
        match t.status {
            TaskStatus::Pending => {
                if let Some(dep) = t
                    .spec
                    .depends_on
                    .iter()
                    .filter(|d| !t.spec.optional_deps.contains(d))
                    .find(|d| task(s, d).is_some_and(|x| x.status == TaskStatus::Skipped))
                {
                    acc.records.push(record(Event::TaskSkipped {
                        task: id.clone(),
                        reason: format!("upstream task {dep} was skipped"),
                    }));
                }
            }
            TaskStatus::Dispatched if quarantine_due(t) => acc.records.push(record(quarantine(t))),
            TaskStatus::Dispatched => acc.effects.push(Command::Execute { task: id.clone(), attempt: t.attempt }),
            TaskStatus::Executed => settle_output(t, &mut acc),
            TaskStatus::AttemptFailed => settle_failure(s, ctx, t, &mut acc)?,
            TaskStatus::Rejected => settle_rejection(s, ctx, t, &mut acc),
            TaskStatus::Ready | TaskStatus::RetryScheduled => {}
            TaskStatus::Done | TaskStatus::Skipped | TaskStatus::Superseded => {}
        }
    }
    Ok(acc)
}

/// The error code of a quarantined task's `TaskFailed` (stable: tools may match on it).
pub const QUARANTINED: &str = "quarantined";

/// The dispatch was redelivered more often than the limit recorded with its redeliveries:
/// each delivery died with the worker, so the task is failed instead of run again.
fn quarantine_due(t: &TaskState) -> bool {
    t.redeliveries > 0 && t.redeliveries > t.redelivery_limit
}

/// A fatal failure of the engine's: the task crashed (or outlived) its worker every time it
/// ran. The ordinary recovery follows (skip if non-critical, escalate if critical).
fn quarantine(t: &TaskState) -> Event {
    Event::TaskFailed {
        task: t.spec.id.clone(),
        attempt: t.attempt,
        class: ErrorClass::Fatal,
        error: QUARANTINED.to_owned(),
        usage: Usage::default(),
        source: FailureSource::Engine,
        note: Some(format!(
            "attempt {} crashed the worker {} times (dispatched, then redelivered {} times with no result; limit {})",
            t.attempt,
            t.redeliveries,
            t.redeliveries.saturating_sub(1),
            t.redelivery_limit
        )),
    }
}

/// An executed output: the schema gate, then the evaluator (or, without success
/// criteria, an automatic pass).
fn settle_output(t: &TaskState, acc: &mut Settled) {
    let id = &t.spec.id;
    match gate(t) {
        Err(refusal) => acc.records.push(record(Event::TaskFailed {
            task: id.clone(),
            attempt: t.attempt,
            class: ErrorClass::Semantic,
            error: refusal.code.to_owned(),
            usage: Usage::default(),
            source: FailureSource::Gate,
            note: Some(refusal.note),
        })),
        Ok(()) if t.spec.success_criteria.is_some() => {
            acc.effects.push(Command::Evaluate { task: id.clone(), attempt: t.attempt })
        }
        Ok(()) => acc.records.push(record(Event::TaskEvaluated {
            task: id.clone(),
            attempt: t.attempt,
            verdict: Verdict::Pass,
            notes: "no success criteria: accepted".to_owned(),
            model: None,
            usage: Usage::default(),
        })),
    }
}

/// A failed attempt: retry (transient, within the task's attempts and the run's retry
/// budget), else replan, degrade or escalate. `Err`: the retry budget ran out.
fn settle_failure(s: &RunState, ctx: &Context, t: &TaskState, acc: &mut Settled) -> Result<(), Vec<Command>> {
    let id = &t.spec.id;
    let (class, error) = t.last_error.clone().unwrap_or((ErrorClass::Fatal, "unknown error".to_owned()));
    match class {
        ErrorClass::Transient if s.exhausted.is_some() => {
            // A budget is spent: no retry; the run finishes or escalates.
        }
        ErrorClass::Transient if t.attempt < t.spec.retry.max_attempts => {
            if retries_left(s, acc.retries_scheduled) {
                acc.retries_scheduled += 1;
                let delay_ms = backoff_ms(s.seed, t);
                acc.records.push(record(Event::RetryScheduled {
                    task: id.clone(),
                    next_attempt: t.attempt.saturating_add(1),
                    delay_ms,
                }));
            } else if acc.retries_scheduled == 0 && s.exhausted.is_none() {
                let limit = s.budget.retries.unwrap_or(0);
                return Err(with_in_flight(
                    s,
                    record(Event::BudgetExhausted {
                        budget: BudgetKind::Retries,
                        limit,
                        used: s.totals.retries,
                        needed: 1,
                    }),
                ));
            }
        }
        ErrorClass::Transient | ErrorClass::Semantic => {
            let reason = if class == ErrorClass::Transient {
                format!("retries exhausted after {} attempt(s): {error}", t.attempt)
            } else {
                error
            };
            recover_semantic(s, ctx, t, reason, &mut acc.records, &mut acc.run_level);
        }
        ErrorClass::Fatal => {
            if !t.spec.critical && ctx.policy.degrade_noncritical {
                acc.records
                    .push(record(Event::TaskSkipped { task: id.clone(), reason: format!("fatal error: {error}") }));
            } else if acc.run_level.is_none() {
                acc.run_level = Some(RunLevel::Escalate(EscalationCause::FatalError, id.clone(), error));
            }
        }
    }
    Ok(())
}

/// A hard or critical verdict: a critical one escalates, a hard one is recovered like a
/// semantic failure.
fn settle_rejection(s: &RunState, ctx: &Context, t: &TaskState, acc: &mut Settled) {
    let mut notes = format!("evaluator verdict {:?}", t.verdict.unwrap_or(Verdict::Hard));
    if let Some(n) = t.verdict_notes.as_deref().filter(|n| !n.is_empty()) {
        notes.push_str(": ");
        notes.push_str(n);
    }
    if t.verdict == Some(Verdict::Critical) {
        if acc.run_level.is_none() {
            acc.run_level = Some(RunLevel::Escalate(EscalationCause::CriticalVerdict, t.spec.id.clone(), notes));
        }
    } else {
        recover_semantic(s, ctx, t, notes, &mut acc.records, &mut acc.run_level);
    }
}

/// A budget ran out and nothing is in flight: finish partial or escalate, per the run's
/// policy.
fn exhausted_step(s: &RunState, ctx: &Context, kind: BudgetKind) -> Command {
    match s.on_exhausted {
        ExhaustionPolicy::Partial => complete(s, true),
        ExhaustionPolicy::Escalate => record(Event::Escalated(escalation(
            s,
            ctx,
            EscalationCause::BudgetExhausted,
            None,
            format!("the {kind:?} budget is exhausted"),
            "A budget is exhausted. Approve to finish with a partial result, reject or abort to fail the run.",
            &["approve", "reject", "abort"],
        ))),
    }
}

/// The run-level step a task asked for, once nothing is in flight.
fn run_level_step(s: &RunState, ctx: &Context, level: RunLevel) -> Command {
    match level {
        RunLevel::Replan(failure) => {
            record(Event::ReplanRequested { revision: next_revision(s), reason: PlanReason::Failure(failure) })
        }
        RunLevel::Escalate(cause, task, why) => record(Event::Escalated(escalation(
            s,
            ctx,
            cause,
            Some(task),
            why,
            question_for(cause),
            options_for(cause),
        ))),
    }
}

/// Dispatches decided in this call.
struct Dispatches<'a> {
    /// Dispatches due now.
    records: Vec<Command>,
    /// Retries waiting for their backoff (timers for the shell).
    future: Vec<Command>,
    /// The first ready human-review task (it escalates once nothing else can run).
    human_review: Option<&'a TaskState>,
}

/// Ready tasks (and due retries) in plan order, within the parallelism bound and the
/// budgets. `Err`: the whole decision (a budget cannot cover the first dispatch).
fn dispatch_ready(s: &RunState, in_flight: usize) -> Result<Dispatches<'_>, Vec<Command>> {
    let mut slots = usize::try_from(s.max_parallel_tasks).unwrap_or(usize::MAX).saturating_sub(in_flight);
    let mut extra = Reserved::default();
    let mut out = Dispatches { records: Vec::new(), future: Vec::new(), human_review: None };
    for t in &s.tasks {
        let retry = t.status == TaskStatus::RetryScheduled;
        if !(t.status == TaskStatus::Ready || retry) {
            continue;
        }
        if t.spec.kind == TaskKind::HumanReview {
            out.human_review = out.human_review.or(Some(t));
            continue;
        }
        if slots == 0 {
            break;
        }
        match budget_check(s, t, &extra) {
            Err((budget, limit, used, needed)) => {
                // Stop here: nothing past a budget is ever dispatched.
                let exhausted = record(Event::BudgetExhausted { budget, limit, used, needed });
                if out.records.is_empty() {
                    return Err(with_in_flight(s, exhausted));
                }
                break;
            }
            Ok(reserve) => {
                extra.add(t.spec.kind, reserve);
                slots -= 1;
                let event = dispatch(s, t, reserve);
                match (retry, t.retry_due_us) {
                    // A retry waits for its backoff: a timer for the shell.
                    (true, Some(due)) => out.future.push(record_at(event, due)),
                    _ => out.records.push(record(event)),
                }
            }
        }
    }
    Ok(out)
}

/// Nothing to record now: a human review escalates, a finished plan completes, else the
/// calls in flight, the timers and the run's deadline.
fn finish_or_wait(
    s: &RunState,
    ctx: &Context,
    in_flight: usize,
    dispatches: Dispatches<'_>,
    mut effects: Vec<Command>,
) -> Vec<Command> {
    if in_flight == 0 && dispatches.future.is_empty() {
        if let Some(t) = dispatches.human_review {
            return vec![record(Event::Escalated(escalation(
                s,
                ctx,
                EscalationCause::HumanReviewTask,
                Some(t.spec.id.clone()),
                format!("task {} is a human review", t.spec.id),
                "This task is done by a person: supply its output, approve it, or reject it (skip).",
                &["supply_output", "approve", "reject", "abort"],
            )))];
        }
        if s.tasks.iter().all(|t| t.status.is_terminal()) {
            return vec![complete(s, false)];
        }
    }
    effects.extend(dispatches.future);
    if let Some(c) = deadline_check(s) {
        effects.push(c);
    }
    effects
}

/// `first`, then the effects of every call still in flight (an `Execute` per dispatched
/// task, an `Evaluate` per executed task waiting for its evaluator): a decision made
/// while calls are out must still list them, or their answers would look unasked-for to
/// the determinism check (proptests finding 9).
fn with_in_flight(s: &RunState, first: Command) -> Vec<Command> {
    let mut cmds = vec![first];
    for t in &s.tasks {
        match t.status {
            TaskStatus::Dispatched if !quarantine_due(t) => {
                cmds.push(Command::Execute { task: t.spec.id.clone(), attempt: t.attempt })
            }
            TaskStatus::Executed if t.spec.success_criteria.is_some() && gate(t).is_ok() => {
                cmds.push(Command::Evaluate { task: t.spec.id.clone(), attempt: t.attempt })
            }
            _ => {}
        }
    }
    cmds
}

/// Carry out a human's run-level decision.
fn carry_out(s: &RunState, decision: &Decision, by: &str) -> Vec<Command> {
    match decision {
        Decision::Abort => vec![record(Event::RunFailed { reason: format!("aborted by {by}") })],
        Decision::Reject => vec![record(Event::RunFailed { reason: format!("escalation rejected by {by}") })],
        Decision::Approve | Decision::SupplyOutput(_) => vec![complete(s, true)],
        Decision::ReplanWithHint(hint) => vec![record(Event::ReplanRequested {
            revision: next_revision(s),
            reason: PlanReason::HumanHint { hint: hint.clone(), by: by.to_owned() },
        })],
    }
}

/// Semantic failure, exhausted retries or a hard verdict: replan if the budget allows,
/// else degrade (skip a non-critical task) or escalate.
fn recover_semantic(
    s: &RunState,
    ctx: &Context,
    t: &TaskState,
    reason: String,
    records: &mut Vec<Command>,
    run_level: &mut Option<RunLevel>,
) {
    if run_level.is_some() {
        return;
    }
    if replans_left(s, ctx) {
        *run_level = Some(RunLevel::Replan(FailureContext {
            task: Some(t.spec.id.clone()),
            handler: Some(t.spec.handler.clone()),
            reason,
            attempts: t.attempt,
            tried: recent_history(&s.history),
        }));
    } else if !t.spec.critical && ctx.policy.degrade_noncritical {
        records.push(record(Event::TaskSkipped {
            task: t.spec.id.clone(),
            reason: format!("replans exhausted: {reason}"),
        }));
    } else {
        *run_level = Some(RunLevel::Escalate(EscalationCause::ReplansExhausted, t.spec.id.clone(), reason));
    }
}

fn question_for(cause: EscalationCause) -> &'static str {
    match cause {
        EscalationCause::CriticalVerdict => {
            "The evaluator flagged this task's output as critical. Approve to accept it, supply a corrected output, reject to skip the task, replan with a hint, or abort."
        }
        EscalationCause::FatalError => {
            "A critical task failed with an error retries cannot fix. Supply its output, reject to skip it, replan with a hint, or abort."
        }
        EscalationCause::ReplansExhausted => {
            "A critical task kept failing and the replan budget is spent. Supply its output, reject to skip it, replan with a hint, or abort."
        }
        EscalationCause::BudgetExhausted | EscalationCause::HumanReviewTask => "Decide how the run continues.",
    }
}

fn options_for(cause: EscalationCause) -> &'static [&'static str] {
    match cause {
        EscalationCause::CriticalVerdict => &["approve", "supply_output", "reject", "replan_with_hint", "abort"],
        _ => &["supply_output", "reject", "replan_with_hint", "abort"],
    }
}

fn escalation(
    s: &RunState,
    ctx: &Context,
    cause: EscalationCause,
    task: Option<TaskId>,
    why: String,
    question: &str,
    options: &[&str],
) -> Escalation {
    let attempted = s
        .tasks
        .iter()
        .filter(|t| t.attempt > 0 || t.status != TaskStatus::Pending)
        .map(|t| {
            let mut line =
                format!("{} ({}): {} after {} attempt(s)", t.spec.id, t.spec.handler, t.status.name(), t.attempt);
            if let Some((class, e)) = &t.last_error {
                line.push_str(&format!(", last error {class:?}: {e}"));
            }
            if let Some(v) = t.verdict {
                line.push_str(&format!(", verdict {v:?}"));
            }
            line
        })
        .collect();
    Escalation {
        number: u32::try_from(s.escalations.len()).unwrap_or(u32::MAX).saturating_add(1),
        cause,
        task,
        attempted,
        why,
        alternatives_tried: recent_history(&s.history),
        question: question.to_owned(),
        options: options.iter().map(|o| (*o).to_owned()).collect(),
        deadline_ms: ctx.policy.escalation_deadline_ms,
        default_decision: ctx.policy.escalation_default.clone(),
    }
}

fn complete(s: &RunState, budget_stop: bool) -> Command {
    let mut outputs = Vec::new();
    let mut done = 0usize;
    let mut skipped = 0usize;
    for t in &s.tasks {
        match t.status {
            TaskStatus::Done => {
                done += 1;
                outputs.push(t.spec.id.clone());
            }
            TaskStatus::Skipped => skipped += 1,
            _ => {}
        }
    }
    outputs.sort();
    let unfinished = s.tasks.len().saturating_sub(done + skipped);
    let partial = budget_stop || skipped > 0 || unfinished > 0 || s.exhausted.is_some();
    let mut summary = format!("{done} task(s) done, {skipped} skipped");
    if unfinished > 0 {
        summary.push_str(&format!(", {unfinished} not run"));
    }
    if let Some(kind) = s.exhausted {
        summary.push_str(&format!("; {kind:?} budget exhausted"));
    }
    summary.push_str(&format!("; cost {} micros", s.totals.cost_micros));
    record(Event::RunCompleted { partial, summary, outputs })
}

fn task<'a>(s: &'a RunState, id: &TaskId) -> Option<&'a TaskState> {
    s.task_index.get(id).and_then(|&i| s.tasks.get(i))
}

/// Why the output-schema gate refused an output: a stable code (what `decide` and the
/// determinism check go by) and a note for people (the validator's text, with the JSON
/// pointers of the failing locations; third-party text that no decision depends on).
struct GateRefusal {
    /// `schema_mismatch`, `output_not_json`, `no_output`, `schema_not_json` or
    /// `schema_invalid` (the last two cannot pass plan validation; kept total).
    code: &'static str,
    note: String,
}

impl GateRefusal {
    fn new(code: &'static str, note: impl Into<String>) -> Self {
        GateRefusal { code, note: note.into() }
    }
}

/// Failing locations listed in a gate refusal's note at most.
const GATE_PROBLEMS_MAX: usize = 5;

/// The output-schema gate: an output that fails its task's schema never reaches a
/// downstream task.
fn gate(t: &TaskState) -> Result<(), GateRefusal> {
    gate_output(t.spec.output_schema.as_ref(), t.output.as_ref())
}

/// The output-schema gate on `output` against `spec`'s schema, for an output a human
/// supplies (`Engine::resolve` checks it before anything is recorded): `Err((code, note))`
/// with the gate's stable code (`schema_mismatch`, `output_not_json`...) and the
/// validator's text.
pub fn check_output(spec: &TaskSpec, output: &Json) -> Result<(), (&'static str, String)> {
    gate_output(spec.output_schema.as_ref(), Some(output)).map_err(|r| (r.code, r.note))
}

fn gate_output(schema: Option<&Json>, output: Option<&Json>) -> Result<(), GateRefusal> {
    let Some(schema) = schema else {
        return Ok(());
    };
    // Same checks in the same order as without the memo: schema JSON, output, schema.
    let (validator, output) = match compiled(schema) {
        Some(v) => (v, output_value(output)?),
        None => {
            let value = schema.value().map_err(|e| GateRefusal::new("schema_not_json", e.to_string()))?;
            let output = output_value(output)?;
            let v = jsonschema::validator_for(&value).map_err(|e| GateRefusal::new("schema_invalid", e.to_string()))?;
            (remember(schema, v), output)
        }
    };
    // Sorted by location, so the note does not depend on the validator's reporting order.
    let mut problems: Vec<(String, String)> =
        validator.iter_errors(&output).map(|e| (e.instance_path().to_string(), e.to_string())).collect();
    if problems.is_empty() {
        return Ok(());
    }
    problems.sort();
    let note: Vec<String> =
        problems.iter().take(GATE_PROBLEMS_MAX).map(|(at, text)| format!("at {at:?}: {text}")).collect();
    Err(GateRefusal::new("schema_mismatch", note.join("; ")))
}

fn output_value(output: Option<&Json>) -> Result<serde_json::Value, GateRefusal> {
    match output {
        Some(o) => o.value().map_err(|e| GateRefusal::new("output_not_json", e.to_string())),
        None => Err(GateRefusal::new("no_output", "no output recorded")),
    }
}

/// Compiled output schemas by schema text. Compiling a schema costs far more than checking
/// an output against it, and a plan's schemas are checked again on every decision while
/// their task waits for the gate. A memo of a pure function: what `gate` returns is the
/// same with or without it. Bounded: cleared when full.
type Validators = BTreeMap<Json, std::sync::Arc<jsonschema::Validator>>;
static VALIDATORS: std::sync::Mutex<Validators> = std::sync::Mutex::new(BTreeMap::new());
const VALIDATORS_MAX: usize = 1024;

fn compiled(schema: &Json) -> Option<std::sync::Arc<jsonschema::Validator>> {
    VALIDATORS.lock().unwrap_or_else(|p| p.into_inner()).get(schema).cloned()
}

fn remember(schema: &Json, v: jsonschema::Validator) -> std::sync::Arc<jsonschema::Validator> {
    let v = std::sync::Arc::new(v);
    let mut memo = VALIDATORS.lock().unwrap_or_else(|p| p.into_inner());
    if memo.len() >= VALIDATORS_MAX {
        memo.clear();
    }
    memo.insert(schema.clone(), v.clone());
    v
}

fn retries_left(s: &RunState, scheduled_now: u64) -> bool {
    s.budget.retries.is_none_or(|limit| s.totals.retries.saturating_add(scheduled_now) < limit)
}

/// Exponential backoff with jitter drawn from the run's seed (never from a thread rng).
pub(crate) fn backoff_ms(seed: u64, t: &TaskState) -> u64 {
    let p = &t.spec.retry;
    let exp = t.attempt.saturating_sub(1).min(32);
    let base = p.backoff_base_ms.saturating_mul(1u64 << exp).min(p.backoff_max_ms);
    let mut h = Sha256::new();
    h.update(b"keel/jitter");
    h.update(seed.to_le_bytes());
    h.update(t.spec.id.0.as_bytes());
    h.update(t.attempt.to_le_bytes());
    let d: [u8; 32] = h.finalize().into();
    let first = d.first_chunk::<8>().copied().unwrap_or_default();
    let jitter = u64::from_le_bytes(first) % p.jitter_ms.saturating_add(1);
    base.saturating_add(jitter)
}

fn dispatch(s: &RunState, t: &TaskState, reserved: Usage) -> Event {
    let attempt = t.attempt.saturating_add(1);
    let model = match t.spec.kind {
        TaskKind::Llm => t.spec.complexity.and_then(|c| s.routes.iter().find(|(k, _)| *k == c).map(|(_, m)| m.clone())),
        _ => None,
    };
    let upstream: BTreeMap<TaskId, Json> = t
        .spec
        .depends_on
        .iter()
        .filter_map(|d| task(s, d).filter(|x| x.status == TaskStatus::Done))
        .filter_map(|x| x.output.clone().map(|o| (x.spec.id.clone(), o)))
        .collect();
    let skipped: Vec<TaskId> = t
        .spec
        .depends_on
        .iter()
        .filter(|d| task(s, d).is_some_and(|x| x.status == TaskStatus::Skipped))
        .cloned()
        .collect();
    let note = if attempt > 1 {
        t.last_error.as_ref().map(|(c, e)| format!("previous attempt failed ({c:?}): {e}"))
    } else {
        None
    };
    Event::TaskDispatched {
        task: t.spec.id.clone(),
        attempt,
        effect_key: effect_key(s.run, &t.spec.id, t.planned_in),
        attempt_key: attempt_key(s.run, s.revision.unwrap_or(0), &t.spec.id, attempt),
        model,
        input: TaskInput { input: t.spec.input.clone(), upstream, note, skipped },
        reserved,
    }
}

/// Reservations of dispatches decided in this call (not yet in the state).
#[derive(Default)]
struct Reserved {
    usage: Usage,
    llm_calls: u64,
    tool_calls: u64,
}

impl Reserved {
    fn add(&mut self, kind: TaskKind, u: Usage) {
        self.usage.cost_micros = self.usage.cost_micros.saturating_add(u.cost_micros);
        self.usage.tokens = self.usage.tokens.saturating_add(u.tokens);
        match kind {
            TaskKind::Llm => self.llm_calls += 1,
            TaskKind::Tool | TaskKind::DataFetch => self.tool_calls += 1,
            TaskKind::HumanReview => {}
        }
    }
}

/// Can the budgets cover dispatching `t` on top of what is spent and reserved?
/// Err: (which budget, its limit, used incl. reservations, needed).
fn budget_check(s: &RunState, t: &TaskState, extra: &Reserved) -> Result<Usage, (BudgetKind, u64, u64, u64)> {
    let b = &s.budget;
    let mut reserved_cost = extra.usage.cost_micros;
    let mut reserved_tokens = extra.usage.tokens;
    let mut llm_in_flight = extra.llm_calls;
    let mut tool_in_flight = extra.tool_calls;
    for x in &s.tasks {
        reserved_cost = reserved_cost.saturating_add(x.reserved.cost_micros);
        reserved_tokens = reserved_tokens.saturating_add(x.reserved.tokens);
        if x.status == TaskStatus::Dispatched {
            match x.spec.kind {
                TaskKind::Llm => llm_in_flight += 1,
                TaskKind::Tool | TaskKind::DataFetch => tool_in_flight += 1,
                TaskKind::HumanReview => {}
            }
        }
    }
    let want = Usage { cost_micros: t.spec.cost_estimate_micros, tokens: t.spec.token_estimate };
    let check = |kind: BudgetKind, limit: Option<u64>, used: u64, needed: u64| match limit {
        Some(l) if used.saturating_add(needed) > l => Err((kind, l, used, needed)),
        _ => Ok(()),
    };
    check(BudgetKind::Cost, b.cost_micros, s.totals.cost_micros.saturating_add(reserved_cost), want.cost_micros)?;
    check(BudgetKind::Tokens, b.tokens, s.totals.tokens.saturating_add(reserved_tokens), want.tokens)?;
    match t.spec.kind {
        TaskKind::Llm => check(BudgetKind::LlmCalls, b.llm_calls, s.totals.llm_calls.saturating_add(llm_in_flight), 1)?,
        TaskKind::Tool | TaskKind::DataFetch => {
            check(BudgetKind::ToolCalls, b.tool_calls, s.totals.tool_calls.saturating_add(tool_in_flight), 1)?
        }
        TaskKind::HumanReview => {}
    }
    Ok(want)
}
