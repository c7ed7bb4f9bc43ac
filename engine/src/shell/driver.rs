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
    /// The driver stopped on an error (store failure, or a bug: an illegal record).
    Stopped(String),
    /// The workers were shut down.
    Shutdown,
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
    /// The command the call answers.
    effect: Command,
    answer: Answer,
}

/// Wait slice: a sleep re-checks the injected clock at least this often (a test's fake
/// clock may jump).
const WAIT_SLICE_MS: i64 = 200;

pub(crate) async fn drive(
    inner: Arc<Inner>,
    run: RunId,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> DriveOutcome {
    let span = tracing::info_span!("run", %run, workflow = tracing::field::Empty);
    let d = Driver {
        inner,
        run,
        wake,
        stop,
        effects: JoinSet::new(),
        inflight: BTreeSet::new(),
        unnotifiable: BTreeSet::new(),
        filled: BTreeSet::new(),
        span: span.clone(),
        noop_waker: std::task::Waker::from(Arc::new(NoopWake)),
    };
    async move {
        match d.run().await {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(error = %e, "driver stopped");
                DriveOutcome::Stopped(e.to_string())
            }
        }
    }
    .instrument(span)
    .await
}

struct Driver {
    inner: Arc<Inner>,
    run: RunId,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
    /// Spawned effects; dropping the set aborts whatever is still running.
    effects: JoinSet<()>,
    inflight: BTreeSet<EffectKey>,
    /// Escalations the sink could not be told about during this drive (asked again on the
    /// next drive: at-least-once across restarts).
    unnotifiable: BTreeSet<u32>,
    /// Cache entries already filled from this run: (revision, task, attempt).
    filled: BTreeSet<(u32, TaskId, u32)>,
    span: tracing::Span,
    /// Waker of the first, inline poll of an effect (see `start`).
    noop_waker: std::task::Waker,
}

/// Wakes nothing: an effect still pending after its inline poll is polled again by its
/// own task at once.
struct NoopWake;

