//! A service's database, written with keel_engine's API for a workflow type the stock
//! `keel` binary does not know ("refunds"): the commands that need no handlers work on
//! it; those that call the workflow's code refuse in one line that names the workflow
//! and says what to do, and leave the runs as they were; `keel_cli::run_with` and the
//! service's registry drive them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::keel;
use keel_engine::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

const WORKFLOW: &str = "refunds";

/// Plans one tool call.
struct RefundPlanner;

impl Planner for RefundPlanner {
    fn plan(&self, _req: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let mut pay = TaskSpec::new("pay_refund", TaskKind::Tool, "pay_refund");
        pay.timeout_ms = 2_000;
        pay.success_criteria = Some("refunds need a person".to_owned());
        Box::pin(async move { Ok(Plan { tasks: vec![pay], rationale: "pay it".into() }) })
    }
}

struct PayRefund;

impl TaskHandler for PayRefund {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let cents = call.run_input.value().ok().and_then(|v| v["cents"].as_u64()).unwrap_or(0);
        Box::pin(async move { Ok(TaskOutput { output: json!({ "paid_cents": cents }), usage: Usage::default() }) })
    }
}

/// Every refund escalates: a person approves it.
struct AskAPerson;

impl Evaluator for AskAPerson {
    fn evaluate(&self, _req: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        Box::pin(async move {
            Ok(Evaluation { verdict: Verdict::Critical, notes: "a person decides".into(), usage: Usage::default() })
        })
    }
}

/// Task handlers by name, as a registry takes them.
type Handlers = Vec<(&'static str, Arc<dyn TaskHandler>)>;

fn refunds() -> (WorkflowType, Handlers) {
    let wf = WorkflowType::new(WORKFLOW, Arc::new(RefundPlanner), Arc::new(AskAPerson));
    let pay: Arc<dyn TaskHandler> = Arc::new(PayRefund);
    (wf, vec![("pay_refund", pay)])
}

/// Two runs driven until they wait for a person, one submitted and not driven.
fn service_db(db: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (wf, handlers) = refunds();
        let mut b = Engine::builder().path(db).workflow(wf);
        for (name, h) in handlers {
            b = b.handler(name, h);
        }
        let engine = b.open().unwrap();
        for cents in [1_200, 3_400] {
            engine.submit(Request::new(WORKFLOW, json!({ "cents": cents }))).await.unwrap();
        }
        let idle = engine.run_until_idle().await.unwrap();
        assert_eq!(idle.awaiting_human, 2, "{idle:?}");
        engine.submit(Request::new(WORKFLOW, json!({ "cents": 5_600 }))).await.unwrap();
    });
}

