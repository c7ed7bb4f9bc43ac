//! What a store measured about its own commits, for a server's metrics: how long the
//! flushes that make appends durable take and how many appends each one covers (group
//! commit). Plain atomics and fixed bucket arrays: no metrics crate below the server.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the latency buckets, in microseconds (100 µs to 10 s).
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Upper bounds of the batch-size buckets (appends per flush).
pub const BATCH_BOUNDS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// A histogram with fixed upper bounds, safe to observe from many threads.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One count per bound, then one for values above the last bound.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [u64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram { bounds, counts, sum: AtomicU64::new(0) }
    }

    /// Counts `value` in the first bucket whose bound is at least `value`.
    pub fn observe(&self, value: u64) {
        let i = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, ascending.
    pub bounds: Vec<u64>,
    /// Observations per bucket (not cumulative): one per bound, then one for the values
    /// above the last bound.
    pub counts: Vec<u64>,
    /// Sum of the observed values.
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }
}

/// Flushes that made appends durable ([`crate::EventLog::commit_stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Whether this store flushes appends at all (false: an in-memory store, or
    /// `Durability::None`); the histograms stay empty then.
    pub flushing: bool,
    /// How long each flush took, in microseconds.
    pub flush_latency_us: HistogramSnapshot,
    /// Appends each flush made durable (1 per flush with `Durability::EveryAppend`;
    /// with group commit, the appends that waited for that flush).
    pub batch_appends: HistogramSnapshot,
}

/// The counters behind [`CommitStats`], for a backend to keep.
#[derive(Debug)]
pub struct CommitMeter {
    flush_latency_us: Histogram,
    batch_appends: Histogram,
}

impl Default for CommitMeter {
    fn default() -> Self {
        CommitMeter {
            flush_latency_us: Histogram::new(&LATENCY_BOUNDS_US),
            batch_appends: Histogram::new(&BATCH_BOUNDS),
        }
    }
}

impl CommitMeter {
    /// Records one flush of `micros` that made `appends` durable.
    pub fn flushed(&self, micros: u64, appends: u64) {
        self.flush_latency_us.observe(micros);
        self.batch_appends.observe(appends);
    }

    /// What it recorded (`flushing`: whether the store flushes appends).
    pub fn stats(&self, flushing: bool) -> CommitStats {
        CommitStats {
            flushing,
            flush_latency_us: self.flush_latency_us.snapshot(),
            batch_appends: self.batch_appends.snapshot(),
        }
    }
}

/// Microseconds since `start`, saturated.
pub fn micros_since(start: std::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_first_bucket_at_or_above_them_and_the_rest_overflow() {
        let h = Histogram::new(&BATCH_BOUNDS);
        for v in [0, 1, 2, 3, 1024, 1025, 5000] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts.len(), BATCH_BOUNDS.len() + 1);
        assert_eq!(s.counts.first(), Some(&2)); // 0 and 1
        assert_eq!(s.counts.get(1), Some(&1)); // 2
        assert_eq!(s.counts.get(2), Some(&1)); // 3 (<= 4)
        assert_eq!(s.counts.get(10), Some(&1)); // 1024
        assert_eq!(s.counts.last(), Some(&2)); // above 1024
        assert_eq!(s.count(), 7);
        assert_eq!(s.sum, 1 + 2 + 3 + 1024 + 1025 + 5000);
    }
}
