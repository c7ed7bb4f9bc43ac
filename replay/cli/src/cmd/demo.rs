//! Runs demo runs: `keel demo`.

use crate::error::{CliError, CmdResult};
use crate::open::open_db;
use crate::output::{money, outln, print_json, progress, spinner};
use crate::Registry;
use clap::Args;
use keel_demo as demo;
use keel_engine::{IdleReport, PendingEscalation, RunId, RunState, Submitted};
use keel_replay::views;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Number of demo runs to submit (request i plays scenario i % 8).
    #[arg(long, default_value_t = 8)]
    pub(crate) runs: u64,
    /// Batch seed: the same seed and index give the same run (and are deduplicated).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) size: crate::registry::SizeWarningArgs,
}

pub(crate) async fn run(db: &Path, a: DemoArgs, registry: &Registry) -> CmdResult {
    if !registry.knows(demo::WORKFLOW) {
        return Err(CliError::Failed(format!(
            "this keel binary does not know the demo's workflow {:?}: run the stock keel binary for the demo",
            demo::WORKFLOW
        )));
    }
    let store = open_db(db, true)?;
    let engine = registry.engine_signing(store, keel_engine::LEASE_TTL_MS_DEFAULT, None, a.size)?;
    // Working the demo's runs until idle would drive every unfinished run of the database.
    registry.refuse_unknown_unfinished(&engine)?;
    let pb = progress(a.runs, "submitting");
    let mut submitted = Vec::new();
    for index in 0..a.runs {
        let s = engine.submit(demo::request(a.seed, index)).await?;
        submitted.push((index, s));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let sp = spinner("working runs until idle");
    let idle = engine.run_until_idle().await?;
    sp.finish_and_clear();
    // A run whose driver stopped on an error (a full disk, a poisoned store) may have
    // records whose flush failed: what reads back is not known to be durable, so its state
    // is not shown, and the demo fails.
    let stopped: BTreeSet<RunId> = idle.stopped.iter().map(|(run, _)| *run).collect();
    let mut rows = Vec::new();
    for (index, s) in submitted.iter().filter(|(_, s)| !stopped.contains(&s.run)) {
        let st = engine.state(s.run)?;
        rows.push(Row { index: *index, submitted: s, state: st });
    }
    let pending: Vec<PendingEscalation> =
        engine.escalations()?.into_iter().filter(|p| !stopped.contains(&p.run)).collect();
    let printed = if a.json {
        print_json_report(db, a.seed, &rows, &pending, &idle)
    } else {
        print_text_report(db, &rows, &pending, &idle)
    };
    // The run to name is the one that met the cause: after a failed flush every other
    // driver's append is refused as "poisoned", and those may have ended first.
    let poisoned = keel_store::StoreError::Poisoned.to_string();
    let cause = idle.stopped.iter().find(|(_, e)| !e.contains(&poisoned)).or_else(|| idle.stopped.first());
    if let Some((run, e)) = cause {
        return Err(CliError::Failed(format!(
            "{} run(s) stopped on an error, their states not shown (their last writes may not be durable); \
             first: run {run}: {e}",
            idle.stopped.len()
        )));
    }
    printed.map(|()| ExitCode::SUCCESS)
}

/// One submitted demo request and its state after the work.
struct Row<'a> {
    index: u64,
    submitted: &'a Submitted,
    state: RunState,
}

/// `--json`: the runs, the escalations waiting and the runs whose driver stopped.
fn print_json_report(
    db: &Path,
    seed: u64,
    rows: &[Row<'_>],
    pending: &[PendingEscalation],
    idle: &IdleReport,
) -> Result<(), CliError> {
    let runs: Vec<Value> = rows
        .iter()
        .map(|Row { index: i, submitted: s, state: st }| {
            json!({
                "run": s.run.to_string(), "index": i, "scenario": demo::scenario(*i), "status": st.status.name(),
                "partial": st.partial, "cost_micros": st.totals.cost_micros, "events": st.next_seq.0, "existing": s.duplicate,
            })
        })
        .collect();
    let esc: Vec<Value> = pending.iter().map(views::escalation_json).collect();
    print_json(
        &json!({ "db": crate::backend::redacted(db).display().to_string(), "seed": seed, "runs": runs, "escalations": esc, "stopped": idle.stopped.iter().map(|(r, e)| json!({"run": r.to_string(), "error": e})).collect::<Vec<_>>() }),
    )
}

/// The table of runs, then what is waiting for a human.
fn print_text_report(
    db: &Path,
    rows: &[Row<'_>],
    pending: &[PendingEscalation],
    idle: &IdleReport,
) -> Result<(), CliError> {
    outln!(
        "{:<36}  {:<26}  {:<13}  {:<7}  {:>12}  {:>6}",
        "run",
        "scenario",
        "status",
        "partial",
        "cost(micros)",
        "events"
    )?;
    for Row { index: i, submitted: s, state: st } in rows {
        outln!(
            "{:<36}  {:<26}  {:<13}  {:<7}  {:>12}  {:>6}{}",
            s.run.to_string(),
            demo::scenario(*i),
            st.status.name(),
            if st.partial { "yes" } else { "no" },
            money(st.totals.cost_micros),
            st.next_seq.0,
            if s.duplicate { "  (existing run)" } else { "" }
        )?;
    }
    let total: u64 = rows.iter().map(|r| r.state.totals.cost_micros).sum();
    outln!("{} run(s) in {}; total cost {} micros", rows.len(), crate::backend::redacted(db).display(), total)?;
    for (run, e) in &idle.stopped {
        outln!("stopped: run {run}: {e}")?;
    }
    if !pending.is_empty() {
        outln!("\nwaiting for a human:")?;
        for p in pending {
            outln!(
                "  run {} escalation #{} ({:?}): {}",
                p.run,
                p.escalation.number,
                p.escalation.cause,
                p.escalation.why
            )?;
            outln!("    {}", views::resolve_hint(p))?;
        }
        outln!("then continue them with: keel work --until-idle")?;
    }
    Ok(())
}
