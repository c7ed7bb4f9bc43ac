//! The outside world of generated scenarios for the real engine: a planner, an evaluator
//! and task handlers that answer from the [`Scenario`] of the run (found by the run's
//! seed), plus a fast fake clock so retry backoffs do not take real seconds.

use crate::gen::{self, PlanKind, Scenario};
use crate::script::{eval_usage, execute_outcome};
use keel_engine::api::*;
use keel_engine::sim::Outcome;
use keel_engine::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// The scenarios of the runs an engine drives, by run seed.
#[derive(Default)]
pub struct World {
    scenarios: Mutex<BTreeMap<u64, Arc<Scenario>>>,
    /// Handler calls seen, by idempotency key (one key per (run, revision, task,
    /// attempt)): at-least-once accounting.
    pub calls: Mutex<BTreeMap<String, u32>>,
}

impl World {
    pub fn add(&self, sc: Scenario) {
        let mut m = self.scenarios.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(sc.seed, Arc::new(sc));
    }
    pub fn get(&self, seed: u64) -> Option<Arc<Scenario>> {
        self.scenarios.lock().unwrap_or_else(|p| p.into_inner()).get(&seed).cloned()
    }
}

/// Name of the workflow type for a scenario's per-type settings.
pub fn workflow_name(sc: &Scenario) -> String {
    let p = match sc.on_exhausted {
        ExhaustionPolicy::Partial => "partial",
        ExhaustionPolicy::Escalate => "escalate",
    };
    format!("prop_p{}_{p}", sc.max_parallel)
}

/// The engine-level policy every scenario of a batch runs with.
pub fn engine_policy() -> Policy {
    Policy {
        max_replans: 2,
        degrade_noncritical: true,
        escalation_deadline_ms: None,
        escalation_default: None,
        plan_limits: PlanLimits { tasks_max: gen::TASKS_MAX, ..PlanLimits::default() },
    }
}

/// A scenario adapted to the engine: revision-blind answers, the engine's policy.
pub fn engine_scenario(seed: u64, n: usize, cfg: &gen::GenConfig) -> Scenario {
    let mut sc = Scenario::generate(seed, n, cfg);
    sc.revision_blind = true;
    sc.humans_follow_options = true;
    sc.policy = engine_policy();
    sc
}

/// The request that starts a scenario's run.
pub fn request(sc: &Scenario) -> Request {
    Request {
        workflow: workflow_name(sc),
        input: serde_json::json!({"seed": sc.seed}),
        idempotency_key: Some(format!("prop-{:x}", sc.seed)),
        priority: 0,
        seed: Some(sc.seed),
        budget: Some(sc.budget.clone()),
    }
}

struct P(Arc<World>);
struct E(Arc<World>);
struct H(Arc<World>);

fn boxed<T: Send + 'static>(v: T) -> BoxFuture<T> {
    Box::pin(async move { v })
}

impl Planner for P {
    fn plan(&self, req: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let out = match self.0.get(req.seed) {
            None => Err(HandlerError::fatal("unknown scenario")),
            Some(sc) => {
                let p = sc.plan(req.revision);
                match p.kind {
                    PlanKind::PlannerError => Err(HandlerError::transient("planner timed out")),
                    _ => Ok(p.plan.clone()),
                }
            }
        };
        boxed(out)
    }
}

impl Evaluator for E {
    fn evaluate(&self, req: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        let out = match self.0.get(req.seed) {
            None => Err(HandlerError::fatal("unknown scenario")),
            Some(sc) => {
                let (verdict, pct) = sc.verdict(0, &req.task.id, req.attempt);
                // What is left of the reservation after the call's usage.
                let used = match execute_outcome(&sc, 0, &req.task, req.attempt) {
                    Outcome::Output(_, u) | Outcome::Error(_, _, u) => u,
                };
                let left = Usage {
                    cost_micros: req.task.cost_estimate_micros.saturating_sub(used.cost_micros),
                    tokens: req.task.token_estimate.saturating_sub(used.tokens),
                };
                Ok(Evaluation { verdict, notes: format!("scripted {verdict:?}"), usage: eval_usage(left, pct) })
            }
        };
        boxed(out)
    }
}

impl TaskHandler for H {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        {
            let mut calls = self.0.calls.lock().unwrap_or_else(|p| p.into_inner());
            *calls.entry(call.attempt_key.clone()).or_default() += 1;
        }
        let out = match self.0.get(call.seed).and_then(|sc| sc.spec(&call.task).cloned().map(|spec| (sc, spec))) {
            None => Err(HandlerError::fatal("unknown scenario or task")),
            Some((sc, spec)) => match execute_outcome(&sc, 0, &spec, call.attempt) {
                Outcome::Output(output, usage) => Ok(TaskOutput { output, usage }),
                Outcome::Error(class, message, usage) => Err(HandlerError { class, message, usage }),
            },
        };
        boxed(out)
    }
}

/// A clock that moves 5 ms forward on every read: timers (retry backoffs) fall due after
/// a few driver wake-ups instead of real seconds, and every event gets a later stamp.
#[derive(Debug)]
pub struct FastClock(AtomicI64);

impl FastClock {
    pub fn new() -> Self {
        FastClock(AtomicI64::new(1_700_000_000_000_000))
    }
}

impl Default for FastClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for FastClock {
    fn now_us(&self) -> i64 {
        self.0.fetch_add(5_000, Ordering::Relaxed)
    }
}

/// Registers the workflow types (per max_parallel and exhaustion policy), the handlers,
/// planner and evaluator of `world` on a builder.
pub fn register(mut b: EngineBuilder, world: &Arc<World>) -> EngineBuilder {
    let planner: Arc<dyn Planner> = Arc::new(P(world.clone()));
    let evaluator: Arc<dyn Evaluator> = Arc::new(E(world.clone()));
    for p in 1..=4u32 {
        for (name, policy) in [("partial", ExhaustionPolicy::Partial), ("escalate", ExhaustionPolicy::Escalate)] {
            let mut w = WorkflowType::new(format!("prop_p{p}_{name}"), planner.clone(), evaluator.clone());
            w.on_exhausted = policy;
            w.max_parallel_tasks = p;
            w.routes = vec![(Complexity::Extraction, "small".to_owned()), (Complexity::Reasoning, "large".to_owned())];
            w.evaluator_model = Some("judge".to_owned());
            w.max_concurrent_runs = 0;
            b = b.workflow(w);
        }
    }
    for h in gen::HANDLERS {
        b = b.handler(h, Arc::new(H(world.clone())));
    }
    b.policy(engine_policy())
}
