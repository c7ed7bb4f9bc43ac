//! Fork: "what if this run had continued differently from seq N?"
//!
//! The fork is a new run (new id) whose log starts as a copy of the source's events
//! `0..=at` — re-appended through the store API under the new id, so it has its own hash
//! chain; the copied `RunAccepted` claims no idempotency key, and each copied dispatch
//! carries the key derived from the new run id — and is then driven live by an [`Engine`]
//! with the fork's policy. Every planner, handler and evaluator call first looks for the
//! same call in the source run:
//!
//! - a task call with the same (task id, attempt, handler, input) gets the recorded result
//!   (the k-th such call after the fork point gets the k-th recorded answer after it;
//!   beyond those, the last recorded answer for that call);
//! - a planner call with the same (revision, reason) gets the recorded plan (which the
//!   fork validates again under its own policy);
//! - an evaluator call with the same (task, attempt, output) gets the recorded verdict;
//! - when the fork waits on the same escalation the source waited on, the source's human
//!   resolution is applied.
//!
//! Only calls that differ go to the live components given in [`ForkConfig`]; without one,
//! such a call fails (fatal) and says so. The fork is driven in a private in-memory store,
//! so nothing else is driven with the changed policy; [`save_run`] copies it into a
//! database afterwards.

use crate::check::{classify, EventClass};
use crate::diff::same_step;
use crate::error::ReplayError;
use crate::format::{event_json, event_line};
use keel_engine::api::{
    BoxFuture, Clock, EscalationSink, EvalRequest, Evaluation, Evaluator, HandlerError, PlanRequest, Planner, TaskCall,
    TaskHandler, TaskOutput,
};
use keel_engine::{
    apply, copy_payloads,
    core::{attempt_key, effect_key},
    prepare_outlined, Engine, Escalation, Event, FailureSource, Logged, Plan, Policy, Resolution, RunState, RunStatus,
    TaskStatus, WorkflowType,
};
use keel_store::{EventLog, MemStore, NewRecord, RunId, Seq};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How to drive a fork.
#[derive(Clone)]
pub struct ForkConfig {
    /// The code-level policy the fork runs with.
    pub policy: Policy,
    /// The source's workflow type with its live planner and evaluator (used only for calls
    /// the recording cannot answer). `None`: a stub that only replays.
    pub workflow: Option<WorkflowType>,
    /// Live task handlers by name (used only for calls the recording cannot answer).
    pub handlers: BTreeMap<String, Arc<dyn TaskHandler>>,
    /// Apply the source's human resolutions to the same escalations.
    pub replay_resolutions: bool,
}

impl Default for ForkConfig {
    fn default() -> Self {
        ForkConfig { policy: Policy::default(), workflow: None, handlers: BTreeMap::new(), replay_resolutions: true }
    }
}

impl std::fmt::Debug for ForkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkConfig")
            .field("policy", &self.policy)
            .field("workflow", &self.workflow.as_ref().map(|w| w.name.clone()))
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("replay_resolutions", &self.replay_resolutions)
            .finish()
    }
}

/// One side's totals in a fork report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForkSide {
    /// The run (id).
    pub run: String,
    /// Events in its history.
    pub events: u64,
    /// Its final status.
    pub status: String,
    /// Whether it finished with a partial result.
    pub partial: bool,
    /// Cost spent, in micro-units.
    pub cost_micros: u64,
    /// Tokens used.
    pub tokens: u64,
}

impl ForkSide {
    fn of(events: u64, s: &RunState) -> Self {
        ForkSide {
            run: s.run.to_string(),
            events,
            status: s.status.name().to_owned(),
            partial: s.partial,
            cost_micros: s.totals.cost_micros,
            tokens: s.totals.tokens,
        }
    }
}

/// An event of one side that the other side does not have.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForkEvent {
    /// Seq of the event.
    pub seq: u64,
    /// Whether the core decided it, answered a call, or it came from outside.
    pub class: EventClass,
    /// Kind of the event.
    pub kind: String,
    /// The event as JSON (`{"kind","payload"}`).
    pub event: Value,
    /// What the other run recorded at the same seq, if anything.
    pub other_at_seq: Option<Value>,
    /// The event as one line of text (for the text report).
    #[serde(skip)]
    pub line: String,
    /// What the other run recorded at the same seq, as one line of text.
    #[serde(skip)]
    pub other_line: Option<String>,
}

