//! The sled backend.

pub(crate) mod commit;
pub(crate) mod files;
pub(crate) mod manifest;
pub(crate) mod read_ahead;

use crate::coordination::{Coordination, Fence};
use crate::envelope::record;
use crate::error::{sled_err, StoreError};
use crate::kv::sealed::Sealing;
use crate::kv::{Core, Kv, KvIter, KvPair, Written};
use crate::log::{Claim, Durability, EventLog, Head, Level, NewRecord, RecordIter, RunRecords, StoreConfig};
use crate::types::{RunId, Seq};
use commit::GroupCommit;
use std::fs::File;
use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

/// sled's segment (I/O buffer) size for keel stores: sled's maximum, 16 MiB. sled writes
/// any page image larger than `segment_size / 4` to a separate blob file with no fsync;
/// a leaf holds up to ~17 values, so with 16 MiB segments values up to
/// [`crate::Limits::VALUE_BYTES_HARD_MAX`] (128 KiB) never reach a blob file (with sled's
/// default 512 KiB segments, 8 KB values already do). Persisted by sled in `conf`; fixed.
pub const SEGMENT_BYTES: usize = 16 * 1024 * 1024;

pub(crate) struct SledKv {
    db: sled::Db,
}

impl Kv for SledKv {
    type Buf = sled::IVec;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn range(&self, lo: &[u8], hi: &[u8]) -> Result<KvIter<sled::IVec>, StoreError> {
        let it = self.db.range(lo.to_vec()..=hi.to_vec()).map(|r| r.map_err(sled_err));
        Ok(Box::new(it))
    }

    fn last_in(&self, lo: &[u8], hi: &[u8]) -> Result<Option<KvPair>, StoreError> {
        match self.db.range(lo.to_vec()..=hi.to_vec()).next_back() {
            None => Ok(None),
            Some(r) => {
                let (k, v) = r.map_err(sled_err)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
        }
    }

    fn first_key_after(&self, after: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Excluded(after), Bound::Unbounded);
        match self.db.range::<&[u8], _>(bounds).next() {
            None => Ok(None),
            Some(r) => Ok(Some(r.map_err(sled_err)?.0.to_vec())),
        }
    }

    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.db.apply_batch(batch).map_err(sled_err)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.db.insert(key, value).map(|_| ()).map_err(sled_err)
    }

    fn getter(&self) -> Option<crate::kv::sealed::Getter> {
        Some(getter(self.db.clone()))
    }
}

/// A reader of single keys of `db` that outlives the call (the sealed scans' re-read).
pub(crate) fn getter(db: sled::Db) -> crate::kv::sealed::Getter {
    Box::new(move |key: &[u8]| Ok(db.get(key).map_err(sled_err)?.map(|v| v.to_vec())))
}

/// Flushes sled and, for [`Level::PowerLoss`], fdatasyncs its data file.
pub(crate) struct Syncer {
    pub(crate) db: sled::Db,
    /// `<dir>/db`, sled's single data file, opened once at startup for `fdatasync`.
    pub(crate) data_file: File,
}

impl Syncer {
    pub(crate) fn sync(&self, level: Level) -> Result<(), StoreError> {
        // 1. sled: write its I/O buffers (pwrite) + sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)
        self.db.flush().map_err(sled_err)?;
        // 2. fdatasync: device cache flush + the metadata needed to read the data back.
        if level == Level::PowerLoss {
            self.data_file.sync_data()?;
        }
        Ok(())
    }
}

/// A stored `(key, value)` (test hooks).
#[cfg(any(feature = "testing", feature = "bench"))]
pub type RawPair = (Vec<u8>, Vec<u8>);

/// The embedded event log: one sled database per directory.
pub struct SledStore {
    core: Core<Sealing<SledKv>>,
    syncer: Syncer,
    path: PathBuf,
    durability: Durability,
    group: GroupCommit,
    /// Latency and appends of the flushes that made appends durable.
    commits: crate::stats::CommitMeter,
    poisoned: AtomicBool,
    /// The manifest of committed history (None for a read-only store).
    manifest: Option<manifest::Manifest>,
    /// Committed records the manifest names that sled no longer holds (read-only opens
    /// report them here; a writable open refuses instead).
    lost: Vec<crate::LostRecords>,
    /// After a clean close, the committed heads not yet compared with sled's: each run is
    /// checked the first time it is read or written (see [`Unchecked`]).
    unchecked: Option<Unchecked>,
    /// A read-only store's scratch copy of sled's files (dropped last: removed after sled).
    scratch: Option<files::Scratch>,
}

/// Opens sled behind `catch_unwind`, mapping its lock and format failures.
pub(crate) fn open_sled(path: &Path, cache_capacity_bytes: u64) -> Result<sled::Db, StoreError> {
    let cfg = sled::Config::new().path(path).cache_capacity(cache_capacity_bytes).segment_size(SEGMENT_BYTES);
    let opened = catch_unwind(AssertUnwindSafe(|| cfg.open()))
        .map_err(|panic| StoreError::Panicked(crate::error::panic_message(&*panic)))?;
    opened.map_err(|e| match e {
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock") =>
        {
            StoreError::Locked { path: path.to_path_buf() }
        }
        sled::Error::Unsupported(reason) => StoreError::NotAStore { path: path.to_path_buf(), reason },
        sled::Error::Corruption { .. } => {
            StoreError::NotAStore { path: path.to_path_buf(), reason: format!("sled reports corruption: {e}") }
        }
        sled::Error::Io(source) => {
            StoreError::File { action: "open sled's files in", path: path.to_path_buf(), source }
        }
        other => sled_err(other),
    })
}

