//! Audit: JSONL export verifies; every kind of tampering (altered, removed, reordered,
//! inserted) is named, in an export file and in a database; redaction keeps the export
//! verifiable and a revealed value proves itself; CSV and time-range selection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, lines, write_lines, DemoDb};
use keel_replay::verify::{reveal_matches, verify_db, verify_export, Tamper};
use keel_store::{codec, digest, EventLog, RunId, Seq, SledStore};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn export_one(db: &DemoDb, run: RunId, name: &str, extra: &[&str]) -> PathBuf {
    let file = db.path(name);
    let mut args = vec!["export", "--format", "jsonl", "-o", file.to_str().unwrap()];
    let id = run.to_string();
    args.insert(1, &id);
    args.extend_from_slice(extra);
    keel(&db.db, &args).ok();
    file
}

/// Index of the line holding record `seq` (line 0 is the header).
fn at(lines: &[Value], seq: u64) -> usize {
    lines.iter().position(|l| l["type"] == "record" && l["seq"] == seq).unwrap()
}

fn check_fails(file: &Path, what: Tamper, seq: Option<u64>, needle: &str, db: &DemoDb) {
    let v = verify_export(file).unwrap();
    let f = v.failure.unwrap_or_else(|| panic!("{} verified but must not", file.display()));
    assert_eq!(f.what, what, "{}", f.message);
    if seq.is_some() {
        assert_eq!(f.seq, seq, "{}", f.message);
    }
    assert!(f.message.contains(needle), "message {:?} lacks {needle:?}", f.message);
    let e = keel(&db.db, &["verify", file.to_str().unwrap()]).one_line_error(1);
    assert!(e.contains(needle), "{e}");
}

