//! The notifications of the work queue's channel: its name, and the spacing of the ones
//! sent when drives end ([`Herald`]), apart from the queue so that the store and the
//! flusher can hold them without importing it.

use crate::cached::Cached;
use crate::pool::Pool;
use keel_store::StoreError;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

/// The channel every keel store notifies on; the payload is the schema's name.
pub(crate) const CHANNEL: &str = "keel_work";

/// A notification of ended drives on its own ([`Herald`]).
const TELL_SQL: &str = "SELECT pg_notify($1, $2)";

/// Least time between two notifications of ended drives sent by one store
/// ([`Herald`]): a claimer elsewhere hears of a freed slot at most this late.
pub(crate) const DONE_NOTIFY_EVERY: Duration = Duration::from_millis(10);

/// Spaces out the notifications of ended drives. Every process listens, so each
/// notification wakes every process's listener and service loop, and the server delivers
/// it to each listening session: one per drive ended cost each of N processes a wake-up per
/// run any of them drove (measured: a tenth of the throughput of four worker processes on
/// two cores, docs/PERFORMANCE.md "Session 13"). The process that ended a drive needs none
/// (its own loop is woken in-process); another process needs one to claim the run again or
/// a freed slot of a limited type, and hears it at most [`DONE_NOTIFY_EVERY`] late:
/// a done notifies at its commit when none went out within that time
/// ([`Herald::take_window`]), and otherwise, once committed, owes one
/// ([`Herald::owe`]), sent on its own when the time is up; a done that committed before
/// that notification was sent is covered by it (the schedule is cleared before sending).
pub(crate) struct Herald {
    state: std::sync::Mutex<HeraldState>,
    /// The least time between two notifications ([`DONE_NOTIFY_EVERY`]).
    every: Duration,
}

impl Default for Herald {
    fn default() -> Self {
        Herald::every(DONE_NOTIFY_EVERY)
    }
}

#[derive(Default)]
struct HeraldState {
    /// When the last notification was decided on (inline, or the owed one sent).
    last: Option<std::time::Instant>,
    /// An owed notification is scheduled.
    scheduled: bool,
}

impl Herald {
    /// A herald that sends at most one notification per `every`.
    pub(crate) fn every(every: Duration) -> Herald {
        Herald { state: std::sync::Mutex::default(), every }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HeraldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the done about to be sent notifies at its commit: none went out within
    /// [`DONE_NOTIFY_EVERY`] (this one counts from now).
    pub(crate) fn take_window(&self) -> bool {
        let now = std::time::Instant::now();
        let mut s = self.state();
        match s.last {
            Some(t) if now.saturating_duration_since(t) < self.every => false,
            _ => {
                s.last = Some(now);
                true
            }
        }
    }

    /// After a done without a notification committed: `Some(delay)` when the caller must
    /// send one after `delay` (none is scheduled yet), `None` when a scheduled one, sent
    /// after this call, covers it.
    pub(crate) fn owe(&self) -> Option<Duration> {
        let now = std::time::Instant::now();
        let mut s = self.state();
        if s.scheduled {
            return None;
        }
        s.scheduled = true;
        let at = s.last.map_or(now, |t| t + self.every);
        Some(at.saturating_duration_since(now))
    }

    /// The owed notification is about to be sent: the next done owes one again.
    pub(crate) fn sending(&self) {
        let mut s = self.state();
        s.scheduled = false;
        s.last = Some(std::time::Instant::now());
    }
}

/// What sends the notifications of ended drives of one store: their spacing, the
/// schema (their payload) and the pool an owed one is sent from. Held by the store (its
/// `done`) and by its flusher (a drive's end recorded with its last append).
pub(crate) struct Notices {
    pub(crate) herald: Herald,
    pub(crate) schema: String,
    pub(crate) pool: Arc<Pool>,
}

impl Notices {
    /// After a done (`told`: whether it notified at its commit, [`Herald::take_window`]):
    /// when it did not, and committed or failed (it may have committed), the sending of
    /// the notification it owes, to spawn on the store's runtime, if none is scheduled
    /// yet ([`Herald::owe`]).
    pub(crate) fn owed(self: &Arc<Self>, told: bool) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if told {
            return None;
        }
        let delay = self.herald.owe()?;
        let notices = self.clone();
        Some(async move { notices.send_after(delay).await })
    }

    /// Sends the owed notification after `delay`, on a lazy session, within the call
    /// bound. Lost (an error, logged): the claimers elsewhere find the run or the slot at
    /// their next poll.
    async fn send_after(&self, delay: Duration) {
        tokio::time::sleep(delay).await;
        self.herald.sending();
        let sent = tokio::time::timeout(self.pool.bounds().call, async {
            let mut conn = self.pool.lazy().await.map_err(StoreError::from)?;
            let result = conn.client()?.exec(TELL_SQL, &[&CHANNEL, &self.schema.as_str()]).await;
            conn.ok(result).map(drop)
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot notify the claimers of ended drives (they poll)"),
            Err(_) => tracing::warn!("notifying the claimers of ended drives timed out (they poll)"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::Herald;
    use std::time::Duration;

    #[test]
    fn the_herald_notifies_once_per_window_and_owes_one_for_the_dones_inside_it() {
        let hour = Duration::from_secs(3600);
        let h = Herald::every(hour);
        assert!(h.take_window(), "the first done notifies at its commit");
        assert!(!h.take_window(), "a second one within the window does not");
        let delay = h.owe().unwrap();
        assert!(delay > Duration::from_secs(3000) && delay <= hour, "owed by the end of the window: {delay:?}");
        assert!(h.owe().is_none(), "one scheduled notification covers every done owing one");
        h.sending();
        assert!(h.owe().is_some(), "after it is sent, the next done owes one again");
        assert!(!h.take_window(), "the one sent counts as the last");

        let short = Duration::from_millis(20);
        let h = Herald::every(short);
        assert!(h.take_window());
        std::thread::sleep(short);
        assert!(h.take_window(), "a window after the last notification, a done notifies itself");
        assert!(Herald::every(short).owe().unwrap() <= short, "nothing sent yet: owed at once");
    }
}
