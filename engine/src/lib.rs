#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]
//! keel-engine: a durable state-machine engine for AI-agent workflows.
//!
//! Every run is an explicit finite state machine ([`fsm`]); every transition is an
//! [`Event`] appended to the run's log in keel-store before the engine acts on it. The
//! pure core ([`apply`], [`decide`]) folds the log and says what to do next; the shell
//! ([`Engine`]) performs it on tokio and records what it learns as events.
//!
//! The crate is built in floors whose imports run one way (docs/ARCHITECTURE.md):
//! [`model`] (vocabulary) <- [`core`] (pure rules) <- [`api`] (plug-in traits and API
//! types) <- `shell` (runtime, scheduler, driver, effects, journal, ingestion, fold,
//! cache) <- `engine` (the facade: [`EngineBuilder`], [`Engine`]).
//!
//! Invariant: this crate talks to storage only through `keel_store::EventLog`; it does
//! not depend on sled.
//!
//! # Embedding
//!
//! The snippet of README.md and docs/ENGINE.md, compiled and run by this doc test (the
//! lines starting with `#` are hidden there: a one-task workflow and a temporary
//! directory):
//!
//! ```
//! # use keel_engine::*;
//! # use serde_json::json;
//! # use std::sync::Arc;
//! # struct OneTask;
//! # impl Planner for OneTask {
//! #     fn plan(&self, _req: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
//! #         let plan = Plan { tasks: vec![TaskSpec::new("classify", TaskKind::Llm, "classify")], rationale: "one step".into() };
//! #         Box::pin(async move { Ok(plan) })
//! #     }
//! # }
//! # struct Accept;
//! # impl Evaluator for Accept {
//! #     fn evaluate(&self, _req: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
//! #         Box::pin(async { Ok(Evaluation { verdict: Verdict::Pass, notes: String::new(), usage: Usage::default() }) })
//! #     }
//! # }
//! # struct Classify;
//! # impl TaskHandler for Classify {
//! #     fn call(&self, _call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
//! #         Box::pin(async { Ok(TaskOutput { output: json!({"label": "billing"}), usage: Usage::default() }) })
//! #     }
//! # }
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let data_dir = dir.path().join("keel-data");
//! # let my_workflow_type = WorkflowType::new("support", Arc::new(OneTask), Arc::new(Accept));
//! # let request = Request::new("support", json!({"ticket": "my invoice is wrong"}));
//! let engine = Engine::builder()
//!     .path(&data_dir)                                        // sled
//!     .durability(Durability::GroupCommit(Level::PowerLoss))  // the default
//!     .workflow(my_workflow_type)                             // planner, evaluator, budgets, input schema
//!     .handler("classify", Arc::new(Classify))                // your task handlers
//!     .open()?;
//! let workers = engine.start();                               // on your tokio runtime
//! let submitted = engine.submit(request).await?;              // deduplicated by idempotency key
//! let status = engine.wait(submitted.run).await?;             // its end, without polling
//! # assert_eq!(status, RunStatus::Completed);
//! workers.shutdown().await;
//! # Ok(())
//! # }
//! ```

/// The plug-in traits and the request/response types of the engine's API.
pub mod api;
/// The pure core: `apply`, `decide`, plan validation, answers to events.
pub mod core;
mod engine;
mod error;
/// The vocabulary: workflow data, events, state, state machines, upcasting.
pub mod model;
mod shell;
/// Given / when / then specs of the core (feature `testing`).
#[cfg(feature = "testing")]
pub mod testing;

pub use crate::core::{
    apply, apply_mut, apply_take, attempt_key, decide, effect_key, event_of, fold, replan_outcome,
    replan_outcome_same_spec, sim, validate_plan, Answer, Command, Context, Failure, Judgement, Output, PlanLimits,
    Policy, TransitionError, QUARANTINED,
};
pub use api::*;
pub use engine::{
    Engine, EngineBuilder, QUEUE_POLL_MS_DEFAULT, REDELIVERY_LIMIT_DEFAULT, SIZE_WARNING_BYTES_DEFAULT,
    SIZE_WARNING_EVENTS_DEFAULT,
};
pub use error::EngineError;
pub use keel_store::{Durability, Level, RunId, Seq};
pub use model::event::{
    recent_history, Escalation, EscalationCause, Event, FailureContext, FailureSource, Logged, PlanReason,
    HISTORY_SHOWN,
};
pub use model::fsm::{RunStatus, TaskStatus};
pub use model::state::{EscalationState, RunState, SizeWarning, TaskState, Totals};
pub use model::workflow::*;
pub use model::{event, fsm, state};
pub use shell::cache::ResponseCache;
pub use shell::checkpoint::{
    CheckpointPart, CheckpointRun, HeadSigner, CHECKPOINTS_KEPT, CHECKPOINT_EVERY_MS_DEFAULT, CHECKPOINT_FORMAT,
    CHECKPOINT_PREFIX, CHECKPOINT_RUNS_MAX,
};
/// Signed head checkpoints: the message format, keys and the stored parts.
pub mod checkpoint {
    pub use crate::shell::checkpoint::{message, part_key, stored_parts, write};
}
pub use shell::fold::{
    copy_payloads, encode_snapshot, fold_full, inflated, load_state, prepare_outlined, read_logged, read_logged_runs,
};
pub use shell::index::{reindex_run, removal_writes as index_removal_writes, RunFilter, RunsPage};
pub use shell::ingest::{request_digest, seed_of, IDEMPOTENCY_KEY_BYTES_MAX};
pub use shell::journal::Change;
pub use shell::lease::{LEASE_TTL_MS_DEFAULT, LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN};
pub use shell::meter::{EngineMetrics, ExhaustionCount, VerdictCount, METRIC_SERIES_MAX};
pub use shell::oversize::{OUTPUT_TOO_LARGE, RECORD_TOO_LARGE, RUN_PAYLOAD_TOO_LARGE};
pub use shell::sched::Workers;
pub use shell::subscribe::{Received, RunEvents, Subscription, FOLLOW_BATCH_MAX};
