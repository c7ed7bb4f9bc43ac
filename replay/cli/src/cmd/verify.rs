//! Verifies a hash chain: `keel verify`.

use crate::error::{CliError, CmdResult};
use crate::open::{open_read_checked, open_read_lossy};
use crate::output::{outln, print_json, progress};
use clap::Args;
use keel_replay::anchor::{compare_with_db, expect_head_db, expect_head_in, tombstones, verify_checkpoints};
use keel_replay::sign::PublicKey;
use keel_replay::source::{resolve_run, resolve_run_in};
use keel_replay::verify::{verify_db, verify_export_with, ExportChecks, Failure, Tamper, Verification};
use keel_store::RunId;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// Export file to verify (default: verify the database).
    pub(crate) file: Option<PathBuf>,
    /// Only this run (id or unique prefix).
    #[arg(long)]
    pub(crate) run: Option<String>,
    /// With FILE: also compare each run's head hash with the database's (a run the
    /// database continued since is reported, not failed); an `--all` export must hold
    /// every run the database had when it was exported.
    #[arg(long, requires = "file")]
    pub(crate) against_db: bool,
    /// A public key (file from `keel keygen`, or 64 hex digits). With FILE: the export must
    /// carry a valid signature by it. Without: the database's signed head checkpoints
    /// must be by it, and every run's chain must extend its signed heads.
    #[arg(long, value_name = "PUB")]
    pub(crate) key: Option<PathBuf>,
    /// The head hash the run must have (an export's only run or --run; on the database,
    /// --run's chain must hold it).
    #[arg(long, value_name = "HASH")]
    pub(crate) expect_head: Option<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
    /// Without FILE: run `keel doctor` (what was lost, evidence copies).
    #[arg(long, conflicts_with_all = ["file", "run"])]
    pub(crate) deep: bool,
}

/// What was checked beyond the chain, added to the `--json` document.
#[derive(Default)]
struct Extra {
    continued: Vec<keel_replay::anchor::RunContinued>,
    archived: Vec<Value>,
    checkpoints: Option<keel_replay::anchor::CheckpointReport>,
    /// `--expect-head` on the database: records the run has after the expected head.
    more_after_expected: Option<u64>,
    /// Committed records the store's manifest names that sled no longer has.
    lost: Vec<keel_store::LostRecords>,
}

/// Adds what the manifest shows lost to the verification's failure (a chain failure is the
/// precise one: the loss is added to its line).
fn add_lost(v: &mut Verification, db: &Path, lost: &[keel_store::LostRecords]) {
    let Some(first) = lost.first() else { return };
    let lost_line =
        keel_store::StoreError::LostCommitted { path: db.to_path_buf(), lost: lost.to_vec(), evidence: None };
    match v.failure.as_mut() {
        Some(f) => f.message = format!("{}; the manifest also shows {lost_line}", f.message),
        None => {
            v.failure = Some(Failure {
                what: Tamper::Removed,
                run: Some(first.run.to_string()),
                seq: Some(first.from.0),
                line: None,
                message: format!("{lost_line}; `keel doctor` explains what can be restored"),
            })
        }
    }
}

pub(crate) fn run(db: &Path, a: VerifyArgs) -> CmdResult {
    if a.expect_head.is_some() && a.file.is_none() && a.run.is_none() {
        return Err(CliError::Usage("--expect-head on the database needs --run RUN".into()));
    }
    if a.deep {
        return crate::cmd::doctor::run(db, crate::cmd::doctor::DoctorArgs { export: None, json: a.json });
    }
    let key = a.key.as_deref().map(PublicKey::load).transpose()?;
    let mut extra = Extra::default();
    let (mut v, source) = match &a.file {
        Some(file) => (verify_file(db, file, &a, key, &mut extra)?, file.display().to_string()),
        None => (verify_database(db, &a, key, &mut extra)?, crate::backend::redacted(db).display().to_string()),
    };
    add_lost(&mut v, db, &extra.lost);
    let continued = !extra.continued.is_empty() || extra.more_after_expected.is_some_and(|n| n > 0);
    let status = if !v.ok() {
        "failed"
    } else if continued {
        "continued"
    } else {
        "verified"
    };
    let mut doc = json!({
        "source": source,
        "ok": v.ok(),
        "status": status,
        "records": v.records(),
        "runs": v.runs,
        "failure": v.failure,
        "signed_by": v.signed_by,
        "continued": extra.continued,
        "archived": extra.archived,
        "checkpoints": extra.checkpoints,
        "events_after_expected_head": extra.more_after_expected,
    });
    if let (false, Some(map)) = (extra.lost.is_empty(), doc.as_object_mut()) {
        map.insert("lost".into(), json!(extra.lost));
    }
    print(&doc, a.json)
}

