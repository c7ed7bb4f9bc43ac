//! Shows one run: `keel show`.

use crate::error::CmdResult;
use crate::open::open_read;
use crate::output::{out, print_json};
use crate::Registry;
use clap::Args;
use keel_replay::source::resolve_run;
use keel_replay::views;
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct ShowArgs {
    /// Run id or a unique prefix of it.
    pub(crate) run: String,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(db: &Path, a: ShowArgs, registry: &Registry) -> CmdResult {
    let store = open_read(db)?;
    let run = resolve_run(store.as_ref(), &a.run)?;
    let engine = registry.engine(store)?;
    let state = engine.state(run)?;
    if a.json {
        print_json(&views::state_json(&state))?;
    } else {
        out!("{}", views::state_text(&state))?;
    }
    Ok(ExitCode::SUCCESS)
}
