//! A second demo workflow: a fan-in of large outputs (`fan_in`). The request says how many
//! parts and how large each part's output is; the planner plans one `fan_part` task per
//! part and a `fan_join` task that depends on all of them. Each part answers a
//! deterministic text of the requested size (from the part's index only), the join
//! answers the size of what it received. It shows outputs of any size: each is stored
//! once in the payload store beside the log, events carry its digest and size
//! (docs/ENGINE.md, "Large values"). Used by the CLI's tests and by `keel bench`.

use keel_engine::api::*;
use keel_engine::model::*;
use keel_engine::{Request, WorkflowType};
use serde_json::json;
use std::sync::Arc;

/// Name of the fan-in workflow type.
pub const FAN_IN: &str = "fan_in";

/// Most parts a fan-in request may ask for.
pub const PARTS_MAX: u64 = 64;

/// Largest output a part may be asked for, in characters (the engine's default per-task
/// output limit is 16 MiB of JSON).
pub const PART_BYTES_MAX: u64 = 8_000_000;

/// A request for `parts` parts of `bytes` characters each.
pub fn request(parts: u64, bytes: u64) -> Request {
    Request::new(FAN_IN, json!({ "parts": parts, "bytes": bytes }))
}

/// The fan-in workflow type.
pub fn workflow() -> WorkflowType {
    let mut w = WorkflowType::new(FAN_IN, Arc::new(FanPlanner), Arc::new(NoEvaluation));
    w.input_schema = Some(json!({
        "type": "object",
        "required": ["parts", "bytes"],
        "properties": {
            "parts": { "type": "integer", "minimum": 1, "maximum": PARTS_MAX },
            "bytes": { "type": "integer", "minimum": 0, "maximum": PART_BYTES_MAX }
        }
    }));
    w.max_parallel_tasks = 8;
    w
}

/// The fan-in's task handlers by name.
pub fn handlers() -> Vec<(&'static str, Arc<dyn TaskHandler>)> {
    vec![("fan_part", Arc::new(Part) as Arc<dyn TaskHandler>), ("fan_join", Arc::new(Join) as Arc<dyn TaskHandler>)]
}

struct FanPlanner;

impl Planner for FanPlanner {
    fn plan(&self, request: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let input = request.input.value().unwrap_or_default();
        let parts = input.get("parts").and_then(|v| v.as_u64()).unwrap_or(1).clamp(1, PARTS_MAX);
        let bytes = input.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0).min(PART_BYTES_MAX);
        let mut tasks: Vec<TaskSpec> = (0..parts)
            .map(|i| {
                TaskSpec::new(&format!("part{i}"), TaskKind::Tool, "fan_part")
                    .with_input(&json!({ "i": i, "bytes": bytes }))
            })
            .collect();
        let deps: Vec<String> = (0..parts).map(|i| format!("part{i}")).collect();
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        tasks.push(TaskSpec::new("join", TaskKind::Tool, "fan_join").with_deps(&deps));
        Box::pin(async move { Ok(Plan { tasks, rationale: format!("{parts} part(s) of {bytes} bytes, joined") }) })
    }
}

/// The tasks have no success criteria: the engine accepts their outputs without a call.
struct NoEvaluation;

impl Evaluator for NoEvaluation {
    fn evaluate(&self, _: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        Box::pin(async { Ok(Evaluation { verdict: Verdict::Pass, notes: "accepted".into(), usage: Usage::default() }) })
    }
}

struct Part;

impl TaskHandler for Part {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let input = call.input.input.value().unwrap_or_default();
        let i = input.get("i").and_then(|v| v.as_u64()).unwrap_or(0);
        let bytes = input.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0).min(PART_BYTES_MAX);
        let text = part_text(i, usize::try_from(bytes).unwrap_or(0));
        Box::pin(async move { Ok(TaskOutput { output: json!({ "part": i, "text": text }), usage: Usage::default() }) })
    }
}

/// `bytes` characters of part `i`: its index in decimal, repeated (so parts differ).
pub fn part_text(i: u64, bytes: usize) -> String {
    format!("{i}-").chars().cycle().take(bytes).collect()
}

struct Join;

impl TaskHandler for Join {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let parts = call.input.upstream.len();
        let bytes: usize = call.input.upstream.values().map(|j| j.0.len()).sum();
        Box::pin(async move {
            Ok(TaskOutput { output: json!({ "parts": parts, "bytes_in": bytes }), usage: Usage::default() })
        })
    }
}
