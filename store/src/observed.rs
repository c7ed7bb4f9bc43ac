//! A store that tells an observer about every append: the one wrapper a tool needs to
//! count, time or log what the engine writes (the bench's figures, the crash harness's
//! "durable" marks, later a server's metrics) without re-implementing the seam.
//!
//! Every other method of [`EventLog`] and [`Coordination`] forwards to the wrapped store
//! unchanged, so leases, claims, snapshots, aux entries and the due-time index keep their
//! meaning; both kinds of append ([`EventLog::append`] and
//! [`Coordination::append_fenced`]) go through the observer.

use crate::coordination::{AppendFuture, AsyncAppend, Coordination, Fence, Lease, Store};
use crate::error::StoreError;
use crate::log::{Claim, Durability, EventLog, Head, Limits, NewRecord, RecordIter, RunRecords};
use crate::types::{RunId, Seq};
use std::sync::Arc;

/// What an [`Observed`] store calls around each append.
pub trait AppendObserver: Send + Sync + 'static {
    /// What `before` hands to `after` for the same append (a start time, marks taken
    /// from the records before they move into the store).
    type Ticket: Send;

    /// Called just before the wrapped store's append, with what is about to be written.
    fn before(&self, run: RunId, expected: Seq, records: &[NewRecord]) -> Self::Ticket;

    /// Called as soon as the wrapped store's append returns (for a durable store: once
    /// the records are durable, or the append failed).
    fn after(&self, run: RunId, ticket: Self::Ticket, result: Result<&Head, &StoreError>);
}

/// A [`Store`] that reports each append to an [`AppendObserver`] and forwards everything
/// else to the store it wraps.
pub struct Observed<O> {
    inner: Arc<dyn Store>,
    observer: O,
}

impl<O: AppendObserver> Observed<O> {
    /// Wraps `inner`; `observer` sees every append made through the wrapper.
    pub fn new(inner: Arc<dyn Store>, observer: O) -> Self {
        Observed { inner, observer }
    }

    /// The observer (to read what it gathered).
    pub fn observer(&self) -> &O {
        &self.observer
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn observe(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        write: impl FnOnce(Vec<NewRecord>) -> Result<Head, StoreError>,
    ) -> Result<Head, StoreError> {
        let ticket = self.observer.before(run, expected, &records);
        let result = write(records);
        self.observer.after(run, ticket, result.as_ref());
        result
    }
}

impl<O: AppendObserver> EventLog for Observed<O> {
    fn append(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<Head, StoreError> {
        self.observe(run, expected, records, |records| self.inner.append(run, expected, records, claim))
    }
    fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.inner.read(run, from)
    }
    fn head(&self, run: RunId) -> Result<Head, StoreError> {
        self.inner.head(run)
    }
    fn runs(&self) -> Result<Vec<RunId>, StoreError> {
        self.inner.runs()
    }
    fn runs_between(&self, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
        self.inner.runs_between(lo, hi)
    }
    fn read_runs<'a>(&'a self, runs: &'a [RunId]) -> RunRecords<'a> {
        self.inner.read_runs(runs)
    }
    fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.inner.scan(run, from)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn durability(&self) -> Durability {
        self.inner.durability()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn commit_stats(&self) -> crate::stats::CommitStats {
        self.inner.commit_stats()
    }
}

impl<O: AppendObserver> crate::Payloads for Observed<O> {
    fn put_payload(&self, bytes: &[u8]) -> Result<crate::PayloadRef, StoreError> {
        self.inner.put_payload(bytes)
    }
    fn get_payload(&self, digest: &crate::Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_payload(digest, bytes_max)
    }
    fn payload_digests(&self) -> Result<Vec<crate::Hash32>, StoreError> {
        self.inner.payload_digests()
    }
}

impl<O: AppendObserver> Coordination for Observed<O> {
    fn try_lease(&self, run: RunId, owner: &str, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        self.inner.try_lease(run, owner, ttl_ms, now_us)
    }
    fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        self.inner.renew_lease(lease, ttl_ms, now_us)
    }
    fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release_lease(lease)
    }
    fn append_fenced(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
    ) -> Result<Head, StoreError> {
        self.observe(run, expected, records, |records| self.inner.append_fenced(run, expected, records, claim, fence))
    }
    fn lookup_key(&self, key: &[u8], now_us: i64) -> Result<Option<RunId>, StoreError> {
        self.inner.lookup_key(key, now_us)
    }
    fn save_snapshot(&self, run: RunId, next_seq: Seq, state: &[u8]) -> Result<(), StoreError> {
        self.inner.save_snapshot(run, next_seq, state)
    }
    fn load_snapshot(&self, run: RunId) -> Result<Option<(Seq, Vec<u8>)>, StoreError> {
        self.inner.load_snapshot(run)
    }
    fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.aux_get(key)
    }
    fn aux_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner.aux_put(key, value)
    }
    fn append_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.observe(run, expected, records, |records| self.inner.append_with_aux(run, expected, records, claim, aux))
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
        self.observe(run, expected, records, |records| {
            self.inner.append_fenced_with_aux(run, expected, records, claim, fence, aux)
        })
    }
    fn aux_apply(&self, aux: Vec<crate::AuxWrite>) -> Result<(), StoreError> {
        self.inner.aux_apply(aux)
    }
    fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<crate::Hash32>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<(), StoreError> {
        self.inner.remove_run(run, expected, payloads, aux)
    }
    fn seal_runs(&self, runs: &[RunId]) -> Result<usize, StoreError> {
        self.inner.seal_runs(runs)
    }
    fn aux_range(&self, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<crate::AuxEntry>, StoreError> {
        self.inner.aux_range(lo, hi, limit)
    }
    fn put_due(&self, run: RunId, due_at_us: i64) -> Result<(), StoreError> {
        self.inner.put_due(run, due_at_us)
    }
    fn remove_due(&self, run: RunId) -> Result<(), StoreError> {
        self.inner.remove_due(run)
    }
    fn due(&self, now_us: i64, limit: usize) -> Result<Vec<(RunId, i64)>, StoreError> {
        self.inner.due(now_us, limit)
    }
    fn work_queue(&self) -> Option<&dyn crate::WorkQueue> {
        self.inner.work_queue()
    }
    fn async_appends(&self) -> Option<&dyn AsyncAppend> {
        // Observed too: through this wrapper when the wrapped store has them.
        self.inner.async_appends().map(|_| self as &dyn AsyncAppend)
    }
}

