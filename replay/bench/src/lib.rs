//! `keel bench`: what keel costs on top of the log it writes, measured in one process, in
//! one run, on fresh temporary databases, each figure next to its floor. The figures, the
//! method and the JSON schema are documented in docs/PERFORMANCE.md.
//!
//! Sections (in the order they run):
//! 1. memory: resident bytes per run suspended waiting for a human (runs first, on a
//!    fresh heap, so memory freed by earlier sections cannot hide what the runs cost);
//! 2. floor: raw sled inserts (same record size, same flush pattern), a plain file with
//!    `fdatasync` per record and per group of 64;
//! 3. throughput: durable transitions/s through the whole engine (no-op handlers, a chain
//!    of tasks without evaluator) at 1, 64 and 1024 concurrent runs per durability mode,
//!    each next to raw sled inserts with the same flush pattern and concurrency;
//! 4. latency: one durable step (decision to record `TaskDispatched` until `TaskEvaluated`
//!    is durable) next to one flush;
//! 5. resume: `load_state` + `decide` of one run of 1k/10k/100k events, with and without
//!    snapshots;
//! 6. replay: events folded per second from the db and from a JSONL export, next to a raw
//!    sled scan of the same records;
//! 7. payloads: runs with 8 outputs of 1 MB appended through the engine and replayed from
//!    the db, next to the same bytes written to and read from a plain file;
//! 8. postgres: durable transitions/s with 1, 2 and 4 worker processes on PostgreSQL next
//!    to raw INSERTs of the same rows with the same commit pattern, step latency, and sled
//!    beside them (skipped with a line without a server; `postgres.rs`).

#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]

mod error;
mod payloads;
mod postgres;
mod server;
mod sys;

pub use error::BenchError;

use keel_engine::api::{BoxFuture, Clock, EscalationSink, Evaluation, Evaluator, HandlerError, PlanRequest, Planner};
use keel_engine::{
    apply, apply_mut, apply_take, decide, load_state, read_logged_runs, Context, Engine, EngineError, ErrorClass,
    Event, ExhaustionPolicy, Json, Logged, Plan, PlanReason, Policy, Request, RetryPolicy, RunState, TaskCall,
    TaskHandler, TaskId, TaskInput, TaskKind, TaskOutput, TaskSpec, Usage, Verdict, WorkflowType,
};
use keel_replay::export::{JsonlWriter, Redaction};
use keel_replay::source::export_runs;
use keel_store::{
    prepare, AppendObserver, Durability, EventLog, Head, Level, NewRecord, Observed, RunId, Seq, SledStore, Store,
    StoreConfig, StoreError, SEGMENT_BYTES,
};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sys::{heap_in_use, rss_bytes, trim_heap};

/// Version of the JSON document `keel bench --json` prints (docs/PERFORMANCE.md).
pub const SCHEMA: &str = "keel-bench/v1";

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The short run (`--quick`): shorter measurements, 10k suspended runs instead of 100k.
    pub quick: bool,
    /// Parent directory of the temporary databases (default: the system temp dir). Must be
    /// on the disk to measure (not tmpfs).
    pub dir: Option<PathBuf>,
    /// Durability levels of the throughput section (default: power loss; the full run
    /// adds process crash).
    pub levels: Vec<Level>,
    /// Run only these sections (`memory`, `floor`, `throughput`, `latency`, `resume`,
    /// `replay`, `payloads`, `server`, `postgres`); empty: all. For profiling one section.
    pub only: Vec<String>,
    /// Run only these concurrencies in the throughput section; empty: 1, 64 and 1024.
    pub concurrency: Vec<usize>,
    /// Keep the temporary databases (their paths are printed on stderr).
    pub keep: bool,
    /// The engines' `snapshot_every` (None: the engine's default).
    pub snapshot_every: Option<u64>,
    /// Suspended runs of the memory section (None: 100k, 10k with `quick`).
    pub memory_runs: Option<usize>,
    /// Runs per cell of the postgres section (None: 1,000, 200 with `quick`).
    pub pg_runs: Option<usize>,
    /// Worker processes of the postgres section's cells (empty: 1, 2 and 4).
    pub pg_processes: Vec<usize>,
}

impl BenchOptions {
    /// The options of `keel bench` (`quick`: `keel bench --quick`).
    pub fn new(quick: bool) -> Self {
        let levels = if quick { vec![Level::PowerLoss] } else { vec![Level::PowerLoss, Level::ProcessCrash] };
        BenchOptions {
            quick,
            dir: None,
            levels,
            only: Vec::new(),
            concurrency: Vec::new(),
            keep: false,
            snapshot_every: None,
            memory_runs: None,
            pg_runs: None,
            pg_processes: Vec::new(),
        }
    }
}

/// Sizes of one bench run.
#[derive(Clone, Debug)]
struct Sizes {
    floor_duration: Duration,
    /// Throughput cells aim at this many seconds of engine work.
    cell_seconds: f64,
    /// Engine/raw measurement pairs per throughput cell (medians reported).
    rounds: usize,
    concurrency: Vec<usize>,
    latency_samples: usize,
    resume_sizes: Vec<u64>,
    resume_repeats: usize,
    replay_runs: usize,
    replay_tasks: usize,
    memory_runs: usize,
}

impl Sizes {
    fn of(quick: bool) -> Self {
        if quick {
            Sizes {
                floor_duration: Duration::from_millis(500),
                cell_seconds: 0.4,
                rounds: 3,
                concurrency: vec![1, 64, 1024],
                latency_samples: 1_500,
                resume_sizes: vec![1_000, 10_000, 100_000],
                resume_repeats: 3,
                replay_runs: 400,
                replay_tasks: 32,
                memory_runs: 10_000,
            }
        } else {
            Sizes {
                floor_duration: Duration::from_secs(2),
                cell_seconds: 1.0,
                rounds: 7,
                concurrency: vec![1, 64, 1024],
                latency_samples: 3_000,
                resume_sizes: vec![1_000, 10_000, 100_000],
                resume_repeats: 7,
                replay_runs: 1_000,
                replay_tasks: 32,
                memory_runs: 100_000,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------------------

/// One line of the report: a figure, its floor, their ratio and (if any) its target.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// Stable key (JSON).
    pub key: String,
    /// The section it belongs to (`throughput`, `latency`, ...).
    pub section: &'static str,
    /// Human label.
    pub label: String,
    /// The measured value, in `unit`.
    pub value: f64,
    /// Its unit (`runs/s`, `us`, `MiB`, ...).
    pub unit: &'static str,
    /// The floor it is compared with (same unit), if any.
    pub floor: Option<f64>,
    /// What the floor is (human label).
    pub floor_label: String,
    /// `value / floor` (for durations: `floor / value` is not used; see `ratio_note`).
    pub ratio: Option<f64>,
    /// The target, as text (`>= 50%`), if there is one.
    pub target: Option<String>,
    /// Whether the target is met (None: no target).
    pub met: Option<bool>,
    /// Extra fields for the JSON document.
    pub extra: Value,
}

impl Figure {
    fn new(
        section: &'static str,
        key: impl Into<String>,
        label: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Figure {
            key: key.into(),
            section,
            label: label.into(),
            value,
            unit,
            floor: None,
            floor_label: String::new(),
            ratio: None,
            target: None,
            met: None,
            extra: Value::Null,
        }
    }
    fn floor(mut self, floor: f64, label: impl Into<String>) -> Self {
        self.floor = Some(floor);
        self.floor_label = label.into();
        self.ratio = (floor > 0.0).then(|| self.value / floor);
        self
    }
    fn target(mut self, text: impl Into<String>, met: bool) -> Self {
        self.target = Some(text.into());
        self.met = Some(met);
        self
    }
    fn extra(mut self, v: Value) -> Self {
        self.extra = v;
        self
    }
}

/// The whole result of one `keel bench`.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    /// Whether this was the short run (`--quick`).
    pub quick: bool,
    /// The machine it ran on (cores, memory, OS, as JSON).
    pub machine: Value,
    /// How long the whole bench took, in seconds.
    pub seconds: f64,
    /// Every figure, in report order.
    pub figures: Vec<Figure>,
}

impl BenchReport {
    /// The stable JSON document (schema [`SCHEMA`], docs/PERFORMANCE.md).
    pub fn to_json(&self) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "key": f.key,
                    "section": f.section,
                    "label": f.label,
                    "value": round(f.value),
                    "unit": f.unit,
                    "floor": f.floor.map(round),
                    "floor_label": f.floor_label,
                    "ratio": f.ratio.map(|r| (r * 10_000.0).round() / 10_000.0),
                    "target": f.target,
                    "met": f.met,
                    "extra": f.extra,
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .figures
            .iter()
            .filter(|f| f.target.is_some())
            .map(|f| json!({"key": f.key, "target": f.target, "met": f.met}))
            .collect();
        json!({
            "schema": SCHEMA,
            "quick": self.quick,
            "machine": self.machine,
            "seconds": round(self.seconds),
            "figures": figures,
            "targets": targets,
        })
    }

    /// A readable table, one section after the other.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "keel bench{} — {} ({} cpus), {:.0} s; shared machine: compare ratios, not absolute figures\n",
            if self.quick { " --quick" } else { "" },
            self.machine.get("cpu").and_then(Value::as_str).unwrap_or("?"),
            self.machine.get("cpus").and_then(Value::as_u64).unwrap_or(0),
            self.seconds
        ));
        let w = self.figures.iter().map(|f| f.label.chars().count()).max().unwrap_or(0).max(6);
        let mut section = "";
        for f in &self.figures {
            if f.section != section {
                section = f.section;
                out.push_str(&format!(
                    "\n== {section}\n{:<w$} {:>12} {:>12} {:>7}  {}\n",
                    "figure", "value", "floor", "ratio", "target"
                ));
            }
            let ratio = f.ratio.map(|r| format!("{:.0}%", r * 100.0)).unwrap_or_default();
            let target = match (&f.target, f.met) {
                (Some(t), Some(true)) => format!("{t} met"),
                (Some(t), Some(false)) => format!("{t} NOT MET"),
                (Some(t), None) => t.clone(),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{:<w$} {:>12} {:>12} {:>7}  {}\n",
                f.label,
                fmt_value(f.value, f.unit),
                f.floor.map(|v| fmt_value(v, f.unit)).unwrap_or_default(),
                ratio,
                target
            ));
            if !f.floor_label.is_empty() {
                out.push_str(&format!("    floor: {}\n", f.floor_label));
            }
        }
        out
    }
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        v.round()
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "us" if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        "us" => format!("{v:.0} us"),
        "ms" => format!("{v:.2} ms"),
        "bytes" => format!("{v:.0} B"),
        "/s" if v >= 10_000.0 => format!("{:.1}k/s", v / 1000.0),
        "/s" => format!("{v:.0}/s"),
        other => format!("{v:.2} {other}"),
    }
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".to_owned());
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    json!({
        "cpus": cpus,
        "cpu": cpu,
        "mem_bytes": mem_kib.map(|k| k * 1024),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "shared": true,
    })
}

