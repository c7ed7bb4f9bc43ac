//! Bad bytes and tampering: typed errors naming run and seq, the intact prefix readable,
//! and `verify` naming the first bad record and what is wrong with it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use keel_store::codec::testing::{open_raw, seal_raw};
use keel_store::{codec, digest, verify_run, Durability, EventLog, RunId, Seq, SledStore, StoreError, VerifyError};

const N: u64 = 8;

fn store_with_run() -> (tempfile::TempDir, SledStore, RunId) {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let r = run(1);
    fill(&log, r, N);
    (dir, log, r)
}

fn mismatch(log: &SledStore, r: RunId) -> (Seq, String) {
    match verify_run::<Ev>(log, r) {
        Err(VerifyError::Mismatch { run, seq, reason }) => {
            assert_eq!(run, r);
            (seq, reason)
        }
        other => panic!("expected Mismatch, got {other:?}"),
    }
}

/// `read` stops at `seq` with a Corrupted error and yields everything before it.
fn assert_read_stops_at(log: &SledStore, r: RunId, seq: u64) -> String {
    let reason = read_stops_at(log, r, seq);
    for (i, record) in read_all(log, r, Seq(0)).0.iter().enumerate() {
        assert_eq!(record.decode::<Ev>().unwrap(), ev(i as u64));
    }
    reason
}

fn read_stops_at(log: &SledStore, r: RunId, seq: u64) -> String {
    let (records, err) = read_all(log, r, Seq(0));
    assert_eq!(records.iter().map(|x| x.seq.0).collect::<Vec<_>>(), (0..seq).collect::<Vec<_>>());
    match err {
        Some(StoreError::Corrupted { run, seq: s, reason }) => {
            assert_eq!((run, s), (r, Seq(seq)));
            reason
        }
        other => panic!("expected Corrupted at {seq}, got {other:?}"),
    }
}

#[test]
fn an_untouched_run_verifies() {
    let (_d, log, r) = store_with_run();
    let report = verify_run::<Ev>(&log, r).unwrap();
    assert_eq!(report.records, N);
    assert_eq!(report.head, log.head(r).unwrap().last_hash);
    let empty = verify_run::<Ev>(&log, run(99)).unwrap();
    assert_eq!((empty.records, empty.head), (0, [0; 32]));
}

#[test]
fn a_flipped_payload_byte_with_recomputed_crc_is_an_altered_payload() {
    let (_d, log, r) = store_with_run();
    // Record 2 is an `Executed` whose last field before `cost_micros`.. is a long string:
    // flip one byte inside the payload, well inside the output text, and re-seal the CRC.
    let mut v = log.raw_get(r, Seq(2)).unwrap().unwrap();
    let env = open_raw(&v).unwrap();
    let payload_end = v.len() - 64;
    let at = payload_end - env.payload.len() + 20;
    v[at] ^= 0x01;
    codec::reseal(&mut v);
    log.raw_put(r, Seq(2), &v).unwrap();
    // read: the header chain is intact, so read yields everything...
    let (records, err) = read_all(&log, r, Seq(0));
    assert!(err.is_none());
    assert_eq!(records.len() as u64, N);
    // ...`decode` returns a different valid event, `decode_verified` refuses it...
    assert!(records[2].decode::<Ev>().is_ok());
    match records[2].decode_verified::<Ev>() {
        Err(StoreError::Corrupted { run, seq, reason }) => {
            assert_eq!((run, seq), (r, Seq(2)));
            assert!(reason.starts_with("altered payload"), "{reason}");
        }
        other => panic!("expected Corrupted, got {other:?}"),
    }
    assert_eq!(records[1].decode_verified::<Ev>().unwrap(), ev(1));
    // ...and verify, which re-digests payloads, names record 2.
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(2));
    assert!(reason.starts_with("altered payload"), "{reason}");
}

