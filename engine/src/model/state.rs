//! The folded state of a run: what `apply` builds from the log and `decide` reads.
//!
//! Plain data, `BTreeMap` only (iteration order is part of determinism), encodable with
//! bincode so it can be snapshotted.

use crate::model::event::{Escalation, FailureContext};
use crate::model::fsm::{RunStatus, TaskStatus};
use crate::model::workflow::*;
use keel_store::{RunId, Seq};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One task of the current plan, as folded from the log.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TaskState {
    pub spec: TaskSpec,
    pub status: TaskStatus,
    /// Attempt of the latest dispatch (0 = never dispatched).
    pub attempt: u32,
    /// Idempotency key of the latest dispatch.
    pub idempotency_key: Option<String>,
    /// Model the latest dispatch was routed to.
    pub model: Option<String>,
    /// Input of the latest dispatch (what the handler saw).
    pub input: Option<TaskInput>,
    /// Usage reserved by the in-flight dispatch (released when its result is recorded).
    pub reserved: Usage,
    /// Output of the latest execution.
    pub output: Option<Json>,
    pub cached: bool,
    pub verdict: Option<Verdict>,
    /// The evaluator's notes on the latest verdict (why, for a person deciding).
    pub verdict_notes: Option<String>,
    pub last_error: Option<(ErrorClass, String)>,
    /// Time the pending retry may be dispatched (µs since epoch), from RetryScheduled.
    pub retry_due_us: Option<i64>,
    /// Why it was skipped.
    pub skip_reason: Option<String>,
}

/// Totals used by budgets and reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub cost_micros: u64,
    pub tokens: u64,
    pub llm_calls: u64,
    pub tool_calls: u64,
    pub retries: u64,
    pub replans: u64,
    pub cache_hits: u64,
}

/// An escalation as folded: the event plus what happened to it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EscalationState {
    pub escalation: Escalation,
    pub escalated_at_us: i64,
    pub notified: bool,
    pub resolution: Option<(Decision, String, bool)>,
}

/// The folded state of one run.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub run: RunId,
    /// Next sequence number: the count of events folded.
    pub next_seq: Seq,
    pub status: RunStatus,
    pub workflow: String,
    pub workflow_version: u32,
    pub input: Json,
    pub idempotency_key: Option<String>,
    pub priority: i32,
    pub seed: u64,
    pub budget: Budget,
    pub on_exhausted: ExhaustionPolicy,
    pub routes: Vec<(Complexity, String)>,
    pub evaluator_model: Option<String>,
    pub max_parallel_tasks: u32,
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
    pub totals: Totals,
    /// Extra replans granted by humans (ReplanWithHint).
    pub replans_granted: u64,
    pub exhausted: Option<BudgetKind>,
    pub escalations: Vec<EscalationState>,
    pub result: Option<Json>,
    pub partial: bool,
    pub failure: Option<String>,
}
