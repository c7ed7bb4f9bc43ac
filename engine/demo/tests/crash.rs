//! Crash test with real processes: the test re-executes its own binary as a child that
//! runs a demo batch on a real sled db, kills it with SIGKILL at random moments, restarts
//! it, and compares the outcome with an uninterrupted reference batch of the same seed.
//!
//! The side-effecting handlers (refund, reply) dedupe on the stable effect key through an
//! fsynced side file: every effect is performed exactly once, however the kills land.
//!
//! Rerun a failure with `KEEL_TEST_SEED=<printed seed>`; soak with `KEEL_CRASH_KILLS=<n>`
//! (kill points to reach; default 24).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
#[path = "../../tests/common/mod.rs"]
mod common;
use keel_demo as demo;
use keel_engine::*;
use keel_store::{EventLog, SledStore, StoreConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD: &str = "KEEL_CRASH_CHILD";
const RUNS: u64 = 16;
const KILL_POINTS_MIN: usize = 24;

fn kill_points_min() -> usize {
    std::env::var("KEEL_CRASH_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(KILL_POINTS_MIN)
}

/// The child: runs the demo batch on the db named by the environment, then exits.
#[test]
fn crash_child() {
    let Ok(db) = std::env::var(CHILD) else { return };
    let seed: u64 = std::env::var("KEEL_CRASH_SEED").unwrap().parse().unwrap();
    let opts = demo::DemoOptions {
        latency_ms: 2,
        invocation_log: Some(std::env::var("KEEL_CRASH_LOG").unwrap().into()),
        invocation_tag: std::env::var("KEEL_CRASH_TAG").unwrap(),
        effects_log: Some(std::env::var("KEEL_CRASH_EFFECTS").unwrap().into()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // Runs are compared with uninterrupted ones: a dispatch killed with its worker many
        // times in a row must not be quarantined here (quarantine has its own tests).
        let engine = demo::register_with(Engine::builder().path(&db).redelivery_limit(u32::MAX), opts).open().unwrap();
        let summary = demo::run_demo(&engine, RUNS, seed).await.unwrap();
        assert!(summary.idle.stopped.is_empty(), "{:?}", summary.idle.stopped);
    });
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What must be equal between a crashed-and-resumed run and the reference: the final
/// status and the decisions, per run and per (plan revision, task). Events of parallel
/// tasks interleave differently from run to run, so each task's sequence is compared on
/// its own; timestamps and run ids are ignored.
#[derive(Debug, PartialEq, Eq)]
struct Projection {
    status: RunStatus,
    partial: bool,
    run_level: Vec<String>,
    per_task: BTreeMap<(u32, String), Vec<String>>,
}

fn project(events: &[Logged], state: &RunState) -> Projection {
    let mut revision = 0u32;
    let mut run_level = Vec::new();
    let mut per_task: BTreeMap<(u32, String), Vec<String>> = BTreeMap::new();
    for e in events {
        let mut push = |task: &TaskId, what: String| per_task.entry((revision, task.0.clone())).or_default().push(what);
        match &e.event {
            Event::TaskDispatched { task, attempt, .. } => push(task, format!("dispatched {attempt}")),
            Event::TaskExecuted { task, attempt, cached, .. } => {
                push(task, format!("executed {attempt} cached={cached}"))
            }
            Event::TaskFailed { task, attempt, class, .. } => push(task, format!("failed {attempt} {class:?}")),
            Event::RetryScheduled { task, next_attempt, delay_ms } => {
                push(task, format!("retry {next_attempt} after {delay_ms}"))
            }
            Event::TaskEvaluated { task, attempt, verdict, .. } => {
                push(task, format!("evaluated {attempt} {verdict:?}"))
            }
            Event::TaskSkipped { task, .. } => push(task, "skipped".into()),
            Event::Planned { revision: r, .. } | Event::Replanned { revision: r, .. } => {
                revision = *r;
                run_level.push(format!("{} {r}", e.event.kind_name()));
            }
            Event::BudgetExhausted { budget, .. } => run_level.push(format!("BudgetExhausted {budget:?}")),
            // An observation of the crash itself (the uninterrupted run has none).
            Event::TaskRedelivered { .. } => {}
            other => run_level.push(other.kind_name().to_owned()),
        }
    }
    Projection { status: state.status, partial: state.partial, run_level, per_task }
}

fn index_of(state: &RunState) -> u64 {
    state.input.value().unwrap()["index"].as_u64().unwrap()
}

/// Per request index: (projection, log) of every run in a db.
fn outcome(log: &dyn keel_store::Store) -> BTreeMap<u64, (Projection, Vec<Logged>)> {
    let mut out = BTreeMap::new();
    for run in log.runs().unwrap() {
        let events: Vec<Logged> = read_logged(log, run, Seq(0)).unwrap().collect::<Result<_, _>>().unwrap();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, Seq(i as u64), "run {run}: sequence gap or duplicate");
        }
        let state = fold_full(log, run).unwrap().unwrap();
        assert_eq!(load_state(log, run).unwrap().as_ref(), Some(&state), "snapshot + tail = full fold");
        let index = index_of(&state);
        assert!(out.insert(index, (project(&events, &state), events)).is_none(), "two runs for request {index}");
    }
    out
}

/// Idempotency keys of dispatches whose TaskExecuted is in the log.
fn executed_keys(events: &[Logged]) -> Vec<String> {
    let mut last_key: BTreeMap<TaskId, String> = BTreeMap::new();
    let mut out = Vec::new();
    for e in events {
        match &e.event {
            Event::TaskDispatched { task, attempt_key: idempotency_key, .. } => {
                last_key.insert(task.clone(), idempotency_key.clone());
            }
            Event::TaskExecuted { task, .. } => out.push(last_key[task].clone()),
            _ => {}
        }
    }
    out
}

fn durable_executed(db: &Path) -> BTreeSet<String> {
    let log = SledStore::open(db, StoreConfig::default()).unwrap();
    let mut keys = BTreeSet::new();
    for run in log.runs().unwrap() {
        let events: Vec<Logged> = read_logged(&log, run, Seq(0)).unwrap().collect::<Result<_, _>>().unwrap();
        keys.extend(executed_keys(&events));
    }
    keys
}

/// The side file of effects: each effect key once (the handlers dedupe on it), each one
/// the effect key of a side-effecting task's dispatch, and every side-effecting task with
/// a recorded result performed its effect. Returns (effects performed, side-effecting
/// handler calls whose effect was already in the file: calls after a crash or a retry).
fn check_effects(
    effects: &Path,
    runs: &BTreeMap<u64, (Projection, Vec<Logged>)>,
    inv: &Path,
    seed: u64,
) -> (usize, usize) {
    let text = std::fs::read_to_string(effects).unwrap_or_default();
    let keys: Vec<&str> = text.lines().map(|l| l.split('\t').next().unwrap()).collect();
    let unique: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "seed {seed}: a side effect was performed twice: {text}");
    let mut dispatched: BTreeSet<String> = BTreeSet::new();
    let mut executed: BTreeSet<String> = BTreeSet::new();
    for (_, events) in runs.values() {
        let mut key_of: BTreeMap<TaskId, String> = BTreeMap::new();
        for e in events {
            match &e.event {
                Event::TaskDispatched { task, effect_key, .. }
                    if demo::SIDE_EFFECT_TASKS.contains(&task.0.as_str()) =>
                {
                    key_of.insert(task.clone(), effect_key.clone());
                    dispatched.insert(effect_key.clone());
                }
                Event::TaskExecuted { task, .. } if key_of.contains_key(task) => {
                    executed.insert(key_of[task].clone());
                }
                _ => {}
            }
        }
    }
    for k in &unique {
        assert!(dispatched.contains(*k), "seed {seed}: effect {k} is no dispatch's effect key");
    }
    for k in &executed {
        assert!(unique.contains(k.as_str()), "seed {seed}: task with effect key {k} has a result but no effect");
    }
    let calls = std::fs::read_to_string(inv)
        .unwrap_or_default()
        .lines()
        .filter(|l| demo::SIDE_EFFECT_TASKS.contains(&l.split('\t').nth(2).unwrap_or("")))
        .count();
    (keys.len(), calls.saturating_sub(keys.len()))
}

