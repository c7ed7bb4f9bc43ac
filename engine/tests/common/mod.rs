//! Helpers shared by the engine's integration tests: a fake clock, closure-backed
//! planner/handler/evaluator/sink, task specs, and log projections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs, dead_code)]

use keel_engine::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A clock tests move by hand.
#[derive(Debug)]
pub struct FakeClock(pub AtomicI64);

impl FakeClock {
    pub fn at(us: i64) -> Arc<FakeClock> {
        Arc::new(FakeClock(AtomicI64::new(us)))
    }
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms * 1000, Ordering::SeqCst);
    }
    pub fn set(&self, us: i64) {
        self.0.store(us, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

type PlanFn = dyn Fn(&PlanRequest) -> Result<Plan, HandlerError> + Send + Sync;
type CallFn = dyn Fn(&TaskCall) -> Result<TaskOutput, HandlerError> + Send + Sync;
type EvalFn = dyn Fn(&EvalRequest) -> Result<Evaluation, HandlerError> + Send + Sync;

pub struct FnPlanner(pub Box<PlanFn>);
impl Planner for FnPlanner {
    fn plan(&self, request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let r = (self.0)(&request);
        Box::pin(async move { r })
    }
}

/// A planner answering revision n with `plans[min(n, len-1)]`.
pub fn planner(plans: Vec<Plan>) -> Arc<FnPlanner> {
    Arc::new(FnPlanner(Box::new(move |req: &PlanRequest| {
        let i = (req.revision as usize).min(plans.len() - 1);
        Ok(plans[i].clone())
    })))
}

/// A handler from a closure; counts its calls and sleeps `delay_ms` first.
pub struct FnHandler {
    pub f: Box<CallFn>,
    pub calls: AtomicU64,
    pub delay_ms: u64,
    pub log: Mutex<Vec<(String, u32, String)>>,
}

impl FnHandler {
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TaskHandler for FnHandler {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((call.task.0.clone(), call.attempt, call.run.to_string()));
        let r = (self.f)(&call);
        let delay = self.delay_ms;
        Box::pin(async move {
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            r
        })
    }
}

pub fn handler(f: impl Fn(&TaskCall) -> Result<TaskOutput, HandlerError> + Send + Sync + 'static) -> Arc<FnHandler> {
    Arc::new(FnHandler { f: Box::new(f), calls: AtomicU64::new(0), delay_ms: 0, log: Mutex::new(Vec::new()) })
}

pub fn slow_handler(
    delay_ms: u64,
    f: impl Fn(&TaskCall) -> Result<TaskOutput, HandlerError> + Send + Sync + 'static,
) -> Arc<FnHandler> {
    Arc::new(FnHandler { f: Box::new(f), calls: AtomicU64::new(0), delay_ms, log: Mutex::new(Vec::new()) })
}

/// A handler that always succeeds with `{"ok": true, "task": id}` and the given usage.
pub fn ok_handler(usage: Usage) -> Arc<FnHandler> {
    handler(move |c| Ok(TaskOutput { output: json!({"ok": true, "task": c.task.0}), usage }))
}

pub struct FnEvaluator(pub Box<EvalFn>);
impl Evaluator for FnEvaluator {
    fn evaluate(&self, request: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        let r = (self.0)(&request);
        Box::pin(async move { r })
    }
}

pub fn evaluator(
    f: impl Fn(&EvalRequest) -> Result<Evaluation, HandlerError> + Send + Sync + 'static,
) -> Arc<FnEvaluator> {
    Arc::new(FnEvaluator(Box::new(f)))
}

pub fn pass_evaluator() -> Arc<FnEvaluator> {
    evaluator(|_| Ok(Evaluation { verdict: Verdict::Pass, notes: "ok".into(), usage: Usage::default() }))
}

/// A sink that counts notifications, keeps what it was told, and can be told to fail.
#[derive(Default)]
pub struct CountingSink {
    pub notified: Mutex<Vec<(RunId, u32)>>,
    pub contexts: Mutex<Vec<EscalationContext>>,
    pub fail: std::sync::atomic::AtomicBool,
}
impl EscalationSink for CountingSink {
    fn notify(&self, ctx: EscalationContext) -> BoxFuture<Result<(), String>> {
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(async { Err("sink down".to_owned()) });
        }
        self.notified.lock().unwrap().push((ctx.run, ctx.escalation.number));
        self.contexts.lock().unwrap().push(ctx);
        Box::pin(async { Ok(()) })
    }
}

/// A task spec with fast retries and no evaluation.
pub fn task(id: &str, kind: TaskKind, handler: &str, deps: &[&str]) -> TaskSpec {
    let mut t = TaskSpec::new(id, kind, handler).with_deps(deps).with_input(&json!({ "task": id }));
    t.timeout_ms = 2_000;
    t.retry = RetryPolicy { max_attempts: 3, backoff_base_ms: 10, backoff_max_ms: 80, jitter_ms: 7 };
    t
}

pub fn plan(tasks: Vec<TaskSpec>) -> Plan {
    Plan { tasks, rationale: "test".into() }
}

/// A workflow type named `name` with the given planner and evaluator.
pub fn workflow(name: &str, planner: Arc<dyn Planner>, evaluator: Arc<dyn Evaluator>) -> WorkflowType {
    let mut w = WorkflowType::new(name, planner, evaluator);
    w.routes = vec![(Complexity::Extraction, "small".into()), (Complexity::Reasoning, "large".into())];
    w.evaluator_model = Some("eval-small".into());
    w
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Event kinds of a log.
pub fn kinds(events: &[Logged]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.kind_name()).collect()
}

pub fn count(events: &[Logged], kind: &str) -> usize {
    events.iter().filter(|e| e.event.kind_name() == kind).count()
}

/// The `errors` of every `PlanRejected`, in log order.
pub fn plan_rejections(events: &[Logged]) -> Vec<Vec<String>> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::PlanRejected { errors, .. } => Some(errors.clone()),
            _ => None,
        })
        .collect()
}

