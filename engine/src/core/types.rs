//! The types the pure core speaks: what `decide` reads besides the state ([`Context`],
//! [`Policy`]), what it returns ([`Command`]) and why `apply` refuses an event
//! ([`TransitionError`]).

use crate::model::event::Event;
use crate::model::workflow::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Code-level policy: not recorded in the log, so changing it changes what the engine
/// decides for runs already in flight (`keel replay --check` reports the first such
/// divergence).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Policy {
    /// Replans allowed when the run's budget does not set `replans`.
    pub max_replans: u32,
    /// Skip a failed non-critical task (degrade) instead of escalating.
    pub degrade_noncritical: bool,
    /// Deadline attached to escalations (None: wait forever).
    pub escalation_deadline_ms: Option<u64>,
    /// Decision applied when an escalation's deadline passes.
    pub escalation_default: Option<Decision>,
    /// Size bounds a plan must respect to be recorded.
    pub plan_limits: PlanLimits,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_replans: 2,
            degrade_noncritical: true,
            escalation_deadline_ms: None,
            escalation_default: None,
            plan_limits: PlanLimits::default(),
        }
    }
}

/// Size bounds a plan must respect to be recorded.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PlanLimits {
    /// Tasks of one plan.
    pub tasks_max: usize,
    /// Dependencies of one task.
    pub deps_per_task_max: usize,
    /// Bytes of one task's static input (canonical JSON).
    pub task_input_bytes_max: usize,
    /// Bytes of one task id.
    pub task_id_bytes_max: usize,
    /// A task's `max_attempts`.
    pub attempts_max: u32,
    /// A task's `timeout_ms`.
    pub timeout_ms_max: u64,
    /// A task's `retry.backoff_base_ms` and `retry.backoff_max_ms`.
    pub backoff_ms_max: u64,
    /// A task's `retry.jitter_ms`.
    pub jitter_ms_max: u64,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            tasks_max: 64,
            deps_per_task_max: 16,
            task_input_bytes_max: 16 * 1024,
            task_id_bytes_max: 128,
            attempts_max: 10,
            timeout_ms_max: 3_600_000,
            backoff_ms_max: 3_600_000,
            jitter_ms_max: 60_000,
        }
    }
}

/// What `decide` reads besides the state: the code-level policy and which handlers exist.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The code-level policy (replans, degradation, escalation deadlines, plan limits).
    pub policy: Policy,
    /// Names of registered task handlers (plan validation: "known task types").
    pub handlers: BTreeSet<String>,
}

/// The next step for the shell.
// `Record` is by far the most common command; boxing its event would allocate on every
// decision for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    /// A decision of the core: append this event (not before `not_before_us`, if set),
    /// then decide again. All `Record`s returned by one `decide` call are appended as one
    /// batch, in order.
    Record {
        /// The event to record.
        event: Event,
        /// Not before this time (µs since the epoch): a timer.
        not_before_us: Option<i64>,
    },
    /// Call the planner for `revision` (the run is Planning); validate its plan with
    /// [`crate::core::validate_plan`]; record `Planned`/`Replanned` or `PlanRejected`.
    Plan {
        /// The plan revision.
        revision: u32,
    },
    /// Call the handler of a task whose dispatch is recorded and whose result is not
    /// (also after a restart: same attempt, same idempotency key); record `TaskExecuted`
    /// or `TaskFailed`.
    Execute {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
    },
    /// Call the evaluator on a task's recorded output; record `TaskEvaluated`.
    Evaluate {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
    },
    /// Tell the escalation sink about escalation `number`; record `EscalationNotified`.
    Notify {
        /// The escalation's number.
        number: u32,
    },
}

/// Why an event cannot be applied. Such an event never reaches the log.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The run table has no row for this event kind in the run's state.
    #[error("run {run}: event {kind} is not allowed in run state {state}")]
    IllegalRun {
        /// The run.
        run: keel_store::RunId,
        /// The state it is in.
        state: String,
        /// The event kind.
        kind: &'static str,
    },
    /// The task table has no row for this trigger in the task's state.
    #[error("run {run}: task {task}: {trigger} is not allowed in task state {state}")]
    IllegalTask {
        /// The run.
        run: keel_store::RunId,
        /// The task.
        task: TaskId,
        /// The state it is in.
        state: &'static str,
        /// What was to move it.
        trigger: &'static str,
    },
    /// The event names a task the current plan does not have.
    #[error("run {run}: event {kind} names unknown task {task}")]
    UnknownTask {
        /// The run.
        run: keel_store::RunId,
        /// The task.
        task: TaskId,
        /// The event kind.
        kind: &'static str,
    },
    /// The event contradicts the state (a wrong revision, attempt, escalation number...).
    #[error("run {run}: event {kind}: {reason}")]
    Invalid {
        /// The run.
        run: keel_store::RunId,
        /// The event kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// The event's sequence number is not the run's next one.
    #[error("run {run}: expected sequence {expected}, got {got}")]
    OutOfOrder {
        /// The run.
        run: keel_store::RunId,
        /// The run's next sequence number.
        expected: u64,
        /// The event's.
        got: u64,
    },
}