// ---------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------

/// `keel bench [--json] [--quick]`: runs the bench on its own thread and runtime and prints
/// the table (or the JSON document) on stdout; progress goes to stderr on a terminal only.
pub fn cli(json: bool, quick: bool) -> Result<(), BenchError> {
    cli_with(json, BenchOptions::new(quick))
}

/// [`cli`] with explicit options.
pub fn cli_with(json: bool, opts: BenchOptions) -> Result<(), BenchError> {
    // A worker process of the postgres section (this program started again by it).
    if let Ok(spec) = std::env::var(postgres::WORKER_ENV) {
        return postgres::worker(&spec);
    }
    // A restart process of the server section.
    if let Ok(dir) = std::env::var(server::RESTART_ENV) {
        return server::restart_process(&dir);
    }
    let handle = std::thread::Builder::new()
        .name("keel-bench".into())
        .spawn(move || {
            let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut progress = |msg: &str| {
                if show {
                    eprint!("\r\x1b[2K{msg}");
                    let _ = std::io::stderr().flush();
                }
            };
            let report = run(&opts, &mut progress);
            if show {
                eprint!("\r\x1b[2K");
            }
            report
        })
        .map_err(|e| BenchError::Invalid(format!("cannot start the bench thread: {e}")))?;
    let report = handle.join().map_err(|_| BenchError::Invalid("the bench panicked".into()))??;
    let mut out = std::io::stdout().lock();
    let text = if json {
        serde_json::to_string_pretty(&report.to_json()).map_err(|e| BenchError::Invalid(e.to_string()))?
    } else {
        report.to_table()
    };
    writeln!(out, "{text}").map_err(|e| BenchError::io(Path::new("<stdout>"), e))
}

/// Runs every section. Must not be called from inside a tokio runtime (it builds its own).
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    let result = run_sections(opts, progress);
    if opts.keep {
        for d in std::mem::take(&mut *TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner())) {
            eprintln!("kept {}", d.keep().display());
        }
    }
    remove_temp_dirs();
    result
}

fn run_sections(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    let mut plan = Sizes::of(opts.quick);
    SNAPSHOT_EVERY.store(opts.snapshot_every.unwrap_or(0), Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Invalid(format!("cannot start the async runtime: {e}")))?;
    let started = Instant::now();
    let parent = opts.dir.clone();
    let parent = parent.as_deref();
    let mut figures = Vec::new();
    let want = |s: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == s);
    if !opts.concurrency.is_empty() {
        plan.concurrency = opts.concurrency.clone();
    }

    if want("memory") {
        progress("memory: suspending runs...");
        let runs = opts.memory_runs.unwrap_or(plan.memory_runs);
        figures.extend(rt.block_on(memory(parent, runs))?);
    }

    progress("calibrating record size...");
    let record_bytes = rt.block_on(calibrate(parent))?;

    if want("floor") {
        progress("floor: sled and plain file...");
        figures.extend(floor(parent, &plan, record_bytes)?);
    }

    let mut modes = Vec::new();
    for level in opts.levels.iter().filter(|_| want("throughput")) {
        modes.push(Durability::EveryAppend(*level));
        modes.push(Durability::GroupCommit(*level));
    }
    for d in modes {
        for &c in &plan.concurrency {
            progress(&format!("throughput: {} with {c} concurrent runs...", keel_store::bench::mode_name(d)));
            figures.push(rt.block_on(throughput(parent, d, c, &plan, record_bytes))?);
        }
    }

    if want("latency") {
        progress("latency: durable steps...");
        figures.extend(rt.block_on(latency(parent, plan.latency_samples, record_bytes))?);
    }
    if want("resume") {
        progress("resume: building long runs...");
        figures.extend(resume(parent, &plan, progress)?);
    }
    if want("replay") {
        progress("replay: building runs...");
        figures.extend(rt.block_on(replay(parent, &plan))?);
    }
    if want("server") {
        let (runs, reviews) = if opts.quick { (10_000, 200) } else { (100_000, 400) };
        progress(&format!("server: {runs} finished runs, the HTTP API..."));
        figures.extend(rt.block_on(server::server(parent, runs, reviews))?);
    }
    if want("postgres") {
        progress("postgres: 1, 2 and 4 worker processes...");
        figures.extend(postgres::postgres(
            parent,
            opts.pg_runs.unwrap_or(if opts.quick { 200 } else { 1_000 }),
            &opts.pg_processes,
        )?);
    }
    if want("payloads") {
        progress("payloads: runs with 1 MB outputs...");
        let (runs, repeats) = if opts.quick { (4, 3) } else { (8, 5) };
        figures.extend(rt.block_on(payloads::payloads(parent, runs, repeats))?);
    }

    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchReport { quick: opts.quick, machine: machine(), seconds, figures })
}

// ---------------------------------------------------------------------------------------
// the bench workflow: a chain of no-op tasks, no evaluator
// ---------------------------------------------------------------------------------------

const WORKFLOW: &str = "bench_chain";
const HANDLER: &str = "noop";

fn task_spec(i: usize, kind: TaskKind) -> TaskSpec {
    TaskSpec {
        id: TaskId(format!("t{i:02}")),
        kind,
        handler: HANDLER.to_owned(),
        input: Json::new(&json!({"step": i, "prompt": "summarise the ticket and propose a reply"})),
        depends_on: if i == 0 { Vec::new() } else { vec![TaskId(format!("t{:02}", i - 1))] },
        timeout_ms: 60_000,
        retry: RetryPolicy::default(),
        success_criteria: None,
        cost_estimate_micros: 0,
        token_estimate: 0,
        critical: false,
        output_schema: None,
        complexity: None,
        cacheable: false,
        optional_deps: Vec::new(),
    }
}

fn chain_plan(tasks: usize) -> Plan {
    Plan { tasks: (0..tasks).map(|i| task_spec(i, TaskKind::Tool)).collect(), rationale: "bench chain".to_owned() }
}

struct ChainPlanner {
    tasks: usize,
    /// Add a human review task at the end (memory section).
    human: bool,
}

impl Planner for ChainPlanner {
    fn plan(&self, _request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let mut plan = chain_plan(self.tasks);
        if self.human {
            let mut t = task_spec(self.tasks, TaskKind::HumanReview);
            t.depends_on = if self.tasks == 0 { Vec::new() } else { vec![TaskId(format!("t{:02}", self.tasks - 1))] };
            plan.tasks.push(t);
        }
        Box::pin(async move { Ok(plan) })
    }
}

struct Noop;

impl TaskHandler for Noop {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let output = json!({"ok": true, "task": call.task.0});
        Box::pin(async move { Ok(TaskOutput { output, usage: Usage { cost_micros: 10, tokens: 0 } }) })
    }
}

