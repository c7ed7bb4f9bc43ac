//! Verification: re-compute the hash chain of an export file or of a database and name the
//! first record that was altered, removed, reordered or inserted.
//!
//! An export record verifies when
//! 1. `payload_root` = `payload_root` of the field digests of `payload` (a redacted field
//!    contributes the digest it states),
//! 2. `prev_hash` = the `hash` of the record before it (zeros for seq 0), and
//! 3. `hash` = SHA-256(`prev_hash` || record digest), the record digest being
//!    `record_digest(1, run, seq, kind, time_us, payload_root)` for schema version 1 and
//!    `record_digest_v2(run, seq, kind, time_us, payload_root, payload_digest)` for schema
//!    version 2 (whose lines carry `payload_digest`, the SHA-256 of the stored payload bytes;
//!    an export cannot check it against the payload fields, only the chain binds it), and
//!    `record_digest_v3(run, seq, kind, time_us, payload_version, payload_root,
//!    payload_digest)` for schema version 3 (whose lines also carry `payload_version`),
//!
//! and each run ends with a `run_end` trailer whose count and head match. The formulas are
//! those of `keel_store::digest`, spelled out byte by byte in docs/EXPORT.md.

use crate::error::ReplayError;
use crate::format::{self, hex32};
use crate::payloads::{record_refs, ExportPayload, PartError, PayloadParts};
use crate::source::{read_export, ExportLine, ExportReader, ExportRecord};
use keel_engine::Event;
use keel_store::{digest, verify::VerifyError, EventLog, Hash32, RunId, Seq};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::BufRead;
use std::path::Path;

/// How far ahead (in lines) the export check looks for a record that is out of place.
pub const LOOKAHEAD_LINES: usize = 256;

/// What kind of damage a failed verification found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tamper {
    /// A record's payload or header changed.
    Altered,
    /// A record is missing.
    Removed,
    /// A record is not where its seq says.
    Reordered,
    /// A record that was not in the log was added.
    Inserted,
    /// The file ends before a run's trailer.
    Truncated,
    /// A line is not a valid export line at all.
    Malformed,
    /// A signature was asked for (`--key`) and the export carries none.
    Unsigned,
    /// The export is signed, but by another key than the one given.
    WrongKey,
}

/// The first problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What kind of problem.
    pub what: Tamper,
    /// The run it was found in, if known.
    pub run: Option<String>,
    /// The seq it was found at, if known.
    pub seq: Option<u64>,
    /// Line of the export file (None for a database).
    pub line: Option<u64>,
    /// One line for humans, e.g. "run X seq 7: payload altered (hash mismatch)".
    pub message: String,
}

/// A run that verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunVerified {
    /// The run (id).
    pub run: String,
    /// Records verified.
    pub records: u64,
    /// Its head hash (hex).
    pub head: String,
}

/// The outcome of a verification: the runs that verified, up to the first failure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Runs that verified, in the order read.
    pub runs: Vec<RunVerified>,
    /// The first problem found (None: everything verified).
    pub failure: Option<Failure>,
    /// The public key (hex) whose signature of the export verified, if it is signed.
    pub signed_by: Option<String>,
    /// What the export's header says was selected, and when (not for a database).
    #[serde(skip)]
    pub selection: Option<Selection>,
}

/// An export's selection and time, from its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// `keel export --all`: every run accepted in `[since_us, until_us)`.
    pub all: bool,
    /// The `--since` bound, µs.
    pub since_us: Option<i64>,
    /// The `--until` bound, µs.
    pub until_us: Option<i64>,
    /// When the export was made, µs (`None`: the header does not say).
    pub exported_at_us: Option<i64>,
}

impl Selection {
    fn of(h: &crate::source::ExportHeader) -> Selection {
        let bound =
            |k: &str| h.filter.get(k).and_then(serde_json::Value::as_str).and_then(|t| format::parse_time(t).ok());
        Selection {
            all: h.filter.get("all").and_then(serde_json::Value::as_bool) == Some(true),
            since_us: bound("since"),
            until_us: bound("until"),
            exported_at_us: h.exported_at_us,
        }
    }
}

