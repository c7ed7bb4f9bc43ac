//! Subscriptions: what a caller awaits instead of polling. The journal announces every
//! durable append ([`Change`]) on a bounded broadcast channel; a subscriber that falls
//! more than [`crate::shell::journal::CHANGES_BUFFER`] changes behind is told it lagged,
//! and the followers here then re-read the log from the last seq they returned, so they
//! never miss or repeat an event (the log is the truth; a change is only a wake-up).

use crate::error::EngineError;
use crate::model::event::Logged;
use crate::model::fsm::RunStatus;
use crate::shell::fold::read_logged;
use crate::shell::index;
use crate::shell::journal::Change;
use crate::shell::runtime::Inner;
use keel_store::{RunId, Seq};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events returned by one [`RunEvents::next`] at most.
pub const FOLLOW_BATCH_MAX: usize = 1000;

/// What [`Subscription::recv`] hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// A durable append.
    Change(Change),
    /// This many changes were dropped because the subscriber fell behind: re-read what
    /// it needs from the log (or the run index).
    Lagged(u64),
}

/// Every durable append from the moment of [`crate::Engine::subscribe`] on, in the order
/// the journal made them durable (per run, in seq order).
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Change>,
}

impl Subscription {
    pub(crate) fn new(rx: broadcast::Receiver<Change>) -> Self {
        Subscription { rx }
    }

    /// The next change (or how many were missed). `None` once the engine is gone.
    pub async fn recv(&mut self) -> Option<Received> {
        match self.rx.recv().await {
            Ok(c) => Some(Received::Change(c)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Received::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next change of `run`, skipping others; a lag is reported (the caller re-reads).
    pub(crate) async fn recv_run(&mut self, run: RunId) -> Option<Received> {
        loop {
            match self.recv().await? {
                Received::Change(c) if c.run != run => continue,
                other => return Some(other),
            }
        }
    }
}

/// A live tail of one run's events ([`crate::Engine::follow`]): the recorded events after
/// a seq, then each new one as it becomes durable, until the run is finished.
pub struct RunEvents {
    inner: Arc<Inner>,
    run: RunId,
    next: Seq,
    sub: Subscription,
    /// On a shared store, the wait before the next read of the store (see `remote_look`).
    look: Option<std::time::Duration>,
}

impl std::fmt::Debug for RunEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunEvents").field("run", &self.run).field("next", &self.next).finish_non_exhaustive()
    }
}

impl RunEvents {
    /// Subscribes first, so no append between the first read and the first wait is missed.
    pub(crate) fn new(inner: Arc<Inner>, run: RunId, after: Option<Seq>) -> Self {
        let sub = Subscription::new(inner.journal.subscribe());
        let next = after.map_or(Seq(0), |s| Seq(s.0.saturating_add(1)));
        let look = remote_look(&inner);
        RunEvents { inner, run, next, sub, look }
    }

    /// The seq the next event returned will have.
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    /// The next events (1..=[`FOLLOW_BATCH_MAX`], in seq order, none returned before), as
    /// soon as they are durable; `Ok(None)` once the run is finished and every event up to
    /// its end was returned. `UnknownRun` if the run has no events at all.
    pub async fn next(&mut self) -> Result<Option<Vec<Logged>>, EngineError> {
        loop {
            let (run, from) = (self.run, self.next);
            let (events, entry) = self
                .inner
                .blocking(move |log| {
                    let events = read_logged(log, run, from)?.take(FOLLOW_BATCH_MAX).collect::<Result<Vec<_>, _>>()?;
                    let entry = if events.is_empty() { index::entry(log, run)? } else { None };
                    let exists = !events.is_empty() || entry.is_some() || log.head(run)?.next_seq.0 > 0;
                    Ok((events, entry, exists))
                })
                .await
                .and_then(
                    |(events, entry, exists)| {
                        if exists {
                            Ok((events, entry))
                        } else {
                            Err(EngineError::UnknownRun { run })
                        }
                    },
                )?;
            if let Some(last) = events.last() {
                self.next = Seq(last.seq.0.saturating_add(1));
                self.look = remote_look(&self.inner);
                return Ok(Some(events));
            }
            if entry.is_some_and(|e| e.status.is_terminal() && e.events <= self.next.0) {
                return Ok(None);
            }
            // Nothing new: wait for an append of this run (or a lag, then re-read); on a
            // shared store, at most until the next look (see `remote_look`).
            match next_change(self.look, &mut self.sub, self.run).await {
                Woke::Closed => return Ok(None),
                Woke::Got(_) => {}
                // Nothing came: look again later, less often while the run is quiet.
                Woke::Look => self.look = self.look.map(slower),
            }
        }
    }
}

/// Waits until `run`'s status satisfies `done`, without polling: its current status from
/// the run index, then each change of the run. Returns that status.
pub(crate) async fn wait_until(
    inner: &Arc<Inner>,
    run: RunId,
    done: impl Fn(RunStatus) -> bool,
) -> Result<RunStatus, EngineError> {
    let mut sub = Subscription::new(inner.journal.subscribe());
    let mut look = remote_look(inner);
    loop {
        let status = inner
            .blocking(move |log| match index::entry(log, run)? {
                Some(e) => Ok(e.status),
                None => {
                    crate::shell::fold::load_state(log, run)?.map(|s| s.status).ok_or(EngineError::UnknownRun { run })
                }
            })
            .await?;
        if done(status) {
            return Ok(status);
        }
        loop {
            match next_change(look, &mut sub, run).await {
                Woke::Closed => return Err(EngineError::Internal("the engine's change feed closed".into())),
                Woke::Got(Received::Change(c)) if !done(c.status) => continue,
                // A change that may be the end, or a lag.
                Woke::Got(_) => break,
                // Time to look at the store; the next look comes later.
                Woke::Look => {
                    look = look.map(slower);
                    break;
                }
            }
        }
    }
}

/// How long a wait for a run's next change may last before the store is read again:
/// `None` when every append of the store is made in this process (the journal announces
/// each one); on a store shared with other processes (PostgreSQL) the appends of a run
/// driven elsewhere are announced to nobody here, so a tail or a wait reads the store again
/// after `queue_poll` (default 250 ms) while nothing local wakes it, then twice as long
/// after each read that found nothing new, up to [`REMOTE_LOOK_MAX`] (a run waiting hours
/// for a human costs a read every 2 s per open tail, not four a second).
fn remote_look(inner: &Inner) -> Option<std::time::Duration> {
    crate::shell::shared::is_shared(inner).then_some(inner.queue_poll.min(REMOTE_LOOK_MAX))
}

/// The longest wait between two reads of a shared store by a quiet tail or wait.
pub(crate) const REMOTE_LOOK_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The wait after `look` found nothing new.
fn slower(look: std::time::Duration) -> std::time::Duration {
    look.saturating_mul(2).min(REMOTE_LOOK_MAX)
}

/// What ended a wait for a run's next change ([`next_change`]).
enum Woke {
    /// A change of the run, or a lag.
    Got(Received),
    /// Time to look at the (shared) store.
    Look,
    /// The engine's change feed closed.
    Closed,
}

/// Waits for `run`'s next change in `sub` (or a lag), or (with `look`: a shared store) for
/// the next look at the store, whichever comes first.
async fn next_change(look: Option<std::time::Duration>, sub: &mut Subscription, run: RunId) -> Woke {
    let got = match look {
        None => sub.recv_run(run).await,
        Some(look) => match tokio::time::timeout(look, sub.recv_run(run)).await {
            Ok(got) => got,
            Err(_) => return Woke::Look,
        },
    };
    got.map_or(Woke::Closed, Woke::Got)
}
