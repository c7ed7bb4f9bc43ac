//! The web inbox in real headless Chromium against a real `keel serve` on a loopback port
//! (replay/server/browser/inbox.mjs, playwright-core driving Debian's chromium): log in
//! with a token, see the escalation's context, an invalid supplied output refused inline,
//! approve with a reason, the run completing on its page without a reload. Screenshots of
//! the inbox, the escalation and the run page go to `target/browser-artifacts/`.
//!
//! Needs node, `npm ci` in replay/server/browser and chromium (`KEEL_CHROMIUM`, default
//! /usr/bin/chromium). Without them it is skipped with the reason printed, except in CI
//! (`CI=true`), where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel_in, spawn_serve_plain, DemoDb};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// What is missing to run the browser, if anything.
fn missing(browser_dir: &Path, chromium: &Path) -> Option<String> {
    if Command::new("node").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("node is not installed".into());
    }
    if !browser_dir.join("node_modules/playwright-core/package.json").is_file() {
        return Some(format!("no node_modules in {} (run `npm ci` there)", browser_dir.display()));
    }
    if !chromium.is_file() {
        return Some(format!("no chromium at {} (apt-get install chromium, or set KEEL_CHROMIUM)", chromium.display()));
    }
    None
}

fn get_json(addr: &str, path: &str, token: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (_, body) = raw.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

#[test]
fn the_inbox_in_headless_chromium_decides_an_escalation_and_shows_the_run_complete() {
    let root = workspace();
    let browser_dir = root.join("replay/server/browser");
    let chromium = PathBuf::from(std::env::var("KEEL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if let Some(why) = missing(&browser_dir, &chromium) {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "the browser test cannot run in CI: {why}");
        println!("skipped: {why}");
        return;
    }
    let artifacts = root.join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    for shot in ["inbox.png", "escalation.png", "run.png"] {
        let _ = std::fs::remove_file(artifacts.join(shot)); // this run's screenshots, not an older run's
    }

    // The demo's database, holding two human_escalation runs waiting for a person.
    let demo = DemoDb::new(16);
    let run = demo.run_of("human_escalation").to_string();
    let db = demo.db.to_str().unwrap();
    let added = keel_in(None, &["--db", db, "token", "add", "ada", "--role", "approver"]);
    assert_eq!(added.code, 0, "{}", added.stderr);
    let token = added.stdout.trim().to_owned();

    let (mut server, addr) = spawn_serve_plain(db);
    let esc = get_json(&addr, "/v1/escalations", &token);
    let waiting = esc["escalations"].as_array().unwrap();
    assert!(waiting.len() >= 2 && waiting.iter().any(|e| e["run"] == run.as_str()), "{esc}");

    let out = Command::new("node")
        .arg(browser_dir.join("inbox.mjs"))
        .current_dir(&browser_dir)
        .env("KEEL_URL", format!("http://{addr}"))
        .env("KEEL_TOKEN", &token)
        .env("KEEL_RUN", &run)
        .env("KEEL_ARTIFACTS", &artifacts)
        .env("KEEL_CHROMIUM", &chromium)
        .output()
        .unwrap();
    let state = get_json(&addr, &format!("/v1/runs/{run}"), &token);
    let events = get_json(&addr, &format!("/v1/runs/{run}/events"), &token);
    server.kill().unwrap();
    server.wait().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the page did is on the log: approved by the token's name, with its reason.
    assert_eq!(state["status"], "Completed", "{state}");
    assert_eq!(state["escalations"][0]["resolution"]["by"], "ada");
    assert_eq!(state["escalations"][0]["resolution"]["decision"], "approve");
    let resolved: Vec<&serde_json::Value> =
        events["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "HumanResolved").collect();
    assert_eq!(resolved.len(), 1, "one decision recorded (the refused ones sent nothing): {events}");
    assert_eq!(resolved[0]["event"]["by"], "ada");
    assert_eq!(resolved[0]["event"]["reason"], "refund checked with the customer by phone");
    for shot in ["inbox.png", "escalation.png", "run.png"] {
        let p = artifacts.join(shot);
        assert!(std::fs::metadata(&p).map(|m| m.len() > 10_000).unwrap_or(false), "{} missing", p.display());
    }
}