/// Calls the fork made, by where the answer came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallCounts {
    /// Answered from the source's recording.
    pub replayed: u64,
    /// Sent to a live planner/handler/evaluator.
    pub live: u64,
    /// Neither recorded nor a live component to call: failed.
    pub unanswered: u64,
    /// Human resolutions of the source applied to the same escalation.
    pub resolutions_replayed: u64,
}

/// What a fork did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForkReport {
    /// The run forked.
    pub source: ForkSide,
    /// The fork.
    pub fork: ForkSide,
    /// The fork copies the source's history up to and including this seq.
    pub at_seq: u64,
    /// The policy the fork ran with (JSON).
    pub policy: Value,
    /// The fork's events after `at_seq` equal the source's (as a set: effects may finish
    /// in another order).
    pub same_as_source: bool,
    /// First decision of the fork (after `at_seq`) that the source did not make.
    pub first_different_decision: Option<ForkEvent>,
    /// First event of the fork (any class) that the source does not have.
    pub first_different_event: Option<ForkEvent>,
    /// First event of the source (after `at_seq`) that the fork does not have.
    pub first_source_only_event: Option<ForkEvent>,
    /// fork cost − source cost, micro-units.
    pub cost_delta_micros: i64,
    /// Calls the fork answered from the recording and calls it made live.
    pub calls: CallCounts,
    /// The fork's driver stopped on this error (a store failure, a bug), leaving the fork
    /// where it was: `keel fork` exits non-zero.
    pub stopped: Option<String>,
}

impl std::fmt::Display for ForkReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "forked run {} at seq {} into run {}", self.source.run, self.at_seq, self.fork.run)?;
        writeln!(
            f,
            "  source: {} events, {}{}, cost {} micros",
            self.source.events,
            self.source.status,
            if self.source.partial { " (partial)" } else { "" },
            self.source.cost_micros
        )?;
        writeln!(
            f,
            "  fork:   {} events, {}{}, cost {} micros",
            self.fork.events,
            self.fork.status,
            if self.fork.partial { " (partial)" } else { "" },
            self.fork.cost_micros
        )?;
        writeln!(f, "  cost difference (fork - source): {:+} micros", self.cost_delta_micros)?;
        writeln!(
            f,
            "  calls: {} answered from the recording, {} live, {} unanswered; {} human resolution(s) replayed",
            self.calls.replayed, self.calls.live, self.calls.unanswered, self.calls.resolutions_replayed
        )?;
        if self.same_as_source {
            writeln!(f, "  the fork made the same steps as the source after seq {}", self.at_seq)?;
        }
        if let Some(d) = &self.first_different_decision {
            writeln!(f, "  first different decision: fork seq {}: {}", d.seq, d.line)?;
            writeln!(f, "    source at seq {}: {}", d.seq, d.other_line.as_deref().unwrap_or("(no event)"))?;
        }
        if let Some(d) = &self.first_different_event {
            if self.first_different_decision.as_ref().map(|x| x.seq) != Some(d.seq) {
                writeln!(f, "  first different event: fork seq {}: {}", d.seq, d.line)?;
            }
        }
        if let Some(d) = &self.first_source_only_event {
            writeln!(f, "  first source step the fork did not take: seq {}: {}", d.seq, d.line)?;
        }
        if let Some(e) = &self.stopped {
            writeln!(f, "  the fork's driver stopped on an error: {e}")?;
        }
        Ok(())
    }
}

/// A fork's result: the report, the fork's events, and the private store it lives in.
pub struct Forked {
    /// What the fork did.
    pub report: ForkReport,
    /// The fork's whole history.
    pub events: Vec<Logged>,
    /// The private in-memory store the fork lives in (see [`save_run`] to keep it).
    pub store: Arc<MemStore>,
    /// The fork's run id.
    pub run: RunId,
}

// ---------------------------------------------------------------------------------------
// Recorded answers
// ---------------------------------------------------------------------------------------

