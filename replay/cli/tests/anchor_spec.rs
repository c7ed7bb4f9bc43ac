//! Anchored heads and retention, on real sled databases through the real `keel` binary:
//! signed exports and `verify --key`, the signed head checkpoints of a database,
//! `--expect-head`, `--against-db` (missing runs, runs that continued), the record `time`
//! field, and `keel archive` (tombstones, verify, replay from the archive).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, lines, write_lines, DemoDb};
use keel_store::{digest, Coordination, EventLog, RunId, Seq};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A key pair made by `keel keygen` in the demo's directory: (private, public).
fn keygen(db: &DemoDb, name: &str) -> (PathBuf, PathBuf) {
    let key = db.path(name);
    keel(&db.db, &["keygen", "--out", s(&key)]).ok();
    (key.clone(), PathBuf::from(format!("{}.pub", key.display())))
}

fn export(db: &DemoDb, what: &[&str], name: &str, extra: &[&str]) -> PathBuf {
    let file = db.path(name);
    let mut args = vec!["export"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["--format", "jsonl", "-o", s(&file)]);
    args.extend_from_slice(extra);
    keel(&db.db, &args).ok();
    file
}

/// Index of the line holding record `seq`.
fn at(l: &[Value], seq: u64) -> usize {
    l.iter().position(|x| x["type"] == "record" && x["seq"] == seq).unwrap()
}

/// The documented forgery (docs/EXPORT.md): record `seq`'s payload changed, every
/// payload root, link and hash after it recomputed, the trailer's head too. Any
/// signature line is dropped (the forger cannot make one with the owner's key).
fn recompute_forgery(file: &Path, run: RunId, seq: u64, out: &Path) -> String {
    let mut l = lines(file);
    l.retain(|x| x["type"] != "signature");
    let first = at(&l, seq);
    l[first]["payload"]["forged"] = json!(true);
    let mut prev = keel_replay::format::parse_hash(l[first]["prev_hash"].as_str().unwrap()).unwrap();
    for line in l.iter_mut().skip(first) {
        if line["type"] == "run_end" {
            line["head"] = json!(hex::encode(prev));
            continue;
        }
        let root = digest::payload_root_of(line["payload"].as_object().unwrap());
        let pd = keel_replay::format::parse_hash(line["payload_digest"].as_str().unwrap()).unwrap();
        let d = digest::record_digest_v3(
            run,
            Seq(line["seq"].as_u64().unwrap()),
            line["kind"].as_str().unwrap(),
            line["time_us"].as_i64().unwrap(),
            line["payload_version"].as_u64().unwrap() as u16,
            &root,
            &pd,
        );
        let hash = digest::chain(&prev, &d);
        line["payload_root"] = json!(hex::encode(root));
        line["prev_hash"] = json!(hex::encode(prev));
        line["hash"] = json!(hex::encode(hash));
        prev = hash;
    }
    write_lines(out, &l);
    hex::encode(prev)
}

/// Signs an export file as `keel export --sign` does, with `key` (what a forger holding
/// another key can do).
fn sign_with(file: &Path, key: &keel_replay::sign::SecretKey) {
    let text = std::fs::read_to_string(file).unwrap();
    let header = text.lines().next().unwrap();
    let mut m = keel_replay::sign::ExportMessage::new(header.as_bytes());
    for l in lines(file).iter().filter(|x| x["type"] == "run_end") {
        m.add_run(l["run"].as_str().unwrap(), l["records"].as_u64().unwrap(), l["head"].as_str().unwrap());
    }
    let sig = json!({"type": "signature", "alg": "ed25519", "key": key.public().hex(), "sig": key.sign_hex(m.bytes())});
    std::fs::write(file, format!("{text}{sig}\n")).unwrap();
}

