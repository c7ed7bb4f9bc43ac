//! The manifest of committed history beside sled's files: a store whose sled files lost
//! committed records is refused (naming runs and seqs, with the evidence kept), read-only
//! opens write nothing, a damaged sled snapshot falls back to a full log scan.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{Durability, EventLog, Level, Seq, SledStore, StoreConfig, StoreError, MANIFEST_FILE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// sled's files and keel's, by relative path: bytes and modification time.
fn snapshot_dir(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    (std::fs::read(&p).unwrap(), m.modified().unwrap()),
                );
            }
        }
    }
    out
}

fn copy_files(from: &Path, to: &Path) {
    for (rel, (bytes, _)) in snapshot_dir(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

fn damaged_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("damaged-"))
        .collect()
}

/// sled's files rolled back to an earlier state (as a recovery that dropped a damaged
/// tail leaves them) while the manifest says more was committed.
#[test]
fn a_store_whose_sled_files_lost_committed_records_is_refused_naming_runs_and_seqs() {
    let (dir, early) = committed_past_an_earlier_copy();
    // sled's files as they were after 3 records; the manifest says 8 were committed.
    for name in ["db", "conf"] {
        std::fs::copy(early.path().join(name), dir.path().join(name)).unwrap();
    }
    let err = SledStore::open(dir.path(), config(Durability::None)).map(|_| ()).unwrap_err();
    let StoreError::LostCommitted { path, lost, evidence } = &err else { panic!("expected LostCommitted, got {err}") };
    assert_eq!(path, dir.path());
    assert_eq!(lost.len(), 1, "{err}");
    assert_eq!((lost[0].run, lost[0].from, lost[0].committed_next), (run(1), Seq(3), Seq(8)));
    let text = err.to_string();
    assert!(text.contains(&run(1).to_string()) && text.contains("seqs 3..=7"), "{text}");
    // The evidence: sled's files as found, before sled recovered them.
    let evidence = evidence.as_ref().expect("an evidence copy");
    assert_eq!(std::fs::read(evidence.join("db")).unwrap(), std::fs::read(early.path().join("db")).unwrap());
    // Refused again on the next open (nothing was rewritten), and read-only opens report it.
    assert!(matches!(SledStore::open(dir.path(), config(Durability::None)), Err(StoreError::LostCommitted { .. })));
    let ro = SledStore::open_read_only(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(ro.lost().len(), 1);
    assert_eq!(ro.head(run(1)).unwrap().next_seq, Seq(3));
}

/// sled's files in `dir` replaced by those in `early` in place (same inode), padded to the
/// same length, with the same modification time: what bit rot leaves, the clean-close
/// line still holding.
fn roll_back_in_place(dir: &Path, early: &Path) {
    let data = dir.join("db");
    let before = std::fs::metadata(&data).unwrap();
    for name in ["db", "conf"] {
        let bytes = std::fs::read(early.join(name)).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(dir.join(name)).unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
    }
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    assert!(f.metadata().unwrap().len() <= before.len(), "the earlier data file is longer");
    f.set_len(before.len()).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
}

/// A store where run 1 has 8 committed records and run 2 has 2, closed cleanly, and a copy
/// of its files taken when run 1 had 3.
fn committed_past_an_earlier_copy() -> (tempfile::TempDir, tempfile::TempDir) {
    let dir = tempdir();
    let early = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 3);
        fill(&log, run(2), 2);
    }
    copy_files(dir.path(), early.path());
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill_from(&log, run(1), 3, 5);
    }
    (dir, early)
}

fn fill_from(log: &dyn EventLog, run: keel_store::RunId, from: u64, n: u64) {
    for i in from..from + n {
        log.append(run, Seq(i), vec![rec(i)], None).unwrap();
    }
}

