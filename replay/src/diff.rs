//! Diff of two runs' histories: events aligned by seq, the first difference, and a
//! summary (kinds, tasks, costs, outcomes).
//!
//! Events are compared by content, not time. A dispatch's keys are derived from the run
//! id (see `keel_engine::core::effect_key` and `attempt_key`), so they are left out of the
//! comparison: two runs that dispatched the same attempt of the same task with the same
//! input did the same thing.

use crate::error::ReplayError;
use crate::format::{event_json, event_line};
use keel_engine::{Event, Logged, RunState};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// An event with what does not depend on the run's identity removed.
pub fn normalized(e: &Event) -> Event {
    match e {
        Event::TaskDispatched { task, attempt, model, input, reserved, .. } => Event::TaskDispatched {
            task: task.clone(),
            attempt: *attempt,
            effect_key: String::new(),
            attempt_key: String::new(),
            model: model.clone(),
            input: input.clone(),
            reserved: *reserved,
        },
        other => other.clone(),
    }
}

/// Whether two events are the same step (see [`normalized`]).
pub fn same_step(a: &Event, b: &Event) -> bool {
    normalized(a) == normalized(b)
}

/// One side of a diff.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSide {
    /// The run (id).
    pub run: String,
    /// Its workflow type.
    pub workflow: String,
    /// Its final status.
    pub status: String,
    /// Whether it finished with a partial result.
    pub partial: bool,
    /// Events in its history.
    pub events: u64,
    /// Cost spent, in micro-units.
    pub cost_micros: u64,
    /// Tokens used.
    pub tokens: u64,
    /// LLM calls made.
    pub llm_calls: u64,
    /// Tool calls made.
    pub tool_calls: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Replans made.
    pub replans: u64,
    /// Escalations raised.
    pub escalations: u64,
    /// Event count per kind.
    pub kinds: BTreeMap<String, u64>,
    /// Final status of each task of the final plan.
    pub tasks: BTreeMap<String, String>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

impl RunSide {
    /// The side of a diff for a run's history and its final state.
    pub fn of(events: &[Logged], state: &RunState) -> RunSide {
        let mut kinds = BTreeMap::new();
        for e in events {
            *kinds.entry(e.event.kind_name().to_owned()).or_insert(0) += 1;
        }
        RunSide {
            run: state.run.to_string(),
            workflow: state.workflow.clone(),
            status: state.status.name().to_owned(),
            partial: state.partial,
            events: events.len() as u64,
            cost_micros: state.totals.cost_micros,
            tokens: state.totals.tokens,
            llm_calls: state.totals.llm_calls,
            tool_calls: state.totals.tool_calls,
            retries: state.totals.retries,
            replans: state.totals.replans,
            escalations: state.escalations.len() as u64,
            kinds,
            tasks: state.tasks.iter().map(|t| (t.spec.id.0.clone(), t.status.name().to_owned())).collect(),
            failure: state.failure.clone(),
        }
    }
}

/// Where two histories first differ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FirstDifference {
    /// The first seq at which the two histories differ.
    pub seq: u64,
    /// The event of run A at that seq (`{"kind","payload"}`), None if A ended before.
    pub a: Option<Value>,
    /// The event of run B at that seq, None if B ended before.
    pub b: Option<Value>,
    /// Payload fields that differ (when both have an event of the same kind).
    pub fields: Vec<String>,
    /// Run A's event as one line of text (for the text report).
    #[serde(skip)]
    pub a_line: Option<String>,
    /// Run B's event as one line of text (for the text report).
    #[serde(skip)]
    pub b_line: Option<String>,
}

/// A task whose final status differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskDifference {
    /// The task id.
    pub task: String,
    /// Its final status in run A (None: A's final plan has no such task).
    pub a: Option<String>,
    /// Its final status in run B (None: B's final plan has no such task).
    pub b: Option<String>,
}

/// The diff of two runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    /// Run A.
    pub a: RunSide,
    /// Run B.
    pub b: RunSide,
    /// Events equal (by content) from seq 0 up to, not including, this seq.
    pub common_prefix: u64,
    /// Whether the histories are equal event for event (by content).
    pub identical: bool,
    /// Where they first differ (None when identical).
    pub first_difference: Option<FirstDifference>,
    /// b - a, per kind (kinds with a non-zero delta).
    pub kinds_delta: BTreeMap<String, i64>,
    /// Tasks of the final plans whose final status differs.
    pub tasks_differing: Vec<TaskDifference>,
    /// b's cost minus a's, in micro-units.
    pub cost_delta_micros: i64,
    /// b's tokens minus a's.
    pub tokens_delta: i64,
}

