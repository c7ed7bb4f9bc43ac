//! Durable-append throughput, next to raw sled inserts with the same flush pattern.
//! Public so a later `keel bench` can reuse it; `examples/store_bench.rs` prints the table.
//!
//! For each durability mode and each number of concurrent runs, one thread per run appends
//! 1-record batches (~300-byte payload, `prepare` included in the timed loop) to a fresh
//! store. The raw baseline runs the same threads on a fresh sled database with the same
//! configuration, inserting values of the same size under the same key shape, followed by
//! the same flush pattern: per insert `flush` (+ `fdatasync` of the data file for
//! `PowerLoss`) for `EveryAppend`, the same group-commit coordinator for `GroupCommit`.
//! Keel and raw alternate in short slices (so a slow period of a shared machine hits both)
//! and each cell is repeated on fresh databases; medians are reported.

use crate::envelope::record;
use crate::error::{sled_err, StoreError};
use crate::log::{prepare, Durability, EventLog, Level, StoreConfig};
use crate::sled::commit::GroupCommit;
use crate::sled::{open_sled, SledStore, Syncer};
use crate::types::{Payload, RunId, Seq};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Parent directory of the temporary stores (default: the system temp dir). Must be on
    /// the disk you want to measure (not tmpfs).
    pub dir: Option<PathBuf>,
    /// Time per measurement and side (keel, raw).
    pub duration: Duration,
    /// Each measurement alternates keel and raw in this many slices of
    /// `duration / slices`, so that a slow period of a shared machine hits both sides.
    pub slices: u32,
    /// Measurements per cell, each on fresh databases (median reported).
    pub repeats: usize,
    /// Concurrent runs (threads).
    pub runs: Vec<usize>,
    /// Durability modes measured, one table section each.
    pub modes: Vec<Durability>,
    /// Target encoded payload size.
    pub payload_bytes: usize,
}

impl BenchConfig {
    /// The full table: 4 modes x {1, 4, 64} runs; per cell 5 repeats of 2 s per side in
    /// 20 alternating slices of 100 ms.
    pub fn full() -> Self {
        BenchConfig {
            dir: None,
            duration: Duration::from_secs(2),
            slices: 20,
            repeats: 5,
            runs: vec![1, 4, 64],
            modes: vec![
                Durability::EveryAppend(Level::PowerLoss),
                Durability::EveryAppend(Level::ProcessCrash),
                Durability::GroupCommit(Level::PowerLoss),
                Durability::GroupCommit(Level::ProcessCrash),
            ],
            payload_bytes: 300,
        }
    }

    /// A smoke run: same cells, 0.4 s per side in 4 slices, 1 repeat.
    pub fn quick() -> Self {
        BenchConfig { duration: Duration::from_millis(400), slices: 4, repeats: 1, ..Self::full() }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Durable appends (or raw inserts) completed.
    pub ops: u64,
    /// Wall time they took, in seconds.
    pub seconds: f64,
    /// Flushes run (group commit only; else equal to ops).
    pub flushes: u64,
}

impl Sample {
    /// Operations per second (0 for a sample of no time).
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// One cell of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// The durability mode of this cell.
    pub durability: Durability,
    /// Concurrent runs (threads) of this cell.
    pub runs: usize,
    /// Median durable appends per second through [`SledStore`].
    pub keel_per_s: f64,
    /// Median raw sled inserts per second with the same flush pattern.
    pub raw_per_s: f64,
    /// Median over repeats of `keel / raw` measured back to back (pairs cancel the slow
    /// drift of a shared disk better than a ratio of medians).
    pub ratio: f64,
    /// Appends per flush in the median keel sample.
    pub keel_ops_per_flush: f64,
    /// Every keel sample (one per repeat).
    pub keel_samples: Vec<Sample>,
    /// Every raw sled sample (one per repeat).
    pub raw_samples: Vec<Sample>,
}

/// The bench payload: an event with an id and ~`payload_bytes` of text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchEvent {
    /// A sequence number.
    pub id: u64,
    /// Filler text of about the configured payload size.
    pub note: String,
}

impl Payload for BenchEvent {
    fn kind(&self) -> &'static str {
        "BenchEvent"
    }
    fn payload_version(&self) -> u16 {
        1
    }
    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.into());
        m.insert("note".into(), self.note.clone().into());
        m
    }
}

fn bench_event(id: u64, payload_bytes: usize) -> BenchEvent {
    BenchEvent { id, note: "x".repeat(payload_bytes.saturating_sub(12)) }
}

fn run_id(i: usize) -> RunId {
    let mut b = [0u8; 16];
    b[8..].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    RunId::from_bytes(b)
}

