//! Random workflows and fault schedules, derived from one seed.
//!
//! A [`Scenario`] is everything the outside world will say during a run: the plans the
//! planner returns per revision (some deliberately invalid), the outcome of every handler
//! call per `(revision, task, attempt)`, every evaluator verdict, and every human
//! decision per escalation number. Answers are pure functions of those keys (hashed with
//! the scenario seed), so a run resumed after a crash gets the same answers.

use crate::rng::{hash64, Rng};
use keel_engine::*;
use serde_json::json;

/// Handler names registered in every generated workflow.
pub const HANDLERS: [&str; 3] = ["llm_h", "tool_h", "fetch_h"];

/// Largest plan the generated policies accept (plans above it are "oversized").
pub const TASKS_MAX: usize = 32;

/// The schema outputs of schema-checked tasks must satisfy.
pub fn output_schema() -> serde_json::Value {
    json!({"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}})
}

/// How the generated plan of one revision was built (the reference model uses it instead
/// of calling the core's validation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanKind {
    /// Structurally valid (it may still exceed what is left of the cost/token budget).
    Valid,
    Cyclic,
    Oversized,
    UnknownHandler,
    /// The planner itself fails.
    PlannerError,
}

/// The planner's answer for one revision.
#[derive(Clone, Debug)]
pub struct PlanGen {
    pub kind: PlanKind,
    pub plan: Plan,
}

/// What one handler call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Output conforming to the task's schema; usage = estimate * pct / 100.
    Success {
        pct: u64,
    },
    Transient,
    /// A timeout, reported as transient.
    Timeout,
    Semantic,
    Fatal,
    /// An output that fails the task's output schema (conforming if it has none).
    BadOutput {
        pct: u64,
    },
}

/// A human's answer to escalation `n` (None: nobody answers; the run waits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HumanChoice {
    Approve,
    Reject,
    Supply,
    ReplanWithHint,
    Abort,
}

/// Knobs of the generator.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub tasks_max: usize,
    /// Percent of plans (per revision) that are invalid.
    pub invalid_plan_pct: u64,
    pub human_review: bool,
    /// Percent of runs with no budget limits at all.
    pub unlimited_pct: u64,
    /// Also generate run deadlines and escalation deadlines with default decisions
    /// (timers the reference model does not cover: used by the shuffled drivers).
    pub deadlines: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig { tasks_max: 30, invalid_plan_pct: 6, human_review: true, unlimited_pct: 30, deadlines: false }
    }
}

/// One generated run: the request, the code-level policy and the outside world's answers.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub budget: Budget,
    pub on_exhausted: ExhaustionPolicy,
    pub max_parallel: u32,
    pub policy: Policy,
    pub plans: Vec<PlanGen>,
    /// Percent of handler calls that fail (0..=70).
    pub fail_pct: u64,
    /// Percent of evaluations that reject (hard or critical).
    pub reject_pct: u64,
    /// Percent of escalations nobody answers.
    pub silent_pct: u64,
    /// Answers ignore the plan revision (a real handler call does not carry it).
    pub revision_blind: bool,
    /// Humans only choose among the options an escalation offers (the engine's `resolve`
    /// refuses anything else; the simulator accepts anything).
    pub humans_follow_options: bool,
}

