//! Shared pieces of the export format (docs/EXPORT.md) and of the JSON the CLI prints.

use keel_engine::{Command, Event};
use keel_store::{Hash32, Payload};
use serde_json::{json, Map, Value};

/// Format tag of the export's header line.
pub const FORMAT: &str = "keel-export/v1";

/// Longest line an export reader accepts, in bytes. A stored event is at most 64 KiB of
/// bincode; as JSON (strings escaped, JSON-in-JSON) it stays far below this.
pub const LINE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Key of a redacted field's replacement object: `{"$redacted": "<hex field digest>"}`.
pub const REDACTED_KEY: &str = "$redacted";

/// Lowercase hex of a hash.
pub fn hex32(h: &Hash32) -> String {
    hex::encode(h)
}

/// Parses 64 lowercase hex digits.
pub fn parse_hash(s: &str) -> Option<Hash32> {
    if s.len() != 64 || s.bytes().any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// `Some(Ok(digest))` if `v` is a redaction marker, `Some(Err(why))` if it looks like one
/// but is malformed, `None` if it is an ordinary value.
pub fn redaction_marker(v: &Value) -> Option<Result<Hash32, String>> {
    let Value::Object(m) = v else { return None };
    let marker = m.get(REDACTED_KEY)?;
    if m.len() != 1 {
        return Some(Err(format!("a redaction marker must hold only {REDACTED_KEY:?}")));
    }
    match marker.as_str().and_then(parse_hash) {
        Some(h) => Some(Ok(h)),
        None => Some(Err(format!("{REDACTED_KEY:?} must be 64 lowercase hex digits"))),
    }
}

/// The digest a redacted field states, if `v` is a well-formed redaction marker.
pub fn redacted_digest(v: &Value) -> Option<Hash32> {
    redaction_marker(v).and_then(Result::ok)
}

/// The replacement value of a redacted field.
pub fn redact_value(v: &Value) -> Value {
    json!({ REDACTED_KEY: hex32(&keel_store::digest::field_digest(v)) })
}

/// RFC 3339 (UTC, microseconds) of a time in µs since the Unix epoch.
pub fn rfc3339(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        None => format!("@{us}us"),
    }
}

/// Why a `[since, until)` window selects nothing by mistake, if it does: `since` not
/// before `until` (said with the names the caller gave them: `--since`, or `since`).
pub fn empty_window(since: Option<i64>, until: Option<i64>, names: (&str, &str)) -> Option<String> {
    match (since, until) {
        (Some(s), Some(u)) if s >= u => Some(format!(
            "{} {} is not before {} {}: the window [since, until) holds no time",
            names.0,
            rfc3339(s),
            names.1,
            rfc3339(u)
        )),
        _ => None,
    }
}

/// Parses a time given as RFC 3339 or as Unix seconds; returns µs since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<i64>() {
        return secs.checked_mul(1_000_000).ok_or_else(|| format!("{s} seconds is out of range"));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .map_err(|e| format!("{s:?} is neither RFC 3339 (e.g. 2026-01-31T12:00:00Z) nor Unix seconds: {e}"))
}

/// An event as JSON: `{"kind": ..., "payload": {fields}}`.
pub fn event_json(e: &Event) -> Value {
    json!({ "kind": e.kind_name(), "payload": Value::Object(e.fields()) })
}

/// [`event_json`] of `e` as a reader of the state `after` it sees it: a `RunCompleted`
/// shows the result it refers to (`{partial, result, summary}`, the result's canonical
/// text as `after` holds it, the shape payload version 1 recorded) instead of the list of
/// tasks whose outputs make it; every other event is [`event_json`].
pub fn event_json_after(e: &Event, after: &keel_engine::RunState) -> Value {
    match (e, &after.result) {
        (Event::RunCompleted { partial, summary, .. }, Some(result)) => json!({
            "kind": e.kind_name(),
            "payload": { "partial": partial, "result": result.as_str(), "summary": summary },
        }),
        _ => event_json(e),
    }
}

/// A command of `decide` as JSON (stable; documented in docs/CLI.md).
pub fn command_json(c: &Command) -> Value {
    match c {
        Command::Record { event, not_before_us } => {
            let mut m = Map::new();
            m.insert("command".into(), json!("Record"));
            m.insert("event".into(), event_json(event));
            m.insert("not_before_us".into(), json!(not_before_us));
            Value::Object(m)
        }
        Command::Plan { revision } => json!({ "command": "Plan", "revision": revision }),
        Command::Execute { task, attempt } => json!({ "command": "Execute", "task": task.0, "attempt": attempt }),
        Command::Evaluate { task, attempt } => json!({ "command": "Evaluate", "task": task.0, "attempt": attempt }),
        Command::Notify { number } => json!({ "command": "Notify", "number": number }),
    }
}

