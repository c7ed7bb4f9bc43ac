//! The vocabulary of a workflow: plans, tasks, budgets, verdicts, usage.
//!
//! Everything here is plain data that is recorded in events, so it must encode with
//! bincode (no `deserialize_any`: no untagged/internally tagged enums, no
//! `serde_json::Value` fields — JSON travels as a canonical string, see [`Json`]) and
//! must be deterministic (no `HashMap`, no floats).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A JSON document carried inside an event as its compact text.
///
/// bincode cannot encode `serde_json::Value` (it needs `deserialize_any`), so JSON
/// travels as text. Construct with [`Json::new`], which writes keys sorted (canonical),
/// so two equal values always have equal text — cache keys and digests rely on it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Json(pub String);

impl Json {
    /// Canonical text of `value` (compact, keys sorted recursively).
    pub fn new(value: &serde_json::Value) -> Json {
        Json(String::from_utf8_lossy(&keel_store::digest::canonical_json(value)).into_owned())
    }
    /// `null`.
    pub fn null() -> Json {
        Json("null".to_owned())
    }
    /// Parse back into a value. Text written by [`Json::new`] always parses; text from an
    /// edited export may not, hence the `Result`.
    pub fn value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Json({})", self.0)
    }
}

/// Identity of a task inside a run's plan (stable across replans when the planner keeps it).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub String);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}
impl From<&str> for TaskId {
    fn from(s: &str) -> Self {
        TaskId(s.to_owned())
    }
}

/// What kind of work a task is. Handlers are registered per `(kind, name)`:
/// `TaskSpec::handler` names the handler, `kind` says which budget it draws on.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum TaskKind {
    /// A call to a language model: draws on the `llm_calls` and `tokens` budgets.
    Llm,
    /// A call to a tool (an API with side effects): draws on `tool_calls`.
    Tool,
    /// A read of data (no side effects): draws on `tool_calls`.
    DataFetch,
    /// Work a person does; the run escalates to wait for it.
    HumanReview,
}

/// Complexity class used for model routing: the workflow type maps each class to a model.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Complexity {
    /// Pulling facts out of text: a small model does.
    Extraction,
    /// Drafting, deciding: a large model.
    Reasoning,
    /// Judging another output.
    Evaluation,
}

/// Retry policy of one task: exponential backoff with deterministic jitter.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = no retry).
    pub max_attempts: u32,
    /// Delay before attempt 2; doubles for each later attempt.
    pub backoff_base_ms: u64,
    /// Upper bound of the delay before jitter.
    pub backoff_max_ms: u64,
    /// Jitter added on top, drawn from the run's seed: 0..=jitter_ms.
    pub jitter_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, backoff_base_ms: 100, backoff_max_ms: 10_000, jitter_ms: 50 }
    }
}

/// One node of a plan's DAG.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Identity in the plan (dependencies name it).
    pub id: TaskId,
    /// What kind of work (and which budget it draws on).
    pub kind: TaskKind,
    /// Name of the registered handler that performs it (e.g. "classify_ticket").
    pub handler: String,
    /// Static input of the task; the handler also receives its dependencies' outputs.
    pub input: Json,
    /// Tasks whose outputs this one needs (the DAG's edges).
    pub depends_on: Vec<TaskId>,
    /// How long one attempt may take.
    pub timeout_ms: u64,
    /// How transient failures are retried.
    pub retry: RetryPolicy,
    /// What the evaluator checks. `None`: the output is accepted without an evaluator call.
    pub success_criteria: Option<String>,
    /// Upper bound the executor reserves before dispatch (integer micro-units of money).
    pub cost_estimate_micros: u64,
    /// Upper bound of tokens the executor reserves before dispatch (LLM tasks).
    pub token_estimate: u64,
    /// A failed critical task escalates; a failed non-critical one may be skipped.
    pub critical: bool,
    /// JSON Schema the output must satisfy before any downstream task consumes it.
    pub output_schema: Option<Json>,
    /// Complexity class for model routing (LLM tasks).
    pub complexity: Option<Complexity>,
    /// Outputs may be served from the response cache.
    pub cacheable: bool,
    /// Dependencies (each also in `depends_on`) this task runs without when they are
    /// skipped: it waits for them to finish either way, and its `TaskInput::skipped`
    /// names the ones that were skipped. A skipped dependency not listed here skips this
    /// task. Added in payload version 2 of `Planned`/`Replanned`/`PlanRejected` (absent in
    /// JSON: none).
    #[serde(default)]
    pub optional_deps: Vec<TaskId>,
}

impl TaskSpec {
    /// A critical task with no dependencies, an empty input, a 5 s timeout, the default
    /// retry policy, no evaluation, no cost estimate, no schema, not cacheable. Adjust with
    /// the `with_*` methods or the public fields.
    pub fn new(id: &str, kind: TaskKind, handler: &str) -> TaskSpec {
        TaskSpec {
            id: TaskId::from(id),
            kind,
            handler: handler.to_owned(),
            input: Json::new(&serde_json::json!({})),
            depends_on: Vec::new(),
            timeout_ms: 5_000,
            retry: RetryPolicy::default(),
            success_criteria: None,
            cost_estimate_micros: 0,
            token_estimate: 0,
            critical: true,
            output_schema: None,
            complexity: None,
            cacheable: false,
            optional_deps: Vec::new(),
        }
    }

