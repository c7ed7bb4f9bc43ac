#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]
//! The demo: a simulated support-ticket agent (no network).
//!
//! A planner, seven task handlers and an evaluator that behave like an LLM agent
//! answering support tickets. Every outcome is drawn deterministically from (the batch
//! seed, the request index, the task, the attempt, and what the plan asked for) — never
//! from the run id or the time — so a run that crashed and resumed ends exactly as an
//! uninterrupted one. Request `index` plays scenario `SCENARIOS[index % 8]`, so any batch
//! of 8 or more runs shows every one.
//!
//! Tasks: `classify` (llm, extraction, cacheable), `fetch_account` (data fetch),
//! `enrich_sentiment` (llm, non-critical), `draft_reply` (llm, reasoning, output schema,
//! evaluated), `check_policy` (tool, critical), `issue_refund` (tool, critical, refund
//! tickets only), `send_reply` (tool).

pub mod fan_in;

use keel_engine::api::*;
use keel_engine::event::PlanReason;
use keel_engine::fsm::RunStatus;
use keel_engine::model::*;
use keel_engine::EngineError;
use keel_engine::{Engine, EngineBuilder, IdleReport, Request, WorkflowType};
use keel_store::RunId;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Name of the demo's workflow type.
pub const WORKFLOW: &str = "support_ticket";

/// The scenarios, by `index % 8`.
pub const SCENARIOS: &[&str] = &[
    "happy_path",
    "transient_retry",
    "evaluator_replan",
    "schema_gate_replan",
    "degraded_partial",
    "human_escalation",
    "retries_exhausted_replan",
    "budget_exhausted",
];

/// Refunds above this need a human.
pub const REFUND_LIMIT_CENTS: u64 = 10_000;

/// Cost budget of the `budget_exhausted` scenario's runs (micro-units): enough for the
/// plan's estimate, not for a retry after a failed, costly LLM call.
pub const TIGHT_BUDGET_MICROS: u64 = 11_500;

/// Knobs of the simulated handlers.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Each handler sleeps this long, to look real (0 in tests).
    pub latency_ms: u64,
    /// If set, every handler invocation appends a line
    /// `tag \t run \t task \t attempt \t attempt_key` to this file (crash tests).
    pub invocation_log: Option<PathBuf>,
    /// First column of the invocation log lines.
    pub invocation_tag: String,
    /// If set, the handlers with a side effect ([`SIDE_EFFECT_TASKS`]: issuing a refund,
    /// sending the reply) perform it here, deduplicated on the call's effect key as
    /// docs/ENGINE.md tells handlers to: unless the key is already in the file, they append
    /// `effect_key \t run \t task \t attempt` and fsync it, then answer 20 ms later than
    /// the other handlers (crash tests count the effects; the delay is the window a kill
    /// must not turn into a second effect).
    pub effects_log: Option<PathBuf>,
}

/// With an effects log, a side-effecting handler answers this much later than the others.
const EFFECT_ANSWER_DELAY_MS: u64 = 20;

/// The demo tasks whose handlers have a side effect (see [`DemoOptions::effects_log`]).
pub const SIDE_EFFECT_TASKS: [&str; 2] = ["issue_refund", "send_reply"];

