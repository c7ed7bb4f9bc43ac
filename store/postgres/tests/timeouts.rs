//! Every call into PostgreSQL is bounded: opening a session (`connect_timeout_ms`), one
//! statement on the server (`statement_timeout_ms`) and a whole call cut by the store
//! (`call_timeout_ms`), each a typed `PgError::Timeout` naming what timed out. A call made
//! to hang (another session holds a lock it needs) ends with that error, writes nothing,
//! and the store goes on. Each test works in fresh schemas it drops; without a server the
//! ones that need it say they were skipped (and fail under CI=true or
//! KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{ready, Admin, Scratch};
use keel_store::{Durability, EventLog, Level, RunId, Seq, StoreError};
use keel_store_conformance::{rec, Ev};
use keel_store_postgres::{OpenError, PgConfig, PgError, PgStore, Timed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DURABLE: Durability = Durability::GroupCommit(Level::PowerLoss);

fn run(n: u8) -> RunId {
    RunId::from_bytes([n; 16])
}

fn timeout_of(e: &StoreError) -> Option<(Timed, u64)> {
    match e {
        StoreError::Io(io) => {
            assert_eq!(io.kind(), std::io::ErrorKind::TimedOut, "{e}");
            match io.get_ref().and_then(|i| i.downcast_ref::<PgError>()) {
                Some(PgError::Timeout { what, after_ms }) => Some((*what, *after_ms)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The keel sessions waiting on a lock that `holder_pid` holds.
fn blocked_by(holder_pid: i32, watcher: &Admin) -> i64 {
    watcher.int(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keel' AND {holder_pid} = ANY(pg_blocking_pids(pid))"
    ))
}

/// Another session holds the run's head row: the append's transaction waits for it until
/// the server cancels the statement (`statement_timeout`). The append is a typed timeout
/// naming the statement and its bound, nothing of it is written, and once the lock goes the
/// same append goes through on the same store.
#[test]
fn an_append_held_up_past_the_statement_timeout_is_a_typed_timeout_and_writes_nothing() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = PgConfig { statement_timeout_ms: 300, ..scratch.config() };
    let schema = cfg.schema.clone();
    let store = PgStore::open(cfg).unwrap();
    let r = run(1);
    store.append(r, Seq(0), vec![rec(0)], None).unwrap();
    let admin = Admin::connect().unwrap();
    admin.exec(&format!("BEGIN; SELECT * FROM {schema}.heads WHERE run = '{}' FOR UPDATE", r.0));
    let err = store.append(r, Seq(1), vec![rec(1), rec(2)], None).unwrap_err();
    assert_eq!(timeout_of(&err), Some((Timed::Statement, 300)), "{err}");
    assert!(err.to_string().contains("statement_timeout"), "{err}");
    // Nothing half-written, seen while the lock is still held and after.
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.events WHERE run = '{}'", r.0)), 1);
    admin.exec("ROLLBACK");
    assert_eq!(store.head(r).unwrap().next_seq, Seq(1));
    assert_eq!(store.append(r, Seq(1), vec![rec(1), rec(2)], None).unwrap().next_seq, Seq(3));
    keel_store::verify_run::<Ev>(&store, r).unwrap();
    assert_eq!(store.stats().appends, 2);
}

/// A server that does not answer a call in time (here: a statement waits on a lock with a
/// long statement timeout) is cut by the store after `call_timeout_ms`: an append and a
/// read each end with a typed timeout naming the call; the abandoned session's statement
/// is cancelled on the server (it stops waiting on the lock at once, not when the lock
/// goes); nothing of the append is written; and the store goes on on fresh sessions.
#[test]
fn a_call_the_server_does_not_answer_in_time_is_cut_by_the_call_timeout() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(DURABLE);
    let cfg = PgConfig { statement_timeout_ms: 600_000, call_timeout_ms: 500, ..scratch.config() };
    let schema = cfg.schema.clone();
    let store = Arc::new(PgStore::open(cfg.clone()).unwrap());
    let r = run(2);
    // Created by another handle: `store` does not know the head, so its append locks and
    // reads first (the locking way: cut before its COMMIT went out).
    PgStore::open(cfg).unwrap().append(r, Seq(0), vec![rec(0)], None).unwrap();
    let (admin, watcher) = (Admin::connect().unwrap(), Admin::connect().unwrap());

    admin.exec(&format!("BEGIN; SELECT * FROM {schema}.heads WHERE run = '{}' FOR UPDATE", r.0));
    let err = store.append(r, Seq(1), vec![rec(1), rec(2)], None).unwrap_err();
    assert_eq!(timeout_of(&err), Some((Timed::Call, 500)), "{err}");
    // The abandoned statement was cancelled: no keel session waits on the lock any more
    // while it is still held (without the cancel it would wait until the lock goes).
    let deadline = Instant::now() + Duration::from_secs(20);
    while blocked_by(admin.pid(), &watcher) > 0 {
        assert!(Instant::now() < deadline, "the abandoned statement still waits on the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.events WHERE run = '{}'", r.0)), 1);
    admin.exec("ROLLBACK");

    // A read held up behind a table lock is cut the same way.
    admin.exec(&format!("BEGIN; LOCK TABLE {schema}.heads IN ACCESS EXCLUSIVE MODE"));
    let err = store.head(r).unwrap_err();
    assert_eq!(timeout_of(&err), Some((Timed::Call, 500)), "{err}");
    admin.exec("ROLLBACK");

    // The store goes on: nothing of the cut append is there, and it goes through now.
    assert_eq!(store.head(r).unwrap().next_seq, Seq(1));
    assert_eq!(store.append(r, Seq(1), vec![rec(1), rec(2)], None).unwrap().next_seq, Seq(3));
    keel_store::verify_run::<Ev>(&*store, r).unwrap();
    assert_eq!(admin.int(&format!("SELECT count(*) FROM {schema}.events WHERE run = '{}'", r.0)), 3);

    // Now `store` knows the head: the flush is one statement, its own transaction, so a
    // cut one is in doubt (named as a COMMIT without an answer); here nothing was written.
    admin.exec(&format!("BEGIN; SELECT * FROM {schema}.heads WHERE run = '{}' FOR UPDATE", r.0));
    let err = store.append(r, Seq(3), vec![rec(3)], None).unwrap_err();
    assert_eq!(timeout_of(&err), Some((Timed::Commit, 500)), "{err}");
    // Cancelled as the locking way's statement is (until then it could still commit).
    let deadline = Instant::now() + Duration::from_secs(20);
    while blocked_by(admin.pid(), &watcher) > 0 {
        assert!(Instant::now() < deadline, "the abandoned statement still waits on the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    admin.exec("ROLLBACK");
    assert_eq!(store.head(r).unwrap().next_seq, Seq(3));
    assert_eq!(store.append(r, Seq(3), vec![rec(3)], None).unwrap().next_seq, Seq(4));
    keel_store::verify_run::<Ev>(&*store, r).unwrap();
}

/// A server that accepts the TCP connection and never answers the startup: opening the
/// store is a typed connect timeout (no PostgreSQL needed: the listener is the test's own
/// socket, never accepted from).
#[test]
fn opening_against_a_server_that_never_answers_is_a_connect_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let cfg = PgConfig { connect_timeout_ms: 300, ..PgConfig::new(format!("postgres://keel@127.0.0.1:{port}/none")) };
    match PgStore::open(cfg) {
        Err(OpenError::Postgres(PgError::Timeout { what: Timed::Connect, after_ms: 300 })) => {}
        Err(other) => panic!("expected a connect timeout, got {other}"),
        Ok(_) => panic!("opened against a silent socket"),
    }
    drop(silent);
}

#[test]
fn timeouts_and_threads_out_of_range_are_refused_before_connecting() {
    let base = PgConfig::new("postgres://nobody@127.0.0.1:1/none");
    for (cfg, name) in [
        (PgConfig { connect_timeout_ms: 0, ..base.clone() }, "connect_timeout_ms"),
        (PgConfig { statement_timeout_ms: 0, ..base.clone() }, "statement_timeout_ms"),
        (PgConfig { call_timeout_ms: 3_600_001, ..base.clone() }, "call_timeout_ms"),
        (PgConfig { idle_in_transaction_timeout_ms: 0, ..base.clone() }, "idle_in_transaction_timeout_ms"),
        (PgConfig { io_threads: 0, ..base.clone() }, "io_threads"),
        (PgConfig { io_threads: 65, ..base.clone() }, "io_threads"),
    ] {
        match PgStore::open(cfg) {
            Err(OpenError::InvalidConfig { reason }) => assert!(reason.contains(name), "{reason}"),
            Err(other) => panic!("expected InvalidConfig for {name}, got {other}"),
            Ok(_) => panic!("opened with a bad {name}"),
        }
    }
}
