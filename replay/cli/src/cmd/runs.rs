//! Lists runs: `keel runs`.

use crate::error::{CliError, CmdResult};
use crate::open::open_read;
use crate::output::print_json;
use crate::Registry;
use clap::Args;
use keel_engine::RunStatus;
use keel_replay::views;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct RunsArgs {
    /// Only runs in this status (Accepted, Planning, Running, AwaitingHuman, Completed, Failed, Cancelled).
    #[arg(long, value_name = "STATUS")]
    pub(crate) status: Option<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(db: &Path, a: RunsArgs, registry: &Registry) -> CmdResult {
    let status = parse_status(a.status.as_deref())?;
    let engine = registry.engine(open_read(db)?)?;
    let runs: Vec<_> = engine.runs()?.into_iter().filter(|r| status.is_none_or(|s| r.status == s)).collect();
    let runs: Vec<Value> = runs.iter().map(views::run_summary_json).collect();
    print(&runs, a.json)
}

/// Prints the listing (`--json` or the table), from the entries of `keel runs --json`.
pub(crate) fn print(runs: &[Value], as_json: bool) -> CmdResult {
    if as_json {
        print_json(&json!({ "runs": runs }))?;
    } else {
        crate::render::runs(runs)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--status` as a run status (a usage error names the statuses).
pub(crate) fn parse_status(given: Option<&str>) -> Result<Option<RunStatus>, CliError> {
    given
        .map(|s| {
            RunStatus::parse(s).ok_or_else(|| {
                CliError::Usage(format!(
                    "unknown status {s:?} (one of {})",
                    RunStatus::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
                ))
            })
        })
        .transpose()
}
