//! Section 7, `payloads`: runs with large outputs (a fan-in of 8 tasks with 1 MB outputs
//! each), appended through the engine and replayed from the db, each next to its floor:
//! the same bytes written to a plain file with one `fdatasync` per run, and a raw sled
//! scan of the same payload chunks. Outputs over 4 KiB go to the payload store beside the
//! log in 32 KiB chunks; events carry their digests.

use super::{open_store, percentile, temp_dir, BenchError, Figure, QuietSink, RawSled};
use keel_engine::api::{BoxFuture, Evaluation, Evaluator, HandlerError, PlanRequest, Planner};
use keel_engine::{
    apply, apply_take, read_logged_runs, Engine, Plan, Policy, Request, RunState, TaskCall, TaskHandler, TaskKind,
    TaskOutput, TaskSpec, Usage, Verdict, WorkflowType,
};
use keel_store::{Durability, EventLog, Level, RunId};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const WORKFLOW: &str = "bench_fan_in";
/// Tasks whose outputs are large, joined by one more task.
const PARTS: usize = 8;
/// Characters of each part's output text (its canonical JSON is a few bytes more).
const PART_BYTES: usize = 1_000_000;

struct FanPlanner;

impl Planner for FanPlanner {
    fn plan(&self, _request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let mut tasks: Vec<TaskSpec> = (0..PARTS)
            .map(|i| TaskSpec::new(&format!("part{i}"), TaskKind::Tool, "bulk").with_input(&json!({ "i": i })))
            .collect();
        let deps: Vec<String> = (0..PARTS).map(|i| format!("part{i}")).collect();
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        tasks.push(TaskSpec::new("join", TaskKind::Tool, "join").with_deps(&deps));
        Box::pin(async move { Ok(Plan { tasks, rationale: "bench fan-in".to_owned() }) })
    }
}

struct Accept;

impl Evaluator for Accept {
    fn evaluate(&self, _request: keel_engine::api::EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        Box::pin(async { Ok(Evaluation { verdict: Verdict::Pass, notes: String::new(), usage: Usage::default() }) })
    }
}

/// 1 MB of text, different per run and part (so no payload is shared between runs).
struct Bulk;

impl TaskHandler for Bulk {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let seed = format!("{}-{}-", call.run, call.task.0);
        let text: String = seed.chars().cycle().take(PART_BYTES).collect();
        Box::pin(async move { Ok(TaskOutput { output: json!({ "text": text }), usage: Usage::default() }) })
    }
}

struct Join;

impl TaskHandler for Join {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let bytes: usize = call.input.upstream.values().map(|j| j.0.len()).sum();
        Box::pin(async move { Ok(TaskOutput { output: json!({ "bytes_in": bytes }), usage: Usage::default() }) })
    }
}

fn engine(log: Arc<dyn keel_store::Store>) -> Result<Engine, BenchError> {
    let mut wf = WorkflowType::new(WORKFLOW, Arc::new(FanPlanner), Arc::new(Accept));
    wf.max_parallel_tasks = PARTS as u32;
    Ok(Engine::builder()
        .store(log)
        .workflow(wf)
        .handler("bulk", Arc::new(Bulk))
        .handler("join", Arc::new(Join))
        .escalation_sink(Arc::new(QuietSink))
        .policy(Policy::default())
        .open()?)
}

