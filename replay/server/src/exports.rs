//! `GET /v1/export` (role viewer): runs exported as `keel export` writes them — one run or
//! every run accepted in a time range, in any format, with redactions. What `keel export`
//! asks for while `keel serve` holds the database.

use crate::error::{ApiError, ApiResult};
use crate::reads::ExportFormat;
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use keel_replay::export::{select_runs, CsvWriter, JsonlWriter, Redaction};
use keel_replay::format::{parse_time, rfc3339};
use keel_replay::html::HtmlWriter;
use keel_replay::source::load_run_from_db;
use keel_store::RunId;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

/// Most redaction rules one export takes.
const REDACTIONS_MAX: usize = 64;

/// The query of `GET /v1/export`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportAllQuery {
    /// jsonl, csv or html.
    format: ExportFormat,
    /// One run (its full id); without it every run accepted in `[since, until)`.
    run: Option<String>,
    /// Runs accepted at or after this time (RFC 3339 or Unix seconds); not with `run`.
    since: Option<String>,
    /// Runs accepted before this time (RFC 3339 or Unix seconds); not with `run`.
    until: Option<String>,
    /// Payload fields to redact, comma-separated: `FIELD` or `Kind.FIELD` (as `keel export --redact`).
    redact: Option<String>,
}

/// `GET /v1/export?format=&run=&since=&until=&redact=`: as `keel export` writes it.
#[utoipa::path(get, path = "/v1/export", tag = "runs", params(ExportAllQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the export (application/x-ndjson, text/csv or text/html)",
            content((String = "application/x-ndjson"), (String = "text/csv"), (String = "text/html"))),
        (status = 400, description = "bad format, run id, time or redaction", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn export(
    State(st): State<AppState>,
    q: Result<Query<ExportAllQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let run = q
        .run
        .as_deref()
        .map(|r| r.parse::<RunId>().map_err(|_| ApiError::bad_request(format!("{r:?} is not a run id (a UUID)"))))
        .transpose()?;
    if run.is_some() && (q.since.is_some() || q.until.is_some()) {
        return Err(ApiError::bad_request("since and until select runs: not with run"));
    }
    let time = |name: &str, v: &Option<String>| {
        v.as_deref().map(parse_time).transpose().map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
    };
    let since = time("since", &q.since)?;
    let until = time("until", &q.until)?;
    // As `keel export` refuses it: a window that holds no time selects nothing, by mistake.
    if let Some(why) = keel_replay::format::empty_window(since, until, ("since", "until")) {
        return Err(ApiError::bad_request(why));
    }
    let specs: Vec<String> = q.redact.as_deref().map(|r| r.split(',').map(str::to_owned).collect()).unwrap_or_default();
    if specs.len() > REDACTIONS_MAX {
        return Err(ApiError::bad_request(format!("at most {REDACTIONS_MAX} redactions")));
    }
    // Its messages name the CLI's flag; here the parameter is `redact`.
    let redaction = Redaction::parse(&specs)
        .map_err(|e| ApiError::bad_request(e.to_string().replacen("--redact ", "redact ", 1)))?;
    let format = q.format;
    let engine = st.engine.clone();
    let now = chrono::Utc::now().timestamp_micros();
    let bytes = st
        .blocking(move || {
            let log = engine.store();
            let (runs, filter) = match run {
                Some(r) => {
                    engine.state(r)?; // 404 before any writing
                    (vec![r], json!({ "runs": [r.to_string()] }))
                }
                None => {
                    let runs = select_runs(log.as_ref(), since, until)?;
                    (runs, json!({ "all": true, "since": since.map(rfc3339), "until": until.map(rfc3339) }))
                }
            };
            Ok(match format {
                ExportFormat::Jsonl => {
                    let mut w = JsonlWriter::new(Vec::new(), redaction, filter, now)?;
                    for r in &runs {
                        w.write_run(log.as_ref(), *r)?;
                    }
                    w.finish()?
                }
                ExportFormat::Csv => {
                    let mut out = Vec::new();
                    let mut w = CsvWriter::new(&mut out, redaction)?;
                    for r in &runs {
                        w.write_run(log.as_ref(), *r)?;
                    }
                    w.finish()?;
                    out
                }
                ExportFormat::Html => {
                    let title = match runs.as_slice() {
                        [one] => format!("keel run {one}"),
                        many => format!("keel runs ({})", many.len()),
                    };
                    let subtitle = format!("exported {} by keel-server", rfc3339(now));
                    let mut w = HtmlWriter::new(Vec::new(), redaction, &title, &subtitle)?;
                    for r in &runs {
                        w.write_run(&load_run_from_db(log.as_ref(), *r)?)?;
                    }
                    w.finish()?
                }
            })
        })
        .await?;
    let content_type = match format {
        ExportFormat::Jsonl => "application/x-ndjson",
        ExportFormat::Csv => "text/csv; charset=utf-8",
        ExportFormat::Html => "text/html; charset=utf-8",
    };
    let mut r = bytes.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(r)
}
