//! The engine's public face: [`EngineBuilder`], [`Engine`] and the types of its API.

use crate::api::{Clock, EscalationSink, Evaluator, Planner, SystemClock, TaskHandler};
use crate::cache::ResponseCache;
use crate::core::{apply, Context, Policy};
use crate::error::EngineError;
use crate::event::{Escalation, Event, Logged};
use crate::fsm::RunStatus;
use crate::log::{load_state, read_logged};
use crate::model::*;
use crate::sched::{Scheduler, Workers};
use crate::state::{RunState, Totals};
use keel_store::{Durability, RunId, Seq, Store, StoreConfig, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A workflow type: what a request names, with its planner, evaluator, budgets and limits.
#[derive(Clone)]
pub struct WorkflowType {
    pub name: String,
    pub version: u32,
    /// JSON Schema every request input must satisfy (None: any JSON).
    pub input_schema: Option<serde_json::Value>,
    /// Default budget of a run (a request may override it).
    pub budget: Budget,
    pub on_exhausted: ExhaustionPolicy,
    /// Complexity class -> model; frozen into each run at acceptance.
    pub routes: Vec<(Complexity, String)>,
    /// Model the evaluator runs on (may be cheaper than the workers').
    pub evaluator_model: Option<String>,
    /// Runs of this type driven at once (0 = no limit beyond the engine's `workers`).
    pub max_concurrent_runs: usize,
    /// Tasks of one run in flight at once.
    pub max_parallel_tasks: u32,
    /// How long an idempotency key keeps returning the same run.
    pub dedup_window_ms: u64,
    pub planner: Arc<dyn Planner>,
    pub evaluator: Arc<dyn Evaluator>,
}

impl WorkflowType {
    /// A workflow type with default limits: version 1, no input schema, unlimited budget,
    /// partial on exhaustion, no routes, 16 concurrent runs, 4 parallel tasks, 24 h dedup.
    pub fn new(name: impl Into<String>, planner: Arc<dyn Planner>, evaluator: Arc<dyn Evaluator>) -> Self {
        WorkflowType {
            name: name.into(),
            version: 1,
            input_schema: None,
            budget: Budget::default(),
            on_exhausted: ExhaustionPolicy::Partial,
            routes: Vec::new(),
            evaluator_model: None,
            max_concurrent_runs: 16,
            max_parallel_tasks: 4,
            dedup_window_ms: 24 * 3600 * 1000,
            planner,
            evaluator,
        }
    }
}

impl std::fmt::Debug for WorkflowType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowType")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("budget", &self.budget)
            .field("on_exhausted", &self.on_exhausted)
            .field("routes", &self.routes)
            .field("evaluator_model", &self.evaluator_model)
            .field("max_concurrent_runs", &self.max_concurrent_runs)
            .field("max_parallel_tasks", &self.max_parallel_tasks)
            .finish_non_exhaustive()
    }
}

/// A request to start a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub workflow: String,
    pub input: serde_json::Value,
    /// A second request with the same key (within the workflow's dedup window) returns the
    /// first run instead of starting another.
    pub idempotency_key: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Seed of every pseudo-random choice of the run (default: derived from the run id).
    pub seed: Option<u64>,
    /// Per-run budget override (default: the workflow type's).
    pub budget: Option<Budget>,
}

impl Request {
    pub fn new(workflow: impl Into<String>, input: serde_json::Value) -> Self {
        Request { workflow: workflow.into(), input, idempotency_key: None, priority: 0, seed: None, budget: None }
    }
}

/// What `submit` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub run: RunId,
    /// The idempotency key was already claimed: `run` is the existing run.
    pub duplicate: bool,
}

/// A human's answer to an escalation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub decision: Decision,
    /// Who decided (recorded).
    pub by: String,
}

/// What `run_until_idle` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdleReport {
    /// Driver passes made (a run resumed twice counts twice).
    pub driven: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub awaiting_human: usize,
    /// Runs whose driver stopped on an error (store failure, a bug), with the error.
    pub stopped: Vec<(RunId, String)>,
}

/// One line of `runs()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub run: RunId,
    pub workflow: String,
    pub status: RunStatus,
    pub priority: i32,
    pub accepted_at_us: i64,
    pub last_event_us: i64,
    pub events: u64,
    pub cost_micros: u64,
    pub tokens: u64,
    pub partial: bool,
    pub escalations: u32,
}

/// An escalation waiting for a human.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEscalation {
    pub run: RunId,
    pub workflow: String,
    pub escalation: Escalation,
    pub escalated_at_us: i64,
    pub notified: bool,
}

/// Usage and outcomes per workflow type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkflowStats {
    pub workflow: String,
    pub runs: u64,
    pub by_status: BTreeMap<RunStatus, u64>,
    pub partial: u64,
    pub totals: Totals,
    /// `totals.cost_micros / runs` (integer division; 0 without runs).
    pub cost_per_run_micros: u64,
}

