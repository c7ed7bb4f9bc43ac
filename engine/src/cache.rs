//! The response cache: outputs of `cacheable` tasks, keyed by what determines them.
//!
//! Key = hex SHA-256 over ("keel/cache/v1", handler name, routed model, canonical JSON of
//! the exact [`TaskInput`] handed to the handler). A hit is recorded as
//! `TaskExecuted { cached: true, usage: zero }` without calling the handler.
//!
//! Current limit: the cache lives in memory. It is filled as runs are driven and from the
//! runs folded at resume; it is not persisted across process restarts.

use crate::fsm::TaskStatus;
use crate::model::{Json, TaskInput};
use crate::state::{RunState, TaskState};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// In-memory response cache (bounded: oldest insertions are evicted first).
#[derive(Debug)]
pub struct ResponseCache {
    inner: Mutex<CacheInner>,
    entries_max: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: BTreeMap<String, (u64, Json)>,
    order: BTreeMap<u64, String>,
    tick: u64,
}

impl ResponseCache {
    pub fn new(entries_max: usize) -> Self {
        ResponseCache { inner: Mutex::new(CacheInner::default()), entries_max }
    }

    /// The cache key of a call.
    pub fn key(handler: &str, model: Option<&str>, input: &TaskInput) -> String {
        let input_json = serde_json::to_value(input).unwrap_or(serde_json::Value::Null);
        let canonical = Json::new(&input_json);
        let mut h = Sha256::new();
        for part in
            [b"keel/cache/v1".as_slice(), handler.as_bytes(), model.unwrap_or("").as_bytes(), canonical.0.as_bytes()]
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        hex::encode(h.finalize())
    }

    pub fn get(&self, key: &str) -> Option<Json> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.map.get(key).map(|(_, j)| j.clone())
    }

    pub fn insert(&self, key: String, output: Json) {
        if self.entries_max == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.map.contains_key(&key) {
            return;
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, key.clone());
        inner.map.insert(key, (tick, output));
        while inner.map.len() > self.entries_max {
            let Some((_, oldest)) = inner.order.pop_first() else { break };
            inner.map.remove(&oldest);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills the cache from a folded run: every cacheable task whose output was accepted
    /// (Done) and was produced by its handler (not itself a cache hit).
    pub fn fill_from(&self, state: &RunState) {
        for t in &state.tasks {
            if let Some((key, out)) = Self::entry_of(t) {
                self.insert(key, out);
            }
        }
    }

    fn entry_of(t: &TaskState) -> Option<(String, Json)> {
        if !t.spec.cacheable || t.status != TaskStatus::Done || t.cached {
            return None;
        }
        let input = t.input.as_ref()?;
        let output = t.output.clone()?;
        Some((Self::key(&t.spec.handler, t.model.as_deref(), input), output))
    }
}
