//! Plan validation: a plan is checked before it is recorded, and a bad one is recorded as
//! rejected (never executed).

use super::types::{Context, PlanLimits};
use crate::model::state::RunState;
use crate::model::workflow::{Plan, TaskKind, TaskSpec};
use keel_store::json::JSON_DEPTH_MAX;
use std::collections::{BTreeMap, BTreeSet};

/// Validate a plan before it is recorded: acyclic, known handlers, dependencies exist, ids
/// unique, size bounds, and its cost estimate within the run's remaining budget.
/// Returns every problem found (empty = valid).
pub fn validate_plan(plan: &Plan, state: &RunState, ctx: &Context) -> Vec<String> {
    let limits = &ctx.policy.plan_limits;
    let mut errors = Vec::new();
    if plan.tasks.is_empty() {
        errors.push("plan has no tasks".to_owned());
        return errors;
    }
    if plan.tasks.len() > limits.tasks_max {
        errors.push(format!("plan has {} tasks, more than the limit of {}", plan.tasks.len(), limits.tasks_max));
        return errors;
    }
    let mut ids: BTreeMap<&str, &TaskSpec> = BTreeMap::new();
    for t in &plan.tasks {
        if t.id.0.is_empty() || t.id.0.len() > limits.task_id_bytes_max {
            errors.push(format!("task id {:?} must be 1 to {} bytes", t.id.0, limits.task_id_bytes_max));
        }
        if ids.insert(t.id.0.as_str(), t).is_some() {
            errors.push(format!("duplicate task id {}", t.id));
        }
    }
    for t in &plan.tasks {
        check_task(t, &ids, ctx, &mut errors);
        check_optional_deps(t, &mut errors);
    }
    if let Some(cycle) = find_cycle(plan) {
        errors.push(format!("plan has a dependency cycle through task {cycle}"));
    }

    check_cost(plan, state, &mut errors);
    errors
}

/// Each optional dependency is one of the task's dependencies, named once.
fn check_optional_deps(t: &TaskSpec, errors: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for d in &t.optional_deps {
        if !t.depends_on.contains(d) {
            errors.push(format!("task {}: optional dependency {d} is not in depends_on", t.id));
        }
        if !seen.insert(d) {
            errors.push(format!("task {}: optional dependency {d} named twice", t.id));
        }
    }
}

/// A task on a dependency cycle, if any (Kahn's algorithm; deterministic order).
fn find_cycle(plan: &Plan) -> Option<String> {
    let ids: BTreeSet<&str> = plan.tasks.iter().map(|t| t.id.0.as_str()).collect();
    let mut indegree: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in &plan.tasks {
        let deps: BTreeSet<&str> = t.depends_on.iter().map(|d| d.0.as_str()).filter(|d| ids.contains(d)).collect();
        indegree.insert(t.id.0.as_str(), deps.len());
        for d in deps {
            dependents.entry(d).or_default().push(t.id.0.as_str());
        }
    }
    let mut queue: Vec<&str> = indegree.iter().filter(|(_, n)| **n == 0).map(|(id, _)| *id).collect();
    while let Some(id) = queue.pop() {
        for dep in dependents.get(id).map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(n) = indegree.get_mut(dep) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    queue.push(dep);
                }
            }
        }
        indegree.remove(id);
    }
    indegree.keys().next().map(|s| (*s).to_owned())
}

