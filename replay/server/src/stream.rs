//! Live streams (server-sent events, role viewer): a run's events as they are recorded,
//! resumable from `Last-Event-ID`, and every run's status changes. Both are fed by the
//! engine's subscriptions (`Engine::follow`, `Engine::subscribe`): no polling of the log
//! for what this process appends. On a database other processes append to (PostgreSQL,
//! several servers), a run's tail reads the store again while quiet (from `queue_poll_ms` up
//! to every 2 s), and the
//! status stream says every [`ELSEWHERE_EVERY`] that runs may have changed elsewhere.

use crate::auth::Credential;
use crate::error::{ApiError, ApiResult};
use crate::reads::EventsQuery;
use crate::state::{parse_run, AppState};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use keel_engine::{Engine, Received, RunEvents, Seq};
use keel_replay::views;
use serde_json::json;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

/// How often a stream checks whether the server is shutting down (then it ends, so a
/// graceful shutdown is not held up by open streams).
const DRAIN_CHECK: Duration = Duration::from_millis(250);

/// How often an open stream asks whether its token is still valid; a stream whose token
/// was removed (or whose role no longer suffices) ends at the next check.
pub const TOKEN_RECHECK_EVERY: Duration = Duration::from_secs(1);

/// On a shared database, how often the status stream sends `event: elsewhere`: the
/// status changes of runs driven by other processes are not in this engine's feed, so a
/// list kept live from the stream re-lists at least this often.
pub const ELSEWHERE_EVERY: Duration = Duration::from_secs(2);

/// Whether the request asks for server-sent events.
fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|m| m.trim().starts_with("text/event-stream")))
}

/// `GET /v1/runs/{run}/events`: a page of events as JSON, or with `Accept:
/// text/event-stream` a live tail (see [`run_event_stream`]).
pub(crate) async fn run_events_or_stream(
    st: State<AppState>,
    Extension(credential): Extension<Credential>,
    headers: HeaderMap,
    run: Result<Path<String>, PathRejection>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    if wants_sse(&headers) {
        return match run_event_stream(st, credential, &headers, run, q).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    crate::reads::run_events(st, run, q).await.into_response()
}

/// The live tail: one SSE message per event (`id:` its seq, `event:` its kind, `data:` the
/// entry of the JSON page), from after `Last-Event-ID` (else after `?after=`, else from
/// the first event); it ends once the run is finished and its last event was sent.
async fn run_event_stream(
    State(st): State<AppState>,
    credential: Credential,
    headers: &HeaderMap,
    run: Result<Path<String>, PathRejection>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let run = parse_run(run)?;
    let last_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID is not an event seq"))?,
        ),
    };
    let after = last_id.or(q.after).map(Seq);
    // The cap first: a refused stream costs no store read.
    drop(st.stream_permit()?);
    let engine = st.engine.clone();
    // 404 before the stream starts.
    let exists = st
        .blocking(move || Ok(engine.store().head(run).map_err(keel_engine::EngineError::from)?.next_seq.0 > 0))
        .await?;
    if !exists {
        return Err(keel_engine::EngineError::UnknownRun { run }.into());
    }
    let permit = st.stream_permit()?;
    let follow = st.engine.follow(run, after);
    let stream = holding(permit, credential, tail(follow, st.readiness.clone()));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

fn tail(
    follow: RunEvents,
    readiness: crate::state::Readiness,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let state = (follow, VecDeque::new(), readiness, false);
    stream::unfold(state, |(mut follow, mut pending, readiness, mut done)| async move {
        loop {
            if let Some(e) = pending.pop_front() {
                return Some((Ok(event_message(&e)), (follow, pending, readiness, done)));
            }
            if done {
                return None;
            }
            tokio::select! {
                next = follow.next() => match next {
                    Ok(Some(events)) => pending.extend(events),
                    Ok(None) => return None,
                    Err(e) => {
                        done = true;
                        tracing::warn!(error = %e, "event stream ended on an error");
                        let msg = SseEvent::default().event("error").data(json!({"message": e.to_string()}).to_string());
                        return Some((Ok(msg), (follow, pending, readiness, done)));
                    }
                },
                () = drained(&readiness) => return None,
            }
        }
    })
}

