//! The reference model: what a run should do, given a [`Scenario`], written from
//! docs/ARCHITECTURE.md ("The core's semantics") and the simulator's documented
//! interleaving (due records first, then the first effect, then a human, then the
//! earliest timer), without calling `decide`, `apply` or `validate_plan`.
//!
//! It keeps its own small state (one status per task, counters) and produces the kind of
//! every event it expects, so a disagreement with the core is pinned to the first event
//! where the two part ways.

use crate::gen::{self, Fault, HumanChoice, PlanKind, Scenario};
use crate::script::eval_usage;
use keel_engine::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum St {
    Pending,
    Ready,
    Dispatched,
    Executed,
    Failed,
    RetryWait,
    Rejected,
    Done,
    Skipped,
}

impl St {
    fn terminal(self) -> bool {
        matches!(self, St::Done | St::Skipped)
    }
}

#[derive(Clone, Debug)]
struct MTask {
    spec: TaskSpec,
    st: St,
    attempt: u32,
    reserved: Usage,
    /// The latest output and whether it fails the task's schema.
    output: Option<bool>,
    err: Option<ErrorClass>,
    verdict: Option<Verdict>,
    retry_due: Option<i64>,
}

/// What the model says a run ends as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub status: RunStatus,
    /// Event kinds, in order.
    pub kinds: Vec<String>,
    /// Final plan's tasks: (id, done?, skipped?).
    pub done: Vec<String>,
    pub skipped: Vec<String>,
    pub partial: bool,
    /// Handler calls per (revision, task).
    pub calls: BTreeMap<(u32, String), u32>,
    pub causes: Vec<EscalationCause>,
    pub retries: u64,
    pub replans: u64,
    pub cost: u64,
    pub tokens: u64,
    pub llm_calls: u64,
    pub tool_calls: u64,
}

#[derive(Clone, Copy, Debug)]
enum RunLevel {
    Replan,
    Escalate(EscalationCause, usize),
}

enum Rec {
    Skip(usize),
    GateFail(usize),
    AutoPass(usize),
    Retry(usize),
}

struct Esc {
    cause: EscalationCause,
    task: Option<usize>,
    options: Vec<String>,
    notified: bool,
}

/// The model of one run.
pub struct Model<'a> {
    sc: &'a Scenario,
    status: RunStatus,
    tasks: Vec<MTask>,
    index: BTreeMap<TaskId, usize>,
    revision: Option<u32>,
    rounds: u32,
    planning_rev: u32,
    plan_rejected: bool,
    replans: u64,
    granted: u64,
    retries: u64,
    cost: u64,
    tokens: u64,
    llm_calls: u64,
    tool_calls: u64,
    exhausted: Option<BudgetKind>,
    escs: Vec<Esc>,
    pending: Option<HumanChoice>,
    partial: bool,
    now: i64,
    kinds: Vec<String>,
    calls: BTreeMap<(u32, String), u32>,
    max_events: usize,
    waiting: bool,
}

impl<'a> Model<'a> {
    pub fn new(sc: &'a Scenario, max_events: usize) -> Self {
        Model {
            sc,
            status: RunStatus::Accepted,
            tasks: Vec::new(),
            index: BTreeMap::new(),
            revision: None,
            rounds: 0,
            planning_rev: 0,
            plan_rejected: false,
            replans: 0,
            granted: 0,
            retries: 0,
            cost: 0,
            tokens: 0,
            llm_calls: 0,
            tool_calls: 0,
            exhausted: None,
            escs: Vec::new(),
            pending: None,
            partial: false,
            now: 1_000_000,
            kinds: vec!["RunAccepted".to_owned()],
            calls: BTreeMap::new(),
            max_events,
            waiting: false,
        }
    }

    /// Runs the model to the end and says what it expects.
    pub fn run(mut self) -> Expect {
        while self.kinds.len() < self.max_events && !self.status.is_terminal() && !self.waiting {
            self.step();
        }
        let done = self.tasks.iter().filter(|t| t.st == St::Done).map(|t| t.spec.id.0.clone()).collect();
        let skipped = self.tasks.iter().filter(|t| t.st == St::Skipped).map(|t| t.spec.id.0.clone()).collect();
        Expect {
            status: self.status,
            kinds: self.kinds,
            done,
            skipped,
            partial: self.partial,
            calls: self.calls,
            causes: self.escs.iter().map(|e| e.cause).collect(),
            retries: self.retries,
            replans: self.replans,
            cost: self.cost,
            tokens: self.tokens,
            llm_calls: self.llm_calls,
            tool_calls: self.tool_calls,
        }
    }

