//! Replay, time travel, the determinism check, export round trip, fork and diff, on real
//! demo runs recorded in a sled database by the `keel` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, DemoDb};
use keel_engine::{fold, Event, Policy};
use keel_replay::check::{check_run, CheckOptions, EventClass};
use keel_replay::timeline::Replay;
use keel_replay::ReplayError;
use std::collections::BTreeSet;

fn demo_handlers() -> BTreeSet<String> {
    keel_demo::HANDLERS.iter().map(|h| (*h).to_owned()).collect()
}

fn seq_of_first(events: &[keel_engine::Logged], kind: &str) -> u64 {
    events.iter().find(|e| e.event.kind_name() == kind).unwrap_or_else(|| panic!("no {kind}")).seq.0
}

#[test]
fn replay_reproduces_every_recorded_state_of_every_demo_run() {
    let db = DemoDb::new(8);
    for r in &db.runs {
        let events = db.events(r.run);
        let replay = Replay::new(events.clone()).unwrap();
        let mut cursor = replay.cursor();
        for i in 0..events.len() {
            let want = fold(&events[..=i]).unwrap().unwrap();
            assert_eq!(replay.state_at(i as u64).unwrap(), want, "{} seq {i}: state_at", r.scenario);
            let (e, s) = cursor.forward().unwrap().unwrap();
            assert_eq!(e.seq.0, i as u64);
            assert_eq!(*s, want, "{} seq {i}: cursor forward", r.scenario);
        }
        assert!(cursor.forward().unwrap().is_none());
        // And back again, one event at a time.
        for i in (0..events.len() - 1).rev() {
            let (e, s) = cursor.back().unwrap().unwrap();
            assert_eq!(e.seq.0, i as u64);
            assert_eq!(*s, fold(&events[..=i]).unwrap().unwrap(), "{} seq {i}: cursor back", r.scenario);
        }
        assert!(cursor.back().unwrap().is_none());
        // The state the store folds (snapshots + tail) is the end of the replay.
        let store = db.open();
        let loaded = keel_engine::load_state(&store, r.run).unwrap().unwrap();
        assert_eq!(*replay.final_state(), loaded);
        assert!(matches!(replay.state_at(events.len() as u64), Err(ReplayError::SeqOutOfRange { .. })));
    }
}

#[test]
fn cli_replay_until_shows_the_folded_state_at_that_seq() {
    let db = DemoDb::new(8);
    let run = db.run_of("evaluator_replan");
    let events = db.events(run);
    for seq in [0usize, 5, 14, events.len() - 1] {
        let v = keel(&db.db, &["replay", &run.to_string(), "--until", &seq.to_string(), "--json"]).ok().json();
        let want = fold(&events[..=seq]).unwrap().unwrap();
        assert_eq!(v["seq"], seq as u64);
        assert_eq!(v["state"], keel_replay::views::state_json(&want), "seq {seq}");
        assert_eq!(v["event"]["kind"], events[seq].event.kind_name());
    }
    // --step lists every event with the states after it.
    let v = keel(&db.db, &["replay", &run.to_string()[..8], "--step", "--until", "6", "--json"]).ok().json();
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 7);
    for (i, st) in steps.iter().enumerate() {
        let want = fold(&events[..=i]).unwrap().unwrap();
        assert_eq!(st["seq"], i as u64);
        assert_eq!(st["run_status"], want.status.name());
        for t in &want.tasks {
            assert_eq!(st["tasks"][&t.spec.id.0], t.status.name());
        }
    }
}

#[test]
fn check_passes_on_every_demo_run_with_the_unchanged_policy() {
    let db = DemoDb::new(16);
    for opts in [CheckOptions::default(), CheckOptions { policy: Policy::default(), handlers: Some(demo_handlers()) }] {
        for r in &db.runs {
            let report = check_run(&db.events(r.run), &opts).unwrap();
            assert!(
                report.ok(),
                "{} ({}) diverges: {}",
                r.scenario,
                r.run,
                report.divergence.map(|d| d.to_string()).unwrap_or_default()
            );
            assert!(report.decisions > 0 && report.outcomes > 0);
        }
    }
    // The CLI gate agrees: exit 0.
    let v = keel(&db.db, &["replay", "--check", "--all", "--json"]).ok().json();
    assert_eq!(v["checked"], 16);
    assert_eq!(v["diverged"], 0);
}