#[test]
fn an_export_verifies_and_every_kind_of_tampering_is_named() {
    let db = DemoDb::new(8);
    let run = db.run_of("retries_exhausted_replan");
    let file = export_one(&db, run, "run.jsonl", &[]);
    let v = verify_export(&file).unwrap();
    assert!(v.ok(), "{:?}", v.failure);
    assert_eq!(v.runs.len(), 1);
    assert_eq!(v.records(), db.events(run).len() as u64);
    let out = keel(&db.db, &["verify", file.to_str().unwrap(), "--json"]).ok().json();
    assert_eq!(out["ok"], true);
    // The export's head is the database's head.
    let store_head = {
        let s = db.open();
        keel_replay::format::hex32(&s.head(run).unwrap().last_hash)
    };
    assert_eq!(out["runs"][0]["head"], store_head);
    keel(&db.db, &["verify", file.to_str().unwrap(), "--against-db"]).ok();

    let original = lines(&file);
    let executed = original.iter().find(|l| l["kind"] == "TaskExecuted").unwrap()["seq"].as_u64().unwrap();
    let tampered = db.path("t.jsonl");

    // Altered payload: one number changed.
    let mut l = original.clone();
    let i = at(&l, executed);
    let cost = l[i]["payload"]["usage"]["cost_micros"].as_u64().unwrap();
    l[i]["payload"]["usage"]["cost_micros"] = json!(cost + 1);
    write_lines(&tampered, &l);
    check_fails(
        &tampered,
        Tamper::Altered,
        Some(executed),
        &format!("seq {executed}: payload altered (hash mismatch)"),
        &db,
    );

    // Altered header: the time of an event moved.
    let mut l = original.clone();
    let i = at(&l, 5);
    l[i]["time_us"] = json!(l[i]["time_us"].as_i64().unwrap() + 1);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Altered, Some(5), "seq 5: header altered", &db);

    // Removed: a record in the middle, and the last record (trailer kept).
    let mut l = original.clone();
    l.remove(at(&l, 7));
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Removed, Some(7), "seq 7 missing (removed", &db);
    let last = original.iter().filter(|l| l["type"] == "record").count() as u64 - 1;
    let mut l = original.clone();
    l.remove(at(&l, last));
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Removed, Some(last), &format!("seq {last} missing (removed"), &db);

    // Reordered: two records swapped.
    let mut l = original.clone();
    let (a, b) = (at(&l, 7), at(&l, 8));
    l.swap(a, b);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Reordered, Some(7), "seq 7: out of order", &db);

    // Inserted: a forged record claiming seq 7, before and after the real one.
    let mut forged = original[at(&original, 7)].clone();
    forged["payload"] = original[at(&original, executed)]["payload"].clone();
    let mut l = original.clone();
    l.insert(at(&l, 7), forged.clone());
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Inserted, Some(7), "seq 7: inserted record", &db);
    let mut l = original.clone();
    l.insert(at(&l, 7) + 1, forged.clone());
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Inserted, Some(7), "seq 7: inserted record", &db);
    // ... even when the forger recomputed its payload root and hash correctly.
    let mut good_forgery = forged;
    let rec = keel_replay::ExportRecord {
        line: 0,
        run,
        seq: 7,
        time_us: good_forgery["time_us"].as_i64().unwrap(),
        time: None,
        kind: good_forgery["kind"].as_str().unwrap().to_owned(),
        schema_version: good_forgery["schema_version"].as_u64().unwrap() as u16,
        payload: good_forgery["payload"].as_object().unwrap().clone(),
        payload_root: [0; 32],
        payload_digest: good_forgery["payload_digest"].as_str().and_then(keel_replay::format::parse_hash),
        payload_version: good_forgery["payload_version"].as_u64().map(|v| v as u16),
        prev_hash: [0; 32],
        hash: [0; 32],
    };
    let root = keel_replay::verify::export_payload_root(&rec);
    let prev = keel_replay::format::parse_hash(original[at(&original, 6)]["hash"].as_str().unwrap()).unwrap();
    let rec = keel_replay::ExportRecord { payload_root: root, prev_hash: prev, ..rec };
    good_forgery["payload_root"] = json!(hex::encode(root));
    good_forgery["hash"] = json!(hex::encode(keel_replay::verify::export_chain_hash(&rec, &prev)));
    let mut l = original.clone();
    l.insert(at(&l, 7), good_forgery);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Inserted, Some(7), "seq 7: inserted record", &db);

    // Truncated: the trailer and the last records cut off.
    let mut l = original.clone();
    l.truncate(l.len() - 3);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Truncated, None, "without the run_end trailer", &db);

    // Garbage never panics: a line that is not JSON, binary junk, an empty file.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.insert_str(text.find('\n').unwrap() + 1, "{not json\n");
    std::fs::write(&tampered, text).unwrap();
    check_fails(&tampered, Tamper::Malformed, None, "line 2: not valid JSON", &db);
    std::fs::write(&tampered, [0u8, 159, 146, 150, 10, 255, 0]).unwrap();
    assert!(verify_export(&tampered).unwrap().failure.is_some());
    std::fs::write(&tampered, "").unwrap();
    check_fails(&tampered, Tamper::Malformed, None, "not a keel export", &db);
    std::fs::write(&tampered, "x".repeat(keel_replay::format::LINE_BYTES_MAX + 10)).unwrap();
    check_fails(&tampered, Tamper::Malformed, None, "line 1: line longer than", &db);
}

