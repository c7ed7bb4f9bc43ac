//! What only a shared database shows: migrations, fencing under the lease row's lock,
//! writers in two store handles (two sessions, as two processes) racing on one run, a
//! session ended by the server in the middle of an append, acknowledged appends surviving
//! a SIGKILL of the writing process, the seam called from inside a runtime, group commit,
//! and the stored bytes being sled's. Each test works in fresh schemas it drops; without a
//! server each says it was skipped (and fails under CI=true or KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{ready, Admin, Scratch};
use keel_store::{
    Coordination, Durability, EventLog, Level, Limits, Payloads, RunId, Seq, SledStore, StoreConfig, StoreError,
};
use keel_store_conformance::{rec, Ev};
use keel_store_postgres::{OpenError, PgConfig, PgError, PgStore, SCHEMA_VERSION};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const DURABLE: Durability = Durability::GroupCommit(Level::PowerLoss);

fn run(n: u8) -> RunId {
    RunId::from_bytes([n; 16])
}

/// Two store handles on one fresh schema of `scratch`: two sessions, as two processes.
fn two_handles(scratch: &Scratch) -> (PgStore, PgStore) {
    let cfg = scratch.config();
    (PgStore::open(cfg.clone()).unwrap(), PgStore::open(cfg).unwrap())
}

/// Two handles on the scratch schema, and when the second heard a wake (a notification of
/// the queue), once its listener is up.
fn listening_pair(scratch: &Scratch) -> (PgStore, PgStore, Arc<std::sync::Mutex<Vec<Instant>>>) {
    let (a, b) = two_handles(scratch);
    let heard = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let h = heard.clone();
    keel_store::WorkQueue::on_wake(&b, Box::new(move || h.lock().unwrap().push(Instant::now())));
    let deadline = Instant::now() + Duration::from_secs(20);
    while heard.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the listener of the second handle did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (a, b, heard)
}

