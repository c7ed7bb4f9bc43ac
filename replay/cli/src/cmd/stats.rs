//! Usage and cost per workflow type: `keel stats`.

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
    let stats = engine.stats()?;
    print(&stats.iter().map(views::stats_json).collect::<Vec<_>>(), a.json)
}

/// Prints the stats (`--json` or the table), from the entries of `keel stats --json`.
pub(crate) fn print(stats: &[Value], as_json: bool) -> CmdResult {
    if as_json {
        print_json(&json!({ "workflows": stats }))?;
    } else {
        crate::render::stats(stats)?;
    }
    Ok(ExitCode::SUCCESS)
}
