//! `GET /metrics` (role viewer): what the engine can tell, in the Prometheus text format
//! (0.0.4). Two parts: runs by status, usage totals and open escalations folded from the
//! history on each scrape ([`render`]); and the engine's counters since it opened
//! ([`keel_engine::Engine::metrics`]: appends, transitions, append and flush latency,
//! group-commit batch sizes, verdicts, budget exhaustions), kept as plain counters and
//! bucket arrays by the engine and the store and encoded here by the `prometheus` crate's
//! text encoder ([`counted`]).

use crate::error::ApiResult;
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use keel_engine::{EngineMetrics, PendingEscalation, WorkflowStats};
use keel_store::stats::HistogramSnapshot;
use prometheus::proto;
use std::collections::BTreeMap;
use std::fmt::Write;

/// `GET /metrics`: runs by status, usage totals, open escalations and their age, and the
/// engine's counters (appends, transitions, latency and batch-size histograms, verdicts,
/// budget exhaustions).
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
    let mut text = render(&stats, &pending, now_us);
    prometheus::TextEncoder::new()
        .encode_utf8(&counted(&st.engine.metrics()), &mut text)
        .map_err(crate::error::ApiError::internal)?;
    let mut r = text.into_response();
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

/// Microseconds to seconds.
fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: proto::MetricType, metrics: Vec<proto::Metric>) -> proto::MetricFamily {
    let mut f = proto::MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(pairs: &[(&str, &str)], value: u64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

/// A histogram sample of `h` (bounds and sum scaled by `scale`); the encoder adds the
/// `+Inf` bucket from the count.
fn histogram(h: &HistogramSnapshot, scale: fn(u64) -> f64) -> proto::Metric {
    let mut cumulative = 0u64;
    let buckets = h
        .bounds
        .iter()
        .zip(&h.counts)
        .map(|(bound, n)| {
            cumulative = cumulative.saturating_add(*n);
            let mut b = proto::Bucket::default();
            b.set_upper_bound(scale(*bound));
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut p = proto::Histogram::default();
    p.set_bucket(buckets);
    p.set_sample_count(h.count());
    p.set_sample_sum(scale(h.sum));
    let mut m = proto::Metric::default();
    m.set_histogram(p);
    m
}

/// The engine's counters as metric families (a labelled family with no series yet is
/// left out: the text format has no empty family).
pub(crate) fn counted(m: &EngineMetrics) -> Vec<proto::MetricFamily> {
    use proto::MetricType::{COUNTER, HISTOGRAM};
    let mut out = vec![
        family(
            "keel_appends_total",
            "Appends (atomic batches of events) this engine made durable since it started.",
            COUNTER,
            vec![counter(&[], m.appends)],
        ),
        family(
            "keel_append_errors_total",
            "Appends refused or failed (conflict, lost lease, I/O error); nothing of them was recorded.",
            COUNTER,
            vec![counter(&[], m.append_errors)],
        ),
        family(
            "keel_transitions_total",
            "Events recorded (each one transition of a run's state machine), by event kind.",
            COUNTER,
            m.transitions.iter().map(|(kind, n)| counter(&[("kind", kind)], *n)).collect(),
        ),
        family(
            "keel_append_latency_seconds",
            "Latency of a durable append (store write and flush wait).",
            HISTOGRAM,
            vec![histogram(&m.append_latency_us, seconds)],
        ),
    ];
    if m.commits.flushing {
        out.push(family(
            "keel_flush_latency_seconds",
            "Latency of a store flush that made appends durable.",
            HISTOGRAM,
            vec![histogram(&m.commits.flush_latency_us, seconds)],
        ));
        out.push(family(
            "keel_commit_batch_appends",
            "Appends made durable by one flush (group-commit batch size).",
            HISTOGRAM,
            vec![histogram(&m.commits.batch_appends, |n| n as f64)],
        ));
    }
    if !m.verdicts.is_empty() {
        out.push(family(
            "keel_verdicts_total",
            "Task evaluations recorded, by workflow type, task and verdict.",
            COUNTER,
            m.verdicts
                .iter()
                .map(|v| counter(&[("workflow", &v.workflow), ("task", &v.task), ("verdict", &v.verdict)], v.count))
                .collect(),
        ));
    }
    if !m.budget_exhaustions.is_empty() {
        out.push(family(
            "keel_budget_exhaustions_total",
            "Budget exhaustions recorded, by workflow type and budget.",
            COUNTER,
            m.budget_exhaustions
                .iter()
                .map(|b| counter(&[("workflow", &b.workflow), ("budget", &b.budget)], b.count))
                .collect(),
        ));
    }
    out
}