/// Polls with `watcher` until a session waits on a lock `holder` holds (so tests running
/// at once cannot mistake each other's sessions); returns its pid. Panics after 20 s.
fn wait_for_a_session_blocked_by(holder_pid: i32, watcher: &Admin) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = watcher.rows(&format!(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'keel' AND {holder_pid} = ANY(pg_blocking_pids(pid))"
        ));
        if let Some(row) = rows.first() {
            return row.get(0);
        }
        assert!(Instant::now() < deadline, "no keel session ever waited on the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Begins a transaction in `admin` that inserts a head row for `run` (next seq 1) and
/// leaves it uncommitted: a flush creating the run waits for it.
fn begin_a_head_row(admin: &Admin, schema: &str, run: RunId) {
    admin.exec(&format!(
        "BEGIN; INSERT INTO {schema}.heads VALUES ('{}', 1, '\\x{}'::bytea, 'Planned')",
        run.0,
        "ab".repeat(32)
    ));
}

/// An append at seq 0 that lost to [`begin_a_head_row`]'s row: a conflict at seq 1.
fn conflicts_at_the_created_row(appended: Result<keel_store::Head, StoreError>) {
    match appended {
        Err(StoreError::Conflict { expected, actual, .. }) => assert_eq!((expected, actual), (Seq(0), Seq(1))),
        other => panic!("expected Conflict, got {other:?}"),
    }
}

fn io_kind_and_pg(e: &StoreError) -> (std::io::ErrorKind, Option<PgError>) {
    match e {
        StoreError::Io(io) => (io.kind(), io.get_ref().and_then(|i| i.downcast_ref::<PgError>()).cloned()),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn open_creates_and_migrates_a_fresh_schema_and_reopens_it_unchanged() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg.clone()).unwrap();
    store.append(run(1), Seq(0), vec![rec(0)], None).unwrap();
    drop(store);
    let admin = Admin::connect().unwrap();
    let versions = |admin: &Admin| -> Vec<i32> {
        admin
            .rows(&format!("SELECT version FROM {schema}.schema_version ORDER BY version"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(versions(&admin), (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    let tables = admin.int(&format!(
        "SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}' AND tablename IN \
         ('events', 'heads', 'claims', 'leases', 'snapshots', 'aux', 'due')"
    ));
    assert_eq!(tables, 7);
    // Reopened (also without `create`): nothing re-applied, the data is there.
    let store = PgStore::open(PgConfig { create: false, ..cfg }).unwrap();
    assert_eq!(versions(&admin), (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    assert_eq!(store.head(run(1)).unwrap().next_seq, Seq(1));
}

#[test]
fn a_schema_migrated_by_a_newer_build_is_refused_and_left_untouched() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    drop(PgStore::open(cfg.clone()).unwrap());
    let admin = Admin::connect().unwrap();
    let newer = SCHEMA_VERSION + 1;
    admin.exec(&format!("INSERT INTO {schema}.schema_version (version) VALUES ({newer})"));
    match PgStore::open(cfg) {
        Err(OpenError::SchemaTooNew { schema: s, found, supported }) => {
            assert_eq!((s, found, supported), (schema.clone(), newer, SCHEMA_VERSION));
        }
        Err(other) => panic!("expected SchemaTooNew, got {other}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.schema_version")), i64::from(newer));
}

#[test]
fn open_without_create_finds_no_store_in_an_empty_schema() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = PgConfig { create: false, ..scratch.config() };
    let schema = cfg.schema.clone();
    assert!(matches!(PgStore::open(cfg), Err(OpenError::NotFound { schema: s }) if s == schema));
}

#[test]
fn bad_settings_are_refused_before_connecting() {
    // No server needed: every setting is checked before the first connection.
    let base = PgConfig::new("postgres://nobody@127.0.0.1:1/none");
    let refused = |cfg: PgConfig| match PgStore::open(cfg) {
        Err(OpenError::InvalidConfig { reason }) => reason,
        Err(OpenError::Limits(StoreError::InvalidConfig { reason })) => reason,
        Err(other) => panic!("expected InvalidConfig, got {other}"),
        Ok(_) => panic!("opened"),
    };
    assert!(refused(PgConfig { schema: "Bad-Name".into(), ..base.clone() }).contains("schema"));
    assert!(refused(PgConfig { pool_size: 0, ..base.clone() }).contains("pool_size"));
    assert!(refused(PgConfig { read_page_records: 0, ..base.clone() }).contains("read_page_records"));
    let limits = Limits { event_bytes_max: Limits::VALUE_BYTES_HARD_MAX + 1, ..Limits::default() };
    assert!(refused(PgConfig { limits, ..base.clone() }).contains("event_bytes_max"));
    assert!(refused(PgConfig { url: "not a url at all=".into(), ..base }).contains("invalid connection string"));
}

/// The fence is checked under the lease row's lock inside the append's transaction: an
/// append racing a takeover that is not yet committed waits for it, then is refused.
/// (Checked before the transaction, or without the lock, it would see the old epoch and
/// write.)
#[test]
fn a_fenced_append_racing_a_takeover_waits_for_it_and_is_refused_and_counted() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let (store, schema) = scratch.open_shared();
    let r = run(1);
    let a = store.try_lease(r, "a", 60_000, 0).unwrap().unwrap();
    store.append_fenced(r, Seq(0), vec![rec(0)], None, a.fence()).unwrap();
    let admin = Admin::connect().unwrap();
    let watcher = Admin::connect().unwrap();
    admin.exec(&format!("BEGIN; UPDATE {schema}.leases SET owner = 'b', epoch = epoch + 1 WHERE run = '{}'", r.0));
    let (s, fence) = (store.clone(), a.fence());
    let racing = std::thread::spawn(move || s.append_fenced(r, Seq(1), vec![rec(1)], None, fence));
    wait_for_a_session_blocked_by(admin.pid(), &watcher);
    admin.exec("COMMIT");
    match racing.join().unwrap() {
        Err(StoreError::Fenced { run, fence, current }) => {
            assert_eq!((run, fence, current), (r, a.epoch(), a.epoch() + 1))
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(store.stats().fenced_refusals, 1);
    assert_eq!(store.head(r).unwrap().next_seq, Seq(1));
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.events")), 1, "the refused append wrote nothing");
}

/// Two handles on one schema are two sessions, as two worker processes would be: a holder
/// whose lease expired and was taken over by the other cannot write, and each refusal is
/// counted where it happened.
#[test]
fn a_worker_paused_past_its_lease_cannot_write_after_another_took_over() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let (w1, w2) = two_handles(&scratch);
    let r = run(2);
    let l1 = w1.try_lease(r, "w1", 1_000, 0).unwrap().unwrap();
    w1.append_fenced(r, Seq(0), vec![rec(0)], None, l1.fence()).unwrap();
    assert!(w2.try_lease(r, "w2", 1_000, 999_999).unwrap().is_none(), "held until it expires");
    let l2 = w2.try_lease(r, "w2", 1_000, 1_000_000).unwrap().expect("expired: taken over");
    assert!(l2.epoch() > l1.epoch());
    w2.append_fenced(r, Seq(1), vec![rec(1)], None, l2.fence()).unwrap();
    for seq in [1u64, 2] {
        assert!(matches!(
            w1.append_fenced(r, Seq(seq), vec![rec(9)], None, l1.fence()),
            Err(StoreError::Fenced { fence, current, .. }) if fence == l1.epoch() && current == l2.epoch()
        ));
    }
    assert!(w1.renew_lease(&l1, 1_000, 1_000_001).unwrap().is_none(), "the lost lease does not come back");
    assert_eq!((w1.stats().fenced_refusals, w2.stats().fenced_refusals), (2, 0));
    assert_eq!(w2.head(r).unwrap().next_seq, Seq(2));
    // Dropping the lost lease releases nothing; dropping the holder's frees the run.
    drop(l1);
    assert!(w1.try_lease(r, "w1", 1_000, 1_000_002).unwrap().is_none());
    drop(l2);
    assert!(w1.try_lease(r, "w1", 1_000, 1_000_003).unwrap().is_some());
    keel_store::verify_run::<Ev>(&w1, r).unwrap();
}

/// The awaited appends (`Coordination::async_appends`, the engine's path on PostgreSQL)
/// are the blocking ones' twins: the same head, a stale seq a `Conflict`, a stale fence
/// `Fenced` and counted, a refused append nothing written, and the same chain.
#[test]
fn awaited_appends_answer_as_the_blocking_ones() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let (w1, w2) = two_handles(&scratch);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let a = w1.async_appends().expect("PostgreSQL offers awaited appends");
    let r = run(3);
    rt.block_on(async {
        let head = a.append_async(r, Seq(0), vec![rec(0), rec(1)], None, None, Vec::new()).await.unwrap();
        assert_eq!(head.next_seq, Seq(2));
        let stale = a.append_async(r, Seq(1), vec![rec(9)], None, None, Vec::new()).await;
        assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
        let l1 = w1.try_lease(r, "w1", 1_000, 0).unwrap().unwrap();
        let aux = vec![(b"k".to_vec(), Some(b"v".to_vec()))];
        a.append_async(r, Seq(2), vec![rec(2)], None, Some(l1.fence()), aux).await.unwrap();
        assert_eq!(w1.aux_get(b"k").unwrap(), Some(b"v".to_vec()), "the aux write is in the append's step");
        let l2 = w2.try_lease(r, "w2", 1_000, 1_000_000).unwrap().expect("expired: taken over");
        let fenced = a.append_async(r, Seq(3), vec![rec(3)], None, Some(l1.fence()), Vec::new()).await;
        assert!(
            matches!(fenced, Err(StoreError::Fenced { fence, current, .. }) if fence == l1.epoch() && current == l2.epoch()),
            "{fenced:?}"
        );
        drop((l1, l2));
    });
    assert_eq!(w1.stats().fenced_refusals, 1);
    assert_eq!(w2.head(r).unwrap().next_seq, Seq(3), "nothing of the refused appends written");
    keel_store::verify_run::<Ev>(&w2, r).unwrap();
}

/// Writers in two handles (two sessions each) race for every seq of one run, the first
/// creating the run: each seq is won exactly once, every loser gets `Conflict`, and the
/// log has no gap and no duplicate.
#[test]
fn writers_in_two_handles_racing_on_one_run_win_each_seq_once() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let handles = [Arc::new(PgStore::open(cfg.clone()).unwrap()), Arc::new(PgStore::open(cfg).unwrap())];
    let r = run(3);
    const SLOTS: u64 = 60;
    const WRITERS: usize = 4;
    for slot in 0..SLOTS {
        let barrier = Arc::new(Barrier::new(WRITERS));
        let results: Vec<Result<_, StoreError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (store, barrier) = (handles[w % 2].clone(), barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        store.append(r, Seq(slot), vec![rec(slot * 10 + w as u64)], None)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|x| x.is_ok()).count(), 1, "slot {slot}: {results:?}");
        for e in results.iter().filter_map(|x| x.as_ref().err()) {
            assert!(
                matches!(e, StoreError::Conflict { expected, actual, .. } if *expected == Seq(slot) && *actual == Seq(slot + 1)),
                "slot {slot}: {e:?}"
            );
        }
    }
    let admin = Admin::connect().unwrap();
    let seqs: Vec<i64> =
        admin.rows(&format!("SELECT seq FROM {schema}.events ORDER BY seq")).iter().map(|x| x.get(0)).collect();
    assert_eq!(seqs, (0..SLOTS as i64).collect::<Vec<_>>(), "no gap, no duplicate");
    for h in &handles {
        assert_eq!(keel_store::verify_run::<Ev>(&**h, r).unwrap().records, SLOTS);
    }
}

/// The server ends the store's session while an append's transaction waits on a lock: the
/// append fails with a typed lost-connection error, nothing of it is written, and the next
/// append (on a fresh session) succeeds.
#[test]
fn a_session_ended_mid_transaction_is_a_typed_error_writes_nothing_and_the_store_recovers() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
    let (r, other) = (run(4), run(5));
    // Created by another handle: `store` does not know the head, so its append below
    // locks and reads first (the transaction of the locking way, ended mid-way).
    PgStore::open(cfg).unwrap().append(r, Seq(0), vec![rec(0)], None).unwrap();
    let admin = Admin::connect().unwrap();
    let watcher = Admin::connect().unwrap();
    admin.exec(&format!("BEGIN; SELECT * FROM {schema}.heads WHERE run = '{}' FOR UPDATE", r.0));
    let s = store.clone();
    let blocked = std::thread::spawn(move || s.append(r, Seq(1), vec![rec(1), rec(2)], None));
    let pid = wait_for_a_session_blocked_by(admin.pid(), &watcher);
    watcher.exec(&format!("SELECT pg_terminate_backend({pid})"));
    let err = blocked.join().unwrap().unwrap_err();
    let (kind, pg) = io_kind_and_pg(&err);
    assert_eq!(kind, std::io::ErrorKind::ConnectionAborted, "{err}");
    assert!(matches!(pg, Some(PgError::ConnectionLost { .. })), "{err}");
    admin.exec("ROLLBACK");
    assert_eq!(store.head(r).unwrap().next_seq, Seq(1));
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.events WHERE run = '{}'", r.0)), 1);
    // Recovered: the same append now goes through, and so does another run's.
    assert_eq!(store.append(r, Seq(1), vec![rec(1), rec(2)], None).unwrap().next_seq, Seq(3));
    store.append(other, Seq(0), vec![rec(0)], None).unwrap();
    keel_store::verify_run::<Ev>(&*store, r).unwrap();

    // Now `store` knows the head: its flush is one statement, its own transaction, so a
    // session ended while it waits is in doubt (it may have committed); here it had not.
    let fast_before = store.stats().one_statement_flushes;
    admin.exec(&format!("BEGIN; SELECT * FROM {schema}.heads WHERE run = '{}' FOR UPDATE", r.0));
    let s = store.clone();
    let blocked = std::thread::spawn(move || s.append(r, Seq(3), vec![rec(3)], None));
    let pid = wait_for_a_session_blocked_by(admin.pid(), &watcher);
    watcher.exec(&format!("SELECT pg_terminate_backend({pid})"));
    let err = blocked.join().unwrap().unwrap_err();
    let (kind, pg) = io_kind_and_pg(&err);
    assert_eq!(kind, std::io::ErrorKind::ConnectionAborted, "{err}");
    assert!(matches!(pg, Some(PgError::InDoubt { .. })), "{err}");
    assert_eq!(store.stats().one_statement_flushes, fast_before + 1);
    admin.exec("ROLLBACK");
    assert_eq!(store.head(r).unwrap().next_seq, Seq(3), "read the head: not written");
    assert_eq!(store.append(r, Seq(3), vec![rec(3)], None).unwrap().next_seq, Seq(4));
    keel_store::verify_run::<Ev>(&*store, r).unwrap();
}

/// The seam is synchronous: it works from a plain thread, from a multi-thread runtime
/// under `block_in_place` and `spawn_blocking`, and the store (and a lease) can be dropped
/// inside a runtime's task without a panic; with the store's runtime on one thread and on
/// two (`PgConfig::io_threads`: its default depends on the machine's cores).
#[test]
fn the_store_is_called_from_plain_threads_and_from_inside_a_runtime() {
    if !ready() {
        return;
    }
    for io_threads in [1, 2] {
        called_from_plain_threads_and_from_inside_a_runtime(io_threads);
    }
}

fn called_from_plain_threads_and_from_inside_a_runtime(io_threads: usize) {
    let scratch = Scratch::new(DURABLE);
    let store = Arc::new(PgStore::open(PgConfig { io_threads, ..scratch.config() }).unwrap());
    let s = store.clone();
    std::thread::spawn(move || s.append(run(1), Seq(0), vec![rec(0)], None).unwrap()).join().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let second = PgConfig { io_threads, ..scratch.config() };
    rt.block_on(async {
        let s = store.clone();
        tokio::task::block_in_place(|| {
            s.append(run(1), Seq(1), vec![rec(1)], None).unwrap();
            assert_eq!(s.read(run(1), Seq(0)).unwrap().count(), 2);
        });
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.append(run(1), Seq(2), vec![rec(2)], None).unwrap()).await.unwrap();
        let s = store.clone();
        let handle = tokio::spawn(async move {
            let lease = tokio::task::block_in_place(|| s.try_lease(run(1), "task", 60_000, 0).unwrap().unwrap());
            drop(lease); // released from inside the task
            tokio::task::block_in_place(|| s.try_lease(run(1), "again", 60_000, 1).unwrap().is_some())
        });
        assert!(handle.await.unwrap(), "the dropped lease was released");
        let inner = tokio::task::block_in_place(|| PgStore::open(second).unwrap());
        tokio::task::block_in_place(|| inner.append(run(2), Seq(0), vec![rec(0)], None).unwrap());
        drop(inner); // dropped in async context: must not panic
    });
    drop(rt);
    assert_eq!(store.head(run(1)).unwrap().next_seq, Seq(3));
}