/// Serialises the demo handlers' effects-log check-and-append within one process.
static EFFECTS_LOG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Performs `call`'s side effect once per effect key: appends a line to `path` and fsyncs
/// it unless the key is already there.
fn perform_effect(path: &std::path::Path, call: &TaskCall) -> std::io::Result<()> {
    let _guard = EFFECTS_LOG.lock().unwrap_or_else(|p| p.into_inner());
    let done = match std::fs::read_to_string(path) {
        Ok(text) => text.lines().any(|l| l.split('\t').next() == Some(call.effect_key.as_str())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if done {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(format!("{}\t{}\t{}\t{}\n", call.effect_key, call.run, call.task, call.attempt).as_bytes())?;
    f.sync_all()
}

/// The scenario request `index` plays.
pub fn scenario(index: u64) -> &'static str {
    pick(SCENARIOS, index)
}

fn scenario_no(index: u64) -> u64 {
    index % SCENARIOS.len() as u64
}

/// The entry of `options` that `roll` picks (`roll` modulo their number; "" if there is
/// none).
fn pick(options: &[&'static str], roll: u64) -> &'static str {
    let n = u64::try_from(options.len()).unwrap_or(u64::MAX).max(1);
    usize::try_from(roll % n).ok().and_then(|i| options.get(i)).copied().unwrap_or("")
}

/// A pseudo-random number from the arguments (SHA-256; stable across platforms).
fn roll(seed: u64, index: u64, what: &str, attempt: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(b"keel/demo");
    h.update(seed.to_le_bytes());
    h.update(index.to_le_bytes());
    h.update((what.len() as u64).to_le_bytes());
    h.update(what.as_bytes());
    h.update(attempt.to_le_bytes());
    let d: [u8; 32] = h.finalize().into();
    u64::from_le_bytes(d.first_chunk::<8>().copied().unwrap_or_default())
}

const TOPICS: [&str; 3] = ["billing", "shipping", "login"];

fn topic_of(seed: u64, index: u64) -> &'static str {
    if scenario_no(index) == 5 {
        return "refund";
    }
    pick(&TOPICS, roll(seed, index, "topic", 0))
}

/// The demo's request number `index` of the batch `seed`: idempotency key
/// `demo-{seed}-{index}` (so running a batch twice adds no runs), run seed derived from
/// both, and the `budget_exhausted` scenario's tight cost budget.
pub fn request(seed: u64, index: u64) -> Request {
    let topic = topic_of(seed, index);
    let mut ticket = json!({
        "id": format!("T-{seed}-{index}"),
        "customer": format!("C-{}", roll(seed, index, "customer", 0) % 10_000),
        "subject": format!("Question about {topic}"),
        "body": format!("Hello, I have a {topic} problem with order #{} (ticket {index}).", roll(seed, index, "order", 0) % 100_000),
    });
    if topic == "refund" {
        if let Some(t) = ticket.as_object_mut() {
            t.insert("refund_cents".to_owned(), json!(25_000 + roll(seed, index, "refund", 0) % 10_000));
        }
    }
    let budget =
        (scenario_no(index) == 7).then(|| Budget { cost_micros: Some(TIGHT_BUDGET_MICROS), ..default_budget() });
    Request {
        workflow: WORKFLOW.to_owned(),
        input: json!({ "index": index, "ticket": ticket }),
        idempotency_key: Some(format!("demo-{seed}-{index}")),
        priority: 0,
        seed: Some(roll(seed, index, "run-seed", 0)),
        budget,
    }
}

fn default_budget() -> Budget {
    Budget {
        cost_micros: Some(60_000),
        tokens: None,
        llm_calls: Some(12),
        tool_calls: Some(20),
        retries: Some(6),
        replans: None,
        deadline_ms: None,
    }
}

/// The demo's workflow type.
pub fn workflow() -> WorkflowType {
    workflow_with(DemoOptions::default())
}

fn workflow_with(opts: DemoOptions) -> WorkflowType {
    let mut w = WorkflowType::new(WORKFLOW, Arc::new(DemoPlanner), Arc::new(DemoEvaluator { opts }));
    w.version = 1;
    w.input_schema = Some(json!({
        "type": "object",
        "required": ["index", "ticket"],
        "properties": {
            "index": { "type": "integer", "minimum": 0 },
            "ticket": {
                "type": "object",
                "required": ["id", "customer", "subject", "body"],
                "properties": {
                    "id": { "type": "string", "minLength": 1 },
                    "customer": { "type": "string" },
                    "subject": { "type": "string", "minLength": 1 },
                    "body": { "type": "string" },
                    "refund_cents": { "type": "integer", "minimum": 0 }
                }
            }
        }
    }));
    w.budget = default_budget();
    w.on_exhausted = ExhaustionPolicy::Partial;
    w.routes = vec![
        (Complexity::Extraction, "small-model".to_owned()),
        (Complexity::Reasoning, "large-model".to_owned()),
        (Complexity::Evaluation, "small-model".to_owned()),
    ];
    w.evaluator_model = Some("small-model".to_owned());
    w.max_concurrent_runs = 8;
    w.max_parallel_tasks = 3;
    w.dedup_window_ms = 30 * 24 * 3600 * 1000;
    w
}

/// Every handler name of the demo.
pub const HANDLERS: &[&str] =
    &["classify", "fetch_account", "enrich_sentiment", "draft_reply", "check_policy", "issue_refund", "send_reply"];

/// Registers the demo's workflow type and handlers (no handler latency).
pub fn register(builder: EngineBuilder) -> EngineBuilder {
    register_with(builder, DemoOptions::default())
}

/// [`register`] with options.
pub fn register_with(builder: EngineBuilder, opts: DemoOptions) -> EngineBuilder {
    let mut b = builder.workflow(workflow_with(opts.clone()));
    for (name, handler) in handlers_with(opts) {
        b = b.handler(name, handler);
    }
    b
}

/// The demo's task handlers by name (no latency), e.g. for a fork's live calls.
pub fn handlers() -> Vec<(&'static str, Arc<dyn TaskHandler>)> {
    handlers_with(DemoOptions::default())
}

fn handlers_with(opts: DemoOptions) -> Vec<(&'static str, Arc<dyn TaskHandler>)> {
    HANDLERS
        .iter()
        .map(|name| {
            let h: Arc<dyn TaskHandler> = Arc::new(DemoHandler { opts: opts.clone() });
            (*name, h)
        })
        .collect()
}

fn index_of(input: &Json) -> u64 {
    input.value().ok().and_then(|v| v.get("index").and_then(Value::as_u64)).unwrap_or(0)
}

fn ticket_of(input: &Json) -> Value {
    input.value().ok().and_then(|v| v.get("ticket").cloned()).unwrap_or(Value::Null)
}

fn spec(id: &str, kind: TaskKind, input: Value, deps: &[&str]) -> TaskSpec {
    let mut t = TaskSpec::new(id, kind, id).with_deps(deps).with_input(&input);
    t.retry = RetryPolicy { max_attempts: 3, backoff_base_ms: 20, backoff_max_ms: 200, jitter_ms: 15 };
    t
}

/// The plan for request `index` at `revision` (what the simulated planner "decides").
fn plan_for(input: &Json, revision: u32, reason: &PlanReason) -> Plan {
    let index = index_of(input);
    let sc = scenario_no(index);
    let ticket = ticket_of(input);
    let refund = ticket.get("refund_cents").and_then(Value::as_u64);
    let text = format!(
        "{} {}",
        ticket.get("subject").and_then(Value::as_str).unwrap_or(""),
        ticket.get("body").and_then(Value::as_str).unwrap_or("")
    );
    let customer = ticket.get("customer").cloned().unwrap_or(Value::Null);
    // What a replan changes: a different drafting style, another data source.
    let style = match (revision, sc) {
        (0, _) => "concise",
        (_, 2) => "cite_policy",
        (_, 3) => "strict_format",
        _ => "careful",
    };
    let source = if revision > 0 && sc == 6 { "replica" } else { "primary" };
    let hint = match reason {
        PlanReason::HumanHint { hint, .. } => Some(hint.clone()),
        _ => None,
    };

    let mut classify = spec("classify", TaskKind::Llm, json!({ "text": text }), &[]);
    classify.complexity = Some(Complexity::Extraction);
    classify.cacheable = true;
    classify.cost_estimate_micros = 2_000;
    classify.token_estimate = 800;

    let fetch = spec("fetch_account", TaskKind::DataFetch, json!({ "customer": customer, "source": source }), &[]);

    let mut enrich = spec("enrich_sentiment", TaskKind::Llm, json!({ "text": text }), &[]);
    enrich.complexity = Some(Complexity::Extraction);
    enrich.critical = false;
    enrich.cost_estimate_micros = 1_000;
    enrich.token_estimate = 400;

    let mut draft_input = json!({ "style": style });
    if let Some(h) = &hint {
        if let Some(d) = draft_input.as_object_mut() {
            d.insert("hint".to_owned(), json!(h));
        }
    }
    let mut draft = spec("draft_reply", TaskKind::Llm, draft_input, &["classify", "fetch_account"]);
    draft.complexity = Some(Complexity::Reasoning);
    draft.cost_estimate_micros = 8_000;
    draft.token_estimate = 3_000;
    draft.success_criteria = Some("the reply answers the customer's actual question".to_owned());
    draft.output_schema = Some(Json::new(&json!({
        "type": "object",
        "required": ["reply", "tone", "answers"],
        "properties": {
            "reply": { "type": "string", "minLength": 1 },
            "tone": { "type": "string" },
            "answers": { "type": "string" }
        }
    })));

    let mut policy = spec(
        "check_policy",
        TaskKind::Tool,
        json!({ "refund_cents": refund.unwrap_or(0), "limit_cents": REFUND_LIMIT_CENTS }),
        &["draft_reply", "fetch_account"],
    );
    if refund.is_some() {
        policy.success_criteria = Some(format!("refund within the {REFUND_LIMIT_CENTS} cents limit"));
        policy.cost_estimate_micros = 500;
        policy.token_estimate = 200;
        // What a person who supplies this task's output by hand must give (the web inbox
        // checks it before sending; the engine again before recording).
        policy.output_schema = Some(Json::new(&json!({
            "type": "object",
            "required": ["within_limit"],
            "properties": {
                "within_limit": { "type": "boolean" },
                "refund_cents": { "type": "integer", "minimum": 0 },
                "limit_cents": { "type": "integer", "minimum": 0 }
            }
        })));
    }

    let mut tasks = vec![classify, fetch, enrich, draft, policy];
    let mut send_deps = vec!["draft_reply", "check_policy"];
    if let Some(cents) = refund {
        tasks.push(spec("issue_refund", TaskKind::Tool, json!({ "refund_cents": cents }), &["check_policy"]));
        send_deps.push("issue_refund");
    }
    tasks.push(spec("send_reply", TaskKind::Tool, json!({ "channel": "email" }), &send_deps));
    let rationale = match revision {
        0 => "classify the ticket, look up the account, draft and check a reply, send it".to_owned(),
        r => format!("revision {r}: draft in style {style}, account data from {source}"),
    };
    Plan { tasks, rationale }
}

struct DemoPlanner;

impl Planner for DemoPlanner {
    fn plan(&self, request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let plan = plan_for(&request.input, request.revision, &request.reason);
        Box::pin(async move { Ok(plan) })
    }
}

struct DemoHandler {
    opts: DemoOptions,
}

impl DemoHandler {
    fn log_invocation(&self, call: &TaskCall) {
        let Some(path) = &self.opts.invocation_log else { return };
        let line = format!(
            "{}\t{}\t{}\t{}\t{}\n",
            self.opts.invocation_tag, call.run, call.task, call.attempt, call.attempt_key
        );
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = res {
            tracing::warn!(error = %e, "demo: cannot write the invocation log");
        }
    }
}

fn usage_between(r: u64, min: u64, max: u64) -> u64 {
    min + r % (max - min + 1)
}

/// What a simulated handler does: pure function of the call.
fn simulate_call(call: &TaskCall) -> Result<TaskOutput, HandlerError> {
    let index = index_of(&call.run_input);
    let sc = scenario_no(index);
    let seed = call.seed;
    let r = roll(seed, index, call.task.0.as_str(), call.attempt);
    let input = call.input.input.value().unwrap_or(Value::Null);
    let llm = |cost_min: u64, cost_max: u64, tokens: u64| Usage {
        cost_micros: usage_between(r, cost_min, cost_max),
        tokens: usage_between(r >> 16, tokens / 2, tokens),
    };
    let upstream = |task: &str| -> Value {
        call.input.upstream.get(&TaskId(task.to_owned())).and_then(|j| j.value().ok()).unwrap_or(Value::Null)
    };
    match call.task.0.as_str() {
        "classify" => {
            let ticket = ticket_of(&call.run_input);
            let subject = ticket.get("subject").and_then(Value::as_str).unwrap_or("");
            let topic =
                ["refund", "billing", "shipping", "login"].into_iter().find(|t| subject.contains(t)).unwrap_or("other");
            let urgency = if (r >> 3) & 3 == 0 { "high" } else { "normal" };
            Ok(TaskOutput { output: json!({ "topic": topic, "urgency": urgency }), usage: llm(1_200, 1_600, 800) })
        }
        "fetch_account" => {
            if sc == 6 && input.get("source").and_then(Value::as_str) == Some("primary") {
                return Err(HandlerError::transient("account service primary: 503 service unavailable"));
            }
            let plan = pick(&["free", "pro", "team"], r);
            Ok(TaskOutput {
                output: json!({ "customer": input.get("customer"), "plan": plan, "open_orders": r % 5 }),
                usage: Usage::default(),
            })
        }
        "enrich_sentiment" => {
            if sc == 4 {
                return Err(HandlerError::fatal("sentiment model does not support this locale")
                    .with_usage(Usage { cost_micros: 200, tokens: 50 }));
            }
            let sentiment = pick(&["negative", "neutral", "positive"], r);
            Ok(TaskOutput { output: json!({ "sentiment": sentiment }), usage: llm(600, 900, 400) })
        }
        "draft_reply" => {
            let style = input.get("style").and_then(Value::as_str).unwrap_or("concise");
            if sc == 1 && call.attempt == 1 {
                return Err(HandlerError::transient("429 rate limited by the model provider"));
            }
            if sc == 7 && call.attempt == 1 {
                return Err(HandlerError::transient("model timed out after a long partial generation")
                    .with_usage(Usage { cost_micros: 6_000, tokens: 2_000 }));
            }
            let usage = llm(5_000, 7_000, 3_000);
            if sc == 3 && style == "concise" {
                // Malformed: no "reply" field. The output-schema gate must stop it.
                return Ok(TaskOutput { output: json!({ "text": "Dear customer, ...", "tone": "friendly" }), usage });
            }
            let topic = upstream("classify").get("topic").and_then(Value::as_str).unwrap_or("other").to_owned();
            let answers = if sc == 2 && style == "concise" {
                // A confident answer to the wrong question: the evaluator catches it.
                if topic == "shipping" {
                    "billing".to_owned()
                } else {
                    "shipping".to_owned()
                }
            } else {
                topic.clone()
            };
            let reply =
                format!("Hello! About your {answers} question: we have looked into it and here is what we found.");
            Ok(TaskOutput {
                output: json!({ "reply": reply, "tone": "friendly", "answers": answers, "style": style }),
                usage,
            })
        }
        "check_policy" => {
            let refund = input.get("refund_cents").and_then(Value::as_u64).unwrap_or(0);
            let limit = input.get("limit_cents").and_then(Value::as_u64).unwrap_or(REFUND_LIMIT_CENTS);
            Ok(TaskOutput {
                output: json!({ "refund_cents": refund, "limit_cents": limit, "within_limit": refund <= limit }),
                usage: Usage::default(),
            })
        }
        "issue_refund" => {
            let refund = input.get("refund_cents").and_then(Value::as_u64).unwrap_or(0);
            Ok(TaskOutput {
                output: json!({ "refunded_cents": refund, "refund_id": format!("R-{}", r % 1_000_000) }),
                usage: Usage::default(),
            })
        }
        "send_reply" => Ok(TaskOutput {
            output: json!({ "sent": true, "message_id": format!("M-{}", r % 1_000_000) }),
            usage: Usage::default(),
        }),
        other => Err(HandlerError::fatal(format!("demo has no handler {other}"))),
    }
}

impl TaskHandler for DemoHandler {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        self.log_invocation(&call);
        let mut latency = self.opts.latency_ms;
        if let Some(path) = &self.opts.effects_log {
            if SIDE_EFFECT_TASKS.contains(&call.task.0.as_str()) {
                if let Err(e) = perform_effect(path, &call) {
                    let err = HandlerError::transient(format!("effects log: {e}"));
                    return Box::pin(async move { Err(err) });
                }
                // The effect is done, the answer is not: the window a crash must not
                // turn into a second effect, made wide enough for kills to land in it.
                latency = latency.saturating_add(EFFECT_ANSWER_DELAY_MS);
            }
        }
        Box::pin(async move {
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(latency)).await;
            }
            simulate_call(&call)
        })
    }
}

