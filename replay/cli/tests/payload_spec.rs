//! Outputs of any size through the real `keel` binary (issue 13, item 5): a fan-in of 8
//! tasks with 1 MB outputs each (the demo's `fan_in` workflow, which the stock binary
//! knows), recorded on a sled database, exports (each payload once),
//! verifies (database and file) and passes `keel replay --check`; an export whose payload
//! was edited fails `keel verify` with one line and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, lines, write_lines};
use keel_engine::Engine;
use keel_store::{Durability, RunId, SledStore, StoreConfig};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// Records one fan-in run on a sled database at `db` (the store closed afterwards).
fn record_fan_in(db: &Path) -> RunId {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let config = StoreConfig { durability: Durability::None, ..StoreConfig::default() };
        let store = Arc::new(SledStore::open(db, config).unwrap());
        let mut b = Engine::builder().store(store.clone()).workflow(keel_demo::fan_in::workflow());
        for (name, h) in keel_demo::fan_in::handlers() {
            b = b.handler(name, h);
        }
        let engine = b.open().unwrap();
        let s = engine.submit(keel_demo::fan_in::request(8, 1_000_000)).await.unwrap();
        let report = engine.run_until_idle().await.unwrap();
        assert!(report.stopped.is_empty(), "{:?}", report.stopped);
        assert_eq!(report.completed, 1);
        keel_store::EventLog::flush(store.as_ref()).unwrap();
        s.run
    })
}

#[test]
fn a_fan_in_of_8_outputs_of_1_mb_exports_verifies_and_replays_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let run = record_fan_in(&db);

    // The database verifies (chains, payload digests, every reference stored) and replays.
    keel(&db, &["verify"]).ok();
    let out = keel(&db, &["replay", "--all", "--check"]);
    out.ok();
    assert!(out.stdout.contains("1 ok, 0 diverged"), "{}", out.stdout);
    let state = keel(&db, &["replay", &run.to_string(), "--json"]).ok().json();
    assert_eq!(state["state"]["status"], "Completed");
    assert_eq!(state["state"]["result"]["part3"]["text"].as_str().unwrap().len(), 1_000_000);

    // The export carries each payload once (8 outputs; the join's inputs refer to them).
    let file = dir.path().join("fan.jsonl");
    keel(&db, &["export", "--all", "--format", "jsonl", "-o", file.to_str().unwrap()]).ok();
    let all = lines(&file);
    let payloads: Vec<&Value> = all.iter().filter(|l| l["type"] == "payload").collect();
    let digests: std::collections::BTreeSet<&str> = payloads.iter().map(|p| p["sha256"].as_str().unwrap()).collect();
    assert_eq!(digests.len(), 8, "each output once");
    assert!(all.iter().filter(|l| l["type"] == "record").all(|l| l.to_string().len() < 64 * 1024));
    keel(&db, &["verify", file.to_str().unwrap()]).ok();
    let out = keel(&db, &["replay", "--all", "--check", "--from", file.to_str().unwrap()]);
    out.ok();
    assert!(out.stdout.contains("1 ok, 0 diverged"), "{}", out.stdout);
    let from_file = keel(&db, &["replay", &run.to_string(), "--from", file.to_str().unwrap(), "--json"]).ok().json();
    assert_eq!(from_file["state"], state["state"], "the export folds to the database's state");
}

#[test]
fn an_export_whose_payload_was_edited_fails_verify_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    record_fan_in(&db);
    let file = dir.path().join("fan.jsonl");
    keel(&db, &["export", "--all", "--format", "jsonl", "-o", file.to_str().unwrap()]).ok();
    let mut all = lines(&file);
    let i = all.iter().position(|l| l["type"] == "payload").unwrap();
    // One character in the middle of the output's text changed.
    let mut text = all[i]["text"].as_str().unwrap().as_bytes().to_vec();
    let k = text.len() / 2;
    text[k] = if text[k] == b'x' { b'y' } else { b'x' };
    all[i]["text"] = Value::String(String::from_utf8(text).unwrap());
    let edited = dir.path().join("edited.jsonl");
    write_lines(&edited, &all);
    let e = keel(&db, &["verify", edited.to_str().unwrap()]).one_line_error(1);
    assert!(e.contains("altered") && e.contains("payload sha256:"), "{e}");

    // A payload line removed: the record that refers to it names the missing digest.
    let mut removed = lines(&file);
    removed.remove(i);
    let cut = dir.path().join("removed.jsonl");
    write_lines(&cut, &removed);
    let e = keel(&db, &["verify", cut.to_str().unwrap()]).one_line_error(1);
    assert!(e.contains("is not in the file"), "{e}");
}

#[test]
fn a_fork_from_an_export_into_a_new_database_carries_its_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let run = record_fan_in(&db);
    let file = dir.path().join("fan.jsonl");
    keel(&db, &["export", "--all", "--format", "jsonl", "-o", file.to_str().unwrap()]).ok();
    let last = keel(&db, &["replay", &run.to_string(), "--json"]).ok().json()["last_seq"].as_u64().unwrap();
    // The fork is saved into a database that has never seen these outputs: its records
    // refer to payloads that must be copied there first (fork's `save_run`), from the
    // fork's private store, where the copied prefix re-appended them.
    let other = dir.path().join("other");
    let at = (last - 1).to_string();
    let out = keel(&other, &["fork", &run.to_string(), "--from", file.to_str().unwrap(), "--at", &at, "--json"]);
    let out = out.ok().json();
    assert_eq!(out["fork"]["status"], "Completed", "{out}");
    assert_eq!(out["stopped"], Value::Null);
    assert_eq!(out["saved"], true);
    keel(&other, &["verify"]).ok();
    let check = keel(&other, &["replay", "--all", "--check"]);
    check.ok();
    assert!(check.stdout.contains("1 ok, 0 diverged"), "{}", check.stdout);
    let fork = out["fork"]["run"].as_str().unwrap();
    let state = keel(&other, &["replay", fork, "--json"]).ok().json();
    assert_eq!(state["state"]["result"]["part5"]["text"].as_str().unwrap().len(), 1_000_000);
}

#[test]
fn a_damaged_payload_chunk_in_the_database_fails_verify_naming_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    record_fan_in(&db);
    let digest = {
        let store = common::open_retrying(&db);
        let digests = keel_store::Payloads::payload_digests(&store).unwrap();
        assert_eq!(digests.len(), 8);
        let d = digests[3];
        let chunk = vec![b'x'; keel_store::PAYLOAD_CHUNK_BYTES];
        store.raw_put_payload_chunk(&d, 2, &chunk).unwrap();
        keel_store::EventLog::flush(&store).unwrap();
        hex::encode(d)
    };
    let e = keel(&db, &["verify"]).one_line_error(1);
    assert!(e.contains(&format!("corrupt payload sha256:{digest}")), "{e}");
    // Reading the run is a typed error naming the digest too, never other bytes.
    let e = keel(&db, &["replay", "--all", "--check"]).one_line_error(1);
    assert!(e.contains(&digest), "{e}");
}
