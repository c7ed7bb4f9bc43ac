//! Submits one request: `keel submit`. The run is recorded and queued; `keel work` (or a
//! running `keel serve`) drives it.

use crate::error::{io_err, CliError, CmdResult};
use crate::open::open_db;
use crate::output::{outln, print_json};
use crate::Registry;
use clap::Args;
use keel_engine::{EngineError, Request};
use serde_json::json;
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    /// A registered workflow type.
    pub(crate) workflow: String,
    /// The request's input: JSON text, or `@FILE` to read it from a file.
    #[arg(long, value_name = "JSON|@FILE")]
    pub(crate) input: String,
    /// Idempotency key: the same request again returns its run; another request with the
    /// key (within the workflow type's dedup window) is refused.
    #[arg(long, value_name = "KEY")]
    pub(crate) key: Option<String>,
    /// Higher runs first (default 0).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub(crate) priority: i32,
    /// Print JSON (`{"run", "duplicate"}`, as `POST /v1/runs`).
    #[arg(long)]
    pub(crate) json: bool,
}

/// The request's input: `--input`'s JSON text, or the file it names with `@FILE`.
pub(crate) fn input(a: &SubmitArgs) -> Result<serde_json::Value, CliError> {
    let text = match a.input.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file).map_err(|e| io_err(file, e))?,
        None => a.input.clone(),
    };
    // Scanned before parsing: nothing recursive touches a document nested too deep.
    keel_store::json::check_text_depth(text.as_bytes()).map_err(|e| CliError::Usage(format!("--input: {e}")))?;
    serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("--input is not JSON: {e}")))
}

/// Prints what a submit gave (the same through a server).
pub(crate) fn report(run: &str, duplicate: bool, json: bool) -> Result<(), CliError> {
    if json {
        print_json(&json!({ "run": run, "duplicate": duplicate }))?;
    } else if duplicate {
        outln!("run {run} (already submitted with this key)")?;
    } else {
        outln!("run {run} submitted")?;
    }
    Ok(())
}

pub(crate) async fn run(db: &Path, a: SubmitArgs, registry: &Registry) -> CmdResult {
    let input = input(&a)?;
    let store = open_db(db, true)?;
    let engine = registry.engine(store)?;
    let req = Request { idempotency_key: a.key, priority: a.priority, ..Request::new(a.workflow, input) };
    let s = match engine.submit(req).await {
        Ok(s) => s,
        Err(e @ EngineError::IdempotencyConflict { .. }) => {
            return Err(CliError::Failed(format!("idempotency conflict: {e}")));
        }
        Err(e) => return Err(e.into()),
    };
    report(&s.run.to_string(), s.duplicate, a.json)?;
    Ok(ExitCode::SUCCESS)
}
