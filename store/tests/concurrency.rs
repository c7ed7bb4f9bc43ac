//! Optimistic concurrency and idempotency-key claims under real threads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{Claim, Coordination, Durability, EventLog, Level, RunId, Seq, StoreError};
use std::collections::HashSet;
use std::sync::{Arc, Barrier};

#[test]
fn two_racing_writers_one_run_exactly_one_wins_each_slot() {
    let dir = tempdir();
    let log = Arc::new(open(dir.path(), Durability::GroupCommit(Level::ProcessCrash)));
    let r = run(1);
    const ROUNDS: u64 = 300;
    let barrier = Arc::new(Barrier::new(2));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let log = log.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut wins = Vec::new();
                let mut conflicts = 0u64;
                for round in 0..ROUNDS {
                    barrier.wait();
                    // Both read the same head, then race to append at it.
                    let expected = Seq(round);
                    // Each writer tags its record with its id in time_us.
                    let mut record = rec(round);
                    record.time_us = w as i64;
                    match log.append(r, expected, vec![record], None) {
                        Ok(head) => {
                            assert_eq!(head.next_seq, Seq(round + 1));
                            wins.push(round);
                        }
                        Err(StoreError::Conflict { expected: e, actual, .. }) => {
                            assert_eq!(e, expected);
                            assert_eq!(actual, Seq(round + 1));
                            conflicts += 1;
                        }
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                    barrier.wait();
                }
                (wins, conflicts)
            })
        })
        .collect();
    let results: Vec<(Vec<u64>, u64)> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let mut all_wins: Vec<u64> = results.iter().flat_map(|(w, _)| w.clone()).collect();
    all_wins.sort_unstable();
    assert_eq!(all_wins, (0..ROUNDS).collect::<Vec<_>>(), "exactly one winner per slot");
    assert_eq!(results[0].1 + results[1].1, ROUNDS, "exactly one loser per slot");
    // The log holds one record per slot, written by that slot's winner, and verifies.
    let (records, err) = read_all(&*log, r, Seq(0));
    assert!(err.is_none());
    assert_eq!(records.len() as u64, ROUNDS);
    for (i, record) in records.iter().enumerate() {
        let winner = if results[0].0.contains(&(i as u64)) { 0 } else { 1 };
        assert_eq!(record.time_us, winner);
    }
    keel_store::verify_run::<Ev>(&*log, r).unwrap();
}

#[test]
fn free_running_writers_on_one_run_leave_no_gap_and_no_duplicate() {
    let dir = tempdir();
    let log = Arc::new(open(dir.path(), Durability::None));
    let r = run(2);
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut wins = 0u64;
                while wins < 50 {
                    let head = log.head(r).unwrap();
                    match log.append(r, head.next_seq, vec![rec(head.next_seq.0)], None) {
                        Ok(_) => wins += 1,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let (records, err) = read_all(&*log, r, Seq(0));
    assert!(err.is_none());
    assert_eq!(records.iter().map(|x| x.seq.0).collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
    keel_store::verify_run::<Ev>(&*log, r).unwrap();
}

#[test]
fn hundred_threads_claiming_one_key_create_exactly_one_run() {
    let dir = tempdir();
    let log = Arc::new(open(dir.path(), Durability::GroupCommit(Level::ProcessCrash)));
    let barrier = Arc::new(Barrier::new(100));
    let handles: Vec<_> = (0..100u8)
        .map(|i| {
            let log = log.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let r = RunId::from_bytes([i, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
                let claim = Claim { key: b"webhook-42".to_vec(), now_us: 1_000, expires_at_us: 10_000 };
                barrier.wait();
                (r, log.append(r, Seq(0), vec![rec(0)], Some(claim)))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<RunId> = results.iter().filter(|(_, res)| res.is_ok()).map(|(r, _)| *r).collect();
    assert_eq!(winners.len(), 1, "exactly one run created");
    let winner = winners[0];
    for (r, res) in &results {
        if *r != winner {
            match res {
                Err(StoreError::DuplicateKey { existing }) => assert_eq!(*existing, winner),
                other => panic!("expected DuplicateKey, got {other:?}"),
            }
            assert_eq!(log.head(*r).unwrap().next_seq, Seq(0), "loser wrote nothing");
        }
    }
    assert_eq!(log.runs().unwrap(), vec![winner]);
    assert_eq!(log.lookup_key(b"webhook-42", 1_000).unwrap(), Some(winner));
}

#[test]
fn many_runs_group_commit_share_flushes() {
    let dir = tempdir();
    let log = Arc::new(open(dir.path(), Durability::GroupCommit(Level::PowerLoss)));
    let handles: Vec<_> = (0..16u8)
        .map(|i| {
            let log = log.clone();
            std::thread::spawn(move || fill(&*log, run(i), 20))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let flushes = log.group_flushes();
    assert!(flushes <= 320, "{flushes} flushes for 320 appends");
    let runs: HashSet<_> = log.runs().unwrap().into_iter().collect();
    assert_eq!(runs.len(), 16);
    for r in runs {
        keel_store::verify_run::<Ev>(&*log, r).unwrap();
    }
}
