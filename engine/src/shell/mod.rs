//! The imperative shell: performs what the core decides, on tokio, and records what it
//! learns as events. Floor 4 of the engine: imports the vocabulary, the core and the
//! plug-in API, never the facade.
//!
//! - [`runtime`]: the shared state every part of the shell holds;
//! - [`queue`]: the run queue (plain data);
//! - [`sched`]: the workers that claim runs from the queue and drive them;
//! - [`shared`]: the run queue of a store shared by several processes (PostgreSQL);
//! - [`driver`]: one driver per run (decide, stage, append, start effects);
//! - [`effects`]: the calls out of the engine (planner, handler, evaluator, sink);
//! - [`calls`]: the pool those calls run on (a blocking callee cannot hold a driver);
//! - [`journal`]: the one place that checks, encodes, appends and snapshots;
//! - [`meter`]: the counters behind `Engine::metrics`, kept at the store seam;
//! - [`lease`]: a driver's run lease and its fenced appends;
//! - [`heartbeat`]: driving a run under its lease, renewed by a heartbeat;
//! - [`oversize`]: what is recorded when an output or a record is over a limit;
//! - [`ingest`]: validating and recording a request;
//! - [`fold`]: reading a run's log back and folding it;
//! - [`index`]: the read models written with the events (run index, open escalations);
//! - [`counts`]: the run counters written with the events (behind `Engine::stats`);
//! - [`subscribe`]: subscriptions to durable appends (a run's events, status changes);
//! - [`cache`]: the response cache.

pub(crate) mod cache;
pub(crate) mod calls;
pub(crate) mod checkpoint;
pub(crate) mod counts;
pub(crate) mod driver;
pub(crate) mod effects;
pub(crate) mod fold;
pub(crate) mod heartbeat;
pub(crate) mod index;
pub(crate) mod ingest;
pub(crate) mod journal;
pub(crate) mod lease;
pub(crate) mod meter;
pub(crate) mod oversize;
pub(crate) mod queue;
pub(crate) mod runtime;
pub(crate) mod sched;
pub(crate) mod shared;
pub(crate) mod subscribe;
