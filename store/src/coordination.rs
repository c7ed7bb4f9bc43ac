//! Coordination: what several drivers of one store agree on besides the log itself —
//! leases with expiry and an epoch (fencing token), idempotency-key claims, snapshots,
//! auxiliary entries and a due-time index for timers. Apart from [`crate::EventLog`] so a
//! backend implements each on purpose, and a wrapper cannot forward the log and silently
//! drop a lease (neither trait has a default method).

use crate::error::StoreError;
use crate::log::{Claim, EventLog, Head, NewRecord};
use crate::types::{RunId, Seq};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Longest lease owner name, in bytes (`TooLarge { what: "lease owner" }`).
pub const OWNER_BYTES_MAX: usize = 256;

/// One auxiliary write: `(key, Some(value))` puts, `(key, None)` removes
/// ([`Coordination::append_with_aux`], [`Coordination::aux_apply`]).
pub type AuxWrite = (Vec<u8>, Option<Vec<u8>>);

/// Aux keys that start with this are **counters**: a write `(key, Some(v))` with an 8-byte
/// `v` on such a key ([`counter_add`]) adds `v` (a big-endian `i64`) to the counter's
/// stored value (absent: 0) instead of replacing it, atomically with the rest of the write
/// (concurrent adds from any number of writers sum exactly); `(key, None)` removes it.
/// Reads ([`Coordination::aux_get`], [`Coordination::aux_range`]) return the sum as 8
/// big-endian bytes ([`counter_value`]). The engine keeps its run counts this way.
pub const COUNTER_PREFIX: &[u8] = b"#n/";

/// The aux write that adds `delta` to the counter `key` (the key is given without
/// [`COUNTER_PREFIX`], which this prepends).
pub fn counter_add(key: &[u8], delta: i64) -> AuxWrite {
    ([COUNTER_PREFIX, key].concat(), Some(delta.to_be_bytes().to_vec()))
}

/// A counter's value as read back (0 for a value that is not 8 bytes).
pub fn counter_value(v: &[u8]) -> i64 {
    <[u8; 8]>::try_from(v).map(i64::from_be_bytes).unwrap_or(0)
}

/// The amount an aux write adds, if it is a counter add (see [`COUNTER_PREFIX`]).
pub fn counter_delta(key: &[u8], value: Option<&[u8]>) -> Option<i64> {
    if !key.starts_with(COUNTER_PREFIX) {
        return None;
    }
    value.and_then(|v| <[u8; 8]>::try_from(v).ok()).map(i64::from_be_bytes)
}

/// Folds one aux write into `map` (the writes of one atomic step, by key): a counter add
/// sums with an earlier add of the same key, anything else replaces what was there. (A
/// removal followed by an add of one counter in the same map keeps only the add.)
pub fn merge_aux(map: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>, key: &[u8], value: Option<&[u8]>) {
    if let Some(d) = counter_delta(key, value) {
        let prev = map.get(key).and_then(|v| counter_delta(key, v.as_deref())).unwrap_or(0);
        map.insert(key.to_vec(), Some(prev.wrapping_add(d).to_be_bytes().to_vec()));
    } else {
        map.insert(key.to_vec(), value.map(<[u8]>::to_vec));
    }
}

/// One auxiliary entry as listed by [`Coordination::aux_range`]: `(key, value)`.
pub type AuxEntry = (Vec<u8>, Vec<u8>);

/// The fencing token of a lease: the run and the lease epoch at grant or renewal. An append
/// made with it ([`Coordination::append_fenced`]) is refused with
/// [`StoreError::Fenced`] once the run's epoch has moved on (the lease was renewed,
/// released, or taken by someone else after it expired), so a driver paused past its lease
/// cannot write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The run the lease is on.
    pub run: RunId,
    /// The run's lease epoch the holder was granted.
    pub epoch: u64,
}

/// What ends a lease when its holder drops it: the granting backend's handle. A backend
/// that keeps leases outside the process (a database) hands one to
/// [`Lease::releasing_on_drop`], so a dropped lease frees its run at once on every backend.
pub trait ReleaseOnDrop: Send + Sync + std::fmt::Debug {
    /// Ends `run`'s lease if `epoch` is still its current one (a lost lease is left
    /// alone), as [`Coordination::release_lease`] does; failures are the backend's to log.
    fn release_dropped(&self, run: RunId, epoch: u64);
}

