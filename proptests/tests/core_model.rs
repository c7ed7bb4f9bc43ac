//! Random workflows and fault schedules through the pure core (`sim::simulate`), checked
//! against the reference model and the invariants; crash at every boundary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_proptests::check;
use keel_proptests::driver::{check_seed, crash_every_boundary, drive_shuffled, MAX_EVENTS};
use keel_proptests::gen::GenConfig;
use keel_proptests::gen::Scenario;
use keel_proptests::{cases, env_u64};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

fn repro(seed: u64, n: usize, e: String) -> TestCaseError {
    TestCaseError::fail(format!("{e}\n  reproduce: KEEL_SEED={seed:#x} KEEL_TASKS={n} cargo test -p keel-proptests --test core_model -- replay_one --nocapture"))
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn core_matches_reference_model_and_invariants(seed in any::<u64>(), n in 1usize..=30) {
        check_seed(seed, n, &GenConfig::default()).map_err(|e| repro(seed, n, e))?;
    }
}

/// Crash after every event of random runs (a manual runner, to count the crash points).
#[test]
fn crash_after_every_event_resumes_to_the_same_run() {
    use proptest::test_runner::TestRunner;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let points = AtomicUsize::new(0);
    let boundaries = AtomicUsize::new(0);
    let runs = AtomicUsize::new(0);
    let mut runner = TestRunner::new(config(12));
    let result = runner.run(&(any::<u64>(), 1usize..=12), |(seed, n)| {
        let r = check_seed(seed, n, &GenConfig::default()).map_err(|e| repro(seed, n, e))?;
        let (p, b) = crash_every_boundary(&r).map_err(|e| repro(seed, n, e))?;
        points.fetch_add(p, Ordering::Relaxed);
        boundaries.fetch_add(b, Ordering::Relaxed);
        runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    println!(
        "crash points: {} runs, {} cut points resumed ({} at batch boundaries, the rest inside a batch)",
        runs.load(Ordering::Relaxed),
        points.load(Ordering::Relaxed),
        boundaries.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Rerun one seed: `KEEL_SEED=0x.. KEEL_TASKS=n`.
#[test]
fn replay_one() {
    let Some(seed) = env_u64("KEEL_SEED") else { return };
    let n = env_u64("KEEL_TASKS").unwrap_or(10) as usize;
    let r = check_seed(seed, n, &GenConfig::default());
    match r {
        Ok(r) => {
            for e in &r.log {
                println!("{:>4} {:>10} {:?}", e.seq.0, e.at_us, e.event);
            }
            let (points, b) = crash_every_boundary(&r).unwrap_or_else(|e| panic!("{e}"));
            println!("ok: {} events, {points} crash points ({b} at batch boundaries)", r.log.len());
        }
        Err(e) => {
            if let Ok(r) = keel_proptests::driver::simulate_seed(seed, n, &GenConfig::default()) {
                for e in &r.log {
                    println!("{:>4} {:>10} {:?}", e.seq.0, e.at_us, e.event);
                }
            }
            panic!("seed {seed:#x} n {n}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Answers arrive in random order and timers fire at random points, as with real
    /// concurrent handlers: the invariants and the determinism check must still hold.
    #[test]
    fn shuffled_answers_keep_every_invariant(seed in any::<u64>(), n in 1usize..=30, order in any::<u64>()) {
        // With run deadlines and escalation deadlines + defaults (timers).
        let sc = Scenario::generate(seed, n, &GenConfig { deadlines: true, ..GenConfig::default() });
        let log = drive_shuffled(&sc, order, MAX_EVENTS, false).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
        let states = check::fold_prefixes(&log).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
        check::invariants(&sc, &log, &states).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
        check::batches(&log, &states, &sc.context()).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
        check::replay_check(&sc, &log).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Two answers land back to back with no `decide` in between (two drivers of one
    /// run): `decide` must keep every budget on any state `apply` accepts.
    #[test]
    fn piled_up_answers_keep_every_invariant(seed in any::<u64>(), n in 1usize..=30, order in any::<u64>()) {
        let sc = Scenario::generate(seed, n, &GenConfig { deadlines: true, ..GenConfig::default() });
        let log = drive_shuffled(&sc, order, MAX_EVENTS, true).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
        let states = check::fold_prefixes(&log).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
        check::invariants(&sc, &log, &states).map_err(|e| repro(seed, n, format!("order {order:#x}: {e}")))?;
    }
}

/// The generators reach what they are meant to: every terminal status, every escalation
/// cause, every budget kind, rejected plans, replans, retries, gate failures, deadline
/// defaults. Prints the histogram (`--nocapture`).
#[test]
fn generated_runs_cover_the_semantics() {
    use keel_engine::{EscalationCause, Event, RunStatus};
    use std::collections::BTreeMap;
    let runs = keel_proptests::cases(300).max(300) as u64;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut bump = |k: String| *seen.entry(k).or_default() += 1;
    for i in 0..runs {
        let seed = keel_proptests::rng::hash64(&[b"coverage", &i.to_le_bytes()]);
        let cfg = GenConfig { deadlines: i % 2 == 1, ..GenConfig::default() };
        let sc = Scenario::generate(seed, 1 + (i % 30) as usize, &cfg);
        let log = drive_shuffled(&sc, seed, MAX_EVENTS, false).unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
        let states = check::fold_prefixes(&log).unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
        let last = states.last().expect("state");
        bump(format!("status {:?}", last.status));
        for e in &log {
            bump(format!("event {}", e.event.kind_name()));
            match &e.event {
                Event::Escalated(x) => bump(format!("cause {:?}", x.cause)),
                Event::BudgetExhausted { budget, .. } => bump(format!("exhausted {budget:?}")),
                Event::HumanResolved { defaulted: true, .. } => bump("deadline default".into()),
                Event::TaskFailed { source: keel_engine::FailureSource::Gate, .. } => bump("schema gate".into()),
                _ => {}
            }
        }
    }
    for (k, n) in &seen {
        println!("{n:>7}  {k}");
    }
    let must = [
        format!("status {:?}", RunStatus::Completed),
        format!("status {:?}", RunStatus::Failed),
        format!("status {:?}", RunStatus::AwaitingHuman),
        format!("cause {:?}", EscalationCause::CriticalVerdict),
        format!("cause {:?}", EscalationCause::FatalError),
        format!("cause {:?}", EscalationCause::ReplansExhausted),
        format!("cause {:?}", EscalationCause::BudgetExhausted),
        format!("cause {:?}", EscalationCause::HumanReviewTask),
        "event PlanRejected".into(),
        "event Replanned".into(),
        "event RetryScheduled".into(),
        "event TaskSkipped".into(),
        "schema gate".into(),
        "deadline default".into(),
        "exhausted Deadline".into(),
        "exhausted Cost".into(),
        "exhausted Retries".into(),
        "exhausted LlmCalls".into(),
        "exhausted ToolCalls".into(),
    ];
    let missing: Vec<&String> = must.iter().filter(|m| !seen.contains_key(*m)).collect();
    assert!(missing.is_empty(), "generators never reached: {missing:?}");
}
