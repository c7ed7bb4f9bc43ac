//! The two state machines, written as data: `(state, trigger) -> state` tables.
//!
//! `apply` consults these tables on every event; an event whose transition is not in the
//! table is refused with [`crate::TransitionError`] and never reaches the log. The same
//! tables render as Graphviz dot and Mermaid (`keel fsm --format dot|mermaid`).

use serde::{Deserialize, Serialize};

/// State of a run.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum RunStatus {
    /// The request is recorded; the first plan is not asked for yet.
    Accepted,
    /// Waiting for a (valid) plan.
    Planning,
    /// Executing the current plan.
    Running,
    /// Waiting for a human's decision on an escalation.
    AwaitingHuman,
    /// Finished (in full or partial). Terminal.
    Completed,
    /// Failed for good. Terminal.
    Failed,
    /// Cancelled from outside. Terminal.
    Cancelled,
}

impl RunStatus {
    /// Every run status, in table order.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Accepted,
        RunStatus::Planning,
        RunStatus::Running,
        RunStatus::AwaitingHuman,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];
    /// Nothing can change a run (task) in this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled)
    }
    /// The status's name, as shown and parsed.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Accepted => "Accepted",
            RunStatus::Planning => "Planning",
            RunStatus::Running => "Running",
            RunStatus::AwaitingHuman => "AwaitingHuman",
            RunStatus::Completed => "Completed",
            RunStatus::Failed => "Failed",
            RunStatus::Cancelled => "Cancelled",
        }
    }
    /// Parse a name as printed by [`RunStatus::name`] (case-insensitive).
    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|st| st.name().eq_ignore_ascii_case(s))
    }
}

/// Kinds of run events that the run table is keyed on (same names as [`crate::Event`]).
pub type RunTrigger = &'static str;

/// The run state machine. `None` as source = the run does not exist yet.
/// Every event kind appears; task-level events keep the run `Running`.
pub const RUN_TABLE: &[(Option<RunStatus>, RunTrigger, RunStatus)] = {
    use RunStatus::*;
    &[
        (None, "RunAccepted", Accepted),
        (Some(Accepted), "PlanRequested", Planning),
        (Some(Planning), "Planned", Running),
        (Some(Planning), "PlanRejected", Planning),
        (Some(Planning), "ReplanRequested", Planning),
        (Some(Planning), "Replanned", Running),
        (Some(Running), "TaskDispatched", Running),
        (Some(Running), "TaskExecuted", Running),
        (Some(Running), "TaskFailed", Running),
        (Some(Running), "RetryScheduled", Running),
        (Some(Running), "TaskEvaluated", Running),
        (Some(Running), "TaskSkipped", Running),
        (Some(Running), "ReplanRequested", Planning),
        (Some(Running), "BudgetExhausted", Running),
        (Some(Planning), "BudgetExhausted", Planning),
        (Some(Running), "Escalated", AwaitingHuman),
        (Some(Planning), "Escalated", AwaitingHuman),
        (Some(AwaitingHuman), "EscalationNotified", AwaitingHuman),
        (Some(AwaitingHuman), "HumanResolved", Running),
        (Some(Running), "RunCompleted", Completed),
        (Some(Running), "RunFailed", Failed),
        (Some(Planning), "RunFailed", Failed),
        (Some(Accepted), "RunCancelled", Cancelled),
        (Some(Planning), "RunCancelled", Cancelled),
        (Some(Running), "RunCancelled", Cancelled),
        (Some(AwaitingHuman), "RunCancelled", Cancelled),
        (Some(Running), "TaskRedelivered", Running),
        // A size warning is an observation for operators: it never moves a live run.
        (Some(Accepted), "RunSizeWarning", Accepted),
        (Some(Planning), "RunSizeWarning", Planning),
        (Some(Running), "RunSizeWarning", Running),
        (Some(AwaitingHuman), "RunSizeWarning", AwaitingHuman),
    ]
};