/// The right to drive one run (decide and perform its effects) until `expires_at_us`,
/// granted by [`Coordination::try_lease`]. Every built-in backend also releases it when
/// it is dropped (what an engine holding it for the length of one drive relies on).
#[derive(Debug)]
pub struct Lease {
    run: RunId,
    owner: String,
    epoch: u64,
    expires_at_us: i64,
    /// What releases it on drop (the in-process table or a backend's handle), if anything.
    table: Option<Arc<dyn ReleaseOnDrop>>,
}

impl Lease {
    /// A lease value as a backend that keeps leases elsewhere (a database) grants it:
    /// nothing happens on drop; it ends by expiry or [`Coordination::release_lease`].
    pub fn new(run: RunId, owner: &str, epoch: u64, expires_at_us: i64) -> Lease {
        Lease { run, owner: owner.to_owned(), epoch, expires_at_us, table: None }
    }

    /// A lease value that `by` releases when it is dropped (if its epoch is still the
    /// run's then): what a backend returns from `try_lease` and `renew_lease`.
    pub fn releasing_on_drop(
        run: RunId,
        owner: &str,
        epoch: u64,
        expires_at_us: i64,
        by: Arc<dyn ReleaseOnDrop>,
    ) -> Lease {
        Lease { run, owner: owner.to_owned(), epoch, expires_at_us, table: Some(by) }
    }

    /// The run this lease is for.
    pub fn run(&self) -> RunId {
        self.run
    }

    /// Who holds it (as given to [`Coordination::try_lease`]).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The run's lease epoch at grant or renewal; it increases on every grant, renewal and
    /// release of the run's lease.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When the lease ends unless renewed, microseconds since the Unix epoch.
    pub fn expires_at_us(&self) -> i64 {
        self.expires_at_us
    }

    /// The lease was released by other means than [`Coordination::release_lease`] (a
    /// backend's [`WorkQueue::done`] released it in the same transaction): dropping it
    /// releases nothing more.
    pub fn released_elsewhere(&mut self) {
        self.table = None;
    }

    /// The fencing token to append with ([`Coordination::append_fenced`]).
    pub fn fence(&self) -> Fence {
        Fence { run: self.run, epoch: self.epoch }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(table) = self.table.take() {
            table.release_dropped(self.run, self.epoch);
        }
    }
}

