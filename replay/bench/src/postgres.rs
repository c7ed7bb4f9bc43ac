//! Section `postgres`: keel on PostgreSQL with 1, 2 and 4 worker processes, each figure
//! next to its floor measured in the same run, and sled beside them.
//!
//! - durable transitions/s: chain runs submitted up front, then worked by P `keel` worker
//!   processes (this program run again, [`WORKER_ENV`]) sharing the database's work queue,
//!   from "go" until every run completed; against raw INSERTs of the same rows (the
//!   `events` rows the workers wrote and their `heads`) with the same commit pattern (as
//!   many transactions as the workers' stores committed, over P sessions at once);
//! - step latency p50/p99: the time between consecutive recorded events of a run;
//! - the same two figures for one process on sled (group commit, power loss).
//!
//! The database is `KEEL_BENCH_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! each measurement uses a schema of its own, dropped after. Without a server the section
//! is skipped with one line on stderr.

use super::{percentile, submit_n, temp_dir, workflow, BenchError, Figure, Noop, QuietSink, HANDLER};
use keel_engine::{Engine, RunId};
use keel_store::{Durability, Level, SledStore, Store, StoreConfig};
use keel_store_postgres::{PgConfig, PgStore};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set in a worker process: `url schema workers tasks`.
pub const WORKER_ENV: &str = "KEEL_BENCH_PG_WORKER";
const SECTION: &str = "postgres";
const READY: &str = "keel-bench-worker-ready";
/// Runs driven at once in each worker process.
const WORKERS_PER_PROCESS: usize = 16;
const TASKS: usize = 4;

fn url() -> String {
    std::env::var("KEEL_BENCH_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn invalid(e: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(e.to_string())
}

fn engine_on(store: Arc<dyn Store>, workers: usize) -> Result<Engine, BenchError> {
    Ok(Engine::builder()
        .store(store)
        .workflow(workflow(TASKS, false, 1024))
        .handler(HANDLER, Arc::new(Noop))
        .escalation_sink(Arc::new(QuietSink))
        .workers(workers)
        .open()?)
}

/// The worker process: waits for "go" on stdin, works runs until stdin closes, then prints
/// its store's `flushes appends`.
pub fn worker(spec: &str) -> Result<(), BenchError> {
    let p: Vec<&str> = spec.split(' ').collect();
    let [url, schema, workers] = p.as_slice() else { return Err(invalid(format!("bad worker spec {spec:?}"))) };
    let cfg = PgConfig { schema: (*schema).to_owned(), create: false, ..PgConfig::new(*url) };
    let store = Arc::new(PgStore::open(cfg).map_err(invalid)?);
    let engine = engine_on(store.clone(), workers.parse().map_err(invalid)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(invalid)?;
    println!("{READY}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| BenchError::io("<stdin>", e))?;
    let running = {
        let _in_runtime = rt.enter();
        engine.start()
    };
    let _ = std::io::stdin().lock().read_line(&mut line);
    rt.block_on(running.shutdown());
    let s = store.stats();
    println!("{} {}", s.flushes, s.appends);
    Ok(())
}

/// A fresh schema of the bench database, dropped when this goes.
struct Schema {
    name: String,
    admin: tokio_postgres::Client,
    rt: tokio::runtime::Runtime,
}

impl Schema {
    fn new(tag: &str) -> Result<Schema, BenchError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(invalid)?;
        let mut cfg: tokio_postgres::Config = url().parse().map_err(invalid)?;
        cfg.connect_timeout(Duration::from_secs(3));
        let admin = rt.block_on(async {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        });
        let admin = admin.map_err(invalid)?;
        let name = format!("keel_bench_{}_{tag}", std::process::id());
        Ok(Schema { name, admin, rt })
    }

    fn config(&self) -> PgConfig {
        PgConfig { schema: self.name.clone(), ..PgConfig::new(url()) }
    }

    fn exec(&self, sql: &str) -> Result<(), BenchError> {
        self.rt.block_on(self.admin.batch_execute(sql)).map_err(invalid)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)));
    }
}

/// Starts a worker process on `schema` (this program again, with [`WORKER_ENV`]).
fn spawn_worker(cfg: &PgConfig) -> Result<Child, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::io("<current exe>", e))?;
    let mut child = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(WORKER_ENV, format!("{} {} {WORKERS_PER_PROCESS}", cfg.url, cfg.schema))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::io(&exe, e))?;
    let out = child.stdout.as_mut().ok_or_else(|| invalid("worker without stdout"))?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).map_err(|e| BenchError::io("<worker stdout>", e))?;
    if !line.contains(READY) {
        return Err(invalid(format!("a bench worker did not start: {line:?}")));
    }
    Ok(child)
}

