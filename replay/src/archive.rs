//! Retention that keeps the audit chain (`keel archive`): a finished run is exported to a
//! file of its own, the file is verified (and its signature, with a key), and only then is
//! the run removed from the database, in one atomic write with a [`Tombstone`] that keeps
//! its record count, head hash and the file's digest
//! ([`keel_store::Coordination::remove_run`]). `keel verify` on the database accounts for
//! the archived run by its tombstone; `keel replay --from FILE` replays it from the file.

use crate::anchor::{tombstone_key, Tombstone};
use crate::error::ReplayError;
use crate::export::{JsonlWriter, Redaction};
use crate::format::hex32;
use crate::sign::SecretKey;
use crate::verify::{verify_export_with, ExportChecks};
use keel_engine::{load_state, RunStatus};
use keel_store::{Hash32, RunId, Seq, Store};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which runs to archive: finished runs whose last event is before `before_us`, and/or
/// in one of `statuses` (all finished ones).
#[derive(Clone, Debug, Default)]
pub struct ArchiveSelection {
    /// Only runs whose last event was recorded before this time, µs.
    pub before_us: Option<i64>,
    /// Only runs in one of these statuses (each must be a finished status).
    pub statuses: Vec<RunStatus>,
}

/// One archived run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Archived {
    /// The run (id).
    pub run: String,
    /// Records archived.
    pub records: u64,
    /// Its head hash (hex).
    pub head: String,
    /// The archive file written.
    pub file: PathBuf,
    /// SHA-256 of the archive file (hex).
    pub file_sha256: String,
}

/// The runs `sel` selects: finished, matching its time and statuses; also how many
/// matching runs were left because they have not finished.
pub fn select(log: &dyn Store, sel: &ArchiveSelection) -> Result<(Vec<RunId>, usize), ReplayError> {
    if let Some(s) = sel.statuses.iter().find(|s| !s.is_terminal()) {
        return Err(ReplayError::Invalid(format!(
            "--status {}: only finished runs (completed, failed, cancelled) can be archived",
            s.name()
        )));
    }
    let (mut out, mut unfinished) = (Vec::new(), 0usize);
    for run in log.runs()? {
        let Some(state) = load_state(log, run)? else { continue };
        if sel.before_us.is_some_and(|b| state.last_event_us >= b) {
            continue;
        }
        if !sel.statuses.is_empty() && !sel.statuses.contains(&state.status) {
            continue;
        }
        if state.status.is_terminal() {
            out.push(run);
        } else {
            unfinished += 1;
        }
    }
    Ok((out, unfinished))
}

/// Which runs refer to each stored payload (records whose bytes mention a reference).
pub fn payload_users(log: &dyn Store) -> Result<BTreeMap<Hash32, BTreeSet<RunId>>, ReplayError> {
    let mut out: BTreeMap<Hash32, BTreeSet<RunId>> = BTreeMap::new();
    for run in log.runs()? {
        for rec in log.scan(run, Seq(0))? {
            let rec = rec?;
            if !rec.payload.windows(8).any(|w| w == b"@sha256:") {
                continue;
            }
            let event = keel_engine::model::upcast::decode(&rec.kind, rec.payload_version(), &rec.payload)
                .map_err(|e| ReplayError::Invalid(format!("run {run} seq {}: {e}", rec.seq)))?;
            for r in keel_engine::model::payload::refs(&event) {
                out.entry(r.digest).or_default().insert(run);
            }
        }
    }
    Ok(out)
}

