//! `read_runs` (the sled store reads ahead on a second thread) yields exactly what `read`
//! yields run after run: the same records, in the same order, and the same error ending
//! each damaged run, with the next run following.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::testing::{open_raw, seal_raw};
use keel_store::{Durability, EventLog, MemStore, RunId, Seq, SledStore};

/// What a reader can observe of one item: the record's fields, or the error's text.
type Seen = (RunId, Result<(u64, u16, String, i64, Vec<u8>, [u8; 32], [u8; 32]), String>);

fn seen(run: RunId, r: Result<keel_store::Record, keel_store::StoreError>) -> Seen {
    (
        run,
        r.map(|x| (x.seq.0, x.schema_version, x.kind, x.time_us, x.payload, x.prev_hash, x.hash))
            .map_err(|e| e.to_string()),
    )
}

/// `read` of each run from seq 0, in turn.
fn one_by_one(log: &dyn EventLog, runs: &[RunId]) -> Vec<Seen> {
    let mut out = Vec::new();
    for &run in runs {
        for r in log.read(run, Seq(0)).unwrap() {
            out.push(seen(run, r));
        }
    }
    out
}

fn ahead(log: &dyn EventLog, runs: &[RunId]) -> Vec<Seen> {
    log.read_runs(runs).map(|(i, r)| seen(runs[i], r)).collect()
}

fn assert_same(log: &dyn EventLog, runs: &[RunId]) -> Vec<Seen> {
    let expected = one_by_one(log, runs);
    let got = ahead(log, runs);
    assert_eq!(got.len(), expected.len(), "item count");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "item {i}");
    }
    got
}

/// Runs of 0 to 700 records (a read-ahead batch is 256), one listed twice, one unknown.
fn varied(log: &dyn EventLog) -> Vec<RunId> {
    let lengths = [1u64, 255, 256, 257, 700, 3];
    for (i, n) in lengths.iter().enumerate() {
        let r = run(i as u8 + 1);
        // Batches of up to 50 records: fewer appends, same records as one by one.
        let mut seq = 0;
        while seq < *n {
            let k = (*n - seq).min(50);
            log.append(r, Seq(seq), (seq..seq + k).map(rec).collect(), None).unwrap();
            seq += k;
        }
    }
    vec![run(3), run(1), run(99), run(2), run(5), run(4), run(5), run(6)]
}

#[test]
fn intact_runs_read_the_same_ahead_and_one_by_one() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let runs = varied(&log);
    let got = assert_same(&log, &runs);
    assert_eq!(got.len(), 1 + 255 + 256 + 257 + 700 + 700 + 3);
    assert!(got.iter().all(|(_, r)| r.is_ok()));
    // The backend without a read-ahead (the trait's default) agrees too.
    let mem = MemStore::new();
    let runs = varied(&mem);
    assert_eq!(assert_same(&mem, &runs).len(), got.len());
}

#[test]
fn each_damaged_run_ends_with_its_error_and_the_next_run_follows() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let runs = varied(&log);
    // run 2 (255 records): a payload byte changed and the checksum recomputed at seq 100
    // (only the chain can tell).
    let v = log.raw_get(run(2), Seq(100)).unwrap().unwrap();
    let mut env = open_raw(&v).unwrap();
    let last = env.payload.len() - 1;
    env.payload[last] ^= 1;
    log.raw_put(run(2), Seq(100), &seal_raw(&env).unwrap()).unwrap();
    // run 3 (256 records): a record removed at seq 250. (Removing the last record is a
    // truncation `read` cannot see; `verify` against a kept head can.)
    log.raw_remove(run(3), Seq(250)).unwrap();
    // run 4 (257 records): garbage bytes at seq 0.
    log.raw_put(run(4), Seq(0), b"not a record at all").unwrap();
    // run 5 (700 records): a record inserted past the end after a gap.
    log.raw_put(run(5), Seq(702), &log.raw_get(run(5), Seq(1)).unwrap().unwrap()).unwrap();
    // run 6 (3 records): a stored value cut short.
    let v = log.raw_get(run(6), Seq(2)).unwrap().unwrap();
    log.raw_put(run(6), Seq(2), &v[..v.len() / 2]).unwrap();

    let got = assert_same(&log, &runs);
    let errors: Vec<(RunId, &String)> = got.iter().filter_map(|(r, x)| x.as_ref().err().map(|e| (*r, e))).collect();
    // run 5 is listed twice: its error twice.
    assert_eq!(errors.len(), 6, "{errors:#?}");
    for (r, e) in &errors {
        assert!(e.contains("corrupted record"), "run {r}: {e}");
    }
    // Every run reads up to its damage; run 1 whole after the damaged run 3.
    let count = |r: RunId| got.iter().filter(|(x, y)| *x == r && y.is_ok()).count();
    assert_eq!((count(run(1)), count(run(2)), count(run(3)), count(run(4))), (1, 100, 250, 0));
    assert_eq!((count(run(5)), count(run(6))), (1400, 2));
}

#[test]
fn version_1_records_read_the_same() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let r = run(1);
    let mut prev = [0u8; 32];
    for i in 0..300 {
        let (value, hash) = keel_store::testing::seal_v1_record(r, Seq(i), &prev, &rec(i)).unwrap();
        log.raw_put(r, Seq(i), &value).unwrap();
        prev = hash;
    }
    fill(&log, run(2), 10);
    let got = assert_same(&log, &[r, run(2)]);
    assert_eq!(got.len(), 310);
    assert!(got.iter().all(|(_, x)| x.is_ok()));
    assert!(got[..300].iter().all(|(_, x)| x.as_ref().map(|y| y.1) == Ok(1)));
}

#[test]
fn dropping_the_reader_early_stops_the_thread_and_releases_the_database() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::None);
        let mut seq = 0;
        while seq < 3_000 {
            log.append(run(1), Seq(seq), (seq..seq + 100).map(rec).collect(), None).unwrap();
            seq += 100;
        }
        let runs = [run(1)];
        let first: Vec<_> = log.read_runs(&runs).take(10).map(|(_, r)| r.unwrap().seq.0).collect();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
    }
    // The read-ahead thread held a handle on the database: reopening works only if it is
    // gone.
    let log: SledStore = open(dir.path(), Durability::None);
    assert_eq!(log.read_runs(&[run(1)]).filter(|(_, r)| r.is_ok()).count(), 3_000);
}

#[test]
fn concurrent_and_repeated_readers_each_get_every_record() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let runs = varied(&log);
    let expected = one_by_one(&log, &runs);
    // Several readers at once (each needs its own read-ahead thread), then again (threads
    // reused), some dropping their reader halfway.
    for round in 0..3 {
        std::thread::scope(|s| {
            for t in 0..4 {
                let (log, runs, expected) = (&log, &runs, &expected);
                s.spawn(move || {
                    if (round + t) % 3 == 2 {
                        let n = log.read_runs(runs).take(300).count();
                        assert_eq!(n, 300);
                    } else {
                        assert_eq!(&ahead(log, runs), expected, "round {round} reader {t}");
                    }
                });
            }
        });
    }
}
