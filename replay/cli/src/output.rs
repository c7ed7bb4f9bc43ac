//! Printing: JSON documents and text on stdout, progress bars and spinners on a terminal's
//! stderr.
//!
//! Nothing here panics on a failed write (the `print!` family does): stdout is written
//! through [`Stdout`], which remembers its first failure, and every print returns
//! [`CliError::Stdout`] so that the command stops there. `main` then ends quietly with
//! exit 0 on a closed pipe (`keel runs | head -1`) and prints one line and exits 1 on any
//! other failure (`keel runs > /dev/full`). Lines on stderr ([`errln!`]) are best effort: a
//! failure to write them is ignored, as there is nowhere left to report it.

use crate::error::CliError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A failed write, kept to be reported later: its kind and OS error code.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Noted {
    kind: std::io::ErrorKind,
    code: Option<i32>,
}

impl Noted {
    /// The error again (with its words: `No space left on device`).
    pub(crate) fn error(&self) -> std::io::Error {
        match self.code {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::from(self.kind),
        }
    }
}

/// Keeps the first failure of `r` (an interrupted call is retried, not a failure).
fn note<T>(slot: &OnceLock<Noted>, r: std::io::Result<T>) -> std::io::Result<T> {
    if let Err(e) = &r {
        if e.kind() != std::io::ErrorKind::Interrupted {
            let _ = slot.set(Noted { kind: e.kind(), code: e.raw_os_error() });
        }
    }
    r
}

/// A writer that remembers its first failure, so that a command whose library writer
/// reports it as some other error still says what failed (crate::safe_file).
pub(crate) struct Noting<W> {
    inner: W,
    failed: Arc<OnceLock<Noted>>,
}

impl<W> Noting<W> {
    /// `inner`, noting its first failure in `failed`.
    pub(crate) fn new(inner: W, failed: Arc<OnceLock<Noted>>) -> Self {
        Noting { inner, failed }
    }
}

impl<W: Write> Write for Noting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        note(&self.failed, self.inner.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        note(&self.failed, self.inner.flush())
    }
}

/// The first failed write to stdout of this process.
static STDOUT_FAILED: OnceLock<Noted> = OnceLock::new();

/// The process's standard output, remembering its first write failure (so that a command
/// whose library writer reports it as some other error is still recognised: [`stream_err`]).
pub(crate) struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        note(&STDOUT_FAILED, std::io::stdout().write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        note(&STDOUT_FAILED, std::io::stdout().flush())
    }
}

/// The first write to stdout that failed, if one did.
pub(crate) fn stdout_failure() -> Option<std::io::Error> {
    STDOUT_FAILED.get().map(Noted::error)
}

/// A failure of a writer that was writing to stdout: [`CliError::Stdout`] when stdout
/// failed (whatever error type the writer wrapped it in), else the error as it is.
pub(crate) fn stream_err(e: impl Into<CliError>) -> CliError {
    match stdout_failure() {
        Some(io) => CliError::Stdout(io),
        None => e.into(),
    }
}

/// Writes formatted text to stdout ([`out!`], [`outln!`]).
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    Stdout.write_fmt(args).map_err(CliError::Stdout)
}

/// Flushes stdout (at the end of every command: a failure of the last buffered bytes is
/// a failure of the command).
pub(crate) fn flush_stdout() -> Result<(), CliError> {
    Stdout.flush().map_err(CliError::Stdout)
}

/// `print!` that returns `Result<(), CliError>` instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_out(format_args!($($arg)*)) };
}
/// `println!` that returns `Result<(), CliError>` instead of panicking.
macro_rules! outln {
    () => { $crate::output::write_out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}
/// `eprintln!` that never panics: a line on stderr that cannot be written is dropped.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use {errln, out, outln};

/// Prints `v` as pretty JSON and a newline on stdout (the `--json` outputs).
pub(crate) fn print_json(v: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
    outln!("{text}")
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