/// Look up the run table.
pub fn run_transition(from: Option<RunStatus>, trigger: &str) -> Option<RunStatus> {
    RUN_TABLE.iter().find(|(f, t, _)| *f == from && *t == trigger).map(|(_, _, to)| *to)
}

/// State of one task of the current plan.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Waiting for dependencies.
    Pending,
    /// Dependencies done; may be dispatched when budgets and the parallelism bound allow.
    Ready,
    /// Handed to the handler (attempt n); no result recorded yet.
    Dispatched,
    /// Output recorded; awaiting the schema gate and evaluation.
    Executed,
    /// The attempt failed; awaiting the recovery decision.
    AttemptFailed,
    /// Will be dispatched again after the backoff delay.
    RetryScheduled,
    /// Evaluated with a hard or critical verdict; awaiting recovery (replan / escalation).
    Rejected,
    /// Output accepted (pass or soft verdict, or by a human). Terminal.
    Done,
    /// Will not run. Terminal.
    Skipped,
    /// Replaced by a replan. Terminal.
    Superseded,
}

impl TaskStatus {
    /// Every task status, in table order.
    pub const ALL: [TaskStatus; 10] = [
        TaskStatus::Pending,
        TaskStatus::Ready,
        TaskStatus::Dispatched,
        TaskStatus::Executed,
        TaskStatus::AttemptFailed,
        TaskStatus::RetryScheduled,
        TaskStatus::Rejected,
        TaskStatus::Done,
        TaskStatus::Skipped,
        TaskStatus::Superseded,
    ];
    /// Nothing can change a task in this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Done | TaskStatus::Skipped | TaskStatus::Superseded)
    }
    /// The status's name, as shown.
    pub fn name(self) -> &'static str {
        match self {
            TaskStatus::Pending => "Pending",
            TaskStatus::Ready => "Ready",
            TaskStatus::Dispatched => "Dispatched",
            TaskStatus::Executed => "Executed",
            TaskStatus::AttemptFailed => "AttemptFailed",
            TaskStatus::RetryScheduled => "RetryScheduled",
            TaskStatus::Rejected => "Rejected",
            TaskStatus::Done => "Done",
            TaskStatus::Skipped => "Skipped",
            TaskStatus::Superseded => "Superseded",
        }
    }
}

/// What moves a task. Most are event kinds; `DepsDone` is derived: it fires inside `apply`
/// when the last dependency of a pending task becomes done.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum TaskTrigger {
    /// Every dependency is Done, or Skipped and optional (derived inside `apply`).
    DepsDone,
    /// `TaskDispatched`.
    Dispatched,
    /// `TaskExecuted`.
    Executed,
    /// `TaskFailed`.
    Failed,
    /// `RetryScheduled`.
    RetryScheduled,
    /// Pass or soft verdict.
    Accepted,
    /// Hard or critical verdict.
    Rejected,
    /// `TaskSkipped`, or a human's reject.
    Skipped,
    /// A `Replanned` plan replaced the task.
    Superseded,
    /// A human approved the task's output or supplied one.
    HumanAccepted,
    /// `TaskRedelivered`: a dispatch found without a result is handed to the handler again.
    Redelivered,
}

impl TaskTrigger {
    /// The trigger's name (the event kind that fires it).
    pub fn name(self) -> &'static str {
        match self {
            TaskTrigger::DepsDone => "deps done",
            TaskTrigger::Dispatched => "TaskDispatched",
            TaskTrigger::Executed => "TaskExecuted",
            TaskTrigger::Failed => "TaskFailed",
            TaskTrigger::RetryScheduled => "RetryScheduled",
            TaskTrigger::Accepted => "TaskEvaluated(pass|soft)",
            TaskTrigger::Rejected => "TaskEvaluated(hard|critical)",
            TaskTrigger::Skipped => "TaskSkipped",
            TaskTrigger::Superseded => "Replanned",
            TaskTrigger::HumanAccepted => "HumanResolved(approve|supply)",
            TaskTrigger::Redelivered => "TaskRedelivered",
        }
    }
}

