//! Retention: `keel archive` (docs/AUDIT.md, "Archiving").

use crate::error::{CliError, CmdResult};
use crate::open::open;
use crate::output::{outln, print_json};
use clap::Args;
use keel_engine::RunStatus;
use keel_replay::archive::{archive_run, payload_users, select, ArchiveSelection};
use keel_replay::format::parse_time;
use keel_replay::sign::SecretKey;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct ArchiveArgs {
    /// Archive finished runs whose last event is before this time (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", required_unless_present = "status")]
    pub(crate) before: Option<String>,
    /// Archive finished runs in this status: completed, failed or cancelled (repeatable).
    #[arg(long, value_name = "STATUS")]
    pub(crate) status: Vec<String>,
    /// Directory the archive files are written to (created if missing), one file per run:
    /// RUN.jsonl.
    #[arg(long, value_name = "DIR")]
    pub(crate) to: PathBuf,
    /// Sign each archive file with this private key (from `keel keygen`).
    #[arg(long, value_name = "KEY")]
    pub(crate) sign: Option<PathBuf>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(db: &std::path::Path, a: ArchiveArgs) -> CmdResult {
    let before_us =
        a.before.as_deref().map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--before: {e}")))?;
    let statuses = a
        .status
        .iter()
        .map(|s| RunStatus::parse(s).ok_or_else(|| CliError::Usage(format!("--status {s:?}: not a run status"))))
        .collect::<Result<Vec<_>, _>>()?;
    let key = a.sign.as_deref().map(SecretKey::load).transpose()?;
    std::fs::create_dir_all(&a.to).map_err(|e| crate::error::io_err(&a.to.display().to_string(), e))?;
    let store = open(db)?;
    let sel = ArchiveSelection { before_us, statuses };
    let (runs, unfinished) = select(store.as_ref(), &sel).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut users = payload_users(store.as_ref())?;
    let now = chrono::Utc::now().timestamp_micros();
    let mut done = Vec::new();
    for run in runs {
        let archived = archive_run(store.as_ref(), run, &a.to, key.as_ref(), &mut users, now)?;
        if !a.json {
            outln!(
                "archived {}  {} records  head {}  -> {} (sha256 {})",
                archived.run,
                archived.records,
                archived.head,
                archived.file.display(),
                archived.file_sha256
            )?;
        }
        done.push(archived);
    }
    if a.json {
        print_json(&json!({ "archived": done, "unfinished_left": unfinished, "signed": key.is_some() }))?;
    } else {
        outln!(
            "archived {} run(s) to {}{}; {} matching run(s) not finished, left in place",
            done.len(),
            a.to.display(),
            if key.is_some() { ", signed" } else { "" },
            unfinished
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