fn delta(a: u64, b: u64) -> i64 {
    i64::try_from(b).unwrap_or(i64::MAX).saturating_sub(i64::try_from(a).unwrap_or(i64::MAX))
}

/// Diffs two folded histories.
pub fn diff(a: &[Logged], a_state: &RunState, b: &[Logged], b_state: &RunState) -> Diff {
    let n = a.len().max(b.len());
    let mut first = None;
    let mut common = n as u64;
    for i in 0..n {
        let (x, y) = (a.get(i), b.get(i));
        let same = match (x, y) {
            (Some(x), Some(y)) => same_step(&x.event, &y.event),
            _ => false,
        };
        if !same {
            common = i as u64;
            let fields = match (x, y) {
                (Some(x), Some(y)) if x.event.kind_name() == y.event.kind_name() => {
                    let fx = keel_store::Payload::fields(&normalized(&x.event));
                    let fy = keel_store::Payload::fields(&normalized(&y.event));
                    fx.iter().filter(|(k, v)| fy.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect()
                }
                _ => Vec::new(),
            };
            first = Some(FirstDifference {
                seq: i as u64,
                a: x.map(|e| event_json(&e.event)),
                b: y.map(|e| event_json(&e.event)),
                fields,
                a_line: x.map(|e| event_line(&e.event)),
                b_line: y.map(|e| event_line(&e.event)),
            });
            break;
        }
    }
    let sa = RunSide::of(a, a_state);
    let sb = RunSide::of(b, b_state);
    let mut kinds_delta = BTreeMap::new();
    for k in sa.kinds.keys().chain(sb.kinds.keys()) {
        let d = delta(sa.kinds.get(k).copied().unwrap_or(0), sb.kinds.get(k).copied().unwrap_or(0));
        if d != 0 {
            kinds_delta.insert(k.clone(), d);
        }
    }
    let mut tasks_differing = Vec::new();
    let mut names: Vec<&String> = sa.tasks.keys().chain(sb.tasks.keys()).collect();
    names.sort();
    names.dedup();
    for t in names {
        let (x, y) = (sa.tasks.get(t), sb.tasks.get(t));
        if x != y {
            tasks_differing.push(TaskDifference { task: t.clone(), a: x.cloned(), b: y.cloned() });
        }
    }
    Diff {
        cost_delta_micros: delta(sa.cost_micros, sb.cost_micros),
        tokens_delta: delta(sa.tokens, sb.tokens),
        identical: first.is_none(),
        common_prefix: common,
        first_difference: first,
        kinds_delta,
        tasks_differing,
        a: sa,
        b: sb,
    }
}

/// Diffs two histories, folding each.
pub fn diff_events(a: &[Logged], b: &[Logged]) -> Result<Diff, ReplayError> {
    let ra = crate::timeline::Replay::new(a.to_vec())?;
    let rb = crate::timeline::Replay::new(b.to_vec())?;
    Ok(diff(a, ra.final_state(), b, rb.final_state()))
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "A {}  {} {} events, status {}{}, cost {} micros",
            self.a.run,
            self.a.workflow,
            self.a.events,
            self.a.status,
            if self.a.partial { " (partial)" } else { "" },
            self.a.cost_micros
        )?;
        writeln!(
            f,
            "B {}  {} {} events, status {}{}, cost {} micros",
            self.b.run,
            self.b.workflow,
            self.b.events,
            self.b.status,
            if self.b.partial { " (partial)" } else { "" },
            self.b.cost_micros
        )?;
        match &self.first_difference {
            None => writeln!(
                f,
                "identical histories ({} events; times and dispatch keys not compared)",
                self.common_prefix
            )?,
            Some(d) => {
                writeln!(f, "same for seqs 0..{}; first difference at seq {}:", d.seq, d.seq)?;
                writeln!(f, "  A: {}", d.a_line.as_deref().unwrap_or("(no event: the run ended)"))?;
                writeln!(f, "  B: {}", d.b_line.as_deref().unwrap_or("(no event: the run ended)"))?;
                if !d.fields.is_empty() {
                    writeln!(f, "  fields that differ: {}", d.fields.join(", "))?;
                }
            }
        }
        if !self.kinds_delta.is_empty() {
            let parts: Vec<String> = self.kinds_delta.iter().map(|(k, d)| format!("{k} {d:+}")).collect();
            writeln!(f, "event kinds (B - A): {}", parts.join(", "))?;
        }
        for t in &self.tasks_differing {
            writeln!(f, "task {}: A {} / B {}", t.task, t.a.as_deref().unwrap_or("-"), t.b.as_deref().unwrap_or("-"))?;
        }
        writeln!(f, "cost B - A: {:+} micros, tokens {:+}", self.cost_delta_micros, self.tokens_delta)
    }
}
