//! Reading a run's log as [`Logged`] events and folding it (from the latest snapshot).
//! Used by the engine and by replay.

use crate::core::{apply, apply_take};
use crate::error::EngineError;
use crate::model::event::{Event, Logged};
use crate::model::payload;
use crate::model::state::{RunState, SNAPSHOT_MAGIC};
use keel_store::{codec, EventLog, RunId, Seq, Store, StoreError};

/// Reads `run`'s log from `from` as [`Logged`] events, in seq order. A record whose
/// payload does not decode, does not match its chained payload root, or whose envelope
/// kind disagrees with the decoded event,
/// yields an error and ends the iteration (the records before it are fine).
pub fn read_logged(
    log: &dyn EventLog,
    run: RunId,
    from: Seq,
) -> Result<impl Iterator<Item = Result<Logged, EngineError>> + Send + '_, EngineError> {
    let records = log.read(run, from)?;
    let mut failed = false;
    Ok(records.map_while(move |r| {
        if failed {
            return None;
        }
        let out = r.map_err(EngineError::from).and_then(logged_of).and_then(|l| inflated(log, l));
        failed = out.is_err();
        Some(out)
    }))
}

/// [`read_logged`] of each of `runs` from seq 0, run after run, through
/// [`EventLog::read_runs`] (the sled store reads ahead on a second thread). Each item
/// carries the position of its run in `runs`; a run's first error ends that run and the
/// next run follows.
pub fn read_logged_runs<'a>(
    log: &'a dyn EventLog,
    runs: &'a [RunId],
) -> impl Iterator<Item = (usize, Result<Logged, EngineError>)> + Send + 'a {
    let mut failed: Option<usize> = None;
    log.read_runs(runs).filter_map(move |(i, r)| {
        if failed == Some(i) {
            return None;
        }
        let out = r.map_err(EngineError::from).and_then(logged_of).and_then(|l| inflated(log, l));
        failed = out.is_err().then_some(i);
        Some((i, out))
    })
}

/// The event of a record read from the log, checked: a substituted (re-checksummed) payload
/// is an error, never folded. Schema version 2: `read`'s link check already hashed the
/// payload bytes; version 1: the payload root is recomputed from the decoded event.
fn logged_of(rec: keel_store::Record) -> Result<Logged, EngineError> {
    // By the layout it was written in: older payload versions are upcast.
    let event: Event = crate::model::upcast::decode_record(&rec, rec.payload_version())?;
    // Pair check: the envelope's kind was written from this very event.
    if event.kind_name() != rec.kind {
        return Err(EngineError::decode(
            format!("run {} seq {}", rec.run, rec.seq),
            format!("envelope kind {} but payload is {}", rec.kind, event.kind_name()),
        ));
    }
    Ok(Logged { run: rec.run, seq: rec.seq, at_us: rec.time_us, event })
}

/// `logged` with every payload reference replaced by its value from `log`'s payload store
/// (model/payload.rs). A payload that is missing or damaged is `CorruptPayload` naming its
/// digest; a read allocates at most the size its reference states.
pub fn inflated(log: &dyn EventLog, mut logged: Logged) -> Result<Logged, EngineError> {
    if !payload::has_refs(&logged.event) {
        return Ok(logged);
    }
    let (run, seq) = (logged.run, logged.seq);
    payload::inflate(
        &mut logged.event,
        |r| {
            let max = usize::try_from(r.bytes).unwrap_or(usize::MAX);
            log.get_payload(&r.digest, max)?.ok_or_else(|| {
                EngineError::Store(StoreError::CorruptPayload {
                    digest: r.hex(),
                    reason: format!("missing from the payload store (referenced by run {run} seq {})", seq.0),
                })
            })
        },
        |why| EngineError::decode(format!("run {run} seq {}", seq.0), why),
    )?;
    Ok(logged)
}

/// The record of `event` for `log`, as the engine's journal writes it: values in payload
/// slots larger than [`payload::INLINE_JSON_BYTES_MAX`] are stored in `log`'s payload
/// store first (durable with the append of the record) and the record carries their
/// references. For tools that append recorded events to another log (a fork).
pub fn prepare_outlined(log: &dyn EventLog, event: &Event, at_us: i64) -> Result<keel_store::NewRecord, StoreError> {
    if !payload::needs_outline(event, payload::INLINE_JSON_BYTES_MAX) {
        return keel_store::prepare_within(event, at_us, &log.limits());
    }
    let mut event = event.clone();
    payload::outline(&mut event, payload::INLINE_JSON_BYTES_MAX, |bytes| log.put_payload(bytes))?;
    keel_store::prepare_within(&event, at_us, &log.limits())
}

/// Copies the payloads `rec` refers to from `from` to `to` (before `rec` is copied as is:
/// a record never reaches a log without its payloads). Returns how many it copied.
pub fn copy_payloads(from: &dyn EventLog, to: &dyn EventLog, rec: &keel_store::Record) -> Result<usize, EngineError> {
    let event = crate::model::upcast::decode_record(rec, rec.payload_version())?;
    let refs = payload::refs(&event);
    for r in &refs {
        let max = usize::try_from(r.bytes).unwrap_or(usize::MAX);
        let bytes = from.get_payload(&r.digest, max)?.ok_or_else(|| StoreError::CorruptPayload {
            digest: r.hex(),
            reason: format!("missing from the payload store (referenced by run {} seq {})", rec.run, rec.seq.0),
        })?;
        to.put_payload(&bytes)?;
    }
    Ok(refs.len())
}