#[test]
fn a_consistently_rewritten_export_is_caught_against_the_database_head() {
    let db = DemoDb::new(8);
    let run = db.run_of("happy_path");
    let file = export_one(&db, run, "run.jsonl", &[]);
    // Rewrite seq 3's payload and recompute every root and hash after it, as a forger
    // who knows the format would (docs/EXPORT.md): the file verifies on its own...
    let mut l = lines(&file);
    let first = at(&l, 3);
    l[first]["payload"]["revision"] = json!(7);
    let mut prev = keel_replay::format::parse_hash(l[first - 1]["hash"].as_str().unwrap()).unwrap();
    for line in l.iter_mut().skip(first) {
        if line["type"] == "run_end" {
            line["head"] = json!(hex::encode(prev));
            continue;
        }
        let fields = line["payload"].as_object().unwrap().clone();
        let root = digest::payload_root_of(&fields);
        // Schema version 3 lines: the forger keeps the stated payload digest (an export
        // holds no payload bytes to check it against) and payload version.
        assert_eq!(line["schema_version"], 3);
        let payload_digest = keel_replay::format::parse_hash(line["payload_digest"].as_str().unwrap()).unwrap();
        let d = digest::record_digest_v3(
            run,
            Seq(line["seq"].as_u64().unwrap()),
            line["kind"].as_str().unwrap(),
            line["time_us"].as_i64().unwrap(),
            line["payload_version"].as_u64().unwrap() as u16,
            &root,
            &payload_digest,
        );
        let hash = digest::chain(&prev, &d);
        line["payload_root"] = json!(hex::encode(root));
        line["prev_hash"] = json!(hex::encode(prev));
        line["hash"] = json!(hex::encode(hash));
        prev = hash;
    }
    let forged = db.path("forged.jsonl");
    write_lines(&forged, &l);
    assert!(verify_export(&forged).unwrap().ok());
    // ... but not against the database's head.
    let e = keel(&db.db, &["verify", forged.to_str().unwrap(), "--against-db"]).one_line_error(1);
    assert!(e.contains("differs from the database"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A copy of the demo db, tampered with by `f` through the store's raw test hooks.
fn tampered_db(db: &DemoDb, name: &str, f: impl FnOnce(&SledStore)) -> PathBuf {
    let dir = db.path(name);
    // The demo db is closed (DemoDb reads it once): copy it, then tamper with the copy.
    copy_dir(&db.db, &dir);
    let store = common::open_retrying(&dir);
    f(&store);
    store.flush().unwrap();
    drop(store);
    dir
}

fn db_fails(dir: &Path, run: RunId, what: Tamper, seq: u64, needle: &str) {
    // Read-only: tampering that rewrote a run's last record also shows in the store's
    // manifest, and a writable open refuses it.
    let store = SledStore::open_read_only(dir, keel_store::StoreConfig::default()).unwrap();
    let v = verify_db(&store, &[run], || {}).unwrap();
    drop(store);
    let f = v.failure.expect("must not verify");
    assert_eq!(f.what, what, "{}", f.message);
    assert_eq!(f.seq, Some(seq), "{}", f.message);
    assert!(f.message.contains(needle), "message {:?} lacks {needle:?}", f.message);
    let e = keel(dir, &["verify"]).one_line_error(1);
    assert!(e.contains(needle), "{e}");
    let e = keel(dir, &["verify", "--run", &run.to_string()[..8]]).one_line_error(1);
    assert!(e.contains(needle), "{e}");
}

#[test]
fn verify_names_every_kind_of_tampering_in_a_database() {
    let db = DemoDb::new(8);
    let run = db.run_of("transient_retry");
    keel(&db.db, &["verify"]).ok();
    let n = db.events(run).len() as u64;

    // Altered: a payload changed, checksum re-sealed, so only the chain can tell.
    let dir = tampered_db(&db, "altered", |s| {
        let raw = s.raw_get(run, Seq(4)).unwrap().unwrap();
        let mut env = keel_store::testing::open_raw(&raw).unwrap();
        let mut event: keel_engine::Event = codec::decode(&env.payload).unwrap();
        match &mut event {
            keel_engine::Event::TaskDispatched { attempt, .. } => *attempt += 1,
            keel_engine::Event::TaskExecuted { usage, .. } => usage.cost_micros += 1,
            other => panic!("seq 4 is {}", other.kind_name()),
        }
        env.payload = codec::encode(&event).unwrap();
        s.raw_put(run, Seq(4), &keel_store::testing::seal_raw(&env).unwrap()).unwrap();
    });
    db_fails(&dir, run, Tamper::Altered, 4, "seq 4: payload altered");

    // Removed: a record deleted.
    let dir = tampered_db(&db, "removed", |s| s.raw_remove(run, Seq(6)).unwrap());
    db_fails(&dir, run, Tamper::Removed, 6, "seq 6 missing (removed)");

    // Reordered: two records swapped.
    let dir = tampered_db(&db, "reordered", |s| {
        let a = s.raw_get(run, Seq(6)).unwrap().unwrap();
        let b = s.raw_get(run, Seq(7)).unwrap().unwrap();
        s.raw_put(run, Seq(6), &b).unwrap();
        s.raw_put(run, Seq(7), &a).unwrap();
    });
    db_fails(&dir, run, Tamper::Reordered, 6, "seq 6: out of order");

    // Inserted: a record of another run slipped in at seq 6, the rest shifted up.
    let other = db.run_of("happy_path");
    let dir = tampered_db(&db, "inserted", |s| {
        for k in (6..n).rev() {
            let v = s.raw_get(run, Seq(k)).unwrap().unwrap();
            s.raw_put(run, Seq(k + 1), &v).unwrap();
        }
        let foreign = s.raw_get(other, Seq(6)).unwrap().unwrap();
        s.raw_put(run, Seq(6), &foreign).unwrap();
    });
    db_fails(&dir, run, Tamper::Inserted, 6, "seq 6: broken link");
}

#[test]
fn redacted_exports_verify_and_a_revealed_value_proves_itself() {
    let db = DemoDb::new(8);
    let run = db.run_of("evaluator_replan");
    let plain = export_one(&db, run, "plain.jsonl", &[]);
    let red = export_one(&db, run, "red.jsonl", &["--redact", "output", "--redact", "TaskDispatched.input"]);
    let out = keel(&db.db, &["verify", red.to_str().unwrap(), "--json"]).ok().json();
    assert_eq!(out["ok"], true);
    let (p, r) = (lines(&plain), lines(&red));
    assert_eq!(r[0]["redacted"], json!(["output", "TaskDispatched.input"]));
    let mut revealed = 0;
    for (a, b) in p.iter().zip(&r).skip(1) {
        if a["type"] != "record" {
            continue;
        }
        // Chain fields are untouched by redaction.
        assert_eq!(a["hash"], b["hash"]);
        assert_eq!(a["payload_root"], b["payload_root"]);
        for (field, value) in a["payload"].as_object().unwrap() {
            let kind = a["kind"].as_str().unwrap();
            let redacted = field == "output" || (kind == "TaskDispatched" && field == "input");
            let shown = &b["payload"][field];
            if redacted {
                assert!(shown.get("$redacted").is_some(), "{kind}.{field} not redacted");
                assert_ne!(shown, value);
                // Revealing the original later proves it unchanged; anything else does not.
                assert!(reveal_matches(shown, value), "{kind}.{field}");
                assert!(!reveal_matches(shown, &json!("something else")));
                assert_eq!(shown["$redacted"], json!(hex::encode(digest::field_digest(value))));
                revealed += 1;
            } else {
                assert_eq!(shown, value);
            }
        }
    }
    assert!(revealed >= 8, "{revealed}");
    // Replay needs the values: a typed error names the first redacted field.
    let first_dispatch = p.iter().find(|l| l["kind"] == "TaskDispatched").unwrap()["seq"].as_u64().unwrap();
    let e = keel(&db.db, &["replay", "--from", red.to_str().unwrap()]).one_line_error(1);
    assert!(e.contains(&format!("seq {first_dispatch}: field TaskDispatched.input is redacted")), "{e}");
    // Changing a redacted digest is caught like any other alteration.
    let mut l = r.clone();
    let i = l.iter().position(|x| x["kind"] == "TaskExecuted").unwrap();
    l[i]["payload"]["output"] = json!({"$redacted": hex::encode([7u8; 32])});
    let t = db.path("t.jsonl");
    write_lines(&t, &l);
    let v = verify_export(&t).unwrap();
    assert_eq!(v.failure.unwrap().what, Tamper::Altered);
    // A bad rule is a usage error.
    let e =
        keel(&db.db, &["export", &run.to_string(), "--format", "jsonl", "--redact", "Nope.output"]).one_line_error(2);
    assert!(e.contains("unknown event kind"), "{e}");
}

#[test]
fn csv_export_is_a_flat_table_of_transitions() {
    let db = DemoDb::new(8);
    let file = db.path("all.csv");
    keel(&db.db, &["export", "--all", "--format", "csv", "-o", file.to_str().unwrap()]).ok();
    let mut rd = csv::Reader::from_path(&file).unwrap();
    let headers: Vec<String> = rd.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(headers, keel_replay::export::CSV_COLUMNS.to_vec());
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    let total: usize = db.events.values().map(Vec::len).sum();
    assert_eq!(rows.len(), total);
    for r in &db.runs {
        let events = db.events(r.run);
        let mine: Vec<&csv::StringRecord> = rows.iter().filter(|row| row[0] == *r.run.to_string()).collect();
        assert_eq!(mine.len(), events.len());
        let state = keel_engine::fold(&events).unwrap().unwrap();
        let last = mine.last().unwrap();
        assert_eq!(&last[9], state.status.name());
        assert_eq!(last[11].parse::<u64>().unwrap(), state.totals.cost_micros);
        let sum: u64 = mine.iter().filter_map(|row| row[7].parse::<u64>().ok()).sum();
        assert_eq!(sum, state.totals.cost_micros, "{}", r.scenario);
        for (row, e) in mine.iter().zip(&events) {
            assert_eq!(&row[3], e.event.kind_name());
            assert_eq!(row[1].parse::<u64>().unwrap(), e.seq.0);
        }
    }
}

#[test]
fn export_all_selects_runs_by_acceptance_time() {
    let db = DemoDb::new(8);
    let count = |args: &[&str]| -> (usize, Value) {
        let f = db.path("sel.jsonl");
        let mut a = vec!["export", "--all", "--format", "jsonl", "-o", f.to_str().unwrap(), "--force"];
        a.extend_from_slice(args);
        keel(&db.db, &a).ok();
        let l = lines(&f);
        (l.iter().filter(|x| x["type"] == "run_end").count(), l[0]["filter"].clone())
    };
    assert_eq!(count(&[]).0, 8);
    assert_eq!(count(&["--since", "0"]).0, 8);
    let (n, filter) = count(&["--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00Z"]);
    assert_eq!(n, 8);
    assert_eq!(filter["all"], true);
    assert_eq!(count(&["--until", "0"]).0, 0);
    assert_eq!(count(&["--since", "32503680000"]).0, 0);
    // Exactly the runs accepted at or after the third run's acceptance.
    let mut accepted: Vec<i64> = db.events.values().map(|e| e[0].at_us).collect();
    accepted.sort();
    let since = keel_replay::format::rfc3339(accepted[2]);
    assert_eq!(count(&["--since", &since]).0, 6);
    let e = keel(&db.db, &["export", "--all", "--format", "jsonl", "--since", "yesterday"]).one_line_error(2);
    assert!(e.contains("--since"), "{e}");
    let e = keel(&db.db, &["export", "--format", "jsonl", "--since", "0"]).one_line_error(2);
    assert!(e.contains("--all"), "{e}");
}

#[test]
fn garbage_exports_are_typed_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = {
        let db = DemoDb::new(1);
        let f = export_one(&db, db.runs[0].run, "one.jsonl", &[]);
        std::fs::read(f).unwrap()
    };
    // A deterministic generator (no thread rng): mutate, cut and splice the good file.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let path = dir.path().join("g.jsonl");
    for round in 0..300 {
        let mut bytes = good.clone();
        match round % 4 {
            0 => {
                for _ in 0..1 + next() % 8 {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            1 => bytes.truncate((next() as usize) % bytes.len()),
            2 => {
                let i = (next() as usize) % bytes.len();
                let j = (next() as usize) % bytes.len();
                let chunk = bytes[i.min(j)..i.max(j)].to_vec();
                let at = (next() as usize) % bytes.len();
                bytes.splice(at..at, chunk);
            }
            _ => bytes = (0..(next() % 4096)).map(|_| next() as u8).collect(),
        }
        std::fs::write(&path, &bytes).unwrap();
        let verified = verify_export(&path).unwrap();
        // Whatever the damage, reading runs either works or is a typed error.
        let runs: Vec<_> = keel_replay::export_runs(&path).unwrap().collect();
        if verified.ok() {
            assert!(runs.iter().all(Result::is_ok), "round {round}: verified but does not load");
        }
    }
}

#[test]
fn v3_export_lines_carry_the_payload_digest_and_version_and_an_edited_one_is_named() {
    let db = DemoDb::new(8);
    let run = db.run_of("happy_path");
    let file = export_one(&db, run, "v2.jsonl", &[]);
    let original = lines(&file);
    // Every record line: schema_version 3, the SHA-256 of the stored payload bytes and the
    // payload version.
    let store = db.open();
    let stored: Vec<_> = store.read(run, Seq(0)).unwrap().map(|r| r.unwrap()).collect();
    drop(store);
    let records: Vec<&Value> = original.iter().filter(|l| l["type"] == "record").collect();
    assert_eq!(records.len(), stored.len());
    for (line, rec) in records.iter().zip(&stored) {
        assert_eq!(line["schema_version"], 3);
        assert_eq!(line["payload_digest"], json!(hex::encode(digest::payload_digest(&rec.payload))));
        assert_eq!(line["payload_version"], json!(rec.payload_version()));
    }
    assert!(verify_export(&file).unwrap().ok());
    let tampered = db.path("t.jsonl");

    // An edited payload digest: the record digest no longer matches.
    let mut l = original.clone();
    let i = at(&l, 3);
    let mut pd = l[i]["payload_digest"].as_str().unwrap().to_owned();
    pd.replace_range(0..1, if pd.starts_with('0') { "1" } else { "0" });
    l[i]["payload_digest"] = json!(pd);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Altered, Some(3), "seq 3: header altered (hash mismatch", &db);

    // A removed payload digest, or one added to a line relabelled version 1.
    let mut l = original.clone();
    let i = at(&l, 4);
    l[i].as_object_mut().unwrap().remove("payload_digest");
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Altered, Some(4), "seq 4: header altered (a schema_version 3 record without", &db);
    let mut l = original.clone();
    let i = at(&l, 4);
    l[i]["schema_version"] = json!(1);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Altered, Some(4), "seq 4: header altered (a schema_version 1 record with", &db);
    let mut l = original.clone();
    let i = at(&l, 4);
    l[i]["schema_version"] = json!(4);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Altered, Some(4), "unknown schema_version 4", &db);

    // An edited payload version (a reader would upcast from the wrong layout): the record
    // digest no longer matches. A removed one, or one kept on a line relabelled version 2.
    let mut l = original.clone();
    let i = at(&l, 3);
    l[i]["payload_version"] = json!(l[i]["payload_version"].as_u64().unwrap() + 1);
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Altered, Some(3), "seq 3: header altered (hash mismatch", &db);
    let mut l = original.clone();
    let i = at(&l, 4);
    l[i].as_object_mut().unwrap().remove("payload_version");
    write_lines(&tampered, &l);
    check_fails(
        &tampered,
        Tamper::Altered,
        Some(4),
        "seq 4: header altered (a schema_version 3 record without its payload_version",
        &db,
    );
    let mut l = original.clone();
    let i = at(&l, 4);
    l[i]["schema_version"] = json!(2);
    write_lines(&tampered, &l);
    check_fails(
        &tampered,
        Tamper::Altered,
        Some(4),
        "seq 4: header altered (a schema_version 2 record with a payload_version",
        &db,
    );

    // A malformed payload digest is a malformed line.
    let mut l = original.clone();
    let i = at(&l, 2);
    l[i]["payload_digest"] = json!("xyz");
    write_lines(&tampered, &l);
    check_fails(&tampered, Tamper::Malformed, None, "field `payload_digest` is not 64 lowercase hex digits", &db);

    // Redacted v3 lines still verify (the payload digest is over the stored bytes, the
    // fields still check against the payload root), and replay refuses them as before.
    let redacted = export_one(&db, run, "redacted.jsonl", &["--redact", "output", "--redact", "input"]);
    let rl = lines(&redacted);
    assert!(rl.iter().any(|l| l["type"] == "record" && l.to_string().contains("$redacted")));
    for (a, b) in rl.iter().zip(&original).filter(|(a, _)| a["type"] == "record") {
        assert_eq!(a["payload_digest"], b["payload_digest"]);
        assert_eq!(a["payload_version"], b["payload_version"]);
        assert_eq!(a["hash"], b["hash"]);
    }
    assert!(verify_export(&redacted).unwrap().ok());
    keel(&db.db, &["verify", redacted.to_str().unwrap(), "--against-db"]).ok();
}