    /// One event (or one batch of events decided together).
    fn event(&mut self, kind: &str, at: Option<i64>) {
        self.now = self.now.max(at.unwrap_or(self.now)) + 1000;
        self.kinds.push(kind.to_owned());
    }

    fn full(&self) -> bool {
        self.kinds.len() >= self.max_events
    }

    fn step(&mut self) {
        match self.status {
            RunStatus::Accepted => {
                self.event("PlanRequested", None);
                self.rounds = 1;
                self.planning_rev = 0;
                self.status = RunStatus::Planning;
            }
            RunStatus::Planning => self.planning(),
            RunStatus::AwaitingHuman => self.awaiting(),
            RunStatus::Running => self.running(),
            _ => {}
        }
    }

    fn replans_left(&self) -> bool {
        let limit = self.sc.budget.replans.unwrap_or(u64::from(self.sc.policy.max_replans)) + self.granted;
        self.replans < limit
    }

    fn replan_requested(&mut self) {
        self.event("ReplanRequested", None);
        self.replans += 1;
        self.planning_rev = self.rounds;
        self.rounds += 1;
        self.plan_rejected = false;
        self.status = RunStatus::Planning;
    }

    fn escalate(&mut self, cause: EscalationCause, task: Option<usize>) {
        self.event("Escalated", None);
        let options: &[&str] = match (cause, task) {
            (EscalationCause::BudgetExhausted, _) => &["approve", "reject", "abort"],
            (EscalationCause::ReplansExhausted, None) => &["replan_with_hint", "approve", "reject", "abort"],
            (EscalationCause::HumanReviewTask, _) => &["supply_output", "approve", "reject", "abort"],
            (EscalationCause::CriticalVerdict, _) => {
                &["approve", "supply_output", "reject", "replan_with_hint", "abort"]
            }
            _ => &["supply_output", "reject", "replan_with_hint", "abort"],
        };
        self.escs.push(Esc {
            cause,
            task,
            options: options.iter().map(|s| (*s).to_owned()).collect(),
            notified: false,
        });
        self.status = RunStatus::AwaitingHuman;
    }

    fn planning(&mut self) {
        if self.exhausted.is_some() {
            // The core's rule (decide_planning): a run that reaches Planning with a spent
            // budget never asks the planner: it fails (partial policy) or escalates again.
            // Reachable only by a human choosing replan_with_hint on a BudgetExhausted
            // escalation, which does not offer it (see docs/TESTING.md, findings).
            match self.sc.on_exhausted {
                ExhaustionPolicy::Partial => {
                    self.event("RunFailed", None);
                    self.status = RunStatus::Failed;
                }
                ExhaustionPolicy::Escalate => self.escalate(EscalationCause::BudgetExhausted, None),
            }
            return;
        }
        if !self.plan_rejected {
            // Ask the planner; validate as the spec says (acyclic, known handlers, size,
            // estimate within what is left of the budget).
            let rev = self.planning_rev;
            let pg = self.sc.plan(rev).clone();
            let valid = pg.kind == PlanKind::Valid && self.within_budget(&pg.plan);
            if !valid {
                self.event("PlanRejected", None);
                self.plan_rejected = true;
                return;
            }
            self.event(if self.revision.is_none() { "Planned" } else { "Replanned" }, None);
            self.install(&pg.plan, rev);
            self.status = RunStatus::Running;
            return;
        }
        if self.replans_left() {
            self.replan_requested();
        } else {
            self.escalate(EscalationCause::ReplansExhausted, None);
        }
    }

    /// Done with an identical spec, and every task it depends on carried too (its output
    /// was made from the upstream outputs the new plan keeps).
    fn carried(&self, spec: &TaskSpec, plan: &Plan) -> bool {
        self.carried_depth(spec, plan, plan.tasks.len())
    }