/// Concurrent appends of different runs share transactions: fewer flushes than appends,
/// and every append is there.
#[test]
fn concurrent_appends_of_different_runs_share_one_transaction_per_flush() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let store = Arc::new(scratch.open());
    const THREADS: u8 = 16;
    const EACH: u64 = 20;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..EACH {
                    store.append(run(t), Seq(i), vec![rec(i)], None).unwrap();
                }
            });
        }
    });
    let stats = store.stats();
    assert_eq!(stats.appends, u64::from(THREADS) * EACH);
    assert!(stats.flushes < stats.appends, "{stats:?}: no transaction was shared");
    eprintln!("group commit: {} appends in {} flushes", stats.appends, stats.flushes);
    for t in 0..THREADS {
        assert_eq!(keel_store::verify_run::<Ev>(&*store, run(t)).unwrap().records, EACH);
    }
}

/// `EveryAppend` commits each append alone.
#[test]
fn every_append_commits_alone() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(Durability::EveryAppend(Level::PowerLoss));
    let store = Arc::new(scratch.open());
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..10 {
                    store.append(run(t), Seq(i), vec![rec(i)], None).unwrap();
                }
            });
        }
    });
    let stats = store.stats();
    assert_eq!((stats.appends, stats.flushes), (40, 40));
}

/// The stored record values are the bytes sled stores for the same appends, and the heads
/// agree: exports, verify and replay read the same on either backend.
#[test]
fn records_are_stored_as_the_bytes_sled_stores() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let pg = PgStore::open(cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(dir.path(), StoreConfig::default()).unwrap();
    let r = run(6);
    for (from, n) in [(0u64, 1u64), (1, 5), (6, 2)] {
        let batch = || (from..from + n).map(rec).collect::<Vec<_>>();
        assert_eq!(pg.append(r, Seq(from), batch(), None).unwrap(), sled.append(r, Seq(from), batch(), None).unwrap());
    }
    let admin = Admin::connect().unwrap();
    let rows = admin.rows(&format!("SELECT seq, value FROM {schema}.events WHERE run = '{}' ORDER BY seq", r.0));
    assert_eq!(rows.len(), 8);
    for row in rows {
        let (seq, value): (i64, Vec<u8>) = (row.get(0), row.get(1));
        assert_eq!(Some(value), sled.raw_get(r, Seq(seq as u64)).unwrap(), "seq {seq}");
    }
    assert_eq!(pg.head(r).unwrap(), sled.head(r).unwrap());
}

/// A record altered or removed behind the store's back is named by `read` and `verify`.
#[test]
fn rows_altered_behind_the_store_are_named_by_read_and_verify() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg).unwrap();
    let (altered, removed) = (run(7), run(8));
    for r in [altered, removed] {
        store.append(r, Seq(0), (0..6).map(rec).collect(), None).unwrap();
    }
    let admin = Admin::connect().unwrap();
    // Flip the last byte of record 3 (inside its hash: the CRC no longer matches).
    admin.exec(&format!(
        "UPDATE {schema}.events SET value = overlay(value placing set_byte('\\x00'::bytea, 0, get_byte(value, length(value) - 1) # 1) \
         from length(value) for 1) WHERE run = '{}' AND seq = 3",
        altered.0
    ));
    admin.exec(&format!("DELETE FROM {schema}.events WHERE run = '{}' AND seq = 2", removed.0));
    let first_error = |r| store.read(r, Seq(0)).unwrap().find_map(Result::err).unwrap();
    assert!(matches!(first_error(altered), StoreError::Corrupted { seq: Seq(3), .. }));
    assert!(matches!(first_error(removed), StoreError::Corrupted { seq: Seq(2), .. }));
    assert!(keel_store::verify_run::<Ev>(&store, altered).is_err());
    assert!(keel_store::verify_run::<Ev>(&store, removed).is_err());
}

/// Reads fetch a bounded page of records per query and still yield the whole run.
#[test]
fn reads_are_paged_and_yield_the_whole_run() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let store = PgStore::open(PgConfig { read_page_records: 3, ..scratch.config() }).unwrap();
    let r = run(9);
    store.append(r, Seq(0), (0..10).map(rec).collect(), None).unwrap();
    for from in [0u64, 1, 3, 4, 9, 10] {
        let seqs: Vec<u64> = store.read(r, Seq(from)).unwrap().map(|x| x.unwrap().seq.0).collect();
        assert_eq!(seqs, (from..10).collect::<Vec<_>>(), "from {from}");
    }
    assert_eq!(keel_store::verify_run::<Ev>(&store, r).unwrap().records, 10);
}

/// The writer is a child process appending to four runs and printing each acknowledged
/// append; it is killed with SIGKILL mid-stream. Every acknowledged append is in the
/// database and every run's chain verifies: with group commit (commits wait for the WAL
/// flush), and with `Durability::None` (commits do not wait for it, but have returned from
/// the server, which outlives the killed client).
#[test]
fn acknowledged_appends_survive_a_sigkill_of_the_writing_process() {
    if let Ok(schema) = std::env::var("KEEL_PG_CHILD_SCHEMA") {
        let durability = if std::env::var("KEEL_PG_CHILD_ASYNC").is_ok() { Durability::None } else { DURABLE };
        return child_writer(schema, durability);
    }
    if !ready() {
        return;
    }
    for durability in [DURABLE, Durability::None] {
        kill_a_writer_and_check(durability);
    }
}

