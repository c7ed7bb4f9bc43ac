//! `apply`: fold one logged event into a run's state.
//!
//! No business rules live here: every check is "does the log say something possible?"
//! (the transition tables, sequence numbers, ids that exist, revisions in order). Every
//! check happens before the state is touched, so a refused event leaves it unchanged.

use super::types::TransitionError;
use crate::model::event::{Escalation, EscalationCause, Event, Logged, PlanReason};
use crate::model::fsm::{run_transition, task_transition, RunStatus, TaskStatus, TaskTrigger};
use crate::model::state::{EscalationState, RunState, SizeWarning, TaskState, Totals};
use crate::model::workflow::*;
use keel_store::Seq;
use std::collections::{BTreeMap, BTreeSet};

/// Fold one event into the state. The first event of a run must be `RunAccepted`, applied
/// to `None`.
pub fn apply(state: Option<&RunState>, logged: &Logged) -> Result<RunState, TransitionError> {
    match state {
        None => accept(logged),
        Some(s) => {
            let mut next = s.clone();
            apply_mut(&mut next, logged)?;
            Ok(next)
        }
    }
}

/// Fold a whole history. Convenience for replay and tests.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Logged>) -> Result<Option<RunState>, TransitionError> {
    let mut state: Option<RunState> = None;
    for e in events {
        state = Some(apply(state.as_ref(), e)?);
    }
    Ok(state)
}

/// The first event of a run.
fn accept(logged: &Logged) -> Result<RunState, TransitionError> {
    let run = logged.run;
    let kind = logged.event.kind_name();
    let Some(status) = run_transition(None, kind) else {
        return Err(TransitionError::IllegalRun { run, state: "(no run yet)".to_owned(), kind });
    };
    if logged.seq != Seq(0) {
        return Err(TransitionError::OutOfOrder { run, expected: 0, got: logged.seq.0 });
    }
    let Event::RunAccepted {
        workflow,
        workflow_version,
        input,
        idempotency_key,
        priority,
        seed,
        budget,
        on_exhausted,
        routes,
        evaluator_model,
        max_parallel_tasks,
    } = &logged.event
    else {
        return Err(TransitionError::IllegalRun { run, state: "(no run yet)".to_owned(), kind });
    };
    Ok(RunState {
        run,
        next_seq: Seq(1),
        status,
        workflow: workflow.clone(),
        workflow_version: *workflow_version,
        input: input.clone(),
        idempotency_key: idempotency_key.clone(),
        priority: *priority,
        seed: *seed,
        budget: budget.clone(),
        on_exhausted: *on_exhausted,
        routes: routes.clone(),
        evaluator_model: evaluator_model.clone(),
        max_parallel_tasks: (*max_parallel_tasks).max(1),
        accepted_at_us: logged.at_us,
        last_event_us: logged.at_us,
        revision: None,
        planning_revision: None,
        planning_reason: None,
        tasks: Vec::new(),
        task_index: BTreeMap::new(),
        rejected_plans: 0,
        planning_rejected: false,
        pending_decision: None,
        history: Vec::new(),
        last_failure: None,
        totals: Totals::default(),
        replans_granted: 0,
        exhausted: None,
        escalations: Vec::new(),
        result: None,
        partial: false,
        failure: None,
        log_bytes: event_bytes(&logged.event),
        size_warning: None,
    })
}

/// The revision number the next planning round must carry.
pub(crate) fn next_revision(s: &RunState) -> u32 {
    match (s.revision, s.planning_revision) {
        (None, None) => 0,
        (a, b) => a.max(b).map(|r| r.saturating_add(1)).unwrap_or(0),
    }
}

/// Which tasks of the current plan a replacement plan keeps and which it supersedes
/// (every other task that has not finished). A task is kept, with its output, when it is
/// done, the new plan has it with an identical spec, and every task it depends on is kept
/// too: its output was made from the upstream outputs the new plan keeps. A done task
/// whose upstream runs again runs again itself, under the same effect key (its spec is
/// unchanged: a handler that dedupes on the key sees the new input under the key of the
/// effect it already made). The shell records exactly this on `Replanned`; `apply`
/// checks it.
pub fn replan_outcome(s: &RunState, plan: &Plan) -> (Vec<TaskId>, Vec<TaskId>) {
    outcome(s, plan, true)
}

/// [`replan_outcome`] as the engine computed it before a carried-over task had to have
/// its upstream carried over too (done and an identical spec was enough): what a
/// `Replanned` recorded then carries. `apply` folds such a record; the determinism check
/// reports it as a decision the current code does not make.
pub fn replan_outcome_same_spec(s: &RunState, plan: &Plan) -> (Vec<TaskId>, Vec<TaskId>) {
    outcome(s, plan, false)
}

