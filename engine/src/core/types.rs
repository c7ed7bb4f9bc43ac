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
    pub tasks_max: usize,
    pub deps_per_task_max: usize,
    pub task_input_bytes_max: usize,
    pub task_id_bytes_max: usize,
    pub attempts_max: u32,
    pub timeout_ms_max: u64,
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
        }
    }
}

/// What `decide` reads besides the state: the code-level policy and which handlers exist.
#[derive(Clone, Debug, Default)]
pub struct Context {
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
    Record { event: Event, not_before_us: Option<i64> },
    /// Call the planner for `revision` (the run is Planning); validate its plan with
    /// [`crate::core::validate_plan`]; record `Planned`/`Replanned` or `PlanRejected`.
    Plan { revision: u32 },
    /// Call the handler of a task whose dispatch is recorded and whose result is not
    /// (also after a restart: same attempt, same idempotency key); record `TaskExecuted`
    /// or `TaskFailed`.
    Execute { task: TaskId, attempt: u32 },
    /// Call the evaluator on a task's recorded output; record `TaskEvaluated`.
    Evaluate { task: TaskId, attempt: u32 },
    /// Tell the escalation sink about escalation `number`; record `EscalationNotified`.
    Notify { number: u32 },
}

/// Why an event cannot be applied. Such an event never reaches the log.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    #[error("run {run}: event {kind} is not allowed in run state {state}")]
    IllegalRun { run: keel_store::RunId, state: String, kind: &'static str },
    #[error("run {run}: task {task}: {trigger} is not allowed in task state {state}")]
    IllegalTask { run: keel_store::RunId, task: TaskId, state: &'static str, trigger: &'static str },
    #[error("run {run}: event {kind} names unknown task {task}")]
    UnknownTask { run: keel_store::RunId, task: TaskId, kind: &'static str },
    #[error("run {run}: event {kind}: {reason}")]
    Invalid { run: keel_store::RunId, kind: &'static str, reason: String },
    #[error("run {run}: expected sequence {expected}, got {got}")]
    OutOfOrder { run: keel_store::RunId, expected: u64, got: u64 },
}
