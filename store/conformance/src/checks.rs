//! The checks of the suite. Each takes a factory of fresh stores and panics on a breach of
//! the contract (docs/STORE.md).

use crate::payload::{ev, rec, Ev};
use crate::MakeStore;
use keel_store::{digest, Claim, Head, Limits, Record, RunId, Seq, Store, StoreError, SCHEMA_VERSION};
use std::sync::{Arc, Barrier};

/// A run id from one byte.
pub fn run(n: u8) -> RunId {
    RunId::from_bytes([n; 16])
}

/// Appends events `0..n` to `run` one by one.
pub fn fill(log: &dyn Store, run: RunId, n: u64) {
    for i in 0..n {
        log.append(run, Seq(i), vec![rec(i)], None).unwrap();
    }
}

/// Reads a run: the good records and the error that ended it, if any.
pub fn read_all(log: &dyn Store, run: RunId, from: Seq) -> (Vec<Record>, Option<StoreError>) {
    let mut ok = Vec::new();
    for r in log.read(run, from).unwrap() {
        match r {
            Ok(r) => ok.push(r),
            Err(e) => return (ok, Some(e)),
        }
    }
    (ok, None)
}

/// Records come back as appended: kind, time, payload and payload version, seq, the chain.
pub fn round_trip_of_several_payload_kinds(make: MakeStore<'_>) {
    let log = make();
    let r = run(1);
    fill(&*log, r, 12);
    let (records, err) = read_all(&*log, r, Seq(0));
    assert!(err.is_none(), "{err:?}");
    assert_eq!(records.len(), 12);
    let mut prev = [0u8; 32];
    for (i, record) in (0u64..).zip(&records) {
        assert_eq!((record.run, record.seq), (r, Seq(i)));
        assert_eq!(record.schema_version, SCHEMA_VERSION);
        assert_eq!(record.kind, keel_store::Payload::kind(&ev(i)));
        assert_eq!(record.payload_version(), keel_store::Payload::payload_version(&ev(i)));
        assert_eq!(record.time_us, 1_700_000_000_000_000 + i64::try_from(i).unwrap());
        assert_eq!(record.decode::<Ev>().unwrap(), ev(i));
        assert_eq!(record.decode_verified::<Ev>().unwrap(), ev(i));
        assert_eq!(record.prev_hash, prev);
        assert_eq!(record.hash, digest::chain(&prev, &record.digest()));
        prev = record.hash;
    }
    let head = log.head(r).unwrap();
    assert_eq!(head, Head { next_seq: Seq(12), last_hash: prev, last_kind: Some("Executed".into()) });
    keel_store::verify_run::<Ev>(&*log, r).unwrap();
}

