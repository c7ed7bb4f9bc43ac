//! Drives pending runs: `keel work`.

use crate::error::CmdResult;
use crate::open::open;
use crate::output::{errln, outln, print_json, spinner};
use crate::Registry;
use clap::Args;
use serde_json::json;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub(crate) struct WorkArgs {
    /// Drive every pending run until each is finished or waits for a human, then exit.
    /// Without it, keel works as a service until interrupted (Ctrl-C).
    #[arg(long)]
    pub(crate) until_idle: bool,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
    /// How long a driver's run lease lasts unless its heartbeat renews it (several
    /// workers on one PostgreSQL database: a worker paused longer loses its runs).
    /// From 30 ms to a day; out of that range is a usage error.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = keel_engine::LEASE_TTL_MS_DEFAULT,
        value_parser = clap::value_parser!(u64).range(keel_engine::LEASE_TTL_MS_MIN..=keel_engine::LEASE_TTL_MS_MAX)
    )]
    pub(crate) lease_ttl_ms: u64,
    /// Without --until-idle: seconds the calls in flight get to answer (their answers
    /// recorded) after SIGINT or SIGTERM; then the drivers still waiting stop.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub(crate) shutdown_timeout: u64,
    #[command(flatten)]
    pub(crate) sign: crate::cmd::keygen::SignKeyArgs,
    #[command(flatten)]
    pub(crate) size: crate::registry::SizeWarningArgs,
}

pub(crate) async fn run(db: &Path, a: WorkArgs, registry: &Registry) -> CmdResult {
    let key = a.sign.load()?;
    let engine = registry.engine_signing(open(db)?, a.lease_ttl_ms, key.as_ref(), a.size)?;
    registry.refuse_unknown_unfinished(&engine)?;
    if !a.until_idle {
        return serve_work(db, &engine, Duration::from_secs(a.shutdown_timeout)).await;
    }
    let sp = spinner("working runs until idle");
    let r = engine.run_until_idle().await?;
    sp.finish_and_clear();
    if a.json {
        print_json(&json!({
            "driven": r.driven, "completed": r.completed, "failed": r.failed, "cancelled": r.cancelled,
            "awaiting_human": r.awaiting_human, "lease_lost": r.lease_lost,
            "fenced": engine.lease_stats().fenced, "renewals_lost": engine.lease_stats().renewals_lost,
            "stopped": r.stopped.iter().map(|(run, e)| json!({"run": run.to_string(), "error": e})).collect::<Vec<_>>(),
        }))?;
    } else {
        // The drives that ended otherwise, so the figures add up: a drive that ended
        // waiting for a timer (a retry's backoff) is followed by another drive of the run.
        let ended = r.completed + r.failed + r.cancelled + r.awaiting_human + r.lease_lost + r.stopped.len();
        let again = r.driven.saturating_sub(ended);
        let mut more = String::new();
        if again > 0 {
            more.push_str(&format!(", {again} driven again later (a timer)"));
        }
        if r.lease_lost > 0 {
            more.push_str(&format!(", {} lost to another process", r.lease_lost));
        }
        if !r.stopped.is_empty() {
            more.push_str(&format!(", {} stopped", r.stopped.len()));
        }
        outln!(
            "driven {}: {} completed, {} failed, {} cancelled, {} awaiting a human{more}",
            r.driven,
            r.completed,
            r.failed,
            r.cancelled,
            r.awaiting_human
        )?;
        for (run, e) in &r.stopped {
            outln!("stopped: run {run}: {e}")?;
        }
    }
    Ok(if r.stopped.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `keel work` as a service: works runs until SIGINT or SIGTERM, then stops taking runs
/// and starting calls, and gives the calls in flight `grace` to answer (recorded); the
/// drivers still waiting then stop (their calls are redelivered by the next start). Exit
/// 0 when every driver stopped cleanly, 1 when one stopped on an error or the drivers did
/// not stop within twice `grace`.
async fn serve_work(db: &Path, engine: &keel_engine::Engine, grace: Duration) -> CmdResult {
    let stop = crate::sys::stop_signal();
    let workers = engine.start();
    errln!("keel: working runs in {} (SIGINT or SIGTERM to stop)", crate::backend::redacted(db).display());
    stop.await;
    errln!("keel: stopping: no new runs taken or calls started; letting the calls in flight answer");
    // The drain records the calls' answers for up to `grace`, then stops the drivers
    // still waiting (their calls are redelivered by the next start): bounded by twice it.
    let Ok(report) = tokio::time::timeout(grace.saturating_mul(2), workers.drain(grace)).await else {
        errln!("keel: the drivers did not stop within {}s; exiting", grace.saturating_mul(2).as_secs());
        return Ok(ExitCode::from(1));
    };
    let l = engine.lease_stats();
    errln!(
        "keel: stopped after {} driver pass(es); leases lost: {} ({} appends fenced, {} renewals failed)",
        report.driven,
        l.drives_lost,
        l.fenced,
        l.renewals_lost
    );
    for (run, e) in &report.stopped {
        errln!("keel: run {run}: driver stopped: {e}");
    }
    Ok(if report.stopped.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
