//! In-memory backend with the same semantics as the sled one (same keys, same bytes, same
//! checks), for tests. Nothing is durable.

use crate::coordination::{Coordination, Fence};
#[cfg(feature = "testing")]
use crate::envelope::record;
use crate::error::StoreError;
use crate::kv::sealed::Sealing;
use crate::kv::{Core, Kv, KvIter, KvPair, Written};
use crate::log::{Claim, Durability, EventLog, Head, Limits, NewRecord, RecordIter, RunRecords};
use crate::types::{RunId, Seq};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

#[derive(Default)]
pub(crate) struct MemKv {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemKv {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Kv for MemKv {
    type Buf = Vec<u8>;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    fn range(&self, lo: &[u8], hi: &[u8]) -> Result<KvIter<Vec<u8>>, StoreError> {
        let items: Vec<Result<KvPair, StoreError>> = self
            .lock()
            .range::<[u8], _>((Bound::Included(lo), Bound::Included(hi)))
            .map(|(k, v)| Ok((k.clone(), v.clone())))
            .collect();
        Ok(Box::new(items.into_iter()))
    }

    fn last_in(&self, lo: &[u8], hi: &[u8]) -> Result<Option<KvPair>, StoreError> {
        Ok(self
            .lock()
            .range::<[u8], _>((Bound::Included(lo), Bound::Included(hi)))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn first_key_after(&self, after: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().range::<[u8], _>((Bound::Excluded(after), Bound::Unbounded)).next().map(|(k, _)| k.clone()))
    }

    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        let mut map = self.lock();
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }
}

/// In-memory [`EventLog`] (tests). `durability()` is `Durability::None`.
pub struct MemStore {
    core: Core<Sealing<MemKv>>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store with the default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty store enforcing `limits` (taken as given: `SledStore::open` validates its
    /// configured limits, a test store may want any).
    pub fn with_limits(limits: Limits) -> Self {
        MemStore { core: Core::new(Sealing { inner: MemKv::default() }, limits) }
    }

    /// TEST HOOK: the stored value of record `(run, seq)`.
    #[cfg(feature = "testing")]
    pub fn raw_get(&self, run: RunId, seq: Seq) -> Result<Option<Vec<u8>>, StoreError> {
        self.core.raw_get(&record::event_key(run, seq.0))
    }

    /// TEST HOOK: overwrites the stored value of record `(run, seq)` (no checks).
    #[cfg(feature = "testing")]
    pub fn raw_put(&self, run: RunId, seq: Seq, value: &[u8]) -> Result<(), StoreError> {
        self.core.raw_write(&record::event_key(run, seq.0), Some(value))
    }

    /// TEST HOOK: overwrites chunk `index` of payload `digest` (no checks).
    #[cfg(feature = "testing")]
    pub fn raw_put_payload_chunk(&self, digest: &crate::Hash32, index: u32, value: &[u8]) -> Result<(), StoreError> {
        self.core.raw_write(&crate::payloads::chunk_key(digest, index), Some(value))
    }

    /// TEST HOOK: deletes record `(run, seq)` (no checks).
    #[cfg(feature = "testing")]
    pub fn raw_remove(&self, run: RunId, seq: Seq) -> Result<(), StoreError> {
        self.core.raw_write(&record::event_key(run, seq.0), None)
    }
}

impl EventLog for MemStore {
    fn append(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, None, Vec::new())
    }

    // read, head, runs, scan, limits: the shared core's.
    crate::kv::delegate_log!();

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn durability(&self) -> Durability {
        Durability::None
    }

    fn read_runs<'a>(&'a self, runs: &'a [RunId]) -> RunRecords<'a> {
        crate::log::read_runs_in_turn(self, runs)
    }
}

impl MemStore {
    fn write(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        match self.core.write(run, expected, records, claim, fence, aux)? {
            Written::Ok(head) => Ok(head),
            Written::Duplicate(existing) => Err(StoreError::DuplicateKey { existing }),
        }
    }
}

impl crate::Payloads for MemStore {
    crate::kv::delegate_payloads!();
}

impl Coordination for MemStore {
    fn seal_runs(&self, runs: &[RunId]) -> Result<usize, StoreError> {
        self.core.seal_runs(runs)
    }

    fn append_fenced(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, Some(fence), Vec::new())
    }

    fn append_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, None, aux)
    }

    fn append_fenced_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, Some(fence), aux)
    }

    fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<crate::Hash32>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<(), StoreError> {
        self.core.remove_run(run, expected, payloads, aux)
    }

    // Leases, claims lookup, snapshots, aux, due times: the shared core's.
    crate::kv::delegate_coordination!();
}
