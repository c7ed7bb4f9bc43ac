//! A test filesystem that loses every write not yet synced when the power is cut.
//!
//! In the spirit of LazyFS: a FUSE passthrough over a backing directory (the "disk") that
//! keeps everything a program writes in memory (the "page cache") until the program syncs
//! it. [`Mounted::cut`] then drops whatever was not synced and freezes the filesystem; the
//! backing directory holds what a machine would find after the power came back.
//!
//! The model (data as strict as POSIX allows, stricter than ext4's `data=ordered`):
//! - `write` and `truncate` change only the page cache; `read` sees them.
//! - `fsync`/`fdatasync` of a file writes its dirty pages and size to the disk (the two are
//!   the same here). It does not make the file's directory entry durable.
//! - Creating, renaming and removing entries (`create`, `mkdir`, `rename`, `unlink`,
//!   `rmdir`) happen on the disk at once but are journaled; an `fsync` of a directory makes
//!   durable, by [`DirSync`], either every journaled change up to the last one inside that
//!   directory (`Prefix`, as ext4 and XFS commit their metadata journal) or only the changes
//!   inside it (`OwnEntries`, strict POSIX). A cut undoes the rest, newest first; a removed
//!   entry waits in a trash directory until its removal is durable.
//! - `close`, `sync_file_range` (FUSE never sees it) and time passing persist nothing.
//! - Modes (`chmod`) pass through at once; times and owners are not modelled.
//! - A cut drops everything not synced ([`Cut::DropAll`]) or, torn ([`Cut::Torn`]), first
//!   writes a random half of the dirty pages (in any order) and commits a random prefix of
//!   the directory journal, as background writeback may have done.
//! - Not modelled: torn writes inside a page, a sync interrupted half way (a sync is all or
//!   nothing), and devices that lie about flushes.
//!
//! Used by keel's power-loss tests; not a general-purpose filesystem.

mod fs;
pub mod model;

pub use model::{Cut, DirSync, Model, SplitMix, Stats};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// No `/dev/fuse` on this machine: FUSE cannot work here at all.
    #[error("no /dev/fuse on this machine")]
    NoFuseDevice,
    /// The backing or trash directory could not be used.
    #[error("cannot use {path}: {source}")]
    Backing {
        /// The directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Mounting failed (not root and no `fusermount3`, no permission, ...).
    #[error("mounting on {path} failed: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Unmounting failed (files still open on it, ...).
    #[error("unmounting failed: {0}")]
    Unmount(std::io::Error),
    /// The cut could not undo the directory changes on the backing directory.
    #[error("cut failed to restore the backing directory: {0}")]
    Cut(std::io::Error),
}

/// How long [`Mounted::unmount`] waits for this process's files on the mount to close.
pub const UNMOUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A mounted lossy filesystem. Dropping it unmounts.
pub struct Mounted {
    model: Arc<Mutex<Model>>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

/// Mounts a lossy filesystem over `disk` at `mountpoint`. Removed entries are kept in
/// `trash` (a directory on the same filesystem as `disk`, not inside it) until durable.
pub fn mount(disk: &Path, trash: &Path, mountpoint: &Path, dir_sync: DirSync) -> Result<Mounted, MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuseDevice);
    }
    let model = Model::new(disk, trash)
        .map_err(|source| MountError::Backing { path: disk.to_path_buf(), source })?
        .with_dir_sync(dir_sync);
    let model = Arc::new(Mutex::new(model));
    let mut config = fuser::Config::default();
    config.mount_options = vec![fuser::MountOption::FSName("lossyfs".into()), fuser::MountOption::RW];
    config.n_threads = Some(1);
    let fs = fs::LossyFs { model: model.clone() };
    let session = fuser::spawn_mount(fs, mountpoint, &config)
        .map_err(|source| MountError::Mount { path: mountpoint.to_path_buf(), source })?;
    Ok(Mounted { model, session: Some(session), mountpoint: mountpoint.to_path_buf() })
}

impl Mounted {
    /// Cuts the power: unsynced data and directory changes are gone from the backing
    /// directory, and every later request fails with `EIO` until unmounted.
    pub fn cut(&self) -> Result<(), MountError> {
        self.cut_with(Cut::DropAll)
    }

    /// Cuts the power as `how` says (a torn cut keeps some unsynced pages: [`Cut`]).
    pub fn cut_with(&self, how: Cut) -> Result<(), MountError> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner).cut_with(how).map_err(MountError::Cut)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.model.lock().unwrap_or_else(PoisonError::into_inner).stats()
    }

    /// Whether this process holds a file open on the mount (its `/proc/self/fd` links).
    fn open_here(&self) -> bool {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return false };
        fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to.starts_with(&self.mountpoint)))
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts (every file on it must be closed: kill its users first). Files this
    /// process still holds open on it are waited for, at most [`UNMOUNT_WAIT`]: a sled
    /// database just dropped closes its files from its background threads a moment later,
    /// and an unmount meanwhile fails with `EBUSY` (seen once in CI).
    pub fn unmount(mut self) -> Result<(), MountError> {
        let deadline = std::time::Instant::now() + UNMOUNT_WAIT;
        while self.open_here() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match self.session.take() {
            Some(session) => session.umount_and_join().map_err(MountError::Unmount),
            None => Ok(()),
        }
    }
}