/// A clean close leaves no evidence copy behind, and neither does an open after an
/// unclean close that lost nothing (the copy is made, checked, removed).
#[test]
fn opens_that_lose_nothing_leave_no_evidence_copy() {
    let dir = tempdir();
    for i in 0..3 {
        let log = open(dir.path(), Durability::GroupCommit(Level::ProcessCrash));
        fill_from(&log, run(1), i * 2, 2);
    }
    assert!(damaged_dirs(dir.path()).is_empty());
    // An unclean close: the manifest's clean-close line is missing.
    let m = dir.path().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&m).unwrap();
    let kept: String = text.lines().filter(|l| !l.starts_with("c ")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&m, kept).unwrap();
    let log = open(dir.path(), Durability::None);
    assert_eq!(log.head(run(1)).unwrap().next_seq, Seq(6));
    assert!(damaged_dirs(dir.path()).is_empty());
}

/// A read-only open writes nothing in the store directory: bytes and modification times
/// are unchanged, and it works while the directory cannot be written (chattr +i where
/// the file system supports it).
#[test]
fn a_read_only_open_changes_no_byte_and_no_mtime() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 4);
    }
    let before = snapshot_dir(dir.path());
    {
        let ro = SledStore::open_read_only(dir.path(), StoreConfig::default()).unwrap();
        let (records, err) = read_all(&ro, run(1), Seq(0));
        assert!(err.is_none());
        assert_eq!(records.len(), 4);
        assert!(ro.lost().is_empty());
        // Writes go to the scratch copy only.
        ro.append(run(1), Seq(4), vec![rec(4)], None).unwrap();
    }
    assert_eq!(snapshot_dir(dir.path()), before, "a read-only open changed the store's files");
}

/// A damaged sled snapshot file (`snap.*`): sled refuses it as corrupt; the open sets it
/// aside and sled rebuilds from its whole log, every record intact.
#[test]
fn a_damaged_sled_snapshot_falls_back_to_a_full_log_scan() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 5);
    }
    // sled writes its snapshot when it opens a store that has a log.
    drop(open(dir.path(), Durability::None));
    let snap = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("snap."))
        .expect("sled wrote a snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&snap, bytes).unwrap();
    let ro = SledStore::open_read_only(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(read_all(&ro, run(1), Seq(0)).0.len(), 5);
    drop(ro);
    let log = open(dir.path(), Durability::None);
    let (records, err) = read_all(&log, run(1), Seq(0));
    assert!(err.is_none());
    assert_eq!(records.len(), 5);
    // The damaged snapshot was kept as evidence.
    assert!(damaged_dirs(dir.path()).iter().any(|d| d.join(snap.file_name().unwrap()).is_file()));
}

/// A damaged manifest line followed by good ones is damage: the open is refused naming
/// the line (a torn last line is not: see the unit tests).
#[test]
fn a_damaged_manifest_is_refused_naming_its_line() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 2);
        fill(&log, run(2), 2);
    }
    let m = dir.path().join(MANIFEST_FILE);
    let mut bytes = std::fs::read(&m).unwrap();
    let second_line = bytes.iter().position(|b| *b == b'\n').unwrap() + 3;
    bytes[second_line] ^= 1;
    std::fs::write(&m, bytes).unwrap();
    match SledStore::open(dir.path(), config(Durability::None)) {
        Err(StoreError::CorruptStore { reason, .. }) => assert!(reason.contains("line 2"), "{reason}"),
        other => panic!("expected CorruptStore, got {:?}", other.map(|_| ())),
    }
}

/// The clean-close line names sled's data file as it is after the store (and sled) are
/// dropped, so the next open makes no evidence copy.
#[test]
fn a_clean_close_records_the_data_files_final_fingerprint() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 3);
    }
    // sled's background threads finish after the drop: wait for its lock to be free.
    drop(open_when_free(dir.path(), config(Durability::None)));
    let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
    let last = text.lines().last().unwrap();
    let fields: Vec<&str> = last.split(['\t', ' ']).collect();
    let m = std::fs::metadata(dir.path().join("db")).unwrap();
    let mtime_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    assert_eq!(fields[..4], ["c", &m.len().to_string(), &mtime_ns.to_string(), &m.ino().to_string()], "{last}");
}

