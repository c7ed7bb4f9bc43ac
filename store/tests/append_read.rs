//! Append / read / head / runs semantics, on the sled backend and the in-memory one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{
    prepare, Durability, EventLog, Head, Limits, MemStore, NewRecord, Seq, SledStore, StoreConfig, StoreError,
};

/// Runs a check against a fresh SledStore and a fresh MemStore.
fn on_both(check: impl Fn(&dyn keel_store::Store)) {
    let dir = tempdir();
    let sled = open(dir.path(), Durability::None);
    check(&sled);
    check(&MemStore::new());
}

#[test]
fn round_trip_of_several_payload_kinds() {
    on_both(|log| {
        let r = run(1);
        fill(log, r, 12);
        let (records, err) = read_all(log, r, Seq(0));
        assert!(err.is_none());
        assert_eq!(records.len(), 12);
        let mut prev = [0u8; 32];
        for (i, record) in records.iter().enumerate() {
            let i = i as u64;
            assert_eq!(record.run, r);
            assert_eq!(record.seq, Seq(i));
            assert_eq!(record.schema_version, keel_store::SCHEMA_VERSION);
            assert_eq!(record.kind, keel_store::Payload::kind(&ev(i)));
            assert_eq!(record.time_us, 1_700_000_000_000_000 + i as i64);
            assert_eq!(record.decode::<Ev>().unwrap(), ev(i));
            assert_eq!(record.prev_hash, prev);
            assert_eq!(record.hash, keel_store::digest::chain(&prev, &record.digest()));
            prev = record.hash;
        }
        let head = log.head(r).unwrap();
        assert_eq!(head.next_seq, Seq(12));
        assert_eq!(head.last_hash, prev);
        assert_eq!(head.last_kind.as_deref(), Some("Planned"));
    });
}