fn temp_dir(parent: Option<&Path>) -> Result<tempfile::TempDir, StoreError> {
    let b = tempfile::Builder::new().prefix("keel-bench-").to_owned();
    Ok(match parent {
        Some(p) => b.tempdir_in(p)?,
        None => b.tempdir()?,
    })
}

/// Something the bench drives: one operation = one durable append (or raw equivalent).
trait Target: Sync {
    fn op(&self, run: usize, seq: u64) -> Result<(), StoreError>;
    fn flushes(&self) -> u64;
}

struct Keel {
    store: SledStore,
    payload_bytes: usize,
}

impl Target for Keel {
    fn op(&self, run: usize, seq: u64) -> Result<(), StoreError> {
        let rec = prepare(&bench_event(seq, self.payload_bytes), seq as i64)?;
        self.store.append(run_id(run), Seq(seq), vec![rec], None).map(|_| ())
    }
    fn flushes(&self) -> u64 {
        self.store.group_flushes()
    }
}

struct Raw {
    db: sled::Db,
    syncer: Syncer,
    group: GroupCommit,
    /// The store's flush meter (kept so the floor pays what the store pays).
    commits: crate::stats::CommitMeter,
    value: Vec<u8>,
    durability: Durability,
}

impl Target for Raw {
    fn op(&self, run: usize, seq: u64) -> Result<(), StoreError> {
        self.db.insert(&record::event_key(run_id(run), seq)[..], self.value.as_slice()).map_err(sled_err)?;
        match self.durability {
            Durability::None => Ok(()),
            Durability::EveryAppend(level) => self.syncer.sync(level),
            Durability::GroupCommit(level) => self.group.commit(|| self.syncer.sync(level), &self.commits),
        }
    }
    fn flushes(&self) -> u64 {
        self.group.flushes()
    }
}

fn open_keel(dir: &Path, durability: Durability, payload_bytes: usize) -> Result<Keel, StoreError> {
    let store = SledStore::open(dir, StoreConfig { durability, ..StoreConfig::default() })?;
    Ok(Keel { store, payload_bytes })
}

fn open_raw(dir: &Path, durability: Durability, payload_bytes: usize) -> Result<Raw, StoreError> {
    let db = open_sled(dir, StoreConfig::default().cache_capacity_bytes)?;
    let syncer = Syncer { db: db.clone(), data_file: std::fs::File::open(dir.join("db"))? };
    Ok(Raw {
        db,
        syncer,
        group: GroupCommit::new(),
        commits: crate::stats::CommitMeter::default(),
        value: vec![0x5a; record_value_len(payload_bytes)?],
        durability,
    })
}

/// Size of the stored value of one bench record (for the raw baseline).
fn record_value_len(payload_bytes: usize) -> Result<usize, StoreError> {
    let rec = prepare(&bench_event(0, payload_bytes), 0)?;
    let (values, _) = record::build_batch(run_id(0), &crate::log::Head::empty(), vec![rec])?;
    Ok(values.first().map(|(_, v)| v.len()).unwrap_or(0))
}

