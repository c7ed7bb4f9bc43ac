//! Measures what keel costs on top of its log: `keel bench` (the keel-bench crate).

use crate::error::CmdResult;
use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Print one JSON document (stable schema, docs/PERFORMANCE.md).
    #[arg(long)]
    pub(crate) json: bool,
    /// The short run (under 2 minutes on 2 cores; 10k suspended runs instead of 100k).
    #[arg(long)]
    pub(crate) quick: bool,
}

pub(crate) fn run(a: BenchArgs) -> CmdResult {
    Ok(keel_bench::cli(a.json, a.quick).map(|()| ExitCode::SUCCESS)?)
}