struct PassEvaluator;

impl Evaluator for PassEvaluator {
    fn evaluate(&self, _request: keel_engine::api::EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        Box::pin(async { Ok(Evaluation { verdict: Verdict::Pass, notes: String::new(), usage: Usage::default() }) })
    }
}

struct QuietSink;

impl EscalationSink for QuietSink {
    fn notify(&self, _escalation: keel_engine::EscalationContext) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

fn workflow(tasks: usize, human: bool, concurrency: usize) -> WorkflowType {
    let mut wf = WorkflowType::new(WORKFLOW, Arc::new(ChainPlanner { tasks, human }), Arc::new(PassEvaluator));
    wf.max_concurrent_runs = concurrency;
    wf
}

/// `snapshot_every` of the engines built by this bench run (0: the engine's default).
static SNAPSHOT_EVERY: AtomicU64 = AtomicU64::new(0);

fn builder() -> keel_engine::EngineBuilder {
    match SNAPSHOT_EVERY.load(Ordering::Relaxed) {
        0 => Engine::builder(),
        n => Engine::builder().snapshot_every(n),
    }
}

fn engine_over(log: Arc<dyn Store>, wf: WorkflowType, workers: usize, policy: Policy) -> Result<Engine, EngineError> {
    builder()
        .store(log)
        .workflow(wf)
        .handler(HANDLER, Arc::new(Noop))
        .escalation_sink(Arc::new(QuietSink))
        .policy(policy)
        .workers(workers.max(1))
        .open()
}

/// Temporary directories of this bench run, deleted only at its end: deleting large files
/// (on a filesystem mounted with `discard`) stalls the I/O of whatever is measured next.
static TEMP_DIRS: Mutex<Vec<tempfile::TempDir>> = Mutex::new(Vec::new());

/// A fresh temporary directory (kept until the end of the bench run).
fn temp_dir(parent: Option<&Path>, what: &str) -> Result<PathBuf, BenchError> {
    let prefix = format!("keel-bench-{what}-");
    let b = tempfile::Builder::new().prefix(&prefix).to_owned();
    let dir = match parent {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    };
    let dir = dir.map_err(|e| BenchError::io(parent.unwrap_or(Path::new("<temp dir>")), e))?;
    let path = dir.path().to_path_buf();
    TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
    Ok(path)
}

fn remove_temp_dirs() {
    let dirs = std::mem::take(&mut *TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner()));
    drop(dirs);
}

fn open_store(dir: &Path, durability: Durability) -> Result<Arc<SledStore>, BenchError> {
    Ok(Arc::new(SledStore::open(dir.join("db"), StoreConfig { durability, ..StoreConfig::default() })?))
}

/// Submits `runs` requests with up to 1024 submissions in flight.
async fn submit_all(engine: &Engine, runs: usize) -> Result<Vec<RunId>, BenchError> {
    submit_n(engine, runs, 1024).await
}

