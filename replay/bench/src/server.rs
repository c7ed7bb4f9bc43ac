//! Section 8, `server`: the HTTP API over a database with many finished runs (10k with
//! `--quick`, 100k in the full run), each figure next to its floor:
//!
//! - the first page of `GET /v1/runs` and `GET /v1/escalations`, against what listing cost
//!   before the run index (a fold of every run: `load_state` run after run);
//! - from opening the engine to the first new run completed, against the same on an empty
//!   database: in this process, and (last in the section, median of three) in a new one
//!   ([`RESTART_ENV`]: this program started again, timed from its spawn), which is what a
//!   restart of `keel serve` pays (a fresh heap: sled's open of the same files costs more
//!   in a new process than in one that opened them before);
//! - `POST /v1/runs/{run}/resolve` p50/p99 while 64 runs execute, against
//!   `Engine::resolve` called directly under the same load;
//! - events streamed per second to 100 SSE subscribers (one live tail per run), against
//!   the rate the engine recorded those events.

use super::{percentile, submit_n, temp_dir, BenchError, ChainPlanner, Figure, Noop, PassEvaluator, QuietSink};
use keel_engine::{load_state, Decision, Engine, Request, Resolution, RunId, WorkflowType};
use keel_server::{Auth, Role};
use keel_store::{Coordination, Durability, EventLog, Level, SledStore, Store, StoreConfig};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "bench-token-0123456789";
/// Set in a restart process of this section: the database directory it opens.
pub const RESTART_ENV: &str = "KEEL_BENCH_RESTART";
/// The line a restart process prints when its first run completed (then its timings).
const RESTART_DONE: &str = "keel-bench-restart-done";
/// Restart processes timed (median reported), each beside one on an empty database.
const RESTART_PROCESSES: usize = 3;
/// How long a restart process may take, from its spawn to its exit.
const RESTART_LIMIT: Duration = Duration::from_secs(120);
const REVIEW: &str = "bench_review";
/// Requests per listing figure (median reported).
const LIST_REPEATS: usize = 21;
/// Runs executing while the resolutions are timed.
const BACKGROUND_RUNS: usize = 64;
/// SSE subscribers (one per run).
const SUBSCRIBERS: usize = 100;

fn engine(dir: &Path, durability: Durability) -> Result<Engine, BenchError> {
    Ok(engine_timed(dir, durability)?.0)
}

/// [`engine`], and how long the sled open in it took (ms).
fn engine_timed(dir: &Path, durability: Durability) -> Result<(Engine, f64), BenchError> {
    let t = Instant::now();
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(dir.join("db"), StoreConfig { durability, ..StoreConfig::default() })?);
    let sled_open_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut chain = super::workflow(4, false, 1024);
    chain.max_concurrent_runs = 1024;
    let mut review =
        WorkflowType::new(REVIEW, Arc::new(ChainPlanner { tasks: 1, human: true }), Arc::new(PassEvaluator));
    review.max_concurrent_runs = 1024;
    let e = Engine::builder()
        .store(store)
        .workflow(chain)
        .workflow(review)
        .handler(super::HANDLER, Arc::new(Noop))
        .escalation_sink(Arc::new(QuietSink))
        .workers(256)
        .open()?;
    Ok((e, sled_open_ms))
}

/// A restart process ([`RESTART_ENV`]): opens the engine on `dir` (group commit, power
/// loss, as `keel serve`), starts its workers, submits one run and waits for it, prints
/// [`RESTART_DONE`] and the times (ms from the start of this function) as JSON,
/// then stops its workers and exits.
pub fn restart_process(dir: &str) -> Result<(), BenchError> {
    let t = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Invalid(format!("cannot start the async runtime: {e}")))?;
    let runtime_ms = t.elapsed().as_secs_f64() * 1e3;
    let (e, sled_open_ms) = engine_timed(Path::new(dir), Durability::GroupCommit(Level::PowerLoss))?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let times = rt.block_on(async {
        let workers = e.start();
        let first = e.submit(Request::new(super::WORKFLOW, json!({"after": "process restart"}))).await?.run;
        let submitted_ms = t.elapsed().as_secs_f64() * 1e3;
        e.wait(first).await?;
        let done_ms = t.elapsed().as_secs_f64() * 1e3;
        println!("{RESTART_DONE}");
        workers.shutdown().await;
        Ok::<_, BenchError>(json!({
            "runtime_ms": runtime_ms, "sled_open_ms": sled_open_ms, "open_ms": open_ms,
            "submitted_ms": submitted_ms, "done_ms": done_ms,
        }))
    })?;
    drop(e);
    println!("{times}");
    Ok(())
}