/// The ids of the tasks a replacement plan keeps ([`replan_outcome`]).
pub(crate) fn carried_ids<'a>(s: &'a RunState, plan: &Plan, upstream_kept: bool) -> BTreeSet<&'a TaskId> {
    let new_specs: BTreeMap<&TaskId, &TaskSpec> = plan.tasks.iter().map(|t| (&t.id, t)).collect();
    let mut kept: BTreeSet<&TaskId> = s
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Done && new_specs.get(&t.spec.id).is_some_and(|spec| **spec == t.spec))
        .map(|t| &t.spec.id)
        .collect();
    if upstream_kept {
        // Until nothing changes: a task whose upstream is not kept is not kept (at most
        // one pass per level of the plan's graph).
        loop {
            let dropped: Vec<&TaskId> = s
                .tasks
                .iter()
                .filter(|t| kept.contains(&t.spec.id) && t.spec.depends_on.iter().any(|d| !kept.contains(d)))
                .map(|t| &t.spec.id)
                .collect();
            if dropped.is_empty() {
                break;
            }
            for id in dropped {
                kept.remove(id);
            }
        }
    }
    kept
}

fn outcome(s: &RunState, plan: &Plan, upstream_kept: bool) -> (Vec<TaskId>, Vec<TaskId>) {
    let kept = carried_ids(s, plan, upstream_kept);
    let mut carried = Vec::new();
    let mut superseded = Vec::new();
    for t in &s.tasks {
        if kept.contains(&t.spec.id) {
            carried.push(t.spec.id.clone());
        } else if !t.status.is_terminal() {
            superseded.push(t.spec.id.clone());
        }
    }
    (carried, superseded)
}

/// Fold `logged` into `s` in place. On error `s` is unchanged.
pub fn apply_mut(s: &mut RunState, logged: &Logged) -> Result<(), TransitionError> {
    apply_take(s, &mut logged.clone())
}

/// [`apply_mut`] for a caller that is done with the event: the event's owned fields
/// (inputs, outputs, notes...) move into the state instead of being copied, so on success
/// `logged.event` is left with empty fields. On error neither `s` nor `logged` changed
/// (every check comes before the first move). Folding a log this way allocates about
/// half as much per event (docs/PERFORMANCE.md).
pub fn apply_take(s: &mut RunState, logged: &mut Logged) -> Result<(), TransitionError> {
    let run = s.run;
    let kind = logged.event.kind_name();
    if logged.run != run {
        return Err(TransitionError::Invalid { run, kind, reason: format!("event belongs to run {}", logged.run) });
    }
    if logged.seq != s.next_seq {
        return Err(TransitionError::OutOfOrder { run, expected: s.next_seq.0, got: logged.seq.0 });
    }
    let Some(to) = run_transition(Some(s.status), kind) else {
        return Err(TransitionError::IllegalRun { run, state: s.status.name().to_owned(), kind });
    };
    let at = logged.at_us;
    // Before the match: the fold moves the event's owned fields out.
    let bytes = event_bytes(&logged.event);

    let cx = Cx { run, kind, at };
    match &mut logged.event {
        Event::RunAccepted { .. } => {
            // The table has no row for it from an existing run; kept for exhaustiveness.
            return Err(TransitionError::IllegalRun { run, state: s.status.name().to_owned(), kind });
        }
        Event::PlanRequested { revision, reason } => plan_requested(s, &cx, revision, reason)?,
        Event::ReplanRequested { revision, reason } => replan_requested(s, &cx, revision, reason)?,
        Event::PlanRejected { revision, errors, .. } => plan_rejected(s, &cx, revision, errors)?,
        Event::Planned { revision, plan } => planned(s, &cx, revision, plan)?,
        Event::Replanned { revision, plan, carried_over, superseded } => {
            replanned(s, &cx, revision, plan, carried_over, superseded)?
        }
        Event::TaskDispatched { task, attempt, effect_key, attempt_key, model, input, reserved } => {
            task_dispatched(s, &cx, task, attempt, (effect_key, attempt_key), model, input, reserved)?
        }
        Event::TaskExecuted { task, attempt, output, usage, cached } => {
            task_executed(s, &cx, task, attempt, output, usage, cached)?
        }
        Event::TaskFailed { task, attempt, class, error, usage, .. } => {
            task_failed(s, &cx, task, attempt, class, error, usage)?
        }
        Event::RetryScheduled { task, next_attempt, delay_ms } => {
            retry_scheduled(s, &cx, task, next_attempt, delay_ms)?
        }
        Event::TaskEvaluated { task, attempt, verdict, usage, notes, .. } => {
            task_evaluated(s, &cx, task, attempt, verdict, usage, notes)?
        }
        Event::TaskSkipped { task, reason } => task_skipped(s, &cx, task, reason)?,
        Event::BudgetExhausted { budget, .. } => budget_exhausted(s, &cx, budget)?,
        Event::Escalated(e) => escalated(s, &cx, e)?,
        Event::EscalationNotified { number } => escalation_notified(s, &cx, number)?,
        Event::HumanResolved { number, decision, by, defaulted, .. } => {
            human_resolved(s, &cx, number, decision, by, defaulted)?
        }
        Event::RunCompleted { partial, outputs, .. } => run_completed(s, partial, outputs)?,
        Event::RunFailed { reason } => run_failed(s, reason)?,
        Event::RunCancelled { by, reason } => run_cancelled(s, by, reason)?,
        Event::TaskRedelivered { task, attempt, redelivery, limit } => {
            task_redelivered(s, &cx, task, *attempt, *redelivery, *limit)?
        }
        Event::RunSizeWarning { events, bytes, events_max, bytes_max } => {
            s.size_warning =
                Some(SizeWarning { events: *events, bytes: *bytes, events_max: *events_max, bytes_max: *bytes_max })
        }
    }
    if matches!(logged.event, Event::RunCompleted { .. } | Event::RunFailed { .. } | Event::RunCancelled { .. }) {
        s.pending_decision = None;
    }
    s.status = to;
    s.next_seq = Seq(s.next_seq.0.saturating_add(1));
    s.last_event_us = at;
    s.log_bytes = s.log_bytes.saturating_add(bytes);
    Ok(())
}

