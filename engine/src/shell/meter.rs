//! The engine's counters for a server's metrics ([`crate::Engine::metrics`]), kept at the
//! store seam: the engine's store is wrapped in a [`keel_store::Observed`] whose observer
//! sees every append this engine makes (plain, fenced, with index entries), so no writer
//! has to remember to count. Per append: its latency, the events it recorded by kind
//! (each event is one transition of a run's state machine); per recorded
//! `TaskEvaluated` and `BudgetExhausted`: the verdict by workflow and task, the budget by
//! workflow. Nothing here is read by the core: counting changes no decision.

use crate::model::event::Event;
use keel_store::stats::{micros_since, CommitStats, Histogram, HistogramSnapshot, LATENCY_BOUNDS_US};
use keel_store::{AppendObserver, Head, NewRecord, Observed, RunId, Seq, Store, StoreError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Distinct `(workflow, task, verdict)` and `(workflow, budget)` series kept; past it, new
/// ones are counted under workflow and task [`OTHER`] (a metric's label sets must stay
/// bounded whatever task ids a planner makes up).
pub const METRIC_SERIES_MAX: usize = 1024;

/// Runs whose workflow type is remembered for labelling; past it the memory is cleared
/// (a run's workflow is then read again from its first record).
pub const WORKFLOW_MEMORY_MAX: usize = 4096;

/// The label of the series past [`METRIC_SERIES_MAX`], and of a run whose workflow type
/// could not be read.
pub const OTHER: &str = "(other)";

/// What the engine counted since it opened ([`crate::Engine::metrics`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineMetrics {
    /// Appends (atomic batches of events) this engine made durable.
    pub appends: u64,
    /// Appends the store refused or failed (a concurrency conflict, a lost lease, an I/O
    /// error): nothing of them was recorded.
    pub append_errors: u64,
    /// Events recorded by those appends, by kind (every kind of [`Event::KINDS`], in that
    /// order, zeros included).
    pub transitions: Vec<(String, u64)>,
    /// Latency of each durable append (encode excluded; store write and flush wait
    /// included), in microseconds.
    pub append_latency_us: HistogramSnapshot,
    /// Recorded `TaskEvaluated` events, by workflow type, task and verdict.
    pub verdicts: Vec<VerdictCount>,
    /// Recorded `BudgetExhausted` events, by workflow type and budget.
    pub budget_exhaustions: Vec<ExhaustionCount>,
    /// The store's flushes (latency, appends per flush: group commit).
    pub commits: CommitStats,
}

/// One series of [`EngineMetrics::verdicts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictCount {
    /// The run's workflow type.
    pub workflow: String,
    /// The task evaluated.
    pub task: String,
    /// `Pass`, `Soft`, `Hard` or `Critical`.
    pub verdict: String,
    /// Events recorded.
    pub count: u64,
}

/// One series of [`EngineMetrics::budget_exhaustions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExhaustionCount {
    /// The run's workflow type.
    pub workflow: String,
    /// Which budget (`Cost`, `Tokens`, ...).
    pub budget: String,
    /// Events recorded.
    pub count: u64,
}

/// A labelled event seen in an append, counted once the append is durable.
pub(crate) enum Noted {
    Verdict { task: String, verdict: String },
    Exhausted { budget: String },
}

#[derive(Default)]
struct Labelled {
    workflows: BTreeMap<RunId, String>,
    verdicts: BTreeMap<(String, String, String), u64>,
    exhaustions: BTreeMap<(String, String), u64>,
}

/// The counters (see the module docs).
pub(crate) struct Meter {
    /// The wrapped store, to read a run's first record (its workflow type).
    store: Arc<dyn Store>,
    appends: AtomicU64,
    append_errors: AtomicU64,
    /// One per [`Event::KINDS`], then one for a kind this code does not know.
    kinds: Vec<AtomicU64>,
    latency: Histogram,
    labelled: Mutex<Labelled>,
}

