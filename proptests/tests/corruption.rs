//! Corrupt input: random byte flips, truncations and garbage in stored records, in
//! snapshots and in sled's own data file. Every read path must give a typed error naming
//! where (run + seq), never panic, never return a different valid event without an
//! error, and keep the intact prefix readable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_engine::{fold, load_state, read_logged, Event, Logged, RunState};
use keel_proptests::driver::simulate_seed;
use keel_proptests::gen::GenConfig;
use keel_proptests::rng::Rng;
use keel_proptests::{cases, env_u64};
use keel_store::{
    prepare, verify_run, Coordination, Durability, EventLog, RunId, Seq, SledStore, StoreConfig, StoreError,
    VerifyError,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn cfg(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

fn open(dir: &Path) -> Result<SledStore, StoreError> {
    SledStore::open(
        dir,
        StoreConfig { durability: Durability::None, cache_capacity_bytes: 8 << 20, ..StoreConfig::default() },
    )
}

/// A simulated run's log, stored in `store` in random batches.
fn stored_run(store: &SledStore, seed: u64) -> Result<(RunId, Vec<Logged>), String> {
    let r = simulate_seed(seed, 1 + (seed % 8) as usize, &GenConfig::default())?;
    let run = r.log[0].run;
    let mut rng = Rng::new(seed ^ 0xb47c);
    let mut i = 0;
    while i < r.log.len() {
        let n = (rng.range(1, 4) as usize).min(r.log.len() - i);
        let records = r.log[i..i + n]
            .iter()
            .map(|l| prepare(&l.event, l.at_us))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        store.append(run, Seq(i as u64), records, None).map_err(|e| e.to_string())?;
        i += n;
    }
    // Half the cases: the run sealed (one stored value, as a finished run's), every
    // property the same.
    if seed % 2 == 1 {
        let sealed = store.seal_runs(&[run]).map_err(|e| e.to_string())?;
        if sealed != 1 {
            return Err(format!("run {run} of seed {seed} was not sealed"));
        }
    }
    Ok((run, r.log))
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    FlipBits(u8),
    Truncate,
    Garbage,
    Extend,
    Empty,
}

fn damage(value: &[u8], how: Damage, rng: &mut Rng) -> Vec<u8> {
    let mut v = value.to_vec();
    match how {
        Damage::FlipBits(n) => {
            for _ in 0..n.max(1) {
                let i = rng.below(v.len() as u64) as usize;
                v[i] ^= 1 << rng.below(8);
            }
        }
        Damage::Truncate => v.truncate(rng.below(v.len() as u64) as usize),
        Damage::Garbage => {
            let n = rng.range(0, 2 * v.len() as u64) as usize;
            v = (0..n).map(|_| rng.next_u64() as u8).collect();
        }
        Damage::Extend => v.extend((0..rng.range(1, 16)).map(|_| rng.next_u64() as u8)),
        Damage::Empty => v.clear(),
    }
    v
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (1u8..4).prop_map(Damage::FlipBits),
        2 => Just(Damage::Truncate),
        2 => Just(Damage::Garbage),
        1 => Just(Damage::Extend),
        1 => Just(Damage::Empty),
    ]
}

fn names(e: &StoreError, run: RunId, seq: u64) -> bool {
    matches!(e, StoreError::Corrupted { run: r, seq: s, .. } | StoreError::UnknownVersion { run: r, seq: s, .. } if *r == run && s.0 == seq)
}

/// Damage record `k` and check every read path.
fn record_damage(seed: u64, pick: u64, how: Damage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let store = open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (run, log) = stored_run(&store, seed).map_err(TestCaseError::fail)?;
    let k = pick % log.len() as u64;
    let mut rng = Rng::new(seed ^ pick);
    let original = store
        .raw_get(run, Seq(k))
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .ok_or_else(|| TestCaseError::fail("no record"))?;
    let bad = damage(&original, how, &mut rng);
    prop_assume!(bad != original);
    store.raw_put(run, Seq(k), &bad).map_err(|e| TestCaseError::fail(e.to_string()))?;

    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), TestCaseError> {
        // The store's read: intact prefix, then a typed error naming (run, k), then nothing.
        let items: Vec<_> = store.read(run, Seq(0)).map_err(|e| TestCaseError::fail(e.to_string()))?.collect();
        prop_assert_eq!(items.len() as u64, k + 1, "read yields the intact prefix then exactly one error");
        for (i, item) in items.iter().enumerate() {
            if (i as u64) < k {
                let rec = item.as_ref().map_err(|e| TestCaseError::fail(format!("intact record {i}: {e}")))?;
                prop_assert_eq!(
                    rec.decode::<Event>().map_err(|e| TestCaseError::fail(e.to_string()))?,
                    log[i].event.clone()
                );
            } else {
                match item {
                    Err(e) => prop_assert!(names(e, run, k), "error does not name run {} seq {}: {}", run, k, e),
                    Ok(rec) => {
                        return Err(TestCaseError::fail(format!(
                            "damaged record {k} ({how:?}) read without error: {:?}",
                            rec.decode::<Event>()
                        )));
                    }
                }
            }
        }
        // Reading many runs in one pass (the read-ahead thread) yields the same items.
        let seen = |r: Result<keel_store::Record, StoreError>| match r {
            Ok(rec) => format!("ok {} {:?}", rec.seq, rec.hash),
            Err(e) => format!("err {e}"),
        };
        let plain: Vec<String> =
            store.read(run, Seq(0)).map_err(|e| TestCaseError::fail(e.to_string()))?.map(seen).collect();
        let ahead: Vec<String> = store.read_runs(&[run, run]).map(|(_, r)| seen(r)).collect();
        prop_assert_eq!(ahead, [plain.clone(), plain].concat(), "read_runs differs from read");
        // The engine's reader and fold: same prefix, a typed error naming the seq.
        let logged: Vec<_> =
            read_logged(&store, run, Seq(0)).map_err(|e| TestCaseError::fail(e.to_string()))?.collect();
        prop_assert_eq!(logged.len() as u64, k + 1);
        let err = logged.last().and_then(|l| l.as_ref().err()).map(|e| e.to_string()).unwrap_or_default();
        prop_assert!(err.contains(&format!("seq {k}")), "engine error does not name seq {}: {}", k, err);
        prop_assert!(load_state(&store, run).is_err(), "load_state folded a damaged log");
        // The auditor's verify names the same record.
        match verify_run::<Event>(&store, run) {
            Err(VerifyError::Mismatch { seq, .. }) | Err(VerifyError::Gap { expected: seq, .. }) => {
                prop_assert_eq!(seq.0, k)
            }
            Err(VerifyError::Store(e)) => prop_assert!(names(&e, run, k), "verify: {}", e),
            Err(e) => return Err(TestCaseError::fail(format!("verify: unexpected {e}"))),
            Ok(r) => return Err(TestCaseError::fail(format!("verify passed a damaged run: {r:?}"))),
        }
        // Head and reading past the damage: an error or the truth, never a panic.
        let _ = store.head(run);
        if let Ok(it) = store.read(run, Seq(k + 1)) {
            for rec in it.flatten() {
                {
                    prop_assert_eq!(rec.decode::<Event>().ok(), Some(log[rec.seq.0 as usize].event.clone()));
                }
            }
        }
        Ok(())
    }));
    match outcome {
        Ok(r) => r,
        Err(p) => Err(TestCaseError::fail(format!(
            "PANIC reading damaged record {k} ({how:?}): {:?}",
            p.downcast_ref::<String>()
        ))),
    }
}