/// The encoded size of `event` ([`RunState::log_bytes`]); every event encodes (a failure
/// would be a bug of the codec) and then counts as 0.
fn event_bytes(event: &Event) -> u64 {
    keel_store::codec::encoded_len(event).ok().and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

/// What a human decision does to the escalated task: the trigger and, for a supplied
/// output or an approved human-review task, the output it now has.
fn human_task_move(t: &TaskState, decision: &Decision, cause: EscalationCause) -> Option<(TaskTrigger, Option<Json>)> {
    match decision {
        Decision::Approve => {
            if cause == EscalationCause::HumanReviewTask {
                Some((TaskTrigger::HumanAccepted, Some(Json::new(&serde_json::json!({"approved": true})))))
            } else if t.output.is_some() && t.status == TaskStatus::Rejected {
                Some((TaskTrigger::HumanAccepted, None))
            } else {
                Some((TaskTrigger::Skipped, None))
            }
        }
        Decision::Reject => Some((TaskTrigger::Skipped, None)),
        Decision::SupplyOutput(json) => Some((TaskTrigger::HumanAccepted, Some(json.clone()))),
        Decision::ReplanWithHint(_) | Decision::Abort => None,
    }
}

fn reason_line(reason: &PlanReason) -> String {
    match reason {
        PlanReason::Initial => "initial".to_owned(),
        PlanReason::Failure(f) => match &f.task {
            Some(t) => format!("task {t} failed after {} attempt(s): {}", f.attempts, f.reason),
            None => f.reason.clone(),
        },
        PlanReason::HumanHint { hint, by } => format!("replan asked by {by}: {hint}"),
    }
}

/// Build the task list of a plan; tasks in `keep` (carried over) keep their state. The
/// plan's specs move into the tasks (the fold is done with the event), but only once the
/// plan is known to be valid: on error `plan` is unchanged.
fn install(
    plan: &mut Plan,
    keep: &BTreeMap<TaskId, TaskState>,
    planned_in: &BTreeMap<TaskId, u32>,
    revision: u32,
) -> Result<(Vec<TaskState>, BTreeMap<TaskId, usize>), String> {
    let mut index = BTreeMap::new();
    for (i, spec) in plan.tasks.iter().enumerate() {
        if index.insert(spec.id.clone(), i).is_some() {
            return Err(format!("duplicate task id {}", spec.id));
        }
    }
    for spec in &plan.tasks {
        if keep.contains_key(&spec.id) {
            continue;
        }
        for d in &spec.depends_on {
            if !index.contains_key(d) {
                return Err(format!("task {} depends on unknown task {d}", spec.id));
            }
        }
    }
    let mut tasks = Vec::with_capacity(plan.tasks.len());
    for spec in std::mem::take(&mut plan.tasks) {
        if let Some(kept) = keep.get(&spec.id) {
            tasks.push(kept.clone());
            continue;
        }
        let first = planned_in.get(&spec.id).copied().unwrap_or(revision);
        tasks.push(TaskState {
            spec,
            status: TaskStatus::Pending,
            attempt: 0,
            attempt_key: None,
            model: None,
            input: None,
            reserved: Usage::default(),
            output: None,
            cached: false,
            verdict: None,
            verdict_notes: None,
            last_error: None,
            retry_due_us: None,
            skip_reason: None,
            planned_in: first,
            effect_key: None,
            redeliveries: 0,
            redelivery_limit: 0,
        });
    }
    promote_ready(&mut tasks, &index);
    Ok((tasks, index))
}

/// Pending tasks whose dependencies are all done become ready (the derived `DepsDone`).
fn promote_ready(tasks: &mut [TaskState], index: &BTreeMap<TaskId, usize>) {
    // Promotion turns Pending into Ready and never changes which tasks are Done, so finding
    // every task to promote first and promoting them after is the same as one pass over a
    // copy of the Done flags (which this avoids allocating on every evaluation).
    let ready: Vec<usize> = tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.status == TaskStatus::Pending)
        .filter(|(_, t)| deps_satisfied(tasks, index, t))
        .map(|(i, _)| i)
        .collect();
    for i in ready {
        if let Some(t) = tasks.get_mut(i) {
            if let Some(to) = task_transition(t.status, TaskTrigger::DepsDone) {
                t.status = to;
            }
        }
    }
}

