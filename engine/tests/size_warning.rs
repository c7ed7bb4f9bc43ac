//! The size warning: a run whose log crosses a threshold (`EngineBuilder::size_warning`)
//! gets one `RunSizeWarning` per threshold, recorded by its driver, never repeated, and
//! its status never moves; `runs()` carries it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
mod common;
use common::*;
use keel_engine::*;

fn tool(id: &str) -> TaskSpec {
    task(id, TaskKind::Tool, "ok", &[])
}

/// Five independent tool tasks: a log of about twenty events.
fn five_tasks() -> WorkflowType {
    workflow("w", planner(vec![plan(["a", "b", "c", "d", "e"].into_iter().map(tool).collect())]), pass_evaluator())
}

fn warnings(events: &[Logged]) -> Vec<(Seq, SizeWarning)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::RunSizeWarning { events, bytes, events_max, bytes_max } => Some((
                e.seq,
                SizeWarning { events: *events, bytes: *bytes, events_max: *events_max, bytes_max: *bytes_max },
            )),
            _ => None,
        })
        .collect()
}

/// The run's status just before and just after each `RunSizeWarning`, folded from its log.
fn statuses_around_warnings(events: &[Logged]) -> Vec<(RunStatus, RunStatus)> {
    let mut state: Option<RunState> = None;
    let mut out = Vec::new();
    for e in events {
        let before = state.as_ref().map(|s| s.status);
        state = Some(apply(state.as_ref(), e).unwrap());
        if let (Event::RunSizeWarning { .. }, Some(b)) = (&e.event, before) {
            out.push((b, state.as_ref().unwrap().status));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_the_event_threshold_records_exactly_one_warning() {
    let dir = tempdir();
    let engine = open_engine(dir.path(), five_tasks(), &[("ok", ok_handler(Usage::default()))], |b| {
        b.size_warning(6, 0).snapshot_every(4)
    });
    let (run, ev) = run_one(&engine, "w").await;
    let state = engine.state(run).unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{:?}", kinds(&ev));
    let found = warnings(&ev);
    assert_eq!(found.len(), 1, "one warning per threshold crossed: {:?}", kinds(&ev));
    let (seq, w) = found[0];
    // Recorded at the first decision round after the log held six events (a round may
    // stage several), naming the events before it.
    assert_eq!(w.events, seq.0);
    assert!((6..12).contains(&w.events), "{w:?}");
    assert_eq!((w.events_max, w.bytes_max), (6, 0));
    assert!(w.events_crossed() && !w.bytes_crossed());
    // The bytes it names are those of the events before it, as the fold counts them.
    let before = keel_engine::fold(ev.iter().take(seq.0 as usize)).unwrap().unwrap();
    assert_eq!(w.bytes, before.log_bytes);
    assert!(w.bytes > 0);
    // Kept in the state and in the run listing; snapshot + tail equals a full fold.
    assert_eq!(state.size_warning, Some(w));
    assert_eq!(fold_full(engine.store().as_ref(), run).unwrap().unwrap(), state);
    let listed = engine.runs().unwrap();
    assert_eq!(listed[0].size_warning, Some(w));
    // A run under the thresholds has none.
    let quiet = open_engine(&dir.path().join("quiet"), five_tasks(), &[("ok", ok_handler(Usage::default()))], |b| b);
    let (run, ev) = run_one(&quiet, "w").await;
    assert!(warnings(&ev).is_empty(), "{:?}", kinds(&ev));
    assert_eq!(quiet.runs().unwrap()[0].size_warning, None);
    assert_eq!(quiet.state(run).unwrap().size_warning, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_warns_once_and_the_status_never_moves() {
    let dir = tempdir();
    // Both thresholds: the byte threshold is crossed at once (the first event), the event
    // threshold later: two warnings, each naming its own crossing.
    let engine =
        open_engine(dir.path(), five_tasks(), &[("ok", ok_handler(Usage::default()))], |b| b.size_warning(8, 1));
    let (_, ev) = run_one(&engine, "w").await;
    let found = warnings(&ev);
    assert_eq!(found.len(), 2, "{:?}", kinds(&ev));
    assert!(found[0].1.bytes_crossed() && !found[0].1.events_crossed(), "{found:?}");
    assert_eq!(found[0].0, Seq(1));
    assert!(found[1].1.events_crossed(), "{found:?}");
    for (before, after) in statuses_around_warnings(&ev) {
        assert_eq!(before, after);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_is_recorded_in_every_live_status() {
    let mut seen = Vec::new();
    // Accepted, Planning, Running: a fresh run crosses 1, 2 or 3 events in each.
    for n in 1..=3 {
        let dir = tempdir();
        let engine =
            open_engine(dir.path(), five_tasks(), &[("ok", ok_handler(Usage::default()))], |b| b.size_warning(n, 0));
        let (_, ev) = run_one(&engine, "w").await;
        seen.extend(statuses_around_warnings(&ev));
    }
    // AwaitingHuman: a run waiting for a review, driven again by an engine with a threshold
    // below its size.
    let dir = tempdir();
    let review = || {
        workflow("r", planner(vec![plan(vec![task("review", TaskKind::HumanReview, "review", &[])])]), pass_evaluator())
    };
    let engine = open_engine(dir.path(), review(), &[], |b| b);
    let (run, _) = run_one(&engine, "r").await;
    assert_eq!(engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
    drop(engine);
    let engine = open_engine(dir.path(), review(), &[], |b| b.size_warning(1, 0));
    let report = engine.run_until_idle().await.unwrap();
    assert!(report.stopped.is_empty(), "{:?}", report.stopped);
    let ev = engine.events(run).unwrap();
    seen.extend(statuses_around_warnings(&ev));
    assert_eq!(
        seen,
        vec![
            (RunStatus::Accepted, RunStatus::Accepted),
            (RunStatus::Planning, RunStatus::Planning),
            (RunStatus::Running, RunStatus::Running),
            (RunStatus::AwaitingHuman, RunStatus::AwaitingHuman),
        ]
    );
}
