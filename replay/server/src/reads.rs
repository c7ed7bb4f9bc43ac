//! Read routes (role viewer): runs, one run, its events, its export.

use crate::error::{ApiError, ApiResult};
use crate::state::{parse_run, AppState};
use axum::extract::rejection::PathRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel_engine::RunStatus;
use keel_replay::export::{CsvWriter, JsonlWriter, Redaction};
use keel_replay::html::HtmlWriter;
use keel_replay::source::load_run_from_db;
use keel_replay::views;
use keel_store::RunId;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

/// Default and largest page of `GET /v1/runs`.
pub(crate) const RUNS_PAGE_DEFAULT: usize = 100;
/// Largest page of `GET /v1/runs`.
pub(crate) const RUNS_PAGE_MAX: usize = 1000;
/// Default page of `GET /v1/runs/{run}/events`.
pub(crate) const EVENTS_PAGE_DEFAULT: usize = 1000;
/// Largest page of `GET /v1/runs/{run}/events`.
pub(crate) const EVENTS_PAGE_MAX: usize = 10_000;

/// The query of `GET /v1/runs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RunsQuery {
    /// Only runs in this status (Accepted, Planning, Running, AwaitingHuman, Completed, Failed, Cancelled).
    status: Option<String>,
    /// Only runs of this workflow type.
    workflow: Option<String>,
    /// Runs per page (1..=1000, default 100).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /v1/runs`: runs in run id order, filtered, a page at a time.
#[utoipa::path(get, path = "/v1/runs", tag = "runs", params(RunsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"runs\": [entry of keel runs --json], \"next_cursor\": run id or null}`", body = Object),
        (status = 400, description = "bad status, limit or cursor", body = crate::error::ErrorBody),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn list_runs(
    State(st): State<AppState>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            RunStatus::parse(s).ok_or_else(|| {
                let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.name()).collect();
                ApiError::bad_request(format!("unknown status {s:?} (one of {})", all.join(", ")))
            })
        })
        .transpose()?;
    let limit = page_limit(q.limit, RUNS_PAGE_DEFAULT, RUNS_PAGE_MAX)?;
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| c.parse::<RunId>().map_err(|_| ApiError::bad_request(format!("cursor {c:?} is not a run id"))))
        .transpose()?;
    let engine = st.engine.clone();
    // O(page): the engine's run index (docs/ENGINE.md, "Read models").
    let filter = keel_engine::RunFilter { status, workflow: q.workflow };
    let page = st.blocking(move || Ok(engine.runs_page(&filter, cursor, limit)?)).await?;
    Ok(Json(json!({
        "runs": page.runs.iter().map(views::run_summary_json).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor.map(|r| r.to_string()),
    })))
}

/// A page size from a query: `given` or `default`, refused outside 1..=`max`.
fn page_limit(given: Option<usize>, default: usize, max: usize) -> ApiResult<usize> {
    match given {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit {n} is outside 1..={max}"))),
    }
}

