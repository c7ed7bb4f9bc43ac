//! The engine's public face (the top floor): [`EngineBuilder`] and [`Engine`]. It wires
//! the shell together and forwards to it; the types of its API live in [`crate::api`].

use crate::api::{
    Clock, EscalationSink, IdleReport, PendingEscalation, Request, Resolution, ResolveTarget, RunSummary, ShellLimits,
    Submitted, SystemClock, TaskHandler, TracingSink, WorkflowStats, WorkflowType,
};
use crate::core::{Context, Policy};
use crate::error::EngineError;
use crate::model::event::{Event, Logged};
use crate::model::fsm::RunStatus;
use crate::model::state::RunState;
use crate::model::workflow::Decision;
use crate::shell::cache::ResponseCache;
use crate::shell::calls::CallPool;
use crate::shell::fold::{load_state, read_logged};
use crate::shell::index::{IndexEntry, RunFilter, RunsPage};
use crate::shell::journal::Journal;
use crate::shell::lease::{Leasing, LEASE_TTL_MS_DEFAULT, LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN};
use crate::shell::queue::Scheduler;
use crate::shell::runtime::{Inner, Registered};
use crate::shell::sched::Workers;
use crate::shell::subscribe::{RunEvents, Subscription};
use keel_store::{Durability, RunId, Seq, Store};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Opens the sled database at `dir` (the `sled` feature).
#[cfg(feature = "sled")]
fn open_sled(dir: &std::path::Path, durability: Durability) -> Result<Arc<dyn Store>, EngineError> {
    let cfg = keel_store::StoreConfig { durability, ..keel_store::StoreConfig::default() };
    Ok(Arc::new(keel_store::SledStore::open(dir, cfg)?))
}

/// Without the `sled` feature no path can be opened: `path()` does not exist, so this is
/// never reached with a path.
#[cfg(not(feature = "sled"))]
fn open_sled(dir: &std::path::Path, _durability: Durability) -> Result<Arc<dyn Store>, EngineError> {
    Err(EngineError::Config(format!("cannot open {}: keel-engine was built without the sled feature", dir.display())))
}

/// The engine's lease settings, checked (`lease_ttl_ms` within its bounds).
fn lease_settings(ttl_ms: u64, clock: Arc<dyn Clock>) -> Result<Leasing, EngineError> {
    if !(LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX).contains(&ttl_ms) {
        return Err(EngineError::Config(format!(
            "lease_ttl_ms {ttl_ms} is outside {LEASE_TTL_MS_MIN}..={LEASE_TTL_MS_MAX}"
        )));
    }
    Ok(Leasing::new(Leasing::default_owner(), ttl_ms, clock))
}

/// How often workers poll a shared run queue by default, in milliseconds
/// ([`EngineBuilder::queue_poll_ms`]).
pub const QUEUE_POLL_MS_DEFAULT: u64 = 250;

/// Redeliveries of one dispatch allowed by default ([`EngineBuilder::redelivery_limit`]).
pub const REDELIVERY_LIMIT_DEFAULT: u32 = 3;

/// Events in a run's log past which a `RunSizeWarning` is recorded by default
/// ([`EngineBuilder::size_warning`]).
pub const SIZE_WARNING_EVENTS_DEFAULT: u64 = 10_000;

/// Bytes of a run's events ([`crate::RunState::log_bytes`]) past which a `RunSizeWarning`
/// is recorded by default: 64 MiB.
pub const SIZE_WARNING_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Builds an [`Engine`].
pub struct EngineBuilder {
    path: Option<PathBuf>,
    store: Option<Arc<dyn Store>>,
    durability: Durability,
    workflows: Vec<WorkflowType>,
    handlers: BTreeMap<String, Arc<dyn TaskHandler>>,
    sink: Option<Arc<dyn EscalationSink>>,
    clock: Arc<dyn Clock>,
    policy: Policy,
    snapshot_every: u64,
    workers: usize,
    limits: ShellLimits,
    redelivery_limit: u32,
    size_warning: (u64, u64),
    lease_ttl_ms: u64,
    lease_clock: Arc<dyn Clock>,
    checkpoint_signer: Option<Arc<dyn crate::shell::checkpoint::HeadSigner>>,
    checkpoint_every_ms: u64,
    queue_poll_ms: u64,
}

