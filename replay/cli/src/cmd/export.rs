//! Exports runs for audit: `keel export`.

use crate::error::{io_err, CliError, CmdResult};
use crate::open::open_read;
use crate::output::progress;
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
    /// Output file (default: stdout).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Redact a payload field: FIELD (every kind) or Kind.FIELD, e.g. output or TaskExecuted.output (repeatable).
    #[arg(long, value_name = "FIELD")]
    pub(crate) redact: Vec<String>,
}

pub(crate) fn run(db: &Path, a: ExportArgs) -> CmdResult {
    if !a.all && a.run.is_none() {
        return Err(CliError::Usage("name a RUN or use --all".into()));
    }
    let redaction = Redaction::parse(&a.redact).map_err(|e| CliError::Usage(e.to_string()))?;
    let since = a.since.as_deref().map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--since: {e}")))?;
    let until = a.until.as_deref().map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--until: {e}")))?;
    let store = open_read(db)?;
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
    // Write to a temporary file next to the target, renamed when complete: a failed export
    // never leaves a half-written file that looks whole.
    let (out, tmp) = output(a.output.as_ref())?;
    let pb = progress(runs.len() as u64, "exporting");
    let records = write_runs(store.as_ref(), &runs, Written { format: a.format, redaction, filter, db }, out, &pb)?;
    pb.finish_and_clear();
    if let Some((f, path)) = tmp {
        persist(f, &path)?;
        eprintln!("exported {} run(s), {} record(s) to {}", runs.len(), records, path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the export goes: stdout, or a temporary file beside `path` (with `path`) that
/// [`persist`] renames when the export is complete.
pub(crate) type Output = (Box<dyn Write>, Option<(tempfile::NamedTempFile, PathBuf)>);

pub(crate) fn output(path: Option<&PathBuf>) -> Result<Output, CliError> {
    Ok(match path {
        None => (Box::new(std::io::BufWriter::new(std::io::stdout())), None),
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let f = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_err(&path.display().to_string(), e))?;
            let w = f.reopen().map_err(|e| io_err(&path.display().to_string(), e))?;
            (Box::new(std::io::BufWriter::new(w)), Some((f, path.clone())))
        }
    })
}

/// What an export writes, apart from the runs.
struct Written<'a> {
    format: ExportFormat,
    redaction: Redaction,
    /// The selection, recorded in a JSONL export's header.
    filter: Value,
    /// The database, named in an HTML report's subtitle.
    db: &'a Path,
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
            let subtitle = format!("exported {} from {}", rfc3339(now), what.db.display());
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

/// Renames the finished temporary file to `path`, as an ordinary file (0644).
pub(crate) fn persist(f: tempfile::NamedTempFile, path: &Path) -> Result<(), CliError> {
    let file = f.persist(path).map_err(|e| io_err(&path.display().to_string(), e.error))?;
    // A temporary file is created 0600; an export is an ordinary file (umask applies
    // to new files only, so use the usual 0644).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    drop(file);
    Ok(())
}
