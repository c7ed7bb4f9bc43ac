//! The stable JSON shapes the CLI prints with `--json` (documented in docs/CLI.md), and
//! their human-readable counterparts. Field names never change; new fields may be added.

use crate::format::{event_json, rfc3339};
use keel_engine::{Logged, PendingEscalation, RunId, RunState, RunSummary, WorkflowStats};
use serde_json::{json, Value};

/// `keel runs --json`: one entry.
pub fn run_summary_json(r: &RunSummary) -> Value {
    json!({
        "run": r.run.to_string(),
        "workflow": r.workflow,
        "status": r.status.name(),
        "priority": r.priority,
        "accepted_at": rfc3339(r.accepted_at_us),
        "accepted_at_us": r.accepted_at_us,
        "last_event_at": rfc3339(r.last_event_us),
        "last_event_us": r.last_event_us,
        "events": r.events,
        "cost_micros": r.cost_micros,
        "tokens": r.tokens,
        "partial": r.partial,
        "escalations": r.escalations,
        "size_warning": size_warning_json(r.size_warning.as_ref()),
    })
}

/// A run's size warning in `--json` outputs: `null`, or the latest `RunSizeWarning`'s
/// fields and which thresholds it crossed.
pub fn size_warning_json(w: Option<&keel_engine::SizeWarning>) -> Value {
    match w {
        None => Value::Null,
        Some(w) => json!({
            "events": w.events,
            "bytes": w.bytes,
            "events_max": w.events_max,
            "bytes_max": w.bytes_max,
            "events_crossed": w.events_crossed(),
            "bytes_crossed": w.bytes_crossed(),
        }),
    }
}

/// One line for people: which size thresholds a run's log crossed.
pub fn size_warning_text(w: &keel_engine::SizeWarning) -> String {
    format!(
        "size warning: {} events (threshold {}), {} bytes (threshold {})",
        w.events, w.events_max, w.bytes, w.bytes_max
    )
}

/// `keel show --json` and `keel replay --until --json`: a run's folded state.
pub fn state_json(s: &RunState) -> Value {
    let tasks: Vec<Value> = s
        .tasks
        .iter()
        .map(|t| {
            json!({
                "id": t.spec.id.0,
                "kind": format!("{:?}", t.spec.kind),
                "handler": t.spec.handler,
                "critical": t.spec.critical,
                "depends_on": t.spec.depends_on.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
                "status": t.status.name(),
                "attempt": t.attempt,
                "model": t.model,
                "cached": t.cached,
                "verdict": t.verdict.map(|v| format!("{v:?}")),
                "last_error": t.last_error.as_ref().map(|(c, m)| json!({"class": format!("{c:?}"), "message": m})),
                "skip_reason": t.skip_reason,
                "output": t.output.as_ref().map(|o| o.value().unwrap_or(Value::Null)),
            })
        })
        .collect();
    let escalations: Vec<Value> = s
        .escalations
        .iter()
        .map(|e| {
            let x = &e.escalation;
            json!({
                "number": x.number,
                "cause": format!("{:?}", x.cause),
                "task": x.task.as_ref().map(|t| t.0.clone()),
                "why": x.why,
                "question": x.question,
                "options": x.options,
                "attempted": x.attempted,
                "alternatives_tried": x.alternatives_tried,
                "escalated_at": rfc3339(e.escalated_at_us),
                "escalated_at_us": e.escalated_at_us,
                "notified": e.notified,
                "resolution": e.resolution.as_ref().map(|(d, by, defaulted)| json!({"decision": d.name(), "by": by, "defaulted": defaulted})),
            })
        })
        .collect();
    let mut out = json!({
        "run": s.run.to_string(),
        "workflow": s.workflow,
        "workflow_version": s.workflow_version,
        "status": s.status.name(),
        "partial": s.partial,
        "priority": s.priority,
        "seed": s.seed,
        "accepted_at": rfc3339(s.accepted_at_us),
        "accepted_at_us": s.accepted_at_us,
        "last_event_at": rfc3339(s.last_event_us),
        "last_event_us": s.last_event_us,
        "events": s.next_seq.0,
        "revision": s.revision,
        "budget": serde_json::to_value(&s.budget).unwrap_or(Value::Null),
        "totals": serde_json::to_value(s.totals).unwrap_or(Value::Null),
        "exhausted": s.exhausted.map(|k| format!("{k:?}")),
        "tasks": tasks,
        "escalations": escalations,
        "history": s.history,
        "result": s.result.as_ref().map(|r| r.value().unwrap_or(Value::Null)),
        "failure": s.failure,
    });
    // Only when there is one: the states printed before size warnings existed stay as
    // they were (golden files compare them whole).
    if let (Some(w), Some(m)) = (&s.size_warning, out.as_object_mut()) {
        m.insert("size_warning".to_owned(), size_warning_json(Some(w)));
        m.insert("log_bytes".to_owned(), json!(s.log_bytes));
    }
    out
}

