//! A log written before `TaskFailed` had a `source` (payload version 1) still folds when
//! read back from a store: the records keep the bytes and the payload version they were
//! written with, and the engine's upcaster reads them (`read_logged`, `load_state`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_engine::*;
use keel_store::{digest, EventLog, MemStore, NewRecord, StoreError};
use serde_json::Value;
use std::collections::BTreeMap;

/// The records of the committed v1 golden demo log, by run, as they were written.
fn v1_records() -> BTreeMap<RunId, Vec<NewRecord>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/tests/golden/demo-v1.jsonl");
    let mut runs: BTreeMap<RunId, Vec<NewRecord>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let fields = v["fields"].as_object().unwrap().clone();
        runs.entry(v["run"].as_str().unwrap().parse().unwrap()).or_default().push(NewRecord {
            kind: v["kind"].as_str().unwrap().to_owned(),
            time_us: v["at_us"].as_i64().unwrap(),
            payload_version: 1,
            payload: hex::decode(v["bincode"].as_str().unwrap()).unwrap(),
            payload_root: digest::payload_root_of(&fields),
        });
    }
    runs
}

#[test]
fn a_version_1_log_in_a_store_folds_through_the_upcaster() {
    let store = MemStore::new();
    let runs = v1_records();
    for (run, records) in &runs {
        store.append(*run, Seq(0), records.clone(), None).unwrap();
    }
    let mut sources = Vec::new();
    for run in runs.keys() {
        let events: Vec<Logged> = read_logged(&store, *run, Seq(0)).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(events.len(), runs[run].len());
        for e in &events {
            if let Event::TaskFailed { source, note, .. } = &e.event {
                assert_eq!(*note, None);
                sources.push(*source);
            }
        }
        let state = load_state(&store, *run).unwrap().unwrap();
        assert_eq!(state, fold(&events).unwrap().unwrap());
    }
    assert!(sources.contains(&FailureSource::Gate));
    assert!(sources.contains(&FailureSource::Handler));
}

#[test]
fn a_payload_version_newer_than_the_code_is_a_typed_decode_error_naming_the_record() {
    let store = MemStore::new();
    let (run, mut records) = v1_records().into_iter().next().unwrap();
    records.truncate(1);
    records[0].payload_version = model::upcast::PAYLOAD_VERSION_MAX + 1;
    store.append(run, Seq(0), records, None).unwrap();
    let first = read_logged(&store, run, Seq(0)).unwrap().next().unwrap();
    match first {
        Err(EngineError::Store(StoreError::Decode { run: r, seq, reason })) => {
            assert_eq!((r, seq), (run, Seq(0)));
            assert!(reason.contains("newer"), "{reason}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

/// A `HumanResolved` written before it had a `reason` (payload version 1, as keel 0.x
/// encoded it: number, decision, by, defaulted) reads back with an empty reason, and its
/// stored fields are the ones it was written with (no `reason`, so its payload root holds).
#[test]
fn a_version_1_human_resolved_reads_back_with_an_empty_reason() {
    // bincode of the version-1 `Event` enum: variant 15, then number (varint 1), decision
    // `Approve` (variant 0), by "alice", defaulted false.
    let mut v1 = vec![15u8, 1, 0, 5];
    v1.extend_from_slice(b"alice");
    v1.push(0);
    let e = model::upcast::decode("HumanResolved", 1, &v1).unwrap();
    assert_eq!(
        e,
        Event::HumanResolved {
            number: 1,
            decision: Decision::Approve,
            by: "alice".into(),
            defaulted: false,
            reason: String::new()
        }
    );
    // The same bytes are not a version-2 payload (the reason is missing).
    assert!(model::upcast::decode("HumanResolved", 2, &v1).is_err());
    // Version 2 round-trips with its reason.
    let v2 = Event::HumanResolved {
        number: 1,
        decision: Decision::Approve,
        by: "alice".into(),
        defaulted: false,
        reason: "refund checked".into(),
    };
    assert_eq!(v2.payload_version(), 2);
    let bytes = keel_store::codec::encode(&v2).unwrap();
    assert_eq!(model::upcast::decode("HumanResolved", 2, &bytes).unwrap(), v2);
    // An export of version 1 (no `reason` field) rebuilds with an empty reason.
    let fields = serde_json::json!({"by": "alice", "decision": "Approve", "defaulted": false, "number": 1});
    let from = Event::from_fields("HumanResolved", fields.as_object().unwrap().clone()).unwrap();
    assert_eq!(from, model::upcast::decode("HumanResolved", 1, &v1).unwrap());
}

/// A deadline's default recorded in payload version 1 (no reason) passes the determinism
/// check against the default `decide` records now (with [`model::event::DEFAULT_REASON`]);
/// any other difference still fails it.
#[test]
fn a_version_1_deadline_default_is_the_same_decision_as_todays() {
    let decided = Event::HumanResolved {
        number: 2,
        decision: Decision::Reject,
        by: "deadline".into(),
        defaulted: true,
        reason: model::event::DEFAULT_REASON.into(),
    };
    let recorded_v1 = Event::HumanResolved {
        number: 2,
        decision: Decision::Reject,
        by: "deadline".into(),
        defaulted: true,
        reason: String::new(),
    };
    assert!(recorded_v1.same_decision(&decided));
    let other = Event::HumanResolved {
        number: 2,
        decision: Decision::Approve,
        by: "deadline".into(),
        defaulted: true,
        reason: String::new(),
    };
    assert!(!other.same_decision(&decided));
    let other_reason = Event::HumanResolved {
        number: 2,
        decision: Decision::Reject,
        by: "deadline".into(),
        defaulted: true,
        reason: "something else".into(),
    };
    assert!(!other_reason.same_decision(&decided));
}