/// Submits `runs` requests with up to `in_flight` submissions in flight.
async fn submit_n(engine: &Engine, runs: usize, in_flight: usize) -> Result<Vec<RunId>, BenchError> {
    let mut out = Vec::with_capacity(runs);
    let mut i = 0;
    while i < runs {
        let n = (runs - i).min(in_flight.max(1));
        let mut set = tokio::task::JoinSet::new();
        for k in 0..n {
            let e = engine.clone();
            let input = json!({"ticket": i + k, "text": "my order has not arrived"});
            set.spawn(async move { e.submit(Request::new(WORKFLOW, input)).await });
        }
        while let Some(r) = set.join_next().await {
            let s = r.map_err(|e| BenchError::Invalid(format!("submit task: {e}")))??;
            out.push(s.run);
        }
        i += n;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// a probe around the store: counts appends and records, and (for the latency section)
// when each record became durable
// ---------------------------------------------------------------------------------------

/// Monotonic microseconds, shared by the probe and the engine's clock so the recorded
/// `at_us` of an event and the time it became durable are on one scale.
#[derive(Clone)]
struct MonoClock {
    base_us: i64,
    t0: Instant,
}

impl MonoClock {
    fn new() -> Self {
        MonoClock { base_us: chrono::Utc::now().timestamp_micros(), t0: Instant::now() }
    }
    fn now(&self) -> i64 {
        self.base_us.saturating_add(i64::try_from(self.t0.elapsed().as_micros()).unwrap_or(i64::MAX / 2))
    }
}

impl Clock for MonoClock {
    fn now_us(&self) -> i64 {
        self.now()
    }
}

/// One step record: (run, is it a TaskDispatched (else TaskEvaluated), at_us, durable_us).
type StepStamp = (RunId, bool, i64, i64);

/// Counts and times the engine's appends (an [`AppendObserver`] over the bench's store).
struct Probe {
    appends: AtomicU64,
    records: AtomicU64,
    /// Nanoseconds spent inside `append` (write + flush), summed over callers.
    append_ns: AtomicU64,
    /// (start_us, end_us) of each append (latency section only).
    spans: Mutex<Vec<(i64, i64)>>,
    /// (run, kind, at_us, durable_us) of TaskDispatched / TaskEvaluated records.
    steps: Option<(MonoClock, Mutex<Vec<StepStamp>>)>,
}

impl Probe {
    /// The bench's store with a fresh probe over it.
    fn over(inner: Arc<SledStore>, clock: Option<MonoClock>) -> Observed<Probe> {
        let probe = Probe {
            appends: AtomicU64::new(0),
            records: AtomicU64::new(0),
            append_ns: AtomicU64::new(0),
            spans: Mutex::new(Vec::new()),
            steps: clock.map(|c| (c, Mutex::new(Vec::new()))),
        };
        Observed::new(inner, probe)
    }
}

impl AppendObserver for Probe {
    /// The step marks of the batch, its record count and when the append started.
    type Ticket = (Vec<(bool, i64)>, u64, Instant);

    fn before(&self, _run: RunId, _expected: Seq, records: &[NewRecord]) -> Self::Ticket {
        let marks: Vec<(bool, i64)> = match &self.steps {
            None => Vec::new(),
            Some(_) => records
                .iter()
                .filter_map(|r| match r.kind.as_str() {
                    "TaskDispatched" => Some((true, r.time_us)),
                    "TaskEvaluated" => Some((false, r.time_us)),
                    _ => None,
                })
                .collect(),
        };
        (marks, records.len() as u64, Instant::now())
    }

    fn after(&self, run: RunId, (marks, n, t): Self::Ticket, result: Result<&Head, &StoreError>) {
        // Only appends that succeeded count, as the figures are of durable transitions.
        if result.is_err() {
            return;
        }
        self.append_ns.fetch_add(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(n, Ordering::Relaxed);
        if let Some((clock, steps)) = &self.steps {
            let durable = clock.now();
            let took = i64::try_from(t.elapsed().as_micros()).unwrap_or(0);
            self.spans.lock().unwrap_or_else(|p| p.into_inner()).push((durable - took, durable));
            let mut s = steps.lock().unwrap_or_else(|p| p.into_inner());
            s.extend(marks.into_iter().map(|(d, at)| (run, d, at, durable)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. memory
// ---------------------------------------------------------------------------------------

fn threads() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("Threads:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Runs driven (and submissions in flight) at once while the memory section creates its
/// suspended runs.
const MEMORY_WORKERS: usize = 8;

async fn memory(parent: Option<&Path>, runs: usize) -> Result<Vec<Figure>, BenchError> {
    let dir = temp_dir(parent, "memory")?;
    let store = open_store(dir.as_path(), Durability::default())?;
    // Escalations with a (far) deadline: each driver ends with its run parked.
    let policy = Policy {
        escalation_deadline_ms: Some(30 * 24 * 3600 * 1000),
        escalation_default: Some(keel_engine::Decision::Reject),
        ..Policy::default()
    };
    // Runs are created by the engine's default 8 workers (creating them 64 or 1024 at a
    // time is no faster here, but every extra thread the runtime grows to keeps a stack and
    // a share of malloc arenas, which would be charged to the runs).
    let workers = MEMORY_WORKERS;
    let engine = engine_over(store.clone(), workflow(1, true, 0), workers, policy)?;
    trim_heap();
    let before = rss_bytes().unwrap_or(0);
    let heap_before = heap_in_use();
    let t0 = Instant::now();
    // In two halves: the second half's growth is the marginal cost of a run, without the
    // fixed costs the first runs pay (runtime threads, sled's structures).
    let half = runs / 2;
    let mut mid = 0;
    for (k, n) in [half, runs - half].into_iter().enumerate() {
        submit_n(&engine, n, workers).await?;
        let report = engine.run_until_idle().await?;
        // The second pass also re-drives (and re-parks) the first half's runs.
        if report.awaiting_human < n || !report.stopped.is_empty() {
            return Err(BenchError::Invalid(format!(
                "memory: expected {n} runs awaiting a human, got {} ({} stopped)",
                report.awaiting_human,
                report.stopped.len()
            )));
        }
        if k == 0 {
            mid = rss_bytes().unwrap_or(0);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = rss_bytes().unwrap_or(0);
    let threads_after = threads();
    let heap_after = heap_in_use();
    trim_heap();
    let after_trim = rss_bytes().unwrap_or(0);
    let per_run = after.saturating_sub(before) as f64 / runs as f64;
    let per_run_trim = after_trim.saturating_sub(before) as f64 / runs as f64;
    let marginal = after.saturating_sub(mid) as f64 / (runs - half).max(1) as f64;
    let events: u64 = store.runs()?.iter().map(|r| store.head(*r).map(|h| h.next_seq.0)).sum::<Result<u64, _>>()?;
    drop(engine);
    drop(store);
    let quick_note = if runs < 100_000 { format!(" ({runs} runs, not 100k)") } else { String::new() };
    Ok(vec![
        Figure::new(
            "memory",
            "memory.bytes_per_suspended_run",
            format!("resident bytes per run awaiting a human{quick_note}"),
            per_run,
            "bytes",
        )
        .target("<= 4096 B", per_run <= 4096.0)
        .extra(json!({
            "runs": runs,
            "events": events,
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "rss_after_first_half_bytes": mid,
            "marginal_bytes_per_run": round(marginal),
            "rss_after_malloc_trim_bytes": after_trim,
            "bytes_per_run_after_malloc_trim": round(per_run_trim),
            "threads_after": threads_after,
            "heap_in_use_before_bytes": heap_before,
            "heap_in_use_after_bytes": heap_after,
            "workers": workers,
            "seconds_to_create": round(secs),
        })),
        Figure::new(
            "memory",
            "memory.marginal_bytes_per_suspended_run",
            "marginal resident bytes per run (growth over the second half)",
            marginal,
            "bytes",
        ),
    ])
}

// ---------------------------------------------------------------------------------------
// 2. floor
// ---------------------------------------------------------------------------------------

/// Mean stored bytes of one record of the bench workflow (to size the floors).
async fn calibrate(parent: Option<&Path>) -> Result<usize, BenchError> {
    let dir = temp_dir(parent, "calibrate")?;
    let store = open_store(dir.as_path(), Durability::None)?;
    let engine = engine_over(store.clone(), workflow(16, false, 0), 8, Policy::default())?;
    let runs = submit_all(&engine, 8).await?;
    engine.run_until_idle().await?;
    let (mut bytes, mut n) = (0usize, 0usize);
    for run in runs {
        for (_, v) in store.raw_records(run)? {
            bytes += v.len();
            n += 1;
        }
    }
    Ok(bytes.checked_div(n).unwrap_or(300))
}

/// Raw sled: a database opened like keel's (same cache, same segment size), written with
/// keel's key layout, made durable exactly like keel's `PowerLoss`/`ProcessCrash` levels
/// (sled `flush`, then `fdatasync` of sled's data file).
struct RawSled {
    db: sled::Db,
    data_file: std::fs::File,
    group: RawGroup,
}

fn sled_err(e: sled::Error) -> BenchError {
    BenchError::RawSled(e)
}

impl RawSled {
    fn open(dir: &Path) -> Result<RawSled, BenchError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(StoreConfig::default().cache_capacity_bytes)
            .segment_size(SEGMENT_BYTES)
            .open()
            .map_err(sled_err)?;
        let data = dir.join("db");
        let data_file = std::fs::File::open(&data).map_err(|e| BenchError::io(&data, e))?;
        Ok(RawSled { db, data_file, group: RawGroup::default() })
    }

    fn sync(&self, level: Level) -> Result<(), BenchError> {
        self.db.flush().map_err(sled_err)?;
        if level == Level::PowerLoss {
            self.data_file.sync_data().map_err(|e| BenchError::io(Path::new("sled data file"), e))?;
        }
        Ok(())
    }

    fn durable(&self, d: Durability) -> Result<(), BenchError> {
        match d {
            Durability::None => Ok(()),
            Durability::EveryAppend(level) => self.sync(level),
            Durability::GroupCommit(level) => self.group.commit(|| self.sync(level)),
        }
    }
}

/// keel-store's group commit, step for step: a writer takes a ticket after its write; if no
/// flush runs it leads one covering every ticket issued so far, else it waits; it returns
/// once a flush that started after its write has completed.
#[derive(Default)]
struct RawGroup {
    state: Mutex<(u64, u64, bool, u64)>,
    done: std::sync::Condvar,
}

impl RawGroup {
    fn commit(&self, flush: impl Fn() -> Result<(), BenchError>) -> Result<(), BenchError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += 1;
        let ticket = st.0;
        loop {
            if st.1 >= ticket {
                return Ok(());
            }
            if st.2 {
                st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.2 = true;
            let target = st.0;
            drop(st);
            let result = flush();
            st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.2 = false;
            st.3 += 1;
            if result.is_ok() {
                st.1 = st.1.max(target);
            }
            drop(st);
            self.done.notify_all();
            result?;
            st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    fn flushes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).3
    }
}

fn event_key(run: u64, seq: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = b'e';
    k[9..17].copy_from_slice(&run.to_be_bytes());
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `count` per second over `seconds` (0 for an empty interval).
fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// One raw measurement.
#[derive(Clone, Copy, Debug)]
struct RawSample {
    records: u64,
    seconds: f64,
    flushes: u64,
}

impl RawSample {
    fn per_second(&self) -> f64 {
        rate(self.records, self.seconds)
    }
}

/// `threads` writers, each appending `per_op` records of `value_bytes` per operation on
/// average (one `insert`, or one atomic batch for several, as keel-store does) then making
/// it durable per `d`, for `duration`, on a fresh database. A fractional `per_op` (the
/// engine's measured records per append, e.g. 2.68) is met exactly: operation `j` of
/// writer `t` writes `floor((j+1) per_op + p_t) - floor(j per_op + p_t)` records (`p_t` a
/// phase in [0, 1) spread over the writers), so the floor writes neither more nor fewer
/// records per flush than the engine did.
fn raw_inserts(
    parent: Option<&Path>,
    d: Durability,
    threads: usize,
    duration: Duration,
    value_bytes: usize,
    per_op: f64,
) -> Result<RawSample, BenchError> {
    let dir = temp_dir(parent, "raw")?;
    let raw = RawSled::open(&dir)?;
    let value = vec![0x5au8; value_bytes];
    let per_op = if per_op.is_finite() { per_op.max(1.0) } else { 1.0 };
    let barrier = std::sync::Barrier::new(threads + 1);
    let results: Vec<Result<(u64, u64, Instant), BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (raw, value, barrier) = (&raw, &value, &barrier);
                s.spawn(move || -> Result<(u64, u64, Instant), BenchError> {
                    // Each writer starts at its own phase of the pattern, so that writers
                    // making only a few operations still write `per_op` on average.
                    let phase = (t as f64 * 0.618_033_988_75).fract();
                    barrier.wait();
                    let t0 = Instant::now();
                    let (mut seq, mut ops) = (0u64, 0u64);
                    while t0.elapsed() < duration {
                        let at = |j: u64| (j as f64 * per_op + phase).floor() as u64;
                        let n = at(ops + 1) - at(ops);
                        if n <= 1 {
                            raw.db.insert(&event_key(t as u64, seq)[..], value.as_slice()).map_err(sled_err)?;
                        } else {
                            let mut batch = sled::Batch::default();
                            for k in 0..n {
                                batch.insert(&event_key(t as u64, seq + k)[..], value.as_slice());
                            }
                            raw.db.apply_batch(batch).map_err(sled_err)?;
                        }
                        raw.durable(d)?;
                        seq += n.max(1);
                        ops += 1;
                    }
                    Ok((seq, ops, Instant::now()))
                })
            })
            .collect();
        barrier.wait();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(BenchError::Invalid("raw writer panicked".into()))))
            .collect()
    });
    let t0 = Instant::now() - duration;
    let (mut records, mut ops, mut end) = (0u64, 0u64, t0);
    for r in results {
        let (n, k, finished) = r?;
        records += n;
        ops += k;
        end = end.max(finished);
    }
    let flushes = match d {
        Durability::GroupCommit(_) => raw.group.flushes(),
        Durability::EveryAppend(_) => ops,
        Durability::None => 0,
    };
    Ok(RawSample { records, seconds: end.duration_since(t0).as_secs_f64().max(duration.as_secs_f64()), flushes })
}

fn file_fdatasync(
    parent: Option<&Path>,
    record_bytes: usize,
    group: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    let dir = temp_dir(parent, "file")?;
    let path = dir.join("log");
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| BenchError::io(&path, e))?;
    let rec = vec![0x5au8; record_bytes];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < duration {
        for _ in 0..group {
            f.write_all(&rec).map_err(|e| BenchError::io(&path, e))?;
        }
        f.sync_data().map_err(|e| BenchError::io(&path, e))?;
        n += group as u64;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn floor(parent: Option<&Path>, plan: &Sizes, record_bytes: usize) -> Result<Vec<Figure>, BenchError> {
    let d = plan.floor_duration;
    let mut out = Vec::new();
    for (mode, threads, key) in [
        (Durability::EveryAppend(Level::PowerLoss), 1, "every_append.threads_1"),
        (Durability::GroupCommit(Level::PowerLoss), 64, "group_commit.threads_64"),
    ] {
        let s = raw_inserts(parent, mode, threads, d, record_bytes, 1.0)?;
        out.push(
            Figure::new(
                "floor",
                format!("floor.sled_insert.{key}"),
                format!("raw sled inserts, {}, {threads} thread(s)", keel_store::bench::mode_name(mode)),
                s.per_second(),
                "/s",
            )
            .extra(
                json!({"record_bytes": record_bytes, "threads": threads, "flushes": s.flushes, "inserts": s.records}),
            ),
        );
    }
    let one = file_fdatasync(parent, record_bytes, 1, d)?;
    out.push(
        Figure::new("floor", "floor.file.fdatasync_per_record", "plain file: write + fdatasync per record", one, "/s")
            .extra(json!({"record_bytes": record_bytes})),
    );
    let grp = file_fdatasync(parent, record_bytes, 64, d)?;
    out.push(
        Figure::new("floor", "floor.file.fdatasync_per_64", "plain file: 64 records per fdatasync", grp, "/s")
            .extra(json!({"record_bytes": record_bytes})),
    );
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// 3. throughput
// ---------------------------------------------------------------------------------------

fn mode_key(d: Durability) -> &'static str {
    match d {
        Durability::None => "none",
        Durability::EveryAppend(Level::PowerLoss) => "every_append.power_loss",
        Durability::EveryAppend(Level::ProcessCrash) => "every_append.process_crash",
        Durability::GroupCommit(Level::PowerLoss) => "group_commit.power_loss",
        Durability::GroupCommit(Level::ProcessCrash) => "group_commit.process_crash",
    }
}

/// Events a run of the chain workflow appends after `RunAccepted` (PlanRequested,
/// Planned, three per task, RunCompleted).
fn events_per_run(tasks: usize) -> usize {
    3 + 3 * tasks
}

/// The share of a cell's events after which the rate is taken: the last runs to finish
/// run with less concurrency than the cell names.
const CELL_CUTOFF: f64 = 0.9;

/// One measurement of the engine.
#[derive(Clone, Copy, Debug)]
struct EngineSample {
    events: u64,
    seconds: f64,
    appends: u64,
    flushes: u64,
    append_us: f64,
}

impl EngineSample {
    fn per_second(&self) -> f64 {
        rate(self.events, self.seconds)
    }
}

/// Drives `runs` chain runs of `tasks` tasks, `concurrency` at a time, on a fresh store;
/// the rate is taken over the first [`CELL_CUTOFF`] of the events.
async fn engine_cell(
    parent: Option<&Path>,
    d: Durability,
    concurrency: usize,
    tasks: usize,
    runs: usize,
) -> Result<EngineSample, BenchError> {
    let total = (runs * events_per_run(tasks)) as u64;
    let dir = temp_dir(parent, "throughput")?;
    let store = open_store(&dir, d)?;
    let probe = Arc::new(Probe::over(store.clone(), None));
    let engine = engine_over(probe.clone(), workflow(tasks, false, concurrency), concurrency, Policy::default())?;
    submit_all(&engine, runs).await?;
    let counters = |p: &Observed<Probe>, s: &SledStore| {
        (
            p.observer().records.load(Ordering::Relaxed),
            p.observer().appends.load(Ordering::Relaxed),
            s.group_flushes(),
            p.observer().append_ns.load(Ordering::Relaxed),
        )
    };
    let (r0, a0, f0, n0) = counters(&probe, &store);
    // A watcher notes when CELL_CUTOFF of the events are durable.
    let cut_at = r0 + (total as f64 * CELL_CUTOFF) as u64;
    let watch = {
        let (probe, store) = (probe.clone(), store.clone());
        tokio::spawn(async move {
            loop {
                if probe.observer().records.load(Ordering::Relaxed) >= cut_at {
                    return (Instant::now(), counters(&probe, &store));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let t0 = Instant::now();
    let report = engine.run_until_idle().await?;
    let (cut_t, (r1, a1, f1, n1)) = watch.await.map_err(|e| BenchError::Invalid(format!("watcher: {e}")))?;
    if report.completed != runs || !report.stopped.is_empty() {
        return Err(BenchError::Invalid(format!(
            "throughput: {runs} runs, {} completed, {} stopped: {:?}",
            report.completed,
            report.stopped.len(),
            report.stopped.first()
        )));
    }
    let appended = probe.observer().records.load(Ordering::Relaxed) - r0;
    if appended != total {
        return Err(BenchError::Invalid(format!("throughput: {appended} events appended, expected {total}")));
    }
    drop(engine);
    let appends = a1 - a0;
    Ok(EngineSample {
        events: r1 - r0,
        seconds: cut_t.duration_since(t0).as_secs_f64(),
        appends,
        flushes: match d {
            Durability::GroupCommit(_) => f1 - f0,
            _ => appends,
        },
        append_us: (n1 - n0) as f64 / 1e3 / appends.max(1) as f64,
    })
}

fn median_by<T: Copy>(v: &[T], key: impl Fn(&T) -> f64) -> Option<T> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v.get(v.len() / 2).copied()
}

async fn throughput(
    parent: Option<&Path>,
    d: Durability,
    concurrency: usize,
    plan: &Sizes,
    record_bytes: usize,
) -> Result<Figure, BenchError> {
    // Work for about `cell_seconds` at a rough rate for the mode.
    let rate = match (d, concurrency) {
        (Durability::EveryAppend(_), _) | (_, 1) => 4_000.0,
        _ => 15_000.0,
    };
    let target_events = (rate * plan.cell_seconds) as usize;
    let tasks = (target_events / concurrency.max(1) / 3).clamp(1, 64);
    let runs = (target_events / events_per_run(tasks)).max(concurrency);

    // Engine and its floor alternate (engine first, then raw, raw, engine, ...): the disk is
    // shared, so a slow spell hits both sides. The floor is raw sled with the same record
    // size, the same records per append, the same flush pattern and the same concurrency.
    let mut engine = Vec::new();
    let mut raw = Vec::new();
    let mut per_op = 1.0f64;
    for round in 0..plan.rounds.max(1) {
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let e = engine_cell(parent, d, concurrency, tasks, runs).await?;
                if engine.is_empty() {
                    per_op = (e.events as f64 / e.appends.max(1) as f64).max(1.0);
                }
                engine.push(e);
            } else {
                let secs = engine.first().map_or(plan.cell_seconds, |e| e.seconds);
                let dur = Duration::from_secs_f64(secs.clamp(0.3, plan.cell_seconds));
                raw.push(tokio::task::block_in_place(|| {
                    raw_inserts(parent, d, concurrency, dur, record_bytes, per_op)
                })?);
            }
        }
    }
    let e = median_by(&engine, EngineSample::per_second).ok_or_else(|| BenchError::Invalid("no sample".into()))?;
    let r = median_by(&raw, RawSample::per_second).ok_or_else(|| BenchError::Invalid("no sample".into()))?;

    let key = format!("throughput.{}.runs_{concurrency}", mode_key(d));
    let label = format!("engine transitions/s, {}, {concurrency} run(s)", keel_store::bench::mode_name(d));
    let mut f = Figure::new("throughput", key, label, e.per_second(), "/s").floor(
        r.per_second(),
        format!(
            "raw sled, {concurrency} thread(s), {per_op:.2} x {record_bytes}-byte record(s) per {} (mean)",
            match d {
                Durability::GroupCommit(_) => "group-commit ticket",
                _ => "flush",
            }
        ),
    );
    // The ratio is the median of the per-round ratios: each round's engine and raw
    // measurements ran back to back, so a slow spell of the shared disk cancels out.
    let mut pairs: Vec<f64> = engine
        .iter()
        .zip(&raw)
        .filter(|(_, r)| r.per_second() > 0.0)
        .map(|(e, r)| e.per_second() / r.per_second())
        .collect();
    pairs.sort_by(f64::total_cmp);
    if !pairs.is_empty() {
        f.ratio = Some(percentile(&pairs, 0.5));
    }
    let ratio = f.ratio.unwrap_or(0.0);
    match (d, concurrency) {
        (Durability::GroupCommit(Level::PowerLoss), 64) => f = f.target(">= 50% of raw", ratio >= 0.5),
        (Durability::EveryAppend(Level::PowerLoss), _) => f = f.target(">= 80% of raw", ratio >= 0.8),
        _ => {}
    }
    let rates = |v: Vec<f64>| v.into_iter().map(round).collect::<Vec<_>>();
    Ok(f.extra(json!({
        "durability": mode_key(d),
        "concurrent_runs": concurrency,
        "runs": runs,
        "tasks_per_run": tasks,
        "rounds": plan.rounds.max(1),
        "engine_per_s_samples": rates(engine.iter().map(EngineSample::per_second).collect()),
        "round_ratios": pairs.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        "raw_per_s_samples": rates(raw.iter().map(RawSample::per_second).collect()),
        "events": e.events,
        "seconds": round(e.seconds),
        "appends": e.appends,
        "mean_append_us": round(e.append_us),
        "records_per_append": round(e.events as f64 / e.appends.max(1) as f64),
        "flushes": e.flushes,
        "records_per_flush": round(e.events as f64 / e.flushes.max(1) as f64),
        "raw_records_per_op": round(per_op),
        "raw_records": r.records,
        "raw_seconds": round(r.seconds),
        "raw_flushes": r.flushes,
        "raw_records_per_flush": round(r.records as f64 / r.flushes.max(1) as f64),
    })))
}

// ---------------------------------------------------------------------------------------
// 4. latency
// ---------------------------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied().unwrap_or(0.0)
}

async fn latency(parent: Option<&Path>, samples: usize, record_bytes: usize) -> Result<Vec<Figure>, BenchError> {
    let d = Durability::GroupCommit(Level::PowerLoss);
    let dir = temp_dir(parent, "latency")?;
    let store = open_store(dir.as_path(), d)?;
    let clock = MonoClock::new();
    let probe = Arc::new(Probe::over(store.clone(), Some(clock.clone())));
    let tasks = 64;
    let runs = samples.div_ceil(tasks).max(1);
    let engine = builder()
        .store(probe.clone())
        .clock(Arc::new(clock))
        .workflow(workflow(tasks, false, 1))
        .handler(HANDLER, Arc::new(Noop))
        .workers(1)
        .open()?;
    // "One flush": a raw sled write of one step's records (the engine appends an answer
    // and the decisions it leads to together: TaskExecuted + TaskEvaluated + the next
    // TaskDispatched) made durable like PowerLoss (sled flush + fdatasync), timed whole.
    let fdir = temp_dir(parent, "flush")?;
    let raw = tokio::task::block_in_place(|| RawSled::open(&fdir))?;
    let value = vec![0x5au8; record_bytes];
    let mut flushes = Vec::with_capacity(runs * tasks);
    let mut key = 0u64;
    // Engine runs and flush samples alternate, so both see the same disk.
    for _ in 0..runs {
        submit_all(&engine, 1).await?;
        let report = engine.run_until_idle().await?;
        if report.completed != 1 {
            return Err(BenchError::Invalid(format!("latency: run not completed: {report:?}")));
        }
        tokio::task::block_in_place(|| -> Result<(), BenchError> {
            for _ in 0..tasks {
                let t = Instant::now();
                let mut batch = sled::Batch::default();
                for _ in 0..3 {
                    batch.insert(&event_key(1, key)[..], value.as_slice());
                    key += 1;
                }
                raw.db.apply_batch(batch).map_err(sled_err)?;
                raw.sync(Level::PowerLoss)?;
                flushes.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(())
        })?;
    }
    drop(engine);
    let append_us = probe.observer().append_ns.load(Ordering::Relaxed) as f64
        / 1e3
        / probe.observer().appends.load(Ordering::Relaxed).max(1) as f64;
    let marks = match &probe.observer().steps {
        Some((_, m)) => m.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        None => Vec::new(),
    };
    // Per run, a step runs from its TaskDispatched's decision time to the time its
    // TaskEvaluated was durable (one task in flight at a time: a chain).
    let mut open: std::collections::BTreeMap<RunId, i64> = std::collections::BTreeMap::new();
    let mut steps: Vec<f64> = Vec::new();
    for (run, dispatched, at, durable) in marks {
        if dispatched {
            open.insert(run, at);
        } else if let Some(start) = open.remove(&run) {
            steps.push((durable - start) as f64);
        }
    }
    steps.sort_by(f64::total_cmp);
    flushes.sort_by(f64::total_cmp);
    // Where a step's time goes: inside the store's append, and between appends.
    let spans = probe.observer().spans.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut inside: Vec<f64> = spans.iter().map(|(a, b)| (b - a) as f64).collect();
    let mut between: Vec<f64> = spans
        .windows(2)
        .filter_map(|w| match w {
            [(_, end), (start, _)] => Some((start - end) as f64),
            _ => None,
        })
        .filter(|g| *g >= 0.0)
        .collect();
    inside.sort_by(f64::total_cmp);
    between.sort_by(f64::total_cmp);
    let (p50, p99, p999) = (percentile(&steps, 0.5), percentile(&steps, 0.99), percentile(&steps, 0.999));
    let (f50, f99, f999) = (percentile(&flushes, 0.5), percentile(&flushes, 0.99), percentile(&flushes, 0.999));
    let n = steps.len();
    let flush_extra = json!({"samples": flushes.len(), "p50_us": round(f50), "p99_us": round(f99), "p999_us": round(f999), "records": 3, "record_bytes": record_bytes});
    let step_extra = json!({"samples": n, "p50_us": round(p50), "p99_us": round(p99), "p999_us": round(p999), "durability": mode_key(d), "mean_append_us": round(append_us), "append_p50_us": round(percentile(&inside, 0.5)), "between_appends_p50_us": round(percentile(&between, 0.5)), "between_appends_p99_us": round(percentile(&between, 0.99))});
    Ok(vec![
        Figure::new("latency", "latency.step.p50", "durable step (dispatch -> evaluated durable), p50", p50, "us")
            .floor(f50, "one flush: raw sled write of 3 records + flush + fdatasync, p50")
            .extra(step_extra),
        Figure::new("latency", "latency.step.p99", "durable step, p99", p99, "us")
            .floor(f99, "one flush, p99")
            .target("<= 3x one flush (p99 vs p99)", p99 <= 3.0 * f99)
            .extra(json!({"step_p99_over_flush_p50": round(p99 / f50.max(1.0))})),
        Figure::new("latency", "latency.step.p999", format!("durable step, p99.9 ({n} samples)"), p999, "us")
            .floor(f999, "one flush, p99.9"),
        Figure::new("latency", "latency.flush.p50", "one flush, p50", f50, "us").extra(flush_extra),
    ])
}

// ---------------------------------------------------------------------------------------
// 5. resume
// ---------------------------------------------------------------------------------------

/// A legal history of `events` events built with the store API: accepted, planned (one
/// task), then dispatch / transient failure / retry cycles. Returns its folded state.
fn build_long_run(log: &dyn Store, run: RunId, events: u64, snapshot_every: u64) -> Result<RunState, BenchError> {
    let t0 = 1_700_000_000_000_000i64;
    let mut state: Option<RunState> = None;
    let mut batch: Vec<NewRecord> = Vec::new();
    let mut expected = Seq(0);
    let mut attempt = 0u32;
    let task = TaskId("t00".to_owned());
    let mut seq = 0u64;
    let flush = |state: &RunState, batch: &mut Vec<NewRecord>, expected: &mut Seq| -> Result<(), BenchError> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        log.append(run, *expected, std::mem::take(batch), None)?;
        let before = *expected;
        *expected = Seq(expected.0 + n);
        if snapshot_every > 0 && before.0 / snapshot_every != expected.0 / snapshot_every {
            log.save_snapshot(run, state.next_seq, &keel_engine::encode_snapshot(state)?)?;
        }
        Ok(())
    };
    while seq < events {
        let event = match seq {
            0 => Event::RunAccepted {
                workflow: WORKFLOW.to_owned(),
                workflow_version: 1,
                input: Json::new(&json!({"ticket": 1, "text": "my order has not arrived"})),
                idempotency_key: None,
                priority: 0,
                seed: 7,
                budget: Default::default(),
                on_exhausted: ExhaustionPolicy::Partial,
                routes: Vec::new(),
                evaluator_model: None,
                max_parallel_tasks: 4,
            },
            1 => Event::PlanRequested { revision: 0, reason: PlanReason::Initial },
            2 => Event::Planned { revision: 0, plan: chain_plan(1) },
            n => match (n - 3) % 3 {
                0 => {
                    attempt += 1;
                    Event::TaskDispatched {
                        task: task.clone(),
                        attempt,
                        effect_key: keel_engine::core::effect_key(run, &task, 0),
                        attempt_key: keel_engine::core::attempt_key(run, 0, &task, attempt),
                        model: None,
                        input: TaskInput {
                            input: Json::new(&json!({"step": 0, "prompt": "summarise the ticket and propose a reply"})),
                            upstream: Default::default(),
                            note: Some("previous attempt failed (Transient): rate limited".to_owned()),
                            skipped: Vec::new(),
                        },
                        reserved: Usage::default(),
                    }
                }
                1 => Event::TaskFailed {
                    task: task.clone(),
                    attempt,
                    class: ErrorClass::Transient,
                    error: "rate limited".to_owned(),
                    usage: Usage { cost_micros: 10, tokens: 0 },
                    source: keel_engine::FailureSource::Handler,
                    note: None,
                },
                _ => Event::RetryScheduled { task: task.clone(), next_attempt: attempt + 1, delay_ms: 100 },
            },
        };
        let at = t0 + seq as i64 * 1000;
        let logged = Logged { run, seq: Seq(seq), at_us: at, event };
        match state.as_mut() {
            None => state = Some(apply(None, &logged).map_err(tr)?),
            Some(s) => apply_mut(s, &logged).map_err(tr)?,
        }
        batch.push(prepare(&logged.event, at)?);
        seq += 1;
        // Appends of a few records, like the engine's, so snapshots land where the engine
        // would put them (when an append crosses a multiple of `snapshot_every`).
        if batch.len() >= 3 {
            if let Some(s) = &state {
                flush(s, &mut batch, &mut expected)?;
            }
        }
    }
    let state = state.ok_or_else(|| BenchError::Invalid("empty run".into()))?;
    flush(&state, &mut batch, &mut expected)?;
    Ok(state)
}

fn resume(parent: Option<&Path>, plan: &Sizes, progress: &mut dyn FnMut(&str)) -> Result<Vec<Figure>, BenchError> {
    let dir = temp_dir(parent, "resume")?;
    let mut built = Vec::new();
    {
        let store = open_store(dir.as_path(), Durability::None)?;
        for (i, &n) in plan.resume_sizes.iter().enumerate() {
            for snap in [true, false] {
                progress(&format!(
                    "resume: building a run of {n} events{}...",
                    if snap { " with snapshots" } else { "" }
                ));
                let mut b = [0u8; 16];
                b[0] = 0x52;
                b[1] = i as u8;
                b[2] = u8::from(snap);
                let run = RunId::from_bytes(b);
                let state = build_long_run(store.as_ref(), run, n, if snap { 64 } else { 0 })?;
                built.push((n, snap, run, state));
            }
        }
        store.flush()?;
    }
    progress("resume: measuring...");
    // Reopen: resume after a restart reads through a cold sled cache.
    let store = open_store(dir.as_path(), Durability::None)?;
    let ctx = Context { policy: Policy::default(), handlers: [HANDLER.to_owned()].into_iter().collect() };
    let mut times: Vec<(u64, bool, f64, f64)> = Vec::new();
    for (n, snap, run, want) in &built {
        let mut samples = Vec::new();
        let mut first = 0.0;
        for k in 0..plan.resume_repeats.max(1) {
            let t = Instant::now();
            let state = load_state(store.as_ref(), *run)?
                .ok_or_else(|| BenchError::Invalid(format!("resume: unknown run {run}")))?;
            let cmds = decide(&state, &ctx);
            let us = t.elapsed().as_secs_f64() * 1e6;
            if &state != want || cmds.is_empty() {
                return Err(BenchError::Invalid(format!("resume: run of {n} events folded to another state")));
            }
            if k == 0 {
                first = us;
            }
            samples.push(us);
        }
        samples.sort_by(f64::total_cmp);
        times.push((*n, *snap, percentile(&samples, 0.5), first));
    }
    let base = |snap: bool| times.iter().find(|(n, s, _, _)| *n == 1_000 && *s == snap).map(|t| t.2);
    let mut out = Vec::new();
    for (n, snap, median, first) in &times {
        let key = format!("resume.events_{n}.{}", if *snap { "snapshots" } else { "no_snapshots" });
        let label = format!("resume one run of {n} events, {}", if *snap { "with snapshots" } else { "no snapshots" });
        let mut f = Figure::new("resume", key, label, *median, "us").extra(json!({
            "events": n,
            "snapshots": snap,
            "first_us": round(*first),
            "repeats": plan.resume_repeats,
            "snapshot_every": if *snap { 64 } else { 0 },
        }));
        if let Some(b) = base(*snap) {
            if *n != 1_000 {
                f = f.floor(b, format!("the 1k-event run, {}", if *snap { "with snapshots" } else { "no snapshots" }));
            }
        }
        if *snap && *n == 100_000 {
            let ratio = f.ratio.unwrap_or(f64::INFINITY);
            f = f.target("< 2x the 1k-event run", ratio < 2.0);
        }
        out.push(f);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// 6. replay
// ---------------------------------------------------------------------------------------

fn tr(e: keel_engine::TransitionError) -> BenchError {
    BenchError::Engine(EngineError::Transition(e))
}

/// Folds a stream of `(position of the run, event)` into one state per run (in place),
/// counting events.
fn fold_stream(events: impl Iterator<Item = (usize, Result<Logged, BenchError>)>) -> Result<u64, BenchError> {
    let mut n = 0u64;
    let mut state: Option<(usize, RunState)> = None;
    for (i, logged) in events {
        let mut logged = logged?;
        match state.as_mut() {
            Some((j, s)) if *j == i => apply_take(s, &mut logged).map_err(tr)?,
            _ => state = Some((i, apply(None, &logged).map_err(tr)?)),
        }
        n += 1;
    }
    Ok(n)
}

/// The runs as resume reads them: `read_logged_runs` (read ahead, every check of
/// `read_logged`).
fn fold_db(log: &dyn EventLog, runs: &[RunId]) -> Result<u64, BenchError> {
    fold_stream(read_logged_runs(log, runs).map(|(i, r)| (i, r.map_err(BenchError::from))))
}

/// One record of the replay: decode its event, check the envelope's kind.
fn logged_of(rec: Result<keel_store::Record, keel_store::StoreError>) -> Result<Logged, BenchError> {
    let rec = rec?;
    let event: Event = keel_engine::model::upcast::decode(&rec.kind, rec.payload_version(), &rec.payload)
        .map_err(|reason| keel_store::StoreError::Decode { run: rec.run, seq: rec.seq, reason })?;
    if event.kind_name() != rec.kind {
        return Err(BenchError::Invalid(format!("run {} seq {}: kind mismatch", rec.run, rec.seq)));
    }
    Ok(Logged { run: rec.run, seq: rec.seq, at_us: rec.time_us, event })
}

/// Decode + chain link check + fold through `EventLog::read_runs` (the sled store reads
/// ahead on a second thread). Since record schema v2 the link check covers the payload
/// bytes, so this and `read_logged` do the same work on v2 records; on v1 records
/// `read_logged` also recomputes the payload root.
fn fold_db_unverified(log: &dyn EventLog, runs: &[RunId]) -> Result<u64, BenchError> {
    fold_stream(log.read_runs(runs).map(|(i, r)| (i, logged_of(r))))
}

/// [`fold_db_unverified`] on one thread: `EventLog::read` run after run.
fn fold_db_one_thread(log: &dyn EventLog, runs: &[RunId]) -> Result<u64, BenchError> {
    fold_stream(keel_store::read_runs_in_turn(log, runs).map(|(i, r)| (i, logged_of(r))))
}

fn fold_export(path: &Path) -> Result<u64, BenchError> {
    let mut n = 0u64;
    for r in export_runs(path)? {
        let (_, events) = r?;
        let mut it = events.into_iter();
        let Some(first) = it.next() else { continue };
        let mut s = apply(None, &first).map_err(tr)?;
        n += 1;
        for mut e in it {
            apply_take(&mut s, &mut e).map_err(tr)?;
            n += 1;
        }
    }
    Ok(n)
}

/// A raw sled scan of the runs' records, run by run (the access pattern of a replay: one
/// range per run), touching every value.
fn raw_scan(db: &sled::Db, runs: &[RunId]) -> Result<(u64, u64), BenchError> {
    let (mut n, mut bytes) = (0u64, 0u64);
    for run in runs {
        let key = |seq: u64| {
            let mut k = [0u8; 25];
            k[0] = b'e';
            k[1..17].copy_from_slice(run.as_bytes());
            k[17..].copy_from_slice(&seq.to_be_bytes());
            k
        };
        // From the run's prefix key: a finished run's records are one sealed value there.
        let mut prefix = run.as_bytes().to_vec();
        prefix.insert(0, b'e');
        for kv in db.range(prefix..=key(u64::MAX).to_vec()) {
            let (k, v) = kv.map_err(sled_err)?;
            if k.len() == 17 {
                let values = keel_store::bench::sealed_record_values(&k, &v)
                    .map_err(|e| BenchError::Invalid(format!("sealed records of run {run}: {e}")))?;
                bytes += values.iter().map(|v| v.len() as u64).sum::<u64>();
                n += values.len() as u64;
                continue;
            }
            bytes += v.len() as u64;
            n += 1;
        }
    }
    Ok((n, bytes))
}

fn best_of<T>(repeats: usize, mut f: impl FnMut() -> Result<T, BenchError>) -> Result<(T, f64), BenchError> {
    let mut best: Option<(T, f64)> = None;
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let v = f()?;
        let s = t.elapsed().as_secs_f64();
        times.push(s);
        best = Some((v, s));
    }
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 0.5);
    best.map(|(v, _)| (v, median)).ok_or_else(|| BenchError::Invalid("no repeat".into()))
}

async fn replay(parent: Option<&Path>, plan: &Sizes) -> Result<Vec<Figure>, BenchError> {
    let dir = temp_dir(parent, "replay")?;
    let runs = replay_setup(dir.as_path(), plan).await?;
    let repeats = 5;
    let export = dir.as_path().join("export.jsonl");
    let r = tokio::task::block_in_place(|| replay_rounds(dir.as_path(), &runs, repeats))?;
    replay_figures(r, runs.len(), plan, repeats, &export)
}

/// The replay section's figures from its rounds and a timed fold of the export.
fn replay_figures(
    r: ReplayRounds,
    runs: usize,
    plan: &Sizes,
    repeats: usize,
    export: &Path,
) -> Result<Vec<Figure>, BenchError> {
    let ReplayRounds {
        raw: raw_rates,
        plain: plain_rates,
        verified: verified_rates,
        one_thread: one_thread_rates,
        scanned,
        bytes,
        folded,
        folded_plain,
        folded_one,
    } = r;
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let pair = |a: &[f64], b: &[f64]| {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y.max(1e-9)).collect();
        med(&r)
    };
    let raw_per_s = med(&raw_rates);
    let plain_per_s = med(&plain_rates);
    let db_per_s = med(&verified_rates);
    let plain_ratio = pair(&plain_rates, &raw_rates);
    let verified_ratio = pair(&verified_rates, &raw_rates);
    let (folded_jsonl, jsonl_s) = tokio::task::block_in_place(|| best_of(repeats, || fold_export(export)))?;
    let export_bytes = std::fs::metadata(export).map(|m| m.len()).unwrap_or(0);
    if folded != scanned || folded_jsonl != scanned || folded_plain != scanned || folded_one != scanned {
        return Err(BenchError::Invalid(format!(
            "replay: raw scan saw {scanned} records, the db fold {folded}, the export fold {folded_jsonl}"
        )));
    }
    let jsonl_per_s = folded_jsonl as f64 / jsonl_s;
    let common = json!({"events": scanned, "runs": runs, "tasks_per_run": plan.replay_tasks, "record_bytes_mean": bytes / scanned.max(1), "repeats": repeats});
    let mut db = Figure::new(
        "replay",
        "replay.db",
        "replay from the db: decode + chain check + fold, events/s (sled reads ahead on a 2nd thread)",
        plain_per_s,
        "/s",
    )
    .floor(raw_per_s, "raw sled scan of the same records, run by run (one thread)")
    .extra(json!({"events": scanned, "runs": runs, "tasks_per_run": plan.replay_tasks, "rounds": repeats, "per_s_samples": plain_rates.iter().map(|r| r.round()).collect::<Vec<_>>(), "raw_per_s_samples": raw_rates.iter().map(|r| r.round()).collect::<Vec<_>>()}));
    db.ratio = Some(plain_ratio);
    let db_ratio = plain_ratio;
    let mut verified = Figure::new(
        "replay",
        "replay.db_verified",
        "replay from the db with every check of resume (read_logged_runs), events/s",
        db_per_s,
        "/s",
    )
    .floor(raw_per_s, "raw sled scan of the same records, run by run (one thread)")
    .extra(json!({"per_s_samples": verified_rates.iter().map(|r| r.round()).collect::<Vec<_>>()}));
    verified.ratio = Some(verified_ratio);
    let mut one_thread = Figure::new(
        "replay",
        "replay.db_one_thread",
        "replay from the db on one thread (read run after run), events/s",
        med(&one_thread_rates),
        "/s",
    )
    .floor(raw_per_s, "raw sled scan of the same records, run by run (one thread)")
    .extra(json!({"per_s_samples": one_thread_rates.iter().map(|r| r.round()).collect::<Vec<_>>()}));
    one_thread.ratio = Some(pair(&one_thread_rates, &raw_rates));
    Ok(vec![
        Figure::new("replay", "replay.raw_scan", "raw sled scan, records/s", raw_per_s, "/s").extra(common.clone()),
        db.target(">= 60% of raw scan", db_ratio >= 0.6),
        one_thread,
        verified,
        Figure::new(
            "replay",
            "replay.jsonl",
            "replay from a JSONL export: parse + rebuild + fold, events/s (1 thread)",
            jsonl_per_s,
            "/s",
        )
        .floor(raw_per_s, "raw sled scan of the same records")
        .target(">= 200,000 events/s per core", jsonl_per_s >= 200_000.0)
        .extra(json!({"export_bytes": export_bytes, "events": folded_jsonl})),
    ])
}

/// The replay section's database (runs of `plan.replay_tasks` tasks, worked to the end)
/// and its JSONL export (`export.jsonl`), in `dir`; neither is timed. Returns the runs.
async fn replay_setup(dir: &Path, plan: &Sizes) -> Result<Vec<RunId>, BenchError> {
    let store = open_store(dir, Durability::None)?;
    let engine = engine_over(store.clone(), workflow(plan.replay_tasks, false, 0), 64, Policy::default())?;
    submit_all(&engine, plan.replay_runs).await?;
    engine.run_until_idle().await?;
    drop(engine);
    store.flush()?;
    let mut runs = store.runs()?;
    runs.sort();
    // The export (not timed).
    let path = dir.join("export.jsonl");
    let file = std::fs::File::create(&path).map_err(|e| BenchError::io(&path, e))?;
    let mut w = JsonlWriter::new(std::io::BufWriter::new(file), Redaction::default(), Value::Null, 0)?;
    for &run in &runs {
        w.write_run(store.as_ref(), run)?;
    }
    w.finish()?.flush().map_err(|e| BenchError::io(&path, e))?;
    Ok(runs)
}

/// The replay section's timings: each a list of events/s, one per round.
struct ReplayRounds {
    /// Raw sled scans.
    raw: Vec<f64>,
    /// Folds from the db without resume's checks.
    plain: Vec<f64>,
    /// Folds from the db with every check of resume.
    verified: Vec<f64>,
    /// Folds from the db on one thread.
    one_thread: Vec<f64>,
    /// Records the raw scan saw, and their bytes.
    scanned: u64,
    bytes: u64,
    /// Events each fold folded (all must equal `scanned`).
    folded: u64,
    folded_plain: u64,
    folded_one: u64,
}

/// Rounds of: a raw scan and the two folds, each on a freshly opened database (opened
/// outside the timing: sled's cache is cold, the OS page cache warm, as for `keel replay`),
/// raw first or last in turn. Values are medians, ratios the medians of the per-round
/// ratios (the disk is shared).
fn replay_rounds(dir: &Path, runs: &[RunId], repeats: usize) -> Result<ReplayRounds, BenchError> {
    let db_dir = dir.join("db");
    let time = |f: &mut dyn FnMut() -> Result<u64, BenchError>| -> Result<(u64, f64), BenchError> {
        let t = Instant::now();
        let n = f()?;
        Ok((n, t.elapsed().as_secs_f64()))
    };
    let (mut raw_rates, mut plain_rates, mut verified_rates) = (Vec::new(), Vec::new(), Vec::new());
    let mut one_thread_rates = Vec::new();
    let (mut scanned, mut bytes, mut folded, mut folded_plain) = (0u64, 0u64, 0u64, 0u64);
    let mut folded_one = 0u64;
    for round in 0..repeats {
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let raw = RawSled::open(&db_dir)?;
                let t = Instant::now();
                let (n, b) = raw_scan(&raw.db, runs)?;
                raw_rates.push(n as f64 / t.elapsed().as_secs_f64());
                (scanned, bytes) = (n, b);
            } else {
                let store = open_store(dir, Durability::None)?;
                let (n, secs) = time(&mut || fold_db_unverified(store.as_ref(), runs))?;
                plain_rates.push(n as f64 / secs);
                folded_plain = n;
                drop(store);
                let store = open_store(dir, Durability::None)?;
                let (n, secs) = time(&mut || fold_db(store.as_ref(), runs))?;
                verified_rates.push(n as f64 / secs);
                folded = n;
                drop(store);
                let store = open_store(dir, Durability::None)?;
                let (n, secs) = time(&mut || fold_db_one_thread(store.as_ref(), runs))?;
                one_thread_rates.push(n as f64 / secs);
                folded_one = n;
            }
        }
    }
    Ok(ReplayRounds {
        raw: raw_rates,
        plain: plain_rates,
        verified: verified_rates,
        one_thread: one_thread_rates,
        scanned,
        bytes,
        folded,
        folded_plain,
        folded_one,
    })
}
