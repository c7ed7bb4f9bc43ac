//! The lossy model without FUSE: what a cut keeps is exactly what was synced.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_lossyfs::model::{Cut, DirSync, Model, PAGE_BYTES, ROOT_INO};
use std::ffi::OsStr;
use std::path::PathBuf;

struct Disk {
    _tmp: tempfile::TempDir,
    disk: PathBuf,
    model: Model,
}

fn disk() -> Disk {
    let tmp = tempfile::tempdir().unwrap();
    let (disk, trash) = (tmp.path().join("disk"), tmp.path().join("trash"));
    std::fs::create_dir(&disk).unwrap();
    std::fs::create_dir(&trash).unwrap();
    let model = Model::new(&disk, &trash).unwrap();
    Disk { _tmp: tmp, disk, model }
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn listing(d: &Disk) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(&d.disk).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn unsynced_writes_are_read_back_then_lost_at_the_cut() {
    let mut d = disk();
    let f = d.model.create(ROOT_INO, name("f"), 0o644).unwrap().ino;
    d.model.sync_dir(ROOT_INO).unwrap();
    d.model.write(f, 0, b"durable").unwrap();
    d.model.sync_file(f).unwrap();
    d.model.write(f, 3, b"VOLATILE").unwrap();
    assert_eq!(d.model.read(f, 0, 100).unwrap(), b"durVOLATILE");
    assert_eq!(d.model.getattr(f).unwrap().size, 11);
    assert_eq!(std::fs::read(d.disk.join("f")).unwrap(), b"durable");
    d.model.cut().unwrap();
    assert_eq!(std::fs::read(d.disk.join("f")).unwrap(), b"durable");
    assert_eq!(d.model.read(f, 0, 1).unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(d.model.stats().pages_dropped, 1);
}

#[test]
fn writes_across_pages_and_holes_read_back_and_sync_exactly() {
    let mut d = disk();
    let f = d.model.create(ROOT_INO, name("f"), 0o644).unwrap().ino;
    let big: Vec<u8> = (0..3 * PAGE_BYTES + 10).map(|i| (i % 251) as u8).collect();
    d.model.write(f, 100, &big).unwrap();
    d.model.write(f, 20 * PAGE_BYTES, b"tail").unwrap();
    let mut want = vec![0u8; 100];
    want.extend_from_slice(&big);
    want.resize(20 * PAGE_BYTES as usize, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(d.model.read(f, 0, 1 << 20).unwrap(), want);
    d.model.sync_file(f).unwrap();
    assert_eq!(std::fs::read(d.disk.join("f")).unwrap(), want);
}

#[test]
fn a_truncate_is_volatile_and_reads_zeros_past_it() {
    let mut d = disk();
    let f = d.model.create(ROOT_INO, name("f"), 0o644).unwrap().ino;
    d.model.sync_dir(ROOT_INO).unwrap();
    d.model.write(f, 0, &[7u8; 10_000]).unwrap();
    d.model.sync_file(f).unwrap();
    d.model.set_size(f, 5).unwrap();
    d.model.set_size(f, 9_000).unwrap();
    let view = d.model.read(f, 0, 10_000).unwrap();
    assert_eq!(view.len(), 9_000);
    assert!(view[..5].iter().all(|&b| b == 7) && view[5..].iter().all(|&b| b == 0));
    d.model.cut().unwrap();
    assert_eq!(std::fs::read(d.disk.join("f")).unwrap(), vec![7u8; 10_000]);
}

#[test]
fn a_truncate_synced_is_durable() {
    let mut d = disk();
    let f = d.model.create(ROOT_INO, name("f"), 0o644).unwrap().ino;
    d.model.write(f, 0, &[7u8; 10_000]).unwrap();
    d.model.sync_file(f).unwrap();
    d.model.set_size(f, 5).unwrap();
    d.model.write(f, 8, b"x").unwrap();
    d.model.sync_file(f).unwrap();
    assert_eq!(std::fs::read(d.disk.join("f")).unwrap(), b"\x07\x07\x07\x07\x07\0\0\0x");
}

#[test]
fn a_created_file_vanishes_unless_its_directory_was_synced() {
    let mut d = disk();
    let a = d.model.create(ROOT_INO, name("a"), 0o644).unwrap().ino;
    d.model.write(a, 0, b"synced data, unsynced name").unwrap();
    d.model.sync_file(a).unwrap();
    assert_eq!(listing(&d), ["a"]);
    d.model.cut().unwrap();
    assert!(listing(&d).is_empty());
}

#[test]
fn a_directory_sync_commits_the_journal_up_to_its_last_change() {
    let mut d = disk();
    let sub = d.model.mkdir(ROOT_INO, name("sub"), 0o755).unwrap().ino;
    d.model.create(sub, name("inner"), 0o644).unwrap();
    d.model.create(ROOT_INO, name("late"), 0o644).unwrap();
    // Syncing `sub` commits mkdir(sub) and create(sub/inner), not the later `late`.
    d.model.sync_dir(sub).unwrap();
    d.model.cut().unwrap();
    assert_eq!(listing(&d), ["sub"]);
    assert!(d.disk.join("sub/inner").is_file());
}

#[test]
fn renames_and_removals_are_undone_newest_first() {
    let mut d = disk();
    for n in ["old", "victim"] {
        let f = d.model.create(ROOT_INO, name(n), 0o644).unwrap().ino;
        d.model.write(f, 0, n.as_bytes()).unwrap();
        d.model.sync_file(f).unwrap();
    }
    d.model.sync_dir(ROOT_INO).unwrap();
    d.model.rename(ROOT_INO, name("old"), ROOT_INO, name("victim")).unwrap();
    d.model.remove(ROOT_INO, name("victim"), false).unwrap();
    assert!(listing(&d).is_empty());
    d.model.cut().unwrap();
    assert_eq!(listing(&d), ["old", "victim"]);
    assert_eq!(std::fs::read(d.disk.join("old")).unwrap(), b"old");
    assert_eq!(std::fs::read(d.disk.join("victim")).unwrap(), b"victim");
}

#[test]
fn a_rename_made_durable_keeps_the_new_name_and_drops_the_replaced_file() {
    let mut d = disk();
    for n in ["new.tmp", "current"] {
        let f = d.model.create(ROOT_INO, name(n), 0o644).unwrap().ino;
        d.model.write(f, 0, n.as_bytes()).unwrap();
        d.model.sync_file(f).unwrap();
    }
    d.model.rename(ROOT_INO, name("new.tmp"), ROOT_INO, name("current")).unwrap();
    d.model.sync_dir(ROOT_INO).unwrap();
    d.model.cut().unwrap();
    assert_eq!(listing(&d), ["current"]);
    assert_eq!(std::fs::read(d.disk.join("current")).unwrap(), b"new.tmp");
}

#[test]
fn strictly_a_new_directory_needs_an_fsync_of_its_parent() {
    let mut d = disk();
    d.model = Model::new(&d.disk, &d._tmp.path().join("trash")).unwrap().with_dir_sync(DirSync::OwnEntries);
    let sub = d.model.mkdir(ROOT_INO, name("sub"), 0o755).unwrap().ino;
    d.model.create(sub, name("inner"), 0o644).unwrap();
    d.model.sync_dir(sub).unwrap();
    d.model.cut().unwrap();
    assert!(listing(&d).is_empty(), "sub's own entry was never synced");
}

#[test]
fn a_torn_cut_writes_some_unsynced_pages_and_never_an_unwritten_byte() {
    let mut kept_some = false;
    let mut dropped_some = false;
    for seed in 0..16 {
        let mut d = disk();
        let f = d.model.create(ROOT_INO, name("f"), 0o644).unwrap().ino;
        d.model.sync_dir(ROOT_INO).unwrap();
        d.model.write(f, 0, &[1u8; 4 * PAGE_BYTES as usize]).unwrap();
        d.model.sync_file(f).unwrap();
        d.model.write(f, 0, &[2u8; 8 * PAGE_BYTES as usize]).unwrap();
        d.model.cut_with(Cut::Torn { seed }).unwrap();
        let bytes = std::fs::read(d.disk.join("f")).unwrap();
        // Each page is the synced one, the unsynced one, or (past the synced end) a hole.
        for page in bytes.chunks(PAGE_BYTES as usize) {
            assert!(page.iter().all(|&b| b == page[0]) && page[0] <= 2, "seed {seed}");
            kept_some |= page[0] == 2;
            dropped_some |= page[0] != 2;
        }
        assert_eq!(d.model.stats().pages_written_at_cut + d.model.stats().pages_dropped, 8, "seed {seed}");
    }
    assert!(kept_some && dropped_some);
}
