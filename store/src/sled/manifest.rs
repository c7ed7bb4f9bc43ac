//! The manifest of committed history: `<dir>/keel-manifest`, a small append-only file
//! beside sled's files that sled's recovery cannot roll back.
//!
//! sled recovers the longest valid prefix of its log: a damaged byte in its data file makes
//! it drop (and zero) everything after it, and the store would open with fewer records and
//! no error. So each group commit, after sled's flush succeeded and before any append it
//! covers is acknowledged, appends one line per run it advanced: the run's next seq and the
//! chain hash of its last record. sled's heads are compared with it ([`find_lost`]) before
//! a run is used: every run at an open after an unclean close and at a read-only open,
//! each run at its first use after a clean close; a run whose committed records are gone
//! is a [`LostRecords`].
//!
//! Text lines, each `<body>\t<crc32 hex>\n`:
//! - `keel-manifest v1` (first line);
//! - `h <run> <next_seq> <last_hash hex>`: records `< next_seq` of `run` were committed;
//! - `r <run>`: the run was removed on purpose (`keel archive`, which leaves a tombstone):
//!   its records are no longer expected (a later `h` line of it expects them again: written
//!   when the removal failed);
//! - `c <len> <mtime_ns> <ino>`: the store was closed cleanly and sled's data file then had
//!   this length, modification time and inode (the open after it needs no evidence copy).
//!
//! A line failing its checksum followed by none that passes is a torn tail (a crash during
//! an append) and is ignored; one followed by a good line is damage ([`ManifestError`]).
//! The file is rewritten (temporary file, fsync, rename, directory fsync) with one `h` line
//! per run at a writable open after an unclean close, and at a clean one once it holds more
//! than two lines per run (plus some slack); otherwise it is reopened for appending.

use crate::error::{LostRecords, StoreError};
use crate::log::{Head, Level};
use crate::types::{Hash32, RunId, Seq};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The manifest's file name in the store directory.
pub const MANIFEST_FILE: &str = "keel-manifest";

const HEADER: &str = "keel-manifest v1";

/// Largest manifest read (a line per run is ~116 bytes: about 9 M runs); an open store
/// compacts it long before ([`COMPACT_BYTES_MIN`]).
const MANIFEST_BYTES_MAX: u64 = 1 << 30;

/// An open store rewrites its manifest (one line per run) once the file has grown past
/// this and past three times its size at the last rewrite: every flush appends a line per
/// run it advanced, ~1 MB/s under load.
const COMPACT_BYTES_MIN: u64 = 64 << 20;

/// What the manifest says was committed for one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedHead {
    /// Records `< next_seq` were committed.
    pub next_seq: Seq,
    /// The chain hash of record `next_seq - 1`.
    pub last_hash: Hash32,
}

/// The manifest could not be read or is damaged (not a torn tail).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// A line other than the last ones fails its checksum or does not parse.
    #[error("{path} line {line} is damaged: {reason}")]
    Damaged {
        /// The manifest file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was seen.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The manifest file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// sled's data file identity at a clean close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl Fingerprint {
    /// The fingerprint of `<dir>/db` now.
    pub(crate) fn of(data_file: &Path) -> std::io::Result<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(data_file)?;
        let mtime_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
        Ok(Fingerprint { len: m.len(), mtime_ns, ino: m.ino() })
    }
}

/// A parsed manifest.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// The highest committed head seen per run.
    pub(crate) heads: BTreeMap<RunId, CommittedHead>,
    /// Set when the last line is a clean close.
    pub(crate) clean: Option<Fingerprint>,
    /// Lines read (to decide when to compact).
    pub(crate) lines: usize,
    /// The file ends in a torn append (a last segment without its newline, or lines that
    /// fail their checksum with none good after them): appending to it as it is would
    /// glue the next line to those bytes.
    pub(crate) torn: bool,
}

fn unhex32(s: &str) -> Option<Hash32> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn line(body: &str) -> String {
    format!("{body}\t{:08x}\n", crc32fast::hash(body.as_bytes()))
}

fn head_line(run: RunId, h: &CommittedHead) -> String {
    line(&format!("h {run} {} {}", h.next_seq.0, hex::encode(h.last_hash)))
}

