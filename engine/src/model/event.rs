//! The event catalogue: every transition of a run is one of these, appended to the run's
//! log before the engine acts on it. The reference is docs/EVENTS.md.
//!
//! Rules for changing this file (old logs must keep replaying):
//! - never reorder or remove variants or fields: bincode encodes by position;
//! - a new variant goes at the end;
//! - a changed variant bumps its payload version ([`Event::payload_version`], stored in the
//!   record envelope), keeps its old layout as a frozen legacy type in
//!   [`crate::model::upcast`] with the conversion to the new one, and gets a golden log of
//!   the old version. Upcasting is the engine's: keel-store knows no workflow.

use crate::model::workflow::*;
use keel_store::{Payload, RunId, Seq};
use serde::{Deserialize, Serialize};

/// Why the planner is being asked (again).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum PlanReason {
    /// The first plan of the run.
    Initial,
    /// A task failed in a way retries cannot fix (semantic error, hard verdict, retries
    /// exhausted, bad output) or the previous plan was rejected by validation.
    Failure(FailureContext),
    /// A human asked for a replan with a hint.
    HumanHint {
        /// The hint for the planner.
        hint: String,
        /// Who asked.
        by: String,
    },
}

/// What went wrong, handed to the planner and recorded for the incident.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FailureContext {
    /// The failed task, if the failure is a task's (None: the plan itself was rejected).
    pub task: Option<TaskId>,
    /// The failed task's handler, if any.
    pub handler: Option<String>,
    /// What went wrong.
    pub reason: String,
    /// Attempts made on that task.
    pub attempts: u32,
    /// Plan revisions tried so far, with why each ended: the latest [`HISTORY_SHOWN`]
    /// lines of the run's history ([`recent_history`]; the whole of it is
    /// `RunState::history`).
    pub tried: Vec<String>,
}

/// Lines of a run's revision history an event carries (`Escalation::alternatives_tried`,
/// `FailureContext::tried` of a `ReplanRequested`): the latest ones, after one line that
/// counts the earlier ones ([`recent_history`]). Each escalation of a run that replans again
/// and again used to carry the whole history, so its log and its state grew with the square
/// of its revisions until no snapshot of it could be saved and, in the end, an escalation
/// was too large to record.
pub const HISTORY_SHOWN: usize = 16;

/// What an event carries of a run's revision `history`: all of it when it has at most
/// [`HISTORY_SHOWN`] lines, else a line counting the earlier revisions and the latest
/// `HISTORY_SHOWN - 1` lines.
pub fn recent_history(history: &[String]) -> Vec<String> {
    if history.len() <= HISTORY_SHOWN {
        return history.to_vec();
    }
    let earlier = history.len().saturating_sub(HISTORY_SHOWN - 1);
    let mut out = Vec::with_capacity(HISTORY_SHOWN);
    out.push(format!("{earlier} earlier revision(s) not shown"));
    out.extend(history.iter().skip(earlier).cloned());
    out
}

/// Why a run escalated to a human.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum EscalationCause {
    /// The evaluator judged an output critical.
    CriticalVerdict,
    /// A critical task failed with an error retries cannot fix.
    FatalError,
    /// A task kept failing and no replan is left.
    ReplansExhausted,
    /// A budget ran out and the run's policy is to escalate.
    BudgetExhausted,
    /// A task of kind `HumanReview` is ready: a person does it.
    HumanReviewTask,
}

/// What an escalation carries: enough for a person to decide without reading the log.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Escalation {
    /// 1 for the run's first escalation, 2 for the second...
    pub number: u32,
    /// Why the run escalated.
    pub cause: EscalationCause,
    /// The task the decision is about, if any.
    pub task: Option<TaskId>,
    /// What was attempted (tasks, attempts, outputs in brief).
    pub attempted: Vec<String>,
    /// Why it failed.
    pub why: String,
    /// Alternatives already tried (plan revisions and why each ended): the latest
    /// [`HISTORY_SHOWN`] lines of the run's history ([`recent_history`]).
    pub alternatives_tried: Vec<String>,
    /// The question the human must answer.
    pub question: String,
    /// The decisions that make sense here (names as in [`Decision::name`]).
    pub options: Vec<String>,
    /// If set, `default_decision` is applied this long after the escalation.
    pub deadline_ms: Option<u64>,
    /// Decision applied when `deadline_ms` passes.
    pub default_decision: Option<Decision>,
}