/// The coordination half of a store (see the module docs). Object safe.
pub trait Coordination: Send + Sync + 'static {
    /// Grants `owner` the lease on `run` for `ttl_ms` from `now_us` if nobody holds it
    /// unexpired (a lease held by the same owner is not granted twice: renew it instead);
    /// `None` if it is held. The run's epoch increases with the grant. Errors: an owner
    /// longer than [`OWNER_BYTES_MAX`] (`TooLarge`), backend failures.
    fn try_lease(&self, run: RunId, owner: &str, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError>;

    /// Extends `lease` to `ttl_ms` from `now_us` if it is still the run's current lease
    /// (same epoch, unexpired at `now_us`): returns the renewed lease, with a new epoch
    /// (the old fence stops working); `None` if the lease was lost.
    fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError>;

    /// Ends `lease` if it is still the run's current one (the epoch increases); a lease
    /// already lost is left alone.
    fn release_lease(&self, lease: &Lease) -> Result<(), StoreError>;

    /// [`EventLog::append`] checked against `fence` in the same atomic step: if the run's
    /// lease epoch is not `fence.epoch`, nothing is written and the error is
    /// [`StoreError::Fenced`].
    fn append_fenced(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
    ) -> Result<Head, StoreError>;

    /// The run holding an unexpired idempotency-key claim on `key` at `now_us` (claims
    /// are made by appends, [`Claim`]).
    fn lookup_key(&self, key: &[u8], now_us: i64) -> Result<Option<RunId>, StoreError>;

    /// Saves the folded state covering seqs `< next_seq`; only the last saved snapshot of a
    /// run is kept. `next_seq` beyond the head is refused (`SnapshotBeyondHead`), a state
    /// larger than `snapshot_bytes_max` too (`TooLarge`).
    fn save_snapshot(&self, run: RunId, next_seq: Seq, state: &[u8]) -> Result<(), StoreError>;

    /// The run's snapshot, checked against its checksum and against the log's chain hash at
    /// `next_seq - 1` (`CorruptSnapshot` otherwise).
    fn load_snapshot(&self, run: RunId) -> Result<Option<(Seq, Vec<u8>)>, StoreError>;

    /// An auxiliary entry outside every run's log (the response cache keeps outputs here).
    /// Aux entries are not chained, not verified, and become durable with the next flush
    /// of anything: treat them as a cache that may lose its latest writes in a crash.
    fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes an auxiliary entry (see [`Coordination::aux_get`]); limited to
    /// `key_bytes_max` / `event_bytes_max` (`TooLarge`).
    fn aux_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;

    /// [`crate::EventLog::append`] plus auxiliary writes (`(key, Some(value))` puts,
    /// `(key, None)` removes) in the **same atomic write** as the records, durable with
    /// them: the engine keeps its read models (run index, open escalations) this way, so an
    /// index entry exists exactly when the events that made it do. The aux writes are
    /// checked like [`Coordination::aux_put`] (`TooLarge { what: "aux key" | "aux value"
    /// | "aux writes" }`, at most `batch_records_max` of them) before anything is written;
    /// nothing is written if the append fails.
    fn append_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError>;

    /// [`Coordination::append_fenced`] and [`Coordination::append_with_aux`] in one: the
    /// records, the claim and the aux writes are written in the same atomic step as the
    /// check of `fence`, or nothing is (`Fenced`, `Conflict`, a refused claim, aux writes
    /// over the limits). A driver holding a run's lease appends this way.
    fn append_fenced_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError>;

    /// Applies auxiliary writes atomically, outside any append (durable with the next
    /// flush, as [`Coordination::aux_put`]); checked as in
    /// [`Coordination::append_with_aux`]. The engine rebuilds a missing index with it.
    fn aux_apply(&self, aux: Vec<AuxWrite>) -> Result<(), StoreError>;

    /// Up to `limit` auxiliary entries with `lo <= key <= hi`, in ascending key order (keys
    /// as given to [`Coordination::aux_put`], without any backend prefix).
    fn aux_range(&self, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<crate::AuxEntry>, StoreError>;

    /// Removes a run from the store for good (retention: `keel archive`, after the run was
    /// exported and verified): every record of the run, its snapshot and due time, the
    /// payloads `payloads` (the caller's list of those no remaining run refers to), and
    /// applies `aux` (a tombstone that keeps the run's head, index removals) — all in **one
    /// atomic write**, durable before it returns. Refused with `Conflict` (nothing removed)
    /// if the run's head is not `expected`, so a run that moved on since it was exported
    /// is never removed; `aux` is checked as in [`Coordination::append_with_aux`]. The
    /// run's head reads as empty afterwards.
    fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<crate::Hash32>,
        aux: Vec<AuxWrite>,
    ) -> Result<(), StoreError>;

    /// Stores each of `runs`' records compactly (sled: one value per run instead of one
    /// key per record, in one atomic write, so that a long history opens faster; PostgreSQL:
    /// nothing). The records read back unchanged, also by a read running meanwhile, and
    /// later appends follow as before. Not a durability step (a seal lost in a crash leaves
    /// the records as they were). Returns how many runs were sealed (a run with nothing
    /// loose, or too large for one value, is left as it is). The engine seals the runs that
    /// finished in it when it is dropped. No default: a store that wraps another must pass
    /// it on.
    fn seal_runs(&self, runs: &[RunId]) -> Result<usize, StoreError>;

    /// Sets `run`'s due time (when a timer of the run fires), microseconds since the Unix
    /// epoch, replacing any earlier one: one due time per run, its next wake-up. Durable
    /// with the next flush, as aux entries.
    fn put_due(&self, run: RunId, due_at_us: i64) -> Result<(), StoreError>;

    /// Clears `run`'s due time (nothing if it has none).
    fn remove_due(&self, run: RunId) -> Result<(), StoreError>;

    /// Up to `limit` runs whose due time is `<= now_us`, earliest first (ties by run id),
    /// with their due times. Reading does not clear them: the caller removes or moves a due
    /// time once it has acted on it.
    fn due(&self, now_us: i64, limit: usize) -> Result<Vec<(RunId, i64)>, StoreError>;

    /// The queue of runnable runs shared with the other processes of this store, if it is
    /// shared (`crate::WorkQueue`); `None` for a store one process opens (sled, memory),
    /// whose engine keeps its run queue in memory.
    fn work_queue(&self) -> Option<&dyn crate::WorkQueue>;

    /// The store's appends as futures ([`AsyncAppend`]), if it has them: a store whose
    /// appends are written by a task of its own (PostgreSQL's flusher) answers an awaited
    /// append without a thread held for it. `None` (the default): the blocking methods
    /// are the only ones.
    fn async_appends(&self) -> Option<&dyn AsyncAppend> {
        None
    }
}

