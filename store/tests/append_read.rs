//! Append / read / head / runs semantics beyond the conformance suite (which holds the
//! backend-independent ones, `store/conformance`): limits, prepare, decoding, reopen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{prepare, Durability, EventLog, Limits, MemStore, NewRecord, Seq, SledStore, StoreConfig, StoreError};

/// Runs a check against a fresh SledStore and a fresh MemStore.
fn on_both(check: impl Fn(&dyn keel_store::Store)) {
    let dir = tempdir();
    let sled = open(dir.path(), Durability::None);
    check(&sled);
    check(&MemStore::new());
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
