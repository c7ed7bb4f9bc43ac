//! Sealed runs: the records of a finished run stored as one value.
//!
//! sled's open costs grow with the number of keys (it splits a leaf at 16 entries, and its
//! page table, snapshot and segment accounting are per page), so a history of many
//! finished runs, ~16 records each, was mostly per-record keys. [`Sealing`] wraps a
//! backend's map: [`Kv::seal`] moves every record key of each run given (`e || run || seq`)
//! into one value under the run's 17-byte prefix key (`e || run`), in one atomic write (the
//! engine seals the runs that finished in it when it ends: docs/STORE.md 2.1). Everything
//! above it (the [`super::Core`]) still sees one key per record: reads expand the sealed
//! value, and a write to a sealed record (a removal, or a test hook's overwrite) rewrites it.
//! Appends after the seal are plain record keys after it (their seqs are above every sealed
//! one), so a run is at any time an optional sealed value followed by record keys.
//!
//! Sealed value: `version (1) || count (u32 BE) || count x (seq u64 BE || len u32 BE || bytes)`,
//! seqs strictly ascending, at most [`SEALED_BYTES_MAX`] bytes in all (a run larger than
//! that stays unsealed: sled writes a node above a quarter of its segment to an un-fsynced
//! blob file, see docs/STORE.md, and a leaf holds up to ~17 values).

use super::{Kv, KvIter, KvPair, KvWrites};
use crate::envelope::record;
use crate::error::StoreError;
use crate::types::{RunId, Seq};
use std::collections::{BTreeMap, VecDeque};

/// Largest sealed value: the cap every stored value keeps ([`crate::Limits::VALUE_BYTES_HARD_MAX`]).
pub(crate) const SEALED_BYTES_MAX: usize = crate::Limits::VALUE_BYTES_HARD_MAX;

/// A run's records by seq.
type Records = BTreeMap<u64, Vec<u8>>;

const VERSION: u8 = 1;
const PREFIX_LEN: usize = 17;

/// A backend's map with sealed runs (see the module docs).
pub(crate) struct Sealing<K> {
    pub(crate) inner: K,
}

/// The run prefix (`e || run`) of an event key, or of a sealed key itself.
fn prefix_of(key: &[u8]) -> Option<&[u8]> {
    match key.first() {
        Some(&record::EVENT_PREFIX) => key.get(..PREFIX_LEN),
        _ => None,
    }
}

fn is_sealed_key(key: &[u8]) -> bool {
    key.len() == PREFIX_LEN && key.first() == Some(&record::EVENT_PREFIX)
}

fn run_of(prefix: &[u8]) -> RunId {
    let mut b = [0u8; 16];
    if let Some(src) = prefix.get(1..PREFIX_LEN) {
        b.copy_from_slice(src);
    }
    RunId::from_bytes(b)
}

fn seq_of(key: &[u8]) -> Option<u64> {
    if key.len() != record::EVENT_KEY_LEN {
        return None;
    }
    key.get(PREFIX_LEN..).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_be_bytes)
}

