//! The journal: the one place where an event becomes a record in the log.
//!
//! Every writer goes through it (ingestion's `RunAccepted`, the facade's resolutions and
//! cancellations, the drivers' batches), and it does the same four steps for each:
//!
//! 1. **check**: `apply` the event to the run's state (the state machine refuses an
//!    illegal event, which then never reaches the log);
//! 2. **encode** the payload and check its size against the store's own limits (once:
//!    the store is configured with these same limits, so an append never fails on size);
//! 3. **append** the batch with optimistic concurrency (`expected` = the state's next seq
//!    before the batch), a driver's also fenced with its run's lease (`shell::lease`);
//! 4. **snapshot** the folded state when the append crossed a multiple of
//!    `snapshot_every` (an optimisation: a failure is logged, never returned).
//!
//! An append that changes a run's status (or adds to a finished run) carries the run's
//! index entries ([`crate::shell::index`]) in the same atomic write as its records. Once
//! the append is durable, the journal announces it ([`Change`]) to the engine's
//! subscribers.

use crate::core::{apply, apply_take, TransitionError};
use crate::error::EngineError;
use crate::model::event::{Event, Logged};
use crate::model::fsm::RunStatus;
use crate::model::payload;
use crate::model::state::RunState;
use crate::shell::fold::load_state;
use crate::shell::lease::Held;
use keel_store::{Claim, Limits, NewRecord, RunId, Seq, Store, StoreError};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Changes buffered for a subscriber that has not read them yet; one that falls further
/// behind is told it lagged ([`crate::Subscription`]) and re-reads from the log.
pub(crate) const CHANGES_BUFFER: usize = 4096;

/// A durable append, as the journal announces it to subscribers
/// ([`crate::Engine::subscribe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The run appended to.
    pub run: RunId,
    /// Its workflow type.
    pub workflow: String,
    /// Its status before the append (`None`: the append founded the run).
    pub previous: Option<RunStatus>,
    /// Its status after the append.
    pub status: RunStatus,
    /// The run's next seq after the append (its events are `< next_seq`).
    pub next_seq: Seq,
    /// When its latest event was recorded (µs since the epoch).
    pub at_us: i64,
}

impl Change {
    /// The append changed the run's status (or founded it).
    pub fn status_changed(&self) -> bool {
        self.previous != Some(self.status)
    }
}

/// Why an event could not be journaled. The state it was checked against is unchanged.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The state machine refuses it.
    Illegal(TransitionError),
    /// Its encoded payload is larger than the store accepts (`what`, bytes, max).
    TooLarge(&'static str, usize, usize),
    /// It does not encode (a bug: every event encodes), or a payload it refers to could
    /// not be stored.
    Encode(StoreError),
}

impl From<Refused> for EngineError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Illegal(e) => EngineError::Transition(e),
            Refused::TooLarge(what, bytes, max) => EngineError::Store(StoreError::TooLarge { what, bytes, max }),
            Refused::Encode(e) => EngineError::Store(e),
        }
    }
}

/// Checks, encodes, appends and snapshots (see the module docs).
pub(crate) struct Journal {
    log: Arc<dyn Store>,
    /// The limits the store was opened with: the only size check of an event.
    limits: Limits,
    /// Save a snapshot every this many events (0: never).
    snapshot_every: u64,
    /// Where durable appends are announced.
    changes: broadcast::Sender<Change>,
    /// Runs that finished here, sealed when the journal is dropped (at most `FINISHED_MAX`).
    finished: std::sync::Mutex<Vec<RunId>>,
}

/// Finished runs remembered for sealing (16 bytes each); runs past it stay unsealed.
const FINISHED_MAX: usize = 1 << 20;
/// Runs sealed per atomic write.
const SEAL_BATCH: usize = 64;
/// How long a drop of the journal (the engine's end) may spend sealing.
const SEAL_ON_DROP: std::time::Duration = std::time::Duration::from_secs(3);

impl Drop for Journal {
    fn drop(&mut self) {
        let (sealed, left) = self.seal_finished(SEAL_ON_DROP);
        if sealed > 0 || left > 0 {
            tracing::debug!(sealed, left, "finished runs sealed at the engine's end");
        }
    }
}

