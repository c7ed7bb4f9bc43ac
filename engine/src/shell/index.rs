//! Read models kept on commit: the run index and the open-escalation index.
//!
//! Entries live in the store's auxiliary keyspace under `ix/`, and the journal writes them
//! **in the same atomic write as the events that change them**
//! ([`keel_store::Coordination::append_with_aux`]): an entry exists exactly when the
//! events that made it do, also across a crash. They are written when an append changes a
//! run's status (and on every append to a finished run), so most appends (a task's
//! progress) stay a single insert.
//!
//! - `ix/v` = [`INDEX_VERSION`]: the index is complete (written last by a rebuild);
//! - `ix/r/<run>`: the run's [`IndexEntry`] as of its last status change (exact for a
//!   finished run; a run still going is re-read from its snapshot and tail when listed);
//! - `ix/s/<status><run>`: runs by status (the `AwaitingHuman` range is the open
//!   escalations: a run waits for a human exactly while one of its escalations is open);
//! - `ix/w/<wf><run>` and `ix/x/<status><wf><run>`: runs by workflow type (written with
//!   the run's first append and the one that finishes it: it does not change; a run whose
//!   records were appended outside the journal is listed there once re-indexed, as `keel
//!   copy` and `keel fork` do, or once it finishes), and by status and workflow type
//!   (`<wf>` = the first 16 bytes of SHA-256 of the name: fixed length, so any name fits
//!   the store's key limit; a listing checks the name in the entry);
//! - `ix/e/<run>`: the run's [`OpenEscalation`] while it waits for a human (rewritten on
//!   every append to a waiting run, removed by the append that leaves the wait): the
//!   escalation listing and a restart read it instead of folding the run.
//!
//! - the run counters of [`crate::shell::counts`] (`ix/n/`, `ix/m/`), written beside.
//!
//! Within each range runs are in run id order, so a page is a range read from a cursor.

use crate::error::EngineError;
use crate::model::event::Escalation;
use crate::model::fsm::RunStatus;
use crate::model::state::{RunState, SizeWarning, Totals};
use crate::shell::fold::load_state;
use keel_store::{codec, AuxWrite, RunId, Store};
use serde::{Deserialize, Serialize};

/// Version of the index layout; an index of another version is rebuilt on open.
pub(crate) const INDEX_VERSION: &[u8] = b"3";
const MARKER: &[u8] = b"ix/v";
const RUN: &[u8] = b"ix/r/";
const BY_STATUS: &[u8] = b"ix/s/";
const BY_WORKFLOW: &[u8] = b"ix/w/";
const BY_BOTH: &[u8] = b"ix/x/";
const OPEN: &[u8] = b"ix/e/";
/// Entries read per range read while listing.
const SCAN_CHUNK: usize = 512;
/// Runs folded per atomic write while rebuilding (fewer if the store's
/// `batch_records_max` would not take their writes: [`REBUILD_WRITES_PER_RUN`] each).
const REBUILD_CHUNK: usize = 64;
/// Aux writes of one run in a rebuild, at most (entry, listing keys, open escalation, counters).
const REBUILD_WRITES_PER_RUN: usize = 20;

/// What the index keeps of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexEntry {
    pub workflow: String,
    pub status: RunStatus,
    pub priority: i32,
    pub accepted_at_us: i64,
    pub last_event_us: i64,
    pub events: u64,
    pub totals: Totals,
    pub partial: bool,
    pub escalations: u32,
    pub idempotency_key: Option<String>,
    /// The run's latest `RunSizeWarning` (layout 3).
    pub size_warning: Option<SizeWarning>,
}

impl IndexEntry {
    pub(crate) fn of(s: &RunState) -> IndexEntry {
        IndexEntry {
            workflow: s.workflow.clone(),
            status: s.status,
            priority: s.priority,
            accepted_at_us: s.accepted_at_us,
            last_event_us: s.last_event_us,
            events: s.next_seq.0,
            totals: s.totals,
            partial: s.partial,
            escalations: u32::try_from(s.escalations.len()).unwrap_or(u32::MAX),
            idempotency_key: s.idempotency_key.clone(),
            size_warning: s.size_warning,
        }
    }
}

/// What the index keeps of a run waiting for a human: what the escalation listing shows,
/// and when the escalation's default falls due (a restart parks the run until then
/// without folding it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OpenEscalation {
    pub workflow: String,
    pub escalated_at_us: i64,
    pub notified: bool,
    /// When the escalation's default decision applies (`None`: it waits for a human).
    pub default_due_us: Option<i64>,
    /// The escalation; `None` when its entry would exceed the store's value limit (the
    /// listing then reads it from the run's log).
    pub escalation: Option<Escalation>,
}

