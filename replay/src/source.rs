//! Where a run's history comes from: a keel database (sled) or an export file (JSONL).
//!
//! Both are read as streams: a database run by run through [`EventLog::read`], an export
//! line by line through [`ExportReader`], so neither is ever held in memory whole.

use crate::error::ReplayError;
use crate::format;
use keel_engine::{read_logged, read_logged_runs, Event, Logged};
use keel_store::{EventLog, Hash32, RunId, Seq};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

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
    // A prefix names the ids between it padded with 0s and with fs: only those runs are
    // listed (a skip scan of them), not every run of the database.
    match prefix_range(given) {
        Some((lo, hi)) => resolve_run_in(&log.runs_between(lo, hi)?, given),
        None => Err(ReplayError::UnknownRun(given.to_owned())),
    }
}

/// The lowest and highest run ids `given` (hex digits, hyphens anywhere, up to 32 digits)
/// is a prefix of; `None` if it is not such a prefix.
pub fn prefix_range(given: &str) -> Option<(RunId, RunId)> {
    let hex: String = given.trim().chars().filter(|c| *c != '-').collect::<String>().to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let pad = |fill: char| -> Option<RunId> {
        let mut full = hex.clone();
        full.extend(std::iter::repeat_n(fill, 32 - hex.len()));
        u128::from_str_radix(&full, 16).ok().map(|n| RunId(uuid::Uuid::from_u128(n)))
    };
    Some((pad('0')?, pad('f')?))
}

/// Every event of `run` from a database, decoded, in seq order.
pub fn load_run_from_db(log: &dyn EventLog, run: RunId) -> Result<Vec<Logged>, ReplayError> {
    let events = read_logged(log, run, Seq(0))?.collect::<Result<Vec<_>, _>>()?;
    if events.is_empty() {
        return Err(ReplayError::UnknownRun(run.to_string()));
    }
    Ok(events)
}

/// [`load_run_from_db`] of each of `runs` in turn, through one read-ahead pass
/// ([`read_logged_runs`]): the events of one run at a time, in the order given.
pub fn load_runs_from_db<'a>(
    log: &'a dyn EventLog,
    runs: &'a [RunId],
) -> impl Iterator<Item = Result<Vec<Logged>, ReplayError>> + 'a {
    let mut events = read_logged_runs(log, runs).peekable();
    runs.iter().enumerate().map(move |(i, &run)| {
        let mut out = Vec::new();
        // Items come run after run in the order of `runs`; a run with no records has none.
        while let Some((_, r)) = events.next_if(|(j, _)| *j == i) {
            out.push(r?);
        }
        if out.is_empty() {
            return Err(ReplayError::UnknownRun(run.to_string()));
        }
        Ok(out)
    })
}

/// The header line of an export.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportHeader {
    /// 1-based line number in the file.
    pub line: u64,
    /// The export format name and version.
    pub format: String,
    /// When the export was made (RFC 3339).
    pub exported_at: String,
    /// What was selected (the runs, or `--all` with its time range).
    pub filter: Value,
    /// The redaction rules applied (`FIELD` or `Kind.FIELD`).
    pub redacted: Vec<String>,
    /// When the export was made, µs since the Unix epoch (absent in hand-made files).
    pub exported_at_us: Option<i64>,
    /// The line's bytes as written (without its newline): what a signature covers.
    pub raw: Vec<u8>,
}

/// The signature line that ends a signed export (docs/EXPORT.md, "Signature").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSignature {
    /// 1-based line number in the file.
    pub line: u64,
    /// The algorithm (`ed25519`).
    pub alg: String,
    /// The signer's public key, 64 hex digits.
    pub key: String,
    /// The signature, 128 hex digits.
    pub sig: String,
}