/// A removed record in the middle is a gap named by its seq; the prefix stays readable.
fn record_removed(seed: u64, pick: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let store = open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (run, log) = stored_run(&store, seed).map_err(TestCaseError::fail)?;
    prop_assume!(log.len() >= 2);
    let k = pick % (log.len() as u64 - 1); // not the last: removing the tail is undetectable by design
    store.raw_remove(run, Seq(k)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let items: Vec<_> = store.read(run, Seq(0)).map_err(|e| TestCaseError::fail(e.to_string()))?.collect();
    prop_assert_eq!(items.len() as u64, k + 1);
    prop_assert!(items[..k as usize].iter().all(|r| r.is_ok()));
    match &items[k as usize] {
        Err(e) => prop_assert!(names(e, run, k), "{}", e),
        Ok(_) => return Err(TestCaseError::fail("gap read without error")),
    }
    prop_assert!(verify_run::<Event>(&store, run).is_err());
    Ok(())
}

/// Resealed tampering (payload bytes changed, checksum recomputed): the hash chain must
/// catch it in `verify`.
fn resealed_tamper(seed: u64, pick: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let store = open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (run, log) = stored_run(&store, seed).map_err(TestCaseError::fail)?;
    let k = pick % log.len() as u64;
    let mut rng = Rng::new(pick);
    let original = store
        .raw_get(run, Seq(k))
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .ok_or_else(|| TestCaseError::fail("no record"))?;
    let mut bad = original.clone();
    let i = rng.range(4, bad.len() as u64 - 1) as usize;
    bad[i] ^= 1 << rng.below(8);
    keel_store::testing::reseal(&mut bad);
    store.raw_put(run, Seq(k), &bad).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| verify_run::<Event>(&store, run)));
    match outcome {
        Err(_) => Err(TestCaseError::fail("verify panicked")),
        Ok(Ok(_)) => {
            // Only acceptable if the change is invisible (it never is: every byte is covered).
            Err(TestCaseError::fail(format!(
                "verify passed a run whose record {k} was altered at byte {i} and resealed"
            )))
        }
        Ok(Err(_)) => Ok(()),
    }
}