impl Scenario {
    /// The scenario of `seed`, with plans of 1..=`n_tasks` tasks.
    pub fn generate(seed: u64, n_tasks: usize, cfg: &GenConfig) -> Scenario {
        let mut r = Rng::new(seed);
        let n = n_tasks.clamp(1, cfg.tasks_max.max(1));
        let base = gen_plan(&mut r, n, cfg);
        let sum_cost: u64 = base.tasks.iter().map(|t| t.cost_estimate_micros).sum();
        let sum_tokens: u64 = base.tasks.iter().map(|t| t.token_estimate).sum();
        let n_llm = base.tasks.iter().filter(|t| t.kind == TaskKind::Llm).count() as u64;
        let n_tool =
            base.tasks.iter().filter(|t| matches!(t.kind, TaskKind::Tool | TaskKind::DataFetch)).count() as u64;
        let unlimited = r.chance(cfg.unlimited_pct);
        let lim = |r: &mut Rng, pct: u64, f: &dyn Fn(&mut Rng) -> u64| {
            if !unlimited && r.chance(pct) {
                Some(f(r))
            } else {
                None
            }
        };
        let budget = Budget {
            // A plan whose estimate exceeds the budget is rejected, so most limits sit above the sum.
            // Just above the estimate: retries and replans run it out.
            cost_micros: lim(&mut r, 35, &|r| {
                sum_cost.saturating_mul(if r.chance(60) { r.range(100, 102) } else { r.range(102, 300) }) / 100
            }),
            tokens: lim(&mut r, 25, &|r| sum_tokens.saturating_mul(r.range(90, 300)) / 100),
            llm_calls: lim(&mut r, 30, &|r| r.range(0, 2 * n_llm + 2)),
            tool_calls: lim(&mut r, 30, &|r| r.range(0, 2 * n_tool + 2)),
            retries: lim(&mut r, 40, &|r| r.range(0, 6)),
            replans: lim(&mut r, 40, &|r| r.range(0, 3)),
            deadline_ms: None,
        };
        let on_exhausted = if r.chance(70) { ExhaustionPolicy::Partial } else { ExhaustionPolicy::Escalate };
        let max_parallel = r.range(1, 4) as u32;
        let policy = Policy {
            max_replans: r.range(0, 3) as u32,
            degrade_noncritical: r.chance(80),
            escalation_deadline_ms: None,
            escalation_default: None,
            plan_limits: PlanLimits { tasks_max: TASKS_MAX, ..PlanLimits::default() },
        };
        // Plans per revision: the first, then variants (the last one repeats).
        let revisions = r.range(1, 4) as usize;
        let mut plans = Vec::with_capacity(revisions);
        for rev in 0..revisions {
            let mut plan = if rev == 0 { base.clone() } else { vary(&mut r, &base, rev, cfg) };
            let kind = if r.chance(cfg.invalid_plan_pct) {
                match r.below(4) {
                    0 => make_cyclic(&mut r, &mut plan),
                    1 => make_oversized(&mut plan),
                    2 => make_unknown_handler(&mut r, &mut plan),
                    _ => PlanKind::PlannerError,
                }
            } else {
                PlanKind::Valid
            };
            plans.push(PlanGen { kind, plan });
        }
        let fail_pct = *r.pick(&[0, 5, 15, 30, 50, 70]);
        let reject_pct = *r.pick(&[0, 5, 15, 30]);
        let silent_pct = *r.pick(&[0, 0, 10, 30]);
        let mut sc = Scenario {
            seed,
            budget,
            on_exhausted,
            max_parallel,
            policy,
            plans,
            fail_pct,
            reject_pct,
            silent_pct,
            revision_blind: false,
            humans_follow_options: false,
        };
        if cfg.deadlines {
            // Drawn last, so the rest of a seed's scenario does not depend on this flag.
            if r.chance(30) {
                sc.budget.deadline_ms = Some(r.range(1, 400));
            }
            if r.chance(40) {
                sc.policy.escalation_deadline_ms = Some(r.range(0, 300));
                sc.policy.escalation_default = Some(match r.below(4) {
                    0 => Decision::Approve,
                    1 => Decision::Reject,
                    2 => Decision::Abort,
                    _ => Decision::ReplanWithHint("deadline hint".to_owned()),
                });
            }
        }
        sc
    }

    /// The `RunAccepted` event of the run.
    pub fn accepted(&self) -> Event {
        Event::RunAccepted {
            workflow: "prop".to_owned(),
            workflow_version: 1,
            input: Json::new(&json!({"seed": self.seed})),
            idempotency_key: None,
            priority: 0,
            seed: self.seed,
            budget: self.budget.clone(),
            on_exhausted: self.on_exhausted,
            routes: vec![(Complexity::Extraction, "small".to_owned()), (Complexity::Reasoning, "large".to_owned())],
            evaluator_model: Some("judge".to_owned()),
            max_parallel_tasks: self.max_parallel,
        }
    }

    /// The context the core decides with.
    pub fn context(&self) -> Context {
        Context { policy: self.policy.clone(), handlers: HANDLERS.iter().map(|h| (*h).to_owned()).collect() }
    }

    /// The planner's answer for `revision` (the last generated plan repeats).
    pub fn plan(&self, revision: u32) -> &PlanGen {
        let i = (revision as usize).min(self.plans.len() - 1);
        &self.plans[i]
    }

    fn h(&self, what: &str, revision: u32, task: &TaskId, n: u32) -> u64 {
        let revision = if self.revision_blind { 0 } else { revision };
        hash64(&[
            &self.seed.to_le_bytes(),
            what.as_bytes(),
            &revision.to_le_bytes(),
            task.0.as_bytes(),
            &n.to_le_bytes(),
        ])
    }

    /// What the handler call `(revision, task, attempt)` does.
    pub fn fault(&self, revision: u32, task: &TaskId, attempt: u32) -> Fault {
        let mut r = Rng::new(self.h("fault", revision, task, attempt));
        // Half the calls spend their whole estimate (budgets then run out on retries).
        let pct = if r.chance(50) { 100 } else { r.range(0, 100) };
        if !r.chance(self.fail_pct) {
            return Fault::Success { pct };
        }
        match r.weighted(&[35, 15, 15, 10, 25]) {
            0 => Fault::Transient,
            1 => Fault::Timeout,
            2 => Fault::Semantic,
            3 => Fault::Fatal,
            _ => Fault::BadOutput { pct },
        }
    }