/// `stream`, holding `permit` (one of `streams_max`) until it is dropped, and ended
/// once `credential` is no longer valid (checked every [`TOKEN_RECHECK_EVERY`]).
fn holding<S>(
    permit: tokio::sync::OwnedSemaphorePermit,
    credential: Credential,
    stream: S,
) -> impl Stream<Item = S::Item> + Send + 'static
where
    S: Stream + Send + 'static,
    S::Item: Send,
{
    let mut check = tokio::time::interval(TOKEN_RECHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.reset();
    let state = (Box::pin(stream), permit, credential, check);
    stream::unfold(state, |(mut inner, permit, credential, mut check)| async move {
        loop {
            tokio::select! {
                item = inner.next() => return item.map(|item| (item, (inner, permit, credential, check))),
                _ = check.tick() => {
                    // The tokens may be read from a database (a blocking call): off the
                    // runtime's workers.
                    let asked = credential.clone();
                    let valid = tokio::task::spawn_blocking(move || asked.still_valid()).await.unwrap_or(false);
                    if !valid {
                        tracing::info!(by = %credential.name(), "event stream ended: its token was removed or its role lowered");
                        return None;
                    }
                }
            }
        }
    })
}

fn event_message(e: &keel_engine::Logged) -> SseEvent {
    SseEvent::default().id(e.seq.0.to_string()).event(e.event.kind_name()).data(views::event_entry_json(e).to_string())
}

/// Completes once the server began shutting down.
async fn drained(readiness: &crate::state::Readiness) {
    while !readiness.is_draining() {
        tokio::time::sleep(DRAIN_CHECK).await;
    }
}

/// `GET /v1/events` (text/event-stream): every run's status changes from now on, one SSE
/// message each (`event: status`, `data: {"run", "workflow", "previous", "status",
/// "next_seq", "at_us"}`; `previous` is null for a new run). A subscriber that fell behind
/// gets `event: lagged` with `{"missed": N}` and re-lists with `GET /v1/runs`. On a
/// database several processes share (PostgreSQL), the changes of runs driven by another
/// process are not announced here: every [`ELSEWHERE_EVERY`] an `event: elsewhere` with
/// `{"every_ms"}` says so, and a live list re-lists then too.
#[utoipa::path(get, path = "/v1/events", tag = "runs",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "server-sent events (text/event-stream): `event: status` with `{\"run\", \"workflow\", \"previous\", \"status\", \"next_seq\", \"at_us\"}` per status change made through this server; `event: lagged` with `{\"missed\"}` when the subscriber fell behind; on a database several servers share, `event: elsewhere` with `{\"every_ms\"}` every 2 s (runs driven by another process may have changed: re-list)", content_type = "text/event-stream", body = String),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
        (status = 503, description = "`too_many_streams`: the server's cap on open event streams is reached", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn status_stream(
    State(st): State<AppState>,
    Extension(credential): Extension<Credential>,
) -> Response {
    let permit = match st.stream_permit() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let stream = holding(permit, credential, status_changes(&st.engine, st.readiness.clone()));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn status_changes(
    engine: &Engine,
    readiness: crate::state::Readiness,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let elsewhere = engine.is_shared().then(|| {
        let mut every = tokio::time::interval(ELSEWHERE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.reset();
        every
    });
    stream::unfold((engine.subscribe(), readiness, elsewhere), |(mut sub, readiness, mut elsewhere)| async move {
        loop {
            let tick = async {
                match elsewhere.as_mut() {
                    Some(every) => {
                        every.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let got = tokio::select! {
                got = sub.recv() => Some(got),
                () = drained(&readiness) => Some(None),
                () = tick => None,
            };
            let Some(got) = got else {
                let every_ms = u64::try_from(ELSEWHERE_EVERY.as_millis()).unwrap_or(u64::MAX);
                let msg = SseEvent::default().event("elsewhere").data(json!({ "every_ms": every_ms }).to_string());
                return Some((Ok(msg), (sub, readiness, elsewhere)));
            };
            let msg = match got? {
                Received::Change(c) if !c.status_changed() => continue,
                Received::Change(c) => SseEvent::default().event("status").data(
                    json!({
                        "run": c.run.to_string(),
                        "workflow": c.workflow,
                        "previous": c.previous.map(|s| s.name()),
                        "status": c.status.name(),
                        "next_seq": c.next_seq.0,
                        "at_us": c.at_us,
                    })
                    .to_string(),
                ),
                Received::Lagged(n) => SseEvent::default().event("lagged").data(json!({ "missed": n }).to_string()),
            };
            return Some((Ok(msg), (sub, readiness, elsewhere)));
        }
    })
}
