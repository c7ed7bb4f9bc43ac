//! Leases: one driver per run at a time, also across processes sharing a store.
//!
//! A driver holds its run's lease ([`keel_store::Coordination::try_lease`]) for a short
//! time-to-live (`EngineBuilder::lease_ttl_ms`, default [`LEASE_TTL_MS_DEFAULT`]) and a
//! heartbeat renews it every third of that while the run is driven. Every append of the
//! driver goes through `append_fenced` with the lease's current fence, under the same lock
//! as the renewal (a renewal moves the epoch: an append never races its own heartbeat).
//! When a renewal fails (the lease expired and someone else took it, or the store does not
//! answer) or an append is refused with `StoreError::Fenced`, the driver stops at once:
//! its future is dropped (its in-flight calls with it), nothing more is appended, and the
//! run is left to whoever holds the lease. Appends from outside a driver (submit, resolve,
//! cancel) stay optimistic (expected seq) and are never fenced. The heartbeat and the
//! drive under a lease are in `shell::heartbeat`.

use crate::api::{Clock, LeaseStats};
use keel_store::{AsyncAppend, Claim, Head, Lease, NewRecord, RunId, Seq, Store, StoreError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Default time-to-live of a driver's lease, in milliseconds.
pub const LEASE_TTL_MS_DEFAULT: u64 = 10_000;
/// Shortest lease time-to-live accepted (a heartbeat every third of it).
pub const LEASE_TTL_MS_MIN: u64 = 30;
/// Longest lease time-to-live accepted (one day).
pub const LEASE_TTL_MS_MAX: u64 = 24 * 60 * 60 * 1000;

/// How this engine takes leases: owner name, time-to-live, the clock expiries are read
/// on, and what happened to its leases.
pub(crate) struct Leasing {
    pub owner: String,
    pub ttl_ms: u64,
    /// Lease expiries are wall-clock time shared with other processes: the system clock by
    /// default, not the engine's (a test's fake engine clock may jump by days).
    pub clock: Arc<dyn Clock>,
    pub(crate) fenced: AtomicU64,
    pub(crate) renewals_lost: AtomicU64,
    pub(crate) drives_lost: AtomicU64,
}

impl Leasing {
    pub(crate) fn new(owner: String, ttl_ms: u64, clock: Arc<dyn Clock>) -> Leasing {
        Leasing {
            owner,
            ttl_ms,
            clock,
            fenced: AtomicU64::new(0),
            renewals_lost: AtomicU64::new(0),
            drives_lost: AtomicU64::new(0),
        }
    }

    /// A default owner name, unique among the engines of this host: `keel-<pid>-<n>`.
    pub(crate) fn default_owner() -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!("keel-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn stats(&self) -> LeaseStats {
        LeaseStats {
            fenced: self.fenced.load(Ordering::Relaxed),
            renewals_lost: self.renewals_lost.load(Ordering::Relaxed),
            drives_lost: self.drives_lost.load(Ordering::Relaxed),
        }
    }
}

/// The lease a driver holds, shared by its appends and its heartbeat.
#[derive(Debug)]
pub(crate) struct Held {
    /// The current lease (renewals replace it); `None` once released. An async lock: an
    /// awaited append ([`Held::append_async`]) holds it until the append is durable, as a
    /// blocking one does (taken with `blocking_lock` on the threads the engine blocks).
    lease: tokio::sync::Mutex<Option<Lease>>,
    lost: AtomicBool,
    /// The drive's end was recorded in the shared queue with its last append, and the
    /// lease released there ([`Held::append_ending_async`]): nothing is left to tell.
    ended: AtomicBool,
}

impl Held {
    pub(crate) fn new(lease: Lease) -> Held {
        Held {
            lease: tokio::sync::Mutex::new(Some(lease)),
            lost: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    /// Whether the drive's end went with its last append ([`Held::append_ending_async`]).
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// The fence of `held` (the lease under its lock), or `Fenced` once lost or released.
    fn fence(&self, held: Option<&Lease>, run: RunId) -> Result<keel_store::Fence, StoreError> {
        held.filter(|_| !self.is_lost()).map(Lease::fence).ok_or(StoreError::Fenced { run, fence: 0, current: 0 })
    }

    /// Whether the lease was lost (an append was fenced or a renewal failed).
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// `append_fenced` with the current fence (`append_fenced_with_aux` when there are
    /// index writes, in the same atomic step), under the lease's lock. A `Fenced` refusal
    /// marks the lease lost.
    pub(crate) fn append(
        &self,
        log: &dyn Store,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<keel_store::AuxWrite>,
    ) -> Result<Head, StoreError> {
        let guard = self.lease.blocking_lock();
        let fence = self.fence(guard.as_ref(), run)?;
        let res = if aux.is_empty() {
            log.append_fenced(run, expected, records, claim, fence)
        } else {
            log.append_fenced_with_aux(run, expected, records, claim, fence, aux)
        };
        self.noted(res)
    }

    /// `res` of an append under this lease: a `Fenced` refusal marks the lease lost.
    fn noted(&self, res: Result<Head, StoreError>) -> Result<Head, StoreError> {
        if matches!(res, Err(StoreError::Fenced { .. })) {
            self.lost.store(true, Ordering::SeqCst);
        }
        res
    }

    /// [`Held::append`] through the store's awaited appends: the lease's lock is held
    /// until the append is durable (a renewal waits for it), so an append never races its
    /// own heartbeat here either.
    pub(crate) async fn append_async(
        &self,
        log: &dyn AsyncAppend,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<keel_store::AuxWrite>,
    ) -> Result<Head, StoreError> {
        let guard = self.lease.lock().await;
        let fence = self.fence(guard.as_ref(), run)?;
        let res = self.noted(log.append_async(run, expected, records, claim, Some(fence), aux).await);
        drop(guard);
        res
    }

    /// [`Held::append_async`] for the append after which the drive ends (the run is
    /// finished), through [`AsyncAppend::append_ending_async`]: where the store records
    /// the drive's end with it (and releases the lease there), the hold is over: the lease
    /// is not renewed, released or told to the queue again ([`Held::is_ended`]).
    pub(crate) async fn append_ending_async(
        &self,
        log: &dyn AsyncAppend,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        aux: Vec<keel_store::AuxWrite>,
    ) -> Result<Head, StoreError> {
        let mut guard = self.lease.lock().await;
        let fence = self.fence(guard.as_ref(), run)?;
        let owner = guard.as_ref().map(|l| l.owner().to_owned()).unwrap_or_default();
        let res = log.append_ending_async(run, expected, records, fence, aux, &owner).await;
        let (head, ended) = match res {
            Ok((head, ended)) => (Ok(head), ended),
            Err(e) => (Err(e), false),
        };
        if ended {
            if let Some(mut lease) = guard.take() {
                lease.released_elsewhere();
            }
            self.ended.store(true, Ordering::SeqCst);
        }
        drop(guard);
        self.noted(head)
    }

    /// Renews the lease to `ttl_ms` from `now_us`; false (and the lease marked lost) if it
    /// was lost or the store failed. Once the drive's end was recorded with its last
    /// append there is nothing to renew: true.
    pub(crate) fn renew(&self, log: &dyn Store, ttl_ms: u64, now_us: i64) -> bool {
        if self.is_ended() {
            return true;
        }
        let mut guard = self.lease.blocking_lock();
        // Ended while this renewal waited for the lock (the ending append held it).
        if self.is_ended() {
            return true;
        }
        let Some(current) = guard.as_ref().filter(|_| !self.is_lost()) else { return false };
        match log.renew_lease(current, ttl_ms, now_us) {
            Ok(Some(renewed)) => {
                // The old lease's epoch is no longer current: dropping it releases nothing.
                *guard = Some(renewed);
                true
            }
            Ok(None) => {
                self.lost.store(true, Ordering::SeqCst);
                false
            }
            Err(e) => {
                tracing::warn!(run = %current.run(), error = %e, "cannot renew the run's lease: stopping its driver");
                self.lost.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    /// Ends the hold, so another driver may take the run at once: `end` gets the lease if
    /// it is still held (not lost) and returns whether it released it itself (the shared
    /// queue's `done` does, in the same transaction); if not, it is released here. A lease released either way is not
    /// released again when dropped (that was a second round trip to a database per drive).
    pub(crate) fn release_after(&self, log: &dyn Store, end: impl FnOnce(&mut Lease) -> bool) {
        let mut guard = self.lease.blocking_lock();
        let Some(mut lease) = guard.take() else { return };
        if self.is_lost() {
            // Dropped: its backend releases it only if its epoch is still the run's.
            return;
        }
        if end(&mut lease) {
            return;
        }
        match log.release_lease(&lease) {
            Ok(()) => lease.released_elsewhere(),
            Err(e) => tracing::warn!(run = %lease.run(), error = %e, "cannot release the run's lease (it expires)"),
        }
    }
}
