//! Bad bytes and tampering: typed errors naming run and seq, the intact prefix readable,
//! and `verify` naming the first bad record and what is wrong with it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::testing::{open_raw, seal_raw};
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

/// An `Ev` whose `fields()` counts its calls: shows where the JSON conversion runs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct Watched(Ev);

thread_local! {
    // Per test thread: tests run in parallel.
    static FIELDS_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl keel_store::Payload for Watched {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn payload_version(&self) -> u16 {
        self.0.payload_version()
    }
    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        FIELDS_CALLS.set(FIELDS_CALLS.get() + 1);
        self.0.fields()
    }
}

/// Flips one byte well inside record `seq`'s payload (an `Executed` for seq 2: inside its
/// output text) and re-seals the CRC, so only the chain or the payload root can tell.
fn substitute_payload(log: &SledStore, r: RunId, seq: u64) {
    let mut v = log.raw_get(r, Seq(seq)).unwrap().unwrap();
    let env = open_raw(&v).unwrap();
    let payload_end = v.len() - 64;
    let at = payload_end - env.payload.len() + 20;
    v[at] ^= 0x01;
    keel_store::testing::reseal(&mut v);
    assert!(open_raw(&v).unwrap().payload != env.payload);
    log.raw_put(r, Seq(seq), &v).unwrap();
}

/// Writes events `0..n` of `run` as schema-version-1 records, as a v1 build did.
fn fill_v1(log: &SledStore, r: RunId, n: u64) -> keel_store::Hash32 {
    let mut prev = [0u8; 32];
    for i in 0..n {
        let (value, hash) = keel_store::testing::seal_v1_record(r, Seq(i), &prev, &rec(i)).unwrap();
        log.raw_put(r, Seq(i), &value).unwrap();
        prev = hash;
    }
    prev
}

#[test]
fn a_substituted_v3_payload_with_recomputed_crc_is_caught_by_read_without_json() {
    let (_d, log, r) = store_with_run();
    substitute_payload(&log, r, 2);
    // The substituted bytes still decode (as a different event)...
    let env = open_raw(&log.raw_get(r, Seq(2)).unwrap().unwrap()).unwrap();
    assert_eq!(env.version, 3);
    assert!(codec::decode::<Ev>(&env.payload).is_ok_and(|e| e != ev(2)));
    // ...but v3's record digest (as v2's) covers the payload bytes: `read` stops at seq 2, and
    // nothing on the read path converted a payload to JSON.
    FIELDS_CALLS.set(0);
    let reason = assert_read_stops_at(&log, r, 2);
    assert!(reason.contains("broken link") && reason.contains("payload bytes"), "{reason}");
    for (i, record) in read_all(&log, r, Seq(0)).0.iter().enumerate() {
        assert_eq!(record.decode_verified::<Watched>().unwrap(), Watched(ev(i as u64)));
    }
    assert_eq!(FIELDS_CALLS.get(), 0, "no JSON recomputation on read");
    // verify, which re-digests payloads, names record 2 as an altered payload.
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(2));
    assert!(reason.starts_with("altered payload"), "{reason}");
}

#[test]
fn a_flipped_v1_payload_byte_with_recomputed_crc_is_an_altered_payload() {
    // Schema version 1 (records written by a v1 build): the chain covers only the payload
    // root, so `read` passes and `decode_verified` recomputes the root from `fields()`.
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let r = run(1);
    fill_v1(&log, r, N);
    substitute_payload(&log, r, 2);
    let (records, err) = read_all(&log, r, Seq(0));
    assert!(err.is_none());
    assert_eq!(records.len() as u64, N);
    assert!(records.iter().all(|x| x.schema_version == 1));
    assert!(records[2].decode::<Ev>().is_ok());
    FIELDS_CALLS.set(0);
    match records[2].decode_verified::<Watched>() {
        Err(StoreError::Corrupted { run, seq, reason }) => {
            assert_eq!((run, seq), (r, Seq(2)));
            assert!(reason.starts_with("altered payload"), "{reason}");
        }
        other => panic!("expected Corrupted, got {other:?}"),
    }
    assert_eq!(FIELDS_CALLS.get(), 1, "v1 recomputes the payload root");
    assert_eq!(records[1].decode_verified::<Ev>().unwrap(), ev(1));
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(2));
    assert!(reason.starts_with("altered payload"), "{reason}");
}

