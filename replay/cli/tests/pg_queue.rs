//! The shared work queue on PostgreSQL (docs/STORE.md, "The work queue"): worker
//! processes claim runnable runs from one table, so priority order and a workflow type's
//! `max_concurrent_runs` hold across processes, and a run submitted by one process is
//! woken in another by `LISTEN/NOTIFY`. The workers are real child processes (this test
//! binary run again as `child_worker`, with a demo workflow whose limit the test sets).
//! Each test works in a fresh schema it drops; without a server it says it was skipped
//! (and fails under CI=true or KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

#[path = "../../../store/postgres/tests/common/mod.rs"]
mod pg;

use keel_engine::{Engine, Logged, RunStatus};
use keel_store::{Durability, RunId};
use keel_store_postgres::{PgConfig, PgStore};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "KEEL_QUEUE_CHILD";
const READY: &str = "keel-queue-child-ready";

/// What a child worker process is given: `url schema limit workers poll_ms`.
struct ChildSpec {
    limit: usize,
    workers: usize,
    poll_ms: u64,
}

/// The demo engine on `store`, its workflow limited to `limit` concurrent runs.
fn engine(store: Arc<PgStore>, limit: usize, workers: usize, poll_ms: u64) -> Engine {
    let mut wf = keel_demo::workflow();
    wf.max_concurrent_runs = limit;
    let mut b = Engine::builder().store(store).workflow(wf).workers(workers).queue_poll_ms(poll_ms);
    for (name, h) in keel_demo::handlers() {
        b = b.handler(name, h);
    }
    b.open().unwrap()
}

