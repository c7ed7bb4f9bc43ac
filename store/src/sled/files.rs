//! sled's files before sled touches them: the evidence copy of an unclean store, the
//! scratch copy a read-only open runs on, and the fallback past a damaged sled snapshot.
//!
//! sled 0.34 has no read-only mode and, on open, recovers the longest valid prefix of its
//! log, zeroing what follows a damaged point. So whatever must survive that recovery is
//! copied first. And what sled writes while it opens is written back meanwhile
//! ([`EarlyWriteback`]).

use super::manifest::{self, Fingerprint, ManifestError, Parsed, MANIFEST_FILE};
use super::MARKER_FILE;
use crate::error::StoreError;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Reads the store's manifest, mapping its errors.
pub(crate) fn read_manifest(dir: &Path) -> Result<Option<Parsed>, StoreError> {
    manifest::read(dir).map_err(manifest_err(dir))
}

/// A manifest error as the store's.
pub(crate) fn manifest_err(dir: &Path) -> impl Fn(ManifestError) -> StoreError + '_ {
    move |e| match e {
        ManifestError::Read { path, source } => StoreError::File { action: "read", path, source },
        damaged @ ManifestError::Damaged { .. } => {
            StoreError::CorruptStore { path: dir.to_path_buf(), reason: damaged.to_string() }
        }
    }
}

/// The files of a store directory that sled's recovery may change, plus keel's own.
fn store_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    for name in ["db", "conf", MARKER_FILE, MANIFEST_FILE] {
        if dir.join(name).is_file() {
            out.push(PathBuf::from(name));
        }
    }
    let entries =
        std::fs::read_dir(dir).map_err(|source| StoreError::File { action: "read", path: dir.into(), source })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with("snap.") && !text.ends_with(".generating") {
            out.push(PathBuf::from(&name));
        }
    }
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        out.extend(entries.flatten().map(|e| Path::new("blobs").join(e.file_name())));
    }
    Ok(out)
}

/// Copies the store's files from `from` into the (existing) directory `to`.
fn copy_store_files(from: &Path, to: &Path) -> Result<(), StoreError> {
    for rel in store_files(from)? {
        let (src, dst) = (from.join(&rel), to.join(&rel));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::File {
                action: "write",
                path: parent.into(),
                source,
            })?;
        }
        let mut r =
            File::open(&src).map_err(|source| StoreError::File { action: "read", path: src.clone(), source })?;
        let mut w =
            File::create(&dst).map_err(|source| StoreError::File { action: "write", path: dst.clone(), source })?;
        // `io::copy` between files uses copy_file_range: a reflink where the file system can.
        std::io::copy(&mut r, &mut w).map_err(|source| StoreError::File {
            action: "copy to",
            path: dst.clone(),
            source,
        })?;
    }
    Ok(())
}

/// A new `damaged-<unix seconds>.<nanoseconds>` directory in `dir`.
fn evidence_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let to = dir.join(format!("damaged-{}.{:09}", now.as_secs(), now.subsec_nanos()));
    std::fs::create_dir(&to).map_err(|source| StoreError::File { action: "create", path: to.clone(), source })?;
    Ok(to)
}

/// Before a writable open: unless the manifest's last line is a clean close whose
/// fingerprint sled's data file still has, copies sled's files to a `damaged-*`
/// directory and returns it (the open removes it once the manifest check passed).
pub(crate) fn preserve_if_unclean(dir: &Path, prior: Option<&Parsed>) -> Result<Option<PathBuf>, StoreError> {
    let Some(prior) = prior else { return Ok(None) };
    let db = dir.join("db");
    if !db.is_file() || (prior.clean.is_some() && prior.clean == Fingerprint::of(&db).ok()) {
        return Ok(None);
    }
    let to = evidence_dir(dir)?;
    copy_store_files(dir, &to)?;
    File::open(&to).and_then(|d| d.sync_all()).map_err(|source| StoreError::File {
        action: "sync",
        path: to.clone(),
        source,
    })?;
    Ok(Some(to))
}

/// Removes an evidence copy that turned out not to be needed.
pub(crate) fn remove_evidence(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "could not remove the unneeded evidence copy");
    }
}