/// Where a task's failure came from (recorded on `TaskFailed`, read by tools and people:
/// the determinism check tells the schema gate's decisions from calls' answers by it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum FailureSource {
    /// The task's handler returned an error, timed out or panicked.
    Handler,
    /// The evaluator failed (error, timeouts, panic) while judging the task's output.
    Evaluator,
    /// The output-schema gate refused the output (a decision of the core).
    Gate,
    /// The engine itself: no handler registered, an output over the size limits.
    Engine,
}

/// Every transition of a run. See docs/EVENTS.md for each variant's meaning and the
/// state machine transition it drives.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Event {
    /// A request was accepted: the run exists. First event of every run.
    RunAccepted {
        /// The workflow type the request named.
        workflow: String,
        /// Its version at acceptance.
        workflow_version: u32,
        /// The request input (canonical JSON).
        input: Json,
        /// The request's idempotency key (a duplicate returns this run).
        idempotency_key: Option<String>,
        /// Priority in the run queue (higher first).
        priority: i32,
        /// Seed for every pseudo-random choice of the run (retry jitter, demo outcomes).
        seed: u64,
        /// The run's limits.
        budget: Budget,
        /// What the run does when a budget cannot cover the next step.
        on_exhausted: ExhaustionPolicy,
        /// Complexity class -> model, frozen at acceptance so replay routes identically.
        routes: Vec<(Complexity, String)>,
        /// Model the evaluator runs on.
        evaluator_model: Option<String>,
        /// Max tasks of this run in flight at once.
        max_parallel_tasks: u32,
    },
    /// The engine asks the planner for plan `revision` (0 = first plan). Run -> Planning.
    PlanRequested {
        /// The plan revision (0 = the first plan).
        revision: u32,
        /// Why a plan is asked for.
        reason: PlanReason,
    },
    /// The planner's first plan passed validation and is now the run's plan. Planning -> Running.
    Planned {
        /// The plan revision (0 = the first plan).
        revision: u32,
        /// The plan.
        plan: Plan,
    },
    /// A replacement plan passed validation. Tasks kept unchanged (same id and spec) and
    /// already done carry over; every other task of the old plan is superseded. Planning -> Running.
    Replanned {
        /// The plan revision (0 = the first plan).
        revision: u32,
        /// The plan.
        plan: Plan,
        /// Tasks of the old plan kept with their state (done, same spec).
        carried_over: Vec<TaskId>,
        /// Tasks of the old plan that the new one replaces.
        superseded: Vec<TaskId>,
    },
    /// The planner's plan failed validation (or the planner failed); never executed.
    PlanRejected {
        /// The plan revision (0 = the first plan).
        revision: u32,
        /// Every problem found (or the planner's failure).
        errors: Vec<String>,
        /// The rejected plan (`None`: the planner failed or the plan was too large to record).
        plan: Option<Plan>,
    },
    /// A task is handed to its handler: attempt number, the task's effect key (what a
    /// handler with a side effect dedupes on), the attempt's own key, the routed model and
    /// the exact input. Appended before the handler runs. Payload version 2 (version 1 had
    /// one `idempotency_key`, the per-attempt key, and no effect key: see
    /// [`crate::model::upcast`]).
    TaskDispatched {
        /// The task.
        task: TaskId,
        /// The attempt (1 for the first dispatch).
        attempt: u32,
        /// The side effect's key: the same for every attempt, retry, crash and redelivery
        /// of this task while its spec stays the one first planned in some revision
        /// (SHA-256 of run, task id and that revision; [`crate::core::effect_key`]).
        /// Handlers with side effects dedupe on this. Empty only in events upcast from
        /// payload version 1 (the fold derives it then).
        effect_key: String,
        /// This attempt's key: new for every attempt (SHA-256 of run, revision, task,
        /// attempt; [`crate::core::attempt_key`]); the same on a redelivery of the attempt.
        /// Not for deduplicating side effects: a retry after a timeout gets a new one.
        attempt_key: String,
        /// Model the task is routed to (LLM tasks).
        model: Option<String>,
        /// The exact input handed to the handler.
        input: TaskInput,
        /// Usage reserved against the budgets until the result is recorded.
        reserved: Usage,
    },
    /// The handler returned an output.
    TaskExecuted {
        /// The task.
        task: TaskId,
        /// The attempt (1 for the first dispatch).
        attempt: u32,
        /// The output (canonical JSON).
        output: Json,
        /// What the call spent.
        usage: Usage,
        /// Served by the response cache (no handler call).
        cached: bool,
    },
    /// The attempt failed: a handler error or timeout, an evaluator failure, an output the
    /// schema gate refused, or the engine's own limits (`source` says which). `error` is
    /// the message (for the gate, a stable code such as `schema_mismatch`); `note` is
    /// detail for people that no decision depends on (the gate's validator text and
    /// failing locations), not compared by the determinism check. Payload version 2
    /// (version 1 had no `source` and `note`: see [`crate::model::upcast`]).
    TaskFailed {
        /// The task.
        task: TaskId,
        /// The attempt (1 for the first dispatch).
        attempt: u32,
        /// How the failure is recovered from.
        class: ErrorClass,
        /// The message (the gate: a stable code such as `schema_mismatch`).
        error: String,
        /// What the call spent.
        usage: Usage,
        /// Where the failure came from.
        source: FailureSource,
        /// Detail for people, not compared by the determinism check.
        note: Option<String>,
    },
    /// The task will be dispatched again after `delay_ms` (backoff + jitter from the seed).
    RetryScheduled {
        /// The task.
        task: TaskId,
        /// The attempt the retry will dispatch.
        next_attempt: u32,
        /// Backoff before it (jitter included).
        delay_ms: u64,
    },
    /// The evaluator (or, without success criteria, the engine) judged the output.
    TaskEvaluated {
        /// The task.
        task: TaskId,
        /// The attempt (1 for the first dispatch).
        attempt: u32,
        /// Accept (pass, soft) or reject (hard, critical).
        verdict: Verdict,
        /// Why, for the planner and a person deciding.
        notes: String,
        /// Model the evaluator ran on (`None`: the engine accepted without a call).
        model: Option<String>,
        /// What the call spent.
        usage: Usage,
    },
    /// The task will not run (failed non-critical task, rejected by a human, or upstream skipped).
    TaskSkipped {
        /// The task.
        task: TaskId,
        /// Why the task will not run.
        reason: String,
    },
    /// The engine asks for a new plan after a failure. Running -> Planning.
    ReplanRequested {
        /// The plan revision (0 = the first plan).
        revision: u32,
        /// Why a new plan is asked for.
        reason: PlanReason,
    },
    /// A budget cannot cover the next step; the run finishes partial or escalates per policy.
    BudgetExhausted {
        /// Which budget.
        budget: BudgetKind,
        /// Its limit.
        limit: u64,
        /// What is spent and reserved.
        used: u64,
        /// What the next step needs.
        needed: u64,
    },
    /// The run waits for a human. -> AwaitingHuman.
    Escalated(Escalation),
    /// The escalation sink was told about escalation `number` (at least once, across restarts).
    EscalationNotified {
        /// The escalation's number (1 for the run's first).
        number: u32,
    },
    /// A human (or the deadline's default) decided. AwaitingHuman -> Running.
    HumanResolved {
        /// The escalation's number (1 for the run's first).
        number: u32,
        /// What was decided.
        decision: Decision,
        /// Who decided (`deadline` for the default).
        by: String,
        /// The escalation's deadline passed and its default applied.
        defaulted: bool,
        /// Why (the person's words; for a deadline's default, [`DEFAULT_REASON`]).
        /// Payload version 2 (version 1 had no reason: it reads back as empty, see
        /// [`crate::model::upcast`]).
        #[serde(default)]
        reason: String,
    },
    /// The run finished. `partial`: some tasks were skipped or a budget ran out. The
    /// result refers to outputs, it does not copy them: `outputs` names the done tasks
    /// whose recorded outputs are the run's result (an object by task id, built by
    /// `apply`). Payload version 2 (version 1 carried the whole result, which made a
    /// fan-in of large outputs one event larger than the store accepts: see
    /// [`crate::model::upcast`]).
    RunCompleted {
        /// Some tasks were skipped or not run, or a budget ran out.
        partial: bool,
        /// One line for people.
        summary: String,
        /// The done tasks whose outputs make the result, in task id order.
        outputs: Vec<TaskId>,
    },
    /// The run failed for good.
    RunFailed {
        /// Why.
        reason: String,
    },
    /// Someone cancelled the run.
    RunCancelled {
        /// Who cancelled.
        by: String,
        /// Why.
        reason: String,
    },
    /// A driver found the task dispatched with no result, a dispatch it did not make
    /// itself (the process that made it died or stopped), and is about to hand it to the
    /// handler again. Recorded before the handler runs; `decide` quarantines the task (a
    /// fatal `TaskFailed` with error `quarantined`) once `redelivery` exceeds `limit`.
    TaskRedelivered {
        /// The task.
        task: TaskId,
        /// The dispatched attempt (unchanged by a redelivery).
        attempt: u32,
        /// 1 for the attempt's first redelivery, 2 for the second...
        redelivery: u32,
        /// Redeliveries the engine allowed when this was recorded
        /// (`EngineBuilder::redelivery_limit`), so replay does not depend on configuration.
        limit: u32,
    },
    /// A driver found the run's log past a size threshold (`EngineBuilder::size_warning`)
    /// that no earlier warning of the run had crossed: a warning for operators, recorded
    /// once per threshold. Changes nothing but the run's `size_warning`.
    RunSizeWarning {
        /// Events in the run's log before this one.
        events: u64,
        /// Bytes of those events as encoded, values stored outside the record counted at
        /// full size ([`crate::RunState::log_bytes`]).
        bytes: u64,
        /// The event threshold when recorded, so replay does not depend on configuration.
        events_max: u64,
        /// The byte threshold when recorded.
        bytes_max: u64,
    },
}

