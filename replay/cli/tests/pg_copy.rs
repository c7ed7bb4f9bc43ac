//! `keel copy` moves runs between sled and PostgreSQL with their chains and payloads
//! intact: `keel verify` on the target passes with the same head hashes, and replay
//! checks. Each test works in a fresh schema it drops; without a server it says it was
//! skipped (and fails under CI=true or KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
#[path = "../../../store/postgres/tests/common/mod.rs"]
mod pg;

use common::keel_in;
use keel_store::Durability;
use std::path::Path;

fn keel(db: &str, args: &[&str]) -> common::Ran {
    let mut all = vec!["--db", db];
    all.extend_from_slice(args);
    keel_in(None, &all)
}

/// The URL of a fresh schema of `scratch` (named in the URL), and the schema.
fn schema_url(scratch: &pg::Scratch) -> (String, String) {
    let cfg = scratch.config();
    (format!("{}?schema={}", cfg.url, cfg.schema), cfg.schema)
}

/// `keel demo --runs N` in a sled directory `name` under `dir`: its path.
fn demo_in(dir: &Path, name: &str, runs: &str) -> String {
    let db = dir.join(name).to_str().unwrap().to_owned();
    keel(&db, &["demo", "--runs", runs]).ok();
    db
}

/// `verify`'s `ok RUN N records head H` lines, sorted.
fn heads(db: &str) -> Vec<String> {
    let v = keel(db, &["verify"]);
    v.ok();
    let mut lines: Vec<String> = v.stdout.lines().filter(|l| l.starts_with("ok ")).map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn runs_copied_to_postgres_and_back_keep_their_chains_and_payloads() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sled = dir.path().join("from");
    let sled = sled.to_str().unwrap();
    keel(sled, &["demo", "--runs", "8"]).ok();
    // A run with outputs in the payload store (over 4 KiB each).
    let input = serde_json::to_string(&keel_demo::fan_in::request(3, 20_000).input).unwrap();
    keel(sled, &["submit", "fan_in", "--input", &input]).ok();
    keel(sled, &["work", "--until-idle"]).ok();
    let source = heads(sled);
    assert_eq!(source.len(), 9, "{source:?}");

    let scratch = pg::Scratch::new(Durability::default());
    let (url, _) = schema_url(&scratch);
    let c = keel_in(None, &["copy", "--from", sled, "--to", &url, "--json"]);
    c.ok();
    assert_eq!(c.json()["copied"], 9, "{}", c.stdout);
    assert_eq!(heads(&url), source, "the same records and head hashes on PostgreSQL");
    let r = keel(&url, &["replay", "--all", "--check"]);
    r.ok();
    assert!(r.stdout.contains("checked 9 run(s): 9 ok, 0 diverged"), "{}", r.stdout);
    // Again: nothing to do, the runs are there with the same chains.
    let again = keel_in(None, &["copy", "--from", sled, "--to", &url, "--json"]);
    assert_eq!((again.ok().json()["copied"].clone(), again.json()["present"].clone()), (0.into(), 9.into()));

    // And back to a fresh sled directory.
    let back = dir.path().join("back");
    let back = back.to_str().unwrap();
    keel_in(None, &["copy", "--from", &url, "--to", back]).ok();
    assert_eq!(heads(back), source, "the same records and head hashes back on sled");
    assert!(Path::new(back).exists());
}

/// A run copied, then driven further where it came from, is continued by the next copy
/// (its copy is a prefix of the source's chain); a run whose copy went another way is
/// refused, with nothing written. (A new user's copy back after work on the target
/// called a run that had only gone on "another history".)
#[test]
fn a_run_driven_on_after_a_copy_is_continued_and_one_with_another_history_refused() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scratch = pg::Scratch::new(Durability::default());
    let (url, _) = schema_url(&scratch);
    let a = &demo_in(dir.path(), "a", "8");
    keel_in(None, &["copy", "--from", a, "--to", &url]).ok();
    // The source's run waiting for a human goes on (cancelled) after the copy.
    let waiting = keel(a, &["runs", "--status", "AwaitingHuman", "--json"]);
    let run = waiting.ok().json()["runs"][0]["run"].as_str().unwrap().to_owned();
    keel(a, &["cancel", &run, "--reason", "after the copy"]).ok();
    let c = keel_in(None, &["copy", "--from", a, "--to", &url, "--json"]);
    let j = c.ok().json();
    assert_eq!(
        (j["copied"].clone(), j["present"].clone(), j["continued"].clone()),
        (0.into(), 7.into(), 1.into()),
        "{j}"
    );
    assert_eq!(j["records"], 1, "one record appended: the cancellation");
    assert_eq!(heads(&url), heads(a), "the same records and head hashes on both");

    // Another run waiting on both sides, then decided differently on each: refused.
    let b = dir.path().join("b");
    let b = b.to_str().unwrap();
    keel(b, &["demo", "--runs", "8"]).ok();
    let waiting = keel(b, &["runs", "--status", "AwaitingHuman", "--json"]);
    let other = waiting.ok().json()["runs"][0]["run"].as_str().unwrap().to_owned();
    keel_in(None, &["copy", "--from", b, "--to", &url]).ok();
    keel(b, &["cancel", &other, "--reason", "here"]).ok();
    keel(&url, &["cancel", &other, "--reason", "there"]).ok();
    let before = heads(&url);
    let e = keel_in(None, &["copy", "--from", b, "--to", &url]);
    let line = e.one_line_error(1);
    assert!(line.contains(&format!("run {other} has another history")), "{line}");
    assert_eq!(heads(&url), before, "the target is unchanged");
    // And back the other way: the target's copy is not a prefix either.
    let e = keel_in(None, &["copy", "--from", &url, "--to", b, "--run", &other]);
    assert!(e.one_line_error(1).contains("another history"));
}

