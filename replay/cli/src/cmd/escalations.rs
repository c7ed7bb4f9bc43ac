//! Lists escalations: `keel escalations`.

use crate::cmd::JsonArgs;
use crate::error::CmdResult;
use crate::open::open;
use crate::output::print_json;
use crate::Registry;
use keel_replay::format::rfc3339;
use keel_replay::views;
use serde_json::json;
use std::path::Path;
use std::process::ExitCode;

pub(crate) fn run(db: &Path, a: JsonArgs, registry: &Registry) -> CmdResult {
    let engine = registry.engine(open(db)?)?;
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
