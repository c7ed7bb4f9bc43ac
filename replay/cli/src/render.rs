//! The text outputs of `keel runs`, `escalations`, `stats` and `verify`, printed from the
//! same JSON documents their `--json` prints (keel-replay's `views`). A command that goes
//! through `keel serve` gets those documents from the API, so its text is the same as
//! when it reads the database itself.

use crate::error::CliError;
use crate::output::outln;
use keel_engine::RunStatus;
use serde_json::Value;

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or_default()
}

fn b(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or_default()
}

/// The `size` column of `keel runs`: `!size` for a run with a recorded size warning.
fn size_mark(r: &Value) -> &'static str {
    if r.get("size_warning").is_some_and(|w| !w.is_null()) {
        "!size"
    } else {
        "-"
    }
}

/// `keel runs`: entries of `{"runs": [...]}`.
pub(crate) fn runs(runs: &[Value]) -> Result<(), CliError> {
    outln!(
        "{:<36}  {:<16}  {:<13}  {:<7}  {:>6}  {:>12}  {:>4}  {:<5}  accepted",
        "run",
        "workflow",
        "status",
        "partial",
        "events",
        "cost(micros)",
        "esc",
        "size"
    )?;
    for r in runs {
        outln!(
            "{:<36}  {:<16}  {:<13}  {:<7}  {:>6}  {:>12}  {:>4}  {:<5}  {}",
            s(r, "run"),
            s(r, "workflow"),
            s(r, "status"),
            if b(r, "partial") { "yes" } else { "no" },
            n(r, "events"),
            n(r, "cost_micros"),
            n(r, "escalations"),
            size_mark(r),
            s(r, "accepted_at"),
        )?;
    }
    outln!("{} run(s)", runs.len())
}

/// `keel escalations`: entries of `{"escalations": [...]}`.
pub(crate) fn escalations(pending: &[Value]) -> Result<(), CliError> {
    if pending.is_empty() {
        outln!("no escalation is waiting")?;
    }
    for p in pending {
        outln!(
            "run {} escalation #{} {}{} at {}{}",
            s(p, "run"),
            n(p, "number"),
            s(p, "cause"),
            p.get("task").and_then(Value::as_str).map(|t| format!(" task {t}")).unwrap_or_default(),
            s(p, "escalated_at"),
            if b(p, "notified") { "" } else { " (not yet notified)" }
        )?;
        outln!("  why:      {}", s(p, "why"))?;
        outln!("  question: {}", s(p, "question"))?;
        outln!("  resolve:  {}", s(p, "resolve"))?;
    }
    Ok(())
}

/// `keel stats`: entries of `{"workflows": [...]}`.
pub(crate) fn stats(stats: &[Value]) -> Result<(), CliError> {
    outln!(
        "{:<18} {:>5}  {:<44} {:>7} {:>12} {:>10} {:>8} {:>6} {:>7} {:>7} {:>6} {:>12}",
        "workflow",
        "runs",
        "by status",
        "partial",
        "cost(micros)",
        "tokens",
        "llm",
        "tool",
        "retries",
        "replans",
        "cached",
        "cost/run"
    )?;
    let empty = Value::Null;
    for w in stats {
        // In the state machine's order of statuses, as the engine counts them.
        let by_status = w.get("by_status").unwrap_or(&empty);
        let by: Vec<String> = RunStatus::ALL
            .iter()
            .filter_map(|st| by_status.get(st.name()).and_then(Value::as_u64).map(|c| format!("{} {c}", st.name())))
            .collect();
        let t = w.get("totals").unwrap_or(&empty);
        outln!(
            "{:<18} {:>5}  {:<44} {:>7} {:>12} {:>10} {:>8} {:>6} {:>7} {:>7} {:>6} {:>12}",
            s(w, "workflow"),
            n(w, "runs"),
            by.join(", "),
            n(w, "partial"),
            n(t, "cost_micros"),
            n(t, "tokens"),
            n(t, "llm_calls"),
            n(t, "tool_calls"),
            n(t, "retries"),
            n(t, "replans"),
            n(t, "cache_hits"),
            n(w, "cost_per_run_micros")
        )?;
    }
    if stats.is_empty() {
        outln!("no runs")?;
    }
    Ok(())
}

/// `keel verify`: the `--json` document (`runs`, `ok`, `records`, `source`).
pub(crate) fn verification(v: &Value) -> Result<(), CliError> {
    let runs = v.get("runs").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for r in runs {
        outln!("ok  {}  {} records  head {}", s(r, "run"), n(r, "records"), s(r, "head"))?;
    }
    if b(v, "ok") {
        outln!("verified {} record(s) in {} run(s) of {}", n(v, "records"), runs.len(), s(v, "source"))?;
    }
    Ok(())
}