struct DemoEvaluator {
    opts: DemoOptions,
}

impl Evaluator for DemoEvaluator {
    fn evaluate(&self, request: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        let latency = self.opts.latency_ms;
        Box::pin(async move {
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(latency)).await;
            }
            let output = request.output.value().unwrap_or(Value::Null);
            let usage = Usage { cost_micros: 300, tokens: 150 };
            let (verdict, notes) = match request.task.handler.as_str() {
                "draft_reply" => {
                    let topic = topic_of_input(&request.run_input);
                    let answers = output.get("answers").and_then(Value::as_str).unwrap_or("");
                    if answers == topic || (topic == "refund" && answers == "refund") {
                        (Verdict::Pass, "the reply addresses the ticket".to_owned())
                    } else {
                        (
                            Verdict::Hard,
                            format!("the reply answers a {answers} question but the ticket is about {topic}"),
                        )
                    }
                }
                "check_policy" => {
                    if output.get("within_limit").and_then(Value::as_bool) == Some(false) {
                        (
                            Verdict::Critical,
                            format!(
                                "refund of {} cents is above the {} cents limit: a human must approve",
                                output.get("refund_cents").and_then(Value::as_u64).unwrap_or(0),
                                REFUND_LIMIT_CENTS
                            ),
                        )
                    } else {
                        (Verdict::Pass, "within policy".to_owned())
                    }
                }
                _ => (Verdict::Pass, "ok".to_owned()),
            };
            Ok(Evaluation { verdict, notes, usage })
        })
    }
}

