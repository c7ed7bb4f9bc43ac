//! The vocabulary of the engine: workflow data (plans, tasks, budgets, verdicts), the
//! event catalogue, the folded state of a run and the two state machines as tables.
//!
//! Floor 1 of the engine: imports nothing else of keel-engine.

/// The event catalogue: every transition of a run.
pub mod event;
/// The run and task state machines, as tables.
pub mod fsm;
/// Large values by reference: payload slots, references, outline and inflate.
pub mod payload;
/// The folded state of a run.
pub mod state;
/// Old payload layouts, read forever.
pub mod upcast;
/// Workflow data: plans, tasks, budgets, verdicts, usage.
pub mod workflow;
pub use workflow::*;