fn key_of(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(record::EVENT_KEY_LEN);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Decodes a sealed value into its records, by seq.
pub(crate) fn decode(prefix: &[u8], bytes: &[u8]) -> Result<BTreeMap<u64, Vec<u8>>, StoreError> {
    let run = run_of(prefix);
    let bad = |reason: String| StoreError::Corrupted { run, seq: Seq(0), reason: format!("sealed records: {reason}") };
    if bytes.len() > SEALED_BYTES_MAX {
        return Err(bad(format!("{} bytes, above the largest sealed value {SEALED_BYTES_MAX}", bytes.len())));
    }
    let mut at = bytes;
    let mut take = |n: usize| -> Result<&[u8], StoreError> {
        if at.len() < n {
            return Err(bad("truncated".into()));
        }
        let (head, rest) = at.split_at(n);
        at = rest;
        Ok(head)
    };
    let version = take(1)?;
    if version != [VERSION] {
        return Err(bad(format!("unknown version {version:?}")));
    }
    let count = u32::from_be_bytes(<[u8; 4]>::try_from(take(4)?).map_err(|_| bad("count".into()))?);
    let mut out = BTreeMap::new();
    let mut last: Option<u64> = None;
    for _ in 0..count {
        let seq = u64::from_be_bytes(<[u8; 8]>::try_from(take(8)?).map_err(|_| bad("seq".into()))?);
        let len = u32::from_be_bytes(<[u8; 4]>::try_from(take(4)?).map_err(|_| bad("length".into()))?);
        let len = usize::try_from(len).map_err(|_| bad("length".into()))?;
        let value = take(len)?.to_vec();
        if last.is_some_and(|l| seq <= l) {
            return Err(bad(format!("seq {seq} not above the one before it")));
        }
        last = Some(seq);
        out.insert(seq, value);
    }
    if !at.is_empty() {
        return Err(bad(format!("{} bytes after the last record", at.len())));
    }
    Ok(out)
}

/// The first seq of a sealed value, read from its header alone (`None`: no record, or a
/// header that does not parse; the whole value is checked when the run is read).
fn first_seq(bytes: &[u8]) -> Option<u64> {
    let count = bytes.get(1..5).and_then(|c| <[u8; 4]>::try_from(c).ok()).map(u32::from_be_bytes)?;
    if count == 0 || bytes.first() != Some(&VERSION) {
        return None;
    }
    bytes.get(5..13).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_be_bytes)
}

/// Encodes records into a sealed value; `None` if it would exceed [`SEALED_BYTES_MAX`].
fn encode(records: &BTreeMap<u64, Vec<u8>>) -> Option<Vec<u8>> {
    let bytes = records.values().try_fold(5usize, |n, v| n.checked_add(12)?.checked_add(v.len()))?;
    if bytes > SEALED_BYTES_MAX {
        return None;
    }
    let count = u32::try_from(records.len()).ok()?;
    let mut out = Vec::with_capacity(bytes);
    out.push(VERSION);
    out.extend_from_slice(&count.to_be_bytes());
    for (seq, v) in records {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&u32::try_from(v.len()).ok()?.to_be_bytes());
        out.extend_from_slice(v);
    }
    Some(out)
}

/// Reads a sealed value by its key, apart from a range scan (`None` from [`Kv::getter`]: the
/// map's range scans are snapshots, nothing to read again).
pub(crate) type Getter = Box<dyn Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError> + Send>;

/// A stored pair, or the records of a sealed value, as the record pairs they stand for.
///
/// A seal may run while the scan runs (sled's scans are not snapshots): it moves record keys
/// the scan has not reached into the run's sealed value, which sorts before them. So at the
/// end of each run's keys the sealed value is read again and its records above the last one
/// yielded are yielded too: a record stored when the scan began is never missed.
pub(crate) struct Expand<I, B> {
    inner: I,
    pending: VecDeque<(B, B)>,
    lo: Vec<u8>,
    hi: Vec<u8>,
    get: Option<Getter>,
    /// The run whose keys the scan is in, and the last seq yielded of it.
    run: Option<(Vec<u8>, Option<u64>)>,
    /// The pair read past the end of a run, handled after the run's sealed value is re-read.
    held: Option<(B, B)>,
    done: bool,
}

impl<I, B> Expand<I, B> {
    /// Pairs of `inner` (a range scan) with keys in `lo..=hi` once sealed values are
    /// expanded; `first` are records already read for the scan's first run (its sealed
    /// value, read apart), yielded first.
    pub(crate) fn new(inner: I, lo: &[u8], hi: &[u8], first: Vec<(B, B)>, get: Option<Getter>) -> Self {
        let run = prefix_of(lo).filter(|_| lo.len() > PREFIX_LEN).map(|p| (p.to_vec(), None));
        Expand { inner, pending: first.into(), lo: lo.to_vec(), hi: hi.to_vec(), get, run, held: None, done: false }
    }

    fn in_range(&self, key: &[u8]) -> bool {
        key >= self.lo.as_slice() && key <= self.hi.as_slice()
    }