fn kill_a_writer_and_check(durability: Durability) {
    use std::io::BufRead;
    let scratch = Scratch::new(durability);
    let cfg = scratch.config();
    drop(PgStore::open(cfg.clone()).unwrap());
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "acknowledged_appends_survive_a_sigkill_of_the_writing_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KEEL_PG_CHILD_SCHEMA", &cfg.schema)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if durability == Durability::None {
        command.env("KEEL_PG_CHILD_ASYNC", "1");
    }
    let mut child = command.spawn().unwrap();
    let mut acked: Vec<(u8, u64)> = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("ack ") {
            let (r, s) = rest.split_once(' ').unwrap();
            acked.push((r.parse().unwrap(), s.parse().unwrap()));
        }
        if acked.len() >= 400 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(acked.len() >= 400, "{durability:?}: the child stopped early");
    let store = PgStore::open(PgConfig { create: false, ..cfg }).unwrap();
    for (r, seq) in &acked {
        assert!(store.head(run(*r)).unwrap().next_seq.0 > *seq, "{durability:?}: acknowledged run {r} seq {seq} lost");
    }
    for r in 1..=4 {
        keel_store::verify_run::<Ev>(&store, run(r)).unwrap();
    }
}

fn child_writer(schema: String, durability: Durability) {
    let store = Arc::new(PgStore::open(PgConfig { schema, durability, ..PgConfig::new(common::url()) }).unwrap());
    std::thread::scope(|s| {
        for r in 1..=4u8 {
            let store = store.clone();
            s.spawn(move || {
                for seq in 0..100_000u64 {
                    store.append(run(r), Seq(seq), vec![rec(seq)], None).unwrap();
                    println!("ack {r} {seq}");
                }
            });
        }
    });
}

/// Another session creates the run (or claims the key) that a flush is creating, and
/// commits while the flush waits on its row: the flush rolls back, retries the append in
/// a transaction of its own, and the append gets `Conflict` (or `DuplicateKey`) instead
/// of an error, writing nothing.
#[test]
fn a_run_or_key_created_by_another_session_during_a_flush_is_a_conflict_or_a_duplicate() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let (store, schema) = scratch.open_shared();
    let admin = Admin::connect().unwrap();
    let watcher = Admin::connect().unwrap();
    let (r, holder, claimer) = (run(10), run(11), run(12));

    begin_a_head_row(&admin, &schema, r);
    let s = store.clone();
    let creating = std::thread::spawn(move || s.append(r, Seq(0), vec![rec(0)], None));
    wait_for_a_session_blocked_by(admin.pid(), &watcher);
    admin.exec("COMMIT");
    conflicts_at_the_created_row(creating.join().unwrap());

    admin.exec(&format!(
        "BEGIN; INSERT INTO {schema}.claims VALUES ('\\x6b6579'::bytea, '{}', {})",
        holder.0,
        i64::MAX
    ));
    let s = store.clone();
    let claim = keel_store::Claim { key: b"key".to_vec(), now_us: 0, expires_at_us: 1_000 };
    let claiming = std::thread::spawn(move || s.append(claimer, Seq(0), vec![rec(0)], Some(claim)));
    wait_for_a_session_blocked_by(admin.pid(), &watcher);
    admin.exec("COMMIT");
    assert!(matches!(claiming.join().unwrap(), Err(StoreError::DuplicateKey { existing }) if existing == holder));
    assert_eq!(store.head(claimer).unwrap().next_seq, Seq(0), "the refused append wrote nothing");
    assert!(store.stats().raced_flushes >= 2, "{:?}", store.stats());
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.events")), 0);
}

/// A schema at an older version is brought up to this build's at open, keeping its data:
/// here one at version 1 (before the payload tables) gets migration 2.
#[test]
fn a_schema_at_an_older_version_is_migrated_at_open_and_keeps_its_data() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg.clone()).unwrap();
    store.append(run(1), Seq(0), vec![rec(0)], None).unwrap();
    drop(store);
    let admin = Admin::connect().unwrap();
    admin.exec(&format!(
        "DROP TABLE {schema}.payloads, {schema}.payload_manifests, {schema}.work, {schema}.tokens, {schema}.counters;
         DELETE FROM {schema}.schema_version WHERE version >= 2"
    ));
    let store = PgStore::open(PgConfig { create: false, ..cfg }).unwrap();
    assert_eq!(
        admin.int(&format!("SELECT max(version)::bigint FROM {schema}.schema_version")),
        i64::from(SCHEMA_VERSION)
    );
    assert_eq!(store.head(run(1)).unwrap().next_seq, Seq(1));
    let r = store.put_payload(b"after the upgrade").unwrap();
    assert_eq!(store.get_payload(&r.digest, 100).unwrap().as_deref(), Some(b"after the upgrade".as_slice()));
}

/// Payload chunks altered or removed in the table are `CorruptPayload` naming the digest,
/// never other bytes; two handles putting the same bytes at once store one copy.
#[test]
fn payloads_are_checked_on_read_and_stored_once_across_handles() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let handles = [Arc::new(PgStore::open(cfg.clone()).unwrap()), Arc::new(PgStore::open(cfg).unwrap())];
    let bytes: Vec<u8> = (0..3 * keel_store::PAYLOAD_CHUNK_BYTES + 5).map(|i| (i % 251) as u8).collect();
    let barrier = Arc::new(Barrier::new(2));
    let refs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = handles
            .iter()
            .map(|h| {
                let (h, barrier, bytes) = (h.clone(), barrier.clone(), &bytes);
                s.spawn(move || {
                    barrier.wait();
                    h.put_payload(bytes).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(refs[0], refs[1]);
    let admin = Admin::connect().unwrap();
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.payload_manifests")), 1);
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.payloads")), 4);
    let d = refs[0].digest;
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(handles[1].get_payload(&d, bytes.len()).unwrap(), Some(bytes.clone()));
    admin.exec(&format!(
        "UPDATE {schema}.payloads SET bytes = overlay(bytes placing '\\xff'::bytea from 10 for 1) \
         WHERE digest = '\\x{hex}'::bytea AND chunk = 1"
    ));
    assert!(
        matches!(handles[0].get_payload(&d, bytes.len()), Err(StoreError::CorruptPayload { digest, .. }) if digest == hex)
    );
    admin.exec(&format!("DELETE FROM {schema}.payloads WHERE digest = '\\x{hex}'::bytea AND chunk = 2"));
    match handles[0].get_payload(&d, bytes.len()) {
        Err(StoreError::CorruptPayload { reason, .. }) => {
            assert!(reason.contains("chunk 1") || reason.contains("chunk 2"), "{reason}")
        }
        other => panic!("expected CorruptPayload, got {other:?}"),
    }
    assert!(keel_store::verify_payloads(&*handles[0]).is_err());
}

/// `flush` returns only when the WAL on disk holds every commit made before it, also the
/// commits that did not wait for a flush (`synchronous_commit = off`, as the work queue's
/// bookkeeping and the `None` levels commit). A flush that only took a transaction id
/// (`txid_current()`) wrote no WAL, so its commit did not wait either: the WAL on disk was
/// behind such a commit when it returned.
#[test]
fn flush_waits_until_the_wal_on_disk_holds_every_earlier_commit_also_asynchronous_ones() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let store = scratch.open();
    let schema = scratch.fresh_schema();
    let admin = Admin::connect().unwrap();
    admin.exec(&format!("CREATE SCHEMA {schema}; CREATE TABLE {schema}.probe (n int)"));
    admin.exec("SET synchronous_commit = off");
    let lsn = |f: &str| admin.int(&format!("SELECT ({f}() - '0/0'::pg_lsn)::bigint"));
    for i in 0..20 {
        admin.exec(&format!("INSERT INTO {schema}.probe VALUES ({i})"));
        let committed = lsn("pg_current_wal_insert_lsn");
        store.flush().unwrap();
        let on_disk = lsn("pg_current_wal_flush_lsn");
        assert!(on_disk >= committed, "round {i}: the WAL on disk ends at {on_disk}, before a commit at {committed}");
    }
}

/// Counters live in shards (schema migration 4): a read sums a counter's shards, a listing
/// shows it once with the sum, a removal or a plain put replaces every shard; a schema at
/// version 3, whose counters are rows of `aux`, is migrated with their values.
#[test]
fn counters_are_summed_over_their_shards_and_a_version_3_schema_brings_its_counters_along() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg.clone()).unwrap();
    let key = |k: &[u8]| [keel_store::COUNTER_PREFIX, k].concat();
    let get = |s: &PgStore, k: &[u8]| s.aux_get(&key(k)).unwrap().map(|v| keel_store::counter_value(&v));
    store.append_with_aux(run(1), Seq(0), vec![rec(0)], None, vec![keel_store::counter_add(b"c/a", 7)]).unwrap();
    let admin = Admin::connect().unwrap();
    // Two more shards of `c/a`, as other sessions' adds leave them.
    admin.exec(&format!(
        "INSERT INTO {schema}.counters (key, shard, value) VALUES ('\\x236e2f632f61', 64, 5), ('\\x236e2f632f61', 65, -2)"
    ));
    assert_eq!(get(&store, b"c/a"), Some(10));
    store.aux_put(b"c/plain", b"p").unwrap();
    let listed = store.aux_range(b"", b"\xff", 10).unwrap();
    assert_eq!(
        listed,
        vec![(key(b"c/a"), 10i64.to_be_bytes().to_vec()), (b"c/plain".to_vec(), b"p".to_vec())],
        "one entry per counter, with the sum, in key order among the plain entries"
    );
    // A plain put replaces the counter (every shard), a counter add folds it back in.
    store.aux_put(&key(b"c/a"), &3i64.to_be_bytes()).unwrap();
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.counters")), 0);
    assert_eq!(get(&store, b"c/a"), Some(3));
    store.aux_apply(vec![keel_store::counter_add(b"c/a", 4)]).unwrap();
    assert_eq!(get(&store, b"c/a"), Some(7));
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.aux WHERE key = '\\x236e2f632f61'")), 0);
    store.aux_apply(vec![(key(b"c/a"), None)]).unwrap();
    assert_eq!(get(&store, b"c/a"), None);

    // Back to version 3: the counters as aux rows, the table gone.
    store.aux_apply(vec![keel_store::counter_add(b"c/b", 41), keel_store::counter_add(b"c/c", -1)]).unwrap();
    drop(store);
    admin.exec(&format!(
        "INSERT INTO {schema}.aux (key, value) SELECT key, int8send(sum(value)::bigint) FROM {schema}.counters GROUP BY key;
         DROP TABLE {schema}.counters;
         DELETE FROM {schema}.schema_version WHERE version >= 4"
    ));
    let store = PgStore::open(PgConfig { create: false, ..cfg }).unwrap();
    assert_eq!((get(&store, b"c/b"), get(&store, b"c/c")), (Some(41), Some(-1)));
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.counters")), 2);
    assert_eq!(
        admin.int(&format!("SELECT count(*) FROM {schema}.aux WHERE key >= '\\x236e2f' AND key < '\\x236e30'")),
        0
    );
    store.aux_apply(vec![keel_store::counter_add(b"c/b", 1)]).unwrap();
    assert_eq!(get(&store, b"c/b"), Some(42));
}