impl EngineBuilder {
    /// How long a driver's run lease lasts unless renewed (a heartbeat renews it every
    /// third of that while the run is driven); default 10 s, within 30 ms..=1 day. Engines
    /// of several processes sharing a store must agree on it only roughly: a driver paused
    /// past it is fenced (docs/ENGINE.md, "Leases").
    pub fn lease_ttl_ms(mut self, ms: u64) -> Self {
        self.lease_ttl_ms = ms;
        self
    }
    /// With a store whose run queue is shared by several processes (PostgreSQL): how often
    /// the workers look at the queue when no notification woke them (a lost notification,
    /// a lease expired with its worker); default 250 ms, within 1 ms..=1 day.
    pub fn queue_poll_ms(mut self, ms: u64) -> Self {
        self.queue_poll_ms = ms;
        self
    }
    /// The clock lease expiries are read on (default: the system clock, whatever
    /// [`EngineBuilder::clock`] is; tests move it to simulate a pause past the lease).
    pub fn lease_clock(mut self, c: Arc<dyn Clock>) -> Self {
        self.lease_clock = c;
        self
    }
    /// Store the log in a sled database at `dir` (created if missing). Needs the `sled`
    /// feature (on by default); without it, open a store yourself and pass it to
    /// [`EngineBuilder::store`].
    #[cfg(feature = "sled")]
    pub fn path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.path = Some(dir.into());
        self
    }
    /// Use this event log (e.g. `MemStore` in tests) instead of a sled database.
    pub fn store(mut self, log: Arc<dyn Store>) -> Self {
        self.store = Some(log);
        self
    }
    /// Durability of a sled store opened with [`EngineBuilder::path`] (default group commit,
    /// power-loss level). Ignored with [`EngineBuilder::store`].
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }
    /// Registers a workflow type (names must be unique).
    pub fn workflow(mut self, w: WorkflowType) -> Self {
        self.workflows.push(w);
        self
    }
    /// Registers the handler of tasks that name `name`.
    pub fn handler(mut self, name: &str, h: Arc<dyn TaskHandler>) -> Self {
        self.handlers.insert(name.to_owned(), h);
        self
    }
    /// Where escalations are announced (default: a tracing warning).
    pub fn escalation_sink(mut self, s: Arc<dyn EscalationSink>) -> Self {
        self.sink = Some(s);
        self
    }
    /// The shell's clock (default: the system clock; tests inject a fake one).
    pub fn clock(mut self, c: Arc<dyn Clock>) -> Self {
        self.clock = c;
        self
    }
    /// The code-level policy `decide` runs with.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }
    /// Save a snapshot of a run's folded state every `events` events (0: never). Default 64.
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = events;
        self
    }
    /// Runs driven at once, across workflow types. Default 8.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// The shell's size limits and the planner timeout.
    pub fn limits(mut self, l: ShellLimits) -> Self {
        self.limits = l;
        self
    }

    /// Redeliveries allowed per dispatch (default [`REDELIVERY_LIMIT_DEFAULT`]): a task
    /// found dispatched with no result by a driver that did not dispatch it (its process
    /// died or stopped) is recorded as `TaskRedelivered` and handed to its handler again,
    /// at most this many times; the next time, `decide` fails it as fatal (`quarantined`)
    /// and the ordinary recovery takes over. The limit is recorded on each
    /// `TaskRedelivered`, so replay does not depend on it.
    pub fn redelivery_limit(mut self, n: u32) -> Self {
        self.redelivery_limit = n;
        self
    }

    /// Thresholds of the size warning (defaults [`SIZE_WARNING_EVENTS_DEFAULT`] events,
    /// [`SIZE_WARNING_BYTES_DEFAULT`] bytes): once a run's log holds at least `events_max`
    /// events, or `bytes_max` bytes of events ([`crate::RunState::log_bytes`]), a driver
    /// records one `RunSizeWarning` per threshold crossed (the thresholds recorded in it,
    /// so replay does not depend on them). It changes nothing about the run. 0 disables a
    /// threshold.
    pub fn size_warning(mut self, events_max: u64, bytes_max: u64) -> Self {
        self.size_warning = (events_max, bytes_max);
        self
    }

    /// Sign head checkpoints with `signer`: every run's record count and head hash,
    /// written at the end of [`Engine::run_until_idle`] and every
    /// [`EngineBuilder::checkpoint_every_ms`] by service workers ([`Engine::start`]) and
    /// when they stop. `keel verify --key PUB` checks every run's chain against them
    /// (docs/AUDIT.md).
    pub fn checkpoint_signer(mut self, signer: Arc<dyn crate::shell::checkpoint::HeadSigner>) -> Self {
        self.checkpoint_signer = Some(signer);
        self
    }

    /// Interval between signed checkpoints of service workers (default one minute, at
    /// least 1 ms); only with [`EngineBuilder::checkpoint_signer`].
    pub fn checkpoint_every_ms(mut self, ms: u64) -> Self {
        self.checkpoint_every_ms = ms;
        self
    }

    /// Checks the configuration, then opens the store: a configuration error creates
    /// nothing (no database directory is made for an engine that cannot start).
    pub fn open(self) -> Result<Engine, EngineError> {
        if matches!((&self.path, &self.store), (Some(_), Some(_))) {
            return Err(EngineError::Config("both path() and store() given".into()));
        }
        if matches!((&self.path, &self.store), (None, None)) {
            return Err(EngineError::Config("no store: call path() or store()".into()));
        }
        if self.workers == 0 {
            return Err(EngineError::Config("workers must be at least 1".into()));
        }
        if self.limits.call_threads == 0 {
            return Err(EngineError::Config("call_threads must be at least 1".into()));
        }
        let mut workflows = BTreeMap::new();
        for w in self.workflows {
            if w.name.is_empty() || w.name.contains('\0') {
                return Err(EngineError::Config(format!("workflow name {:?} is empty or contains NUL", w.name)));
            }
            if w.max_parallel_tasks == 0 {
                return Err(EngineError::Config(format!("workflow {}: max_parallel_tasks must be at least 1", w.name)));
            }
            if w.dedup_window_ms == 0 {
                return Err(EngineError::Config(format!(
                    "workflow {}: dedup_window_ms must be at least 1 (an idempotency key would expire as it is made)",
                    w.name
                )));
            }
            let validator = match &w.input_schema {
                None => None,
                Some(s) => Some(
                    jsonschema::validator_for(s)
                        .map_err(|e| EngineError::Config(format!("workflow {}: invalid input schema: {e}", w.name)))?,
                ),
            };
            let name = w.name.clone();
            if workflows.insert(name.clone(), Arc::new(Registered { wf: w, validator })).is_some() {
                return Err(EngineError::Config(format!("workflow {name} registered twice")));
            }
        }
        let leasing = lease_settings(self.lease_ttl_ms, self.lease_clock)?;
        if !(1..=LEASE_TTL_MS_MAX).contains(&self.queue_poll_ms) {
            return Err(EngineError::Config(format!(
                "queue_poll_ms {} is outside 1..={LEASE_TTL_MS_MAX}",
                self.queue_poll_ms
            )));
        }
        if self.checkpoint_every_ms == 0 {
            return Err(EngineError::Config("checkpoint_every_ms must be at least 1".into()));
        }
        // The journal checks event sizes against the limits the store was opened with.
        let log: Arc<dyn Store> = match (self.path, self.store) {
            (None, Some(s)) => s,
            (Some(p), _) => open_sled(&p, self.durability)?,
            (None, None) => return Err(EngineError::Config("no store: call path() or store()".into())),
        };
        let store_limits = log.limits();
        // Every append through the engine's store is counted (Engine::metrics).
        let (log, meter) = crate::shell::meter::observe(log);
        let ctx = Context { policy: self.policy, handlers: self.handlers.keys().cloned().collect() };
        let cache = ResponseCache::with_store(self.limits.cache_entries_max, log.clone());
        let journal = Journal::new(log.clone(), store_limits, self.snapshot_every);
        // The read models: built from the log once if this database has none yet.
        crate::shell::index::ensure(log.as_ref())?;
        let calls = CallPool::new(self.limits.call_threads)?;
        let checkpoints = self.checkpoint_signer.map(|signer| crate::shell::checkpoint::Checkpointing {
            signer,
            every_ms: self.checkpoint_every_ms,
            last: Mutex::new(None),
        });
        let inner = Inner {
            log,
            journal,
            meter,
            workflows,
            handlers: self.handlers,
            sink: self.sink.unwrap_or_else(|| Arc::new(TracingSink)),
            clock: self.clock,
            ctx,
            workers: self.workers,
            cache,
            limits: self.limits,
            calls,
            redelivery_limit: self.redelivery_limit,
            size_warning: self.size_warning,
            sched: Mutex::new(Scheduler::default()),
            wake: Arc::new(Notify::new()),
            leasing,
            checkpoints,
            queue_poll: std::time::Duration::from_millis(self.queue_poll_ms),
        };
        Ok(Engine { inner: Arc::new(inner) })
    }
}