    /// Notes a record about to be yielded (the run it is in, its seq).
    fn note(&mut self, key: &[u8]) {
        if let (Some(p), Some(seq)) = (prefix_of(key), seq_of(key)) {
            match &mut self.run {
                Some((run, last)) if run.as_slice() == p => *last = Some(seq),
                other => *other = Some((p.to_vec(), Some(seq))),
            }
        }
    }
}

impl<I, B> Expand<I, B>
where
    B: AsRef<[u8]> + From<Vec<u8>>,
{
    /// The run's sealed value read again: its records above the last yielded, in range.
    fn reread(&mut self, prefix: &[u8], last: Option<u64>) -> Result<(), StoreError> {
        let Some(get) = &self.get else { return Ok(()) };
        let Some(bytes) = get(prefix)? else { return Ok(()) };
        for (seq, value) in decode(prefix, &bytes)? {
            let key = key_of(prefix, seq);
            if last.is_none_or(|l| seq > l) && self.in_range(&key) {
                self.pending.push_back((B::from(key), B::from(value)));
            }
        }
        Ok(())
    }
}

impl<I, B> Iterator for Expand<I, B>
where
    I: Iterator<Item = Result<(B, B), StoreError>>,
    B: AsRef<[u8]> + From<Vec<u8>>,
{
    type Item = Result<(B, B), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((k, v)) = self.pending.pop_front() {
                self.note(k.as_ref());
                return Some(Ok((k, v)));
            }
            if self.done {
                return None;
            }
            let (k, v) = match self.held.take().map(Ok).or_else(|| self.inner.next()) {
                Some(Ok(p)) => p,
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.done = true;
                    if let Some((prefix, last)) = self.run.take() {
                        if let Err(e) = self.reread(&prefix, last) {
                            return Some(Err(e));
                        }
                    }
                    continue;
                }
            };
            // Leaving a run's keys: its sealed value is read again first.
            let leaving = match (&self.run, prefix_of(k.as_ref())) {
                (Some((run, _)), Some(p)) => run.as_slice() != p,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if leaving {
                if let Some((prefix, last)) = self.run.take() {
                    self.held = Some((k, v));
                    if let Err(e) = self.reread(&prefix, last) {
                        return Some(Err(e));
                    }
                    continue;
                }
            }
            if !is_sealed_key(k.as_ref()) {
                if self.in_range(k.as_ref()) {
                    self.note(k.as_ref());
                    return Some(Ok((k, v)));
                }
                continue;
            }
            let records = match decode(k.as_ref(), v.as_ref()) {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            self.run = Some((k.as_ref().to_vec(), None));
            for (seq, value) in records {
                let key = key_of(k.as_ref(), seq);
                if self.in_range(&key) {
                    self.pending.push_back((B::from(key), B::from(value)));
                }
            }
        }
    }
}

impl<K: Kv> Sealing<K>
where
    K::Buf: From<Vec<u8>>,
{
    fn sealed(&self, prefix: &[u8]) -> Result<Option<BTreeMap<u64, Vec<u8>>>, StoreError> {
        match self.inner.get(prefix)? {
            None => Ok(None),
            Some(v) => decode(prefix, &v).map(Some),
        }
    }

    /// `writes` with every write to a sealed record turned into a rewrite of its sealed value.
    fn route(&self, writes: KvWrites) -> Result<KvWrites, StoreError> {
        let mut sealed: BTreeMap<Vec<u8>, (Records, bool)> = BTreeMap::new();
        let mut out = Vec::with_capacity(writes.len());
        for (k, v) in writes {
            let (Some(seq), Some(prefix)) = (seq_of(&k), prefix_of(&k)) else {
                out.push((k, v));
                continue;
            };
            if !sealed.contains_key(prefix) {
                let records = self.sealed(prefix)?.unwrap_or_default();
                sealed.insert(prefix.to_vec(), (records, false));
            }
            let Some((records, changed)) = sealed.get_mut(prefix) else {
                out.push((k, v));
                continue;
            };
            match records.last_key_value() {
                Some((last, _)) if seq <= *last => {
                    match v {
                        Some(v) => records.insert(seq, v),
                        None => records.remove(&seq),
                    };
                    *changed = true;
                }
                _ => out.push((k, v)),
            }
        }
        for (prefix, (records, changed)) in sealed {
            if !changed {
                continue;
            }
            if records.is_empty() {
                out.push((prefix, None));
                continue;
            }
            let value = encode(&records).ok_or_else(|| StoreError::TooLarge {
                what: "sealed records",
                bytes: records.values().map(Vec::len).sum(),
                max: SEALED_BYTES_MAX,
            })?;
            out.push((prefix, Some(value)));
        }
        Ok(out)
    }
}

