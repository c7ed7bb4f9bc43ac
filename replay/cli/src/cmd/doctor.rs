//! Explains what a damaged database lost and what an export can restore: `keel doctor`
//! (also `keel verify --deep`).
//!
//! Reads the database without writing to it (crate::open::open_read_lossy): the store's
//! manifest of committed history against what sled holds, then every run's chain.

use crate::error::{io_err, CmdResult};
use crate::open::open_read_lossy;
use crate::output::print_json;
use clap::Args;
use keel_replay::verify::{verify_db, verify_export, Verification};
use keel_store::LostRecords;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct DoctorArgs {
    /// An export file (JSONL) to check lost records against: which of them it can restore.
    #[arg(long)]
    pub(crate) export: Option<PathBuf>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(db: &Path, a: DoctorArgs) -> CmdResult {
    let (store, lost) = open_read_lossy(db)?;
    let runs = store.runs()?;
    let chains = verify_db(store.as_ref(), &runs, || {})?;
    let export = a.export.as_deref().map(verify_export).transpose()?;
    let doc = report(db, &lost, &chains, export.as_ref(), a.export.as_deref());
    if a.json {
        print_json(&doc)?;
    } else {
        render(&doc).map_err(|e| io_err("stdout", e))?;
    }
    if doc.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

/// What an export holds of one lost run.
fn restorable(l: &LostRecords, export: Option<&Verification>) -> Value {
    let Some(v) = export else { return Value::Null };
    if !v.ok() {
        return json!({"restorable": false, "why": "the export does not verify"});
    }
    match v.runs.iter().find(|r| r.run == l.run.to_string()) {
        None => json!({"restorable": false, "why": "the run is not in the export"}),
        Some(r) if r.records >= l.committed_next.0 => {
            json!({"restorable": true, "records": r.records, "head": r.head})
        }
        Some(r) => json!({
            "restorable": false,
            "records": r.records,
            "why": format!("the export holds records 0..{} only", r.records),
        }),
    }
}

/// `damaged-*` directories (evidence copies made before sled recovered its files).
fn evidence(db: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(db) else { return Vec::new() };
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("damaged-"))
        .map(|n| db.join(n).display().to_string())
        .collect();
    out.sort();
    out
}

fn report(
    db: &Path,
    lost: &[LostRecords],
    chains: &Verification,
    export: Option<&Verification>,
    export_path: Option<&Path>,
) -> Value {
    let lost_doc: Vec<Value> = lost
        .iter()
        .map(|l| {
            json!({
                "run": l.run.to_string(),
                "from": l.from.0,
                "committed_next": l.committed_next.0,
                "reason": l.reason,
                "export": restorable(l, export),
            })
        })
        .collect();
    json!({
        "source": crate::backend::redacted(db).display().to_string(),
        "ok": lost.is_empty() && chains.ok(),
        "lost": lost_doc,
        "runs": chains.runs.len(),
        "records": chains.records(),
        "failure": chains.failure,
        "export": export_path.map(|p| p.display().to_string()),
        "export_failure": export.and_then(|v| v.failure.clone()),
        "evidence": evidence(db),
    })
}

fn render(doc: &Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or_default();
    writeln!(out, "database {}", s(doc, "source"))?;
    let lost = doc.get("lost").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if lost.is_empty() {
        writeln!(out, "committed history: complete (every run's committed head is in the database)")?;
    }
    for l in lost {
        let last = n(l, "committed_next").saturating_sub(1);
        writeln!(out, "LOST  run {} seqs {}..={}: {}", s(l, "run"), n(l, "from"), last, s(l, "reason"))?;
        match l.get("export") {
            Some(e) if e.get("restorable").and_then(Value::as_bool) == Some(true) => {
                writeln!(out, "      restorable: the export holds records 0..{} (verified)", n(e, "records"))?
            }
            Some(e) if !e.is_null() => writeln!(out, "      not restorable from the export: {}", s(e, "why"))?,
            _ => writeln!(out, "      (give an export with --export FILE to see what it can restore)")?,
        }
    }
    match doc.get("failure").filter(|f| !f.is_null()) {
        None => writeln!(out, "chains: {} record(s) in {} run(s) verify", n(doc, "records"), n(doc, "runs"))?,
        Some(f) => writeln!(out, "chains: {}", s(f, "message"))?,
    }
    if let Some(f) = doc.get("export_failure").filter(|f| !f.is_null()) {
        writeln!(out, "export {}: does not verify: {}", s(doc, "export"), s(f, "message"))?;
    }
    for e in doc.get("evidence").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        writeln!(
            out,
            "evidence: sled's files as found before recovery are kept in {}",
            e.as_str().unwrap_or_default()
        )?;
    }
    let ok = doc.get("ok").and_then(Value::as_bool) == Some(true);
    writeln!(out, "{}", if ok { "nothing lost" } else { "damage found" })
}