/// Runs copied into a database already in use are in its listings, its open escalations
/// and its counts, and one that can go on is driven there; a run continued by a later copy
/// leaves the escalation list when its copy did. (The new-user review: copied runs were in
/// no listing of a used target and driven by nobody; a continued run still showed its old
/// escalation and counted as waiting.)
#[test]
fn runs_copied_into_a_database_in_use_are_listed_counted_and_driven() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scratch = pg::Scratch::new(Durability::default());
    let (url, _) = schema_url(&scratch);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    keel(a, &["demo", "--runs", "8"]).ok();
    // A run accepted but never driven in the source.
    let input = serde_json::to_string(&keel_demo::request(3, 40).input).unwrap();
    let pending = keel(a, &["submit", "support_ticket", "--input", &input, "--json"]).ok().json()["run"]
        .as_str()
        .unwrap()
        .to_owned();
    let waiting = keel(a, &["runs", "--status", "AwaitingHuman", "--json"]).ok().json()["runs"][0]["run"]
        .as_str()
        .unwrap()
        .to_owned();
    for target in [url.as_str(), b] {
        // The target is in use: runs of its own, listed and indexed.
        keel(target, &["demo", "--runs", "8", "--seed", "2"]).ok();
        keel_in(None, &["copy", "--from", a, "--to", target]).ok();
        let listed = keel(target, &["runs", "--json"]).ok().json();
        assert_eq!(listed["runs"].as_array().unwrap().len(), 17, "{target}: 8 of its own, 9 copied");
        let open = keel(target, &["escalations", "--json"]).ok().json();
        let open: Vec<&str> =
            open["escalations"].as_array().unwrap().iter().map(|e| e["run"].as_str().unwrap()).collect();
        assert!(open.contains(&waiting.as_str()), "{target}: the copied escalation is open there: {open:?}");
        // The copied pending run is driven by a worker of the target.
        keel(target, &["work", "--until-idle"]).ok();
        let state = keel(target, &["show", &pending, "--json"]).ok().json();
        assert_eq!(state["status"], "Completed", "{target}: {state}");
    }
    // The waiting run goes on in the source; copied again, its copies are continued and
    // leave the escalation lists; the counts follow.
    keel(a, &["cancel", &waiting, "--reason", "after the copy"]).ok();
    for target in [url.as_str(), b] {
        let c = keel_in(None, &["copy", "--from", a, "--to", target, "--run", &waiting, "--json"]);
        assert_eq!(c.ok().json()["continued"], 1);
        let open = keel(target, &["escalations", "--json"]).ok().json();
        assert!(
            !open["escalations"].as_array().unwrap().iter().any(|e| e["run"] == waiting.as_str()),
            "{target}: {open}"
        );
        let state = keel(target, &["show", &waiting, "--json"]).ok().json();
        assert_eq!(state["status"], "Cancelled");
        let cancelled = keel(target, &["runs", "--status", "Cancelled", "--json"]).ok().json();
        assert!(cancelled["runs"].as_array().unwrap().iter().any(|r| r["run"] == waiting.as_str()), "{cancelled}");
    }
}

/// A password in the URL is not written into an HTML report (its subtitle names the
/// database it was exported from), nor into the lines of `demo`, `fork` or errors.
#[test]
fn a_password_in_the_url_stays_out_of_reports_and_lines() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    // Trust authentication takes any password: this one must show nowhere.
    let secret = "hun/ter2";
    let url =
        format!("{}?schema={}", cfg.url.replacen("://postgres@", &format!("://postgres:{secret}@"), 1), cfg.schema);
    assert!(url.contains(secret), "{url}");
    let demo = keel(&url, &["demo", "--runs", "2"]);
    demo.ok();
    let out = dir.path().join("r.html");
    let e = keel(&url, &["export", "--all", "--format", "html", "-o", out.to_str().unwrap()]);
    e.ok();
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("postgres:***@"), "the subtitle names the database");
    for text in [html.as_str(), &demo.stdout, &demo.stderr, &e.stdout, &e.stderr] {
        assert!(!text.contains(secret) && !text.contains("hunter2"), "the password is shown");
    }
}

/// A copy cut short after a run's records were written (its index entries not yet made)
/// is made whole by running the copy again: a run already there is re-indexed too (the
/// code review: it was counted "already there" and stayed out of every listing).
#[test]
fn a_copy_run_again_indexes_a_run_whose_records_were_already_there() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scratch = pg::Scratch::new(Durability::default());
    let (url, schema) = schema_url(&scratch);
    let a = &demo_in(dir.path(), "a", "2");
    keel_in(None, &["copy", "--from", a, "--to", &url]).ok();
    let listed = keel(&url, &["runs", "--json"]).ok().json();
    let run = listed["runs"][0]["run"].as_str().unwrap().to_owned();
    // As if the copy had stopped after the records: the run's index entries are gone.
    let hex = run.replace('-', "");
    let admin = pg::Admin::connect().unwrap();
    admin.exec(&format!("DELETE FROM {schema}.aux WHERE position(decode('{hex}', 'hex') in key) > 0"));
    let listed = keel(&url, &["runs", "--json"]).ok().json();
    assert!(!listed["runs"].as_array().unwrap().iter().any(|r| r["run"] == run.as_str()), "still listed: {listed}");
    let again = keel_in(None, &["copy", "--from", a, "--to", &url, "--json"]);
    assert_eq!(again.ok().json()["present"], 2);
    let listed = keel(&url, &["runs", "--json"]).ok().json();
    assert!(listed["runs"].as_array().unwrap().iter().any(|r| r["run"] == run.as_str()), "not listed: {listed}");
}
