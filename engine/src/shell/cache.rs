//! The response cache: outputs of `cacheable` tasks, keyed by what determines them.
//!
//! Key = hex SHA-256 over ("keel/cache/v1", handler name, routed model, canonical JSON of
//! the exact [`TaskInput`] handed to the handler). A hit is recorded as
//! `TaskExecuted { cached: true, usage: zero }` without calling the handler.
//!
//! Entries live in memory (bounded) and, when the cache has a store, in the store's
//! auxiliary keyspace (`Coordination::aux_put`, outside every run's chain), so a restarted
//! process still hits. The log stays the truth: a hit is recorded with its output like
//! any execution, and an aux entry lost in a crash only costs a handler call.

use crate::model::fsm::TaskStatus;
use crate::model::state::{RunState, TaskState};
use crate::model::workflow::{Json, TaskInput};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Response cache: bounded in memory (oldest insertions evicted first), persisted in the
/// store's aux keyspace when it has one.
pub struct ResponseCache {
    inner: Mutex<CacheInner>,
    entries_max: usize,
    store: Option<std::sync::Arc<dyn keel_store::Store>>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries_max", &self.entries_max)
            .field("persistent", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

/// Prefix of the cache's keys in the store's aux keyspace.
const AUX_PREFIX: &str = "cache/v1/";

#[derive(Debug, Default)]
struct CacheInner {
    map: BTreeMap<String, (u64, Json)>,
    order: BTreeMap<u64, String>,
    tick: u64,
}

impl ResponseCache {
    /// An in-memory cache of at most `entries_max` outputs (0: disabled).
    pub fn new(entries_max: usize) -> Self {
        ResponseCache { inner: Mutex::new(CacheInner::default()), entries_max, store: None }
    }

    /// A cache that also keeps its entries in `store`'s aux keyspace.
    pub fn with_store(entries_max: usize, store: std::sync::Arc<dyn keel_store::Store>) -> Self {
        ResponseCache { inner: Mutex::new(CacheInner::default()), entries_max, store: Some(store) }
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

    /// The cached output of a call with this key (memory, then the store's aux keyspace).
    pub fn get(&self, key: &str) -> Option<Json> {
        if self.entries_max == 0 {
            return None;
        }
        {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, j)) = inner.map.get(key) {
                return Some(j.clone());
            }
        }
        let store = self.store.as_ref()?;
        let aux = format!("{AUX_PREFIX}{key}");
        match store.aux_get(aux.as_bytes()) {
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                // Only well-formed JSON is served: the aux keyspace is not chained.
                Ok(text) if serde_json::from_str::<serde_json::Value>(&text).is_ok() => {
                    let output = Json(text);
                    self.remember(key.to_owned(), output.clone());
                    Some(output)
                }
                _ => {
                    tracing::warn!(key, "response cache entry in the store is not JSON: ignored");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(key, error = %e, "response cache: store read failed");
                None
            }
        }
    }

    /// Caches an accepted output (in memory, and in the store if the cache has one).
    pub fn insert(&self, key: String, output: Json) {
        if self.entries_max == 0 {
            return;
        }
        if let Some(store) = &self.store {
            let aux = format!("{AUX_PREFIX}{key}");
            if let Err(e) = store.aux_put(aux.as_bytes(), output.0.as_bytes()) {
                tracing::warn!(key = %key, error = %e, "response cache: store write failed");
            }
        }
        self.remember(key, output);
    }

    /// Keeps an entry in memory only.
    fn remember(&self, key: String, output: Json) {
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

    /// Entries in memory.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }

    /// No entry in memory.
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