/// The work queue's bookkeeping: `unqueued` names only the runs not queued (what a scan
/// still folds; a run waiting for its due time among them), and `done` with the drive's lease
/// releases it in the same transaction (another owner takes the run at once).
#[test]
fn unqueued_names_the_runs_a_scan_must_queue_and_done_releases_the_lease() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let store = PgStore::open(scratch.config()).unwrap();
    let runnable = |n: u8| Runnable { run: run(n), workflow: "w".into(), priority: 0, accepted_at_us: i64::from(n) };
    for n in 1..=3 {
        store.push(&runnable(n)).unwrap();
    }
    store.put_due(run(4), 1_000).unwrap();
    let all: Vec<RunId> = (1..=5).map(run).collect();
    assert_eq!(store.unqueued(&all).unwrap(), vec![run(4), run(5)], "a run waiting for its due time is listed");

    let now = 1_000_000;
    let mut claimed = store.claim("one", 60_000, now, 1, &Default::default()).unwrap();
    assert_eq!(claimed.len(), 1);
    let mut lease = claimed.remove(0).lease;
    let r = lease.run();
    assert_eq!(r, run(1), "queue order");
    assert!(store.try_lease(r, "two", 60_000, now).unwrap().is_none(), "held by the claim");
    assert!(!store.done(r, "one", None, Some(&mut lease)).unwrap());
    drop(lease);
    let taken = store.try_lease(r, "two", 60_000, now).unwrap();
    assert!(taken.is_some(), "released with the done, before its expiry");
    assert_eq!(store.unqueued(&all).unwrap(), vec![run(1), run(4), run(5)], "the done run left the queue");
}

/// `hand_back` (a drive a stop ended): the run stays queued, unclaimed, its lease released
/// in the same statement, and another process hears it at the commit: it claims the run at
/// once. A hand-back by an owner that no longer has the row changes nothing.
#[test]
fn a_hand_back_keeps_the_run_queued_unclaimed_and_tells_the_other_processes() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let (a, b, heard) = listening_pair(&scratch);
    let r = run(1);
    a.push(&Runnable { run: r, workflow: "w".into(), priority: 0, accepted_at_us: 1 }).unwrap();
    let now = 1_000_000;
    let mut claimed = a.claim("one", 60_000, now, 1, &Default::default()).unwrap();
    assert_eq!(claimed.len(), 1);
    let mut lease = claimed.remove(0).lease;
    assert!(b.claim("two", 60_000, now, 1, &Default::default()).unwrap().is_empty(), "held by the claim");
    // The push's notification is heard, then forgotten.
    std::thread::sleep(Duration::from_millis(300));
    heard.lock().unwrap().clear();

    // Another owner's hand-back changes nothing.
    assert!(!b.hand_back(r, "two", None).unwrap());
    assert!(b.claim("two", 60_000, now, 1, &Default::default()).unwrap().is_empty(), "still held");

    let handed = Instant::now();
    assert!(a.hand_back(r, "one", Some(&mut lease)).unwrap(), "the owner had the row");
    drop(lease);
    assert_eq!(a.unqueued(&[r]).unwrap(), Vec::<RunId>::new(), "never out of the queue");
    let deadline = Instant::now() + Duration::from_secs(20);
    while heard.lock().unwrap().last().is_none_or(|t| *t <= handed) {
        assert!(Instant::now() < deadline, "the other process was not told");
        std::thread::sleep(Duration::from_millis(10));
    }
    let taken = b.claim("two", 60_000, now, 1, &Default::default()).unwrap();
    assert_eq!(
        taken.iter().map(|c| c.lease.run()).collect::<Vec<_>>(),
        vec![r],
        "claimed at once, before the lease's expiry"
    );
}