    fn carried_depth(&self, spec: &TaskSpec, plan: &Plan, depth: usize) -> bool {
        let same =
            self.index.get(&spec.id).is_some_and(|&i| self.tasks[i].st == St::Done && self.tasks[i].spec == *spec);
        same && depth > 0
            && spec.depends_on.iter().all(|d| {
                plan.tasks.iter().find(|t| &t.id == d).is_some_and(|up| self.carried_depth(up, plan, depth - 1))
            })
    }

    fn within_budget(&self, plan: &Plan) -> bool {
        let (mut c, mut k) = (0u64, 0u64);
        for t in plan.tasks.iter().filter(|t| !self.carried(t, plan)) {
            c += t.cost_estimate_micros;
            k += t.token_estimate;
        }
        let b = &self.sc.budget;
        b.cost_micros.is_none_or(|l| c <= l.saturating_sub(self.cost))
            && b.tokens.is_none_or(|l| k <= l.saturating_sub(self.tokens))
    }

    fn install(&mut self, plan: &Plan, rev: u32) {
        let mut tasks = Vec::new();
        let mut index = BTreeMap::new();
        for (i, spec) in plan.tasks.iter().enumerate() {
            index.insert(spec.id.clone(), i);
            if self.carried(spec, plan) {
                tasks.push(self.tasks[self.index[&spec.id]].clone());
            } else {
                tasks.push(MTask {
                    spec: spec.clone(),
                    st: St::Pending,
                    attempt: 0,
                    reserved: Usage::default(),
                    output: None,
                    err: None,
                    verdict: None,
                    retry_due: None,
                });
            }
        }
        self.tasks = tasks;
        self.index = index;
        self.revision = Some(rev);
        self.promote();
    }

    fn promote(&mut self) {
        let done: Vec<bool> = self.tasks.iter().map(|t| t.st == St::Done).collect();
        for t in &mut self.tasks {
            if t.st == St::Pending && t.spec.depends_on.iter().all(|d| self.index.get(d).is_some_and(|&i| done[i])) {
                t.st = St::Ready;
            }
        }
    }

    fn awaiting(&mut self) {
        let Some(open) = self.escs.last() else {
            self.waiting = true;
            return;
        };
        if !open.notified {
            self.event("EscalationNotified", None);
            if let Some(e) = self.escs.last_mut() {
                e.notified = true;
            }
            return;
        }
        let number = self.escs.len() as u32;
        let Some(choice) = self.sc.human(number, &open.options) else {
            self.waiting = true;
            return;
        };
        let task = open.task;
        let cause = open.cause;
        self.event("HumanResolved", None);
        self.status = RunStatus::Running;
        match (&choice, task) {
            (HumanChoice::ReplanWithHint, _) => {
                self.granted += 1;
                self.pending = Some(choice.clone());
            }
            (HumanChoice::Abort, _) | (_, None) => self.pending = Some(choice.clone()),
            (_, Some(i)) => {
                let t = &mut self.tasks[i];
                let accept = match choice {
                    HumanChoice::Approve => {
                        cause == EscalationCause::HumanReviewTask || (t.output.is_some() && t.st == St::Rejected)
                    }
                    HumanChoice::Supply => true,
                    _ => false,
                };
                t.st = if accept { St::Done } else { St::Skipped };
                if accept && (choice == HumanChoice::Supply || cause == EscalationCause::HumanReviewTask) {
                    t.output = Some(false);
                }
                t.reserved = Usage::default();
                if accept {
                    self.promote();
                }
            }
        }
    }

    fn complete(&mut self, budget_stop: bool) {
        self.event("RunCompleted", None);
        let unfinished_or_skipped = self.tasks.iter().any(|t| t.st != St::Done);
        self.partial = budget_stop || unfinished_or_skipped || self.exhausted.is_some();
        self.status = RunStatus::Completed;
    }

    fn in_flight(&self) -> usize {
        self.tasks.iter().filter(|t| matches!(t.st, St::Dispatched | St::Executed)).count()
    }

