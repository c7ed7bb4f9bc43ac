//! Heads anchored outside an export's own chain: an export compared with its database
//! (`keel verify FILE --against-db`), a head given by hand (`--expect-head`), the signed
//! head checkpoints the engine writes (`keel verify --key PUB` on a database), and the
//! tombstones archived runs leave behind ([`crate::archive`]).

use crate::error::ReplayError;
use crate::format::{hex32, parse_hash, rfc3339};
use crate::sign::PublicKey;
use crate::verify::{short, Failure, RunVerified, Selection, Tamper};
use keel_engine::{CheckpointPart, CHECKPOINT_FORMAT};
use keel_store::{EventLog, Hash32, RunId, Seq, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Key prefix of tombstones in the auxiliary keyspace: `keel/archived/<run id>`.
pub const TOMBSTONE_PREFIX: &[u8] = b"keel/archived/";

/// What an archived run leaves in its database: enough to account for it and to check
/// its archive file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The run (id).
    pub run: String,
    /// Records it had when archived.
    pub records: u64,
    /// Its head hash then (hex).
    pub head: String,
    /// When its `RunAccepted` was recorded, µs.
    pub accepted_at_us: i64,
    /// When it was archived, µs.
    pub archived_at_us: i64,
    /// The archive file's name (in the archive directory).
    pub file: String,
    /// SHA-256 of the archive file's bytes (hex).
    pub file_sha256: String,
    /// The public key that signed the archive file, if it was signed.
    pub signed_by: Option<String>,
}

/// The aux key of `run`'s tombstone.
pub fn tombstone_key(run: RunId) -> Vec<u8> {
    let mut k = TOMBSTONE_PREFIX.to_vec();
    k.extend_from_slice(run.to_string().as_bytes());
    k
}

/// `run`'s tombstone, if it was archived.
pub fn tombstone(log: &dyn Store, run: RunId) -> Result<Option<Tombstone>, ReplayError> {
    let k = tombstone_key(run);
    match log.aux_range(&k, &k, 1)?.into_iter().next() {
        None => Ok(None),
        Some((_, v)) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| ReplayError::Invalid(format!("tombstone of run {run} does not parse: {e}"))),
    }
}

/// Every tombstone, in run id order.
pub fn tombstones(log: &dyn Store) -> Result<Vec<Tombstone>, ReplayError> {
    let mut hi = TOMBSTONE_PREFIX.to_vec();
    hi.push(0xff);
    let mut lo = TOMBSTONE_PREFIX.to_vec();
    let mut out = Vec::new();
    loop {
        let page = log.aux_range(&lo, &hi, 512)?;
        let full = page.len() == 512;
        for (k, v) in &page {
            let t: Tombstone = serde_json::from_slice(v).map_err(|e| {
                ReplayError::Invalid(format!("tombstone {} does not parse: {e}", String::from_utf8_lossy(k)))
            })?;
            out.push(t);
        }
        match page.last() {
            Some((k, _)) if full => {
                lo = k.clone();
                lo.push(0);
            }
            _ => break,
        }
    }
    Ok(out)
}

/// A run of an export that the database has continued since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunContinued {
    /// The run (id).
    pub run: String,
    /// Records in the export.
    pub exported: u64,
    /// Records in the database now.
    pub database: u64,
    /// `database - exported`.
    pub more: u64,
}

/// What comparing an export with its database found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    /// Runs the database has continued since the export (genuine, not tampering).
    pub continued: Vec<RunContinued>,
    /// Runs of the export the database has archived (checked against their tombstones).
    pub archived: Vec<String>,
    /// The first problem: a run that differs, is unknown, or is missing from the export.
    pub failure: Option<Failure>,
}

fn fail_run(what: Tamper, run: RunId, message: String) -> Failure {
    Failure { what, run: Some(run.to_string()), seq: None, line: None, message }
}

/// Whether the record at `seq` of `run` has hash `hash` (the read checks its link).
fn hash_at(log: &dyn EventLog, run: RunId, seq: u64, hash: &Hash32) -> Result<bool, ReplayError> {
    match log.read(run, Seq(seq))?.next().transpose()? {
        Some(rec) => Ok(rec.hash == *hash),
        None => Ok(false),
    }
}

