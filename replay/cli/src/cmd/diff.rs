//! Compares two runs: `keel diff`.

use crate::error::{CliError, CmdResult};
use crate::open::open_read;
use crate::output::{out, print_json};
use clap::Args;
use keel_replay::source::{load_run_from_db, resolve_run};
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct DiffArgs {
    /// First run (id or unique prefix).
    pub(crate) a: String,
    /// Second run.
    pub(crate) b: String,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(db: &Path, a: DiffArgs) -> CmdResult {
    let store = open_read(db)?;
    let ra = resolve_run(store.as_ref(), &a.a)?;
    let rb = resolve_run(store.as_ref(), &a.b)?;
    let ea = load_run_from_db(store.as_ref(), ra)?;
    let eb = load_run_from_db(store.as_ref(), rb)?;
    let d = keel_replay::diff_events(&ea, &eb)?;
    if a.json {
        print_json(&serde_json::to_value(&d).map_err(|e| CliError::Failed(e.to_string()))?)?;
    } else {
        out!("{d}")?;
    }
    Ok(ExitCode::SUCCESS)
}