/// Size limits of the shell (each with its own error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellLimits {
    /// Canonical JSON bytes of a request input.
    pub input_bytes_max: usize,
    /// Canonical JSON bytes of a handler output (larger: `TaskFailed{Semantic}`); kept well
    /// below the store's 64 KiB event limit because outputs travel on into the inputs of
    /// downstream `TaskDispatched` events.
    pub output_bytes_max: usize,
    /// Bytes kept of a handler's error message.
    pub error_bytes_max: usize,
    /// Entries of the in-memory response cache.
    pub cache_entries_max: usize,
    /// Timeout of one planner call.
    pub planner_timeout_ms: u64,
}

impl Default for ShellLimits {
    fn default() -> Self {
        ShellLimits {
            input_bytes_max: 16 * 1024,
            output_bytes_max: 16 * 1024,
            error_bytes_max: 2 * 1024,
            cache_entries_max: 10_000,
            planner_timeout_ms: 120_000,
        }
    }
}

/// Escalation sink used when none is registered: logs a warning.
#[derive(Debug, Default)]
pub struct TracingSink;

impl EscalationSink for TracingSink {
    fn notify(&self, run: RunId, escalation: Escalation) -> crate::api::BoxFuture<Result<(), String>> {
        tracing::warn!(%run, number = escalation.number, cause = ?escalation.cause, question = %escalation.question, "run needs a human");
        Box::pin(async { Ok(()) })
    }
}

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
}

impl EngineBuilder {
    /// Store the log in a sled database at `dir` (created if missing).
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
    pub fn workflow(mut self, w: WorkflowType) -> Self {
        self.workflows.push(w);
        self
    }
    pub fn handler(mut self, name: &str, h: Arc<dyn TaskHandler>) -> Self {
        self.handlers.insert(name.to_owned(), h);
        self
    }
    pub fn escalation_sink(mut self, s: Arc<dyn EscalationSink>) -> Self {
        self.sink = Some(s);
        self
    }
    pub fn clock(mut self, c: Arc<dyn Clock>) -> Self {
        self.clock = c;
        self
    }
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
    pub fn limits(mut self, l: ShellLimits) -> Self {
        self.limits = l;
        self
    }

    /// Opens the store and checks the configuration.
    pub fn open(self) -> Result<Engine, EngineError> {
        let log: Arc<dyn Store> = match (self.path, self.store) {
            (Some(_), Some(_)) => return Err(EngineError::Config("both path() and store() given".into())),
            (None, None) => return Err(EngineError::Config("no store: call path() or store()".into())),
            (None, Some(s)) => s,
            (Some(p), None) => {
                let cfg = StoreConfig { durability: self.durability, ..StoreConfig::default() };
                Arc::new(keel_store::SledStore::open(&p, cfg)?)
            }
        };
        if self.workers == 0 {
            return Err(EngineError::Config("workers must be at least 1".into()));
        }
        let mut workflows = BTreeMap::new();
        for w in self.workflows {
            if w.name.is_empty() || w.name.contains('\0') {
                return Err(EngineError::Config(format!("workflow name {:?} is empty or contains NUL", w.name)));
            }
            if w.max_parallel_tasks == 0 {
                return Err(EngineError::Config(format!("workflow {}: max_parallel_tasks must be at least 1", w.name)));
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
        let ctx = Context { policy: self.policy, handlers: self.handlers.keys().cloned().collect() };
        let cache = ResponseCache::with_store(self.limits.cache_entries_max, log.clone());
        let inner = Inner {
            log,
            workflows,
            handlers: self.handlers,
            sink: self.sink.unwrap_or_else(|| Arc::new(TracingSink)),
            clock: self.clock,
            ctx,
            snapshot_every: self.snapshot_every,
            workers: self.workers,
            cache,
            limits: self.limits,
            sched: Mutex::new(Scheduler::default()),
            wake: Notify::new(),
        };
        Ok(Engine { inner: Arc::new(inner) })
    }
}

pub(crate) struct Registered {
    pub wf: WorkflowType,
    pub validator: Option<jsonschema::Validator>,
}

pub(crate) struct Inner {
    pub log: Arc<dyn Store>,
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
        F: FnOnce(&dyn Store) -> Result<T, EngineError> + Send + 'static,
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
                    crate::log::maybe_snapshot(log, &next2, expected, every);
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
        }
    }

    /// Validates and records a request (`RunAccepted`), then queues the run. Nothing is
    /// written for an unknown workflow type or an invalid input. A request whose
    /// idempotency key is already held returns the existing run with `duplicate: true`.
    pub async fn submit(&self, req: Request) -> Result<Submitted, EngineError> {
        crate::ingest::submit(&self.inner, req).await
    }

    /// Resumes every non-terminal run from its log and drives all runnable runs (highest
    /// priority first, then oldest; within the concurrency limits) until each is terminal
    /// or waiting for a human. Waits for retry backoffs; applies escalation deadline
    /// defaults that are already due; does not wait for future escalation deadlines.
    pub async fn run_until_idle(&self) -> Result<IdleReport, EngineError> {
        crate::sched::run_until_idle(&self.inner).await
    }