/// The engine: a handle to the log, the registered workflow types and handlers, and the
/// scheduler. Cheap to clone (an `Arc` inside); `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workflows", &self.inner.workflows.keys().collect::<Vec<_>>())
            .field("handlers", &self.inner.handlers.keys().collect::<Vec<_>>())
            .field("workers", &self.inner.workers)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder with defaults: no store yet, 8 workers, snapshots every 64 events.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            path: None,
            store: None,
            durability: Durability::default(),
            workflows: Vec::new(),
            handlers: BTreeMap::new(),
            sink: None,
            clock: Arc::new(SystemClock),
            policy: Policy::default(),
            snapshot_every: 64,
            workers: 8,
            limits: ShellLimits::default(),
            redelivery_limit: REDELIVERY_LIMIT_DEFAULT,
            size_warning: (SIZE_WARNING_EVENTS_DEFAULT, SIZE_WARNING_BYTES_DEFAULT),
            lease_ttl_ms: LEASE_TTL_MS_DEFAULT,
            lease_clock: Arc::new(SystemClock),
            checkpoint_signer: None,
            checkpoint_every_ms: crate::shell::checkpoint::CHECKPOINT_EVERY_MS_DEFAULT,
            queue_poll_ms: QUEUE_POLL_MS_DEFAULT,
        }
    }

    /// Validates and records a request (`RunAccepted`), then queues the run. Nothing is
    /// written for an unknown workflow type or an invalid input. A request whose
    /// idempotency key is already held (within the workflow type's dedup window) returns
    /// the existing run with `duplicate: true` if it is the same request (workflow, input,
    /// priority: [`crate::request_digest`]), and `IdempotencyConflict` if it is not.
    pub async fn submit(&self, req: Request) -> Result<Submitted, EngineError> {
        let inner = self.inner.clone();
        to_the_end(async move { crate::shell::ingest::submit(&inner, req).await }).await
    }

    /// The run that holds idempotency key `key` of workflow type `workflow`, if the key is
    /// still within the type's dedup window (`WorkflowType::dedup_window_ms`; after it,
    /// `None`, and a request with the key starts a new run).
    pub async fn run_by_key(&self, workflow: &str, key: &str) -> Result<Option<RunId>, EngineError> {
        crate::shell::ingest::run_by_key(&self.inner, workflow, key).await
    }

    /// Resumes every non-terminal run from its log and drives all runnable runs (highest
    /// priority first, then oldest; within the concurrency limits) until each is terminal
    /// or waiting for a human. Waits for retry backoffs; applies escalation deadline
    /// defaults that are already due; does not wait for future escalation deadlines.
    pub async fn run_until_idle(&self) -> Result<IdleReport, EngineError> {
        let report = crate::shell::sched::run_until_idle(&self.inner).await?;
        if let Some(c) = &self.inner.checkpoints {
            c.write_now(self.inner.log.as_ref(), self.inner.clock.now_us())?;
        }
        Ok(report)
    }

    /// Starts background workers that resume every non-terminal run, drive runs as they
    /// are submitted or resolved, and apply escalation deadlines when they fall due.
    /// Must be called inside a tokio runtime. Stop them with [`Workers::shutdown`].
    pub fn start(&self) -> Workers {
        crate::shell::sched::start(self.inner.clone())
    }

    /// Records a human's decision on the run's open escalation and queues the run. The
    /// decision must be one of the escalation's options (`InvalidDecision`); a supplied
    /// output must pass the escalated task's output schema (`SuppliedOutputRejected`).
    /// Nothing is written on an error.
    pub async fn resolve(&self, run: RunId, r: Resolution) -> Result<(), EngineError> {
        let inner = self.inner.clone();
        to_the_end(async move { resolve_in(&inner, run, None, r).await }).await
    }

    /// Cancels a run: records `RunCancelled`; a driver working on it stops and drops the
    /// results of its in-flight calls.
    pub async fn cancel(&self, run: RunId, by: &str, reason: &str) -> Result<(), EngineError> {
        let (inner, by, reason) = (self.inner.clone(), by.to_owned(), reason.to_owned());
        to_the_end(async move {
            inner
                .journal
                .append_outside(
                    run,
                    || inner.clock.now_us(),
                    |state| {
                        if state.status.is_terminal() {
                            return Err(EngineError::AlreadyTerminal { run, status: state.status });
                        }
                        Ok(Event::RunCancelled { by: by.clone(), reason: reason.clone() })
                    },
                )
                .await?;
            crate::shell::sched::poke(&inner, run);
            Ok(())
        })
        .await
    }

    /// The run's current state (latest snapshot + tail of the log).
    pub fn state(&self, run: RunId) -> Result<RunState, EngineError> {
        load_state(self.inner.log.as_ref(), run)?.ok_or(EngineError::UnknownRun { run })
    }

    /// The run's whole log.
    pub fn events(&self, run: RunId) -> Result<Vec<Logged>, EngineError> {
        let events = read_logged(self.inner.log.as_ref(), run, Seq(0))?.collect::<Result<Vec<_>, _>>()?;
        if events.is_empty() {
            return Err(EngineError::UnknownRun { run });
        }
        Ok(events)
    }

    /// One summary per run in the log, in run id order. Reads the run index: O(runs)
    /// index entries, plus the snapshot and tail of each run not finished (not
    /// O(history)). Blocking (reads the store); [`Engine::runs_page`] reads one page.
    pub fn runs(&self) -> Result<Vec<RunSummary>, EngineError> {
        Ok(self.runs_page(&RunFilter::default(), None, usize::MAX)?.runs)
    }

    /// Up to `limit` runs matching `filter` with ids after `after`, in run id order, and
    /// the cursor of the next page (the last run's id, if more follow). Reads O(page)
    /// entries of the run index (docs/ENGINE.md, "Read models"); a run not finished is
    /// brought up to date from its snapshot and tail. Blocking (reads the store): on an
    /// async runtime call it from `spawn_blocking`, or use [`Engine::runs_page_async`].
    pub fn runs_page(&self, filter: &RunFilter, after: Option<RunId>, limit: usize) -> Result<RunsPage, EngineError> {
        runs_page_in(self.inner.log.as_ref(), filter, after, limit)
    }

    /// [`Engine::runs_page`] without blocking the runtime.
    pub async fn runs_page_async(
        &self,
        filter: RunFilter,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<RunsPage, EngineError> {
        self.inner.blocking(move |log| runs_page_in(log, &filter, after, limit)).await
    }

    /// Every escalation waiting for a human, in run id order: the open-escalation entries
    /// of the run index, written with the events that opened them (O(open escalations)
    /// index entries; no run is folded, except one whose escalation was too large for
    /// its entry). Blocking (reads the store).
    pub fn escalations(&self) -> Result<Vec<PendingEscalation>, EngineError> {
        let log = self.inner.log.as_ref();
        let mut out = Vec::new();
        for (run, open) in crate::shell::index::open_escalations(log)? {
            let pending = match open.escalation {
                Some(escalation) => Some(PendingEscalation {
                    run,
                    workflow: open.workflow,
                    escalation,
                    escalated_at_us: open.escalated_at_us,
                    notified: open.notified,
                }),
                None => pending_from_log(log, run)?,
            };
            out.extend(pending);
        }
        Ok(out)
    }

    /// Runs by status, usage totals and cost per run, per workflow type (name order). From
    /// the run counters kept on commit (`shell::counts`): O(workflow types), plus the
    /// snapshot and tail of each run not finished (their usage is not counted). Blocking
    /// (reads the store).
    pub fn stats(&self) -> Result<Vec<WorkflowStats>, EngineError> {
        let log = self.inner.log.as_ref();
        let mut unfinished = Vec::new();
        for status in RunStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            unfinished.extend(crate::shell::index::runs_in(log, status)?);
        }
        crate::shell::counts::stats(log, &unfinished)
    }

    /// What this engine counted since it opened: appends and their latency, events
    /// recorded by kind, verdicts by workflow and task, budget exhaustions, and the
    /// store's flushes (docs/ENGINE.md, "Metrics"). Reading it costs no store scan.
    pub fn metrics(&self) -> crate::EngineMetrics {
        self.inner.meter.snapshot()
    }

    /// Every durable append made through this engine from now on ([`crate::Change`]: run,
    /// status before and after, next seq), without polling. Bounded: a subscriber that
    /// falls behind gets [`crate::Received::Lagged`] and re-reads what it needs. On a store
    /// other processes append to ([`Engine::is_shared`]) their appends are not in it.
    pub fn subscribe(&self) -> Subscription {
        Subscription::new(self.inner.journal.subscribe())
    }

    /// Whether other processes may append to this engine's store (a shared run queue:
    /// PostgreSQL): their appends reach [`Engine::follow`] and [`Engine::wait`] by a read
    /// of the store while nothing local wakes them (after `queue_poll_ms`, then less often
    /// while the run is quiet, at least every 2 s), and are not in
    /// [`Engine::subscribe`].
    pub fn is_shared(&self) -> bool {
        crate::shell::shared::is_shared(&self.inner)
    }

    /// A live tail of `run`'s events after seq `after` (`None`: from the first):
    /// [`RunEvents::next`] returns the recorded ones, then each new one once durable, and
    /// ends when the run is finished. Never misses nor repeats an event (a lagging
    /// follower re-reads the log from its seq). On a shared store ([`Engine::is_shared`])
    /// the events another process appends come with the next read of the store: after
    /// `queue_poll_ms` (default 250 ms), then less often while the run is quiet (every 2 s
    /// at least).
    pub fn follow(&self, run: RunId, after: Option<Seq>) -> RunEvents {
        RunEvents::new(self.inner.clone(), run, after)
    }

    /// Waits until `run` is finished (Completed, Failed or Cancelled), without polling;
    /// returns its final status. `UnknownRun` for a run with no events.
    pub async fn wait(&self, run: RunId) -> Result<RunStatus, EngineError> {
        crate::shell::subscribe::wait_until(&self.inner, run, RunStatus::is_terminal).await
    }

    /// Waits until `run`'s status satisfies `done` (e.g. `AwaitingHuman`); returns it.
    pub async fn wait_until(&self, run: RunId, done: impl Fn(RunStatus) -> bool) -> Result<RunStatus, EngineError> {
        crate::shell::subscribe::wait_until(&self.inner, run, done).await
    }

    /// What happened to this engine's run leases: appends fenced, renewals lost, drives
    /// stopped for either (docs/ENGINE.md, "Leases").
    pub fn lease_stats(&self) -> crate::api::LeaseStats {
        self.inner.leasing.stats()
    }

    /// The event log (e.g. to export a run while the engine runs).
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.log.clone()
    }

    /// The policy and registered handler names `decide` runs with (for `replay --check`).
    pub fn context(&self) -> Context {
        self.inner.ctx.clone()
    }

    /// Names of the registered workflow types.
    pub fn workflows(&self) -> Vec<String> {
        self.inner.workflows.keys().cloned().collect()
    }
}