/// What [`AsyncAppend::append_async`] returns: the append's outcome once it is durable
/// (the store's [`crate::Durability`]), as its blocking twin returns it.
pub type AppendFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Head, StoreError>> + Send + 'a>>;

/// Appends that are awaited instead of blocking a thread ([`Coordination::async_appends`]):
/// the same checks, atomicity, fencing and outcome as [`EventLog::append_with_aux`] (no
/// `fence`) and [`Coordination::append_fenced_with_aux`] (with one).
pub trait AsyncAppend: Send + Sync {
    /// Appends `records` to `run` at `expected` with `claim` and `aux` in one atomic
    /// step, fenced with `fence` if given. Checked before anything is queued: a refused
    /// append writes nothing.
    fn append_async<'a>(
        &'a self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<crate::AuxWrite>,
    ) -> AppendFuture<'a>;

    /// [`AsyncAppend::append_async`] fenced with `fence`, for the append after which the
    /// drive of `run` ends (the run is finished: nothing is appended after it in this
    /// drive), and, where the store can, that end recorded in its shared queue in the same
    /// atomic step, as [`WorkQueue::done`] by `owner` with no due time would record it,
    /// the fence's lease released with it. Returns the new head and whether the end was
    /// recorded: if not (the default, which only appends), the caller tells the queue
    /// itself. Refused or failed, nothing is written and the queue is told nothing.
    fn append_ending_async<'a>(
        &'a self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        fence: Fence,
        aux: Vec<crate::AuxWrite>,
        owner: &'a str,
    ) -> EndingFuture<'a> {
        let _ = owner;
        let appended = self.append_async(run, expected, records, None, Some(fence), aux);
        Box::pin(async move { appended.await.map(|head| (head, false)) })
    }

    /// The latest snapshot of `run` and its records after it, read without a thread held
    /// for the reads (on PostgreSQL in one statement). `Ok(None)` (the default): not
    /// served this way; read them with [`Coordination::load_snapshot`] and
    /// [`EventLog::read`] (as after a snapshot that does not open, which those report, or
    /// a tail longer than one read returns).
    fn fold_source_async<'a>(&'a self, run: RunId) -> FoldFuture<'a> {
        let _ = run;
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// What [`AsyncAppend::append_ending_async`] returns: the new head, and whether the
/// drive's end was recorded in the same step.
pub type EndingFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Head, bool), StoreError>> + Send + 'a>>;

/// What [`AsyncAppend::fold_source_async`] returns.
pub type FoldFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<FoldSource>, StoreError>> + Send + 'a>>;

/// A run's latest snapshot and the records after it: what a fold of the run reads.
pub struct FoldSource {
    /// `(next_seq, state)` of the run's latest snapshot, opened and checked against the
    /// log as [`Coordination::load_snapshot`] returns it; `None` without one.
    pub snapshot: Option<(Seq, Vec<u8>)>,
    /// The run's records from the snapshot's `next_seq` (from 0 without one) to its head,
    /// as [`EventLog::read`] yields them: each checked, and linked to the one before it,
    /// as the iteration reaches it (on the caller's thread, not the store's).
    pub records: crate::RecordIter,
}

impl std::fmt::Debug for FoldSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoldSource").field("snapshot", &self.snapshot.as_ref().map(|(s, _)| s)).finish_non_exhaustive()
    }
}

/// What the engine holds: the log and its coordination, one object.
pub trait Store: EventLog + Coordination {}

impl<T: EventLog + Coordination + ?Sized> Store for T {}

impl ReleaseOnDrop for LeaseTable {
    fn release_dropped(&self, run: RunId, epoch: u64) {
        self.release(run, epoch);
    }
}