type TaskAnswer = Result<TaskOutput, HandlerError>;
type EvalAnswer = Result<Evaluation, HandlerError>;

#[derive(Default)]
struct Answers {
    plans: BTreeMap<String, Result<Plan, String>>,
    /// Per call key: answers after the fork point (in order), and the last answer seen.
    tasks: BTreeMap<String, (VecDeque<TaskAnswer>, Option<TaskAnswer>)>,
    evals: BTreeMap<String, EvalAnswer>,
}

struct Recording {
    answers: Mutex<Answers>,
    replayed: AtomicU64,
    live: AtomicU64,
    unanswered: AtomicU64,
}

fn plan_key(revision: u32, reason: &keel_engine::PlanReason) -> String {
    format!("{revision}/{}", serde_json::to_string(reason).unwrap_or_default())
}

fn task_key(task: &keel_engine::TaskId, attempt: u32, handler: &str, input: &keel_engine::TaskInput) -> String {
    serde_json::to_string(&(&task.0, attempt, handler, input)).unwrap_or_default()
}

fn eval_key(task: &keel_engine::TaskId, attempt: u32, output: &keel_engine::Json) -> String {
    serde_json::to_string(&(&task.0, attempt, output)).unwrap_or_default()
}

impl Answers {
    /// A planner's answer (a plan, or its refusal), keyed by revision and reason.
    fn note_plan(&mut self, s: &RunState, event: &Event) {
        let a = self;
        match event {
            Event::Planned { revision, plan } | Event::Replanned { revision, plan, .. } => {
                if let Some(reason) = &s.planning_reason {
                    a.plans.insert(plan_key(*revision, reason), Ok(plan.clone()));
                }
            }
            Event::PlanRejected { revision, errors, plan } => {
                if let Some(reason) = &s.planning_reason {
                    let answer = match plan {
                        Some(p) => Ok(p.clone()),
                        None => Err(errors
                            .iter()
                            .map(|x| x.strip_prefix("planner: ").unwrap_or(x))
                            .collect::<Vec<_>>()
                            .join("; ")),
                    };
                    a.plans.insert(plan_key(*revision, reason), answer);
                }
            }
            _ => {}
        }
    }