enum Entry {
    Header,
    Head(RunId, CommittedHead),
    Removed(RunId),
    Clean(Fingerprint),
}

fn parse_line(text: &str) -> Result<Entry, String> {
    let (body, crc) = text.rsplit_once('\t').ok_or("no checksum")?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| "bad checksum field")?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return Err("checksum mismatch".into());
    }
    if body == HEADER {
        return Ok(Entry::Header);
    }
    let mut words = body.split(' ');
    let mut f: [&str; 5] = [""; 5];
    let mut n = 0;
    for w in words.by_ref() {
        match f.get_mut(n) {
            Some(slot) => *slot = w,
            None => return Err(format!("unparsable line {body:?}")),
        }
        n += 1;
    }
    let bad = || format!("unparsable line {body:?}");
    match f.get(..n).unwrap_or_default() {
        ["h", run, seq, hash] => {
            let run = run.parse::<RunId>().map_err(|_| bad())?;
            let next_seq = Seq(seq.parse().map_err(|_| bad())?);
            let last_hash = unhex32(hash).ok_or_else(bad)?;
            Ok(Entry::Head(run, CommittedHead { next_seq, last_hash }))
        }
        ["r", run] => Ok(Entry::Removed(run.parse::<RunId>().map_err(|_| bad())?)),
        ["c", len, mtime, ino] => Ok(Entry::Clean(Fingerprint {
            len: len.parse().map_err(|_| bad())?,
            mtime_ns: mtime.parse().map_err(|_| bad())?,
            ino: ino.parse().map_err(|_| bad())?,
        })),
        _ => Err(bad()),
    }
}

/// Parses manifest bytes; `path` only names the file in errors.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, ManifestError> {
    let mut out = Parsed::default();
    let mut seen: Vec<(RunId, Option<CommittedHead>)> = Vec::new();
    let mut first_bad: Option<(usize, String)> = None;
    // A last segment without its newline is a torn append: never looked at.
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => {
            out.torn = end.saturating_add(1) < bytes.len();
            bytes.get(..end).unwrap_or_default()
        }
        None => {
            out.torn = !bytes.is_empty();
            return Ok(out);
        }
    };
    for (i, raw) in complete.split(|b| *b == b'\n').enumerate() {
        let parsed = std::str::from_utf8(raw).map_err(|_| "not UTF-8".to_string()).and_then(parse_line);
        let entry = match parsed {
            Ok(e) => e,
            Err(reason) => {
                first_bad.get_or_insert((i + 1, reason));
                continue;
            }
        };
        if let Some((line, reason)) = first_bad.take() {
            return Err(ManifestError::Damaged { path: path.to_path_buf(), line, reason });
        }
        out.clean = None;
        out.lines += 1;
        match entry {
            Entry::Header => {}
            Entry::Removed(run) => seen.push((run, None)),
            Entry::Head(run, h) => seen.push((run, Some(h))),
            Entry::Clean(fp) => out.clean = Some(fp),
        }
    }
    out.torn |= first_bad.is_some();
    // Per run, in the order written: a removal forgets the run, a head counts if it is
    // the highest since. Sorted (stably) by run first, so the map is built in one pass
    // from sorted entries rather than by a lookup and an insert per line.
    seen.sort_by_key(|(run, _)| *run);
    let mut heads: Vec<(RunId, CommittedHead)> = Vec::new();
    let mut current: Option<(RunId, Option<CommittedHead>)> = None;
    for (run, entry) in seen {
        match current.as_mut() {
            Some((r, best)) if *r == run => match entry {
                None => *best = None,
                Some(h) => {
                    if best.as_ref().is_none_or(|b| b.next_seq < h.next_seq) {
                        *best = Some(h);
                    }
                }
            },
            _ => {
                if let Some((r, Some(h))) = current.take() {
                    heads.push((r, h));
                }
                current = Some((run, entry));
            }
        }
    }
    if let Some((r, Some(h))) = current {
        heads.push((r, h));
    }
    out.heads = heads.into_iter().collect();
    Ok(out)
}

