//! The pieces a service plugs into the engine (planner, task handlers, evaluator,
//! escalation sink, clock) and the request/response types of the engine's API.

use crate::event::{Escalation, PlanReason};
use crate::model::*;
use keel_store::RunId;
use std::future::Future;
use std::pin::Pin;

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
