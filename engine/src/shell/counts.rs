//! Run counters kept on commit, behind [`crate::Engine::stats`] and the run gauges of a
//! server's metrics: O(workflow types + unfinished runs) to read instead of O(runs).
//!
//! They are store counters ([`keel_store::counter_add`]) written by the journal in the
//! **same atomic write** as the events that change them (beside the run index, see
//! [`crate::shell::index`]), per workflow type `<wf>` (the index's 16-byte digest):
//!
//! - `ix/n/<wf>s<status>`: runs in each status (exact: -1 on the old status and +1 on the
//!   new one with every append that changes a run's status);
//! - `ix/n/<wf>p` and `ix/n/<wf>t<i>`: of the **finished** runs, how many finished
//!   partial and their usage totals (field `i` of [`Totals`]), added once by the append
//!   that finishes a run (a finished run's usage does not change afterwards);
//! - `ix/m/<wf>`: the workflow type's name (a plain entry, written with a run's first
//!   append).
//!
//! The usage of the runs still going changes with nearly every append, so it is not
//! counted: [`stats`] folds those runs (few, listed by the status index). Archiving a run
//! subtracts what it added ([`removal_adds`]); the index rebuild writes the counters with
//! the entries.

use crate::api::WorkflowStats;
use crate::error::EngineError;
use crate::model::fsm::RunStatus;
use crate::model::state::{RunState, Totals};
use crate::shell::fold::load_state;
use keel_store::RunId;
use keel_store::{counter_add, counter_value, AuxEntry, AuxWrite, Store, COUNTER_PREFIX};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

const COUNTS: &[u8] = b"ix/n/";
const NAMES: &[u8] = b"ix/m/";
/// Entries read per range read.
const SCAN_CHUNK: usize = 512;
const STATUS: u8 = b's';
const PARTIAL: u8 = b'p';
const TOTAL: u8 = b't';

fn fields(t: &Totals) -> [u64; 7] {
    [t.cost_micros, t.tokens, t.llm_calls, t.tool_calls, t.retries, t.replans, t.cache_hits]
}

fn add_field(t: &mut Totals, i: u8, v: u64) {
    let f = match i {
        0 => &mut t.cost_micros,
        1 => &mut t.tokens,
        2 => &mut t.llm_calls,
        3 => &mut t.tool_calls,
        4 => &mut t.retries,
        5 => &mut t.replans,
        6 => &mut t.cache_hits,
        _ => return,
    };
    *f = f.saturating_add(v);
}

fn add(wf: &[u8; 16], tag: &[u8], delta: i64) -> AuxWrite {
    counter_add(&[COUNTS, wf, tag].concat(), delta)
}

/// The adds of a run in `status` counted with `sign` (+1 or -1); with what a finished run
/// adds (`partial`, `totals`) when `finished`.
fn run_adds(wf: &[u8; 16], status: RunStatus, finished: Option<(bool, &Totals)>, sign: i64) -> Vec<AuxWrite> {
    let mut out = vec![add(wf, &[STATUS, status_byte(status)], sign)];
    if let Some((partial, totals)) = finished {
        out.extend(finished_adds(wf, partial, totals, sign));
    }
    out
}

fn finished_adds(wf: &[u8; 16], partial: bool, totals: &Totals, sign: i64) -> Vec<AuxWrite> {
    let mut out = Vec::with_capacity(8);
    if partial {
        out.push(add(wf, &[PARTIAL], sign));
    }
    for (i, v) in (0u8..).zip(fields(totals)) {
        if v > 0 {
            out.push(add(wf, &[TOTAL, i], sign.saturating_mul(i64::try_from(v).unwrap_or(i64::MAX))));
        }
    }
    out
}

/// The counter writes of an append that leads to `after` from a run in `before` (`None`: a
/// new run); empty unless the status changes.
pub(crate) fn writes(before: Option<RunStatus>, after: &RunState) -> Vec<AuxWrite> {
    if before == Some(after.status) {
        return Vec::new();
    }
    let wf = wf_digest(&after.workflow);
    let mut out = Vec::with_capacity(12);
    match before {
        Some(b) => out.push(add(&wf, &[STATUS, status_byte(b)], -1)),
        None => out.push(([NAMES, wf.as_slice()].concat(), Some(after.workflow.clone().into_bytes()))),
    }
    let finishing = after.status.is_terminal() && !before.is_some_and(RunStatus::is_terminal);
    out.extend(run_adds(&wf, after.status, finishing.then_some((after.partial, &after.totals)), 1));
    out
}

