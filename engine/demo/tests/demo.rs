//! The demo batch shows every scenario it names, on the events it records: a batch of 8
//! runs plays each scenario of `keel_demo::SCENARIOS` once, and each run's log must carry
//! that scenario's signature (and its outcome), whatever the batch seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;
use keel_demo as demo;
use keel_engine::*;

/// Index of the first event of `log` that matches `pred`, if any.
fn first(log: &[Logged], pred: impl Fn(&Event) -> bool) -> Option<usize> {
    log.iter().position(|l| pred(&l.event))
}

/// `a` is recorded, and `b` after it.
fn then(log: &[Logged], a: impl Fn(&Event) -> bool, b: impl Fn(&Event) -> bool) -> bool {
    match first(log, a) {
        Some(i) => log[i + 1..].iter().any(|l| b(&l.event)),
        None => false,
    }
}

fn completed(log: &[Logged], partial: bool) -> bool {
    matches!(log.last().map(|l| &l.event), Some(Event::RunCompleted { partial: p, .. }) if *p == partial)
}

fn replanned(e: &Event) -> bool {
    matches!(e, Event::Replanned { .. })
}

/// Asserts the signature of `scenario` on `log` (one run's whole log).
fn shows(scenario: &str, log: &[Logged]) {
    let failed = |e: &Event| matches!(e, Event::TaskFailed { .. });
    match scenario {
        "happy_path" => {
            assert!(completed(log, false), "completes in full");
            assert_eq!(first(log, failed), None, "nothing fails");
            assert_eq!(first(log, |e| matches!(e, Event::ReplanRequested { .. } | Event::Escalated(_))), None);
        }
        "transient_retry" => {
            assert!(then(
                log,
                |e| matches!(e, Event::TaskFailed { class: ErrorClass::Transient, source: FailureSource::Handler, .. }),
                |e| matches!(e, Event::RetryScheduled { next_attempt: 2, .. }),
            ));
            assert!(then(
                log,
                |e| matches!(e, Event::RetryScheduled { .. }),
                |e| matches!(e, Event::TaskExecuted { attempt: 2, .. })
            ));
            assert!(completed(log, false), "the retry succeeds and the run completes in full");
        }
        "evaluator_replan" => {
            assert!(then(
                log,
                |e| matches!(e, Event::TaskEvaluated { verdict: Verdict::Hard, .. }),
                |e| matches!(e, Event::ReplanRequested { reason: PlanReason::Failure(_), .. }),
            ));
            assert!(then(log, |e| matches!(e, Event::ReplanRequested { .. }), replanned));
            assert!(completed(log, false), "the new plan completes");
        }
        "schema_gate_replan" => {
            let gate = |e: &Event| {
                matches!(e, Event::TaskFailed { source: FailureSource::Gate, class: ErrorClass::Semantic, error, .. }
                    if error == "schema_mismatch")
            };
            assert!(then(log, gate, |e| matches!(e, Event::ReplanRequested { .. })), "the gate's refusal replans");
            // The refused output never reaches a downstream task.
            let at = first(log, gate).unwrap();
            let Event::TaskFailed { task, .. } = &log[at].event else { unreachable!() };
            assert!(!log[..at].iter().any(|l| matches!(&l.event,
                Event::TaskDispatched { input, .. } if input.upstream.contains_key(task))));
            assert!(then(log, gate, replanned));
            assert!(completed(log, false));
        }
        "degraded_partial" => {
            assert!(then(
                log,
                |e| matches!(e, Event::TaskFailed { class: ErrorClass::Fatal, .. }),
                |e| matches!(e, Event::TaskSkipped { .. }),
            ));
            assert!(completed(log, true), "finishes with a partial result");
        }
        "human_escalation" => {
            let refund_escalated = |e: &Event| {
                matches!(e, Event::Escalated(x) if x.cause == EscalationCause::CriticalVerdict
                    && x.task == Some(TaskId::from("check_policy")))
            };
            assert!(then(
                log,
                |e| matches!(e, Event::TaskEvaluated { verdict: Verdict::Critical, .. }),
                refund_escalated
            ));
            assert!(matches!(log.last().map(|l| &l.event), Some(Event::EscalationNotified { .. })));
        }
        "retries_exhausted_replan" => {
            let transient = log
                .iter()
                .filter(|l| matches!(l.event, Event::TaskFailed { class: ErrorClass::Transient, .. }))
                .count();
            assert!(transient >= 2, "several attempts fail");
            assert!(log.iter().any(|l| matches!(&l.event, Event::ReplanRequested {
                reason: PlanReason::Failure(f), .. } if f.reason.starts_with("retries exhausted"))));
            assert!(then(log, |e| matches!(e, Event::ReplanRequested { .. }), replanned));
            assert!(completed(log, false));
        }
        "budget_exhausted" => {
            assert!(then(
                log,
                |e| matches!(e, Event::BudgetExhausted { budget: BudgetKind::Cost, .. }),
                |e| matches!(e, Event::RunCompleted { partial: true, .. })
            ));
            // Nothing is dispatched once the budget is spent.
            let at = first(log, |e| matches!(e, Event::BudgetExhausted { .. })).unwrap();
            assert!(!log[at..].iter().any(|l| matches!(l.event, Event::TaskDispatched { .. })));
        }
        other => panic!("scenario {other} has no signature in this test"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_batch_shows_every_scenario() {
    trace();
    for seed in [42, 2024] {
        let dir = tempdir();
        let engine = demo::register(Engine::builder().path(dir.path())).open().unwrap();
        let summary = demo::run_demo(&engine, 8, seed).await.unwrap();
        assert_eq!(summary.runs.len(), demo::SCENARIOS.len());
        let mut seen = Vec::new();
        for r in &summary.runs {
            let log = engine.events(r.run).unwrap();
            println!("seed {seed} {} {}: {:?}", r.index, r.scenario, kinds(&log));
            shows(r.scenario, &log);
            seen.push(r.scenario);
        }
        seen.sort_unstable();
        let mut all = demo::SCENARIOS.to_vec();
        all.sort_unstable();
        assert_eq!(seen, all, "seed {seed}: every scenario once");
        let refund = summary.runs.iter().find(|r| r.scenario == "human_escalation").unwrap();
        assert_eq!(refund.status, RunStatus::AwaitingHuman, "the refund waits for a human");
    }
}
