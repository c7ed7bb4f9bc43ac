//! Lists runs: `keel runs`.

use crate::error::{CliError, CmdResult};
use crate::open::open;
use crate::output::print_json;
use crate::Registry;
use clap::Args;
use keel_engine::RunStatus;
use keel_replay::format::rfc3339;
use keel_replay::views;
use serde_json::json;
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
    let status = match &a.status {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            CliError::Usage(format!(
                "unknown status {s:?} (one of {})",
                RunStatus::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
            ))
        })?),
    };
    let engine = registry.engine(open(db)?)?;
    let runs: Vec<_> = engine.runs()?.into_iter().filter(|r| status.is_none_or(|s| r.status == s)).collect();
    if a.json {
        return print_json(&json!({ "runs": runs.iter().map(views::run_summary_json).collect::<Vec<_>>() }))
            .map(|_| ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<16}  {:<13}  {:<7}  {:>6}  {:>12}  {:>4}  accepted",
        "run", "workflow", "status", "partial", "events", "cost(micros)", "esc"
    );
    for r in &runs {
        println!(
            "{:<36}  {:<16}  {:<13}  {:<7}  {:>6}  {:>12}  {:>4}  {}",
            r.run.to_string(),
            r.workflow,
            r.status.name(),
            if r.partial { "yes" } else { "no" },
            r.events,
            r.cost_micros,
            r.escalations,
            rfc3339(r.accepted_at_us)
        );
    }
    println!("{} run(s)", runs.len());
    Ok(ExitCode::SUCCESS)
}