/// Every dependency of `t` is Done, or Skipped and optional for `t`
/// ([`TaskSpec::optional_deps`]): what `DepsDone` means.
fn deps_satisfied(tasks: &[TaskState], index: &BTreeMap<TaskId, usize>, t: &TaskState) -> bool {
    t.spec.depends_on.iter().all(|d| {
        index.get(d).and_then(|&i| tasks.get(i)).is_some_and(|x| {
            x.status == TaskStatus::Done || (x.status == TaskStatus::Skipped && t.spec.optional_deps.contains(d))
        })
    })
}

/// `done` just became Done (or Skipped): its Pending dependents whose dependencies are now all Done
/// become Ready. The same as [`promote_ready`] over every task, because no other task can
/// have changed: `install` promotes every ready task, and every move to Done comes here,
/// so before this call no Pending task had all its dependencies Done. Looking only at the
/// dependents of `done` saves a map lookup per dependency of every pending task on every
/// evaluation (a profile of replay showed it as the largest part of `apply`).
fn release_dependents(s: &mut RunState, done: &TaskId) {
    #[cfg(debug_assertions)]
    let expected = {
        let mut tasks = s.tasks.clone();
        promote_ready(&mut tasks, &s.task_index);
        tasks.into_iter().map(|t| t.status).collect::<Vec<_>>()
    };
    for i in 0..s.tasks.len() {
        let Some(t) = s.tasks.get(i) else { continue };
        if t.status != TaskStatus::Pending || !t.spec.depends_on.contains(done) {
            continue;
        }
        if deps_satisfied(&s.tasks, &s.task_index, t) {
            if let Some(to) = task_transition(TaskStatus::Pending, TaskTrigger::DepsDone) {
                if let Some(t) = s.tasks.get_mut(i) {
                    t.status = to;
                }
            }
        }
    }
    #[cfg(debug_assertions)]
    debug_assert_eq!(
        s.tasks.iter().map(|t| t.status).collect::<Vec<_>>(),
        expected,
        "releasing the dependents of {done} differs from promoting every ready task"
    );
}

fn task_ref<'a>(s: &'a RunState, id: &TaskId, kind: &'static str) -> Result<&'a TaskState, TransitionError> {
    s.task_index.get(id).and_then(|&i| s.tasks.get(i)).ok_or_else(|| TransitionError::UnknownTask {
        run: s.run,
        task: id.clone(),
        kind,
    })
}

fn task_mut<'a>(s: &'a mut RunState, id: &TaskId, kind: &'static str) -> Result<&'a mut TaskState, TransitionError> {
    let run = s.run;
    match s.task_index.get(id).copied() {
        Some(i) => s.tasks.get_mut(i).ok_or_else(|| TransitionError::UnknownTask { run, task: id.clone(), kind }),
        None => Err(TransitionError::UnknownTask { run, task: id.clone(), kind }),
    }
}

fn task_step(s: &RunState, t: &TaskState, trigger: TaskTrigger) -> Result<TaskStatus, TransitionError> {
    task_transition(t.status, trigger).ok_or_else(|| illegal_task(s, t, trigger))
}

fn illegal_task(s: &RunState, t: &TaskState, trigger: TaskTrigger) -> TransitionError {
    TransitionError::IllegalTask {
        run: s.run,
        task: t.spec.id.clone(),
        state: t.status.name(),
        trigger: trigger.name(),
    }
}

fn same_attempt(s: &RunState, t: &TaskState, attempt: u32, kind: &'static str) -> Result<(), TransitionError> {
    if attempt != t.attempt {
        return Err(TransitionError::Invalid {
            run: s.run,
            kind,
            reason: format!("task {}: attempt {attempt}, but the latest dispatch is attempt {}", t.spec.id, t.attempt),
        });
    }
    Ok(())
}

fn add_usage(totals: &mut Totals, usage: &Usage) {
    totals.cost_micros = totals.cost_micros.saturating_add(usage.cost_micros);
    totals.tokens = totals.tokens.saturating_add(usage.tokens);
}