/// A scratch copy of the store's files in the temporary directory, taken under a shared
/// lock on sled's data file (`flock`, as sled's own exclusive lock; a writer holding the
/// store makes it [`StoreError::Locked`]), and whether the store was closed cleanly with
/// its data file untouched since (the manifest's last line names the data file as it is),
/// read under the same lock: no writer can open the store while it is held.
pub(crate) fn scratch_copy(dir: &Path) -> Result<(Scratch, bool), StoreError> {
    let db = dir.join("db");
    let file = File::open(&db).map_err(|source| StoreError::File { action: "read", path: db.clone(), source })?;
    while file.try_lock_shared().is_err() {
        if super::closed_here_within(dir).is_none() {
            return Err(StoreError::Locked { path: dir.to_path_buf() });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let tail = manifest::read_clean_tail(dir).map_err(manifest_err(dir))?;
    let clean = tail.is_some() && tail == Fingerprint::of(&db).ok();
    let tmp = Scratch::new()?;
    copy_store_files(dir, tmp.path())?;
    drop(file);
    Ok((tmp, clean))
}

/// Prefix of a scratch directory's name in the temporary directory.
const SCRATCH_PREFIX: &str = "keel-read-";
/// The file in a scratch directory its process holds an exclusive `flock` on while it
/// lives.
const SCRATCH_LOCK: &str = "keel-read.lock";

/// A read-only store's scratch directory (`TMPDIR/keel-read-*`), removed when dropped. Its
/// process holds a lock on a file in it for as long as it lives, so that one killed before
/// it could remove it (Ctrl-C, SIGTERM, SIGKILL: each left a copy of the database behind)
/// is removed by the next scratch copy made in the same temporary directory.
pub(crate) struct Scratch {
    dir: tempfile::TempDir,
    _lock: File,
}

impl Scratch {
    fn new() -> Result<Scratch, StoreError> {
        let parent = std::env::temp_dir();
        remove_abandoned_scratch(&parent);
        let made = |source| StoreError::File { action: "create a scratch directory in", path: parent.clone(), source };
        let dir = tempfile::Builder::new().prefix(SCRATCH_PREFIX).tempdir_in(&parent).map_err(made)?;
        // Locked under another name, then renamed: no other process can find the lock
        // file before it is held.
        let tmp = dir.path().join(format!("{SCRATCH_LOCK}.new"));
        let lock = File::create(&tmp).map_err(made)?;
        lock.lock().map_err(made)?;
        std::fs::rename(&tmp, dir.path().join(SCRATCH_LOCK)).map_err(made)?;
        Ok(Scratch { dir, _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the scratch directories in `parent` whose process is gone (their lock file's
/// lock can be taken). Best effort: a directory without the lock file (an older keel's, or
/// one being made) is left alone, and any error skips the directory.
fn remove_abandoned_scratch(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(lock) = File::open(dir.join(SCRATCH_LOCK)) else { continue };
        if lock.try_lock().is_ok() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::debug!(path = %dir.display(), error = %e, "could not remove an abandoned scratch copy");
            } else {
                tracing::info!(path = %dir.display(), "removed the scratch copy of a read that was killed");
            }
        }
    }
}

/// Whether a process has the store in `dir` open: sled's exclusive `flock` on `<dir>/db`,
/// found with a shared `flock` tried and released at once (which excludes no reader, and
/// no writer for longer than the try). `false` without a data file. Read-only opens hold
/// a shared lock while they copy the files; they are not writers.
pub(crate) fn held_by_a_writer(dir: &Path) -> Result<bool, StoreError> {
    use std::fs::TryLockError;
    let db = dir.join("db");
    let file = match File::open(&db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        other => other.map_err(|source| StoreError::File { action: "read", path: db.clone(), source })?,
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(source)) => Err(StoreError::File { action: "lock", path: db, source }),
    }
}

/// How long a writable open waits for read-only opens still copying the store's files.
pub(crate) const READERS_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Before a writable open touches anything (the evidence copy included): a process that
/// has the store open is [`StoreError::Locked`] at once (this process's own store just
/// dropped is waited for, as by `open_sled_after_close`). Read-only opens still copying
/// the files are waited for by sled's open itself (`open_sled_after_close`).
pub(crate) fn refuse_if_held(dir: &Path) -> Result<(), StoreError> {
    while held_by_a_writer(dir)? {
        if super::closed_here_within(dir).is_none() {
            return Err(StoreError::Locked { path: dir.to_path_buf() });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Errors of an open on a scratch copy name the store's own directory instead.
pub(crate) fn rename_scratch_errors(e: StoreError, scratch: &Path, store: &Path) -> StoreError {
    let fix = |p: PathBuf| if p == scratch { store.to_path_buf() } else { p };
    match e {
        StoreError::NotAStore { path, reason } => StoreError::NotAStore { path: fix(path), reason },
        StoreError::CorruptStore { path, reason } => StoreError::CorruptStore { path: fix(path), reason },
        StoreError::NotFound { path } => StoreError::NotFound { path: fix(path) },
        StoreError::Locked { path } => StoreError::Locked { path: fix(path) },
        other => other,
    }
}

/// What to do with sled snapshot files (`snap.*`) sled refuses as corrupt.
#[derive(Clone, Copy)]
pub(crate) enum SnapFallback<'a> {
    /// Move them to a `damaged-*` directory in this store directory.
    MoveTo(&'a Path),
    /// Delete them (a scratch copy).
    Drop,
}

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("snap.")))
        .collect()
}

/// Runs `open`; if sled refuses its files as corrupt while a sled snapshot exists, sets
/// the snapshot aside (sled then rebuilds its page table from the whole log) and retries
/// once, with a warning.
pub(crate) fn with_snapshot_fallback(
    dir: &Path,
    snap: SnapFallback<'_>,
    open: impl Fn() -> Result<sled::Db, StoreError>,
) -> Result<sled::Db, StoreError> {
    let err = match open() {
        Err(e @ (StoreError::NotAStore { .. } | StoreError::Panicked(_) | StoreError::Sled(_))) => e,
        other => return other,
    };
    let snaps = snapshot_files(dir);
    if snaps.is_empty() {
        return Err(err);
    }
    tracing::warn!(path = %dir.display(), error = %err, "sled refused its files; retrying without its snapshot (full log scan)");
    let to = match snap {
        SnapFallback::MoveTo(store) => Some(evidence_dir(store)?),
        SnapFallback::Drop => None,
    };
    for s in snaps {
        let moved = match (&to, s.file_name()) {
            (Some(to), Some(name)) => std::fs::rename(&s, to.join(name)),
            _ => std::fs::remove_file(&s),
        };
        moved.map_err(|source| StoreError::File { action: "set aside", path: s.clone(), source })?;
    }
    open()
}

/// Writes sled's data file back to disk while sled opens it.
///
/// sled 0.34's open rewrites every segment its snapshot lists as free with zeros (16 MiB
/// each, five of them in the bench's database of 100k runs) and writes a new snapshot.
/// Left in the page cache, those writes were paid by the first durable commit after the
/// open: its `fdatasync` wrote them all (~100 ms for the first new run of a restart). This
/// thread `fdatasync`s the data file again and again while sled opens (on the other
/// core, mostly waiting for the disk), so the first commit finds little left to write.
/// Writing back early changes no durability promise: each commit still syncs.
pub(crate) struct EarlyWriteback {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EarlyWriteback {
    /// Pause between two syncs of the data file.
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
    /// The thread gives up after this long even if never stopped.
    const MAX: std::time::Duration = std::time::Duration::from_secs(30);

    /// Starts the writer for the data file in `dir`, if the store has one already (a new
    /// store has nothing to write back). Stops when dropped; a sync in progress then
    /// finishes on its own thread.
    pub(crate) fn start(dir: &Path) -> Option<EarlyWriteback> {
        let file = File::open(dir.join("db")).ok()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new().name("keel-writeback".into()).spawn(move || {
            let start = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < Self::MAX {
                if file.sync_data().is_err() {
                    return;
                }
                std::thread::sleep(Self::PAUSE);
            }
        });
        spawned.ok().map(|_| EarlyWriteback { stop })
    }
}

impl Drop for EarlyWriteback {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