/// Every process listens for the queue's notifications, so one per ended drive woke every
/// process once per run any of them drove. A store spaces them out (`DONE_NOTIFY_EVERY`)
/// without leaving a done untold: after a burst of dones, another process still hears a
/// notification after the last done began (the owed one, when the dones came faster
/// than the window, as they do here: 20 dones were heard as 2 notifications).
#[test]
fn a_burst_of_dones_is_told_to_other_processes_after_the_last_one() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let (a, _b, heard) = listening_pair(&scratch);
    let n = 20u8;
    for i in 1..=n {
        a.push(&Runnable { run: run(i), workflow: "w".into(), priority: 0, accepted_at_us: i64::from(i) }).unwrap();
    }
    let claimed = a.claim("one", 60_000, 1_000_000, usize::from(n), &Default::default()).unwrap();
    assert_eq!(claimed.len(), usize::from(n));
    // The pushes' notifications are heard, then forgotten.
    std::thread::sleep(Duration::from_millis(300));
    heard.lock().unwrap().clear();
    // When the last done began: a notification heard after it is its own (sent at its
    // commit, when the dones were slower than the window) or the owed one.
    let mut last_done = Instant::now();
    for mut c in claimed {
        let r = c.lease.run();
        last_done = Instant::now();
        assert!(!a.done(r, "one", None, Some(&mut c.lease)).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if heard.lock().unwrap().last().is_some_and(|t| *t > last_done) {
            break;
        }
        assert!(Instant::now() < deadline, "no notification after the last done: {:?}", heard.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{n} dones, {} notifications heard", heard.lock().unwrap().len());
    assert!(a.unqueued(&(1..=n).map(run).collect::<Vec<_>>()).unwrap().len() == usize::from(n), "all left the queue");
}

/// A flush of two appends (one to an existing run, one creating a run) loses the race for
/// the new run's head row to another session: the whole transaction rolls back, and the
/// appends are retried one per transaction, so the append to the existing run is written
/// and only the other is a conflict. (The writes are awaited in the order sent, `biased`,
/// so the error seen is the unique violation, not a later statement's "transaction is
/// aborted"; this test passes without that too on this machine: the answers arrive in one
/// piece here.)
#[test]
fn a_lost_race_in_a_flush_of_several_appends_retries_them_and_the_others_are_written() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let (store, schema) = scratch.open_shared();
    let (busy, existing, new) = (run(20), run(21), run(22));
    store.append(busy, Seq(0), vec![rec(0)], None).unwrap();
    store.append(existing, Seq(0), vec![rec(0)], None).unwrap();
    let watcher = Admin::connect().unwrap();
    // One session keeps the flusher busy (a flush waiting on `busy`'s head row), so the
    // next two appends are taken into one flush; another creates `new`'s head row,
    // uncommitted, so that flush's insert of it waits, then fails.
    let locker = Admin::connect().unwrap();
    locker.exec(&format!("BEGIN; SELECT * FROM {schema}.heads WHERE run = '{}' FOR UPDATE", busy.0));
    let creator = Admin::connect().unwrap();
    begin_a_head_row(&creator, &schema, new);
    let s = store.clone();
    let first = std::thread::spawn(move || s.append(busy, Seq(1), vec![rec(1)], None));
    wait_for_a_session_blocked_by(locker.pid(), &watcher);
    let (s1, s2) = (store.clone(), store.clone());
    let creating = std::thread::spawn(move || s1.append(new, Seq(0), vec![rec(0)], None));
    let appending = std::thread::spawn(move || s2.append(existing, Seq(1), vec![rec(1)], None));
    std::thread::sleep(Duration::from_millis(100));
    locker.exec("COMMIT");
    first.join().unwrap().unwrap();
    wait_for_a_session_blocked_by(creator.pid(), &watcher);
    creator.exec("COMMIT");
    conflicts_at_the_created_row(creating.join().unwrap());
    let written = appending.join().unwrap();
    assert!(matches!(&written, Ok(h) if h.next_seq == Seq(2)), "the other append of the flush: {written:?}");
    assert!(store.stats().raced_flushes >= 1, "{:?}", store.stats());
}

/// One claim chooses in queue order (priority, then accepted time), passes over the runs
/// of a workflow type at its limit (its live leases counted, and each run chosen), takes
/// the runs of other types behind them, stops at `max`, and leaves a run whose lease
/// another holds live.
#[test]
fn a_claim_takes_runs_in_queue_order_and_passes_over_a_type_at_its_limit() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let store = PgStore::open(scratch.config()).unwrap();
    let push = |n: u8, wf: &str, priority: i32| {
        let r = Runnable { run: run(n), workflow: wf.into(), priority, accepted_at_us: i64::from(n) };
        store.push(&r).unwrap();
    };
    // Queue order: 1, 2, 3 (limited, priority 5), 4 (free, priority 5), 5 (limited), 6, 7.
    for n in 1..=3 {
        push(n, "limited", 5);
    }
    push(4, "free", 5);
    push(5, "limited", 0);
    push(6, "free", 0);
    push(7, "free", 0);
    let now = 1_000_000;
    // One slot of the limited type's two is held already (by a lease outside the queue);
    // run 6's lease is held live by another owner.
    let _held = store.try_lease(run(9), "other", 60_000, now).unwrap().unwrap();
    store.push(&Runnable { run: run(9), workflow: "limited".into(), priority: 0, accepted_at_us: 9 }).unwrap();
    let _six = store.try_lease(run(6), "other", 60_000, now).unwrap().unwrap();
    let limits = std::collections::BTreeMap::from([("limited".to_owned(), 2usize)]);
    let claimed = store.claim("one", 60_000, now, 3, &limits).unwrap();
    let got: Vec<(RunId, String)> = claimed.iter().map(|c| (c.lease.run(), c.workflow.clone())).collect();
    assert_eq!(
        got,
        vec![(run(1), "limited".to_owned()), (run(4), "free".to_owned()), (run(7), "free".to_owned())],
        "run 1 takes the limited type's last slot; 2, 3 and 5 are passed over; 6 is held by another"
    );
    for c in &claimed {
        assert!(store.try_lease(c.lease.run(), "two", 60_000, now).unwrap().is_none(), "granted by the claim");
    }
    // With the slots full nothing of the limited type is taken; nothing else is left.
    assert!(store.claim("two", 60_000, now, 3, &limits).unwrap().is_empty());
}

/// A claim hands its runs back in queue order (priority, then accepted time), not in the
/// order of their ids (the grant locks lease rows in id order).
#[test]
fn a_claim_returns_its_runs_in_queue_order() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let store = PgStore::open(scratch.config()).unwrap();
    // Ids 1..=4; queue order 4, 2, 3, 1.
    for (n, priority, accepted) in [(1u8, 0, 1i64), (2, 5, 2), (3, 5, 3), (4, 9, 4)] {
        store.push(&Runnable { run: run(n), workflow: "w".into(), priority, accepted_at_us: accepted }).unwrap();
    }
    let claimed = store.claim("one", 60_000, 1_000_000, 4, &Default::default()).unwrap();
    let got: Vec<RunId> = claimed.iter().map(|c| c.lease.run()).collect();
    assert_eq!(got, vec![run(4), run(2), run(3), run(1)]);
}

/// A run whose expired lease row is locked by another session (a worker paused between
/// the two round trips of a flush: `idle in transaction`, its lease and head rows locked)
/// is passed over by a claim, which takes the other runs at once: before, the claim's
/// lease grant waited on that row lock until the paused session's transaction was ended,
/// and every claim of every process waited behind it (the new-user review saw one
/// SIGSTOPped `keel serve` stall its peer's whole queue for 60 s).
#[test]
fn a_claim_passes_over_a_run_whose_lease_row_another_session_holds_locked() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    // A claim that waits is cut after 5 s (an error) instead of the default minute.
    let cfg = PgConfig { call_timeout_ms: 5_000, ..scratch.config() };
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg).unwrap();
    for n in [1u8, 2] {
        store.push(&Runnable { run: run(n), workflow: "w".into(), priority: 0, accepted_at_us: i64::from(n) }).unwrap();
    }
    // Run 1 was leased by a worker whose lease has expired by `now`.
    let now = 10_000_000;
    let old = store.try_lease(run(1), "paused", 1_000, 0).unwrap().unwrap();
    std::mem::forget(old);
    let paused = Admin::connect().unwrap();
    paused.exec(&format!("BEGIN; SELECT * FROM {schema}.leases WHERE run = '{}' FOR UPDATE", run(1).0));
    let started = Instant::now();
    // One free worker: the locked run ahead of run 2 in the queue does not use it up.
    let claimed = store.claim("peer", 60_000, now, 1, &Default::default()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "the claim waited on the locked row");
    let got: Vec<RunId> = claimed.iter().map(|c| c.lease.run()).collect();
    assert_eq!(got, vec![run(2)], "run 1 passed over while its lease row is locked");
    // Once the paused session's transaction ends, run 1 is claimed.
    paused.exec("ROLLBACK");
    let got: Vec<RunId> =
        store.claim("peer", 60_000, now, 2, &Default::default()).unwrap().iter().map(|c| c.lease.run()).collect();
    assert_eq!(got, vec![run(1)]);
}

/// The URL's own parameters are kept where keel sets none of its own: its
/// `application_name` names the sessions (keel's `keel` only when it names none).
#[test]
fn the_url_s_application_name_is_kept() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let base = scratch.config();
    let sep = if base.url.contains('?') { '&' } else { '?' };
    let name = format!("keelapp{}", std::process::id());
    let cfg = PgConfig { url: format!("{}{sep}application_name={name}", base.url), ..base };
    let store = PgStore::open(cfg).unwrap();
    store.head(run(1)).unwrap();
    let admin = Admin::connect().unwrap();
    let q = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'");
    assert!(admin.int(&q) > 0, "no session named {name}");
}

