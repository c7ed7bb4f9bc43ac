//! Several `keel` processes on one PostgreSQL database (docs/STORE.md §15): `--db
//! postgres://…?schema=NAME` for the commands that open a database, and real `keel work`
//! processes sharing the runs, each run driven by one of them at a time, ending as on
//! sled, through the database's shared work queue. Each test works in a fresh schema it drops; without a server it says it was
//! skipped (and fails under CI=true or KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
#[path = "../../../store/postgres/tests/common/mod.rs"]
mod pg;

use common::keel_in;
use keel_engine::{Engine, RunStatus};
use keel_store::{Durability, RunId};
use keel_store_postgres::PgStore;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `--db` for a fresh schema of the test server.
fn db_url(scratch: &pg::Scratch) -> (String, keel_store_postgres::PgConfig) {
    let cfg = scratch.config();
    let sep = if cfg.url.contains('?') { '&' } else { '?' };
    (format!("{}{sep}schema={}", cfg.url, cfg.schema), cfg)
}

fn keel(db: &str, args: &[&str]) -> common::Ran {
    let mut all = vec!["--db", db];
    all.extend_from_slice(args);
    keel_in(None, &all)
}

/// What a run ended as: status, events, cost.
type Ending = (String, u64, u64);

/// The sled twin: the same demo requests (seed 1, indexes 0..n) worked by one process.
fn sled_twin(n: u64) -> BTreeMap<u64, Ending> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keel-data");
    let v = common::keel(&db, &["demo", "--runs", &n.to_string(), "--json"]).ok().json();
    v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let e = (
                r["status"].as_str().unwrap().to_owned(),
                r["events"].as_u64().unwrap(),
                r["cost_micros"].as_u64().unwrap(),
            );
            (r["index"].as_u64().unwrap(), e)
        })
        .collect()
}

/// An engine with the demo's workflow on `store` (to submit and to read).
fn demo_engine(store: Arc<PgStore>) -> Engine {
    keel_demo::register(Engine::builder().store(store)).open().unwrap()
}

/// Submits the demo requests 0..n (seed 1) without working them.
fn submit_demo(store: Arc<PgStore>, n: u64) -> BTreeMap<u64, RunId> {
    submit_demo_range(&demo_engine(store), 0..n)
}

/// Submits the demo requests `indexes` (seed 1) through `engine` without working them.
fn submit_demo_range(engine: &Engine, indexes: std::ops::Range<u64>) -> BTreeMap<u64, RunId> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut runs = BTreeMap::new();
        for i in indexes {
            runs.insert(i, engine.submit(keel_demo::request(1, i)).await.unwrap().run);
        }
        runs
    })
}

/// What each run ended as, and checks every run's log: seqs without gap or duplicate, at
/// most one terminal event.
fn endings(engine: &Engine, runs: &BTreeMap<u64, RunId>) -> BTreeMap<u64, Ending> {
    runs.iter()
        .map(|(i, run)| {
            let events = engine.events(*run).unwrap();
            for (k, e) in events.iter().enumerate() {
                assert_eq!(e.seq.0, k as u64, "run {run}: seq gap or duplicate at {k}");
            }
            let terminal = events
                .iter()
                .filter(|e| matches!(e.event.kind_name(), "RunCompleted" | "RunFailed" | "RunCancelled"))
                .count();
            assert!(terminal <= 1, "run {run} ended {terminal} times");
            let s = engine.state(*run).unwrap();
            (*i, (s.status.name().to_owned(), s.next_seq.0, s.totals.cost_micros))
        })
        .collect()
}

/// Every run of the schema passes `verify` and `replay --all --check`.
fn verify_and_replay(db: &str, n: u64) {
    let v = keel(db, &["verify"]);
    v.ok();
    assert!(v.stdout.contains(&format!("in {n} run(s)")), "{}", v.stdout);
    let r = keel(db, &["replay", "--all", "--check"]);
    r.ok();
    assert!(r.stdout.contains(&format!("checked {n} run(s): {n} ok, 0 diverged")), "{}", r.stdout);
}

