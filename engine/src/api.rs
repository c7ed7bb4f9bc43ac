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
    /// How the failure is recovered from (retry, replan, skip or escalate).
    pub class: ErrorClass,
    /// What went wrong, for people (recorded, clipped to `ShellLimits::error_bytes_max`).
    pub message: String,
    /// Usage spent before failing (a failed LLM call still costs).
    pub usage: Usage,
}

impl HandlerError {
    /// A failure worth retrying later (rate limit, timeout, network).
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError { class: ErrorClass::Transient, message: message.into(), usage: Usage::default() }
    }
    /// A failure of the approach (bad output): the run replans.
    pub fn semantic(message: impl Into<String>) -> Self {
        HandlerError { class: ErrorClass::Semantic, message: message.into(), usage: Usage::default() }
    }
    /// A failure that cannot succeed: the task is skipped or the run escalates.
    pub fn fatal(message: impl Into<String>) -> Self {
        HandlerError { class: ErrorClass::Fatal, message: message.into(), usage: Usage::default() }
    }
    /// Records what the call spent before it failed.
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }
}

/// What the planner is asked.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    /// The run being planned.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// The run's request input.
    pub input: Json,
    /// The run's seed (for pseudo-random choices that must replay the same).
    pub seed: u64,
    /// The plan revision asked for (0 = the first plan).
    pub revision: u32,
    /// Why a plan is asked for (first plan, a failure, a human's hint).
    pub reason: PlanReason,
    /// The plan being replaced, if any.
    pub previous: Option<Plan>,
}

/// Produces plans. An LLM planner is one implementation.
pub trait Planner: Send + Sync + 'static {
    /// The plan for `request` (validated by the engine before it is recorded); a transient
    /// error is retried in-process, any other is recorded as a rejected plan.
    fn plan(&self, request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>>;
}

/// One call of a task handler.
#[derive(Clone, Debug)]
pub struct TaskCall {
    /// The run the task belongs to.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// The run's request input.
    pub run_input: Json,
    /// The run's seed.
    pub seed: u64,
    /// The task performed.
    pub task: TaskId,
    /// The handler name the task names.
    pub handler: String,
    /// Attempt number (1 for the first dispatch).
    pub attempt: u32,
    /// The plan revision the task is dispatched under.
    pub revision: u32,
    /// **Dedupe side effects on this key.** The same for every attempt, retry, timeout,
    /// crash and redelivery of this task while its spec is unchanged (a replan that keeps
    /// the task's id and spec keeps it; a changed spec is a new effect with a new key).
    /// A payment posted by attempt 1 that timed out is seen again by attempt 2 under the
    /// same key. Recorded on `TaskDispatched` (docs/ENGINE.md, "The effects contract").
    pub effect_key: String,
    /// This attempt's own key: new on every retry (the same on a redelivery of the attempt
    /// after a crash). For what is per attempt (a per-try request id, a log line); **not**
    /// for deduplicating side effects: a retry after a timeout would repeat the effect.
    pub attempt_key: String,
    /// Model the task was routed to (LLM tasks).
    pub model: Option<String>,
    /// The exact input recorded on `TaskDispatched`.
    pub input: TaskInput,
    /// How long the engine waits for the answer; a late answer is discarded.
    pub timeout_ms: u64,
}

/// What a handler returns.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOutput {
    /// The task's output (checked against its schema before anyone consumes it).
    pub output: serde_json::Value,
    /// What the call spent.
    pub usage: Usage,
}

/// Performs tasks of one handler name.
pub trait TaskHandler: Send + Sync + 'static {
    /// Performs one attempt of a task. May run again for the same attempt after a crash,
    /// and again as a new attempt after a failure or timeout: a handler with a side effect
    /// dedupes on `call.effect_key` (never on `call.attempt_key`).
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>>;
}

/// What the evaluator is asked.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    /// The run whose task is judged.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// The run's request input.
    pub run_input: Json,
    /// The run's seed.
    pub seed: u64,
    /// The task's spec (its success criteria say what to check).
    pub task: TaskSpec,
    /// The attempt whose output is judged.
    pub attempt: u32,
    /// The output to judge.
    pub output: Json,
    /// Model routed for evaluation (may be cheaper than the worker's).
    pub model: Option<String>,
}

/// The evaluator's judgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// Accept (pass, soft) or reject (hard: replan; critical: a human).
    pub verdict: Verdict,
    /// Why, for the planner and a person deciding.
    pub notes: String,
    /// What the evaluation spent.
    pub usage: Usage,
}

/// Judges task outputs against their success criteria.
pub trait Evaluator: Send + Sync + 'static {
    /// Judges one output against the task's success criteria.
    fn evaluate(&self, request: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>>;
}

/// Told when a run needs a human (at least once per escalation, also across restarts).
pub trait EscalationSink: Send + Sync + 'static {
    /// Announces an escalation with its run's context and a handle that resolves it; an
    /// error is retried, then asked again on the next drive.
    fn notify(&self, escalation: EscalationContext) -> BoxFuture<Result<(), String>>;
}