/// What [`verify_export_with`] checks beyond the chain.
#[derive(Clone, Debug, Default)]
pub struct ExportChecks {
    /// The export must carry a valid signature by this key.
    pub key: Option<crate::sign::PublicKey>,
}

impl Verification {
    /// Whether everything verified.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
    /// Records verified in all runs.
    pub fn records(&self) -> u64 {
        self.runs.iter().map(|r| r.records).sum()
    }
}

/// The payload root an export record's payload hashes to (redacted fields contribute the
/// digest they state).
pub fn export_payload_root(rec: &ExportRecord) -> Hash32 {
    let digests: Vec<(String, Hash32)> = rec
        .payload
        .iter()
        .map(|(k, v)| (k.clone(), format::redacted_digest(v).unwrap_or_else(|| digest::field_digest(v))))
        .collect();
    digest::payload_root(&digests)
}

/// The chain hash an export record must carry, given the hash before it: the v3 record
/// digest for a `schema_version` 3 line (with its `payload_digest` and `payload_version`),
/// the v2 one for a `schema_version` 2 line with its `payload_digest`, else the v1 formula
/// with the stated version (which a line of version 2 or 3 without `payload_digest` cannot
/// match; [`version_problem`] names that case).
pub fn export_chain_hash(rec: &ExportRecord, prev: &Hash32) -> Hash32 {
    let d = digest::record_digest_of_version(&digest::DigestInput {
        schema_version: rec.schema_version,
        run: rec.run,
        seq: Seq(rec.seq),
        kind: &rec.kind,
        time_us: rec.time_us,
        payload_version: rec.payload_version.unwrap_or(1),
        payload_root: &rec.payload_root,
        payload_digest: rec.payload_digest.as_ref(),
    });
    digest::chain(prev, &d)
}

/// What is wrong with a record line's `schema_version` / `payload_digest` /
/// `payload_version` fields, if anything: version 1 has neither, version 2 needs the payload
/// digest only, version 3 both; other versions are unknown.
pub fn version_problem(rec: &ExportRecord) -> Option<String> {
    let v = rec.schema_version;
    let (digest, version) = (rec.payload_digest.is_some(), rec.payload_version.is_some());
    let problem = match v {
        1 if digest => "with a payload_digest",
        2 | 3 if !digest => "without its payload_digest",
        1 | 2 if version => "with a payload_version",
        3 if !version => "without its payload_version",
        1..=3 => return None,
        _ => return Some(format!("unknown schema_version {v}")),
    };
    Some(format!("a schema_version {v} record {problem}"))
}

/// Whether `value` is the original of a field redacted to `redacted` (a `{"$redacted":
/// hex}` marker or the bare hex digest).
pub fn reveal_matches(redacted: &serde_json::Value, value: &serde_json::Value) -> bool {
    let stated = match redacted {
        serde_json::Value::String(s) => format::parse_hash(s),
        other => format::redacted_digest(other),
    };
    stated.is_some_and(|h| h == digest::field_digest(value))
}

/// Verifies an export file (streaming). `Err` only for I/O on the file itself; everything
/// wrong with its content is the returned [`Verification::failure`].
pub fn verify_export(path: &Path) -> Result<Verification, ReplayError> {
    verify_export_with(path, &ExportChecks::default())
}

/// [`verify_export`], and the signature: a signature line present must verify (with the
/// key it names), and with `checks.key` it must be there and by that key.
pub fn verify_export_with(path: &Path, checks: &ExportChecks) -> Result<Verification, ReplayError> {
    let reader = read_export(path)?;
    let mut check = ExportCheck::new(reader);
    if let Err(f) = check.walk().and_then(|()| check.check_signature(checks)) {
        check.out.failure = Some(f);
    }
    Ok(check.out)
}