/// A run removed on purpose (`Coordination::remove_run`, what `keel archive` does) is not
/// reported as lost by the next open; a removal refused for a stale head keeps the run
/// expected, so a later loss of its records is still found.
#[test]
fn a_removed_run_is_not_lost_and_a_refused_removal_keeps_it_expected() {
    use keel_store::Coordination;
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 3);
        fill(&log, run(2), 2);
        log.remove_run(run(1), Seq(3), Vec::new(), Vec::new()).unwrap();
        let stale = log.remove_run(run(2), Seq(1), Vec::new(), Vec::new());
        assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    }
    let log = SledStore::open(dir.path(), config(Durability::None)).unwrap();
    assert_eq!(log.head(run(1)).unwrap().next_seq, Seq(0));
    assert_eq!(log.head(run(2)).unwrap().next_seq, Seq(2));
    drop(log);
    let ro = SledStore::open_read_only(dir.path(), StoreConfig::default()).unwrap();
    assert!(ro.lost().is_empty(), "{:?}", ro.lost());
    let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
    assert!(text.lines().any(|l| l.starts_with(&format!("h {} 2 ", run(2)))), "{text}");
}

/// After a clean close the open reads nothing from sled to check the manifest (that cost
/// O(runs) sled reads: 3.6 s with 100k runs): each run is compared with its committed
/// head the first time it is read or written. sled's files rolled back behind the
/// manifest's back with the data file's fingerprint kept (length, mtime, inode: what bit
/// rot leaves) open, but the run that lost records is refused at its first use, every
/// later use too, and nothing is written over it; the others work.
#[test]
fn after_a_clean_close_a_run_that_lost_committed_records_is_refused_at_its_first_use() {
    let (dir, early) = committed_past_an_earlier_copy();
    // sled's files as they were after 3 records of run 1, with the clean-close line still
    // holding.
    roll_back_in_place(dir.path(), early.path());

    let log = SledStore::open(dir.path(), config(Durability::GroupCommit(Level::PowerLoss))).unwrap();
    assert!(damaged_dirs(dir.path()).is_empty(), "a clean open makes no evidence copy");
    let err = log.head(run(1)).unwrap_err();
    let StoreError::LostCommitted { lost, .. } = &err else { panic!("expected LostCommitted, got {err}") };
    assert_eq!((lost[0].run, lost[0].from, lost[0].committed_next), (run(1), Seq(3), Seq(8)));
    assert!(matches!(log.read(run(1), Seq(0)), Err(StoreError::LostCommitted { .. })));
    assert!(matches!(log.append(run(1), Seq(3), vec![rec(3)], None), Err(StoreError::LostCommitted { .. })));
    assert_eq!(log.lost_found().len(), 1);
    // The run that lost nothing is checked at its first use too, and works.
    assert_eq!(log.head(run(2)).unwrap().next_seq, Seq(2));
    log.append(run(2), Seq(2), vec![rec(2)], None).unwrap();
    drop(log);
    // Nothing was written over the lost run: the manifest still expects its 8 records
    // (a read-only open, which checks every run, reports it).
    let ro = SledStore::open_read_only(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(ro.lost().len(), 1, "{:?}", ro.lost());
    assert_eq!(ro.lost()[0].committed_next, Seq(8));
}

/// `open_read_only_lazy` (the CLI's listings): a store closed cleanly is read from its
/// scratch copy with no run checked at open, and each run is checked at its first use as a
/// writable clean open does: the run whose records sled lost behind the manifest's back is
/// refused, the other works, and nothing in the directory is written. A store not closed
/// cleanly (its data file replaced: another inode) is checked whole at open, as by
/// `open_read_only`.
#[test]
fn a_lazy_read_only_open_checks_each_run_at_its_first_use_and_writes_nothing() {
    let (dir, early) = committed_past_an_earlier_copy();
    roll_back_in_place(dir.path(), early.path());
    let data = dir.path().join("db");
    let files = snapshot_dir(dir.path());

    let ro = SledStore::open_read_only_lazy(dir.path(), StoreConfig::default()).unwrap();
    assert!(ro.lost().is_empty(), "nothing is checked at open: {:?}", ro.lost());
    let err = ro.head(run(1)).unwrap_err();
    let StoreError::LostCommitted { lost, .. } = &err else { panic!("expected LostCommitted, got {err}") };
    assert_eq!((lost[0].run, lost[0].from, lost[0].committed_next), (run(1), Seq(3), Seq(8)));
    assert!(matches!(ro.read(run(1), Seq(0)), Err(StoreError::LostCommitted { .. })));
    assert_eq!(ro.lost_found().len(), 1);
    assert_eq!(ro.head(run(2)).unwrap().next_seq, Seq(2));
    assert_eq!(ro.read(run(2), Seq(0)).unwrap().count(), 2);
    drop(ro);
    assert_eq!(snapshot_dir(dir.path()), files, "a read-only open wrote into the store's directory");

    // The data file replaced (a new inode): not a clean close any more, so every run is
    // checked at open.
    let bytes = std::fs::read(&data).unwrap();
    std::fs::remove_file(&data).unwrap();
    std::fs::write(&data, bytes).unwrap();
    let ro = SledStore::open_read_only_lazy(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(ro.lost().len(), 1, "{:?}", ro.lost());
    assert_eq!(ro.lost()[0].committed_next, Seq(8));
}

/// A manifest ending in a torn append after its clean-close line (the data file untouched,
/// so the open is a clean one) is rewritten, not appended to: a line glued to the torn
/// bytes would fail its checksum with good lines after it, and the next open would refuse
/// the store as damaged.
#[test]
fn a_clean_open_rewrites_a_manifest_that_ends_in_a_torn_append() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 3);
    }
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join(MANIFEST_FILE)).unwrap();
    std::io::Write::write_all(&mut f, b"h 0101 tor").unwrap();
    drop(f);
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill_from(&log, run(1), 3, 2);
        fill(&log, run(2), 1);
    }
    let log = SledStore::open(dir.path(), config(Durability::None)).unwrap();
    assert_eq!(log.head(run(1)).unwrap().next_seq, Seq(5));
    assert_eq!(log.head(run(2)).unwrap().next_seq, Seq(1));
    drop(log);
    let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
    assert!(!text.contains("tor"), "{text}");
}