    /// Sets the dependencies.
    pub fn with_deps(mut self, deps: &[&str]) -> TaskSpec {
        self.depends_on = deps.iter().map(|d| TaskId::from(*d)).collect();
        self
    }

    /// Marks dependencies as optional: added to `depends_on` if missing; this task runs
    /// even when they are skipped (see [`TaskSpec::optional_deps`]).
    pub fn with_optional_deps(mut self, deps: &[&str]) -> TaskSpec {
        for d in deps {
            let id = TaskId::from(*d);
            if !self.depends_on.contains(&id) {
                self.depends_on.push(id.clone());
            }
            if !self.optional_deps.contains(&id) {
                self.optional_deps.push(id);
            }
        }
        self
    }

    /// Sets the static input.
    pub fn with_input(mut self, input: &serde_json::Value) -> TaskSpec {
        self.input = Json::new(input);
        self
    }
}

/// A plan: a DAG of tasks, produced by the planner, validated before it is recorded.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
pub struct Plan {
    /// The tasks, in plan order.
    pub tasks: Vec<TaskSpec>,
    /// Planner's note for humans (why this plan).
    pub rationale: String,
}

/// Usage a handler reports for one call; recorded on `TaskExecuted` / `TaskFailed`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Money spent (integer micro-units).
    pub cost_micros: u64,
    /// Model tokens spent.
    pub tokens: u64,
}

/// Limits of one run. `None` = unlimited. Checked by the engine before every dispatch.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Budget {
    /// Money (micro-units).
    pub cost_micros: Option<u64>,
    /// Model tokens.
    pub tokens: Option<u64>,
    /// LLM handler calls.
    pub llm_calls: Option<u64>,
    /// Tool and data-fetch handler calls.
    pub tool_calls: Option<u64>,
    /// Retries (attempts after the first) across all tasks of the run: the global retry budget.
    pub retries: Option<u64>,
    /// Replans across the run.
    pub replans: Option<u64>,
    /// Wall-clock deadline, measured from the run's acceptance.
    pub deadline_ms: Option<u64>,
}

/// Which budget ran out.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum BudgetKind {
    /// `Budget::cost_micros`.
    Cost,
    /// `Budget::tokens`.
    Tokens,
    /// `Budget::llm_calls`.
    LlmCalls,
    /// `Budget::tool_calls`.
    ToolCalls,
    /// `Budget::retries`.
    Retries,
    /// `Budget::replans`.
    Replans,
    /// `Budget::deadline_ms`.
    Deadline,
}

/// What a run does when a budget cannot cover the next step.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub enum ExhaustionPolicy {
    /// Finish now with whatever completed (a partial result).
    #[default]
    Partial,
    /// Wait for a human to decide.
    Escalate,
}

/// Evaluator verdict on a task's output.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Verdict {
    /// Accept.
    Pass,
    /// Accept with reservations (recorded in notes).
    Soft,
    /// Reject: do something different (replan).
    Hard,
    /// Reject and stop: a human must look.
    Critical,
}

/// How a handler failure is classed; decides the recovery path.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Try again later (rate limit, timeout, network): retry with backoff.
    Transient,
    /// The approach is wrong (bad output, schema violation): replan.
    Semantic,
    /// Cannot succeed (permission denied, invalid account): skip or escalate.
    Fatal,
}

/// A human's decision on an escalated run.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Decision {
    /// Accept what was escalated: the escalated task's output is accepted as is (or, if it
    /// has none, the task is skipped); a run-level escalation finishes with a partial result.
    Approve,
    /// Refuse what was escalated: the escalated task is skipped (and its dependents), the
    /// run continues without it.
    Reject,
    /// Supply the escalated task's output by hand.
    SupplyOutput(Json),
    /// Ask the planner for a new plan with this hint (grants one more replan).
    ReplanWithHint(String),
    /// Stop the run: it fails.
    Abort,
}

impl Decision {
    /// The decision's name, as escalation options and the CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::SupplyOutput(_) => "supply_output",
            Decision::ReplanWithHint(_) => "replan_with_hint",
            Decision::Abort => "abort",
        }
    }
}

/// The input handed to a task handler: recorded verbatim on `TaskDispatched`, so an
/// incident shows exactly what the handler (the model) saw.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TaskInput {
    /// The task's static input from the plan.
    pub input: Json,
    /// Outputs of the task's dependencies, by task id (sorted: BTreeMap).
    pub upstream: BTreeMap<TaskId, Json>,
    /// Hint from a human or the failure context of the previous attempt, if any.
    pub note: Option<String>,
    /// Optional dependencies that were skipped (they have no entry in `upstream`), in
    /// dependency order. Added in payload version 2 of `TaskDispatched` (absent in JSON:
    /// none).
    #[serde(default)]
    pub skipped: Vec<TaskId>,
}