/// One run's lease state in an in-process table.
#[derive(Debug, Default)]
pub(crate) struct LeaseEntry {
    epoch: u64,
    /// `(owner, expires_at_us)` while granted.
    holder: Option<(String, i64)>,
}

/// The leases of one in-process store handle (both built-in backends: one process opens
/// a sled db). Fenced appends check it under its lock.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    runs: Mutex<BTreeMap<RunId, LeaseEntry>>,
}

fn expiry(now_us: i64, ttl_ms: u64) -> i64 {
    let ttl_us = i64::try_from(ttl_ms).unwrap_or(i64::MAX).saturating_mul(1000);
    now_us.saturating_add(ttl_us)
}

impl LeaseTable {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<RunId, LeaseEntry>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn try_lease(
        self: &Arc<Self>,
        run: RunId,
        owner: &str,
        ttl_ms: u64,
        now_us: i64,
    ) -> Result<Option<Lease>, StoreError> {
        if owner.len() > OWNER_BYTES_MAX {
            return Err(StoreError::TooLarge { what: "lease owner", bytes: owner.len(), max: OWNER_BYTES_MAX });
        }
        let mut runs = self.lock();
        let entry = runs.entry(run).or_default();
        if matches!(&entry.holder, Some((_, expires)) if *expires > now_us) {
            return Ok(None);
        }
        entry.epoch = entry.epoch.saturating_add(1);
        let expires_at_us = expiry(now_us, ttl_ms);
        entry.holder = Some((owner.to_owned(), expires_at_us));
        let mut lease = Lease::new(run, owner, entry.epoch, expires_at_us);
        lease.table = Some(self.clone());
        Ok(Some(lease))
    }

    pub(crate) fn renew(self: &Arc<Self>, lease: &Lease, ttl_ms: u64, now_us: i64) -> Option<Lease> {
        let mut runs = self.lock();
        let entry = runs.get_mut(&lease.run)?;
        let current = entry.epoch == lease.epoch && matches!(&entry.holder, Some((_, e)) if *e > now_us);
        if !current {
            return None;
        }
        entry.epoch = entry.epoch.saturating_add(1);
        let expires_at_us = expiry(now_us, ttl_ms);
        entry.holder = Some((lease.owner.clone(), expires_at_us));
        let mut renewed = Lease::new(lease.run, &lease.owner, entry.epoch, expires_at_us);
        renewed.table = Some(self.clone());
        Some(renewed)
    }

    /// Ends the run's lease if `epoch` is still current.
    pub(crate) fn release(&self, run: RunId, epoch: u64) {
        let mut runs = self.lock();
        if let Some(entry) = runs.get_mut(&run) {
            if entry.epoch == epoch && entry.holder.is_some() {
                entry.holder = None;
                entry.epoch = entry.epoch.saturating_add(1);
            }
        }
    }

    /// `Ok` if `fence` is the run's current epoch; the caller holds `runs` (the lock) across
    /// the check and its write.
    pub(crate) fn check(runs: &BTreeMap<RunId, LeaseEntry>, fence: Fence) -> Result<(), StoreError> {
        let current = runs.get(&fence.run).map_or(0, |e| e.epoch);
        if current == fence.epoch {
            Ok(())
        } else {
            Err(StoreError::Fenced { run: fence.run, fence: fence.epoch, current })
        }
    }
}

// ---- The shared work queue ----
//
// The shared work queue: runnable runs that several processes on one store claim from.
//
// An embedded store (sled, memory) is opened by one process, whose engine keeps its run
// queue in memory: [`crate::Coordination::work_queue`] is `None` there, on purpose. A
// store shared by several processes (PostgreSQL) returns its [`WorkQueue`], and the
// engine's workers claim runs through it, so priority order and each workflow type's
// `max_concurrent_runs` hold across every process, and a run queued by one process is
// driven by whichever claims it first.

/// Longest workflow name the queue keeps, in bytes (`TooLarge { what: "workflow name" }`).
pub const WORKFLOW_BYTES_MAX: usize = 256;

/// Most runs one [`WorkQueue::claim`] may take.
pub const CLAIM_RUNS_MAX: usize = 1024;

/// A runnable run as the queue orders it: highest `priority` first, then oldest
/// `accepted_at_us`, then the order pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runnable {
    /// The run.
    pub run: RunId,
    /// Its workflow type (the unit of `max_concurrent_runs`).
    pub workflow: String,
    /// Its priority (higher first).
    pub priority: i32,
    /// When it was accepted, microseconds since the Unix epoch.
    pub accepted_at_us: i64,
}