/// The fingerprint of the clean-close line that ends `<dir>/keel-manifest`, read from the
/// file's last bytes only; `None` when there is no manifest or its last complete line is
/// not a (valid) clean-close line. What [`parse`] says of the whole file agrees: a valid
/// last line is the last entry it counts.
pub(crate) fn read_clean_tail(dir: &Path) -> Result<Option<Fingerprint>, ManifestError> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL_BYTES: u64 = 512;
    let path = dir.join(MANIFEST_FILE);
    let read_err = |source| ManifestError::Read { path: path.clone(), source };
    let mut file = match File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(read_err)?,
    };
    let len = file.metadata().map_err(read_err)?.len();
    let from = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(from)).map_err(read_err)?;
    let mut tail = Vec::new();
    file.take(TAIL_BYTES).read_to_end(&mut tail).map_err(read_err)?;
    // The last complete line, whole: it starts after the newline before it (or at the
    // file's start).
    let Some(end) = tail.iter().rposition(|b| *b == b'\n') else { return Ok(None) };
    let body = tail.get(..end).unwrap_or_default();
    let start = match body.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if from == 0 => 0,
        None => return Ok(None),
    };
    let last = body.get(start..).unwrap_or_default();
    match std::str::from_utf8(last).map_err(|_| String::new()).and_then(parse_line) {
        Ok(Entry::Clean(fp)) => Ok(Some(fp)),
        _ => Ok(None),
    }
}

/// Reads and parses `<dir>/keel-manifest`; `None` when there is none.
pub(crate) fn read(dir: &Path) -> Result<Option<Parsed>, ManifestError> {
    use std::io::Read;
    let path = dir.join(MANIFEST_FILE);
    let read_err = |source| ManifestError::Read { path: path.clone(), source };
    let file = match File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(read_err)?,
    };
    let len = file.metadata().map_err(read_err)?.len();
    if len > MANIFEST_BYTES_MAX {
        // Never cut short: the lines past the cut would read as a torn tail, and the
        // heads they hold would be forgotten.
        return Err(ManifestError::Damaged {
            path: path.clone(),
            line: 0,
            reason: format!("{len} bytes, more than the {MANIFEST_BYTES_MAX} read"),
        });
    }
    let mut bytes = Vec::new();
    file.take(MANIFEST_BYTES_MAX).read_to_end(&mut bytes).map_err(read_err)?;
    parse(&path, &bytes).map(Some)
}

/// The committed heads that `head`/`stored_hash` (sled's view) no longer back.
pub(crate) fn find_lost(
    committed: &BTreeMap<RunId, CommittedHead>,
    head: impl Fn(RunId) -> Result<Head, StoreError>,
    stored_hash: impl Fn(RunId, u64) -> Result<Option<Hash32>, StoreError>,
) -> Vec<LostRecords> {
    let mut lost = Vec::new();
    for (run, c) in committed {
        let Some(last) = c.next_seq.0.checked_sub(1) else { continue };
        let lose =
            |from: u64, reason: String| LostRecords { run: *run, from: Seq(from), committed_next: c.next_seq, reason };
        let h = match head(*run) {
            Ok(h) => h,
            Err(e) => {
                lost.push(lose(0, format!("the run's head does not read: {e}")));
                continue;
            }
        };
        let found = h.next_seq.0;
        if found < c.next_seq.0 {
            lost.push(lose(found, format!("the database holds {found} of {} committed records", c.next_seq.0)));
            continue;
        }
        // The head is read from the run's last stored record: when that is the committed
        // last one, its hash is the one to compare (no second read of the same record).
        let at_last = if found == c.next_seq.0 { Ok(Some(h.last_hash)) } else { stored_hash(*run, last) };
        match at_last {
            Ok(Some(h)) if h == c.last_hash => {}
            Ok(Some(_)) => lost.push(lose(last, format!("record {last} differs from the committed one"))),
            Ok(None) => lost.push(lose(last, format!("record {last} is missing"))),
            Err(e) => lost.push(lose(last, format!("record {last} does not read: {e}"))),
        }
    }
    lost
}

/// The open manifest of a writable store.
pub(crate) struct Manifest {
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// Heads written to sled since the last flush began.
    pending: BTreeMap<RunId, CommittedHead>,
    dir: PathBuf,
    /// The file's size now, and after its last rewrite.
    bytes: u64,
    base: u64,
    /// [`COMPACT_BYTES_MIN`] (smaller in tests).
    compact_min: u64,
}