/// The child: works the schema's runs until killed.
#[test]
fn child_worker() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let p: Vec<&str> = spec.split(' ').collect();
    let cfg = PgConfig { schema: p[1].to_owned(), create: false, ..PgConfig::new(p[0]) };
    let store = Arc::new(PgStore::open(cfg).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let engine = engine(store, p[2].parse().unwrap(), p[3].parse().unwrap(), p[4].parse().unwrap());
    rt.block_on(async {
        let _workers = engine.start();
        // libtest may have written "test child_worker ... " on the same line.
        println!("{READY}");
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
}

/// A child worker process, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cfg: &PgConfig, spec: &ChildSpec) -> Worker {
    let arg = format!("{} {} {} {} {}", cfg.url, cfg.schema, spec.limit, spec.workers, spec.poll_ms);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_worker", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, arg)
        .env("KEEL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    assert!(lines.any(|l| l.map(|l| l.contains(READY)).unwrap_or(false)), "the worker did not start");
    Worker(child)
}

/// Waits (at most 60 s) until `n` sessions listen for the schema's queue notifications (a
/// notification sent before a listener is up is missed).
fn wait_listening(cfg: &PgConfig, n: i64) {
    let admin = pg::Admin::connect().unwrap();
    let listening = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keel-listen-{}' AND query = 'LISTEN keel_work'",
        cfg.schema
    );
    let started = Instant::now();
    while admin.int(&listening) < n {
        assert!(started.elapsed() < Duration::from_secs(60), "{n} listener(s) never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Submits demo requests (seed 1) `indexes` with the given priorities, in that order.
fn submit(engine: &Engine, reqs: &[(u64, i32)]) -> Vec<RunId> {
    rt().block_on(async {
        let mut runs = Vec::new();
        for (i, priority) in reqs {
            let req = keel_engine::Request { priority: *priority, ..keel_demo::request(1, *i) };
            runs.push(engine.submit(req).await.unwrap().run);
        }
        runs
    })
}

/// Waits (at most 120 s) until every run is past its first drive (not `Accepted`).
fn wait_driven(engine: &Engine, runs: &[RunId], settled: impl Fn(RunStatus) -> bool) {
    let started = Instant::now();
    while !runs.iter().all(|r| settled(engine.state(*r).unwrap().status)) {
        assert!(started.elapsed() < Duration::from_secs(120), "runs were not driven within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finished(s: RunStatus) -> bool {
    s.is_terminal() || s == RunStatus::AwaitingHuman
}

/// When the run's first drive started: its first event after acceptance.
fn first_driven_at(events: &[Logged]) -> i64 {
    events.iter().find(|e| e.seq.0 > 0).map(|e| e.at_us).unwrap()
}

#[test]
fn runs_are_claimed_in_priority_order_across_two_processes() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
    let submitter = engine(store, 1, 1, 250);
    // Submitted low priority first: acceptance order is the reverse of priority order.
    let reqs: Vec<(u64, i32)> = (0..12u64).map(|i| (i, i32::try_from(i % 4).unwrap())).collect();
    let runs = submit(&submitter, &reqs);
    // One run at a time over both processes (limit 1): the order runs are first driven
    // in is the order they were claimed in.
    let spec = ChildSpec { limit: 1, workers: 2, poll_ms: 250 };
    let workers = [spawn(&cfg, &spec), spawn(&cfg, &spec)];
    wait_driven(&submitter, &runs, finished);
    drop(workers);
    let mut started: Vec<(i64, i32, usize)> = runs
        .iter()
        .zip(&reqs)
        .enumerate()
        .map(|(k, (r, (_, p)))| (first_driven_at(&submitter.events(*r).unwrap()), *p, k))
        .collect();
    started.sort();
    let order: Vec<(i32, usize)> = started.iter().map(|(_, p, k)| (*p, *k)).collect();
    let mut expected = order.clone();
    // Highest priority first, then the earlier accepted.
    expected.sort_by_key(|(p, k)| (-p, *k));
    assert_eq!(order, expected, "first drives in priority order (priority, submit index)");
}

/// The runs driven in one drive from acceptance to their end (no retry timer, no
/// escalation): the time their drive spans.
fn single_drive_span(events: &[Logged]) -> Option<(i64, i64)> {
    let waits = events.iter().any(|e| matches!(e.event.kind_name(), "RetryScheduled" | "Escalated"));
    let ended = events.last().is_some_and(|e| e.event.kind_name() == "RunCompleted");
    (!waits && ended).then(|| (first_driven_at(events), events.last().map(|e| e.at_us).unwrap()))
}

#[test]
fn a_workflow_limit_of_one_holds_across_two_processes() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
    let submitter = engine(store.clone(), 1, 1, 250);
    let reqs: Vec<(u64, i32)> = (0..16u64).map(|i| (i, 0)).collect();
    let runs = submit(&submitter, &reqs);
    // Four workers in each process: only the limit keeps them to one run at a time.
    let spec = ChildSpec { limit: 1, workers: 4, poll_ms: 250 };
    let workers = [spawn(&cfg, &spec), spawn(&cfg, &spec)];
    wait_driven(&submitter, &runs, finished);
    drop(workers);
    let mut spans: Vec<(i64, i64)> =
        runs.iter().filter_map(|r| single_drive_span(&submitter.events(*r).unwrap())).collect();
    spans.sort();
    assert!(spans.len() >= 2, "too few single-drive runs to compare: {}", spans.len());
    for w in spans.windows(2) {
        assert!(w[0].1 < w[1].0, "two runs of a workflow limited to 1 were driven at once: {w:?}");
    }
    println!("{} single-drive runs, none overlapping", spans.len());
}

/// The workers poll once an hour here: a run submitted by this process is driven by the
/// child only because a notification woke it.
#[test]
fn a_run_submitted_in_one_process_is_woken_in_another_by_notify() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
    let submitter = engine(store, 16, 1, 250);
    let _worker = spawn(&cfg, &ChildSpec { limit: 16, workers: 2, poll_ms: 3_600_000 });
    // The child's listener session is up (a notification before it would be missed).
    wait_listening(&cfg, 1);
    let mut woken: BTreeMap<u64, RunStatus> = BTreeMap::new();
    for i in 0..4u64 {
        // Let the child go back to sleep on its hour-long poll.
        std::thread::sleep(Duration::from_millis(300));
        let run = submit(&submitter, &[(i, 0)])[0];
        wait_driven(&submitter, &[run], finished);
        woken.insert(i, submitter.state(run).unwrap().status);
    }
    assert_eq!(woken.len(), 4, "{woken:?}");
}

/// A run driven by another process is followed and awaited here: its appends are made
/// in the other process, so nothing announces them in this one; on a shared store a tail
/// (`Engine::follow`, the SSE tail of `GET /v1/runs/{run}/events`) and a wait
/// (`Engine::wait_until`) re-read the store every `queue_poll`. Before, both waited for a
/// local append that never came: a run page on one `keel serve` did not move while
/// another server drove the run.
#[test]
fn a_run_driven_by_another_process_is_followed_and_awaited_here() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
    // This process never drives: its workers are not started.
    let here = engine(store, 16, 1, 100);
    let run = submit(&here, &[(3, 0)])[0];
    let rt = rt();
    let (seqs, waited, recorded) = rt.block_on(async {
        // The tail hands each batch to the test as it comes.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tail = here.follow(run, None);
        tokio::spawn(async move {
            while let Ok(Some(events)) = tail.next().await {
                if tx.send(events.iter().map(|e| e.seq.0).collect::<Vec<u64>>()).is_err() {
                    return;
                }
            }
        });
        let wait = {
            let here = here.clone();
            tokio::spawn(
                async move { tokio::time::timeout(Duration::from_secs(60), here.wait_until(run, finished)).await },
            )
        };
        // Both are waiting on the accepted run before the other process starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!wait.is_finished(), "the wait ended before the run was driven");
        let _worker = spawn(&cfg, &ChildSpec { limit: 16, workers: 2, poll_ms: 50 });
        let waited = wait.await.unwrap().expect("the wait never heard of the other process's drive").unwrap();
        let recorded = here.events(run).unwrap().len();
        let mut seqs = Vec::new();
        while seqs.len() < recorded {
            let batch = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
            let batch = batch.expect("the tail never heard of the other process's appends").unwrap();
            seqs.extend(batch);
        }
        (seqs, waited, recorded)
    });
    assert!(finished(waited), "{waited:?}");
    assert!(recorded > 1, "the run was not driven");
    assert_eq!(seqs, (0..recorded as u64).collect::<Vec<_>>(), "every event once, in order");
}

/// `run_until_idle` on a shared queue is idle only when no run of its workflow types is
/// queued: a run leased by a process that died (its lease still live for a while, as after
/// a SIGKILL) is waited for and driven once the lease expires, instead of the call
/// returning at once with the run unfinished (`keel work --until-idle` after a crash, and
/// a second `keel demo` beside a first, did so).
#[test]
fn until_idle_waits_for_a_run_leased_by_a_dead_process() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let store = Arc::new(PgStore::open(cfg).unwrap());
    let worker = engine(store.clone(), 16, 2, 100);
    let run = submit(&worker, &[(0, 0)])[0];
    // The "dead" process's lease: live for 1.5 s more, never renewed nor released.
    let now_us =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros()).unwrap();
    let ghost = keel_store::Coordination::try_lease(store.as_ref(), run, "dead-worker", 1_500, now_us).unwrap();
    assert!(ghost.is_some(), "the ghost took the lease");
    std::mem::forget(ghost);
    let started = Instant::now();
    let report = rt().block_on(worker.run_until_idle()).unwrap();
    let status = worker.state(run).unwrap().status;
    assert!(finished(status), "until_idle returned after {:?} with the run {status:?}: {report:?}", started.elapsed());
    assert!(report.driven >= 1, "{report:?}");
}