/// Runs [`restart_process`] on `dir` in a new process (this program again): the time from
/// its spawn to its first run completed (ms), and the times it reported. A process that
/// has not exited within [`RESTART_LIMIT`] is killed (an error).
fn restart_in_new_process(dir: &Path) -> Result<(f64, serde_json::Value), BenchError> {
    use std::io::BufRead;
    use std::sync::mpsc::RecvTimeoutError;
    let exe = std::env::current_exe().map_err(|e| BenchError::io("<current exe>", e))?;
    let t = Instant::now();
    let deadline = t + RESTART_LIMIT;
    let mut child = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(RESTART_ENV, dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::io(&exe, e))?;
    let fail = |child: &mut std::process::Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        Err(BenchError::Invalid(format!("the restart process {why}")))
    };
    let Some(out) = child.stdout.take() else { return fail(&mut child, "has no stdout".into()) };
    // Lines with the time each was read, from a thread of their own (the wait is bounded).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send((line, Instant::now())).is_err() {
                return;
            }
        }
    });
    let mut done_ms = None;
    let mut times = serde_json::Value::Null;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((line, at)) if line.trim() == RESTART_DONE => {
                done_ms = Some(at.duration_since(t).as_secs_f64() * 1e3);
            }
            Ok((line, _)) => {
                if let (Some(_), Ok(v)) = (done_ms, serde_json::from_str::<serde_json::Value>(&line)) {
                    times = v;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => return fail(&mut child, format!("did not end within {RESTART_LIMIT:?}")),
        }
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => return fail(&mut child, format!("did not exit within {RESTART_LIMIT:?}")),
            Err(e) => return fail(&mut child, format!("cannot be waited for: {e}")),
        }
    };
    match done_ms {
        Some(ms) if status.success() => Ok((ms, times)),
        _ => Err(BenchError::Invalid(format!("the restart process failed ({status})"))),
    }
}

/// A server on 127.0.0.1 for `engine`: its address, and what stops it (the server holds
/// the engine, and so the store, until then).
async fn serve(
    engine: &Engine,
) -> Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>), BenchError> {
    let auth = Auth::from_tokens([("bench", Role::Admin, TOKEN)]).map_err(|e| BenchError::Invalid(e.to_string()))?;
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| BenchError::io(Path::new("127.0.0.1:0"), e))?;
    let addr = listener.local_addr().map_err(|e| BenchError::io(Path::new("127.0.0.1:0"), e))?;
    let app = keel_server::router(engine.clone(), auth);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = keel_server::serve(listener, app, async move {
            let _ = stopped.await;
        })
        .await;
    });
    Ok((addr, stop, task))
}