    /// The first effect, in plan order: execute a dispatched task or evaluate an executed one.
    fn first_effect(&mut self) -> bool {
        let Some(i) = self.tasks.iter().position(|t| {
            t.st == St::Dispatched || (t.st == St::Executed && t.spec.success_criteria.is_some() && !self.gate_fails(t))
        }) else {
            return false;
        };
        let rev = self.revision.unwrap_or(0);
        let spec = self.tasks[i].spec.clone();
        let attempt = self.tasks[i].attempt;
        if self.tasks[i].st == St::Dispatched {
            *self.calls.entry((rev, spec.id.0.clone())).or_default() += 1;
            if spec.kind == TaskKind::Llm {
                self.llm_calls += 1;
            } else {
                self.tool_calls += 1;
            }
            let fault = self.sc.fault(rev, &spec.id, attempt);
            let t = &mut self.tasks[i];
            let (usage, outcome) = match fault {
                Fault::Success { pct } => (gen::usage_of(&spec, pct), Ok(false)),
                Fault::BadOutput { pct } => (gen::usage_of(&spec, pct), Ok(spec.output_schema.is_some())),
                Fault::Transient => (gen::usage_of(&spec, 60), Err(ErrorClass::Transient)),
                Fault::Timeout => (Usage::default(), Err(ErrorClass::Transient)),
                Fault::Semantic => (gen::usage_of(&spec, 50), Err(ErrorClass::Semantic)),
                Fault::Fatal => (Usage::default(), Err(ErrorClass::Fatal)),
            };
            self.cost += usage.cost_micros;
            self.tokens += usage.tokens;
            match outcome {
                Ok(bad) => {
                    t.st = St::Executed;
                    t.output = Some(bad);
                    t.reserved = Usage {
                        cost_micros: t.reserved.cost_micros.saturating_sub(usage.cost_micros),
                        tokens: t.reserved.tokens.saturating_sub(usage.tokens),
                    };
                    self.event("TaskExecuted", None);
                }
                Err(class) => {
                    t.st = St::Failed;
                    t.err = Some(class);
                    t.reserved = Usage::default();
                    self.event("TaskFailed", None);
                }
            }
        } else {
            let (v, pct) = self.sc.verdict(rev, &spec.id, attempt);
            let t = &mut self.tasks[i];
            let u = eval_usage(t.reserved, pct);
            self.cost += u.cost_micros;
            self.tokens += u.tokens;
            self.evaluated(i, v);
            self.event("TaskEvaluated", None);
        }
        true
    }

    fn evaluated(&mut self, i: usize, v: Verdict) {
        let t = &mut self.tasks[i];
        t.verdict = Some(v);
        t.reserved = Usage::default();
        t.st = if matches!(v, Verdict::Pass | Verdict::Soft) { St::Done } else { St::Rejected };
        if t.st == St::Done {
            self.promote();
        }
    }

    fn gate_fails(&self, t: &MTask) -> bool {
        t.spec.output_schema.is_some() && t.output == Some(true)
    }

    fn skip(&mut self, i: usize) {
        self.tasks[i].st = St::Skipped;
        self.tasks[i].reserved = Usage::default();
        self.event("TaskSkipped", None);
    }

