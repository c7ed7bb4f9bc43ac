//! Live operations (issue 14): the read models written with the events (run index, open
//! escalations), a restart that reads only unfinished runs, and subscriptions (a run's
//! live events, its end, status changes) without polling.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;
use keel_store::{
    AuxWrite, Claim, Coordination, Durability, EventLog, Fence, Head, Lease, Limits, NewRecord, PayloadRef, RecordIter,
    RunRecords, SledStore, Store, StoreConfig, StoreError,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One engine with two workflow types: `ok` completes (one tool task), `esc` escalates
/// (its handler fails fatally on a critical task).
fn builder(handler_delay_ms: u64) -> EngineBuilder {
    let ok = workflow("ok", planner(vec![plan(vec![task("t", TaskKind::Tool, "t", &[])])]), pass_evaluator());
    let esc = workflow("esc", planner(vec![plan(vec![task("pay", TaskKind::Tool, "pay", &[])])]), pass_evaluator());
    Engine::builder()
        .workflow(ok)
        .workflow(esc)
        .handler(
            "t",
            slow_handler(handler_delay_ms, |c| {
                Ok(TaskOutput { output: json!({"task": c.task.0}), usage: Usage { cost_micros: 7, tokens: 3 } })
            }),
        )
        .handler("pay", handler(|_| Err(HandlerError::fatal("card declined"))))
}

/// Summaries folded from the log, run by run (what `runs()` returned before the index).
fn folded(engine: &Engine) -> Vec<RunSummary> {
    let log = engine.store();
    log.runs()
        .unwrap()
        .into_iter()
        .map(|run| {
            let s = load_state(log.as_ref(), run).unwrap().unwrap();
            RunSummary {
                run,
                workflow: s.workflow.clone(),
                status: s.status,
                priority: s.priority,
                accepted_at_us: s.accepted_at_us,
                last_event_us: s.last_event_us,
                events: s.next_seq.0,
                cost_micros: s.totals.cost_micros,
                tokens: s.totals.tokens,
                partial: s.partial,
                escalations: s.escalations.len() as u32,
                size_warning: s.size_warning,
            }
        })
        .collect()
}

async fn seven_done_three_waiting(engine: &Engine) {
    for i in 0..10 {
        let wf = if i % 3 == 1 { "esc" } else { "ok" };
        let mut r = Request::new(wf, json!({ "i": i }));
        r.idempotency_key = Some(format!("k{i}"));
        r.priority = i;
        engine.submit(r).await.unwrap();
    }
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
}

fn all_pages(engine: &Engine, filter: &RunFilter, limit: usize) -> Vec<RunSummary> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = engine.runs_page(filter, after, limit).unwrap();
        assert!(page.runs.len() <= limit);
        out.extend(page.runs);
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_index_pages_and_filters_as_a_fold_of_the_log_does() {
    let dir = tempdir();
    let engine = builder(0).path(dir.path()).open().unwrap();
    seven_done_three_waiting(&engine).await;
    // A run still going (accepted, not driven) is listed up to date too.
    let pending = engine.submit(Request::new("ok", json!({"i": 99}))).await.unwrap().run;
    let truth = folded(&engine);
    assert_eq!(truth.len(), 11);
    assert_eq!(engine.runs().unwrap(), truth);
    assert_eq!(all_pages(&engine, &RunFilter::default(), 3), truth);
    for status in RunStatus::ALL {
        let f = RunFilter { status: Some(status), workflow: None };
        let want: Vec<_> = truth.iter().filter(|r| r.status == status).cloned().collect();
        assert_eq!(all_pages(&engine, &f, 2), want, "{status:?}");
        for wf in ["ok", "esc", "none"] {
            let f = RunFilter { status: Some(status), workflow: Some(wf.into()) };
            let want: Vec<_> = want.iter().filter(|r| r.workflow == wf).cloned().collect();
            assert_eq!(all_pages(&engine, &f, 1), want, "{status:?} {wf}");
        }
    }
    let f = RunFilter { status: None, workflow: Some("esc".into()) };
    let esc: Vec<_> = truth.iter().filter(|r| r.workflow == "esc").cloned().collect();
    assert_eq!(esc.len(), 3);
    assert_eq!(all_pages(&engine, &f, 2), esc);
    assert!(esc.iter().all(|r| r.status == RunStatus::AwaitingHuman));
    // The open escalations are the AwaitingHuman range, in run id order.
    let open: Vec<RunId> = engine.escalations().unwrap().iter().map(|e| e.run).collect();
    assert_eq!(open, esc.iter().map(|r| r.run).collect::<Vec<_>>());
    assert_eq!(engine.state(pending).unwrap().status, RunStatus::Accepted);
    // Stats from the index equal stats from the fold.
    let stats = engine.stats().unwrap();
    let ok = stats.iter().find(|s| s.workflow == "ok").unwrap();
    assert_eq!(ok.runs, 8);
    assert_eq!(ok.by_status.get(&RunStatus::Completed), Some(&7));
    assert_eq!(ok.totals.cost_micros, truth.iter().filter(|r| r.workflow == "ok").map(|r| r.cost_micros).sum::<u64>());
    // A resolution moves the run out of the AwaitingHuman range in the same write.
    let first = esc[0].run;
    engine
        .resolve(first, Resolution { decision: Decision::Abort, by: "ann".into(), reason: "checked".into() })
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let open: Vec<RunId> = engine.escalations().unwrap().iter().map(|e| e.run).collect();
    assert_eq!(open.len(), 2);
    assert!(!open.contains(&first));
    assert_eq!(engine.runs().unwrap(), folded(&engine));
}

/// On sled a finished run's records are sealed into one stored value when it finishes
/// (fewer keys for sled to load at every open); they read back unchanged: after a reopen
/// every run folds to the state its index entry recorded at commit and verifies, and a run
/// waiting for a human is sealed once a resolution finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_sealed_and_read_back_unchanged() {
    let dir = tempdir();
    {
        let engine = builder(0).path(dir.path()).open().unwrap();
        seven_done_three_waiting(&engine).await;
    }
    let keys = |runs: &[RunSummary]| {
        let store = SledStore::open(dir.path(), StoreConfig::default()).unwrap();
        runs.iter().map(|r| (r.run, store.raw_stored_keys(r.run).unwrap())).collect::<Vec<_>>()
    };
    let engine = builder(0).path(dir.path()).open().unwrap();
    let indexed = engine.runs().unwrap();
    assert_eq!(indexed, folded(&engine), "the index (written at commit) and a fold of the stored records");
    let waiting: Vec<_> = indexed.iter().filter(|r| !r.status.is_terminal()).cloned().collect();
    assert_eq!(waiting.len(), 3);
    for r in &indexed {
        let report = keel_store::verify_run::<Event>(engine.store().as_ref(), r.run).unwrap();
        assert_eq!(report.records, r.events, "run {}", r.run);
    }
    drop(engine);
    for (run, n) in keys(&indexed) {
        let summary = indexed.iter().find(|r| r.run == run).unwrap();
        if summary.status.is_terminal() {
            assert_eq!(n, 1, "finished run {run} ({} events) is one stored value", summary.events);
        } else {
            assert_eq!(n as u64, summary.events, "waiting run {run}: one key per record");
        }
    }
    // A waiting run resolved: it finishes, is sealed, and reads as it was plus the new records.
    let engine = builder(0).path(dir.path()).open().unwrap();
    let before = load_state(engine.store().as_ref(), waiting[0].run).unwrap().unwrap();
    engine
        .resolve(waiting[0].run, Resolution { decision: Decision::Abort, by: "ann".into(), reason: "checked".into() })
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let after = engine.runs().unwrap();
    assert_eq!(after, folded(&engine));
    let resolved = after.iter().find(|r| r.run == waiting[0].run).unwrap().clone();
    assert!(resolved.status.is_terminal() && resolved.events > before.next_seq.0);
    drop(engine);
    assert_eq!(keys(&[resolved]), vec![(waiting[0].run, 1)]);
}