    /// The evaluator's verdict on `(revision, task, attempt)` and the percent of the
    /// remaining reservation it spends.
    pub fn verdict(&self, revision: u32, task: &TaskId, attempt: u32) -> (Verdict, u64) {
        let mut r = Rng::new(self.h("verdict", revision, task, attempt));
        let pct = r.range(0, 100);
        let v = if r.chance(self.reject_pct) {
            if r.chance(70) {
                Verdict::Hard
            } else {
                Verdict::Critical
            }
        } else if r.chance(20) {
            Verdict::Soft
        } else {
            Verdict::Pass
        };
        (v, pct)
    }

    /// The spec of task `id` in any of the scenario's plans (estimates are the same in all).
    pub fn spec(&self, id: &TaskId) -> Option<&TaskSpec> {
        self.plans.iter().flat_map(|p| p.plan.tasks.iter()).find(|t| t.id == *id)
    }

    /// The human's answer to escalation `number`, given the options it offers.
    pub fn human(&self, number: u32, options: &[String]) -> Option<HumanChoice> {
        if number > 6 {
            return Some(HumanChoice::Abort);
        }
        let mut r = Rng::new(hash64(&[&self.seed.to_le_bytes(), b"human", &number.to_le_bytes()]));
        if r.chance(self.silent_pct) {
            return None;
        }
        let all = [
            HumanChoice::Approve,
            HumanChoice::Reject,
            HumanChoice::Supply,
            HumanChoice::ReplanWithHint,
            HumanChoice::Abort,
        ];
        let offered: Vec<HumanChoice> =
            all.iter().filter(|c| options.iter().any(|o| o == choice_name(c))).cloned().collect();
        // Mostly one of the offered options; sometimes anything (a human may go off-script).
        if offered.is_empty() || (!self.humans_follow_options && r.chance(10)) {
            Some(r.pick(&all).clone())
        } else {
            Some(r.pick(&offered).clone())
        }
    }
}

/// The option name of a choice, as escalations list them.
pub fn choice_name(c: &HumanChoice) -> &'static str {
    match c {
        HumanChoice::Approve => "approve",
        HumanChoice::Reject => "reject",
        HumanChoice::Supply => "supply_output",
        HumanChoice::ReplanWithHint => "replan_with_hint",
        HumanChoice::Abort => "abort",
    }
}

/// The decision a choice stands for.
pub fn decision(c: &HumanChoice, number: u32) -> Decision {
    match c {
        HumanChoice::Approve => Decision::Approve,
        HumanChoice::Reject => Decision::Reject,
        HumanChoice::Supply => Decision::SupplyOutput(Json::new(&json!({"answer": format!("human-{number}")}))),
        HumanChoice::ReplanWithHint => Decision::ReplanWithHint(format!("hint {number}")),
        HumanChoice::Abort => Decision::Abort,
    }
}

/// Usage of a call that spent `pct`% of `spec`'s estimates.
pub fn usage_of(spec: &TaskSpec, pct: u64) -> Usage {
    Usage { cost_micros: spec.cost_estimate_micros * pct / 100, tokens: spec.token_estimate * pct / 100 }
}

/// The output of a call: conforming, or (bad) failing the schema.
pub fn output_of(task: &TaskId, attempt: u32, bad: bool) -> serde_json::Value {
    if bad {
        json!({"answer": attempt, "task": task.0})
    } else {
        json!({"answer": format!("{}#{attempt}", task.0)})
    }
}

fn gen_task(r: &mut Rng, i: usize, deps: Vec<TaskId>, cfg: &GenConfig) -> TaskSpec {
    let kinds = if cfg.human_review { &[40u64, 30, 25, 5][..] } else { &[40u64, 30, 30, 0][..] };
    let (kind, handler) = match r.weighted(kinds) {
        0 => (TaskKind::Llm, HANDLERS[0]),
        1 => (TaskKind::Tool, HANDLERS[1]),
        2 => (TaskKind::DataFetch, HANDLERS[2]),
        _ => (TaskKind::HumanReview, "human"),
    };
    TaskSpec {
        id: TaskId(format!("t{i}")),
        kind,
        handler: handler.to_owned(),
        input: Json::new(&json!({"i": i})),
        depends_on: deps,
        timeout_ms: r.range(1, 5000),
        retry: RetryPolicy {
            max_attempts: r.range(1, 4) as u32,
            backoff_base_ms: r.range(1, 100),
            backoff_max_ms: r.range(50, 1000),
            jitter_ms: *r.pick(&[0, 0, 5, 50]),
        },
        success_criteria: r.chance(50).then(|| "answers the question".to_owned()),
        cost_estimate_micros: r.range(0, 1000),
        token_estimate: if kind == TaskKind::Llm { r.range(0, 500) } else { 0 },
        critical: r.chance(50),
        output_schema: r.chance(35).then(|| Json::new(&output_schema())),
        complexity: match r.below(3) {
            0 => Some(Complexity::Extraction),
            1 => Some(Complexity::Reasoning),
            _ => None,
        },
        cacheable: false,
        optional_deps: Vec::new(),
    }
}

