//! The calls out of the engine: the planner, a task's handler, the evaluator and the
//! escalation sink. Each runs under a timeout and a panic guard, retries what the engine
//! retries in-process (planner and evaluator transient errors, sink failures), and hands
//! back an [`Answer`]; the driver turns it into the event that records it with the core's
//! [`crate::core::event_of`].

use crate::api::{EvalRequest, HandlerError, PlanRequest, TaskCall};
use crate::core::{Answer, Failure, Judgement, Output};
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

/// Calls the task's handler (or serves the response cache): its output, or why not.
pub(crate) async fn execute(inner: Arc<Inner>, call: TaskCall, cache_key: Option<String>) -> Answer {
    let timeout_ms = call.timeout_ms;
    if let Some(k) = &cache_key {
        if let Some(output) = inner.cache.get(k) {
            tracing::debug!("response cache hit");
            return Answer::Output(Ok(Output { output, usage: Usage::default(), cached: true }));
        }
    }
    let Some(handler) = inner.handlers.get(&call.handler).cloned() else {
        return Answer::EngineFailure(Failure {
            class: ErrorClass::Fatal,
            message: format!("no handler registered for {:?}", call.handler),
            usage: Usage::default(),
        });
    };
    tracing::debug!(key = %call.idempotency_key, "calling handler");
    let fut = guarded("handler", panicked, || handler.call(call));
    match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
        Err(_) => Answer::Output(Err(Failure::timed_out(timeout_ms))),
        Ok(Err(e)) => {
            let mut f = Failure::from(e);
            f.message = clip(f.message, inner.limits.error_bytes_max);
            Answer::Output(Err(f))
        }
        Ok(Ok(out)) => {
            // Size limits: checked by the driver before the answer is staged (shell/oversize.rs).
            let output = Json::new(&out.output);
            Answer::Output(Ok(Output { output, usage: out.usage, cached: false }))
        }
    }
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
            tokio::time::sleep(Duration::from_millis(20u64 << n)).await;
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

/// Tells the escalation sink about `esc`.
pub(crate) async fn notify(inner: Arc<Inner>, run: RunId, esc: Escalation) -> Answer {
    let number = esc.number;
    for n in 0..NOTIFY_TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(25u64 << n)).await;
        }
        let on_panic = |what: &'static str, detail: String| format!("{what} panicked: {detail}");
        match guarded("escalation sink", on_panic, || inner.sink.notify(run, esc.clone())).await {
            Ok(()) => return Answer::Notified,
            Err(e) => tracing::warn!(number, error = %e, "escalation sink failed"),
        }
    }
    Answer::NotNotified
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
            tokio::time::sleep(Duration::from_millis(20u64 << n)).await;
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