/// Each run's (status, events), from `keel runs --json`.
fn runs(db: &Path) -> Vec<(String, String, u64)> {
    let v = keel(db, &["runs", "--json"]).ok().json();
    v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["workflow"], WORKFLOW);
            (
                r["run"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
                r["events"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn assert_refusal(line: &str, to: &str) {
    assert!(line.contains("workflow \"refunds\""), "{line}");
    assert!(line.contains("which this keel binary does not know"), "{line}");
    assert!(line.contains(&format!("run the service's own keel binary (keel_cli::main_with) to {to}")), "{line}");
}

#[test]
fn the_stock_binary_reads_and_resolves_a_services_runs_and_refuses_to_drive_them_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("service-db");
    service_db(&db);
    let before = runs(&db);
    assert_eq!(before.len(), 3);
    let waiting: Vec<&str> =
        before.iter().filter(|(_, s, _)| s == "AwaitingHuman").map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(waiting.len(), 2, "{before:?}");
    let run = waiting[0];

    // Driving needs the workflow's code: one line naming the workflow and what to do.
    let line = keel(&db, &["work", "--until-idle"]).one_line_error(1);
    assert_refusal(&line, "drive them");
    assert!(line.contains("3 unfinished runs"), "{line}");
    assert_eq!(runs(&db), before, "a refused `keel work` leaves every run as it was");
    // `keel demo` would work every unfinished run of the database too: it refuses before
    // submitting anything.
    assert_refusal(&keel(&db, &["demo", "--runs", "1"]).one_line_error(1), "drive them");
    assert_eq!(runs(&db), before, "a refused `keel demo` adds no run and drives none");

    // Reading, exporting, verifying and resolving need no handlers.
    let shown = keel(&db, &["show", run, "--json"]).ok().json();
    assert_eq!(shown["status"], "AwaitingHuman");
    let esc = keel(&db, &["escalations", "--json"]).ok().json();
    assert_eq!(esc["escalations"].as_array().unwrap().len(), 2);
    let stats = keel(&db, &["stats", "--json"]).ok().json();
    assert_eq!(stats["workflows"][0]["workflow"], WORKFLOW);
    let file = dir.path().join("run.jsonl");
    keel(&db, &["export", run, "--format", "jsonl", "-o", file.to_str().unwrap()]).ok();
    let verified = keel(&db, &["verify", file.to_str().unwrap(), "--against-db", "--json"]).ok().json();
    assert_eq!(verified["ok"], true);
    assert_eq!(keel(&db, &["verify", "--json"]).ok().json()["ok"], true);
    keel(&db, &["replay", run, "--json"]).ok();
    keel(&db, &["replay", "--all", "--json"]).ok();
    let resolved = keel(&db, &["resolve", run, "--decision", "approve", "--by", "ops", "--reason", "checked"]);
    resolved.ok();
    assert!(resolved.stdout.contains("resolved run"), "{}", resolved.stdout);
    assert!(resolved.stdout.contains("the service's own keel binary"), "{}", resolved.stdout);
    let after_resolve = runs(&db);
    assert_ne!(after_resolve, before, "the resolution is recorded");

    // Still one line once resolved; checking and forking need the workflow's code too.
    assert_refusal(&keel(&db, &["work", "--until-idle"]).one_line_error(1), "drive them");
    assert_refusal(&keel(&db, &["replay", run, "--check"]).one_line_error(1), "check it");
    assert_refusal(&keel(&db, &["replay", "--all", "--check"]).one_line_error(1), "check it");
    assert_refusal(&keel(&db, &["fork", run, "--at", "2"]).one_line_error(1), "fork it");
    let elsewhere = dir.path().join("fork-db");
    assert_refusal(
        &keel(&elsewhere, &["fork", run, "--from", file.to_str().unwrap(), "--at", "2"]).one_line_error(1),
        "fork it",
    );
    assert!(!elsewhere.exists(), "a refused fork creates no database");
    assert_eq!(runs(&db), after_resolve, "refused commands leave every run as it was");

    // Cancelling needs no handlers either: recorded with who and why, once.
    let cancelled = keel(&db, &["cancel", run, "--reason", "customer withdrew", "--by", "ops", "--json"]).ok().json();
    assert_eq!(cancelled["cancelled"], true);
    assert_eq!(cancelled["by"], "ops");
    let shown = keel(&db, &["show", run, "--json"]).ok().json();
    assert_eq!(shown["status"], "Cancelled", "{shown}");
    let again = keel(&db, &["cancel", run, "--reason", "twice"]).one_line_error(1);
    assert!(again.contains("Cancelled") || again.contains("ended") || again.contains("terminal"), "{again}");
    assert_eq!(keel(&db, &["cancel", run, "--reason", "  "]).one_line_error(2), "error: --reason must not be empty");
}

#[test]
fn a_service_binary_with_its_registry_drives_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("service-db");
    service_db(&db);
    let (wf, handlers) = refunds();
    let registry = keel_cli::Registry::new().workflow(wf, handlers);
    assert!(registry.knows(WORKFLOW) && !registry.knows("support_ticket"));
    let keel_of_service = |args: &[&str]| {
        let mut all = vec!["keel", "--db", db.to_str().unwrap()];
        all.extend_from_slice(args);
        keel_cli::run_with(registry.clone(), all)
    };
    assert_eq!(keel_of_service(&["work", "--until-idle"]), ExitCode::SUCCESS);
    let statuses: Vec<String> = runs(&db).into_iter().map(|(_, s, _)| s).collect();
    assert_eq!(statuses.iter().filter(|s| *s == "AwaitingHuman").count(), 3, "{statuses:?}");
    let run: Value = keel(&db, &["escalations", "--json"]).ok().json()["escalations"][0]["run"].clone();
    assert_eq!(
        keel_of_service(&["resolve", run.as_str().unwrap(), "--decision", "approve", "--reason", "checked"]),
        ExitCode::SUCCESS
    );
    assert_eq!(keel_of_service(&["work", "--until-idle"]), ExitCode::SUCCESS);
    assert_eq!(keel_of_service(&["replay", "--all", "--check"]), ExitCode::SUCCESS);
    // The service's binary does not know the demo.
    assert_eq!(keel_of_service(&["demo"]), ExitCode::from(1));
}
