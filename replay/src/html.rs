//! The HTML report: ONE self-contained file (inline CSS and SVG; no script, no network,
//! no external fonts) with, per run: the summary, budget use vs limits (`#budget`), the
//! plan DAG as SVG (`#dag`), a timeline of tasks and attempts (`#timeline`), the run state
//! machine with the path taken (`#fsm`), escalations and resolutions (`#escalations`) and
//! the event log (`#events`). With several runs, the second run's ids end in `-2`, etc.

use crate::error::ReplayError;
use crate::export::Redaction;
use crate::format::{event_line, rfc3339};
use keel_engine::fsm::RUN_TABLE;
use keel_engine::{Event, Logged, RunState, RunStatus, TaskStatus};
use keel_store::Payload;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;

/// Escapes text for HTML (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
:root{--ink:#1f2430;--muted:#5c667a;--line:#d9dee8;--bg:#f5f7fb;--card:#fff;--accent:#2f5bd3;
--ok:#1f9d55;--warn:#c77c02;--bad:#c53030;--skip:#8a94a6;--info:#2b6cb0}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header.top{background:#18213a;color:#fff;padding:18px 32px}
header.top h1{margin:0;font-size:20px;font-weight:600;letter-spacing:.2px}
header.top .sub{color:#b8c2dc;font-size:12.5px;margin-top:4px}
main{max-width:1220px;margin:0 auto;padding:20px 24px 48px}
section.run{margin-bottom:36px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin:14px 0;box-shadow:0 1px 2px rgba(20,30,60,.04)}
.card h2{font-size:15px;margin:0 0 12px;font-weight:650;display:flex;align-items:center;gap:8px}
.card h2 .hint{font-weight:400;color:var(--muted);font-size:12.5px}
.runhead{display:flex;flex-wrap:wrap;gap:10px 28px;align-items:baseline}
.runhead .id{font:600 15px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px 18px;margin-top:12px}
.kv div{font-size:12px;color:var(--muted)} .kv b{display:block;font-size:15px;color:var(--ink);font-weight:600}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;border:1px solid transparent;white-space:nowrap}
.s-Completed,.s-Done,.o-pass,.o-executed{background:#e3f6ea;color:#17693d;border-color:#bfe8cf}
.s-Failed,.o-fatal,.o-hard,.o-critical,.s-Rejected{background:#fde8e8;color:#9b1c1c;border-color:#f5c2c2}
.s-Cancelled,.s-Skipped,.s-Superseded,.o-skipped{background:#eef0f4;color:#4a5568;border-color:#dde1e8}
.s-AwaitingHuman,.o-transient,.o-soft,.s-AttemptFailed,.s-RetryScheduled{background:#fff4e0;color:#8a5300;border-color:#f3dbab}
.s-Running,.s-Planning,.s-Accepted,.s-Dispatched,.s-Executed,.s-Ready,.s-Pending,.o-semantic,.o-inflight{background:#e6eefc;color:#23439a;border-color:#c9d8f7}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #edf0f5;vertical-align:top;font-size:13px}
th{font-size:11.5px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.track{position:relative;height:18px;background:#f0f3f9;border-radius:4px;min-width:320px}
.bar{position:absolute;top:3px;height:12px;border-radius:3px;min-width:3px}
.b-ok{background:#38a169}.b-bad{background:#e05252}.b-warn{background:#e2a23b}.b-info{background:#5a84e6}.b-muted{background:#a0aec0}
tr.group td{background:#f7f9fc;font-weight:600;color:var(--muted);font-size:12px}
.meter{height:10px;background:#eef1f6;border-radius:5px;overflow:hidden;min-width:200px}
.meter span{display:block;height:100%;background:var(--accent)}
.meter.hot span{background:var(--bad)} .meter.warm span{background:var(--warn)}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
.esc{border-left:4px solid var(--warn);padding:8px 12px;margin:10px 0;background:#fffaf0;border-radius:6px}
.esc.resolved{border-left-color:var(--ok);background:#f3fbf6}
.esc h3{margin:0 0 6px;font-size:14px}
.esc ul{margin:4px 0 4px 18px;padding:0}
.muted{color:var(--muted)}
.path{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin-top:10px}
.path .arrow{color:var(--muted);font-size:11px}
details summary{cursor:pointer;color:var(--accent);font-weight:600}
footer{color:var(--muted);font-size:12px;text-align:center;padding:20px}
"#;

/// Writes an HTML report, one run section at a time.
pub struct HtmlWriter<W: Write> {
    out: W,
    redaction: Redaction,
    runs: usize,
}

impl<W: Write> HtmlWriter<W> {
    /// A report writer: writes the page head with `title` and `subtitle` (escaped).
    pub fn new(mut out: W, redaction: Redaction, title: &str, subtitle: &str) -> Result<Self, ReplayError> {
        let head = format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{}</title><style>{CSS}</style></head><body>\n<header class=\"top\"><h1>{}</h1><div class=\"sub\">{}</div></header>\n<main>\n",
            esc(title),
            esc(title),
            esc(subtitle)
        );
        out.write_all(head.as_bytes()).map_err(|e| ReplayError::io("<html output>", e))?;
        Ok(HtmlWriter { out, redaction, runs: 0 })
    }

    /// Writes one run's section.
    pub fn write_run(&mut self, events: &[Logged]) -> Result<(), ReplayError> {
        self.runs += 1;
        let suffix = if self.runs == 1 { String::new() } else { format!("-{}", self.runs) };
        let section = render_run(events, &self.redaction, &suffix)?;
        self.out.write_all(section.as_bytes()).map_err(|e| ReplayError::io("<html output>", e))
    }

    /// Writes the page's end and returns the output.
    pub fn finish(mut self) -> Result<W, ReplayError> {
        let tail = format!(
            "</main><footer>keel {} · self-contained report: no scripts, no network · {} run(s)</footer></body></html>\n",
            env!("CARGO_PKG_VERSION"),
            self.runs
        );
        self.out.write_all(tail.as_bytes()).map_err(|e| ReplayError::io("<html output>", e))?;
        self.out.flush().map_err(|e| ReplayError::io("<html output>", e))?;
        Ok(self.out)
    }
}

/// One attempt of a task, for the timeline.
struct Attempt {
    revision: u32,
    task: String,
    attempt: u32,
    handler: String,
    model: Option<String>,
    start_us: i64,
    end_us: Option<i64>,
    eval_us: Option<i64>,
    outcome: String,
    verdict: Option<String>,
    cost: u64,
    tokens: u64,
    note: Option<String>,
}

/// A run-level span (planning, waiting for a human).
struct Span {
    label: String,
    start_us: i64,
    end_us: Option<i64>,
    class: &'static str,
    outcome: String,
}

fn rel(us: i64, t0: i64) -> String {
    let ms = (us - t0) as f64 / 1000.0;
    if ms.abs() < 1000.0 {
        format!("+{ms:.1} ms")
    } else {
        format!("+{:.2} s", ms / 1000.0)
    }
}

fn short_time(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => rfc3339(us),
    }
}

fn micros_money(m: u64) -> String {
    format!("{m} µ")
}

fn status_badge(name: &str) -> String {
    format!("<span class=\"badge s-{}\">{}</span>", esc(name), esc(name))
}

fn render_run(events: &[Logged], red: &Redaction, sfx: &str) -> Result<String, ReplayError> {
    let replay = crate::timeline::Replay::new(events.to_vec())?;
    let s = replay.final_state();
    let when = Window { t0: s.accepted_at_us, t1: s.last_event_us.max(s.accepted_at_us + 1) };
    let story = Story::of(events, red)?;
    let mut h = String::new();
    let _ = writeln!(h, "<section class=\"run\" id=\"run-{}\">", s.run);
    render_summary(&mut h, s, events.len(), when.t0);
    render_budget(&mut h, s, when.t0, sfx);
    h.push_str(&render_dag(s, sfx, &story.superseded));
    render_timeline(&mut h, s, &story, when, sfx);
    h.push_str(&render_fsm(&story.transitions, &story.path, sfx));
    render_escalations(&mut h, s, red, &story.resolved_at, when.t0, sfx);
    render_events(&mut h, events, red, when.t0, sfx);
    Ok(h)
}

/// The time a run's report spans: from acceptance to its last event (at least 1 µs).
#[derive(Clone, Copy)]
struct Window {
    t0: i64,
    t1: i64,
}

impl Window {
    /// Where `us` falls in the window, in percent (for the timeline bars).
    fn pos(self, us: i64) -> f64 {
        let span_us = (self.t1 - self.t0).max(1) as f64;
        ((us - self.t0) as f64 / span_us * 100.0).clamp(0.0, 100.0)
    }
}

/// Whether the redaction hides any field of `e`.
fn hidden(red: &Redaction, e: &Event) -> bool {
    e.fields().keys().any(|f| red.applies(e.kind_name(), f))
}

/// What the report draws besides the final state, gathered in one more fold: every
/// attempt, the run-level spans, the path through the run machine.
#[derive(Default)]
struct Story {
    attempts: Vec<Attempt>,
    /// Index in `attempts` of each (task, attempt).
    open: BTreeMap<(String, u32), usize>,
    spans: Vec<Span>,
    /// (from status, to status, event kind) -> how often.
    transitions: BTreeMap<(String, String, String), u64>,
    /// (status, via event kind), each time the status changed.
    path: Vec<(String, String)>,
    superseded: Vec<String>,
    /// When each escalation (by number) was resolved.
    resolved_at: BTreeMap<u32, i64>,
}

impl Story {
    fn of(events: &[Logged], red: &Redaction) -> Result<Story, ReplayError> {
        let mut story = Story::default();
        let mut state: Option<RunState> = None;
        for e in events {
            let before = state.as_ref().map(|x| x.status);
            crate::timeline::step_mut(&mut state, e)?;
            let Some(next) = state.as_ref() else { continue };
            story.note_transition(before, next.status, e.event.kind_name());
            story.observe_run(e);
            story.observe_attempt(e, next, hidden(red, &e.event));
        }
        for sp in story.spans.iter_mut() {
            if sp.end_us.is_none() && sp.class == "b-warn" {
                sp.outcome = "waiting".into();
            }
        }
        Ok(story)
    }

    fn note_transition(&mut self, before: Option<RunStatus>, after: RunStatus, kind: &str) {
        let from = before.map(|b| b.name()).unwrap_or("start").to_owned();
        *self.transitions.entry((from, after.name().to_owned(), kind.to_owned())).or_insert(0) += 1;
        if before != Some(after) {
            self.path.push((after.name().to_owned(), kind.to_owned()));
        }
    }

    /// Planner and human spans, superseded tasks, resolution times.
    fn observe_run(&mut self, e: &Logged) {
        let (spans, superseded, resolved_at) = (&mut self.spans, &mut self.superseded, &mut self.resolved_at);
        match &e.event {
            Event::PlanRequested { revision, .. } | Event::ReplanRequested { revision, .. } => spans.push(Span {
                label: format!("planner · revision {revision}"),
                start_us: e.at_us,
                end_us: None,
                class: "b-info",
                outcome: "planning".into(),
            }),
            Event::Planned { .. } | Event::Replanned { .. } | Event::PlanRejected { .. } => {
                if let Some(sp) = spans.iter_mut().rev().find(|x| x.end_us.is_none() && x.label.starts_with("planner"))
                {
                    sp.end_us = Some(e.at_us);
                    let rejected = matches!(e.event, Event::PlanRejected { .. });
                    sp.outcome = if rejected { "rejected".into() } else { "planned".into() };
                    if rejected {
                        sp.class = "b-bad";
                    }
                }
                if let Event::Replanned { superseded: sup, revision, .. } = &e.event {
                    superseded.extend(sup.iter().map(|t| format!("{t} (before revision {revision})")));
                }
            }
            Event::Escalated(x) => spans.push(Span {
                label: format!("human · escalation #{}", x.number),
                start_us: e.at_us,
                end_us: None,
                class: "b-warn",
                outcome: format!("{:?}", x.cause),
            }),
            Event::HumanResolved { number, decision, .. } => {
                resolved_at.insert(*number, e.at_us);
                if let Some(sp) = spans.iter_mut().rev().find(|x| x.end_us.is_none() && x.label.starts_with("human")) {
                    sp.end_us = Some(e.at_us);
                    sp.outcome = decision.name().to_owned();
                }
            }
            _ => {}
        }
    }

    /// The attempts of tasks: dispatch, answer, failure, evaluation.
    fn observe_attempt(&mut self, e: &Logged, next: &RunState, hidden: bool) {
        let revision = next.revision.unwrap_or(0);
        let (attempts, open) = (&mut self.attempts, &mut self.open);
        match &e.event {
            Event::TaskDispatched { task, attempt, model, .. } => {
                let handler = next
                    .task_index
                    .get(task)
                    .and_then(|&i| next.tasks.get(i))
                    .map(|t| t.spec.handler.clone())
                    .unwrap_or_default();
                open.insert((task.0.clone(), *attempt), attempts.len());
                attempts.push(Attempt {
                    revision,
                    task: task.0.clone(),
                    attempt: *attempt,
                    handler,
                    model: model.clone(),
                    start_us: e.at_us,
                    end_us: None,
                    eval_us: None,
                    outcome: "inflight".into(),
                    verdict: None,
                    cost: 0,
                    tokens: 0,
                    note: None,
                });
            }
            Event::TaskExecuted { task, attempt, usage, cached, .. } => {
                if let Some(a) = open.get(&(task.0.clone(), *attempt)).and_then(|&i| attempts.get_mut(i)) {
                    a.end_us = Some(e.at_us);
                    a.outcome = if *cached { "cached".into() } else { "executed".into() };
                    a.cost += usage.cost_micros;
                    a.tokens += usage.tokens;
                }
            }
            Event::TaskFailed { task, attempt, class, usage, error, .. } => {
                if let Some(a) = open.get(&(task.0.clone(), *attempt)).and_then(|&i| attempts.get_mut(i)) {
                    if a.end_us.is_none() {
                        a.end_us = Some(e.at_us);
                    } else {
                        a.eval_us = Some(e.at_us);
                    }
                    a.outcome = format!("{class:?}").to_lowercase();
                    a.cost += usage.cost_micros;
                    a.tokens += usage.tokens;
                    a.note = Some(if hidden { "(redacted)".into() } else { error.clone() });
                }
            }
            Event::TaskEvaluated { task, attempt, verdict, usage, notes, model } => {
                if let Some(a) = open.get(&(task.0.clone(), *attempt)).and_then(|&i| attempts.get_mut(i)) {
                    a.eval_us = Some(e.at_us);
                    a.verdict = Some(format!("{verdict:?}").to_lowercase());
                    a.cost += usage.cost_micros;
                    a.tokens += usage.tokens;
                    if a.note.is_none() && !hidden && model.is_some() {
                        a.note = Some(notes.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// The summary card: status, workflow, totals.
fn render_summary(h: &mut String, s: &RunState, events: usize, t0: i64) {
    let _ = write!(
        h,
        "<div class=\"card\"><div class=\"runhead\"><span class=\"id\">run {}</span>{}{}<span class=\"muted\">workflow <b>{}</b> v{}</span></div>",
        esc(&s.run.to_string()),
        status_badge(s.status.name()),
        if s.partial { " <span class=\"badge o-transient\">partial result</span>" } else { "" },
        esc(&s.workflow),
        s.workflow_version
    );
    let _ = write!(
        h,
        "<div class=\"kv\"><div>accepted (UTC)<b>{}</b></div><div>last event<b>{}</b></div><div>events<b>{}</b></div><div>plan revision<b>{}</b></div>\
<div>cost<b>{}</b></div><div>tokens<b>{}</b></div><div>calls (llm / tool)<b>{} / {}</b></div><div>retries / replans<b>{} / {}</b></div></div>",
        esc(&short_time(t0)),
        esc(&rel(s.last_event_us, t0)),
        events,
        s.revision.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
        micros_money(s.totals.cost_micros),
        s.totals.tokens,
        s.totals.llm_calls,
        s.totals.tool_calls,
        s.totals.retries,
        s.totals.replans
    );
    if let Some(f) = &s.failure {
        let _ = write!(h, "<p class=\"muted\">failure: {}</p>", esc(f));
    }
    h.push_str("</div>\n");
}

/// The budget card: used vs each limit of the run.
fn render_budget(h: &mut String, s: &RunState, t0: i64, sfx: &str) {
    let _ = write!(h, "<div class=\"card\" id=\"budget{sfx}\"><h2>Budget use <span class=\"hint\">used vs the run's limits</span></h2><table><tr><th>budget</th><th class=\"num\">used</th><th class=\"num\">limit</th><th>share</th></tr>");
    let elapsed_ms = u64::try_from((s.last_event_us - t0).max(0) / 1000).unwrap_or(0);
    let rows: [(&str, keel_engine::BudgetKind, u64, Option<u64>); 7] = [
        ("cost (micro-units)", keel_engine::BudgetKind::Cost, s.totals.cost_micros, s.budget.cost_micros),
        ("tokens", keel_engine::BudgetKind::Tokens, s.totals.tokens, s.budget.tokens),
        ("LLM calls", keel_engine::BudgetKind::LlmCalls, s.totals.llm_calls, s.budget.llm_calls),
        ("tool calls", keel_engine::BudgetKind::ToolCalls, s.totals.tool_calls, s.budget.tool_calls),
        ("retries", keel_engine::BudgetKind::Retries, s.totals.retries, s.budget.retries),
        ("replans", keel_engine::BudgetKind::Replans, s.totals.replans, s.budget.replans),
        ("wall clock (ms)", keel_engine::BudgetKind::Deadline, elapsed_ms, s.budget.deadline_ms),
    ];
    for (label, kind, used, limit) in rows {
        budget_row(h, s, label, kind, used, limit);
    }
    let _ = writeln!(
        h,
        "</table><p class=\"muted\">On exhaustion this run {}.</p></div>",
        match s.on_exhausted {
            keel_engine::ExhaustionPolicy::Partial => "finishes with a partial result",
            keel_engine::ExhaustionPolicy::Escalate => "escalates to a human",
        }
    );
}

fn budget_row(h: &mut String, s: &RunState, label: &str, kind: keel_engine::BudgetKind, used: u64, limit: Option<u64>) {
    let exhausted = s.exhausted == Some(kind);
    let (share, pct) = match limit {
        Some(l) if l > 0 => {
            let p = (used as f64 / l as f64 * 100.0).min(100.0);
            (format!("{:.0}%", used as f64 / l as f64 * 100.0), p)
        }
        Some(_) => ("-".into(), if used > 0 { 100.0 } else { 0.0 }),
        None => ("no limit".into(), 0.0),
    };
    let heat = if exhausted || pct >= 100.0 {
        " hot"
    } else if pct >= 75.0 {
        " warm"
    } else {
        ""
    };
    let _ = write!(
        h,
        "<tr><td>{label}{}</td><td class=\"num\">{used}</td><td class=\"num\">{}</td><td><div style=\"display:flex;gap:10px;align-items:center\"><div class=\"meter{heat}\"><span style=\"width:{pct:.1}%\"></span></div><span class=\"muted\">{share}</span></div></td></tr>",
        if exhausted { " <span class=\"badge s-Failed\">exhausted</span>" } else { "" },
        limit.map(|l| l.to_string()).unwrap_or_else(|| "—".into())
    );
}

/// The timeline card: run-level spans, then every attempt by plan revision, then the
/// skipped tasks.
fn render_timeline(h: &mut String, s: &RunState, story: &Story, when: Window, sfx: &str) {
    let Window { t0, t1 } = when;
    let _ = write!(
        h,
        "<div class=\"card\" id=\"timeline{sfx}\"><h2>Timeline <span class=\"hint\">tasks and attempts, from acceptance ({}) to the last event ({})</span></h2>\
<table><tr><th>task</th><th>attempt</th><th>outcome</th><th class=\"num\">duration</th><th class=\"num\">cost</th><th style=\"width:42%\">when</th></tr>",
        esc(&rfc3339(t0)),
        esc(&rel(t1, t0))
    );
    if !story.spans.is_empty() {
        h.push_str("<tr class=\"group\"><td colspan=\"6\">run</td></tr>");
        for sp in &story.spans {
            let end = sp.end_us.unwrap_or(t1);
            let _ = write!(
                h,
                "<tr class=\"span-row\"><td>{}</td><td></td><td><span class=\"badge o-inflight\">{}</span></td><td class=\"num\">{}</td><td></td><td><div class=\"track\"><div class=\"bar {}\" style=\"left:{:.2}%;width:{:.2}%\" title=\"{}\"></div></div></td></tr>",
                esc(&sp.label),
                esc(&sp.outcome),
                esc(&dur(sp.start_us, end)),
                sp.class,
                when.pos(sp.start_us),
                (when.pos(end) - when.pos(sp.start_us)).max(0.4),
                esc(&sp.label)
            );
        }
    }
    let mut last_rev: Option<u32> = None;
    for a in &story.attempts {
        if last_rev != Some(a.revision) {
            let _ = write!(h, "<tr class=\"group\"><td colspan=\"6\">plan revision {}</td></tr>", a.revision);
            last_rev = Some(a.revision);
        }
        attempt_row(h, a, when);
    }
    let skipped: Vec<&keel_engine::TaskState> = s.tasks.iter().filter(|t| t.status == TaskStatus::Skipped).collect();
    for t in skipped {
        let _ = write!(
            h,
            "<tr class=\"task-row\" data-task=\"{}\"><td><b>{}</b><div class=\"muted mono\">{}</div></td><td class=\"num\">{}</td><td><span class=\"badge o-skipped\">skipped</span><div class=\"muted\" style=\"font-size:12px\">{}</div></td><td></td><td></td><td></td></tr>",
            esc(&t.spec.id.0),
            esc(&t.spec.id.0),
            esc(&t.spec.handler),
            t.attempt,
            esc(t.skip_reason.as_deref().unwrap_or(""))
        );
    }
    h.push_str("</table></div>\n");
}

fn attempt_row(h: &mut String, a: &Attempt, when: Window) {
    let t1 = when.t1;
    let end = a.eval_us.or(a.end_us).unwrap_or(t1);
    let bar = match (a.outcome.as_str(), a.verdict.as_deref()) {
        (_, Some("hard" | "critical")) => "b-bad",
        ("fatal" | "semantic", _) => "b-bad",
        ("transient", _) => "b-warn",
        ("inflight", _) => "b-muted",
        _ => "b-ok",
    };
    let outcome = match &a.verdict {
        Some(v) => format!(
            "<span class=\"badge o-{}\">{}</span> <span class=\"badge o-{v}\">{v}</span>",
            esc(&a.outcome),
            esc(&a.outcome)
        ),
        None => format!("<span class=\"badge o-{}\">{}</span>", esc(&a.outcome), esc(&a.outcome)),
    };
    let title = format!(
        "{} attempt {} · {}{} · {}",
        a.task,
        a.attempt,
        a.handler,
        a.model.as_ref().map(|m| format!(" on {m}")).unwrap_or_default(),
        a.note.clone().unwrap_or_default()
    );
    let _ = write!(
        h,
        "<tr class=\"task-row\" data-task=\"{}\"><td><b>{}</b><div class=\"muted mono\">{}{}</div></td><td class=\"num\">{}</td><td>{outcome}{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
<td><div class=\"track\"><div class=\"bar {bar}\" style=\"left:{:.2}%;width:{:.2}%\" title=\"{}\"></div></div></td></tr>",
        esc(&a.task),
        esc(&a.task),
        esc(&a.handler),
        a.model.as_ref().map(|m| format!(" · {}", esc(m))).unwrap_or_default(),
        a.attempt,
        a.note.as_ref().map(|n| format!("<div class=\"muted\" style=\"font-size:12px\">{}</div>", esc(n))).unwrap_or_default(),
        esc(&dur(a.start_us, end)),
        a.cost,
        when.pos(a.start_us),
        (when.pos(end) - when.pos(a.start_us)).max(0.4),
        esc(&title)
    );
}

/// The escalations card: what a human was asked and what they decided.
fn render_escalations(
    h: &mut String,
    s: &RunState,
    red: &Redaction,
    resolved_at: &BTreeMap<u32, i64>,
    t0: i64,
    sfx: &str,
) {
    let _ = write!(h, "<div class=\"card\" id=\"escalations{sfx}\"><h2>Escalations <span class=\"hint\">what a human was asked and what they decided</span></h2>");
    if s.escalations.is_empty() {
        h.push_str("<p class=\"muted\">No escalation: the run never needed a human.</p>");
    }
    let why_hidden = red.applies("Escalated", "why");
    for e in &s.escalations {
        escalation_block(h, s, e, why_hidden, resolved_at, t0);
    }
    h.push_str("</div>\n");
}

fn escalation_block(
    h: &mut String,
    s: &RunState,
    e: &keel_engine::EscalationState,
    why_hidden: bool,
    resolved_at: &BTreeMap<u32, i64>,
    t0: i64,
) {
    let x = &e.escalation;
    let resolved = e.resolution.is_some();
    let _ = write!(
        h,
        "<div class=\"esc{}\"><h3>#{} · {:?}{} <span class=\"muted\" style=\"font-weight:400\">at {}{}</span></h3>",
        if resolved { " resolved" } else { "" },
        x.number,
        x.cause,
        x.task.as_ref().map(|t| format!(" · task {}", esc(&t.0))).unwrap_or_default(),
        esc(&rel(e.escalated_at_us, t0)),
        if e.notified { " · notified" } else { " · not yet notified" }
    );
    let _ = write!(h, "<div><b>Why:</b> {}</div>", if why_hidden { "(redacted)".to_owned() } else { esc(&x.why) });
    let _ = write!(
        h,
        "<div><b>Question:</b> {}</div><div><b>Options:</b> {}</div>",
        esc(&x.question),
        esc(&x.options.join(", "))
    );
    if !x.attempted.is_empty() {
        let _ = write!(
            h,
            "<div><b>Attempted:</b><ul>{}</ul></div>",
            x.attempted.iter().map(|l| format!("<li>{}</li>", esc(l))).collect::<String>()
        );
    }
    if !x.alternatives_tried.is_empty() {
        let _ = write!(
            h,
            "<div><b>Alternatives tried:</b><ul>{}</ul></div>",
            x.alternatives_tried.iter().map(|l| format!("<li>{}</li>", esc(l))).collect::<String>()
        );
    }
    match &e.resolution {
        Some((decision, by, defaulted)) => {
            let _ = write!(
                h,
                "<div><b>Resolution:</b> <span class=\"badge s-Completed\">{}</span> by {}{}{}</div>",
                esc(decision.name()),
                esc(by),
                if *defaulted { " (deadline default)" } else { "" },
                resolved_at.get(&x.number).map(|t| format!(" at {}", esc(&rel(*t, t0)))).unwrap_or_default()
            );
        }
        None if s.status == RunStatus::AwaitingHuman => {
            let _ = write!(h, "<div><b>Resolution:</b> <span class=\"badge s-AwaitingHuman\">waiting</span> <span class=\"mono\">keel resolve {} --decision …</span></div>", s.run);
        }
        None => h.push_str("<div><b>Resolution:</b> none</div>"),
    }
    h.push_str("</div>");
}

/// The event log card (folded), and the end of the run's section.
fn render_events(h: &mut String, events: &[Logged], red: &Redaction, t0: i64, sfx: &str) {
    let _ = write!(h, "<div class=\"card\" id=\"events{sfx}\"><details><summary>Event log ({} events)</summary><table><tr><th class=\"num\">seq</th><th>time</th><th>kind</th><th>detail</th></tr>", events.len());
    for e in events {
        let _ = write!(
            h,
            "<tr><td class=\"num\">{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            esc(&rel(e.at_us, t0)),
            esc(e.event.kind_name()),
            esc(&line_of(red, &e.event))
        );
    }
    h.push_str("</table></details></div>\n</section>\n");
}

fn line_of(red: &Redaction, e: &Event) -> String {
    if hidden(red, e) {
        format!("{} (fields redacted)", e.kind_name())
    } else {
        event_line(e)
    }
}

fn dur(a: i64, b: i64) -> String {
    let ms = (b - a).max(0) as f64 / 1000.0;
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

fn node_colors(st: TaskStatus) -> (&'static str, &'static str, &'static str) {
    // (fill, stroke, text)
    match st {
        TaskStatus::Done => ("#e3f6ea", "#38a169", "#17693d"),
        TaskStatus::Skipped | TaskStatus::Superseded => ("#eef0f4", "#a0aec0", "#4a5568"),
        TaskStatus::Rejected | TaskStatus::AttemptFailed => ("#fde8e8", "#e05252", "#9b1c1c"),
        TaskStatus::RetryScheduled => ("#fff4e0", "#e2a23b", "#8a5300"),
        _ => ("#e6eefc", "#5a84e6", "#23439a"),
    }
}

/// Each task's column in the plan drawing: 0 without dependencies, else one more than its
/// deepest dependency (plans are acyclic; the loop is bounded anyway).
fn task_depths(s: &RunState) -> Vec<usize> {
    let n = s.tasks.len();
    let mut depth = vec![0usize; n];
    for _ in 0..n {
        let mut changed = false;
        for (i, t) in s.tasks.iter().enumerate() {
            let d = t
                .spec
                .depends_on
                .iter()
                .filter_map(|d| s.task_index.get(d).and_then(|&j| depth.get(j)))
                .map(|x| x + 1)
                .max()
                .unwrap_or(0);
            if let Some(slot) = depth.get_mut(i) {
                if *slot != d {
                    *slot = d;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

fn render_dag(s: &RunState, sfx: &str, superseded: &[String]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<div class=\"card\" id=\"dag{sfx}\"><h2>Plan <span class=\"hint\">{}: tasks laid out by dependency depth, coloured by final status</span></h2>",
        s.revision.map(|r| format!("revision {r}")).unwrap_or_else(|| "no plan recorded".into())
    );
    if s.tasks.is_empty() {
        h.push_str("<p class=\"muted\">The run has no plan.</p></div>\n");
        return h;
    }
    let depth = task_depths(s);
    let (w, hgt, gx, gy, pad) = (164.0, 58.0, 50.0, 22.0, 16.0);
    let mut row_in_layer: BTreeMap<usize, usize> = BTreeMap::new();
    let xy: Vec<(f64, f64)> = depth
        .iter()
        .map(|d| {
            let r = row_in_layer.entry(*d).or_insert(0);
            let at = (pad + *d as f64 * (w + gx), pad + *r as f64 * (hgt + gy));
            *r += 1;
            at
        })
        .collect();
    let layers = depth.iter().max().copied().unwrap_or(0) + 1;
    let rows = row_in_layer.values().max().copied().unwrap_or(1);
    let width = pad * 2.0 + layers as f64 * w + (layers - 1) as f64 * gx;
    let height = pad * 2.0 + rows as f64 * hgt + (rows.saturating_sub(1)) as f64 * gy;
    let _ = write!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" style=\"max-width:100%;height:auto\" role=\"img\" aria-label=\"plan DAG\">\
<defs><marker id=\"arrow{sfx}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"9\" markerHeight=\"9\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#7a869a\"/></marker></defs>"
    );
    for (i, t) in s.tasks.iter().enumerate() {
        for d in &t.spec.depends_on {
            let from = s.task_index.get(d).and_then(|&j| xy.get(j));
            if let (Some(&(fx, fy)), Some(&(tx, ty))) = (from, xy.get(i)) {
                let (x1, y1) = (fx + w, fy + hgt / 2.0);
                let (x2, y2) = (tx, ty + hgt / 2.0);
                let mx = (x1 + x2) / 2.0;
                let _ = write!(
                    h,
                    "<path class=\"edge\" data-from=\"{}\" data-to=\"{}\" d=\"M{x1:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {:.1},{y2:.1}\" fill=\"none\" stroke=\"#7a869a\" stroke-width=\"1.6\" marker-end=\"url(#arrow{sfx})\"/>",
                    esc(&d.0),
                    esc(&t.spec.id.0),
                    x2 - 2.0
                );
            }
        }
    }
    for (t, &(x, y)) in s.tasks.iter().zip(&xy) {
        dag_node(&mut h, t, x, y, (w, hgt));
    }
    h.push_str("</svg>");
    if !superseded.is_empty() {
        let _ = write!(h, "<p class=\"muted\">Superseded by replans: {}</p>", esc(&superseded.join(", ")));
    }
    h.push_str("</div>\n");
    h
}

/// One task of the plan drawing at (x, y), `size` = (width, height), coloured by status.
fn dag_node(h: &mut String, t: &keel_engine::TaskState, x: f64, y: f64, size: (f64, f64)) {
    let (w, hgt) = size;
    let (fill, stroke, ink) = node_colors(t.status);
    let kind = format!("{:?}", t.spec.kind).to_lowercase();
    let crit = if t.spec.critical { "critical" } else { "optional" };
    let dash = if t.status == TaskStatus::Skipped { " stroke-dasharray=\"5 3\"" } else { "" };
    let _ = write!(
        h,
        "<g class=\"node\" data-task=\"{id}\"><title>{id}: {st}, {att} attempt(s)</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w}\" height=\"{hgt}\" rx=\"9\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"1.5\"{dash}/>\
<text x=\"{tx:.1}\" y=\"{ty1:.1}\" font-size=\"13\" font-weight=\"600\" fill=\"{ink}\">{id}</text>\
<text x=\"{tx:.1}\" y=\"{ty2:.1}\" font-size=\"11\" fill=\"#5c667a\">{kind} · {crit} · {att} att.</text>\
<text x=\"{tx:.1}\" y=\"{ty3:.1}\" font-size=\"11\" font-weight=\"600\" fill=\"{ink}\">{st}</text></g>",
        id = esc(&t.spec.id.0),
        st = t.status.name(),
        att = t.attempt,
        tx = x + 12.0,
        ty1 = y + 19.0,
        ty2 = y + 35.0,
        ty3 = y + 50.0,
    );
}

/// Fixed positions of the run states in the FSM drawing.
fn state_pos(name: &str) -> (f64, f64) {
    match name {
        "start" => (30.0, 170.0),
        "Accepted" => (140.0, 170.0),
        "Planning" => (335.0, 170.0),
        "Running" => (540.0, 170.0),
        "AwaitingHuman" => (540.0, 300.0),
        "Completed" => (770.0, 60.0),
        "Failed" => (770.0, 170.0),
        "Cancelled" => (770.0, 300.0),
        _ => (0.0, 0.0),
    }
}

/// Curvature per edge (perpendicular offset of the quadratic control point from the
/// midpoint), chosen so that no edge crosses a state box and paired edges separate.
fn bend(from: &str, to: &str) -> f64 {
    match (from, to) {
        ("Planning", "Running") | ("Running", "Planning") => -26.0,
        ("Running", "AwaitingHuman") | ("AwaitingHuman", "Running") => -26.0,
        ("Planning", "Failed") => -140.0,
        ("Accepted", "Cancelled") => 250.0,
        ("Planning", "Cancelled") => 40.0,
        _ => 0.0,
    }
}

fn render_fsm(transitions: &BTreeMap<(String, String, String), u64>, path: &[(String, String)], sfx: &str) -> String {
    let mut taken: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((f, t, _), n) in transitions {
        *taken.entry((f.clone(), t.clone())).or_insert(0) += n;
    }
    let mut edges: Vec<(String, String)> = RUN_TABLE
        .iter()
        .map(|(f, _, to)| (f.map(|s| s.name()).unwrap_or("start").to_owned(), to.name().to_owned()))
        .collect();
    edges.sort();
    edges.dedup();
    let visited: std::collections::BTreeSet<&str> = path.iter().map(|(s, _)| s.as_str()).collect();
    let mut h = String::new();
    let _ = write!(
        h,
        "<div class=\"card\" id=\"fsm{sfx}\"><h2>Run state machine <span class=\"hint\">every transition of the table; the path this run took is highlighted, with counts</span></h2>\
<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"400\" viewBox=\"0 0 860 400\" style=\"max-width:100%;height:auto\" role=\"img\" aria-label=\"run state machine\">\
<defs><marker id=\"fa{sfx}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"9\" markerHeight=\"9\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#b4bccb\"/></marker>\
<marker id=\"fb{sfx}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"11\" markerHeight=\"11\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#2f5bd3\"/></marker></defs>"
    );
    // Draw untaken edges first, taken ones on top.
    let mut ordered: Vec<&(String, String)> = edges.iter().collect();
    ordered.sort_by_key(|e| taken.contains_key(*e));
    for e in ordered {
        let n = taken.get(e).copied().unwrap_or(0);
        fsm_edge(&mut h, e.0.as_str(), e.1.as_str(), n, sfx);
    }
    fsm_states(&mut h, &visited);
    fsm_path_and_table(&mut h, transitions, path);
    h
}

/// The size of a state's box in the run machine drawing.
const FSM_BOX: (f64, f64) = (128.0, 38.0);

/// One edge of the run machine, `n` times taken by this run.
fn fsm_edge(h: &mut String, f: &str, t: &str, n: u64, sfx: &str) {
    let (bw, bh) = FSM_BOX;
    let (stroke, width, marker) =
        if n > 0 { ("#2f5bd3", 2.6, format!("fb{sfx}")) } else { ("#c3cad6", 1.3, format!("fa{sfx}")) };
    let (x1, y1) = state_pos(f);
    let (x2, y2) = state_pos(t);
    let cls = if n > 0 { "edge taken" } else { "edge" };
    if f == t {
        // Self loop above the box (below for AwaitingHuman, whose top has the edges to Running).
        let dir = if f == "AwaitingHuman" { 1.0 } else { -1.0 };
        let (lx, ly) = (x1 - 18.0, y1 + dir * bh / 2.0);
        let _ = write!(
            h,
            "<path class=\"{cls}\" data-from=\"{f}\" data-to=\"{t}\" d=\"M{lx:.1},{ly:.1} C{:.1},{:.1} {:.1},{:.1} {:.1},{ly:.1}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{width}\" marker-end=\"url(#{marker})\"/>",
            lx - 10.0,
            ly + dir * 40.0,
            lx + 46.0,
            ly + dir * 40.0,
            lx + 36.0
        );
        if n > 0 {
            let _ = write!(h, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#2f5bd3\" font-weight=\"600\" text-anchor=\"middle\">×{n}</text>", x1 + 42.0, ly + dir * 26.0);
        }
        return;
    }
    // Clip the line to the box borders.
    let clip = |cx: f64, cy: f64, ox: f64, oy: f64| -> (f64, f64) {
        let (dx, dy) = (ox - cx, oy - cy);
        if dx == 0.0 && dy == 0.0 {
            return (cx, cy);
        }
        let hw = if f == "start" && cx == state_pos("start").0 { 6.0 } else { bw / 2.0 };
        let sx = if dx != 0.0 { hw / dx.abs() } else { f64::INFINITY };
        let sy = if dy != 0.0 { (bh / 2.0) / dy.abs() } else { f64::INFINITY };
        let s = sx.min(sy);
        (cx + dx * s, cy + dy * s)
    };
    let b = bend(f, t);
    let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
    let len = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt().max(1.0);
    let (nx, ny) = (-(y2 - y1) / len, (x2 - x1) / len);
    let (cx, cy) = (mx + nx * b, my + ny * b);
    let (sx, sy) = clip(x1, y1, cx, cy);
    let (ex, ey) = if t == "start" { (x2, y2) } else { clip(x2, y2, cx, cy) };
    let _ = write!(
        h,
        "<path class=\"{cls}\" data-from=\"{f}\" data-to=\"{t}\" d=\"M{sx:.1},{sy:.1} Q{cx:.1},{cy:.1} {ex:.1},{ey:.1}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"{width}\" marker-end=\"url(#{marker})\"/>"
    );
    if n > 0 && f != "start" {
        let (lx, ly) = (0.25 * sx + 0.5 * cx + 0.25 * ex, 0.25 * sy + 0.5 * cy + 0.25 * ey);
        let _ = write!(h, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"28\" height=\"16\" rx=\"8\" fill=\"#fff\" stroke=\"#2f5bd3\"/><text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#2f5bd3\" font-weight=\"600\" text-anchor=\"middle\">×{n}</text>", lx - 14.0, ly - 8.0, ly + 4.0);
    }
}

/// The states of the run machine; those this run visited are highlighted.
fn fsm_states(h: &mut String, visited: &std::collections::BTreeSet<&str>) {
    let (bw, bh) = FSM_BOX;
    let _ = write!(
        h,
        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"6\" fill=\"#18213a\"/>",
        state_pos("start").0,
        state_pos("start").1
    );
    for st in RunStatus::ALL {
        let name = st.name();
        let (x, y) = state_pos(name);
        let on = visited.contains(name);
        let (fill, stroke, ink) =
            if on { ("#e6eefc", "#2f5bd3", "#1d3b8f") } else { ("#f7f8fb", "#c3cad6", "#8a94a6") };
        let _ = write!(
            h,
            "<g class=\"state{}\" data-state=\"{name}\"><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw}\" height=\"{bh}\" rx=\"19\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"{}\"/><text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"13\" font-weight=\"600\" fill=\"{ink}\" text-anchor=\"middle\">{name}</text></g>",
            if on { " visited" } else { "" },
            x - bw / 2.0,
            y - bh / 2.0,
            if on { 2.0 } else { 1.2 },
            y + 4.5
        );
    }
}

/// The path the run took, then every transition with its count.
fn fsm_path_and_table(
    h: &mut String,
    transitions: &BTreeMap<(String, String, String), u64>,
    path: &[(String, String)],
) {
    h.push_str("</svg><div class=\"path\"><b style=\"margin-right:6px\">Path taken:</b>");
    for (i, (stname, via)) in path.iter().enumerate() {
        if i > 0 {
            let _ = write!(h, "<span class=\"arrow\">— {} →</span>", esc(via));
        }
        h.push_str(&status_badge(stname));
    }
    h.push_str("</div><table style=\"margin-top:12px\"><tr><th>from</th><th>to</th><th>event</th><th class=\"num\">times</th></tr>");
    for ((f, t, k), n) in transitions {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"num\">{n}</td></tr>",
            esc(f),
            esc(t),
            esc(k)
        );
    }
    h.push_str("</table></div>\n");
}