/// The open escalation of `run`, folded from its log (an escalation too large for its
/// index entry).
fn pending_from_log(log: &dyn keel_store::Store, run: RunId) -> Result<Option<PendingEscalation>, EngineError> {
    let Some(s) = load_state(log, run)? else { return Ok(None) };
    if s.status != RunStatus::AwaitingHuman {
        return Ok(None);
    }
    Ok(s.escalations.iter().rev().find(|e| e.resolution.is_none()).map(|e| PendingEscalation {
        run,
        workflow: s.workflow.clone(),
        escalation: e.escalation.clone(),
        escalated_at_us: e.escalated_at_us,
        notified: e.notified,
    }))
}

/// The index entry of `run`, brought up to date from its snapshot and tail if the run is
/// not finished (its entry is as of its last status change).
fn current(log: &dyn keel_store::Store, run: RunId, e: IndexEntry) -> Result<IndexEntry, EngineError> {
    if e.status.is_terminal() {
        return Ok(e);
    }
    Ok(load_state(log, run)?.map_or(e, |s| IndexEntry::of(&s)))
}

fn runs_page_in(
    log: &dyn keel_store::Store,
    filter: &RunFilter,
    after: Option<RunId>,
    limit: usize,
) -> Result<RunsPage, EngineError> {
    let (entries, more) = crate::shell::index::page(log, filter, after, limit)?;
    let next_cursor = if more { entries.last().map(|(r, _)| *r) } else { None };
    let mut runs = Vec::with_capacity(entries.len());
    for (run, e) in entries {
        let e = current(log, run, e)?;
        runs.push(RunSummary {
            run,
            workflow: e.workflow,
            status: e.status,
            priority: e.priority,
            accepted_at_us: e.accepted_at_us,
            last_event_us: e.last_event_us,
            events: e.events,
            cost_micros: e.totals.cost_micros,
            tokens: e.totals.tokens,
            partial: e.partial,
            escalations: e.escalations,
            size_warning: e.size_warning,
        });
    }
    Ok(RunsPage { runs, next_cursor })
}

