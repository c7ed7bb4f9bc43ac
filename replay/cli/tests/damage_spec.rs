//! Committed history that cannot vanish silently, and read-only commands that write
//! nothing, through the real `keel` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use std::path::{Path, PathBuf};

use common::dir_files as files;

/// `chattr +i` on the database directory and its files (so even root cannot write them),
/// undone on drop. `None` where the file system or the user cannot set it.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(dir: &Path) -> Option<Immutable> {
        let mut paths: Vec<PathBuf> = files(dir).into_keys().collect();
        paths.push(dir.to_path_buf());
        let ok = std::process::Command::new("chattr").arg("+i").args(&paths).status().is_ok_and(|s| s.success());
        let guard = Immutable(paths);
        ok.then_some(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

/// `keel runs/show/export/verify/replay/stats/escalations` read the database without
/// writing to it: with the directory and its files immutable (`chattr +i`, which binds
/// root too) they all succeed, and afterwards every file has its bytes and mtime.
#[test]
fn read_only_commands_work_on_an_immutable_database_and_change_nothing() {
    let demo = DemoDb::new(3);
    let run = demo.runs[0].run.to_string();
    let before = files(&demo.db);
    let guard = Immutable::set(&demo.db);
    if guard.is_none() {
        println!("chattr +i unavailable here: checking that no file changes, without an immutable directory");
    }
    let commands: [&[&str]; 8] = [
        &["runs"],
        &["show", &run],
        &["export", &run, "--format", "jsonl"],
        &["verify"],
        &["replay", "--all", "--check"],
        &["stats"],
        &["escalations"],
        &["doctor"],
    ];
    for args in commands {
        let ran = keel(&demo.db, args);
        assert_eq!(ran.code, 0, "keel {args:?}: {}", ran.stderr);
    }
    if guard.is_some() {
        // And a command that writes says which path it could not write.
        let work = keel(&demo.db, &["work", "--until-idle"]);
        assert_ne!(work.code, 0);
        assert!(work.stderr.contains(demo.db.to_str().unwrap()), "{}", work.stderr);
    }
    drop(guard);
    assert_eq!(files(&demo.db), before, "a read-only command changed the database's files");
}

/// sled's files rolled back to before two runs were written (as sled's recovery leaves a
/// damaged data file): `verify` and `runs` fail naming the runs, `work` refuses to write
/// and keeps the files as found, `doctor` explains what an export can restore.
/// A demo database of 2 runs, a copy of its sled files then (`early`), then 2 more runs.
fn two_runs_then_two_more() -> (DemoDb, PathBuf) {
    let demo = DemoDb::new(2);
    let early = demo.path("early");
    std::fs::create_dir(&early).unwrap();
    for name in ["db", "conf"] {
        std::fs::copy(demo.db.join(name), early.join(name)).unwrap();
    }
    keel(&demo.db, &["demo", "--runs", "2", "--seed", "2"]).ok();
    (demo, early)
}

/// The runs of the database that are not the demo's first ones (two of them).
fn runs_added_since(demo: &DemoDb) -> Vec<String> {
    let runs = keel(&demo.db, &["runs", "--json"]).ok().json();
    let later: Vec<String> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap().to_owned())
        .filter(|r| demo.runs.iter().all(|d| d.run.to_string() != *r))
        .collect();
    assert_eq!(later.len(), 2);
    later
}

