//! Golden logs: `tests/golden/v1.records` holds record values exactly as a schema-version-1
//! store wrote them, `tests/golden/v2.records` the same runs as schema version 2 wrote them,
//! `tests/golden/v3.records` as schema version 3 (the current version, which stores each
//! record's payload version) writes them. Every future build must still decode (upcast)
//! and verify all of them, and this build must write v3's bytes exactly.
//!
//! Container format (documented in docs/STORE.md):
//! `b"KEELGOLD" || u32_be(1) || u32_be(count) || count x (u32_be(key_len) || key ||
//! u32_be(value_len) || value)`, keys and values exactly as stored in sled.
//!
//! Generate (only when adding a NEW version's file, never to "fix" an existing one):
//! `cargo test -p keel-store --test golden -- --ignored generate_golden` (the v1 and v2
//! files were made the same way by v1 and v2 builds).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{verify_run, Durability, EventLog, RunId, Seq, SledStore, StoreError};
use std::path::PathBuf;

const MAGIC: &[u8; 8] = b"KEELGOLD";

fn golden_path(version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/v{version}.records"))
}

/// The two runs of the golden log and their events.
fn golden_runs() -> Vec<(RunId, Vec<(Ev, i64)>)> {
    let a = RunId::from_bytes(*b"golden-run-A-v1.");
    let b = RunId::from_bytes(*b"golden-run-B-v1.");
    vec![
        (a, (0..7).map(|i| (ev(i), 1_700_000_000_000_000 + i as i64 * 1_000)).collect()),
        (b, vec![(ev(10), -5), (ev(13), 0), (ev(14), i64::MAX)]),
    ]
}

/// Pinned chain heads (hex) of the golden runs: any change to a hash formula fails here.
const HEADS: [&str; 2] = [
    "d9763c8d4d7c436cbae0e3163355a18d973e40a2b5800b4de1c90d4b0178145e",
    "0d68e6b6a414e1bd497e5acad92bdf31272ab48debc2df483a0d49732307d799",
];

/// The same for `v2.records` (record digest v2: also covers the payload bytes).
const HEADS_V2: [&str; 2] = [HEAD_V2_A, HEAD_V2_B];
const HEAD_V2_A: &str = "152a789f181c1e5f59799fbca133547b47d051d58055af13b69ec2fe1f83c576";
const HEAD_V2_B: &str = "9940b1d1c48ad81c47b830e616e6500ec58a79bdfad018a20a63907110311b0d";

/// The same for `v3.records` (record digest v3: also covers the payload version).
const HEADS_V3: [&str; 2] = [HEAD_V3_A, HEAD_V3_B];
const HEAD_V3_A: &str = "f8000816987b98414d767c73b8a89e264436bd37745883d97cb2af98415230cb";
const HEAD_V3_B: &str = "37c8338a9695442615c751da04dd39cded70bb764d1e7f9c59965d8e5c20bc86";

fn write_golden(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn read_golden(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, rest) = b.split_at(n);
        *b = rest;
        head
    }
    fn u32be(b: &mut &[u8]) -> usize {
        u32::from_be_bytes(take(b, 4).try_into().unwrap()) as usize
    }
    let mut b = bytes;
    assert_eq!(take(&mut b, 8), MAGIC);
    assert_eq!(u32be(&mut b), 1);
    let count = u32be(&mut b);
    let mut pairs = Vec::new();
    for _ in 0..count {
        let kl = u32be(&mut b);
        let k = take(&mut b, kl).to_vec();
        let vl = u32be(&mut b);
        let v = take(&mut b, vl).to_vec();
        pairs.push((k, v));
    }
    assert!(b.is_empty(), "trailing bytes in golden file");
    pairs
}

fn write_runs(log: &SledStore) {
    for (r, events) in golden_runs() {
        for (i, (e, t)) in events.iter().enumerate() {
            let rec = keel_store::prepare(e, *t).unwrap();
            log.append(r, Seq(i as u64), vec![rec], None).unwrap();
        }
    }
}