/// One exported record, as written (payload fields possibly redacted).
#[derive(Clone, Debug, PartialEq)]
pub struct ExportRecord {
    /// 1-based line number in the file.
    pub line: u64,
    /// The run.
    pub run: RunId,
    /// The record's seq in its run.
    pub seq: u64,
    /// When it was recorded, microseconds since the Unix epoch.
    pub time_us: i64,
    /// The same time as RFC 3339 UTC, as the line states it (`None` if absent): not
    /// hashed, so verification checks it against `time_us`.
    pub time: Option<String>,
    /// The event kind.
    pub kind: String,
    /// The record envelope's schema version (1 or 2).
    pub schema_version: u16,
    /// The event's payload fields as exported (redacted ones replaced by `{"$redacted": "<hex>"}`).
    pub payload: Map<String, Value>,
    /// Merkle root of the payload fields: what a redacted export still proves.
    pub payload_root: Hash32,
    /// SHA-256 of the stored payload bytes, which the record digest of schema version 2
    /// covers; `None` for a version-1 record (the field is absent).
    pub payload_digest: Option<Hash32>,
    /// The payload's layout version, which the record digest of schema version 3 covers;
    /// `None` for records of versions 1 and 2 (the field is absent; their payload version
    /// is 1).
    pub payload_version: Option<u16>,
    /// Hash of the previous record of the run (zero for seq 0).
    pub prev_hash: Hash32,
    /// This record's chain hash.
    pub hash: Hash32,
}

/// The trailer line of a run in an export.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEnd {
    /// 1-based line number in the file.
    pub line: u64,
    /// The run.
    pub run: RunId,
    /// Records of the run in the export.
    pub records: u64,
    /// The run's head hash: the hash of its last record.
    pub head: Hash32,
}

/// One line of an export file.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportLine {
    /// The export's first line.
    Header(ExportHeader),
    /// One event record.
    Record(ExportRecord),
    /// The last line of a run's records.
    RunEnd(RunEnd),
    /// A part of a payload that records refer to ([`crate::payloads`]).
    Payload(crate::payloads::ExportPayload),
    /// The signature of a signed export (its last line).
    Signature(ExportSignature),
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
    /// A reader of the export lines of `input`; `path` names it in errors.
    pub fn new(path: &Path, input: R) -> Self {
        ExportReader { path: path.to_path_buf(), input, line: 0, done: false, buf: Vec::new() }
    }

    /// The path errors name.
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

    /// The next non-blank line, read by `read`; `None` at the end. The first error ends the
    /// iteration (shared by both iterators over an export's lines).
    fn next_with<T>(&mut self, read: impl FnOnce(&Self) -> Result<T, ReplayError>) -> Option<Result<T, ReplayError>> {
        if self.done {
            return None;
        }
        let out = match self.next_line() {
            Ok(None) => {
                self.done = true;
                return None;
            }
            Ok(Some(())) => read(self),
            Err(e) => Err(e),
        };
        if out.is_err() {
            self.done = true;
        }
        Some(out)
    }

    fn parse(&self) -> Result<ExportLine, ReplayError> {
        let value: Value = serde_json::from_slice(&self.buf).map_err(|e| self.err(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(self.err("not a JSON object"));
        };
        let f = Fields { obj: &obj, at: self };
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or(if obj.contains_key("format") {
            "header"
        } else {
            "record"
        });
        match kind {
            "header" => parse_header(&f),
            "run_end" => Ok(ExportLine::RunEnd(RunEnd {
                line: self.line,
                run: f.run()?,
                records: f.u64_of("records")?,
                head: f.hash_of("head")?,
            })),
            "record" => parse_record(&f),
            "signature" => Ok(ExportLine::Signature(ExportSignature {
                line: self.line,
                alg: f.str_of("alg")?,
                key: f.str_of("key")?,
                sig: f.str_of("sig")?,
            })),
            "payload" => crate::payloads::parse_payload_fields(&obj, self.line)
                .map(ExportLine::Payload)
                .map_err(|reason| self.err(reason)),
            other => Err(self.err(format!("unknown line type {other:?}"))),
        }
    }
}

