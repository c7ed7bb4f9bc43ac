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

use crate::api::{EvalRequest, HandlerError, PlanRequest, TaskCall};
use crate::core::{decide, validate_plan, Command, TransitionError};
use crate::error::EngineError;
use crate::model::event::{Event, Logged, PlanReason};
use crate::model::fsm::{RunStatus, TaskStatus};
use crate::model::state::RunState;
use crate::model::workflow::*;
use crate::shell::cache::ResponseCache;
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
    /// The answer to record; `None`: nothing to record (the sink could not be told).
    event: Option<Event>,
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

/// Why an event could not be staged (the state is unchanged).
enum StageError {
    /// The state machine refuses it.
    Illegal(TransitionError),
    /// Too large to record (`what`, bytes, max).
    TooLarge(&'static str, usize, usize),
    Other(EngineError),
}

enum Committed {
    Ok,
    /// Someone else appended first: re-read the log (staged answers are staged again).
    Conflict(Vec<Event>),
}

impl Driver {
    async fn run(mut self) -> Result<DriveOutcome, EngineError> {
        let run = self.run;
        let mut state = self.inner.load(run).await?.ok_or(EngineError::UnknownRun { run })?;
        self.span.record("workflow", state.workflow.as_str());
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
            let mut effects = Vec::new();
            let mut next_timer: Option<i64>;
            loop {
                effects.clear();
                next_timer = None;
                let mut due_now = Vec::new();
                let mut due_now_at: Option<i64> = None;
                for cmd in decide(&state, &self.inner.ctx) {
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
                    match self.stage(&mut state, &mut batch, event, at_us, false).map_err(|(e, _)| e) {
                        Ok(()) => {}
                        Err(StageError::Illegal(e)) => {
                            tracing::error!(error = %e, "decide produced a record the state machine refuses (a bug); stopping this run's driver");
                            return Err(EngineError::Transition(e));
                        }
                        Err(StageError::TooLarge(what, bytes, max)) => {
                            return Err(EngineError::Store(StoreError::TooLarge { what, bytes, max }))
                        }
                        Err(StageError::Other(e)) => return Err(e),
                    }
                }
                if batch.records.len() >= BATCH_RECORDS_MAX {
                    break;
                }
            }
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

    async fn reload(&self) -> Result<RunState, EngineError> {
        self.inner.load(self.run).await?.ok_or(EngineError::UnknownRun { run: self.run })
    }

    /// Checks `event` (at `at_us`) with `apply`, folds it into `state` and stages it in
    /// `batch`. On error nothing changed and the event is handed back.
    // The error hands the event back by value on a rare path; boxing it would allocate.
    #[allow(clippy::result_large_err)]
    fn stage(
        &self,
        state: &mut RunState,
        batch: &mut Batch,
        event: Event,
        at_us: i64,
        answer: bool,
    ) -> Result<(), (StageError, Event)> {
        let mut logged = Logged { run: self.run, seq: state.next_seq, at_us, event };
        let record = match keel_store::prepare(&logged.event, at_us) {
            Ok(r) => r,
            Err(StoreError::TooLarge { what, bytes, max }) => {
                return Err((StageError::TooLarge(what, bytes, max), logged.event))
            }
            Err(e) => return Err((StageError::Other(e.into()), logged.event)),
        };
        let before = state.next_seq;
        let evaluated = matches!(logged.event, Event::TaskEvaluated { .. } | Event::HumanResolved { .. });
        // An answer is kept (a conflicting append stages it again); a decision is not, so
        // its fields move into the state.
        let kept = answer.then(|| logged.event.clone());
        if let Err(e) = crate::core::apply_take(state, &mut logged) {
            // apply_take changes nothing on error: the event is intact.
            return Err((StageError::Illegal(e), logged.event));
        }
        tracing::debug!(seq = logged.seq.0, kind = logged.event.kind_name(), "stage");
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
        let Some(event) = o.event else {
            if let EffectKey::Notify(n) = o.key {
                self.unnotifiable.insert(n);
            }
            return Ok(());
        };
        self.stage_answer(state, batch, event, None)
    }

    /// Stages the answers of a batch that conflicted again, on top of the re-read log.
    fn restage(&mut self, state: &mut RunState, batch: &mut Batch, answers: Vec<Event>) -> Result<(), EngineError> {
        for event in answers {
            self.stage_answer(state, batch, event, None)?;
        }
        Ok(())
    }

    /// `limit`: a store limit below the default one the batch hit (bytes).
    fn stage_answer(
        &mut self,
        state: &mut RunState,
        batch: &mut Batch,
        event: Event,
        limit: Option<usize>,
    ) -> Result<(), EngineError> {
        let mut event = event;
        loop {
            let at_us = self.inner.clock.now_us().max(state.last_event_us);
            let kind = event.kind_name();
            let too_large = match limit {
                Some(max) => {
                    let bytes = keel_store::codec::encode(&event)?.len();
                    (bytes > max).then_some(("event", bytes, max))
                }
                None => None,
            };
            let res = match too_large {
                Some((what, bytes, max)) => Err((StageError::TooLarge(what, bytes, max), event)),
                None => self.stage(state, batch, event, at_us, true),
            };
            let (err, back) = match res {
                Ok(()) => return Ok(()),
                Err(x) => x,
            };
            event = back;
            match err {
                StageError::Illegal(e) => {
                    tracing::info!(kind, reason = %e, "dropping a result that is no longer legal (run cancelled or moved on)");
                    return Ok(());
                }
                StageError::TooLarge(what, bytes, max) => {
                    let reason = format!("{what} of {bytes} bytes exceeds the limit of {max}");
                    tracing::warn!(kind, %reason, "result too large to record");
                    event = match event {
                        Event::TaskExecuted { task, attempt, usage, .. } => Event::TaskFailed {
                            task,
                            attempt,
                            class: ErrorClass::Semantic,
                            error: format!("output too large: {reason}"),
                            usage,
                        },
                        Event::Planned { revision, .. }
                        | Event::Replanned { revision, .. }
                        | Event::PlanRejected { revision, plan: Some(_), .. } => Event::PlanRejected {
                            revision,
                            errors: vec![format!("plan too large to record: {reason}")],
                            plan: None,
                        },
                        _ => return Err(EngineError::Store(StoreError::TooLarge { what, bytes, max })),
                    };
                }
                StageError::Other(e) => return Err(e),
            }
        }
    }

    /// Appends the staged batch (one durable append) and saves a snapshot if it crossed a
    /// multiple of `snapshot_every`. `state` already includes the batch.
    async fn commit(&mut self, state: &mut RunState, batch: &mut Batch) -> Result<Committed, EngineError> {
        let records = std::mem::take(&mut batch.records);
        let answers = std::mem::take(&mut batch.answers);
        let evaluated = std::mem::take(&mut batch.evaluated);
        let expected = batch.base.take().unwrap_or(state.next_seq);
        let (run, every, head) = (self.run, self.inner.snapshot_every, state.next_seq);
        let snapshot = crate::shell::fold::snapshot_bytes(state, expected, every);
        let res = self
            .inner
            .blocking(move |log| {
                let new_head = log.append(run, expected, records, None)?;
                debug_assert_eq!(new_head.next_seq, head, "store head and folded state disagree");
                if let Some(bytes) = snapshot {
                    crate::shell::fold::save_snapshot(log, run, head, &bytes);
                }
                Ok(())
            })
            .await;
        match res {
            Ok(()) => {
                if evaluated {
                    self.fill_cache(state);
                }
                Ok(Committed::Ok)
            }
            Err(EngineError::Store(StoreError::Conflict { .. })) => Ok(Committed::Conflict(answers)),
            Err(EngineError::Store(StoreError::TooLarge { what: "event", max, .. })) if !answers.is_empty() => {
                // The store's configured limit is below the default one `prepare` checks:
                // re-read, and record the too-large answers as failures.
                *state = self.reload().await?;
                for event in answers {
                    self.stage_answer(state, batch, event, Some(max))?;
                }
                Ok(Committed::Ok)
            }
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
        let fut: crate::api::BoxFuture<Option<Event>> = match cmd {
            Command::Plan { revision } => {
                Box::pin(plan_effect(self.inner.clone(), reg.clone(), state.clone(), revision))
            }
            Command::Execute { task, attempt } => {
                let Some(call) = self.task_call(state, &task, attempt) else { return };
                let span =
                    tracing::info_span!("task", task = %task, attempt, seq = state.next_seq.0, handler = %call.1);
                Box::pin(execute_effect(self.inner.clone(), call.0, call.2).instrument(span))
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
                Box::pin(evaluate_effect(reg.clone(), req, t.spec.timeout_ms).instrument(span))
            }
            Command::Notify { number } => {
                let Some(e) = state.escalations.iter().find(|e| e.escalation.number == number) else { return };
                Box::pin(notify_effect(self.inner.clone(), self.run, e.escalation.clone()))
            }
            Command::Record { .. } => return,
        };
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
            Ok(std::task::Poll::Ready(event)) => {
                let _ = tx.send(Outcome { key, event });
            }
            Ok(std::task::Poll::Pending) => {
                let tx = tx.clone();
                self.effects.spawn(
                    async move {
                        let event = fut.await;
                        let _ = tx.send(Outcome { key, event });
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

fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while cut > 0 && !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Runs a user-supplied call (handler, evaluator, planner, sink) so that a panic, while it
/// builds its future or while the future runs, becomes an error naming it (`on_panic`): a
/// bug in one component ends that attempt with a recorded failure, where before it left
/// the run waiting for an answer that never came.
fn guarded<T: Send + 'static, E: Send + 'static>(
    what: &'static str,
    on_panic: fn(String) -> E,
    make: impl FnOnce() -> crate::api::BoxFuture<Result<T, E>>,
) -> crate::api::BoxFuture<Result<T, E>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(make)) {
        Ok(fut) => Box::pin(CatchPanic { fut, what, on_panic }),
        Err(payload) => {
            let e = on_panic(panic_message(what, payload.as_ref()));
            Box::pin(std::future::ready(Err(e)))
        }
    }
}

fn panic_message(what: &str, payload: &(dyn std::any::Any + Send)) -> String {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    clip(format!("{what} panicked: {detail}"), 2048)
}

/// Polls `fut`, turning a panic into `Err(on_panic(message))`.
struct CatchPanic<T, E> {
    fut: crate::api::BoxFuture<Result<T, E>>,
    what: &'static str,
    on_panic: fn(String) -> E,
}

impl<T, E> std::future::Future for CatchPanic<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.fut.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(payload) => std::task::Poll::Ready(Err((this.on_panic)(panic_message(this.what, payload.as_ref())))),
        }
    }
}

async fn execute_effect(inner: Arc<Inner>, call: TaskCall, cache_key: Option<String>) -> Option<Event> {
    let (task, attempt, timeout_ms) = (call.task.clone(), call.attempt, call.timeout_ms);
    if let Some(k) = &cache_key {
        if let Some(output) = inner.cache.get(k) {
            tracing::debug!("response cache hit");
            return Some(Event::TaskExecuted { task, attempt, output, usage: Usage::default(), cached: true });
        }
    }
    let failed =
        |class, error: String, usage| Some(Event::TaskFailed { task: task.clone(), attempt, class, error, usage });
    let Some(handler) = inner.handlers.get(&call.handler).cloned() else {
        return failed(ErrorClass::Fatal, format!("no handler registered for {:?}", call.handler), Usage::default());
    };
    tracing::debug!(key = %call.idempotency_key, "calling handler");
    let fut = guarded("handler", HandlerError::fatal, || handler.call(call));
    match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
        Err(_) => failed(ErrorClass::Transient, format!("timeout after {timeout_ms} ms"), Usage::default()),
        Ok(Err(HandlerError { class, message, usage })) => {
            failed(class, clip(message, inner.limits.error_bytes_max), usage)
        }
        Ok(Ok(out)) => {
            let output = Json::new(&out.output);
            if output.0.len() > inner.limits.output_bytes_max {
                return failed(
                    ErrorClass::Semantic,
                    format!(
                        "output too large: {} bytes of JSON > max {}",
                        output.0.len(),
                        inner.limits.output_bytes_max
                    ),
                    out.usage,
                );
            }
            Some(Event::TaskExecuted { task, attempt, output, usage: out.usage, cached: false })
        }
    }
}

/// Evaluator transient errors are retried in-process this many times before the attempt
/// is recorded as failed.
const EVAL_TRIES: u32 = 3;

async fn evaluate_effect(reg: Arc<Registered>, req: EvalRequest, timeout_ms: u64) -> Option<Event> {
    let (task, attempt, model) = (req.task.id.clone(), req.attempt, req.model.clone());
    let mut last: Option<HandlerError> = None;
    let mut spent = Usage::default();
    for n in 0..EVAL_TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(20u64 << n)).await;
        }
        let fut = guarded("evaluator", HandlerError::fatal, || reg.wf.evaluator.evaluate(req.clone()));
        let res = tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await;
        match res {
            Ok(Ok(ev)) => {
                let usage = Usage {
                    cost_micros: spent.cost_micros.saturating_add(ev.usage.cost_micros),
                    tokens: spent.tokens.saturating_add(ev.usage.tokens),
                };
                return Some(Event::TaskEvaluated {
                    task,
                    attempt,
                    verdict: ev.verdict,
                    notes: ev.notes,
                    model,
                    usage,
                });
            }
            Ok(Err(e)) if e.class == ErrorClass::Transient => {
                spent.cost_micros = spent.cost_micros.saturating_add(e.usage.cost_micros);
                spent.tokens = spent.tokens.saturating_add(e.usage.tokens);
                tracing::debug!(error = %e.message, try_ = n + 1, "evaluator transient error");
                last = Some(e);
            }
            Ok(Err(e)) => {
                spent.cost_micros = spent.cost_micros.saturating_add(e.usage.cost_micros);
                spent.tokens = spent.tokens.saturating_add(e.usage.tokens);
                return Some(Event::TaskFailed {
                    task,
                    attempt,
                    class: e.class,
                    error: format!("evaluator: {}", clip(e.message, 2048)),
                    usage: spent,
                });
            }
            Err(_) => last = Some(HandlerError::transient(format!("timeout after {timeout_ms} ms"))),
        }
    }
    let msg = last.map(|e| e.message).unwrap_or_default();
    Some(Event::TaskFailed {
        task,
        attempt,
        class: ErrorClass::Transient,
        error: format!("evaluator: {}", clip(msg, 2048)),
        usage: spent,
    })
}