fn count_call(totals: &mut Totals, kind: TaskKind) {
    match kind {
        TaskKind::Llm => totals.llm_calls = totals.llm_calls.saturating_add(1),
        TaskKind::Tool | TaskKind::DataFetch => totals.tool_calls = totals.tool_calls.saturating_add(1),
        TaskKind::HumanReview => {}
    }
}

/// What every `apply` step knows of the event being applied.
struct Cx {
    run: keel_store::RunId,
    kind: &'static str,
    /// The event's recording time (µs).
    at: i64,
}

impl Cx {
    /// The event does not fit the state, for `why`.
    fn invalid(&self, why: String) -> TransitionError {
        TransitionError::Invalid { run: self.run, kind: self.kind, reason: why }
    }
}

/// A plan request must ask for the run's next revision.
fn expect_next_revision(s: &RunState, cx: &Cx, revision: u32) -> Result<(), TransitionError> {
    let want = next_revision(s);
    if revision != want {
        return Err(cx.invalid(format!("revision {revision}, expected {want}")));
    }
    Ok(())
}

/// The run now waits for the planner's revision `revision`, asked for `reason`.
fn begin_planning(s: &mut RunState, revision: u32, reason: &PlanReason) {
    s.planning_revision = Some(revision);
    s.planning_reason = Some(reason.clone());
    s.planning_rejected = false;
}

/// `apply` of `PlanRequested`.
fn plan_requested(
    s: &mut RunState,
    cx: &Cx,
    revision: &mut u32,
    reason: &mut PlanReason,
) -> Result<(), TransitionError> {
    expect_next_revision(s, cx, *revision)?;
    begin_planning(s, *revision, reason);
    Ok(())
}

/// `apply` of `ReplanRequested`.
fn replan_requested(
    s: &mut RunState,
    cx: &Cx,
    revision: &mut u32,
    reason: &mut PlanReason,
) -> Result<(), TransitionError> {
    expect_next_revision(s, cx, *revision)?;
    if let Some(cur) = s.revision {
        if s.status == RunStatus::Running {
            s.history.push(format!("revision {cur}: {}", reason_line(reason)));
        }
    }
    if let PlanReason::Failure(ctx) = reason {
        s.last_failure = Some(ctx.clone());
    }
    if matches!(reason, PlanReason::HumanHint { .. }) {
        s.pending_decision = None;
    }
    begin_planning(s, *revision, reason);
    s.totals.replans = s.totals.replans.saturating_add(1);
    Ok(())
}

/// `apply` of `PlanRejected`.
fn plan_rejected(s: &mut RunState, cx: &Cx, revision: &mut u32, errors: &[String]) -> Result<(), TransitionError> {
    if Some(*revision) != s.planning_revision || s.planning_rejected {
        return Err(cx.invalid(format!("revision {revision} is not the one being planned")));
    }
    s.rejected_plans = s.rejected_plans.saturating_add(1);
    s.planning_rejected = true;
    let why = errors.join("; ");
    s.history.push(format!("revision {revision}: plan rejected: {why}"));
    s.last_failure = Some(crate::model::event::FailureContext {
        task: None,
        handler: None,
        reason: format!("plan rejected: {why}"),
        attempts: 0,
        tried: s.history.clone(),
    });
    Ok(())
}

/// `apply` of `Planned`.
fn planned(s: &mut RunState, cx: &Cx, revision: &mut u32, plan: &mut Plan) -> Result<(), TransitionError> {
    if s.revision.is_some() {
        return Err(cx.invalid("the run already has a plan: a new one is Replanned".to_owned()));
    }
    if Some(*revision) != s.planning_revision || s.planning_rejected {
        return Err(cx.invalid(format!("revision {revision} is not the one being planned")));
    }
    let (tasks, index) = install(plan, &BTreeMap::new(), &BTreeMap::new(), *revision).map_err(|why| cx.invalid(why))?;
    s.tasks = tasks;
    s.task_index = index;
    s.revision = Some(*revision);
    s.planning_revision = None;
    s.planning_reason = None;
    Ok(())
}