impl<R: BufRead> Iterator for ExportReader<R> {
    type Item = Result<ExportLine, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(Self::parse)
    }
}

/// The runs of an export, one at a time: each item is one run's rebuilt events (records of
/// a run must be contiguous in the file, as `keel export` writes them).
///
/// Records are rebuilt by [`rebuild_record_fast`] where it can; any line it does not take
/// goes the way [`ExportReader`] and [`ExportRecord::to_logged`] read it, so the events and
/// every error (with its line number) are the same as theirs.
pub struct ExportRuns<R: BufRead> {
    reader: std::iter::Peekable<RunLines<R>>,
    path: PathBuf,
    failed: bool,
    /// Events of the last run read: the capacity of the next run's vector.
    last_len: usize,
    /// Payloads read so far (checked against their digests), by digest.
    payloads: std::collections::BTreeMap<Hash32, String>,
    parts: crate::payloads::PayloadParts,
}

/// Streams the runs of an export file, rebuilding each run's events.
pub fn export_runs(path: &Path) -> Result<ExportRuns<BufReader<File>>, ReplayError> {
    let file = File::open(path).map_err(|e| ReplayError::io(path, e))?;
    // Larger reads than `read_export`'s: fewer system calls per line.
    let reader = ExportReader::new(path, BufReader::with_capacity(1 << 16, file));
    Ok(ExportRuns {
        path: path.to_path_buf(),
        reader: RunLines(reader).peekable(),
        failed: false,
        last_len: 0,
        payloads: Default::default(),
        parts: Default::default(),
    })
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
        let mut events: Vec<Logged> = Vec::with_capacity(self.last_len);
        loop {
            // Stop before a record of another run.
            if let (Some(r), Some(Ok(RunLine::Record(next)))) = (run, self.reader.peek()) {
                if next.run() != r {
                    break;
                }
            }
            let Some(line) = self.reader.next() else { break };
            match line? {
                RunLine::Header => {}
                RunLine::Record(rec) => {
                    run = Some(rec.run());
                    if rec.seq() != events.len() as u64 {
                        return Err(ReplayError::Export {
                            path: self.path.clone(),
                            line: rec.line(),
                            reason: format!(
                                "run {} seq {}: expected seq {} (run `keel verify` on this file)",
                                rec.run(),
                                rec.seq(),
                                events.len()
                            ),
                        });
                    }
                    let line = rec.line();
                    let mut logged = rec.into_logged(&self.path)?;
                    if keel_engine::model::payload::has_refs(&logged.event) {
                        crate::payloads::inflate_from(&mut logged.event, &self.payloads)
                            .map_err(|reason| ReplayError::Export { path: self.path.clone(), line, reason })?;
                    }
                    events.push(logged);
                }
                RunLine::RunEnd(end) => {
                    if run == Some(end) {
                        break;
                    }
                }
                RunLine::Payload(p) => {
                    let line = p.line;
                    let done = self.parts.add(p).map_err(|e| ReplayError::Export {
                        path: self.path.clone(),
                        line,
                        reason: match e {
                            crate::payloads::PartError::Altered(m) | crate::payloads::PartError::Malformed(m) => m,
                        },
                    })?;
                    if let Some((digest, text)) = done {
                        self.payloads.insert(digest, text);
                    }
                }
            }
        }
        self.last_len = events.len();
        Ok(run.map(|r| (r, events)))
    }
}

/// An export's lines as [`ExportRuns`] needs them.
struct RunLines<R>(ExportReader<R>);

/// One line for [`ExportRuns`].
// Moved once per line; boxing the event would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum RunLine {
    Header,
    Record(RunRecord),
    /// A run trailer: its run.
    RunEnd(RunId),
    /// A part of a payload.
    Payload(crate::payloads::ExportPayload),
}