#[test]
fn demo_runs_verify_and_replay_against_postgres() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let (db, _) = db_url(&scratch);
    let demo = keel(&db, &["demo", "--runs", "8", "--json"]);
    demo.ok();
    let ran: Vec<String> =
        demo.json()["runs"].as_array().unwrap().iter().map(|r| r["run"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ran.len(), 8);
    let runs = keel(&db, &["runs", "--json"]);
    runs.ok();
    let listed: Vec<String> =
        runs.json()["runs"].as_array().unwrap().iter().map(|r| r["run"].as_str().unwrap().to_owned()).collect();
    for r in &ran {
        assert!(listed.contains(r), "{r} not listed: {listed:?}");
    }
    verify_and_replay(&db, 8);
    // The same demo on sled ends the same way, run for run.
    let twin = sled_twin(8);
    for r in demo.json()["runs"].as_array().unwrap() {
        let i = r["index"].as_u64().unwrap();
        assert_eq!(r["status"].as_str().unwrap(), twin[&i].0, "run {i}");
        assert_eq!(r["events"].as_u64().unwrap(), twin[&i].1, "run {i}");
    }
    // A schema that holds no store is not created by a reading command.
    let (missing, _) = db_url(&scratch);
    let e = keel(&missing, &["runs"]).one_line_error(1);
    assert!(e.contains("no keel database"), "{e}");
}

fn spawn_worker(db: &str, args: &[&str]) -> Child {
    let mut all = vec!["--db", db, "work"];
    all.extend_from_slice(args);
    Command::new(common::KEEL)
        .args(&all)
        .env_remove("KEEL_DB")
        // Each lost lease is a warning line (counted by the chaos test, also from a worker
        // it killed).
        .env("KEEL_LOG", "keel_engine::shell::heartbeat=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn three_work_processes_share_one_database_and_every_run_ends_once_as_on_sled() {
    if !pg::ready() {
        return;
    }
    const N: u64 = 24;
    let scratch = pg::Scratch::new(Durability::default());
    let (db, cfg) = db_url(&scratch);
    let store = Arc::new(PgStore::open(cfg).unwrap());
    let runs = submit_demo(store.clone(), N);
    let started = Instant::now();
    let workers: Vec<Child> =
        (0..3).map(|_| spawn_worker(&db, &["--until-idle", "--json", "--lease-ttl-ms", "2000"])).collect();
    let mut driven = Vec::new();
    let (mut completed, mut fenced) = (0, 0);
    for w in workers {
        let out = w.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "worker failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["stopped"].as_array().unwrap().len(), 0, "{v}");
        driven.push(v["driven"].as_u64().unwrap());
        completed += v["completed"].as_u64().unwrap();
        fenced += v["fenced"].as_u64().unwrap();
    }
    let reader = demo_engine(store);
    let got = endings(&reader, &runs);
    for (i, run) in &runs {
        let events = reader.events(*run).unwrap();
        assert!(!events.iter().any(|e| e.event.kind_name() == "TaskRedelivered"), "run {i} was taken over");
    }
    let twin = sled_twin(N);
    assert_eq!(got, twin, "the runs end as on sled");
    let done = got.values().filter(|e| e.0 == RunStatus::Completed.name()).count();
    println!(
        "3 workers, {N} runs in {:?}: driver passes per worker {driven:?}, {done} completed ({completed} reported), {fenced} appends fenced",
        started.elapsed()
    );
    assert_eq!(fenced, 0, "nobody paused: nothing fenced");
    verify_and_replay(&db, N);
}

/// Sends `sig` (`KILL`, `STOP`, `CONT`, `INT`) to `child` with kill(1).
fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
    assert!(ok.success(), "kill -{sig}");
}

/// The leases a worker lost, from its warnings: (appends fenced, renewals failed).
fn leases_lost(stderr: &str) -> (u64, u64) {
    let lost = stderr.lines().filter(|l| l.contains("lost the run's lease"));
    lost.fold((0, 0), |(f, r), l| if l.contains("fenced") { (f + 1, r) } else { (f, r + 1) })
}