/// Folds `run` from its latest snapshot (if any, and if it decodes and matches) plus the
/// tail of the log. `None` if the run has no records. A snapshot that cannot be used is
/// logged as a warning and the run is folded from its first event.
pub fn load_state(log: &dyn Store, run: RunId) -> Result<Option<RunState>, EngineError> {
    let (state, from) = match snapshot_state(log, run) {
        Some(s) => {
            let from = s.next_seq;
            (Some(s), from)
        }
        None => (None, Seq(0)),
    };
    fold_into(log, run, from, state)
}

/// Folds `run` from its first event, ignoring snapshots.
pub fn fold_full(log: &dyn EventLog, run: RunId) -> Result<Option<RunState>, EngineError> {
    fold_into(log, run, Seq(0), None)
}

/// Folds the log of `run` from `from` into `state` (in place: no copy of the state per
/// event).
fn fold_into(
    log: &dyn EventLog,
    run: RunId,
    from: Seq,
    mut state: Option<RunState>,
) -> Result<Option<RunState>, EngineError> {
    for logged in read_logged(log, run, from)? {
        fold_one(&mut state, logged?)?;
    }
    Ok(state)
}

/// Applies `logged` to `state` (the run's first event makes it).
fn fold_one(state: &mut Option<RunState>, mut logged: Logged) -> Result<(), EngineError> {
    match state.as_mut() {
        None => *state = Some(apply(None, &logged)?),
        Some(s) => apply_take(s, &mut logged)?,
    }
    Ok(())
}

fn snapshot_state(log: &dyn Store, run: RunId) -> Option<RunState> {
    match log.load_snapshot(run) {
        Ok(Some((seq, bytes))) => match snapshot_decoded(run, seq, &bytes) {
            Ok(s) => Some(s),
            Err(why) => {
                why.warn(run, seq);
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%run, error = %e, "snapshot unreadable; folding the full log");
            None
        }
    }
}

/// Why a snapshot that opened is not used.
enum Unused {
    OlderLayout,
    Mismatch(Seq),
    Undecodable(EngineError),
}

impl Unused {
    fn warn(self, run: RunId, seq: Seq) {
        match self {
            Unused::OlderLayout => {
                tracing::warn!(%run, snapshot_seq = seq.0, "snapshot of an older state layout; folding the full log");
            }
            Unused::Mismatch(state_seq) => {
                tracing::warn!(%run, snapshot_seq = seq.0, state_seq = state_seq.0, "snapshot does not match its run or seq; folding the full log");
            }
            Unused::Undecodable(e) => {
                tracing::warn!(%run, error = %e, "snapshot does not decode; folding the full log")
            }
        }
    }
}

/// The state of a snapshot of `run` covering seqs `< seq`, if it is of the current layout
/// and matches both.
fn snapshot_decoded(run: RunId, seq: Seq, bytes: &[u8]) -> Result<RunState, Unused> {
    let layout = snapshot_layout(bytes).ok_or(Unused::OlderLayout)?;
    match codec::decode::<RunState>(layout) {
        Ok(s) if s.run == run && s.next_seq == seq => Ok(s),
        Ok(s) => Err(Unused::Mismatch(s.next_seq)),
        Err(e) => Err(Unused::Undecodable(e.into())),
    }
}

/// [`load_state`] of what the store read without a thread held
/// ([`keel_store::AsyncAppend::fold_source_async`]: at most a page of records, checked
/// here as they are folded), folded on the caller's task: `None` where the blocking
/// [`load_state`] must do it (a snapshot it will not use, which it reports; a record with
/// payload references, inflated by blocking reads of the payload store). The first record
/// that fails its check is the error, as in [`load_state`].
pub(crate) fn fold_source(run: RunId, source: keel_store::FoldSource) -> Result<Option<Option<RunState>>, EngineError> {
    let mut state = match source.snapshot {
        Some((seq, bytes)) => match snapshot_decoded(run, seq, &bytes) {
            Ok(s) => Some(s),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    for rec in source.records {
        let logged = logged_of(rec?)?;
        if payload::has_refs(&logged.event) {
            return Ok(None);
        }
        fold_one(&mut state, logged)?;
    }
    Ok(Some(state))
}

/// The state bytes of a snapshot of the current layout (after [`SNAPSHOT_MAGIC`]); `None`
/// for a snapshot of an older layout.
fn snapshot_layout(bytes: &[u8]) -> Option<&[u8]> {
    bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice())
}

/// A snapshot of `state` as the engine saves it: [`SNAPSHOT_MAGIC`], then the state's
/// bincode ([`load_state`] reads it back; a snapshot without the current magic is skipped).
pub fn encode_snapshot(state: &RunState) -> Result<Vec<u8>, keel_store::StoreError> {
    let bytes = codec::encode(state)?;
    let mut out = Vec::with_capacity(bytes.len().saturating_add(SNAPSHOT_MAGIC.len()));
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&bytes);
    Ok(out)
}
