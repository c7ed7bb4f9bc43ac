//! What a power cut keeps and what it drops: the filesystem's state split into the durable
//! part (the backing directory) and the volatile part (dirty pages and an undo journal of
//! directory changes), with no FUSE in it so it can be tested directly.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Page size of the simulated page cache: a partial write first loads its page.
pub const PAGE_BYTES: u64 = 4096;

/// Inode number of the mount's root directory (FUSE's fixed root id).
pub const ROOT_INO: u64 = 1;

/// One directory change not yet durable, with what undoes it at a cut.
#[derive(Debug)]
enum NsOp {
    /// A file or directory created at `path` (absolute, in the backing directory).
    Created { path: PathBuf },
    /// `from` renamed to `to`; what `to` named before was moved to `displaced` (trash).
    Renamed { from: PathBuf, to: PathBuf, displaced: Option<PathBuf> },
    /// `path` unlinked or removed; its bytes wait in `kept` (trash) until durable.
    Removed { path: PathBuf, kept: PathBuf },
}

impl NsOp {
    /// Whether an fsync of directory `dir` makes this change durable.
    fn touches(&self, dir: &Path) -> bool {
        let in_dir = |p: &Path| p.parent() == Some(dir);
        match self {
            NsOp::Created { path } | NsOp::Removed { path, .. } => in_dir(path),
            NsOp::Renamed { from, to, .. } => in_dir(from) || in_dir(to),
        }
    }

    /// Puts the backing directory back as it was before this change.
    fn undo(&self) -> io::Result<()> {
        match self {
            NsOp::Created { path } => remove_any(path),
            NsOp::Renamed { from, to, displaced } => {
                std::fs::rename(to, from)?;
                match displaced {
                    Some(kept) => std::fs::rename(kept, to),
                    None => Ok(()),
                }
            }
            NsOp::Removed { path, kept } => std::fs::rename(kept, path),
        }
    }

    /// The change is durable: what it removed can go for good.
    fn commit(&self) -> io::Result<()> {
        match self {
            NsOp::Created { .. } | NsOp::Renamed { displaced: None, .. } => Ok(()),
            NsOp::Renamed { displaced: Some(kept), .. } | NsOp::Removed { kept, .. } => remove_any(kept),
        }
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The page cache of one regular file: its live size and the pages written since its last
/// sync. Bytes at or past `floor` (the smallest size since the last sync) and not in a
/// dirty page read as zeros: a truncate is volatile too.
#[derive(Debug)]
struct Dirty {
    pages: BTreeMap<u64, Vec<u8>>,
    size: u64,
    floor: u64,
}

/// What an fsync of a directory makes durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirSync {
    /// Every journaled change up to the last one inside the directory: the journal is
    /// committed as a prefix, as ext4 and XFS commit their metadata journal.
    #[default]
    Prefix,
    /// Only the changes inside the directory (strict POSIX): a new directory's own entry
    /// needs an fsync of its parent.
    OwnEntries,
}

/// What a power cut keeps of what was not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cut {
    /// Nothing: every dirty page and every journaled directory change is lost.
    DropAll,
    /// Some: each dirty page reaches the disk or not (a coin per page, drawn from `seed`),
    /// and a random prefix of the directory journal is committed, as when background
    /// writeback and a journal commit ran just before the cut.
    Torn {
        /// Seed of the coins.
        seed: u64,
    },
}

/// splitmix64: the coins of a torn cut (and the cut points of the power-loss tests).
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next number of the sequence.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next().checked_rem(n).unwrap_or(0)
    }
}

/// Counters of what the filesystem did (for reports and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `write` requests.
    pub writes: u64,
    /// File fsync/fdatasync requests (each persists the file's dirty pages).
    pub file_syncs: u64,
    /// Directory fsync requests.
    pub dir_syncs: u64,
    /// Cuts.
    pub cuts: u64,
    /// Dirty pages dropped by cuts.
    pub pages_dropped: u64,
    /// Dirty pages a torn cut wrote to the disk.
    pub pages_written_at_cut: u64,
    /// Directory changes undone by cuts.
    pub ops_undone: u64,
}

/// What a lookup or getattr answers: the backing file's metadata with the live size.
#[derive(Debug)]
pub struct Stat {
    /// Inode number in this mount.
    pub ino: u64,
    /// Metadata of the backing file (mode, owner, times, kind).
    pub meta: Metadata,
    /// The live size (dirty pages and volatile truncates included).
    pub size: u64,
}