/// The figures a `keel work` service prints when it stops:
/// `leases lost: L (F appends fenced, R renewals failed)`.
fn lease_figures(stderr: &str) -> (u64, u64, u64) {
    let line = stderr.lines().find(|l| l.contains("leases lost:")).unwrap_or_else(|| panic!("no figures: {stderr}"));
    let nums: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let n = nums.len();
    (nums[n - 3], nums[n - 2], nums[n - 1])
}

/// The chaos test's depth: `KEEL_CHAOS_RUNS` demo runs (default 240) and at least
/// `KEEL_CHAOS_DISRUPTIONS` disruptions (default 100; each SIGKILL and each SIGSTOP past
/// the lease counts one). CI runs the defaults; a soak sets larger ones.
fn chaos_depth() -> (u64, u32) {
    let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    (var("KEEL_CHAOS_RUNS", 240), u32::try_from(var("KEEL_CHAOS_DISRUPTIONS", 100)).unwrap())
}

/// What the harness did to the workers, and what the killed ones said before they died.
#[derive(Default)]
struct Disrupted {
    kills: u32,
    stops: u32,
    fenced_killed: u64,
    renewals_killed: u64,
}

const CHAOS_TTL_MS: u64 = 500;

/// Who holds a live lease in the chaos test's schema (lease owners are `keel-<pid>-<n>`).
struct Leases {
    admin: pg::Admin,
    schema: String,
}

/// A worker that holds a live lease now (waiting up to 300 ms for one), so the SIGSTOP
/// that follows lands on a driver: stopping an idle worker tests nothing, and with quick
/// drives most workers are idle most of the time (a CI run stopped 50 and cost no lease).
fn leased_worker(leases: &Leases, workers: &[Child]) -> Option<usize> {
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
        let owners: Vec<String> = leases
            .admin
            .rows(&format!(
                "SELECT owner FROM {}.leases WHERE owner IS NOT NULL AND expires_at_us > {now_us}",
                leases.schema
            ))
            .iter()
            .map(|r| r.get(0))
            .collect();
        let found = workers.iter().position(|w| owners.iter().any(|o| o.starts_with(&format!("keel-{}-", w.id()))));
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// SIGKILLs a worker (a new one takes its place); returns its index.
fn kill_one(db: &str, workers: &mut [Child], next: &mut impl FnMut(usize) -> usize, d: &mut Disrupted) {
    let ttl = CHAOS_TTL_MS.to_string();
    let args = ["--lease-ttl-ms", ttl.as_str()];
    std::thread::sleep(Duration::from_millis(50 + next(150) as u64));
    let k = next(3);
    signal(&workers[k], "KILL");
    let killed = std::mem::replace(&mut workers[k], spawn_worker(db, &args));
    let out = killed.wait_with_output().unwrap();
    let (f, r) = leases_lost(&String::from_utf8_lossy(&out.stderr));
    (d.fenced_killed, d.renewals_killed) = (d.fenced_killed + f, d.renewals_killed + r);
    d.kills += 1;
}

/// SIGSTOPs a worker past its lease and SIGCONTs it: one that holds a lease, if any does
/// within 300 ms (the caller has just submitted runs), else any.
fn stop_one(leases: &Leases, workers: &[Child], next: &mut impl FnMut(usize) -> usize, d: &mut Disrupted) {
    let s = leased_worker(leases, workers).unwrap_or_else(|| next(3));
    signal(&workers[s], "STOP");
    std::thread::sleep(Duration::from_millis(2 * CHAOS_TTL_MS + next(200) as u64));
    signal(&workers[s], "CONT");
    d.stops += 1;
}

/// Stops the services (SIGINT: they print their figures): (leases lost, appends fenced,
/// renewals failed) over the survivors.
fn stop_workers(workers: Vec<Child>) -> (u64, u64, u64) {
    let (mut lost, mut fenced, mut renewals) = (0, 0, 0);
    for w in workers {
        signal(&w, "INT");
        let out = w.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "worker failed: {stderr}");
        let (l, f, r) = lease_figures(&stderr);
        assert_eq!(leases_lost(&stderr), (f, r), "the warnings and the figures agree");
        (lost, fenced, renewals) = (lost + l, fenced + f, renewals + r);
    }
    (lost, fenced, renewals)
}

