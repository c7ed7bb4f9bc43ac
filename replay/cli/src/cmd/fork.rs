//! Forks a run at a seq: `keel fork`.

use crate::error::{CliError, CmdResult};
use crate::open::{open, open_db};
use crate::output::{errln, out, outln, print_json, spinner};
use crate::source::load_from_file;
use crate::Registry;
use clap::Args;
use keel_engine::Event;
use keel_replay::source::{load_run_from_db, resolve_run};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct ForkArgs {
    /// Run id (or unique prefix) to fork.
    pub(crate) run: String,
    /// Take the source run from an export file (JSONL) instead of the database; the fork is
    /// saved into --db (created if missing).
    #[arg(long, value_name = "FILE")]
    pub(crate) from: Option<PathBuf>,
    /// Copy the history up to and including this seq; continue live after it.
    #[arg(long, value_name = "SEQ")]
    pub(crate) at: u64,
    /// Change a knob of the fork's policy, e.g. max_replans=0 or degrade_noncritical=false (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub(crate) policy: Vec<String>,
    /// Do not save the fork into the database (report only).
    #[arg(long)]
    pub(crate) no_save: bool,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn run(db: &Path, a: ForkArgs, registry: &Registry) -> CmdResult {
    let policy = keel_replay::policy::apply_settings(registry.base_policy(), &a.policy)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let (store, run, events) = match &a.from {
        Some(file) => {
            let loaded = load_from_file(file, Some(&a.run))?;
            // Refuse before --db is created.
            registry.require(&loaded.events, "fork it")?;
            let store = if a.no_save { None } else { Some(open_db(db, true)?) };
            (store, loaded.run, loaded.events)
        }
        None => {
            let store = open(db)?;
            let run = resolve_run(store.as_ref(), &a.run)?;
            let events = load_run_from_db(store.as_ref(), run)?;
            (Some(store), run, events)
        }
    };
    // A fork calls the workflow's planner, evaluator and handlers where the recording
    // cannot answer: it needs them.
    registry.require(&events, "fork it")?;
    let (workflow, handlers) = match events.first().map(|e| &e.event) {
        Some(Event::RunAccepted { workflow, .. }) => registry.parts(workflow).unzip(),
        _ => (None, None),
    };
    let handlers = handlers.unwrap_or_default();
    let cfg = keel_replay::ForkConfig { policy, workflow, handlers, ..Default::default() };
    let sp = spinner("forking");
    let forked = keel_replay::fork(&events, a.at, cfg).await?;
    sp.finish_and_clear();
    let saved = match (&store, a.no_save) {
        (Some(store), false) => {
            keel_replay::save_run(forked.store.as_ref(), store.as_ref(), forked.run)?;
            // Appended outside an engine's journal: put it in the run index.
            keel_engine::reindex_run(store.as_ref(), forked.run).map_err(|e| CliError::Failed(e.to_string()))?;
            true
        }
        _ => false,
    };
    if a.json {
        let mut v = serde_json::to_value(&forked.report).map_err(|e| CliError::Failed(e.to_string()))?;
        if let Some(fields) = v.as_object_mut() {
            fields.insert("saved".to_owned(), json!(saved));
        }
        print_json(&v)?;
    } else {
        out!("{}", forked.report)?;
        if saved && a.from.is_none() {
            outln!("  saved: keel show {}   keel diff {} {}", forked.run, run, forked.run)?;
        } else if saved {
            outln!(
                "  saved into {}: keel show {}   keel export {} --format html -o fork.html",
                crate::backend::redacted(db).display(),
                forked.run,
                forked.run
            )?;
        }
    }
    // A fork whose driver stopped on an error did not finish: say so in the exit code.
    if let Some(e) = &forked.report.stopped {
        errln!("error: the fork's driver stopped: {e}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