/// Sink failures are retried in-process this many times; after that the escalation is
/// asked about again on the run's next drive.
const NOTIFY_TRIES: u32 = 5;

async fn notify_effect(inner: Arc<Inner>, run: RunId, esc: crate::model::event::Escalation) -> Option<Event> {
    let number = esc.number;
    for n in 0..NOTIFY_TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(25u64 << n)).await;
        }
        match guarded("escalation sink", |m| m, || inner.sink.notify(run, esc.clone())).await {
            Ok(()) => return Some(Event::EscalationNotified { number }),
            Err(e) => tracing::warn!(number, error = %e, "escalation sink failed"),
        }
    }
    None
}

/// Planner transient errors are retried in-process this many times.
const PLAN_TRIES: u32 = 3;

async fn plan_effect(inner: Arc<Inner>, reg: Arc<Registered>, state: RunState, revision: u32) -> Option<Event> {
    let previous = state
        .revision
        .map(|_| Plan { tasks: state.tasks.iter().map(|t| t.spec.clone()).collect(), rationale: String::new() });
    let req = PlanRequest {
        run: state.run,
        workflow: state.workflow.clone(),
        input: state.input.clone(),
        seed: state.seed,
        revision,
        reason: state.planning_reason.clone().unwrap_or(PlanReason::Initial),
        previous,
    };
    let timeout_ms = inner.limits.planner_timeout_ms;
    let mut result = Err(HandlerError::transient("planner not called"));
    for n in 0..PLAN_TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(20u64 << n)).await;
        }
        let fut = guarded("planner", HandlerError::fatal, || reg.wf.planner.plan(req.clone()));
        result = match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
            Ok(r) => r,
            Err(_) => Err(HandlerError::transient(format!("planner timeout after {timeout_ms} ms"))),
        };
        match &result {
            Err(e) if e.class == ErrorClass::Transient => continue,
            _ => break,
        }
    }
    let plan = match result {
        Ok(p) => p,
        Err(e) => {
            return Some(Event::PlanRejected {
                revision,
                errors: vec![format!("planner: {}", clip(e.message, 2048))],
                plan: None,
            });
        }
    };
    let errors = validate_plan(&plan, &state, &inner.ctx);
    if !errors.is_empty() {
        tracing::info!(revision, errors = errors.len(), "plan rejected by validation");
        return Some(Event::PlanRejected { revision, errors, plan: Some(plan) });
    }
    if state.revision.is_none() {
        return Some(Event::Planned { revision, plan });
    }
    let (carried_over, superseded) = crate::core::replan_outcome(&state, &plan);
    Some(Event::Replanned { revision, plan, carried_over, superseded })
}
