//! Opening: locks, non-store directories, missing stores, damaged databases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{Durability, EventLog, Seq, SledStore, StoreConfig, StoreError, SEGMENT_BYTES};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn no_create() -> StoreConfig {
    StoreConfig { create: false, ..StoreConfig::default() }
}

#[test]
fn second_open_in_the_same_process_is_locked() {
    let dir = tempdir();
    let first = open(dir.path(), Durability::None);
    match SledStore::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    drop(first);
    // Released on drop.
    open(dir.path(), Durability::None);
}

/// Child half of `open_held_by_another_process_is_locked`: holds the store until stdin closes.
#[test]
#[ignore = "child process of open_held_by_another_process_is_locked"]
fn child_hold_store() {
    let Ok(dir) = std::env::var("KEEL_TEST_HOLD_DIR") else { return };
    let _log = SledStore::open(&dir, StoreConfig::default()).unwrap();
    let mut out = std::io::stdout();
    // Own line: libtest prints "test child_hold_store ... " before the test body runs.
    writeln!(out, "\nready").unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn open_held_by_another_process_is_locked() {
    let dir = tempdir();
    drop(open(dir.path(), Durability::None));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_hold_store", "--ignored", "--nocapture", "--test-threads=1"])
        .env("KEEL_TEST_HOLD_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.map(|l| l.trim() == "ready").unwrap_or(false)), "child never ready");
    match SledStore::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    drop(child.stdin.take()); // child exits
    assert!(child.wait().unwrap().success());
    open(dir.path(), Durability::None);
}

#[test]
fn a_non_empty_directory_that_is_not_a_store_is_refused_untouched() {
    let dir = tempdir();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    match SledStore::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::NotAStore { path, reason }) => {
            assert_eq!(path, dir.path());
            assert!(reason.contains("no sled database"), "{reason}");
        }
        other => panic!("expected NotAStore, got {:?}", other.map(|_| ())),
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("notes.txt")], "nothing created");
}

#[test]
fn a_file_is_not_a_store() {
    let dir = tempdir();
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(SledStore::open(&file, StoreConfig::default()), Err(StoreError::NotAStore { .. })));
}

#[test]
fn create_false_and_nothing_there_is_not_found_and_creates_nothing() {
    let dir = tempdir();
    let missing = dir.path().join("missing");
    match SledStore::open(&missing, no_create()) {
        Err(StoreError::NotFound { path }) => assert_eq!(path, missing),
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    assert!(!missing.exists());
    assert!(matches!(SledStore::open(dir.path(), no_create()), Err(StoreError::NotFound { .. })));
    // With create: true it is created, and then create: false opens it.
    drop(SledStore::open(&missing, StoreConfig::default()).unwrap());
    let log = SledStore::open(&missing, no_create()).unwrap();
    assert!(log.runs().unwrap().is_empty());
}

#[test]
fn a_plain_sled_database_is_not_a_store() {
    // sled's default segment size: sled itself refuses the config change.
    let dir = tempdir();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"user-key", b"v").unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(SledStore::open(dir.path(), StoreConfig::default()), Err(StoreError::NotAStore { .. })));
    // Same segment size as keel, but no keel marker.
    let dir = tempdir();
    {
        let db = sled::Config::new().path(dir.path()).segment_size(SEGMENT_BYTES).open().unwrap();
        db.insert(b"user-key", b"v").unwrap();
        db.flush().unwrap();
    }
    match SledStore::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::NotAStore { reason, .. }) => assert!(reason.contains("marker"), "{reason}"),
        other => panic!("expected NotAStore, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_damaged_data_file_is_reported_not_silently_recreated() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::EveryAppend(keel_store::Level::PowerLoss));
        fill(&log, run(1), 20);
    }
    // Overwrite the start of sled's data file: sled then recovers an EMPTY database.
    let db_file = dir.path().join("db");
    let mut bytes = std::fs::read(&db_file).unwrap();
    let n = bytes.len().min(4096);
    bytes[..n].fill(0xff);
    std::fs::write(&db_file, &bytes).unwrap();
    match SledStore::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::CorruptStore { reason, .. }) => assert!(reason.contains("damaged"), "{reason}"),
        Err(e) => panic!("expected CorruptStore, got {e:?}"),
        Ok(log) => panic!("opened a damaged store with runs {:?}", log.runs()),
    }
}

