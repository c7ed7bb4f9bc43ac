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
    let cfg = scratch.config();
    let url = format!("{}?schema={}", cfg.url, cfg.schema);
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

#[test]
fn a_run_with_another_history_in_the_target_is_refused() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let url = format!("{}?schema={}", cfg.url, cfg.schema);
    let a = dir.path().join("a");
    let a = a.to_str().unwrap();
    keel(a, &["demo", "--runs", "8"]).ok();
    keel_in(None, &["copy", "--from", a, "--to", &url]).ok();
    // The source's run waiting for a human goes on (cancelled) after the copy.
    let waiting = keel(a, &["runs", "--status", "AwaitingHuman", "--json"]);
    let run = waiting.ok().json()["runs"][0]["run"].as_str().unwrap().to_owned();
    keel(a, &["cancel", &run, "--reason", "after the copy"]).ok();
    let e = keel_in(None, &["copy", "--from", a, "--to", &url]);
    let line = e.one_line_error(1);
    assert!(line.contains(&format!("run {run} already exists")) && line.contains("another history"), "{line}");
    // The target is unchanged: still 8 runs that verify.
    assert_eq!(heads(&url).len(), 8);
}
