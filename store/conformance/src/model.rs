//! The store against a naive model (a `Vec` of events per run and the last snapshot),
//! over seeded random operation sequences: appends at the right and at wrong seqs,
//! batches, reads from any seq, heads, snapshots. Each sequence prints its seed.

use crate::checks::read_all;
use crate::payload::{ev, rec, Ev};
use crate::MakeStore;
use keel_store::{RunId, Seq, StoreError};
use std::collections::BTreeMap;

/// A small deterministic generator (SplitMix64): the sequences replay from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Seeds run by [`model_matches_a_naive_log`]; `KEEL_CONFORMANCE_SEED` adds one.
const SEEDS: [u64; 4] = [1, 0x5eed, 0xdead_beef, 42];

/// Seeded operation sequences agree with the naive model at every step.
pub fn model_matches_a_naive_log(make: MakeStore<'_>) {
    let extra = std::env::var("KEEL_CONFORMANCE_SEED").ok().and_then(|s| s.parse::<u64>().ok());
    for seed in SEEDS.into_iter().chain(extra) {
        eprintln!("store model: seed {seed} (rerun with KEEL_CONFORMANCE_SEED={seed})");
        one_sequence(make, seed);
    }
}

fn one_sequence(make: MakeStore<'_>, seed: u64) {
    let log = make();
    let mut rng = Rng(seed);
    let runs: Vec<RunId> = (1..=3u8).map(|n| RunId::from_bytes([n; 16])).collect();
    let mut model: BTreeMap<RunId, Vec<u64>> = BTreeMap::new();
    let mut snaps: BTreeMap<RunId, (u64, Vec<u8>)> = BTreeMap::new();
    let mut next_event = 0u64;
    for step in 0..200 {
        let Some(&run) = runs.get(usize::try_from(rng.below(3)).unwrap_or(0)) else { continue };
        let events = model.entry(run).or_default();
        let len = events.len() as u64;
        let ctx = format!("seed {seed} step {step} run {run}");
        match rng.below(6) {
            0..=2 => {
                let n = 1 + rng.below(3);
                let batch: Vec<u64> = (next_event..next_event + n).collect();
                next_event += n;
                // Mostly the right seq; sometimes a taken one or one beyond the head.
                let expected = match rng.below(5) {
                    0 if len > 0 => rng.below(len),
                    1 => len + 1 + rng.below(3),
                    _ => len,
                };
                let res = log.append(run, Seq(expected), batch.iter().map(|&i| rec(i)).collect(), None);
                if expected == len {
                    assert_eq!(res.unwrap().next_seq, Seq(len + n), "{ctx}");
                    events.extend(batch);
                } else {
                    match res {
                        Err(StoreError::Conflict { expected: e, actual, .. }) => {
                            assert_eq!((e, actual), (Seq(expected), Seq(len)), "{ctx}");
                        }
                        other => panic!("{ctx}: expected Conflict, got {other:?}"),
                    }
                }
            }
            3 => {
                let from = rng.below(len + 2);
                let (records, err) = read_all(&*log, run, Seq(from));
                assert!(err.is_none(), "{ctx}: {err:?}");
                let got: Vec<Ev> = records.iter().map(|r| r.decode().unwrap()).collect();
                let want: Vec<Ev> =
                    events.iter().skip(usize::try_from(from).unwrap_or(usize::MAX)).map(|&i| ev(i)).collect();
                assert_eq!(got, want, "{ctx}: read from {from}");
            }
            4 => {
                let at = rng.below(len + 2);
                let state = format!("state {seed} {step}").into_bytes();
                match log.save_snapshot(run, Seq(at), &state) {
                    Ok(()) => {
                        assert!(at <= len, "{ctx}");
                        snaps.insert(run, (at, state));
                    }
                    Err(StoreError::SnapshotBeyondHead { .. }) => assert!(at > len, "{ctx}"),
                    Err(e) => panic!("{ctx}: save_snapshot: {e}"),
                }
                let loaded = log.load_snapshot(run).unwrap();
                assert_eq!(loaded, snaps.get(&run).map(|(s, b)| (Seq(*s), b.clone())), "{ctx}");
            }
            _ => {
                let head = log.head(run).unwrap();
                assert_eq!(head.next_seq, Seq(len), "{ctx}");
                let kind = events.last().map(|&i| keel_store::Payload::kind(&ev(i)).to_owned());
                assert_eq!(head.last_kind, kind, "{ctx}");
            }
        }
    }
    let with_records: Vec<RunId> = model.iter().filter(|(_, e)| !e.is_empty()).map(|(r, _)| *r).collect();
    assert_eq!(log.runs().unwrap(), with_records, "seed {seed}");
    for r in with_records {
        keel_store::verify_run::<Ev>(&*log, r).unwrap();
    }
}
