//! Time travel: the state of a run after any event, and stepping forward and back.
//!
//! A [`Replay`] folds the history once (every event must still be accepted by the current
//! state machine) and keeps a checkpoint of the state every [`CHECKPOINT_EVERY`] events,
//! so [`Replay::state_at`] folds at most that many events, in either direction.

use crate::error::ReplayError;
use keel_engine::{apply, apply_mut, Logged, RunState};
use keel_store::RunId;

/// A state is kept every this many events.
pub const CHECKPOINT_EVERY: usize = 32;

/// One run's history, folded.
#[derive(Clone, Debug)]
pub struct Replay {
    run: RunId,
    events: Vec<Logged>,
    /// `checkpoints[k]` = state after event `k * CHECKPOINT_EVERY`.
    checkpoints: Vec<RunState>,
    last: RunState,
}

/// Folds `e` into `state` in place (unchanged on error), naming the event if the current
/// code refuses it. No copy of the state per event.
pub(crate) fn step_mut(state: &mut Option<RunState>, e: &Logged) -> Result<(), ReplayError> {
    let fold_err =
        |source| ReplayError::Fold { run: e.run, seq: e.seq.0, kind: e.event.kind_name().to_owned(), source };
    match state.as_mut() {
        None => *state = Some(apply(None, e).map_err(fold_err)?),
        Some(s) => apply_mut(s, e).map_err(fold_err)?,
    }
    Ok(())
}

impl Replay {
    /// Folds `events` (one run, seq 0 first).
    pub fn new(events: Vec<Logged>) -> Result<Replay, ReplayError> {
        let Some(first) = events.first() else {
            return Err(ReplayError::Invalid("a run with no events cannot be replayed".to_owned()));
        };
        let run = first.run;
        let mut checkpoints = Vec::with_capacity(events.len() / CHECKPOINT_EVERY + 1);
        let mut state: Option<RunState> = None;
        for (i, e) in events.iter().enumerate() {
            step_mut(&mut state, e)?;
            if i % CHECKPOINT_EVERY == 0 {
                if let Some(s) = &state {
                    checkpoints.push(s.clone());
                }
            }
        }
        let last = state.ok_or_else(|| ReplayError::Invalid("empty run".to_owned()))?;
        Ok(Replay { run, events, checkpoints, last })
    }

    /// The replayed run.
    pub fn run(&self) -> RunId {
        self.run
    }

    /// Its events in seq order.
    pub fn events(&self) -> &[Logged] {
        &self.events
    }

    /// Seq of the last event.
    pub fn last_seq(&self) -> u64 {
        self.events.len().saturating_sub(1) as u64
    }

    /// The state after the whole history.
    pub fn final_state(&self) -> &RunState {
        &self.last
    }

    /// The state after event `seq` (i.e. the fold of events `0..=seq`).
    pub fn state_at(&self, seq: u64) -> Result<RunState, ReplayError> {
        let last = self.last_seq();
        if seq > last {
            return Err(ReplayError::SeqOutOfRange { run: self.run, seq, last });
        }
        let i = usize::try_from(seq).map_err(|_| ReplayError::SeqOutOfRange { run: self.run, seq, last })?;
        let k = i / CHECKPOINT_EVERY;
        let mut state = Some(
            self.checkpoints.get(k).cloned().ok_or_else(|| ReplayError::Invalid("missing checkpoint".to_owned()))?,
        );
        for e in self.events.iter().take(i + 1).skip(k * CHECKPOINT_EVERY + 1) {
            step_mut(&mut state, e)?;
        }
        state.ok_or_else(|| ReplayError::Invalid("missing checkpoint".to_owned()))
    }

    /// A cursor before the first event.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor { replay: self, pos: None, state: None }
    }
}

/// A position in a [`Replay`]: step forward and back, one event at a time.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    replay: &'a Replay,
    /// Seq of the last event folded (None: before the first).
    pos: Option<u64>,
    state: Option<RunState>,
}

impl<'a> Cursor<'a> {
    /// Seq of the event the cursor stands after.
    pub fn position(&self) -> Option<u64> {
        self.pos
    }

    /// The state at the cursor (None before the first event).
    pub fn state(&self) -> Option<&RunState> {
        self.state.as_ref()
    }

    /// Folds the next event; returns it with the state after it (None at the end).
    pub fn forward(&mut self) -> Result<Option<(&'a Logged, &RunState)>, ReplayError> {
        let next = self.pos.map_or(0, |p| p + 1);
        let Some(e) = usize::try_from(next).ok().and_then(|i| self.replay.events.get(i)) else {
            return Ok(None);
        };
        step_mut(&mut self.state, e)?;
        self.pos = Some(next);
        Ok(self.state.as_ref().map(|s| (e, s)))
    }

    /// Moves one event back; returns the event now at the cursor and the state after it
    /// (None when moved before the first event, or already there).
    pub fn back(&mut self) -> Result<Option<(&'a Logged, &RunState)>, ReplayError> {
        match self.pos {
            None | Some(0) => {
                self.pos = None;
                self.state = None;
                Ok(None)
            }
            Some(p) => self.seek(p - 1),
        }
    }

    /// Jumps to just after event `seq`.
    pub fn seek(&mut self, seq: u64) -> Result<Option<(&'a Logged, &RunState)>, ReplayError> {
        let state = self.replay.state_at(seq)?;
        self.state = Some(state);
        self.pos = Some(seq);
        let e = usize::try_from(seq).ok().and_then(|i| self.replay.events.get(i));
        Ok(match (e, self.state.as_ref()) {
            (Some(e), Some(s)) => Some((e, s)),
            _ => None,
        })
    }
}