impl<O: AppendObserver> AsyncAppend for Observed<O> {
    fn append_async<'a>(
        &'a self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<crate::AuxWrite>,
    ) -> AppendFuture<'a> {
        let Some(inner) = self.inner.async_appends() else {
            // Not offered by `async_appends` then: the blocking append, in place.
            let result = self.observe(run, expected, records, |records| match fence {
                Some(fence) => self.inner.append_fenced_with_aux(run, expected, records, claim, fence, aux),
                None => self.inner.append_with_aux(run, expected, records, claim, aux),
            });
            return Box::pin(std::future::ready(result));
        };
        let ticket = self.observer.before(run, expected, &records);
        let appended = inner.append_async(run, expected, records, claim, fence, aux);
        Box::pin(async move {
            let result = appended.await;
            self.observer.after(run, ticket, result.as_ref());
            result
        })
    }

    fn append_ending_async<'a>(
        &'a self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        fence: Fence,
        aux: Vec<crate::AuxWrite>,
        owner: &'a str,
    ) -> crate::EndingFuture<'a> {
        let Some(inner) = self.inner.async_appends() else {
            // No awaited appends below: the fenced append, observed; the end not recorded.
            let appended = self.append_async(run, expected, records, None, Some(fence), aux);
            return Box::pin(async move { appended.await.map(|head| (head, false)) });
        };
        let ticket = self.observer.before(run, expected, &records);
        let appended = inner.append_ending_async(run, expected, records, fence, aux, owner);
        Box::pin(async move {
            let result = appended.await;
            self.observer.after(run, ticket, result.as_ref().map(|(head, _)| head));
            result
        })
    }

    fn fold_source_async<'a>(&'a self, run: RunId) -> crate::FoldFuture<'a> {
        match self.inner.async_appends() {
            Some(inner) => inner.fold_source_async(run),
            None => Box::pin(std::future::ready(Ok(None))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::mem::MemStore;
    use crate::log::prepare;
    use crate::types::Payload;
    use std::sync::Mutex;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ev(u32);
    impl Payload for Ev {
        fn kind(&self) -> &'static str {
            "Ev"
        }
        fn payload_version(&self) -> u16 {
            1
        }
        fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
            let mut m = serde_json::Map::new();
            m.insert("n".into(), self.0.into());
            m
        }
    }

    /// (run, expected, records, Ok(next_seq) or the error's text) of one append.
    type Seen = (RunId, u64, usize, Result<u64, String>);

    /// Writes down every append it sees.
    #[derive(Default)]
    struct Log(Mutex<Vec<Seen>>);
    impl AppendObserver for Log {
        type Ticket = (u64, usize);
        fn before(&self, _run: RunId, expected: Seq, records: &[NewRecord]) -> (u64, usize) {
            (expected.0, records.len())
        }
        fn after(&self, run: RunId, (expected, n): (u64, usize), result: Result<&Head, &StoreError>) {
            let r = result.map(|h| h.next_seq.0).map_err(|e| e.to_string());
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((run, expected, n, r));
        }
    }

    #[test]
    fn both_kinds_of_append_are_observed_with_their_outcome_and_leases_still_fence() {
        let store = Observed::new(Arc::new(MemStore::new()), Log::default());
        let run = RunId::from_bytes([1; 16]);
        let rec = |n| prepare(&Ev(n), 0).unwrap();
        store.append(run, Seq(0), vec![rec(0), rec(1)], None).unwrap();
        // A stale expected seq is a conflict, observed as a failure.
        assert!(store.append(run, Seq(0), vec![rec(2)], None).is_err());
        let lease = store.try_lease(run, "me", 1_000, 0).unwrap().unwrap();
        store.append_fenced(run, Seq(2), vec![rec(2)], None, lease.fence()).unwrap();
        // The lease moved on: the old fence is refused, through the wrapper too.
        let renewed = store.renew_lease(&lease, 1_000, 1).unwrap().unwrap();
        assert!(matches!(
            store.append_fenced(run, Seq(3), vec![rec(3)], None, lease.fence()),
            Err(StoreError::Fenced { .. })
        ));
        store.append_fenced(run, Seq(3), vec![rec(3)], None, renewed.fence()).unwrap();
        let seen = store.observer().0.lock().unwrap().clone();
        let outcomes: Vec<(u64, usize, Result<u64, ()>)> = seen
            .iter()
            .map(|(r, e, n, res)| {
                assert_eq!(*r, run);
                (*e, *n, res.clone().map_err(|_| ()))
            })
            .collect();
        assert_eq!(outcomes, vec![(0, 2, Ok(2)), (0, 1, Err(())), (2, 1, Ok(3)), (3, 1, Err(())), (3, 1, Ok(4))]);
        assert_eq!(store.head(run).unwrap().next_seq, Seq(4));
    }
}
