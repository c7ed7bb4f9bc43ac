//! Snapshots: save/load, only the latest kept, checked against checksum and log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::testing::{open_raw, seal_raw};
use keel_store::{Coordination, Durability, Seq, StoreError};

#[test]
fn save_load_keeps_only_the_latest_and_survives_reopen() {
    let dir = tempdir();
    let r = run(1);
    {
        let log = open(dir.path(), Durability::default());
        assert_eq!(log.load_snapshot(r).unwrap(), None);
        fill(&log, r, 10);
        log.save_snapshot(r, Seq(0), b"empty state").unwrap();
        assert_eq!(log.load_snapshot(r).unwrap(), Some((Seq(0), b"empty state".to_vec())));
        log.save_snapshot(r, Seq(4), b"state@4").unwrap();
        log.save_snapshot(r, Seq(10), b"state@10").unwrap();
        assert_eq!(log.load_snapshot(r).unwrap(), Some((Seq(10), b"state@10".to_vec())));
        assert_eq!(log.load_snapshot(run(2)).unwrap(), None);
    }
    let log = open(dir.path(), Durability::default());
    assert_eq!(log.load_snapshot(r).unwrap(), Some((Seq(10), b"state@10".to_vec())));
}

#[test]
fn a_corrupt_snapshot_is_corrupt_snapshot() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let r = run(1);
    fill(&log, r, 5);
    log.save_snapshot(r, Seq(5), b"some folded state").unwrap();
    let good = log.raw_get_snapshot(r).unwrap().unwrap();

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x20;
    log.raw_put_snapshot(r, &flipped).unwrap();
    match log.load_snapshot(r) {
        Err(StoreError::CorruptSnapshot { run, reason }) => {
            assert_eq!(run, r);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected CorruptSnapshot, got {other:?}"),
    }

    log.raw_put_snapshot(r, &good[..good.len() / 2]).unwrap();
    assert!(matches!(log.load_snapshot(r), Err(StoreError::CorruptSnapshot { .. })));
    log.raw_put_snapshot(r, &good[..2]).unwrap();
    assert!(matches!(log.load_snapshot(r), Err(StoreError::CorruptSnapshot { .. })));

    // Saving again replaces the damaged one.
    log.save_snapshot(r, Seq(5), b"again").unwrap();
    assert_eq!(log.load_snapshot(r).unwrap(), Some((Seq(5), b"again".to_vec())));
}

#[test]
fn a_snapshot_that_no_longer_matches_the_log_is_refused() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let r = run(1);
    fill(&log, r, 6);
    log.save_snapshot(r, Seq(4), b"state@4").unwrap();
    // Rewrite record 3 (the last one the snapshot covers) with a different, valid chain hash.
    let mut env = open_raw(&log.raw_get(r, Seq(3)).unwrap().unwrap()).unwrap();
    env.hash = [7; 32];
    log.raw_put(r, Seq(3), &seal_raw(&env).unwrap()).unwrap();
    match log.load_snapshot(r) {
        Err(StoreError::CorruptSnapshot { reason, .. }) => {
            assert!(reason.contains("does not match the log"), "{reason}")
        }
        other => panic!("expected CorruptSnapshot, got {other:?}"),
    }
    // And if the covered records are gone entirely.
    for s in 0..6 {
        log.raw_remove(r, Seq(s)).unwrap();
    }
    assert!(matches!(log.load_snapshot(r), Err(StoreError::CorruptSnapshot { .. })));
}