#[test]
fn an_altered_header_is_named_as_such() {
    let (_d, log, r) = store_with_run();
    let v = log.raw_get(r, Seq(3)).unwrap().unwrap();
    let mut env = open_raw(&v).unwrap();
    env.time_us += 1;
    log.raw_put(r, Seq(3), &seal_raw(&env).unwrap()).unwrap();
    let reason = assert_read_stops_at(&log, r, 3);
    assert!(reason.contains("broken link"), "{reason}");
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(3));
    assert!(reason.starts_with("altered header"), "{reason}");
}

#[test]
fn a_removed_record_is_a_gap() {
    let (_d, log, r) = store_with_run();
    log.raw_remove(r, Seq(4)).unwrap();
    let reason = assert_read_stops_at(&log, r, 4);
    assert!(reason.contains("record removed"), "{reason}");
    match verify_run::<Ev>(&log, r) {
        Err(VerifyError::Gap { run, expected, found }) => {
            assert_eq!((run, expected, found), (r, Seq(4), Seq(5)));
        }
        other => panic!("expected Gap, got {other:?}"),
    }
    // Reading from past the hole: the missing predecessor is reported.
    let (records, err) = read_all(&log, r, Seq(5));
    assert!(records.is_empty());
    assert!(matches!(err, Some(StoreError::Corrupted { seq: Seq(4), .. })));
}

#[test]
fn a_removed_record_with_the_rest_renumbered_is_a_broken_link() {
    let (_d, log, r) = store_with_run();
    for s in 4..N - 1 {
        let next = log.raw_get(r, Seq(s + 1)).unwrap().unwrap();
        log.raw_put(r, Seq(s), &next).unwrap();
    }
    log.raw_remove(r, Seq(N - 1)).unwrap();
    assert_read_stops_at(&log, r, 4);
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(4));
    assert!(reason.starts_with("broken link"), "{reason}");
}

#[test]
fn a_reordered_record_is_a_broken_link_naming_where_it_was_written() {
    let (_d, log, r) = store_with_run();
    let a = log.raw_get(r, Seq(2)).unwrap().unwrap();
    let b = log.raw_get(r, Seq(3)).unwrap().unwrap();
    log.raw_put(r, Seq(2), &b).unwrap();
    log.raw_put(r, Seq(3), &a).unwrap();
    assert_read_stops_at(&log, r, 2);
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(2));
    assert!(reason.starts_with("broken link: this record was written as seq 3"), "{reason}");
}

#[test]
fn an_inserted_record_is_a_broken_link() {
    // A forger inserts a well-formed record at seq 2, chained correctly after seq 1, and
    // shifts the rest up: record 2 verifies, the original record 2 (now at 3) does not.
    let (_d, log, r) = store_with_run();
    for s in (2..N).rev() {
        let v = log.raw_get(r, Seq(s)).unwrap().unwrap();
        log.raw_put(r, Seq(s + 1), &v).unwrap();
    }
    let prev = open_raw(&log.raw_get(r, Seq(1)).unwrap().unwrap()).unwrap().hash;
    let forged_event = Ev::Failed { task: "forged".into(), class: "fatal".into() };
    let rec = keel_store::prepare(&forged_event, 5).unwrap();
    let d = digest::record_digest(1, r, Seq(2), &rec.kind, rec.time_us, &rec.payload_root);
    let forged = keel_store::codec::testing::RawEnvelope {
        version: 1,
        kind: rec.kind.clone(),
        time_us: rec.time_us,
        payload: rec.payload.clone(),
        payload_root: rec.payload_root,
        hash: digest::chain(&prev, &d),
    };
    log.raw_put(r, Seq(2), &seal_raw(&forged).unwrap()).unwrap();
    read_stops_at(&log, r, 3);
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(3));
    assert!(reason.starts_with("broken link: this record was written as seq 2"), "{reason}");

    // A clumsy insertion (hash not chained) is named at the inserted record itself.
    let mut clumsy = forged;
    clumsy.hash = [9; 32];
    log.raw_put(r, Seq(2), &seal_raw(&clumsy).unwrap()).unwrap();
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(2));
    assert!(reason.starts_with("broken link"), "{reason}");
}