    /// A handler's or the evaluator's answer for a task attempt, as recorded in `s`
    /// (the state before the answer).
    fn note_task(&mut self, s: &RunState, event: &Event, after_fork: bool) {
        let a = self;
        let task_of = |id: &keel_engine::TaskId| s.task_index.get(id).and_then(|&i| s.tasks.get(i));
        match event {
            Event::TaskExecuted { task, attempt, output, usage, .. } => {
                if let Some(t) = task_of(task).filter(|t| t.status == TaskStatus::Dispatched) {
                    if let (Some(input), Ok(value)) = (&t.input, output.value()) {
                        let answer = Ok(TaskOutput { output: value, usage: *usage });
                        push_task(a, task_key(task, *attempt, &t.spec.handler, input), answer, after_fork);
                    }
                }
            }
            Event::TaskFailed { task, attempt, class, error, usage, source, .. } => match task_of(task) {
                Some(t) if t.status == TaskStatus::Dispatched => {
                    if let Some(input) = &t.input {
                        let answer = Err(HandlerError { class: *class, message: error.clone(), usage: *usage });
                        push_task(a, task_key(task, *attempt, &t.spec.handler, input), answer, after_fork);
                    }
                }
                Some(t) if t.status == TaskStatus::Executed => {
                    if let (FailureSource::Evaluator, Some(output)) = (source, &t.output) {
                        let answer = Err(HandlerError { class: *class, message: error.clone(), usage: *usage });
                        a.evals.insert(eval_key(task, *attempt, output), answer);
                    }
                }
                _ => {}
            },
            Event::TaskEvaluated { task, attempt, verdict, notes, usage, .. } => {
                if let Some(t) =
                    task_of(task).filter(|t| t.status == TaskStatus::Executed && t.spec.success_criteria.is_some())
                {
                    if let Some(output) = &t.output {
                        let answer = Ok(Evaluation { verdict: *verdict, notes: notes.clone(), usage: *usage });
                        a.evals.insert(eval_key(task, *attempt, output), answer);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Recording {
    /// Indexes the answers of the source run. Answers recorded at or before `at` are kept
    /// only as the "last answer" fallback of their call.
    fn of(source: &[Logged], at: u64) -> Result<Recording, ReplayError> {
        let mut a = Answers::default();
        let mut state: Option<RunState> = None;
        for e in source {
            if let Some(s) = &state {
                a.note_plan(s, &e.event);
                a.note_task(s, &e.event, e.seq.0 > at);
            }
            crate::timeline::step_mut(&mut state, e)?;
        }
        Ok(Recording {
            answers: Mutex::new(a),
            replayed: AtomicU64::new(0),
            live: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counts(&self) -> CallCounts {
        CallCounts {
            replayed: self.replayed.load(Ordering::Relaxed),
            live: self.live.load(Ordering::Relaxed),
            unanswered: self.unanswered.load(Ordering::Relaxed),
            resolutions_replayed: 0,
        }
    }

    fn unanswered(&self, what: String) -> HandlerError {
        self.unanswered.fetch_add(1, Ordering::Relaxed);
        HandlerError::fatal(format!("fork: {what} differs from the recorded run and no live component is configured"))
    }
}

fn push_task(a: &mut Answers, key: String, answer: TaskAnswer, after_fork: bool) {
    let slot = a.tasks.entry(key).or_default();
    if after_fork {
        slot.0.push_back(answer.clone());
    }
    slot.1 = Some(answer);
}

struct RecordedPlanner {
    rec: Arc<Recording>,
    live: Option<Arc<dyn Planner>>,
}

impl Planner for RecordedPlanner {
    fn plan(&self, request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let key = plan_key(request.revision, &request.reason);
        let found = self.rec.lock().plans.get(&key).cloned();
        if let Some(answer) = found {
            self.rec.replayed.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async move { answer.map_err(HandlerError::semantic) });
        }
        match &self.live {
            Some(p) => {
                self.rec.live.fetch_add(1, Ordering::Relaxed);
                p.plan(request)
            }
            None => {
                let e = self.rec.unanswered(format!("the planner call for revision {}", request.revision));
                Box::pin(async move { Err(e) })
            }
        }
    }
}

struct RecordedHandler {
    name: String,
    rec: Arc<Recording>,
    live: Option<Arc<dyn TaskHandler>>,
}

impl TaskHandler for RecordedHandler {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let key = task_key(&call.task, call.attempt, &self.name, &call.input);
        let found = {
            let mut a = self.rec.lock();
            a.tasks.get_mut(&key).and_then(|(queue, last)| queue.pop_front().or_else(|| last.clone()))
        };
        if let Some(answer) = found {
            self.rec.replayed.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async move { answer });
        }
        match &self.live {
            Some(h) => {
                self.rec.live.fetch_add(1, Ordering::Relaxed);
                h.call(call)
            }
            None => {
                let e = self
                    .rec
                    .unanswered(format!("the call of {} attempt {} (handler {})", call.task, call.attempt, self.name));
                Box::pin(async move { Err(e) })
            }
        }
    }
}

struct RecordedEvaluator {
    rec: Arc<Recording>,
    live: Option<Arc<dyn Evaluator>>,
}

impl Evaluator for RecordedEvaluator {
    fn evaluate(&self, request: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        let key = eval_key(&request.task.id, request.attempt, &request.output);
        let found = self.rec.lock().evals.get(&key).cloned();
        if let Some(answer) = found {
            self.rec.replayed.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async move { answer });
        }
        match &self.live {
            Some(ev) => {
                self.rec.live.fetch_add(1, Ordering::Relaxed);
                ev.evaluate(request)
            }
            None => {
                let e =
                    self.rec.unanswered(format!("the evaluation of {} attempt {}", request.task.id, request.attempt));
                Box::pin(async move { Err(e) })
            }
        }
    }
}

/// Time of the fork: continues from the last copied event's time at the pace of the wall
/// clock, so budgets and timers keep their meaning relative to the recorded history.
struct ForkClock {
    base_us: i64,
    start: Instant,
}

impl Clock for ForkClock {
    fn now_us(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.base_us.saturating_add(elapsed)
    }
}

struct QuietSink;

impl EscalationSink for QuietSink {
    fn notify(&self, _escalation: keel_engine::EscalationContext) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

// ---------------------------------------------------------------------------------------
// The fork
// ---------------------------------------------------------------------------------------

/// The source's events `0..=at`, rewritten for run `new`: same events and times, the
/// dispatch keys (effect and attempt keys) derived from the new id, no idempotency claim (made by the caller).
pub fn copy_prefix(source: &[Logged], at: u64, new: RunId) -> Result<Vec<Logged>, ReplayError> {
    let last = source.len().saturating_sub(1) as u64;
    let Some(first) = source.first() else {
        return Err(ReplayError::Invalid("the source run has no events".to_owned()));
    };
    if at > last {
        return Err(ReplayError::SeqOutOfRange { run: first.run, seq: at, last });
    }
    let mut out = Vec::new();
    let mut state: Option<RunState> = None;
    for e in source.iter().take(usize::try_from(at).unwrap_or(usize::MAX).saturating_add(1)) {
        let event = match (&e.event, &state) {
            (Event::TaskDispatched { task, attempt, model, input, reserved, .. }, Some(s)) => Event::TaskDispatched {
                task: task.clone(),
                attempt: *attempt,
                effect_key: effect_key(
                    new,
                    task,
                    s.task_index.get(task).and_then(|&i| s.tasks.get(i)).map_or(0, |t| t.planned_in),
                ),
                attempt_key: attempt_key(new, s.revision.unwrap_or(0), task, *attempt),
                model: model.clone(),
                input: input.clone(),
                reserved: *reserved,
            },
            (other, _) => other.clone(),
        };
        let logged = Logged { run: new, seq: e.seq, at_us: e.at_us, event };
        crate::timeline::step_mut(&mut state, &logged)?;
        out.push(logged);
    }
    Ok(out)
}

/// Appends `events` (one run, from seq 0) to `log` in batches, without any claim.
pub fn append_events(log: &dyn EventLog, events: &[Logged]) -> Result<(), ReplayError> {
    let mut next = 0u64;
    for chunk in events.chunks(512) {
        let records =
            chunk.iter().map(|e| prepare_outlined(log, &e.event, e.at_us)).collect::<Result<Vec<NewRecord>, _>>()?;
        if let Some(first) = chunk.first() {
            log.append(first.run, Seq(next), records, None)?;
            next += chunk.len() as u64;
        }
    }
    Ok(())
}

/// Copies run `run`'s records from one log to another (same bytes, so the same chain).
pub fn save_run(from: &dyn EventLog, to: &dyn EventLog, run: RunId) -> Result<u64, ReplayError> {
    if to.head(run)?.next_seq.0 != 0 {
        return Err(ReplayError::Invalid(format!("run {run} already exists in the target database")));
    }
    copy_records(from, to, run, Seq(0))
}

/// Appends to `to` the records of run `run` that `from` has beyond `to`'s copy, when
/// `to`'s copy is a prefix of `from`'s chain (a run copied earlier, then driven further
/// where it was copied from). Returns the number of records appended (0 when `to` has
/// them all). Refused, with nothing written, when the two chains differ at `to`'s last
/// record or `to` holds more records than `from`.
pub fn continue_run(from: &dyn EventLog, to: &dyn EventLog, run: RunId) -> Result<u64, ReplayError> {
    let (src, dst) = (from.head(run)?, to.head(run)?);
    if dst.next_seq.0 == 0 {
        return copy_records(from, to, run, Seq(0));
    }
    if dst.next_seq.0 > src.next_seq.0 {
        return Err(ReplayError::Invalid(format!(
            "run {run} has {} records in the target database, more than the {} of the source",
            dst.next_seq.0, src.next_seq.0
        )));
    }
    let last = Seq(dst.next_seq.0 - 1);
    let same = match from.read(run, last)?.next() {
        Some(rec) => {
            let rec = rec?;
            rec.seq == last && rec.hash == dst.last_hash
        }
        None => false,
    };
    if !same {
        return Err(ReplayError::Invalid(format!(
            "run {run} has another history in the target database: the two part at record {} (the target has {} \
             records, the source {})",
            parting(from, to, run)?,
            dst.next_seq.0,
            src.next_seq.0
        )));
    }
    copy_records(from, to, run, dst.next_seq)
}

/// The first seq at which `run`'s records in `from` and `to` differ (by chain hash), or the
/// shorter one's length when one is a prefix of the other.
fn parting(from: &dyn EventLog, to: &dyn EventLog, run: RunId) -> Result<u64, ReplayError> {
    let mut theirs = to.read(run, Seq(0))?;
    let mut n = 0u64;
    for ours in from.read(run, Seq(0))? {
        let Some(other) = theirs.next() else { return Ok(n) };
        if ours?.hash != other?.hash {
            return Ok(n);
        }
        n += 1;
    }
    Ok(n)
}

/// Appends run `run`'s records from `start` on, read from `from`, to `to` (whose head
/// must be at `start`), their payloads first; flushes `to`.
fn copy_records(from: &dyn EventLog, to: &dyn EventLog, run: RunId, start: Seq) -> Result<u64, ReplayError> {
    let mut batch = Vec::new();
    let mut next = start.0;
    for rec in from.read(run, start)? {
        let rec = rec?;
        // Its payloads first: written before the record that refers to them.
        copy_payloads(from, to, &rec)?;
        batch.push(NewRecord {
            kind: rec.kind,
            time_us: rec.time_us,
            payload_version: rec.payload_version,
            payload: rec.payload,
            payload_root: rec.payload_root,
        });
        if batch.len() == 512 {
            let n = batch.len() as u64;
            to.append(run, Seq(next), std::mem::take(&mut batch), None)?;
            next += n;
        }
    }
    if !batch.is_empty() {
        let n = batch.len() as u64;
        to.append(run, Seq(next), batch, None)?;
        next += n;
    }
    to.flush()?;
    Ok(next - start.0)
}

/// Forks `source` after event `at` and drives the fork until it is terminal or waits for a
/// human the recording cannot answer. Must run inside a tokio runtime.
pub async fn fork(source: &[Logged], at: u64, cfg: ForkConfig) -> Result<Forked, ReplayError> {
    let source_replay = crate::timeline::Replay::new(source.to_vec())?;
    let source_final = source_replay.final_state().clone();
    let run = RunId(uuid::Uuid::new_v4());
    let prefix = copy_prefix(source, at, run)?;
    let base_us = prefix.last().map(|e| e.at_us).unwrap_or(0);

    let store = Arc::new(MemStore::new());
    append_events(store.as_ref(), &prefix)?;

    let rec = Arc::new(Recording::of(source, at)?);
    let engine = fork_engine(store.clone(), source, &source_final, &cfg, rec.clone(), base_us)?;
    let (resolutions, stopped) = replay_resolutions(&engine, run, source, cfg.replay_resolutions).await?;

    let events = engine.events(run)?;
    let fork_state = crate::timeline::Replay::new(events.clone())?.final_state().clone();
    let mut calls = rec.counts();
    calls.resolutions_replayed = resolutions;
    let mut report = compare(source, &source_final, &events, &fork_state, at, &cfg.policy, calls);
    report.stopped = stopped;
    Ok(Forked { report, events, store, run })
}

/// The fork's engine over `store`: the source's workflow type whose planner, evaluator
/// and handlers answer from the recording first (live ones, if configured, otherwise).
fn fork_engine(
    store: Arc<MemStore>,
    source: &[Logged],
    source_final: &RunState,
    cfg: &ForkConfig,
    rec: Arc<Recording>,
    base_us: i64,
) -> Result<Engine, ReplayError> {
    let mut wf = match &cfg.workflow {
        Some(w) => w.clone(),
        None => WorkflowType::new(
            source_final.workflow.clone(),
            Arc::new(RecordedPlanner { rec: rec.clone(), live: None }),
            Arc::new(RecordedEvaluator { rec: rec.clone(), live: None }),
        ),
    };
    if wf.name != source_final.workflow {
        return Err(ReplayError::Invalid(format!(
            "the fork's workflow type is {}, the source run's is {}",
            wf.name, source_final.workflow
        )));
    }
    let live_planner = cfg.workflow.as_ref().map(|w| w.planner.clone());
    let live_evaluator = cfg.workflow.as_ref().map(|w| w.evaluator.clone());
    wf.planner = Arc::new(RecordedPlanner { rec: rec.clone(), live: live_planner });
    wf.evaluator = Arc::new(RecordedEvaluator { rec: rec.clone(), live: live_evaluator });
    wf.version = source_final.workflow_version;

    let mut names: Vec<String> = crate::check::plan_handlers(source).into_iter().collect();
    names.extend(cfg.handlers.keys().cloned());
    names.sort();
    names.dedup();
    let log: Arc<dyn keel_store::Store> = store.clone();
    let mut builder = Engine::builder()
        .store(log)
        .policy(cfg.policy.clone())
        .clock(Arc::new(ForkClock { base_us, start: Instant::now() }))
        .escalation_sink(Arc::new(QuietSink))
        .snapshot_every(0)
        .workers(1)
        .workflow(wf);
    for name in &names {
        let live = cfg.handlers.get(name).cloned();
        builder = builder.handler(name, Arc::new(RecordedHandler { name: name.clone(), rec: rec.clone(), live }));
    }
    Ok(builder.open()?)
}

/// Drives the fork until idle, applying the source's human decisions to the same
/// escalations (when `replay`), at most 64 of them. Returns how many it applied, and the
/// error its driver stopped on, if it did (then nothing more is tried).
async fn replay_resolutions(
    engine: &Engine,
    run: RunId,
    source: &[Logged],
    replay: bool,
) -> Result<(u64, Option<String>), ReplayError> {
    let mut resolutions = 0u64;
    loop {
        let idle = engine.run_until_idle().await?;
        if let Some((_, e)) = idle.stopped.into_iter().find(|(r, _)| *r == run) {
            return Ok((resolutions, Some(e)));
        }
        let state = engine.state(run)?;
        if !replay || state.status != RunStatus::AwaitingHuman {
            break;
        }
        let Some(open) = state.escalations.iter().rev().find(|e| e.resolution.is_none()) else { break };
        let Some((decision, by, reason)) = recorded_resolution(source, &open.escalation) else { break };
        engine.resolve(run, Resolution { decision, by, reason }).await?;
        resolutions += 1;
        if resolutions > 64 {
            break;
        }
    }
    Ok((resolutions, None))
}

/// The source's human decision on an escalation equal to `esc`, if it made one.
fn recorded_resolution(source: &[Logged], esc: &Escalation) -> Option<(keel_engine::Decision, String, String)> {
    let pos = source.iter().position(|e| matches!(&e.event, Event::Escalated(x) if x == esc))?;
    source.iter().skip(pos + 1).find_map(|e| match &e.event {
        Event::HumanResolved { number, decision, by, defaulted: false, reason } if *number == esc.number => {
            Some((decision.clone(), by.clone(), reason.clone()))
        }
        _ => None,
    })
}

fn event_at(events: &[Logged], seq: u64) -> Option<&Event> {
    usize::try_from(seq).ok().and_then(|i| events.get(i)).map(|e| &e.event)
}

fn compare(
    source: &[Logged],
    source_final: &RunState,
    fork: &[Logged],
    fork_final: &RunState,
    at: u64,
    policy: &Policy,
    calls: CallCounts,
) -> ForkReport {
    let skip = usize::try_from(at).unwrap_or(usize::MAX).saturating_add(1);
    let src_rest: Vec<&Logged> = source.iter().skip(skip).collect();
    let mut matched = vec![false; src_rest.len()];
    let mut first_event = None;
    let mut first_decision = None;
    let mut state: Option<RunState> = None;
    for e in fork {
        let before = state.clone();
        state = apply(state.as_ref(), e).ok().or(state);
        if (e.seq.0) <= at {
            continue;
        }
        let found = src_rest
            .iter()
            .enumerate()
            .find(|(i, s)| unmatched(&matched, *i) && same_step(&s.event, &e.event))
            .map(|(i, _)| i);
        match found {
            Some(i) => {
                if let Some(m) = matched.get_mut(i) {
                    *m = true;
                }
            }
            None => {
                let class = before.as_ref().map(|s| classify(s, &e.event)).unwrap_or(EventClass::External);
                let fe = ForkEvent::new(e, class, event_at(source, e.seq.0));
                if first_event.is_none() {
                    first_event = Some(fe.clone());
                }
                if first_decision.is_none() && class == EventClass::Decision {
                    first_decision = Some(fe);
                }
            }
        }
    }
    let first_source_only = src_rest
        .iter()
        .enumerate()
        .find(|(i, _)| unmatched(&matched, *i))
        .map(|(_, s)| source_only(source, s, event_at(fork, s.seq.0)));
    let src = ForkSide::of(source.len() as u64, source_final);
    let frk = ForkSide::of(fork.len() as u64, fork_final);
    let cost_delta = i64::try_from(frk.cost_micros)
        .unwrap_or(i64::MAX)
        .saturating_sub(i64::try_from(src.cost_micros).unwrap_or(i64::MAX));
    ForkReport {
        same_as_source: first_event.is_none() && first_source_only.is_none(),
        source: src,
        fork: frk,
        at_seq: at,
        policy: serde_json::to_value(policy).unwrap_or(Value::Null),
        first_different_decision: first_decision,
        first_different_event: first_event,
        first_source_only_event: first_source_only,
        cost_delta_micros: cost_delta,
        calls,
        stopped: None,
    }
}

/// A source event the fork does not have, classified on the source's state before it.
fn source_only(source: &[Logged], s: &Logged, other: Option<&Event>) -> ForkEvent {
    let mut st: Option<RunState> = None;
    for e in source.iter().take(usize::try_from(s.seq.0).unwrap_or(0)) {
        st = apply(st.as_ref(), e).ok().or(st);
    }
    ForkEvent::new(s, st.as_ref().map(|x| classify(x, &s.event)).unwrap_or(EventClass::External), other)
}

impl ForkEvent {
    /// `e` of one side, `other` what the other side recorded at the same seq.
    fn new(e: &Logged, class: EventClass, other: Option<&Event>) -> ForkEvent {
        ForkEvent {
            seq: e.seq.0,
            class,
            kind: e.event.kind_name().to_owned(),
            event: event_json(&e.event),
            other_at_seq: other.map(event_json),
            line: event_line(&e.event),
            other_line: other.map(event_line),
        }
    }
}

/// Whether the source event `i` is not yet matched by a fork event.
fn unmatched(matched: &[bool], i: usize) -> bool {
    matched.get(i) == Some(&false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(i: u8) -> NewRecord {
        let e = Event::RunCancelled { by: format!("test {i}"), reason: "a test record".into() };
        keel_store::prepare(&e, i64::from(i)).unwrap()
    }

    fn log(n: u8, run: RunId) -> MemStore {
        let s = MemStore::new();
        s.append(run, Seq(0), (0..n).map(rec).collect(), None).unwrap();
        s
    }

    /// A copy that is a prefix of the source is continued; one that differs or is longer
    /// is refused with nothing written.
    #[test]
    fn a_prefix_is_continued_and_another_history_refused() {
        let run = RunId(uuid::Uuid::from_u128(7));
        let (from, to) = (log(5, run), log(2, run));
        assert_eq!(continue_run(&from, &to, run).unwrap(), 3);
        assert_eq!(to.head(run).unwrap(), from.head(run).unwrap());
        assert_eq!(continue_run(&from, &to, run).unwrap(), 0, "nothing left to copy");

        let fresh = MemStore::new();
        assert_eq!(continue_run(&from, &fresh, run).unwrap(), 5);

        let other = MemStore::new();
        other.append(run, Seq(0), vec![rec(0), rec(9)], None).unwrap();
        let e = continue_run(&from, &other, run).unwrap_err().to_string();
        assert!(
            e.contains("another history")
                && e.contains("the two part at record 1 (the target has 2 records, the source 5)"),
            "{e}"
        );
        assert_eq!(other.head(run).unwrap().next_seq, Seq(2), "nothing written");

        let e = continue_run(&log(2, run), &log(5, run), run).unwrap_err().to_string();
        assert!(e.contains("has 5 records in the target database, more than the 2"), "{e}");
    }
}