/// Directories whose `SledStore` this process dropped, and when.
///
/// sled releases its directory lock from background threads a moment after the last
/// handle is dropped, so reopening right away in the same process can see our own lock.
/// Only in that case is `Locked` retried, briefly; a db held by another process (or by a
/// live handle here) is reported at once.
static RECENTLY_CLOSED: std::sync::Mutex<Vec<(PathBuf, std::time::Instant)>> = std::sync::Mutex::new(Vec::new());

/// How long after a drop in this process a `Locked` open is retried.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

fn note_closed(path: &Path) {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut closed = RECENTLY_CLOSED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = std::time::Instant::now();
    closed.retain(|(p, t)| *p != key && now.duration_since(*t) < CLOSE_GRACE);
    closed.push((key, now));
}

fn closed_here_within(path: &Path) -> Option<std::time::Instant> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let closed = RECENTLY_CLOSED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    closed.iter().find(|(p, t)| *p == key && t.elapsed() < CLOSE_GRACE).map(|(_, t)| *t)
}

fn open_sled_after_close(path: &Path, cache_capacity_bytes: u64) -> Result<sled::Db, StoreError> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match open_sled(path, cache_capacity_bytes) {
            Err(StoreError::Locked { .. }) if closed_here_within(path).is_some() => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // No process has the store open: read-only opens copying its files hold it
            // (shared), or did a moment ago. Waited for, up to `READERS_WAIT` in all.
            Err(StoreError::Locked { .. })
                if start.elapsed() < files::READERS_WAIT && files::held_by_a_writer(path).is_ok_and(|w| !w) =>
            {
                if !said && start.elapsed() > std::time::Duration::from_secs(1) {
                    tracing::info!(path = %path.display(), "waiting for read-only opens copying the store's files");
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// File written beside sled's files once the store's format record is durable.
pub const MARKER_FILE: &str = "keel-store";

fn write_marker_file(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    let mut f = File::create(dir.join(MARKER_FILE))?;
    f.write_all(record::FORMAT_MARKER)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    File::open(dir)?.sync_all()?;
    // The creation is complete; a creating file that outlives a crash here is ignored.
    match std::fs::remove_file(dir.join(CREATING_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// File written (and the directory synced) before sled creates anything in a new store's
/// directory, removed once [`MARKER_FILE`] is durable: sled's files with it and without
/// the marker are a creation that was interrupted (nothing was committed yet; the next
/// creating open finishes it), not somebody else's sled database.
pub const CREATING_FILE: &str = "keel-store.creating";

fn write_creating_file(dir: &Path) -> Result<(), StoreError> {
    File::create(dir.join(CREATING_FILE))?.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Creates `path` and any missing parents, and syncs the parent of each directory it
/// created: a new directory entry is durable only once its parent is synced (strict POSIX;
/// ext4 and XFS journal it anyway). Without this a power cut could take the whole new
/// store away, and the next creating open would start an empty one (docs/TESTING.md,
/// finding 10).
fn create_dirs_durably(path: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut at = Some(path);
    while let Some(dir) = at {
        if dir.as_os_str().is_empty() || dir.exists() {
            break;
        }
        missing.push(dir);
        at = dir.parent();
    }
    std::fs::create_dir_all(path)?;
    for dir in missing.iter().rev() {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Checks the directory before sled touches it (sled creates `blobs/` and `conf` in any
/// directory it is pointed at).
fn check_dir(path: &Path, create: bool) -> Result<(), StoreError> {
    let not_found = || StoreError::NotFound { path: path.to_path_buf() };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Err(not_found());
            }
            create_dirs_durably(path)?;
            write_creating_file(path)
        }
        Err(e) => Err(e.into()),
        Ok(m) if !m.is_dir() => {
            Err(StoreError::NotAStore { path: path.to_path_buf(), reason: "not a directory".into() })
        }
        Ok(_) => {
            let empty = std::fs::read_dir(path)?.next().is_none();
            if empty {
                return if create { write_creating_file(path) } else { Err(not_found()) };
            }
            if path.join(CREATING_FILE).is_file() && !path.join(MARKER_FILE).is_file() {
                return if create { Ok(()) } else { Err(not_found()) };
            }
            if path.join("db").is_file() && path.join("conf").is_file() {
                // sled rewrites `conf` and `db` as soon as it opens them: without the keel
                // marker a read-only open must not let it touch files that may not be ours.
                if !create && !path.join(MARKER_FILE).is_file() {
                    return Err(StoreError::NotAStore {
                        path: path.to_path_buf(),
                        reason: format!("sled files but no `{MARKER_FILE}` marker: not a keel store (left untouched)"),
                    });
                }
                Ok(())
            } else {
                Err(StoreError::NotAStore {
                    path: path.to_path_buf(),
                    reason: "directory is not empty and holds no sled database (no `db` and \
                             `conf` files)"
                        .into(),
                })
            }
        }
    }
}

/// What an open prepares before sled touches anything: the manifest as found, and the
/// evidence copy (writable open) or scratch copy (read-only open) of sled's files.
struct Prepared {
    /// The store directory.
    store: PathBuf,
    prior: Prior,
    evidence: Option<PathBuf>,
    scratch: Option<files::Scratch>,
    /// A read-only open whose scratch copy is of a store closed cleanly: its runs are
    /// checked at their first use, not at open.
    lazy_read: bool,
}

/// How a store is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenMode {
    /// In place, for writing.
    Write,
    /// From a scratch copy, every run checked at open ([`SledStore::open_read_only`]).
    ReadChecked,
    /// From a scratch copy, each run checked at its first use when the store was closed
    /// cleanly ([`SledStore::open_read_only_lazy`]).
    ReadLazy,
}

/// The manifest as found: parsed, or being parsed while sled opens.
enum Prior {
    Ready(Option<manifest::Parsed>),
    Parsing(std::thread::JoinHandle<Result<Option<manifest::Parsed>, StoreError>>),
}

impl Prior {
    fn get(self) -> Result<Option<manifest::Parsed>, StoreError> {
        match self {
            Prior::Ready(p) => Ok(p),
            Prior::Parsing(h) => h.join().unwrap_or_else(|_| {
                Err(StoreError::Io(std::io::Error::other("the manifest's parsing thread panicked")))
            }),
        }
    }
}

impl Prepared {
    fn new(store: &Path, config: &StoreConfig, mode: OpenMode) -> Result<Prepared, StoreError> {
        check_dir(store, config.create)?;
        if mode != OpenMode::Write {
            return Self::read_copy(store, mode == OpenMode::ReadLazy);
        }
        // Nothing is copied or written while another process has the store open (its
        // evidence copy would be taken of files in use, and left behind by the `Locked`
        // that follows).
        files::refuse_if_held(store)?;
        // Closed cleanly with sled's data file untouched since (the manifest's last line
        // says so): no evidence copy is needed, and the manifest (a line per run: ~21 ms
        // to parse with 100k runs) is parsed on another thread while sled opens.
        let tail = manifest::read_clean_tail(store).map_err(files::manifest_err(store))?;
        if tail.is_some() && tail == manifest::Fingerprint::of(&store.join("db")).ok() {
            let dir = store.to_path_buf();
            let parsing =
                std::thread::Builder::new().name("keel-manifest".into()).spawn(move || files::read_manifest(&dir));
            if let Ok(h) = parsing {
                return Ok(Prepared {
                    store: store.to_path_buf(),
                    prior: Prior::Parsing(h),
                    evidence: None,
                    scratch: None,
                    lazy_read: false,
                });
            }
        }
        let prior = files::read_manifest(store)?;
        let evidence = files::preserve_if_unclean(store, prior.as_ref())?;
        Ok(Prepared {
            store: store.to_path_buf(),
            prior: Prior::Ready(prior),
            evidence,
            scratch: None,
            lazy_read: false,
        })
    }

    /// A read-only open: the scratch copy first, then its own manifest (parsed while sled
    /// opens the copy when the runs are to be checked at their first use: `lazy` and the
    /// store closed cleanly), so the heads checked are those of the files copied.
    fn read_copy(store: &Path, lazy: bool) -> Result<Prepared, StoreError> {
        let (scratch, clean) = files::scratch_copy(store)?;
        let lazy = lazy && clean;
        let dir = scratch.path().to_path_buf();
        let parsing = if lazy {
            let at = dir.clone();
            std::thread::Builder::new().name("keel-manifest".into()).spawn(move || files::read_manifest(&at)).ok()
        } else {
            None
        };
        let prior = match parsing {
            Some(h) => Prior::Parsing(h),
            None => Prior::Ready(files::read_manifest(&dir).map_err(|e| files::rename_scratch_errors(e, &dir, store))?),
        };
        Ok(Prepared { store: store.to_path_buf(), prior, evidence: None, scratch: Some(scratch), lazy_read: lazy })
    }

    /// Where sled runs: the scratch copy, or the store itself.
    fn sled_dir(&self) -> &Path {
        self.scratch.as_ref().map_or(&self.store, |s| s.path())
    }

    /// Checks sled's heads against the manifest; a writable store then gets a fresh one.
    fn finish(self, db: sled::Db, syncer: Syncer, config: StoreConfig) -> Result<SledStore, StoreError> {
        let core = Core::new(Sealing { inner: SledKv { db } }, config.limits);
        let store = self.store;
        // Closed cleanly and sled's data file unchanged since (no evidence copy was
        // needed): the manifest holds every run's exact head, so nothing is read from sled
        // here; each run is compared when first used. A check of every run at open cost
        // O(runs) sled reads (3.6 s with 100k runs), the whole history on every restart.
        // A read-only open of a store closed cleanly is the same: its scratch copy was
        // taken under a lock no writer could hold, with the manifest's clean-close line
        // naming the data file copied.
        let clean = (self.scratch.is_none() && self.evidence.is_none()) || self.lazy_read;
        let scratch_dir = self.scratch.as_ref().map(|s| s.path().to_path_buf());
        let prior = match (self.prior.get(), &scratch_dir) {
            (Err(e), Some(dir)) => return Err(files::rename_scratch_errors(e, dir, &store)),
            (prior, _) => prior?,
        };
        let lazy = clean && prior.as_ref().is_some_and(|p| p.clean.is_some());
        let prior = match prior {
            Some(prior) if lazy => prior,
            other => {
                return Self::finish_checked(other, store, self.evidence, self.scratch, core, syncer, config.durability)
            }
        };
        // A read-only store writes no manifest. A torn tail is rewritten away: the next
        // line appended would be glued to it.
        let manifest = if self.scratch.is_some() {
            None
        } else if prior.torn || prior.lines > prior.heads.len().saturating_mul(2).saturating_add(COMPACT_SLACK_LINES) {
            Some(manifest::Manifest::rewrite(&store, &prior.heads)?)
        } else {
            Some(manifest::Manifest::reopen(&store)?)
        };
        Ok(SledStore {
            core,
            syncer,
            path: store,
            durability: config.durability,
            group: GroupCommit::new(),
            commits: crate::stats::CommitMeter::default(),
            poisoned: AtomicBool::new(false),
            manifest,
            lost: Vec::new(),
            unchecked: Some(Unchecked::new(prior.heads)),
            scratch: self.scratch,
        })
    }

    /// Opens after checking every committed run against sled (an unclean close, or a
    /// read-only open).
    fn finish_checked(
        prior: Option<manifest::Parsed>,
        store: PathBuf,
        evidence: Option<PathBuf>,
        scratch: Option<files::Scratch>,
        core: Core<Sealing<SledKv>>,
        syncer: Syncer,
        durability: Durability,
    ) -> Result<SledStore, StoreError> {
        let lost = prior.map(|p| find_lost(&core, &p.heads)).unwrap_or_default();
        let manifest = match &scratch {
            Some(_) => None,
            None if !lost.is_empty() => return Err(StoreError::LostCommitted { path: store, lost, evidence }),
            None => {
                if let Some(e) = &evidence {
                    files::remove_evidence(e);
                }
                Some(manifest::Manifest::rewrite(&store, &current_heads(&core)?)?)
            }
        };
        Ok(SledStore {
            core,
            syncer,
            path: store,
            durability,
            group: GroupCommit::new(),
            commits: crate::stats::CommitMeter::default(),
            poisoned: AtomicBool::new(false),
            manifest,
            lost,
            unchecked: None,
            scratch,
        })
    }
}

/// Lines a manifest may hold beyond two per run before a clean open compacts it.
const COMPACT_SLACK_LINES: usize = 10_000;

/// Committed heads not yet compared with sled's (a writable open after a clean close), and
/// the runs found to have lost committed records.
struct Unchecked {
    inner: RwLock<UncheckedInner>,
}

#[derive(Default)]
struct UncheckedInner {
    heads: std::collections::BTreeMap<RunId, manifest::CommittedHead>,
    lost: std::collections::BTreeMap<RunId, crate::LostRecords>,
}

impl Unchecked {
    fn new(heads: std::collections::BTreeMap<RunId, manifest::CommittedHead>) -> Unchecked {
        Unchecked { inner: RwLock::new(UncheckedInner { heads, lost: Default::default() }) }
    }
}

/// The committed heads sled does not back (see [`manifest::find_lost`]).
fn find_lost(
    core: &Core<Sealing<SledKv>>,
    committed: &std::collections::BTreeMap<RunId, manifest::CommittedHead>,
) -> Vec<crate::LostRecords> {
    manifest::find_lost(committed, |run| core.head(run), |run, seq| core.stored_hash(run, seq))
}

/// Every run's head as sled holds it now (runs whose head does not read are left out:
/// `verify` reports them).
fn current_heads(
    core: &Core<Sealing<SledKv>>,
) -> Result<std::collections::BTreeMap<RunId, manifest::CommittedHead>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    for run in core.runs()? {
        if let Ok(h) = core.head(run) {
            if h.next_seq.0 > 0 {
                out.insert(run, manifest::CommittedHead { next_seq: h.next_seq, last_hash: h.last_hash });
            }
        }
    }
    Ok(out)
}

impl SledStore {
    /// Opens (or with `config.create`, creates) the store in directory `path`.
    ///
    /// sled's files are copied to `<path>/damaged-<time>/` first when the store was not
    /// closed cleanly (or its data file changed since), and that copy is removed once the
    /// manifest check passed; a store that lost committed records is refused with
    /// [`StoreError::LostCommitted`] naming them and the copy.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<SledStore, StoreError> {
        Self::open_as(path.as_ref(), config, OpenMode::Write)
    }

    /// Opens the store in `path` without writing to it: sled (which has no read-only mode)
    /// runs on a scratch copy of its files in the temporary directory (`TMPDIR`), taken
    /// under a shared lock on the data file, so another process holding the store is
    /// [`StoreError::Locked`]. Writes through this handle go to the copy and are lost.
    /// Committed records the manifest names that are gone are listed by [`Self::lost`].
    pub fn open_read_only(path: impl AsRef<Path>, config: StoreConfig) -> Result<SledStore, StoreError> {
        let config = StoreConfig { create: false, durability: Durability::None, ..config };
        Self::open_as(path.as_ref(), config, OpenMode::ReadChecked)
    }

    /// Opens an existing store to read it, as [`SledStore::open_read_only`] (from a scratch
    /// copy: nothing in `path` is written), except that a store closed cleanly by keel, its
    /// data file untouched since, is not checked run by run at open: each run is compared
    /// with the manifest when first used, as by a writable open after a clean close (a use
    /// of a run whose committed records are gone is refused with
    /// [`StoreError::LostCommitted`]; [`SledStore::lost_found`] names them). Checking every
    /// run reads every run's head from sled: seconds with 100k runs, for a listing that
    /// reads none. A store not closed cleanly is checked whole at open, as by
    /// `open_read_only`, and [`SledStore::lost`] names what it lost.
    pub fn open_read_only_lazy(path: impl AsRef<Path>, config: StoreConfig) -> Result<SledStore, StoreError> {
        let config = StoreConfig { create: false, durability: Durability::None, ..config };
        Self::open_as(path.as_ref(), config, OpenMode::ReadLazy)
    }

    fn open_as(store: &Path, config: StoreConfig, mode: OpenMode) -> Result<SledStore, StoreError> {
        config.limits.validate()?;
        if config.cache_capacity_bytes < 1024 * 1024 {
            return Err(StoreError::InvalidConfig {
                reason: format!("cache_capacity_bytes {} below 1 MiB", config.cache_capacity_bytes),
            });
        }
        let prepared = Prepared::new(store, &config, mode)?;
        match Self::open_sled_dir(&prepared, &config) {
            Ok((db, syncer)) => prepared.finish(db, syncer, config),
            Err(e) => {
                // Another process took the store after the check: sled touched nothing, so
                // the evidence copy just made is not evidence of anything.
                if let (StoreError::Locked { .. }, Some(evidence)) = (&e, &prepared.evidence) {
                    files::remove_evidence(evidence);
                }
                Err(files::rename_scratch_errors(e, prepared.sled_dir(), store))
            }
        }
    }

    /// Opens sled where `prepared` says (past a damaged sled snapshot) and checks the
    /// keel format record and marker file.
    fn open_sled_dir(prepared: &Prepared, config: &StoreConfig) -> Result<(sled::Db, Syncer), StoreError> {
        let path = prepared.sled_dir().to_path_buf();
        let snap =
            if prepared.scratch.is_some() { files::SnapFallback::Drop } else { files::SnapFallback::MoveTo(&path) };
        // A store opened in place for writing: what sled writes while it opens goes to disk
        // meanwhile (a read-only open's scratch copy is never synced).
        let writeback = if prepared.scratch.is_none() { files::EarlyWriteback::start(&path) } else { None };
        let db =
            files::with_snapshot_fallback(&path, snap, || open_sled_after_close(&path, config.cache_capacity_bytes))?;
        drop(writeback);
        let data_file = File::open(path.join("db")).map_err(|source| StoreError::File {
            action: "open",
            path: path.join("db"),
            source,
        })?;
        let syncer = Syncer { db: db.clone(), data_file };

        // Two markers: the format record inside sled, and a file beside sled's files written
        // only once that record is durable. sled recovers the longest valid prefix of its
        // log, so a damaged data file can open as an EMPTY database: the file tells that
        // apart from a store whose creation was interrupted.
        let marker_file = path.join(MARKER_FILE);
        let established = marker_file.exists();
        match db.get(record::META_FORMAT_KEY).map_err(sled_err)? {
            Some(marker) if marker.as_ref() == record::FORMAT_MARKER => {
                if !established {
                    write_marker_file(&path)?;
                }
            }
            Some(marker) if marker.as_ref() == record::FORMAT_MARKER_V1 => {
                // Raised before anything is sealed (here, or in a read-only open's scratch
                // copy, which is thrown away).
                db.insert(record::META_FORMAT_KEY, record::FORMAT_MARKER).map_err(sled_err)?;
                if prepared.scratch.is_none() {
                    syncer.sync(Level::PowerLoss)?;
                }
                if !established {
                    write_marker_file(&path)?;
                }
            }
            Some(other) => {
                return Err(StoreError::NotAStore {
                    path,
                    reason: format!("unknown format marker {:?}", String::from_utf8_lossy(other.as_ref())),
                })
            }
            None if established => {
                return Err(StoreError::CorruptStore {
                    path,
                    reason: format!(
                        "`{MARKER_FILE}` exists but sled recovered no keel format record: \
                         sled's data file is damaged or was replaced"
                    ),
                })
            }
            None if db.is_empty() && db.tree_names().len() <= 1 => {
                if !config.create {
                    return Err(StoreError::NotFound { path });
                }
                db.insert(record::META_FORMAT_KEY, record::FORMAT_MARKER).map_err(sled_err)?;
                syncer.sync(Level::PowerLoss)?;
                write_marker_file(&path)?;
            }
            None => {
                return Err(StoreError::NotAStore {
                    path,
                    reason: "sled database without the keel format marker".into(),
                })
            }
        }

        Ok((db, syncer))
    }

    /// Committed records that are gone, per run (always empty for a writable store: its
    /// open refuses instead).
    pub fn lost(&self) -> &[crate::LostRecords] {
        &self.lost
    }

    /// Runs of a store opened after a clean close (writable, or by
    /// [`SledStore::open_read_only_lazy`]) that were found, when first used, to have lost
    /// committed records (each use of them is refused with [`StoreError::LostCommitted`]).
    pub fn lost_found(&self) -> Vec<crate::LostRecords> {
        match &self.unchecked {
            Some(u) => u.inner.read().unwrap_or_else(PoisonError::into_inner).lost.values().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// Compares `run`'s committed head (from the manifest) with sled's the first time the
    /// run is used after a clean open; a run that lost committed records is refused with
    /// [`StoreError::LostCommitted`] from then on. Checks hold the lock, so no use of a run
    /// overtakes its check.
    fn checked(&self, run: RunId) -> Result<(), StoreError> {
        let Some(u) = &self.unchecked else { return Ok(()) };
        {
            // Every read and append passes here: runs already checked (or never in the
            // manifest) share the lock.
            let seen = u.inner.read().unwrap_or_else(PoisonError::into_inner);
            if !seen.heads.contains_key(&run) && !seen.lost.contains_key(&run) {
                return Ok(());
            }
        }
        let mut inner = u.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = inner.lost.get(&run) {
            return Err(StoreError::LostCommitted { path: self.path.clone(), lost: vec![l.clone()], evidence: None });
        }
        let Some(c) = inner.heads.get(&run).cloned() else { return Ok(()) };
        let one = std::collections::BTreeMap::from([(run, c)]);
        // Taken off the list only once compared (a panic in between leaves it unchecked).
        let found = find_lost(&self.core, &one).into_iter().next();
        inner.heads.remove(&run);
        match found {
            None => Ok(()),
            Some(l) => {
                tracing::error!(path = %self.path.display(), %run, reason = %l.reason, "committed records of the run are gone");
                inner.lost.insert(run, l.clone());
                Err(StoreError::LostCommitted { path: self.path.clone(), lost: vec![l], evidence: None })
            }
        }
    }

    /// Whether a process has the store in directory `path` open (sled's exclusive lock on
    /// its data file), found without opening or writing anything and without excluding
    /// other readers: the CLI's route to a running `keel serve`. Read-only opens copying
    /// the files do not count.
    pub fn held_by_a_writer(path: impl AsRef<Path>) -> Result<bool, StoreError> {
        files::held_by_a_writer(path.as_ref())
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an earlier flush failed (appends are refused until reopened).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Flushes run by the group-commit coordinator so far.
    pub fn group_flushes(&self) -> u64 {
        self.group.flushes()
    }

    /// Flushes sled, then appends the heads written before the flush began to the
    /// manifest (durable per `level`): the manifest never names a record sled may lack.
    fn sync(&self, level: Level) -> Result<(), StoreError> {
        let heads = self.manifest.as_ref().map(manifest::Manifest::take).unwrap_or_default();
        let synced = self.syncer.sync(level).and_then(|()| match &self.manifest {
            Some(m) => m.append(&heads, level),
            None => Ok(()),
        });
        synced.inspect_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "flush failed; store poisoned");
            self.poisoned.store(true, Ordering::Release);
        })
    }

    /// Returns once everything written before the call is durable per the configured mode.
    fn make_durable(&self) -> Result<(), StoreError> {
        match self.durability {
            Durability::None => Ok(()),
            Durability::EveryAppend(level) => {
                let start = std::time::Instant::now();
                self.sync(level)?;
                self.commits.flushed(crate::stats::micros_since(start), 1);
                Ok(())
            }
            Durability::GroupCommit(level) => self.group.commit(|| self.sync(level), &self.commits),
        }
    }

    // --- test hooks: raw access that bypasses every invariant ---------------------------

    /// TEST HOOK: the stored value of record `(run, seq)`.
    #[cfg(feature = "testing")]
    pub fn raw_get(&self, run: RunId, seq: Seq) -> Result<Option<Vec<u8>>, StoreError> {
        self.core.raw_get(&record::event_key(run, seq.0))
    }

    /// TEST HOOK: overwrites the stored value of record `(run, seq)` (no checks).
    #[cfg(feature = "testing")]
    pub fn raw_put(&self, run: RunId, seq: Seq, value: &[u8]) -> Result<(), StoreError> {
        self.core.raw_write(&record::event_key(run, seq.0), Some(value))
    }

    /// TEST HOOK: deletes record `(run, seq)` (no checks).
    #[cfg(feature = "testing")]
    pub fn raw_remove(&self, run: RunId, seq: Seq) -> Result<(), StoreError> {
        self.core.raw_write(&record::event_key(run, seq.0), None)
    }

    /// TEST HOOK: the stored snapshot value of `run`.
    #[cfg(feature = "testing")]
    pub fn raw_get_snapshot(&self, run: RunId) -> Result<Option<Vec<u8>>, StoreError> {
        self.core.raw_get(&record::snapshot_key(run))
    }

    /// TEST HOOK: overwrites the stored snapshot value of `run`.
    #[cfg(feature = "testing")]
    pub fn raw_put_snapshot(&self, run: RunId, value: &[u8]) -> Result<(), StoreError> {
        self.core.raw_write(&record::snapshot_key(run), Some(value))
    }

    /// TEST HOOK: every stored `(key, value)` of `run`'s records, in key order.
    #[cfg(any(feature = "testing", feature = "bench"))]
    pub fn raw_records(&self, run: RunId) -> Result<Vec<RawPair>, StoreError> {
        self.core.raw_range(&record::event_key(run, 0), &record::event_key(run, u64::MAX))
    }

    /// TEST HOOK: how many keys sled holds for `run`'s records (1 once the run is sealed
    /// and nothing was appended since: [`Coordination::seal_runs`]).
    #[cfg(feature = "testing")]
    pub fn raw_stored_keys(&self, run: RunId) -> Result<usize, StoreError> {
        let (lo, hi) = (record::run_prefix(run), record::event_key(run, u64::MAX));
        self.core.kv.inner.range(&lo, &hi)?.try_fold(0usize, |n, pair| pair.map(|_| n + 1))
    }

    /// TEST HOOK: overwrites chunk `index` of payload `digest` (no checks).
    #[cfg(feature = "testing")]
    pub fn raw_put_payload_chunk(&self, digest: &crate::Hash32, index: u32, value: &[u8]) -> Result<(), StoreError> {
        self.core.raw_write(&crate::payloads::chunk_key(digest, index), Some(value))
    }

    /// TEST HOOK: writes any key (used to load golden files).
    #[cfg(feature = "testing")]
    pub fn raw_insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.core.raw_write(key, Some(value))
    }
}

impl EventLog for SledStore {
    fn append(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, None, Vec::new())
    }

    // read, head, scan: the shared core's, once the run was checked; runs, limits: the core's.
    fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.checked(run)?;
        self.core.read(run, from)
    }

    fn head(&self, run: RunId) -> Result<Head, StoreError> {
        self.checked(run)?;
        self.core.head(run)
    }

    fn runs(&self) -> Result<Vec<RunId>, StoreError> {
        self.core.runs()
    }

    fn runs_between(&self, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
        // With the runs the manifest says were committed that sled may no longer hold, so
        // that a prefix names a lost run (whose use then says what was lost) instead of
        // calling it unknown.
        let mut runs = self.core.runs_between(lo, hi)?;
        runs.extend(self.lost.iter().map(|l| l.run).filter(|r| (lo..=hi).contains(r)));
        if let Some(u) = &self.unchecked {
            let inner = u.inner.read().unwrap_or_else(PoisonError::into_inner);
            runs.extend(inner.heads.range(lo..=hi).map(|(r, _)| *r));
            runs.extend(inner.lost.range(lo..=hi).map(|(r, _)| *r));
        }
        runs.sort_unstable();
        runs.dedup();
        Ok(runs)
    }

    fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.checked(run)?;
        self.core.scan(run, from)
    }

    fn limits(&self) -> crate::Limits {
        self.core.limits.clone()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.sync(Level::PowerLoss)
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    fn commit_stats(&self) -> crate::stats::CommitStats {
        self.commits.stats(!matches!(self.durability, Durability::None))
    }

    fn read_runs<'a>(&'a self, runs: &'a [RunId]) -> RunRecords<'a> {
        // A run not yet checked is read in turn (through `read`, which checks it).
        if runs.iter().any(|r| self.checked(*r).is_err()) {
            return crate::log::read_runs_in_turn(self, runs);
        }
        match crate::sled::read_ahead::ReadAhead::start(self.core.kv.inner.db.clone(), runs.to_vec()) {
            Some(r) => Box::new(r),
            None => crate::log::read_runs_in_turn(self, runs),
        }
    }
}

impl crate::Payloads for SledStore {
    fn put_payload(&self, bytes: &[u8]) -> Result<crate::PayloadRef, StoreError> {
        if self.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        // Not flushed here: the append of the records that reference it flushes both.
        self.core.put_payload(bytes)
    }

    fn get_payload(&self, digest: &crate::Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError> {
        self.core.get_payload(digest, bytes_max)
    }

    fn payload_digests(&self) -> Result<Vec<crate::Hash32>, StoreError> {
        self.core.payload_digests()
    }
}

impl Coordination for SledStore {
    fn seal_runs(&self, runs: &[RunId]) -> Result<usize, StoreError> {
        if self.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        for run in runs {
            self.checked(*run)?;
        }
        self.core.seal_runs(runs)
    }

    fn append_fenced(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, Some(fence), Vec::new())
    }

    fn append_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, None, aux)
    }

    fn append_fenced_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.write(run, expected, records, claim, Some(fence), aux)
    }

    fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<crate::Hash32>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<(), StoreError> {
        if self.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        self.checked(run)?;
        if let Some(m) = &self.manifest {
            m.removed(run)?;
        }
        let removed = self.core.remove_run(run, expected, payloads, aux);
        if let (Err(_), Some(m)) = (&removed, &self.manifest) {
            if let Some(head) = self.core.head(run).ok().filter(|h| h.next_seq.0 > 0) {
                m.restore(run, &head)?;
            }
        }
        match removed {
            // Durable at the power-loss level whatever the store's durability: a removal
            // is rare and must not be undone by a crash after the archive was trusted.
            Ok(()) => self.sync(Level::PowerLoss),
            Err(e @ (StoreError::Io(_) | StoreError::Sled(_))) => {
                self.poisoned.store(true, Ordering::Release);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    // Leases, claims lookup, snapshots, aux, due times: the shared core's.
    crate::kv::delegate_coordination!();
}

impl SledStore {
    /// An append, fenced or not: the shared write phase, then durability.
    fn write(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<crate::AuxWrite>,
    ) -> Result<Head, StoreError> {
        if self.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        self.checked(run)?;
        match self.core.write(run, expected, records, claim, fence, aux) {
            Ok(Written::Ok(head)) => {
                if let Some(m) = &self.manifest {
                    m.note(run, &head);
                }
                self.make_durable()?;
                Ok(head)
            }
            Ok(Written::Duplicate(existing)) => {
                // Report the holder only once its claim is as durable as our append
                // would have been.
                self.make_durable()?;
                Err(StoreError::DuplicateKey { existing })
            }
            Err(e @ (StoreError::Io(_) | StoreError::Sled(_))) => {
                // A failed write leaves sled's state unknown: refuse further appends.
                self.poisoned.store(true, Ordering::Release);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // A read-only store's scratch copy is thrown away: nothing to make durable.
        if self.scratch.is_some() {
            return;
        }
        // Best effort: make a clean shutdown durable even in `Durability::None`, then
        // record the clean close (the next open needs no evidence copy).
        if !self.is_poisoned() {
            let closed = self.sync(Level::PowerLoss).and_then(|()| match &self.manifest {
                Some(m) => m.close(&self.path.join("db")),
                None => Ok(()),
            });
            if let Err(e) = closed {
                tracing::warn!(path = %self.path.display(), error = %e, "flush on drop failed");
            }
        }
        note_closed(&self.path);
    }
}

#[cfg(test)]
mod sealed_tests {
    use super::*;
    use crate::kv::Kv;

    fn run(i: u8) -> RunId {
        RunId::from_bytes([i; 16])
    }

    fn kv_with(dir: &Path, runs: &[u8], n: u64) -> Sealing<SledKv> {
        let db = sled::Config::new().path(dir).temporary(true).open().unwrap_or_else(|e| panic!("{e}"));
        let kv = Sealing { inner: SledKv { db } };
        for r in runs {
            for seq in 0..n {
                kv.insert(&record::event_key(run(*r), seq), vec![*r; 40]).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        kv
    }

    fn keys(it: KvIter<sled::IVec>) -> Vec<Vec<u8>> {
        it.map(|p| p.unwrap_or_else(|e| panic!("{e}")).0.to_vec()).collect()
    }

    /// The keys of a scan of `lo..=hi` with `sealed` sealed after its first `first` pairs.
    fn scan_sealing_midway(kv: &Sealing<SledKv>, lo: &[u8], hi: &[u8], first: usize, sealed: RunId) -> Vec<Vec<u8>> {
        let mut it = kv.range(lo, hi).unwrap_or_else(|e| panic!("{e}"));
        let mut got: Vec<Vec<u8>> =
            it.by_ref().take(first).map(|p| p.unwrap_or_else(|e| panic!("{e}")).0.to_vec()).collect();
        assert_eq!(kv.seal(&[sealed]).ok(), Some(1));
        got.extend(keys(it));
        got
    }

    #[test]
    fn a_scan_running_while_its_run_is_sealed_still_yields_every_record() {
        // sled's scans are not snapshots: the seal moves record keys the scan has not
        // reached (later leaves) into the sealed value, which sorts before them.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let kv = kv_with(dir.path(), &[1, 2], 60);
        let (lo, hi) = (record::event_key(run(1), 0), record::event_key(run(1), u64::MAX));
        let got = scan_sealing_midway(&kv, &lo, &hi, 5, run(1));
        let want: Vec<Vec<u8>> = (0..60).map(|s| record::event_key(run(1), s).to_vec()).collect();
        assert_eq!(got, want);
        // A scan over both runs while the second is sealed.
        let (lo, hi) = (record::event_key(run(1), 0), record::event_key(run(2), u64::MAX));
        let got = scan_sealing_midway(&kv, &lo, &hi, 3, run(2));
        assert_eq!(got.len(), 120);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in key order, no repeat");
    }

    #[test]
    fn sealed_neighbours_list_read_and_page_as_plain_ones() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (plain, sealed) =
            (kv_with(&dir.path().join("a"), &[1, 2, 3, 4], 7), kv_with(&dir.path().join("b"), &[1, 2, 3, 4], 7));
        assert_eq!(sealed.seal(&[run(2), run(4), run(1)]).ok(), Some(3));
        let all = |kv: &Sealing<SledKv>, lo: &[u8], hi: &[u8]| keys(kv.range(lo, hi).unwrap_or_else(|e| panic!("{e}")));
        for (lo, hi) in [
            (vec![0u8], vec![0xffu8]),
            (record::event_key(run(1), 3).to_vec(), record::event_key(run(3), 2).to_vec()),
            (record::run_prefix(run(2)).to_vec(), record::event_key(run(2), 4).to_vec()),
            (record::event_key(run(2), 6).to_vec(), record::event_key(run(4), 0).to_vec()),
        ] {
            assert_eq!(all(&sealed, &lo, &hi), all(&plain, &lo, &hi), "{lo:?}..={hi:?}");
            assert_eq!(sealed.last_in(&lo, &hi).ok(), plain.last_in(&lo, &hi).ok(), "last in {lo:?}..={hi:?}");
        }
        let core = |kv| Core::new(kv, crate::Limits::default());
        let (plain, sealed) = (core(plain), core(sealed));
        assert_eq!(sealed.runs().ok(), plain.runs().ok());
        assert_eq!(sealed.runs_between(run(2), run(3)).ok(), Some(vec![run(2), run(3)]));
        // A damaged sealed value: the run is still listed; reading it says what is wrong.
        sealed
            .kv
            .inner
            .apply(vec![(record::run_prefix(run(2)).to_vec(), Some(vec![1, 0, 0]))])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sealed.runs().ok(), plain.runs().ok());
        let read: Result<Vec<_>, _> = sealed.read(run(2), Seq(0)).and_then(|it| it.collect());
        assert!(matches!(read, Err(StoreError::Corrupted { .. })), "{read:?}");
    }
}