#[test]
fn a_mixed_v1_then_v3_log_reads_chains_and_verifies() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    let r = run(1);
    let v1_head = fill_v1(&log, r, 4);
    assert_eq!(log.head(r).unwrap().last_hash, v1_head);
    for i in 4..N {
        log.append(r, Seq(i), vec![rec(i)], None).unwrap();
    }
    let (records, err) = read_all(&log, r, Seq(0));
    assert!(err.is_none(), "{err:?}");
    assert_eq!(records.iter().map(|x| x.schema_version).collect::<Vec<_>>(), [1, 1, 1, 1, 3, 3, 3, 3]);
    let mut prev = [0u8; 32];
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.prev_hash, prev);
        assert_eq!(record.hash, digest::chain(&prev, &record.digest()));
        assert_eq!(record.decode_verified::<Ev>().unwrap(), ev(i as u64));
        prev = record.hash;
    }
    assert_eq!(records[3].hash, v1_head);
    // Reading from the middle links to the stored v1 predecessor.
    let (tail, err) = read_all(&log, r, Seq(4));
    assert!(err.is_none() && tail.len() == 4 && tail[0].prev_hash == v1_head);
    let report = verify_run::<Ev>(&log, r).unwrap();
    assert_eq!((report.records, report.head), (N, log.head(r).unwrap().last_hash));
    // Tampering is named on both sides of the version change.
    substitute_payload(&log, r, 7);
    read_stops_at(&log, r, 7);
    let (seq, reason) = mismatch(&log, r);
    assert!(seq == Seq(7) && reason.starts_with("altered payload"), "{seq} {reason}");
}

#[test]
fn a_v3_record_relabelled_v2_or_v1_breaks_the_chain() {
    // Relabelling a record an older version (and re-encoding its body in that version's
    // layout) cannot make the payload bytes or the payload version unchecked: the v2 and v1
    // digests differ from the v3 one that was chained.
    for older in [2, 1] {
        let (_d, log, r) = store_with_run();
        let mut env = open_raw(&log.raw_get(r, Seq(3)).unwrap().unwrap()).unwrap();
        assert_eq!(env.version, 3);
        env.version = older;
        log.raw_put(r, Seq(3), &seal_raw(&env).unwrap()).unwrap();
        let reason = assert_read_stops_at(&log, r, 3);
        assert!(reason.contains("broken link"), "v{older}: {reason}");
        let (seq, reason) = mismatch(&log, r);
        assert_eq!(seq, Seq(3));
        assert!(reason.starts_with("altered header"), "v{older}: {reason}");
    }
}

#[test]
fn an_altered_payload_version_breaks_the_chain() {
    // Schema version 3's record digest covers the payload version: a record re-sealed with
    // another one (so a reader would upcast its payload from the wrong layout) is refused.
    let (_d, log, r) = store_with_run();
    let mut env = open_raw(&log.raw_get(r, Seq(3)).unwrap().unwrap()).unwrap();
    assert_eq!((env.version, env.payload_version), (3, 7), "ev(3) is an `Ev::Failed`, payload version 7");
    env.payload_version = 1;
    log.raw_put(r, Seq(3), &seal_raw(&env).unwrap()).unwrap();
    let reason = assert_read_stops_at(&log, r, 3);
    assert!(reason.contains("broken link"), "{reason}");
    let (seq, reason) = mismatch(&log, r);
    assert_eq!(seq, Seq(3));
    assert!(reason.starts_with("altered header"), "{reason}");
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
    let d = digest::record_digest_v2(
        r,
        Seq(2),
        &rec.kind,
        rec.time_us,
        &rec.payload_root,
        &digest::payload_digest(&rec.payload),
    );
    let forged = keel_store::testing::RawEnvelope {
        version: 2,
        kind: rec.kind.clone(),
        payload_version: 1,
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
    env.version = 4;
    log.raw_put(r, Seq(4), &seal_raw(&env).unwrap()).unwrap();
    let (records, err) = read_all(&log, r, Seq(0));
    assert_eq!(records.len(), 4);
    match err {
        Some(StoreError::UnknownVersion { run, seq, version }) => {
            assert_eq!((run, seq, version), (r, Seq(4), 4));
        }
        other => panic!("expected UnknownVersion, got {other:?}"),
    }
}

#[test]
fn every_single_byte_change_is_caught_and_never_panics() {
    // Every position of one record, three bit patterns; then the same re-sealed with a
    // valid CRC (deliberate tampering). Plain damage stops `read` at seq 1; so does
    // tampering, since schema version 2's chain covers the payload bytes too; `verify`
    // also names seq 1.
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
            keel_store::testing::reseal(&mut v);
            log.raw_put(r, Seq(1), &v).unwrap();
            let (records, err) = read_all(&log, r, Seq(0));
            assert_eq!(records.len(), 1, "resealed byte {i}: prefix readable");
            assert!(
                matches!(
                    err,
                    Some(StoreError::Corrupted { seq: Seq(1), .. })
                        | Some(StoreError::UnknownVersion { seq: Seq(1), .. })
                ),
                "resealed byte {i} ^ {flip:#x}: {err:?}"
            );
            match verify_run::<Ev>(&log, r) {
                Err(VerifyError::Mismatch { seq: Seq(1), .. })
                | Err(VerifyError::Store(StoreError::Corrupted { seq: Seq(1), .. }))
                | Err(VerifyError::Store(StoreError::UnknownVersion { seq: Seq(1), .. })) => {}
                other => panic!("resealed byte {i} ^ {flip:#x}: {other:?}"),
            }
        }
    }
}