/// Removes every index entry (as a database written before the index has none).
fn drop_the_index(dir: &std::path::Path) {
    let store = SledStore::open(dir, StoreConfig { durability: Durability::None, ..StoreConfig::default() }).unwrap();
    let old = store.aux_range(b"ix/", b"ix/\xff", usize::MAX).unwrap();
    assert!(!old.is_empty(), "the engine wrote an index");
    store.aux_apply(old.into_iter().map(|(k, _)| (k, None)).collect()).unwrap();
    store.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_index_gets_it_built_on_open() {
    let dir = tempdir();
    let (truth, open) = {
        let engine = builder(0).path(dir.path()).open().unwrap();
        seven_done_three_waiting(&engine).await;
        (engine.runs().unwrap(), engine.escalations().unwrap())
    };
    drop_the_index(dir.path());
    let engine = builder(0).path(dir.path()).open().unwrap();
    assert_eq!(engine.runs().unwrap(), truth);
    assert_eq!(engine.escalations().unwrap(), open);
    assert_eq!(open.len(), 3);
    // And it keeps working: a resolution and a new run are indexed on commit.
    engine
        .resolve(open[0].run, Resolution { decision: Decision::Abort, by: "ann".into(), reason: "checked".into() })
        .await
        .unwrap();
    engine.submit(Request::new("ok", json!({"new": true}))).await.unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(engine.runs().unwrap(), folded(&engine));
    assert_eq!(engine.escalations().unwrap().len(), 2);
}

/// Stats folded from every run's log (what `stats()` computed before the counters): the
/// oracle of the counters kept on commit.
fn stats_by_fold(engine: &Engine) -> Vec<WorkflowStats> {
    let log = engine.store();
    let mut by: BTreeMap<String, WorkflowStats> = BTreeMap::new();
    for run in log.runs().unwrap() {
        let s = load_state(log.as_ref(), run).unwrap().unwrap();
        let st = by
            .entry(s.workflow.clone())
            .or_insert_with(|| WorkflowStats { workflow: s.workflow.clone(), ..WorkflowStats::default() });
        st.runs += 1;
        *st.by_status.entry(s.status).or_insert(0) += 1;
        st.partial += u64::from(s.partial);
        let (t, u) = (&mut st.totals, &s.totals);
        t.cost_micros += u.cost_micros;
        t.tokens += u.tokens;
        t.llm_calls += u.llm_calls;
        t.tool_calls += u.tool_calls;
        t.retries += u.retries;
        t.replans += u.replans;
        t.cache_hits += u.cache_hits;
    }
    by.into_values()
        .map(|mut st| {
            st.cost_per_run_micros = st.totals.cost_micros / st.runs;
            st
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_from_the_counters_equal_a_fold_of_every_run_across_restart_and_rebuild() {
    let dir = tempdir();
    {
        let engine = builder(0).path(dir.path()).open().unwrap();
        seven_done_three_waiting(&engine).await;
        let open = engine.escalations().unwrap();
        // One waiting run aborted (failed), one cancelled, one left waiting; one accepted
        // and not driven; one completed after the others.
        let abort = Resolution { decision: Decision::Abort, by: "ann".into(), reason: "checked".into() };
        engine.resolve(open[0].run, abort).await.unwrap();
        engine.cancel(open[1].run, "ann", "not needed").await.unwrap();
        engine.run_until_idle().await.unwrap();
        engine.submit(Request::new("ok", json!({"late": 1}))).await.unwrap();
        engine.run_until_idle().await.unwrap();
        engine.submit(Request::new("ok", json!({"pending": 1}))).await.unwrap();
        let stats = engine.stats().unwrap();
        assert_eq!(stats, stats_by_fold(&engine));
        let ok = stats.iter().find(|s| s.workflow == "ok").unwrap();
        assert_eq!((ok.runs, ok.by_status.get(&RunStatus::Completed)), (9, Some(&8)));
        assert_eq!(ok.by_status.get(&RunStatus::Accepted), Some(&1));
        let esc = stats.iter().find(|s| s.workflow == "esc").unwrap();
        assert_eq!(esc.runs, 3);
        assert_eq!(esc.by_status.get(&RunStatus::AwaitingHuman), Some(&1));
        assert_eq!(esc.by_status.get(&RunStatus::Cancelled), Some(&1));
        assert!(ok.totals.cost_micros > 0);
    }
    // After a restart (the pending run is driven to its end meanwhile).
    {
        let engine = builder(0).path(dir.path()).open().unwrap();
        assert_eq!(engine.stats().unwrap(), stats_by_fold(&engine));
        engine.run_until_idle().await.unwrap();
        assert_eq!(engine.stats().unwrap(), stats_by_fold(&engine));
    }
    // After a rebuild of the index: the counters left by the old index are not counted twice.
    drop_the_index(dir.path());
    let engine = builder(0).path(dir.path()).open().unwrap();
    let stats = engine.stats().unwrap();
    assert_eq!(stats, stats_by_fold(&engine));
    assert_eq!(stats.iter().map(|s| s.runs).sum::<u64>(), 12);
    // A run removed for good (what `keel archive` writes) leaves the counts with its records.
    let log = engine.store();
    let gone = engine.runs().unwrap().into_iter().find(|r| r.status == RunStatus::Cancelled).unwrap().run;
    let aux = index_removal_writes(log.as_ref(), gone).unwrap();
    log.remove_run(gone, log.head(gone).unwrap().next_seq, Vec::new(), aux).unwrap();
    let stats = engine.stats().unwrap();
    assert_eq!(stats, stats_by_fold(&engine));
    assert_eq!(stats.iter().map(|s| s.runs).sum::<u64>(), 11);
}

/// A store that counts, per run, the reads of its log and snapshot.
struct Counting {
    inner: Arc<dyn Store>,
    reads: Mutex<BTreeMap<RunId, u64>>,
}

impl Counting {
    fn count(&self, run: RunId) {
        *self.reads.lock().unwrap().entry(run).or_insert(0) += 1;
    }
}

/// How long `Counting::put_payload` holds its thread (a slow payload store), in ms.
static PAYLOAD_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl keel_store::Payloads for Counting {
    fn put_payload(&self, bytes: &[u8]) -> Result<PayloadRef, StoreError> {
        let delay = PAYLOAD_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(delay));
        self.inner.put_payload(bytes)
    }
    fn get_payload(&self, digest: &keel_store::Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_payload(digest, bytes_max)
    }
    fn payload_digests(&self) -> Result<Vec<keel_store::Hash32>, StoreError> {
        self.inner.payload_digests()
    }
}

impl EventLog for Counting {
    fn append(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<Head, StoreError> {
        self.inner.append(run, expected, records, claim)
    }
    fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.count(run);
        self.inner.read(run, from)
    }
    fn head(&self, run: RunId) -> Result<Head, StoreError> {
        self.inner.head(run)
    }
    fn runs(&self) -> Result<Vec<RunId>, StoreError> {
        self.inner.runs()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn durability(&self) -> Durability {
        self.inner.durability()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn read_runs<'a>(&'a self, runs: &'a [RunId]) -> RunRecords<'a> {
        for r in runs {
            self.count(*r);
        }
        self.inner.read_runs(runs)
    }
    fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.count(run);
        self.inner.scan(run, from)
    }
}

impl Coordination for Counting {
    fn try_lease(&self, run: RunId, owner: &str, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        self.inner.try_lease(run, owner, ttl_ms, now_us)
    }
    fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        self.inner.renew_lease(lease, ttl_ms, now_us)
    }
    fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release_lease(lease)
    }
    fn append_fenced(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
    ) -> Result<Head, StoreError> {
        self.inner.append_fenced(run, expected, records, claim, fence)
    }
    fn lookup_key(&self, key: &[u8], now_us: i64) -> Result<Option<RunId>, StoreError> {
        self.inner.lookup_key(key, now_us)
    }
    fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<keel_store::Hash32>,
        aux: Vec<keel_store::AuxWrite>,
    ) -> Result<(), StoreError> {
        self.inner.remove_run(run, expected, payloads, aux)
    }

    fn seal_runs(&self, runs: &[RunId]) -> Result<usize, StoreError> {
        self.inner.seal_runs(runs)
    }
    fn save_snapshot(&self, run: RunId, next_seq: Seq, state: &[u8]) -> Result<(), StoreError> {
        self.inner.save_snapshot(run, next_seq, state)
    }
    fn load_snapshot(&self, run: RunId) -> Result<Option<(Seq, Vec<u8>)>, StoreError> {
        self.count(run);
        self.inner.load_snapshot(run)
    }
    fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.aux_get(key)
    }
    fn aux_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner.aux_put(key, value)
    }
    fn append_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.inner.append_with_aux(run, expected, records, claim, aux)
    }
    fn append_fenced_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.inner.append_fenced_with_aux(run, expected, records, claim, fence, aux)
    }
    fn aux_apply(&self, aux: Vec<AuxWrite>) -> Result<(), StoreError> {
        self.inner.aux_apply(aux)
    }
    fn aux_range(&self, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<keel_store::AuxEntry>, StoreError> {
        self.inner.aux_range(lo, hi, limit)
    }
    fn put_due(&self, run: RunId, due_at_us: i64) -> Result<(), StoreError> {
        self.inner.put_due(run, due_at_us)
    }
    fn remove_due(&self, run: RunId) -> Result<(), StoreError> {
        self.inner.remove_due(run)
    }
    fn due(&self, now_us: i64, limit: usize) -> Result<Vec<(RunId, i64)>, StoreError> {
        self.inner.due(now_us, limit)
    }
    fn work_queue(&self) -> Option<&dyn keel_store::WorkQueue> {
        self.inner.work_queue()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_only_the_unfinished_runs() {
    let dir = tempdir();
    {
        let engine = builder(0).path(dir.path()).open().unwrap();
        seven_done_three_waiting(&engine).await;
    }
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), StoreConfig::default()).unwrap());
    let counting = Arc::new(Counting { inner: sled, reads: Mutex::new(BTreeMap::new()) });
    let engine = builder(0).store(counting.clone()).open().unwrap();
    let all = engine.runs().unwrap();
    let (done, waiting): (Vec<_>, Vec<_>) = all.iter().partition(|r| r.status.is_terminal());
    assert_eq!((done.len(), waiting.len()), (7, 3));
    counting.reads.lock().unwrap().clear();
    // A restart: the workers resume what is not finished, and a new run completes.
    let workers = engine.start();
    let new = engine.submit(Request::new("ok", json!({"after": "restart"}))).await.unwrap().run;
    assert_eq!(engine.wait(new).await.unwrap(), RunStatus::Completed);
    workers.shutdown().await;
    let reads = counting.reads.lock().unwrap().clone();
    for r in &done {
        assert_eq!(reads.get(&r.run), None, "finished run {} was read on restart", r.run);
    }
    // Runs waiting for a human (their sink told, no default) need no driver until they
    // are resolved: a restart parks them from the index without folding them.
    for r in &waiting {
        assert_eq!(reads.get(&r.run), None, "waiting run {} was read on restart", r.run);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_escalation_listing_reads_the_index_and_a_parked_run_resumes_on_resolve() {
    let dir = tempdir();
    {
        let engine = builder(0).path(dir.path()).open().unwrap();
        seven_done_three_waiting(&engine).await;
    }
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), StoreConfig::default()).unwrap());
    let counting = Arc::new(Counting { inner: sled, reads: Mutex::new(BTreeMap::new()) });
    let engine = builder(0).store(counting.clone()).open().unwrap();
    let workers = engine.start();
    counting.reads.lock().unwrap().clear();
    // The listing is the open-escalation entries: no run's log is read.
    let pending = engine.escalations().unwrap();
    assert_eq!(pending.len(), 3);
    assert_eq!(counting.reads.lock().unwrap().clone(), BTreeMap::new());
    // The same as folding each waiting run.
    for p in &pending {
        let s = engine.state(p.run).unwrap();
        let open = s.escalations.last().unwrap();
        assert_eq!((&p.escalation, p.escalated_at_us, p.notified), (&open.escalation, open.escalated_at_us, true));
        assert_eq!(p.workflow, "esc");
    }
    // A parked run is driven again once resolved, and leaves the listing.
    let first = pending[0].run;
    let by = Resolution { decision: Decision::Abort, by: "ops".into(), reason: "card declined twice".into() };
    engine.resolve(first, by).await.unwrap();
    assert_eq!(engine.wait(first).await.unwrap(), RunStatus::Failed);
    let left: Vec<RunId> = engine.escalations().unwrap().iter().map(|p| p.run).collect();
    assert_eq!(left, pending[1..].iter().map(|p| p.run).collect::<Vec<_>>());
    workers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_returns_every_event_once_as_it_is_recorded_and_ends_with_the_run() {
    let dir = tempdir();
    let engine = builder(30).path(dir.path()).open().unwrap();
    let mut changes = engine.subscribe();
    let workers = engine.start();
    let run = engine.submit(Request::new("ok", json!({"live": 1}))).await.unwrap().run;
    // Two followers: one from the first event, one resuming after seq 1.
    let mut from_start = engine.follow(run, None);
    let mut resumed = engine.follow(run, Some(Seq(1)));
    let (mut a, mut b, mut batches) = (Vec::new(), Vec::new(), 0);
    while let Some(events) = from_start.next().await.unwrap() {
        batches += 1;
        a.extend(events);
    }
    while let Some(events) = resumed.next().await.unwrap() {
        b.extend(events);
    }
    assert_eq!(engine.wait(run).await.unwrap(), RunStatus::Completed);
    let log = engine.events(run).unwrap();
    assert_eq!(a, log);
    assert_eq!(b.as_slice(), &log[2..]);
    // The handler takes 30 ms: the tail returned events before the run was finished.
    assert!(batches > 1, "the follower got everything at once ({batches} batch)");
    // The change feed told each status change of the run, in order, ending Completed.
    let mut statuses = Vec::new();
    while statuses.last() != Some(&RunStatus::Completed) {
        match changes.recv().await.unwrap() {
            Received::Change(c) if c.run == run && c.status_changed() => statuses.push(c.status),
            Received::Change(_) => {}
            Received::Lagged(n) => panic!("lagged {n}"),
        }
    }
    assert_eq!(statuses.first(), Some(&RunStatus::Accepted));
    assert!(statuses.contains(&RunStatus::Running), "{statuses:?}");
    workers.shutdown().await;
    // A finished run's follower returns its log and ends; an unknown run is an error.
    let mut after = engine.follow(run, None);
    assert_eq!(after.next().await.unwrap().unwrap(), log);
    assert_eq!(after.next().await.unwrap(), None);
    let unknown = RunId::from_bytes([7; 16]);
    assert!(matches!(engine.follow(unknown, None).next().await, Err(EngineError::UnknownRun { .. })));
    assert!(matches!(engine.wait(unknown).await, Err(EngineError::UnknownRun { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_until_sees_the_escalation_and_wait_the_end_without_polling() {
    let dir = tempdir();
    let engine = builder(0).path(dir.path()).open().unwrap();
    let workers = engine.start();
    let run = engine.submit(Request::new("esc", json!({}))).await.unwrap().run;
    let s = engine.wait_until(run, |s| s == RunStatus::AwaitingHuman).await.unwrap();
    assert_eq!(s, RunStatus::AwaitingHuman);
    let waiter = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.wait(run).await })
    };
    engine
        .resolve(run, Resolution { decision: Decision::Abort, by: "ann".into(), reason: "checked".into() })
        .await
        .unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(30), waiter).await.unwrap().unwrap().unwrap();
    assert!(end.is_terminal(), "{end:?}");
    assert_eq!(engine.state(run).unwrap().status, end);
    workers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_parked_on_restart_gets_its_default_when_it_falls_due() {
    let dir = tempdir();
    let clock = FakeClock::at(1_800_000_000_000_000);
    let policy = || Policy {
        escalation_deadline_ms: Some(10_000),
        escalation_default: Some(Decision::Abort),
        ..Policy::default()
    };
    let waiting = {
        let engine = builder(0).path(dir.path()).clock(clock.clone()).policy(policy()).open().unwrap();
        let run = engine.submit(Request::new("esc", json!({"i": 1}))).await.unwrap().run;
        engine.run_until_idle().await.unwrap();
        assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
        run
    };
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), StoreConfig::default()).unwrap());
    let counting = Arc::new(Counting { inner: sled, reads: Mutex::new(BTreeMap::new()) });
    let engine = builder(0).store(counting.clone()).clock(clock.clone()).policy(policy()).open().unwrap();
    counting.reads.lock().unwrap().clear();
    let workers = engine.start();
    let new = engine.submit(Request::new("ok", json!({"after": "restart"}))).await.unwrap().run;
    assert_eq!(engine.wait(new).await.unwrap(), RunStatus::Completed);
    // Parked from its index entry: not read, not driven, still waiting.
    assert_eq!(counting.reads.lock().unwrap().get(&waiting), None);
    // Its default falls due: the workers drive it, and the default is recorded.
    clock.advance_ms(10_001);
    engine.wait(waiting).await.unwrap();
    let defaulted = engine.events(waiting).unwrap().into_iter().any(|e| {
        matches!(&e.event, Event::HumanResolved { by, defaulted: true, decision: Decision::Abort, .. } if by == "deadline")
    });
    assert!(defaulted, "the deadline's default was not applied");
    workers.shutdown().await;
}

