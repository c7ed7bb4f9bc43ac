//! Lists escalations: `keel escalations`.

use crate::cmd::JsonArgs;
use crate::error::CmdResult;
use crate::open::open_read;
use crate::output::print_json;
use crate::Registry;
use keel_replay::views;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;

pub(crate) fn run(db: &Path, a: JsonArgs, registry: &Registry) -> CmdResult {
    let engine = registry.engine(open_read(db)?)?;
    let pending = engine.escalations()?;
    print(&pending.iter().map(views::escalation_json).collect::<Vec<_>>(), a.json)
}

/// Prints the escalations (`--json` or text), from the entries of `keel escalations --json`.
pub(crate) fn print(pending: &[Value], as_json: bool) -> CmdResult {
    if as_json {
        print_json(&json!({ "escalations": pending }))?;
    } else {
        crate::render::escalations(pending)?;
    }
    Ok(ExitCode::SUCCESS)
}