/// `apply` of `Replanned`.
fn replanned(
    s: &mut RunState,
    cx: &Cx,
    revision: &mut u32,
    plan: &mut Plan,
    carried_over: &mut Vec<TaskId>,
    superseded: &mut Vec<TaskId>,
) -> Result<(), TransitionError> {
    let kind = cx.kind;

    if s.revision.is_none() {
        return Err(cx.invalid("no plan to replace: the first plan is Planned".to_owned()));
    }
    if Some(*revision) != s.planning_revision || s.planning_rejected {
        return Err(cx.invalid(format!("revision {revision} is not the one being planned")));
    }
    // A replan recorded before a kept task needed its upstream kept too folds as recorded.
    let recorded = |(c, x): &(Vec<TaskId>, Vec<TaskId>)| c == carried_over && x == superseded;
    let want = replan_outcome(s, plan);
    if !recorded(&want) && !recorded(&replan_outcome_same_spec(s, plan)) {
        let (want_carried, want_superseded) = want;
        return Err(cx.invalid(format!(
            "carried_over/superseded do not match the plans: expected {want_carried:?} / {want_superseded:?}"
        )));
    }
    for id in superseded {
        let t = task_ref(s, id, kind)?;
        if task_transition(t.status, TaskTrigger::Superseded).is_none() {
            return Err(illegal_task(s, t, TaskTrigger::Superseded));
        }
    }
    let mut keep = BTreeMap::new();
    for id in carried_over {
        let t = task_ref(s, id, kind)?;
        keep.insert(id.clone(), t.clone());
    }
    let planned_in = unchanged_specs(s, plan);
    let (tasks, index) = install(plan, &keep, &planned_in, *revision).map_err(|why| cx.invalid(why))?;
    s.tasks = tasks;
    s.task_index = index;
    s.revision = Some(*revision);
    s.planning_revision = None;
    s.planning_reason = None;
    Ok(())
}

/// Tasks of the current plan that `plan` keeps with the same id and spec, with the
/// revision their spec was first planned in: their effect key carries over a replan.
fn unchanged_specs(s: &RunState, plan: &Plan) -> BTreeMap<TaskId, u32> {
    let new_specs: BTreeMap<&TaskId, &TaskSpec> = plan.tasks.iter().map(|t| (&t.id, t)).collect();
    s.tasks
        .iter()
        .filter(|t| new_specs.get(&t.spec.id).is_some_and(|spec| **spec == t.spec))
        .map(|t| (t.spec.id.clone(), t.planned_in))
        .collect()
}

/// `apply` of `TaskDispatched`.
// One parameter per field of the variant: they move into the state.
#[allow(clippy::too_many_arguments)]
fn task_dispatched(
    s: &mut RunState,
    cx: &Cx,
    task: &mut TaskId,
    attempt: &mut u32,
    (effect_key, attempt_key): (&mut String, &mut String),
    model: &mut Option<String>,
    input: &mut TaskInput,
    reserved: &mut Usage,
) -> Result<(), TransitionError> {
    let kind = cx.kind;

    let t = task_ref(s, task, kind)?;
    let want = t.attempt.saturating_add(1);
    if *attempt != want {
        return Err(cx.invalid(format!("task {task}: attempt {attempt}, expected {want}")));
    }
    let to_status = task_step(s, t, TaskTrigger::Dispatched)?;
    let t = task_mut(s, task, kind)?;
    t.status = to_status;
    t.attempt = *attempt;
    t.attempt_key = Some(std::mem::take(attempt_key));
    // A dispatch of payload version 1 carries no effect key: derive it as `decide` does.
    t.effect_key = Some(if effect_key.is_empty() {
        super::keys::effect_key(cx.run, task, t.planned_in)
    } else {
        std::mem::take(effect_key)
    });
    t.redeliveries = 0;
    t.redelivery_limit = 0;
    t.model = model.take();
    let empty = TaskInput { input: Json::default(), upstream: BTreeMap::new(), note: None, skipped: Vec::new() };
    t.input = Some(std::mem::replace(input, empty));
    t.reserved = *reserved;
    t.retry_due_us = None;
    Ok(())
}

/// `apply` of `TaskExecuted`.
fn task_executed(
    s: &mut RunState,
    cx: &Cx,
    task: &mut TaskId,
    attempt: &mut u32,
    output: &mut Json,
    usage: &mut Usage,
    cached: &mut bool,
) -> Result<(), TransitionError> {
    let kind = cx.kind;

    let t = task_ref(s, task, kind)?;
    same_attempt(s, t, *attempt, kind)?;
    let to_status = task_step(s, t, TaskTrigger::Executed)?;
    let task_kind = t.spec.kind;
    let t = task_mut(s, task, kind)?;
    t.status = to_status;
    t.output = Some(std::mem::take(output));
    t.cached = *cached;
    // What is left of the reservation covers the evaluation.
    t.reserved = Usage {
        cost_micros: t.reserved.cost_micros.saturating_sub(usage.cost_micros),
        tokens: t.reserved.tokens.saturating_sub(usage.tokens),
    };
    add_usage(&mut s.totals, usage);
    if *cached {
        s.totals.cache_hits = s.totals.cache_hits.saturating_add(1);
    } else {
        count_call(&mut s.totals, task_kind);
    }
    Ok(())
}