struct Current {
    run: RunId,
    next: u64,
    prev: Hash32,
    /// Hash of each record of this run seen so far, by seq.
    hashes: Vec<Hash32>,
}

struct ExportCheck<R> {
    reader: ExportReader<R>,
    ahead: VecDeque<Result<ExportLine, ReplayError>>,
    out: Verification,
    finished: BTreeSet<RunId>,
    /// Payload lines being assembled, and the digests of the payloads that verified.
    parts: PayloadParts,
    payloads: BTreeSet<Hash32>,
    /// What a signature must cover (from the header on), and the signature line if any.
    message: Option<crate::sign::ExportMessage>,
    signature: Option<crate::source::ExportSignature>,
}

fn fail(what: Tamper, run: Option<RunId>, seq: Option<u64>, line: Option<u64>, message: String) -> Failure {
    Failure { what, run: run.map(|r| r.to_string()), seq, line, message }
}

impl<R: BufRead> ExportCheck<R> {
    fn new(reader: ExportReader<R>) -> Self {
        ExportCheck {
            reader,
            ahead: VecDeque::new(),
            out: Verification::default(),
            finished: BTreeSet::new(),
            parts: PayloadParts::default(),
            payloads: BTreeSet::new(),
            message: None,
            signature: None,
        }
    }

    fn next_line(&mut self) -> Option<Result<ExportLine, ReplayError>> {
        self.ahead.pop_front().or_else(|| self.reader.next())
    }

    /// Records of `run` among the next lines (up to the lookahead), without consuming them.
    fn peek_run(&mut self, run: RunId) -> Vec<(u64, u64)> {
        while self.ahead.len() < LOOKAHEAD_LINES {
            match self.reader.next() {
                Some(l) => self.ahead.push_back(l),
                None => break,
            }
        }
        let mut out = Vec::new();
        for l in &self.ahead {
            match l {
                Ok(ExportLine::Record(r)) if r.run == run => out.push((r.seq, r.line)),
                Ok(ExportLine::Record(_)) | Ok(ExportLine::RunEnd(_)) | Ok(ExportLine::Signature(_)) | Err(_) => break,
                Ok(ExportLine::Header(_)) | Ok(ExportLine::Payload(_)) => {}
            }
        }
        out
    }

    fn walk(&mut self) -> Result<(), Failure> {
        let path = self.reader.path().display().to_string();
        let mut cur: Option<Current> = None;
        let mut saw_header = false;
        let mut first = true;
        while let Some(line) = self.next_line() {
            let line = line.map_err(|e| malformed_line(&path, cur.as_ref(), &e))?;
            if let Some(sig) = &self.signature {
                let at = line_of(&line);
                return Err(fail(
                    Tamper::Inserted,
                    None,
                    None,
                    Some(at),
                    format!("line {at}: a line after the signature line {} (appended after signing)", sig.line),
                ));
            }
            match line {
                ExportLine::Header(h) => {
                    if !first {
                        return Err(fail(
                            Tamper::Inserted,
                            None,
                            None,
                            Some(h.line),
                            format!("line {}: a second header line (lines inserted)", h.line),
                        ));
                    }
                    header_time_problem(&h)?;
                    self.message = Some(crate::sign::ExportMessage::new(&h.raw));
                    self.out.selection = Some(Selection::of(&h));
                    saw_header = true;
                }
                ExportLine::Record(rec) => self.on_record(&mut cur, &rec, saw_header, &path)?,
                ExportLine::RunEnd(end) => self.on_run_end(cur.take(), &end)?,
                ExportLine::Payload(p) => self.on_payload(p)?,
                ExportLine::Signature(sig) => self.on_signature(cur.as_ref(), sig)?,
            }
            first = false;
        }
        if let Some(c) = cur {
            return Err(fail(
                Tamper::Truncated,
                Some(c.run),
                Some(c.next),
                None,
                format!("run {}: the file ends after seq {} without the run_end trailer (truncated: records after it may be missing)", c.run, c.next.saturating_sub(1)),
            ));
        }
        if !saw_header {
            return Err(fail(Tamper::Malformed, None, None, None, format!("{path}: empty file: not a keel export")));
        }
        Ok(())
    }

