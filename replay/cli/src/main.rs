//! `keel`: the command line of keel (docs/CLI.md).
//!
//! Every command takes `--db DIR` (default `./keel-data`, env `KEEL_DB`). Errors are one
//! line on stderr starting with `error: `; exit codes: 0 success, 1 failure (including a
//! divergence found by `replay --check` and a verification that fails), 2 usage.
//!
//! Adding a command: one variant of [`Cmd`] and one arm in [`run`].

mod sys;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel_demo as demo;
use keel_engine::{Decision, Engine, Json, Policy, Resolution, RunStatus};
use keel_replay::check::{check_run, CheckOptions, CheckReport};
use keel_replay::error::ReplayError;
use keel_replay::export::{select_runs, CsvWriter, JsonlWriter, Redaction};
use keel_replay::format::{event_line, parse_time, rfc3339};
use keel_replay::html::HtmlWriter;
use keel_replay::source::{
    export_files, export_runs, load_run_from_db, load_runs_from_db, resolve_run, resolve_run_in,
};
use keel_replay::timeline::Replay;
use keel_replay::verify::{compare_heads, verify_db, verify_export, Verification};
use keel_replay::views;
use keel_store::{EventLog, RunId, SledStore, StoreConfig, StoreError};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "keel: durable state machines for AI-agent workflows — run the demo, inspect, replay, fork, export and verify runs",
    propagate_version = true
)]
struct Cli {
    /// Directory of the keel database.
    #[arg(long, global = true, env = "KEEL_DB", default_value = "./keel-data", value_name = "DIR")]
    db: PathBuf,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Submit demo runs (a simulated support-ticket agent) and work them until idle.
    Demo(DemoArgs),
    /// Resume and drive every pending run.
    Work(WorkArgs),
    /// List runs.
    Runs(RunsArgs),
    /// Show one run: state, plan with task statuses, totals, escalations.
    Show(ShowArgs),
    /// Replay a run offline: time travel, step listing, determinism check.
    Replay(ReplayArgs),
    /// Fork a run at a seq and continue it live (what if?).
    Fork(ForkArgs),
    /// Compare the histories of two runs.
    Diff(DiffArgs),
    /// Export runs for audit: JSONL (verifiable), CSV or a self-contained HTML report.
    Export(ExportArgs),
    /// Verify the hash chain of an export file or of the database.
    Verify(VerifyArgs),
    /// List escalations waiting for a human.
    Escalations(JsonArgs),
    /// Resolve a run's open escalation.
    Resolve(ResolveArgs),
    /// Usage and cost per workflow type.
    Stats(JsonArgs),
    /// Print the run and task state machines.
    Fsm(FsmArgs),
    /// Measure what keel costs on top of its log: throughput, step latency, resume,
    /// replay and memory, each next to its floor (fresh temporary databases; docs/PERFORMANCE.md).
    Bench {
        /// Print one JSON document (stable schema, docs/PERFORMANCE.md).
        #[arg(long)]
        json: bool,
        /// The short run (under 2 minutes on 2 cores; 10k suspended runs instead of 100k).
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Args, Debug)]
struct JsonArgs {
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Number of demo runs to submit (request i plays scenario i % 8).
    #[arg(long, default_value_t = 8)]
    runs: u64,
    /// Batch seed: the same seed and index give the same run (and are deduplicated).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct WorkArgs {
    /// Drive every pending run until each is finished or waits for a human, then exit.
    /// Without it, keel works as a service until interrupted (Ctrl-C).
    #[arg(long)]
    until_idle: bool,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunsArgs {
    /// Only runs in this status (Accepted, Planning, Running, AwaitingHuman, Completed, Failed, Cancelled).
    #[arg(long, value_name = "STATUS")]
    status: Option<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ShowArgs {
    /// Run id or a unique prefix of it.
    run: String,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// Run id (or unique prefix); with --from FILE, selects a run of the file.
    run: Option<String>,
    /// Read from an export file (JSONL) — or, with --all, a folder of them — instead of the database.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Every run of the database (or of --from).
    #[arg(long, conflicts_with = "run")]
    all: bool,
    /// Show the state after this seq.
    #[arg(long, value_name = "SEQ")]
    until: Option<u64>,
    /// List each event with the run and task states after it (up to --until).
    #[arg(long)]
    step: bool,
    /// Check that the current code decides what the log says it did; exit 1 on the first divergence.
    #[arg(long)]
    check: bool,
    /// Change a knob of the policy the check runs with, e.g. max_replans=0 (repeatable).
    #[arg(long, value_name = "KEY=VALUE", hide = true)]
    policy: Vec<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ForkArgs {
    /// Run id (or unique prefix) to fork.
    run: String,
    /// Take the source run from an export file (JSONL) instead of the database; the fork is
    /// saved into --db (created if missing).
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Copy the history up to and including this seq; continue live after it.
    #[arg(long, value_name = "SEQ")]
    at: u64,
    /// Change a knob of the fork's policy, e.g. max_replans=0 or degrade_noncritical=false (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    policy: Vec<String>,
    /// Do not save the fork into the database (report only).
    #[arg(long)]
    no_save: bool,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DiffArgs {
    /// First run (id or unique prefix).
    a: String,
    /// Second run.
    b: String,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ExportFormat {
    Jsonl,
    Csv,
    Html,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Run id (or unique prefix) to export.
    run: Option<String>,
    /// Export every run (accepted within --since/--until, if given).
    #[arg(long, conflicts_with = "run")]
    all: bool,
    /// With --all: runs accepted at or after this time (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", requires = "all")]
    since: Option<String>,
    /// With --all: runs accepted before this time (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", requires = "all")]
    until: Option<String>,
    /// Output format.
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output file (default: stdout).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Redact a payload field: FIELD (every kind) or Kind.FIELD, e.g. output or TaskExecuted.output (repeatable).
    #[arg(long, value_name = "FIELD")]
    redact: Vec<String>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Export file to verify (default: verify the database).
    file: Option<PathBuf>,
    /// Only this run (id or unique prefix).
    #[arg(long)]
    run: Option<String>,
    /// With FILE: also compare each run's head hash with the database's.
    #[arg(long, requires = "file")]
    against_db: bool,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DecisionArg {
    /// Accept what was escalated.
    Approve,
    /// Refuse it (the task is skipped).
    Reject,
    /// Stop the run (it fails).
    Abort,
    /// Ask for a new plan (needs --hint).
    #[value(alias = "replan_with_hint")]
    Replan,
    /// Supply the task's output (needs --output).
    #[value(alias = "supply_output")]
    Supply,
}

#[derive(Args, Debug)]
struct ResolveArgs {
    /// Run id (or unique prefix).
    run: String,
    /// The decision. With --output the decision is "supply" and may be left out.
    #[arg(long, value_enum)]
    decision: Option<DecisionArg>,
    /// Supply the escalated task's output (JSON).
    #[arg(long, value_name = "JSON")]
    output: Option<String>,
    /// Hint for the planner (with --decision replan).
    #[arg(long, value_name = "TEXT")]
    hint: Option<String>,
    /// Who decides (recorded).
    #[arg(long, value_name = "NAME")]
    by: Option<String>,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum FsmFormat {
    Dot,
    Mermaid,
}

#[derive(Args, Debug)]
struct FsmArgs {
    #[arg(long, value_enum, default_value = "dot")]
    format: FsmFormat,
}

/// A command's failure: usage (exit 2) or anything else (exit 1).
#[derive(Debug)]
enum CliError {
    Usage(String),
    Failed(String),
}

impl From<ReplayError> for CliError {
    fn from(e: ReplayError) -> Self {
        CliError::Failed(e.to_string())
    }
}
impl From<keel_engine::EngineError> for CliError {
    fn from(e: keel_engine::EngineError) -> Self {
        CliError::Failed(e.to_string())
    }
}
impl From<keel_store::StoreError> for CliError {
    fn from(e: keel_store::StoreError) -> Self {
        CliError::Failed(e.to_string())
    }
}

fn io_err(what: &str, e: std::io::Error) -> CliError {
    CliError::Failed(format!("{what}: {e}"))
}

type CmdResult = Result<ExitCode, CliError>;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`keel export ... | head`), as Unix tools do, instead
    // of failing a write to stdout.
    sys::default_sigpipe();
    let cli = match Cli::try_parse() {
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
            eprintln!("error: {msg} (see `keel --help`)");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {}", one_line(&m));
            ExitCode::from(2)
        }
        Err(CliError::Failed(m)) => {
            eprintln!("error: {}", one_line(&m));
            ExitCode::from(1)
        }
    }
}

fn one_line(s: &str) -> String {
    s.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

async fn run(cli: Cli) -> CmdResult {
    let db = cli.db;
    match cli.command {
        Cmd::Demo(a) => cmd_demo(&db, a).await,
        Cmd::Work(a) => cmd_work(&db, a).await,
        Cmd::Runs(a) => cmd_runs(&db, a),
        Cmd::Show(a) => cmd_show(&db, a),
        Cmd::Replay(a) => cmd_replay(&db, a),
        Cmd::Fork(a) => cmd_fork(&db, a).await,
        Cmd::Diff(a) => cmd_diff(&db, a),
        Cmd::Export(a) => cmd_export(&db, a),
        Cmd::Verify(a) => cmd_verify(&db, a),
        Cmd::Escalations(a) => cmd_escalations(&db, a),
        Cmd::Resolve(a) => cmd_resolve(&db, a).await,
        Cmd::Stats(a) => cmd_stats(&db, a),
        Cmd::Fsm(a) => cmd_fsm(a),
        Cmd::Bench { json, quick } => Ok(keel_bench::cli(json, quick).map(|()| ExitCode::SUCCESS)?),
    }
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// Opens the keel database in `dir`. With `create = false` a missing database is
/// [`ReplayError::DbNotFound`]; a database another process holds is
/// [`ReplayError::DbLocked`].
fn open_db(dir: &Path, create: bool) -> Result<SledStore, ReplayError> {
    let config = StoreConfig { create, ..StoreConfig::default() };
    SledStore::open(dir, config).map_err(|e| match e {
        StoreError::Locked { .. } => ReplayError::DbLocked { path: dir.to_path_buf() },
        StoreError::NotFound { .. } => ReplayError::DbNotFound { path: dir.to_path_buf() },
        StoreError::NotAStore { reason, .. } => ReplayError::NotADb { path: dir.to_path_buf(), reason },
        other => ReplayError::Store(other),
    })
}

fn open(db: &Path) -> Result<Arc<SledStore>, CliError> {
    Ok(Arc::new(open_db(db, false)?))
}

/// An engine over the database with the demo's workflow type and handlers registered.
fn engine_over(store: Arc<SledStore>) -> Result<Engine, CliError> {
    let log: Arc<dyn keel_store::Store> = store;
    Ok(demo::register(Engine::builder().store(log)).open()?)
}

fn print_json(v: &Value) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
    writeln!(out).map_err(|e| io_err("stdout", e))
}

fn progress(len: u64, what: &str) -> ProgressBar {
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

fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(what.to_owned());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn money(micros: u64) -> String {
    format!("{micros}")
}

fn demo_handlers() -> BTreeSet<String> {
    demo::HANDLERS.iter().map(|h| (*h).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------
// commands
// ---------------------------------------------------------------------------------------

async fn cmd_demo(db: &Path, a: DemoArgs) -> CmdResult {
    let store = Arc::new(open_db(db, true)?);
    let engine = engine_over(store)?;
    let pb = progress(a.runs, "submitting");
    let mut submitted = Vec::new();
    for index in 0..a.runs {
        let s = engine.submit(demo::request(a.seed, index)).await?;
        submitted.push((index, s));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let sp = spinner("working runs until idle");
    let idle = engine.run_until_idle().await?;
    sp.finish_and_clear();
    let mut rows = Vec::new();
    for (index, s) in &submitted {
        let st = engine.state(s.run)?;
        rows.push((index, s, st));
    }
    let pending = engine.escalations()?;
    if a.json {
        let runs: Vec<Value> = rows
            .iter()
            .map(|(i, s, st)| {
                json!({
                    "run": s.run.to_string(), "index": i, "scenario": demo::scenario(**i), "status": st.status.name(),
                    "partial": st.partial, "cost_micros": st.totals.cost_micros, "events": st.next_seq.0, "existing": s.duplicate,
                })
            })
            .collect();
        let esc: Vec<Value> = pending.iter().map(views::escalation_json).collect();
        print_json(
            &json!({ "db": db.display().to_string(), "seed": a.seed, "runs": runs, "escalations": esc, "stopped": idle.stopped.iter().map(|(r, e)| json!({"run": r.to_string(), "error": e})).collect::<Vec<_>>() }),
        )?;
    } else {
        println!(
            "{:<36}  {:<26}  {:<13}  {:<7}  {:>12}  {:>6}",
            "run", "scenario", "status", "partial", "cost(micros)", "events"
        );
        for (i, s, st) in &rows {
            println!(
                "{:<36}  {:<26}  {:<13}  {:<7}  {:>12}  {:>6}{}",
                s.run.to_string(),
                demo::scenario(**i),
                st.status.name(),
                if st.partial { "yes" } else { "no" },
                money(st.totals.cost_micros),
                st.next_seq.0,
                if s.duplicate { "  (existing run)" } else { "" }
            );
        }
        let total: u64 = rows.iter().map(|(_, _, st)| st.totals.cost_micros).sum();
        println!("{} run(s) in {}; total cost {} micros", rows.len(), db.display(), total);
        for (run, e) in &idle.stopped {
            println!("stopped: run {run}: {e}");
        }
        if !pending.is_empty() {
            println!("\nwaiting for a human:");
            for p in &pending {
                println!(
                    "  run {} escalation #{} ({:?}): {}",
                    p.run, p.escalation.number, p.escalation.cause, p.escalation.why
                );
                println!("    {}", views::resolve_hint(p));
            }
            println!("then continue them with: keel work --until-idle");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_work(db: &Path, a: WorkArgs) -> CmdResult {
    let engine = engine_over(open(db)?)?;
    if !a.until_idle {
        let workers = engine.start();
        eprintln!("keel: working runs in {} (Ctrl-C to stop)", db.display());
        tokio::signal::ctrl_c().await.map_err(|e| io_err("waiting for Ctrl-C", e))?;
        let report = workers.shutdown().await;
        eprintln!("keel: stopped after {} driver pass(es)", report.driven);
        return Ok(ExitCode::SUCCESS);
    }
    let sp = spinner("working runs until idle");
    let r = engine.run_until_idle().await?;
    sp.finish_and_clear();
    if a.json {
        print_json(&json!({
            "driven": r.driven, "completed": r.completed, "failed": r.failed, "cancelled": r.cancelled,
            "awaiting_human": r.awaiting_human,
            "stopped": r.stopped.iter().map(|(run, e)| json!({"run": run.to_string(), "error": e})).collect::<Vec<_>>(),
        }))?;
    } else {
        println!(
            "driven {}: {} completed, {} failed, {} cancelled, {} awaiting a human",
            r.driven, r.completed, r.failed, r.cancelled, r.awaiting_human
        );
        for (run, e) in &r.stopped {
            println!("stopped: run {run}: {e}");
        }
    }
    Ok(if r.stopped.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn cmd_runs(db: &Path, a: RunsArgs) -> CmdResult {
    let status = match &a.status {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            CliError::Usage(format!(
                "unknown status {s:?} (one of {})",
                RunStatus::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
            ))
        })?),
    };
    let engine = engine_over(open(db)?)?;
    let runs: Vec<_> = engine.runs()?.into_iter().filter(|r| status.is_none_or(|s| r.status == s)).collect();
    if a.json {
        return print_json(&json!({ "runs": runs.iter().map(views::run_summary_json).collect::<Vec<_>>() }))
            .map(|_| ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<16}  {:<13}  {:<7}  {:>6}  {:>12}  {:>4}  accepted",
        "run", "workflow", "status", "partial", "events", "cost(micros)", "esc"
    );
    for r in &runs {
        println!(
            "{:<36}  {:<16}  {:<13}  {:<7}  {:>6}  {:>12}  {:>4}  {}",
            r.run.to_string(),
            r.workflow,
            r.status.name(),
            if r.partial { "yes" } else { "no" },
            r.events,
            r.cost_micros,
            r.escalations,
            rfc3339(r.accepted_at_us)
        );
    }
    println!("{} run(s)", runs.len());
    Ok(ExitCode::SUCCESS)
}

fn cmd_show(db: &Path, a: ShowArgs) -> CmdResult {
    let store = open(db)?;
    let run = resolve_run(store.as_ref(), &a.run)?;
    let engine = engine_over(store)?;
    let state = engine.state(run)?;
    if a.json {
        print_json(&views::state_json(&state))?;
    } else {
        print!("{}", views::state_text(&state));
    }
    Ok(ExitCode::SUCCESS)
}

/// One run to replay: where it came from and its events.
struct Loaded {
    run: RunId,
    events: Vec<keel_engine::Logged>,
}

fn check_options(policy: &[String], workflow_is_demo: bool) -> Result<CheckOptions, CliError> {
    let policy =
        keel_replay::policy::apply_settings(&Policy::default(), policy).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(CheckOptions { policy, handlers: workflow_is_demo.then(demo_handlers) })
}

fn is_demo(events: &[keel_engine::Logged]) -> bool {
    matches!(events.first().map(|e| &e.event), Some(keel_engine::Event::RunAccepted { workflow, .. }) if workflow == demo::WORKFLOW)
}

fn cmd_replay(db: &Path, a: ReplayArgs) -> CmdResult {
    if !a.all && a.run.is_none() && a.from.is_none() {
        return Err(CliError::Usage("name a RUN, or use --from FILE or --all".into()));
    }
    if a.all && (a.until.is_some() || a.step) {
        return Err(CliError::Usage("--until and --step replay one run: drop --all".into()));
    }
    if !a.policy.is_empty() && !a.check {
        return Err(CliError::Usage("--policy applies to --check".into()));
    }
    // Validate the policy settings before any work.
    check_options(&a.policy, false)?;
    if a.all {
        return replay_all(db, &a);
    }
    let loaded = match &a.from {
        Some(path) => load_from_file(path, a.run.as_deref())?,
        None => {
            let store = open(db)?;
            let run = resolve_run(store.as_ref(), a.run.as_deref().unwrap_or_default())?;
            Loaded { run, events: load_run_from_db(store.as_ref(), run)? }
        }
    };
    if a.check {
        let opts = check_options(&a.policy, is_demo(&loaded.events))?;
        let report = check_run(&loaded.events, &opts)?;
        return finish_checks(vec![report], a.json);
    }
    let replay = Replay::new(loaded.events)?;
    let until = a.until.unwrap_or(replay.last_seq());
    if until > replay.last_seq() {
        return Err(ReplayError::SeqOutOfRange { run: loaded.run, seq: until, last: replay.last_seq() }.into());
    }
    if a.step {
        let mut cursor = replay.cursor();
        let mut steps = Vec::new();
        while let Some((e, s)) = cursor.forward()? {
            if a.json {
                steps.push(views::step_json(e, s));
            } else {
                let tasks: Vec<String> = s.tasks.iter().map(|t| format!("{}={}", t.spec.id, t.status.name())).collect();
                println!("{:>4}  {}  {:<68}  run={}", e.seq.0, rfc3339(e.at_us), event_line(&e.event), s.status.name());
                if !tasks.is_empty() {
                    println!("      tasks: {}", tasks.join(" "));
                }
            }
            if e.seq.0 >= until {
                break;
            }
        }
        if a.json {
            print_json(&json!({ "run": loaded.run.to_string(), "until": until, "steps": steps }))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let state = replay.state_at(until)?;
    let at = replay.events().get(usize::try_from(until).unwrap_or(usize::MAX));
    if a.json {
        print_json(&json!({
            "run": loaded.run.to_string(),
            "seq": until,
            "last_seq": replay.last_seq(),
            "event": at.map(|e| keel_replay::format::event_json(&e.event)),
            "state": views::state_json(&state),
        }))?;
    } else {
        if let Some(e) = at {
            println!("after seq {} of {} ({}): {}", until, replay.last_seq(), rfc3339(e.at_us), event_line(&e.event));
        }
        print!("{}", views::state_text(&state));
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses an export whose hash chain does not verify: replaying an altered or cut
/// history would show a wrong story (or blame the code for a divergence).
fn verified_export(path: &Path) -> Result<(), CliError> {
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

fn load_from_file(path: &Path, run: Option<&str>) -> Result<Loaded, CliError> {
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

fn replay_all(db: &Path, a: &ReplayArgs) -> CmdResult {
    let mut reports = Vec::new();
    let mut replayed = Vec::new();
    let mut each = |events: Vec<keel_engine::Logged>| -> Result<(), CliError> {
        if a.check {
            let opts = check_options(&a.policy, is_demo(&events))?;
            reports.push(check_run(&events, &opts)?);
        } else {
            let r = Replay::new(events)?;
            let s = r.final_state();
            replayed.push(json!({"run": s.run.to_string(), "events": s.next_seq.0, "status": s.status.name()}));
        }
        Ok(())
    };
    match &a.from {
        Some(path) => {
            let files = export_files(path)?;
            let pb = progress(files.len() as u64, "files");
            for f in files {
                verified_export(&f)?;
                for item in export_runs(&f)? {
                    let (_, events) = item?;
                    each(events)?;
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
        }
        None => {
            let store = open(db)?;
            let runs = store.runs()?;
            let pb = progress(runs.len() as u64, if a.check { "checking" } else { "replaying" });
            // One pass over every run, read ahead on a second thread; the first bad record
            // stops the command, as one run at a time did.
            for events in load_runs_from_db(store.as_ref(), &runs) {
                each(events?)?;
                pb.inc(1);
            }
            pb.finish_and_clear();
        }
    }
    if a.check {
        return finish_checks(reports, a.json);
    }
    if a.json {
        print_json(&json!({ "runs": replayed }))?;
    } else {
        for r in &replayed {
            println!(
                "replayed {}  {} events  {}",
                r["run"].as_str().unwrap_or(""),
                r["events"],
                r["status"].as_str().unwrap_or("")
            );
        }
        println!("{} run(s) replayed", replayed.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn finish_checks(reports: Vec<CheckReport>, as_json: bool) -> CmdResult {
    let diverged: Vec<&CheckReport> = reports.iter().filter(|r| !r.ok()).collect();
    if as_json {
        print_json(&json!({ "checked": reports.len(), "diverged": diverged.len(), "runs": reports }))?;
    } else {
        for r in &reports {
            match &r.divergence {
                None => println!(
                    "ok        {}  {} events ({} decisions, {} outcomes, {} external)",
                    r.run, r.events, r.decisions, r.outcomes, r.externals
                ),
                Some(d) => {
                    println!("DIVERGES  {}  at seq {} of {}", r.run, d.seq, r.events);
                    print!("{d}");
                }
            }
        }
        println!(
            "checked {} run(s): {} ok, {} diverged",
            reports.len(),
            reports.len() - diverged.len(),
            diverged.len()
        );
    }
    match diverged.first() {
        None => Ok(ExitCode::SUCCESS),
        Some(r) => {
            let d = r.divergence.as_ref();
            Err(CliError::Failed(format!(
                "{} of {} run(s) diverge from the current code; first: run {} at seq {} ({})",
                diverged.len(),
                reports.len(),
                r.run,
                d.map(|d| d.seq).unwrap_or(0),
                d.map(|d| d.reason.clone()).unwrap_or_default()
            )))
        }
    }
}

async fn cmd_fork(db: &Path, a: ForkArgs) -> CmdResult {
    let policy = keel_replay::policy::apply_settings(&Policy::default(), &a.policy)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let (store, run, events) = match &a.from {
        Some(file) => {
            let loaded = load_from_file(file, Some(&a.run))?;
            let store = if a.no_save { None } else { Some(Arc::new(open_db(db, true)?)) };
            (store, loaded.run, loaded.events)
        }
        None => {
            let store = open(db)?;
            let run = resolve_run(store.as_ref(), &a.run)?;
            let events = load_run_from_db(store.as_ref(), run)?;
            (Some(store), run, events)
        }
    };
    let workflow = is_demo(&events).then(demo::workflow);
    let handlers = if workflow.as_ref().is_some_and(|w| w.name == demo::WORKFLOW) {
        demo::handlers().into_iter().map(|(n, h)| (n.to_owned(), h)).collect()
    } else {
        Default::default()
    };
    let cfg = keel_replay::ForkConfig { policy, workflow, handlers, ..Default::default() };
    let sp = spinner("forking");
    let forked = keel_replay::fork(&events, a.at, cfg).await?;
    sp.finish_and_clear();
    let saved = match (&store, a.no_save) {
        (Some(store), false) => {
            keel_replay::save_run(forked.store.as_ref(), store.as_ref(), forked.run)?;
            true
        }
        _ => false,
    };
    if a.json {
        let mut v = serde_json::to_value(&forked.report).map_err(|e| CliError::Failed(e.to_string()))?;
        v["saved"] = json!(saved);
        print_json(&v)?;
    } else {
        print!("{}", forked.report);
        if saved && a.from.is_none() {
            println!("  saved: keel show {}   keel diff {} {}", forked.run, run, forked.run);
        } else if saved {
            println!(
                "  saved into {}: keel show {}   keel export {} --format html -o fork.html",
                db.display(),
                forked.run,
                forked.run
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_diff(db: &Path, a: DiffArgs) -> CmdResult {
    let store = open(db)?;
    let ra = resolve_run(store.as_ref(), &a.a)?;
    let rb = resolve_run(store.as_ref(), &a.b)?;
    let ea = load_run_from_db(store.as_ref(), ra)?;
    let eb = load_run_from_db(store.as_ref(), rb)?;
    let d = keel_replay::diff_events(&ea, &eb)?;
    if a.json {
        print_json(&serde_json::to_value(&d).map_err(|e| CliError::Failed(e.to_string()))?)?;
    } else {
        print!("{d}");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_export(db: &Path, a: ExportArgs) -> CmdResult {
    if !a.all && a.run.is_none() {
        return Err(CliError::Usage("name a RUN or use --all".into()));
    }
    let redaction = Redaction::parse(&a.redact).map_err(|e| CliError::Usage(e.to_string()))?;
    let since = a.since.as_deref().map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--since: {e}")))?;
    let until = a.until.as_deref().map(parse_time).transpose().map_err(|e| CliError::Usage(format!("--until: {e}")))?;
    let store = open(db)?;
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
    let (out, tmp): (Box<dyn Write>, Option<(tempfile::NamedTempFile, PathBuf)>) = match &a.output {
        None => (Box::new(std::io::BufWriter::new(std::io::stdout())), None),
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let f = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_err(&path.display().to_string(), e))?;
            let w = f.reopen().map_err(|e| io_err(&path.display().to_string(), e))?;
            (Box::new(std::io::BufWriter::new(w)), Some((f, path.clone())))
        }
    };
    let pb = progress(runs.len() as u64, "exporting");
    let now = chrono::Utc::now().timestamp_micros();
    let mut records = 0u64;
    match a.format {
        ExportFormat::Jsonl => {
            let mut w = JsonlWriter::new(out, redaction, filter, now)?;
            for run in &runs {
                records += w.write_run(store.as_ref(), *run)?.records;
                pb.inc(1);
            }
            w.finish()?;
        }
        ExportFormat::Csv => {
            let mut w = CsvWriter::new(out, redaction)?;
            for run in &runs {
                records += w.write_run(store.as_ref(), *run)?;
                pb.inc(1);
            }
            w.finish()?;
        }
        ExportFormat::Html => {
            let title = match runs.as_slice() {
                [one] => format!("keel run {one}"),
                many => format!("keel runs ({})", many.len()),
            };
            let subtitle = format!("exported {} from {}", rfc3339(now), db.display());
            let mut w = HtmlWriter::new(out, redaction, &title, &subtitle)?;
            for run in &runs {
                let events = load_run_from_db(store.as_ref(), *run)?;
                records += events.len() as u64;
                w.write_run(&events)?;
                pb.inc(1);
            }
            w.finish()?;
        }
    }
    pb.finish_and_clear();
    if let Some((f, path)) = tmp {
        let file = f.persist(&path).map_err(|e| io_err(&path.display().to_string(), e.error))?;
        // A temporary file is created 0600; an export is an ordinary file (umask applies
        // to new files only, so use the usual 0644).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
        }
        drop(file);
        eprintln!("exported {} run(s), {} record(s) to {}", runs.len(), records, path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_verify(db: &Path, a: VerifyArgs) -> CmdResult {
    let (mut v, source): (Verification, String) = match &a.file {
        Some(file) => {
            let v = verify_export(file)?;
            (v, file.display().to_string())
        }
        None => {
            let store = open(db)?;
            let runs = match &a.run {
                Some(r) => vec![resolve_run(store.as_ref(), r)?],
                None => store.runs()?,
            };
            let pb = progress(runs.len() as u64, "verifying");
            let v = verify_db(store.as_ref(), &runs, || pb.inc(1))?;
            pb.finish_and_clear();
            (v, db.display().to_string())
        }
    };
    if a.file.is_some() {
        if let Some(r) = &a.run {
            let ids: Vec<RunId> = v.runs.iter().filter_map(|x| x.run.parse().ok()).collect();
            if v.ok() {
                let run = resolve_run_in(&ids, r)?.to_string();
                v.runs.retain(|x| x.run == run);
            }
        }
        if a.against_db && v.ok() {
            let store = open(db)?;
            v.failure = compare_heads(store.as_ref(), &v.runs)?;
        }
    }
    if a.json {
        print_json(&json!({
            "source": source,
            "ok": v.ok(),
            "records": v.records(),
            "runs": v.runs,
            "failure": v.failure,
        }))?;
    } else {
        for r in &v.runs {
            println!("ok  {}  {} records  head {}", r.run, r.records, r.head);
        }
        if v.ok() {
            println!("verified {} record(s) in {} run(s) of {}", v.records(), v.runs.len(), source);
        }
    }
    match v.failure {
        None => Ok(ExitCode::SUCCESS),
        Some(f) => Err(CliError::Failed(format!("{source}: {}", f.message))),
    }
}

fn cmd_escalations(db: &Path, a: JsonArgs) -> CmdResult {
    let engine = engine_over(open(db)?)?;
    let pending = engine.escalations()?;
    if a.json {
        print_json(&json!({ "escalations": pending.iter().map(views::escalation_json).collect::<Vec<_>>() }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if pending.is_empty() {
        println!("no escalation is waiting");
    }
    for p in &pending {
        let x = &p.escalation;
        println!(
            "run {} escalation #{} {:?}{} at {}{}",
            p.run,
            x.number,
            x.cause,
            x.task.as_ref().map(|t| format!(" task {t}")).unwrap_or_default(),
            rfc3339(p.escalated_at_us),
            if p.notified { "" } else { " (not yet notified)" }
        );
        println!("  why:      {}", x.why);
        println!("  question: {}", x.question);
        println!("  resolve:  {}", views::resolve_hint(p));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_resolve(db: &Path, a: ResolveArgs) -> CmdResult {
    let decision = match (a.decision, &a.output, &a.hint) {
        (None | Some(DecisionArg::Supply), Some(out), None) => {
            let v: Value =
                serde_json::from_str(out).map_err(|e| CliError::Usage(format!("--output is not JSON: {e}")))?;
            Decision::SupplyOutput(Json::new(&v))
        }
        (Some(DecisionArg::Approve), Some(out), None) => {
            let v: Value =
                serde_json::from_str(out).map_err(|e| CliError::Usage(format!("--output is not JSON: {e}")))?;
            Decision::SupplyOutput(Json::new(&v))
        }
        (Some(DecisionArg::Replan), None, Some(h)) => Decision::ReplanWithHint(h.clone()),
        (Some(DecisionArg::Approve), None, None) => Decision::Approve,
        (Some(DecisionArg::Reject), None, None) => Decision::Reject,
        (Some(DecisionArg::Abort), None, None) => Decision::Abort,
        (Some(DecisionArg::Replan), _, None) => {
            return Err(CliError::Usage("--decision replan needs --hint TEXT".into()))
        }
        (Some(DecisionArg::Supply), None, _) => {
            return Err(CliError::Usage("--decision supply needs --output JSON".into()))
        }
        (None, None, _) => {
            return Err(CliError::Usage("give --decision approve|reject|abort|replan|supply (or --output JSON)".into()))
        }
        (_, Some(_), Some(_)) => return Err(CliError::Usage("--output and --hint do not go together".into())),
        (Some(d), _, _) => {
            return Err(CliError::Usage(format!("--decision {d:?} takes neither --output nor --hint").to_lowercase()))
        }
    };
    let by =
        a.by.clone()
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "cli".to_owned());
    let store = open(db)?;
    let run = resolve_run(store.as_ref(), &a.run)?;
    let engine = engine_over(store)?;
    let name = decision.name();
    engine.resolve(run, Resolution { decision, by: by.clone() }).await?;
    if a.json {
        print_json(&json!({ "run": run.to_string(), "decision": name, "by": by }))?;
    } else {
        println!("resolved run {run}: {name} by {by}");
        println!("continue it with: keel work --until-idle");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_stats(db: &Path, a: JsonArgs) -> CmdResult {
    let engine = engine_over(open(db)?)?;
    let stats = engine.stats()?;
    if a.json {
        print_json(&json!({ "workflows": stats.iter().map(views::stats_json).collect::<Vec<_>>() }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:>5}  {:<44} {:>7} {:>12} {:>10} {:>8} {:>6} {:>7} {:>7} {:>6} {:>12}",
        "workflow",
        "runs",
        "by status",
        "partial",
        "cost(micros)",
        "tokens",
        "llm",
        "tool",
        "retries",
        "replans",
        "cached",
        "cost/run"
    );
    for s in &stats {
        let by: Vec<String> = s.by_status.iter().map(|(k, v)| format!("{} {v}", k.name())).collect();
        let t = &s.totals;
        println!(
            "{:<18} {:>5}  {:<44} {:>7} {:>12} {:>10} {:>8} {:>6} {:>7} {:>7} {:>6} {:>12}",
            s.workflow,
            s.runs,
            by.join(", "),
            s.partial,
            t.cost_micros,
            t.tokens,
            t.llm_calls,
            t.tool_calls,
            t.retries,
            t.replans,
            t.cache_hits,
            s.cost_per_run_micros
        );
    }
    if stats.is_empty() {
        println!("no runs");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_fsm(a: FsmArgs) -> CmdResult {
    let format = match a.format {
        FsmFormat::Dot => keel_engine::fsm::Format::Dot,
        FsmFormat::Mermaid => keel_engine::fsm::Format::Mermaid,
    };
    print!("{}", keel_engine::fsm::render(format));
    Ok(ExitCode::SUCCESS)
}