/// A fold's read without a thread held (`fold_source_async`: the snapshot and the tail in
/// one statement) gives what the two-step read gives: the snapshot as `load_snapshot`
/// opens it and the records from its seq as `read` yields them, the first damaged record
/// as the error; and leaves to the two-step read (which pages and reports) a tail of a
/// page or more, a snapshot saved before schema migration 6 (no seq column) and one whose
/// anchor record was altered.
#[test]
fn a_folds_awaited_read_gives_what_the_two_step_read_gives() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = PgStore::open(PgConfig { read_page_records: 16, ..cfg }).unwrap();
    let admin = Admin::connect().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let source = |r: RunId| rt.block_on(store.async_appends().unwrap().fold_source_async(r));
    let seqs_hashes = |records: Vec<Result<keel_store::Record, StoreError>>| -> Vec<(u64, [u8; 32])> {
        records.into_iter().map(|x| x.unwrap()).map(|x| (x.seq.0, x.hash)).collect()
    };
    let read_from = |r: RunId, from: u64| store.read(r, Seq(from)).unwrap().collect::<Vec<_>>();
    let (plain, snapped, old, damaged, empty, moved, long) =
        (run(20), run(21), run(22), run(23), run(24), run(25), run(26));
    for r in [plain, snapped, old, damaged, moved] {
        store.append(r, Seq(0), (0..10).map(rec).collect(), None).unwrap();
    }
    store.append(long, Seq(0), (0..16).map(rec).collect(), None).unwrap();
    for r in [snapped, old, damaged, moved] {
        store.save_snapshot(r, Seq(6), b"state at 6").unwrap();
    }

    let got = source(plain).unwrap().expect("served");
    assert!(got.snapshot.is_none());
    assert_eq!(seqs_hashes(got.records.collect()), seqs_hashes(read_from(plain, 0)));

    let got = source(snapped).unwrap().expect("served");
    assert_eq!(got.snapshot, store.load_snapshot(snapped).unwrap());
    assert_eq!(got.snapshot.as_ref().map(|(s, v)| (s.0, v.as_slice())), Some((6, b"state at 6".as_slice())));
    assert_eq!(seqs_hashes(got.records.collect()), seqs_hashes(read_from(snapped, 6)));

    assert!(source(long).unwrap().is_none(), "a tail of a page or more: the two-step read, a page at a time");

    admin.exec(&format!("UPDATE {schema}.snapshots SET next_seq = NULL WHERE run = '{}'", old.0));
    assert!(source(old).unwrap().is_none(), "a snapshot without its seq column: the two-step read");
    assert!(store.load_snapshot(old).unwrap().is_some());

    // Flip the last byte of record 8 (inside its hash: the CRC no longer matches).
    admin.exec(&format!(
        "UPDATE {schema}.events SET value = overlay(value placing set_byte('\\x00'::bytea, 0, get_byte(value, length(value) - 1) # 1) \
         from length(value) for 1) WHERE run = '{}' AND seq = 8",
        damaged.0
    ));
    let first_error = store.read(damaged, Seq(6)).unwrap().find_map(Result::err).unwrap();
    let mut got = source(damaged).unwrap().expect("served");
    match got.records.find_map(Result::err) {
        Some(StoreError::Corrupted { seq, .. }) => {
            assert_eq!(seq, Seq(8));
            assert!(matches!(first_error, StoreError::Corrupted { seq: Seq(8), .. }));
        }
        other => panic!("expected the damaged record, got {other:?}"),
    }

    let got = source(empty).unwrap().expect("served");
    assert!(got.snapshot.is_none() && got.records.count() == 0);

    // The snapshot's anchor (record 5) altered: load_snapshot reports it; left to it.
    admin.exec(&format!(
        "UPDATE {schema}.events SET value = (SELECT value FROM {schema}.events WHERE run = '{p}' AND seq = 5)
         WHERE run = '{m}' AND seq = 5",
        p = plain.0,
        m = moved.0
    ));
    assert!(source(moved).unwrap().is_none(), "a snapshot that does not open: the two-step read");
    assert!(matches!(store.load_snapshot(moved), Err(StoreError::CorruptSnapshot { .. })));
}

/// A claim reads the folds of the runs it grants in one statement and keeps them for the
/// runs' drives: the first fold of a claimed run is served from it (as the two-step read
/// would give it), the next one reads again. One that went stale (another handle appended
/// since the claim) is only ever a base for appends checked against the head: it costs a
/// conflict, and nothing is written from it.
#[test]
fn a_claim_reads_its_runs_folds_for_their_drives_and_a_stale_one_costs_a_conflict() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let (a, b) = two_handles(&scratch);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let source = |r: RunId| rt.block_on(a.async_appends().unwrap().fold_source_async(r)).unwrap().expect("served");
    let seqs_hashes = |records: keel_store::RecordIter| -> Vec<(u64, [u8; 32])> {
        records.map(|x| x.unwrap()).map(|x| (x.seq.0, x.hash)).collect()
    };
    let (plain, snapped, other) = (run(40), run(41), run(42));
    for r in [plain, snapped, other] {
        a.append(r, Seq(0), (0..10).map(rec).collect(), None).unwrap();
        a.push(&Runnable { run: r, workflow: "w".into(), priority: 0, accepted_at_us: 1 }).unwrap();
    }
    a.save_snapshot(snapped, Seq(6), b"state at 6").unwrap();
    let claimed = a.claim("one", 60_000, 1_000_000, 2, &Default::default()).unwrap();
    assert_eq!(claimed.iter().map(|c| c.lease.run()).collect::<Vec<_>>(), vec![plain, snapped]);
    assert_eq!((a.stats().claim_folds_read, a.stats().claim_folds_used), (2, 0));

    let got = source(snapped);
    assert_eq!(a.stats().claim_folds_used, 1, "served from the claim");
    assert_eq!(got.snapshot, a.load_snapshot(snapped).unwrap());
    assert_eq!(seqs_hashes(got.records), seqs_hashes(a.read(snapped, Seq(6)).unwrap()));
    let again = source(snapped);
    assert_eq!(a.stats().claim_folds_used, 1, "the next fold reads again");
    assert_eq!(seqs_hashes(again.records), seqs_hashes(a.read(snapped, Seq(6)).unwrap()));
    source(other);
    assert_eq!(a.stats().claim_folds_used, 1, "a run this store did not claim is read");

    // Another handle appends to `plain` after the claim: the kept fold is stale.
    b.append(plain, Seq(10), vec![rec(10)], None).unwrap();
    let stale = source(plain);
    assert_eq!(a.stats().claim_folds_used, 2);
    let records: Vec<_> = stale.records.map(|x| x.unwrap()).collect();
    let next = Seq(records.last().unwrap().seq.0 + 1);
    assert_eq!(next, Seq(10), "the fold as the claim read it");
    assert!(matches!(a.append(plain, next, vec![rec(99)], None), Err(StoreError::Conflict { .. })));
    let kinds: Vec<u64> = a.read(plain, Seq(0)).unwrap().map(|x| x.unwrap().seq.0).collect();
    assert_eq!(kinds, (0..=10).collect::<Vec<_>>(), "nothing written from the stale fold");
}