#[test]
fn lost_committed_runs_are_reported_refused_and_explained() {
    let (demo, early) = two_runs_then_two_more();
    let export = demo.path("all.jsonl");
    keel(&demo.db, &["export", "--all", "--format", "jsonl", "-o", export.to_str().unwrap()]).ok();
    let later = runs_added_since(&demo);
    for name in ["db", "conf"] {
        std::fs::copy(early.join(name), demo.db.join(name)).unwrap();
    }

    let verify = keel(&demo.db, &["verify"]);
    let line = verify.one_line_error(1);
    assert!(line.contains("committed records lost") && later.iter().all(|r| line.contains(r.as_str())), "{line}");
    let json = keel(&demo.db, &["verify", "--json"]);
    assert_eq!(json.code, 1);
    assert_eq!(json.json()["lost"].as_array().unwrap().len(), 2);
    let runs = keel(&demo.db, &["runs"]);
    assert!(runs.one_line_error(1).contains("committed records lost"));

    let work = keel(&demo.db, &["work", "--until-idle"]);
    let line = work.one_line_error(1);
    assert!(line.contains("committed records lost") && line.contains("kept in"), "{line}");

    let doctor = keel(&demo.db, &["doctor", "--export", export.to_str().unwrap(), "--json"]);
    assert_eq!(doctor.code, 1, "{}", doctor.stderr);
    let doc = doctor.json();
    let lost = doc["lost"].as_array().unwrap();
    assert_eq!(lost.len(), 2);
    for l in lost {
        assert!(later.contains(&l["run"].as_str().unwrap().to_owned()));
        assert_eq!(l["from"], 0);
        assert_eq!(l["export"]["restorable"], true, "{l}");
    }
    assert_eq!(doc["evidence"].as_array().unwrap().len(), 1, "{doc}");
    let text = keel(&demo.db, &["verify", "--deep"]);
    assert_eq!(text.code, 1);
    assert!(text.stdout.contains("LOST  run"), "{}", text.stdout);
}

/// sled's files rolled back behind the manifest with the data file's length, mtime and
/// inode kept (what bit rot leaves: the close still reads as clean, so the read commands
/// check each run at its first use, not every run at open): a lost run named by its id or
/// a prefix of it is refused naming the loss, and `export --all` and `replay --all` (which
/// read every run) check every run first, so neither passes over the lost ones.
#[test]
fn after_a_clean_close_lost_runs_are_refused_when_named_and_by_the_all_commands() {
    let (demo, early) = two_runs_then_two_more();
    let later = runs_added_since(&demo);
    // In place: the same inode, the length padded back, the modification time put back.
    let data = demo.db.join("db");
    let before = std::fs::metadata(&data).unwrap();
    for name in ["db", "conf"] {
        let bytes = std::fs::read(early.join(name)).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(demo.db.join(name)).unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
    }
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    assert!(f.metadata().unwrap().len() <= before.len());
    f.set_len(before.len()).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);

    for named in [later[0].clone(), later[0][..8].to_owned()] {
        let line = keel(&demo.db, &["show", &named]).one_line_error(1);
        assert!(line.contains("committed records lost") && line.contains("keel doctor"), "show {named}: {line}");
    }
    let out = demo.path("all.jsonl");
    let line = keel(&demo.db, &["export", "--all", "--format", "jsonl", "-o", out.to_str().unwrap()]).one_line_error(1);
    assert!(line.contains("committed records lost") && later.iter().all(|r| line.contains(r.as_str())), "{line}");
    assert!(!out.exists(), "a partial export was left");
    let line = keel(&demo.db, &["replay", "--all", "--check"]).one_line_error(1);
    assert!(line.contains("committed records lost") && line.contains("keel doctor"), "{line}");
    assert_eq!(keel(&demo.db, &["verify"]).code, 1);
    // A run that lost nothing reads as before.
    keel(&demo.db, &["show", &demo.runs[0].run.to_string()]).ok();
}

/// A read command killed before it removed its scratch copy (Ctrl-C, SIGTERM, SIGKILL) left
/// a copy of the database in the temporary directory; the next read removes the copies
/// whose process is gone (their lock file can be locked) and leaves the others: one still
/// held by its process, one without a lock file (an older keel's).
#[test]
fn a_read_removes_the_scratch_copies_of_killed_reads() {
    let demo = DemoDb::new(2);
    let tmp = tempfile::tempdir().unwrap();
    let make = |name: &str, lock: bool| {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("db"), vec![0u8; 4096]).unwrap();
        if lock {
            std::fs::write(d.join("keel-read.lock"), b"").unwrap();
        }
        d
    };
    let dead = make("keel-read-dead", true);
    let live = make("keel-read-live", true);
    let old = make("keel-read-old", false);
    let held = std::fs::File::open(live.join("keel-read.lock")).unwrap();
    held.lock().unwrap();
    let out = std::process::Command::new(KEEL)
        .args(["--db", demo.db.to_str().unwrap(), "runs"])
        .env("TMPDIR", tmp.path())
        .env_remove("KEEL_DB")
        .env_remove("KEEL_SERVER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dead.exists(), "the killed read's copy is still there");
    assert!(live.join("db").exists() && old.join("db").exists());
    let mut left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["keel-read-live", "keel-read-old"], "the command's own copy is removed at its end");
    drop(held);
}