/// Bytes of `output` that go to the payload store (0 for a value kept inline).
fn stored_bytes(output: &keel_engine::Json) -> usize {
    if output.0.len() > keel_engine::model::payload::INLINE_JSON_BYTES_MAX {
        output.0.len()
    } else {
        0
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Writes `bytes` bytes to a new file in `dir` (in 32 KiB writes) and `fdatasync`s it:
/// the floor of one run's append.
fn raw_write(dir: &Path, name: &str, bytes: usize) -> Result<f64, BenchError> {
    let path = dir.join(name);
    let chunk = vec![0x5au8; 32 * 1024];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(|e| BenchError::io(&path, e))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(chunk.get(..n).unwrap_or_default()).map_err(|e| BenchError::io(&path, e))?;
        left -= n;
    }
    f.sync_data().map_err(|e| BenchError::io(&path, e))?;
    Ok(t.elapsed().as_secs_f64())
}

/// A raw sled scan of every payload chunk (`'Q'` keys) of the db in `db_dir`, opened
/// outside the timing: (bytes read, seconds).
fn raw_chunk_scan(db_dir: &Path) -> Result<(u64, f64), BenchError> {
    let raw = RawSled::open(db_dir)?;
    let t = Instant::now();
    let mut bytes = 0u64;
    for kv in raw.db.range(b"Q".to_vec()..b"R".to_vec()) {
        let (_, v) = kv.map_err(BenchError::RawSled)?;
        bytes += v.len() as u64;
    }
    Ok((bytes, t.elapsed().as_secs_f64()))
}

/// Folds `runs` from the db as resume and replay read them (`read_logged_runs`: chain
/// checks, payload reads with their SHA-256, inflation), returning the output bytes folded.
fn fold_outputs(log: &dyn EventLog, runs: &[RunId]) -> Result<u64, BenchError> {
    let mut state: Option<(usize, RunState)> = None;
    let mut bytes = 0u64;
    for (i, logged) in read_logged_runs(log, runs) {
        let mut logged = logged?;
        if let keel_engine::Event::TaskExecuted { output, .. } = &logged.event {
            bytes += stored_bytes(output) as u64;
        }
        let tr = |e| BenchError::Engine(keel_engine::EngineError::Transition(e));
        match state.as_mut() {
            Some((j, s)) if *j == i => apply_take(s, &mut logged).map_err(tr)?,
            _ => state = Some((i, apply(None, &logged).map_err(tr)?)),
        }
    }
    Ok(bytes)
}

/// The section: `runs` fan-in runs appended one after another (group commit, power-loss
/// durable), each next to a raw write of its output bytes; then `repeats` replays of all
/// of them, each next to a raw sled scan of their payload chunks.
pub(super) async fn payloads(parent: Option<&Path>, runs: usize, repeats: usize) -> Result<Vec<Figure>, BenchError> {
    let dir = temp_dir(parent, "payloads")?;
    let store = open_store(&dir, Durability::GroupCommit(Level::PowerLoss))?;
    let engine = engine(store.clone())?;
    let raw_dir = temp_dir(parent, "payloads-raw")?;
    let (mut keel_rates, mut raw_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut ids = Vec::new();
    let mut run_bytes = 0usize;
    for k in 0..runs {
        let t = Instant::now();
        let s = engine.submit(Request::new(WORKFLOW, json!({ "k": k }))).await?;
        let report = engine.run_until_idle().await?;
        let secs = t.elapsed().as_secs_f64();
        if !report.stopped.is_empty() || report.completed != 1 {
            return Err(BenchError::Invalid(format!("payloads: run {} did not complete: {report:?}", s.run)));
        }
        run_bytes = engine
            .events(s.run)?
            .iter()
            .map(|e| match &e.event {
                keel_engine::Event::TaskExecuted { output, .. } => stored_bytes(output),
                _ => 0,
            })
            .sum();
        let raw_secs = tokio::task::block_in_place(|| raw_write(&raw_dir, &format!("run{k}"), run_bytes))?;
        let mb = run_bytes as f64 / 1e6;
        keel_rates.push(mb / secs);
        raw_rates.push(mb / raw_secs);
        ratios.push(raw_secs / secs);
        ids.push(s.run);
    }
    drop(engine);
    drop(store);
    ids.sort();

    let (mut replay_rates, mut read_rates, mut replay_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let store = open_store(&dir, Durability::None)?;
        let t = Instant::now();
        let bytes = tokio::task::block_in_place(|| fold_outputs(store.as_ref(), &ids))?;
        let secs = t.elapsed().as_secs_f64();
        drop(store);
        let (read, raw_secs) = tokio::task::block_in_place(|| raw_chunk_scan(&dir.join("db")))?;
        if read != bytes {
            return Err(BenchError::Invalid(format!("payloads: folded {bytes} output bytes, read {read} raw")));
        }
        replay_rates.push(bytes as f64 / 1e6 / secs);
        read_rates.push(read as f64 / 1e6 / raw_secs);
        replay_ratios.push(raw_secs / secs);
    }
    let common = json!({"runs": runs, "parts": PARTS, "output_bytes_per_run": run_bytes, "repeats": repeats});
    let mut append = Figure::new(
        "payloads",
        "payloads.append",
        "runs with 8 outputs of 1 MB through the engine (group commit, power loss), MB of outputs/s",
        median(&keel_rates),
        "MB/s",
    )
    .floor(median(&raw_rates), "the same bytes written to a plain file, fdatasync per run")
    .extra(json!({"common": common, "samples": keel_rates, "raw_samples": raw_rates}));
    append.ratio = Some(median(&ratios));
    let mut replay = Figure::new(
        "payloads",
        "payloads.replay",
        "replay of those runs from the db (chain checks, payload reads + SHA-256, fold), MB of outputs/s",
        median(&replay_rates),
        "MB/s",
    )
    .floor(median(&read_rates), "a raw sled scan of the same payload chunks (one pass, no checks)")
    .extra(json!({"samples": replay_rates, "raw_samples": read_rates}));
    replay.ratio = Some(median(&replay_ratios));
    Ok(vec![append, replay])
}
