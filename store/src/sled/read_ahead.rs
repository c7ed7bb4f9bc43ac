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

use crate::envelope::record::{self, Prehashed, RecordCheck};
use crate::error::StoreError;
use crate::log::Record;
use crate::types::{RunId, Seq};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Records per message between the threads: large enough that the channel costs little per
/// record, small enough that the reader starts at once.
const BATCH: usize = 256;
/// A batch is sent once it holds this many bytes, whatever its record count.
const BATCH_BYTES: usize = 256 * 1024;
/// Batches in flight: with the two being filled and read, the memory read ahead stays under
/// `(BOUND + 2) * (BATCH_BYTES + one record)`, about 4 MB with the largest records.
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

    /// Adds a stored pair of run `i`, expected to be record `expected`. Returns whether the
    /// reader's checks will end the run at this pair without reading the chain (a sled
    /// error, a malformed or foreign key, a gap, an envelope that does not decode): then
    /// the rest of the run is not read.
    fn push(&mut self, i: usize, run: RunId, expected: u64, kv: Result<(sled::IVec, sled::IVec), StoreError>) -> bool {
        let mut ends = true;
        let item = kv.map(|(k, v)| {
            let at = self.bytes.len();
            self.bytes.extend_from_slice(&k);
            self.bytes.extend_from_slice(&v);
            let (kr, vr) = (at..at + k.len(), at + k.len()..self.bytes.len());
            // Hash the copy: the reader checks exactly these bytes.
            let key = self.bytes.get(kr.clone()).unwrap_or_default();
            let value = self.bytes.get(vr.clone()).unwrap_or_default();
            let in_order = record::parse_event_key(key) == Some((run, expected));
            let pre = record::prehash(run, (self.whole && in_order).then_some(expected), value);
            ends = pre.is_none() || !in_order;
            (kr, vr, pre.unwrap_or(Prehashed::Nothing))
        });
        self.items.push((i, run, item));
        ends
    }

    fn full(&self) -> bool {
        self.items.len() >= BATCH || self.bytes.len() >= BATCH_BYTES
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
    /// Set when the reader is dropped: the job stops before its next run (it also stops at
    /// its next send).
    hang_up: Arc<AtomicBool>,
}

impl ReadAhead {
    /// Starts the read-ahead thread over `db`; `None` if no thread could be started (the
    /// caller reads run after run instead).
    pub(crate) fn start(db: sled::Db, runs: Vec<RunId>) -> Option<ReadAhead> {
        Self::start_with(runs, move |run: RunId| {
            let lo = record::event_key(run, 0);
            let hi = record::event_key(run, u64::MAX);
            // From the run's sealed value (its prefix key), expanded into its records.
            let stored =
                db.range(record::run_prefix(run).to_vec()..=hi.to_vec()).map(|r| r.map_err(crate::error::sled_err));
            crate::kv::sealed::Expand::new(stored, &lo, &hi, Vec::new(), Some(super::getter(db.clone())))
        })
    }