/// The filesystem's whole state. Every method fails with `EIO` once the power was cut.
#[derive(Debug)]
pub struct Model {
    trash: PathBuf,
    next_trash: u64,
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, File>,
    dirty: HashMap<u64, Dirty>,
    journal: Vec<NsOp>,
    dead: bool,
    dir_sync: DirSync,
    stats: Stats,
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn eio() -> io::Error {
    err(libc::EIO)
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| err(libc::EFBIG))
}

impl Model {
    /// A model whose durable state is `disk` and which parks removed entries in `trash`
    /// (a directory outside `disk`, on the same filesystem) until they are durable.
    pub fn new(disk: &Path, trash: &Path) -> io::Result<Model> {
        let (disk, trash) = (disk.canonicalize()?, trash.canonicalize()?);
        if disk.starts_with(&trash) || trash.starts_with(&disk) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "disk and trash must not nest"));
        }
        let mut model = Model {
            trash,
            next_trash: 0,
            paths: HashMap::new(),
            inos: HashMap::new(),
            next_ino: ROOT_INO + 1,
            handles: HashMap::new(),
            dirty: HashMap::new(),
            journal: Vec::new(),
            dead: false,
            dir_sync: DirSync::default(),
            stats: Stats::default(),
        };
        model.paths.insert(ROOT_INO, disk.clone());
        model.inos.insert(disk, ROOT_INO);
        Ok(model)
    }

    /// Sets what an fsync of a directory makes durable.
    pub fn with_dir_sync(mut self, dir_sync: DirSync) -> Model {
        self.dir_sync = dir_sync;
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether the power was cut.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Cuts the power: every dirty page is dropped and every directory change not made
    /// durable is undone, newest first. The model answers `EIO` from then on; the backing
    /// directory holds exactly what a machine would find after the reboot.
    pub fn cut(&mut self) -> io::Result<()> {
        self.cut_with(Cut::DropAll)
    }

    /// Cuts the power as `how` says: [`Cut::DropAll`] as [`Model::cut`]; [`Cut::Torn`] first
    /// lets the kernel's background writeback have written some of what was not synced.
    pub fn cut_with(&mut self, how: Cut) -> io::Result<()> {
        if self.dead {
            return Ok(());
        }
        self.stats.cuts += 1;
        let mut first_error = None;
        if let Cut::Torn { seed } = how {
            if let Err(e) = self.write_back_some(&mut SplitMix(seed)) {
                first_error.get_or_insert(e);
            }
        }
        self.dead = true;
        self.stats.pages_dropped += self.dirty.values().map(|d| d.pages.len() as u64).sum::<u64>();
        self.dirty.clear();
        self.handles.clear();
        while let Some(op) = self.journal.pop() {
            self.stats.ops_undone += 1;
            if let Err(e) = op.undo() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes about half of the dirty pages, each chosen independently (so a later page may
    /// reach the disk while an earlier one does not), and commits a random prefix of the
    /// directory journal (journals commit in order).
    fn write_back_some(&mut self, rng: &mut SplitMix) -> io::Result<()> {
        let mut inos: Vec<u64> = self.dirty.keys().copied().collect();
        inos.sort_unstable();
        let (mut written, mut dropped) = (0u64, 0u64);
        for ino in inos {
            let Some(d) = self.dirty.remove(&ino) else { continue };
            let file = self.handle(ino)?;
            for (&page_no, page) in &d.pages {
                let start = page_no * PAGE_BYTES;
                let n = to_usize(PAGE_BYTES.min(d.size.saturating_sub(start)))?;
                if n > 0 && rng.next() & 1 == 0 {
                    file.write_all_at(page.get(..n).ok_or_else(eio)?, start)?;
                    written += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        self.stats.pages_written_at_cut += written;
        self.stats.pages_dropped += dropped;
        let keep = to_usize(rng.next() % (self.journal.len() as u64 + 1))?;
        for op in self.journal.drain(..keep) {
            op.commit()?;
        }
        Ok(())
    }

    fn path(&self, ino: u64) -> io::Result<PathBuf> {
        if self.dead {
            return Err(eio());
        }
        self.paths.get(&ino).cloned().ok_or_else(|| err(libc::ENOENT))
    }

    fn ino_for(&mut self, path: &Path) -> u64 {
        if let Some(ino) = self.inos.get(path) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, path.to_path_buf());
        self.inos.insert(path.to_path_buf(), ino);
        ino
    }

    /// Moves the name `from` (and every name under it) to `to` in the inode table.
    fn repath(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> =
            self.inos.iter().filter(|(p, _)| p.starts_with(from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, ino) in moved {
            self.inos.remove(&old);
            let new = match old.strip_prefix(from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            self.paths.insert(ino, new.clone());
            self.inos.insert(new, ino);
        }
    }

    fn stat(&mut self, ino: u64, path: &Path) -> io::Result<Stat> {
        let meta = std::fs::symlink_metadata(path)?;
        let size = self.dirty.get(&ino).map_or(meta.len(), |d| d.size);
        Ok(Stat { ino, meta, size })
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> io::Result<Stat> {
        let path = self.path(parent)?.join(name);
        std::fs::symlink_metadata(&path)?;
        let ino = self.ino_for(&path);
        self.stat(ino, &path)
    }

    /// The attributes of `ino`.
    pub fn getattr(&mut self, ino: u64) -> io::Result<Stat> {
        let path = self.path(ino)?;
        self.stat(ino, &path)
    }

    /// Lists directory `ino`: `(ino, is_dir, name)`, in the backing directory's order.
    pub fn readdir(&mut self, ino: u64) -> io::Result<Vec<(u64, bool, OsString)>> {
        let dir = self.path(ino)?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let is_dir = entry.file_type()?.is_dir();
            let child = self.ino_for(&entry.path());
            out.push((child, is_dir, entry.file_name()));
        }
        Ok(out)
    }

    fn handle(&mut self, ino: u64) -> io::Result<&File> {
        let path = self.path(ino)?;
        match self.handles.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                Ok(e.insert(OpenOptions::new().read(true).write(true).open(&path)?))
            }
        }
    }

    fn sizes(&mut self, ino: u64) -> io::Result<(u64, u64)> {
        if let Some(d) = self.dirty.get(&ino) {
            return Ok((d.size, d.floor));
        }
        let len = self.handle(ino)?.metadata()?.len();
        Ok((len, len))
    }

    /// Reads what a program would see: durable bytes below the floor, dirty pages on top.
    pub fn read(&mut self, ino: u64, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let (size, floor) = self.sizes(ino)?;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; to_usize(end - offset)?];
        let durable_end = end.min(floor);
        if offset < durable_end {
            let part = buf.get_mut(..to_usize(durable_end - offset)?).ok_or_else(eio)?;
            read_full_at(self.handle(ino)?, part, offset)?;
        }
        if let Some(d) = self.dirty.get(&ino) {
            for (&page_no, page) in d.pages.range(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES) {
                let start = page_no * PAGE_BYTES;
                let (from, to) = (offset.max(start), end.min(start + PAGE_BYTES));
                let src = page.get(to_usize(from - start)?..to_usize(to - start)?).ok_or_else(eio)?;
                let dst = buf.get_mut(to_usize(from - offset)?..to_usize(to - offset)?).ok_or_else(eio)?;
                dst.copy_from_slice(src);
            }
        }
        Ok(buf)
    }

    fn dirty_entry(&mut self, ino: u64) -> io::Result<()> {
        if !self.dirty.contains_key(&ino) {
            let (size, floor) = self.sizes(ino)?;
            self.dirty.insert(ino, Dirty { pages: BTreeMap::new(), size, floor });
        }
        Ok(())
    }

    /// Writes into the page cache only.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.path(ino)?;
        self.stats.writes += 1;
        if data.is_empty() {
            return Ok(0);
        }
        self.dirty_entry(ino)?;
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| err(libc::EFBIG))?;
        for page_no in offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES {
            let start = page_no * PAGE_BYTES;
            let has_page = self.dirty.get(&ino).is_some_and(|d| d.pages.contains_key(&page_no));
            if !has_page {
                let mut base = self.read(ino, start, PAGE_BYTES)?;
                base.resize(to_usize(PAGE_BYTES)?, 0);
                if let Some(d) = self.dirty.get_mut(&ino) {
                    d.pages.insert(page_no, base);
                }
            }
            let (from, to) = (offset.max(start), end.min(start + PAGE_BYTES));
            let src = data.get(to_usize(from - offset)?..to_usize(to - offset)?).ok_or_else(eio)?;
            let page = self.dirty.get_mut(&ino).and_then(|d| d.pages.get_mut(&page_no)).ok_or_else(eio)?;
            page.get_mut(to_usize(from - start)?..to_usize(to - start)?).ok_or_else(eio)?.copy_from_slice(src);
        }
        if let Some(d) = self.dirty.get_mut(&ino) {
            d.size = d.size.max(end);
        }
        Ok(data.len())
    }

    /// Truncates or extends in the page cache only.
    pub fn set_size(&mut self, ino: u64, size: u64) -> io::Result<()> {
        self.dirty_entry(ino)?;
        let d = self.dirty.get_mut(&ino).ok_or_else(eio)?;
        if size < d.size {
            d.floor = d.floor.min(size);
            d.pages.retain(|&page_no, _| page_no * PAGE_BYTES < size);
            let tail_page = size / PAGE_BYTES;
            if let Some(page) = d.pages.get_mut(&tail_page) {
                let keep = to_usize(size - tail_page * PAGE_BYTES)?;
                page.get_mut(keep..).ok_or_else(eio)?.fill(0);
            }
        }
        d.size = size;
        Ok(())
    }

    /// fsync/fdatasync of a file: its dirty pages and size become durable. The file's
    /// directory entry does not (that takes an fsync of its directory).
    pub fn sync_file(&mut self, ino: u64) -> io::Result<()> {
        self.path(ino)?;
        self.stats.file_syncs += 1;
        let Some(d) = self.dirty.remove(&ino) else { return Ok(()) };
        let file = self.handle(ino)?;
        if file.metadata()?.len() > d.floor {
            file.set_len(d.floor)?;
        }
        for (&page_no, page) in &d.pages {
            let start = page_no * PAGE_BYTES;
            let n = to_usize(PAGE_BYTES.min(d.size.saturating_sub(start)))?;
            file.write_all_at(page.get(..n).ok_or_else(eio)?, start)?;
        }
        file.set_len(d.size)?;
        file.sync_data()
    }

    /// fsync of a directory: the directory changes [`DirSync`] says become durable.
    pub fn sync_dir(&mut self, ino: u64) -> io::Result<()> {
        let dir = self.path(ino)?;
        self.stats.dir_syncs += 1;
        let durable: Vec<NsOp> = match self.dir_sync {
            DirSync::Prefix => match self.journal.iter().rposition(|op| op.touches(&dir)) {
                Some(last) => self.journal.drain(..=last).collect(),
                None => Vec::new(),
            },
            DirSync::OwnEntries => {
                let (durable, volatile) =
                    std::mem::take(&mut self.journal).into_iter().partition(|op| op.touches(&dir));
                self.journal = volatile;
                durable
            }
        };
        durable.iter().try_for_each(NsOp::commit)
    }

    fn new_path(&self, parent: u64, name: &OsStr) -> io::Result<PathBuf> {
        let path = self.path(parent)?.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Err(err(libc::EEXIST)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
            Err(e) => Err(e),
        }
    }

    /// Creates an empty regular file (the entry is volatile until its directory is synced).
    pub fn create(&mut self, parent: u64, name: &OsStr, mode: u32) -> io::Result<Stat> {
        let path = self.new_path(parent, name)?;
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&path)?;
        self.journal.push(NsOp::Created { path: path.clone() });
        let ino = self.ino_for(&path);
        self.stat(ino, &path)
    }

    /// Creates a directory (volatile until its parent is synced).
    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> io::Result<Stat> {
        let path = self.new_path(parent, name)?;
        std::fs::DirBuilder::new().mode(mode).create(&path)?;
        self.journal.push(NsOp::Created { path: path.clone() });
        let ino = self.ino_for(&path);
        self.stat(ino, &path)
    }

    fn park(&mut self, path: &Path) -> io::Result<PathBuf> {
        let kept = self.trash.join(self.next_trash.to_string());
        self.next_trash += 1;
        std::fs::rename(path, &kept)?;
        self.repath(path, &kept);
        Ok(kept)
    }

    /// unlink or rmdir: the entry goes to the trash until the removal is durable.
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
        let path = self.path(parent)?.join(name);
        let meta = std::fs::symlink_metadata(&path)?;
        if dir != meta.is_dir() {
            return Err(err(if dir { libc::ENOTDIR } else { libc::EISDIR }));
        }
        if dir && std::fs::read_dir(&path)?.next().is_some() {
            return Err(err(libc::ENOTEMPTY));
        }
        let kept = self.park(&path)?;
        self.journal.push(NsOp::Removed { path, kept });
        Ok(())
    }

    /// rename(2), replacing the target if any (volatile until a directory is synced).
    pub fn rename(&mut self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr) -> io::Result<()> {
        let from = self.path(parent)?.join(name);
        let to = self.path(new_parent)?.join(new_name);
        std::fs::symlink_metadata(&from)?;
        let displaced = match std::fs::symlink_metadata(&to) {
            Ok(_) => Some(self.park(&to)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        std::fs::rename(&from, &to)?;
        self.repath(&from, &to);
        self.journal.push(NsOp::Renamed { from, to, displaced });
        Ok(())
    }

    /// chmod, passed through at once (modes are not modelled as volatile).
    pub fn chmod(&mut self, ino: u64, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(ino)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
}

/// `pread` until `buf` is full; bytes past the end of the file stay zero.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while let Some(rest) = buf.get_mut(done..) {
        if rest.is_empty() {
            break;
        }
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
