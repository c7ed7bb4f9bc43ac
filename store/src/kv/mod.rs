//! Backend-independent store logic over a minimal ordered key-value map ([`Kv`]): OCC
//! append with a per-run head cache, claims, reads, snapshots. [`crate::SledStore`] and
//! [`crate::MemStore`] are both a `Core` over their map, so they share every semantic.

pub(crate) mod mem;
pub(crate) mod sealed;

use crate::coordination::{Fence, Lease, LeaseTable};
use crate::envelope::codec::{self, SnapshotV1};
use crate::envelope::record::{self, Records};
use crate::error::StoreError;
use crate::log::{Claim, Head, Limits, NewRecord, RecordIter};
use crate::payloads::{self, PayloadRef};
use crate::types::{Hash32, RunId, Seq};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

pub(crate) type KvPair = (Vec<u8>, Vec<u8>);
/// Writes applied atomically by [`Kv::apply`]: `(key, Some(value))` puts, `(key, None)`
/// removes.
pub(crate) type KvWrites = Vec<(Vec<u8>, Option<Vec<u8>>)>;
/// The pairs of a range scan, in the backend's own buffers (sled's reference-counted ones:
/// no copy of the value per record; replay reads every record of a run through here).
pub(crate) type KvIter<B> = Box<dyn Iterator<Item = Result<(B, B), StoreError>> + Send + 'static>;

/// The ordered map a backend provides. The shared logic names no backend type: a range
/// scan hands out the backend's buffer type `Buf`.
pub(crate) trait Kv: Send + Sync + 'static {
    /// A key or value as a range scan hands it out.
    type Buf: AsRef<[u8]> + Send + 'static;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Pairs with `lo <= key <= hi`, ascending, streaming.
    fn range(&self, lo: &[u8], hi: &[u8]) -> Result<KvIter<Self::Buf>, StoreError>;
    /// The last pair with `lo <= key <= hi`.
    fn last_in(&self, lo: &[u8], hi: &[u8]) -> Result<Option<KvPair>, StoreError>;
    /// The first key strictly greater than `after`.
    fn first_key_after(&self, after: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies all writes atomically (`None` removes).
    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StoreError>;
    /// Writes one key (atomic by itself). Default: [`Kv::apply`].
    fn insert(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.apply(vec![(key.to_vec(), Some(value))])
    }
    /// [`Kv::apply`] of an append: every record key written is above its run's head (so
    /// above any sealed record). Default: [`Kv::apply`].
    fn apply_above_head(&self, writes: KvWrites) -> Result<(), StoreError> {
        self.apply(writes)
    }
    /// [`Kv::insert`] of an append's one record (above its run's head). Default: [`Kv::insert`].
    fn insert_above_head(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.insert(key, value)
    }
    /// Stores each run's records as one value ([`sealed::Sealing`]), in one atomic write;
    /// returns how many runs were sealed (0 for a map without sealing; a run with nothing
    /// loose, or too large, is left as it is).
    fn seal(&self, _runs: &[RunId]) -> Result<usize, StoreError> {
        Ok(0)
    }
    /// A reader of single keys that outlives the call ([`sealed::Expand`] reads a run's
    /// sealed value again with it); `None` (the default) for a map whose range scans are
    /// snapshots.
    fn getter(&self) -> Option<sealed::Getter> {
        None
    }
}

/// Above this many cached heads, heads not in use are dropped (they reload from the map).
const HEAD_CACHE_MAX: usize = 65_536;

type Slot = Arc<Mutex<Option<Head>>>;

pub(crate) struct Core<K> {
    pub(crate) kv: K,
    pub(crate) limits: Limits,
    /// Per-run cached head. The slot's mutex serializes appends of one run (OCC check +
    /// write); `None` means "load from the map".
    heads: RwLock<HashMap<RunId, Slot>>,
    /// Held across claim check + write so two runs cannot both take one key.
    claims: Mutex<()>,
    /// Leases and their epochs (see `Coordination::try_lease`); fenced appends check it.
    pub(crate) leases: Arc<LeaseTable>,
    /// Held across the read-modify-write of a run's due time.
    due: Mutex<()>,
    /// Held across the read-modify-write of counter adds (`crate::COUNTER_PREFIX`): they
    /// are shared by every run, so the slot lock of one run does not cover them.
    counters: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Outcome of the write phase of an append, before durability.
pub(crate) enum Written {
    Ok(Head),
    /// The key is held by `existing`; nothing written. The caller makes the holder's write
    /// durable before reporting it.
    Duplicate(RunId),
}

impl<K: Kv> Core<K> {
    pub(crate) fn new(kv: K, limits: Limits) -> Self {
        Core {
            kv,
            limits,
            heads: RwLock::new(HashMap::new()),
            claims: Mutex::new(()),
            leases: Default::default(),
            due: Mutex::new(()),
            counters: Mutex::new(()),
        }
    }