impl Event {
    /// A `RunAccepted` of `workflow` with every other field at its default (unit tests).
    #[cfg(test)]
    pub(crate) fn accepted_for_tests(workflow: &str) -> Event {
        Event::RunAccepted {
            workflow: workflow.into(),
            workflow_version: 1,
            input: Json("{}".into()),
            idempotency_key: None,
            priority: 0,
            seed: 0,
            budget: Budget::default(),
            on_exhausted: ExhaustionPolicy::default(),
            routes: Vec::new(),
            evaluator_model: None,
            max_parallel_tasks: 1,
        }
    }

    /// Stable kind name (stored in the record envelope, shown in exports).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::RunAccepted { .. } => "RunAccepted",
            Event::PlanRequested { .. } => "PlanRequested",
            Event::Planned { .. } => "Planned",
            Event::Replanned { .. } => "Replanned",
            Event::PlanRejected { .. } => "PlanRejected",
            Event::TaskDispatched { .. } => "TaskDispatched",
            Event::TaskExecuted { .. } => "TaskExecuted",
            Event::TaskFailed { .. } => "TaskFailed",
            Event::RetryScheduled { .. } => "RetryScheduled",
            Event::TaskEvaluated { .. } => "TaskEvaluated",
            Event::TaskSkipped { .. } => "TaskSkipped",
            Event::ReplanRequested { .. } => "ReplanRequested",
            Event::BudgetExhausted { .. } => "BudgetExhausted",
            Event::Escalated(_) => "Escalated",
            Event::EscalationNotified { .. } => "EscalationNotified",
            Event::HumanResolved { .. } => "HumanResolved",
            Event::RunCompleted { .. } => "RunCompleted",
            Event::RunFailed { .. } => "RunFailed",
            Event::RunCancelled { .. } => "RunCancelled",
            Event::TaskRedelivered { .. } => "TaskRedelivered",
            Event::RunSizeWarning { .. } => "RunSizeWarning",
        }
    }

    /// The version of this event's payload layout, stored in the record envelope; the
    /// upcaster ([`crate::model::upcast`]) decodes older layouts by it. Bumped for a kind
    /// whenever its fields change (docs/EVENTS.md lists the versions).
    pub fn payload_version(&self) -> u16 {
        match self {
            Event::TaskFailed { .. } | Event::RunCompleted { .. } => 2,
            Event::TaskDispatched { .. } => 2,
            Event::Planned { .. } | Event::Replanned { .. } | Event::PlanRejected { .. } => 2,
            Event::HumanResolved { .. } => 2,
            _ => 1,
        }
    }

    /// Does `decided` (what `decide` returns now) record the same decision as `self` (a
    /// recorded event)? Equality, except what the determinism check must not compare:
    /// a `TaskFailed`'s `note` (third-party text), a schema-gate failure recorded in
    /// payload version 1 (whose `error` is the validator's text, from before the stable
    /// code) matches the gate failure of the same task, attempt and class, and a
    /// `TaskDispatched` of payload version 1 (no effect key) matches the dispatch that
    /// differs from it only by the effect key, and a deadline's default `HumanResolved` of
    /// payload version 1 (no reason) matches the default that differs from it only by the
    /// reason.
    pub fn same_decision(&self, decided: &Event) -> bool {
        match (self, decided) {
            (
                Event::TaskFailed { task, attempt, class, error, usage, source, note: _ },
                Event::TaskFailed { task: t2, attempt: a2, class: c2, error: e2, usage: u2, source: s2, note: _ },
            ) => {
                let legacy_gate = *source == FailureSource::Gate && error.starts_with(LEGACY_GATE_PREFIX);
                task == t2
                    && attempt == a2
                    && class == c2
                    && usage == u2
                    && source == s2
                    && (error == e2 || legacy_gate)
            }
            (
                Event::TaskDispatched { effect_key, attempt_key, task, attempt, model, input, reserved },
                Event::TaskDispatched {
                    effect_key: k2,
                    attempt_key: a2,
                    task: t2,
                    attempt: n2,
                    model: m2,
                    input: i2,
                    reserved: r2,
                },
            ) => {
                // A dispatch upcast from payload version 1 has no effect key: the rest decides.
                (effect_key == k2 || effect_key.is_empty())
                    && attempt_key == a2
                    && task == t2
                    && attempt == n2
                    && model == m2
                    && input == i2
                    && reserved == r2
            }
            (
                Event::HumanResolved { number, decision, by, defaulted, reason },
                Event::HumanResolved { number: n2, decision: d2, by: b2, defaulted: f2, reason: r2 },
            ) => {
                // A resolution upcast from payload version 1 has no reason: the rest decides.
                number == n2 && decision == d2 && by == b2 && defaulted == f2 && (reason == r2 || reason.is_empty())
            }
            _ => self == decided,
        }
    }

    /// All kind names, in declaration order.
    pub const KINDS: [&'static str; 21] = [
        "RunAccepted",
        "PlanRequested",
        "Planned",
        "Replanned",
        "PlanRejected",
        "TaskDispatched",
        "TaskExecuted",
        "TaskFailed",
        "RetryScheduled",
        "TaskEvaluated",
        "TaskSkipped",
        "ReplanRequested",
        "BudgetExhausted",
        "Escalated",
        "EscalationNotified",
        "HumanResolved",
        "RunCompleted",
        "RunFailed",
        "RunCancelled",
        "TaskRedelivered",
        "RunSizeWarning",
    ];
}