    /// A record line: it starts a run, continues the current one, or shows that the
    /// current run's trailer (or the header) is missing.
    fn on_record(
        &mut self,
        cur: &mut Option<Current>,
        rec: &ExportRecord,
        saw_header: bool,
        path: &str,
    ) -> Result<(), Failure> {
        if !saw_header {
            return Err(fail(
                Tamper::Malformed,
                Some(rec.run),
                None,
                Some(rec.line),
                format!("{path}: no header line: not a keel export (or its first line was removed)"),
            ));
        }
        if cur.as_ref().is_some_and(|c| c.run != rec.run) {
            let c = cur.take();
            if let Some(c) = c {
                return Err(fail(
                    Tamper::Removed,
                    Some(c.run),
                    Some(c.next),
                    Some(rec.line),
                    format!(
                        "run {}: its run_end trailer is missing before line {} (records or trailer removed)",
                        c.run, rec.line
                    ),
                ));
            }
        }
        if cur.is_none() {
            if self.finished.contains(&rec.run) {
                return Err(fail(
                    Tamper::Inserted,
                    Some(rec.run),
                    Some(rec.seq),
                    Some(rec.line),
                    format!(
                        "run {} seq {}: line {} adds a record after the run's trailer (inserted)",
                        rec.run, rec.seq, rec.line
                    ),
                ));
            }
            *cur = Some(Current { run: rec.run, next: 0, prev: [0; 32], hashes: Vec::new() });
        }
        if let Some(c) = cur.as_mut() {
            self.record(c, rec)?;
        }
        Ok(())
    }

    /// The signature line: it closes the file (no run may be open).
    fn on_signature(&mut self, cur: Option<&Current>, sig: crate::source::ExportSignature) -> Result<(), Failure> {
        if let Some(c) = cur {
            return Err(fail(
                Tamper::Removed,
                Some(c.run),
                Some(c.next),
                Some(sig.line),
                format!("run {}: its run_end trailer is missing before the signature line {}", c.run, sig.line),
            ));
        }
        self.signature = Some(sig);
        Ok(())
    }

    /// After the walk: a signature present must verify with the key it names; with
    /// `checks.key`, it must be there and name that key.
    fn check_signature(&mut self, checks: &ExportChecks) -> Result<(), Failure> {
        let Some(sig) = &self.signature else {
            return match &checks.key {
                None => Ok(()),
                Some(k) => Err(fail(
                    Tamper::Unsigned,
                    None,
                    None,
                    None,
                    format!(
                        "the export is not signed (no signature line), so its heads are not anchored to key {}",
                        short(&k.hex())
                    ),
                )),
            };
        };
        let at = Some(sig.line);
        let stated = crate::sign::PublicKey::from_hex(&sig.key).filter(|_| sig.alg == "ed25519");
        let message = self.message.as_ref().map(crate::sign::ExportMessage::bytes).unwrap_or_default();
        let Some(stated) = stated.filter(|k| k.verifies(message, &sig.sig)) else {
            return Err(fail(
                Tamper::Altered,
                None,
                None,
                at,
                format!(
                    "line {}: the signature (key {}) does not match the header and the run heads: the file was changed after it was signed",
                    sig.line,
                    short(&sig.key)
                ),
            ));
        };
        if let Some(k) = checks.key.filter(|k| *k != stated) {
            return Err(fail(
                Tamper::WrongKey,
                None,
                None,
                at,
                format!(
                    "line {}: signed by key {}, not by the expected key {}",
                    sig.line,
                    short(&sig.key),
                    short(&k.hex())
                ),
            ));
        }
        self.out.signed_by = Some(stated.hex());
        Ok(())
    }

