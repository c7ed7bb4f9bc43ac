//! `keel archive` and signed checkpoints on PostgreSQL: the same retention as on sled
//! (`anchor_spec.rs`), through `Coordination::remove_run` in one transaction. In a fresh
//! schema it drops; without a server it says it was skipped (and fails under CI=true or
//! KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
#[path = "../../../store/postgres/tests/common/mod.rs"]
mod pg;

use common::keel_in;
use keel_store::Durability;

fn keel(db: &str, args: &[&str]) -> common::Ran {
    let mut all = vec!["--db", db];
    all.extend_from_slice(args);
    keel_in(None, &all)
}

#[test]
fn finished_runs_archive_from_postgres_behind_tombstones_and_their_checkpoint_still_holds() {
    if !pg::ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sled = dir.path().join("from");
    let sled = sled.to_str().unwrap();
    keel(sled, &["demo", "--runs", "4"]).ok();
    // A run with outputs in the payload store: archived, its payloads go with it.
    let input = serde_json::to_string(&keel_demo::fan_in::request(2, 20_000).input).unwrap();
    keel(sled, &["submit", "fan_in", "--input", &input]).ok();
    keel(sled, &["work", "--until-idle"]).ok();
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let url = format!("{}?schema={}", cfg.url, cfg.schema);
    keel_in(None, &["copy", "--from", sled, "--to", &url]).ok();
    let key = dir.path().join("k");
    let key = key.to_str().unwrap();
    let public = format!("{key}.pub");
    keel_in(None, &["keygen", "--out", key]).ok();
    keel(&url, &["work", "--until-idle", "--sign-key", key]).ok();

    let to = dir.path().join("archive");
    let to = to.to_str().unwrap();
    let out = keel(&url, &["archive", "--status", "completed", "--to", to, "--sign", key, "--json"]).ok().json();
    let archived = out["archived"].as_array().unwrap().clone();
    assert!(archived.len() >= 2, "{out}");
    let v = keel(&url, &["verify", "--key", &public, "--json"]).ok().json();
    assert_eq!(v["archived"].as_array().unwrap().len(), archived.len());
    assert_eq!(v["checkpoints"]["failure"], serde_json::Value::Null);
    for a in &archived {
        let file = a["file"].as_str().unwrap();
        keel_in(None, &["verify", file, "--key", &public]).ok();
        keel_in(None, &["replay", "--from", file, "--check"]).ok();
    }
    let left = keel(&url, &["runs", "--json"]).ok().json();
    let listed = left["runs"].as_array().map(Vec::len).unwrap_or_default();
    assert_eq!(listed + archived.len(), 5, "{left}");
}