    /// Starts background workers that resume every non-terminal run, drive runs as they
    /// are submitted or resolved, and apply escalation deadlines when they fall due.
    /// Must be called inside a tokio runtime. Stop them with [`Workers::shutdown`].
    pub fn start(&self) -> Workers {
        crate::sched::start(self.inner.clone())
    }

    /// Records a human's decision on the run's open escalation and queues the run.
    pub async fn resolve(&self, run: RunId, r: Resolution) -> Result<(), EngineError> {
        let Resolution { decision, by } = r;
        self.inner
            .append_external(run, |state| {
                if state.status != RunStatus::AwaitingHuman {
                    return Err(EngineError::NotAwaitingHuman { run, status: state.status });
                }
                let open = state.escalations.iter().rev().find(|e| e.resolution.is_none());
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
                Ok(Event::HumanResolved {
                    number: esc.number,
                    decision: decision.clone(),
                    by: by.clone(),
                    defaulted: false,
                })
            })
            .await?;
        crate::sched::poke(&self.inner, run);
        Ok(())
    }

    /// Cancels a run: records `RunCancelled`; a driver working on it stops and drops the
    /// results of its in-flight calls.
    pub async fn cancel(&self, run: RunId, by: &str, reason: &str) -> Result<(), EngineError> {
        self.inner
            .append_external(run, |state| {
                if state.status.is_terminal() {
                    return Err(EngineError::AlreadyTerminal { run, status: state.status });
                }
                Ok(Event::RunCancelled { by: by.to_owned(), reason: reason.to_owned() })
            })
            .await?;
        crate::sched::poke(&self.inner, run);
        Ok(())
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

    /// One summary per run in the log, in run id order.
    pub fn runs(&self) -> Result<Vec<RunSummary>, EngineError> {
        let mut out = Vec::new();
        for run in self.inner.log.runs()? {
            let Some(s) = load_state(self.inner.log.as_ref(), run)? else { continue };
            out.push(summary(&s));
        }
        Ok(out)
    }

    /// Every escalation waiting for a human.
    pub fn escalations(&self) -> Result<Vec<PendingEscalation>, EngineError> {
        let mut out = Vec::new();
        for run in self.inner.log.runs()? {
            let Some(s) = load_state(self.inner.log.as_ref(), run)? else { continue };
            if s.status != RunStatus::AwaitingHuman {
                continue;
            }
            if let Some(e) = s.escalations.iter().rev().find(|e| e.resolution.is_none()) {
                out.push(PendingEscalation {
                    run,
                    workflow: s.workflow.clone(),
                    escalation: e.escalation.clone(),
                    escalated_at_us: e.escalated_at_us,
                    notified: e.notified,
                });
            }
        }
        Ok(out)
    }

    /// Runs by status, usage totals and cost per run, per workflow type (name order).
    pub fn stats(&self) -> Result<Vec<WorkflowStats>, EngineError> {
        let mut by_wf: BTreeMap<String, WorkflowStats> = BTreeMap::new();
        for run in self.inner.log.runs()? {
            let Some(s) = load_state(self.inner.log.as_ref(), run)? else { continue };
            let st = by_wf
                .entry(s.workflow.clone())
                .or_insert_with(|| WorkflowStats { workflow: s.workflow.clone(), ..WorkflowStats::default() });
            st.runs += 1;
            *st.by_status.entry(s.status).or_insert(0) += 1;
            if s.partial {
                st.partial += 1;
            }
            add_totals(&mut st.totals, &s.totals);
        }
        Ok(by_wf
            .into_values()
            .map(|mut st| {
                st.cost_per_run_micros = st.totals.cost_micros.checked_div(st.runs).unwrap_or(0);
                st
            })
            .collect())
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

pub(crate) fn summary(s: &RunState) -> RunSummary {
    RunSummary {
        run: s.run,
        workflow: s.workflow.clone(),
        status: s.status,
        priority: s.priority,
        accepted_at_us: s.accepted_at_us,
        last_event_us: s.last_event_us,
        events: s.next_seq.0,
        cost_micros: s.totals.cost_micros,
        tokens: s.totals.tokens,
        partial: s.partial,
        escalations: u32::try_from(s.escalations.len()).unwrap_or(u32::MAX),
    }
}

fn add_totals(acc: &mut Totals, t: &Totals) {
    acc.cost_micros = acc.cost_micros.saturating_add(t.cost_micros);
    acc.tokens = acc.tokens.saturating_add(t.tokens);
    acc.llm_calls = acc.llm_calls.saturating_add(t.llm_calls);
    acc.tool_calls = acc.tool_calls.saturating_add(t.tool_calls);
    acc.retries = acc.retries.saturating_add(t.retries);
    acc.replans = acc.replans.saturating_add(t.replans);
    acc.cache_hits = acc.cache_hits.saturating_add(t.cache_hits);
}