fn topic_of_input(input: &Json) -> String {
    let ticket = ticket_of(input);
    let subject = ticket.get("subject").and_then(Value::as_str).unwrap_or("");
    ["refund", "billing", "shipping", "login"].into_iter().find(|t| subject.contains(t)).unwrap_or("other").to_owned()
}

/// One run of a demo batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoRun {
    /// The run.
    pub run: RunId,
    /// Its index in the batch (the scenario is `index % 8`).
    pub index: u64,
    /// The scenario it plays.
    pub scenario: &'static str,
    /// Its status after the batch.
    pub status: RunStatus,
    /// It finished with a partial result.
    pub partial: bool,
    /// Cost spent (micro-units).
    pub cost_micros: u64,
    /// Events in its log.
    pub events: u64,
    /// The request was a duplicate (the batch ran before): no new run.
    pub duplicate: bool,
}

/// What [`run_demo`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DemoSummary {
    /// One line per request, in index order.
    pub runs: Vec<DemoRun>,
    /// What `run_until_idle` did.
    pub idle: IdleReport,
}

impl DemoSummary {
    /// Runs per final status.
    pub fn by_status(&self) -> BTreeMap<RunStatus, usize> {
        let mut m = BTreeMap::new();
        for r in &self.runs {
            *m.entry(r.status).or_insert(0) += 1;
        }
        m
    }
    /// Cost of the whole batch (micro-units).
    pub fn total_cost_micros(&self) -> u64 {
        self.runs.iter().map(|r| r.cost_micros).sum()
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<36}  {:>5}  {:<26}  {:<13}  {:<7}  {:>12}  {:>6}",
            "run", "index", "scenario", "status", "partial", "cost(micros)", "events"
        )?;
        for r in &self.runs {
            writeln!(
                f,
                "{:<36}  {:>5}  {:<26}  {:<13}  {:<7}  {:>12}  {:>6}{}",
                r.run.to_string(),
                r.index,
                r.scenario,
                r.status.name(),
                if r.partial { "yes" } else { "no" },
                r.cost_micros,
                r.events,
                if r.duplicate { "  (existing run)" } else { "" }
            )?;
        }
        let statuses: Vec<String> = self.by_status().iter().map(|(s, n)| format!("{} {n}", s.name())).collect();
        let n = self.runs.len() as u64;
        writeln!(
            f,
            "{} run(s): {}; total cost {} micros, {} per run",
            n,
            statuses.join(", "),
            self.total_cost_micros(),
            self.total_cost_micros().checked_div(n).unwrap_or(0)
        )
    }
}

/// Submits requests `0..runs` of batch `seed`, drives them until idle, and reports each
/// run. Running the same batch again adds no runs (idempotency keys) and resumes any run
/// that did not finish.
pub async fn run_demo(engine: &Engine, runs: u64, seed: u64) -> Result<DemoSummary, EngineError> {
    let mut submitted = Vec::new();
    for index in 0..runs {
        let s = engine.submit(request(seed, index)).await?;
        submitted.push((index, s));
    }
    let idle = engine.run_until_idle().await?;
    let mut out = Vec::new();
    for (index, s) in submitted {
        let st = engine.state(s.run)?;
        out.push(DemoRun {
            run: s.run,
            index,
            scenario: scenario(index),
            status: st.status,
            partial: st.partial,
            cost_micros: st.totals.cost_micros,
            events: st.next_seq.0,
            duplicate: s.duplicate,
        });
    }
    Ok(DemoSummary { runs: out, idle })
}