/// What the escalation sink is told: the escalation, the run's context, and a handle to
/// resolve it (e.g. from a chat button), so a sink needs nothing else to act.
#[derive(Clone, Debug)]
pub struct EscalationContext {
    /// The waiting run.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// The run's request input (canonical JSON).
    pub input: Json,
    /// Hex SHA-256 of the input's canonical JSON (to show or match without the input).
    pub input_digest: String,
    /// What the human must decide, with the context to decide it.
    pub escalation: Escalation,
    /// Resolves this escalation ([`Resolver::resolve`]).
    pub resolver: Resolver,
}

/// Resolves one escalation of one run through the engine that announced it, with the
/// checks of `Engine::resolve` (the decision is one of the options, a supplied output
/// passes the task's output schema). Cloneable; holds the engine weakly, so a sink that
/// keeps it does not keep the engine alive (once it is gone: `EscalationClosed`).
#[derive(Clone)]
pub struct Resolver {
    run: RunId,
    number: u32,
    target: std::sync::Weak<dyn ResolveTarget>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("run", &self.run).field("number", &self.number).finish_non_exhaustive()
    }
}

impl Resolver {
    pub(crate) fn new(run: RunId, number: u32, target: std::sync::Weak<dyn ResolveTarget>) -> Resolver {
        Resolver { run, number, target }
    }

    /// The run.
    pub fn run(&self) -> RunId {
        self.run
    }

    /// The escalation it resolves.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Records `resolution` on the escalation, if it is still the run's open one
    /// (`EscalationClosed` otherwise), as `Engine::resolve` does.
    pub async fn resolve(&self, resolution: Resolution) -> Result<(), crate::error::EngineError> {
        match self.target.upgrade() {
            Some(t) => t.resolve(self.run, self.number, resolution).await,
            None => Err(crate::error::EngineError::EscalationClosed { run: self.run, number: self.number }),
        }
    }
}

/// What a [`Resolver`] resolves through (the engine).
pub(crate) trait ResolveTarget: Send + Sync + 'static {
    /// Resolves escalation `number` of `run` (if it is the open one).
    fn resolve(
        self: std::sync::Arc<Self>,
        run: RunId,
        number: u32,
        resolution: Resolution,
    ) -> BoxFuture<Result<(), crate::error::EngineError>>;
}

/// Source of time for the shell (never read by the core). Tests inject a fake one.
pub trait Clock: Send + Sync + 'static {
    /// Now, in µs since the Unix epoch.
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
    /// Name a request gives to start a run of this type.
    pub name: String,
    /// Version recorded on each run (a run resumed under another version is logged).
    pub version: u32,
    /// JSON Schema every request input must satisfy (None: any JSON).
    pub input_schema: Option<serde_json::Value>,
    /// Default budget of a run (a request may override it).
    pub budget: Budget,
    /// What a run does when a budget cannot cover the next step.
    pub on_exhausted: ExhaustionPolicy,
    /// Complexity class -> model; frozen into each run at acceptance.
    pub routes: Vec<(Complexity, String)>,
    /// Model the evaluator runs on (may be cheaper than the workers').
    pub evaluator_model: Option<String>,
    /// Runs of this type driven at once (0 = no limit beyond the engine's `workers`).
    pub max_concurrent_runs: usize,
    /// Tasks of one run in flight at once.
    pub max_parallel_tasks: u32,
    /// How long an idempotency key keeps returning the same run (at least 1 ms:
    /// `EngineBuilder::open` refuses 0, which would let a key expire as it is made).
    pub dedup_window_ms: u64,
    /// Makes the plans of this type's runs.
    pub planner: Arc<dyn Planner>,
    /// Judges task outputs that have success criteria.
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
    /// The workflow type to run.
    pub workflow: String,
    /// The request input (checked against the type's input schema).
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
    /// A request with no idempotency key, priority 0, a seed derived from the run id and the type's budget.
    pub fn new(workflow: impl Into<String>, input: serde_json::Value) -> Self {
        Request { workflow: workflow.into(), input, idempotency_key: None, priority: 0, seed: None, budget: None }
    }
}

/// What `submit` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The run (the existing one for a duplicate).
    pub run: RunId,
    /// The idempotency key was already claimed: `run` is the existing run.
    pub duplicate: bool,
}

/// A human's answer to an escalation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// What the human decided (one of the escalation's options).
    pub decision: Decision,
    /// Who decided (recorded).
    pub by: String,
    /// Why (recorded on `HumanResolved`; the server and `keel resolve` require one).
    pub reason: String,
}