/// Records `r` on the open escalation of `run` (if `number` is given, only if that is the
/// open one: `EscalationClosed` otherwise) and queues the run: [`Engine::resolve`] and
/// [`crate::Resolver::resolve`].
/// Runs `op` to its end on a task of its own, whatever becomes of the caller: a caller that
/// stops waiting (an HTTP client that hung up, a `timeout`) must not cut a submit, a
/// resolution or a cancellation between its durable append and what follows it (queueing
/// the run, waking its driver, telling subscribers). With appends awaited (PostgreSQL) a
/// dropped caller did so: the run was recorded but neither queued nor announced.
async fn to_the_end<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::spawn(op).await.map_err(|e| EngineError::Internal(format!("the operation's task: {e}")))?
}

async fn resolve_in(inner: &Inner, run: RunId, number: Option<u32>, r: Resolution) -> Result<(), EngineError> {
    let Resolution { decision, by, reason } = r;
    crate::shell::ingest::check_decision_depth(&decision)?;
    inner
        .journal
        .append_outside(
            run,
            || inner.clock.now_us(),
            |state| {
                let open = state.escalations.iter().rev().find(|e| e.resolution.is_none());
                let open = match (open, number) {
                    (Some(open), Some(n)) if open.escalation.number != n => None,
                    (open, _) => open,
                };
                if let (None, Some(number)) = (open, number) {
                    return Err(EngineError::EscalationClosed { run, number });
                }
                if state.status != RunStatus::AwaitingHuman {
                    return Err(EngineError::NotAwaitingHuman { run, status: state.status });
                }
                let Some(open) = open else {
                    return Err(EngineError::NotAwaitingHuman { run, status: state.status });
                };
                let esc = &open.escalation;
                if !esc.options.is_empty() && !esc.options.iter().any(|o| o == decision.name()) {
                    return Err(EngineError::InvalidDecision {
                        run,
                        number: esc.number,
                        decision: decision.name().to_owned(),
                        options: esc.options.clone(),
                    });
                }
                supplied_output_gate(state, esc, &decision)?;
                Ok(Event::HumanResolved {
                    number: esc.number,
                    decision: decision.clone(),
                    by: by.clone(),
                    defaulted: false,
                    reason: reason.clone(),
                })
            },
        )
        .await?;
    crate::shell::sched::poke(inner, run);
    Ok(())
}

/// A supplied output passes the escalated task's output schema, the gate a handler's
/// output passes, before anything is recorded.
fn supplied_output_gate(
    state: &RunState,
    esc: &crate::model::event::Escalation,
    decision: &Decision,
) -> Result<(), EngineError> {
    let (Decision::SupplyOutput(output), Some(task)) = (decision, &esc.task) else {
        return Ok(());
    };
    let Some(t) = state.task_index.get(task).and_then(|&i| state.tasks.get(i)) else {
        return Ok(());
    };
    crate::core::check_output(&t.spec, output).map_err(|(code, detail)| EngineError::SuppliedOutputRejected {
        run: state.run,
        task: task.clone(),
        code: code.to_owned(),
        detail,
    })
}

impl ResolveTarget for Inner {
    fn resolve(
        self: Arc<Self>,
        run: RunId,
        number: u32,
        resolution: Resolution,
    ) -> crate::api::BoxFuture<Result<(), EngineError>> {
        Box::pin(async move { resolve_in(&self, run, Some(number), resolution).await })
    }
}
