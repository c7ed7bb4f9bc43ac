//! The pieces a service plugs into the engine (planner, task handlers, evaluator,
//! escalation sink, clock) and the request/response types of the engine's API.

use crate::model::event::{Escalation, PlanReason};
use crate::model::fsm::RunStatus;
use crate::model::state::Totals;
use crate::model::workflow::*;
use keel_store::RunId;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future: the traits below are object-safe so a service can register
/// `Arc<dyn TaskHandler>` values of different types.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A failure reported by a planner, handler or evaluator.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HandlerError {
    pub class: ErrorClass,
    pub message: String,
    /// Usage spent before failing (a failed LLM call still costs).
    pub usage: Usage,
}

impl HandlerError {
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError { class: ErrorClass::Transient, message: message.into(), usage: Usage::default() }
    }
    pub fn semantic(message: impl Into<String>) -> Self {
        HandlerError { class: ErrorClass::Semantic, message: message.into(), usage: Usage::default() }
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        HandlerError { class: ErrorClass::Fatal, message: message.into(), usage: Usage::default() }
    }
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }
}

/// What the planner is asked.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub run: RunId,
    pub workflow: String,
    pub input: Json,
    pub seed: u64,
    pub revision: u32,
    pub reason: PlanReason,
    /// The plan being replaced, if any.
    pub previous: Option<Plan>,
}

/// Produces plans. An LLM planner is one implementation.
pub trait Planner: Send + Sync + 'static {
    fn plan(&self, request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>>;
}

/// One call of a task handler.
#[derive(Clone, Debug)]
pub struct TaskCall {
    pub run: RunId,
    pub workflow: String,
    /// The run's request input.
    pub run_input: Json,
    pub seed: u64,
    pub task: TaskId,
    pub handler: String,
    pub attempt: u32,
    /// Same on a redelivery after a crash: handlers with side effects dedupe on it.
    pub idempotency_key: String,
    pub model: Option<String>,
    pub input: TaskInput,
    pub timeout_ms: u64,
}

/// What a handler returns.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOutput {
    pub output: serde_json::Value,
    pub usage: Usage,
}

/// Performs tasks of one handler name.
pub trait TaskHandler: Send + Sync + 'static {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>>;
}

/// What the evaluator is asked.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    pub run: RunId,
    pub workflow: String,
    pub run_input: Json,
    pub seed: u64,
    pub task: TaskSpec,
    pub attempt: u32,
    pub output: Json,
    /// Model routed for evaluation (may be cheaper than the worker's).
    pub model: Option<String>,
}

/// The evaluator's judgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub verdict: Verdict,
    pub notes: String,
    pub usage: Usage,
}

/// Judges task outputs against their success criteria.
pub trait Evaluator: Send + Sync + 'static {
    fn evaluate(&self, request: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>>;
}

/// Told when a run needs a human (at least once per escalation, also across restarts).
pub trait EscalationSink: Send + Sync + 'static {
    fn notify(&self, run: RunId, escalation: Escalation) -> BoxFuture<Result<(), String>>;
}

/// Source of time for the shell (never read by the core). Tests inject a fake one.
pub trait Clock: Send + Sync + 'static {
    fn now_us(&self) -> i64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        chrono::Utc::now().timestamp_micros()
    }
}

/// A workflow type: what a request names, with its planner, evaluator, budgets and limits.
#[derive(Clone)]
pub struct WorkflowType {
    pub name: String,
    pub version: u32,
    /// JSON Schema every request input must satisfy (None: any JSON).
    pub input_schema: Option<serde_json::Value>,
    /// Default budget of a run (a request may override it).
    pub budget: Budget,
    pub on_exhausted: ExhaustionPolicy,
    /// Complexity class -> model; frozen into each run at acceptance.
    pub routes: Vec<(Complexity, String)>,
    /// Model the evaluator runs on (may be cheaper than the workers').
    pub evaluator_model: Option<String>,
    /// Runs of this type driven at once (0 = no limit beyond the engine's `workers`).
    pub max_concurrent_runs: usize,
    /// Tasks of one run in flight at once.
    pub max_parallel_tasks: u32,
    /// How long an idempotency key keeps returning the same run.
    pub dedup_window_ms: u64,
    pub planner: Arc<dyn Planner>,
    pub evaluator: Arc<dyn Evaluator>,
}