/// One task's problems: unknown handler, dependencies (count, self, unknown, twice),
/// input size and JSON, attempts, timeout, output schema.
fn check_task(t: &TaskSpec, ids: &BTreeMap<&str, &TaskSpec>, ctx: &Context, errors: &mut Vec<String>) {
    let limits = &ctx.policy.plan_limits;
    let id = &t.id;
    if t.kind != TaskKind::HumanReview && !ctx.handlers.contains(&t.handler) {
        errors.push(format!("task {id}: unknown handler {:?}", t.handler));
    }
    if t.depends_on.len() > limits.deps_per_task_max {
        errors.push(format!("task {id}: {} dependencies, more than {}", t.depends_on.len(), limits.deps_per_task_max));
    }
    let mut seen = BTreeSet::new();
    for d in &t.depends_on {
        if d == id {
            errors.push(format!("task {id} depends on itself"));
        } else if !ids.contains_key(d.0.as_str()) {
            errors.push(format!("task {id} depends on unknown task {d}"));
        }
        if !seen.insert(d) {
            errors.push(format!("task {id} lists dependency {d} twice"));
        }
    }
    if keel_store::json::check_text_depth(t.input.0.as_bytes()).is_err() {
        errors.push(format!("task {id}: input nests deeper than {} levels (json_too_deep)", JSON_DEPTH_MAX));
    } else if t.input.0.len() > limits.task_input_bytes_max {
        errors.push(format!(
            "task {id}: input is {} bytes, more than {}",
            t.input.0.len(),
            limits.task_input_bytes_max
        ));
    } else if t.input.value().is_err() {
        errors.push(format!("task {id}: input is not valid JSON"));
    }
    if t.retry.max_attempts == 0 || t.retry.max_attempts > limits.attempts_max {
        errors.push(format!("task {id}: max_attempts {} must be 1 to {}", t.retry.max_attempts, limits.attempts_max));
    }
    if t.timeout_ms == 0 || t.timeout_ms > limits.timeout_ms_max {
        errors.push(format!("task {id}: timeout_ms {} must be 1 to {}", t.timeout_ms, limits.timeout_ms_max));
    }
    check_durations(t, limits, errors);
    if let Some(schema) = &t.output_schema {
        if keel_store::json::check_text_depth(schema.0.as_bytes()).is_err() {
            errors.push(format!("task {id}: output schema nests deeper than {JSON_DEPTH_MAX} levels (json_too_deep)"));
            return;
        }
        match schema.value() {
            Ok(v) => {
                if let Err(e) = jsonschema::validator_for(&v) {
                    errors.push(format!("task {id}: output schema is invalid: {e}"));
                }
            }
            Err(_) => errors.push(format!("task {id}: output schema is not valid JSON")),
        }
    }
}

/// A task's retry durations within the plan limits: a planner cannot make a run wait
/// (or a timer sleep) without bound. (`timeout_ms` is checked beside `max_attempts`.)
fn check_durations(t: &TaskSpec, limits: &PlanLimits, errors: &mut Vec<String>) {
    let id = &t.id;
    let r = &t.retry;
    for (name, ms) in [("backoff_base_ms", r.backoff_base_ms), ("backoff_max_ms", r.backoff_max_ms)] {
        if ms > limits.backoff_ms_max {
            errors.push(format!("task {id}: retry.{name} {ms} is more than {}", limits.backoff_ms_max));
        }
    }
    if r.jitter_ms > limits.jitter_ms_max {
        errors.push(format!("task {id}: retry.jitter_ms {} is more than {}", r.jitter_ms, limits.jitter_ms_max));
    }
}

/// What the new plan still has to run (tasks not carried over) must fit in what the
/// budget has left.
fn check_cost(plan: &Plan, state: &RunState, errors: &mut Vec<String>) {
    let carried = super::apply::carried_ids(state, plan, true);
    let to_run = plan.tasks.iter().filter(|t| !carried.contains(&t.id));
    let (cost, tokens) = to_run
        .fold((0u64, 0u64), |(c, k), t| (c.saturating_add(t.cost_estimate_micros), k.saturating_add(t.token_estimate)));
    if let Some(limit) = state.budget.cost_micros {
        let left = limit.saturating_sub(state.totals.cost_micros);
        if cost > left {
            errors.push(format!("plan's cost estimate {cost} micros exceeds the remaining cost budget {left}"));
        }
    }
    if let Some(limit) = state.budget.tokens {
        let left = limit.saturating_sub(state.totals.tokens);
        if tokens > left {
            errors.push(format!("plan's token estimate {tokens} exceeds the remaining token budget {left}"));
        }
    }
}
