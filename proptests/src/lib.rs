//! keel-proptests: a battery that tries to break keel's promise across its crates.
//!
//! - [`gen`]: random workflows (plans, budgets, policies) and fault schedules, all derived
//!   from one `u64` seed so every failure reruns from the seed it prints.
//! - [`script`]: a [`keel_engine::sim::Script`] that answers from a [`gen::Scenario`]
//!   statelessly (answers depend only on revision, task, attempt, escalation number), so a
//!   run resumed from any prefix of its log gets the same answers.
//! - [`refmodel`]: a small reference model of what a run should do, written from
//!   docs/ARCHITECTURE.md ("The core's semantics") without calling `decide`.
//! - [`check`]: invariants every log must satisfy, the batch/determinism check, and
//!   comparisons.
//! - [`driver`]: a shell-like driver that lets answers of parallel tasks arrive in random
//!   order (interleavings the single-threaded simulator never produces).
//!
//! See docs/TESTING.md for how to run, reproduce and soak.

// A test battery, not a library anyone links: an index out of bounds here is a failed
// test with its seed printed, which is what it should be.
#![allow(clippy::indexing_slicing, missing_docs)]

pub mod check;
pub mod driver;
pub mod gen;
pub mod refmodel;
pub mod rng;
pub mod script;
pub mod world;

/// Number of cases: `PROPTEST_CASES` if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An env var as u64 (decimal or 0x-hex).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}