/// Writes a fresh manifest holding `heads` (temporary file, fsync, rename, directory
/// fsync); returns it open for appending, and its size.
fn write_fresh(dir: &Path, heads: &BTreeMap<RunId, CommittedHead>) -> Result<(File, u64), StoreError> {
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let mut text = line(HEADER);
    for (run, h) in heads {
        text.push_str(&head_line(*run, h));
    }
    let path = dir.join(MANIFEST_FILE);
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        std::fs::OpenOptions::new().append(true).open(&path)
    })();
    let file = written.map_err(|source| StoreError::File { action: "write", path, source })?;
    Ok((file, u64::try_from(text.len()).unwrap_or(u64::MAX)))
}

impl Manifest {
    /// The manifest open for appending as `file`, `bytes` long.
    fn of(file: File, dir: &Path, bytes: u64) -> Manifest {
        let inner = Inner {
            file,
            pending: BTreeMap::new(),
            dir: dir.to_path_buf(),
            bytes,
            base: bytes,
            compact_min: COMPACT_BYTES_MIN,
        };
        Manifest { inner: Mutex::new(inner) }
    }

    /// Writes a fresh manifest holding `heads` (temporary file, fsync, rename, directory
    /// fsync) and opens it for appending.
    pub(crate) fn rewrite(dir: &Path, heads: &BTreeMap<RunId, CommittedHead>) -> Result<Manifest, StoreError> {
        let (file, bytes) = write_fresh(dir, heads)?;
        Ok(Manifest::of(file, dir, bytes))
    }

