//! Verifies a hash chain: `keel verify`.

use crate::error::{CliError, CmdResult};
use crate::open::{open_read, open_read_lossy};
use crate::output::{print_json, progress};
use clap::Args;
use keel_replay::source::{resolve_run, resolve_run_in};
use keel_replay::verify::{compare_heads, verify_db, verify_export, Failure, Tamper, Verification};
use keel_store::RunId;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// Export file to verify (default: verify the database).
    pub(crate) file: Option<PathBuf>,
    /// Only this run (id or unique prefix).
    #[arg(long)]
    pub(crate) run: Option<String>,
    /// With FILE: also compare each run's head hash with the database's.
    #[arg(long, requires = "file")]
    pub(crate) against_db: bool,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
    /// Without FILE: run `keel doctor` (what was lost, evidence copies).
    #[arg(long, conflicts_with_all = ["file", "run"])]
    pub(crate) deep: bool,
}

pub(crate) fn run(db: &Path, a: VerifyArgs) -> CmdResult {
    if a.deep {
        return crate::cmd::doctor::run(db, crate::cmd::doctor::DoctorArgs { export: None, json: a.json });
    }
    let mut lost = Vec::new();
    let (mut v, source): (Verification, String) = match &a.file {
        Some(file) => {
            let v = verify_export(file)?;
            (v, file.display().to_string())
        }
        None => {
            let (store, gone) = open_read_lossy(db)?;
            lost = gone;
            let runs = match &a.run {
                Some(r) => vec![resolve_run(store.as_ref(), r)?],
                None => store.runs()?,
            };
            let pb = progress(runs.len() as u64, "verifying");
            let v = verify_db(store.as_ref(), &runs, || pb.inc(1))?;
            pb.finish_and_clear();
            (v, crate::backend::redacted(db).display().to_string())
        }
    };
    if a.file.is_some() {
        if let Some(r) = &a.run {
            let ids: Vec<RunId> = v.runs.iter().filter_map(|x| x.run.parse().ok()).collect();
            if v.ok() {
                let run = resolve_run_in(&ids, r)?.to_string();
                v.runs.retain(|x| x.run == run);
            }
        }
        if a.against_db && v.ok() {
            let store = open_read(db)?;
            v.failure = compare_heads(store.as_ref(), &v.runs)?;
        }
    }
    if let Some(first) = lost.first() {
        let lost_line =
            keel_store::StoreError::LostCommitted { path: db.to_path_buf(), lost: lost.clone(), evidence: None };
        match v.failure.as_mut() {
            // The chain failure is the precise one; the loss is added to its line.
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
    let mut doc = json!({
        "source": source,
        "ok": v.ok(),
        "records": v.records(),
        "runs": v.runs,
        "failure": v.failure,
    });
    if let (false, Some(map)) = (lost.is_empty(), doc.as_object_mut()) {
        map.insert("lost".into(), json!(lost));
    }
    print(&doc, a.json)
}

/// Prints a verification (`--json` or text) from the `keel verify --json` document; exit 1
/// with the failure's message when it failed.
pub(crate) fn print(doc: &serde_json::Value, as_json: bool) -> CmdResult {
    if as_json {
        print_json(doc)?;
    } else {
        crate::render::verification(doc);
    }
    match doc.get("failure").filter(|f| !f.is_null()) {
        None => Ok(ExitCode::SUCCESS),
        Some(f) => Err(CliError::Failed(format!(
            "{}: {}",
            doc.get("source").and_then(serde_json::Value::as_str).unwrap_or_default(),
            f.get("message").and_then(serde_json::Value::as_str).unwrap_or_default()
        ))),
    }
}