/// A driver's step that holds its thread longer than the lease's time-to-live (here a
/// slow payload store: a 20 KB output is stored as a payload while the answer is staged)
/// must not lose the lease of a live driver: the heartbeat is a task of its own. Before,
/// it was polled by the driver's own task and waited for the step, so the lease expired
/// and the drive stopped (`drives_lost` 1; seen with 8 outputs of 1 MB under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_lease_does_not_lose_it() {
    let dir = tempdir();
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), StoreConfig::default()).unwrap());
    let counting = Arc::new(Counting { inner: sled, reads: Mutex::new(BTreeMap::new()) });
    // `t`'s answer holds the driver's thread (its output goes to the slow payload store);
    // `u` after it keeps the drive going while the heartbeat would renew.
    let tasks = vec![task("t", TaskKind::Tool, "big", &[]), task("u", TaskKind::Tool, "slow", &["t"])];
    let big = workflow("big", planner(vec![plan(tasks)]), pass_evaluator());
    let engine = Engine::builder()
        .store(counting)
        .workflow(big)
        .handler(
            "big",
            handler(|_| Ok(TaskOutput { output: json!({"text": "x".repeat(20_000)}), usage: Usage::default() })),
        )
        .handler("slow", slow_handler(300, |_| Ok(TaskOutput { output: json!({"ok": true}), usage: Usage::default() })))
        .lease_ttl_ms(90)
        .open()
        .unwrap();
    PAYLOAD_DELAY_MS.store(400, std::sync::atomic::Ordering::Relaxed);
    let run = engine.submit(Request::new("big", json!({}))).await.unwrap().run;
    let report = engine.run_until_idle().await;
    PAYLOAD_DELAY_MS.store(0, std::sync::atomic::Ordering::Relaxed);
    let report = report.unwrap();
    assert_eq!(engine.lease_stats().drives_lost, 0, "{:?}", engine.lease_stats());
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(engine.state(run).unwrap().status, RunStatus::Completed);
}

