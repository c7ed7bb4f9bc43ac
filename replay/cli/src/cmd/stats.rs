//! Usage and cost per workflow type: `keel stats`.

use crate::cmd::JsonArgs;
use crate::error::CmdResult;
use crate::open::open;
use crate::output::print_json;
use crate::Registry;
use keel_replay::views;
use serde_json::json;
use std::path::Path;
use std::process::ExitCode;

pub(crate) fn run(db: &Path, a: JsonArgs, registry: &Registry) -> CmdResult {
    let engine = registry.engine(open(db)?)?;
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
