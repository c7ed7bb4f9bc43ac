//! The functional core: `apply` folds one logged event into a run's state; `decide` says
//! what to do next; `validate_plan` checks a plan before it is recorded. All pure: no
//! clock, no randomness, no I/O, no hash-map order. Everything from the outside (planner,
//! handler and evaluator answers, human decisions, time) reaches them only as a recorded
//! [`crate::Logged`] event.
//!
//! Floor 2 of the engine: imports only the vocabulary ([`crate::model`]).

mod answer;
mod apply;
mod decide;
mod keys;
mod plan;
/// A deterministic driver of the core with scripted answers (tests, proptests).
pub mod sim;
mod types;

pub use answer::{event_of, Answer, Failure, Judgement, Output};
pub use apply::{apply, apply_mut, apply_take, fold, replan_outcome, replan_outcome_same_spec};
pub use decide::{check_output, decide, QUARANTINED};
pub use keys::{attempt_key, effect_key};
pub use plan::validate_plan;
pub use types::{Command, Context, PlanLimits, Policy, TransitionError};
