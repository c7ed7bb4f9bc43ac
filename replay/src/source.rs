//! Where a run's history comes from: a keel database (sled) or an export file (JSONL).
//!
//! Both are read as streams: a database run by run through [`EventLog::read`], an export
//! line by line through [`ExportReader`], so neither is ever held in memory whole.

use crate::error::ReplayError;
use crate::format;
use keel_engine::{read_logged, Event, Logged};
use keel_store::{EventLog, Hash32, RunId, Seq, SledStore, StoreConfig, StoreError};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Opens the keel database in `dir`. With `create = false` a missing database is
/// [`ReplayError::DbNotFound`]; a database another process holds is
/// [`ReplayError::DbLocked`].
pub fn open_db(dir: &Path, create: bool) -> Result<SledStore, ReplayError> {
    let config = StoreConfig { create, ..StoreConfig::default() };
    SledStore::open(dir, config).map_err(|e| match e {
        StoreError::Locked { .. } => ReplayError::DbLocked { path: dir.to_path_buf() },
        StoreError::NotFound { .. } => ReplayError::DbNotFound { path: dir.to_path_buf() },
        StoreError::NotAStore { reason, .. } => ReplayError::NotADb { path: dir.to_path_buf(), reason },
        other => ReplayError::Store(other),
    })
}

/// Resolves a run id given in full or as a unique prefix (hyphens optional,
/// case-insensitive) among `runs`.
pub fn resolve_run_in(runs: &[RunId], given: &str) -> Result<RunId, ReplayError> {
    let want: String = given.trim().chars().filter(|c| *c != '-').collect::<String>().to_ascii_lowercase();
    if want.is_empty() || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ReplayError::UnknownRun(given.to_owned()));
    }
    let matches: Vec<RunId> = runs.iter().copied().filter(|r| r.0.simple().to_string().starts_with(&want)).collect();
    match matches.as_slice() {
        [] => Err(ReplayError::UnknownRun(given.to_owned())),
        [one] => Ok(*one),
        many => Err(ReplayError::AmbiguousRun {
            prefix: given.to_owned(),
            count: many.len(),
            examples: many.iter().take(3).map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Resolves a run id or unique prefix against the runs of a database.
pub fn resolve_run(log: &dyn EventLog, given: &str) -> Result<RunId, ReplayError> {
    // A full id needs no scan of the run list.
    if let Ok(run) = given.trim().parse::<RunId>() {
        return if log.head(run)?.next_seq.0 > 0 { Ok(run) } else { Err(ReplayError::UnknownRun(given.to_owned())) };
    }
    resolve_run_in(&log.runs()?, given)
}

/// Every event of `run` from a database, decoded, in seq order.
pub fn load_run_from_db(log: &dyn EventLog, run: RunId) -> Result<Vec<Logged>, ReplayError> {
    let events = read_logged(log, run, Seq(0))?.collect::<Result<Vec<_>, _>>()?;
    if events.is_empty() {
        return Err(ReplayError::UnknownRun(run.to_string()));
    }
    Ok(events)
}

/// The header line of an export.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportHeader {
    pub line: u64,
    pub format: String,
    pub exported_at: String,
    pub filter: Value,
    pub redacted: Vec<String>,
}

/// One exported record, as written (payload fields possibly redacted).
#[derive(Clone, Debug, PartialEq)]
pub struct ExportRecord {
    /// 1-based line number in the file.
    pub line: u64,
    pub run: RunId,
    pub seq: u64,
    pub time_us: i64,
    pub kind: String,
    pub schema_version: u16,
    pub payload: Map<String, Value>,
    pub payload_root: Hash32,
    pub prev_hash: Hash32,
    pub hash: Hash32,
}

/// The trailer line of a run in an export.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEnd {
    pub line: u64,
    pub run: RunId,
    pub records: u64,
    pub head: Hash32,
}

/// One line of an export file.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportLine {
    Header(ExportHeader),
    Record(ExportRecord),
    RunEnd(RunEnd),
}

impl ExportRecord {
    /// The redacted field names of this record (`{"$redacted": "<hex>"}` values).
    pub fn redacted_fields(&self) -> Vec<&str> {
        self.payload.iter().filter(|(_, v)| format::redacted_digest(v).is_some()).map(|(k, _)| k.as_str()).collect()
    }

