//! Replays runs offline and checks them: `keel replay`.

use crate::error::{CliError, CmdResult};
use crate::open::{open_read, open_read_checked};
use crate::output::{out, outln, print_json, progress};
use crate::source::{load_from_file, verified_export, Loaded};
use crate::Registry;
use clap::Args;
use keel_engine::{Logged, RunId};
use keel_replay::check::{check_run, CheckOptions, CheckReport};
use keel_replay::error::ReplayError;
use keel_replay::format::{event_line, rfc3339};
use keel_replay::source::{export_files, export_runs, load_run_from_db, load_runs_from_db, resolve_run};
use keel_replay::timeline::Replay;
use keel_replay::views;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct ReplayArgs {
    /// Run id (or unique prefix); with --from FILE, selects a run of the file.
    pub(crate) run: Option<String>,
    /// Read from an export file (JSONL) — or, with --all, a folder of them — instead of the database.
    #[arg(long, value_name = "FILE")]
    pub(crate) from: Option<PathBuf>,
    /// Every run of the database (or of --from).
    #[arg(long, conflicts_with = "run")]
    pub(crate) all: bool,
    /// Show the state after this seq.
    #[arg(long, value_name = "SEQ")]
    pub(crate) until: Option<u64>,
    /// List each event with the run and task states after it (up to --until).
    #[arg(long)]
    pub(crate) step: bool,
    /// Check that the current code decides what the log says it did; exit 1 on the first divergence.
    #[arg(long)]
    pub(crate) check: bool,
    /// Change a knob of the policy the check runs with, e.g. max_replans=0 (repeatable).
    #[arg(long, value_name = "KEY=VALUE", hide = true)]
    pub(crate) policy: Vec<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

/// What `decide` runs with in a check: the binary's policy with `--policy` applied, and
/// the handler names its engine registers (so the check sees what the binary's engine
/// would decide).
fn check_options(policy: &[String], registry: &Registry) -> Result<CheckOptions, CliError> {
    let policy = keel_replay::policy::apply_settings(registry.base_policy(), policy)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(CheckOptions { policy, handlers: Some(registry.handler_names()) })
}

/// Checks one run against the current code: only a run of a workflow type this binary
/// knows (another binary may register other handlers and another policy, which would
/// show as false divergences).
fn check_one(events: &[Logged], opts: &CheckOptions, registry: &Registry) -> Result<CheckReport, CliError> {
    registry.require(events, "check it")?;
    Ok(check_run(events, opts)?)
}

pub(crate) fn run(db: &Path, a: ReplayArgs, registry: &Registry) -> CmdResult {
    if !a.all && a.run.is_none() && a.from.is_none() {
        return Err(CliError::Usage("name a RUN, or use --from FILE or --all".into()));
    }
    if a.all && (a.until.is_some() || a.step) {
        return Err(CliError::Usage("--until and --step replay one run: drop --all".into()));
    }
    if !a.policy.is_empty() && !a.check {
        return Err(CliError::Usage("--policy applies to --check".into()));
    }
    // Validate the policy settings before any work.
    let opts = check_options(&a.policy, registry)?;
    if a.all {
        return replay_all(db, &a, &opts, registry);
    }
    let loaded = match &a.from {
        Some(path) => load_from_file(path, a.run.as_deref())?,
        None => {
            let store = open_read(db)?;
            let run = resolve_run(store.as_ref(), a.run.as_deref().unwrap_or_default())?;
            Loaded { run, events: load_run_from_db(store.as_ref(), run)? }
        }
    };
    if a.check {
        let report = check_one(&loaded.events, &opts, registry)?;
        return finish_checks(vec![report], a.json);
    }
    let replay = Replay::new(loaded.events)?;
    let until = a.until.unwrap_or(replay.last_seq());
    if until > replay.last_seq() {
        return Err(ReplayError::SeqOutOfRange { run: loaded.run, seq: until, last: replay.last_seq() }.into());
    }
    if a.step {
        return print_steps(&replay, loaded.run, until, a.json);
    }
    let state = replay.state_at(until)?;
    let at = replay.events().get(usize::try_from(until).unwrap_or(usize::MAX));
    if a.json {
        print_json(&json!({
            "run": loaded.run.to_string(),
            "seq": until,
            "last_seq": replay.last_seq(),
            "event": at.map(|e| keel_replay::format::event_json_after(&e.event, &state)),
            "state": views::state_json(&state),
        }))?;
    } else {
        if let Some(e) = at {
            outln!("after seq {} of {} ({}): {}", until, replay.last_seq(), rfc3339(e.at_us), event_line(&e.event))?;
        }
        out!("{}", views::state_text(&state))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--step`: each event up to `until` with the run and task states after it.
fn print_steps(replay: &Replay, run: RunId, until: u64, as_json: bool) -> CmdResult {
    let mut cursor = replay.cursor();
    let mut steps = Vec::new();
    while let Some((e, s)) = cursor.forward()? {
        if as_json {
            steps.push(views::step_json(e, s));
        } else {
            let tasks: Vec<String> = s.tasks.iter().map(|t| format!("{}={}", t.spec.id, t.status.name())).collect();
            outln!("{:>4}  {}  {:<68}  run={}", e.seq.0, rfc3339(e.at_us), event_line(&e.event), s.status.name())?;
            if !tasks.is_empty() {
                outln!("      tasks: {}", tasks.join(" "))?;
            }
        }
        if e.seq.0 >= until {
            break;
        }
    }
    if as_json {
        print_json(&json!({ "run": run.to_string(), "until": until, "steps": steps }))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn replay_all(db: &Path, a: &ReplayArgs, opts: &CheckOptions, registry: &Registry) -> CmdResult {
    let mut reports = Vec::new();
    let mut replayed = Vec::new();
    let mut each = |events: Vec<Logged>| -> Result<(), CliError> {
        if a.check {
            reports.push(check_one(&events, opts, registry)?);
        } else {
            let r = Replay::new(events)?;
            let s = r.final_state();
            replayed.push(json!({"run": s.run.to_string(), "events": s.next_seq.0, "status": s.status.name()}));
        }
        Ok(())
    };
    match &a.from {
        Some(path) => {
            let files = export_files(path)?;
            let pb = progress(files.len() as u64, "files");
            for f in files {
                verified_export(&f)?;
                for item in export_runs(&f)? {
                    let (_, events) = item?;
                    each(events)?;
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
        }
        None => {
            // Every run checked against the manifest at open (see `open_read_checked`).
            let store = open_read_checked(db)?;
            let runs = store.runs()?;
            let pb = progress(runs.len() as u64, if a.check { "checking" } else { "replaying" });
            // One pass over every run, read ahead on a second thread; the first bad record
            // stops the command, as one run at a time did.
            for events in load_runs_from_db(store.as_ref(), &runs) {
                each(events?)?;
                pb.inc(1);
            }
            pb.finish_and_clear();
        }
    }
    if a.check {
        return finish_checks(reports, a.json);
    }
    if a.json {
        print_json(&json!({ "runs": replayed }))?;
    } else {
        for r in &replayed {
            outln!(
                "replayed {}  {} events  {}",
                r["run"].as_str().unwrap_or(""),
                r["events"],
                r["status"].as_str().unwrap_or("")
            )?;
        }
        outln!("{} run(s) replayed", replayed.len())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn finish_checks(reports: Vec<CheckReport>, as_json: bool) -> CmdResult {
    let diverged: Vec<&CheckReport> = reports.iter().filter(|r| !r.ok()).collect();
    // The verdict outlives a closed pipe: a divergence exits 1 whatever was shown.
    let printed = print_checks(&reports, diverged.len(), as_json);
    match diverged.first() {
        None => printed.map(|()| ExitCode::SUCCESS),
        Some(r) => {
            let d = r.divergence.as_ref();
            Err(CliError::Failed(format!(
                "{} of {} run(s) diverge from the current code; first: run {} at seq {} ({})",
                diverged.len(),
                reports.len(),
                r.run,
                d.map(|d| d.seq).unwrap_or(0),
                d.map(|d| d.reason.clone()).unwrap_or_default()
            )))
        }
    }
}

/// The checks' report (`--json` or text).
fn print_checks(reports: &[CheckReport], diverged: usize, as_json: bool) -> Result<(), CliError> {
    if as_json {
        return print_json(&json!({ "checked": reports.len(), "diverged": diverged, "runs": reports }));
    }
    for r in reports {
        match &r.divergence {
            None => outln!(
                "ok        {}  {} events ({} decisions, {} outcomes, {} external)",
                r.run,
                r.events,
                r.decisions,
                r.outcomes,
                r.externals
            )?,
            Some(d) => {
                outln!("DIVERGES  {}  at seq {} of {}", r.run, d.seq, r.events)?;
                out!("{d}")?;
            }
        }
    }
    outln!("checked {} run(s): {} ok, {} diverged", reports.len(), reports.len() - diverged, diverged)
}