/// One line describing a command, for humans.
pub fn command_line(c: &Command) -> String {
    match c {
        Command::Record { event, not_before_us } => {
            let when = not_before_us.map(|t| format!(" (not before {})", rfc3339(t))).unwrap_or_default();
            format!("record {}{when}", event_line(event))
        }
        Command::Plan { revision } => format!("call the planner for revision {revision}"),
        Command::Execute { task, attempt } => format!("execute {task} attempt {attempt}"),
        Command::Evaluate { task, attempt } => format!("evaluate {task} attempt {attempt}"),
        Command::Notify { number } => format!("notify escalation {number}"),
    }
}

/// One line describing an event, for humans: kind and its most telling fields.
pub fn event_line(e: &Event) -> String {
    use keel_engine::Event as E;
    match e {
        E::RunAccepted { workflow, priority, .. } => format!("RunAccepted workflow={workflow} priority={priority}"),
        E::PlanRequested { revision, .. } => format!("PlanRequested revision={revision}"),
        E::Planned { revision, plan } => format!("Planned revision={revision} tasks={}", plan.tasks.len()),
        E::Replanned { revision, plan, carried_over, superseded } => format!(
            "Replanned revision={revision} tasks={} carried_over={} superseded={}",
            plan.tasks.len(),
            carried_over.len(),
            superseded.len()
        ),
        E::PlanRejected { revision, errors, .. } => {
            format!("PlanRejected revision={revision} errors={}", errors.join("; "))
        }
        E::TaskDispatched { task, attempt, model, .. } => {
            format!(
                "TaskDispatched {task} attempt={attempt}{}",
                model.as_ref().map(|m| format!(" model={m}")).unwrap_or_default()
            )
        }
        E::TaskExecuted { task, attempt, usage, cached, .. } => {
            format!(
                "TaskExecuted {task} attempt={attempt} cost={} tokens={}{}",
                usage.cost_micros,
                usage.tokens,
                if *cached { " cached" } else { "" }
            )
        }
        E::TaskFailed { task, attempt, class, error, .. } => {
            format!("TaskFailed {task} attempt={attempt} {class:?}: {error}")
        }
        E::RetryScheduled { task, next_attempt, delay_ms } => {
            format!("RetryScheduled {task} next_attempt={next_attempt} delay={delay_ms}ms")
        }
        E::TaskEvaluated { task, attempt, verdict, notes, .. } => {
            format!("TaskEvaluated {task} attempt={attempt} {verdict:?}: {notes}")
        }
        E::TaskSkipped { task, reason } => format!("TaskSkipped {task}: {reason}"),
        E::ReplanRequested { revision, .. } => format!("ReplanRequested revision={revision}"),
        E::BudgetExhausted { budget, limit, used, needed } => {
            format!("BudgetExhausted {budget:?} limit={limit} used={used} needed={needed}")
        }
        E::Escalated(x) => format!(
            "Escalated #{} {:?}{}: {}",
            x.number,
            x.cause,
            x.task.as_ref().map(|t| format!(" task={t}")).unwrap_or_default(),
            x.why
        ),
        E::EscalationNotified { number } => format!("EscalationNotified #{number}"),
        E::HumanResolved { number, decision, by, defaulted, .. } => {
            format!(
                "HumanResolved #{number} {} by {by}{}",
                decision.name(),
                if *defaulted { " (deadline default)" } else { "" }
            )
        }
        E::RunCompleted { partial, summary, .. } => format!("RunCompleted partial={partial}: {summary}"),
        E::RunFailed { reason } => format!("RunFailed: {reason}"),
        E::RunCancelled { by, reason } => format!("RunCancelled by {by}: {reason}"),
        E::TaskRedelivered { task, attempt, redelivery, limit } => {
            format!("TaskRedelivered {task} attempt={attempt} redelivery={redelivery} limit={limit}")
        }
        E::RunSizeWarning { events, bytes, events_max, bytes_max } => {
            format!("RunSizeWarning events={events}/{events_max} bytes={bytes}/{bytes_max}")
        }
    }
}

/// The task an event is about, if any.
pub fn event_task(e: &Event) -> Option<&keel_engine::TaskId> {
    use keel_engine::Event as E;
    match e {
        E::TaskDispatched { task, .. }
        | E::TaskExecuted { task, .. }
        | E::TaskFailed { task, .. }
        | E::RetryScheduled { task, .. }
        | E::TaskEvaluated { task, .. }
        | E::TaskSkipped { task, .. } => Some(task),
        E::Escalated(x) => x.task.as_ref(),
        _ => None,
    }
}
