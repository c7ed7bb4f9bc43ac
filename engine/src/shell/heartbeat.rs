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
///
/// The heartbeat is a task of its own, not a branch beside the driver in one task: a
/// driver's step may hold its thread for a long time (a store call in place, a large output
/// hashed and stored as a payload), and a heartbeat polled by the same task waited for it,
/// so a slow step let the lease expire under a live driver (seen with 8 outputs of 1 MB on
/// a loaded machine). Renewals and appends still never race: both take the lease's lock.
pub(crate) async fn drive_leased(
    inner: Arc<Inner>,
    run: RunId,
    wake: Arc<Notify>,
    stop: watch::Receiver<crate::shell::driver::Phase>,
    held: Arc<Held>,
) -> DriveOutcome {
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let beat = tokio::spawn(renew_until_lost(inner.clone(), held.clone(), lost_tx));
    // Let the heartbeat start (arm its timer) before the drive may hold this thread: a task
    // spawned here sits in this worker's next-task slot, which other workers cannot take.
    tokio::task::yield_now().await;
    let driving = drive(inner.clone(), run, wake, stop, Some(held.clone()));
    let out = tokio::select! {
        out = driving => Some(out),
        // The heartbeat ended: its renewal failed (or the task is gone).
        _ = lost_rx => None,
    };
    // Gone before the drive ends: the heartbeat holds the engine (and so the store).
    beat.abort();
    let _ = beat.await;
    let Some(out) = out else {
        inner.leasing.renewals_lost.fetch_add(1, Ordering::Relaxed);
        return lost(&inner, run, "its renewal failed");
    };
    if held.is_lost() {
        inner.leasing.fenced.fetch_add(1, Ordering::Relaxed);
        return lost(&inner, run, "an append was fenced");
    }
    // The shared queue hears that the drive ended while the lease is still held: a run
    // without a live lease is a claim candidate, and a claimer's row lock on it made the
    // queue's bookkeeping wait for that claim to commit (and could claim the run again
    // for an idle drive).
    if held.is_ended() {
        // The drive's end went to the queue with its last append (the lease with it).
        return out;
    }
    let (h, inner2, done) = (held.clone(), inner.clone(), out.clone());
    if let Err(e) = blocking(&inner.log, move |log| {
        h.release_after(log, |lease| crate::shell::shared::done(&inner2, run, &done, lease));
        Ok(())
    })
    .await
    {
        tracing::warn!(%run, error = %e, "cannot release the run's lease (it expires)");
    }
    out
}

/// Renews `held` every third of the lease's time-to-live until a renewal fails; then
/// tells the drive (`lost`) and ends.
async fn renew_until_lost(inner: Arc<Inner>, held: Arc<Held>, lost: tokio::sync::oneshot::Sender<()>) {
    let every = Duration::from_millis((inner.leasing.ttl_ms / 3).max(1));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beat.tick().await;
        let (h, ttl, now) = (held.clone(), inner.leasing.ttl_ms, inner.leasing.clock.now_us());
        let renewed = blocking(&inner.log, move |log| Ok(h.renew(log, ttl, now))).await.unwrap_or(false);
        if !renewed {
            let _ = lost.send(());
            return;
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