/// `apply` of `TaskFailed`.
fn task_failed(
    s: &mut RunState,
    cx: &Cx,
    task: &mut TaskId,
    attempt: &mut u32,
    class: &mut ErrorClass,
    error: &mut String,
    usage: &mut Usage,
) -> Result<(), TransitionError> {
    let kind = cx.kind;

    let t = task_ref(s, task, kind)?;
    same_attempt(s, t, *attempt, kind)?;
    let from = t.status;
    let to_status = task_step(s, t, TaskTrigger::Failed)?;
    let task_kind = t.spec.kind;
    let t = task_mut(s, task, kind)?;
    t.status = to_status;
    t.last_error = Some((*class, std::mem::take(error)));
    t.reserved = Usage::default();
    add_usage(&mut s.totals, usage);
    // A handler call was made only if the task was in flight (not for a gate failure).
    if from == TaskStatus::Dispatched {
        count_call(&mut s.totals, task_kind);
    }
    Ok(())
}

/// `apply` of `RetryScheduled`.
fn retry_scheduled(
    s: &mut RunState,
    cx: &Cx,
    task: &mut TaskId,
    next_attempt: &mut u32,
    delay_ms: &mut u64,
) -> Result<(), TransitionError> {
    let kind = cx.kind;
    let at = cx.at;

    let t = task_ref(s, task, kind)?;
    let want = t.attempt.saturating_add(1);
    if *next_attempt != want {
        return Err(cx.invalid(format!("task {task}: next attempt {next_attempt}, expected {want}")));
    }
    let to_status = task_step(s, t, TaskTrigger::RetryScheduled)?;
    let t = task_mut(s, task, kind)?;
    t.status = to_status;
    t.retry_due_us = Some(at.saturating_add(i64::try_from(*delay_ms).unwrap_or(i64::MAX).saturating_mul(1000)));
    s.totals.retries = s.totals.retries.saturating_add(1);
    Ok(())
}

/// `apply` of `TaskEvaluated`.
fn task_evaluated(
    s: &mut RunState,
    cx: &Cx,
    task: &mut TaskId,
    attempt: &mut u32,
    verdict: &mut Verdict,
    usage: &mut Usage,
    notes: &mut String,
) -> Result<(), TransitionError> {
    let kind = cx.kind;

    let t = task_ref(s, task, kind)?;
    same_attempt(s, t, *attempt, kind)?;
    let trigger = match verdict {
        Verdict::Pass | Verdict::Soft => TaskTrigger::Accepted,
        Verdict::Hard | Verdict::Critical => TaskTrigger::Rejected,
    };
    let to_status = task_step(s, t, trigger)?;
    let t = task_mut(s, task, kind)?;
    t.status = to_status;
    t.verdict = Some(*verdict);
    t.verdict_notes = Some(std::mem::take(notes));
    t.reserved = Usage::default();
    // The evaluation's cost and tokens count (they were reserved with the task);
    // evaluator calls do not draw on the task-call budgets.
    add_usage(&mut s.totals, usage);
    if to_status == TaskStatus::Done {
        release_dependents(s, task);
    }
    Ok(())
}

/// `apply` of `TaskSkipped`.
fn task_skipped(s: &mut RunState, cx: &Cx, task: &mut TaskId, reason: &mut String) -> Result<(), TransitionError> {
    let kind = cx.kind;

    let t = task_ref(s, task, kind)?;
    let to_status = task_step(s, t, TaskTrigger::Skipped)?;
    let t = task_mut(s, task, kind)?;
    t.status = to_status;
    t.skip_reason = Some(std::mem::take(reason));
    t.reserved = Usage::default();
    release_dependents(s, task);
    Ok(())
}

/// `apply` of `TaskRedelivered`: the redelivery of the latest dispatch, numbered in order.
fn task_redelivered(
    s: &mut RunState,
    cx: &Cx,
    task: &TaskId,
    attempt: u32,
    redelivery: u32,
    limit: u32,
) -> Result<(), TransitionError> {
    let t = task_ref(s, task, cx.kind)?;
    same_attempt(s, t, attempt, cx.kind)?;
    let want = t.redeliveries.saturating_add(1);
    if redelivery != want {
        return Err(cx.invalid(format!("task {task}: redelivery {redelivery}, expected {want}")));
    }
    let to_status = task_step(s, t, TaskTrigger::Redelivered)?;
    let t = task_mut(s, task, cx.kind)?;
    t.status = to_status;
    t.redeliveries = redelivery;
    t.redelivery_limit = limit;
    Ok(())
}

/// `apply` of `BudgetExhausted`.
fn budget_exhausted(s: &mut RunState, cx: &Cx, budget: &mut BudgetKind) -> Result<(), TransitionError> {
    if s.exhausted.is_some() {
        return Err(cx.invalid("a budget is already exhausted".to_owned()));
    }
    s.exhausted = Some(*budget);
    Ok(())
}