/// A writable open of a store another handle has open is `Locked` before anything is
/// copied or written: it used to make an evidence copy of the files in use first (the
/// manifest no longer ends in a clean close while a store is open and written to) and
/// leave it behind, a `damaged-*` copy the size of the database each time the CLI looked
/// for a running `keel serve`.
#[test]
fn opening_a_store_held_elsewhere_copies_nothing() {
    let dir = tempdir();
    let held = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
    fill(&held, run(1), 3);
    let err = SledStore::open(dir.path(), config(Durability::None)).map(|_| ()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert_eq!(damaged_dirs(dir.path()), Vec::<PathBuf>::new());
    assert!(SledStore::held_by_a_writer(dir.path()).unwrap());
    drop(held);
}

/// A read-only open copying the store's files holds a shared lock on the data file for as
/// long as the copy takes: a writable open then waits for it instead of failing "in use"
/// at once (a `keel runs` made a `keel work` or `keel serve` start fail), and is still
/// `Locked` at once while another process has the store open.
#[test]
fn a_writable_open_waits_for_readers_copying_the_files() {
    let dir = tempdir();
    {
        let log = open(dir.path(), Durability::GroupCommit(Level::PowerLoss));
        fill(&log, run(1), 3);
    }
    // Past the grace in which this process retries a store it just closed itself (as a
    // store held by another process is seen).
    std::thread::sleep(std::time::Duration::from_millis(3200));
    // A reader's shared lock, as `files::scratch_copy` takes it, released after 300 ms.
    let data = std::fs::File::open(dir.path().join("db")).unwrap();
    data.lock_shared().unwrap();
    assert!(!SledStore::held_by_a_writer(dir.path()).unwrap(), "a reader is not a writer");
    let reader = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(data);
    });
    let start = std::time::Instant::now();
    let log = SledStore::open(dir.path(), config(Durability::None)).unwrap();
    assert!(start.elapsed() >= std::time::Duration::from_millis(250), "opened while the reader held the file");
    assert_eq!(log.head(run(1)).unwrap().next_seq, Seq(3));
    reader.join().unwrap();
    assert_eq!(damaged_dirs(dir.path()), Vec::<PathBuf>::new());
}