/// The first run of the committed golden demo-v1 log with a plan (its events as rebuilt
/// from their JSON fields, with their version-1 bincode payload bytes).
fn golden_v1_run() -> (RunId, Vec<(keel_engine::Logged, Vec<u8>)>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../engine/demo/tests/golden/demo-v1.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let mut runs: std::collections::BTreeMap<String, Vec<(keel_engine::Logged, Vec<u8>)>> = Default::default();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let kind = v["kind"].as_str().unwrap();
        let event = keel_engine::Event::from_fields(kind, v["fields"].as_object().unwrap().clone()).unwrap();
        let run: RunId = v["run"].as_str().unwrap().parse().unwrap();
        let logged = keel_engine::Logged {
            run,
            seq: Seq(v["seq"].as_u64().unwrap()),
            at_us: v["at_us"].as_i64().unwrap(),
            event,
        };
        let bytes = hex::decode(v["bincode"].as_str().unwrap()).unwrap();
        runs.entry(run.to_string()).or_default().push((logged, bytes));
    }
    let (_, events) = runs.into_iter().next().unwrap();
    (events[0].0.run, events)
}

/// The fields of a golden version-1 payload as the version-1 code wrote them: what the
/// engine reads back from the stored bytes without upcasting.
fn golden_fields(logged: &keel_engine::Logged, bytes: &[u8]) -> serde_json::Map<String, Value> {
    let rec = keel_store::Record {
        run: logged.run,
        seq: logged.seq,
        schema_version: 1,
        kind: logged.event.kind_name().to_owned(),
        time_us: logged.at_us,
        payload_version: 1,
        payload: bytes.to_vec(),
        payload_root: [0; 32],
        prev_hash: [0; 32],
        hash: [0; 32],
    };
    keel_engine::model::upcast::stored_fields(&rec).unwrap()
}