    fn running(&mut self) {
        if let Some(choice) = self.pending.take() {
            match choice {
                HumanChoice::Abort | HumanChoice::Reject => {
                    self.event("RunFailed", None);
                    self.status = RunStatus::Failed;
                }
                HumanChoice::Approve | HumanChoice::Supply => self.complete(true),
                HumanChoice::ReplanWithHint => self.replan_requested(),
            }
            return;
        }
        let in_flight = self.in_flight();
        // 1. Records from the scan, decided on the same state, applied in order.
        let mut recs: Vec<Rec> = Vec::new();
        let mut run_level: Option<RunLevel> = None;
        let mut retries_spent = false;
        for (i, t) in self.tasks.iter().enumerate() {
            match t.st {
                St::Pending
                    if t.spec
                        .depends_on
                        .iter()
                        .any(|d| self.index.get(d).is_some_and(|&j| self.tasks[j].st == St::Skipped)) =>
                {
                    recs.push(Rec::Skip(i));
                }
                St::Executed => {
                    if self.gate_fails(t) {
                        recs.push(Rec::GateFail(i));
                    } else if t.spec.success_criteria.is_none() {
                        recs.push(Rec::AutoPass(i));
                    }
                }
                St::Failed => match t.err.unwrap_or(ErrorClass::Fatal) {
                    ErrorClass::Transient if self.exhausted.is_some() => {}
                    ErrorClass::Transient if t.attempt < t.spec.retry.max_attempts => {
                        if self.sc.budget.retries.is_none_or(|l| self.retries < l) {
                            recs.push(Rec::Retry(i));
                        } else {
                            retries_spent = true;
                            break;
                        }
                    }
                    ErrorClass::Transient | ErrorClass::Semantic => self.recover(i, &mut recs, &mut run_level),
                    ErrorClass::Fatal => {
                        if !t.spec.critical && self.sc.policy.degrade_noncritical {
                            recs.push(Rec::Skip(i));
                        } else if run_level.is_none() {
                            run_level = Some(RunLevel::Escalate(EscalationCause::FatalError, i));
                        }
                    }
                },
                St::Rejected => {
                    if t.verdict == Some(Verdict::Critical) {
                        if run_level.is_none() {
                            run_level = Some(RunLevel::Escalate(EscalationCause::CriticalVerdict, i));
                        }
                    } else {
                        self.recover(i, &mut recs, &mut run_level);
                    }
                }
                _ => {}
            }
        }
        if retries_spent {
            self.event("BudgetExhausted", None);
            self.exhausted = Some(BudgetKind::Retries);
            return;
        }
        if !recs.is_empty() {
            for r in recs {
                if self.full() {
                    return;
                }
                match r {
                    Rec::Skip(i) => self.skip(i),
                    Rec::GateFail(i) => {
                        let t = &mut self.tasks[i];
                        t.st = St::Failed;
                        t.err = Some(ErrorClass::Semantic);
                        t.reserved = Usage::default();
                        self.event("TaskFailed", None);
                    }
                    Rec::AutoPass(i) => {
                        self.evaluated(i, Verdict::Pass);
                        self.event("TaskEvaluated", None);
                    }
                    Rec::Retry(i) => {
                        let delay = backoff_ms(self.sc.seed, &self.tasks[i]);
                        self.event("RetryScheduled", None);
                        let at = self.now;
                        let t = &mut self.tasks[i];
                        t.st = St::RetryWait;
                        t.retry_due = Some(at + delay as i64 * 1000);
                        self.retries += 1;
                    }
                }
            }
            return;
        }
        // 2. A spent budget: finish (or escalate) once nothing is in flight.
        if self.exhausted.is_some() {
            if in_flight > 0 {
                self.first_effect();
                return;
            }
            match self.sc.on_exhausted {
                ExhaustionPolicy::Partial => self.complete(true),
                ExhaustionPolicy::Escalate => self.escalate(EscalationCause::BudgetExhausted, None),
            }
            return;
        }
        // 3. Replan / escalate once nothing is in flight.
        if let Some(level) = run_level {
            if in_flight > 0 {
                self.first_effect();
                return;
            }
            match level {
                RunLevel::Replan => self.replan_requested(),
                RunLevel::Escalate(cause, i) => self.escalate(cause, Some(i)),
            }
            return;
        }
        // 4. Dispatch in plan order within the parallelism bound and the budgets.
        let mut slots = (self.sc.max_parallel as usize).saturating_sub(in_flight);
        let mut now_list: Vec<usize> = Vec::new();
        let mut future: Vec<(usize, i64)> = Vec::new();
        let mut extra = (Usage::default(), 0u64, 0u64);
        let mut human_review: Option<usize> = None;
        let mut exhausted: Option<BudgetKind> = None;
        for (i, t) in self.tasks.iter().enumerate() {
            if !matches!(t.st, St::Ready | St::RetryWait) {
                continue;
            }
            if t.spec.kind == TaskKind::HumanReview {
                human_review = human_review.or(Some(i));
                continue;
            }
            if slots == 0 {
                break;
            }
            if let Some(kind) = self.over_budget(t, &extra) {
                if now_list.is_empty() {
                    exhausted = Some(kind);
                }
                break;
            }
            extra.0.cost_micros += t.spec.cost_estimate_micros;
            extra.0.tokens += t.spec.token_estimate;
            if t.spec.kind == TaskKind::Llm {
                extra.1 += 1;
            } else {
                extra.2 += 1;
            }
            slots -= 1;
            match (t.st, t.retry_due) {
                (St::RetryWait, Some(due)) => future.push((i, due)),
                _ => now_list.push(i),
            }
        }
        if let Some(kind) = exhausted {
            self.event("BudgetExhausted", None);
            self.exhausted = Some(kind);
            return;
        }
        if !now_list.is_empty() {
            for i in now_list {
                if self.full() {
                    return;
                }
                self.dispatch(i, None);
            }
            return;
        }
        if in_flight == 0 && future.is_empty() {
            if let Some(i) = human_review {
                self.escalate(EscalationCause::HumanReviewTask, Some(i));
                return;
            }
            if self.tasks.iter().all(|t| t.st.terminal()) {
                self.complete(false);
                return;
            }
        }
        // 5. Due retries, then the first effect, then the earliest timer.
        let due: Vec<(usize, i64)> = future.iter().copied().filter(|(_, t)| *t <= self.now).collect();
        if !due.is_empty() {
            for (i, t) in due {
                if self.full() {
                    return;
                }
                self.dispatch(i, Some(t));
            }
            return;
        }
        if self.first_effect() {
            return;
        }
        match future.iter().copied().min_by_key(|(_, t)| *t) {
            Some((i, t)) => self.dispatch(i, Some(t)),
            None => self.waiting = true, // nothing to do: stuck (the core should never get here)
        }
    }