/// One exported run against the database: `Ok(Some(more))` if the database continued it
/// by `more` records, `Ok(None)` if it holds exactly it (or archived exactly it, `archived`
/// set), `Err` with the failure otherwise.
fn compare_run(log: &dyn Store, v: &RunVerified, archived: &mut bool) -> Result<Result<u64, Failure>, ReplayError> {
    let run: RunId = v.run.parse().map_err(|e| ReplayError::Invalid(format!("run id {}: {e}", v.run)))?;
    let head = parse_hash(&v.head).unwrap_or([0; 32]);
    let db = log.head(run)?;
    let differs = |db_records: u64, db_head: &str| {
        fail_run(
            Tamper::Altered,
            run,
            format!(
                "run {run}: the export ({} records, head {}) differs from the database ({db_records} records, head {})",
                v.records,
                short(&v.head),
                short(db_head)
            ),
        )
    };
    if db.next_seq.0 == 0 {
        return Ok(match tombstone(log, run)? {
            None => Err(fail_run(Tamper::Inserted, run, format!("run {run}: not in the database"))),
            Some(t) if t.records == v.records && t.head == v.head => {
                *archived = true;
                Ok(0)
            }
            Some(t) => Err(differs(t.records, &t.head)),
        });
    }
    let db_head = hex32(&db.last_hash);
    if db.next_seq.0 == v.records {
        return Ok(if db_head == v.head { Ok(0) } else { Err(differs(db.next_seq.0, &db_head)) });
    }
    if db.next_seq.0 > v.records && v.records > 0 && hash_at(log, run, v.records - 1, &head)? {
        return Ok(Ok(db.next_seq.0 - v.records));
    }
    Ok(Err(differs(db.next_seq.0, &db_head)))
}

/// Compares a verified export with the database: each run's head must be the database's
/// head or a record of its chain (then the run continued: reported, not a failure; an
/// archived run is compared with its tombstone), and an `--all` export must hold every run
/// the database had, within its selection, when it was exported.
pub fn compare_with_db(
    log: &dyn Store,
    runs: &[RunVerified],
    selection: Option<&Selection>,
) -> Result<Comparison, ReplayError> {
    let mut out = Comparison::default();
    for v in runs {
        let mut archived = false;
        match compare_run(log, v, &mut archived)? {
            Err(f) => {
                out.failure = Some(f);
                return Ok(out);
            }
            Ok(0) if archived => out.archived.push(v.run.clone()),
            Ok(0) => {}
            Ok(more) => out.continued.push(RunContinued {
                run: v.run.clone(),
                exported: v.records,
                database: v.records + more,
                more,
            }),
        }
    }
    if let Some(sel) = selection.filter(|s| s.all) {
        out.failure = missing_runs(log, runs, sel)?;
    }
    Ok(out)
}

/// The runs the database had at the export's time within its selection that the export
/// does not hold, as a failure naming them.
fn missing_runs(log: &dyn Store, runs: &[RunVerified], sel: &Selection) -> Result<Option<Failure>, ReplayError> {
    let exported: BTreeSet<&str> = runs.iter().map(|r| r.run.as_str()).collect();
    let mut missing = Vec::new();
    for run in log.runs()? {
        if exported.contains(run.to_string().as_str()) {
            continue;
        }
        let Some(first) = log.read(run, Seq(0))?.next().transpose()? else { continue };
        let t = first.time_us;
        let selected = sel.since_us.is_none_or(|s| t >= s) && sel.until_us.is_none_or(|u| t < u);
        if selected && sel.exported_at_us.is_none_or(|at| t <= at) {
            missing.push(run.to_string());
        }
    }
    if missing.is_empty() {
        return Ok(None);
    }
    let when = sel.exported_at_us.map(rfc3339).unwrap_or_else(|| "its time".to_owned());
    let shown: Vec<&str> = missing.iter().take(10).map(String::as_str).collect();
    let more = if missing.len() > 10 { format!(" and {} more", missing.len() - 10) } else { String::new() };
    Ok(Some(Failure {
        what: Tamper::Removed,
        run: missing.first().cloned(),
        seq: None,
        line: None,
        message: format!(
            "the --all export lacks {} run(s) the database held when it was exported ({when}): {}{more} (removed from the file)",
            missing.len(),
            shown.join(", ")
        ),
    }))
}

/// `--expect-head` on an export: the run's head (the only run, or `run`) must be `hash`.
pub fn expect_head_in(runs: &[RunVerified], run: Option<&str>, hash: &str) -> Result<Option<Failure>, ReplayError> {
    let want = parse_hash(hash.trim())
        .ok_or_else(|| ReplayError::Invalid(format!("--expect-head {hash:?}: expected 64 lowercase hex digits")))?;
    let target = match (run, runs) {
        (Some(r), _) => runs.iter().find(|v| v.run == r),
        (None, [one]) => Some(one),
        (None, _) => {
            return Err(ReplayError::Invalid(format!(
                "--expect-head: the export holds {} runs; name one with --run",
                runs.len()
            )))
        }
    };
    let Some(v) = target else { return Ok(None) };
    if v.head == hex32(&want) {
        return Ok(None);
    }
    Ok(Some(Failure {
        what: Tamper::Altered,
        run: Some(v.run.clone()),
        seq: None,
        line: None,
        message: format!("run {}: head {} is not the expected head {}", v.run, short(&v.head), short(hash)),
    }))
}