#[test]
#[ignore = "generator: run by hand to create a new version's golden file"]
fn generate_golden() {
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    write_runs(&log);
    let mut pairs = Vec::new();
    for (r, _) in golden_runs() {
        pairs.extend(log.raw_records(r).unwrap());
    }
    let path = golden_path(keel_store::SCHEMA_VERSION);
    assert!(!path.exists(), "{} exists: golden files are never regenerated", path.display());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, write_golden(&pairs)).unwrap();
    for (r, _) in golden_runs() {
        println!("head {r}: {}", hex::encode(log.head(r).unwrap().last_hash));
    }
}

fn load_golden(version: u16) -> (tempfile::TempDir, SledStore, Vec<keel_store::RawPair>) {
    let bytes = std::fs::read(golden_path(version)).expect("golden file committed");
    let pairs = read_golden(&bytes);
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    for (k, v) in &pairs {
        log.raw_insert(k, v).unwrap();
    }
    (dir, log, pairs)
}

#[test]
fn golden_v1_log_decodes_and_verifies_forever() {
    golden_log_decodes_and_verifies(1, HEADS);
}

#[test]
fn golden_v2_log_decodes_and_verifies_forever() {
    golden_log_decodes_and_verifies(2, HEADS_V2);
}

#[test]
fn golden_v3_log_decodes_and_verifies_forever() {
    golden_log_decodes_and_verifies(3, HEADS_V3);
}

fn golden_log_decodes_and_verifies(version: u16, heads: [&str; 2]) {
    let (_dir, log, pairs) = load_golden(version);
    let runs = golden_runs();
    assert_eq!(pairs.len(), runs.iter().map(|(_, e)| e.len()).sum::<usize>());
    assert_eq!(log.runs().unwrap(), runs.iter().map(|(r, _)| *r).collect::<Vec<_>>());
    for ((r, events), pinned) in runs.iter().zip(heads) {
        let (records, err) = read_all(&log, *r, Seq(0));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(records.len(), events.len());
        for (record, (e, t)) in records.iter().zip(events) {
            assert_eq!(record.schema_version, version);
            // Versions 1 and 2 stored no payload version: they read as 1. Version 3 keeps
            // what the domain stated (not 1 for every kind of `Ev`).
            let stated = if version >= 3 { keel_store::Payload::payload_version(e) } else { 1 };
            assert_eq!(record.payload_version(), stated, "{r} seq {}", record.seq);
            assert_eq!(&record.decode::<Ev>().unwrap(), e);
            assert_eq!(&record.decode_verified::<Ev>().unwrap(), e);
            assert_eq!(record.time_us, *t);
            assert_eq!(record.kind, keel_store::Payload::kind(e));
        }
        let report = verify_run::<Ev>(&log, *r).unwrap();
        assert_eq!(report.records, events.len() as u64);
        assert_eq!(hex::encode(report.head), pinned, "chain head of {r}");
    }
}

#[test]
fn this_build_still_writes_v3_byte_for_byte() {
    // True while v3 is the current schema version; when v4 arrives, this moves to v4's file.
    assert_eq!(keel_store::SCHEMA_VERSION, 3);
    let (_dir, _log, pairs) = load_golden(3);
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    write_runs(&log);
    let mut fresh = Vec::new();
    for (r, _) in golden_runs() {
        fresh.extend(log.raw_records(r).unwrap());
    }
    assert_eq!(fresh, pairs);
}

#[test]
fn a_damaged_golden_record_is_named_and_the_prefix_still_reads() {
    let (_dir, log, _pairs) = load_golden(1);
    let (r, events) = &golden_runs()[0];
    let mut v = log.raw_get(*r, Seq(3)).unwrap().unwrap();
    let at = v.len() - 40;
    v[at] ^= 0x10;
    log.raw_put(*r, Seq(3), &v).unwrap();
    let (records, err) = read_all(&log, *r, Seq(0));
    assert_eq!(records.len(), 3);
    for (record, (e, _)) in records.iter().zip(events) {
        assert_eq!(&record.decode::<Ev>().unwrap(), e);
    }
    assert!(matches!(err, Some(StoreError::Corrupted { seq: Seq(3), .. })), "{err:?}");
}