    /// A payload line: its parts assemble, in order, to text that hashes to its digest.
    fn on_payload(&mut self, p: ExportPayload) -> Result<(), Failure> {
        let line = p.line;
        match self.parts.add(p) {
            Ok(Some((digest, _))) => {
                self.payloads.insert(digest);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(PartError::Altered(m)) => {
                Err(fail(Tamper::Altered, None, None, Some(line), format!("line {line}: {m}")))
            }
            Err(PartError::Malformed(m)) => {
                Err(fail(Tamper::Malformed, None, None, Some(line), format!("line {line}: {m}")))
            }
        }
    }

    /// Every payload `rec` refers to was in the file before it, and verified.
    fn refs_present(&self, rec: &ExportRecord) -> Result<(), Failure> {
        for r in record_refs(&rec.kind, &rec.payload) {
            if !self.payloads.contains(&r.digest) {
                return Err(fail(
                    Tamper::Removed,
                    Some(rec.run),
                    Some(rec.seq),
                    Some(rec.line),
                    format!(
                        "run {} seq {}: payload sha256:{} it refers to is not in the file before line {} (removed)",
                        rec.run,
                        rec.seq,
                        r.hex(),
                        rec.line
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A run's trailer: it must close the current run with its record count and head.
    fn on_run_end(&mut self, cur: Option<Current>, end: &crate::source::RunEnd) -> Result<(), Failure> {
        let Some(c) = cur else {
            return Err(fail(
                Tamper::Removed,
                Some(end.run),
                Some(0),
                Some(end.line),
                format!("run {}: trailer at line {} without any record (records removed)", end.run, end.line),
            ));
        };
        if c.run != end.run {
            return Err(fail(
                Tamper::Altered,
                Some(c.run),
                None,
                Some(end.line),
                format!("run {}: the trailer at line {} names run {} (altered)", c.run, end.line, end.run),
            ));
        }
        if end.records > c.next {
            let msg = if end.records == c.next + 1 {
                format!("run {}: seq {} missing (removed; the trailer says {} records)", c.run, c.next, end.records)
            } else {
                format!(
                    "run {}: seqs {}..{} missing (removed; the trailer says {} records)",
                    c.run,
                    c.next,
                    end.records - 1,
                    end.records
                )
            };
            return Err(fail(Tamper::Removed, Some(c.run), Some(c.next), Some(end.line), msg));
        }
        if end.records < c.next {
            return Err(fail(
                Tamper::Inserted,
                Some(c.run),
                Some(end.records),
                Some(end.line),
                format!("run {}: {} records but the trailer says {} (records inserted)", c.run, c.next, end.records),
            ));
        }
        if end.head != c.prev {
            return Err(fail(
                Tamper::Altered,
                Some(c.run),
                None,
                Some(end.line),
                format!("run {}: the trailer's head hash does not match the chain (trailer altered)", c.run),
            ));
        }
        self.finished.insert(c.run);
        if let Some(m) = self.message.as_mut() {
            m.add_run(&c.run.to_string(), c.next, &hex32(&c.prev));
        }
        self.out.runs.push(RunVerified { run: c.run.to_string(), records: c.next, head: hex32(&c.prev) });
        Ok(())
    }

    fn record(&mut self, c: &mut Current, rec: &ExportRecord) -> Result<(), Failure> {
        let (run, n, line) = (c.run, c.next, rec.line);
        if rec.seq < n {
            let copy = c.hashes.get(usize::try_from(rec.seq).unwrap_or(usize::MAX)).is_some_and(|h| *h == rec.hash);
            let how = if copy { "a copy of it" } else { "a second record claiming it" };
            return Err(fail(
                Tamper::Inserted,
                Some(run),
                Some(rec.seq),
                Some(line),
                format!("run {run} seq {}: inserted record at line {line} ({how}; seq {} was expected)", rec.seq, n),
            ));
        }
        if rec.seq > n {
            return Err(self.seq_ahead(c, rec));
        }
        // rec.seq == n
        if let Some(problem) = time_problem(rec).or_else(|| version_problem(rec)) {
            return Err(fail(
                Tamper::Altered,
                Some(run),
                Some(n),
                Some(line),
                format!("run {run} seq {n}: header altered ({problem} at line {line})"),
            ));
        }
        let root_ok = export_payload_root(rec) == rec.payload_root;
        let link_ok = rec.prev_hash == c.prev;
        let hash_ok = export_chain_hash(rec, &c.prev) == rec.hash;
        if !(root_ok && link_ok && hash_ok) {
            return Err(self.chain_broken(c, rec, root_ok, link_ok));
        }
        self.refs_present(rec)?;
        c.prev = rec.hash;
        c.hashes.push(rec.hash);
        c.next += 1;
        Ok(())
    }

    /// The failure for a record whose seq is past the next expected one: record `n`
    /// further on (reordered), record `n` with its seq edited, or records removed.
    fn seq_ahead(&mut self, c: &Current, rec: &ExportRecord) -> Failure {
        let (run, n, line) = (c.run, c.next, rec.line);
        let ahead = self.peek_run(run);
        if let Some((_, l2)) = ahead.iter().find(|(s, _)| *s == n) {
            return fail(
                Tamper::Reordered,
                Some(run),
                Some(n),
                Some(*l2),
                format!("run {run} seq {n}: out of order (found at line {l2}, after seq {} at line {line})", rec.seq),
            );
        }
        // Is it record n with its seq field edited?
        let as_n = ExportRecord { seq: n, ..rec.clone() };
        if rec.prev_hash == c.prev && export_chain_hash(&as_n, &c.prev) == rec.hash {
            return fail(
                Tamper::Altered,
                Some(run),
                Some(n),
                Some(line),
                format!("run {run} seq {n}: header altered (its seq was changed to {} at line {line})", rec.seq),
            );
        }
        let msg = if rec.seq == n + 1 {
            format!("run {run}: seq {n} missing (removed; line {line} holds seq {})", rec.seq)
        } else {
            format!("run {run}: seqs {n}..{} missing (removed; line {line} holds seq {})", rec.seq - 1, rec.seq)
        };
        fail(Tamper::Removed, Some(run), Some(n), Some(line), msg)
    }

    /// The failure for record `n` whose payload root, link or hash does not verify.
    fn chain_broken(&mut self, c: &Current, rec: &ExportRecord, root_ok: bool, link_ok: bool) -> Failure {
        let (run, n, line) = (c.run, c.next, rec.line);
        // Another record claiming the same seq right behind this one: this one is the extra.
        if self.peek_run(run).first().is_some_and(|(s, _)| *s == n) {
            return fail(
                Tamper::Inserted,
                Some(run),
                Some(n),
                Some(line),
                format!("run {run} seq {n}: inserted record at line {line} (another record with seq {n} follows and this one does not verify)"),
            );
        }
        let (what, msg) = if !root_ok {
            let kind_ok = Event::KINDS.contains(&rec.kind.as_str());
            (
                Tamper::Altered,
                format!(
                    "run {run} seq {n}: payload altered (hash mismatch){}",
                    if kind_ok { "" } else { "; unknown kind" }
                ),
            )
        } else if !link_ok {
            let after = c.hashes.iter().position(|h| *h == rec.prev_hash);
            match after {
                Some(k) => (
                    Tamper::Removed,
                    format!("run {run} seq {n}: broken link: it was chained after seq {k}, so records after seq {k} were removed or reordered"),
                ),
                None => (Tamper::Inserted, format!("run {run} seq {n}: broken link: it chains to no earlier record of the run (inserted or moved here)")),
            }
        } else {
            (
                Tamper::Altered,
                format!(
                    "run {run} seq {n}: header altered (hash mismatch: kind, time, seq, version, payload digest or hash changed)"
                ),
            )
        };
        fail(what, Some(run), Some(n), Some(line), msg)
    }
}

/// Verifies runs of a database with the store's deep check (`keel_store::verify`), in
/// order; stops at the first failure.
/// Then every stored payload is read back and hashed (`keel_store::verify_payloads`), and
/// every payload a verified run's records refer to must be stored.
pub fn verify_db(log: &dyn EventLog, runs: &[RunId], mut progress: impl FnMut()) -> Result<Verification, ReplayError> {
    let mut out = Verification::default();
    let stored: BTreeSet<Hash32> = log.payload_digests()?.into_iter().collect();
    for &run in runs {
        // Each payload in the layout of its payload version (the chain covers it as written).
        let fields_of =
            |rec: &keel_store::Record| keel_engine::model::upcast::stored_fields(rec).map_err(|e| e.to_string());
        match keel_store::verify::verify_run_with(log, run, fields_of) {
            Ok(rep) => {
                out.runs.push(RunVerified { run: run.to_string(), records: rep.records, head: hex32(&rep.head) })
            }
            Err(e) => {
                out.failure = Some(db_failure(run, e));
                return Ok(out);
            }
        }
        if let Some(f) = missing_payload(log, run, &stored)? {
            out.failure = Some(f);
            return Ok(out);
        }
        progress();
    }
    if let Err(e) = keel_store::verify_payloads(log) {
        let what = match &e {
            keel_store::StoreError::CorruptPayload { .. } => Tamper::Altered,
            _ => Tamper::Malformed,
        };
        out.failure = Some(fail(what, None, None, None, e.to_string()));
    }
    Ok(out)
}

/// The first record of `run` that refers to a payload not in `stored`, as a failure.
fn missing_payload(log: &dyn EventLog, run: RunId, stored: &BTreeSet<Hash32>) -> Result<Option<Failure>, ReplayError> {
    // `scan`: the chain was just verified; only the references are looked at here.
    for rec in log.scan(run, Seq(0))? {
        let rec = rec?;
        // Cheap filter: only a record whose bytes mention a reference is decoded.
        if !rec.payload.windows(8).any(|w| w == b"@sha256:") {
            continue;
        }
        let Ok(event) = keel_engine::model::upcast::decode(&rec.kind, rec.payload_version(), &rec.payload) else {
            continue;
        };
        if let Some(r) = keel_engine::model::payload::refs(&event).into_iter().find(|r| !stored.contains(&r.digest)) {
            return Ok(Some(fail(
                Tamper::Removed,
                Some(run),
                Some(rec.seq.0),
                None,
                format!("run {run} seq {}: payload sha256:{} it refers to is not stored (removed)", rec.seq, r.hex()),
            )));
        }
    }
    Ok(None)
}

fn db_failure(run: RunId, e: VerifyError) -> Failure {
    match e {
        VerifyError::Gap { run, expected, found } => fail(
            Tamper::Removed,
            Some(run),
            Some(expected.0),
            None,
            if found.0 == expected.0 + 1 {
                format!("run {run}: seq {expected} missing (removed)")
            } else {
                format!("run {run}: seqs {expected}..{} missing (removed)", found.0.saturating_sub(1))
            },
        ),
        VerifyError::Mismatch { run, seq, reason } => {
            let (what, label) = if reason.starts_with("altered payload") {
                (Tamper::Altered, "payload altered (hash mismatch)".to_owned())
            } else if reason.starts_with("altered header") {
                (Tamper::Altered, "header altered (hash mismatch)".to_owned())
            } else if let Some(s) = written_as(&reason) {
                if s > seq.0 {
                    (Tamper::Reordered, format!("out of order (it was written as seq {s})"))
                } else if s < seq.0 {
                    (Tamper::Inserted, format!("out of order or inserted before it (it was written as seq {s})"))
                } else {
                    (Tamper::Inserted, "broken link (records inserted or removed before it)".to_owned())
                }
            } else if reason.contains("head") {
                (Tamper::Removed, "the store's head does not match the chain".to_owned())
            } else {
                (Tamper::Inserted, "broken link (inserted, or records removed before it)".to_owned())
            };
            fail(what, Some(run), Some(seq.0), None, format!("run {run} seq {seq}: {label} [{reason}]"))
        }
        VerifyError::Store(keel_store::StoreError::Corrupted { run, seq, reason }) => fail(
            Tamper::Altered,
            Some(run),
            Some(seq.0),
            None,
            format!("run {run} seq {seq}: record altered or damaged ({reason})"),
        ),
        VerifyError::Store(other) => fail(Tamper::Altered, Some(run), None, None, format!("run {run}: {other}")),
        other => fail(Tamper::Altered, Some(run), None, None, format!("run {run}: {other}")),
    }
}

/// The seq a record "was written as", from the store's diagnosis text.
fn written_as(reason: &str) -> Option<u64> {
    let rest = reason.split("written as seq ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Compares the heads of verified export runs with a database's heads (an export can be
/// rewritten consistently end to end; the database's head is the anchor).
pub fn compare_heads(log: &dyn EventLog, verified: &[RunVerified]) -> Result<Option<Failure>, ReplayError> {
    let mut by_run: BTreeMap<&str, &RunVerified> = BTreeMap::new();
    for v in verified {
        by_run.insert(&v.run, v);
    }
    for v in verified {
        let run: RunId = v.run.parse().map_err(|e| ReplayError::Invalid(format!("run id {}: {e}", v.run)))?;
        let head = log.head(run)?;
        if head.next_seq.0 == 0 {
            return Ok(Some(fail(Tamper::Inserted, Some(run), None, None, format!("run {run}: not in the database"))));
        }
        let db_head = hex32(&head.last_hash);
        if head.next_seq.0 != v.records || db_head != v.head {
            return Ok(Some(fail(
                Tamper::Altered,
                Some(run),
                None,
                None,
                format!(
                    "run {run}: the export ({} records, head {}) differs from the database ({} records, head {db_head})",
                    v.records,
                    &v.head[..16],
                    head.next_seq.0
                ),
            )));
        }
    }
    Ok(None)
}

/// The line number of an export line.
fn line_of(l: &ExportLine) -> u64 {
    match l {
        ExportLine::Header(h) => h.line,
        ExportLine::Record(r) => r.line,
        ExportLine::RunEnd(e) => e.line,
        ExportLine::Payload(p) => p.line,
        ExportLine::Signature(s) => s.line,
    }
}

/// The first 16 hex digits of a key or hash, for messages.
pub(crate) fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

/// A record's `time` (not hashed) must state its `time_us` (hashed).
fn time_problem(rec: &ExportRecord) -> Option<String> {
    let t = rec.time.as_deref()?;
    let parsed = chrono::DateTime::parse_from_rfc3339(t).ok().map(|d| d.timestamp_micros());
    (parsed != Some(rec.time_us)).then(|| format!("its time {t:?} is not its time_us {}", rec.time_us))
}

/// A header's `exported_at` must state its `exported_at_us` (a signature covers both).
fn header_time_problem(h: &crate::source::ExportHeader) -> Result<(), Failure> {
    let Some(us) = h.exported_at_us else { return Ok(()) };
    let parsed = chrono::DateTime::parse_from_rfc3339(&h.exported_at).ok().map(|d| d.timestamp_micros());
    if parsed == Some(us) {
        return Ok(());
    }
    Err(fail(
        Tamper::Altered,
        None,
        None,
        Some(h.line),
        format!("line {}: header altered (exported_at {:?} is not exported_at_us {us})", h.line, h.exported_at),
    ))
}

/// The failure for a line that does not parse as an export line.
fn malformed_line(path: &str, cur: Option<&Current>, e: &ReplayError) -> Failure {
    let (line, reason) = match e {
        ReplayError::Export { line, reason, .. } => (Some(*line), reason.clone()),
        other => (None, other.to_string()),
    };
    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
    fail(
        Tamper::Malformed,
        cur.as_ref().map(|c| c.run),
        None,
        line,
        format!("{path}: {at}{reason} (the export was edited or damaged)"),
    )
}