impl OpenEscalation {
    /// The entry of `s`'s open escalation, if it has one.
    fn of(s: &RunState) -> Option<OpenEscalation> {
        let open = s.escalations.last().filter(|e| e.resolution.is_none())?;
        let default_due_us = match (open.escalation.deadline_ms, &open.escalation.default_decision) {
            (Some(ms), Some(_)) => Some(
                open.escalated_at_us.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX / 1000).saturating_mul(1000)),
            ),
            _ => None,
        };
        Some(OpenEscalation {
            workflow: s.workflow.clone(),
            escalated_at_us: open.escalated_at_us,
            notified: open.notified,
            default_due_us,
            escalation: Some(open.escalation.clone()),
        })
    }

    /// The encoded entry, without the escalation if it would not fit `value_bytes_max`.
    fn encode(mut self, value_bytes_max: usize) -> Result<Vec<u8>, EngineError> {
        let bytes = codec::encode(&self)?;
        if bytes.len() <= value_bytes_max {
            return Ok(bytes);
        }
        self.escalation = None;
        Ok(codec::encode(&self)?)
    }
}

pub(crate) use crate::shell::counts::{status_byte, wf_digest};

fn key(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn run_key(run: RunId) -> Vec<u8> {
    key(&[RUN, run.as_bytes()])
}

fn open_key(run: RunId) -> Vec<u8> {
    key(&[OPEN, run.as_bytes()])
}

/// The listing keys of a run in `status` (the by-status, by-workflow and by-both keys).
fn listing_keys(run: RunId, workflow: &str, status: RunStatus) -> [Vec<u8>; 3] {
    let (s, w, r) = ([status_byte(status)], wf_digest(workflow), run.as_bytes());
    [key(&[BY_STATUS, &s, r]), key(&[BY_WORKFLOW, &w, r]), key(&[BY_BOTH, &s, &w, r])]
}

/// The index writes of an append that leads to `after` from a run in `before` (`None`:
/// a new run); empty when the index does not change (same status, not finished, not
/// waiting for a human). `value_bytes_max` is the store's limit on an entry.
pub(crate) fn writes(
    before: Option<RunStatus>,
    after: &RunState,
    value_bytes_max: usize,
) -> Result<Vec<AuxWrite>, EngineError> {
    let waiting = after.status == RunStatus::AwaitingHuman;
    let mut out = Vec::with_capacity(8);
    // The open escalation's entry follows every append to a waiting run (its sink was
    // told, a deadline's default) and goes with the append that leaves the wait.
    if waiting {
        if let Some(open) = OpenEscalation::of(after) {
            out.push((open_key(after.run), Some(open.encode(value_bytes_max)?)));
        }
    } else if before == Some(RunStatus::AwaitingHuman) {
        out.push((open_key(after.run), None));
    }
    if before == Some(after.status) && !after.status.is_terminal() {
        return Ok(out);
    }
    // The by-workflow key does not depend on the status: written with the run's first
    // append and again with the one that finishes it, not with every status change (that
    // cost a row write per change on PostgreSQL for nothing). The second write lists by
    // workflow a run whose records reached the store outside the journal and was never
    // re-indexed (a `keel copy` cut short), once it finishes, as every change did before.
    let [by_status, by_workflow, by_both] = listing_keys(after.run, &after.workflow, after.status);
    let finishing = after.status.is_terminal() && before != Some(after.status);
    if let Some(b) = before.filter(|b| *b != after.status) {
        let [old_status, _, old_both] = listing_keys(after.run, &after.workflow, b);
        out.extend([(old_status, None), (old_both, None)]);
    }
    out.extend([(by_status, Some(Vec::new())), (by_both, Some(Vec::new()))]);
    if before.is_none() || finishing {
        out.push((by_workflow, Some(Vec::new())));
    }
    out.push((run_key(after.run), Some(codec::encode(&IndexEntry::of(after))?)));
    Ok(out)
}

/// Every open escalation's index entry, in run id order: one range read, no fold.
pub(crate) fn open_escalations(log: &dyn Store) -> Result<Vec<(RunId, OpenEscalation)>, EngineError> {
    let hi = key(&[OPEN, &[0xff; 16]]);
    let mut lo = OPEN.to_vec();
    let mut out = Vec::new();
    loop {
        let chunk = log.aux_range(&lo, &hi, SCAN_CHUNK)?;
        let n = chunk.len();
        for (k, v) in chunk {
            lo = key(&[&k, &[0]]);
            if let Some(run) = k.get(OPEN.len()..).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                out.push((RunId::from_bytes(run), codec::decode(&v)?));
            }
        }
        if n < SCAN_CHUNK {
            return Ok(out);
        }
    }
}

