//! The shell's shared state: the log, the registered workflow types and handlers, the
//! clock, the policy and the scheduler, behind one `Arc` that the facade, ingestion, the
//! scheduler and the drivers hold. Owned here (not by the facade), so the shell imports
//! nothing from the floor above it.

use crate::api::{Clock, EscalationSink, ShellLimits, TaskHandler, WorkflowType};
use crate::core::{apply, Context};
use crate::error::EngineError;
use crate::model::event::{Event, Logged};
use crate::model::state::RunState;
use crate::shell::cache::ResponseCache;
use crate::shell::fold::load_state;
use crate::shell::queue::Scheduler;
use keel_store::{EventLog, RunId, StoreError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(crate) struct Registered {
    pub wf: WorkflowType,
    pub validator: Option<jsonschema::Validator>,
}

pub(crate) struct Inner {
    pub log: Arc<dyn EventLog>,
    pub workflows: BTreeMap<String, Arc<Registered>>,
    pub handlers: BTreeMap<String, Arc<dyn TaskHandler>>,
    pub sink: Arc<dyn EscalationSink>,
    pub clock: Arc<dyn Clock>,
    pub ctx: Context,
    pub snapshot_every: u64,
    pub workers: usize,
    pub cache: ResponseCache,
    pub limits: ShellLimits,
    pub sched: Mutex<Scheduler>,
    /// Wakes the service workers (a run was queued or released).
    pub wake: Notify,
}

impl Inner {
    pub(crate) fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a blocking store call (sled calls block) without stalling other tasks: on a
    /// multi-thread runtime in place (`block_in_place`: this thread does the call while the
    /// runtime moves its other tasks to another thread), so a driver's append needs no
    /// hand-off to the blocking pool and back (two thread wake-ups per append, measured as
    /// most of the engine's overhead per durable step, docs/PERFORMANCE.md); on a
    /// current-thread runtime on the blocking pool. Either way each waiting append holds a
    /// thread, so group commit batches the appends of different runs.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn EventLog) -> Result<T, EngineError> + Send + 'static,
    {
        let log = self.log.clone();
        if matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread)
        ) {
            return tokio::task::block_in_place(move || f(log.as_ref()));
        }
        tokio::task::spawn_blocking(move || f(log.as_ref()))
            .await
            .map_err(|e| EngineError::Internal(format!("store task: {e}")))?
    }

    pub(crate) async fn load(&self, run: RunId) -> Result<Option<RunState>, EngineError> {
        self.blocking(move |log| load_state(log, run)).await
    }

    /// Appends one event decided outside a driver (resolve, cancel) with optimistic
    /// concurrency: `build` sees the current state and returns the event (or a typed
    /// error); on a conflict the state is re-read and `build` asked again.
    pub(crate) async fn append_external(
        &self,
        run: RunId,
        build: impl Fn(&RunState) -> Result<Event, EngineError>,
    ) -> Result<RunState, EngineError> {
        loop {
            let state = self.load(run).await?.ok_or(EngineError::UnknownRun { run })?;
            let event = build(&state)?;
            let at_us = self.clock.now_us().max(state.last_event_us);
            let logged = Logged { run, seq: state.next_seq, at_us, event };
            let next = apply(Some(&state), &logged)?;
            let rec = keel_store::prepare(&logged.event, at_us)?;
            let expected = state.next_seq;
            let every = self.snapshot_every;
            let next2 = next.clone();
            let res = self
                .blocking(move |log| {
                    log.append(run, expected, vec![rec], None)?;
                    crate::shell::fold::maybe_snapshot(log, &next2, expected, every);
                    Ok(())
                })
                .await;
            match res {
                Ok(()) => return Ok(next),
                Err(EngineError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
