//! The drive under a lease: takes the run's lease, renews it by heartbeat while the
//! driver runs, and stops the driver at once when the lease is lost (`shell::lease`).

use crate::shell::driver::{drive, DriveOutcome};
use crate::shell::journal::blocking;
use crate::shell::lease::Held;
use crate::shell::runtime::Inner;
use keel_store::{RunId, StoreError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Takes `run`'s lease for this engine: `Ok(None)` if someone holds it.
pub(crate) fn take(inner: &Inner, run: RunId) -> Result<Option<Arc<Held>>, StoreError> {
    let l = &inner.leasing;
    Ok(inner.log.try_lease(run, &l.owner, l.ttl_ms, l.clock.now_us())?.map(|lease| Arc::new(Held::new(lease))))
}

/// Drives `run` under `held`, renewing it every third of its time-to-live. Ends with the
/// driver's outcome (the lease released), or [`DriveOutcome::LeaseLost`] as soon as a
/// renewal fails or an append is fenced (the driver dropped with its in-flight calls).
pub(crate) async fn drive_leased(
    inner: Arc<Inner>,
    run: RunId,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
    held: Arc<Held>,
) -> DriveOutcome {
    let every = Duration::from_millis((inner.leasing.ttl_ms / 3).max(1));
    let driving = drive(inner.clone(), run, wake, stop, Some(held.clone()));
    tokio::pin!(driving);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut driving => {
                if held.is_lost() {
                    inner.leasing.fenced.fetch_add(1, Ordering::Relaxed);
                    return lost(&inner, run, "an append was fenced");
                }
                let h = held.clone();
                if let Err(e) = blocking(&inner.log, move |log| { h.release(log); Ok(()) }).await {
                    tracing::warn!(%run, error = %e, "cannot release the run's lease (it expires)");
                }
                return out;
            }
            _ = beat.tick() => {
                let (h, ttl, now) = (held.clone(), inner.leasing.ttl_ms, inner.leasing.clock.now_us());
                let renewed = blocking(&inner.log, move |log| Ok(h.renew(log, ttl, now))).await.unwrap_or(false);
                if !renewed {
                    inner.leasing.renewals_lost.fetch_add(1, Ordering::Relaxed);
                    return lost(&inner, run, "its renewal failed");
                }
            }
        }
    }
}

fn lost(inner: &Inner, run: RunId, why: &str) -> DriveOutcome {
    inner.leasing.drives_lost.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%run, why, "lost the run's lease: stopped driving it (in-flight calls dropped)");
    DriveOutcome::LeaseLost
}

/// How often the service workers list the store's runs again (a run submitted by another
/// process, or whose driver elsewhere lost its lease or died): once per lease time-to-live.
/// With a shared queue those runs are in the queue; the scan is only a safety net (a run
/// whose push was lost with its process), once per [`SHARED_RESCAN`] (or poll) at most.
pub(crate) fn rescan_every(inner: &Inner) -> Duration {
    let ttl = Duration::from_millis(inner.leasing.ttl_ms);
    if crate::shell::shared::is_shared(inner) {
        ttl.max(SHARED_RESCAN).max(inner.queue_poll)
    } else {
        ttl
    }
}

/// Least time between two scans of a store with a shared queue.
const SHARED_RESCAN: Duration = Duration::from_secs(60);
