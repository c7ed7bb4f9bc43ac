//! `keel token add` and `keel serve` as an operator meets them: a token printed once, a
//! non-loopback address refused, the demo's escalation resolved through the API while the
//! server's workers drive the run, and SIGTERM ending the process with exit 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{http_call as call, keel_in, spawn_serve_plain};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn token_add(db: &Path, name: &str, role: &str) -> String {
    let r = keel_in(None, &["--db", db.to_str().unwrap(), "token", "add", name, "--role", role]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the token on stdout: {:?}", r.stdout);
    lines[0].to_owned()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_token_is_printed_once_and_kept_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let t = token_add(&db, "ada", "approver");
    assert!(t.starts_with("keel_"));
    let stored = std::fs::read_to_string(db.join("tokens")).unwrap();
    assert!(!stored.contains(&t) && stored.contains(" approver ada"), "{stored}");
    let r = keel_in(None, &["--db", db.to_str().unwrap(), "token", "add", "ada", "--role", "viewer"]);
    assert_eq!(r.one_line_error(1), "error: a token named \"ada\" already exists");
    // The database beside the tokens file is a keel database: read commands open it.
    assert_eq!(keel_in(None, &["--db", db.to_str().unwrap(), "runs", "--json"]).code, 0);
}

#[test]
fn serve_refuses_a_non_loopback_address_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let r = keel_in(None, &["--db", db.to_str().unwrap(), "serve", "--listen", "0.0.0.0:0"]);
    let e = r.one_line_error(2);
    assert!(e.contains("not a loopback address") && e.contains("--insecure-bind"), "{e}");
}

#[test]
fn serve_drives_runs_takes_a_resolution_and_stops_on_sigterm_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let admin = token_add(&db, "root", "admin");
    let ada = token_add(&db, "ada", "approver");
    let (mut child, addr) = spawn_serve_plain(db.to_str().unwrap());

    let req = keel_demo::request(7, 5); // the human_escalation scenario
    let body =
        json!({"workflow": req.workflow, "input": req.input, "idempotency_key": req.idempotency_key, "seed": req.seed});
    let (status, r) = call(&addr, "POST", "/v1/runs", &admin, Some(&body));
    assert_eq!(status, 201, "{r}");
    let run = r["run"].as_str().unwrap().to_owned();

    // The server's own workers drive the run to its escalation.
    wait_until("the escalation", || {
        call(&addr, "GET", "/v1/escalations", &ada, None).1["escalations"].as_array().is_some_and(|a| !a.is_empty())
    });
    let (status, r) = call(
        &addr,
        "POST",
        &format!("/v1/runs/{run}/resolve"),
        &ada,
        Some(&json!({"decision": "approve", "reason": "refund checked"})),
    );
    assert_eq!((status, r), (200, json!({"run": run, "decision": "approve", "by": "ada"})));
    wait_until("the run's end", || {
        let s = call(&addr, "GET", &format!("/v1/runs/{run}"), &ada, None).1;
        ["Completed", "Failed", "Cancelled"].contains(&s["status"].as_str().unwrap_or(""))
    });
    let s = call(&addr, "GET", &format!("/v1/runs/{run}"), &ada, None).1;
    assert_eq!(s["escalations"][0]["resolution"]["by"], "ada");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "keel serve did not stop within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    // The database is free again: a read command opens it.
    assert_eq!(keel_in(None, &["--db", db.to_str().unwrap(), "runs", "--json"]).code, 0);
}
