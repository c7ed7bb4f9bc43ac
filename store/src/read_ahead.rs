//! Reading many runs' logs in one pass, with sled's reads done ahead on a second thread
//! ([`crate::EventLog::read_runs`]).
//!
//! Why: offline replay, export and verify go through every record of many runs. Per
//! record, sled's range scan (page lookups, copying pages in from the file) costs about as
//! much as keel's own work on it (envelope decode, chain link, event decode, fold), so
//! overlapping the two roughly halves the wall time of a replay on a machine with a spare
//! core. The read-ahead thread runs sled's range scans and copies the stored pairs into
//! one buffer per batch (sled's own buffers are reference-counted across pages: handing
//! them over made both cores fight over the counts and the allocator, and was slower than
//! the copy); the reader's thread does every check of [`crate::EventLog::read`] on the
//! pairs, with the same code. The records, their order and every error are those of
//! calling `read` run after run.
//!
//! The hashing is shared to keep both threads busy: the read-ahead thread hashes each
//! payload, and while it is ahead (two batches or more waiting for the reader) it computes
//! whole record digests, leaving the reader only the chain step. Which thread hashed what
//! changes no result (debug builds check every hash handed over against the reader's own).

use crate::error::StoreError;
use crate::log::{Record, RunRecords};
use crate::record::{self, Prehashed, RecordCheck};
use crate::types::{RunId, Seq};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Records per message between the threads: large enough that the channel costs little per
/// record, small enough that the reader starts at once.
const BATCH: usize = 256;
/// Batches in flight: bounds the memory read ahead (~`BATCH * BOUND` records).
const BOUND: usize = 8;

/// `(index of the run in the request, the run, a stored pair as ranges of the batch's
/// bytes with the hashing done ahead, or the error that ends the run)`.
type Item = (usize, RunId, Result<(Range<usize>, Range<usize>, Prehashed), StoreError>);

/// A batch of stored pairs, copied into one buffer.
struct Batch {
    bytes: Vec<u8>,
    items: Vec<Item>,
    /// Whether this batch's records get whole record digests.
    whole: bool,
}

impl Batch {
    fn new(whole: bool) -> Batch {
        Batch { bytes: Vec::with_capacity(BATCH * 256), items: Vec::with_capacity(BATCH), whole }
    }

    fn push(&mut self, i: usize, run: RunId, kv: Result<(sled::IVec, sled::IVec), StoreError>) {
        let item = kv.map(|(k, v)| {
            let at = self.bytes.len();
            self.bytes.extend_from_slice(&k);
            self.bytes.extend_from_slice(&v);
            let (kr, vr) = (at..at + k.len(), at + k.len()..self.bytes.len());
            // Hash the copy: the reader checks exactly these bytes.
            let pre = record::prehash(run, &self.bytes[kr.clone()], &self.bytes[vr.clone()], self.whole);
            (kr, vr, pre)
        });
        self.items.push((i, run, item));
    }
}

/// The reader's side: links each run's records as they arrive.
pub(crate) struct ReadAhead {
    rx: Option<Receiver<Batch>>,
    /// Batches sent and not yet received (the read-ahead thread's lead).
    queued: Arc<AtomicUsize>,
    /// The bytes of the batch being read, and its items not read yet.
    bytes: Vec<u8>,
    items: std::vec::IntoIter<Item>,
    /// Index of the run being read and its checks.
    current: Option<(usize, RecordCheck)>,
    /// Signalled when the job has ended and dropped its database handle.
    done: Option<Receiver<()>>,
}