    /// Opens the existing manifest for appending (a clean open that need not compact it:
    /// its lines stay, later ones are appended; the clean-close line stops counting as
    /// soon as one follows it).
    pub(crate) fn reopen(dir: &Path) -> Result<Manifest, StoreError> {
        let path = dir.join(MANIFEST_FILE);
        let opened = std::fs::OpenOptions::new().append(true).open(&path).and_then(|f| Ok((f.metadata()?.len(), f)));
        let (bytes, file) = opened.map_err(|source| StoreError::File { action: "open", path, source })?;
        Ok(Manifest::of(file, dir, bytes))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a head written to sled (made durable by the next flush).
    pub(crate) fn note(&self, run: RunId, head: &Head) {
        let h = CommittedHead { next_seq: head.next_seq, last_hash: head.last_hash };
        let mut inner = self.lock();
        let keep = inner.pending.get(&run).is_some_and(|old| old.next_seq >= h.next_seq);
        if !keep {
            inner.pending.insert(run, h);
        }
    }

    /// Takes the heads noted so far: call BEFORE sled's flush, so every head taken is
    /// covered by it.
    pub(crate) fn take(&self) -> BTreeMap<RunId, CommittedHead> {
        std::mem::take(&mut self.lock().pending)
    }

    /// Appends `heads` (after sled's flush succeeded), durable per `level`.
    pub(crate) fn append(&self, heads: &BTreeMap<RunId, CommittedHead>, level: Level) -> Result<(), StoreError> {
        if heads.is_empty() {
            return Ok(());
        }
        let text: String = heads.iter().map(|(run, h)| head_line(*run, h)).collect();
        self.write(&text, level)
    }

    /// Records, durably and before sled removes anything, that `run` is being removed on
    /// purpose: a crash after this line and before the removal leaves a run the manifest
    /// no longer expects (nothing reported); the other order would report an archived run
    /// as lost. A removal that then fails writes the run's head again ([`Self::restore`]).
    pub(crate) fn removed(&self, run: RunId) -> Result<(), StoreError> {
        self.lock().pending.remove(&run);
        self.write(&line(&format!("r {run}")), Level::PowerLoss)
    }

    /// Expects `run`'s records again after a removal that did not happen.
    pub(crate) fn restore(&self, run: RunId, head: &Head) -> Result<(), StoreError> {
        let h = CommittedHead { next_seq: head.next_seq, last_hash: head.last_hash };
        self.write(&head_line(run, &h), Level::PowerLoss)
    }

    /// Records a clean close with the data file's fingerprint.
    pub(crate) fn close(&self, data_file: &Path) -> Result<(), StoreError> {
        let fp = Fingerprint::of(data_file)?;
        self.write(&line(&format!("c {} {} {}", fp.len, fp.mtime_ns, fp.ino)), Level::PowerLoss)
    }

    fn write(&self, text: &str, level: Level) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.file.write_all(text.as_bytes())?;
        if level == Level::PowerLoss {
            inner.file.sync_data()?;
        }
        inner.bytes = inner.bytes.saturating_add(u64::try_from(text.len()).unwrap_or(u64::MAX));
        if inner.bytes > inner.compact_min.max(inner.base.saturating_mul(3)) {
            // The file's own lines, compacted: one per run (what they say together),
            // written beside it and renamed over it. A failure leaves the file as it was.
            let compacted = read(&inner.dir)
                .map_err(|e| StoreError::CorruptStore { path: inner.dir.clone(), reason: e.to_string() })
                .and_then(|p| write_fresh(&inner.dir, &p.map(|p| p.heads).unwrap_or_default()));
            match compacted {
                Ok((file, bytes)) => {
                    inner.file = file;
                    inner.bytes = bytes;
                    inner.base = bytes;
                }
                Err(e) => {
                    tracing::warn!(dir = %inner.dir.display(), error = %e, "cannot compact the manifest (it keeps growing)");
                    inner.base = inner.bytes;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn run(n: u8) -> RunId {
        RunId::from_bytes([n; 16])
    }

    fn text(lines: &[String]) -> Vec<u8> {
        lines.concat().into_bytes()
    }

    #[test]
    fn a_removed_run_is_no_longer_expected_until_a_later_head_line() {
        let h = |n| CommittedHead { next_seq: Seq(n), last_hash: [n as u8; 32] };
        let removal = line(&format!("r {}", run(1)));
        let bytes = text(&[line(HEADER), head_line(run(1), &h(3)), removal.clone()]);
        let p = parse(Path::new("m"), &bytes).unwrap();
        assert!(!p.heads.contains_key(&run(1)));
        let bytes = text(&[line(HEADER), head_line(run(1), &h(3)), removal, head_line(run(1), &h(3))]);
        let p = parse(Path::new("m"), &bytes).unwrap();
        assert_eq!(p.heads[&run(1)], h(3), "a failed removal writes the head again");
    }

    #[test]
    fn keeps_the_highest_head_per_run_and_ignores_a_torn_tail() {
        let h = |n| CommittedHead { next_seq: Seq(n), last_hash: [n as u8; 32] };
        let mut bytes =
            text(&[line(HEADER), head_line(run(1), &h(3)), head_line(run(1), &h(2)), head_line(run(2), &h(1))]);
        bytes.extend_from_slice(b"h 0000 torn");
        let p = parse(Path::new("m"), &bytes).unwrap();
        assert_eq!(p.heads[&run(1)], h(3));
        assert_eq!(p.heads[&run(2)], h(1));
        assert!(p.clean.is_none());
    }

    #[test]
    fn a_damaged_line_followed_by_a_good_one_is_damage_a_damaged_last_line_is_torn() {
        let h = CommittedHead { next_seq: Seq(1), last_hash: [1; 32] };
        let mut bad = head_line(run(1), &h);
        bad.replace_range(2..3, "f");
        let torn = text(&[line(HEADER), head_line(run(2), &h), bad.clone()]);
        assert_eq!(parse(Path::new("m"), &torn).unwrap().heads.len(), 1);
        let damaged = text(&[line(HEADER), bad, head_line(run(2), &h)]);
        let err = parse(Path::new("m"), &damaged).unwrap_err();
        assert!(matches!(err, ManifestError::Damaged { line: 2, .. }), "{err}");
    }

    #[test]
    fn a_clean_close_counts_only_as_the_last_line() {
        let c = line("c 10 20 30");
        let p = parse(Path::new("m"), &text(&[line(HEADER), c.clone()])).unwrap();
        assert_eq!(p.clean, Some(Fingerprint { len: 10, mtime_ns: 20, ino: 30 }));
        let h = CommittedHead { next_seq: Seq(1), last_hash: [1; 32] };
        let p = parse(Path::new("m"), &text(&[line(HEADER), c, head_line(run(1), &h)])).unwrap();
        assert!(p.clean.is_none());
    }

    /// The clean-close line is read from the file's end alone, and agrees with the parse.
    #[test]
    fn the_clean_tail_is_the_last_complete_line_when_it_is_a_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let h = CommittedHead { next_seq: Seq(3), last_hash: [9; 32] };
        let mut lines: Vec<String> = vec![line(HEADER)];
        // Longer than the tail read, so the line before is not in it.
        lines.extend((0..20).map(|i| head_line(run(i), &h)));
        let c = line("c 10 20 30");
        let cases: Vec<(String, bool)> = vec![
            (format!("{}{c}", lines.concat()), true),
            (format!("{}{c}h {} 1 00", lines.concat(), run(1)), true), // a torn append after it
            (format!("{}{c}{}", lines.concat(), head_line(run(1), &h)), false),
            (lines.concat(), false),
            (format!("{}c 10 20 31\tdeadbeef\n", lines.concat()), false), // fails its checksum
            (c.clone(), true),
        ];
        for (text, clean) in cases {
            std::fs::write(dir.path().join(MANIFEST_FILE), &text).unwrap();
            let tail = read_clean_tail(dir.path()).unwrap();
            assert_eq!(tail.is_some(), clean, "{text}");
            let parsed = parse(Path::new("m"), text.as_bytes()).unwrap();
            if clean {
                assert_eq!(parsed.clean, tail, "{text}");
                assert_eq!(tail, Some(Fingerprint { len: 10, mtime_ns: 20, ino: 30 }));
            }
        }
        std::fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        assert_eq!(read_clean_tail(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_torn_tail_is_marked_so_it_is_not_appended_to() {
        let h = CommittedHead { next_seq: Seq(1), last_hash: [1; 32] };
        let good = text(&[line(HEADER), head_line(run(1), &h)]);
        assert!(!parse(Path::new("m"), &good).unwrap().torn);
        let mut cut = good.clone();
        cut.extend_from_slice(b"h 0101 to");
        assert!(parse(Path::new("m"), &cut).unwrap().torn);
        let bad = text(&[line(HEADER), head_line(run(1), &h), "h junk\tdeadbeef\n".to_string()]);
        assert!(parse(Path::new("m"), &bad).unwrap().torn);
    }

    /// An open store's manifest does not grow without bound: past its threshold it is
    /// rewritten from its own lines, one per run, and says the same as before.
    #[test]
    fn an_open_manifest_is_compacted_from_its_own_lines_and_says_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::rewrite(dir.path(), &BTreeMap::new()).unwrap();
        m.lock().compact_min = 4096;
        for seq in 1..=300u64 {
            let heads: BTreeMap<RunId, CommittedHead> =
                (0..5).map(|r| (run(r), CommittedHead { next_seq: Seq(seq), last_hash: [r; 32] })).collect();
            m.append(&heads, Level::ProcessCrash).unwrap();
            if seq == 200 {
                m.removed(run(3)).unwrap();
            }
        }
        let size = std::fs::metadata(dir.path().join(MANIFEST_FILE)).unwrap().len();
        // 300 rounds of 5 lines is ~170 KB uncompacted.
        assert!(size < 16 * 1024, "{size} bytes: never compacted");
        let p = read(dir.path()).unwrap().unwrap();
        let expected: Vec<(RunId, u64)> = [0u8, 1, 2, 3, 4].iter().map(|r| (run(*r), 300)).collect();
        let found: Vec<(RunId, u64)> = p.heads.iter().map(|(r, h)| (*r, h.next_seq.0)).collect();
        assert_eq!(found, expected, "the removal of run 3 at 200 is followed by its heads 201..=300");
        assert!(!p.torn);
    }

    /// `cargo test --release -p keel-store --lib manifest_parse_time -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn manifest_parse_time() {
        let mut text = line(HEADER);
        for i in 0..100_000u32 {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            text.push_str(&head_line(RunId::from_bytes(b), &CommittedHead { next_seq: Seq(12), last_hash: [7; 32] }));
        }
        let t = std::time::Instant::now();
        let p = parse(Path::new("m"), text.as_bytes()).unwrap();
        eprintln!("parse of {} bytes, {} runs: {:?}", text.len(), p.heads.len(), t.elapsed());
    }
}