/// A human-readable rendering of a run's state.
pub fn state_text(s: &RunState) -> String {
    let mut out = String::new();
    state_header_text(&mut out, s);
    if !s.tasks.is_empty() {
        out.push_str("plan:\n");
        out.push_str(&format!(
            "  {:<20} {:<10} {:<14} {:>7}  {:<8}  note\n",
            "task", "kind", "status", "attempt", "verdict"
        ));
        for t in &s.tasks {
            let note = t
                .skip_reason
                .clone()
                .or_else(|| t.last_error.as_ref().map(|(c, m)| format!("{c:?}: {m}")))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {:<20} {:<10} {:<14} {:>7}  {:<8}  {}\n",
                t.spec.id.0,
                format!("{:?}", t.spec.kind),
                t.status.name(),
                t.attempt,
                t.verdict.map(|v| format!("{v:?}")).unwrap_or_else(|| "-".into()),
                note
            ));
        }
    }
    for e in &s.escalations {
        escalation_text(&mut out, s.run, e);
    }
    if let Some(f) = &s.failure {
        out.push_str(&format!("failure: {f}\n"));
    }
    if let Some(r) = &s.result {
        out.push_str(&format!("result: {}\n", r.as_str()));
    }
    out
}

/// The run's identity, times, totals and budget: four lines.
fn state_header_text(out: &mut String, s: &RunState) {
    out.push_str(&format!(
        "run {}  workflow {} v{}  status {}{}\n",
        s.run,
        s.workflow,
        s.workflow_version,
        s.status.name(),
        if s.partial { " (partial)" } else { "" }
    ));
    out.push_str(&format!(
        "accepted {}  last event {}  events {}  plan revision {}\n",
        rfc3339(s.accepted_at_us),
        rfc3339(s.last_event_us),
        s.next_seq.0,
        s.revision.map(|r| r.to_string()).unwrap_or_else(|| "-".into())
    ));
    if let Some(w) = &s.size_warning {
        out.push_str(&size_warning_text(w));
        out.push('\n');
    }
    let t = &s.totals;
    out.push_str(&format!(
        "totals: cost {} micros, tokens {}, llm calls {}, tool calls {}, retries {}, replans {}, cache hits {}\n",
        t.cost_micros, t.tokens, t.llm_calls, t.tool_calls, t.retries, t.replans, t.cache_hits
    ));
    let b = &s.budget;
    let lim = |x: Option<u64>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "budget: cost {}, tokens {}, llm calls {}, tool calls {}, retries {}, replans {}, deadline ms {}{}\n",
        lim(b.cost_micros),
        lim(b.tokens),
        lim(b.llm_calls),
        lim(b.tool_calls),
        lim(b.retries),
        lim(b.replans),
        lim(b.deadline_ms),
        s.exhausted.map(|k| format!("  (exhausted: {k:?})")).unwrap_or_default()
    ));
}

/// One escalation: what was asked, and its resolution or how to give one.
fn escalation_text(out: &mut String, run: keel_store::RunId, e: &keel_engine::EscalationState) {
    let x = &e.escalation;
    out.push_str(&format!(
        "escalation #{} {:?}{}: {}\n  question: {}\n  options: {}\n",
        x.number,
        x.cause,
        x.task.as_ref().map(|t| format!(" task {t}")).unwrap_or_default(),
        x.why,
        x.question,
        x.options.join(", ")
    ));
    match &e.resolution {
        Some((d, by, defaulted)) => out.push_str(&format!(
            "  resolved: {} by {by}{}\n",
            d.name(),
            if *defaulted { " (deadline default)" } else { "" }
        )),
        None => {
            let options: Vec<&str> = x.options.iter().map(|o| cli_decision(o)).collect();
            out.push_str(&format!(
                "  waiting: keel resolve {} --decision <{}> --reason <TEXT>\n",
                run,
                options.join(" | ")
            ))
        }
    }
}

