//! Group commit: concurrent appenders share one flush.
//!
//! Each appender takes a ticket AFTER its write is in sled's memory. If no flush is running,
//! it becomes the leader and runs one flush covering every ticket issued so far; otherwise
//! it waits. It returns once `flushed_upto >= its ticket`, i.e. once a flush that started
//! after its write has completed. A failed flush poisons the coordinator: the leader gets
//! the error, every waiter and every later caller gets `Poisoned`.

use crate::error::StoreError;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Default)]
struct State {
    issued: u64,
    flushed_upto: u64,
    flushing: bool,
    poisoned: bool,
    /// Number of flushes run (for the bench: appends per flush).
    flushes: u64,
}

#[derive(Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupCommit {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a flush that started after this call has completed, running it as the
    /// leader if no flush is in progress.
    /// Each flush run is recorded in `meter` (its latency, and the appends it made durable).
    pub fn commit(
        &self,
        flush: impl Fn() -> Result<(), StoreError>,
        meter: &crate::stats::CommitMeter,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.flushed_upto >= ticket {
                return Ok(());
            }
            if st.poisoned {
                return Err(StoreError::Poisoned);
            }
            if st.flushing {
                st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.flushing = true;
            let target = st.issued;
            drop(st);
            let start = std::time::Instant::now();
            let result = flush();
            let micros = crate::stats::micros_since(start);
            st = self.lock();
            st.flushing = false;
            st.flushes += 1;
            match result {
                Ok(()) => {
                    // The appends this flush made durable: every ticket above the last mark.
                    meter.flushed(micros, target.saturating_sub(st.flushed_upto));
                    st.flushed_upto = st.flushed_upto.max(target);
                }
                Err(e) => {
                    st.poisoned = true;
                    drop(st);
                    self.done.notify_all();
                    return Err(e);
                }
            }
            self.done.notify_all();
        }
    }

    /// Flushes run so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn concurrent_commits_share_flushes_and_each_waits_for_one_after_it() {
        let gc = Arc::new(GroupCommit::new());
        let meter = Arc::new(crate::stats::CommitMeter::default());
        let flushes = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gc, flushes, meter) = (gc.clone(), flushes.clone(), meter.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        gc.commit(
                            || {
                                std::thread::sleep(Duration::from_millis(2));
                                flushes.fetch_add(1, Ordering::SeqCst);
                                Ok(())
                            },
                            &meter,
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert_eq!(n, gc.flushes());
        assert!(n < 160, "{n} flushes for 160 commits: not shared");
        // The meter saw every flush, and the appends they covered add up to the commits.
        let stats = meter.stats(true);
        assert_eq!(stats.flush_latency_us.count(), n);
        assert_eq!(stats.batch_appends.count(), n);
        assert_eq!(stats.batch_appends.sum, 160);
        // 2 ms sleeps: no flush was measured under 1 ms (the first bucket is 100 µs).
        assert_eq!(stats.flush_latency_us.counts.first(), Some(&0));
    }

    #[test]
    fn a_failed_flush_fails_the_leader_then_poisons_everyone() {
        let gc = GroupCommit::new();
        let meter = crate::stats::CommitMeter::default();
        gc.commit(|| Ok(()), &meter).unwrap();
        let err = gc.commit(|| Err(StoreError::Io(std::io::Error::other("disk gone"))), &meter);
        assert!(matches!(err, Err(StoreError::Io(_))));
        assert!(matches!(gc.commit(|| Ok(()), &meter), Err(StoreError::Poisoned)));
        // Only the flush that succeeded is measured.
        assert_eq!(meter.stats(true).batch_appends.count(), 1);
    }
}
