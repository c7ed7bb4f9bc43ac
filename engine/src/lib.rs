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
    apply, apply_mut, apply_take, decide, event_of, fold, idempotency_key, replan_outcome, sim, validate_plan, Answer,
    Command, Context, Failure, Judgement, Output, PlanLimits, Policy, TransitionError,
};
pub use api::*;
pub use engine::{Engine, EngineBuilder};
pub use error::EngineError;
pub use keel_store::{RunId, Seq};
pub use model::event::{Escalation, EscalationCause, Event, FailureContext, FailureSource, Logged, PlanReason};
pub use model::fsm::{RunStatus, TaskStatus};
pub use model::state::{EscalationState, RunState, TaskState, Totals};
pub use model::workflow::*;
pub use model::{event, fsm, state};
pub use shell::cache::ResponseCache;
pub use shell::fold::{
    copy_payloads, fold_full, inflated, load_state, prepare_outlined, read_logged, read_logged_runs,
};
pub use shell::ingest::{seed_of, IDEMPOTENCY_KEY_BYTES_MAX};
pub use shell::oversize::{OUTPUT_TOO_LARGE, RECORD_TOO_LARGE, RUN_PAYLOAD_TOO_LARGE};
pub use shell::sched::Workers;
