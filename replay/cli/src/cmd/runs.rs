//! Lists runs: `keel runs`.

use crate::error::{CliError, CmdResult};
use crate::open::open_read;
use crate::output::{outln, print_json};
use crate::Registry;
use clap::Args;
use keel_engine::{RunFilter, RunId, RunStatus};
use keel_replay::views;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct RunsArgs {
    /// Only runs in this status (Accepted, Planning, Running, AwaitingHuman, Completed, Failed, Cancelled).
    #[arg(long, value_name = "STATUS")]
    pub(crate) status: Option<String>,
    /// Only runs of this workflow type.
    #[arg(long, value_name = "NAME")]
    pub(crate) workflow: Option<String>,
    /// At most N runs (1..=1000), then the cursor of the next page; default: every run.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=LIMIT_MAX as i64))]
    pub(crate) limit: Option<u16>,
    /// Start after this run id: the `next_cursor` of the previous page.
    #[arg(long, value_name = "RUN")]
    pub(crate) cursor: Option<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Largest `--limit` (the API's largest page of `GET /v1/runs`).
pub(crate) const LIMIT_MAX: u16 = 1000;

impl RunsArgs {
    /// `--cursor` as a run id (a usage error otherwise).
    pub(crate) fn cursor_id(&self) -> Result<Option<RunId>, CliError> {
        self.cursor
            .as_deref()
            .map(|c| c.parse::<RunId>().map_err(|_| CliError::Usage(format!("--cursor {c:?} is not a run id"))))
            .transpose()
    }
}

pub(crate) fn run(db: &Path, a: RunsArgs, registry: &Registry) -> CmdResult {
    let status = parse_status(a.status.as_deref())?;
    let after = a.cursor_id()?;
    let engine = registry.engine(open_read(db)?)?;
    // O(page) entries of the run index (every run without --limit).
    let filter = RunFilter { status, workflow: a.workflow.clone() };
    let page = engine.runs_page(&filter, after, a.limit.map_or(usize::MAX, usize::from))?;
    let runs: Vec<Value> = page.runs.iter().map(views::run_summary_json).collect();
    print(&runs, page.next_cursor.map(|r| r.to_string()), &a, &db_flag(db))
}

/// `--db DB` as one shell word, a directory as an absolute path (the command runs from
/// any directory); empty for a PostgreSQL URL with a password in it (never printed: the
/// next page's command then says to give the same `--db`).
pub(crate) fn db_flag(db: &Path) -> String {
    if crate::backend::redacted(db) != db {
        return String::new();
    }
    let dir = match crate::backend::postgres_config(db) {
        None => std::path::absolute(db).unwrap_or_else(|_| db.to_path_buf()),
        Some(_) => db.to_path_buf(),
    };
    format!("--db {}", shell_word(&dir.to_string_lossy()))
}

/// Prints the listing (`--json` or the table), from the entries of `keel runs --json` and
/// the cursor of the next page (only with `--limit`); the text ends with the command for
/// that page, reading from `source` (`--db DB` or `--server URL`).
pub(crate) fn print(runs: &[Value], next_cursor: Option<String>, a: &RunsArgs, source: &str) -> CmdResult {
    if a.json {
        print_json(&json!({ "runs": runs, "next_cursor": next_cursor }))?;
    } else {
        crate::render::runs(runs)?;
        if let Some(next) = next_cursor {
            let mut more = if source.is_empty() { String::from("keel runs") } else { format!("keel {source} runs") };
            if let Some(s) = &a.status {
                more.push_str(&format!(" --status {s}"));
            }
            if let Some(w) = &a.workflow {
                // `=`: a name starting with `-` is not taken for a flag.
                more.push_str(&format!(" --workflow={}", shell_word(w)));
            }
            if let Some(n) = a.limit {
                more.push_str(&format!(" --limit {n}"));
            }
            let same = if source.is_empty() { " (with the same --db)" } else { "" };
            outln!("more runs follow: {more} --cursor {next}{same}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `word` as one shell word: as it is when it needs no quoting, in single quotes otherwise.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./:@+".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `--status` as a run status (a usage error names the statuses).
pub(crate) fn parse_status(given: Option<&str>) -> Result<Option<RunStatus>, CliError> {
    given
        .map(|s| {
            RunStatus::parse(s).ok_or_else(|| {
                CliError::Usage(format!(
                    "unknown status {s:?} (one of {})",
                    RunStatus::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
                ))
            })
        })
        .transpose()
}