    fn slot(&self, run: RunId) -> Slot {
        // Fast path: a shared lock, so appenders of different runs do not queue here.
        if let Some(s) = self.heads.read().unwrap_or_else(PoisonError::into_inner).get(&run) {
            return s.clone();
        }
        let mut map = self.heads.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(&run) {
            return s.clone();
        }
        if map.len() >= HEAD_CACHE_MAX {
            // A slot only referenced by the map has no append or read in flight.
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        let s: Slot = Arc::new(Mutex::new(None));
        map.insert(run, s.clone());
        s
    }

    /// Locks a run's slot; a slot poisoned by a panic mid-append is reset so the head is
    /// reloaded from what was actually written.
    fn lock_slot(slot: &Slot) -> MutexGuard<'_, Option<Head>> {
        match slot.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                *g = None;
                slot.clear_poison();
                g
            }
        }
    }

    fn load_head(&self, run: RunId) -> Result<Head, StoreError> {
        let lo = record::event_key(run, 0);
        let hi = record::event_key(run, u64::MAX);
        let last = self.kv.last_in(&lo, &hi)?;
        record::head_from_last(run, last.as_ref().map(|(k, v)| (k.as_slice(), v.as_slice())))
    }

    /// Drops every cached head (they reload from the map); used after raw writes.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn forget_heads(&self) {
        let map = self.heads.read().unwrap_or_else(PoisonError::into_inner);
        for slot in map.values() {
            *Self::lock_slot(slot) = None;
        }
    }

    /// Write phase of an append (validation, fence, OCC, claim, atomic write). With a
    /// `fence`, the lease table stays locked from the epoch check to the end of the write,
    /// so no lease can change in between.
    pub(crate) fn write(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Written, StoreError> {
        record::validate_append(run, &records, claim.as_ref(), &self.limits)?;
        let aux = self.aux_writes(aux)?;
        let _leases = match fence {
            None => None,
            Some(f) => {
                let runs = self.leases.lock();
                if f.run != run {
                    return Err(StoreError::Fenced { run, fence: f.epoch, current: 0 });
                }
                LeaseTable::check(&runs, f)?;
                Some(runs)
            }
        };
        let slot = self.slot(run);
        let mut cached = Self::lock_slot(&slot);
        let head: &Head = match &mut *cached {
            Some(h) => h,
            empty @ None => empty.insert(self.load_head(run)?),
        };
        if expected != head.next_seq {
            return Err(StoreError::Conflict { run, expected, actual: head.next_seq });
        }
        let (mut values, new_head) = record::build_batch(run, head, records)?;
        let result = match claim {
            None if !aux.is_empty() => {
                let mut writes = Self::event_writes(run, values);
                writes.extend(aux);
                self.apply_counted(writes, true)
            }
            // A single key needs no batch: sled's apply_batch takes a process-wide write
            // lock and rolls the I/O buffer twice (see docs/STORE.md), a plain insert does not.
            None if values.len() == 1 => match values.pop() {
                Some((seq, v)) => self.kv.insert_above_head(&record::event_key(run, seq), v),
                None => Ok(()),
            },
            None => self.kv.apply_above_head(Self::event_writes(run, values)),
            Some(c) => {
                let _claims = lock(&self.claims);
                let ck = record::claim_key(&c.key);
                let existing = self.kv.get(&ck)?;
                match record::check_claim(existing.as_deref(), run, &c) {
                    Err(StoreError::DuplicateKey { existing }) => return Ok(Written::Duplicate(existing)),
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
                let mut writes = Self::event_writes(run, values);
                writes.push((ck, Some(record::claim_value(run, c.expires_at_us).to_vec())));
                writes.extend(aux);
                self.apply_counted(writes, true)
            }
        };
        match result {
            Ok(()) => {
                let out = new_head.clone();
                *cached = Some(new_head);
                Ok(Written::Ok(out))
            }
            Err(e) => {
                // What reached the map is unknown: reload on next use.
                *cached = None;
                Err(e)
            }
        }
    }

    fn event_writes(run: RunId, values: record::SealedBatch) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        values.into_iter().map(|(seq, v)| (record::event_key(run, seq).to_vec(), Some(v))).collect()
    }

    /// [`crate::Coordination::seal_runs`]: under the runs' slot locks (taken in run order;
    /// nothing else holds two), so no append of them interleaves (no head changes).
    pub(crate) fn seal_runs(&self, runs: &[RunId]) -> Result<usize, StoreError> {
        let mut runs = runs.to_vec();
        runs.sort_unstable();
        runs.dedup();
        let slots: Vec<Slot> = runs.iter().map(|r| self.slot(*r)).collect();
        let _held: Vec<_> = slots.iter().map(Self::lock_slot).collect();
        self.kv.seal(&runs)
    }

    pub(crate) fn head(&self, run: RunId) -> Result<Head, StoreError> {
        let slot = self.slot(run);
        let mut cached = Self::lock_slot(&slot);
        if let Some(h) = cached.as_ref() {
            return Ok(h.clone());
        }
        let h = self.load_head(run)?;
        *cached = Some(h.clone());
        Ok(h)
    }

    pub(crate) fn stored_hash(&self, run: RunId, seq: u64) -> Result<Option<Hash32>, StoreError> {
        match self.kv.get(&record::event_key(run, seq))? {
            None => Ok(None),
            Some(v) => Ok(Some(record::decode_record(run, Seq(seq), &v)?.hash)),
        }
    }

    pub(crate) fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        let lo = record::event_key(run, from.0);
        let hi = record::event_key(run, u64::MAX);
        let prev = match from.0.checked_sub(1) {
            None => [0u8; 32],
            Some(p) => match self.stored_hash(run, p) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    // Reading past the end is empty; a missing predecessor of stored records
                    // is a gap.
                    if self.kv.last_in(&lo, &hi)?.is_none() {
                        return Ok(Box::new(std::iter::empty()));
                    }
                    return Ok(Box::new(std::iter::once(Err(StoreError::Corrupted {
                        run,
                        seq: Seq(p),
                        reason: "broken link: record missing before the read start (record \
                                 removed)"
                            .into(),
                    }))));
                }
                Err(e) => return Ok(Box::new(std::iter::once(Err(e)))),
            },
        };
        let src = self.kv.range(&lo, &hi)?;
        Ok(Box::new(Records::new(run, src, from, prev, true)))
    }

    pub(crate) fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        let lo = record::event_key(run, from.0);
        let hi = record::event_key(run, u64::MAX);
        let prev = match from.0.checked_sub(1) {
            None => [0u8; 32],
            Some(p) => self.stored_hash(run, p).ok().flatten().unwrap_or([0u8; 32]),
        };
        let src = self.kv.range(&lo, &hi)?;
        Ok(Box::new(Records::new(run, src, from, prev, false)))
    }

    pub(crate) fn runs(&self) -> Result<Vec<RunId>, StoreError> {
        self.runs_from(vec![record::EVENT_PREFIX], None)
    }

    /// [`crate::EventLog::runs_between`]: a skip scan from `lo`'s first key to past `hi`.
    pub(crate) fn runs_between(&self, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
        // Strictly before every key of `lo` (they are longer), after every run below it.
        self.runs_from(record::run_prefix(lo).to_vec(), Some(hi))
    }

    /// The runs whose event keys follow `after`, up to `last` (every one if `None`).
    fn runs_from(&self, mut after: Vec<u8>, last: Option<RunId>) -> Result<Vec<RunId>, StoreError> {
        let mut out = Vec::new();
        while let Some(k) = self.kv.first_key_after(&after)? {
            match record::parse_event_key(&k) {
                Some((run, _)) if last.is_some_and(|hi| run > hi) => break,
                Some((run, _)) => {
                    out.push(run);
                    after = record::event_key(run, u64::MAX).to_vec();
                }
                None if k.first() == Some(&record::EVENT_PREFIX) => {
                    // A malformed event key (tampering): skip past it.
                    after = k;
                }
                None => break,
            }
        }
        Ok(out)
    }

    pub(crate) fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if key.len() > self.limits.key_bytes_max {
            return Err(StoreError::TooLarge { what: "aux key", bytes: key.len(), max: self.limits.key_bytes_max });
        }
        self.kv.get(&record::aux_key(key))
    }

    pub(crate) fn aux_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if key.len() > self.limits.key_bytes_max {
            return Err(StoreError::TooLarge { what: "aux key", bytes: key.len(), max: self.limits.key_bytes_max });
        }
        if value.len() > self.limits.event_bytes_max {
            return Err(StoreError::TooLarge {
                what: "aux value",
                bytes: value.len(),
                max: self.limits.event_bytes_max,
            });
        }
        self.kv.insert(&record::aux_key(key), value.to_vec())
    }

    /// `aux` checked against the limits, with the backend's aux prefix on each key.
    fn aux_writes(&self, aux: Vec<crate::AuxWrite>) -> Result<KvWrites, StoreError> {
        if aux.len() > self.limits.batch_records_max {
            return Err(StoreError::TooLarge {
                what: "aux writes",
                bytes: aux.len(),
                max: self.limits.batch_records_max,
            });
        }
        let mut out = Vec::with_capacity(aux.len());
        for (key, value) in aux {
            if key.len() > self.limits.key_bytes_max {
                return Err(StoreError::TooLarge { what: "aux key", bytes: key.len(), max: self.limits.key_bytes_max });
            }
            if let Some(v) = &value {
                if v.len() > self.limits.event_bytes_max {
                    return Err(StoreError::TooLarge {
                        what: "aux value",
                        bytes: v.len(),
                        max: self.limits.event_bytes_max,
                    });
                }
            }
            out.push((record::aux_key(&key), value));
        }
        Ok(out)
    }

    pub(crate) fn aux_apply(&self, aux: Vec<crate::AuxWrite>) -> Result<(), StoreError> {
        let writes = self.aux_writes(aux)?;
        if writes.is_empty() {
            return Ok(());
        }
        self.apply_counted(writes, false)
    }

    /// Applies `writes` atomically, counter adds (`crate::COUNTER_PREFIX`) turned into puts
    /// of their new sums: read, summed and written under the counter lock, so adds from
    /// concurrent writes of any runs sum exactly. Writes to one key apply in order.
    /// `above_head`: an append's writes ([`Kv::apply_above_head`]).
    fn apply_counted(&self, mut writes: KvWrites, above_head: bool) -> Result<(), StoreError> {
        let apply = |w: KvWrites| if above_head { self.kv.apply_above_head(w) } else { self.kv.apply(w) };
        let user = |k: &[u8]| k.split_first().filter(|(p, _)| **p == record::AUX_PREFIX).map(|(_, rest)| rest.to_vec());
        let counted = |k: &[u8]| user(k).is_some_and(|u| u.starts_with(crate::COUNTER_PREFIX));
        if !writes.iter().any(|(k, _)| counted(k)) {
            return apply(writes);
        }
        let _counters = lock(&self.counters);
        let mut sums: HashMap<Vec<u8>, i64> = HashMap::new();
        for (k, v) in writes.iter_mut() {
            let Some(u) = user(k).filter(|u| u.starts_with(crate::COUNTER_PREFIX)) else { continue };
            match crate::counter_delta(&u, v.as_deref()) {
                Some(d) => {
                    let cur = match sums.get(k.as_slice()) {
                        Some(x) => *x,
                        None => self.kv.get(k)?.map_or(0, |b| crate::counter_value(&b)),
                    };
                    let sum = cur.wrapping_add(d);
                    sums.insert(k.clone(), sum);
                    *v = Some(sum.to_be_bytes().to_vec());
                }
                None if v.is_none() => {
                    sums.insert(k.clone(), 0);
                }
                None => {}
            }
        }
        apply(writes)
    }

    pub(crate) fn aux_range(&self, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<crate::AuxEntry>, StoreError> {
        let (lo, hi) = (record::aux_key(lo), record::aux_key(hi));
        let mut out = Vec::new();
        if lo > hi || limit == 0 {
            return Ok(out);
        }
        for pair in self.kv.range(&lo, &hi)?.take(limit) {
            let (k, v) = pair?;
            let key = k.as_ref().get(1..).unwrap_or_default().to_vec();
            out.push((key, v.as_ref().to_vec()));
        }
        Ok(out)
    }

    pub(crate) fn try_lease(
        &self,
        run: RunId,
        owner: &str,
        ttl_ms: u64,
        now_us: i64,
    ) -> Result<Option<Lease>, StoreError> {
        self.leases.try_lease(run, owner, ttl_ms, now_us)
    }

    pub(crate) fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        Ok(self.leases.renew(lease, ttl_ms, now_us))
    }

    pub(crate) fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.leases.release(lease.run(), lease.epoch());
        Ok(())
    }

    /// [`crate::Coordination::remove_run`]: the run's records, snapshot, due time and the
    /// given payloads removed and `aux` applied in one atomic write, under the run's slot
    /// lock (no append of the run can interleave) after checking its head.
    pub(crate) fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<Hash32>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<(), StoreError> {
        let mut writes = self.aux_writes(aux)?;
        let slot = self.slot(run);
        let mut cached = Self::lock_slot(&slot);
        let head = self.load_head(run)?;
        if head.next_seq != expected {
            *cached = None;
            return Err(StoreError::Conflict { run, expected, actual: head.next_seq });
        }
        let (lo, hi) = (record::event_key(run, 0), record::event_key(run, u64::MAX));
        for pair in self.kv.range(&lo, &hi)? {
            let (k, _) = pair?;
            writes.push((k.as_ref().to_vec(), None));
        }
        writes.push((record::snapshot_key(run).to_vec(), None));
        for digest in &payloads {
            writes.extend(self.payload_removal(digest)?);
        }
        let _due = lock(&self.due);
        writes.extend(self.clear_due_writes(run)?);
        let result = self.apply_counted(writes, false);
        *cached = None;
        result
    }

    /// The writes that remove a stored payload (manifest and chunks; none if not stored).
    fn payload_removal(&self, digest: &Hash32) -> Result<KvWrites, StoreError> {
        let mk = payloads::manifest_key(digest);
        let Some(m) = self.kv.get(&mk)? else { return Ok(Vec::new()) };
        let (_, chunks) = payloads::parse_manifest(digest, &m)?;
        let mut out: KvWrites = (0..chunks).map(|i| (payloads::chunk_key(digest, i), None)).collect();
        out.push((mk, None));
        Ok(out)
    }

    pub(crate) fn put_due(&self, run: RunId, due_at_us: i64) -> Result<(), StoreError> {
        let _due = lock(&self.due);
        let mut writes = self.clear_due_writes(run)?;
        writes.push((record::due_key(due_at_us, run).to_vec(), Some(Vec::new())));
        writes.push((record::due_of_run_key(run).to_vec(), Some(due_at_us.to_be_bytes().to_vec())));
        self.kv.apply(writes)
    }

    pub(crate) fn remove_due(&self, run: RunId) -> Result<(), StoreError> {
        let _due = lock(&self.due);
        let writes = self.clear_due_writes(run)?;
        if writes.is_empty() {
            return Ok(());
        }
        self.kv.apply(writes)
    }

    /// The writes that remove `run`'s current due time (none if it has none).
    fn clear_due_writes(&self, run: RunId) -> Result<KvWrites, StoreError> {
        let of_run = record::due_of_run_key(run);
        let Some(v) = self.kv.get(&of_run)? else {
            return Ok(Vec::new());
        };
        let at = <[u8; 8]>::try_from(v.as_slice()).map_err(|_| StoreError::CorruptDue {
            reason: format!("due time of run {run} has {} bytes, expected 8", v.len()),
        })?;
        let old = i64::from_be_bytes(at);
        Ok(vec![(record::due_key(old, run).to_vec(), None), (of_run.to_vec(), None)])
    }

    pub(crate) fn due(&self, now_us: i64, limit: usize) -> Result<Vec<(RunId, i64)>, StoreError> {
        let lo = record::due_key(i64::MIN, RunId::from_bytes([0; 16]));
        let hi = record::due_key(now_us, RunId::from_bytes([0xff; 16]));
        let mut out = Vec::new();
        for kv in self.kv.range(&lo, &hi)?.take(limit) {
            let (k, _) = kv?;
            match record::parse_due_key(k.as_ref()) {
                Some((at, run)) => out.push((run, at)),
                None => {
                    return Err(StoreError::CorruptDue { reason: "malformed due-time key".into() });
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn lookup_key(&self, key: &[u8], now_us: i64) -> Result<Option<RunId>, StoreError> {
        match self.kv.get(&record::claim_key(key))? {
            None => Ok(None),
            Some(v) => {
                let (run, expires_at_us) = record::parse_claim_value(&v)?;
                Ok((expires_at_us > now_us).then_some(run))
            }
        }
    }

    pub(crate) fn save_snapshot(&self, run: RunId, next_seq: Seq, state: &[u8]) -> Result<(), StoreError> {
        if state.len() > self.limits.snapshot_bytes_max {
            return Err(StoreError::TooLarge {
                what: "snapshot",
                bytes: state.len(),
                max: self.limits.snapshot_bytes_max,
            });
        }
        let head = self.head(run)?;
        if next_seq > head.next_seq {
            return Err(StoreError::SnapshotBeyondHead { run, next_seq, head: head.next_seq });
        }
        let anchor = match next_seq.0.checked_sub(1) {
            None => [0u8; 32],
            Some(p) => self.stored_hash(run, p)?.ok_or(StoreError::Corrupted {
                run,
                seq: Seq(p),
                reason: "record missing below the head".into(),
            })?,
        };
        let value = codec::seal_snapshot_v1(&SnapshotV1 { next_seq: next_seq.0, anchor, state: state.to_vec() })?;
        self.kv.apply(vec![(record::snapshot_key(run).to_vec(), Some(value))])
    }

    pub(crate) fn load_snapshot(&self, run: RunId) -> Result<Option<(Seq, Vec<u8>)>, StoreError> {
        let Some(v) = self.kv.get(&record::snapshot_key(run))? else {
            return Ok(None);
        };
        crate::backend::open_snapshot(run, &v, |p| self.stored_hash(run, p)).map(Some)
    }

    // --- raw test hooks -------------------------------------------------------------

    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn raw_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv.get(key)
    }

    /// [`crate::Payloads::put_payload`]: manifest and chunks in one atomic write, nothing
    /// if the manifest is already stored.
    pub(crate) fn put_payload(&self, bytes: &[u8]) -> Result<PayloadRef, StoreError> {
        let r = PayloadRef::of(bytes);
        // Stored already (an output copied into a downstream input): nothing to write.
        if self.kv.get(&payloads::manifest_key(&r.digest))?.is_some() {
            return Ok(r);
        }
        let (r, writes) = payloads::payload_writes(bytes)?;
        self.kv.apply(writes)?;
        Ok(r)
    }

    /// [`crate::Payloads::get_payload`].
    pub(crate) fn get_payload(&self, digest: &Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(m) = self.kv.get(&payloads::manifest_key(digest))? else {
            return Ok(None);
        };
        let (bytes, chunks) = payloads::parse_manifest(digest, &m)?;
        let max = bytes_max.min(payloads::PAYLOAD_BYTES_MAX);
        if bytes > max {
            return Err(StoreError::TooLarge { what: "payload", bytes, max });
        }
        payloads::assemble(digest, bytes, chunks, |i| self.kv.get(&payloads::chunk_key(digest, i))).map(Some)
    }

    /// [`crate::Payloads::payload_digests`].
    pub(crate) fn payload_digests(&self) -> Result<Vec<Hash32>, StoreError> {
        let lo = payloads::manifest_key(&[0u8; 32]);
        let hi = payloads::manifest_key(&[0xffu8; 32]);
        let mut out = Vec::new();
        for pair in self.kv.range(&lo, &hi)? {
            let (k, _) = pair?;
            let mut d = [0u8; 32];
            match k.as_ref().get(1..33) {
                Some(bytes) if k.as_ref().len() == 33 => d.copy_from_slice(bytes),
                _ => {
                    return Err(StoreError::CorruptPayload {
                        digest: hex::encode(k.as_ref()),
                        reason: "manifest key of a wrong length".to_owned(),
                    })
                }
            }
            out.push(d);
        }
        Ok(out)
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn raw_write(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        self.kv.apply(vec![(key.to_vec(), value.map(<[u8]>::to_vec))])?;
        self.forget_heads();
        Ok(())
    }

    #[cfg(all(feature = "sled", any(feature = "testing", feature = "bench")))]
    pub(crate) fn raw_range(&self, lo: &[u8], hi: &[u8]) -> Result<Vec<KvPair>, StoreError> {
        self.kv.range(lo, hi)?.map(|r| r.map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec()))).collect()
    }
}

/// The methods both backends forward to their `core: Core<_>` unchanged, spelled out once:
/// `delegate_log!()` inside each `impl EventLog` (all but append, flush, durability,
/// read_runs), `delegate_coordination!()` inside each `impl Coordination` (all but
/// append_fenced, whose durability step differs).
macro_rules! delegate_log {
    () => {
        fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
            self.core.read(run, from)
        }

        fn head(&self, run: RunId) -> Result<Head, StoreError> {
            self.core.head(run)
        }

        fn runs(&self) -> Result<Vec<RunId>, StoreError> {
            self.core.runs()
        }

        fn runs_between(&self, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
            self.core.runs_between(lo, hi)
        }

        fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
            self.core.scan(run, from)
        }

        fn limits(&self) -> crate::Limits {
            self.core.limits.clone()
        }
    };
}
pub(crate) use delegate_log;