#[test]
fn check_reports_the_exact_first_divergence_under_a_deliberately_changed_policy() {
    let db = DemoDb::new(8);
    let no_replans =
        CheckOptions { policy: Policy { max_replans: 0, ..Policy::default() }, handlers: Some(demo_handlers()) };

    // evaluator_replan: the hard verdict led to a replan; with no replans allowed the code
    // now escalates instead, at exactly that seq.
    let run = db.run_of("evaluator_replan");
    let events = db.events(run);
    let at = seq_of_first(&events, "ReplanRequested");
    let d = check_run(&events, &no_replans).unwrap().divergence.expect("must diverge");
    assert_eq!(d.seq, at);
    assert_eq!(d.kind, "ReplanRequested");
    assert_eq!(d.class, EventClass::Decision);
    assert_eq!(d.recorded["kind"], "ReplanRequested");
    assert_eq!(d.decided.len(), 1, "{:?}", d.decided);
    assert_eq!(d.decided[0]["command"], "Record");
    assert_eq!(d.decided[0]["event"]["kind"], "Escalated");
    assert_eq!(d.decided[0]["event"]["payload"]["cause"], "ReplansExhausted");
    assert_eq!(d.decided[0]["event"]["payload"]["task"], "draft_reply");

    // Runs that never replanned do not diverge under that policy.
    for scenario in ["happy_path", "transient_retry", "degraded_partial", "human_escalation", "budget_exhausted"] {
        let r = check_run(&db.events(db.run_of(scenario)), &no_replans).unwrap();
        assert!(r.ok(), "{scenario}: {:?}", r.divergence);
    }

    // degraded_partial: the failed non-critical task was skipped; without degradation the
    // code no longer decides that skip.
    let run = db.run_of("degraded_partial");
    let events = db.events(run);
    let skip = events
        .iter()
        .find(|e| matches!(&e.event, Event::TaskSkipped { task, .. } if task.0 == "enrich_sentiment"))
        .unwrap()
        .seq
        .0;
    let no_degrade =
        CheckOptions { policy: Policy { degrade_noncritical: false, ..Policy::default() }, handlers: None };
    let d = check_run(&events, &no_degrade).unwrap().divergence.expect("must diverge");
    assert_eq!((d.seq, d.kind.as_str()), (skip, "TaskSkipped"));
    assert!(!d.decided.iter().any(|c| c["event"]["kind"] == "TaskSkipped"), "{:?}", d.decided);

    // The CLI gate fails with one error line and prints the divergence.
    let ran = keel(&db.db, &["replay", "--check", "--all", "--policy", "max_replans=0"]);
    let line = ran.one_line_error(1);
    assert!(line.contains("diverge"), "{line}");
    assert!(ran.stdout.contains(&format!("DIVERGES  {run}", run = db.run_of("evaluator_replan"))), "{}", ran.stdout);
    let v = keel(
        &db.db,
        &["replay", &db.run_of("evaluator_replan").to_string(), "--check", "--policy", "max_replans=0", "--json"],
    );
    assert_eq!(v.code, 1);
    let v = v.json();
    assert_eq!(v["runs"][0]["divergence"]["seq"], at);
    assert_eq!(v["runs"][0]["divergence"]["kind"], "ReplanRequested");
}

#[test]
fn a_tampered_history_is_a_divergence_not_a_panic() {
    let db = DemoDb::new(8);
    let mut events = db.events(db.run_of("happy_path"));
    // Pretend the code had decided a different model for the first dispatch.
    let i = events.iter().position(|e| matches!(e.event, Event::TaskDispatched { .. })).unwrap();
    if let Event::TaskDispatched { model, .. } = &mut events[i].event {
        *model = Some("another-model".into());
    }
    let d = check_run(&events, &CheckOptions::default()).unwrap().divergence.unwrap();
    assert_eq!(d.seq, i as u64);
    assert!(d.reason.contains("different TaskDispatched"), "{}", d.reason);
    // A history the state machine refuses (an event dropped) is reported too.
    let mut events = db.events(db.run_of("happy_path"));
    events.remove(3);
    for (n, e) in events.iter_mut().enumerate() {
        e.seq = keel_store::Seq(n as u64);
    }
    assert!(check_run(&events, &CheckOptions::default()).unwrap().divergence.is_some());
}