fn reference(db: &Path, seed: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let engine = demo::register(Engine::builder().path(db)).open().unwrap();
        demo::run_demo(&engine, RUNS, seed).await.unwrap();
    });
}

#[test]
fn killed_and_restarted_runs_end_exactly_like_an_uninterrupted_batch() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let seed: u64 = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("KEEL_TEST_SEED={seed}");
    let started = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let mut rng = seed;
    let mut kill_points = 0usize;
    let mut cycles = 0u64;
    let mut mid_kills = 0usize;
    let mut effects_total = 0usize;
    let mut redelivered_effects = 0usize;
    while kill_points < kill_points_min() {
        assert!(started.elapsed() < Duration::from_secs(240), "crash test too slow: {kill_points} kill points");
        let batch_seed = seed.wrapping_add(cycles);
        cycles += 1;
        let tmp = tempfile::tempdir().unwrap();
        let (db, ref_db, inv) = (tmp.path().join("db"), tmp.path().join("ref"), tmp.path().join("invocations.tsv"));
        let effects = tmp.path().join("effects.tsv");
        reference(&ref_db, batch_seed);

        // Kill the child at random moments until one incarnation finishes the batch.
        let mut durable_before: Vec<BTreeSet<String>> = Vec::new();
        let mut incarnation = 0usize;
        loop {
            durable_before.push(if incarnation == 0 { BTreeSet::new() } else { durable_executed(&db) });
            let mut child = Command::new(&exe)
                .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, &db)
                .env("KEEL_CRASH_SEED", batch_seed.to_string())
                .env("KEEL_CRASH_LOG", &inv)
                .env("KEEL_CRASH_EFFECTS", &effects)
                .env("KEEL_CRASH_TAG", incarnation.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            // Later incarnations get longer to live so that the batch always finishes.
            let max_ms = 60 + 60 * incarnation as u64;
            let delay = Duration::from_millis(10 + splitmix(&mut rng) % max_ms);
            std::thread::sleep(delay);
            incarnation += 1;
            match child.try_wait().unwrap() {
                Some(status) => {
                    assert!(status.success(), "child failed: {status}");
                    break;
                }
                None => {
                    child.kill().unwrap(); // SIGKILL
                    let status = child.wait().unwrap();
                    if status.success() {
                        break; // it finished just before the signal
                    }
                    kill_points += 1;
                }
            }
        }

        // Compare with the reference.
        let crashed = outcome(&SledStore::open(&db, StoreConfig::default()).unwrap());
        let total: usize = crashed.values().map(|(_, ev)| executed_keys(ev).len()).sum();
        mid_kills += durable_before.iter().skip(1).filter(|d| !d.is_empty() && d.len() < total).count();
        let expected = outcome(&SledStore::open(&ref_db, StoreConfig::default()).unwrap());
        assert_eq!(crashed.len(), RUNS as usize, "seed {seed}: every request has exactly one run");
        for (index, (want, _)) in &expected {
            let (got, events) = &crashed[index];
            assert_eq!(got, want, "seed {seed} batch {batch_seed} request {index}: differs from the uninterrupted run");
            let keys = executed_keys(events);
            let unique: BTreeSet<&String> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "seed {seed} request {index}: a dispatch executed twice");
        }
        // Each side effect performed exactly once: one line per effect key in the side file,
        // and every side-effecting task with a recorded result has its effect there.
        let (performed, redelivered) = check_effects(&effects, &crashed, &inv, seed);
        effects_total += performed;
        redelivered_effects += redelivered;
        // No handler ran a dispatch whose result was already durable when it started.
        let lines = std::fs::read_to_string(&inv).unwrap_or_default();
        for line in lines.lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            let tag: usize = cols[0].parse().unwrap();
            let key = cols[4];
            assert!(
                !durable_before[tag].contains(key),
                "seed {seed}: incarnation {tag} re-ran {} attempt {} (key {key}) whose TaskExecuted was durable",
                cols[2],
                cols[3]
            );
        }
    }
    println!(
        "crash test: {kill_points} kill points ({mid_kills} with part of the batch durable) over {cycles} batch(es) in {:?}; \
         {effects_total} side effects, each once; {redelivered_effects} handler calls found their effect already done",
        started.elapsed()
    );
    assert!(effects_total > 0, "seed {seed}: no side effect was performed");
    assert!(mid_kills > 0, "seed {seed}: no kill landed in the middle of a batch");
}
