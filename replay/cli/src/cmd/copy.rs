//! Copies runs between databases, e.g. from sled to PostgreSQL and back: `keel copy`.

use crate::error::{CliError, CmdResult};
use crate::open::open_db;
use crate::output::{outln, print_json, progress};
use clap::Args;
use keel_replay::source::resolve_run;
use keel_store::RunId;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct CopyArgs {
    /// The database to copy from (a directory or a `postgres://…` URL; must exist).
    #[arg(long, value_name = "DB")]
    pub(crate) from: PathBuf,
    /// The database to copy to (created if missing).
    #[arg(long, value_name = "DB")]
    pub(crate) to: PathBuf,
    /// Copy only this run (repeatable); default every run.
    #[arg(long, value_name = "RUN")]
    pub(crate) run: Vec<String>,
    /// Print JSON (`{"copied", "present", "continued", "records"}`).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: CopyArgs) -> CmdResult {
    if a.from == a.to {
        return Err(CliError::Usage("--from and --to name the same database".into()));
    }
    let from = open_db(&a.from, false).map_err(|e| match e {
        // Not the generic hint (`--db` is not read by copy).
        keel_replay::error::ReplayError::DbNotFound { path } => {
            CliError::Failed(format!("no keel database at {} (--from names the database to copy from)", path.display()))
        }
        other => other.into(),
    })?;
    let to = open_db(&a.to, true)?;
    let runs: Vec<RunId> = if a.run.is_empty() {
        from.runs()?
    } else {
        a.run.iter().map(|r| resolve_run(from.as_ref(), r)).collect::<Result<_, _>>()?
    };
    let pb = progress(runs.len() as u64, "copying");
    let (mut copied, mut present, mut continued, mut records) = (0u64, 0u64, 0u64, 0u64);
    for run in &runs {
        let (src, dst) = (from.head(*run)?, to.head(*run)?);
        let had = dst.next_seq.0;
        if (dst.next_seq, dst.last_hash) == (src.next_seq, src.last_hash) {
            // Copied before and not driven since: its records are left alone, its index
            // entry and queue place made right again (a copy cut after its records were
            // written, or made by a keel that did not index copies, left them out).
            announce(to.as_ref(), *run)?;
            present += 1;
            pb.inc(1);
            continue;
        }
        // New to the target, or copied before and driven further since in the source
        // (its copy a prefix of the source's chain: the rest is appended). A copy whose
        // chain differs, or that is longer, is refused with nothing written.
        records += keel_replay::continue_run(from.as_ref(), to.as_ref(), *run)
            .map_err(|e| CliError::Failed(format!("{e}; target {}, source {}", shown(&a.to), shown(&a.from))))?;
        let head = to.head(*run)?;
        if (head.next_seq, head.last_hash) != (src.next_seq, src.last_hash) {
            return Err(CliError::Failed(format!("run {run}: the copy's head differs from the source's")));
        }
        // Records appended outside an engine: the target's run index (listings, open
        // escalations, counts) learns of the run from its log, and a run that can go on is
        // queued where several processes share the queue (a running `keel serve` or `keel
        // work` on the target drives it). Before, a run copied into a database in use was
        // in no listing and driven by nobody.
        announce(to.as_ref(), *run)?;
        if had == 0 {
            copied += 1;
        } else {
            continued += 1;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if a.json {
        print_json(&json!({ "copied": copied, "present": present, "continued": continued, "records": records }))?;
    } else {
        outln!(
            "copied {copied} run(s) ({records} records) from {} to {}; {present} already there, {continued} continued",
            shown(&a.from),
            shown(&a.to)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn shown(db: &Path) -> String {
    crate::backend::redacted(db).display().to_string()
}

/// Re-indexes `run` in `to` from its log, and pushes it to `to`'s shared run queue (if it
/// has one) when it can go on (not finished, not waiting for a human).
fn announce(to: &dyn keel_store::Store, run: RunId) -> Result<(), CliError> {
    // One fold of the run serves both.
    let Some(state) = keel_engine::reindex_run(to, run)? else { return Ok(()) };
    let Some(queue) = to.work_queue() else { return Ok(()) };
    if state.status.is_terminal() || state.status == keel_engine::RunStatus::AwaitingHuman {
        return Ok(());
    }
    let runnable = keel_store::Runnable {
        run,
        workflow: state.workflow,
        priority: state.priority,
        accepted_at_us: state.accepted_at_us,
    };
    queue.push(&runnable)?;
    Ok(())
}
