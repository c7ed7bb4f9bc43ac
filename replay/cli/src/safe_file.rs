//! The files the CLI writes (`-o FILE`): one helper for every command that writes one, so
//! that none of them clobbers what it should not (docs/CLI.md, "Output files").
//!
//! - An existing path is refused unless `--force`; with `--force` only a regular file with
//!   one link is replaced: a symbolic link, FIFO, socket, device, directory or a file with
//!   other hard links is refused with one line that says which.
//! - Nothing is written inside a keel database directory (one holding the `keel-store`
//!   marker or `keel-store.creating`, or sled's `db` and `conf` files, or the `--db`
//!   directory) or below one.
//! - The bytes go to a hidden temporary file in the target's directory
//!   (`.keel-partial-XXXXXX`), which is synced and then moved into place in one step:
//!   without `--force` with a move that fails if the path appeared meanwhile, with
//!   `--force` by a rename; then the directory is synced. The temporary file is removed
//!   when the command fails, and on SIGINT, SIGTERM or SIGHUP before the process dies of
//!   the signal (only SIGKILL can leave one behind).

use crate::error::io_words;
use crate::error::CliError;
use crate::output::{Noted, Noting};
use std::fs::{File, Metadata};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError};

/// Where a command's output goes: stdout, or a file written safely.
pub(crate) enum Target {
    /// Standard output.
    Stdout,
    /// A file (`-o FILE`).
    File(SafeFile),
}

impl Target {
    /// Stdout when `path` is `None`, else a [`SafeFile`] for it (checked now, before any work).
    pub(crate) fn open(path: Option<&Path>, force: bool, db: &Path) -> Result<Target, CliError> {
        Ok(match path {
            None => Target::Stdout,
            Some(p) => Target::File(SafeFile::create(p, force, db)?),
        })
    }

    /// A buffered writer to the target (the caller flushes it before [`Target::finish`]).
    pub(crate) fn writer(&self) -> Result<Box<dyn Write>, CliError> {
        Ok(match self {
            Target::Stdout => Box::new(BufWriter::new(crate::output::Stdout)),
            Target::File(f) => Box::new(BufWriter::new(f.writer()?)),
        })
    }

    /// A failure while writing to the target, said as one: "cannot write FILE: No space
    /// left on device" or a failure of stdout, whatever error the writer wrapped it in.
    pub(crate) fn stream_err(&self, e: CliError) -> CliError {
        match self {
            Target::Stdout => crate::output::stream_err(e),
            Target::File(f) => f.stream_err(e),
        }
    }

    /// Puts a finished file in place; returns its path (`None` for stdout).
    pub(crate) fn finish(self) -> Result<Option<PathBuf>, CliError> {
        match self {
            Target::Stdout => {
                crate::output::flush_stdout()?;
                // A failure a buffered writer met when dropped is noted all the same.
                crate::output::stdout_failure().map_or(Ok(None), |e| Err(CliError::Stdout(e)))
            }
            Target::File(f) => f.commit().map(Some),
        }
    }
}

/// A file being written: a temporary file beside the target until [`SafeFile::commit`].
pub(crate) struct SafeFile {
    target: PathBuf,
    force: bool,
    tmp: Option<tempfile::NamedTempFile>,
    /// The permissions of the file `--force` replaces (a new file gets 0644).
    replaced: Option<std::fs::Permissions>,
    /// The first failed write through [`SafeFile::writer`].
    failed: Arc<OnceLock<Noted>>,
}

fn failed(msg: String) -> CliError {
    CliError::Failed(msg)
}

impl SafeFile {
    /// Checks `target` (see the module's rules) and creates the temporary file beside it.
    /// `db` is the command's `--db`: nothing is written inside it.
    pub(crate) fn create(target: &Path, force: bool, db: &Path) -> Result<SafeFile, CliError> {
        if target.as_os_str().is_empty() {
            return Err(CliError::Usage("the output path is empty".into()));
        }
        if target.file_name().is_none() {
            return Err(CliError::Usage(format!("{} names no file", target.display())));
        }
        let existing = check_target(target, force)?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        refuse_database_dir(target, &dir, db)?;
        let tmp = pending::create_in(&dir).map_err(|e| {
            failed(format!(
                "cannot write {}: cannot create a file in {}: {}",
                target.display(),
                dir.display(),
                io_words(&e)
            ))
        })?;
        Ok(SafeFile {
            target: target.to_path_buf(),
            force,
            tmp: Some(tmp),
            replaced: existing.map(|m| m.permissions()),
            failed: Arc::default(),
        })
    }