/// Chaos: 3 `keel work` services on one database drive demo runs, submitted in batches
/// while the harness SIGKILLs one (and starts a new one in its place) and SIGSTOPs another
/// past its lease, then SIGCONTs it, over and over (at least [`chaos_depth`]
/// disruptions). Every run ends exactly once with the status of its uninterrupted sled
/// twin, no seq gap or duplicate, `verify` and `replay --all --check` pass; the fenced
/// refusals are counted.
#[test]
fn chaos_sigkill_and_sigstop_past_the_lease_every_run_still_ends_once() {
    if !pg::ready() {
        return;
    }
    let (n, target) = chaos_depth();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("chaos seed {seed}, {n} runs, at least {target} disruptions");
    let mut rng = seed | 1;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let scratch = pg::Scratch::new(Durability::default());
    let (db, cfg) = db_url(&scratch);
    let leases = Leases { admin: pg::Admin::connect().unwrap(), schema: cfg.schema.clone() };
    let store = Arc::new(PgStore::open(cfg).unwrap());
    let twin = sled_twin(n);
    let reader = demo_engine(store.clone());
    let ttl = CHAOS_TTL_MS.to_string();
    let mut workers: Vec<Child> = (0..3).map(|_| spawn_worker(&db, &["--lease-ttl-ms", ttl.as_str()])).collect();
    // The runs arrive in batches over the disruptions, so every round has work in flight.
    let per_round = n.div_ceil(u64::from(target / 2).max(1)).max(1);
    let mut runs = BTreeMap::new();
    let mut d = Disrupted::default();
    let started = Instant::now();
    let bound = Duration::from_secs(300 + 3 * u64::from(target));
    let settled = |runs: &BTreeMap<u64, RunId>| {
        runs.len() as u64 == n && runs.iter().all(|(i, r)| reader.state(*r).unwrap().status.name() == twin[i].0)
    };
    while d.kills + d.stops < target || !settled(&runs) {
        assert!(started.elapsed() < bound, "runs did not settle in {bound:?} (seed {seed})");
        kill_one(&db, &mut workers, &mut next, &mut d);
        let from = runs.len() as u64;
        runs.extend(submit_demo_range(&reader, from..(from + per_round).min(n)));
        stop_one(&leases, &workers, &mut next, &mut d);
    }
    // Let the services notice the end, then stop them.
    std::thread::sleep(Duration::from_millis(2 * CHAOS_TTL_MS));
    let (lost, fenced, renewals) = stop_workers(workers);
    let got = endings(&reader, &runs);
    for (i, e) in &got {
        assert_eq!(e.0, twin[i].0, "run {i} ends as its uninterrupted twin");
    }
    println!(
        "chaos: {n} runs, {} disruptions ({} SIGKILLs, {} SIGSTOPs past the {CHAOS_TTL_MS} ms lease) in {:?}; stale-epoch appends refused: {}, accepted: 0 (no seq gap or duplicate, every run as its twin); leases lost: survivors {lost} ({fenced} appends fenced, {renewals} renewals failed), killed workers {} ({} appends fenced, {} renewals failed)",
        d.kills + d.stops,
        d.kills,
        d.stops,
        started.elapsed(),
        fenced + d.fenced_killed,
        d.fenced_killed + d.renewals_killed,
        d.fenced_killed,
        d.renewals_killed
    );
    assert!(d.kills + d.stops >= target);
    assert!(
        fenced + renewals + d.fenced_killed + d.renewals_killed > 0,
        "no SIGSTOP cost a worker its lease (seed {seed})"
    );
    verify_and_replay(&db, n);
}