#[test]
fn keygen_writes_a_private_key_0600_and_never_replaces_one() {
    let db = DemoDb::new(1);
    let (key, public) = keygen(&db, "k");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("keel-ed25519-public-key/v1 "));
    let before = std::fs::read(&key).unwrap();
    let e = keel(&db.db, &["keygen", "--out", s(&key)]).one_line_error(1);
    assert!(e.contains("exists: not replacing a key file"), "{e}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // A public key given where a private one is needed: one line.
    let e = keel(&db.db, &["export", "--all", "--format", "jsonl", "--sign", s(&public)]).one_line_error(1);
    assert!(e.contains("expected a keel-ed25519-secret-key/v1 file"), "{e}");
}

#[test]
fn a_recomputed_forgery_passes_plain_verify_but_not_the_key_nor_the_signed_checkpoint() {
    let db = DemoDb::new(4);
    let run = db.run_of("happy_path");
    let (key, public) = keygen(&db, "owner");
    // The engine signs a checkpoint of every head when it holds the key.
    keel(&db.db, &["work", "--until-idle", "--sign-key", s(&key)]).ok();
    keel(&db.db, &["verify", "--key", s(&public)]).ok();

    let signed = export(&db, &[&run.to_string()], "signed.jsonl", &["--sign", s(&key)]);
    let out = keel(&db.db, &["verify", s(&signed), "--key", s(&public), "--json"]).ok().json();
    assert_eq!(out["signed_by"], std::fs::read_to_string(&public).unwrap().split_whitespace().nth(1).unwrap());
    let head = out["runs"][0]["head"].as_str().unwrap().to_owned();
    keel(&db.db, &["verify", s(&signed), "--expect-head", &head]).ok();

    // The recipe forgery, signature line dropped: plain verify passes, as documented ...
    let forged = db.path("forged.jsonl");
    let forged_head = recompute_forgery(&signed, run, 3, &forged);
    keel(&db.db, &["verify", s(&forged)]).ok();
    // ... but not with the key, nor against the head kept elsewhere.
    let e = keel(&db.db, &["verify", s(&forged), "--key", s(&public)]).one_line_error(1);
    assert!(e.contains("the export is not signed"), "{e}");
    let e = keel(&db.db, &["verify", s(&forged), "--expect-head", &head]).one_line_error(1);
    assert!(e.contains("is not the expected head"), "{e}");
    // Re-signed with the forger's own key: verifies on its own, not with the owner's key.
    let mallory = keel_replay::sign::SecretKey::generate().unwrap();
    sign_with(&forged, &mallory);
    keel(&db.db, &["verify", s(&forged)]).ok();
    let e = keel(&db.db, &["verify", s(&forged), "--key", s(&public)]).one_line_error(1);
    assert!(e.contains("not by the expected key"), "{e}");
    // The owner's signature kept under rewritten records: even plain verify fails.
    let stale = db.path("stale.jsonl");
    recompute_forgery(&signed, run, 3, &stale);
    let sig = lines(&signed).into_iter().find(|x| x["type"] == "signature").unwrap();
    let mut l = lines(&stale);
    l.push(sig);
    write_lines(&stale, &l);
    let e = keel(&db.db, &["verify", s(&stale)]).one_line_error(1);
    assert!(e.contains("the file was changed after it was signed"), "{e}");
    // A line appended after the signature is named.
    let mut l = lines(&signed);
    l.push(l[1].clone());
    let appended = db.path("appended.jsonl");
    write_lines(&appended, &l);
    let e = keel(&db.db, &["verify", s(&appended)]).one_line_error(1);
    assert!(e.contains("a line after the signature line"), "{e}");

    // The same forgery inside the database (the run rewritten through the store, every
    // hash recomputed): plain verify passes; the signed checkpoint catches it.
    rewrite_run_in_db(&db, run);
    keel(&db.db, &["verify"]).ok();
    let e = keel(&db.db, &["verify", "--key", s(&public)]).one_line_error(1);
    assert!(e.contains(&format!("run {run}: the database's chain does not extend the head signed at")), "{e}");
    let e = keel(&db.db, &["verify", "--run", &run.to_string(), "--expect-head", &head]).one_line_error(1);
    assert!(e.contains("no record of its chain has the expected head"), "{e}");
    assert_ne!(forged_head, head);
}