#[test]
fn opening_never_panics_on_garbage_files() {
    // A directory with sled's file names but garbage content: a typed error or an empty
    // database, never a panic escaping to the caller.
    let dir = tempdir();
    std::fs::write(dir.path().join("conf"), vec![0xab; 64]).unwrap();
    std::fs::write(dir.path().join("db"), vec![0xcd; 100_000]).unwrap();
    let _ =
        SledStore::open(dir.path(), StoreConfig::default()).map(|log| log.head(run(1)).map(|h| h.next_seq == Seq(0)));
}

#[test]
fn sled_like_files_without_the_keel_marker_are_refused_untouched_by_a_read_only_open() {
    // A read-only open (create: false) must not let sled rewrite files that may not be
    // ours: sled overwrites `conf` and grows `db` as soon as it opens them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("db"), b"garbage").unwrap();
    std::fs::write(dir.path().join("conf"), b"garbage").unwrap();
    let err = SledStore::open(dir.path(), no_create()).err().expect("must not open");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert_eq!(std::fs::read(dir.path().join("db")).unwrap(), b"garbage");
    assert_eq!(std::fs::read(dir.path().join("conf")).unwrap(), b"garbage");
    assert!(!dir.path().join("blobs").exists());
}

#[test]
fn a_creation_cut_before_the_marker_is_no_store_yet_and_the_next_creating_open_finishes_it() {
    // What a kill between sled creating its files and the marker being durable leaves:
    // the creating file, sled's files (here with the format record), no marker.
    let dir = tempdir();
    {
        let db = sled::Config::new().path(dir.path()).segment_size(SEGMENT_BYTES).open().unwrap();
        db.insert(b"mformat", b"keel-store v1".as_slice()).unwrap();
        db.flush().unwrap();
    }
    std::fs::write(dir.path().join(keel_store::CREATING_FILE), b"").unwrap();
    assert!(matches!(SledStore::open(dir.path(), no_create()), Err(StoreError::NotFound { .. })));
    let log = open(dir.path(), Durability::None);
    fill(&log, run(1), 3);
    drop(log);
    assert!(dir.path().join(keel_store::MARKER_FILE).is_file());
    assert!(!dir.path().join(keel_store::CREATING_FILE).exists());
    let log = SledStore::open(dir.path(), no_create()).unwrap();
    assert_eq!(log.head(run(1)).unwrap().next_seq, Seq(3));
    // A new store leaves no creating file behind either.
    let fresh = tempdir();
    drop(open(fresh.path(), Durability::None));
    assert!(fresh.path().join(keel_store::MARKER_FILE).is_file());
    assert!(!fresh.path().join(keel_store::CREATING_FILE).exists());
}

#[test]
fn a_store_of_the_first_format_opens_and_is_raised_to_the_current_marker() {
    // A store written before sealed runs carries "keel-store v1": it opens with its records
    // as they were, and its marker is raised (an earlier build then refuses it by name
    // instead of misreading a sealed run).
    let dir = tempdir();
    let log = open(dir.path(), Durability::None);
    fill(&log, run(1), 4);
    drop(log);
    let marker = |dir: &std::path::Path| {
        let db = sled::Config::new().path(dir).segment_size(SEGMENT_BYTES).open().unwrap();
        db.get(b"mformat").unwrap().map(|v| v.to_vec())
    };
    {
        let db = sled::Config::new().path(dir.path()).segment_size(SEGMENT_BYTES).open().unwrap();
        db.insert(b"mformat", b"keel-store v1".as_slice()).unwrap();
        db.flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    // A read-only open reads it and leaves the marker as it was (only its scratch copy is raised).
    let copy = SledStore::open_read_only(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(copy.head(run(1)).unwrap().next_seq, Seq(4));
    drop(copy);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(marker(dir.path()), Some(b"keel-store v1".to_vec()));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = SledStore::open(dir.path(), no_create()).unwrap();
    assert_eq!(log.head(run(1)).unwrap().next_seq, Seq(4));
    assert_eq!(log.read(run(1), Seq(0)).unwrap().filter(|r| r.is_ok()).count(), 4);
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(marker(dir.path()), Some(keel_store::FORMAT_MARKER.to_vec()));
    assert_eq!(keel_store::FORMAT_MARKER, b"keel-store v2");
}