    /// Rebuilds the event. A redacted field makes that impossible:
    /// [`ReplayError::Redacted`] names it.
    pub fn to_logged(&self, path: &Path) -> Result<Logged, ReplayError> {
        if let Some(field) = self.redacted_fields().first() {
            return Err(ReplayError::Redacted {
                run: self.run,
                seq: self.seq,
                kind: self.kind.clone(),
                field: (*field).to_owned(),
            });
        }
        if !Event::KINDS.contains(&self.kind.as_str()) {
            return Err(self.bad(path, format!("unknown event kind {:?}", self.kind)));
        }
        let event = Event::from_fields(&self.kind, self.payload.clone())
            .map_err(|e| self.bad(path, format!("payload does not decode as {}: {e}", self.kind)))?;
        Ok(Logged { run: self.run, seq: Seq(self.seq), at_us: self.time_us, event })
    }

    fn bad(&self, path: &Path, reason: String) -> ReplayError {
        ReplayError::Export { path: path.to_path_buf(), line: self.line, reason }
    }
}

/// Streams an export file line by line. Each line is parsed on its own; a bad line is a
/// typed error naming its number (never a panic), after which the reader stops.
pub struct ExportReader<R> {
    path: PathBuf,
    input: R,
    line: u64,
    done: bool,
    buf: Vec<u8>,
}

/// Opens an export file for streaming.
pub fn read_export(path: &Path) -> Result<ExportReader<BufReader<File>>, ReplayError> {
    let file = File::open(path).map_err(|e| ReplayError::io(path, e))?;
    Ok(ExportReader::new(path, BufReader::new(file)))
}

impl<R: BufRead> ExportReader<R> {
    pub fn new(path: &Path, input: R) -> Self {
        ExportReader { path: path.to_path_buf(), input, line: 0, done: false, buf: Vec::new() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, reason: impl Into<String>) -> ReplayError {
        ReplayError::Export { path: self.path.clone(), line: self.line, reason: reason.into() }
    }

    /// The next non-blank line's bytes, or `None` at the end.
    fn next_line(&mut self) -> Result<Option<()>, ReplayError> {
        loop {
            self.buf.clear();
            self.line += 1;
            let limit = format::LINE_BYTES_MAX as u64 + 1;
            let n = (&mut self.input)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| ReplayError::io(&self.path, e))?;
            if n == 0 {
                return Ok(None);
            }
            if self.buf.len() > format::LINE_BYTES_MAX {
                return Err(self.err(format!("line longer than {} bytes", format::LINE_BYTES_MAX)));
            }
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Ok(Some(()));
        }
    }

    fn parse(&self) -> Result<ExportLine, ReplayError> {
        let value: Value = serde_json::from_slice(&self.buf).map_err(|e| self.err(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(self.err("not a JSON object"));
        };
        let get = |k: &str| obj.get(k).ok_or_else(|| self.err(format!("field `{k}` missing")));
        let str_of = |k: &str| -> Result<String, ReplayError> {
            get(k)?.as_str().map(str::to_owned).ok_or_else(|| self.err(format!("field `{k}` is not a string")))
        };
        let u64_of =
            |k: &str| get(k)?.as_u64().ok_or_else(|| self.err(format!("field `{k}` is not an unsigned integer")));
        let run_of = || -> Result<RunId, ReplayError> {
            let s = str_of("run")?;
            s.parse::<RunId>().map_err(|e| self.err(format!("field `run` is not a run id: {e}")))
        };
        let hash_of = |k: &str| -> Result<Hash32, ReplayError> {
            let s = str_of(k)?;
            format::parse_hash(&s).ok_or_else(|| self.err(format!("field `{k}` is not 64 lowercase hex digits")))
        };
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or(if obj.contains_key("format") {
            "header"
        } else {
            "record"
        });
        match kind {
            "header" => {
                let fmt = str_of("format")?;
                if fmt != format::FORMAT {
                    return Err(self.err(format!("unsupported format {fmt:?} (this keel reads {})", format::FORMAT)));
                }
                let redacted = match obj.get("redacted") {
                    Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                    _ => Vec::new(),
                };
                Ok(ExportLine::Header(ExportHeader {
                    line: self.line,
                    format: fmt,
                    exported_at: obj.get("exported_at").and_then(Value::as_str).unwrap_or("").to_owned(),
                    filter: obj.get("filter").cloned().unwrap_or(Value::Null),
                    redacted,
                }))
            }
            "run_end" => Ok(ExportLine::RunEnd(RunEnd {
                line: self.line,
                run: run_of()?,
                records: u64_of("records")?,
                head: hash_of("head")?,
            })),
            "record" => {
                let payload = match get("payload")? {
                    Value::Object(m) => m.clone(),
                    _ => return Err(self.err("field `payload` is not an object")),
                };
                let schema_version = u16::try_from(u64_of("schema_version")?)
                    .map_err(|_| self.err("field `schema_version` is out of range"))?;
                let time_us = get("time_us")?.as_i64().ok_or_else(|| self.err("field `time_us` is not an integer"))?;
                for (field, v) in &payload {
                    if let Some(Err(reason)) = format::redaction_marker(v) {
                        return Err(self.err(format!("payload field `{field}`: {reason}")));
                    }
                }
                Ok(ExportLine::Record(ExportRecord {
                    line: self.line,
                    run: run_of()?,
                    seq: u64_of("seq")?,
                    time_us,
                    kind: str_of("kind")?,
                    schema_version,
                    payload,
                    payload_root: hash_of("payload_root")?,
                    prev_hash: hash_of("prev_hash")?,
                    hash: hash_of("hash")?,
                }))
            }
            other => Err(self.err(format!("unknown line type {other:?}"))),
        }
    }
}

impl<R: BufRead> Iterator for ExportReader<R> {
    type Item = Result<ExportLine, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let out = match self.next_line() {
            Ok(None) => {
                self.done = true;
                return None;
            }
            Ok(Some(())) => self.parse(),
            Err(e) => Err(e),
        };
        if out.is_err() {
            self.done = true;
        }
        Some(out)
    }
}

