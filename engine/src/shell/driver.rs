//! The executor: one driver per run performs what `decide` says.
//!
//! Loop: `decide(state)` until it returns no record that is due now, checking each
//! record with `apply` and staging it (the records of one `decide` call in order, then
//! those of the next call on the state they lead to); append everything staged as ONE
//! batch (one durable flush); then start the effects (`Plan`, `Execute`, `Evaluate`,
//! `Notify`) that are not already in flight. An effect's answer is checked with `apply`
//! and staged (an answer that is no longer legal, e.g. after a cancellation, is dropped);
//! the decisions it leads to are staged behind it and the lot is appended as one batch.
//! So a chain step costs one flush, and nothing is acted on before it is durable: effects
//! start only once the batch that asked for them is. The driver ends when nothing is left
//! to do: the run is terminal or waits for a human.

use crate::api::{EvalRequest, TaskCall};
use crate::core::{decide, Command};
use crate::core::{event_of, Answer};
use crate::error::EngineError;
use crate::model::event::{Event, FailureSource};
use crate::model::fsm::{RunStatus, TaskStatus};
use crate::model::state::RunState;
use crate::model::workflow::*;
use crate::shell::cache::ResponseCache;
use crate::shell::effects;
use crate::shell::journal::Refused;
use crate::shell::lease::Held;
use crate::shell::oversize;
use crate::shell::runtime::{Inner, Registered};
use keel_store::{NewRecord, RunId, Seq, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

/// How a drive ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DriveOutcome {
    /// Nothing left to do: terminal, or waiting for a human with no deadline.
    Idle(RunStatus),
    /// Waiting for a human; the escalation's default falls due at `until_us`.
    Parked { until_us: i64 },
    /// Waiting for a timer (a retry's backoff, the run's deadline) with no call in flight:
    /// the driver ended, freeing its worker and lease; the run is driven again at
    /// `until_us`.
    Waiting { until_us: i64 },
    /// The driver stopped on an error (store failure, or a bug: an illegal record).
    Stopped(String),
    /// The workers were shut down.
    Shutdown,
    /// The run's lease was lost (a renewal failed or an append was fenced): the driver
    /// stopped, the run is left to whoever holds the lease (`shell::lease`).
    LeaseLost,
}

/// A call to the outside world in flight.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum EffectKey {
    Plan(u32),
    Execute(TaskId, u32),
    Evaluate(TaskId, u32),
    Notify(u32),
}

/// What an effect reports back.
struct Outcome {
    key: EffectKey,
    /// Which start of the call answers (an answer of an earlier start, timed out or cut,
    /// is discarded).
    id: u64,
    /// The command the call answers.
    effect: Command,
    answer: Answer,
}

/// A call in flight.
struct Flight {
    id: u64,
    effect: Command,
    /// The driver's own timer: past it the call is recorded as timed out (even if its
    /// thread is blocked) and a late answer is discarded.
    until: tokio::time::Instant,
    /// The task's timeout (the answer a timeout records names it).
    task_timeout_ms: u64,
    abort: Option<tokio::task::AbortHandle>,
}

/// What the service workers are asked to do (`Workers`, shell/sched.rs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Phase {
    /// Claim runs and drive them.
    Run,
    /// Claim nothing more; each driver records the answers of its calls in flight, starts
    /// nothing new, and ends once none is left (`Workers::drain`).
    Drain,
    /// Every driver ends at its next wait; calls in flight are dropped.
    Stop,
}

/// Wait slice: a sleep re-checks the injected clock at least this often (a test's fake
/// clock may jump).
const WAIT_SLICE_MS: i64 = 200;

pub(crate) async fn drive(
    inner: Arc<Inner>,
    run: RunId,
    wake: Arc<Notify>,
    stop: watch::Receiver<Phase>,
    held: Option<Arc<Held>>,
) -> DriveOutcome {
    let span = tracing::info_span!("run", %run, workflow = tracing::field::Empty);
    let mut d = Driver {
        inner,
        run,
        wake,
        stop,
        held,
        effects: JoinSet::new(),
        inflight: BTreeMap::new(),
        next_id: 0,
        unnotifiable: BTreeSet::new(),
        filled: BTreeSet::new(),
        own: BTreeSet::new(),
        span: span.clone(),
    };
    async move {
        let out = match d.run().await {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(error = %e, "driver stopped");
                DriveOutcome::Stopped(e.to_string())
            }
        };
        d.drain().await;
        out
    }
    .instrument(span)
    .await
}

