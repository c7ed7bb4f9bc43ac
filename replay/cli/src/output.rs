//! Printing: JSON documents on stdout, progress bars and spinners on a terminal's stderr.

use crate::error::{io_err, CliError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Prints `v` as pretty JSON and a newline on stdout (the `--json` outputs).
pub(crate) fn print_json(v: &Value) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
    writeln!(out).map_err(|e| io_err("stdout", e))
}

/// A progress bar of `len` steps on stderr, hidden when stderr is not a terminal (so
/// scripts and tests see no bar).
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg:<12} [{bar:32}] {pos}/{len} {elapsed}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_owned());
    pb
}

/// A spinner on stderr for work of unknown length, hidden when stderr is not a terminal.
pub(crate) fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(what.to_owned());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// A cost in micro-units as printed in tables.
pub(crate) fn money(micros: u64) -> String {
    format!("{micros}")
}