/// `GET /v1/runs/{run}`: the run's state, as `keel show --json`.
#[utoipa::path(get, path = "/v1/runs/{run}", tag = "runs",
    params(("run" = String, Path, description = "run id (UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the state object of `keel show --json`", body = Object),
        (status = 400, description = "not a run id", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn show_run(
    State(st): State<AppState>,
    run: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let run = parse_run(run)?;
    let engine = st.engine.clone();
    let state = st.blocking(move || Ok(engine.state(run)?)).await?;
    Ok(Json(views::state_json(&state)))
}

/// The query of `GET /v1/runs/{run}/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only events after this seq (default: from the first).
    pub(crate) after: Option<u64>,
    /// Events per page (1..=10000, default 1000).
    pub(crate) limit: Option<usize>,
}

/// `GET /v1/runs/{run}/events`: the run's recorded events after a seq, a page at a time;
/// with `Accept: text/event-stream`, a live tail (server-sent events, `id:` = seq) that
/// resumes after `Last-Event-ID` and ends when the run is finished.
#[utoipa::path(get, path = "/v1/runs/{run}/events", tag = "runs",
    params(("run" = String, Path, description = "run id (UUID)"), EventsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"run\", \"events\": [{\"seq\", \"time\", \"time_us\", \"kind\", \"event\"}], \"next_after\": seq or null}`; with `Accept: text/event-stream`, server-sent events (`id:` seq, `event:` kind, `data:` one entry of `events`), resumed after the `Last-Event-ID` header, ending when the run is finished", content((Object = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "bad run id or limit", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
        (status = 503, description = "`too_many_streams` (with `Accept: text/event-stream`): the server's cap on open event streams is reached", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn run_events(
    State(st): State<AppState>,
    run: Result<Path<String>, PathRejection>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let run = parse_run(run)?;
    let limit = page_limit(q.limit, EVENTS_PAGE_DEFAULT, EVENTS_PAGE_MAX)?;
    let engine = st.engine.clone();
    let events = st.blocking(move || Ok(engine.events(run)?)).await?;
    let mut page: Vec<Value> = Vec::new();
    let mut more = false;
    for e in events.iter().filter(|e| q.after.is_none_or(|a| e.seq.0 > a)) {
        if page.len() == limit {
            more = true;
            break;
        }
        page.push(views::event_entry_json(e));
    }
    let next_after = if more { page.last().and_then(|e| e.get("seq").cloned()) } else { None };
    Ok(Json(json!({ "run": run.to_string(), "events": page, "next_after": next_after })))
}

/// The format of `GET /v1/runs/{run}/export`.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ExportFormat {
    /// JSON lines, hash-chained and verifiable (`keel verify`).
    Jsonl,
    /// One row per event.
    Csv,
    /// A self-contained HTML report.
    Html,
}

/// The query of `GET /v1/runs/{run}/export`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// jsonl, csv or html.
    format: ExportFormat,
}

/// `GET /v1/runs/{run}/export?format=`: the run exported as `keel export RUN --format` does.
#[utoipa::path(get, path = "/v1/runs/{run}/export", tag = "runs",
    params(("run" = String, Path, description = "run id (UUID)"), ExportQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the export (application/x-ndjson, text/csv or text/html)",
            content((String = "application/x-ndjson"), (String = "text/csv"), (String = "text/html"))),
        (status = 400, description = "bad run id or format", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn export_run(
    State(st): State<AppState>,
    run: Result<Path<String>, PathRejection>,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let run = parse_run(run)?;
    let engine = st.engine.clone();
    let now = chrono::Utc::now().timestamp_micros();
    let bytes = st
        .blocking(move || {
            engine.state(run)?; // 404 before any writing
            write_export(&engine, run, q.format, now)
        })
        .await?;
    let content_type = match q.format {
        ExportFormat::Jsonl => "application/x-ndjson",
        ExportFormat::Csv => "text/csv; charset=utf-8",
        ExportFormat::Html => "text/html; charset=utf-8",
    };
    let mut r = bytes.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(r)
}

/// The run's export in `format`, in memory (a run's history is bounded by the store's
/// limits).
fn write_export(engine: &keel_engine::Engine, run: RunId, format: ExportFormat, now_us: i64) -> ApiResult<Vec<u8>> {
    let log = engine.store();
    Ok(match format {
        ExportFormat::Jsonl => {
            let mut w =
                JsonlWriter::new(Vec::new(), Redaction::default(), json!({ "runs": [run.to_string()] }), now_us)?;
            w.write_run(log.as_ref(), run)?;
            w.finish()?
        }
        ExportFormat::Csv => {
            let mut out = Vec::new();
            let mut w = CsvWriter::new(&mut out, Redaction::default())?;
            w.write_run(log.as_ref(), run)?;
            w.finish()?;
            out
        }
        ExportFormat::Html => {
            let events = load_run_from_db(log.as_ref(), run)?;
            let subtitle = format!("exported {} by keel-server", keel_replay::format::rfc3339(now_us));
            let mut w = HtmlWriter::new(Vec::new(), Redaction::default(), &format!("keel run {run}"), &subtitle)?;
            w.write_run(&events)?;
            w.finish()?
        }
    })
}