/// A record line, rebuilt by the fast path or parsed by [`ExportReader`] (and rebuilt by
/// [`ExportRecord::to_logged`] once its seq is checked).
// Moved once per line; boxing the event would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum RunRecord {
    Rebuilt { line: u64, logged: Logged },
    Parsed(Box<ExportRecord>),
}

impl RunRecord {
    fn run(&self) -> RunId {
        match self {
            RunRecord::Rebuilt { logged, .. } => logged.run,
            RunRecord::Parsed(rec) => rec.run,
        }
    }

    fn seq(&self) -> u64 {
        match self {
            RunRecord::Rebuilt { logged, .. } => logged.seq.0,
            RunRecord::Parsed(rec) => rec.seq,
        }
    }

    fn line(&self) -> u64 {
        match self {
            RunRecord::Rebuilt { line, .. } => *line,
            RunRecord::Parsed(rec) => rec.line,
        }
    }

    fn into_logged(self, path: &Path) -> Result<Logged, ReplayError> {
        match self {
            RunRecord::Rebuilt { logged, .. } => Ok(logged),
            RunRecord::Parsed(rec) => rec.to_logged(path),
        }
    }
}

impl<R: BufRead> Iterator for RunLines<R> {
    type Item = Result<RunLine, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next_with(|reader| match fast_line(&reader.buf) {
            Some(FastLine::Record(logged)) => Ok(RunLine::Record(RunRecord::Rebuilt { line: reader.line, logged })),
            Some(FastLine::RunEnd(run)) => Ok(RunLine::RunEnd(run)),
            None => reader.parse().map(|line| match line {
                ExportLine::Header(_) | ExportLine::Signature(_) => RunLine::Header,
                ExportLine::Record(rec) => RunLine::Record(RunRecord::Parsed(Box::new(rec))),
                ExportLine::RunEnd(end) => RunLine::RunEnd(end.run),
                ExportLine::Payload(p) => RunLine::Payload(p),
            }),
        })
    }
}

/// Rebuilds the event of one export record line (its bytes) without building a
/// `serde_json::Value`: the line's fields are read borrowed and the payload is deserialized
/// straight into the [`Event`] its `kind` names.
///
/// `Some` only when [`ExportReader`] would read the line as a record and
/// [`ExportRecord::to_logged`] would rebuild the same [`Logged`] from it. `None` says
/// nothing about the line: it may be another line type, use something the fast path does
/// not take (escapes in the envelope's strings, fields it does not know, duplicate keys),
/// or be wrong; read it with [`ExportReader`] to find out (and to get the error).
pub fn rebuild_record_fast(line: &[u8]) -> Option<Logged> {
    match fast_line(line)? {
        FastLine::Record(logged) => Some(logged),
        FastLine::RunEnd(_) => None,
    }
}

/// What the fast path makes of a line.
// Moved once per line; boxing the event would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum FastLine {
    Record(Logged),
    RunEnd(RunId),
}

/// The fast path of [`RunLines`]: `None` sends the line to [`ExportReader::parse`].
fn fast_line(line: &[u8]) -> Option<FastLine> {
    // A redaction marker is `ExportReader`'s to report (or `to_logged`'s): no payload field
    // takes an object with a `$redacted` key without skipping the key, which `Strict`
    // refuses (tests/jsonl_fast_path.rs puts a marker on every field of every kind).
    // A line that is not UTF-8 as a whole does not parse (as a `Value` either); one that is
    // needs no check of each string.
    let text = std::str::from_utf8(line).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let f = de.deserialize_map(LineVisitor).ok()?;
    de.end().ok()?;
    match f.ty? {
        "record" => {
            // What `ExportReader::parse` checks, in its terms (the payload is an object:
            // `ObjectOnly`).
            u16::try_from(f.schema_version?).ok()?;
            let time_us = f.time_us?;
            let run = f.run?.parse::<RunId>().ok()?;
            let seq = f.seq?;
            f.kind?;
            if !(is_hash(f.payload_root?) && is_hash(f.prev_hash?) && is_hash(f.hash?)) {
                return None;
            }
            if f.payload_digest.is_some_and(|h| !is_hash(h)) {
                return None;
            }
            if f.payload_version.is_some_and(|v| u16::try_from(v).is_err()) {
                return None;
            }
            Some(FastLine::Record(Logged { run, seq: Seq(seq), at_us: time_us, event: f.event? }))
        }
        "run_end" => {
            if f.event.is_some() {
                return None;
            }
            let run = f.run?.parse::<RunId>().ok()?;
            f.records?;
            if !is_hash(f.head?) {
                return None;
            }
            Some(FastLine::RunEnd(run))
        }
        _ => None,
    }
}