#[test]
fn a_flipped_byte_without_crc_fix_is_corrupted_naming_run_and_seq() {
    let (_d, log, r) = store_with_run();
    let mut v = log.raw_get(r, Seq(5)).unwrap().unwrap();
    let mid = v.len() / 2;
    v[mid] ^= 0x40;
    log.raw_put(r, Seq(5), &v).unwrap();
    let reason = assert_read_stops_at(&log, r, 5);
    assert!(reason.contains("checksum mismatch"), "{reason}");
    // head of a run whose LAST record is fine still works; verify reports a store error.
    assert!(matches!(verify_run::<Ev>(&log, r), Err(VerifyError::Store(StoreError::Corrupted { seq: Seq(5), .. }))));
}

#[test]
fn truncated_records_are_corrupted_naming_run_and_seq() {
    for keep in [0usize, 3, 4, 10, 60] {
        let (_d, log, r) = store_with_run();
        let v = log.raw_get(r, Seq(6)).unwrap().unwrap();
        log.raw_put(r, Seq(6), &v[..keep.min(v.len() - 1)]).unwrap();
        let reason = assert_read_stops_at(&log, r, 6);
        assert!(reason.contains("truncated"), "keep {keep}: {reason}");
    }
    // Truncating the LAST record makes the head unreadable too, with the same typed error.
    let (_d, log, r) = store_with_run();
    let v = log.raw_get(r, Seq(N - 1)).unwrap().unwrap();
    log.raw_put(r, Seq(N - 1), &v[..v.len() - 7]).unwrap();
    assert!(matches!(log.head(r), Err(StoreError::Corrupted { seq, .. }) if seq == Seq(N - 1)));
    assert!(matches!(log.append(r, Seq(N), vec![rec(0)], None), Err(StoreError::Corrupted { .. })));
}

#[test]
fn an_unknown_schema_version_is_a_typed_error_naming_run_and_seq() {
    let (_d, log, r) = store_with_run();
    let mut env = open_raw(&log.raw_get(r, Seq(4)).unwrap().unwrap()).unwrap();
    env.version = 2;
    log.raw_put(r, Seq(4), &seal_raw(&env).unwrap()).unwrap();
    let (records, err) = read_all(&log, r, Seq(0));
    assert_eq!(records.len(), 4);
    match err {
        Some(StoreError::UnknownVersion { run, seq, version }) => {
            assert_eq!((run, seq, version), (r, Seq(4), 2));
        }
        other => panic!("expected UnknownVersion, got {other:?}"),
    }
}

#[test]
fn every_single_byte_change_is_caught_and_never_panics() {
    // Every position of one record, three bit patterns; then the same re-sealed with a
    // valid CRC (deliberate tampering). Plain damage stops `read` at seq 1; tampering is
    // caught by `read` or, for payload bytes, by `verify` -- always naming seq 1.
    let (_d, log, r) = store_with_run();
    let original = log.raw_get(r, Seq(1)).unwrap().unwrap();
    for i in 0..original.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut v = original.clone();
            v[i] ^= flip;
            log.raw_put(r, Seq(1), &v).unwrap();
            let (records, err) = read_all(&log, r, Seq(0));
            assert_eq!(records.len(), 1, "byte {i}: prefix readable");
            assert!(
                matches!(
                    err,
                    Some(StoreError::Corrupted { seq: Seq(1), .. })
                        | Some(StoreError::UnknownVersion { seq: Seq(1), .. })
                ),
                "byte {i} ^ {flip:#x}: {err:?}"
            );
            if i < 4 {
                continue; // re-sealing a damaged checksum restores the original
            }
            codec::reseal(&mut v);
            log.raw_put(r, Seq(1), &v).unwrap();
            match verify_run::<Ev>(&log, r) {
                Err(VerifyError::Mismatch { seq: Seq(1), .. })
                | Err(VerifyError::Store(StoreError::Corrupted { seq: Seq(1), .. }))
                | Err(VerifyError::Store(StoreError::UnknownVersion { seq: Seq(1), .. })) => {}
                other => panic!("resealed byte {i} ^ {flip:#x}: {other:?}"),
            }
        }
    }
}
