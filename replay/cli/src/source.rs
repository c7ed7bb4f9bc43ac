//! Runs read from an export file (`--from FILE`).

use crate::error::CliError;
use keel_replay::source::{export_runs, resolve_run_in};
use keel_store::RunId;
use std::path::Path;

/// One run to replay: where it came from and its events.
pub(crate) struct Loaded {
    /// The run.
    pub(crate) run: RunId,
    /// Its events in seq order.
    pub(crate) events: Vec<keel_engine::Logged>,
}

/// Refuses an export whose hash chain does not verify: replaying an altered or cut
/// history would show a wrong story (or blame the code for a divergence).
pub(crate) fn verified_export(path: &Path) -> Result<(), CliError> {
    let v = keel_replay::verify_export(path)?;
    match v.failure {
        None => Ok(()),
        Some(f) => Err(CliError::Failed(format!(
            "{} does not verify, refusing to replay it: {} (see `keel verify {}`)",
            path.display(),
            f.message,
            path.display()
        ))),
    }
}

/// The run `run` (id or unique prefix; may be left out when the file holds one run) of a
/// verified export file.
pub(crate) fn load_from_file(path: &Path, run: Option<&str>) -> Result<Loaded, CliError> {
    verified_export(path)?;
    let mut found: Vec<Loaded> = Vec::new();
    let mut ids = Vec::new();
    for item in export_runs(path)? {
        let (id, events) = item?;
        ids.push(id);
        found.push(Loaded { run: id, events });
    }
    let want = match run {
        Some(r) => resolve_run_in(&ids, r)?,
        None => match ids.as_slice() {
            [one] => *one,
            [] => return Err(CliError::Failed(format!("{} holds no runs", path.display()))),
            _ => {
                return Err(CliError::Usage(format!(
                    "{} holds {} runs: name one (RUN) or use --all",
                    path.display(),
                    ids.len()
                )))
            }
        },
    };
    found.into_iter().find(|l| l.run == want).ok_or_else(|| CliError::Failed(format!("unknown run {want}")))
}