/// A submit whose caller stops waiting (an HTTP client that hung up, a timeout) still
/// queues the run it recorded: the operation runs to its end on a task of its own. Before,
/// with appends awaited on PostgreSQL, the run was recorded but not queued, and waited for
/// the minute-long rescan (the code review's reproduction).
#[test]
fn a_submit_whose_caller_stops_waiting_still_queues_its_run() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let store = Arc::new(PgStore::open(scratch.config()).unwrap());
    let here = engine(store, 16, 2, 50);
    let rt = rt();
    let req = keel_demo::request(1, 7);
    let (workflow, key) = (req.workflow.clone(), req.idempotency_key.clone().unwrap());
    let status = rt.block_on(async {
        let _workers = here.start();
        {
            // Polled once, then dropped.
            let submit = here.submit(req);
            tokio::pin!(submit);
            let polled = tokio::select! { biased; r = &mut submit => Some(r), () = std::future::ready(()) => None };
            assert!(polled.is_none(), "the submit ended in one poll");
        }
        let started = Instant::now();
        let run = loop {
            if let Some(run) = here.run_by_key(&workflow, &key).await.unwrap() {
                break run;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the dropped submit recorded no run");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::timeout(Duration::from_secs(20), here.wait_until(run, finished))
            .await
            .expect("the run was not driven within 20 s (not queued)")
            .unwrap()
    });
    assert!(finished(status), "{status:?}");
}

/// The drive of a run that finishes records its end in the queue with its last append
/// (docs/STORE.md 15.2b): the store counts it, the run has left the queue and its lease is
/// free at once, with no `done` of its own. (Through the engine's observed store: the
/// wrapper that meters appends first dropped the end, and every drive sent its `done`.)
#[test]
fn finished_runs_end_their_drives_with_their_last_append() {
    if !pg::ready() {
        return;
    }
    use keel_store::{Coordination, WorkQueue};
    let scratch = pg::Scratch::new(Durability::default());
    let store = Arc::new(PgStore::open(scratch.config()).unwrap());
    let here = engine(store.clone(), 16, 4, 50);
    let runs: Vec<RunId> =
        (0..8).map(|i| keel_demo::request(3, i)).map(|req| rt().block_on(here.submit(req)).unwrap().run).collect();
    let rt = rt();
    let workers = {
        let _in = rt.enter();
        here.start()
    };
    wait_driven(&here, &runs, |s| finished(s) || s == RunStatus::AwaitingHuman);
    rt.block_on(workers.shutdown());
    let ended: Vec<RunId> = runs.iter().copied().filter(|r| here.state(*r).unwrap().status.is_terminal()).collect();
    assert!(!ended.is_empty(), "some demo runs finish");
    assert!(store.stats().drives_ended_with_append >= 1, "{:?}", store.stats());
    assert_eq!(store.unqueued(&ended).unwrap(), ended, "every finished run left the queue");
    let now_us =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros()).unwrap();
    for r in ended {
        assert!(store.try_lease(r, "another", 60_000, now_us).unwrap().is_some(), "{r}: its lease is free");
    }
}

