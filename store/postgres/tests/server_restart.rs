//! The PostgreSQL server crashes (an immediate stop: every server process quits at once,
//! no checkpoint, recovery from the WAL at the next start) while a writer appends, and
//! comes back: every acknowledged append is there, the chains verify, the calls made
//! while it was down failed with a typed lost-connection error, and the same store handle
//! goes on appending. A test binary of its own, so no other test of this crate runs while
//! the server is down. It restarts only the local cluster (`pg_ctlcluster`), and skips (or,
//! where PostgreSQL is required, fails) when it cannot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{ready, Scratch};
use keel_store::{Durability, EventLog, Level, RunId, Seq, StoreError};
use keel_store_conformance::{rec, Ev};
use keel_store_postgres::PgError;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cluster_version() -> Option<String> {
    let local = common::url().contains("@127.0.0.1:5432/") || common::url().contains("@localhost:5432/");
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (local && versions.len() == 1).then(|| versions[0].clone())
}

fn pg_ctl(version: &str, args: &[&str]) -> bool {
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main"])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn skip(why: &str) {
    if common::required() {
        panic!("cannot run the server restart test: {why}");
    }
    let line = format!("skipped server restart test: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

#[test]
fn acknowledged_appends_survive_a_crash_of_the_server_and_the_store_goes_on() {
    if !ready() {
        return;
    }
    let Some(version) = cluster_version() else {
        return skip("the server is not the single local cluster this test may restart");
    };
    let scratch = Scratch::new(Durability::GroupCommit(Level::PowerLoss));
    let store = Arc::new(scratch.open());
    let (before, during) = (RunId::from_bytes([1; 16]), RunId::from_bytes([2; 16]));
    for i in 0..50 {
        store.append(before, Seq(i), vec![rec(i)], None).unwrap();
    }
    // A writer appends until the server goes away; it keeps its last acknowledged seq.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match store.append(during, Seq(acked), vec![rec(acked)], None) {
                    Ok(_) => acked += 1,
                    Err(e) => return (acked, Some(e)),
                }
            }
            (acked, None)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let stopped = pg_ctl(&version, &["stop", "-m", "immediate"]);
    stop.store(true, Ordering::Relaxed);
    let (acked, writer_error) = writer.join().unwrap();
    if !stopped {
        return skip("pg_ctlcluster could not stop the cluster (not root?)");
    }
    // While it is down: a typed lost-connection error (or, once the session is gone, a
    // typed "cannot connect").
    let down = store.append(before, Seq(50), vec![rec(50)], None).unwrap_err();
    let lost = |e: &StoreError| match e {
        StoreError::Io(io) => matches!(
            (io.kind(), io.get_ref().and_then(|i| i.downcast_ref::<PgError>())),
            (std::io::ErrorKind::ConnectionAborted, Some(PgError::ConnectionLost { .. } | PgError::InDoubt { .. }))
                | (std::io::ErrorKind::ConnectionRefused, Some(PgError::Unreachable { .. }))
        ),
        _ => false,
    };
    assert!(lost(&down), "{down:?}");
    if let Some(e) = &writer_error {
        assert!(lost(e), "the in-flight append failed otherwise: {e:?}");
    }
    assert!(pg_ctl(&version, &["start"]), "the cluster did not start again");
    // Back: the same handle recovers (sessions are reopened as needed).
    let deadline = Instant::now() + Duration::from_secs(30);
    let head = loop {
        match store.head(before) {
            Ok(h) => break h,
            Err(e) => {
                assert!(Instant::now() < deadline, "the store did not recover: {e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(head.next_seq, Seq(50), "every acknowledged append before the crash survived");
    let during_head = store.head(during).unwrap();
    assert!(during_head.next_seq.0 >= acked, "acknowledged {acked}, survived {}", during_head.next_seq.0);
    assert!(during_head.next_seq.0 <= acked + 1, "at most the in-flight append beyond");
    store.append(before, Seq(50), vec![rec(50)], None).unwrap();
    store.append(during, during_head.next_seq, vec![rec(during_head.next_seq.0)], None).unwrap();
    for r in [before, during] {
        keel_store::verify_run::<Ev>(&*store, r).unwrap();
    }
    eprintln!("server crash: {acked} appends acknowledged during the run, all survived");
}