/// A run taken by [`WorkQueue::claim`]: its lease (granted in the claim's transaction) and
/// its workflow type.
#[derive(Debug)]
pub struct Claimed {
    /// The lease on the run, as [`crate::Coordination::try_lease`] grants it.
    pub lease: Lease,
    /// The run's workflow type.
    pub workflow: String,
}

/// A queue of runnable runs shared by the processes of one store (see the module docs).
/// A run is in the queue from [`WorkQueue::push`] until [`WorkQueue::done`] by the owner
/// that claimed it; while its lease is live no one else claims it, and when the lease
/// expires (its worker died or stalled) it is claimable again.
pub trait WorkQueue: Send + Sync {
    /// Queues `runnable` (nothing if it is queued and unclaimed). A run claimed at the
    /// time is marked to be queued again when its driver is done with it (something was
    /// appended to it meanwhile). Wakes the claimers of every process.
    fn push(&self, runnable: &Runnable) -> Result<(), StoreError>;

    /// Takes up to `max` (at most [`CLAIM_RUNS_MAX`]) queued runs whose lease is free at
    /// `now_us`, in queue order, granting `owner` each run's lease for `ttl_ms` in the same
    /// transaction; a run of a workflow type with a limit in `limits` is taken only while
    /// fewer than that many of its runs hold a live lease, counted across all processes.
    fn claim(
        &self,
        owner: &str,
        ttl_ms: u64,
        now_us: i64,
        max: usize,
        limits: &BTreeMap<String, usize>,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// `owner`'s drive of `run` ended: the run leaves the queue, or is queued again if it
    /// was pushed while driven (returns true then). With `due_at_us` the run's due time
    /// is set in the store's due-time index ([`crate::Coordination::put_due`]) in the same
    /// step, for whichever process takes it ([`WorkQueue::take_due`]). Nothing if `owner`
    /// no longer has the run (its lease was lost and the run claimed again). With `lease`
    /// (the drive's, on `run`) the lease is released in the same step, as
    /// [`crate::Coordination::release_lease`] would (one transaction instead of two), and
    /// its drop releases nothing more.
    fn done(
        &self,
        run: RunId,
        owner: &str,
        due_at_us: Option<i64>,
        lease: Option<&mut Lease>,
    ) -> Result<bool, StoreError>;

    /// `owner` stops before its drive of `run` ended (its workers drain or stop): the run
    /// stays queued, no longer claimed, `lease` (the drive's, on `run`) is released, and
    /// the claimers of every process are told at the commit, all in one step, so another
    /// process takes the run over at once (the row is never out of the queue meanwhile).
    /// Returns whether `owner` still had the run's row (false: its lease was lost and the
    /// run claimed again; nothing is changed then but the notification). Like
    /// [`WorkQueue::done`], the lease's drop releases nothing more.
    fn hand_back(&self, run: RunId, owner: &str, lease: Option<&mut Lease>) -> Result<bool, StoreError>;

    /// Of `runs`, those not in the queue, in the order given: what a scan for runs whose
    /// push was lost still has to look at (one read instead of a fold and a push per run).
    /// A run waiting in the due-time index is listed: a push lost after something was
    /// appended to it (a cancel, a resolve) would otherwise wait for its due time.
    fn unqueued(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError>;

    /// Removes and returns up to `limit` runs whose due time is `<= now_us`, earliest
    /// first; each is taken by one caller only (the caller queues it).
    fn take_due(&self, now_us: i64, limit: usize) -> Result<Vec<RunId>, StoreError>;

    /// Whether any run of one of `workflows`, other than those in `except`, is in the
    /// queue, claimed or not (in any process): a worker that can claim nothing now is idle
    /// only when this is false; otherwise runs are driven elsewhere, or wait for the lease
    /// of a process that died to expire.
    fn any_queued(&self, workflows: &[&str], except: &[RunId]) -> Result<bool, StoreError>;

    /// Calls `wake` whenever a run may have become claimable (a push, a drive done, a
    /// lease released) in any process, as far as the store can tell; callers also poll.
    fn on_wake(&self, wake: Box<dyn Fn() + Send + Sync>);
}