/// `--expect-head` on a database run: `Ok(0)` if `hash` is its head, `Ok(n)` if it is
/// the hash of an earlier record (the run has `n` more records since), else the failure.
pub fn expect_head_db(log: &dyn EventLog, run: RunId, hash: &str) -> Result<Result<u64, Failure>, ReplayError> {
    let want = parse_hash(hash.trim())
        .ok_or_else(|| ReplayError::Invalid(format!("--expect-head {hash:?}: expected 64 lowercase hex digits")))?;
    let head = log.head(run)?;
    for rec in log.read(run, Seq(0))? {
        let rec = rec?;
        if rec.hash == want {
            return Ok(Ok(head.next_seq.0.saturating_sub(rec.seq.0 + 1)));
        }
    }
    Ok(Err(fail_run(
        Tamper::Altered,
        run,
        format!("run {run}: no record of its chain has the expected head {} (history rewritten)", short(hash)),
    )))
}

/// What checking the signed checkpoints of a database found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    /// Checkpoint parts checked.
    pub parts: usize,
    /// The newest checkpoint's time (RFC 3339), if any.
    pub newest: Option<String>,
    /// Run heads checked against the chain (or a tombstone).
    pub heads: usize,
    /// The first problem found.
    pub failure: Option<Failure>,
}

/// Checks every stored checkpoint part: signed by `key`, its signature valid, and each
/// run's signed head still a record of the run's chain at that seq (or the head of its
/// tombstone, for an archived run). No checkpoint at all is a failure.
pub fn verify_checkpoints(log: &dyn Store, key: &PublicKey) -> Result<CheckpointReport, ReplayError> {
    let mut out = CheckpointReport::default();
    let stored = keel_engine::checkpoint::stored_parts(log)?;
    if stored.is_empty() {
        out.failure = Some(ckpt_fail(
            Tamper::Unsigned,
            format!(
                "the database holds no signed head checkpoint (run the engine with --sign-key; the key is {})",
                short(&key.hex())
            ),
        ));
        return Ok(out);
    }
    let mut tombs: BTreeMap<String, Tombstone> = BTreeMap::new();
    for t in tombstones(log)? {
        tombs.insert(t.run.clone(), t);
    }
    for (k, v) in &stored {
        out.parts += 1;
        let name = String::from_utf8_lossy(k).into_owned();
        let part: CheckpointPart = match serde_json::from_slice(v) {
            Ok(p) => p,
            Err(e) => {
                out.failure = Some(ckpt_fail(Tamper::Malformed, format!("checkpoint {name} does not parse: {e}")));
                return Ok(out);
            }
        };
        if let Some(f) = check_part(log, key, &part, &tombs, &mut out.heads)? {
            out.failure = Some(f);
            return Ok(out);
        }
        out.newest = Some(rfc3339(part.at_us));
    }
    Ok(out)
}

fn ckpt_fail(what: Tamper, message: String) -> Failure {
    Failure { what, run: None, seq: None, line: None, message }
}

/// One part: key, signature, and every run's head against the chain.
fn check_part(
    log: &dyn Store,
    key: &PublicKey,
    part: &CheckpointPart,
    tombs: &BTreeMap<String, Tombstone>,
    heads: &mut usize,
) -> Result<Option<Failure>, ReplayError> {
    let at = rfc3339(part.at_us);
    if part.key != key.hex() {
        return Ok(Some(ckpt_fail(
            Tamper::WrongKey,
            format!(
                "the checkpoint of {at} is signed by key {}, not by the expected key {}",
                short(&part.key),
                short(&key.hex())
            ),
        )));
    }
    let msg = keel_engine::checkpoint::message(part.at_us, part.part, part.parts, &part.runs);
    if part.format != CHECKPOINT_FORMAT || part.alg != "ed25519" || !key.verifies(&msg, &part.sig) {
        return Ok(Some(ckpt_fail(
            Tamper::Altered,
            format!(
                "the checkpoint of {at} (part {} of {}): its signature does not verify (checkpoint altered)",
                part.part, part.parts
            ),
        )));
    }
    for r in &part.runs {
        *heads += 1;
        let run: RunId =
            r.run.parse().map_err(|e| ReplayError::Invalid(format!("checkpoint run id {}: {e}", r.run)))?;
        let ok = match (log.head(run)?.next_seq.0, tombs.get(&r.run)) {
            (0, Some(t)) => t.records > r.records || (t.records == r.records && t.head == r.head),
            (0, None) => {
                return Ok(Some(fail_run(Tamper::Removed, run, format!(
                    "run {run}: signed in the checkpoint of {at} ({} records, head {}) and not in the database (removed)",
                    r.records,
                    short(&r.head)
                ))))
            }
            (n, _) if n < r.records => false,
            _ => hash_at(log, run, r.records.saturating_sub(1), &parse_hash(&r.head).unwrap_or([0; 32]))?,
        };
        if !ok {
            return Ok(Some(fail_run(Tamper::Altered, run, format!(
                "run {run}: the database's chain does not extend the head signed at {at} (seq {}, head {}): history rewritten",
                r.records.saturating_sub(1),
                short(&r.head)
            ))));
        }
    }
    Ok(None)
}