/// What `run_until_idle` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdleReport {
    /// Driver passes made (a run resumed twice counts twice).
    pub driven: usize,
    /// Drives that ended with the run completed.
    pub completed: usize,
    /// Drives that ended with the run failed.
    pub failed: usize,
    /// Drives that ended with the run cancelled.
    pub cancelled: usize,
    /// Drives that ended with the run waiting for a human.
    pub awaiting_human: usize,
    /// Runs whose driver stopped on an error (store failure, a bug), with the error.
    pub stopped: Vec<(RunId, String)>,
    /// Drives that stopped because the run's lease was lost (a renewal failed or an append
    /// was fenced): the run is driven by whoever holds its lease.
    pub lease_lost: usize,
}

/// What happened to an engine's run leases since it was built ([`crate::Engine::lease_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Driver appends refused by the store because the lease's epoch was stale.
    pub fenced: u64,
    /// Heartbeat renewals that failed (the lease was lost, or the store did not answer).
    pub renewals_lost: u64,
    /// Drives stopped for either reason.
    pub drives_lost: u64,
}

/// One line of `runs()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    /// The run.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// Its current status.
    pub status: RunStatus,
    /// Its priority (higher first).
    pub priority: i32,
    /// When it was accepted (µs since the epoch).
    pub accepted_at_us: i64,
    /// When its latest event was recorded (µs since the epoch).
    pub last_event_us: i64,
    /// Events in its log.
    pub events: u64,
    /// Cost spent (micro-units).
    pub cost_micros: u64,
    /// Tokens spent.
    pub tokens: u64,
    /// It finished with a partial result.
    pub partial: bool,
    /// Escalations so far.
    pub escalations: u32,
    /// Its latest size warning (`RunSizeWarning`), if its log crossed a threshold.
    pub size_warning: Option<crate::SizeWarning>,
}

/// An escalation waiting for a human.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEscalation {
    /// The waiting run.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// What the human must decide, with the context to decide it.
    pub escalation: Escalation,
    /// When the run escalated (µs since the epoch).
    pub escalated_at_us: i64,
    /// The escalation sink was told.
    pub notified: bool,
}

/// Usage and outcomes per workflow type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkflowStats {
    /// The workflow type.
    pub workflow: String,
    /// Runs of this type in the log.
    pub runs: u64,
    /// Runs per status.
    pub by_status: BTreeMap<RunStatus, u64>,
    /// Runs that finished with a partial result.
    pub partial: u64,
    /// Usage summed over the runs.
    pub totals: Totals,
    /// `totals.cost_micros / runs` (integer division; 0 without runs).
    pub cost_per_run_micros: u64,
}

/// Size limits of the shell (each with its own error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellLimits {
    /// Canonical JSON bytes of a request input (larger: `submit` refuses it, nothing is
    /// written). Default 1 MiB: an input over 4 KiB is stored in the payload store beside
    /// the log and `RunAccepted` carries its digest and size.
    pub input_bytes_max: usize,
    /// Canonical JSON bytes of a handler output (larger: `TaskFailed { Semantic, source:
    /// Engine, error: "output_too_large" }`). Default 16 MiB: an output over 4 KiB is
    /// stored in the payload store beside the log and events carry its digest and size.
    pub output_bytes_max: usize,
    /// Canonical JSON bytes of the outputs the tasks of a run's current plan hold, the new
    /// one included (an output that would take the run over it: `TaskFailed { Fatal,
    /// source: Engine, error: "run_payload_too_large" }`). Default 256 MiB.
    pub run_payload_bytes_max: usize,
    /// Bytes kept of a handler's error message.
    pub error_bytes_max: usize,
    /// Entries of the in-memory response cache.
    pub cache_entries_max: usize,
    /// Timeout of one planner call.
    pub planner_timeout_ms: u64,
    /// Timeout of one call of the escalation sink (a timeout ends this drive's attempt to
    /// notify; the next drive asks again).
    pub sink_timeout_ms: u64,
    /// Threads of the pool calls out of the engine run on (handlers, planner, evaluator,
    /// sink, of every workflow type): a callee that blocks its thread holds one of them,
    /// never a driver, so as many blocked callees stall every call. At least 1.
    pub call_threads: usize,
}

impl Default for ShellLimits {
    fn default() -> Self {
        ShellLimits {
            input_bytes_max: 1024 * 1024,
            output_bytes_max: 16 * 1024 * 1024,
            run_payload_bytes_max: 256 * 1024 * 1024,
            error_bytes_max: 2 * 1024,
            cache_entries_max: 10_000,
            planner_timeout_ms: 120_000,
            sink_timeout_ms: 10_000,
            call_threads: 4,
        }
    }
}

/// Escalation sink used when none is registered: logs a warning.
#[derive(Debug, Default)]
pub struct TracingSink;

impl EscalationSink for TracingSink {
    fn notify(&self, ctx: EscalationContext) -> BoxFuture<Result<(), String>> {
        let escalation = &ctx.escalation;
        tracing::warn!(run = %ctx.run, workflow = %ctx.workflow, number = escalation.number, cause = ?escalation.cause, question = %escalation.question, "run needs a human");
        Box::pin(async { Ok(()) })
    }
}