/// A damaged snapshot: `load_snapshot` gives `CorruptSnapshot` (never another state) and
/// the engine folds the full log instead, to the same state.
fn snapshot_damage(seed: u64, how: Damage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let store = open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (run, log) = stored_run(&store, seed).map_err(TestCaseError::fail)?;
    let full: RunState =
        fold(&log).map_err(|e| TestCaseError::fail(e.to_string()))?.ok_or_else(|| TestCaseError::fail("empty"))?;
    let at = (seed % log.len() as u64) + 1;
    let part: RunState = fold(&log[..at as usize])
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .ok_or_else(|| TestCaseError::fail("empty"))?;
    let bytes = keel_engine::encode_snapshot(&part).map_err(|e| TestCaseError::fail(e.to_string()))?;
    store.save_snapshot(run, Seq(at), &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        load_state(&store, run).map_err(|e| TestCaseError::fail(e.to_string()))?,
        Some(full.clone()),
        "snapshot + tail != full fold"
    );
    let raw = store
        .raw_get_snapshot(run)
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .ok_or_else(|| TestCaseError::fail("no snapshot"))?;
    let mut rng = Rng::new(seed);
    let bad = damage(&raw, how, &mut rng);
    prop_assume!(bad != raw);
    store.raw_put_snapshot(run, &bad).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| (store.load_snapshot(run), load_state(&store, run))));
    let (snap, state) = outcome.map_err(|_| TestCaseError::fail("PANIC on a damaged snapshot"))?;
    match snap {
        Err(StoreError::CorruptSnapshot { run: r, .. }) => prop_assert_eq!(r, run),
        Err(e) => return Err(TestCaseError::fail(format!("damaged snapshot: untyped error {e}"))),
        Ok(Some((s, b))) => {
            prop_assert_eq!((s.0, &b), (at, &bytes), "a damaged snapshot loaded as a different value");
        }
        Ok(None) => return Err(TestCaseError::fail("damaged snapshot vanished silently")),
    }
    prop_assert_eq!(
        state.map_err(|e| TestCaseError::fail(e.to_string()))?,
        Some(full),
        "fallback fold after a damaged snapshot"
    );
    Ok(())
}

proptest! {
    #![proptest_config(cfg(48))]

    #[test]
    fn damaged_record_is_a_typed_error_naming_run_and_seq(seed in any::<u64>(), pick in any::<u64>(), how in damage_strategy()) {
        record_damage(seed, pick, how)?;
    }

    #[test]
    fn removed_record_is_a_gap_naming_its_seq(seed in any::<u64>(), pick in any::<u64>()) {
        record_removed(seed, pick)?;
    }

    #[test]
    fn resealed_tampering_fails_verify(seed in any::<u64>(), pick in any::<u64>()) {
        resealed_tamper(seed, pick)?;
    }

    #[test]
    fn damaged_snapshot_is_refused_and_the_full_log_folds(seed in any::<u64>(), how in damage_strategy()) {
        snapshot_damage(seed, how)?;
    }
}

