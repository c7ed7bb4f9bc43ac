//! Resolves an escalation: `keel resolve`.

use crate::error::{CliError, CmdResult};
use crate::open::open;
use crate::output::{outln, print_json};
use crate::Registry;
use clap::{Args, ValueEnum};
use keel_engine::{Decision, Json, Resolution};
use keel_replay::source::resolve_run;
use keel_replay::views;
use serde_json::Value;
use std::path::Path;
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum DecisionArg {
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
pub(crate) struct ResolveArgs {
    /// Run id (or unique prefix).
    pub(crate) run: String,
    /// The decision. With --output the decision is "supply" and may be left out.
    #[arg(long, value_enum)]
    pub(crate) decision: Option<DecisionArg>,
    /// Supply the escalated task's output (JSON).
    #[arg(long, value_name = "JSON")]
    pub(crate) output: Option<String>,
    /// Hint for the planner (with --decision replan).
    #[arg(long, value_name = "TEXT")]
    pub(crate) hint: Option<String>,
    /// Who decides (recorded; not taken through keel serve, which records the token's name).
    #[arg(long, value_name = "NAME")]
    pub(crate) by: Option<String>,
    /// Why (required; recorded on the HumanResolved event).
    #[arg(long, value_name = "TEXT")]
    pub(crate) reason: String,
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

/// `--output` as canonical JSON: its nesting is checked (a scan of the text) before it is
/// parsed, so a document too deep gives one line with the stable code `json_too_deep`.
fn output_json(out: &str) -> Result<Json, CliError> {
    keel_store::json::check_text_depth(out.as_bytes()).map_err(|e| CliError::Usage(format!("--output: {e}")))?;
    let v: Value = serde_json::from_str(out).map_err(|e| CliError::Usage(format!("--output is not JSON: {e}")))?;
    Ok(Json::new(&v))
}

/// The decision the flags ask for (a usage error names what is missing or too much).
pub(crate) fn decision(d: Option<DecisionArg>, output: Option<&str>, hint: Option<&str>) -> Result<Decision, CliError> {
    Ok(match (d, output, hint) {
        (None | Some(DecisionArg::Supply | DecisionArg::Approve), Some(out), None) => {
            Decision::SupplyOutput(output_json(out)?)
        }
        (Some(DecisionArg::Replan), None, Some(h)) => Decision::ReplanWithHint(h.to_owned()),
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
    })
}

pub(crate) async fn run(db: &Path, a: ResolveArgs, registry: &Registry) -> CmdResult {
    let decision = decision(a.decision, a.output.as_deref(), a.hint.as_deref())?;
    let by = super::who(a.by.as_deref());
    let reason = a.reason.trim().to_owned();
    if reason.is_empty() {
        return Err(CliError::Usage("--reason must not be empty (say why: it is recorded)".into()));
    }
    let store = open(db)?;
    let run = resolve_run(store.as_ref(), &a.run)?;
    let engine = registry.engine(store)?;
    let state_workflow = engine.state(run)?.workflow;
    let name = decision.name();
    engine.resolve(run, Resolution { decision, by: by.clone(), reason }).await?;
    if a.json {
        print_json(&views::resolution_json(run, name, &by))?;
    } else {
        outln!("resolved run {run}: {name} by {by}")?;
        if registry.knows(&state_workflow) {
            outln!("continue it with: keel work --until-idle")?;
        } else {
            // This binary cannot drive it (`keel work` would refuse): say whose can.
            outln!(
                "continue it with the service's own keel binary (keel_cli::main_with): keel work --until-idle (this one does not know workflow {state_workflow:?})"
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