#[test]
fn a_run_written_as_schema_version_1_exports_v1_lines_that_verify() {
    let db = DemoDb::new(8);
    // A run as a v1 build wrote it: the payload bytes of a run of the committed golden
    // demo-v1 (every event at payload version 1: TaskDispatched without its effect key,
    // plans without optional dependencies, TaskFailed without its source), sealed as
    // schema-version-1 records into a copy of the demo db.
    let (run, golden) = golden_v1_run();
    let events: Vec<keel_engine::Logged> = golden.iter().map(|(logged, _)| logged.clone()).collect();
    assert!(golden.iter().any(|(l, _)| l.event.payload_version() > 1), "the run has kinds whose layout changed");
    let dir = tampered_db(&db, "v1db", |s| {
        let mut prev = [0u8; 32];
        for (logged, bytes) in &golden {
            let new = keel_store::NewRecord {
                kind: logged.event.kind_name().to_owned(),
                time_us: logged.at_us,
                payload_version: 1,
                payload: bytes.clone(),
                payload_root: digest::payload_root_of(&golden_fields(logged, bytes)),
            };
            let (value, hash) = keel_store::testing::seal_v1_record(run, logged.seq, &prev, &new).unwrap();
            s.raw_put(run, logged.seq, &value).unwrap();
            prev = hash;
        }
    });
    // Reopen with the CLI: resume-style reads, the deep check and the export all take it.
    keel(&dir, &["verify"]).ok();
    let file = dir.with_extension("jsonl");
    let id = run.to_string();
    keel(&dir, &["export", &id, "--format", "jsonl", "-o", file.to_str().unwrap()]).ok();
    let l = lines(&file);
    let records: Vec<&Value> = l.iter().filter(|x| x["type"] == "record").collect();
    assert_eq!(records.len(), events.len());
    for line in &records {
        assert_eq!(line["schema_version"], 1);
        assert!(line.get("payload_digest").is_none(), "{line}");
        assert!(line.get("payload_version").is_none(), "{line}");
    }
    assert!(verify_export(&file).unwrap().ok());
    keel(&dir, &["verify", file.to_str().unwrap(), "--against-db"]).ok();
    // The events read back through read_logged are the original ones.
    let store = common::open_retrying(&dir);
    let logged: Vec<_> = keel_engine::read_logged(&store, run, Seq(0)).unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(logged.len(), events.len());
    for (a, b) in logged.iter().zip(&events) {
        assert_eq!(a.event, b.event);
    }
    drop(store);
    // An edited v1 line is still named.
    let mut l2 = l.clone();
    let i = at(&l2, 2);
    l2[i]["time_us"] = json!(l2[i]["time_us"].as_i64().unwrap() + 1);
    let tampered = db.path("v1t.jsonl");
    write_lines(&tampered, &l2);
    check_fails(&tampered, Tamper::Altered, Some(2), "seq 2: header altered", &db);
}