/// The writes that remove `run` from the read models (its entry and listing keys): what
/// archiving a run removes with its records (`keel archive`). Empty if it has no entry.
pub fn removal_writes(log: &dyn Store, run: RunId) -> Result<Vec<AuxWrite>, EngineError> {
    let Some(e) = entry(log, run)? else { return Ok(Vec::new()) };
    let mut out: Vec<AuxWrite> = listing_keys(run, &e.workflow, e.status).into_iter().map(|k| (k, None)).collect();
    out.push((run_key(run), None));
    out.extend(crate::shell::counts::removal_adds(&e.workflow, e.status, e.partial, &e.totals));
    Ok(out)
}

/// The index entry of `run`, if it has one.
pub(crate) fn entry(log: &dyn Store, run: RunId) -> Result<Option<IndexEntry>, EngineError> {
    let k = run_key(run);
    match log.aux_range(&k, &k, 1)?.into_iter().next() {
        None => Ok(None),
        Some((_, v)) => Ok(Some(codec::decode(&v)?)),
    }
}

/// Which runs a listing wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs of this workflow type.
    pub workflow: Option<String>,
}

/// A page of runs ([`crate::Engine::runs_page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunsPage {
    /// The runs, in run id order.
    pub runs: Vec<crate::api::RunSummary>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_cursor: Option<RunId>,
}

/// Up to `limit` runs matching `filter` with ids after `after`, in run id order, each with
/// its index entry; the bool says whether more follow. Reads O(page) entries (plus the
/// entries of other workflow types whose names share a 16-byte digest prefix: none in
/// practice).
pub(crate) fn page(
    log: &dyn Store,
    filter: &RunFilter,
    after: Option<RunId>,
    limit: usize,
) -> Result<(Vec<(RunId, IndexEntry)>, bool), EngineError> {
    let (prefix, with_entry_key): (Vec<u8>, bool) = match (&filter.status, &filter.workflow) {
        (None, None) => (RUN.to_vec(), true),
        (Some(s), None) => (key(&[BY_STATUS, &[status_byte(*s)]]), false),
        (None, Some(w)) => (key(&[BY_WORKFLOW, &wf_digest(w)]), false),
        (Some(s), Some(w)) => (key(&[BY_BOTH, &[status_byte(*s)], &wf_digest(w)]), false),
    };
    let hi = key(&[&prefix, &[0xff; 16]]);
    let mut lo = match after {
        // The key just after the cursor's.
        Some(a) => key(&[&prefix, a.as_bytes(), &[0]]),
        None => prefix.clone(),
    };
    let mut out: Vec<(RunId, IndexEntry)> = Vec::new();
    loop {
        let want = limit.saturating_add(1).saturating_sub(out.len()).clamp(1, SCAN_CHUNK);
        let chunk = log.aux_range(&lo, &hi, want)?;
        let n = chunk.len();
        for (k, v) in chunk {
            lo = key(&[&k, &[0]]);
            let Some(run) = k.get(prefix.len()..).and_then(|b| <[u8; 16]>::try_from(b).ok()).map(RunId::from_bytes)
            else {
                continue;
            };
            let e = if with_entry_key {
                codec::decode::<IndexEntry>(&v)?
            } else {
                match entry(log, run)? {
                    Some(e) => e,
                    None => continue,
                }
            };
            if filter.workflow.as_deref().is_some_and(|w| w != e.workflow) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((run, e));
        }
        if n < want {
            return Ok((out, false));
        }
    }
}

/// Every run in `status`, in run id order (the open escalations, the runs to resume).
pub(crate) fn runs_in(log: &dyn Store, status: RunStatus) -> Result<Vec<RunId>, EngineError> {
    let prefix = key(&[BY_STATUS, &[status_byte(status)]]);
    let hi = key(&[&prefix, &[0xff; 16]]);
    let mut lo = prefix.clone();
    let mut out = Vec::new();
    loop {
        let chunk = log.aux_range(&lo, &hi, SCAN_CHUNK)?;
        let n = chunk.len();
        for (k, _) in chunk {
            if let Some(run) = k.get(prefix.len()..).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                out.push(RunId::from_bytes(run));
            }
            lo = key(&[&k, &[0]]);
        }
        if n < SCAN_CHUNK {
            return Ok(out);
        }
    }
}

/// Whether the index is complete (a rebuild finished, or the database was created with it).
pub(crate) fn is_complete(log: &dyn Store) -> Result<bool, EngineError> {
    Ok(log.aux_range(MARKER, MARKER, 1)?.first().is_some_and(|(_, v)| v.as_slice() == INDEX_VERSION))
}