#[test]
fn export_then_replay_from_the_file_equals_replay_from_the_db() {
    let db = DemoDb::new(8);
    let file = db.path("all.jsonl");
    keel(&db.db, &["export", "--all", "--format", "jsonl", "-o", file.to_str().unwrap()]).ok();
    let mut seen = 0;
    for item in keel_replay::export_runs(&file).unwrap() {
        let (run, from_file) = item.unwrap();
        let from_db = db.events(run);
        assert_eq!(from_file, from_db, "run {run}");
        assert_eq!(Replay::new(from_file).unwrap().final_state(), Replay::new(from_db).unwrap().final_state());
        seen += 1;
    }
    assert_eq!(seen, 8);
    // The CLI too: same state at the same seq, from the file and from the db.
    let run = db.run_of("human_escalation").to_string();
    let a = keel(&db.db, &["replay", &run, "--until", "9", "--json"]).ok().json();
    let b =
        keel(&db.db, &["replay", &run[..6], "--from", file.to_str().unwrap(), "--until", "9", "--json"]).ok().json();
    assert_eq!(a, b);
    // And the check runs over a folder of exports.
    let folder = db.path("exports");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(&file, folder.join("a.jsonl")).unwrap();
    let v = keel(&db.db, &["replay", "--check", "--all", "--from", folder.to_str().unwrap(), "--json"]).ok().json();
    assert_eq!((v["checked"].as_u64(), v["diverged"].as_u64()), (Some(8), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_with_a_changed_policy_reports_the_first_different_decision_and_the_cost() {
    let db = DemoDb::new(8);
    let run = db.run_of("evaluator_replan");
    let source = db.events(run);
    let replan = seq_of_first(&source, "ReplanRequested");

    // Unchanged policy: the fork replays the recording and makes the same steps.
    let cfg = keel_replay::ForkConfig { workflow: Some(keel_demo::workflow()), ..Default::default() };
    let same = keel_replay::fork(&source, replan - 1, cfg.clone()).await.unwrap();
    assert!(same.report.same_as_source, "{}", same.report);
    assert_eq!(same.report.cost_delta_micros, 0);
    assert!(same.report.calls.replayed >= 3, "{:?}", same.report.calls);
    assert_eq!(same.report.calls.unanswered, 0);
    assert_eq!(same.events.len(), source.len());
    assert_ne!(same.run, run);
    // The fork's own log re-checks clean under the current code (its own chain, its own keys).
    assert!(check_run(&same.events, &CheckOptions::default()).unwrap().ok());

    // max_replans = 0: the fork escalates where the source replanned, and costs less.
    let cfg = keel_replay::ForkConfig { policy: Policy { max_replans: 0, ..Policy::default() }, ..cfg };
    let forked = keel_replay::fork(&source, replan - 1, cfg).await.unwrap();
    let r = &forked.report;
    let d = r.first_different_decision.as_ref().expect("a different decision");
    assert_eq!(d.seq, replan);
    assert_eq!(d.kind, "Escalated");
    assert_eq!(d.class, EventClass::Decision);
    assert_eq!(d.other_at_seq.as_ref().unwrap()["kind"], "ReplanRequested");
    assert_eq!(r.first_source_only_event.as_ref().unwrap().kind, "ReplanRequested");
    assert_eq!(r.fork.status, "AwaitingHuman");
    assert!(r.cost_delta_micros < 0, "{r}");
    assert_eq!(r.cost_delta_micros, r.fork.cost_micros as i64 - r.source.cost_micros as i64);
    // The copied prefix is the source's, event for event (dispatch keys re-derived).
    for (a, b) in source.iter().zip(&forked.events).take(replan as usize) {
        assert!(keel_replay::diff::same_step(&a.event, &b.event), "seq {}", a.seq);
        assert_eq!(a.at_us, b.at_us);
    }

    // Saved into a database and diffed: the first difference is at the same seq.
    let dir = tempfile::tempdir().unwrap();
    let target = keel_store::SledStore::open(dir.path().join("db"), keel_store::StoreConfig::default()).unwrap();
    keel_replay::save_run(forked.store.as_ref(), &target, forked.run).unwrap();
    let stored = keel_replay::load_run_from_db(&target, forked.run).unwrap();
    assert_eq!(stored, forked.events);
    let diff = keel_replay::diff_events(&source, &stored).unwrap();
    let first = diff.first_difference.as_ref().unwrap();
    assert_eq!(first.seq, replan);
    assert_eq!(first.a.as_ref().unwrap()["kind"], "ReplanRequested");
    assert_eq!(first.b.as_ref().unwrap()["kind"], "Escalated");
    assert_eq!(diff.cost_delta_micros, r.cost_delta_micros);
    assert_eq!(diff.kinds_delta.get("ReplanRequested"), Some(&-1));
}

#[test]
fn cli_fork_and_diff() {
    let db = DemoDb::new(8);
    let run = db.run_of("evaluator_replan");
    let replan = seq_of_first(&db.events(run), "ReplanRequested");
    let v = keel(
        &db.db,
        &["fork", &run.to_string(), "--at", &(replan - 1).to_string(), "--policy", "max_replans=0", "--json"],
    )
    .ok()
    .json();
    assert_eq!(v["saved"], true);
    assert_eq!(v["first_different_decision"]["seq"], replan);
    assert_eq!(v["first_different_decision"]["kind"], "Escalated");
    assert!(v["cost_delta_micros"].as_i64().unwrap() < 0);
    let fork = v["fork"]["run"].as_str().unwrap().to_owned();
    // The fork is a run of the database now.
    let shown = keel(&db.db, &["show", &fork, "--json"]).ok().json();
    assert_eq!(shown["status"], "AwaitingHuman");
    let d = keel(&db.db, &["diff", &run.to_string(), &fork, "--json"]).ok().json();
    assert_eq!(d["first_difference"]["seq"], replan);
    assert_eq!(d["identical"], false);
    let text = keel(&db.db, &["diff", &run.to_string(), &fork]).ok().stdout.clone();
    assert!(text.contains(&format!("first difference at seq {replan}")), "{text}");
    // Bad settings are usage errors.
    let e = keel(&db.db, &["fork", &run.to_string(), "--at", "3", "--policy", "max_replans=lots"]).one_line_error(2);
    assert!(e.contains("max_replans"), "{e}");
    let e = keel(&db.db, &["fork", &run.to_string(), "--at", "999"]).one_line_error(1);
    assert!(e.contains("no seq 999"), "{e}");
}

/// Many runs in one read-ahead pass (`keel replay --all`): each run's events as one run at a
/// time gives them, also for a run listed twice and after a damaged run; the damage is the
/// error of that run only.
#[test]
fn runs_loaded_in_one_pass_equal_runs_loaded_one_at_a_time() {
    let db = DemoDb::new(8);
    let store = db.open();
    let mut runs: Vec<_> = db.runs.iter().map(|r| r.run).collect();
    let (a, b) = (runs[0], runs[1]);
    // Run b loses record 2: its load fails where `read_logged` fails.
    store.raw_remove(b, keel_engine::Seq(2)).unwrap();
    runs.extend([b, b, a, a]); // consecutive duplicates too
    let one_pass: Vec<Result<Vec<keel_engine::Logged>, String>> =
        keel_replay::load_runs_from_db(&store, &runs).map(|r| r.map_err(|e| e.to_string())).collect();
    assert_eq!(one_pass.len(), runs.len());
    for (i, &run) in runs.iter().enumerate() {
        let alone = keel_replay::load_run_from_db(&store, run).map_err(|e| e.to_string());
        assert_eq!(one_pass[i], alone, "run {run} at position {i}");
        assert_eq!(alone.is_err(), run == b, "run {run}");
    }
    // The engine-level stream: every item names its position; b's error ends b only.
    let items: Vec<(usize, bool)> = keel_engine::read_logged_runs(&store, &runs).map(|(i, r)| (i, r.is_ok())).collect();
    for (i, &run) in runs.iter().enumerate() {
        let errors = items.iter().filter(|(j, ok)| *j == i && !ok).count();
        assert_eq!(errors, usize::from(run == b), "position {i}");
        let oks = items.iter().filter(|(j, ok)| *j == i && *ok).count();
        assert_eq!(oks, if run == b { 2 } else { db.events(run).len() }, "position {i}");
    }
}