/// An export file: chain, signature (with `--key`), `--run`, `--expect-head`, `--against-db`.
fn verify_file(
    db: &Path,
    file: &Path,
    a: &VerifyArgs,
    key: Option<PublicKey>,
    extra: &mut Extra,
) -> Result<Verification, CliError> {
    let mut v = verify_export_with(file, &ExportChecks { key })?;
    if let Some(r) = &a.run {
        let ids: Vec<RunId> = v.runs.iter().filter_map(|x| x.run.parse().ok()).collect();
        if v.ok() {
            let run = resolve_run_in(&ids, r)?.to_string();
            v.runs.retain(|x| x.run == run);
        }
    }
    if let (Some(h), true) = (&a.expect_head, v.ok()) {
        let run = v.runs.first().filter(|_| a.run.is_some()).map(|r| r.run.clone());
        v.failure = expect_head_in(&v.runs, run.as_deref(), h).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    if a.against_db && v.ok() {
        // Every run checked at open: a run the manifest names that sled lost is missing
        // from `runs()`, so the comparison would not see it missing.
        let store = open_read_checked(db)?;
        let cmp = compare_with_db(store.as_ref(), &v.runs, v.selection.as_ref())?;
        v.failure = cmp.failure;
        extra.continued = cmp.continued;
        extra.archived = cmp.archived.into_iter().map(|r| json!({ "run": r })).collect();
    }
    Ok(v)
}

/// The database: every run's chain, its archived runs' tombstones, the signed checkpoints
/// (with `--key`) and `--expect-head`.
fn verify_database(
    db: &Path,
    a: &VerifyArgs,
    key: Option<PublicKey>,
    extra: &mut Extra,
) -> Result<Verification, CliError> {
    let (store, lost) = open_read_lossy(db)?;
    extra.lost = lost;
    let runs = match &a.run {
        Some(r) => vec![resolve_run(store.as_ref(), r)?],
        None => store.runs()?,
    };
    let pb = progress(runs.len() as u64, "verifying");
    let mut v = verify_db(store.as_ref(), &runs, || pb.inc(1))?;
    pb.finish_and_clear();
    if a.run.is_none() {
        extra.archived = tombstones(store.as_ref())?.iter().map(|t| json!(t)).collect();
    }
    if let (Some(k), true) = (key, v.ok()) {
        let report = verify_checkpoints(store.as_ref(), &k)?;
        v.failure = report.failure.clone();
        extra.checkpoints = Some(report);
    }
    if let (Some(h), Some(run), true) = (&a.expect_head, runs.first(), v.ok()) {
        match expect_head_db(store.as_ref(), *run, h).map_err(|e| CliError::Usage(e.to_string()))? {
            Ok(more) => extra.more_after_expected = Some(more),
            Err(f) => v.failure = Some(f),
        }
    }
    Ok(v)
}

/// Prints a verification (`--json` or text) from the `keel verify --json` document; exit 1
/// with the failure's message when it failed.
pub(crate) fn print(doc: &Value, as_json: bool) -> CmdResult {
    let printed =
        if as_json { print_json(doc) } else { crate::render::verification(doc).and_then(|()| print_anchors(doc)) };
    // The verdict outlives a closed pipe: a failed verification exits 1 whatever was shown.
    match doc.get("failure").filter(|f| !f.is_null()) {
        None => printed.map(|()| ExitCode::SUCCESS),
        Some(f) => Err(CliError::Failed(format!(
            "{}: {}",
            doc.get("source").and_then(Value::as_str).unwrap_or_default(),
            f.get("message").and_then(Value::as_str).unwrap_or_default()
        ))),
    }
}

/// The text lines of what anchors the heads: signature, continued runs, archived runs,
/// checkpoints.
fn print_anchors(doc: &Value) -> Result<(), CliError> {
    let list = |k: &str| doc.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
    let s = |v: &Value, k: &str| {
        v.get(k).map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned)).unwrap_or_default()
    };
    if let Some(k) = doc.get("signed_by").and_then(Value::as_str) {
        outln!("signed by key {k}")?;
    }
    for c in list("continued") {
        outln!(
            "run {}: the database has {} more events since this export (not tampering: the export's head is in its chain)",
            s(&c, "run"),
            s(&c, "more")
        )?;
    }
    let archived = list("archived");
    for t in &archived {
        match t.get("file") {
            Some(_) => outln!(
                "archived  {}  {} records  head {}  file {} sha256 {}",
                s(t, "run"),
                s(t, "records"),
                s(t, "head"),
                s(t, "file"),
                s(t, "file_sha256")
            )?,
            None => outln!("run {}: archived by the database (its tombstone holds this head)", s(t, "run"))?,
        }
    }
    if archived.iter().any(|t| t.get("file").is_some()) {
        outln!("{} archived run(s) accounted for by their tombstones", archived.len())?;
    }
    if let Some(n) = doc.get("events_after_expected_head").and_then(Value::as_u64).filter(|n| *n > 0) {
        outln!("the expected head is in the run's chain; the database has {n} more events since it")?;
    }
    if let Some(c) = doc.get("checkpoints").filter(|c| !c.is_null()) {
        outln!(
            "checkpoints: {} signed part(s) checked, newest {}, {} signed head(s) extended by their runs' chains",
            s(c, "parts"),
            s(c, "newest"),
            s(c, "heads")
        )?;
    }
    Ok(())
}
