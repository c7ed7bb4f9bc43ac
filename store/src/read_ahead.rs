//! Reading many runs' logs in one pass, with sled's reads done ahead on a second thread
//! ([`crate::EventLog::read_runs`]).
//!
//! Why: offline replay, export and verify go through every record of many runs. Per
//! record, sled's range scan (page lookups, copying pages in from the file) costs about as
//! much as keel's own work on it (envelope decode, chain link, event decode, fold), so
//! overlapping the two roughly halves the wall time of a replay on a machine with a spare
//! core. The read-ahead thread runs sled's range scans, copies the stored pairs into one
//! buffer per batch (sled's own buffers are reference-counted across pages: handing them
//! over made both cores fight over the counts and the allocator, and was slower than the
//! copy) and hashes each payload (SHA-256 of the stored payload bytes, which the record
//! digest covers: about half of the hashing); the reader's thread does every check of
//! [`crate::EventLog::read`] on the pairs, with the same code, taking the payload hashes
//! it was handed. (Handing over the whole record digest made the read-ahead thread the
//! slower of the two.) The records, their order and
//! every error are those of calling `read` run after run.

use crate::error::StoreError;
use crate::log::{Record, RunRecords};
use crate::record::{self, RecordCheck};
use crate::types::{Hash32, RunId, Seq};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

/// Records per message between the threads: large enough that the channel costs little per
/// record, small enough that the reader starts at once.
const BATCH: usize = 256;
/// Batches in flight: bounds the memory read ahead (~`BATCH * BOUND` records).
const BOUND: usize = 8;

/// `(index of the run in the request, the run, a stored pair as ranges of the batch's
/// bytes with its payload's SHA-256, or the error that ends the run)`.
type Item = (usize, RunId, Result<(Range<usize>, Range<usize>, Option<Hash32>), StoreError>);

/// A batch of stored pairs, copied into one buffer.
struct Batch {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

impl Batch {
    fn new() -> Batch {
        Batch { bytes: Vec::with_capacity(BATCH * 256), items: Vec::with_capacity(BATCH) }
    }

    fn push(&mut self, i: usize, run: RunId, kv: Result<(sled::IVec, sled::IVec), StoreError>) {
        let item = kv.map(|(k, v)| {
            let at = self.bytes.len();
            self.bytes.extend_from_slice(&k);
            self.bytes.extend_from_slice(&v);
            let (kr, vr) = (at..at + k.len(), at + k.len()..self.bytes.len());
            // Digest the copy: the reader checks exactly these bytes.
            let digest = record::stored_payload_digest(&self.bytes[vr.clone()]);
            (kr, vr, digest)
        });
        self.items.push((i, run, item));
    }
}

/// The reader's side: links each run's records as they arrive.
pub(crate) struct ReadAhead {
    rx: Option<Receiver<Batch>>,
    /// The bytes of the batch being read, and its items not read yet.
    bytes: Vec<u8>,
    items: std::vec::IntoIter<Item>,
    /// Index of the run being read and its checks.
    current: Option<(usize, RecordCheck)>,
    thread: Option<JoinHandle<()>>,
}

impl ReadAhead {
    /// Starts the read-ahead thread over `db`; `None` if no thread could be started (the
    /// caller reads run after run instead).
    pub(crate) fn start(db: sled::Db, runs: Vec<RunId>) -> Option<ReadAhead> {
        let (tx, rx) = sync_channel::<Batch>(BOUND);
        let thread = std::thread::Builder::new().name("keel-read-ahead".into()).spawn(move || {
            let mut out = Batch::new();
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
                            let full = std::mem::replace(&mut out, Batch::new());
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
                let _ = tx.send(out);
            }
        });
        match thread {
            Ok(t) => Some(ReadAhead {
                rx: Some(rx),
                bytes: Vec::new(),
                items: Vec::new().into_iter(),
                current: None,
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the read-ahead thread; reading run after run");
                None
            }
        }
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
                self.bytes = batch.bytes;
                self.items = batch.items.into_iter();
                continue;
            };
            let bytes = &self.bytes;
            let mut digest = None;
            let r = r.and_then(|(k, v, d)| {
                digest = d;
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
            if let Some(r) = check.step_digested(r, digest) {
                return Some((run, r));
            }
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Hang up first so the thread stops at its next send, then wait for it: it holds a
        // handle on the database, which must be closed when the store is.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