/// `read(run, from)` links its first record to the stored predecessor; past the end is empty.
pub fn read_from_the_middle_links_to_the_stored_predecessor(make: MakeStore<'_>) {
    let log = make();
    let r = run(2);
    fill(&*log, r, 10);
    let all = read_all(&*log, r, Seq(0)).0;
    let (tail, err) = read_all(&*log, r, Seq(6));
    assert!(err.is_none());
    assert_eq!(tail.iter().map(|x| x.seq.0).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
    assert_eq!(tail.first().map(|t| t.prev_hash), all.get(5).map(|a| a.hash));
    assert!(read_all(&*log, r, Seq(10)).0.is_empty());
    assert!(read_all(&*log, r, Seq(500)).0.is_empty());
    let scanned: Vec<u64> = log.scan(r, Seq(3)).unwrap().map(|x| x.unwrap().seq.0).collect();
    assert_eq!(scanned, (3..10).collect::<Vec<_>>());
}

/// An unknown run has the empty head and no records.
pub fn unknown_run_has_an_empty_head_and_no_records(make: MakeStore<'_>) {
    let log = make();
    assert_eq!(log.head(run(9)).unwrap(), Head::empty());
    assert!(read_all(&*log, run(9), Seq(0)).0.is_empty());
    assert!(log.runs().unwrap().is_empty());
}

/// `runs()` lists every run with a record, sorted; snapshots, aux entries and due times
/// are not runs.
pub fn runs_lists_every_run_with_records_sorted(make: MakeStore<'_>) {
    let log = make();
    for n in [7u8, 3, 200, 4] {
        fill(&*log, run(n), 2);
    }
    log.save_snapshot(run(3), Seq(1), b"s").unwrap();
    log.aux_put(b"aux", b"v").unwrap();
    log.put_due(run(9), 5).unwrap();
    assert_eq!(log.runs().unwrap(), vec![run(3), run(4), run(7), run(200)]);
    // `runs_between`: the same list cut to a range, both ends included.
    assert_eq!(log.runs_between(run(4), run(7)).unwrap(), vec![run(4), run(7)]);
    assert_eq!(log.runs_between(run(3), run(4)).unwrap(), vec![run(3), run(4)]);
    assert_eq!(log.runs_between(run(5), run(199)).unwrap(), vec![run(7)]);
    let mut just_above_3 = [0u8; 16];
    just_above_3[0] = 3;
    just_above_3[1] = 4;
    assert_eq!(log.runs_between(RunId::from_bytes(just_above_3), run(4)).unwrap(), vec![run(4)]);
    assert_eq!(log.runs_between(run(201), run(255)).unwrap(), Vec::<RunId>::new());
    assert_eq!(log.runs_between(run(0), run(255)).unwrap(), log.runs().unwrap());
}

/// A batch is written in order, all of it.
pub fn multi_record_batch_is_written_in_order(make: MakeStore<'_>) {
    let log = make();
    let r = run(3);
    assert_eq!(log.append(r, Seq(0), (0..5).map(rec).collect(), None).unwrap().next_seq, Seq(5));
    assert_eq!(log.append(r, Seq(5), (5..8).map(rec).collect(), None).unwrap().next_seq, Seq(8));
    let got: Vec<Ev> = read_all(&*log, r, Seq(0)).0.iter().map(|x| x.decode().unwrap()).collect();
    assert_eq!(got, (0..8).map(ev).collect::<Vec<_>>());
    assert!(matches!(log.append(r, Seq(8), Vec::new(), None), Err(StoreError::EmptyBatch { .. })));
}

/// Optimistic concurrency: an append whose expected seq is not the head (a seq already
/// taken, or beyond) is `Conflict { run, expected, actual }` and writes nothing.
pub fn an_append_at_a_taken_seq_is_a_typed_conflict(make: MakeStore<'_>) {
    let log = make();
    let r = run(4);
    fill(&*log, r, 3);
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
    assert_eq!(read_all(&*log, r, Seq(0)).0.len(), 3);
}

/// One record over the limit fails the whole batch with `TooLarge { what: "event" }`.
pub fn a_batch_with_one_oversize_record_writes_nothing(make: MakeStore<'_>) {
    let log = make();
    let r = run(5);
    fill(&*log, r, 2);
    let max = log.limits().event_bytes_max;
    let mut big = rec(99);
    big.payload = vec![0; max + 1];
    match log.append(r, Seq(2), vec![rec(2), big, rec(3)], None) {
        Err(StoreError::TooLarge { what: "event", bytes, max: m }) => assert_eq!((bytes, m), (max + 1, max)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(log.head(r).unwrap().next_seq, Seq(2));
    assert_eq!(log.append(r, Seq(2), vec![rec(2), rec(3)], None).unwrap().next_seq, Seq(4));
}

/// Two writers racing for each slot of one run: exactly one wins each, the other gets
/// `Conflict`, and the log has no gap and no duplicate.
pub fn racing_writers_on_one_run_each_slot_won_once(make: MakeStore<'_>) {
    let log = make();
    let r = run(6);
    for slot in 0..40u64 {
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<Result<Head, StoreError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2u64)
                .map(|w| {
                    let (log, barrier) = (log.clone(), barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        log.append(r, Seq(slot), vec![rec(slot * 2 + w)], None)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wins = results.iter().filter(|x| x.is_ok()).count();
        assert_eq!(wins, 1, "slot {slot}: {results:?}");
        for res in &results {
            if let Err(e) = res {
                assert!(matches!(e, StoreError::Conflict { .. }), "slot {slot}: {e:?}");
            }
        }
    }
    let (records, err) = read_all(&*log, r, Seq(0));
    assert!(err.is_none());
    assert_eq!(records.iter().map(|x| x.seq.0).collect::<Vec<_>>(), (0..40).collect::<Vec<_>>());
    keel_store::verify_run::<Ev>(&*log, r).unwrap();
}

/// Many runs claiming one idempotency key at once: exactly one is created, the others get
/// `DuplicateKey { existing: winner }` and wrote nothing.
pub fn threads_claiming_one_key_create_exactly_one_run(make: MakeStore<'_>) {
    let log = make();
    let barrier = Arc::new(Barrier::new(32));
    let results: Vec<(RunId, Result<Head, StoreError>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..32u8)
            .map(|i| {
                let (log, barrier) = (log.clone(), barrier.clone());
                s.spawn(move || {
                    let r = RunId::from_bytes([i, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
                    let claim = Claim { key: b"webhook-42".to_vec(), now_us: 1_000, expires_at_us: 10_000 };
                    barrier.wait();
                    (r, log.append(r, Seq(0), vec![rec(0)], Some(claim)))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<RunId> = results.iter().filter(|(_, res)| res.is_ok()).map(|(r, _)| *r).collect();
    assert_eq!(winners.len(), 1, "exactly one run created");
    let winner = winners.first().copied().unwrap();
    for (r, res) in results.iter().filter(|(r, _)| *r != winner) {
        assert!(matches!(res, Err(StoreError::DuplicateKey { existing }) if *existing == winner), "{res:?}");
        assert_eq!(log.head(*r).unwrap().next_seq, Seq(0), "loser wrote nothing");
    }
    assert_eq!(log.runs().unwrap(), vec![winner]);
    assert_eq!(log.lookup_key(b"webhook-42", 1_000).unwrap(), Some(winner));
}

/// Claims expire at `expires_at_us`; the holder may refresh its own; a conflicting append
/// takes no key.
pub fn an_expired_claim_can_be_retaken_and_an_unexpired_one_cannot(make: MakeStore<'_>) {
    let log = make();
    let claim = |now_us, expires_at_us| Claim { key: b"k".to_vec(), now_us, expires_at_us };
    log.append(run(1), Seq(0), vec![rec(0)], Some(claim(0, 100))).unwrap();
    assert_eq!(log.lookup_key(b"k", 99).unwrap(), Some(run(1)));
    assert_eq!(log.lookup_key(b"k", 100).unwrap(), None, "expired at expires_at_us");
    assert_eq!(log.lookup_key(b"other", 0).unwrap(), None);
    assert!(matches!(
        log.append(run(2), Seq(0), vec![rec(0)], Some(claim(99, 500))),
        Err(StoreError::DuplicateKey { existing }) if existing == run(1)
    ));
    assert_eq!(log.head(run(2)).unwrap().next_seq, Seq(0));
    log.append(run(2), Seq(0), vec![rec(0)], Some(claim(100, 500))).unwrap();
    assert_eq!(log.lookup_key(b"k", 100).unwrap(), Some(run(2)));
    log.append(run(2), Seq(1), vec![rec(1)], Some(claim(200, 900))).unwrap();
    assert_eq!(log.lookup_key(b"k", 800).unwrap(), Some(run(2)));
    assert!(matches!(
        log.append(run(3), Seq(5), vec![rec(0)], Some(claim(1_000, 2_000))),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(log.lookup_key(b"k", 1_000).unwrap(), None);
}

/// Only the last snapshot is kept; beyond the head and over the limit are refused.
pub fn snapshots_keep_the_latest_and_enforce_limits_and_head(make: MakeStore<'_>) {
    let log = make();
    let r = run(1);
    assert_eq!(log.load_snapshot(r).unwrap(), None);
    log.save_snapshot(r, Seq(0), b"empty state").unwrap();
    assert_eq!(log.load_snapshot(r).unwrap(), Some((Seq(0), b"empty state".to_vec())));
    fill(&*log, r, 3);
    assert!(matches!(
        log.save_snapshot(r, Seq(4), b"x"),
        Err(StoreError::SnapshotBeyondHead { next_seq: Seq(4), head: Seq(3), .. })
    ));
    let max = log.limits().snapshot_bytes_max;
    let big = vec![0u8; max + 1];
    assert!(matches!(log.save_snapshot(r, Seq(3), &big), Err(StoreError::TooLarge { what: "snapshot", .. })));
    log.save_snapshot(r, Seq(2), b"state@2").unwrap();
    let full = vec![1u8; max];
    log.save_snapshot(r, Seq(3), &full).unwrap();
    assert_eq!(log.load_snapshot(r).unwrap(), Some((Seq(3), full)));
    assert_eq!(log.load_snapshot(run(2)).unwrap(), None);
}

/// `read_runs` yields, run after run and tagged with the run's position, what `read` yields.
pub fn read_runs_yields_what_read_yields_run_after_run(make: MakeStore<'_>) {
    let log = make();
    let runs = [run(3), run(1), run(9), run(3), run(2)];
    for (n, r) in [(5u64, run(1)), (0, run(2)), (17, run(3))] {
        fill(&*log, r, n);
    }
    let mut expected = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        for rec in log.read(*r, Seq(0)).unwrap() {
            let rec = rec.unwrap();
            expected.push((i, rec.run, rec.seq, rec.hash));
        }
    }
    let got: Vec<_> = log
        .read_runs(&runs)
        .map(|(i, r)| {
            let r = r.unwrap();
            (i, r.run, r.seq, r.hash)
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(log.read_runs(&runs).take(3).count(), 3, "dropping early is fine");
}

/// Leases: one holder at a time, until it expires, is released or dropped; every grant,
/// renewal and release moves the run's epoch forward; renewing a lost lease fails.
pub fn leases_are_exclusive_expire_and_move_their_epoch(make: MakeStore<'_>) {
    let log = make();
    let r = run(1);
    let a = log.try_lease(r, "a", 1_000, 0).unwrap().expect("a free run is granted");
    assert_eq!((a.run(), a.owner(), a.expires_at_us()), (r, "a", 1_000_000));
    assert!(log.try_lease(r, "b", 1_000, 10).unwrap().is_none(), "held by a");
    assert!(log.try_lease(r, "a", 1_000, 10).unwrap().is_none(), "not granted twice, renew instead");
    assert!(log.try_lease(run(2), "b", 1_000, 10).unwrap().is_some(), "another run is free");
    let a2 = log.renew_lease(&a, 1_000, 500_000).unwrap().expect("renewed before expiry");
    assert!(a2.epoch() > a.epoch());
    assert_eq!(a2.expires_at_us(), 1_500_000);
    assert!(log.renew_lease(&a, 1_000, 600_000).unwrap().is_none(), "the old epoch is gone");
    // Expired: someone else may take it, and the old holder cannot renew.
    let b = log.try_lease(r, "b", 1_000, 1_500_000).unwrap().expect("expired at expires_at_us");
    assert!(b.epoch() > a2.epoch());
    assert!(log.renew_lease(&a2, 1_000, 1_500_001).unwrap().is_none());
    // Released: free again, and the epoch moved.
    log.release_lease(&b).unwrap();
    let c = log.try_lease(r, "c", 1_000, 1_500_002).unwrap().expect("released");
    assert!(c.epoch() > b.epoch() + 1, "release moved the epoch too");
    // Releasing a lost lease changes nothing.
    log.release_lease(&b).unwrap();
    assert!(log.try_lease(r, "d", 1_000, 1_500_003).unwrap().is_none(), "c still holds it");
    drop((a, a2, b));
    assert!(log.try_lease(r, "d", 1_000, 1_500_003).unwrap().is_none(), "dropping lost leases releases nothing");
    drop(c);
    assert!(log.try_lease(r, "d", 1_000, 1_500_004).unwrap().is_some(), "dropping the holder's lease releases it");
    let long = "o".repeat(keel_store::OWNER_BYTES_MAX + 1);
    assert!(matches!(log.try_lease(run(3), &long, 1, 0), Err(StoreError::TooLarge { what: "lease owner", .. })));
}

/// A fenced append checks the run's lease epoch atomically with the write: with the
/// current epoch it appends; after the lease moved on (renewed, taken over, released) the
/// old fence gets `Fenced` and nothing is written.
pub fn a_fenced_append_with_a_stale_epoch_writes_nothing(make: MakeStore<'_>) {
    let log = make();
    let r = run(1);
    let a = log.try_lease(r, "a", 1_000, 0).unwrap().unwrap();
    log.append_fenced(r, Seq(0), vec![rec(0)], None, a.fence()).unwrap();
    let a2 = log.renew_lease(&a, 1_000, 10).unwrap().unwrap();
    match log.append_fenced(r, Seq(1), vec![rec(1)], None, a.fence()) {
        Err(StoreError::Fenced { run, fence, current }) => {
            assert_eq!((run, fence, current), (r, a.epoch(), a2.epoch()));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(log.head(r).unwrap().next_seq, Seq(1), "a fenced-out append wrote nothing");
    log.append_fenced(r, Seq(1), vec![rec(1)], None, a2.fence()).unwrap();
    // Taken over after expiry: the paused holder's fence no longer works.
    let b = log.try_lease(r, "b", 1_000, 2_000_000).unwrap().unwrap();
    assert!(matches!(log.append_fenced(r, Seq(2), vec![rec(2)], None, a2.fence()), Err(StoreError::Fenced { .. })));
    log.append_fenced(r, Seq(2), vec![rec(2)], None, b.fence()).unwrap();
    // The fence does not replace OCC: a stale seq is still a conflict.
    assert!(matches!(log.append_fenced(r, Seq(2), vec![rec(9)], None, b.fence()), Err(StoreError::Conflict { .. })));
    // A fence of another run does not open this one.
    let other = log.try_lease(run(2), "b", 1_000, 0).unwrap().unwrap();
    assert!(matches!(log.append_fenced(r, Seq(3), vec![rec(3)], None, other.fence()), Err(StoreError::Fenced { .. })));
    log.release_lease(&b).unwrap();
    assert!(matches!(log.append_fenced(r, Seq(3), vec![rec(3)], None, b.fence()), Err(StoreError::Fenced { .. })));
    assert_eq!(log.head(r).unwrap().next_seq, Seq(3));
    // Unfenced appends do not look at leases (OCC keeps the log exact).
    log.append(r, Seq(3), vec![rec(3)], None).unwrap();
    keel_store::verify_run::<Ev>(&*log, r).unwrap();
}

/// Aux entries: put, get, overwrite, key and value limits.
pub fn aux_entries_round_trip_within_their_limits(make: MakeStore<'_>) {
    let log = make();
    assert_eq!(log.aux_get(b"k").unwrap(), None);
    log.aux_put(b"k", b"v1").unwrap();
    log.aux_put(b"k2", b"").unwrap();
    assert_eq!(log.aux_get(b"k").unwrap(), Some(b"v1".to_vec()));
    log.aux_put(b"k", b"v2").unwrap();
    assert_eq!(log.aux_get(b"k").unwrap(), Some(b"v2".to_vec()));
    assert_eq!(log.aux_get(b"k2").unwrap(), Some(Vec::new()));
    let limits: Limits = log.limits();
    let long_key = vec![b'x'; limits.key_bytes_max + 1];
    assert!(matches!(log.aux_put(&long_key, b"v"), Err(StoreError::TooLarge { .. })));
    assert!(matches!(log.aux_get(&long_key), Err(StoreError::TooLarge { .. })));
    let big = vec![0u8; limits.event_bytes_max + 1];
    assert!(matches!(log.aux_put(b"k", &big), Err(StoreError::TooLarge { what: "aux value", .. })));
    assert_eq!(log.aux_get(b"k").unwrap(), Some(b"v2".to_vec()));
}

/// Aux writes made with an append are in the same atomic write: written with it, and
/// not at all when the append fails (conflict, duplicate key, oversize aux value);
/// `aux_apply` puts and removes; `aux_range` lists in key order within bounds and limit.
pub fn aux_writes_go_with_their_append_or_not_at_all(make: MakeStore<'_>) {
    let log = make();
    let r = run(1);
    let put = |k: &[u8], v: &[u8]| (k.to_vec(), Some(v.to_vec()));
    log.append_with_aux(r, Seq(0), vec![rec(0)], None, vec![put(b"i/a", b"1"), put(b"i/b", b"2")]).unwrap();
    assert_eq!(log.aux_get(b"i/a").unwrap(), Some(b"1".to_vec()));
    // A conflict writes neither the records nor the aux entries.
    let err = log.append_with_aux(r, Seq(0), vec![rec(0)], None, vec![put(b"i/c", b"3")]);
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    assert_eq!(log.aux_get(b"i/c").unwrap(), None);
    // An oversize aux value refuses the whole append.
    let big = vec![0u8; log.limits().event_bytes_max + 1];
    let err = log.append_with_aux(r, Seq(1), vec![rec(1)], None, vec![(b"i/d".to_vec(), Some(big))]);
    assert!(matches!(err, Err(StoreError::TooLarge { what: "aux value", .. })), "{err:?}");
    assert_eq!(log.head(r).unwrap().next_seq, Seq(1));
    // A removal in the same write as the records.
    log.append_with_aux(r, Seq(1), vec![rec(1)], None, vec![(b"i/a".to_vec(), None), put(b"i/e", b"5")]).unwrap();
    assert_eq!(log.aux_get(b"i/a").unwrap(), None);
    // With a claim: a duplicate key writes no aux entry.
    let claim = |k: &[u8]| Claim { key: k.to_vec(), now_us: 0, expires_at_us: 1_000 };
    log.append_with_aux(run(2), Seq(0), vec![rec(0)], Some(claim(b"key")), vec![put(b"i/f", b"6")]).unwrap();
    let dup = log.append_with_aux(run(3), Seq(0), vec![rec(0)], Some(claim(b"key")), vec![put(b"i/g", b"7")]);
    assert!(matches!(dup, Err(StoreError::DuplicateKey { .. })), "{dup:?}");
    assert_eq!(log.aux_get(b"i/g").unwrap(), None);
    assert_eq!(log.aux_get(b"i/f").unwrap(), Some(b"6".to_vec()));
    log.aux_apply(vec![put(b"i/h", b"8"), (b"i/b".to_vec(), None)]).unwrap();
    log.aux_put(b"j/x", b"9").unwrap();
    let listed = log.aux_range(b"i/", b"i/\xff", 100).unwrap();
    let keys: Vec<&[u8]> = listed.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, vec![b"i/e".as_slice(), b"i/f", b"i/h"]);
    assert_eq!(listed.first().map(|(_, v)| v.clone()), Some(b"5".to_vec()));
    assert_eq!(log.aux_range(b"i/", b"i/\xff", 2).unwrap().len(), 2);
    assert_eq!(log.aux_range(b"i/f", b"i/f", 10).unwrap().len(), 1);
    assert!(log.aux_range(b"k", b"z", 10).unwrap().is_empty());
    assert_eq!(log.runs().unwrap(), vec![run(1), run(2)]);
}

/// Counter adds (`keel_store::counter_add`): adds from many threads, each with its own
/// run's appends, sum exactly; an add travels with its append (a conflicting or refused
/// append adds nothing); several adds of one key in one write all count; `aux_apply` adds
/// too, and a removal resets the counter.
pub fn counter_adds_sum_exactly_and_go_with_their_append(make: MakeStore<'_>) {
    let log = make();
    let (threads, appends) = (8u8, 25u64);
    let get = |log: &dyn Store, k: &[u8]| {
        let key = [keel_store::COUNTER_PREFIX, k].concat();
        log.aux_get(&key).unwrap().map_or(0, |v| keel_store::counter_value(&v))
    };
    std::thread::scope(|s| {
        for t in 0..threads {
            let log = log.clone();
            s.spawn(move || {
                for i in 0..appends {
                    let aux = vec![keel_store::counter_add(b"c/all", 1), keel_store::counter_add(b"c/neg", -2)];
                    log.append_with_aux(run(t + 1), Seq(i), vec![rec(i)], None, aux).unwrap();
                }
            });
        }
    });
    let total = i64::from(threads) * i64::try_from(appends).unwrap();
    assert_eq!(get(&*log, b"c/all"), total);
    assert_eq!(get(&*log, b"c/neg"), -2 * total);
    // A conflicting append adds nothing; an oversize aux value refuses the add with it.
    let err = log.append_with_aux(run(1), Seq(0), vec![rec(0)], None, vec![keel_store::counter_add(b"c/all", 100)]);
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    let big = vec![0u8; log.limits().event_bytes_max + 1];
    let aux = vec![keel_store::counter_add(b"c/all", 100), (b"i/big".to_vec(), Some(big))];
    assert!(log.append_with_aux(run(1), Seq(appends), vec![rec(appends)], None, aux).is_err());
    assert_eq!(get(&*log, b"c/all"), total);
    // Two adds of one key in one write, then aux_apply, then a removal.
    let aux = vec![keel_store::counter_add(b"c/all", 3), keel_store::counter_add(b"c/all", 4)];
    log.append_with_aux(run(1), Seq(appends), vec![rec(appends)], None, aux).unwrap();
    assert_eq!(get(&*log, b"c/all"), total + 7);
    log.aux_apply(vec![keel_store::counter_add(b"c/all", -7), keel_store::counter_add(b"c/new", 5)]).unwrap();
    assert_eq!((get(&*log, b"c/all"), get(&*log, b"c/new")), (total, 5));
    log.aux_apply(vec![([keel_store::COUNTER_PREFIX, b"c/new"].concat(), None)]).unwrap();
    assert_eq!(get(&*log, b"c/new"), 0);
}

/// `append_fenced_with_aux` is fenced and carries its aux writes in one step: with the
/// current fence the records and the aux writes land together; a stale fence, a conflict,
/// a duplicate claim or an oversize aux value writes neither.
pub fn fenced_aux_writes_go_with_their_append_or_not_at_all(make: MakeStore<'_>) {
    let log = make();
    let r = run(1);
    let put = |k: &[u8], v: &[u8]| (k.to_vec(), Some(v.to_vec()));
    let a = log.try_lease(r, "a", 1_000, 0).unwrap().unwrap();
    log.append_fenced_with_aux(r, Seq(0), vec![rec(0)], None, a.fence(), vec![put(b"i/a", b"1"), put(b"i/b", b"2")])
        .unwrap();
    assert_eq!(log.aux_get(b"i/a").unwrap(), Some(b"1".to_vec()));
    // A conflict under the current fence writes no aux entry.
    let err = log.append_fenced_with_aux(r, Seq(0), vec![rec(0)], None, a.fence(), vec![put(b"i/c", b"3")]);
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    assert_eq!(log.aux_get(b"i/c").unwrap(), None);
    // An oversize aux value refuses the whole append.
    let big = vec![0u8; log.limits().event_bytes_max + 1];
    let err = log.append_fenced_with_aux(r, Seq(1), vec![rec(1)], None, a.fence(), vec![(b"i/d".to_vec(), Some(big))]);
    assert!(matches!(err, Err(StoreError::TooLarge { what: "aux value", .. })), "{err:?}");
    assert_eq!(log.head(r).unwrap().next_seq, Seq(1));
    // Taken over after expiry: the old fence writes neither the records nor the aux writes.
    let b = log.try_lease(r, "b", 1_000, 2_000_000).unwrap().unwrap();
    let err = log.append_fenced_with_aux(
        r,
        Seq(1),
        vec![rec(1)],
        None,
        a.fence(),
        vec![(b"i/a".to_vec(), None), put(b"i/e", b"5")],
    );
    match err {
        Err(StoreError::Fenced { run, fence, current }) => assert_eq!((run, fence, current), (r, a.epoch(), b.epoch())),
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(log.head(r).unwrap().next_seq, Seq(1), "a fenced-out append wrote nothing");
    assert_eq!(log.aux_get(b"i/a").unwrap(), Some(b"1".to_vec()), "nor removed an aux entry");
    assert_eq!(log.aux_get(b"i/e").unwrap(), None, "nor put one");
    // The new holder's fence: a removal and a put with the records.
    log.append_fenced_with_aux(
        r,
        Seq(1),
        vec![rec(1)],
        None,
        b.fence(),
        vec![(b"i/a".to_vec(), None), put(b"i/e", b"5")],
    )
    .unwrap();
    assert_eq!(log.aux_get(b"i/a").unwrap(), None);
    assert_eq!(log.aux_get(b"i/e").unwrap(), Some(b"5".to_vec()));
    // With a claim: a duplicate key writes no aux entry.
    let claim = |k: &[u8]| Claim { key: k.to_vec(), now_us: 0, expires_at_us: i64::MAX };
    let c = log.try_lease(run(2), "c", 1_000, 0).unwrap().unwrap();
    log.append_fenced_with_aux(run(2), Seq(0), vec![rec(0)], Some(claim(b"key")), c.fence(), vec![put(b"i/f", b"6")])
        .unwrap();
    let d = log.try_lease(run(3), "d", 1_000, 0).unwrap().unwrap();
    let dup = log.append_fenced_with_aux(
        run(3),
        Seq(0),
        vec![rec(0)],
        Some(claim(b"key")),
        d.fence(),
        vec![put(b"i/g", b"7")],
    );
    assert!(matches!(dup, Err(StoreError::DuplicateKey { .. })), "{dup:?}");
    assert_eq!(log.aux_get(b"i/g").unwrap(), None);
    assert_eq!(log.aux_get(b"i/f").unwrap(), Some(b"6".to_vec()));
    assert_eq!(log.runs().unwrap(), vec![run(1), run(2)]);
    drop((a, b, c, d));
}

/// The due-time index: one due time per run (a put replaces it), listed once due,
/// earliest first (ties by run), at most `limit`, negative times included; removal clears.
pub fn the_due_index_lists_due_runs_earliest_first(make: MakeStore<'_>) {
    let log = make();
    assert!(log.due(i64::MAX, 10).unwrap().is_empty());
    log.put_due(run(1), 300).unwrap();
    log.put_due(run(2), 100).unwrap();
    log.put_due(run(3), -50).unwrap();
    log.put_due(run(4), 100).unwrap();
    log.put_due(run(5), 1_000).unwrap();
    assert_eq!(log.due(99, 10).unwrap(), vec![(run(3), -50)]);
    assert_eq!(log.due(300, 10).unwrap(), vec![(run(3), -50), (run(2), 100), (run(4), 100), (run(1), 300)]);
    assert_eq!(log.due(300, 2).unwrap(), vec![(run(3), -50), (run(2), 100)]);
    // Moving a run's due time replaces it.
    log.put_due(run(3), 2_000).unwrap();
    log.remove_due(run(2)).unwrap();
    log.remove_due(run(2)).unwrap();
    log.remove_due(run(9)).unwrap();
    assert_eq!(log.due(1_000, 10).unwrap(), vec![(run(4), 100), (run(1), 300), (run(5), 1_000)]);
    assert_eq!(log.due(i64::MAX, 10).unwrap().len(), 4);
    log.put_due(run(6), i64::MIN).unwrap();
    assert_eq!(log.due(i64::MIN, 10).unwrap(), vec![(run(6), i64::MIN)]);
}

/// Payloads come back by digest, byte for byte, at every size around the chunk boundary;
/// a second put of the same bytes is the same reference; an unknown digest is `None`.
pub fn payloads_round_trip_by_digest_across_chunk_boundaries(make: MakeStore<'_>) {
    let log = make();
    let c = keel_store::PAYLOAD_CHUNK_BYTES;
    for len in [0, 1, c - 1, c, c + 1, 3 * c + 7] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let r = log.put_payload(&bytes).unwrap();
        assert_eq!(r, keel_store::PayloadRef::of(&bytes), "len {len}");
        assert_eq!(r.bytes, len as u64);
        assert_eq!(log.put_payload(&bytes).unwrap(), r, "a second put of the same bytes, len {len}");
        assert_eq!(log.get_payload(&r.digest, len).unwrap().as_deref(), Some(bytes.as_slice()), "len {len}");
    }
    assert_eq!(log.get_payload(&[9u8; 32], 1 << 20).unwrap(), None);
    assert_eq!(log.payload_digests().unwrap().len(), 6);
    assert_eq!(keel_store::verify_payloads(log.as_ref()).unwrap(), 6);
}

/// A read states its bound: a payload larger than `bytes_max` is `TooLarge { what:
/// "payload" }`, refused before it is read; a put above the store's maximum writes nothing.
pub fn a_payload_read_is_bounded(make: MakeStore<'_>) {
    let log = make();
    let bytes = vec![7u8; 100_000];
    let r = log.put_payload(&bytes).unwrap();
    match log.get_payload(&r.digest, 99_999) {
        Err(StoreError::TooLarge { what: "payload", bytes: 100_000, max: 99_999 }) => {}
        other => panic!("expected TooLarge payload, got {other:?}"),
    }
    assert_eq!(log.get_payload(&r.digest, 100_000).unwrap().map(|b| b.len()), Some(100_000));
}

/// `remove_run` (retention): refused with `Conflict` when the head moved, and nothing
/// changes; otherwise the run's records, snapshot and due time and the given payloads
/// are gone and the aux writes applied, other runs and payloads untouched, and the run can
/// be told apart from one that never existed only by what the aux writes left.
pub fn remove_run_takes_records_payloads_and_aux_in_one_step(make: MakeStore<'_>) {
    let log = make();
    let (r, other) = (run(1), run(2));
    log.append(r, Seq(0), vec![rec(0), rec(1), rec(2)], None).unwrap();
    log.append(other, Seq(0), vec![rec(0)], None).unwrap();
    log.save_snapshot(r, Seq(2), b"state").unwrap();
    log.put_due(r, 5).unwrap();
    let mine = log.put_payload(&vec![b'm'; 70_000]).unwrap();
    let shared = log.put_payload(b"shared by both runs").unwrap();
    log.aux_put(b"ix/r1", b"entry").unwrap();
    let tomb = |v: &[u8]| vec![(b"tomb/r1".to_vec(), Some(v.to_vec())), (b"ix/r1".to_vec(), None)];
    // A stale expected head: nothing removed, no aux written.
    let err = log.remove_run(r, Seq(2), vec![mine.digest], tomb(b"t"));
    assert!(matches!(err, Err(StoreError::Conflict { expected: Seq(2), actual: Seq(3), .. })), "{err:?}");
    assert_eq!(log.head(r).unwrap().next_seq, Seq(3));
    assert_eq!(log.aux_get(b"tomb/r1").unwrap(), None);
    assert!(log.get_payload(&mine.digest, usize::MAX).unwrap().is_some());
    // Oversize aux: refused before anything is removed.
    let big = vec![0u8; log.limits().event_bytes_max + 1];
    let err = log.remove_run(r, Seq(3), vec![], vec![(b"tomb/r1".to_vec(), Some(big))]);
    assert!(matches!(err, Err(StoreError::TooLarge { what: "aux value", .. })), "{err:?}");
    assert_eq!(log.head(r).unwrap().next_seq, Seq(3));
    // The real removal.
    log.remove_run(r, Seq(3), vec![mine.digest], tomb(b"t")).unwrap();
    assert_eq!(log.head(r).unwrap(), Head::empty());
    assert!(log.read(r, Seq(0)).unwrap().next().is_none());
    assert_eq!(log.load_snapshot(r).unwrap(), None);
    assert!(log.due(i64::MAX, 10).unwrap().iter().all(|(x, _)| *x != r));
    assert_eq!(log.runs().unwrap(), vec![other]);
    assert!(log.get_payload(&mine.digest, usize::MAX).unwrap().is_none());
    assert!(log.get_payload(&shared.digest, usize::MAX).unwrap().is_some());
    assert_eq!(log.aux_get(b"tomb/r1").unwrap(), Some(b"t".to_vec()));
    assert_eq!(log.aux_get(b"ix/r1").unwrap(), None);
    assert_eq!(log.head(other).unwrap().next_seq, Seq(1));
    // A removed run's id starts again from seq 0 if written to (nothing else refers to it).
    log.append(r, Seq(0), vec![rec(0)], None).unwrap();
    assert_eq!(log.head(r).unwrap().next_seq, Seq(1));
}
