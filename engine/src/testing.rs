//! Specs for the pure core, read as given / when / then (feature `testing`).
//!
//! ```ignore
//! given([accepted, plan_requested, planned])
//!     .when_decided()
//!     .then_records([dispatch_a]);
//! given([accepted]).when_applied(planned).then_refused(|e| matches!(e, TransitionError::IllegalRun { .. }));
//! ```
//!
//! `given` folds the history with [`crate::apply`] (stamped: run [`SPEC_RUN`], seqs from
//! 0, one millisecond apart from [`SPEC_T0_US`]); `when_decided` asks [`crate::decide`];
//! `when_applied` folds one more event. A `then_*` that does not hold panics with what was
//! expected and what happened, so a spec fails with the story, not a line number.

use crate::core::{apply, decide, Command, Context, TransitionError};
use crate::model::event::{Event, Logged};
use crate::model::fsm::{RunStatus, TaskStatus};
use crate::model::state::RunState;
use crate::model::workflow::TaskId;
use keel_store::{RunId, Seq};

/// The run every spec's events belong to.
pub const SPEC_RUN: RunId = RunId(uuid::Uuid::nil());

/// Time of a spec's first event (µs); each later event is 1 ms after the one before.
pub const SPEC_T0_US: i64 = 1_000_000;

/// The history a spec starts from.
#[derive(Clone, Debug)]
pub struct Given {
    state: RunState,
    ctx: Context,
}

/// Folds `events` (the first must be `RunAccepted`). Panics if the history does not fold:
/// a spec's history must be one the state machine accepts.
pub fn given(events: impl IntoIterator<Item = Event>) -> Given {
    let mut state: Option<RunState> = None;
    for (i, event) in events.into_iter().enumerate() {
        let seq = u64::try_from(i).unwrap_or(u64::MAX);
        let logged = Logged { run: SPEC_RUN, seq: Seq(seq), at_us: at(seq), event };
        state = match apply(state.as_ref(), &logged) {
            Ok(s) => Some(s),
            Err(e) => panic!("given: event {i} ({}) does not fold: {e}", logged.event.kind_name()),
        };
    }
    let Some(state) = state else { panic!("given: a history needs at least RunAccepted") };
    Given { state, ctx: Context::default() }
}

fn at(seq: u64) -> i64 {
    SPEC_T0_US.saturating_add(i64::try_from(seq).unwrap_or(i64::MAX).saturating_mul(1000))
}

impl Given {
    /// `decide` runs with this context (default: `Context::default()`, no handlers).
    pub fn with_context(mut self, ctx: Context) -> Given {
        self.ctx = ctx;
        self
    }

    /// The state the history folds to.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// When the core decides on that state.
    pub fn when_decided(self) -> Decided {
        let commands = decide(&self.state, &self.ctx);
        Decided { commands }
    }

    /// When `event` is applied next (1 ms after the last event).
    pub fn when_applied(self, event: Event) -> Applied {
        let seq = self.state.next_seq;
        let logged = Logged { run: SPEC_RUN, seq, at_us: at(seq.0), event };
        let result = apply(Some(&self.state), &logged);
        Applied { before: self.state, result }
    }
}

/// What `decide` returned.
#[derive(Clone, Debug)]
pub struct Decided {
    commands: Vec<Command>,
}

impl Decided {
    /// Every command, in order.
    pub fn commands(&self) -> &[Command] {
        &self.commands
    }

    /// The events of the `Record` commands (due now or timers), in order.
    pub fn records(&self) -> Vec<&Event> {
        self.commands
            .iter()
            .filter_map(|c| match c {
                Command::Record { event, .. } => Some(event),
                _ => None,
            })
            .collect()
    }

    /// Then the core records exactly `expected`, in order (timers included).
    pub fn then_records(self, expected: impl IntoIterator<Item = Event>) -> Decided {
        let expected: Vec<Event> = expected.into_iter().collect();
        let got: Vec<Event> = self.records().into_iter().cloned().collect();
        assert_eq!(got, expected, "then_records: decide recorded (left) not what the spec expects (right)");
        self
    }

    /// Then the core records an event that `pred` accepts (among others).
    pub fn then_records_one(self, what: &str, pred: impl Fn(&Event) -> bool) -> Decided {
        assert!(
            self.records().into_iter().any(pred),
            "then_records_one: no recorded event is {what}; decided {:?}",
            self.commands
        );
        self
    }

    /// Then the core asks for exactly these calls (the commands other than `Record`), in
    /// order.
    pub fn then_asks(self, expected: impl IntoIterator<Item = Command>) -> Decided {
        let expected: Vec<Command> = expected.into_iter().collect();
        let got: Vec<Command> =
            self.commands.iter().filter(|c| !matches!(c, Command::Record { .. })).cloned().collect();
        assert_eq!(got, expected, "then_asks: decide asked (left) not what the spec expects (right)");
        self
    }

    /// Then the core has nothing to do.
    pub fn then_nothing(self) -> Decided {
        assert!(self.commands.is_empty(), "then_nothing: decide returned {:?}", self.commands);
        self
    }
}

/// What applying one more event did.
#[derive(Clone, Debug)]
pub struct Applied {
    before: RunState,
    result: Result<RunState, TransitionError>,
}

impl Applied {
    /// Then the event folds, and `check` holds on the state it leads to.
    pub fn then_state(self, check: impl FnOnce(&RunState)) -> Applied {
        match &self.result {
            Ok(s) => check(s),
            Err(e) => panic!("then_state: the event was refused: {e}"),
        }
        self
    }

    /// Then the run's status is `status`.
    pub fn then_status(self, status: RunStatus) -> Applied {
        self.then_state(|s| assert_eq!(s.status, status, "then_status"))
    }

    /// Then task `task`'s status is `status`.
    pub fn then_task(self, task: &str, status: TaskStatus) -> Applied {
        self.then_state(|s| {
            let id = TaskId::from(task);
            let got = s.task_index.get(&id).and_then(|&i| s.tasks.get(i)).map(|t| t.status);
            assert_eq!(got, Some(status), "then_task {task}");
        })
    }

    /// Then the state machine refuses the event with an error `pred` accepts; the state
    /// is unchanged (a refused event never reaches the log).
    pub fn then_refused(self, pred: impl FnOnce(&TransitionError) -> bool) -> Applied {
        match &self.result {
            Ok(s) => panic!("then_refused: the event folded (status {:?})", s.status),
            Err(e) => assert!(pred(e), "then_refused: refused, but with {e:?}"),
        }
        self
    }

    /// The state before the event (unchanged by a refusal).
    pub fn before(&self) -> &RunState {
        &self.before
    }
}
