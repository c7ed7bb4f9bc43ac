//! keel-cli: the `keel` command line (docs/CLI.md), as a library so that a service can
//! build its own `keel` binary with its own workflow types: [`main_with`] a
//! [`Registry`]. The stock `keel` binary (src/main.rs) passes [`Registry::demo`].
//!
//! Every command takes `--db DIR` (default `./keel-data`, env `KEEL_DB`). Errors are one
//! line on stderr starting with `error: `; exit codes: 0 success (and a closed stdout
//! pipe), 1 failure (including a divergence found by `replay --check`, a verification that
//! fails and stdout that cannot be written), 2 usage (docs/CLI.md, "Exit codes").
//!
//! This file parses the command line, dispatches to `cmd/<command>.rs`, and turns a
//! command's failure into one line and an exit code (src/main.rs only calls it). Adding a
//! command: one module in `cmd/`, one variant of `Cmd` and one arm in `run`.

#![deny(clippy::indexing_slicing)]
// Output goes through crate::output (out!, outln!, errln!): the print! family panics when
// stdout or stderr cannot be written.
#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(missing_docs)]

mod backend;
mod cmd;
mod error;
mod open;
mod output;
mod registry;
mod remote;
mod render;
mod safe_file;
mod source;
mod sys;

pub use registry::Registry;

use clap::{Parser, Subcommand};
use error::{CliError, CmdResult};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "keel: durable state machines for AI-agent workflows — run the demo, inspect, replay, fork, export and verify runs",
    propagate_version = true
)]
struct Cli {
    /// The keel database: a directory (sled), or a PostgreSQL URL
    /// (`postgres://USER@HOST:PORT/DATABASE?schema=NAME`).
    #[arg(
        long,
        global = true,
        env = "KEEL_DB",
        hide_env_values = true,
        default_value = "./keel-data",
        value_name = "DIR|URL"
    )]
    db: PathBuf,

    #[command(flatten)]
    conn: remote::ConnArgs,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Submit demo runs (a simulated support-ticket agent) and work them until idle.
    Demo(cmd::demo::DemoArgs),
    /// Submit one request of a registered workflow type (recorded and queued; `keel work`
    /// drives it).
    Submit(cmd::submit::SubmitArgs),
    /// Resume and drive every pending run.
    Work(cmd::work::WorkArgs),
    /// List runs.
    Runs(cmd::runs::RunsArgs),
    /// Show one run: state, plan with task statuses, totals, escalations.
    Show(cmd::show::ShowArgs),
    /// Replay a run offline: time travel, step listing, determinism check.
    Replay(cmd::replay::ReplayArgs),
    /// Fork a run at a seq and continue it live (what if?).
    Fork(cmd::fork::ForkArgs),
    /// Compare the histories of two runs.
    Diff(cmd::diff::DiffArgs),
    /// Export runs for audit: JSONL (verifiable), CSV or a self-contained HTML report.
    Export(cmd::export::ExportArgs),
    /// Verify the hash chain of an export file or of the database.
    Verify(cmd::verify::VerifyArgs),
    /// Make an Ed25519 key pair for signing exports and head checkpoints.
    Keygen(cmd::keygen::KeygenArgs),
    /// Export finished runs to verified (and signed) files, then remove them from the
    /// database, leaving a tombstone per run.
    Archive(cmd::archive::ArchiveArgs),
    /// Explain what a damaged database lost (runs, seqs) and what an export can restore.
    Doctor(cmd::doctor::DoctorArgs),
    /// Copy runs between databases (sled and PostgreSQL), the same records and payloads.
    Copy(cmd::copy::CopyArgs),
    /// List escalations waiting for a human.
    Escalations(cmd::JsonArgs),
    /// Resolve a run's open escalation.
    Resolve(cmd::resolve::ResolveArgs),
    /// Cancel a run that has not ended (recorded with who and why).
    Cancel(cmd::cancel::CancelArgs),
    /// Usage and cost per workflow type.
    Stats(cmd::JsonArgs),
    /// Serve the HTTP admin API (docs/SERVER.md) and work runs, until SIGINT or SIGTERM.
    Serve(cmd::serve::ServeArgs),
    /// Make API tokens for `keel serve`.
    Token(cmd::token::TokenArgs),
    /// Print the run and task state machines.
    Fsm(cmd::fsm::FsmArgs),
    /// Measure what keel costs on top of its log: throughput, step latency, resume,
    /// replay and memory, each next to its floor (fresh temporary databases; docs/PERFORMANCE.md).
    Bench(cmd::bench::BenchArgs),
}

/// The `keel` command line with `registry`'s workflow types: parses the process's
/// arguments, runs the command and returns its exit code (0 success, 1 failure, 2 usage;
/// errors are one line on stderr). A service's own `keel` binary is
/// `fn main() -> ExitCode { keel_cli::main_with(registry) }` (docs/CLI.md).
pub fn main_with(registry: Registry) -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): a closed pipe is a failed write, which
    // ends the command quietly with exit 0 (crate::output), instead of killing the
    // process in the middle of whatever it was writing (a socket included).
    run_with(registry, std::env::args_os())
}