#[test]
fn read_from_the_middle_links_to_the_stored_predecessor() {
    on_both(|log| {
        let r = run(2);
        fill(log, r, 10);
        let all = read_all(log, r, Seq(0)).0;
        let (tail, err) = read_all(log, r, Seq(6));
        assert!(err.is_none());
        assert_eq!(tail.iter().map(|x| x.seq.0).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
        assert_eq!(tail[0].prev_hash, all[5].hash);
        assert!(read_all(log, r, Seq(10)).0.is_empty());
        assert!(read_all(log, r, Seq(500)).0.is_empty());
    });
}

#[test]
fn unknown_run_has_an_empty_head_and_no_records() {
    on_both(|log| {
        assert_eq!(log.head(run(9)).unwrap(), Head::empty());
        assert_eq!(log.head(run(9)).unwrap(), Head { next_seq: Seq(0), last_hash: [0; 32], last_kind: None });
        assert!(read_all(log, run(9), Seq(0)).0.is_empty());
    });
}

#[test]
fn runs_lists_every_run_with_records_sorted() {
    on_both(|log| {
        for n in [7u8, 3, 200, 4] {
            fill(log, run(n), 2);
        }
        log.save_snapshot(run(3), Seq(1), b"s").unwrap();
        assert_eq!(log.runs().unwrap(), vec![run(3), run(4), run(7), run(200)]);
    });
}

#[test]
fn multi_record_batch_is_written_in_order() {
    on_both(|log| {
        let r = run(3);
        let head = log.append(r, Seq(0), (0..5).map(rec).collect(), None).unwrap();
        assert_eq!(head.next_seq, Seq(5));
        let head = log.append(r, Seq(5), (5..8).map(rec).collect(), None).unwrap();
        assert_eq!(head.next_seq, Seq(8));
        let got: Vec<Ev> = read_all(log, r, Seq(0)).0.iter().map(|x| x.decode().unwrap()).collect();
        assert_eq!(got, (0..8).map(ev).collect::<Vec<_>>());
    });
}

#[test]
fn stale_expected_seq_is_a_conflict_and_writes_nothing() {
    on_both(|log| {
        let r = run(4);
        fill(log, r, 3);
        let before = log.head(r).unwrap();
        for expected in [0u64, 2, 4, 100] {
            match log.append(r, Seq(expected), vec![rec(50), rec(51)], None) {
                Err(StoreError::Conflict { run, expected: e, actual }) => {
                    assert_eq!((run, e, actual), (r, Seq(expected), Seq(3)));
                }
                other => panic!("expected Conflict, got {other:?}"),
            }
        }
        assert_eq!(log.head(r).unwrap(), before);
        assert_eq!(read_all(log, r, Seq(0)).0.len(), 3);
    });
}

#[test]
fn a_batch_with_one_oversize_record_writes_nothing() {
    on_both(|log| {
        let r = run(5);
        fill(log, r, 2);
        let mut big = rec(99);
        big.payload = vec![0; Limits::default().event_bytes_max + 1];
        match log.append(r, Seq(2), vec![rec(2), big, rec(3)], None) {
            Err(StoreError::TooLarge { what: "event", bytes, max }) => {
                assert_eq!((bytes, max), (65_537, 65_536));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(log.head(r).unwrap().next_seq, Seq(2));
        assert_eq!(read_all(log, r, Seq(0)).0.len(), 2);
        // The same batch without the big record goes through at the same seq.
        assert_eq!(log.append(r, Seq(2), vec![rec(2), rec(3)], None).unwrap().next_seq, Seq(4));
    });
}

#[test]
fn limits_each_have_their_own_error() {
    on_both(|log| {
        let r = run(6);
        let too_many: Vec<NewRecord> = (0..1025).map(|_| rec(1)).collect();
        assert!(matches!(
            log.append(r, Seq(0), too_many, None),
            Err(StoreError::TooLarge { what: "batch records", bytes: 1025, max: 1024 })
        ));
        assert!(matches!(log.append(r, Seq(0), vec![], None), Err(StoreError::EmptyBatch { .. })));
        let claim = keel_store::Claim { key: vec![1; 513], now_us: 0, expires_at_us: 10 };
        assert!(matches!(
            log.append(r, Seq(0), vec![rec(0)], Some(claim)),
            Err(StoreError::TooLarge { what: "idempotency key", bytes: 513, max: 512 })
        ));
        let mut long_kind = rec(0);
        long_kind.kind = "k".repeat(257);
        assert!(matches!(
            log.append(r, Seq(0), vec![long_kind], None),
            Err(StoreError::TooLarge { what: "event kind", .. })
        ));
        assert_eq!(log.head(r).unwrap().next_seq, Seq(0));
    });
}

#[test]
fn prepare_refuses_an_oversize_payload() {
    let big = Blob { bytes: vec![7; 70_000] };
    assert!(matches!(prepare(&big, 0), Err(StoreError::TooLarge { what: "event", .. })));
}

#[test]
fn decoding_as_the_wrong_type_names_run_and_seq() {
    on_both(|log| {
        let r = run(7);
        fill(log, r, 3);
        let recs = read_all(log, r, Seq(0)).0;
        match recs[2].decode::<Blob>() {
            Err(StoreError::Decode { run, seq, .. }) => assert_eq!((run, seq), (r, Seq(2))),
            other => panic!("expected Decode error, got {other:?}"),
        }
    });
}

#[test]
fn configured_limits_apply_and_bad_limits_are_refused() {
    let dir = tempdir();
    let limits = Limits { event_bytes_max: 100, ..Limits::default() };
    let log = SledStore::open(dir.path(), StoreConfig { limits, ..StoreConfig::default() }).unwrap();
    let mut r = rec(2);
    r.payload = vec![0; 101];
    assert!(matches!(
        log.append(run(1), Seq(0), vec![r], None),
        Err(StoreError::TooLarge { what: "event", bytes: 101, max: 100 })
    ));
    drop(log);
    let bad = Limits { event_bytes_max: 1 << 20, ..Limits::default() };
    assert!(matches!(
        SledStore::open(dir.path(), StoreConfig { limits: bad, ..StoreConfig::default() }),
        Err(StoreError::InvalidConfig { .. })
    ));
}

#[test]
fn head_survives_reopen_and_appends_continue_the_chain() {
    let dir = tempdir();
    let r = run(8);
    let head = {
        let log = open(dir.path(), Durability::None);
        fill(&log, r, 5);
        log.head(r).unwrap()
    };
    let log = open(dir.path(), Durability::default());
    assert_eq!(log.head(r).unwrap(), head);
    log.append(r, Seq(5), vec![rec(5)], None).unwrap();
    keel_store::verify_run::<Ev>(&log, r).unwrap();
    assert_eq!(log.path(), dir.path());
}