pub fn req(workflow: &str, input: Value) -> Request {
    Request::new(workflow, input)
}

/// Task ids whose TaskDispatched appear in the log, in order, with attempts.
pub fn dispatches(events: &[Logged]) -> Vec<(String, u32)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskDispatched { task, attempt, .. } => Some((task.0.clone(), *attempt)),
            _ => None,
        })
        .collect()
}

/// Per-status counts of the runs in an engine.
pub fn statuses(engine: &Engine) -> BTreeMap<RunStatus, usize> {
    let mut m = BTreeMap::new();
    for r in engine.runs().unwrap() {
        *m.entry(r.status).or_insert(0) += 1;
    }
    m
}

/// Install a tracing subscriber once (RUST_LOG controls it).
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Open an engine on a sled db in `dir` with one workflow and the given handlers.
pub fn open_engine(
    dir: &std::path::Path,
    wf: WorkflowType,
    handlers: &[(&str, Arc<dyn TaskHandler>)],
    tweak: impl FnOnce(EngineBuilder) -> EngineBuilder,
) -> Engine {
    let mut b = Engine::builder().path(dir).workflow(wf);
    for (name, h) in handlers {
        b = b.handler(name, h.clone());
    }
    tweak(b).open().expect("open engine")
}

/// Submit one request and drive it until idle; returns the run and its log.
pub async fn run_one(engine: &Engine, workflow: &str) -> (RunId, Vec<Logged>) {
    let s = engine.submit(Request::new(workflow, json!({}))).await.expect("submit");
    let report = engine.run_until_idle().await.expect("run until idle");
    assert!(report.stopped.is_empty(), "drivers stopped: {:?}", report.stopped);
    (s.run, engine.events(s.run).expect("events"))
}

pub fn transient(msg: &str) -> HandlerError {
    HandlerError::transient(msg)
}