/// [`main_with`] on the given arguments (the first is the program name): for tests and
/// for a binary that parses some arguments itself.
pub fn run_with<I, T>(registry: Registry, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            // clap explains over several lines (then usage); keep it to one.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let joined = parts.join(" ");
            let msg = joined.strip_prefix("error: ").unwrap_or(&joined);
            output::errln!("error: {msg} (see `keel --help`)");
            return ExitCode::from(2);
        }
    };
    // `keel serve` is a long-running service: its panics, internal errors and the
    // decisions it records (with their reasons) are logged unless KEEL_LOG says otherwise.
    let default_filter = if matches!(cli.command, Cmd::Serve(_)) { "warn,keel_server=info" } else { "off" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only on a terminal: a log file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            output::errln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let done = rt.block_on(run(cli, &registry));
    // The last buffered bytes on stdout are part of a command's output.
    let flushed = output::flush_stdout();
    exit_code(match (done, flushed) {
        (Ok(code), Err(e)) if code == ExitCode::SUCCESS => Err(e),
        (done, _) => done,
    })
}

/// A command's exit code; its failure is printed as one line on stderr.
fn exit_code(done: CmdResult) -> ExitCode {
    let (code, msg) = match done {
        Ok(code) => return code,
        Err(CliError::Usage(m)) => (2, one_line(&m)),
        Err(CliError::Locked(path)) => (1, keel_replay::error::ReplayError::DbLocked { path }.to_string()),
        Err(CliError::Failed(m)) => (1, one_line(&m)),
        // A closed pipe: the reader has all it wanted (`keel runs | head -1`).
        Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
        Err(CliError::Stdout(e)) => (1, format!("cannot write to standard output: {}", error::io_words(&e))),
    };
    output::errln!("error: {msg}");
    ExitCode::from(code)
}

/// A message as one line, its I/O errors in words only (`No space left on device`, not
/// `... (os error 28)`).
fn one_line(s: &str) -> String {
    let line = s.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    error::without_os_codes(&line)
}

async fn run(cli: Cli, registry: &Registry) -> CmdResult {
    let db = cli.db;
    // The commands that go through a running `keel serve` when it holds the database.
    let through = remote::goes_through(&cli.command);
    let command = match remote::dispatch(&db, &cli.conn, cli.command).await {
        Ok(done) => return done,
        Err(command) => command,
    };
    // A human action recorded by this process itself, though a token was given: the
    // token names nobody here (only a server records its holder), so say who is recorded.
    if cli.conn.token.is_some() {
        let by = match &command {
            Cmd::Resolve(a) => Some(cmd::who(a.by.as_deref())),
            Cmd::Cancel(a) => Some(cmd::who(a.by.as_deref())),
            _ => None,
        };
        if let Some(by) = by {
            output::errln!(
                "keel: note: no keel serve is used for this database, so the token (--token, KEEL_TOKEN) \
                 is not: this is recorded as by {by:?} (--by, else $USER, else \"cli\"); name a server with \
                 --server URL to act as the token's holder"
            );
        }
    }
    let done = run_local(&db, command, registry).await;
    match done {
        // No server answers for it: say that one could.
        Err(CliError::Locked(path)) if through => Err(remote::locked(&path, None)),
        other => other,
    }
}

async fn run_local(db: &std::path::Path, command: Cmd, registry: &Registry) -> CmdResult {
    let db = db.to_path_buf();
    match command {
        Cmd::Demo(a) => cmd::demo::run(&db, a, registry).await,
        Cmd::Submit(a) => cmd::submit::run(&db, a, registry).await,
        Cmd::Work(a) => cmd::work::run(&db, a, registry).await,
        Cmd::Runs(a) => cmd::runs::run(&db, a, registry),
        Cmd::Show(a) => cmd::show::run(&db, a, registry),
        Cmd::Replay(a) => cmd::replay::run(&db, a, registry),
        Cmd::Fork(a) => cmd::fork::run(&db, a, registry).await,
        Cmd::Diff(a) => cmd::diff::run(&db, a),
        Cmd::Export(a) => cmd::export::run(&db, a),
        Cmd::Verify(a) => cmd::verify::run(&db, a),
        Cmd::Doctor(a) => cmd::doctor::run(&db, a),
        Cmd::Copy(a) => cmd::copy::run(a),
        Cmd::Keygen(a) => cmd::keygen::run(a),
        Cmd::Archive(a) => cmd::archive::run(&db, a),
        Cmd::Escalations(a) => cmd::escalations::run(&db, a, registry),
        Cmd::Resolve(a) => cmd::resolve::run(&db, a, registry).await,
        Cmd::Cancel(a) => cmd::cancel::run(&db, a, registry).await,
        Cmd::Stats(a) => cmd::stats::run(&db, a, registry),
        Cmd::Serve(a) => cmd::serve::run(&db, a, registry).await,
        Cmd::Token(a) => cmd::token::run(&db, a),
        Cmd::Fsm(a) => cmd::fsm::run(a),
        Cmd::Bench(a) => cmd::bench::run(a),
    }
}
