//! A golden history written by the previous release of keel (round 1, commit b97a58e:
//! record schema version 2, every payload at layout version 1, `TaskFailed` without a
//! `source`): 16 demo runs (`keel demo --runs 16 --seed 7`), one of them approved by a
//! human (`keel resolve --decision approve --by alice`, then `keel work --until-idle`),
//! exported with `keel export --all --format jsonl`. `round1-states.json` holds, for
//! each run, what that build printed for `keel replay RUN --from round1.jsonl --json`.
//!
//! Never regenerate these files: they are what today's code must keep reading.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::keel_in;
use serde_json::Value;
use std::path::PathBuf;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn expected_states() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(golden("round1-states.json")).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(m) => m,
        other => panic!("round1-states.json is not an object: {other}"),
    }
}

#[test]
fn the_round1_export_still_verifies() {
    let file = golden("round1.jsonl");
    let out = keel_in(None, &["verify", file.to_str().unwrap()]);
    out.ok();
}

#[test]
fn the_round1_runs_pass_todays_determinism_check() {
    let file = golden("round1.jsonl");
    let out = keel_in(None, &["replay", "--all", "--check", "--from", file.to_str().unwrap()]);
    out.ok();
    assert!(out.stdout.contains("checked 16 run(s): 16 ok, 0 diverged"), "{}", out.stdout);
}

#[test]
fn the_round1_runs_fold_to_the_states_that_build_printed() {
    let file = golden("round1.jsonl");
    let expected = expected_states();
    assert_eq!(expected.len(), 16);
    for (run, want) in &expected {
        let out = keel_in(None, &["replay", run, "--from", file.to_str().unwrap(), "--json"]);
        let got = out.ok().json();
        assert_eq!(&got, want, "run {run}: today's fold differs from round 1's");
    }
}
