//! keel-engine: a durable state-machine engine for AI-agent workflows.
//!
//! Every run is an explicit finite state machine ([`fsm`]); every transition is an
//! [`Event`] appended to the run's log in keel-store before the engine acts on it. The
//! pure core ([`apply`], [`decide`]) folds the log and says what to do next; the shell
//! ([`Engine`]) performs it on tokio and records what it learns as events.
//!
//! Invariant: this crate talks to storage only through `keel_store::EventLog`; it does
//! not depend on sled.

mod apply;
mod decide;
mod plan;

mod cache;
mod engine;
mod error;
mod executor;
mod ingest;
mod log;
mod sched;

pub mod api;
pub mod core;
pub mod event;
pub mod fsm;
pub mod model;
pub mod sim;
pub mod state;

pub use crate::core::{
    apply, apply_mut, apply_take, decide, fold, replan_outcome, validate_plan, Command, Context, PlanLimits, Policy,
    TransitionError,
};
pub use api::*;
pub use cache::ResponseCache;
pub use engine::{
    Engine, EngineBuilder, IdleReport, PendingEscalation, Request, Resolution, RunSummary, ShellLimits, Submitted,
    TracingSink, WorkflowStats, WorkflowType,
};
pub use error::EngineError;
pub use event::{Escalation, EscalationCause, Event, FailureContext, Logged, PlanReason};
pub use fsm::{RunStatus, TaskStatus};
pub use ingest::{seed_of, IDEMPOTENCY_KEY_BYTES_MAX};
pub use keel_store::{RunId, Seq};
pub use log::{fold_full, load_state, read_logged, read_logged_runs};
pub use model::*;
pub use sched::Workers;
pub use state::{EscalationState, RunState, TaskState, Totals};