/// A random DAG: edges only to earlier tasks (acyclic by construction), in one of a few shapes.
fn gen_plan(r: &mut Rng, n: usize, cfg: &GenConfig) -> Plan {
    let shape = r.below(4);
    let mut tasks: Vec<TaskSpec> = Vec::with_capacity(n);
    for i in 0..n {
        let mut deps: Vec<usize> = Vec::new();
        if i > 0 {
            match shape {
                0 => deps.push(i - 1),                      // chain
                1 => {}                                     // independent
                2 => deps.push(r.below(i as u64) as usize), // tree
                _ => {
                    // sparse random DAG, up to 4 deps
                    for _ in 0..r.below(5) {
                        let d = r.below(i as u64) as usize;
                        if !deps.contains(&d) {
                            deps.push(d);
                        }
                    }
                }
            }
        }
        let deps = deps.into_iter().map(|d| TaskId(format!("t{d}"))).collect();
        tasks.push(gen_task(r, i, deps, cfg));
    }
    Plan { tasks, rationale: format!("shape {shape}") }
}

/// A replacement plan: some tasks kept identical (they carry over if done), some changed,
/// some dropped, maybe a few added.
fn vary(r: &mut Rng, base: &Plan, rev: usize, cfg: &GenConfig) -> Plan {
    if r.chance(15) {
        let n = r.range(1, base.tasks.len().min(8) as u64) as usize;
        let mut p = gen_plan(r, n, cfg);
        for t in &mut p.tasks {
            t.id = TaskId(format!("r{rev}{}", t.id.0));
            for d in &mut t.depends_on {
                d.0 = format!("r{rev}{}", d.0);
            }
        }
        p.rationale = format!("fresh plan {rev}");
        return p;
    }
    let mut tasks: Vec<TaskSpec> = Vec::new();
    for t in &base.tasks {
        if r.chance(10) && !tasks.is_empty() {
            continue; // dropped (dependents lose that dependency below)
        }
        let mut t = t.clone();
        if r.chance(30) {
            t.input = Json::new(&json!({"i": t.id.0, "rev": rev}));
            t.critical = r.chance(40);
            t.retry.max_attempts = r.range(1, 4) as u32;
        }
        tasks.push(t);
    }
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
    for t in &mut tasks {
        t.depends_on.retain(|d| ids.contains(d));
    }
    Plan { tasks, rationale: format!("variant {rev}") }
}

fn make_cyclic(r: &mut Rng, plan: &mut Plan) -> PlanKind {
    let n = plan.tasks.len();
    if n == 1 {
        let id = plan.tasks[0].id.clone();
        plan.tasks[0].depends_on = vec![id]; // self-loop
    } else {
        let a = r.below(n as u64 - 1) as usize;
        let b = r.range(a as u64 + 1, n as u64 - 1) as usize;
        // b depends (transitively or not) on earlier tasks; make a depend on b.
        let bid = plan.tasks[b].id.clone();
        let aid = plan.tasks[a].id.clone();
        if !plan.tasks[b].depends_on.contains(&aid) {
            plan.tasks[b].depends_on.push(aid);
        }
        plan.tasks[a].depends_on.push(bid);
    }
    PlanKind::Cyclic
}

fn make_oversized(plan: &mut Plan) -> PlanKind {
    let proto = plan.tasks[0].clone();
    let mut i = 0;
    while plan.tasks.len() <= TASKS_MAX {
        let mut t = proto.clone();
        t.id = TaskId(format!("x{i}"));
        t.depends_on.clear();
        plan.tasks.push(t);
        i += 1;
    }
    PlanKind::Oversized
}

fn make_unknown_handler(r: &mut Rng, plan: &mut Plan) -> PlanKind {
    let candidates: Vec<usize> =
        (0..plan.tasks.len()).filter(|&i| plan.tasks[i].kind != TaskKind::HumanReview).collect();
    if candidates.is_empty() {
        return PlanKind::PlannerError;
    }
    let i = *r.pick(&candidates);
    plan.tasks[i].handler = "no_such_handler".to_owned();
    PlanKind::UnknownHandler
}
