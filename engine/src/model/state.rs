//! The folded state of a run: what `apply` builds from the log and `decide` reads.
//!
//! Plain data, `BTreeMap` only (iteration order is part of determinism), encodable with
//! bincode so it can be snapshotted. A snapshot starts with [`SNAPSHOT_MAGIC`]: change it
//! whenever the layout of [`RunState`] (or of anything inside it) changes, so a snapshot
//! of an older layout is never decoded as this one (it is skipped; the log is folded).

use crate::model::event::{Escalation, FailureContext};
use crate::model::fsm::{RunStatus, TaskStatus};
use crate::model::workflow::*;
use keel_store::{RunId, Seq};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The first bytes of a snapshot of this layout of [`RunState`] (see the module docs).
/// Snapshots of the first layout had no prefix (they begin with the run id's length, 16).
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"ks\x00\x03";

/// One task of the current plan, as folded from the log.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TaskState {
    /// The task as the plan specifies it.
    pub spec: TaskSpec,
    /// Where the task is in its state machine.
    pub status: TaskStatus,
    /// Attempt of the latest dispatch (0 = never dispatched).
    pub attempt: u32,
    /// Per-attempt key of the latest dispatch (`TaskDispatched::attempt_key`).
    pub attempt_key: Option<String>,
    /// Model the latest dispatch was routed to.
    pub model: Option<String>,
    /// Input of the latest dispatch (what the handler saw).
    pub input: Option<TaskInput>,
    /// Usage reserved by the in-flight dispatch (released when its result is recorded).
    pub reserved: Usage,
    /// Output of the latest execution.
    pub output: Option<Json>,
    /// The latest output came from the response cache.
    pub cached: bool,
    /// The evaluator's verdict on the latest output.
    pub verdict: Option<Verdict>,
    /// The evaluator's notes on the latest verdict (why, for a person deciding).
    pub verdict_notes: Option<String>,
    /// Class and message of the latest failure.
    pub last_error: Option<(ErrorClass, String)>,
    /// Time the pending retry may be dispatched (µs since epoch), from RetryScheduled.
    pub retry_due_us: Option<i64>,
    /// Why it was skipped.
    pub skip_reason: Option<String>,
    /// The plan revision in which this task's current spec was first planned: the
    /// revision of the plan that introduced it, kept by a replan that keeps the task's id
    /// and spec unchanged. The effect key derives from it.
    pub planned_in: u32,
    /// Effect key of the latest dispatch (`TaskDispatched::effect_key`; derived from
    /// `planned_in` for a dispatch recorded before effect keys existed).
    pub effect_key: Option<String>,
    /// Redeliveries of the latest dispatch recorded so far (`TaskRedelivered`).
    pub redeliveries: u32,
    /// The limit recorded on the latest `TaskRedelivered` of the latest dispatch.
    pub redelivery_limit: u32,
}

/// Totals used by budgets and reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Cost spent (micro-units).
    pub cost_micros: u64,
    /// Tokens spent.
    pub tokens: u64,
    /// LLM handler calls made.
    pub llm_calls: u64,
    /// Tool and data-fetch handler calls made.
    pub tool_calls: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Replans asked for.
    pub replans: u64,
    /// Outputs served by the response cache.
    pub cache_hits: u64,
}

/// An escalation as folded: the event plus what happened to it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EscalationState {
    /// The escalation as recorded.
    pub escalation: Escalation,
    /// When it was recorded (µs since the epoch).
    pub escalated_at_us: i64,
    /// The escalation sink was told.
    pub notified: bool,
    /// The decision, who made it, and whether it was the deadline's default.
    pub resolution: Option<(Decision, String, bool)>,
}

/// The folded state of one run.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// The run.
    pub run: RunId,
    /// Next sequence number: the count of events folded.
    pub next_seq: Seq,
    /// Where the run is in its state machine.
    pub status: RunStatus,
    /// Its workflow type.
    pub workflow: String,
    /// The workflow type's version at acceptance.
    pub workflow_version: u32,
    /// The request input.
    pub input: Json,
    /// The request's idempotency key.
    pub idempotency_key: Option<String>,
    /// Priority in the run queue (higher first).
    pub priority: i32,
    /// Seed of every pseudo-random choice of the run.
    pub seed: u64,
    /// The run's limits.
    pub budget: Budget,
    /// What the run does when a budget cannot cover the next step.
    pub on_exhausted: ExhaustionPolicy,
    /// Complexity class -> model, frozen at acceptance.
    pub routes: Vec<(Complexity, String)>,
    /// Model the evaluator runs on.
    pub evaluator_model: Option<String>,
    /// Tasks in flight at once.
    pub max_parallel_tasks: u32,
    /// When the run was accepted (µs since the epoch).
    pub accepted_at_us: i64,
    /// Time of the latest event folded.
    pub last_event_us: i64,
    /// Current plan revision (None before the first plan).
    pub revision: Option<u32>,
    /// Revision being asked for while Planning.
    pub planning_revision: Option<u32>,
    /// Why the current planning round was asked for.
    pub planning_reason: Option<crate::model::event::PlanReason>,
    /// Tasks of the current plan, in plan order (by position; ids index `task_index`).
    pub tasks: Vec<TaskState>,
    /// Task id -> position in `tasks`.
    pub task_index: BTreeMap<TaskId, usize>,
    /// Plans rejected by validation so far (each rejection costs a replan).
    pub rejected_plans: u32,
    /// The plan of the current planning round was rejected; a new round must be asked for.
    pub planning_rejected: bool,
    /// A human decision about the run as a whole that `decide` has not carried out yet
    /// (abort, replan with hint, approve/reject of a run-level escalation), with who decided.
    pub pending_decision: Option<(Decision, String)>,
    /// One line per plan revision that ended, for escalations and the planner.
    pub history: Vec<String>,
    /// The last failure, handed to the planner on a replan.
    pub last_failure: Option<FailureContext>,
    /// Usage so far.
    pub totals: Totals,
    /// Extra replans granted by humans (ReplanWithHint).
    pub replans_granted: u64,
    /// The budget that ran out, if one did.
    pub exhausted: Option<BudgetKind>,
    /// Every escalation of the run, in order.
    pub escalations: Vec<EscalationState>,
    /// The result of a completed run (outputs by task id).
    pub result: Option<Json>,
    /// The run completed with a partial result.
    pub partial: bool,
    /// Why the run failed or was cancelled.
    pub failure: Option<String>,
    /// Bytes of the events folded so far as encoded (bincode of each event, values stored
    /// outside their record counted at full size): what `RunSizeWarning` compares with
    /// its byte threshold. Derived from the log by `apply`, so replay computes the same.
    pub log_bytes: u64,
    /// The latest `RunSizeWarning` recorded, if any.
    pub size_warning: Option<SizeWarning>,
}

/// A run's recorded size warning (`RunSizeWarning`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SizeWarning {
    /// Events in the log when it was recorded.
    pub events: u64,
    /// Bytes of those events ([`RunState::log_bytes`]).
    pub bytes: u64,
    /// The event threshold then.
    pub events_max: u64,
    /// The byte threshold then.
    pub bytes_max: u64,
}

impl SizeWarning {
    /// The event threshold was crossed (a threshold of 0 is off).
    pub fn events_crossed(&self) -> bool {
        self.events_max > 0 && self.events >= self.events_max
    }
    /// The byte threshold was crossed (a threshold of 0 is off).
    pub fn bytes_crossed(&self) -> bool {
        self.bytes_max > 0 && self.bytes >= self.bytes_max
    }
}