/// The task state machine. `None` as source = the task enters with the plan.
pub const TASK_TABLE: &[(Option<TaskStatus>, TaskTrigger, TaskStatus)] = {
    use TaskStatus::*;
    use TaskTrigger as T;
    &[
        // A task enters Pending, or Ready when it has no dependencies.
        (Some(Pending), T::DepsDone, Ready),
        (Some(Ready), T::Dispatched, Dispatched),
        (Some(Dispatched), T::Executed, Executed),
        (Some(Dispatched), T::Failed, AttemptFailed),
        // The schema gate fails an executed output before anyone consumes it.
        (Some(Executed), T::Failed, AttemptFailed),
        (Some(AttemptFailed), T::RetryScheduled, RetryScheduled),
        (Some(RetryScheduled), T::Dispatched, Dispatched),
        (Some(Executed), T::Accepted, Done),
        (Some(Executed), T::Rejected, Rejected),
        (Some(Rejected), T::HumanAccepted, Done),
        // A human-review task is done when the human answers.
        (Some(Ready), T::HumanAccepted, Done),
        (Some(AttemptFailed), T::HumanAccepted, Done),
        (Some(Pending), T::Skipped, Skipped),
        (Some(Ready), T::Skipped, Skipped),
        (Some(AttemptFailed), T::Skipped, Skipped),
        (Some(Rejected), T::Skipped, Skipped),
        // A replan waits until no task is in flight, so only settled tasks are superseded.
        (Some(Pending), T::Superseded, Superseded),
        (Some(Ready), T::Superseded, Superseded),
        (Some(AttemptFailed), T::Superseded, Superseded),
        (Some(RetryScheduled), T::Superseded, Superseded),
        (Some(Rejected), T::Superseded, Superseded),
        // A dispatch whose process died is handed to the handler again (same attempt).
        (Some(Dispatched), T::Redelivered, Dispatched),
    ]
};

/// Look up the task table.
pub fn task_transition(from: TaskStatus, trigger: TaskTrigger) -> Option<TaskStatus> {
    TASK_TABLE.iter().find(|(f, t, _)| *f == Some(from) && *t == trigger).map(|(_, _, to)| *to)
}

/// Output format of [`render`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// Graphviz dot.
    Dot,
    /// A Mermaid state diagram.
    Mermaid,
}

/// Render both tables (run machine, then task machine) as Graphviz dot or Mermaid.
pub fn render(format: Format) -> String {
    let run_edges: Vec<(String, String, String)> = RUN_TABLE
        .iter()
        .map(|(f, t, to)| (f.map(|s| s.name()).unwrap_or("start").to_owned(), to.name().to_owned(), (*t).to_owned()))
        .collect();
    let task_edges: Vec<(String, String, String)> = TASK_TABLE
        .iter()
        .map(|(f, t, to)| {
            (f.map(|s| s.name()).unwrap_or("start").to_owned(), to.name().to_owned(), t.name().to_owned())
        })
        .collect();
    match format {
        Format::Dot => {
            let mut out = String::from("digraph keel {\n  rankdir=LR;\n");
            for (name, edges, prefix) in [("run", &run_edges, "run_"), ("task", &task_edges, "task_")] {
                out.push_str(&format!("  subgraph cluster_{name} {{\n    label=\"{name} state machine\";\n"));
                for (f, to, label) in edges {
                    out.push_str(&format!("    {prefix}{f} -> {prefix}{to} [label=\"{label}\"];\n"));
                }
                out.push_str("  }\n");
            }
            out.push_str("}\n");
            out
        }
        Format::Mermaid => {
            let mut out = String::from("stateDiagram-v2\n");
            for (name, edges) in [("Run", &run_edges), ("Task", &task_edges)] {
                out.push_str(&format!("  state {name} {{\n"));
                for (f, to, label) in edges {
                    let f = if f == "start" { "[*]".to_owned() } else { format!("{name}{f}") };
                    out.push_str(&format!("    {f} --> {name}{to} : {label}\n"));
                }
                out.push_str("  }\n");
            }
            out
        }
    }
}