/// [`format::parse_hash`] would take it.
fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The fields of a record or run trailer line, borrowed from it, and the event its payload
/// holds.
#[derive(Default)]
struct LineFields<'a> {
    ty: Option<&'a str>,
    run: Option<&'a str>,
    seq: Option<u64>,
    time_us: Option<i64>,
    /// Read (as a string) but not used, as `ExportReader::parse` does not use it.
    time: Option<()>,
    kind: Option<&'a str>,
    schema_version: Option<u64>,
    event: Option<Event>,
    payload_root: Option<&'a str>,
    /// Optional (schema version 2 records).
    payload_digest: Option<&'a str>,
    /// Optional (schema version 3 records); checked for range, as `ExportReader::parse`
    /// does.
    payload_version: Option<u64>,
    prev_hash: Option<&'a str>,
    hash: Option<&'a str>,
    records: Option<u64>,
    head: Option<&'a str>,
}

/// Reads a line's object into [`LineFields`]. Anything it cannot take as is fails (and the
/// line goes to [`ExportReader::parse`]): a field it does not know (it would be skipped,
/// and a skipped value is not checked the way a `Value` parse checks it), a field given
/// twice (a `Value` keeps the last), a string with escapes (it cannot be borrowed), a
/// `payload` before the `kind` that names its event.
struct LineVisitor;

fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::custom("a field given twice"));
    }
    *slot = Some(value);
    Ok(())
}

impl<'de> Visitor<'de> for LineVisitor {
    type Value = LineFields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an export line")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LineFields<'de>, A::Error> {
        let mut f = LineFields::default();
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                "type" => once(&mut f.ty, map.next_value()?)?,
                "run" => once(&mut f.run, map.next_value()?)?,
                "seq" => once(&mut f.seq, map.next_value()?)?,
                "time_us" => once(&mut f.time_us, map.next_value()?)?,
                "time" => {
                    map.next_value::<&'de str>()?;
                    once(&mut f.time, ())?
                }
                "kind" => once(&mut f.kind, map.next_value()?)?,
                "schema_version" => once(&mut f.schema_version, map.next_value()?)?,
                "payload" => {
                    let Some(kind) = f.kind else { return Err(de::Error::custom("payload before kind")) };
                    once(&mut f.event, map.next_value_seed(PayloadSeed { kind })?)?
                }
                "payload_root" => once(&mut f.payload_root, map.next_value()?)?,
                "payload_digest" => once(&mut f.payload_digest, map.next_value()?)?,
                "payload_version" => once(&mut f.payload_version, map.next_value()?)?,
                "prev_hash" => once(&mut f.prev_hash, map.next_value()?)?,
                "hash" => once(&mut f.hash, map.next_value()?)?,
                "records" => once(&mut f.records, map.next_value()?)?,
                "head" => once(&mut f.head, map.next_value()?)?,
                _ => return Err(de::Error::custom("a field the fast path does not read")),
            }
        }
        Ok(f)
    }
}

