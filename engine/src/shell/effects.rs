//! The calls out of the engine: the planner, a task's handler, the evaluator and the
//! escalation sink. Each runs under a timeout and a panic guard, retries what the engine
//! retries in-process (planner and evaluator transient errors, sink failures), and hands
//! back an [`Answer`]; the driver turns it into the event that records it with the core's
//! [`crate::core::event_of`].

use crate::api::{EscalationContext, EvalRequest, HandlerError, PlanRequest, Resolver, TaskCall};
use crate::core::{Answer, Command, Failure, Judgement, Output};
use crate::model::event::{Escalation, PlanReason};
use crate::model::state::RunState;
use crate::model::workflow::{ErrorClass, Json, Plan, Usage};
use crate::shell::runtime::{Inner, Registered};
use keel_store::RunId;
use std::sync::Arc;
use std::time::Duration;

/// Bytes kept of a planner's or evaluator's error message.
const MESSAGE_BYTES_MAX: usize = 2048;

/// Cuts `s` to at most `max` bytes (on a char boundary), marking the cut with "...".
pub(crate) fn clip(mut s: String, max: usize) -> String {
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

impl From<HandlerError> for Failure {
    fn from(e: HandlerError) -> Self {
        Failure { class: e.class, message: e.message, usage: e.usage }
    }
}

/// A panic of a planner, handler or evaluator, as the error its call returns.
fn panicked(what: &'static str, detail: String) -> HandlerError {
    let f = Failure::panicked(what, &detail);
    HandlerError { class: f.class, message: clip(f.message, MESSAGE_BYTES_MAX), usage: f.usage }
}

/// Runs a user-supplied call (handler, evaluator, planner, sink) so that a panic, while it
/// builds its future or while the future runs, becomes an error naming it (`on_panic`
/// gets what panicked and the panic's message): a bug in one component ends that attempt
/// with a recorded failure, where before it left the run waiting for an answer that never
/// came.
fn guarded<T: Send + 'static, E: Send + 'static>(
    what: &'static str,
    on_panic: fn(&'static str, String) -> E,
    make: impl FnOnce() -> crate::api::BoxFuture<Result<T, E>>,
) -> crate::api::BoxFuture<Result<T, E>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(make)) {
        Ok(fut) => Box::pin(CatchPanic { fut, what, on_panic }),
        Err(payload) => {
            let e = on_panic(what, panic_detail(payload.as_ref()));
            Box::pin(std::future::ready(Err(e)))
        }
    }
}

fn panic_detail(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Polls `fut`, turning a panic into `Err(on_panic(what, message))`.
struct CatchPanic<T, E> {
    fut: crate::api::BoxFuture<Result<T, E>>,
    what: &'static str,
    on_panic: fn(&'static str, String) -> E,
}

impl<T, E> std::future::Future for CatchPanic<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.fut.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(payload) => std::task::Poll::Ready(Err((this.on_panic)(this.what, panic_detail(payload.as_ref())))),
        }
    }
}

/// The response cache's answer to a task, if it has one (no user code runs: the driver
/// asks it inline, before spawning a call).
pub(crate) fn cached(inner: &Inner, cache_key: Option<&str>) -> Option<Answer> {
    let output = inner.cache.get(cache_key?)?;
    tracing::debug!("response cache hit");
    Some(Answer::Output(Ok(Output { output, usage: Usage::default(), cached: true })))
}

/// Calls the task's handler: its output, or why not. An output nested deeper than
/// `JSON_DEPTH_MAX` is refused (`json_too_deep`) before anything recursive touches it.
pub(crate) async fn execute(inner: Arc<Inner>, call: TaskCall) -> Answer {
    let timeout_ms = call.timeout_ms;
    let Some(handler) = inner.handlers.get(&call.handler).cloned() else {
        return Answer::EngineFailure(Failure {
            class: ErrorClass::Fatal,
            message: format!("no handler registered for {:?}", call.handler),
            usage: Usage::default(),
        });
    };
    tracing::debug!(effect_key = %call.effect_key, attempt_key = %call.attempt_key, "calling handler");
    let fut = guarded("handler", panicked, || handler.call(call));
    match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
        Err(_) => Answer::Output(Err(Failure::timed_out(timeout_ms))),
        Ok(Err(e)) => {
            let mut f = Failure::from(e);
            f.message = clip(f.message, inner.limits.error_bytes_max);
            Answer::Output(Err(f))
        }
        Ok(Ok(out)) => recorded_output(out),
    }
}