    /// An unbuffered writer to the temporary file that notes its first failure.
    pub(crate) fn writer(&self) -> Result<Noting<File>, CliError> {
        let file = match &self.tmp {
            Some(t) => t.as_file().try_clone(),
            None => Err(std::io::Error::other("already committed")),
        };
        let file = file.map_err(|e| self.write_error(&e))?;
        Ok(Noting::new(file, self.failed.clone()))
    }

    fn write_error(&self, e: &std::io::Error) -> CliError {
        failed(format!("cannot write {}: {}", self.target.display(), io_words(e)))
    }

    /// `e`, or "cannot write FILE: …" when a write through [`SafeFile::writer`] failed.
    pub(crate) fn stream_err(&self, e: CliError) -> CliError {
        match self.failed.get() {
            Some(noted) => self.write_error(&noted.error()),
            None => e,
        }
    }

    /// Syncs the temporary file and moves it to the target (see the module's rules); the
    /// directory is synced after. Returns the target.
    pub(crate) fn commit(mut self) -> Result<PathBuf, CliError> {
        // A write that failed unseen (a buffered writer dropped without a flush) fails too.
        if let Some(noted) = self.failed.get() {
            return Err(self.write_error(&noted.error()));
        }
        let Some(tmp) = self.tmp.take() else {
            return Err(failed(format!("{} was already written", self.target.display())));
        };
        let placed = match self.prepare(&tmp) {
            Ok(()) => pending::persist(tmp, &self.target, self.force),
            Err(e) => {
                pending::remove(tmp);
                Err(e)
            }
        };
        placed.map_err(|e| match e {
            Placed::Io(e) => self.write_error(&e),
            Placed::Refused(e) => e,
        })?;
        let dir = self.target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        match File::open(dir).and_then(|d| d.sync_all()) {
            // Some filesystems cannot sync a directory; the file itself is synced.
            Err(e) if e.kind() != std::io::ErrorKind::InvalidInput => Err(self.write_error(&e)),
            _ => Ok(self.target.clone()),
        }
    }

    /// Syncs the temporary file, gives it the permissions of the file it replaces (or
    /// 0644: a temporary file is created 0600) and, with `--force`, checks the target again.
    fn prepare(&self, tmp: &tempfile::NamedTempFile) -> Result<(), Placed> {
        tmp.as_file().sync_all().map_err(Placed::Io)?;
        // Not being able to set the mode leaves the file readable by its owner only.
        if let Some(perms) = self.replaced.clone().or_else(default_permissions) {
            let _ = tmp.as_file().set_permissions(perms);
        }
        if self.force {
            check_target(&self.target, true).map_err(Placed::Refused)?;
        }
        Ok(())
    }
}

impl Drop for SafeFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            pending::remove(tmp);
        }
    }
}

/// An ordinary file's permissions (0644), for a new file.
#[cfg(unix)]
fn default_permissions() -> Option<std::fs::Permissions> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::Permissions::from_mode(0o644))
}
#[cfg(not(unix))]
fn default_permissions() -> Option<std::fs::Permissions> {
    None
}

/// Why the file could not be put in place.
enum Placed {
    Io(std::io::Error),
    Refused(CliError),
}

/// The target as it is now: `None` if absent; an existing path is refused without
/// `--force`, and with it anything but a regular file with one link.
fn check_target(target: &Path, force: bool) -> Result<Option<Metadata>, CliError> {
    let m = match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(format!("cannot write {}: {}", target.display(), io_words(&e)))),
        Ok(m) => m,
    };
    let what = kind_of(&m);
    if !force {
        return Err(failed(format!(
            "{} already exists ({what}): refusing to replace it (--force replaces a regular file)",
            target.display()
        )));
    }
    if what != "a regular file" {
        return Err(failed(format!(
            "{} is {what}: refusing to replace it (--force replaces only a regular file)",
            target.display()
        )));
    }
    let links = link_count(&m);
    if links > 1 {
        return Err(failed(format!(
            "{} has {links} hard links: refusing to replace it (its other names would keep the old bytes; \
             --force replaces only a file with one link)",
            target.display()
        )));
    }
    Ok(Some(m))
}

