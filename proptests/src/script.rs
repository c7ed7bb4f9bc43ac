//! The outside world of a [`Scenario`], as a [`Script`] for `sim::simulate`/`sim::resume`.
//!
//! Stateless: every answer is a function of the scenario and the call's key, never of
//! how many calls came before, so a resumed run gets exactly the answers it would have
//! got. It counts calls on the side (handler calls per `(revision, task)`).

use crate::gen::{self, Fault, PlanKind, Scenario};
use keel_engine::sim::{Outcome, Script};
use keel_engine::*;
use std::collections::BTreeMap;

/// A scenario's answers, with call counters.
pub struct ScenarioScript<'a> {
    pub scenario: &'a Scenario,
    /// Handler calls per (revision, task id).
    pub calls: BTreeMap<(u32, String), u32>,
    /// Handler calls per (revision, task id, attempt): an attempt answered twice is a bug
    /// of the driver (the sim never crashes mid-call).
    pub attempts: BTreeMap<(u32, String, u32), u32>,
    pub plans_asked: u32,
    pub evaluations: u32,
}

impl<'a> ScenarioScript<'a> {
    pub fn new(scenario: &'a Scenario) -> Self {
        ScenarioScript { scenario, calls: BTreeMap::new(), attempts: BTreeMap::new(), plans_asked: 0, evaluations: 0 }
    }
}

/// The handler's answer for `(revision, task, attempt)` of `spec` (shared with the model
/// and the engine-level handlers).
pub fn execute_outcome(sc: &Scenario, revision: u32, spec: &TaskSpec, attempt: u32) -> Outcome {
    let id = &spec.id;
    match sc.fault(revision, id, attempt) {
        Fault::Success { pct } => Outcome::Output(gen::output_of(id, attempt, false), gen::usage_of(spec, pct)),
        Fault::BadOutput { pct } => Outcome::Output(gen::output_of(id, attempt, true), gen::usage_of(spec, pct)),
        Fault::Transient => Outcome::Error(ErrorClass::Transient, "rate limited".into(), gen::usage_of(spec, 60)),
        Fault::Timeout => {
            Outcome::Error(ErrorClass::Transient, format!("timeout after {} ms", spec.timeout_ms), Usage::default())
        }
        Fault::Semantic => Outcome::Error(ErrorClass::Semantic, "wrong approach".into(), gen::usage_of(spec, 50)),
        Fault::Fatal => Outcome::Error(ErrorClass::Fatal, "permission denied".into(), Usage::default()),
    }
}

/// Evaluator usage: `pct`% of what is left of the task's reservation.
pub fn eval_usage(reserved: Usage, pct: u64) -> Usage {
    Usage { cost_micros: reserved.cost_micros * pct / 100, tokens: reserved.tokens * pct / 100 }
}

impl Script for ScenarioScript<'_> {
    fn plan(&mut self, _state: &RunState, revision: u32) -> Result<Plan, String> {
        self.plans_asked += 1;
        let p = self.scenario.plan(revision);
        match p.kind {
            PlanKind::PlannerError => Err("planner timed out".to_owned()),
            _ => Ok(p.plan.clone()),
        }
    }

    fn execute(&mut self, state: &RunState, task: &TaskId, attempt: u32) -> Outcome {
        let revision = state.revision.unwrap_or(0);
        *self.calls.entry((revision, task.0.clone())).or_default() += 1;
        *self.attempts.entry((revision, task.0.clone(), attempt)).or_default() += 1;
        let Some(t) = state.task_index.get(task).and_then(|&i| state.tasks.get(i)) else {
            return Outcome::Error(ErrorClass::Fatal, "no such task".into(), Usage::default());
        };
        execute_outcome(self.scenario, revision, &t.spec, attempt)
    }

    fn evaluate(&mut self, state: &RunState, task: &TaskId, attempt: u32) -> (Verdict, String, Usage) {
        self.evaluations += 1;
        let revision = state.revision.unwrap_or(0);
        let reserved =
            state.task_index.get(task).and_then(|&i| state.tasks.get(i)).map(|t| t.reserved).unwrap_or_default();
        let (v, pct) = self.scenario.verdict(revision, task, attempt);
        (v, format!("scripted {v:?}"), eval_usage(reserved, pct))
    }

    fn human(&mut self, state: &RunState) -> Option<(Decision, String)> {
        let open = state.escalations.last()?;
        let n = open.escalation.number;
        let choice = self.scenario.human(n, &open.escalation.options)?;
        Some((gen::decision(&choice, n), "alice".to_owned()))
    }
}