/// Rewrites `run` in the database with a changed payload at seq 3 and a valid chain, as
/// someone with write access to the store could.
fn rewrite_run_in_db(db: &DemoDb, run: RunId) {
    let store = db.open();
    let records: Vec<keel_store::Record> = store.read(run, Seq(0)).unwrap().map(Result::unwrap).collect();
    let head = store.head(run).unwrap();
    store.remove_run(run, head.next_seq, Vec::new(), Vec::new()).unwrap();
    for rec in records {
        let mut event = keel_engine::model::upcast::decode(&rec.kind, rec.payload_version(), &rec.payload).unwrap();
        if rec.seq == Seq(3) {
            if let keel_engine::Event::TaskDispatched { attempt, .. } = &mut event {
                *attempt += 1;
            } else {
                panic!("seq 3 is {}", event.kind_name());
            }
        }
        let new = keel_store::prepare(&event, rec.time_us).unwrap();
        store.append(run, rec.seq, vec![new], None).unwrap();
    }
    store.flush().unwrap();
}

#[test]
fn against_db_names_runs_missing_from_an_all_export_and_reports_runs_that_continued() {
    let db = DemoDb::new(8);
    let all = export(&db, &["--all"], "all.jsonl", &[]);
    keel(&db.db, &["verify", s(&all), "--against-db"]).ok();

    // One run's lines removed: the file verifies on its own, not against the database.
    let gone = db.run_of("happy_path").to_string();
    let mut l = lines(&all);
    l.retain(|x| x["run"].as_str() != Some(gone.as_str()));
    let cut = db.path("cut.jsonl");
    write_lines(&cut, &l);
    keel(&db.db, &["verify", s(&cut)]).ok();
    let e = keel(&db.db, &["verify", s(&cut), "--against-db"]).one_line_error(1);
    assert!(e.contains("lacks 1 run(s) the database held when it was exported"), "{e}");
    assert!(e.contains(&gone), "{e}");
    // Only the header line: every run is named missing.
    let header = db.path("header.jsonl");
    write_lines(&header, &lines(&all)[..1]);
    let e = keel(&db.db, &["verify", s(&header), "--against-db"]).one_line_error(1);
    assert!(e.contains("lacks 8 run(s)"), "{e}");

    // A run exported while waiting for a human, then cancelled: genuine, reported.
    let waiting = db.run_of("human_escalation");
    let one = export(&db, &[&waiting.to_string()], "waiting.jsonl", &[]);
    keel(&db.db, &["cancel", &waiting.to_string(), "--reason", "test"]).ok();
    let ran = keel(&db.db, &["verify", s(&one), "--against-db"]);
    ran.ok();
    assert!(
        ran.stdout.contains(&format!("run {waiting}: the database has 1 more events since this export")),
        "{}",
        ran.stdout
    );
    let out = keel(&db.db, &["verify", s(&one), "--against-db", "--json"]).ok().json();
    assert_eq!(out["status"], "continued");
    assert_eq!(out["continued"][0]["more"], 1);
    // Its old head is in the database's chain: --expect-head on the database says so.
    let old = out["runs"][0]["head"].as_str().unwrap().to_owned();
    let ran = keel(&db.db, &["verify", "--run", &waiting.to_string(), "--expect-head", &old]);
    ran.ok();
    assert!(ran.stdout.contains("the database has 1 more events since it"), "{}", ran.stdout);
}