/// sled's own data file with random bytes flipped: opening and reading must not panic
/// or hang; whatever is read back must be true (a prefix of what was written).
#[test]
fn damaged_sled_data_file_never_panics_nor_lies() {
    let rounds = env_u64("KEEL_DB_DAMAGE_ROUNDS").unwrap_or(6);
    let base = env_u64("KEEL_SEED").unwrap_or(0x5eed);
    let mut lost_silently = Vec::new();
    for round in 0..rounds {
        let seed = base.wrapping_add(round);
        let dir = tempfile::tempdir().expect("tempdir");
        let (run, log) = {
            let store = open(dir.path()).expect("open");
            stored_run(&store, seed).expect("stored run")
        };
        let db = dir.path().join("db");
        let mut bytes = std::fs::read(&db).expect("read db");
        let mut rng = Rng::new(seed);
        let flips = rng.range(1, 8);
        for _ in 0..flips {
            let i = rng.below(bytes.len() as u64) as usize;
            bytes[i] ^= 1 << rng.below(8);
        }
        std::fs::write(&db, &bytes).expect("write db");
        let path = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Result<Event, String>>, String> {
                let store = open(&path).map_err(|e| format!("open: {e}"))?;
                let event = |r: Result<keel_store::Record, StoreError>| {
                    r.map_err(|e| e.to_string()).and_then(|r| r.decode::<Event>().map_err(|e| e.to_string()))
                };
                // The read-ahead path first (it reads sled on its own thread): the same
                // items as `read`, or a typed error where `read` would panic.
                let ahead: Vec<Result<Event, String>> = store.read_runs(&[run]).map(|(_, r)| event(r)).collect();
                let it = store.read(run, Seq(0)).map_err(|e| format!("read: {e}"))?;
                let items: Vec<Result<Event, String>> = it.map(event).collect();
                if ahead != items {
                    return Ok(vec![Err(format!("READ_RUNS DIFFERS: {ahead:?} vs {items:?}"))]);
                }
                Ok(items)
            }));
            let _ = tx
                .send(r.map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_else(|| "non-string panic".into())));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("seed {seed:#x}: open/read of a damaged db hung"));
        match got {
            Err(panic) => panic!("seed {seed:#x}: PANIC on a damaged sled data file: {panic}"),
            Ok(Err(_typed)) => {}
            Ok(Ok(items)) => {
                if let Some(Err(e)) = items.first() {
                    assert!(!e.starts_with("READ_RUNS DIFFERS"), "seed {seed:#x}: {e}");
                }
                let mut ok = 0;
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Ok(e) => {
                            assert_eq!(
                                Some(e),
                                log.get(i).map(|l| &l.event),
                                "seed {seed:#x}: record {i} reads back as a different event"
                            );
                            ok += 1;
                        }
                        Err(_) => break,
                    }
                }
                if ok < log.len() && items.iter().all(|r| r.is_ok()) {
                    lost_silently.push((seed, ok, log.len()));
                }
            }
        }
    }
    // sled recovers the longest valid prefix of its log, dropping records past a damaged
    // point: the manifest beside it (docs/STORE.md 6.5) makes that a typed refusal.
    assert!(
        lost_silently.is_empty(),
        "records silently lost after damaging sled's data file (seed, kept, written): {lost_silently:?}"
    );
}

/// Regression (finding 3 of docs/TESTING.md, fixed by the manifest of committed history,
/// docs/STORE.md 6.5): a few flipped bits in
/// sled's data file (`<dir>/db`) of a cleanly closed store make sled recover only a
/// prefix of its log; the store opens, `read` ends early without an error, `head` and
/// `verify_run` agree with the shortened log: committed records are lost silently
/// (design: "corrupt log bytes -> typed error; nothing is lost"). Found by
/// `damaged_sled_data_file_never_panics_nor_lies` (KEEL_SEED=0x5eed: every round lost
/// records). Now the open is refused (`LostCommitted` or another typed error).
#[test]
fn bug_damaged_sled_data_file_drops_committed_records_without_error() {
    let seed = 24305u64; // 10 records written, 0 read back, no error
    let dir = tempfile::tempdir().expect("tempdir");
    let (run, log) = {
        let store = open(dir.path()).expect("open");
        stored_run(&store, seed).expect("stored run")
    };
    let db = dir.path().join("db");
    let mut bytes = std::fs::read(&db).expect("read db");
    let mut rng = Rng::new(seed);
    for _ in 0..rng.range(1, 8) {
        let i = rng.below(bytes.len() as u64) as usize;
        bytes[i] ^= 1 << rng.below(8);
    }
    std::fs::write(&db, &bytes).expect("write db");
    let store = match open(dir.path()) {
        Err(StoreError::LostCommitted { lost, .. }) => {
            assert_eq!(lost.first().map(|l| l.run), Some(run));
            return;
        }
        Err(_) => return, // another typed refusal
        Ok(store) => store,
    };
    let read: Vec<_> = store.read(run, Seq(0)).expect("read").collect();
    let errors = read.iter().filter(|r| r.is_err()).count();
    assert!(
        read.len() == log.len() || errors > 0,
        "{} of {} committed records read back, no error",
        read.len(),
        log.len()
    );
}

#[derive(Clone, Copy, Debug)]
enum FileDamage {
    FlipByte,
    Truncate,
    GarbageLine,
    DropLine,
    SwapLines,
    DuplicateLine,
}