/// What one keel measurement did.
struct Measured {
    events: u64,
    seconds: f64,
    flushes: u64,
    step_us: Vec<f64>,
}

/// Submits `runs` chain runs, then works them with `processes` worker processes.
fn keel_cell(schema: &Schema, processes: usize, runs: usize) -> Result<Measured, BenchError> {
    let store = Arc::new(PgStore::open(schema.config()).map_err(invalid)?);
    let submitter = engine_on(store.clone(), 1)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(invalid)?;
    let ids = rt.block_on(submit_n(&submitter, runs, 64))?;
    let mut workers = (0..processes).map(|_| spawn_worker(&schema.config())).collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    for w in &mut workers {
        let stdin = w.stdin.as_mut().ok_or_else(|| invalid("worker without stdin"))?;
        stdin.write_all(b"go\n").map_err(|e| BenchError::io("<worker stdin>", e))?;
    }
    let seconds = wait_completed(schema, ids.len(), started)?;
    let mut flushes = 0;
    for mut w in workers {
        drop(w.stdin.take());
        let out = w.wait_with_output().map_err(|e| BenchError::io("<worker>", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<u64> = text.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        flushes += nums.first().copied().unwrap_or(0);
    }
    let (events, step_us) = steps(&submitter, &ids)?;
    Ok(Measured { events, seconds, flushes, step_us })
}

/// Waits until every run of `schema` completed (its head's last kind, one cheap query per
/// 10 ms); the seconds since `started`.
fn wait_completed(schema: &Schema, runs: usize, started: Instant) -> Result<f64, BenchError> {
    let q = format!("SELECT count(*) FROM {}.heads WHERE last_kind = 'RunCompleted'", schema.name);
    loop {
        let done: i64 = schema.rt.block_on(schema.admin.query_one(&q, &[])).map_err(invalid)?.get(0);
        if usize::try_from(done).unwrap_or(0) >= runs {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(invalid("runs did not complete within 600 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Events appended after acceptance, and the time between consecutive events of each run.
fn steps(engine: &Engine, ids: &[RunId]) -> Result<(u64, Vec<f64>), BenchError> {
    let (mut events, mut gaps) = (0u64, Vec::new());
    for run in ids {
        let logged = engine.events(*run)?;
        events += logged.len().saturating_sub(1) as u64;
        // After the first drive began (the wait in the queue is not a step).
        gaps.extend(logged.windows(2).skip(1).filter_map(|w| match w {
            [a, b] => Some((b.at_us - a.at_us) as f64),
            _ => None,
        }));
    }
    gaps.sort_by(f64::total_cmp);
    Ok((events, gaps))
}

/// The floor: the rows the workers wrote (`events` and `heads` of `from`), inserted again
/// into empty copies of those tables in `flushes` transactions over `sessions` sessions.
fn raw_inserts(from: &Schema, flushes: u64, sessions: usize) -> Result<f64, BenchError> {
    let to = Schema::new("raw")?;
    to.exec(&format!(
        "CREATE SCHEMA {t}; CREATE TABLE {t}.events (LIKE {f}.events INCLUDING ALL);
         CREATE TABLE {t}.heads (LIKE {f}.heads INCLUDING ALL);",
        t = to.name,
        f = from.name
    ))?;
    let rows = from.rt.block_on(from.admin.query(
        &format!(
            "SELECT e.run, e.seq, e.value, h.last_hash, h.last_kind FROM {f}.events e JOIN {f}.heads h USING (run)
             WHERE e.seq > 0 ORDER BY e.seq, e.run",
            f = from.name
        ),
        &[],
    ));
    let rows: Vec<Row> =
        rows.map_err(invalid)?.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
    let per_tx = rows.len().div_ceil(usize::try_from(flushes.max(1)).unwrap_or(1)).max(1);
    let batches: Vec<Vec<_>> = rows.chunks(per_tx).map(<[_]>::to_vec).collect();
    let schema = to.name.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(invalid)?;
    let seconds = rt.block_on(insert_all(schema, batches, sessions))?;
    Ok(super::rate(rows.len() as u64, seconds))
}

type Row = (uuid::Uuid, i64, Vec<u8>, Vec<u8>, String);

/// Inserts `batches` (one transaction each, events and heads) over `sessions` sessions.
async fn insert_all(schema: String, batches: Vec<Vec<Row>>, sessions: usize) -> Result<f64, BenchError> {
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..sessions.max(1) {
        let (queue, schema) = (queue.clone(), schema.clone());
        tasks.push(tokio::spawn(async move {
            let cfg: tokio_postgres::Config = url().parse()?;
            let (mut client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            loop {
                let Some(batch) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else { break };
                insert_batch(&mut client, &schema, &batch).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(invalid)?.map_err(invalid)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One transaction: the batch's `events` rows and each run's last `heads` row.
async fn insert_batch(
    client: &mut tokio_postgres::Client,
    schema: &str,
    batch: &[Row],
) -> Result<(), tokio_postgres::Error> {
    let runs: Vec<uuid::Uuid> = batch.iter().map(|r| r.0).collect();
    let seqs: Vec<i64> = batch.iter().map(|r| r.1).collect();
    let values: Vec<&[u8]> = batch.iter().map(|r| r.2.as_slice()).collect();
    let next: Vec<i64> = seqs.iter().map(|s| s + 1).collect();
    let hashes: Vec<&[u8]> = batch.iter().map(|r| r.3.as_slice()).collect();
    let kinds: Vec<&str> = batch.iter().map(|r| r.4.as_str()).collect();
    let tx = client.transaction().await?;
    tx.execute(
        &format!(
            "INSERT INTO {schema}.events (run, seq, value) SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bytea[])"
        ),
        &[&runs, &seqs, &values],
    )
    .await?;
    tx.execute(
        &format!(
            "INSERT INTO {schema}.heads (run, next_seq, last_hash, last_kind)
             SELECT DISTINCT ON (run) * FROM unnest($1::uuid[], $2::bigint[], $3::bytea[], $4::text[])
               AS u(run, next_seq, last_hash, last_kind) ORDER BY run, next_seq DESC
             ON CONFLICT (run) DO UPDATE
               SET next_seq = EXCLUDED.next_seq, last_hash = EXCLUDED.last_hash, last_kind = EXCLUDED.last_kind"
        ),
        &[&runs, &next, &hashes, &kinds],
    )
    .await?;
    tx.commit().await
}

/// The same workload on sled, one process: (transitions/s, step gaps).
async fn sled_cell(parent: Option<&Path>, runs: usize) -> Result<(f64, Vec<f64>), BenchError> {
    let dir = temp_dir(parent, "postgres-sled-twin")?;
    let cfg = StoreConfig { durability: Durability::GroupCommit(Level::PowerLoss), ..StoreConfig::default() };
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.join("db"), cfg)?);
    let engine = engine_on(store, WORKERS_PER_PROCESS)?;
    let ids = submit_n(&engine, runs, 64).await?;
    let started = Instant::now();
    engine.run_until_idle().await?;
    let seconds = started.elapsed().as_secs_f64();
    let (events, gaps) = steps(&engine, &ids)?;
    Ok((super::rate(events, seconds), gaps))
}

/// The section's figures (none, and a line on stderr, without a PostgreSQL server).
/// `processes`: the cells' numbers of worker processes (empty: 1, 2 and 4).
pub(crate) fn postgres(parent: Option<&Path>, runs: usize, processes: &[usize]) -> Result<Vec<Figure>, BenchError> {
    if let Err(e) = Schema::new("probe") {
        eprintln!("keel bench: postgres section skipped: no PostgreSQL at {} ({e}); set KEEL_BENCH_PG_URL", url());
        return Ok(Vec::new());
    }
    let mut figures = Vec::new();
    let cells = if processes.is_empty() { &[1usize, 2, 4][..] } else { processes };
    for &processes in cells {
        let schema = Schema::new(&format!("p{processes}"))?;
        let m = keel_cell(&schema, processes, runs)?;
        let floor = raw_inserts(&schema, m.flushes, processes)?;
        let value = super::rate(m.events, m.seconds);
        let ratio = value / floor.max(f64::MIN_POSITIVE);
        figures.push(
            Figure::new(
                SECTION,
                format!("postgres.transitions.p{processes}"),
                format!("durable transitions/s, {processes} worker process(es)"),
                value,
                "events/s",
            )
            .floor(floor, format!("raw INSERTs of the same rows, {} commits over {processes} session(s)", m.flushes))
            .target(">= 50%", ratio >= 0.5),
        );
        if processes == 1 {
            figures.extend(latency_figures("postgres.step", "step latency, PostgreSQL, 1 process", &m.step_us));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(invalid)?;
    let (rate, gaps) = rt.block_on(sled_cell(parent, runs))?;
    figures.push(Figure::new(
        SECTION,
        "postgres.sled.transitions",
        "durable transitions/s, sled, 1 process",
        rate,
        "events/s",
    ));
    figures.extend(latency_figures("postgres.sled.step", "step latency, sled, 1 process", &gaps));
    Ok(figures)
}

fn latency_figures(key: &str, label: &str, sorted_us: &[f64]) -> Vec<Figure> {
    [("p50", 0.50), ("p99", 0.99)]
        .into_iter()
        .map(|(name, p)| {
            Figure::new(SECTION, format!("{key}.{name}"), format!("{label} {name}"), percentile(sorted_us, p), "us")
        })
        .collect()
}