/// Archives one finished run into `dir` (see the module docs). `users` is
/// [`payload_users`], updated as runs are removed. Refuses an unfinished run and an
/// archive file that exists already.
pub fn archive_run(
    log: &dyn Store,
    run: RunId,
    dir: &Path,
    key: Option<&SecretKey>,
    users: &mut BTreeMap<Hash32, BTreeSet<RunId>>,
    now_us: i64,
) -> Result<Archived, ReplayError> {
    let state = load_state(log, run)?.ok_or_else(|| ReplayError::UnknownRun(run.to_string()))?;
    if !state.status.is_terminal() {
        return Err(ReplayError::Invalid(format!(
            "run {run} is {}: only finished runs are archived",
            state.status.name()
        )));
    }
    let head = log.head(run)?;
    let path = dir.join(format!("{run}.jsonl"));
    write_archive(log, run, &path, key, now_us)?;
    let checks = ExportChecks { key: key.map(SecretKey::public) };
    let v = verify_export_with(&path, &checks)?;
    let same = matches!(v.runs.as_slice(), [r] if r.records == head.next_seq.0 && r.head == hex32(&head.last_hash));
    if let Some(f) = v.failure.or_else(|| (!same).then(|| unexpected(run))) {
        let _ = std::fs::remove_file(&path);
        return Err(ReplayError::Invalid(format!("archive of run {run} does not verify: {}", f.message)));
    }
    let file_sha256 = file_digest(&path)?;
    let tomb = Tombstone {
        run: run.to_string(),
        records: head.next_seq.0,
        head: hex32(&head.last_hash),
        accepted_at_us: state.accepted_at_us,
        archived_at_us: now_us,
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        file_sha256: file_sha256.clone(),
        signed_by: v.signed_by,
    };
    let mut aux = keel_engine::index_removal_writes(log, run)?;
    let value = serde_json::to_vec(&tomb).map_err(|e| ReplayError::Invalid(format!("tombstone: {e}")))?;
    aux.push((tombstone_key(run), Some(value)));
    let exclusive = exclusive_payloads(users, run);
    log.remove_run(run, head.next_seq, exclusive, aux)?;
    Ok(Archived { run: run.to_string(), records: tomb.records, head: tomb.head, file: path, file_sha256 })
}

fn unexpected(run: RunId) -> crate::verify::Failure {
    crate::verify::Failure {
        what: crate::verify::Tamper::Altered,
        run: Some(run.to_string()),
        seq: None,
        line: None,
        message: "the file's run is not the database's run (it changed while being archived)".to_owned(),
    }
}

/// Removes `run` from `users`; returns the payloads no other run refers to.
fn exclusive_payloads(users: &mut BTreeMap<Hash32, BTreeSet<RunId>>, run: RunId) -> Vec<Hash32> {
    let mut out = Vec::new();
    users.retain(|digest, runs| {
        if runs.remove(&run) && runs.is_empty() {
            out.push(*digest);
            return false;
        }
        true
    });
    out
}

/// Writes the run's (signed) export to `path`, through a temporary file in the same
/// directory, synced and renamed without replacing anything.
fn write_archive(
    log: &dyn Store,
    run: RunId,
    path: &Path,
    key: Option<&SecretKey>,
    now_us: i64,
) -> Result<(), ReplayError> {
    if path.symlink_metadata().is_ok() {
        return Err(ReplayError::Invalid(format!("{} exists: not replacing an archive file", path.display())));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let written = write_synced(log, run, &tmp, key, now_us)
        // A hard link never replaces an existing file (unlike a rename).
        .and_then(|()| std::fs::hard_link(&tmp, path).map_err(|e| ReplayError::io(path, e)));
    let _ = std::fs::remove_file(&tmp);
    written?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes the export to a new file `tmp` (never an existing one) and syncs it.
fn write_synced(
    log: &dyn Store,
    run: RunId,
    tmp: &Path,
    key: Option<&SecretKey>,
    now_us: i64,
) -> Result<(), ReplayError> {
    let file =
        std::fs::OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| ReplayError::io(tmp, e))?;
    let filter = serde_json::json!({ "runs": [run.to_string()] });
    let mut w = JsonlWriter::new(std::io::BufWriter::new(file), Redaction::default(), filter, now_us)?;
    if let Some(k) = key {
        w = w.signed_by(k.clone());
    }
    w.write_run(log, run)?;
    let mut out = w.finish()?;
    out.flush().map_err(|e| ReplayError::io(tmp, e))?;
    out.get_ref().sync_all().map_err(|e| ReplayError::io(tmp, e))
}

/// SHA-256 of a file's bytes, hex.
pub fn file_digest(path: &Path) -> Result<String, ReplayError> {
    let mut f = std::fs::File::open(path).map_err(|e| ReplayError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| ReplayError::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}