impl WorkflowType {
    /// A workflow type with default limits: version 1, no input schema, unlimited budget,
    /// partial on exhaustion, no routes, 16 concurrent runs, 4 parallel tasks, 24 h dedup.
    pub fn new(name: impl Into<String>, planner: Arc<dyn Planner>, evaluator: Arc<dyn Evaluator>) -> Self {
        WorkflowType {
            name: name.into(),
            version: 1,
            input_schema: None,
            budget: Budget::default(),
            on_exhausted: ExhaustionPolicy::Partial,
            routes: Vec::new(),
            evaluator_model: None,
            max_concurrent_runs: 16,
            max_parallel_tasks: 4,
            dedup_window_ms: 24 * 3600 * 1000,
            planner,
            evaluator,
        }
    }
}

impl std::fmt::Debug for WorkflowType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowType")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("budget", &self.budget)
            .field("on_exhausted", &self.on_exhausted)
            .field("routes", &self.routes)
            .field("evaluator_model", &self.evaluator_model)
            .field("max_concurrent_runs", &self.max_concurrent_runs)
            .field("max_parallel_tasks", &self.max_parallel_tasks)
            .finish_non_exhaustive()
    }
}

/// A request to start a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub workflow: String,
    pub input: serde_json::Value,
    /// A second request with the same key (within the workflow's dedup window) returns the
    /// first run instead of starting another.
    pub idempotency_key: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Seed of every pseudo-random choice of the run (default: derived from the run id).
    pub seed: Option<u64>,
    /// Per-run budget override (default: the workflow type's).
    pub budget: Option<Budget>,
}

impl Request {
    pub fn new(workflow: impl Into<String>, input: serde_json::Value) -> Self {
        Request { workflow: workflow.into(), input, idempotency_key: None, priority: 0, seed: None, budget: None }
    }
}

/// What `submit` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub run: RunId,
    /// The idempotency key was already claimed: `run` is the existing run.
    pub duplicate: bool,
}

/// A human's answer to an escalation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub decision: Decision,
    /// Who decided (recorded).
    pub by: String,
}

/// What `run_until_idle` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdleReport {
    /// Driver passes made (a run resumed twice counts twice).
    pub driven: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub awaiting_human: usize,
    /// Runs whose driver stopped on an error (store failure, a bug), with the error.
    pub stopped: Vec<(RunId, String)>,
}

/// One line of `runs()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub run: RunId,
    pub workflow: String,
    pub status: RunStatus,
    pub priority: i32,
    pub accepted_at_us: i64,
    pub last_event_us: i64,
    pub events: u64,
    pub cost_micros: u64,
    pub tokens: u64,
    pub partial: bool,
    pub escalations: u32,
}

/// An escalation waiting for a human.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEscalation {
    pub run: RunId,
    pub workflow: String,
    pub escalation: Escalation,
    pub escalated_at_us: i64,
    pub notified: bool,
}

/// Usage and outcomes per workflow type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkflowStats {
    pub workflow: String,
    pub runs: u64,
    pub by_status: BTreeMap<RunStatus, u64>,
    pub partial: u64,
    pub totals: Totals,
    /// `totals.cost_micros / runs` (integer division; 0 without runs).
    pub cost_per_run_micros: u64,
}

/// Size limits of the shell (each with its own error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellLimits {
    /// Canonical JSON bytes of a request input.
    pub input_bytes_max: usize,
    /// Canonical JSON bytes of a handler output (larger: `TaskFailed{Semantic}`); kept well
    /// below the store's 64 KiB event limit because outputs travel on into the inputs of
    /// downstream `TaskDispatched` events.
    pub output_bytes_max: usize,
    /// Bytes kept of a handler's error message.
    pub error_bytes_max: usize,
    /// Entries of the in-memory response cache.
    pub cache_entries_max: usize,
    /// Timeout of one planner call.
    pub planner_timeout_ms: u64,
}

impl Default for ShellLimits {
    fn default() -> Self {
        ShellLimits {
            input_bytes_max: 16 * 1024,
            output_bytes_max: 16 * 1024,
            error_bytes_max: 2 * 1024,
            cache_entries_max: 10_000,
            planner_timeout_ms: 120_000,
        }
    }
}

/// Escalation sink used when none is registered: logs a warning.
#[derive(Debug, Default)]
pub struct TracingSink;

impl EscalationSink for TracingSink {
    fn notify(&self, run: RunId, escalation: Escalation) -> BoxFuture<Result<(), String>> {
        tracing::warn!(%run, number = escalation.number, cause = ?escalation.cause, question = %escalation.question, "run needs a human");
        Box::pin(async { Ok(()) })
    }
}