/// Wraps `store` so that every append through it is counted; returns the wrapped store and
/// the counters.
pub(crate) fn observe(store: Arc<dyn Store>) -> (Arc<dyn Store>, Arc<Meter>) {
    let meter = Arc::new(Meter {
        store: store.clone(),
        appends: AtomicU64::new(0),
        append_errors: AtomicU64::new(0),
        kinds: (0..=Event::KINDS.len()).map(|_| AtomicU64::new(0)).collect(),
        latency: Histogram::new(&LATENCY_BOUNDS_US),
        labelled: Mutex::new(Labelled::default()),
    });
    (Arc::new(Observed::new(store, Observer(meter.clone()))), meter)
}

/// The observer the wrapped store calls.
pub(crate) struct Observer(Arc<Meter>);

impl AppendObserver for Observer {
    type Ticket = (Instant, Vec<usize>, Vec<Noted>);

    fn before(&self, _run: RunId, _expected: Seq, records: &[NewRecord]) -> Self::Ticket {
        let kinds = records
            .iter()
            .map(|r| Event::KINDS.iter().position(|k| *k == r.kind).unwrap_or(Event::KINDS.len()))
            .collect();
        let noted = records.iter().filter_map(noted).collect();
        (Instant::now(), kinds, noted)
    }

    fn after(&self, run: RunId, (start, kinds, noted): Self::Ticket, result: Result<&Head, &StoreError>) {
        let m = &self.0;
        if result.is_err() {
            m.append_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        m.latency.observe(micros_since(start));
        m.appends.fetch_add(1, Ordering::Relaxed);
        for k in kinds {
            if let Some(c) = m.kinds.get(k) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        if noted.is_empty() {
            return;
        }
        let workflow = m.workflow_of(run);
        let mut l = m.lock();
        for n in noted {
            match n {
                Noted::Verdict { task, verdict } => {
                    let mut key = (workflow.clone(), task, verdict);
                    if !l.verdicts.contains_key(&key) && l.verdicts.len() >= METRIC_SERIES_MAX {
                        key = (OTHER.to_owned(), OTHER.to_owned(), key.2);
                    }
                    *l.verdicts.entry(key).or_insert(0) += 1;
                }
                Noted::Exhausted { budget } => {
                    let mut key = (workflow.clone(), budget);
                    if !l.exhaustions.contains_key(&key) && l.exhaustions.len() >= METRIC_SERIES_MAX {
                        key = (OTHER.to_owned(), key.1);
                    }
                    *l.exhaustions.entry(key).or_insert(0) += 1;
                }
            }
        }
    }
}

/// The labelled event a record holds, if it is one (decoded: these records are few).
fn noted(r: &NewRecord) -> Option<Noted> {
    if r.kind != "TaskEvaluated" && r.kind != "BudgetExhausted" {
        return None;
    }
    match crate::model::upcast::decode(&r.kind, r.payload_version, &r.payload).ok()? {
        Event::TaskEvaluated { task, verdict, .. } => {
            Some(Noted::Verdict { task: task.0, verdict: format!("{verdict:?}") })
        }
        Event::BudgetExhausted { budget, .. } => Some(Noted::Exhausted { budget: format!("{budget:?}") }),
        _ => None,
    }
}

impl Meter {
    fn lock(&self) -> MutexGuard<'_, Labelled> {
        self.labelled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers `run`'s workflow type (a driver knows it from the state it loaded), so
    /// that its labelled events need no read of its first record (a round trip to a
    /// database per run).
    pub(crate) fn remember(&self, run: RunId, workflow: &str) {
        let mut l = self.lock();
        if l.workflows.get(&run).is_some_and(|w| w == workflow) {
            return;
        }
        if l.workflows.len() >= WORKFLOW_MEMORY_MAX {
            l.workflows.clear();
        }
        l.workflows.insert(run, workflow.to_owned());
    }

    /// `run`'s workflow type: remembered, or read from its first record (`RunAccepted`).
    fn workflow_of(&self, run: RunId) -> String {
        if let Some(w) = self.lock().workflows.get(&run) {
            return w.clone();
        }
        let first = self.store.read(run, Seq(0)).ok().and_then(|mut it| it.next()).and_then(Result::ok);
        let workflow = first
            .and_then(|rec| crate::model::upcast::decode_record(&rec, rec.payload_version()).ok())
            .and_then(|e| match e {
                Event::RunAccepted { workflow, .. } => Some(workflow),
                _ => None,
            });
        let Some(workflow) = workflow else { return OTHER.to_owned() };
        self.remember(run, &workflow);
        workflow
    }

    /// What it counted so far, with the store's commit figures.
    pub(crate) fn snapshot(&self) -> EngineMetrics {
        let mut transitions: Vec<(String, u64)> =
            Event::KINDS.iter().zip(&self.kinds).map(|(k, c)| ((*k).to_owned(), c.load(Ordering::Relaxed))).collect();
        if let Some(other) = self.kinds.get(Event::KINDS.len()).map(|c| c.load(Ordering::Relaxed)) {
            if other > 0 {
                transitions.push((OTHER.to_owned(), other));
            }
        }
        let l = self.lock();
        EngineMetrics {
            appends: self.appends.load(Ordering::Relaxed),
            append_errors: self.append_errors.load(Ordering::Relaxed),
            transitions,
            append_latency_us: self.latency.snapshot(),
            verdicts: l
                .verdicts
                .iter()
                .map(|((workflow, task, verdict), count)| VerdictCount {
                    workflow: workflow.clone(),
                    task: task.clone(),
                    verdict: verdict.clone(),
                    count: *count,
                })
                .collect(),
            budget_exhaustions: l
                .exhaustions
                .iter()
                .map(|((workflow, budget), count)| ExhaustionCount {
                    workflow: workflow.clone(),
                    budget: budget.clone(),
                    count: *count,
                })
                .collect(),
            commits: self.store.commit_stats(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::model::workflow::{TaskId, Usage, Verdict};
    use keel_store::{prepare, MemStore};

    fn accepted(workflow: &str) -> NewRecord {
        prepare(&Event::accepted_for_tests(workflow), 0).unwrap()
    }

    fn evaluated(task: &str) -> NewRecord {
        let e = Event::TaskEvaluated {
            task: TaskId(task.into()),
            attempt: 1,
            verdict: Verdict::Pass,
            notes: String::new(),
            model: None,
            usage: Usage::default(),
        };
        prepare(&e, 0).unwrap()
    }

    #[test]
    fn verdicts_are_labelled_by_the_runs_workflow_and_bounded_and_refused_appends_count_apart() {
        let (store, meter) = observe(Arc::new(MemStore::new()));
        let run = RunId::from_bytes([7; 16]);
        store.append(run, Seq(0), vec![accepted("wf")], None).unwrap();
        // A stale expected seq: refused, counted as an error, its events not counted.
        assert!(store.append(run, Seq(0), vec![evaluated("t")], None).is_err());
        let over = METRIC_SERIES_MAX + 5;
        for i in 0..over {
            store.append(run, Seq(1 + i as u64), vec![evaluated(&format!("t{i}"))], None).unwrap();
        }
        let m = meter.snapshot();
        assert_eq!((m.appends, m.append_errors), (1 + over as u64, 1));
        let kind = |k: &str| m.transitions.iter().find(|(n, _)| n == k).map(|(_, c)| *c);
        assert_eq!(kind("RunAccepted"), Some(1));
        assert_eq!(kind("TaskEvaluated"), Some(over as u64));
        assert_eq!(m.append_latency_us.count(), 1 + over as u64);
        // Every series up to the bound, then one `(other)` series with the rest.
        assert_eq!(m.verdicts.len(), METRIC_SERIES_MAX + 1);
        assert!(m.verdicts.iter().filter(|v| v.workflow != OTHER).all(|v| v.workflow == "wf" && v.count == 1));
        let other = m.verdicts.iter().find(|v| v.task == OTHER).unwrap();
        assert_eq!((other.workflow.as_str(), other.count), (OTHER, 5));
        assert_eq!(m.verdicts.iter().map(|v| v.count).sum::<u64>(), over as u64);
        // MemStore flushes nothing.
        assert!(!m.commits.flushing);
    }
}