impl ReadAhead {
    /// Starts the read-ahead thread over `db`; `None` if no thread could be started (the
    /// caller reads run after run instead).
    pub(crate) fn start(db: sled::Db, runs: Vec<RunId>) -> Option<ReadAhead> {
        let (tx, rx) = sync_channel::<Batch>(BOUND);
        let queued = Arc::new(AtomicUsize::new(0));
        let lead = queued.clone();
        let (done_tx, done_rx) = sync_channel::<()>(1);
        let job = move || {
            // Declared first, dropped last: the reader learns the job is over only once
            // the database handle below is gone.
            let _done = Done(done_tx);
            let db = db;
            let mut out = Batch::new(false);
            for (i, run) in runs.into_iter().enumerate() {
                // sled panics on some damaged files: the run ends with that error, as
                // it would on the reader's thread, and nothing after it is read.
                let scanned = catch_unwind(AssertUnwindSafe(|| {
                    let lo = record::event_key(run, 0);
                    let hi = record::event_key(run, u64::MAX);
                    for kv in db.range(lo..=hi) {
                        let failed = kv.is_err();
                        out.push(i, run, kv.map_err(crate::error::sled_err));
                        if out.items.len() == BATCH {
                            // Ahead of the reader: take more of the hashing.
                            let whole = lead.fetch_add(1, Ordering::Relaxed) + 1 >= 2;
                            let full = std::mem::replace(&mut out, Batch::new(whole));
                            if tx.send(full).is_err() {
                                return false; // the reader hung up: stop reading
                            }
                        }
                        if failed {
                            break; // the run ends with its first error
                        }
                    }
                    true
                }));
                match scanned {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(panic) => {
                        out.items.push((i, run, Err(StoreError::Panicked(crate::error::panic_message(&*panic)))));
                        break;
                    }
                }
            }
            if !out.items.is_empty() {
                lead.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(out);
            }
        };
        match pool::run(Box::new(job)) {
            Ok(()) => Some(ReadAhead {
                rx: Some(rx),
                queued,
                bytes: Vec::new(),
                items: Vec::new().into_iter(),
                current: None,
                done: Some(done_rx),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a read-ahead thread; reading run after run");
                None
            }
        }
    }
}

/// Signals the end of a read-ahead job when dropped (also when the job panics).
struct Done(std::sync::mpsc::SyncSender<()>);

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

impl Iterator for ReadAhead {
    type Item = (RunId, Result<Record, StoreError>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some((i, run, r)) = self.items.next() else {
                // A closed channel: the thread sent everything (a panic in sled is caught
                // there and sent as the run's last item).
                let batch = self.rx.as_ref()?.recv().ok()?;
                self.queued.fetch_sub(1, Ordering::Relaxed);
                self.bytes = batch.bytes;
                self.items = batch.items.into_iter();
                continue;
            };
            let bytes = &self.bytes;
            let mut pre = Prehashed::Nothing;
            let r = r.and_then(|(k, v, p)| {
                pre = p;
                match (bytes.get(k), bytes.get(v)) {
                    (Some(k), Some(v)) => Ok((k, v)),
                    _ => Err(StoreError::Panicked("read-ahead batch out of bounds".into())),
                }
            });
            let check = match &mut self.current {
                Some((j, c)) if *j == i => c,
                slot => &mut slot.insert((i, RecordCheck::new(run, Seq(0), [0; 32], true))).1,
            };
            if check.done() {
                continue;
            }
            if let Some(r) = check.step_prehashed(r, pre) {
                return Some((run, r));
            }
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Hang up first so the job stops at its next send, then wait for its end: it holds
        // a handle on the database, which must be closed when the store is.
        drop(self.rx.take());
        if let Some(done) = self.done.take() {
            let _ = done.recv();
        }
    }
}

/// [`crate::EventLog::read_runs`] for backends without a read-ahead: `read` run after run.
pub(crate) fn sequential<'a, L: crate::EventLog + ?Sized>(log: &'a L, runs: &'a [RunId]) -> RunRecords<'a> {
    Box::new(runs.iter().flat_map(move |&run| {
        let records: crate::RecordIter = match log.read(run, Seq(0)) {
            Ok(it) => it,
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        records.map(move |r| (run, r))
    }))
}

/// The read-ahead threads: started on demand, kept for reuse while idle (a minute), so that
/// replaying run after run does not start a thread each time nor page in fresh memory for
/// each one (a new thread's allocations come from a fresh arena; measured: ~9,400 page
/// faults, a fifth of a replay's time, per 100k-record fold; docs/PERFORMANCE.md).
mod pool {
    use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
    use std::sync::Mutex;
    use std::time::Duration;

    pub(super) type Job = Box<dyn FnOnce() + Send + 'static>;

    /// How long an idle thread waits for a job before it ends.
    const KEEP_ALIVE: Duration = Duration::from_secs(60);

    /// Idle threads: `(id, where to send it a job)`.
    static IDLE: Mutex<Vec<(u64, Sender<Job>)>> = Mutex::new(Vec::new());
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn idle() -> std::sync::MutexGuard<'static, Vec<(u64, Sender<Job>)>> {
        IDLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `job` on an idle thread, or on a new one.
    pub(super) fn run(job: Job) -> std::io::Result<()> {
        let taken = idle().pop();
        let job = match taken {
            // An idle thread leaves the list only under the lock, so one taken from it is
            // waiting for this job; if it is gone all the same, start another.
            Some((_, tx)) => match tx.send(job) {
                Ok(()) => return Ok(()),
                Err(e) => e.0,
            },
            None => job,
        };
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::Builder::new().name("keel-read-ahead".into()).spawn(move || worker(id, job)).map(|_| ())
    }

    fn worker(id: u64, first: Job) {
        let (tx, rx) = channel::<Job>();
        let mut job = first;
        loop {
            // A panic in a job is the job's (it catches sled's); the thread goes on.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            idle().push((id, tx.clone()));
            job = match rx.recv_timeout(KEEP_ALIVE) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let mut list = idle();
                    match list.iter().position(|(i, _)| *i == id) {
                        Some(p) => {
                            list.swap_remove(p);
                            return;
                        }
                        // Taken just now: its job is on the way.
                        None => {
                            drop(list);
                            match rx.recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            }
                        }
                    }
                }
            };
        }
    }
}