impl std::task::Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// Events checked with `apply` (already folded into the driver's state) and encoded,
/// waiting to be appended as one batch.
#[derive(Default)]
struct Batch {
    /// Next seq of the durable log (the `expected` of the append).
    base: Option<Seq>,
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

impl Driver {
    async fn run(mut self) -> Result<DriveOutcome, EngineError> {
        let mut state = self.reload().await?;
        self.span.record("workflow", state.workflow.as_str());
        let reg = self.registration(&state)?;
        self.inner.cache.fill_from(&state);
        let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
        let mut batch = Batch::default();
        loop {
            if *self.stop.borrow() {
                return Ok(DriveOutcome::Shutdown);
            }
            // Answers that already arrived join this batch.
            while let Ok(o) = rx.try_recv() {
                self.absorb(&mut state, &mut batch, o)?;
            }
            if state.status.is_terminal() && batch.is_empty() {
                if !self.inflight.is_empty() {
                    tracing::info!(inflight = self.inflight.len(), status = ?state.status, "run is terminal: dropping in-flight calls");
                }
                return Ok(DriveOutcome::Idle(state.status));
            }
            // Decide until nothing more is due now, staging each call's due records in
            // order. Future-dated records (retry backoffs, the run deadline, an
            // escalation's default) are timers: wait for the earliest (or for an answer),
            // then decide again.
            let now = self.inner.clock.now_us();
            let (effects, next_timer) = self.decide_and_stage(&mut state, &mut batch, now)?;
            if !batch.is_empty() {
                match self.commit(&mut state, &mut batch).await? {
                    Committed::Ok => {}
                    Committed::Conflict(answers) => {
                        state = self.reload().await?;
                        self.restage(&mut state, &mut batch, answers)?;
                    }
                }
                continue;
            }
            // The state is durable: start what it asks for.
            for effect in effects {
                self.start(effect, &state, &reg, &tx);
            }
            if let Some(t) = next_timer {
                if state.status == RunStatus::AwaitingHuman && self.inflight.is_empty() {
                    return Ok(DriveOutcome::Parked { until_us: t });
                }
                let ms = u64::try_from(((t - now) / 1000).clamp(1, WAIT_SLICE_MS)).unwrap_or(1);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    Some(o) = rx.recv() => self.absorb(&mut state, &mut batch, o)?,
                    _ = self.wake.notified() => state = self.reload().await?,
                    _ = self.stop.changed() => return Ok(DriveOutcome::Shutdown),
                }
                continue;
            }
            if self.inflight.is_empty() {
                return Ok(DriveOutcome::Idle(state.status));
            }
            tokio::select! {
                Some(o) = rx.recv() => self.absorb(&mut state, &mut batch, o)?,
                _ = self.wake.notified() => state = self.reload().await?,
                _ = self.stop.changed() => return Ok(DriveOutcome::Shutdown),
            }
        }
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
        &self,
        state: &mut RunState,
        batch: &mut Batch,
        now: i64,
    ) -> Result<(Vec<Command>, Option<i64>), EngineError> {
        let mut effects = Vec::new();
        let mut next_timer: Option<i64>;
        loop {
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
                break;
            }
            let at_us = now.max(state.last_event_us).max(due_now_at.unwrap_or(i64::MIN));
            for event in due_now {
                let kind = event.kind_name();
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
        let record = self.inner.journal.check(state, event, at_us)?;
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
        self.inflight.remove(&o.key);
        let Some(event) = event_of(state, &self.inner.ctx, &o.effect, o.answer) else {
            if let EffectKey::Notify(n) = o.key {
                self.unnotifiable.insert(n);
            }
            return Ok(());
        };
        let event = oversize::within_output_limits(state, event, &self.inner.limits);
        self.stage_answer(state, batch, event)
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
        match self.inner.journal.append(state, expected, records, None).await {
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
        if self.inflight.contains(&key) {
            return;
        }
        if let EffectKey::Notify(n) = key {
            if self.unnotifiable.contains(&n) {
                return;
            }
        }
        let effect = cmd.clone();
        let fut: crate::api::BoxFuture<Answer> = match cmd {
            Command::Plan { revision } => {
                Box::pin(effects::plan(self.inner.clone(), reg.clone(), state.clone(), revision))
            }
            Command::Execute { task, attempt } => {
                let Some(call) = self.task_call(state, &task, attempt) else { return };
                let span =
                    tracing::info_span!("task", task = %task, attempt, seq = state.next_seq.0, handler = %call.1);
                Box::pin(effects::execute(self.inner.clone(), call.0, call.2).instrument(span))
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
                let span = tracing::info_span!("evaluate", task = %task, attempt, seq = state.next_seq.0);
                Box::pin(effects::evaluate(reg.clone(), req, t.spec.timeout_ms).instrument(span))
            }
            Command::Notify { number } => {
                let Some(e) = state.escalations.iter().find(|e| e.escalation.number == number) else { return };
                Box::pin(effects::notify(self.inner.clone(), self.run, e.escalation.clone()))
            }
            Command::Record { .. } => return,
        };
        self.launch(key, effect, fut, tx);
    }

    /// Runs an effect's future: marks it in flight, polls it once inline, and spawns it
    /// if it has to wait.
    fn launch(
        &mut self,
        key: EffectKey,
        effect: Command,
        fut: crate::api::BoxFuture<Answer>,
        tx: &mpsc::UnboundedSender<Outcome>,
    ) {
        self.inflight.insert(key.clone());
        // Poll the effect once here: one that is ready at once (a cache hit, a handler
        // that answers without waiting) sends its answer without a task to spawn and wake
        // (two thread hand-offs per step on a multi-thread runtime, most of what a durable
        // step cost outside the store; docs/PERFORMANCE.md). One that waits is spawned
        // and polled again there, which hands it that task's waker (futures must wake
        // the waker of their latest poll). User calls inside are `guarded` (a panic is a
        // recorded failure); a panic here anyway ends the effect without an answer, as in
        // a spawned task.
        let mut fut = fut;
        let mut cx = std::task::Context::from_waker(&self.noop_waker);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
            Ok(std::task::Poll::Ready(answer)) => {
                let _ = tx.send(Outcome { key, effect, answer });
            }
            Ok(std::task::Poll::Pending) => {
                let tx = tx.clone();
                self.effects.spawn(
                    async move {
                        let answer = fut.await;
                        let _ = tx.send(Outcome { key, effect, answer });
                    }
                    .instrument(self.span.clone()),
                );
            }
            Err(_) => tracing::error!(effect = ?key, "effect panicked; it ends without an answer"),
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
            idempotency_key: t.idempotency_key.clone().unwrap_or_default(),
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
