//! `GET /metrics` (role viewer): what the engine can tell today, in the Prometheus text
//! format. Every figure is folded from the history on each scrape (O(history) until the
//! engine keeps counters and a run index); latency histograms, append rates and
//! group-commit batch sizes need counters inside the engine's shell and are not here yet.

use crate::error::ApiResult;
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use keel_engine::{PendingEscalation, WorkflowStats};
use std::collections::BTreeMap;
use std::fmt::Write;

/// `GET /metrics`: runs by status, usage totals, open escalations and their age.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn metrics(State(st): State<AppState>) -> ApiResult<Response> {
    let engine = st.engine.clone();
    let (stats, pending) = st.blocking(move || Ok((engine.stats()?, engine.escalations()?))).await?;
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut r = render(&stats, &pending, now_us).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(r)
}

/// A label value with `\`, `"` and newlines escaped as the text format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The exposition text of `stats` and `pending` at `now_us`.
pub(crate) fn render(stats: &[WorkflowStats], pending: &[PendingEscalation], now_us: i64) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "# HELP keel_runs Runs by workflow type and status.\n# TYPE keel_runs gauge");
    for s in stats {
        for (status, n) in &s.by_status {
            let _ = writeln!(out, "keel_runs{{workflow=\"{}\",status=\"{}\"}} {n}", label(&s.workflow), status.name());
        }
    }
    let _ = writeln!(
        out,
        "# HELP keel_runs_partial Runs that finished with a partial result.\n# TYPE keel_runs_partial gauge"
    );
    for s in stats {
        let _ = writeln!(out, "keel_runs_partial{{workflow=\"{}\"}} {}", label(&s.workflow), s.partial);
    }
    type Field = fn(&WorkflowStats) -> u64;
    let totals: [(&str, &str, Field); 7] = [
        ("keel_cost_micros_total", "Cost recorded, in micro-units.", |s| s.totals.cost_micros),
        ("keel_tokens_total", "LLM tokens recorded.", |s| s.totals.tokens),
        ("keel_llm_calls_total", "LLM calls recorded.", |s| s.totals.llm_calls),
        ("keel_tool_calls_total", "Tool calls recorded.", |s| s.totals.tool_calls),
        ("keel_retries_total", "Task retries.", |s| s.totals.retries),
        ("keel_replans_total", "Replans.", |s| s.totals.replans),
        ("keel_cache_hits_total", "Answers served from the response cache.", |s| s.totals.cache_hits),
    ];
    for (name, help, field) in totals {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for s in stats {
            let _ = writeln!(out, "{name}{{workflow=\"{}\"}} {}", label(&s.workflow), field(s));
        }
    }
    let mut open: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for p in pending {
        let e = open.entry(p.workflow.as_str()).or_insert((0, i64::MAX));
        e.0 += 1;
        e.1 = e.1.min(p.escalated_at_us);
    }
    let _ = writeln!(
        out,
        "# HELP keel_escalations_open Escalations waiting for a human.\n# TYPE keel_escalations_open gauge"
    );
    for (wf, (n, _)) in &open {
        let _ = writeln!(out, "keel_escalations_open{{workflow=\"{}\"}} {n}", label(wf));
    }
    let _ = writeln!(
        out,
        "# HELP keel_escalation_oldest_age_seconds Age of the oldest open escalation.\n\
         # TYPE keel_escalation_oldest_age_seconds gauge"
    );
    for (wf, (_, oldest)) in &open {
        let age_s = now_us.saturating_sub(*oldest).max(0) as f64 / 1e6;
        let _ = writeln!(out, "keel_escalation_oldest_age_seconds{{workflow=\"{}\"}} {age_s:.3}", label(wf));
    }
    out
}