/// `keel escalations --json`: one entry.
pub fn escalation_json(p: &PendingEscalation) -> Value {
    let x = &p.escalation;
    json!({
        "run": p.run.to_string(),
        "workflow": p.workflow,
        "number": x.number,
        "cause": format!("{:?}", x.cause),
        "task": x.task.as_ref().map(|t| t.0.clone()),
        "why": x.why,
        "question": x.question,
        "options": x.options,
        "escalated_at": rfc3339(p.escalated_at_us),
        "escalated_at_us": p.escalated_at_us,
        "notified": p.notified,
        "deadline_ms": x.deadline_ms,
        "deadline_at": x.deadline_ms.map(|ms| {
            let ms = i64::try_from(ms).unwrap_or(i64::MAX / 1000);
            rfc3339(p.escalated_at_us.saturating_add(ms.saturating_mul(1000)))
        }),
        "default": x.default_decision.as_ref().map(|d| d.name()),
        "resolve": resolve_hint(p),
    })
}

/// How an escalation option (a `Decision` name) is spelled on `keel resolve`.
fn cli_decision(option: &str) -> &str {
    match option {
        "supply_output" => "supply --output JSON",
        "replan_with_hint" => "replan --hint TEXT",
        other => other,
    }
}

/// The `keel resolve` command line for a pending escalation.
pub fn resolve_hint(p: &PendingEscalation) -> String {
    let options: Vec<&str> = p.escalation.options.iter().map(|o| cli_decision(o)).collect();
    format!("keel resolve {} --decision <{}> --reason <TEXT>", p.run, options.join(" | "))
}

/// `keel stats --json`: one entry.
pub fn stats_json(s: &WorkflowStats) -> Value {
    let by_status: serde_json::Map<String, Value> =
        s.by_status.iter().map(|(k, v)| (k.name().to_owned(), json!(v))).collect();
    json!({
        "workflow": s.workflow,
        "runs": s.runs,
        "by_status": by_status,
        "partial": s.partial,
        "totals": serde_json::to_value(s.totals).unwrap_or(Value::Null),
        "cost_per_run_micros": s.cost_per_run_micros,
    })
}

/// `keel replay --step --json`: one entry.
pub fn step_json(e: &Logged, after: &RunState) -> Value {
    let tasks: serde_json::Map<String, Value> =
        after.tasks.iter().map(|t| (t.spec.id.0.clone(), json!(t.status.name()))).collect();
    json!({
        "seq": e.seq.0,
        "time": rfc3339(e.at_us),
        "time_us": e.at_us,
        "kind": e.event.kind_name(),
        "event": event_json(&e.event).get("payload").cloned().unwrap_or(Value::Null),
        "run_status": after.status.name(),
        "tasks": tasks,
    })
}

/// `keel resolve --json`, and the answer of the server's resolve route: what was
/// recorded (`decision` is a `Decision` name, `by` who decided).
pub fn resolution_json(run: RunId, decision: &str, by: &str) -> Value {
    json!({ "run": run.to_string(), "decision": decision, "by": by })
}

/// What `keel cancel --json` prints and `POST /v1/runs/{run}/cancel` answers.
pub fn cancellation_json(run: RunId, by: &str) -> Value {
    json!({ "run": run.to_string(), "cancelled": true, "by": by })
}

/// One recorded event as the server's events route lists it: its seq, time, kind and
/// payload (the payload as in an export record).
pub fn event_entry_json(e: &Logged) -> Value {
    json!({
        "seq": e.seq.0,
        "time": rfc3339(e.at_us),
        "time_us": e.at_us,
        "kind": e.event.kind_name(),
        "event": event_json(&e.event).get("payload").cloned().unwrap_or(Value::Null),
    })
}
