//! The vocabulary of the engine: workflow data (plans, tasks, budgets, verdicts), the
//! event catalogue, the folded state of a run and the two state machines as tables.
//!
//! Floor 1 of the engine: imports nothing else of keel-engine.

pub mod event;
pub mod fsm;
pub mod state;
pub mod upcast;
pub mod workflow;
pub use workflow::*;