/// A handler's output as it is recorded: refused (a failure of the engine's, with a stable
/// code) if it nests too deep or is too large.
fn recorded_output(out: crate::api::TaskOutput) -> Answer {
    let value = match keel_store::json::accept(out.output) {
        Ok(v) => v,
        Err(_) => return Answer::EngineFailure(too_deep(out.usage)),
    };
    // Size limits: checked by the driver before the answer is staged (shell/oversize.rs).
    let output = Json::new(&value);
    Answer::Output(Ok(Output { output, usage: out.usage, cached: false }))
}

/// An output nested deeper than `JSON_DEPTH_MAX`: a semantic failure (the approach
/// produced something keel cannot record and read back) whose message is the stable code
/// `json_too_deep`.
fn too_deep(usage: Usage) -> Failure {
    Failure { class: ErrorClass::Semantic, message: keel_store::json::JsonTooDeep::CODE.to_owned(), usage }
}

/// Evaluator transient errors are retried in-process this many times before the attempt
/// is recorded as failed.
const EVAL_TRIES: u32 = 3;

/// Calls the evaluator on a task's output, retrying transient errors and timeouts; the
/// usage of every try counts.
pub(crate) async fn evaluate(reg: Arc<Registered>, req: EvalRequest, timeout_ms: u64) -> Answer {
    let mut last = Failure::timed_out(timeout_ms);
    let mut spent = Usage::default();
    for n in 0..EVAL_TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(retry_backoff_ms(n))).await;
        }
        let fut = guarded("evaluator", panicked, || reg.wf.evaluator.evaluate(req.clone()));
        let failure = match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
            Ok(Ok(ev)) => {
                let usage = add(spent, ev.usage);
                return Answer::Evaluation(Ok(Judgement { verdict: ev.verdict, notes: ev.notes, usage }));
            }
            Ok(Err(e)) => Failure::from(e),
            Err(_) => Failure::timed_out(timeout_ms),
        };
        spent = add(spent, failure.usage);
        let transient = failure.class == ErrorClass::Transient;
        last = Failure { message: clip(failure.message, MESSAGE_BYTES_MAX), usage: spent, ..failure };
        if !transient {
            break;
        }
        tracing::debug!(error = %last.message, try_ = n + 1, "evaluator transient error");
    }
    Answer::Evaluation(Err(last))
}

fn add(a: Usage, b: Usage) -> Usage {
    Usage { cost_micros: a.cost_micros.saturating_add(b.cost_micros), tokens: a.tokens.saturating_add(b.tokens) }
}

/// Sink failures are retried in-process this many times; after that the escalation is
/// asked about again on the run's next drive.
const NOTIFY_TRIES: u32 = 5;

/// Tells the escalation sink about `esc` of `run` (workflow type `workflow`, request
/// `input`), with a resolver for it: errors are retried, each try runs under
/// `ShellLimits::sink_timeout_ms`, and a timeout ends this drive's attempt (a hung sink
/// holds a driver for one timeout, not five).
pub(crate) async fn notify(inner: Arc<Inner>, run: RunId, workflow: String, input: Json, esc: Escalation) -> Answer {
    let number = esc.number;
    let timeout_ms = inner.limits.sink_timeout_ms;
    let target: std::sync::Weak<dyn crate::api::ResolveTarget> = Arc::downgrade(&inner) as _;
    let ctx = EscalationContext {
        run,
        workflow,
        input_digest: input_digest(&input),
        input,
        escalation: esc,
        resolver: Resolver::new(run, number, target),
    };
    for n in 0..NOTIFY_TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(notify_backoff_ms(n))).await;
        }
        let on_panic = |what: &'static str, detail: String| format!("{what} panicked: {detail}");
        let fut = guarded("escalation sink", on_panic, || inner.sink.notify(ctx.clone()));
        match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
            Ok(Ok(())) => return Answer::Notified,
            Ok(Err(e)) => tracing::warn!(number, error = %e, "escalation sink failed"),
            Err(_) => {
                tracing::warn!(number, timeout_ms, "escalation sink timed out");
                break;
            }
        }
    }
    Answer::NotNotified
}

fn notify_backoff_ms(n: u32) -> u64 {
    25u64 << n
}