/// Deserializes a payload object straight into the event `kind` names, as
/// [`Event::from_fields`] rebuilds it from a `Value`. Nothing may be skipped ([`Strict`]):
/// a skipped value is not checked the way a `Value` parse checks it (depth, number range,
/// UTF-8, escapes).
struct PayloadSeed<'a> {
    kind: &'a str,
}

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_> {
    type Value = Event;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Event, D::Error> {
        Event::deserialize_fields(self.kind, ObjectOnly(Strict(d)))
    }
}

/// A deserializer that reads only an object (as a map), whatever it is asked for: the
/// payload must be an object (`ExportReader::parse`), also for `Escalated`, whose
/// `Escalation` struct would take an array as well.
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// A deserializer (and, nested, visitor / access / seed) that forwards everything to the
/// one it wraps but refuses to skip a value (`deserialize_ignored_any`: an unknown field).
struct Strict<T>(T);

/// The error of a value [`Strict`] refuses to skip.
fn skipped<E: de::Error>() -> E {
    E::custom("a field the fast path does not read")
}

macro_rules! strict_forward {
    ($($method:ident ( $($arg:ident : $ty:ty),* );)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                self.0.$method($($arg,)* Strict(visitor))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    strict_forward! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, D::Error> {
        Err(skipped())
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! strict_visit {
    ($($method:ident ( $ty:ty );)*) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
                self.0.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Strict<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.0.expecting(f)
    }

    strict_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(Strict(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(Strict(d))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(Strict(seq))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Strict(map))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.0.visit_enum(Strict(data))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Strict<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(Strict(d))
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Strict<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Strict(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Strict<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Strict(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Strict(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Strict<A> {
    type Error = A::Error;
    type Variant = Strict<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(Strict(seed))?;
        Ok((value, Strict(variant)))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Strict<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Strict(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Strict(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Strict(visitor))
    }
}

/// The export files of a folder (`*.jsonl`, sorted by name), or the file itself. A
/// `*.jsonl` entry that cannot be read (a dangling link, a directory, no permission) is
/// an error naming every such entry, never skipped: a folder of exports read in part
/// would look complete.
pub fn export_files(path: &Path) -> Result<Vec<PathBuf>, ReplayError> {
    let meta = std::fs::metadata(path).map_err(|e| ReplayError::io(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| ReplayError::io(path, e))? {
        let entry = entry.map_err(|e| ReplayError::io(path, e))?;
        let p = entry.path();
        if p.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        // Checked before opening: opening a FIFO would wait for a writer.
        match std::fs::metadata(&p).and_then(|m| if m.is_file() { std::fs::File::open(&p).map(Some) } else { Ok(None) })
        {
            Ok(Some(_)) => files.push(p),
            Ok(None) => unreadable.push(format!("{} (not a regular file)", p.display())),
            Err(e) => unreadable.push(format!("{} ({e})", p.display())),
        }
    }
    if !unreadable.is_empty() {
        unreadable.sort();
        return Err(ReplayError::Invalid(format!(
            "{} holds {} export file(s) that cannot be read: {}",
            path.display(),
            unreadable.len(),
            unreadable.join(", ")
        )));
    }
    files.sort();
    if files.is_empty() {
        return Err(ReplayError::Invalid(format!("{} holds no *.jsonl export files", path.display())));
    }
    Ok(files)
}

/// The fields of one export line, read with errors that name the line.
struct Fields<'a, R> {
    obj: &'a Map<String, Value>,
    at: &'a ExportReader<R>,
}

impl<R: BufRead> Fields<'_, R> {
    fn get(&self, k: &str) -> Result<&Value, ReplayError> {
        self.obj.get(k).ok_or_else(|| self.at.err(format!("field `{k}` missing")))
    }

    fn str_of(&self, k: &str) -> Result<String, ReplayError> {
        self.get(k)?.as_str().map(str::to_owned).ok_or_else(|| self.at.err(format!("field `{k}` is not a string")))
    }

    fn u64_of(&self, k: &str) -> Result<u64, ReplayError> {
        self.get(k)?.as_u64().ok_or_else(|| self.at.err(format!("field `{k}` is not an unsigned integer")))
    }

    fn run(&self) -> Result<RunId, ReplayError> {
        let s = self.str_of("run")?;
        s.parse::<RunId>().map_err(|e| self.at.err(format!("field `run` is not a run id: {e}")))
    }

    fn hash_of(&self, k: &str) -> Result<Hash32, ReplayError> {
        let s = self.str_of(k)?;
        format::parse_hash(&s).ok_or_else(|| self.at.err(format!("field `{k}` is not 64 lowercase hex digits")))
    }
}

/// A line's bytes without its `\n` (or `\r\n`).
fn without_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The header line: the format must be the one this keel reads.
fn parse_header<R: BufRead>(f: &Fields<'_, R>) -> Result<ExportLine, ReplayError> {
    let fmt = f.str_of("format")?;
    if fmt != format::FORMAT {
        return Err(f.at.err(format!("unsupported format {fmt:?} (this keel reads {})", format::FORMAT)));
    }
    let redacted = match f.obj.get("redacted") {
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    Ok(ExportLine::Header(ExportHeader {
        line: f.at.line,
        format: fmt,
        exported_at: f.obj.get("exported_at").and_then(Value::as_str).unwrap_or("").to_owned(),
        filter: f.obj.get("filter").cloned().unwrap_or(Value::Null),
        redacted,
        exported_at_us: f.obj.get("exported_at_us").and_then(Value::as_i64),
        raw: without_eol(&f.at.buf).to_vec(),
    }))
}

/// A record line; a malformed redaction marker in its payload is an error.
fn parse_record<R: BufRead>(f: &Fields<'_, R>) -> Result<ExportLine, ReplayError> {
    let payload = match f.get("payload")? {
        Value::Object(m) => m.clone(),
        _ => return Err(f.at.err("field `payload` is not an object")),
    };
    let schema_version =
        u16::try_from(f.u64_of("schema_version")?).map_err(|_| f.at.err("field `schema_version` is out of range"))?;
    let time_us = f.get("time_us")?.as_i64().ok_or_else(|| f.at.err("field `time_us` is not an integer"))?;
    for (field, v) in &payload {
        if let Some(Err(reason)) = format::redaction_marker(v) {
            return Err(f.at.err(format!("payload field `{field}`: {reason}")));
        }
    }
    Ok(ExportLine::Record(ExportRecord {
        line: f.at.line,
        run: f.run()?,
        seq: f.u64_of("seq")?,
        time_us,
        time: match f.obj.get("time") {
            None => None,
            Some(_) => Some(f.str_of("time")?),
        },
        kind: f.str_of("kind")?,
        schema_version,
        payload,
        payload_root: f.hash_of("payload_root")?,
        payload_digest: match f.obj.get("payload_digest") {
            None => None,
            Some(_) => Some(f.hash_of("payload_digest")?),
        },
        payload_version: match f.obj.get("payload_version") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| f.at.err("field `payload_version` is not an integer in 0..=65535"))?,
            ),
        },
        prev_hash: f.hash_of("prev_hash")?,
        hash: f.hash_of("hash")?,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_prefix_names_the_range_of_ids_it_begins() {
        let (lo, hi) = prefix_range("0C67-a0").unwrap();
        assert_eq!(lo.to_string(), "0c67a000-0000-0000-0000-000000000000");
        assert_eq!(hi.to_string(), "0c67a0ff-ffff-ffff-ffff-ffffffffffff");
        let whole = "0c67a097-6204-4a06-b4ff-8c50ce87ca3b";
        assert_eq!(
            prefix_range(whole).map(|(l, h)| (l.to_string(), h.to_string())),
            Some((whole.into(), whole.into()))
        );
        for bad in ["", "-", "xyz", "0c67 a0", "0c67a097-6204-4a06-b4ff-8c50ce87ca3b0"] {
            assert_eq!(prefix_range(bad), None, "{bad:?}");
        }
    }
}
