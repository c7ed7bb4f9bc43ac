//! Cancels a run: `keel cancel`. Needs no handlers, so it works on a run of any workflow.

use crate::error::{CliError, CmdResult};
use crate::open::open;
use crate::output::{outln, print_json};
use crate::Registry;
use clap::Args;
use keel_replay::source::resolve_run;
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct CancelArgs {
    /// Run id (or unique prefix).
    pub(crate) run: String,
    /// Why the run is cancelled (recorded in `RunCancelled`; required).
    #[arg(long, value_name = "TEXT")]
    pub(crate) reason: String,
    /// Who cancels (recorded; default: $USER, else "cli").
    #[arg(long, value_name = "NAME")]
    pub(crate) by: Option<String>,
    /// Print JSON (`{"run", "cancelled": true, "by"}`, as `POST /v1/runs/{run}/cancel`).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn run(db: &Path, a: CancelArgs, registry: &Registry) -> CmdResult {
    let reason = a.reason.trim();
    if reason.is_empty() {
        return Err(CliError::Usage("--reason must not be empty".into()));
    }
    let by = super::who(a.by.as_deref());
    let store = open(db)?;
    let run = resolve_run(store.as_ref(), &a.run)?;
    let engine = registry.engine(store)?;
    engine.cancel(run, &by, reason).await?;
    if a.json {
        print_json(&keel_replay::views::cancellation_json(run, &by))?;
    } else {
        outln!("cancelled run {run} by {by}: {reason}")?;
    }
    Ok(ExitCode::SUCCESS)
}