/// A run whose records reached the store outside an engine's journal and were never
/// re-indexed (a `keel copy` cut between its copy and its re-index), then finished by the
/// engine here: every listing shows it, the workflow-only one too (the run index writes the
/// by-workflow key with a run's first append and with the one that finishes it, not with
/// every status change; with the first only, this run was missing from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_copied_without_its_index_and_then_finished_is_listed_by_workflow() {
    let src: Arc<keel_store::MemStore> = Arc::new(keel_store::MemStore::new());
    let a = builder(0).store(src.clone()).open().unwrap();
    let run = a.submit(Request::new("ok", json!({}))).await.unwrap().run;
    let dst: Arc<keel_store::MemStore> = Arc::new(keel_store::MemStore::new());
    let b = builder(0).store(dst.clone()).open().unwrap();
    let records: Vec<NewRecord> = src
        .read(run, Seq(0))
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            NewRecord {
                kind: r.kind,
                time_us: r.time_us,
                payload_version: r.payload_version,
                payload: r.payload,
                payload_root: r.payload_root,
            }
        })
        .collect();
    dst.append(run, Seq(0), records, None).unwrap();
    b.cancel(run, "ann", "copied, then cancelled here").await.unwrap();
    let listed = |status: Option<RunStatus>, workflow: Option<&str>| {
        let filter = RunFilter { status, workflow: workflow.map(str::to_owned) };
        b.runs_page(&filter, None, 10).unwrap().runs.iter().map(|r| r.run).collect::<Vec<_>>()
    };
    assert_eq!(listed(None, None), vec![run]);
    assert_eq!(listed(Some(RunStatus::Cancelled), None), vec![run]);
    assert_eq!(listed(Some(RunStatus::Cancelled), Some("ok")), vec![run]);
    assert_eq!(listed(None, Some("ok")), vec![run], "missing from the workflow-only listing");
}