impl<K: Kv> Kv for Sealing<K>
where
    K::Buf: From<Vec<u8>>,
{
    type Buf = K::Buf;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.inner.get(key)? {
            return Ok(Some(v));
        }
        match (seq_of(key), prefix_of(key)) {
            (Some(seq), Some(prefix)) => Ok(self.sealed(prefix)?.and_then(|mut r| r.remove(&seq))),
            _ => Ok(None),
        }
    }

    fn range(&self, lo: &[u8], hi: &[u8]) -> Result<KvIter<K::Buf>, StoreError> {
        // A scan from inside a run: its sealed value (which sorts before `lo`) read apart,
        // then the scan from `lo` itself (not from the run's first key).
        let mut first = Vec::new();
        if let Some(p) = prefix_of(lo).filter(|_| lo.len() > PREFIX_LEN) {
            if let Some(records) = self.sealed(p)? {
                for (seq, value) in records {
                    let key = key_of(p, seq);
                    if key.as_slice() >= lo && key.as_slice() <= hi {
                        first.push((K::Buf::from(key), K::Buf::from(value)));
                    }
                }
            }
        }
        let src = self.inner.range(lo, hi)?;
        Ok(Box::new(Expand::new(src, lo, hi, first, self.inner.getter())))
    }

    fn last_in(&self, lo: &[u8], hi: &[u8]) -> Result<Option<KvPair>, StoreError> {
        let (p_lo, p_hi) = (prefix_of(lo), prefix_of(hi));
        let Some(p_lo) = p_lo.filter(|p| Some(*p) == p_hi) else {
            // Not within one run (the core's reverse reads are): the last stored pair, unless
            // it is a record or a sealed value, whose run is then scanned forward.
            return match self.inner.last_in(lo, hi)? {
                Some((k, _)) if prefix_of(&k).is_some() => {
                    let mut last = None;
                    for pair in self.range(lo, hi)? {
                        let (k, v) = pair?;
                        last = Some((k.as_ref().to_vec(), v.as_ref().to_vec()));
                    }
                    Ok(last)
                }
                other => Ok(other),
            };
        };
        // Within one run: its record keys are above every sealed record of it.
        if let Some((k, v)) = self.inner.last_in(lo, hi)? {
            if !is_sealed_key(&k) {
                return Ok(Some((k, v)));
            }
        }
        let Some(records) = self.sealed(p_lo)? else { return Ok(None) };
        Ok(records
            .into_iter()
            .rev()
            .map(|(seq, v)| (key_of(p_lo, seq), v))
            .find(|(k, _)| k.as_slice() >= lo && k.as_slice() <= hi))
    }

    fn first_key_after(&self, after: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        // The plain keys first, then the sealed value of `after`'s own run (a record of it
        // may follow `after`: its sealed key sorts before it): a seal in between moves keys
        // from the first place read to the second, never the other way.
        let mut from = after.to_vec();
        let next = loop {
            match self.inner.first_key_after(&from)? {
                // Only the header is read: a run with a damaged sealed value is still listed
                // (reading it reports the damage), and no listing decodes whole runs.
                Some(k) if is_sealed_key(&k) => match self.inner.get(&k)? {
                    Some(v) => break Some(key_of(&k, first_seq(&v).unwrap_or(0))),
                    None => from = k,
                },
                other => break other,
            }
        };
        let own = match prefix_of(after) {
            Some(_) if seq_of(after) == Some(u64::MAX) => None,
            Some(p) => {
                self.sealed(p)?.and_then(|r| r.into_keys().map(|seq| key_of(p, seq)).find(|k| k.as_slice() > after))
            }
            None => None,
        };
        Ok(match (own, next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn apply(&self, writes: KvWrites) -> Result<(), StoreError> {
        let writes = self.route(writes)?;
        self.inner.apply(writes)
    }

    fn apply_above_head(&self, writes: KvWrites) -> Result<(), StoreError> {
        // An append's records are above its run's head, so above every sealed record.
        self.inner.apply(writes)
    }

    fn insert_above_head(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.inner.insert(key, value)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        // A record key written outside an append (a test hook): into the sealed value if it
        // lands inside it.
        if let (Some(seq), Some(prefix)) = (seq_of(key), prefix_of(key)) {
            let inside = self.sealed(prefix)?.and_then(|r| r.last_key_value().map(|(l, _)| seq <= *l));
            if inside == Some(true) {
                return self.apply(vec![(key.to_vec(), Some(value))]);
            }
        }
        self.inner.insert(key, value)
    }

    fn seal(&self, runs: &[RunId]) -> Result<usize, StoreError> {
        let mut writes: KvWrites = Vec::new();
        let mut sealed = 0;
        for run in runs {
            if let Some(w) = self.seal_writes(*run)? {
                writes.extend(w);
                sealed += 1;
            }
        }
        if sealed > 0 {
            self.inner.apply(writes)?;
        }
        Ok(sealed)
    }
}

impl<K: Kv> Sealing<K>
where
    K::Buf: From<Vec<u8>>,
{
    /// The writes that seal `run` (`None`: nothing loose, a malformed record key, or more
    /// than [`SEALED_BYTES_MAX`], found without reading past it).
    fn seal_writes(&self, run: RunId) -> Result<Option<KvWrites>, StoreError> {
        let prefix = record::run_prefix(run);
        let hi = record::event_key(run, u64::MAX);
        let mut records = BTreeMap::new();
        let mut loose = Vec::new();
        let mut bytes = 5usize;
        for pair in self.inner.range(&prefix, &hi)? {
            let (k, v) = pair?;
            bytes = bytes.saturating_add(v.as_ref().len()).saturating_add(12);
            if bytes > SEALED_BYTES_MAX.saturating_add(5) {
                return Ok(None);
            }
            if is_sealed_key(k.as_ref()) {
                records.extend(decode(&prefix, v.as_ref())?);
                continue;
            }
            match seq_of(k.as_ref()) {
                Some(seq) => {
                    loose.push(k.as_ref().to_vec());
                    records.insert(seq, v.as_ref().to_vec());
                }
                // A malformed record key (tampering) is left where it is, and so is the run.
                None => return Ok(None),
            }
        }
        if loose.is_empty() {
            return Ok(None);
        }
        let Some(value) = encode(&records) else { return Ok(None) };
        let mut writes: KvWrites = loose.into_iter().map(|k| (k, None)).collect();
        writes.push((prefix.to_vec(), Some(value)));
        Ok(Some(writes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::mem::MemKv;

    fn run() -> RunId {
        RunId::from_bytes([7; 16])
    }

    fn kv_with(n: u64) -> Sealing<MemKv> {
        let kv = Sealing { inner: MemKv::default() };
        for seq in 0..n {
            kv.insert(&record::event_key(run(), seq), vec![seq as u8; 3]).unwrap_or_else(|e| panic!("{e}"));
        }
        kv
    }

    fn all(kv: &Sealing<MemKv>, lo: &[u8], hi: &[u8]) -> Vec<KvPair> {
        kv.range(lo, hi).unwrap_or_else(|e| panic!("{e}")).map(|p| p.unwrap_or_else(|e| panic!("{e}"))).collect()
    }

    #[test]
    fn a_sealed_run_reads_as_the_records_it_was() {
        let (plain, sealed) = (kv_with(5), kv_with(5));
        assert_eq!(sealed.seal(&[run()]).ok(), Some(1));
        assert_eq!(sealed.inner.lock().len(), 1, "one key for the run");
        let (lo, hi) = (record::event_key(run(), 0), record::event_key(run(), u64::MAX));
        assert_eq!(all(&sealed, &lo, &hi), all(&plain, &lo, &hi));
        let mid = record::event_key(run(), 2);
        assert_eq!(all(&sealed, &mid, &hi), all(&plain, &mid, &hi));
        for seq in 0..6 {
            let k = record::event_key(run(), seq);
            assert_eq!(sealed.get(&k).ok(), plain.get(&k).ok(), "get {seq}");
            assert_eq!(sealed.first_key_after(&k).ok(), plain.first_key_after(&k).ok(), "after {seq}");
        }
        assert_eq!(sealed.last_in(&lo, &hi).ok(), plain.last_in(&lo, &hi).ok());
        assert_eq!(sealed.last_in(&lo, &mid).ok(), plain.last_in(&lo, &mid).ok());
        let p = record::run_prefix(run());
        assert_eq!(sealed.first_key_after(&p).ok(), plain.first_key_after(&p).ok());
        assert_eq!(sealed.first_key_after(&[record::EVENT_PREFIX]).ok(), Some(Some(lo.to_vec())));
    }

    #[test]
    fn appends_after_a_seal_follow_it_and_a_second_seal_takes_them_in() {
        let kv = kv_with(3);
        assert_eq!(kv.seal(&[run()]).ok(), Some(1));
        kv.insert(&record::event_key(run(), 3), vec![9]).unwrap_or_else(|e| panic!("{e}"));
        let (lo, hi) = (record::event_key(run(), 0), record::event_key(run(), u64::MAX));
        assert_eq!(all(&kv, &lo, &hi).len(), 4);
        assert_eq!(kv.last_in(&lo, &hi).ok().flatten().map(|p| p.1), Some(vec![9]));
        assert_eq!(kv.seal(&[run()]).ok(), Some(1));
        assert_eq!(kv.inner.lock().len(), 1);
        assert_eq!(all(&kv, &lo, &hi).len(), 4);
        assert_eq!(kv.seal(&[run()]).ok(), Some(0), "nothing loose: nothing to do");
    }

    #[test]
    fn writes_to_sealed_records_rewrite_the_sealed_value() {
        let kv = kv_with(4);
        assert_eq!(kv.seal(&[run()]).ok(), Some(1));
        let k1 = record::event_key(run(), 1);
        kv.apply(vec![(k1.to_vec(), Some(vec![42])), (record::event_key(run(), 2).to_vec(), None)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kv.get(&k1).ok(), Some(Some(vec![42])));
        assert_eq!(kv.get(&record::event_key(run(), 2)).ok(), Some(None));
        assert_eq!(kv.inner.lock().len(), 1, "still one key");
        // Removing every record removes the sealed value.
        let keys: Vec<_> = [0u64, 1, 3].iter().map(|s| (record::event_key(run(), *s).to_vec(), None)).collect();
        kv.apply(keys).unwrap_or_else(|e| panic!("{e}"));
        assert!(kv.inner.lock().is_empty());
    }

    #[test]
    fn a_damaged_sealed_value_is_an_error_not_a_panic() {
        let kv = kv_with(2);
        assert_eq!(kv.seal(&[run()]).ok(), Some(1));
        let p = record::run_prefix(run()).to_vec();
        for bad in [vec![], vec![1], vec![2, 0, 0, 0, 0], vec![1, 0, 0, 0, 9, 0], vec![1, 0, 0, 0, 0, 7]] {
            kv.inner.apply(vec![(p.clone(), Some(bad.clone()))]).unwrap_or_else(|e| panic!("{e}"));
            let (lo, hi) = (record::event_key(run(), 0), record::event_key(run(), u64::MAX));
            let read: Result<Vec<_>, _> = kv.range(&lo, &hi).and_then(|it| it.collect::<Result<Vec<_>, _>>());
            assert!(matches!(read, Err(StoreError::Corrupted { .. })), "{bad:?}: {read:?}");
            assert!(kv.get(&lo).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_run_too_large_for_one_value_stays_unsealed() {
        let kv = Sealing { inner: MemKv::default() };
        for seq in 0..3u64 {
            kv.insert(&record::event_key(run(), seq), vec![0; SEALED_BYTES_MAX / 2]).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(kv.seal(&[run()]).ok(), Some(0));
        assert_eq!(kv.inner.lock().len(), 3);
    }
}