/// The reason recorded on a `HumanResolved` that a deadline's default made.
pub const DEFAULT_REASON: &str = "the escalation's deadline passed; its default applied";

/// How payload version 1 of a schema-gate `TaskFailed` began its `error` (the validator's
/// text followed).
pub const LEGACY_GATE_PREFIX: &str = "output failed its schema: ";

impl Payload for Event {
    /// [`Event::payload_version`]: the layout version of this event's payload, which the
    /// upcaster ([`crate::model::upcast`]) reads older layouts by.
    fn payload_version(&self) -> u16 {
        Event::payload_version(self)
    }
    fn kind(&self) -> &'static str {
        self.kind_name()
    }

    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        // Externally tagged: {"Kind": {fields}}; the inner object is the field set.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut outer)) => match outer.remove(self.kind_name()) {
                Some(serde_json::Value::Object(inner)) => inner,
                Some(other) => {
                    let mut m = serde_json::Map::new();
                    m.insert("value".to_owned(), other);
                    m
                }
                None => serde_json::Map::new(),
            },
            // Unreachable for this enum (every variant has fields); keep the value anyway.
            Ok(other) => {
                let mut m = serde_json::Map::new();
                m.insert("value".to_owned(), other);
                m
            }
            Err(_) => serde_json::Map::new(),
        }
    }
}

/// An event as it sits in the log: its position, the time the shell recorded it, and
/// the event. `apply` folds these.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Logged {
    /// The run the event belongs to.
    pub run: RunId,
    /// Its position in the run's log (0 = `RunAccepted`).
    pub seq: Seq,
    /// Microseconds since the Unix epoch, from the shell's clock (never read by the core
    /// except as recorded here).
    pub at_us: i64,
    /// The event.
    pub event: Event,
}