/// The counter writes that take a run (its index entry's workflow, status, partial and
/// totals) out of the counts (archiving, re-indexing).
pub(crate) fn removal_adds(workflow: &str, status: RunStatus, partial: bool, totals: &Totals) -> Vec<AuxWrite> {
    let finished = status.is_terminal().then_some((partial, totals));
    run_adds(&wf_digest(workflow), status, finished, -1)
}

/// A status's byte in index keys (its position in [`RunStatus::ALL`]).
pub(crate) fn status_byte(s: RunStatus) -> u8 {
    RunStatus::ALL.iter().position(|x| *x == s).and_then(|i| u8::try_from(i).ok()).unwrap_or(u8::MAX)
}

/// A workflow type's fixed-length key part: the first 16 bytes of SHA-256 of its name.
pub(crate) fn wf_digest(workflow: &str) -> [u8; 16] {
    let d = Sha256::digest(workflow.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(d.get(..16).unwrap_or(&[0u8; 16]));
    out
}

/// The writes that remove every counter (a rebuild starts from nothing).
pub(crate) fn clear(log: &dyn Store) -> Result<(), EngineError> {
    let (lo, hi) = ([COUNTER_PREFIX, b"ix/"].concat(), [COUNTER_PREFIX, b"ix/\xff"].concat());
    loop {
        let old = log.aux_range(&lo, &hi, SCAN_CHUNK)?;
        if old.is_empty() {
            return Ok(());
        }
        log.aux_apply(old.into_iter().map(|(k, _)| (k, None)).collect())?;
    }
}

/// Every entry of `lo..=hi`, in key order.
fn range_all(log: &dyn Store, lo: &[u8], hi: &[u8]) -> Result<Vec<AuxEntry>, EngineError> {
    let mut lo = lo.to_vec();
    let mut out = Vec::new();
    loop {
        let chunk = log.aux_range(&lo, hi, SCAN_CHUNK)?;
        let n = chunk.len();
        if let Some((k, _)) = chunk.last() {
            lo = [k.as_slice(), &[0]].concat();
        }
        out.extend(chunk);
        if n < SCAN_CHUNK {
            return Ok(out);
        }
    }
}

/// Applies one counter to `st`.
fn apply_counter(st: &mut WorkflowStats, tag: &[u8], value: i64) {
    let v = u64::try_from(value).unwrap_or(0);
    match tag {
        [STATUS, s] => {
            if let Some(status) = RunStatus::ALL.get(usize::from(*s)) {
                if v > 0 {
                    st.by_status.insert(*status, v);
                }
                st.runs = st.runs.saturating_add(v);
            }
        }
        [PARTIAL] => st.partial = st.partial.saturating_add(v),
        [TOTAL, i] => add_field(&mut st.totals, *i, v),
        _ => {}
    }
}

/// Runs, statuses, partial results and usage per workflow type, from the counters plus a
/// fold of each unfinished run (`unfinished`, from the run index): O(workflow types +
/// unfinished runs).
pub(crate) fn stats(log: &dyn Store, unfinished: &[RunId]) -> Result<Vec<WorkflowStats>, EngineError> {
    let mut by_wf: BTreeMap<[u8; 16], WorkflowStats> = BTreeMap::new();
    for (k, v) in range_all(log, NAMES, &[NAMES, &[0xff; 17]].concat())? {
        if let Some(wf) = k.get(NAMES.len()..).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
            let workflow = String::from_utf8_lossy(&v).into_owned();
            by_wf.insert(wf, WorkflowStats { workflow, ..WorkflowStats::default() });
        }
    }
    let prefix = [COUNTER_PREFIX, COUNTS].concat();
    for (k, v) in range_all(log, &prefix, &[&prefix, &[0xff; 19][..]].concat())? {
        let rest = k.get(prefix.len()..).unwrap_or_default();
        let (Some(wf), Some(tag)) = (rest.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok()), rest.get(16..)) else {
            continue;
        };
        if let Some(st) = by_wf.get_mut(&wf) {
            apply_counter(st, tag, counter_value(&v));
        }
    }
    for &run in unfinished {
        let Some(s) = load_state(log, run)? else { continue };
        if let Some(st) = by_wf.get_mut(&wf_digest(&s.workflow)) {
            st.partial = st.partial.saturating_add(u64::from(s.partial));
            for (i, v) in (0u8..).zip(fields(&s.totals)) {
                add_field(&mut st.totals, i, v);
            }
        }
    }
    let mut out: Vec<WorkflowStats> = by_wf
        .into_values()
        .filter(|st| st.runs > 0)
        .map(|mut st| {
            st.cost_per_run_micros = st.totals.cost_micros.checked_div(st.runs).unwrap_or(0);
            st
        })
        .collect();
    out.sort_by(|a, b| a.workflow.cmp(&b.workflow));
    Ok(out)
}