/// One HTTP/1.1 request on its own connection: (status, body).
async fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String), BenchError> {
    let io = |e| BenchError::io(Path::new("http"), e);
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(io)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

async fn timed_get(addr: std::net::SocketAddr, path: &str) -> Result<f64, BenchError> {
    let mut ms = Vec::with_capacity(LIST_REPEATS);
    for _ in 0..LIST_REPEATS {
        let t = Instant::now();
        let (status, body) = call(addr, "GET", path, "").await?;
        if status != 200 {
            return Err(BenchError::Invalid(format!("GET {path}: {status} {body}")));
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(percentile(&ms, 0.5))
}

/// Counts the SSE messages (`id:` lines) of one run's live tail until the stream ends.
async fn tail_count(addr: std::net::SocketAddr, run: RunId) -> Result<u64, BenchError> {
    let io = |e| BenchError::io(Path::new("sse"), e);
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let req = format!(
        "GET /v1/runs/{run}/events HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(io)?;
    Ok(String::from_utf8_lossy(&raw).lines().filter(|l| l.starts_with("id:")).count() as u64)
}

/// What the store's flushes did between two readings: how many, their mean latency and
/// the appends each made durable (where a resolution waits under load).
fn flush_diff(a: &keel_store::stats::CommitStats, b: &keel_store::stats::CommitStats) -> serde_json::Value {
    let n = b.flush_latency_us.count().saturating_sub(a.flush_latency_us.count());
    let us = b.flush_latency_us.sum.saturating_sub(a.flush_latency_us.sum);
    let appends = b.batch_appends.sum.saturating_sub(a.batch_appends.sum);
    let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    json!({"count": n, "mean_ms": per(us) / 1e3, "appends_per_flush": per(appends)})
}

/// Waits until the store at `dir` can be opened again by this process (the lock of a
/// store dropped here is released by sled's threads a moment later), and closes it.
fn settle(dir: &Path) -> Result<(), BenchError> {
    drop(SledStore::open(dir.join("db"), StoreConfig { durability: Durability::None, ..StoreConfig::default() })?);
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

async fn submit_reviews(engine: &Engine, n: usize) -> Result<Vec<RunId>, BenchError> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(engine.submit(Request::new(REVIEW, json!({ "review": i }))).await?.run);
    }
    Ok(out)
}

/// The `server` section (see the module docs).
pub(crate) async fn server(parent: Option<&Path>, runs: usize, reviews: usize) -> Result<Vec<Figure>, BenchError> {
    let dir = temp_dir(parent, "server")?;
    // 1. The history: `runs` finished runs and `reviews` runs waiting for a human.
    {
        let e = engine(&dir, Durability::None)?;
        let workers = e.start();
        submit_n(&e, runs, 1024).await?;
        let waiting = submit_reviews(&e, reviews).await?;
        for r in &waiting {
            e.wait_until(*r, |s| s == keel_engine::RunStatus::AwaitingHuman).await?;
        }
        // Every chain run finished too.
        loop {
            let busy =
                [keel_engine::RunStatus::Accepted, keel_engine::RunStatus::Planning, keel_engine::RunStatus::Running]
                    .into_iter()
                    .map(|s| {
                        e.runs_page(&keel_engine::RunFilter { status: Some(s), workflow: None }, None, 1)
                            .map(|p| p.runs.len())
                    })
                    .sum::<Result<usize, _>>()?;
            if busy == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        workers.shutdown().await;
        e.store().flush()?;
    }
    let durable = Durability::GroupCommit(Level::PowerLoss);

    // 1b. A database without the index (written before it): the build on open.
    {
        let store =
            SledStore::open(dir.join("db"), StoreConfig { durability: Durability::None, ..StoreConfig::default() })?;
        loop {
            let old = store.aux_range(b"ix/", b"ix/\xff", 1024)?;
            if old.is_empty() {
                break;
            }
            store.aux_apply(old.into_iter().map(|(k, _)| (k, None)).collect())?;
        }
        store.flush()?;
    }
    let t = Instant::now();
    drop(engine(&dir, durable)?);
    let rebuild_ms = t.elapsed().as_secs_f64() * 1e3;
    // A restart is a new process: sled's background threads of the engine just dropped
    // release its lock a moment later (a reopen in this process would wait for them).
    settle(&dir)?;

    // 2a. What any restart on these files pays first: sled's own open of them (no keel:
    // its page table and segments are loaded, which grows with the database).
    let t = Instant::now();
    let raw = sled::Config::new()
        .path(dir.join("db"))
        .cache_capacity(StoreConfig::default().cache_capacity_bytes)
        .segment_size(keel_store::SEGMENT_BYTES)
        .open()?;
    let raw_sled_open_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(raw);
    std::thread::sleep(Duration::from_millis(500));
    settle(&dir)?;

    // 2. Restart: open to the first new run completed, against an empty database.
    let t = Instant::now();
    let (e, sled_open_ms) = engine_timed(&dir, durable)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let workers = e.start();
    let started_ms = t.elapsed().as_secs_f64() * 1e3;
    let first = e.submit(Request::new(super::WORKFLOW, json!({"after": "restart"}))).await?.run;
    let submitted_ms = t.elapsed().as_secs_f64() * 1e3;
    e.wait(first).await?;
    let restart_ms = t.elapsed().as_secs_f64() * 1e3;
    let empty_dir = temp_dir(parent, "server-empty")?;
    let t = Instant::now();
    {
        let e0 = engine(&empty_dir, durable)?;
        let w0 = e0.start();
        let r = e0.submit(Request::new(super::WORKFLOW, json!({"empty": true}))).await?.run;
        e0.wait(r).await?;
        w0.shutdown().await;
    }
    let restart_floor_ms = t.elapsed().as_secs_f64() * 1e3;

    // 3. Listing through the API, against the fold of every run (the listing before).
    let (addr, stop_server, server_task) = serve(&e).await?;
    let list_ms = timed_get(addr, "/v1/runs?limit=100").await?;
    let esc_ms = timed_get(addr, "/v1/escalations").await?;
    let log = e.store();
    let t = Instant::now();
    let mut folded = 0usize;
    for run in log.runs()? {
        if load_state(log.as_ref(), run)?.is_some() {
            folded += 1;
        }
    }
    let fold_ms = t.elapsed().as_secs_f64() * 1e3;

    // 4. Resolutions while 64 runs execute: half through the API, half on the engine.
    let waiting = e.escalations()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for k in 0..BACKGROUND_RUNS {
        let (e, stop) = (e.clone(), stop.clone());
        load.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = e.submit(Request::new(super::WORKFLOW, json!({"load": k, "i": i}))).await?.run;
                e.wait(r).await?;
                i += 1;
            }
            Ok::<u64, BenchError>(i)
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let commits_before = e.metrics().commits;
    let (mut api_ms, mut direct_ms, mut raw_ms) = (Vec::new(), Vec::new(), Vec::new());
    // The floor of any durable write under this load: one key put into a sled database of
    // its own and flushed (sled alone, no keel), timed between the resolutions.
    let raw_dir = temp_dir(parent, "server-raw")?;
    let raw = sled::Config::new()
        .path(raw_dir.join("db"))
        .cache_capacity(StoreConfig::default().cache_capacity_bytes)
        .segment_size(keel_store::SEGMENT_BYTES)
        .open()?;
    for (i, p) in waiting.iter().enumerate() {
        let t = Instant::now();
        tokio::task::block_in_place(|| {
            raw.insert(i.to_be_bytes(), &[7u8; 200][..])?;
            raw.flush()
        })?;
        raw_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        if i % 2 == 0 {
            let body = json!({"decision": "approve", "reason": "bench"}).to_string();
            let (status, text) = call(addr, "POST", &format!("/v1/runs/{}/resolve", p.run), &body).await?;
            if status != 200 {
                return Err(BenchError::Invalid(format!("resolve: {status} {text}")));
            }
            api_ms.push(t.elapsed().as_secs_f64() * 1e3);
        } else {
            e.resolve(p.run, Resolution { decision: Decision::Approve, by: "bench".into(), reason: "bench".into() })
                .await?;
            direct_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let flushes = flush_diff(&commits_before, &e.metrics().commits);
    stop.store(true, Ordering::Relaxed);
    let mut background = 0u64;
    while let Some(r) = load.join_next().await {
        background += r.map_err(|e| BenchError::Invalid(format!("load task: {e}")))??;
    }
    api_ms.sort_by(f64::total_cmp);
    direct_ms.sort_by(f64::total_cmp);
    raw_ms.sort_by(f64::total_cmp);
    drop(raw);

    // 5. 100 live tails, one per new run.
    let t = Instant::now();
    let mut started = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        started.push(e.submit(Request::new(super::WORKFLOW, json!({"sse": i}))).await?.run);
    }
    let mut tails = tokio::task::JoinSet::new();
    for r in &started {
        tails.spawn(tail_count(addr, *r));
    }
    for r in &started {
        e.wait(*r).await?;
    }
    let recorded_s = t.elapsed().as_secs_f64();
    let mut streamed = 0u64;
    while let Some(n) = tails.join_next().await {
        streamed += n.map_err(|e| BenchError::Invalid(format!("tail task: {e}")))??;
    }
    let streamed_s = t.elapsed().as_secs_f64();
    let recorded: u64 = started.iter().map(|r| e.state(*r).map(|s| s.next_seq.0)).sum::<Result<u64, _>>()?;
    workers.shutdown().await;
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), server_task).await;
    // Every handle on the store goes before the restarts open it.
    drop(log);
    drop(e);
    settle(&dir)?;

    // 6. A restart as `keel serve` pays it: a new process (this program again), timed from
    // its spawn to its first new run completed; the median of RESTART_PROCESSES, against
    // the same on an empty database. Last, so the figures above are taken as before.
    let empty_process_dir = temp_dir(parent, "server-empty-process")?;
    let (mut process_ms, mut process_floor_ms, mut process_times) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RESTART_PROCESSES {
        match tokio::task::block_in_place(|| restart_in_new_process(&dir)) {
            Ok((ms, times)) => {
                process_ms.push(ms);
                process_times.push(times);
            }
            Err(e) => eprintln!("server: a restart in a new process failed: {e}"),
        }
        match tokio::task::block_in_place(|| restart_in_new_process(&empty_process_dir)) {
            Ok((ms, _)) => process_floor_ms.push(ms),
            Err(e) => eprintln!("server: a restart in a new process (empty database) failed: {e}"),
        }
    }
    let process_spread = process_ms.clone();
    process_ms.sort_by(f64::total_cmp);
    process_floor_ms.sort_by(f64::total_cmp);

    let n = runs;
    let common = json!({"finished_runs": n, "waiting_runs": reviews});
    let (p50, p99) = (percentile(&api_ms, 0.5), percentile(&api_ms, 0.99));
    let mut figures = vec![
        Figure::new(
            "server",
            "server.list_runs",
            format!("GET /v1/runs?limit=100 with {n} runs in the db, median ms"),
            list_ms,
            "ms",
        )
        .floor(fold_ms, "listing before the run index: a fold of every run")
        .target("< 10 ms", list_ms < 10.0)
        .extra(json!({"common": common, "folded_runs": folded})),
        Figure::new(
            "server",
            "server.list_escalations",
            format!("GET /v1/escalations ({reviews} open) with {n} runs in the db, median ms"),
            esc_ms,
            "ms",
        )
        .floor(fold_ms, "listing before the run index: a fold of every run")
        .target("< 10 ms", esc_ms < 10.0),
        Figure::new(
            "server",
            "server.index_build",
            format!("open of a db without the run index ({n} runs): the index is built, ms"),
            rebuild_ms,
            "ms",
        )
        .floor(fold_ms, "a fold of every run"),
        Figure::new(
            "server",
            "server.first_run_after_restart",
            format!("open + first new run completed with {n} finished runs, ms"),
            restart_ms,
            "ms",
        )
        .floor(restart_floor_ms, "the same on an empty database")
        .target("< 100 ms", restart_ms < 100.0)
        .extra(json!({
            "open_ms": open_ms, "sled_open_ms": sled_open_ms, "raw_sled_open_ms": raw_sled_open_ms,
            "started_ms": started_ms, "submitted_ms": submitted_ms,
            "waiting_runs": reviews,
        })),
        // The same, less what sled alone takes to open these files: keel's own part of a
        // restart (its checks at open, the engine, the first run), which the run index
        // is there to keep from growing with the history.
        Figure::new(
            "server",
            "server.first_run_after_restart.above_sled",
            format!("open + first new run completed with {n} finished runs, less sled's own open of the files, ms"),
            restart_ms - raw_sled_open_ms,
            "ms",
        )
        .floor(raw_sled_open_ms, "sled::Config::open of the same files, alone")
        .target("< 100 ms", restart_ms - raw_sled_open_ms < 100.0),
        Figure::new(
            "server",
            "server.resolve.p50",
            format!("POST /v1/runs/{{run}}/resolve while {BACKGROUND_RUNS} runs execute, p50 ms"),
            p50,
            "ms",
        )
        .floor(percentile(&direct_ms, 0.5), "Engine::resolve called directly under the same load, p50")
        .extra(json!({"samples": api_ms.len(), "background_runs_completed": background, "flushes": flushes})),
        Figure::new("server", "server.resolve.p99", "resolve through the API, p99 ms", p99, "ms")
            .floor(percentile(&direct_ms, 0.99), "Engine::resolve directly, p99")
            .target("< 20 ms", p99 < 20.0),
        Figure::new(
            "server",
            "server.resolve.raw_write_p99",
            format!("one key put and flushed in a sled db of its own (no keel) while {BACKGROUND_RUNS} runs execute, p99 ms"),
            percentile(&raw_ms, 0.99),
            "ms",
        )
        .extra(json!({"p50": percentile(&raw_ms, 0.5), "count": raw_ms.len()})),
        Figure::new(
            "server",
            "server.sse",
            format!("events streamed to {SUBSCRIBERS} SSE subscribers (one live tail per run), events/s"),
            streamed as f64 / streamed_s.max(1e-9),
            "events/s",
        )
        .floor(recorded as f64 / recorded_s.max(1e-9), "events the engine recorded for those runs, per second")
        .extra(json!({"streamed": streamed, "recorded": recorded})),
    ];
    // Left out (with a line on stderr above) when no restart process completed.
    if !process_ms.is_empty() && !process_floor_ms.is_empty() {
        let (ms, floor) = (percentile(&process_ms, 0.5), percentile(&process_floor_ms, 0.5));
        figures.push(
            Figure::new(
                "server",
                "server.first_run_after_restart.new_process",
                format!(
                    "a new process: spawn to its first new run completed, with {n} finished runs and the section's own since, median of {}, ms",
                    process_ms.len()
                ),
                ms,
                "ms",
            )
            .floor(floor, "the same new process on an empty database, median")
            .target("< 100 ms", ms < 100.0)
            .extra(json!({
                "each_ms": process_spread, "processes": process_times,
                "raw_sled_open_ms_in_this_process": raw_sled_open_ms,
            })),
        );
    }
    Ok(figures)
}