/// `apply` of `Escalated`.
fn escalated(s: &mut RunState, cx: &Cx, e: &mut Escalation) -> Result<(), TransitionError> {
    let kind = cx.kind;
    let at = cx.at;

    let want = u32::try_from(s.escalations.len()).unwrap_or(u32::MAX).saturating_add(1);
    if e.number != want {
        return Err(cx.invalid(format!("escalation number {}, expected {want}", e.number)));
    }
    if let Some(task) = &e.task {
        task_ref(s, task, kind)?;
    }
    s.escalations.push(EscalationState {
        escalation: e.clone(),
        escalated_at_us: at,
        notified: false,
        resolution: None,
    });
    Ok(())
}

/// `apply` of `EscalationNotified`.
fn escalation_notified(s: &mut RunState, cx: &Cx, number: &mut u32) -> Result<(), TransitionError> {
    let Some(last) = s.escalations.last_mut() else {
        return Err(cx.invalid("no escalation".to_owned()));
    };
    if last.escalation.number != *number || last.notified {
        return Err(cx.invalid(format!("escalation {number} is not the open, unnotified one")));
    }
    last.notified = true;
    Ok(())
}

/// `apply` of `HumanResolved`.
fn human_resolved(
    s: &mut RunState,
    cx: &Cx,
    number: &mut u32,
    decision: &mut Decision,
    by: &mut String,
    defaulted: &mut bool,
) -> Result<(), TransitionError> {
    let kind = cx.kind;

    let Some(last) = s.escalations.last() else {
        return Err(cx.invalid("no escalation".to_owned()));
    };
    if last.escalation.number != *number || last.resolution.is_some() {
        return Err(cx.invalid(format!("escalation {number} is not the open one")));
    }
    let task = last.escalation.task.clone();
    let cause = last.escalation.cause;
    // Work out the task's move before touching anything.
    let task_move = match &task {
        Some(id) => {
            let t = task_ref(s, id, kind)?;
            human_task_move(t, decision, cause).map(|(trigger, output)| {
                let to = task_transition(t.status, trigger);
                (id.clone(), trigger, to, output)
            })
        }
        None => None,
    };
    if let Some((id, trigger, None, _)) = &task_move {
        let t = task_ref(s, id, kind)?;
        return Err(illegal_task(s, t, *trigger));
    }
    if let Some(last) = s.escalations.last_mut() {
        last.resolution = Some((decision.clone(), by.clone(), *defaulted));
    }
    match decision {
        Decision::ReplanWithHint(_) => {
            s.replans_granted = s.replans_granted.saturating_add(1);
            s.pending_decision = Some((decision.clone(), by.clone()));
        }
        Decision::Abort => s.pending_decision = Some((decision.clone(), by.clone())),
        Decision::Approve | Decision::Reject | Decision::SupplyOutput(_) if task.is_none() => {
            s.pending_decision = Some((decision.clone(), by.clone()));
        }
        _ => {}
    }
    if let Some((id, trigger, Some(to_status), output)) = task_move {
        let t = task_mut(s, &id, kind)?;
        t.status = to_status;
        t.reserved = Usage::default();
        if let Some(o) = output {
            t.output = Some(o);
            t.verdict = Some(Verdict::Pass);
        }
        if trigger == TaskTrigger::Skipped {
            t.skip_reason = Some(format!("{} by {by}", decision.name()));
        }
        if matches!(to_status, TaskStatus::Done | TaskStatus::Skipped) {
            release_dependents(s, &id);
        }
    }
    Ok(())
}

/// `apply` of `RunCompleted`: the result is the recorded outputs of the tasks it names,
/// an object by task id (a task with no output, or not in the plan, gives `null`).
fn run_completed(s: &mut RunState, partial: &mut bool, outputs: &mut [TaskId]) -> Result<(), TransitionError> {
    s.partial = *partial;
    s.result = Some(run_result(s, outputs));
    Ok(())
}

/// The result of a run that completed naming `outputs`: canonical JSON of the object
/// `{task id: output}` (what payload version 1 of `RunCompleted` recorded in full).
pub fn run_result(s: &RunState, outputs: &[TaskId]) -> Json {
    let mut result = serde_json::Map::new();
    for id in outputs {
        let output = s.task_index.get(id).and_then(|&i| s.tasks.get(i)).and_then(|t| t.output.as_ref());
        let v = output.and_then(|o| o.value().ok()).unwrap_or(serde_json::Value::Null);
        result.insert(id.0.clone(), v);
    }
    Json::new(&serde_json::Value::Object(result))
}

/// `apply` of `RunFailed`.
fn run_failed(s: &mut RunState, reason: &mut String) -> Result<(), TransitionError> {
    s.failure = Some(std::mem::take(reason));
    s.pending_decision = None;
    Ok(())
}

/// `apply` of `RunCancelled`.
fn run_cancelled(s: &mut RunState, by: &mut String, reason: &mut String) -> Result<(), TransitionError> {
    s.failure = Some(format!("cancelled by {by}: {reason}"));
    Ok(())
}
