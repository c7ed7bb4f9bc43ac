//! Exports runs for audit: `keel export`.

use crate::error::{CliError, CmdResult};
use crate::open::{open_read, open_read_checked};
use crate::output::{errln, progress};
use crate::safe_file::Target;
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use keel_replay::export::{select_runs, CsvWriter, JsonlWriter, Redaction};
use keel_replay::format::{parse_time, rfc3339};
use keel_replay::html::HtmlWriter;
use keel_replay::source::{load_run_from_db, resolve_run};
use keel_store::{RunId, Store};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    Jsonl,
    Csv,
    Html,
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Run id (or unique prefix) to export.
    pub(crate) run: Option<String>,
    /// Export every run (accepted within --since/--until, if given).
    #[arg(long, conflicts_with = "run")]
    pub(crate) all: bool,
    /// With --all: runs accepted at or after this time (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", requires = "all")]
    pub(crate) since: Option<String>,
    /// With --all: runs accepted before this time (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", requires = "all")]
    pub(crate) until: Option<String>,
    /// Output format.
    #[arg(long, value_enum)]
    pub(crate) format: ExportFormat,
    /// Output file (default: stdout). An existing path is refused unless --force; nothing
    /// is written inside a database directory.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// With -o: replace FILE if it is a regular file (never a link, FIFO, device or directory).
    #[arg(long, requires = "output")]
    pub(crate) force: bool,
    /// Redact a payload field: FIELD (every kind) or Kind.FIELD, e.g. output or TaskExecuted.output (repeatable).
    #[arg(long, value_name = "FIELD")]
    pub(crate) redact: Vec<String>,
    /// Sign the export (JSONL) with this private key (from `keel keygen`): a last line
    /// signs the header and every run's head (docs/EXPORT.md).
    #[arg(long, value_name = "KEY")]
    pub(crate) sign: Option<PathBuf>,
}

pub(crate) fn run(db: &Path, a: ExportArgs) -> CmdResult {
    if !a.all && a.run.is_none() {
        return Err(CliError::Usage("name a RUN or use --all".into()));
    }
    let redaction = Redaction::parse(&a.redact).map_err(|e| CliError::Usage(e.to_string()))?;
    if a.sign.is_some() && a.format != ExportFormat::Jsonl {
        return Err(CliError::Usage("--sign: only a JSONL export is signed (--format jsonl)".into()));
    }
    let key = a.sign.as_deref().map(keel_replay::sign::SecretKey::load).transpose()?;
    let (since, until) = time_window(a.since.as_deref(), a.until.as_deref())?;
    // Checked before the database is opened: a refused path costs nothing.
    let target = Target::open(a.output.as_deref(), a.force, db)?;
    // Every run is read for --all: each is checked against the manifest at open, so none
    // the manifest names can be missing from the export without an error.
    let store = if a.run.is_some() { open_read(db)? } else { open_read_checked(db)? };
    let (runs, filter) = match &a.run {
        Some(r) => {
            let run = resolve_run(store.as_ref(), r)?;
            (vec![run], json!({ "runs": [run.to_string()] }))
        }
        None => {
            let runs = select_runs(store.as_ref(), since, until)?;
            (runs, json!({ "all": true, "since": since.map(rfc3339), "until": until.map(rfc3339) }))
        }
    };
    let pb = progress(runs.len() as u64, "exporting");
    let what = Written { format: a.format, redaction, filter, db, key };
    let records = write_runs(store.as_ref(), &runs, what, target.writer()?, &pb).map_err(|e| target.stream_err(e))?;
    pb.finish_and_clear();
    if let Some(path) = target.finish()? {
        errln!("exported {} run(s), {} record(s) to {}", runs.len(), records, path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since` and `--until` as µs since the epoch; `--since` must come before `--until`.
pub(crate) fn time_window(since: Option<&str>, until: Option<&str>) -> Result<(Option<i64>, Option<i64>), CliError> {
    let since = since.map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--since: {e}")))?;
    let until = until.map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--until: {e}")))?;
    if let Some(why) = keel_replay::format::empty_window(since, until, ("--since", "--until")) {
        return Err(CliError::Usage(why));
    }
    Ok((since, until))
}

/// What an export writes, apart from the runs.
struct Written<'a> {
    format: ExportFormat,
    redaction: Redaction,
    /// The selection, recorded in a JSONL export's header.
    filter: Value,
    /// The database, named in an HTML report's subtitle.
    db: &'a Path,
    /// The key that signs a JSONL export.
    key: Option<keel_replay::sign::SecretKey>,
}

/// Writes `runs` to `out` in the format asked; returns the records written.
fn write_runs(
    store: &dyn Store,
    runs: &[RunId],
    what: Written<'_>,
    out: Box<dyn Write>,
    pb: &ProgressBar,
) -> Result<u64, CliError> {
    let now = chrono::Utc::now().timestamp_micros();
    let mut records = 0u64;
    match what.format {
        ExportFormat::Jsonl => {
            let mut w = JsonlWriter::new(out, what.redaction, what.filter, now)?;
            if let Some(k) = what.key {
                w = w.signed_by(k);
            }
            for run in runs {
                records += w.write_run(store, *run)?.records;
                pb.inc(1);
            }
            w.finish()?;
        }
        ExportFormat::Csv => {
            let mut w = CsvWriter::new(out, what.redaction)?;
            for run in runs {
                records += w.write_run(store, *run)?;
                pb.inc(1);
            }
            w.finish()?;
        }
        ExportFormat::Html => {
            let title = match runs {
                [one] => format!("keel run {one}"),
                many => format!("keel runs ({})", many.len()),
            };
            let subtitle = format!("exported {} from {}", rfc3339(now), crate::backend::redacted(what.db).display());
            let mut w = HtmlWriter::new(out, what.redaction, &title, &subtitle)?;
            for run in runs {
                let events = load_run_from_db(store, *run)?;
                records += events.len() as u64;
                w.write_run(&events)?;
                pb.inc(1);
            }
            w.finish()?;
        }
    }
    Ok(records)
}