impl Journal {
    pub(crate) fn new(log: Arc<dyn Store>, limits: Limits, snapshot_every: u64) -> Self {
        Journal {
            log,
            limits,
            snapshot_every,
            changes: broadcast::channel(CHANGES_BUFFER).0,
            finished: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A receiver of every durable append from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Steps 1 and 2 for the first event of a run: the state it founds and its record.
    pub(crate) fn found(&self, logged: &Logged) -> Result<(RunState, NewRecord), EngineError> {
        // Pair check: the first event must fold (it always does; a failure is a bug).
        let state = apply(None, logged)?;
        let mut event = logged.event.clone();
        let record = self.encode(&mut event, logged.at_us)?;
        Ok((state, record))
    }

    /// Steps 1 and 2 for an event of an existing run: folds `event` (at `at_us`) into
    /// `state` and returns its record. On error `state` is unchanged and the event is
    /// handed back. The event's owned fields move into the state (`apply_take`), so a
    /// caller that needs the event afterwards keeps a copy.
    // The error hands the event back by value on a rare path; boxing it would allocate.
    #[allow(clippy::result_large_err)]
    pub(crate) fn check(&self, state: &mut RunState, event: Event, at_us: i64) -> Result<NewRecord, (Refused, Event)> {
        let mut event = event;
        let record = match self.encode(&mut event, at_us) {
            Ok(r) => r,
            Err(refused) => return Err((refused, event)),
        };
        let mut logged = Logged { run: state.run, seq: state.next_seq, at_us, event };
        if let Err(e) = apply_take(state, &mut logged) {
            // apply_take changes nothing on error: the event is intact.
            return Err((Refused::Illegal(e), logged.event));
        }
        Ok(record)
    }

    /// Step 2: the record of `event`, within the store's limits. Values in payload slots
    /// larger than [`payload::INLINE_JSON_BYTES_MAX`] are stored in the payload store first
    /// (not flushed: the append of this record flushes them with it) and the record
    /// carries their references; `event` is handed back with its values in place.
    fn encode(&self, event: &mut Event, at_us: i64) -> Result<NewRecord, Refused> {
        let moved = if payload::needs_outline(event, payload::INLINE_JSON_BYTES_MAX) {
            payload::outline(event, payload::INLINE_JSON_BYTES_MAX, |bytes| self.log.put_payload(bytes))
                .map_err(Refused::Encode)?
        } else {
            Vec::new()
        };
        let record = keel_store::prepare_within(&*event, at_us, &self.limits).map_err(|e| match e {
            StoreError::TooLarge { what, bytes, max } => Refused::TooLarge(what, bytes, max),
            other => Refused::Encode(other),
        });
        payload::restore(event, moved);
        record
    }

    /// Steps 3 and 4: appends `records` (checked against `expected`, the run's next seq
    /// before them; `before` is the run's status then, `None` for a new run) and saves a
    /// snapshot of `after` (the state they lead to) if one is due. With a `claim`, the
    /// idempotency key is claimed in the same atomic write; so are the run's index entries
    /// when the status changes. Subscribers hear of it once it is durable.
    pub(crate) async fn append(
        &self,
        before: Option<RunStatus>,
        after: &RunState,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<(), EngineError> {
        self.append_as(before, after, expected, records, claim, None).await
    }

    /// [`Journal::append`] by a driver holding the run's lease: the append is fenced with
    /// it (`StoreError::Fenced` once the lease was lost; see `shell::lease`), in the same
    /// atomic step as the records and the index writes.
    pub(crate) async fn append_as(
        &self,
        before: Option<RunStatus>,
        after: &RunState,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        held: Option<Arc<Held>>,
    ) -> Result<(), EngineError> {
        let (run, head) = (after.run, after.next_seq);
        let snapshot = snapshot_bytes(after, expected, self.snapshot_every);
        let mut aux = crate::shell::index::writes(before, after, self.limits.event_bytes_max)?;
        aux.extend(crate::shell::counts::writes(before, after));
        if let Some(appends) = self.log.async_appends() {
            // Awaited: the store's own task answers (no thread blocked for the append).
            // A finished run's last append of its drive carries the drive's end to the
            // shared queue where the store can (one statement, not one more).
            let ending = after.status.is_terminal() && claim.is_none() && self.log.work_queue().is_some();
            let new_head = match &held {
                Some(h) if ending => h.append_ending_async(appends, run, expected, records, aux).await?,
                Some(h) => h.append_async(appends, run, expected, records, claim, aux).await?,
                None => appends.append_async(run, expected, records, claim, None, aux).await?,
            };
            debug_assert_eq!(new_head.next_seq, head, "store head and folded state disagree");
            if let Some(bytes) = snapshot {
                blocking(&self.log, move |log| {
                    if let Err(e) = log.save_snapshot(run, head, &bytes) {
                        tracing::warn!(%run, error = %e, "snapshot not saved");
                    }
                    Ok(())
                })
                .await?;
            }
            self.announce(before, after);
            return Ok(());
        }
        let finished = after.status.is_terminal();
        blocking(&self.log, move |log| {
            let new_head = match &held {
                Some(h) => h.append(log, run, expected, records, claim, aux)?,
                None if aux.is_empty() => log.append(run, expected, records, claim)?,
                None => log.append_with_aux(run, expected, records, claim, aux)?,
            };
            debug_assert_eq!(new_head.next_seq, head, "store head and folded state disagree");
            if let Some(bytes) = snapshot {
                if let Err(e) = log.save_snapshot(run, head, &bytes) {
                    tracing::warn!(%run, error = %e, "snapshot not saved");
                }
            }
            Ok(())
        })
        .await?;
        if finished {
            self.finished_here(run);
        }
        self.announce(before, after);
        Ok(())
    }

    /// Notes a run that finished here, to be sealed when the journal is dropped.
    fn finished_here(&self, run: RunId) {
        let mut f = self.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() < FINISHED_MAX {
            f.push(run);
        }
    }

    /// Seals the runs that finished here ([`keel_store::Coordination::seal_runs`]: one
    /// stored value per run on sled, so every later open loads fewer keys), a batch at a
    /// time, until done or `budget` is spent. Off the appends' path: sealing as each run
    /// finished cost 5-35% of the engine's throughput (docs/PERFORMANCE.md, session 19).
    /// Returns the runs sealed and the runs left unsealed (they read the same; only the
    /// next opens load their keys).
    fn seal_finished(&self, budget: std::time::Duration) -> (usize, usize) {
        let mut runs = std::mem::take(&mut *self.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        runs.sort_unstable();
        runs.dedup();
        let start = std::time::Instant::now();
        let mut sealed = 0;
        let mut done = 0;
        for chunk in runs.chunks(SEAL_BATCH) {
            if start.elapsed() >= budget {
                break;
            }
            match self.log.seal_runs(chunk) {
                Ok(n) => sealed += n,
                Err(e) => {
                    tracing::warn!(error = %e, "finished runs not sealed");
                    break;
                }
            }
            done += chunk.len();
        }
        (sealed, runs.len() - done)
    }

    /// Tells the subscribers of a durable append that led from `before` to `after`.
    fn announce(&self, before: Option<RunStatus>, after: &RunState) {
        if self.changes.receiver_count() > 0 {
            // No receiver: nothing to build. A send fails only without receivers.
            let _ = self.changes.send(Change {
                run: after.run,
                workflow: after.workflow.clone(),
                previous: before,
                status: after.status,
                next_seq: after.next_seq,
                at_us: after.last_event_us,
            });
        }
    }

    /// Appends one event decided outside a driver (a resolution, a cancellation) with
    /// optimistic concurrency: `build` sees the current state and returns the event (or a
    /// typed error); on a conflict the state is re-read and `build` asked again. `now_us`
    /// is the shell's clock. Returns the state after the event.
    pub(crate) async fn append_outside(
        &self,
        run: RunId,
        now_us: impl Fn() -> i64,
        build: impl Fn(&RunState) -> Result<Event, EngineError>,
    ) -> Result<RunState, EngineError> {
        loop {
            let state = self.load(run).await?.ok_or(EngineError::UnknownRun { run })?;
            let event = build(&state)?;
            let at_us = now_us().max(state.last_event_us);
            let expected = state.next_seq;
            let before = state.status;
            let mut next = state;
            let record = self.check(&mut next, event, at_us).map_err(|(refused, _)| EngineError::from(refused))?;
            match self.append(Some(before), &next, expected, vec![record], None).await {
                Ok(()) => return Ok(next),
                Err(EngineError::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The run's current state (latest snapshot + tail), read without stalling the runtime.
    /// A store with awaited appends may read the snapshot and a short tail without a
    /// thread held (PostgreSQL: one statement), folded on this task (a page of records at
    /// most: microseconds each); otherwise, where that read leaves it to the blocking one,
    /// or where it failed (read again, each page within the store's bound), [`load_state`].
    pub(crate) async fn load(&self, run: RunId) -> Result<Option<RunState>, EngineError> {
        if let Some(reads) = self.log.async_appends() {
            match reads.fold_source_async(run).await {
                Ok(Some(source)) => {
                    if let Some(state) = crate::shell::fold::fold_source(run, source)? {
                        return Ok(state);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%run, error = %e, "the awaited fold read failed; reading it again, blocking"),
            }
        }
        blocking(&self.log, move |log| load_state(log, run)).await
    }
}

/// Runs a blocking store call (sled calls block) without stalling other tasks: on a
/// multi-thread runtime in place (`block_in_place`: this thread does the call while the
/// runtime moves its other tasks to another thread), so a driver's append needs no
/// hand-off to the blocking pool and back (two thread wake-ups per append, measured as
/// most of the engine's overhead per durable step, docs/PERFORMANCE.md); on a
/// current-thread runtime on the blocking pool. Either way each waiting append holds a
/// thread, so group commit batches the appends of different runs.
pub(crate) async fn blocking<T, F>(log: &Arc<dyn Store>, f: F) -> Result<T, EngineError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> Result<T, EngineError> + Send + 'static,
{
    let log = log.clone();
    if matches!(
        tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
        Ok(tokio::runtime::RuntimeFlavor::MultiThread)
    ) {
        return tokio::task::block_in_place(move || f(log.as_ref()));
    }
    tokio::task::spawn_blocking(move || f(log.as_ref()))
        .await
        .map_err(|e| EngineError::Internal(format!("store task: {e}")))?
}

/// The encoded `state` if the append from `before` to `state.next_seq` crossed a multiple
/// of `every` (a snapshot is due), else `None`.
fn snapshot_bytes(state: &RunState, before: Seq, every: u64) -> Option<Vec<u8>> {
    if every == 0 || before.0 / every == state.next_seq.0 / every {
        return None;
    }
    match crate::shell::fold::encode_snapshot(state) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(run = %state.run, error = %e, "snapshot does not encode");
            None
        }
    }
}