/// Builds the index from the log if it is not complete: removes any partial index, folds
/// every run (O(history), once) and writes its entries, then the marker, then flushes.
/// Returns how many runs it indexed (`None`: the index was complete).
pub(crate) fn ensure(log: &dyn Store) -> Result<Option<usize>, EngineError> {
    if is_complete(log)? {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    // A partial index (a rebuild cut short): start again from nothing.
    let (lo, hi) = (b"ix/".to_vec(), b"ix/\xff".to_vec());
    loop {
        let old = log.aux_range(&lo, &hi, SCAN_CHUNK)?;
        if old.is_empty() {
            break;
        }
        log.aux_apply(old.into_iter().map(|(k, _)| (k, None)).collect())?;
    }
    crate::shell::counts::clear(log)?;
    let runs = log.runs()?;
    let value_max = log.limits().event_bytes_max;
    let per_write = (log.limits().batch_records_max / REBUILD_WRITES_PER_RUN).clamp(1, REBUILD_CHUNK);
    for chunk in runs.chunks(per_write) {
        let mut batch = Vec::new();
        for &run in chunk {
            if let Some(s) = load_state(log, run)? {
                batch.extend(writes(None, &s, value_max)?);
                batch.extend(crate::shell::counts::writes(None, &s));
            }
        }
        log.aux_apply(batch)?;
    }
    log.aux_apply(vec![(MARKER.to_vec(), Some(INDEX_VERSION.to_vec()))])?;
    log.flush()?;
    tracing::info!(runs = runs.len(), ms = started.elapsed().as_millis() as u64, "built the run index");
    Ok(Some(runs.len()))
}

/// Re-indexes one run from its log (after records were appended outside the journal, as a
/// fork or an import does): removes its listing keys under every status and writes its
/// current entry. Returns the state it folded (`None` for a run with no records).
pub fn reindex_run(log: &dyn Store, run: RunId) -> Result<Option<RunState>, EngineError> {
    let Some(s) = load_state(log, run)? else { return Ok(None) };
    let mut out: Vec<AuxWrite> = Vec::new();
    for st in RunStatus::ALL {
        if st != s.status {
            out.extend(listing_keys(run, &s.workflow, st).into_iter().map(|k| (k, None)));
        }
    }
    if s.status != RunStatus::AwaitingHuman {
        out.push((open_key(run), None));
    }
    out.extend(writes(None, &s, log.limits().event_bytes_max)?);
    if let Some(old) = entry(log, run)? {
        out.extend(crate::shell::counts::removal_adds(&old.workflow, old.status, old.partial, &old.totals));
    }
    out.extend(crate::shell::counts::writes(None, &s));
    log.aux_apply(out)?;
    Ok(Some(s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::event::{Event, Logged};
    use keel_store::Seq;

    fn accepted(run: RunId) -> RunState {
        let event = Event::accepted_for_tests("wf");
        crate::core::apply(None, &Logged { run, seq: Seq(0), at_us: 1, event }).unwrap()
    }

    fn keys(writes: &[AuxWrite]) -> Vec<(Vec<u8>, bool)> {
        writes.iter().map(|(k, v)| (k.clone(), v.is_some())).collect()
    }

    #[test]
    fn a_status_change_moves_the_status_keys_and_leaves_the_workflow_key_alone() {
        let run = RunId::from_bytes([7; 16]);
        let mut s = accepted(run);
        let [by_status, by_workflow, by_both] = listing_keys(run, "wf", RunStatus::Accepted);
        let first = keys(&writes(None, &s, 1 << 16).unwrap());
        for k in [&by_status, &by_workflow, &by_both, &run_key(run)] {
            assert!(first.contains(&(k.clone(), true)), "a new run's append puts each of its keys");
        }
        s.status = RunStatus::Running;
        let [now_status, _, now_both] = listing_keys(run, "wf", RunStatus::Running);
        let change = keys(&writes(Some(RunStatus::Accepted), &s, 1 << 16).unwrap());
        let mut expected =
            vec![(by_status, false), (by_both, false), (now_status, true), (now_both, true), (run_key(run), true)];
        expected.sort();
        let mut got = change.clone();
        got.sort();
        assert_eq!(got, expected, "the by-workflow key is not written again on a status change");
        assert!(!change.iter().any(|(k, _)| *k == by_workflow));
        s.status = RunStatus::Completed;
        let finish = keys(&writes(Some(RunStatus::Running), &s, 1 << 16).unwrap());
        assert!(finish.contains(&(by_workflow.clone(), true)), "the finishing append puts it again");
        let after = keys(&writes(Some(RunStatus::Completed), &s, 1 << 16).unwrap());
        assert!(!after.iter().any(|(k, _)| *k == by_workflow), "appends to a finished run leave it");
    }
}