#[test]
fn the_time_field_is_checked_against_time_us() {
    let db = DemoDb::new(1);
    let run = db.runs[0].run;
    let file = export(&db, &[&run.to_string()], "run.jsonl", &[]);
    let mut l = lines(&file);
    let i = at(&l, 2);
    l[i]["time"] = json!("2001-01-01T00:00:00.000000Z");
    write_lines(&file, &l);
    let e = keel(&db.db, &["verify", s(&file)]).one_line_error(1);
    assert!(
        e.contains(&format!(
            "run {run} seq 2: header altered (its time \"2001-01-01T00:00:00.000000Z\" is not its time_us"
        )),
        "{e}"
    );
    // The header's exported_at is checked against exported_at_us the same way.
    let mut l = lines(&export(&db, &[&run.to_string()], "run2.jsonl", &[]));
    l[0]["exported_at"] = json!("2001-01-01T00:00:00Z");
    let edited = db.path("edited.jsonl");
    write_lines(&edited, &l);
    let e = keel(&db.db, &["verify", s(&edited)]).one_line_error(1);
    assert!(e.contains("header altered (exported_at"), "{e}");
}

#[test]
fn archive_removes_finished_runs_behind_a_tombstone_and_the_archive_verifies_and_replays() {
    let db = DemoDb::new(8);
    let (key, public) = keygen(&db, "k");
    keel(&db.db, &["work", "--until-idle", "--sign-key", s(&key)]).ok();
    let all = export(&db, &["--all"], "all.jsonl", &[]);
    let completed: Vec<RunId> = db.runs.iter().filter(|r| r.status == "Completed").map(|r| r.run).collect();
    assert!(!completed.is_empty());

    // Unfinished runs are never archived.
    let e = keel(&db.db, &["archive", "--status", "AwaitingHuman", "--to", s(&db.path("x"))]).one_line_error(2);
    assert!(e.contains("only finished runs"), "{e}");

    let dir = db.path("archive");
    let out =
        keel(&db.db, &["archive", "--status", "completed", "--to", s(&dir), "--sign", s(&key), "--json"]).ok().json();
    let archived = out["archived"].as_array().unwrap();
    assert_eq!(archived.len(), completed.len());

    // The database accounts for every run: the rest verify, the archived ones by tombstone.
    let v = keel(&db.db, &["verify", "--json"]).ok().json();
    assert_eq!(v["runs"].as_array().unwrap().len(), db.runs.len() - completed.len());
    assert_eq!(v["archived"].as_array().unwrap().len(), completed.len());
    for a in archived {
        let t = v["archived"].as_array().unwrap().iter().find(|t| t["run"] == a["run"]).unwrap();
        assert_eq!(t["head"], a["head"]);
        assert_eq!(t["records"], a["records"]);
        assert_eq!(t["file_sha256"], a["file_sha256"]);
        let file = PathBuf::from(a["file"].as_str().unwrap());
        assert_eq!(keel_replay::archive::file_digest(&file).unwrap(), a["file_sha256"].as_str().unwrap());
        // The archive file verifies with the key and replays.
        keel(&db.db, &["verify", s(&file), "--key", s(&public)]).ok();
        keel(&db.db, &["replay", "--from", s(&file), "--check"]).ok();
    }
    // The signed checkpoint still holds: archived heads are checked against tombstones.
    keel(&db.db, &["verify", "--key", s(&public)]).ok();
    // `keel runs` lists only what is left; an export taken before still compares.
    let runs = keel(&db.db, &["runs", "--json"]).ok().json();
    assert_eq!(
        runs["runs"].as_array().map(Vec::len).unwrap_or_else(|| runs.as_array().unwrap().len()),
        db.runs.len() - completed.len()
    );
    keel(&db.db, &["verify", s(&all), "--against-db"]).ok();
    // Nothing of an archived run is left in the store but its tombstone.
    let store = db.open();
    for run in &completed {
        assert_eq!(store.head(*run).unwrap().next_seq, Seq(0));
        assert!(store.read(*run, Seq(0)).unwrap().next().is_none());
    }
    drop(store);
    // Archiving again finds nothing and replaces no file.
    let out = keel(&db.db, &["archive", "--status", "completed", "--to", s(&dir), "--json"]).ok().json();
    assert_eq!(out["archived"].as_array().unwrap().len(), 0);
}
