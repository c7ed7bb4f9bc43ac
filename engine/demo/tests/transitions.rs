//! Every row of both transition tables occurs in some run (issue 3): a set of scenario
//! runs on a real sled db, their logs re-folded event by event, the observed
//! `(from, trigger, to)` collected and compared with `fsm::RUN_TABLE` / `fsm::TASK_TABLE`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
#[path = "../../tests/common/mod.rs"]
mod common;
use common::*;
use keel_demo as demo;
use keel_engine::fsm::{TaskTrigger, RUN_TABLE, TASK_TABLE};
use keel_engine::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Rows these scenarios do not produce. Every row of both tables is reachable (rows that
/// could not occur were removed from the tables, so such events are now refused); the size
/// warning's rows are left to `engine/tests/size_warning.rs`
/// (`a_warning_is_recorded_in_every_live_status`): this test's engine runs at the default
/// thresholds, far above its runs.
const NEVER: &[&str] = &[
    "run Accepted -RunSizeWarning-> Accepted",
    "run Planning -RunSizeWarning-> Planning",
    "run Running -RunSizeWarning-> Running",
    "run AwaitingHuman -RunSizeWarning-> AwaitingHuman",
];

fn run_row(from: Option<RunStatus>, kind: &str, to: RunStatus) -> String {
    format!("run {} -{kind}-> {}", from.map(|s| s.name()).unwrap_or("start"), to.name())
}

fn task_row(from: TaskStatus, trigger: TaskTrigger, to: TaskStatus) -> String {
    format!("task {} -{}-> {}", from.name(), trigger.name(), to.name())
}

fn observe(events: &[Logged], seen: &mut BTreeSet<String>) {
    let mut state: Option<RunState> = None;
    for e in events {
        let next = apply(state.as_ref(), e).unwrap();
        seen.insert(run_row(state.as_ref().map(|s| s.status), e.event.kind_name(), next.status));
        if let Some(prev) = &state {
            if let Event::Replanned { superseded, .. } = &e.event {
                for id in superseded {
                    let t = &prev.tasks[prev.task_index[id]];
                    seen.insert(task_row(t.status, TaskTrigger::Superseded, TaskStatus::Superseded));
                }
            } else if let Event::TaskRedelivered { task, .. } = &e.event {
                // The task stays Dispatched: the row is read off the event, not a move.
                let (before, after) = (&prev.tasks[prev.task_index[task]], &next.tasks[next.task_index[task]]);
                seen.insert(task_row(before.status, TaskTrigger::Redelivered, after.status));
            } else {
                let named = match &e.event {
                    Event::TaskDispatched { task, .. }
                    | Event::TaskExecuted { task, .. }
                    | Event::TaskFailed { task, .. }
                    | Event::RetryScheduled { task, .. }
                    | Event::TaskEvaluated { task, .. }
                    | Event::TaskSkipped { task, .. } => Some(task.clone()),
                    Event::HumanResolved { .. } => prev.escalations.last().and_then(|x| x.escalation.task.clone()),
                    _ => None,
                };
                for t in &prev.tasks {
                    let Some(&i) = next.task_index.get(&t.spec.id) else { continue };
                    let after = next.tasks[i].status;
                    if after == t.status {
                        continue;
                    }
                    let trigger = if named.as_ref() == Some(&t.spec.id) {
                        match &e.event {
                            Event::TaskDispatched { .. } => TaskTrigger::Dispatched,
                            Event::TaskExecuted { .. } => TaskTrigger::Executed,
                            Event::TaskFailed { .. } => TaskTrigger::Failed,
                            Event::RetryScheduled { .. } => TaskTrigger::RetryScheduled,
                            Event::TaskEvaluated { verdict: Verdict::Pass | Verdict::Soft, .. } => {
                                TaskTrigger::Accepted
                            }
                            Event::TaskEvaluated { .. } => TaskTrigger::Rejected,
                            Event::TaskSkipped { .. } => TaskTrigger::Skipped,
                            _ if after == TaskStatus::Done => TaskTrigger::HumanAccepted,
                            _ => TaskTrigger::Skipped,
                        }
                    } else {
                        assert_eq!(
                            (t.status, after),
                            (TaskStatus::Pending, TaskStatus::Ready),
                            "unexplained task move on {}",
                            e.event.kind_name()
                        );
                        TaskTrigger::DepsDone
                    };
                    seen.insert(task_row(t.status, trigger, after));
                }
            }
        }
        state = Some(next);
    }
}

fn tool(id: &str, deps: &[&str]) -> TaskSpec {
    task(id, TaskKind::Tool, id, deps)
}

struct SlowPlanner(Plan, u64);
impl Planner for SlowPlanner {
    fn plan(&self, _r: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let (p, ms) = (self.0.clone(), self.1);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(p)
        })
    }
}

