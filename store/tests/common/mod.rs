//! Shared test payloads and helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs, dead_code)]

use keel_store::{prepare, Durability, EventLog, NewRecord, Payload, Record, RunId, Seq, SledStore, StoreConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Several payload kinds, as an engine would have.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Ev {
    Accepted { request: String, budget_micros: u64, priority: i8 },
    Planned { revision: u32, tasks: Vec<String> },
    Executed { task: String, output: String, cost_micros: u64, cached: bool },
    Failed { task: String, class: String },
    Completed { result: Option<String> },
}

impl Payload for Ev {
    fn kind(&self) -> &'static str {
        match self {
            Ev::Accepted { .. } => "Accepted",
            Ev::Planned { .. } => "Planned",
            Ev::Executed { .. } => "Executed",
            Ev::Failed { .. } => "Failed",
            Ev::Completed { .. } => "Completed",
        }
    }
    /// Not 1 for every kind, so the tests see the store keep what the domain states.
    fn payload_version(&self) -> u16 {
        match self {
            Ev::Planned { .. } => 2,
            Ev::Failed { .. } => 7,
            _ => 1,
        }
    }
    fn fields(&self) -> Map<String, Value> {
        let v = match self {
            Ev::Accepted { request, budget_micros, priority } => {
                json!({"request": request, "budget_micros": budget_micros, "priority": priority})
            }
            Ev::Planned { revision, tasks } => json!({"revision": revision, "tasks": tasks}),
            Ev::Executed { task, output, cost_micros, cached } => {
                json!({"task": task, "output": output, "cost_micros": cost_micros, "cached": cached})
            }
            Ev::Failed { task, class } => json!({"task": task, "class": class}),
            Ev::Completed { result } => json!({"result": result}),
        };
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }
}

/// A second, unrelated payload type (decoding an `Ev` record as it must fail cleanly).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Blob {
    pub bytes: Vec<u8>,
}

impl Payload for Blob {
    fn kind(&self) -> &'static str {
        "Blob"
    }
    fn payload_version(&self) -> u16 {
        1
    }
    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("bytes".into(), json!(hex::encode(&self.bytes)));
        m
    }
}

pub fn run(n: u8) -> RunId {
    RunId::from_bytes([n; 16])
}

/// The i-th event of a deterministic sample history.
pub fn ev(i: u64) -> Ev {
    match i % 5 {
        0 => Ev::Accepted { request: format!("req-{i} ✓ \"quoted\"\n"), budget_micros: 1_000 * i, priority: -3 },
        1 => Ev::Planned { revision: i as u32, tasks: vec!["fetch".into(), format!("t{i}")] },
        2 => Ev::Executed { task: format!("t{i}"), output: "o".repeat(200), cost_micros: i, cached: i & 1 == 0 },
        3 => Ev::Failed { task: format!("t{i}"), class: "transient".into() },
        _ => Ev::Completed { result: (i & 1 == 0).then(|| "ok".to_string()) },
    }
}

pub fn rec(i: u64) -> NewRecord {
    prepare(&ev(i), 1_700_000_000_000_000 + i as i64).unwrap()
}

pub fn config(durability: Durability) -> StoreConfig {
    StoreConfig { durability, ..StoreConfig::default() }
}

pub fn open(dir: &Path, durability: Durability) -> SledStore {
    SledStore::open(dir, config(durability)).unwrap()
}

/// Opens the store once its lock is free: sled releases a dropped handle's file lock from
/// its own background thread, so a second process (or handle) opening right after a drop
/// may find it still held for a moment on a loaded machine. Waits at most 10 s.
pub fn open_when_free(dir: &Path, config: StoreConfig) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledStore::open(dir, config.clone()) {
            Err(keel_store::StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
}

/// Appends events `0..n` to `run` one by one.
pub fn fill(log: &dyn EventLog, run: RunId, n: u64) {
    for i in 0..n {
        log.append(run, Seq(i), vec![rec(i)], None).unwrap();
    }
}

/// Reads a run: the good records and the error that ended it, if any.
pub fn read_all(log: &dyn EventLog, run: RunId, from: Seq) -> (Vec<Record>, Option<keel_store::StoreError>) {
    let mut ok = Vec::new();
    for r in log.read(run, from).unwrap() {
        match r {
            Ok(r) => ok.push(r),
            Err(e) => return (ok, Some(e)),
        }
    }
    (ok, None)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("keel-store-test-").tempdir().unwrap()
}