/// A run whose drive a drain ended (a rolling deploy: `keel serve` or `keel work` stopped
/// with SIGTERM) is taken over by another process at once: the drain hands it back to the
/// queue in one statement (`WorkQueue::hand_back`: unclaimed, its lease released, the
/// other processes told). Before, its row stayed claimed by the stopping process and
/// nothing was announced, so the other process found it at its next poll or rescan (an
/// hour here).
#[test]
fn a_run_drained_in_one_process_is_taken_over_by_another_at_once() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let rt = rt();
    // Handlers that take 1 s: the drain comes while a call is in flight.
    let slow = keel_demo::DemoOptions { latency_ms: 1_000, ..Default::default() };
    let open = |poll_ms: u64| {
        let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
        let b = Engine::builder().store(store).workers(2).queue_poll_ms(poll_ms).lease_ttl_ms(60_000);
        keel_demo::register_with(b, slow.clone()).open().unwrap()
    };
    let leaving = open(3_600_000);
    let staying = open(3_600_000);
    let run = rt.block_on(leaving.submit(keel_demo::request(1, 7))).unwrap().run;
    let drained = {
        let _in = rt.enter();
        leaving.start()
    };
    // The leaving process has a call in flight.
    let started = Instant::now();
    while !leaving.events(run).unwrap().iter().any(|e| e.event.kind_name() == "TaskDispatched") {
        assert!(started.elapsed() < Duration::from_secs(60), "the run was never dispatched");
        std::thread::sleep(Duration::from_millis(10));
    }
    let staying_workers = {
        let _in = rt.enter();
        staying.start()
    };
    // The staying process's listener is up and its workers asleep on their hour-long poll.
    wait_listening(&cfg, 2);
    std::thread::sleep(Duration::from_millis(300));
    let drain_at = Instant::now();
    rt.block_on(drained.drain(Duration::from_secs(20)));
    // The drain left the run unfinished (else there is nothing to take over).
    let at_drain = leaving.events(run).unwrap().len();
    let status = leaving.state(run).unwrap().status;
    assert!(!status.is_terminal() && status != RunStatus::AwaitingHuman, "the run ended before the drain: {status:?}");
    let end = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(20),
            staying.wait_until(run, |s| s.is_terminal() || s == RunStatus::AwaitingHuman),
        )
        .await
    });
    let taken_over_in = drain_at.elapsed();
    let events = staying.events(run).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.kind_name()).collect();
    assert!(end.is_ok(), "the other process did not take the run over within 20 s of the drain: {kinds:?}");
    assert!(events.len() > at_drain, "nothing was appended after the drain: {kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "TaskRedelivered").count(), 0, "{kinds:?}");
    rt.block_on(staying_workers.shutdown());
    eprintln!("taken over and driven to its end {taken_over_in:?} after the drain began");
}
