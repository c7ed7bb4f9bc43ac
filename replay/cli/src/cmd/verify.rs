//! Verifies a hash chain: `keel verify`.

use crate::error::{CliError, CmdResult};
use crate::open::open;
use crate::output::{print_json, progress};
use clap::Args;
use keel_replay::source::{resolve_run, resolve_run_in};
use keel_replay::verify::{compare_heads, verify_db, verify_export, Verification};
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
}

pub(crate) fn run(db: &Path, a: VerifyArgs) -> CmdResult {
    let (mut v, source): (Verification, String) = match &a.file {
        Some(file) => {
            let v = verify_export(file)?;
            (v, file.display().to_string())
        }
        None => {
            let store = open(db)?;
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
            let store = open(db)?;
            v.failure = compare_heads(store.as_ref(), &v.runs)?;
        }
    }
    let doc = json!({
        "source": source,
        "ok": v.ok(),
        "records": v.records(),
        "runs": v.runs,
        "failure": v.failure,
    });
    print(&doc, a.json)
}

/// Prints a verification (`--json` or text) from the `keel verify --json` document; exit 1
/// with the failure's message when it failed.
pub(crate) fn print(doc: &serde_json::Value, as_json: bool) -> CmdResult {
    let printed = if as_json { print_json(doc) } else { crate::render::verification(doc) };
    // The verdict outlives a closed pipe: a failed verification exits 1 whatever was shown.
    match doc.get("failure").filter(|f| !f.is_null()) {
        None => printed.map(|()| ExitCode::SUCCESS),
        Some(f) => Err(CliError::Failed(format!(
            "{}: {}",
            doc.get("source").and_then(serde_json::Value::as_str).unwrap_or_default(),
            f.get("message").and_then(serde_json::Value::as_str).unwrap_or_default()
        ))),
    }
}
