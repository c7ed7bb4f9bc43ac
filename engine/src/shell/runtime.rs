//! The shell's shared state: the journal (and through it the log), the registered
//! workflow types and handlers, the clock, the policy and the run queue, behind one `Arc`
//! that the facade, ingestion, the scheduler and the drivers hold. Owned here (not by the
//! facade), so the shell imports nothing from the floor above it.

use crate::api::{Clock, EscalationSink, ShellLimits, TaskHandler, WorkflowType};
use crate::core::Context;
use crate::error::EngineError;
use crate::model::state::RunState;
use crate::shell::cache::ResponseCache;
use crate::shell::calls::CallPool;
use crate::shell::journal::{blocking, Journal};
use crate::shell::lease::Leasing;
use crate::shell::queue::Scheduler;
use keel_store::{RunId, Store};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A registered workflow type with its compiled input schema.
pub(crate) struct Registered {
    pub wf: WorkflowType,
    pub validator: Option<jsonschema::Validator>,
}

/// The shared state of the shell (see the module docs).
pub(crate) struct Inner {
    /// The log, for reads (every write goes through `journal`).
    pub log: Arc<dyn Store>,
    pub journal: Journal,
    /// What `Engine::metrics` reports (every append through `log` is counted).
    pub meter: Arc<crate::shell::meter::Meter>,
    pub workflows: BTreeMap<String, Arc<Registered>>,
    pub handlers: BTreeMap<String, Arc<dyn TaskHandler>>,
    pub sink: Arc<dyn EscalationSink>,
    pub clock: Arc<dyn Clock>,
    pub ctx: Context,
    pub workers: usize,
    pub cache: ResponseCache,
    pub limits: ShellLimits,
    /// Where calls out of the engine run (a blocking callee cannot hold a driver).
    pub calls: CallPool,
    /// Redeliveries of one dispatch before `decide` quarantines its task
    /// (`EngineBuilder::redelivery_limit`); recorded on each `TaskRedelivered`.
    pub redelivery_limit: u32,
    /// Size warning thresholds `(events_max, bytes_max)` (`EngineBuilder::size_warning`;
    /// 0 disables one); recorded on each `RunSizeWarning`.
    pub size_warning: (u64, u64),
    pub sched: Mutex<Scheduler>,
    /// Wakes the service workers (a run was queued or released).
    pub wake: Arc<Notify>,
    /// How drivers take, renew and fence their runs' leases.
    pub leasing: Leasing,
    /// Signed head checkpoints, if the engine holds a signer.
    pub checkpoints: Option<crate::shell::checkpoint::Checkpointing>,
    /// How often the workers poll a shared run queue (`shell::shared`) unwoken.
    pub queue_poll: std::time::Duration,
}

impl Inner {
    pub(crate) fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a blocking store call without stalling other tasks ([`blocking`]).
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, EngineError> + Send + 'static,
    {
        blocking(&self.log, f).await
    }

    /// The run's current state (latest snapshot + tail of the log).
    pub(crate) async fn load(&self, run: RunId) -> Result<Option<RunState>, EngineError> {
        self.journal.load(run).await
    }
}