/// Runs one thread per run for `duration`, each continuing its run at `next[run]`.
/// Returns ops done and seconds from the common start to the last thread's end.
fn drive(target: &dyn Target, next: &[AtomicU64], duration: Duration) -> Result<(u64, f64), StoreError> {
    let start = Barrier::new(next.len() + 1);
    let (results, t0) = std::thread::scope(|s| {
        let handles: Vec<_> = next
            .iter()
            .enumerate()
            .map(|(run, next_seq)| {
                let start = &start;
                s.spawn(move || -> Result<(u64, Instant), StoreError> {
                    start.wait();
                    let t0 = Instant::now();
                    let mut n = 0u64;
                    while t0.elapsed() < duration {
                        target.op(run, next_seq.load(Ordering::Relaxed))?;
                        next_seq.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    Ok((n, Instant::now()))
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let results: Vec<Result<(u64, Instant), StoreError>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Panicked("bench thread".into()))))
            .collect();
        (results, t0)
    });
    let mut ops = 0;
    let mut end = t0;
    for r in results {
        let (n, finished) = r?;
        ops += n;
        end = end.max(finished);
    }
    Ok((ops, end.duration_since(t0).as_secs_f64()))
}

/// One paired measurement on fresh databases in the empty directories `keel_dir` and
/// `raw_dir`: `slices` alternating slices of `duration / slices` per side.
pub fn measure_pair(
    keel_dir: &Path,
    raw_dir: &Path,
    durability: Durability,
    runs: usize,
    duration: Duration,
    slices: u32,
    payload_bytes: usize,
) -> Result<(Sample, Sample), StoreError> {
    let keel = open_keel(keel_dir, durability, payload_bytes)?;
    let raw = open_raw(raw_dir, durability, payload_bytes)?;
    let slices = slices.max(1);
    let slice = duration / slices;
    let keel_next: Vec<AtomicU64> = (0..runs).map(|_| AtomicU64::new(0)).collect();
    let raw_next: Vec<AtomicU64> = (0..runs).map(|_| AtomicU64::new(0)).collect();
    let (mut k, mut r) = ((0u64, 0f64), (0u64, 0f64));
    for i in 0..slices {
        let side = |t: &dyn Target, next: &[AtomicU64], acc: &mut (u64, f64)| {
            drive(t, next, slice).map(|(ops, secs)| {
                acc.0 += ops;
                acc.1 += secs;
            })
        };
        if i % 2 == 0 {
            side(&keel, &keel_next, &mut k)?;
            side(&raw, &raw_next, &mut r)?;
        } else {
            side(&raw, &raw_next, &mut r)?;
            side(&keel, &keel_next, &mut k)?;
        }
    }
    let flushes = |t: &dyn Target, ops| match durability {
        Durability::GroupCommit(_) => t.flushes(),
        _ => ops,
    };
    Ok((
        Sample { ops: k.0, seconds: k.1, flushes: flushes(&keel, k.0) },
        Sample { ops: r.0, seconds: r.1, flushes: flushes(&raw, r.0) },
    ))
}

fn median(samples: &[Sample]) -> Sample {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    v.get(v.len() / 2).copied().unwrap_or(Sample { ops: 0, seconds: 0.0, flushes: 0 })
}

/// Runs the whole table. `progress` is called after each cell.
///
/// Every measurement gets fresh directories; all are deleted only at the end, because
/// deleting large files on a filesystem mounted with `discard` stalls the I/O of whatever
/// is measured next.
pub fn run(config: &BenchConfig, mut progress: impl FnMut(&BenchRow)) -> Result<Vec<BenchRow>, StoreError> {
    let root = temp_dir(config.dir.as_deref())?;
    let mut next_dir = 0usize;
    let mut fresh = || -> Result<PathBuf, StoreError> {
        next_dir += 1;
        let d = root.path().join(format!("m{next_dir}"));
        std::fs::create_dir(&d)?;
        Ok(d)
    };
    let mut rows = Vec::new();
    for &durability in &config.modes {
        for &runs in &config.runs {
            let mut keel = Vec::new();
            let mut raw = Vec::new();
            let mut ratios = Vec::new();
            for _ in 0..config.repeats.max(1) {
                let (k, r) = measure_pair(
                    &fresh()?,
                    &fresh()?,
                    durability,
                    runs,
                    config.duration,
                    config.slices,
                    config.payload_bytes,
                )?;
                if r.per_second() > 0.0 {
                    ratios.push(k.per_second() / r.per_second());
                }
                keel.push(k);
                raw.push(r);
            }
            let km = median(&keel);
            let rm = median(&raw);
            ratios.sort_by(f64::total_cmp);
            let row = BenchRow {
                durability,
                runs,
                keel_per_s: km.per_second(),
                raw_per_s: rm.per_second(),
                ratio: ratios.get(ratios.len() / 2).copied().unwrap_or(0.0),
                keel_ops_per_flush: if km.flushes > 0 { km.ops as f64 / km.flushes as f64 } else { 0.0 },
                keel_samples: keel,
                raw_samples: raw,
            };
            progress(&row);
            rows.push(row);
        }
    }
    drop(root);
    Ok(rows)
}

/// Short name of a durability mode.
pub fn mode_name(d: Durability) -> &'static str {
    match d {
        Durability::None => "none",
        Durability::EveryAppend(Level::PowerLoss) => "every-append, power-loss",
        Durability::EveryAppend(Level::ProcessCrash) => "every-append, process-crash",
        Durability::GroupCommit(Level::PowerLoss) => "group-commit, power-loss",
        Durability::GroupCommit(Level::ProcessCrash) => "group-commit, process-crash",
    }
}

/// A Markdown table of the rows.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| durability | runs | keel appends/s | raw sled inserts/s | keel/raw | target | appends/flush |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let target = match r.durability {
            Durability::EveryAppend(_) => ">= 90%",
            Durability::GroupCommit(_) => ">= 80%",
            Durability::None => "-",
        };
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0}% | {} | {:.1} |\n",
            mode_name(r.durability),
            r.runs,
            r.keel_per_s,
            r.raw_per_s,
            r.ratio * 100.0,
            target,
            r.keel_ops_per_flush,
        ));
    }
    out
}

/// The record values of a sealed run's stored value (`key` the 17-byte run prefix key),
/// for a raw scan that reads sled directly (docs/STORE.md 2.1).
pub fn sealed_record_values(key: &[u8], value: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    crate::kv::sealed::decode(key, value).map(|r| r.into_values().collect())
}