/// What a path is, in words.
fn kind_of(m: &Metadata) -> &'static str {
    let t = m.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

#[cfg(unix)]
fn link_count(m: &Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::nlink(m)
}
#[cfg(not(unix))]
fn link_count(_: &Metadata) -> u64 {
    1
}

/// Refuses a target whose directory is, or is below, a keel database directory.
fn refuse_database_dir(target: &Path, dir: &Path, db: &Path) -> Result<(), CliError> {
    let real = std::fs::canonicalize(dir)
        .map_err(|e| failed(format!("cannot write {}: {}: {}", target.display(), dir.display(), io_words(&e))))?;
    let db = std::fs::canonicalize(db).ok();
    let inside = real.ancestors().find(|d| is_database_dir(d) || Some(*d) == db.as_deref());
    match inside {
        None => Ok(()),
        Some(d) => Err(failed(format!(
            "{} is inside the keel database {}: refusing to write there (write it outside the database directory)",
            target.display(),
            d.display()
        ))),
    }
}

/// A directory holding a keel database (its marker file, or sled's files), or one being
/// created.
fn is_database_dir(d: &Path) -> bool {
    [keel_store::MARKER_FILE, keel_store::CREATING_FILE].iter().any(|f| d.join(f).is_file())
        || (d.join("db").is_file() && d.join("conf").is_file())
}

/// The temporary files being written, removed by a signal watcher on SIGINT, SIGTERM or
/// SIGHUP before the process dies of the signal. Creating, moving into place and removing
/// a temporary file each happen under the list's lock, so the watcher sees every file
/// either listed or gone.
mod pending {
    use super::{Placed, PoisonError};
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, Once};

    static FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static WATCH: Once = Once::new();

    fn files() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
        FILES.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new hidden temporary file in `dir`, listed.
    pub(super) fn create_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
        WATCH.call_once(watch);
        let mut files = files();
        let tmp = tempfile::Builder::new().prefix(".keel-partial-").tempfile_in(dir)?;
        files.push(tmp.path().to_path_buf());
        Ok(tmp)
    }

    /// Moves `tmp` to `target` (without `force`: only if `target` does not exist) and
    /// takes it off the list. On failure the temporary file is removed.
    pub(super) fn persist(tmp: tempfile::NamedTempFile, target: &Path, force: bool) -> Result<(), Placed> {
        let mut files = files();
        let path = tmp.path().to_path_buf();
        let moved = if force { tmp.persist(target) } else { tmp.persist_noclobber(target) };
        files.retain(|p| *p != path);
        match moved {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Placed::Refused(super::failed(format!(
                    "{} appeared while it was being written: refusing to replace it (--force replaces a regular file)",
                    target.display()
                ))))
            }
            // Dropping `e.file` removes the temporary file.
            Err(e) => Err(Placed::Io(e.error)),
        }
    }

    /// Removes `tmp` and takes it off the list.
    pub(super) fn remove(tmp: tempfile::NamedTempFile) {
        let mut files = files();
        let path = tmp.path().to_path_buf();
        drop(tmp);
        files.retain(|p| *p != path);
    }

    /// Starts the watcher, when there is an async runtime to run it (`main_with` has one).
    /// A signal the process ignores (`nohup`, a shell's background job) stays ignored.
    fn watch() {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
            let _in = rt.enter();
            // Installed now, before anything is written, not when the task first runs.
            let mut watched = Vec::new();
            for (sig, kind) in [
                (libc::SIGINT, SignalKind::interrupt()),
                (libc::SIGTERM, SignalKind::terminate()),
                (libc::SIGHUP, SignalKind::hangup()),
            ] {
                if !crate::sys::signal_ignored(sig) {
                    if let Ok(s) = signal(kind) {
                        watched.push((sig, s));
                    }
                }
            }
            for (sig, mut s) in watched {
                rt.spawn(async move {
                    if s.recv().await.is_some() {
                        let files = files();
                        for f in files.iter() {
                            let _ = std::fs::remove_file(f);
                        }
                        // Dies holding the lock: nothing is moved into place after this.
                        crate::sys::die_of(sig);
                    }
                });
            }
        }
    }
}