    /// [`ReadAhead::start`] over any source of each run's stored pairs (`range` owns what it
    /// reads from: the database handle is dropped with it, before the reader is told the
    /// job is over).
    fn start_with<F, I>(runs: Vec<RunId>, range: F) -> Option<ReadAhead>
    where
        F: Fn(RunId) -> I + Send + 'static,
        I: Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>>,
    {
        let (tx, rx) = sync_channel::<Batch>(BOUND);
        let queued = Arc::new(AtomicUsize::new(0));
        let lead = queued.clone();
        let (done_tx, done_rx) = sync_channel::<()>(1);
        let hung_up = Arc::new(AtomicBool::new(false));
        let hang_up = hung_up.clone();
        let job = move || {
            // Declared first, dropped last: the reader learns the job is over only once
            // the database handle below is gone.
            let _done = Done(done_tx);
            let range = range;
            let mut out = Batch::new(false);
            let mut runs = runs.into_iter().enumerate();
            for (i, run) in runs.by_ref() {
                if hung_up.load(Ordering::Relaxed) {
                    return;
                }
                let scanned = catch_unwind(AssertUnwindSafe(|| {
                    for (expected, kv) in (0u64..).zip(range(run)) {
                        let ends = out.push(i, run, expected, kv);
                        if out.full() {
                            // Ahead of the reader: take more of the hashing.
                            let whole = lead.fetch_add(1, Ordering::Relaxed) + 1 >= 2;
                            let full = std::mem::replace(&mut out, Batch::new(whole));
                            if tx.send(full).is_err() {
                                return false; // the reader hung up: stop reading
                            }
                        }
                        if ends {
                            break; // the reader ends the run here
                        }
                    }
                    true
                }));
                match scanned {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(panic) => {
                        // sled panics on some damaged files. Its state is unknown after
                        // that: the pass ends, with an error for this run and for every run
                        // not read (`read` would have unwound into the caller instead).
                        let msg = crate::error::panic_message(&*panic);
                        out.items.push((i, run, Err(StoreError::Panicked(msg.clone()))));
                        for (j, other) in runs.by_ref() {
                            let why = format!("not read: the read-ahead stopped after sled panicked ({msg})");
                            out.items.push((j, other, Err(StoreError::Panicked(why))));
                        }
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
                hang_up,
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
    type Item = (usize, Result<Record, StoreError>);

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
            let r = match r {
                // The pass is ending: said even if the run already ended with an error.
                Err(e @ StoreError::Panicked(_)) => return Some((i, Err(e))),
                r => r,
            };
            let check = match &mut self.current {
                Some((j, c)) if *j == i => c,
                slot => &mut slot.insert((i, RecordCheck::new(run, Seq(0), [0; 32], true))).1,
            };
            // `None` once the run has ended: its remaining items are skipped.
            if let Some(r) = check.step_prehashed(r, pre) {
                return Some((i, r));
            }
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Hang up first so the job stops at its next send, then wait for its end: it holds
        // a handle on the database, which must be closed when the store is.
        self.hang_up.store(true, Ordering::Relaxed);
        drop(self.rx.take());
        if let Some(done) = self.done.take() {
            let _ = done.recv();
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::log::{prepare, NewRecord};

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ev(u64);
    impl crate::Payload for Ev {
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

    /// The stored pairs of a run of `n` records, as the store writes them.
    fn stored(run: RunId, n: u64) -> Vec<(sled::IVec, sled::IVec)> {
        let records: Vec<NewRecord> = (0..n).map(|i| prepare(&Ev(i), i as i64).unwrap()).collect();
        let (values, _) = record::build_batch(run, &crate::Head::empty(), records).unwrap();
        values.into_iter().map(|(seq, v)| (record::event_key(run, seq).to_vec().into(), v.into())).collect()
    }

    #[test]
    fn a_sled_panic_ends_the_pass_with_an_error_for_that_run_and_each_run_not_read() {
        let runs: Vec<RunId> = (1..=4).map(|n| RunId::from_bytes([n; 16])).collect();
        let data: Vec<_> = runs.iter().map(|&r| stored(r, 10)).collect();
        let mut damaged = data[1].clone();
        damaged.remove(2); // run 2 ends with a gap at seq 2 ...
        let source = {
            let data = data.clone();
            let runs = runs.clone();
            move |run: RunId| {
                let i = runs.iter().position(|r| *r == run).unwrap();
                let pairs = if i == 1 { damaged.clone() } else { data[i].clone() };
                // ... and sled panics at its 6th pair, past that gap.
                pairs.into_iter().enumerate().map(move |(k, kv)| {
                    assert!(!(i == 1 && k == 5), "injected sled panic");
                    Ok(kv)
                })
            }
        };
        let got: Vec<(usize, Result<u64, String>)> = ReadAhead::start_with(runs.clone(), source)
            .unwrap()
            .map(|(i, r)| (i, r.map(|x| x.seq.0).map_err(|e| e.to_string())))
            .collect();
        let ok = |i: usize| got.iter().filter(|(j, r)| *j == i && r.is_ok()).count();
        let errors: Vec<&(usize, Result<u64, String>)> = got.iter().filter(|(_, r)| r.is_err()).collect();
        assert_eq!((ok(0), ok(1), ok(2), ok(3)), (10, 2, 10, 10), "{got:?}");
        // Run 2 ends at its gap, where the scan stopped too: no panic, runs 3 and 4 read.
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].1.as_ref().unwrap_err().contains("record missing"), "{errors:?}");

        // Without the gap, the panic is reached: run 2 ends with it, runs 3 and 4 say why
        // they were not read.
        let runs2 = runs.clone();
        let got: Vec<(usize, Result<u64, String>)> = ReadAhead::start_with(runs.clone(), move |run: RunId| {
            let i = runs2.iter().position(|r| *r == run).unwrap();
            data[i].clone().into_iter().enumerate().map(move |(k, kv)| {
                assert!(!(i == 1 && k == 5), "injected sled panic");
                Ok(kv)
            })
        })
        .unwrap()
        .map(|(i, r)| (i, r.map(|x| x.seq.0).map_err(|e| e.to_string())))
        .collect();
        let errors: Vec<(usize, String)> = got.iter().filter_map(|(i, r)| r.clone().err().map(|e| (*i, e))).collect();
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3], "{got:?}");
        assert!(errors[0].1.contains("injected sled panic"), "{errors:?}");
        assert!(errors[1].1.contains("not read"), "{errors:?}");
        assert_eq!(got.iter().filter(|(i, r)| *i == 1 && r.is_ok()).count(), 5);
    }
}