struct Driver {
    inner: Arc<Inner>,
    run: RunId,
    wake: Arc<Notify>,
    stop: watch::Receiver<Phase>,
    /// The run's lease its appends are fenced with (`shell::lease`).
    held: Option<Arc<Held>>,
    /// Calls spawned on the call pool; dropping the set aborts whatever is still running.
    effects: JoinSet<()>,
    inflight: BTreeMap<EffectKey, Flight>,
    /// Id of the next call started.
    next_id: u64,
    /// Escalations the sink could not be told about during this drive (asked again on the
    /// next drive: at-least-once across restarts).
    unnotifiable: BTreeSet<u32>,
    /// Cache entries already filled from this run: (revision, task, attempt).
    filled: BTreeSet<(u32, TaskId, u32)>,
    /// Dispatches this driver recorded, or recorded the redelivery of: (task, attempt).
    /// A dispatch `decide` wants executed that is not here was made by a driver that
    /// died or stopped: a redelivery, recorded before the handler runs again.
    own: BTreeSet<(TaskId, u32)>,
    span: tracing::Span,
}

/// Events checked with `apply` (already folded into the driver's state) and encoded,
/// waiting to be appended as one batch.
#[derive(Default)]
struct Batch {
    /// Next seq of the durable log (the `expected` of the append).
    base: Option<Seq>,
    /// The run's status at `base` (what the index entry changes from).
    base_status: Option<RunStatus>,
    records: Vec<NewRecord>,
    /// Effect answers in the batch, in order: staged again on top of the re-read log if
    /// the append conflicts.
    answers: Vec<Event>,
    /// The batch accepts an output (response cache).
    evaluated: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Records of one batch at most (well under the store's `batch_records_max`); a longer
/// chain of decisions continues in the next batch.
const BATCH_RECORDS_MAX: usize = 256;

enum Committed {
    Ok,
    /// Someone else appended first: re-read the log (staged answers are staged again).
    Conflict(Vec<Event>),
}

/// How long a driver that ends waits for the calls it aborted to be gone (a call that
/// blocks its thread cannot be interrupted: it is left to finish on the call pool).
const DRAIN_MS: u64 = 2_000;

impl Driver {
    /// Aborts the calls still in flight and waits (at most `DRAIN_MS`) until they are gone:
    /// each holds the engine (and so the store) while it lives, so a drive that ended must
    /// not leave them running on the call pool (a store dropped right after `shutdown`
    /// must be free to open again).
    async fn drain(&mut self) {
        if self.effects.is_empty() {
            return;
        }
        self.effects.abort_all();
        let all_gone = async { while self.effects.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_millis(DRAIN_MS), all_gone).await.is_err() {
            tracing::warn!(
                calls = self.effects.len(),
                "calls still running after the drive ended (blocked in their thread)"
            );
            self.effects.detach_all();
        }
    }

    async fn run(&mut self) -> Result<DriveOutcome, EngineError> {
        let mut state = self.reload().await?;
        self.span.record("workflow", state.workflow.as_str());
        self.inner.meter.remember(self.run, &state.workflow);
        let reg = self.registration(&state)?;
        self.inner.cache.fill_from(&state);
        let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
        let mut batch = Batch::default();
        loop {
            let phase = *self.stop.borrow();
            if phase == Phase::Stop {
                return Ok(DriveOutcome::Shutdown);
            }
            // Answers that already arrived join this batch; calls past the driver's own
            // timer are recorded as timed out; at the run's deadline, calls in flight are cut.
            while let Ok(o) = rx.try_recv() {
                self.absorb(&mut state, &mut batch, o)?;
            }
            self.expire(&mut state, &mut batch)?;
            self.cut_at_deadline(&mut state, &mut batch)?;
            if state.status.is_terminal() && batch.is_empty() {
                if !self.inflight.is_empty() {
                    tracing::info!(inflight = self.inflight.len(), status = ?state.status, "run is terminal: dropping in-flight calls");
                }
                return Ok(DriveOutcome::Idle(state.status));
            }
            // Decide until nothing more is due now, staging each call's due records in
            // order. Future-dated records (retry backoffs, the run deadline, an
            // escalation's default) are timers: wait for the earliest (or for an answer),
            // then decide again. Draining, nothing is decided (no new dispatch, no timer):
            // the answers of the calls in flight are recorded, and the drive ends once no
            // call is left; the next drive decides from what is recorded.
            let now = self.inner.clock.now_us();
            let (mut effects, next_timer) = match phase {
                Phase::Drain => (Vec::new(), None),
                _ => self.decide_and_stage(&mut state, &mut batch, now)?,
            };
            if !batch.is_empty() {
                if let Committed::Conflict(answers) = self.commit(&mut state, &mut batch).await? {
                    state = self.reload().await?;
                    self.restage(&mut state, &mut batch, answers)?;
                }
                continue;
            }
            if phase == Phase::Drain {
                effects = self.own_unstarted(&state);
            }
            // The state is durable: start what it asks for.
            for effect in effects {
                self.start(effect, &state, &reg, &tx);
            }
            if phase == Phase::Drain && self.inflight.is_empty() {
                return Ok(DriveOutcome::Shutdown);
            }
            // A run waiting only for a timer frees its worker and lease: the driver ends
            // and the run is driven again when the timer falls due.
            if let (Some(t), true) = (next_timer, self.inflight.is_empty()) {
                return Ok(match state.status {
                    RunStatus::AwaitingHuman => DriveOutcome::Parked { until_us: t },
                    _ => DriveOutcome::Waiting { until_us: t },
                });
            }
            if next_timer.is_none() && self.inflight.is_empty() {
                return Ok(DriveOutcome::Idle(state.status));
            }
            // Wait for an answer, the earliest call's own timer, the next timer (in slices:
            // a test's fake clock may jump), a wake-up or shutdown.
            let slice = next_timer.map(|t| u64::try_from(((t - now) / 1000).clamp(1, WAIT_SLICE_MS)).unwrap_or(1));
            let timer = tokio::time::Instant::now() + Duration::from_millis(slice.unwrap_or(3_600_000));
            let until = self.inflight.values().map(|f| f.until).min().map_or(timer, |u| u.min(timer));
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                Some(o) = rx.recv() => self.absorb(&mut state, &mut batch, o)?,
                _ = self.wake.notified() => state = self.reload().await?,
                // A stop ends the drive at the loop's top, as the workers gone do here; a
                // drain finishes the calls.
                changed = self.stop.changed() => if changed.is_err() { return Ok(DriveOutcome::Shutdown) },
            }
        }
    }

    /// The calls of dispatches this drive recorded (or recorded the redelivery of) that
    /// `decide` still asks for: what a draining driver starts if it has not yet (the drain
    /// came between their append and their start), so that none of them is left without
    /// its call (the next drive would count it a redelivery).
    fn own_unstarted(&self, state: &RunState) -> Vec<Command> {
        decide(state, &self.inner.ctx)
            .into_iter()
            .filter(|c| matches!(c, Command::Execute { task, attempt } if self.own.contains(&(task.clone(), *attempt))))
            .collect()
    }

    /// The workflow type the run was accepted under (warns if its version changed).
    fn registration(&self, state: &RunState) -> Result<Arc<Registered>, EngineError> {
        let Some(reg) = self.inner.workflows.get(&state.workflow).cloned() else {
            return Err(EngineError::UnknownWorkflow { name: state.workflow.clone() });
        };
        if reg.wf.version != state.workflow_version {
            tracing::warn!(
                recorded = state.workflow_version,
                registered = reg.wf.version,
                "run was accepted under another version of its workflow type"
            );
        }
        Ok(reg)
    }

    /// Decides until nothing more is due at `now`, staging each call's due records in
    /// order (each `decide` runs on the state the records before lead to). Returns the
    /// calls the last `decide` asked for and the earliest future-dated record (a timer:
    /// a retry's backoff, the run's deadline, an escalation's default).
    fn decide_and_stage(
        &mut self,
        state: &mut RunState,
        batch: &mut Batch,
        now: i64,
    ) -> Result<(Vec<Command>, Option<i64>), EngineError> {
        let mut effects = Vec::new();
        let mut next_timer: Option<i64>;
        loop {
            // Before each decision round: a run that finishes in this round is not warned.
            self.stage_size_warning(state, batch, now)?;
            effects.clear();
            next_timer = None;
            let mut due_now = Vec::new();
            let mut due_now_at: Option<i64> = None;
            for cmd in decide(state, &self.inner.ctx) {
                match cmd {
                    Command::Record { not_before_us: Some(t), .. } if t > now => {
                        next_timer = Some(next_timer.map_or(t, |n: i64| n.min(t)));
                    }
                    Command::Record { event, not_before_us } => {
                        if let Some(t) = not_before_us {
                            due_now_at = Some(due_now_at.map_or(t, |d: i64| d.max(t)));
                        }
                        due_now.push(event);
                    }
                    effect => effects.push(effect),
                }
            }
            if due_now.is_empty() {
                if self.stage_redeliveries(state, batch, &effects, now)? {
                    continue;
                }
                break;
            }
            let at_us = now.max(state.last_event_us).max(due_now_at.unwrap_or(i64::MIN));
            for event in due_now {
                let kind = event.kind_name();
                if let Event::TaskDispatched { task, attempt, .. } = &event {
                    self.own.insert((task.clone(), *attempt));
                }
                match self.stage(state, batch, event, at_us, false).map_err(|(e, _)| e) {
                    Ok(()) => {}
                    Err(Refused::Illegal(e)) => {
                        tracing::error!(error = %e, "decide produced a record the state machine refuses (a bug); stopping this run's driver");
                        return Err(EngineError::Transition(e));
                    }
                    Err(Refused::TooLarge(what, bytes, max)) => {
                        // Never a stopped driver with a live run: the run fails, on record.
                        let reason = format!("{what} of {bytes} bytes exceeds the limit of {max}");
                        tracing::error!(kind, %reason, "a decision is too large to record; the run fails");
                        let failed = oversize::refused_record(kind, &reason);
                        self.stage(state, batch, failed, at_us, false).map_err(|(e, _)| EngineError::from(e))?;
                        break;
                    }
                    Err(other) => return Err(other.into()),
                }
            }
            if batch.records.len() >= BATCH_RECORDS_MAX {
                break;
            }
        }
        Ok((effects, next_timer))
    }

    /// Stages a `TaskRedelivered` for each dispatch `decide` wants executed that this driver
    /// neither made nor has in flight (its maker died or stopped), so the redelivery is
    /// durable before the handler runs again. Staged as answers (observations of the shell;
    /// a conflicting append stages them again). `true` if any was staged (decide again:
    /// the rule for a dispatch redelivered too often is `decide`'s).
    fn stage_redeliveries(
        &mut self,
        state: &mut RunState,
        batch: &mut Batch,
        effects: &[Command],
        now: i64,
    ) -> Result<bool, EngineError> {
        let mut staged = false;
        for effect in effects {
            let Command::Execute { task, attempt } = effect else { continue };
            let key = (task.clone(), *attempt);
            if self.own.contains(&key) || self.inflight.contains_key(&EffectKey::Execute(task.clone(), *attempt)) {
                continue;
            }
            let Some(t) = state.task_index.get(task).and_then(|&i| state.tasks.get(i)) else { continue };
            let event = Event::TaskRedelivered {
                task: task.clone(),
                attempt: *attempt,
                redelivery: t.redeliveries.saturating_add(1),
                limit: self.inner.redelivery_limit,
            };
            tracing::warn!(%task, attempt, redelivery = t.redeliveries.saturating_add(1), "redelivering a dispatch whose worker died or stopped");
            self.own.insert(key);
            let at_us = now.max(state.last_event_us);
            match self.stage(state, batch, event, at_us, true).map_err(|(e, _)| e) {
                Ok(()) => staged = true,
                Err(Refused::Illegal(e)) => {
                    tracing::error!(error = %e, "a redelivery the state machine refuses (a bug); stopping this run's driver");
                    return Err(EngineError::Transition(e));
                }
                Err(other) => return Err(other.into()),
            }
        }
        Ok(staged)
    }

    /// Stages a `RunSizeWarning` when the run's log is past a size threshold
    /// (`EngineBuilder::size_warning`) that no warning recorded in it has crossed: at most
    /// one per threshold. An observation of the shell, but not kept like an answer: after
    /// a conflicting append it is dropped and decided again on the re-read log (its counts
    /// would be stale). `apply` refuses it on a finished run.
    fn stage_size_warning(&self, state: &mut RunState, batch: &mut Batch, now: i64) -> Result<(), EngineError> {
        if state.status.is_terminal() {
            return Ok(());
        }
        let (events_max, bytes_max) = self.inner.size_warning;
        let (events, bytes) = (state.next_seq.0, state.log_bytes);
        let prior = state.size_warning;
        let events_new = events_max > 0 && events >= events_max && !prior.is_some_and(|w| w.events_crossed());
        let bytes_new = bytes_max > 0 && bytes >= bytes_max && !prior.is_some_and(|w| w.bytes_crossed());
        if !(events_new || bytes_new) {
            return Ok(());
        }
        tracing::warn!(events, bytes, events_max, bytes_max, "run's log is past a size threshold");
        let event = Event::RunSizeWarning { events, bytes, events_max, bytes_max };
        let at_us = now.max(state.last_event_us);
        match self.stage(state, batch, event, at_us, false).map_err(|(e, _)| e) {
            Ok(()) => Ok(()),
            Err(Refused::Illegal(e)) => {
                tracing::error!(error = %e, "a size warning the state machine refuses (a bug); stopping this run's driver");
                Err(EngineError::Transition(e))
            }
            Err(other) => Err(other.into()),
        }
    }

    async fn reload(&self) -> Result<RunState, EngineError> {
        self.inner.load(self.run).await?.ok_or(EngineError::UnknownRun { run: self.run })
    }

    /// Journals `event` (at `at_us`): checked with `apply` and folded into `state`,
    /// encoded within the store's limits, staged in `batch`. On error nothing changed and
    /// the event is handed back.
    // The error hands the event back by value on a rare path; boxing it would allocate.
    #[allow(clippy::result_large_err)]
    fn stage(
        &self,
        state: &mut RunState,
        batch: &mut Batch,
        event: Event,
        at_us: i64,
        answer: bool,
    ) -> Result<(), (Refused, Event)> {
        let before = state.next_seq;
        let kind = event.kind_name();
        let evaluated = matches!(event, Event::TaskEvaluated { .. } | Event::HumanResolved { .. });
        // An answer is kept (a conflicting append stages it again); a decision is not, so
        // its fields move into the state.
        let kept = answer.then(|| event.clone());
        let status_before = state.status;
        let record = self.inner.journal.check(state, event, at_us)?;
        batch.base_status.get_or_insert(status_before);
        tracing::debug!(seq = before.0, kind, "stage");
        batch.base.get_or_insert(before);
        batch.records.push(record);
        batch.evaluated |= evaluated;
        if let Some(event) = kept {
            batch.answers.push(event);
        }
        Ok(())
    }

    /// Stages an effect's answer if it is still legal (an output too large to record
    /// becomes a semantic failure, a plan too large a rejection).
    fn absorb(&mut self, state: &mut RunState, batch: &mut Batch, o: Outcome) -> Result<(), EngineError> {
        if self.inflight.get(&o.key).map(|f| f.id) != Some(o.id) {
            tracing::info!(effect = ?o.key, "discarding a late answer (the call was timed out or cut)");
            return Ok(());
        }
        self.inflight.remove(&o.key);
        self.record_answer(state, batch, o.key, &o.effect, o.answer)
    }

    fn record_answer(
        &mut self,
        state: &mut RunState,
        batch: &mut Batch,
        key: EffectKey,
        effect: &Command,
        answer: Answer,
    ) -> Result<(), EngineError> {
        let Some(event) = event_of(state, &self.inner.ctx, effect, answer) else {
            if let EffectKey::Notify(n) = key {
                self.unnotifiable.insert(n);
            }
            return Ok(());
        };
        let event = oversize::within_output_limits(state, event, &self.inner.limits);
        self.stage_answer(state, batch, event)
    }

    /// Records a timeout for every call past the driver's own timer (its thread may be
    /// blocked: the call's own timeout could not fire); its task is aborted and a late
    /// answer discarded.
    fn expire(&mut self, state: &mut RunState, batch: &mut Batch) -> Result<(), EngineError> {
        let now = tokio::time::Instant::now();
        let due: Vec<EffectKey> =
            self.inflight.iter().filter(|(_, f)| f.until <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            let Some(f) = self.inflight.remove(&key) else { continue };
            tracing::warn!(effect = ?key, "call did not answer in time (its thread may be blocked): recording a timeout");
            if let Some(a) = &f.abort {
                a.abort();
            }
            let answer = effects::timed_out(&self.inner, &f.effect, f.task_timeout_ms);
            self.record_answer(state, batch, key, &f.effect, answer)?;
        }
        Ok(())
    }

    /// Once the run's deadline is recorded, handler and evaluator calls still in flight
    /// are cut: aborted, and recorded as failed attempts (`effects::CUT_AT_DEADLINE`), so
    /// the run finishes at its deadline instead of when their timeouts end.
    fn cut_at_deadline(&mut self, state: &mut RunState, batch: &mut Batch) -> Result<(), EngineError> {
        if state.exhausted != Some(BudgetKind::Deadline) {
            return Ok(());
        }
        let cut: Vec<EffectKey> = self
            .inflight
            .iter()
            .filter(|(_, f)| effects::cut_at_deadline(&f.effect).is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in cut {
            let Some(f) = self.inflight.remove(&key) else { continue };
            if let Some(a) = &f.abort {
                a.abort();
            }
            if let Some(answer) = effects::cut_at_deadline(&f.effect) {
                tracing::info!(effect = ?key, "run deadline: cutting a call in flight");
                self.record_answer(state, batch, key, &f.effect, answer)?;
            }
        }
        Ok(())
    }

    /// Stages the answers of a batch that conflicted again, on top of the re-read log.
    fn restage(&mut self, state: &mut RunState, batch: &mut Batch, answers: Vec<Event>) -> Result<(), EngineError> {
        for event in answers {
            self.stage_answer(state, batch, event)?;
        }
        Ok(())
    }

    /// Stages an answer; one the state machine no longer accepts (the run was cancelled or
    /// moved on) is dropped; one too large to record becomes what the core can act on (an
    /// output: a semantic failure; a plan: a rejection).
    fn stage_answer(&mut self, state: &mut RunState, batch: &mut Batch, event: Event) -> Result<(), EngineError> {
        let mut event = event;
        loop {
            let at_us = self.inner.clock.now_us().max(state.last_event_us);
            let kind = event.kind_name();
            let (refused, back) = match self.stage(state, batch, event, at_us, true) {
                Ok(()) => return Ok(()),
                Err(x) => x,
            };
            match refused {
                Refused::Illegal(e) => {
                    tracing::info!(kind, reason = %e, "dropping a result that is no longer legal (run cancelled or moved on)");
                    return Ok(());
                }
                Refused::TooLarge(what, bytes, max) => {
                    let reason = format!("{what} of {bytes} bytes exceeds the limit of {max}");
                    tracing::warn!(kind, %reason, "result too large to record");
                    event = match too_large_answer(back, &reason) {
                        Some(e) => e,
                        None => return Err(Refused::TooLarge(what, bytes, max).into()),
                    };
                }
                other @ Refused::Encode(_) => return Err(other.into()),
            }
        }
    }

    /// Appends the staged batch through the journal (one durable append, and a snapshot if
    /// one is due). `state` already includes the batch.
    async fn commit(&mut self, state: &mut RunState, batch: &mut Batch) -> Result<Committed, EngineError> {
        let records = std::mem::take(&mut batch.records);
        let answers = std::mem::take(&mut batch.answers);
        let evaluated = std::mem::take(&mut batch.evaluated);
        let expected = batch.base.take().unwrap_or(state.next_seq);
        let before = batch.base_status.take().unwrap_or(state.status);
        match self.inner.journal.append_as(Some(before), state, expected, records, None, self.held.clone()).await {
            Ok(()) => {
                if evaluated {
                    self.fill_cache(state);
                }
                Ok(Committed::Ok)
            }
            Err(EngineError::Store(StoreError::Conflict { .. })) => Ok(Committed::Conflict(answers)),
            Err(e) => Err(e),
        }
    }

    fn fill_cache(&mut self, state: &RunState) {
        let revision = state.revision.unwrap_or(0);
        for t in &state.tasks {
            if t.spec.cacheable && t.status == TaskStatus::Done && !t.cached && t.output.is_some() {
                if !self.filled.insert((revision, t.spec.id.clone(), t.attempt)) {
                    continue;
                }
                if let (Some(input), Some(output)) = (&t.input, &t.output) {
                    let key = ResponseCache::key(&t.spec.handler, t.model.as_deref(), input);
                    self.inner.cache.insert(key, output.clone());
                }
            }
        }
    }

    /// Spawns an effect unless it is already in flight.
    fn start(&mut self, cmd: Command, state: &RunState, reg: &Arc<Registered>, tx: &mpsc::UnboundedSender<Outcome>) {
        let key = match &cmd {
            Command::Plan { revision } => EffectKey::Plan(*revision),
            Command::Execute { task, attempt } => EffectKey::Execute(task.clone(), *attempt),
            Command::Evaluate { task, attempt } => EffectKey::Evaluate(task.clone(), *attempt),
            Command::Notify { number } => EffectKey::Notify(*number),
            Command::Record { .. } => return,
        };
        if self.inflight.contains_key(&key) {
            return;
        }
        if let EffectKey::Notify(n) = key {
            if self.unnotifiable.contains(&n) {
                return;
            }
        }
        let effect = cmd.clone();
        // Past the run's deadline a handler or evaluator is not called at all: its attempt
        // is recorded as cut.
        if state.exhausted == Some(BudgetKind::Deadline) {
            if let Some(answer) = effects::cut_at_deadline(&effect) {
                let _ = tx.send(Outcome {
                    key: key.clone(),
                    id: self.flight(key, effect.clone(), 0, None),
                    effect,
                    answer,
                });
                return;
            }
        }
        let mut task_timeout_ms = 0;
        let fut: crate::api::BoxFuture<Answer> = match cmd {
            Command::Plan { revision } => {
                Box::pin(effects::plan(self.inner.clone(), reg.clone(), state.clone(), revision))
            }
            Command::Execute { task, attempt } => {
                let Some(call) = self.task_call(state, &task, attempt) else { return };
                // A cache hit runs no user code: answered here, without a call.
                if let Some(answer) = effects::cached(&self.inner, call.2.as_deref()) {
                    let _ = tx.send(Outcome {
                        key: key.clone(),
                        id: self.flight(key, effect.clone(), 0, None),
                        effect,
                        answer,
                    });
                    return;
                }
                task_timeout_ms = call.0.timeout_ms;
                let span =
                    tracing::info_span!("task", task = %task, attempt, seq = state.next_seq.0, handler = %call.1);
                Box::pin(effects::execute(self.inner.clone(), call.0).instrument(span))
            }
            Command::Evaluate { task, attempt } => {
                let Some(t) = state.task_index.get(&task).and_then(|&i| state.tasks.get(i)) else { return };
                let req = EvalRequest {
                    run: self.run,
                    workflow: state.workflow.clone(),
                    run_input: state.input.clone(),
                    seed: state.seed,
                    task: t.spec.clone(),
                    attempt,
                    output: t.output.clone().unwrap_or_else(Json::null),
                    model: state.evaluator_model.clone(),
                };
                task_timeout_ms = t.spec.timeout_ms;
                let span = tracing::info_span!("evaluate", task = %task, attempt, seq = state.next_seq.0);
                Box::pin(effects::evaluate(reg.clone(), req, t.spec.timeout_ms).instrument(span))
            }
            Command::Notify { number } => {
                let Some(e) = state.escalations.iter().find(|e| e.escalation.number == number) else { return };
                Box::pin(effects::notify(
                    self.inner.clone(),
                    self.run,
                    state.workflow.clone(),
                    state.input.clone(),
                    e.escalation.clone(),
                ))
            }
            Command::Record { .. } => return,
        };
        self.launch(key, effect, fut, task_timeout_ms, tx);
    }

    /// Marks a call in flight (its driver-side timer starts now); returns its id.
    fn flight(
        &mut self,
        key: EffectKey,
        effect: Command,
        task_timeout_ms: u64,
        abort: Option<tokio::task::AbortHandle>,
    ) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let bound = Duration::from_millis(effects::bound_ms(&self.inner, &effect, task_timeout_ms));
        let until = tokio::time::Instant::now() + bound;
        self.inflight.insert(key, Flight { id, effect, until, task_timeout_ms, abort });
        id
    }

    /// Runs an effect's future on the call pool (never on the driver's task: a callee
    /// that blocks its thread cannot hold the driver, whose own timer bounds the call) and
    /// marks it in flight.
    fn launch(
        &mut self,
        key: EffectKey,
        effect: Command,
        fut: crate::api::BoxFuture<Answer>,
        task_timeout_ms: u64,
        tx: &mpsc::UnboundedSender<Outcome>,
    ) {
        // Finished calls leave their (empty) results in the set: reap them.
        while self.effects.try_join_next().is_some() {}
        let id = self.flight(key.clone(), effect.clone(), task_timeout_ms, None);
        let tx = tx.clone();
        let k = key.clone();
        let call = async move {
            let answer = fut.await;
            let _ = tx.send(Outcome { key, id, effect, answer });
        }
        .instrument(self.span.clone());
        let abort = self.inner.calls.spawn(&mut self.effects, call);
        if let (Some(f), Some(a)) = (self.inflight.get_mut(&k), abort) {
            f.abort = Some(a);
        }
    }

    /// The call recorded by the task's `TaskDispatched`: (call, handler name, cache key).
    fn task_call(&self, state: &RunState, task: &TaskId, attempt: u32) -> Option<(TaskCall, String, Option<String>)> {
        let Some(t) = state.task_index.get(task).and_then(|&i| state.tasks.get(i)) else {
            tracing::error!(%task, "Execute for a task not in the plan");
            return None;
        };
        if t.attempt != attempt {
            tracing::error!(%task, attempt, recorded = t.attempt, "Execute for an attempt that is not the recorded dispatch");
            return None;
        }
        let input = t.input.clone().unwrap_or_else(|| TaskInput {
            input: t.spec.input.clone(),
            upstream: BTreeMap::new(),
            note: None,
            skipped: Vec::new(),
        });
        let cache_key = t.spec.cacheable.then(|| ResponseCache::key(&t.spec.handler, t.model.as_deref(), &input));
        let call = TaskCall {
            run: self.run,
            workflow: state.workflow.clone(),
            run_input: state.input.clone(),
            seed: state.seed,
            task: task.clone(),
            handler: t.spec.handler.clone(),
            attempt,
            revision: state.revision.unwrap_or(0),
            effect_key: t.effect_key.clone().unwrap_or_default(),
            attempt_key: t.attempt_key.clone().unwrap_or_default(),
            model: t.model.clone(),
            input,
            timeout_ms: t.spec.timeout_ms,
        };
        Some((call, t.spec.handler.clone(), cache_key))
    }
}

/// What a too-large answer is recorded as: an output becomes a semantic failure of its
/// attempt, a plan a rejection without the plan; `None` for anything else (a bug).
fn too_large_answer(event: Event, reason: &str) -> Option<Event> {
    match event {
        Event::TaskExecuted { task, attempt, usage, .. } => Some(Event::TaskFailed {
            task,
            attempt,
            class: ErrorClass::Semantic,
            error: format!("output too large: {reason}"),
            usage,
            source: FailureSource::Engine,
            note: None,
        }),
        Event::Planned { revision, .. }
        | Event::Replanned { revision, .. }
        | Event::PlanRejected { revision, plan: Some(_), .. } => Some(Event::PlanRejected {
            revision,
            errors: vec![format!("plan too large to record: {reason}")],
            plan: None,
        }),
        _ => None,
    }
}