/// The last append of a finished run's drive carries the drive's end: in the flush's one
/// statement the run leaves the queue and its lease is released (no `done` of its own).
/// A flush that cannot go as one statement (the head not known here) or whose checks fail
/// (another handle appended: a conflict) records no end: the queue row and the lease stay,
/// for the caller's `done`.
#[test]
fn a_drives_last_append_ends_it_in_the_queue_in_the_same_statement() {
    if !ready() {
        return;
    }
    use keel_store::{Runnable, WorkQueue};
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let (a, b) = (PgStore::open(cfg.clone()).unwrap(), PgStore::open(cfg.clone()).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (ended, stale, unknown, again) = (run(50), run(51), run(52), run(53));
    for r in [ended, stale, unknown, again] {
        b.append(r, Seq(0), (0..3).map(rec).collect(), None).unwrap();
        b.push(&Runnable { run: r, workflow: "w".into(), priority: 0, accepted_at_us: 1 }).unwrap();
    }
    // `a` claims two (and reads their folds: their heads are known to it), `b` the third.
    let mut by_a = a.claim("one", 60_000, 1_000_000, 2, &Default::default()).unwrap();
    let by_b = b.claim("two", 60_000, 1_000_000, 1, &Default::default()).unwrap();
    assert_eq!(by_b[0].lease.run(), unknown);
    let end = |store: &PgStore, r: RunId, lease: &keel_store::Lease, owner: &str| {
        rt.block_on(store.async_appends().unwrap().append_ending_async(
            r,
            Seq(3),
            vec![rec(3)],
            lease.fence(),
            Vec::new(),
            owner,
        ))
    };
    let queued = |r: RunId| a.unqueued(&[r]).unwrap().is_empty();
    let free = |r: RunId| b.try_lease(r, "three", 60_000, 1_000_000).unwrap().is_some();
    // `a` folds what it drives (the claim's read, or its own): it knows their heads.
    let fold = |r: RunId| assert!(rt.block_on(a.async_appends().unwrap().fold_source_async(r)).unwrap().is_some());
    fold(ended);
    fold(stale);

    let (_, recorded) = end(&a, ended, &by_a[0].lease, "one").unwrap();
    assert!(recorded, "the end went with the append");
    by_a[0].lease.released_elsewhere();
    assert!(!queued(ended), "the run left the queue");
    assert!(free(ended), "its lease was released");
    assert_eq!(a.stats().drives_ended_with_append, 1);
    assert_eq!(a.read(ended, Seq(0)).unwrap().count(), 4);

    // Pushed again while driven: it goes round once more, free to claim.
    let mut by_a2 = a.claim("one", 60_000, 1_000_000, 1, &Default::default()).unwrap();
    assert_eq!(by_a2[0].lease.run(), again);
    b.push(&Runnable { run: again, workflow: "w".into(), priority: 0, accepted_at_us: 1 }).unwrap();
    fold(again);
    assert!(end(&a, again, &by_a2[0].lease, "one").unwrap().1);
    by_a2[0].lease.released_elsewhere();
    assert!(queued(again) && free(again), "queued again, its lease released");

    b.append(stale, Seq(3), vec![rec(3)], None).unwrap();
    let missed = a.stats().one_statement_misses;
    assert!(matches!(end(&a, stale, &by_a[1].lease, "one"), Err(StoreError::Conflict { .. })));
    assert_eq!(a.stats().one_statement_misses, missed + 1, "the one statement's checks failed first");
    assert!(queued(stale) && !free(stale), "a refused append records no end");

    // A handle that never read this run's head: the flush goes the locking way.
    let c = PgStore::open(cfg).unwrap();
    let (head, recorded) = end(&c, unknown, &by_b[0].lease, "two").unwrap();
    assert_eq!(head.next_seq, Seq(4));
    assert!(!recorded, "not one statement: the caller's done records the end");
    assert!(queued(unknown) && !free(unknown));
    assert!(!c.done(unknown, "two", None, None).unwrap());
    assert!(!queued(unknown));
    assert_eq!(a.stats().drives_ended_with_append + c.stats().drives_ended_with_append, 2);
}

/// A flush of runs whose heads this process knows goes as one statement that checks them
/// under the row locks; a hint gone stale (another handle appended, another took the
/// lease over) writes nothing and the flush is decided the locking way: `Conflict` and
/// `Fenced` exactly as without the hint, counted, and the log as the winners left it.
#[test]
fn a_flush_on_known_heads_is_one_statement_and_a_stale_hint_writes_nothing() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let (a, b) = two_handles(&scratch);
    let r = run(30);
    a.append(r, Seq(0), vec![rec(0), rec(1)], None).unwrap();
    assert_eq!(a.stats().one_statement_flushes, 0, "a new run's head is not known");
    a.append(r, Seq(2), vec![rec(2)], None).unwrap();
    a.append(r, Seq(3), vec![rec(3)], None).unwrap();
    assert_eq!((a.stats().one_statement_flushes, a.stats().one_statement_misses), (2, 0));

    // Another handle appends: a's hint (next seq 4) is stale.
    b.append(r, Seq(4), vec![rec(4)], None).unwrap();
    match a.append(r, Seq(4), vec![rec(40)], None) {
        Err(StoreError::Conflict { expected, actual, .. }) => assert_eq!((expected, actual), (Seq(4), Seq(5))),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!((a.stats().one_statement_flushes, a.stats().one_statement_misses), (3, 1));
    // The refusal made a forget its hint: the next append goes the locking way and wins.
    a.append(r, Seq(5), vec![rec(5)], None).unwrap();
    assert_eq!(a.stats().one_statement_flushes, 3);

    // Fenced appends on a known head; then b takes the expired lease over.
    let l1 = a.try_lease(r, "a", 1_000, 0).unwrap().unwrap();
    a.append_fenced(r, Seq(6), vec![rec(6)], None, l1.fence()).unwrap();
    assert_eq!((a.stats().one_statement_flushes, a.stats().one_statement_misses), (4, 1));
    let l2 = b.try_lease(r, "b", 1_000, 1_000_000).unwrap().expect("expired: taken over");
    match a.append_fenced(r, Seq(7), vec![rec(70)], None, l1.fence()) {
        Err(StoreError::Fenced { fence, current, .. }) => assert_eq!((fence, current), (l1.epoch(), l2.epoch())),
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!((a.stats().one_statement_flushes, a.stats().one_statement_misses), (5, 2));
    assert_eq!(a.stats().fenced_refusals, 1);
    b.append_fenced(r, Seq(7), vec![rec(7)], None, l2.fence()).unwrap();
    drop((l1, l2));

    let seqs: Vec<(u64, String)> = b.read(r, Seq(0)).unwrap().map(|x| x.unwrap()).map(|x| (x.seq.0, x.kind)).collect();
    assert_eq!(seqs.len(), 8, "no gap, no duplicate, nothing of the refused appends: {seqs:?}");
    assert_eq!(keel_store::verify_run::<Ev>(&b, r).unwrap().records, 8);
}

/// A schema at version 5 (snapshots without their seq column) is migrated to 6 at open:
/// its snapshots are kept, read by the two-step read (their seq column is NULL), and a
/// snapshot saved after the upgrade is read by the one-statement read.
#[test]
fn a_version_5_schema_gets_the_snapshot_seq_column_and_keeps_its_snapshots() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = scratch.config();
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg.clone()).unwrap();
    let (before, after) = (run(40), run(41));
    for r in [before, after] {
        store.append(r, Seq(0), (0..5).map(rec).collect(), None).unwrap();
    }
    store.save_snapshot(before, Seq(3), b"saved by version 5").unwrap();
    drop(store);
    let admin = Admin::connect().unwrap();
    admin.exec(&format!(
        "ALTER TABLE {schema}.snapshots DROP COLUMN next_seq; DELETE FROM {schema}.schema_version WHERE version = 6"
    ));
    let store = PgStore::open(PgConfig { create: false, ..cfg }).unwrap();
    assert_eq!(admin.int(&format!("SELECT max(version)::bigint FROM {schema}.schema_version")), 6);
    assert_eq!(
        admin.int(&format!("SELECT count(*) FROM {schema}.snapshots WHERE run = '{}' AND next_seq IS NULL", before.0)),
        1
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let source = |r: RunId| rt.block_on(store.async_appends().unwrap().fold_source_async(r));
    assert!(source(before).unwrap().is_none(), "an old snapshot: the two-step read");
    assert_eq!(store.load_snapshot(before).unwrap(), Some((Seq(3), b"saved by version 5".to_vec())));
    store.save_snapshot(after, Seq(4), b"saved by version 6").unwrap();
    let got = source(after).unwrap().expect("served");
    assert_eq!(got.snapshot, Some((Seq(4), b"saved by version 6".to_vec())));
    assert_eq!(got.records.map(|r| r.unwrap().seq.0).collect::<Vec<_>>(), vec![4]);
}