/// Backoff before in-process try `n` (1-based) of the planner and the evaluator.
fn retry_backoff_ms(n: u32) -> u64 {
    20u64 << n
}

/// Slack the driver's own timer gives a call beyond its longest legitimate duration, so a
/// callee that does not block is timed out by its own timeout first (same answer).
const DRIVER_GRACE_MS: u64 = 100;

/// How long the driver waits for `effect`'s answer before it records a timeout itself:
/// every in-process try under its timeout, the backoffs between them, and a grace
/// (`DRIVER_GRACE_MS`). This holds even when the callee blocks its thread.
pub(crate) fn bound_ms(inner: &Inner, effect: &Command, task_timeout_ms: u64) -> u64 {
    let tries = |n: u32, each: u64, backoff: fn(u32) -> u64| -> u64 {
        let waits: u64 = (1..n).map(backoff).sum();
        each.saturating_mul(u64::from(n)).saturating_add(waits)
    };
    let ms = match effect {
        Command::Execute { .. } => task_timeout_ms,
        Command::Evaluate { .. } => tries(EVAL_TRIES, task_timeout_ms, retry_backoff_ms),
        Command::Plan { .. } => tries(PLAN_TRIES, inner.limits.planner_timeout_ms, retry_backoff_ms),
        Command::Notify { .. } => tries(NOTIFY_TRIES, inner.limits.sink_timeout_ms, notify_backoff_ms),
        Command::Record { .. } => 0,
    };
    ms.saturating_add(DRIVER_GRACE_MS)
}

/// What the driver records for `effect` when its own timer fires first (the call blocked
/// its thread, or hung): the call's timeout, as the call would have reported it.
pub(crate) fn timed_out(inner: &Inner, effect: &Command, task_timeout_ms: u64) -> Answer {
    match effect {
        Command::Execute { .. } => Answer::Output(Err(Failure::timed_out(task_timeout_ms))),
        Command::Evaluate { .. } => Answer::Evaluation(Err(Failure::timed_out(task_timeout_ms))),
        Command::Plan { .. } => Answer::Plan(Err(Failure {
            class: ErrorClass::Transient,
            message: format!("planner timeout after {} ms", inner.limits.planner_timeout_ms),
            usage: Usage::default(),
        })),
        Command::Notify { .. } | Command::Record { .. } => Answer::NotNotified,
    }
}

/// The message of a call cut at the run's deadline.
pub(crate) const CUT_AT_DEADLINE: &str = "cut at the run's deadline";

/// What the driver records for a call in flight when the run's deadline falls: the
/// handler's or evaluator's attempt failed (transient; the exhausted deadline allows no
/// retry). `None` for calls whose answer is not recorded as a task failure (the planner:
/// the run fails at its deadline while planning; the sink).
pub(crate) fn cut_at_deadline(effect: &Command) -> Option<Answer> {
    let f = Failure { class: ErrorClass::Transient, message: CUT_AT_DEADLINE.to_owned(), usage: Usage::default() };
    match effect {
        Command::Execute { .. } => Some(Answer::EngineFailure(f)),
        Command::Evaluate { .. } => Some(Answer::Evaluation(Err(f))),
        _ => None,
    }
}

/// Hex SHA-256 of a request input's canonical JSON (`EscalationContext::input_digest`).
fn input_digest(input: &Json) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(input.0.as_bytes()))
}

/// Planner transient errors are retried in-process this many times.
const PLAN_TRIES: u32 = 3;

/// Asks the planner for plan `revision` of the run in `state` (validation is the core's,
/// when the answer is recorded).
pub(crate) async fn plan(inner: Arc<Inner>, reg: Arc<Registered>, state: RunState, revision: u32) -> Answer {
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
            tokio::time::sleep(Duration::from_millis(retry_backoff_ms(n))).await;
        }
        let fut = guarded("planner", panicked, || reg.wf.planner.plan(req.clone()));
        result = match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
            Ok(r) => r,
            Err(_) => Err(HandlerError::transient(format!("planner timeout after {timeout_ms} ms"))),
        };
        match &result {
            Err(e) if e.class == ErrorClass::Transient => continue,
            _ => break,
        }
    }
    Answer::Plan(result.map_err(|e| {
        let mut f = Failure::from(e);
        f.message = clip(f.message, MESSAGE_BYTES_MAX);
        f
    }))
}
