//! What the shell records when a value or a record is over a limit, so that no limit
//! leaves a run stopped in a non-terminal state (docs/ENGINE.md, "Limits"):
//!
//! - a handler's output over `ShellLimits::output_bytes_max` is recorded as
//!   `TaskFailed { Semantic, source: Engine, error: "output_too_large" }` (a replan may do
//!   it differently), detail in `note`;
//! - an output that would take the run's outputs over `ShellLimits::run_payload_bytes_max`
//!   is recorded as `TaskFailed { Fatal, source: Engine, error: "run_payload_too_large" }`
//!   (skipped if non-critical, escalated if critical);
//! - a record of the core's own decisions that the store refuses as too large fails the
//!   run: `RunFailed { reason: "record_too_large: ..." }` (terminal, never a stopped
//!   driver; the determinism check takes it as the shell's fact, not a decision).

use crate::api::ShellLimits;
use crate::model::event::{Event, FailureSource};
use crate::model::state::RunState;
use crate::model::workflow::{ErrorClass, TaskId};

/// `TaskFailed.error` of an output over the per-task limit.
pub const OUTPUT_TOO_LARGE: &str = "output_too_large";
/// `TaskFailed.error` of an output over the run's total of output bytes.
pub const RUN_PAYLOAD_TOO_LARGE: &str = "run_payload_too_large";
/// How `RunFailed.reason` begins when the store refused one of the core's own records.
pub const RECORD_TOO_LARGE: &str = "record_too_large: ";

/// `event` (an effect's answer, before it is staged) checked against the output limits:
/// a `TaskExecuted` over either limit becomes the `TaskFailed` that records it.
pub(crate) fn within_output_limits(state: &RunState, event: Event, limits: &ShellLimits) -> Event {
    let Event::TaskExecuted { task, attempt, output, usage, cached } = event else {
        return event;
    };
    let bytes = output.0.len();
    if bytes > limits.output_bytes_max {
        return failed(
            task,
            attempt,
            ErrorClass::Semantic,
            OUTPUT_TOO_LARGE,
            usage,
            format!("output of {bytes} bytes of JSON > output_bytes_max {}", limits.output_bytes_max),
        );
    }
    let others = run_output_bytes(state, &task);
    let total = others.saturating_add(bytes);
    if total > limits.run_payload_bytes_max {
        return failed(
            task,
            attempt,
            ErrorClass::Fatal,
            RUN_PAYLOAD_TOO_LARGE,
            usage,
            format!(
                "output of {bytes} bytes would take the run's outputs to {total} bytes > run_payload_bytes_max {}",
                limits.run_payload_bytes_max
            ),
        );
    }
    Event::TaskExecuted { task, attempt, output, usage, cached }
}

/// Bytes of the recorded outputs of the run's tasks other than `except`.
fn run_output_bytes(state: &RunState, except: &TaskId) -> usize {
    state
        .tasks
        .iter()
        .filter(|t| &t.spec.id != except)
        .filter_map(|t| t.output.as_ref())
        .fold(0usize, |n, o| n.saturating_add(o.0.len()))
}

fn failed(
    task: TaskId,
    attempt: u32,
    class: ErrorClass,
    code: &str,
    usage: crate::model::workflow::Usage,
    note: String,
) -> Event {
    Event::TaskFailed {
        task,
        attempt,
        class,
        error: code.to_owned(),
        usage,
        source: FailureSource::Engine,
        note: Some(note),
    }
}

/// What the run records when the store refused `kind`, one of the core's own records, as
/// too large (`reason` says how large): the run fails.
pub(crate) fn refused_record(kind: &str, reason: &str) -> Event {
    Event::RunFailed { reason: format!("{RECORD_TOO_LARGE}{kind}: {reason}") }
}
