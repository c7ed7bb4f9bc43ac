//! Process-level crash harness: a real child process (this test binary re-executed with
//! `KEEL_PROP_CHILD=1`) drives many demo runs and generated-scenario runs on a real sled
//! database with group commit and high concurrency; the parent kills it with SIGKILL at
//! random instants (also while appends and their group-commit flushes are in flight),
//! restarts it, and repeats. After every kill the parent reopens the database and checks:
//! every run's chain verifies; every record the child saw acknowledged as durable is still
//! there with the same hash (nothing committed is lost or rewritten); every record seen
//! after an earlier kill is still there. At the end every run must have finished like in
//! an uninterrupted reference run of the same seed.
//!
//! Depth: `KEEL_SOAK_KILLS` (kills per seed, default 10), `KEEL_CRASH_SEEDS` (default 1),
//! `KEEL_SEED` (first seed, else random and printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_demo::{self as demo, DemoOptions};
use keel_engine::api::Clock;
use keel_engine::{
    fold_full, read_logged, Decision, Engine, Event, Json, Logged, Resolution, RunId, RunState, RunStatus, Seq,
};
use keel_proptests::env_u64;
use keel_proptests::gen::{self, GenConfig};
use keel_proptests::rng::Rng;
use keel_proptests::world::{self, World};
use keel_store::{
    verify_run, AppendObserver, Durability, EventLog, Head, Level, NewRecord, Observed, SledStore, StoreConfig,
    StoreError,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHILD: &str = "KEEL_PROP_CHILD";

/// Prints `B run expected n` before and `A run next_seq hash` after every acknowledged
/// (durable) append, so the parent knows what must survive a kill.
struct Marks {
    out: Mutex<std::io::Stdout>,
}

impl Marks {
    fn line(&self, s: String) {
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }
}

impl AppendObserver for Marks {
    type Ticket = ();
    fn before(&self, run: RunId, expected: Seq, records: &[NewRecord]) {
        self.line(format!("B {run} {} {}", expected.0, records.len()));
    }
    fn after(&self, run: RunId, (): (), result: Result<&Head, &StoreError>) {
        if let Ok(h) = result {
            self.line(format!("A {run} {} {}", h.next_seq.0, hex(&h.last_hash)));
        }
    }
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A clock that runs 20x faster than real time from the real now (so backoffs of
/// generated scenarios pass quickly and time never goes backwards across restarts by much).
struct Quick(Instant, i64);
impl Clock for Quick {
    fn now_us(&self) -> i64 {
        self.1 + (self.0.elapsed().as_micros() as i64) * 20
    }
}

fn real_now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Demo requests and generated scenarios of a batch.
fn batch(seed: u64) -> (Vec<keel_engine::Request>, Vec<gen::Scenario>) {
    let demo_runs = env_u64("KEEL_CRASH_DEMO_RUNS").unwrap_or(48);
    let sc_runs = env_u64("KEEL_CRASH_SCENARIO_RUNS").unwrap_or(16);
    let reqs = (0..demo_runs).map(|i| demo::request(seed, i)).collect();
    let cfg = GenConfig { tasks_max: 8, ..GenConfig::default() };
    // One task in flight at a time: with parallel tasks, whether a retry's timer fires
    // before another task's answer depends on timing (and restarts take time), so such a
    // run may legitimately end differently; with one, it is determined by its answers.
    let scs = (0..sc_runs)
        .map(|i| {
            let mut sc =
                world::engine_scenario(seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15), 1 + (i % 8) as usize, &cfg);
            sc.max_parallel = 1;
            sc
        })
        .collect();
    (reqs, scs)
}

/// What the child (and the reference) does: submit the batch (idempotent), drive until
/// idle, answer escalations, repeat; print DONE.
fn drive(dir: &Path, seed: u64, probe: bool) {
    let (reqs, scs) = batch(seed);
    let world = Arc::new(World::default());
    for sc in &scs {
        world.add(sc.clone());
    }
    let sled = SledStore::open(
        dir,
        StoreConfig { durability: Durability::GroupCommit(Level::ProcessCrash), ..StoreConfig::default() },
    )
    .unwrap_or_else(|e| panic!("open: {e}"));
    let store: Arc<dyn keel_store::Store> = if probe {
        Arc::new(Observed::new(Arc::new(sled), Marks { out: Mutex::new(std::io::stdout()) }))
    } else {
        Arc::new(sled)
    };
    let b =
        demo::register_with(Engine::builder().store(store), DemoOptions { latency_ms: 2, ..DemoOptions::default() });
    let engine = world::register(b, &world)
        .clock(Arc::new(Quick(Instant::now(), real_now_us())))
        .workers(16)
        .snapshot_every(7)
        // Runs are compared with uninterrupted ones: a dispatch killed with its worker
        // many times in a row must not be quarantined here (quarantine has its own tests).
        .redelivery_limit(u32::MAX)
        .open()
        .unwrap_or_else(|e| panic!("engine: {e}"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("rt");
    rt.block_on(async {
        for r in reqs {
            engine.submit(r).await.unwrap_or_else(|e| panic!("submit: {e}"));
        }
        for sc in &scs {
            engine.submit(world::request(sc)).await.unwrap_or_else(|e| panic!("submit: {e}"));
        }
        for _ in 0..50 {
            let report = engine.run_until_idle().await.unwrap_or_else(|e| panic!("run_until_idle: {e}"));
            assert!(report.stopped.is_empty(), "drivers stopped: {:?}", report.stopped);
            let mut answered = false;
            for p in engine.escalations().unwrap_or_default() {
                let st = engine.state(p.run).unwrap_or_else(|e| panic!("state: {e}"));
                let decision = match world.get(st.seed).filter(|_| st.workflow.starts_with("prop_")) {
                    Some(sc) => sc
                        .human(p.escalation.number, &p.escalation.options)
                        .map(|c| gen::decision(&c, p.escalation.number)),
                    None => p.escalation.options.first().map(|o| match o.as_str() {
                        "approve" => Decision::Approve,
                        "reject" => Decision::Reject,
                        "supply_output" => Decision::SupplyOutput(Json::new(&serde_json::json!({"answer": "human"}))),
                        "replan_with_hint" => Decision::ReplanWithHint("try again".into()),
                        _ => Decision::Abort,
                    }),
                };
                if let Some(decision) = decision {
                    engine
                        .resolve(p.run, Resolution { decision, by: "alice".into(), reason: "checked".into() })
                        .await
                        .unwrap_or_else(|e| panic!("resolve: {e}"));
                    answered = true;
                }
            }
            if !answered {
                break;
            }
        }
    });
    println!("DONE");
}

#[test]
fn crash_child_entry() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let dir = std::env::var("KEEL_PROP_DB").expect("db");
    let seed: u64 = std::env::var("KEEL_PROP_SEED").expect("seed").parse().expect("seed");
    drive(Path::new(&dir), seed, true);
}

/// What must match the reference: per request (idempotency key) the final status, the
/// run-level decisions in order, and per (revision, task) its events in order (parallel
/// tasks interleave differently between runs; timestamps and run ids are ignored).
type Projection = (RunStatus, bool, Vec<String>, BTreeMap<(u32, String), Vec<String>>);

fn project(events: &[Logged], st: &RunState) -> Projection {
    let mut rev = 0u32;
    let mut run_level = Vec::new();
    let mut per: BTreeMap<(u32, String), Vec<String>> = BTreeMap::new();
    for e in events {
        let mut push = |t: &keel_engine::TaskId, s: String| per.entry((rev, t.0.clone())).or_default().push(s);
        match &e.event {
            Event::TaskDispatched { task, attempt, .. } => push(task, format!("dispatch {attempt}")),
            Event::TaskExecuted { task, attempt, .. } => push(task, format!("executed {attempt}")),
            Event::TaskFailed { task, attempt, class, .. } => push(task, format!("failed {attempt} {class:?}")),
            Event::RetryScheduled { task, next_attempt, delay_ms } => {
                push(task, format!("retry {next_attempt} {delay_ms}"))
            }
            Event::TaskEvaluated { task, attempt, verdict, .. } => {
                push(task, format!("evaluated {attempt} {verdict:?}"))
            }
            Event::TaskSkipped { task, .. } => push(task, "skipped".into()),
            // An observation of the crash itself (the uninterrupted run has none).
            Event::TaskRedelivered { .. } => {}
            Event::Planned { revision, .. } | Event::Replanned { revision, .. } => {
                rev = *revision;
                run_level.push(format!("{} {revision}", e.event.kind_name()));
            }
            other => run_level.push(other.kind_name().to_owned()),
        }
    }
    (st.status, st.partial, run_level, per)
}

fn outcome(store: &SledStore) -> BTreeMap<String, Projection> {
    let mut out = BTreeMap::new();
    for run in store.runs().expect("runs") {
        let events: Vec<Logged> =
            read_logged(store, run, Seq(0)).expect("read").collect::<Result<_, _>>().expect("events");
        let st = fold_full(store, run).expect("fold").expect("state");
        out.insert(st.idempotency_key.clone().unwrap_or_default(), project(&events, &st));
    }
    out
}

#[derive(Default, Debug)]
struct Counts {
    /// SIGKILLs that hit a running child.
    kills: u64,
    /// Children that exited on their own before finishing (e.g. the db lock still held
    /// by the parent's just-dropped handle): restarted, not counted as kills.
    child_failures: u64,
    mid_append_kills: u64,
    acked_checked: u64,
    restarts: u64,
}

/// After a kill: reopen, verify every chain, check acknowledged and earlier-seen records.
fn check_after_kill(
    dir: &Path,
    acked: &BTreeMap<RunId, (u64, String)>,
    seen: &mut BTreeMap<RunId, (u64, [u8; 32])>,
    counts: &mut Counts,
    seed: u64,
) {
    let store = SledStore::open(dir, StoreConfig { durability: Durability::None, ..StoreConfig::default() })
        .unwrap_or_else(|e| panic!("seed {seed}: reopen after kill {}: {e}", counts.kills));
    for run in store.runs().expect("runs") {
        verify_run::<Event>(&store, run)
            .unwrap_or_else(|e| panic!("seed {seed}: after kill {}: run {run} does not verify: {e}", counts.kills));
    }
    let hash_at =
        |run: RunId, seq: u64| -> Option<[u8; 32]> { store.read(run, Seq(seq)).ok()?.next()?.ok().map(|r| r.hash) };
    for (run, (next, h)) in acked {
        let got = hash_at(*run, next - 1).map(|x| hex(&x));
        assert_eq!(
            got.as_deref(),
            Some(h.as_str()),
            "seed {seed}: after kill {}: run {run}: acknowledged record {} lost or rewritten",
            counts.kills,
            next - 1
        );
        counts.acked_checked += 1;
    }
    for (run, (next, h)) in seen.iter() {
        assert_eq!(
            hash_at(*run, next - 1),
            Some(*h),
            "seed {seed}: after kill {}: run {run}: record {} seen after an earlier kill is gone",
            counts.kills,
            next - 1
        );
    }
    for run in store.runs().expect("runs") {
        let head = store.head(run).expect("head");
        if head.next_seq.0 > 0 {
            seen.insert(run, (head.next_seq.0, head.last_hash));
        }
    }
}

fn crash_seed(seed: u64, kills: u64, counts: &mut Counts) {
    let reference_dir = tempfile::tempdir().expect("tempdir");
    drive(reference_dir.path(), seed, false);
    let reference = outcome(&SledStore::open(reference_dir.path(), StoreConfig::default()).expect("open reference"));

    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let mut rng = Rng::new(seed);
    let mut seen = BTreeMap::new();
    let mut killed = 0u64;
    loop {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("KEEL_PROP_DB", dir.path())
            .env("KEEL_PROP_SEED", seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        counts.restarts += 1;
        let stdout = child.stdout.take().expect("stdout");
        let reader =
            std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<String>>());
        let finish = killed >= kills;
        if !finish {
            // Random instant: during open/recovery, submission, or the busy middle.
            let ms = match rng.below(4) {
                0 => rng.range(1, 30),
                1 => rng.range(30, 120),
                _ => rng.range(120, 400),
            };
            std::thread::sleep(Duration::from_millis(ms));
            let _ = child.kill(); // SIGKILL
        }
        let status = child.wait().expect("wait");
        let lines = reader.join().expect("reader");
        let done = lines.iter().any(|l| l == "DONE");
        let sigkilled = {
            use std::os::unix::process::ExitStatusExt;
            status.signal() == Some(9)
        };
        if !done && !sigkilled {
            counts.child_failures += 1;
            assert!(counts.child_failures < 50, "seed {seed}: children keep failing: {status:?}");
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // Acknowledged appends, and whether the kill landed inside an append.
        let mut acked: BTreeMap<RunId, (u64, String)> = BTreeMap::new();
        let mut open_appends: BTreeMap<String, ()> = BTreeMap::new();
        for l in &lines {
            let mut p = l.split(' ');
            match (p.next(), p.next(), p.next(), p.next()) {
                (Some("B"), Some(run), _, _) => {
                    open_appends.insert(run.to_owned(), ());
                }
                (Some("A"), Some(run), Some(next), Some(h)) => {
                    open_appends.remove(run);
                    if let (Ok(r), Ok(n)) = (run.parse::<RunId>(), next.parse::<u64>()) {
                        acked.insert(r, (n, h.to_owned()));
                    }
                }
                _ => {}
            }
        }
        if !done {
            assert!(!finish, "seed {seed}: the final child (not killed) did not finish: {status:?}");
            killed += 1;
            counts.kills += 1;
            if !open_appends.is_empty() {
                counts.mid_append_kills += 1;
            }
        }
        check_after_kill(dir.path(), &acked, &mut seen, counts, seed);
        if done {
            break;
        }
    }
    let got = outcome(&SledStore::open(dir.path(), StoreConfig::default()).expect("open"));
    assert_eq!(got.len(), reference.len(), "seed {seed}: number of runs");
    for (key, want) in &reference {
        let have = got.get(key).unwrap_or_else(|| panic!("seed {seed}: run {key} missing after crashes"));
        if have != want {
            let mut diff = Vec::new();
            if (have.0, have.1, &have.2) != (want.0, want.1, &want.2) {
                diff.push(format!(
                    "run level: {:?} {} {:?}\n   reference {:?} {} {:?}",
                    have.0, have.1, have.2, want.0, want.1, want.2
                ));
            }
            for k in have.3.keys().chain(want.3.keys()) {
                if have.3.get(k) != want.3.get(k) {
                    diff.push(format!("task {k:?}: {:?}\n   reference {:?}", have.3.get(k), want.3.get(k)));
                }
            }
            diff.dedup();
            panic!("seed {seed}: run {key} finished differently after {killed} kills than the uninterrupted reference:\n  {}", diff.join("\n  "));
        }
    }
}

#[test]
fn sigkill_at_random_instants_loses_nothing_and_runs_finish_as_reference() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let kills = env_u64("KEEL_SOAK_KILLS").unwrap_or(10);
    let seeds = env_u64("KEEL_CRASH_SEEDS").unwrap_or(1);
    let first = env_u64("KEEL_SEED").unwrap_or_else(|| real_now_us() as u64);
    let mut counts = Counts::default();
    for i in 0..seeds {
        let seed = first.wrapping_add(i);
        println!("crash harness seed {seed} (rerun: KEEL_SEED={seed} KEEL_CRASH_SEEDS=1)");
        crash_seed(seed, kills, &mut counts);
    }
    println!("crash harness: {counts:?}");
}