/// The runs of an export, one at a time: each item is one run's rebuilt events (records of
/// a run must be contiguous in the file, as `keel export` writes them).
pub struct ExportRuns<R: BufRead> {
    reader: std::iter::Peekable<ExportReader<R>>,
    path: PathBuf,
    failed: bool,
}

/// Streams the runs of an export file, rebuilding each run's events.
pub fn export_runs(path: &Path) -> Result<ExportRuns<BufReader<File>>, ReplayError> {
    let reader = read_export(path)?;
    Ok(ExportRuns { path: path.to_path_buf(), reader: reader.peekable(), failed: false })
}

impl<R: BufRead> Iterator for ExportRuns<R> {
    type Item = Result<(RunId, Vec<Logged>), ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let out = self.next_run();
        match out {
            Ok(None) => None,
            Ok(Some(x)) => Some(Ok(x)),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl<R: BufRead> ExportRuns<R> {
    fn next_run(&mut self) -> Result<Option<(RunId, Vec<Logged>)>, ReplayError> {
        let mut run: Option<RunId> = None;
        let mut events: Vec<Logged> = Vec::new();
        loop {
            // Stop before a record of another run.
            if let (Some(r), Some(Ok(ExportLine::Record(next)))) = (run, self.reader.peek()) {
                if next.run != r {
                    break;
                }
            }
            let Some(line) = self.reader.next() else { break };
            match line? {
                ExportLine::Header(_) => {}
                ExportLine::Record(rec) => {
                    run = Some(rec.run);
                    if rec.seq != events.len() as u64 {
                        return Err(ReplayError::Export {
                            path: self.path.clone(),
                            line: rec.line,
                            reason: format!(
                                "run {} seq {}: expected seq {} (run `keel verify` on this file)",
                                rec.run,
                                rec.seq,
                                events.len()
                            ),
                        });
                    }
                    events.push(rec.to_logged(&self.path)?);
                }
                ExportLine::RunEnd(end) => {
                    if run == Some(end.run) {
                        break;
                    }
                }
            }
        }
        Ok(run.map(|r| (r, events)))
    }
}

/// The export files of a folder (`*.jsonl`, sorted by name), or the file itself.
pub fn export_files(path: &Path) -> Result<Vec<PathBuf>, ReplayError> {
    let meta = std::fs::metadata(path).map_err(|e| ReplayError::io(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| ReplayError::io(path, e))? {
        let entry = entry.map_err(|e| ReplayError::io(path, e))?;
        let p = entry.path();
        if p.extension().and_then(|e| e.to_str()) == Some("jsonl") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ReplayError::Invalid(format!("{} holds no *.jsonl export files", path.display())));
    }
    Ok(files)
}