    /// Semantic failure, exhausted retries or a hard verdict: replan, else degrade, else escalate.
    fn recover(&self, i: usize, recs: &mut Vec<Rec>, run_level: &mut Option<RunLevel>) {
        if run_level.is_some() {
            return;
        }
        if self.replans_left() {
            *run_level = Some(RunLevel::Replan);
        } else if !self.tasks[i].spec.critical && self.sc.policy.degrade_noncritical {
            recs.push(Rec::Skip(i));
        } else {
            *run_level = Some(RunLevel::Escalate(EscalationCause::ReplansExhausted, i));
        }
    }

    fn over_budget(&self, t: &MTask, extra: &(Usage, u64, u64)) -> Option<BudgetKind> {
        let b = &self.sc.budget;
        let mut rc = extra.0.cost_micros;
        let mut rt = extra.0.tokens;
        let (mut llm, mut tool) = (extra.1, extra.2);
        for x in &self.tasks {
            rc += x.reserved.cost_micros;
            rt += x.reserved.tokens;
            if x.st == St::Dispatched {
                if x.spec.kind == TaskKind::Llm {
                    llm += 1;
                } else if x.spec.kind != TaskKind::HumanReview {
                    tool += 1;
                }
            }
        }
        if b.cost_micros.is_some_and(|l| self.cost + rc + t.spec.cost_estimate_micros > l) {
            return Some(BudgetKind::Cost);
        }
        if b.tokens.is_some_and(|l| self.tokens + rt + t.spec.token_estimate > l) {
            return Some(BudgetKind::Tokens);
        }
        match t.spec.kind {
            TaskKind::Llm if b.llm_calls.is_some_and(|l| self.llm_calls + llm + 1 > l) => Some(BudgetKind::LlmCalls),
            TaskKind::Tool | TaskKind::DataFetch if b.tool_calls.is_some_and(|l| self.tool_calls + tool + 1 > l) => {
                Some(BudgetKind::ToolCalls)
            }
            _ => None,
        }
    }

    fn dispatch(&mut self, i: usize, at: Option<i64>) {
        self.event("TaskDispatched", at);
        let t = &mut self.tasks[i];
        t.attempt += 1;
        t.st = St::Dispatched;
        t.reserved = Usage { cost_micros: t.spec.cost_estimate_micros, tokens: t.spec.token_estimate };
        t.retry_due = None;
    }
}

/// The spec's backoff: min(base * 2^(n-1), max) + SHA-256("keel/jitter" || seed || task ||
/// attempt) mod (jitter + 1), n = the failed attempt.
fn backoff_ms(seed: u64, t: &MTask) -> u64 {
    let p = &t.spec.retry;
    let exp = t.attempt.saturating_sub(1).min(32);
    let base = p.backoff_base_ms.saturating_mul(1u64 << exp).min(p.backoff_max_ms);
    let mut h = Sha256::new();
    h.update(b"keel/jitter");
    h.update(seed.to_le_bytes());
    h.update(t.spec.id.0.as_bytes());
    h.update(t.attempt.to_le_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    base + u64::from_le_bytes(first) % (p.jitter_ms + 1)
}