macro_rules! delegate_coordination {
    () => {
        fn try_lease(
            &self,
            run: RunId,
            owner: &str,
            ttl_ms: u64,
            now_us: i64,
        ) -> Result<Option<crate::Lease>, StoreError> {
            self.core.try_lease(run, owner, ttl_ms, now_us)
        }

        fn renew_lease(
            &self,
            lease: &crate::Lease,
            ttl_ms: u64,
            now_us: i64,
        ) -> Result<Option<crate::Lease>, StoreError> {
            self.core.renew_lease(lease, ttl_ms, now_us)
        }

        fn release_lease(&self, lease: &crate::Lease) -> Result<(), StoreError> {
            self.core.release_lease(lease)
        }

        fn lookup_key(&self, key: &[u8], now_us: i64) -> Result<Option<RunId>, StoreError> {
            self.core.lookup_key(key, now_us)
        }

        fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.core.aux_get(key)
        }

        fn aux_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
            self.core.aux_put(key, value)
        }

        fn aux_apply(&self, aux: Vec<crate::AuxWrite>) -> Result<(), StoreError> {
            self.core.aux_apply(aux)
        }

        fn aux_range(&self, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<crate::AuxEntry>, StoreError> {
            self.core.aux_range(lo, hi, limit)
        }

        fn save_snapshot(&self, run: RunId, next_seq: Seq, state: &[u8]) -> Result<(), StoreError> {
            self.core.save_snapshot(run, next_seq, state)
        }

        fn load_snapshot(&self, run: RunId) -> Result<Option<(Seq, Vec<u8>)>, StoreError> {
            self.core.load_snapshot(run)
        }

        fn put_due(&self, run: RunId, due_at_us: i64) -> Result<(), StoreError> {
            self.core.put_due(run, due_at_us)
        }

        fn remove_due(&self, run: RunId) -> Result<(), StoreError> {
            self.core.remove_due(run)
        }

        fn due(&self, now_us: i64, limit: usize) -> Result<Vec<(RunId, i64)>, StoreError> {
            self.core.due(now_us, limit)
        }

        /// One process opens this store: its engine's run queue is in memory.
        fn work_queue(&self) -> Option<&dyn crate::WorkQueue> {
            None
        }
    };
}
pub(crate) use delegate_coordination;

/// The payload methods both backends forward to their `core` unchanged.
macro_rules! delegate_payloads {
    () => {
        fn put_payload(&self, bytes: &[u8]) -> Result<crate::PayloadRef, StoreError> {
            self.core.put_payload(bytes)
        }

        fn get_payload(&self, digest: &crate::Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError> {
            self.core.get_payload(digest, bytes_max)
        }

        fn payload_digests(&self) -> Result<Vec<crate::Hash32>, StoreError> {
            self.core.payload_digests()
        }
    };
}
pub(crate) use delegate_payloads;