fn file_damage_strategy() -> impl Strategy<Value = FileDamage> {
    prop_oneof![
        4 => Just(FileDamage::FlipByte),
        2 => Just(FileDamage::Truncate),
        1 => Just(FileDamage::GarbageLine),
        2 => Just(FileDamage::DropLine),
        1 => Just(FileDamage::SwapLines),
        1 => Just(FileDamage::DuplicateLine),
    ]
}

/// An export file (JSONL) of a few stored runs, damaged: `verify_export` must fail naming
/// a line, readers must give typed errors, never panic; whatever reads back without an
/// error from a file that verifies must be exactly what was exported.
fn export_damage(seed: u64, how: FileDamage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let store = open(&dir.path().join("db")).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut originals = std::collections::BTreeMap::new();
    for i in 0..3u64 {
        let (run, log) = stored_run(&store, seed.wrapping_add(i)).map_err(TestCaseError::fail)?;
        originals.insert(run, log);
    }
    let path = dir.path().join("export.jsonl");
    let file = std::fs::File::create(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut w = keel_replay::JsonlWriter::new(
        std::io::BufWriter::new(file),
        keel_replay::Redaction::default(),
        serde_json::json!({}),
        1_700_000_000_000_000,
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for run in originals.keys() {
        w.write_run(&store, *run).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    w.finish().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let intact = keel_replay::verify_export(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(intact.ok(), "intact export does not verify: {:?}", intact.failure);

    let bytes = std::fs::read(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut rng = Rng::new(seed ^ 0xe4);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let pick = |rng: &mut Rng, n: usize| rng.below(n as u64) as usize;
    let damaged: Vec<u8> = match how {
        FileDamage::FlipByte => {
            let mut b = bytes.clone();
            let i = pick(&mut rng, b.len());
            b[i] ^= 1 << rng.below(8);
            b
        }
        FileDamage::Truncate => bytes[..pick(&mut rng, bytes.len())].to_vec(),
        FileDamage::GarbageLine => {
            let i = pick(&mut rng, lines.len() + 1);
            lines.insert(i, (0..rng.range(1, 80)).map(|_| (b' ' + rng.below(95) as u8) as char).collect());
            (lines.join("\n") + "\n").into_bytes()
        }
        FileDamage::DropLine => {
            let i = pick(&mut rng, lines.len());
            lines.remove(i);
            (lines.join("\n") + "\n").into_bytes()
        }
        FileDamage::SwapLines => {
            let i = pick(&mut rng, lines.len());
            let j = pick(&mut rng, lines.len());
            lines.swap(i, j);
            (lines.join("\n") + "\n").into_bytes()
        }
        FileDamage::DuplicateLine => {
            let i = pick(&mut rng, lines.len());
            let l = lines[i].clone();
            lines.insert(i, l);
            (lines.join("\n") + "\n").into_bytes()
        }
    };
    prop_assume!(damaged != bytes);
    std::fs::write(&path, &damaged).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let v = keel_replay::verify_export(&path);
        let runs: Option<Vec<_>> = keel_replay::export_runs(&path).ok().map(|it| it.collect());
        (v, runs)
    }));
    let (v, runs) = outcome.map_err(|_| TestCaseError::fail(format!("PANIC reading a damaged export ({how:?})")))?;
    let v = v.map_err(|e| TestCaseError::fail(format!("verify_export: {e}")))?;
    if let Some(f) = &v.failure {
        prop_assert!(f.line.is_some() || f.run.is_some(), "failure names no line or run: {:?}", f);
    }
    if v.ok() {
        // Verified: then what reads back must be exactly what was exported.
        let runs = runs.ok_or_else(|| TestCaseError::fail("verified export does not open"))?;
        let mut got = std::collections::BTreeMap::new();
        for r in runs {
            let (run, events) = r.map_err(|e| TestCaseError::fail(format!("verified export does not read: {e}")))?;
            got.insert(run, events.into_iter().map(|l| (l.seq, l.at_us, l.event)).collect::<Vec<_>>());
        }
        let want: std::collections::BTreeMap<_, _> = originals
            .iter()
            .map(|(r, l)| (*r, l.iter().map(|l| (l.seq, l.at_us, l.event.clone())).collect::<Vec<_>>()))
            .collect();
        prop_assert!(
            got == want,
            "{:?}: a damaged export verifies but reads back different runs ({} vs {} runs)",
            how,
            got.len(),
            want.len()
        );
    } else if let Some(runs) = runs {
        for r in runs {
            if let Err(e) = r {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cfg(48))]

    #[test]
    fn damaged_export_file_fails_verify_naming_a_line_and_never_lies(seed in any::<u64>(), how in file_damage_strategy()) {
        export_damage(seed, how)?;
    }
}