fn wf(name: &str, planner: Arc<dyn Planner>, eval: Arc<dyn Evaluator>) -> WorkflowType {
    workflow(name, planner, eval)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_both_transition_tables_occurs() {
    let dir = tempdir();
    let critical_eval = evaluator(|r| {
        let v = if r.task.success_criteria.as_deref() == Some("critical") { Verdict::Critical } else { Verdict::Pass };
        Ok(Evaluation { verdict: v, notes: String::new(), usage: Usage::default() })
    });
    let mut judged = tool("judged", &[]);
    judged.success_criteria = Some("critical".into());
    let mut review = task("review", TaskKind::HumanReview, "review", &[]);
    review.critical = false;
    let mut slow_retry = tool("backoff", &[]);
    slow_retry.retry.backoff_base_ms = 400;
    let mut deadline = wf("deadline", Arc::new(SlowPlanner(plan(vec![tool("ok", &[])]), 400)), pass_evaluator());
    deadline.budget.deadline_ms = Some(50);
    let mut one_at_a_time = wf(
        "ready_superseded",
        planner(vec![plan(vec![tool("wrong", &[]), tool("ok", &[])]), plan(vec![tool("ok", &[])])]),
        pass_evaluator(),
    );
    one_at_a_time.max_parallel_tasks = 1;
    let workflows = vec![
        wf("cyclic", planner(vec![plan(vec![tool("ok", &["ok2"]), tool("ok2", &["ok"])])]), pass_evaluator()),
        deadline,
        wf("slowplan", Arc::new(SlowPlanner(plan(vec![tool("ok", &[])]), 300)), pass_evaluator()),
        wf("slowtask", planner(vec![plan(vec![tool("slow", &[])])]), pass_evaluator()),
        wf("review", planner(vec![plan(vec![review.clone(), tool("ok", &[])])]), pass_evaluator()),
        wf("review_ok", planner(vec![plan(vec![review, tool("ok", &["review"])])]), pass_evaluator()),
        wf("fatal", planner(vec![plan(vec![tool("fatal", &[])])]), pass_evaluator()),
        wf("reject", planner(vec![plan(vec![judged.clone(), tool("ok", &["judged"])])]), critical_eval.clone()),
        wf("abort", planner(vec![plan(vec![judged])]), critical_eval),
        one_at_a_time,
        wf(
            "retry_superseded",
            planner(vec![plan(vec![slow_retry.clone(), tool("wrong", &[])]), plan(vec![tool("ok", &[])])]),
            pass_evaluator(),
        ),
    ];
    let mut b =
        demo::register(Engine::builder().path(dir.path())).policy(Policy { max_replans: 1, ..Policy::default() });
    for w in workflows {
        b = b.workflow(w);
    }
    let handlers: Vec<(&str, Arc<dyn TaskHandler>)> = vec![
        ("ok", ok_handler(Usage::default())),
        ("ok2", ok_handler(Usage::default())),
        ("slow", slow_handler(400, |_| Ok(TaskOutput { output: json!(1), usage: Usage::default() }))),
        ("fatal", handler(|_| Err(HandlerError::fatal("account closed")))),
        ("judged", ok_handler(Usage::default())),
        ("wrong", handler(|_| Err(HandlerError::semantic("wrong approach")))),
        ("backoff", handler(|_| Err(transient("busy")))),
    ];
    for (n, h) in handlers {
        b = b.handler(n, h);
    }
    let engine = b.open().unwrap();

    let submit = |name: &str| {
        let e = engine.clone();
        let name = name.to_owned();
        async move { e.submit(Request::new(name, json!({}))).await.unwrap().run }
    };
    let resolve = |run, d: Decision| {
        let e = engine.clone();
        async move {
            e.resolve(run, Resolution { decision: d, by: "tester".into(), reason: "checked".into() }).await.unwrap()
        }
    };

    // Cancelled while Accepted.
    let accepted = submit("slowplan").await;
    engine.cancel(accepted, "t", "before anything").await.unwrap();
    // Demo batch: retries, replans, gate, skip, escalation, budget.
    let summary = demo::run_demo(&engine, 8, 11).await.unwrap();
    let escalated = summary.runs.iter().find(|r| r.status == RunStatus::AwaitingHuman).unwrap().run;
    resolve(escalated, Decision::Approve).await;
    let mut runs: Vec<RunId> = summary.runs.iter().map(|r| r.run).collect();
    for name in [
        "cyclic",
        "deadline",
        "review",
        "review_ok",
        "fatal",
        "reject",
        "abort",
        "ready_superseded",
        "retry_superseded",
    ] {
        runs.push(submit(name).await);
    }
    engine.run_until_idle().await.unwrap();
    // Decisions for the runs now waiting.
    let waiting = |name: &str| {
        engine
            .runs()
            .unwrap()
            .into_iter()
            .find(|r| r.workflow == name && r.status == RunStatus::AwaitingHuman)
            .map(|r| r.run)
    };
    engine.cancel(waiting("cyclic").expect("cyclic escalated from Planning"), "t", "no plan").await.unwrap();
    resolve(waiting("review").expect("review escalated"), Decision::Reject).await;
    resolve(waiting("review_ok").expect("review_ok escalated"), Decision::Approve).await;
    resolve(waiting("fatal").expect("fatal escalated"), Decision::SupplyOutput(Json::new(&json!({"by": "hand"}))))
        .await;
    resolve(waiting("reject").expect("reject escalated"), Decision::Reject).await;
    resolve(waiting("abort").expect("abort escalated"), Decision::Abort).await;
    engine.run_until_idle().await.unwrap();
    // Cancelled while Planning and while Running.
    for (name, wait_for) in [("slowplan", RunStatus::Planning), ("slowtask", RunStatus::Running)] {
        let run = submit(name).await;
        runs.push(run);
        let e = engine.clone();
        let h = tokio::spawn(async move { e.run_until_idle().await });
        for _ in 0..500 {
            if engine.state(run).unwrap().status == wait_for {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        engine.cancel(run, "t", "mid-flight").await.unwrap();
        h.await.unwrap().unwrap();
    }

    // Redelivered: the workers stop while a task is in flight; the next drive finds the
    // dispatch it did not make and records the redelivery before running it again.
    let run = submit("slowtask").await;
    let workers = engine.start();
    for _ in 0..500 {
        if engine.state(run).unwrap().tasks.iter().any(|t| t.status == TaskStatus::Dispatched) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workers.shutdown().await;
    engine.run_until_idle().await.unwrap();
    assert!(engine.events(run).unwrap().iter().any(|e| matches!(e.event, Event::TaskRedelivered { .. })));

    let mut seen = BTreeSet::new();
    for run in engine.store().runs().unwrap() {
        observe(&engine.events(run).unwrap(), &mut seen);
    }
    let all: Vec<String> = RUN_TABLE
        .iter()
        .map(|(f, k, t)| run_row(*f, k, *t))
        .chain(TASK_TABLE.iter().map(|(f, tr, t)| task_row(f.expect("task rows have a source"), *tr, *t)))
        .collect();
    let missing: Vec<&String> = all.iter().filter(|r| !seen.contains(*r)).collect();
    for r in &all {
        println!("{} {r}", if seen.contains(r) { "seen " } else { "NEVER" });
    }
    let extra: Vec<&String> = seen.iter().filter(|r| !all.contains(r)).collect();
    assert!(extra.is_empty(), "transitions outside the tables: {extra:?}");
    let never: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
    assert_eq!(never, NEVER, "rows not observed (add a scenario, or document why the row cannot occur)");
}
