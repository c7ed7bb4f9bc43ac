//! Prints the state machines: `keel fsm`.

use crate::error::CmdResult;
use crate::output::out;
use clap::{Args, ValueEnum};
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum FsmFormat {
    Dot,
    Mermaid,
}

#[derive(Args, Debug)]
pub(crate) struct FsmArgs {
    #[arg(long, value_enum, default_value = "dot")]
    pub(crate) format: FsmFormat,
}

pub(crate) fn run(a: FsmArgs) -> CmdResult {
    let format = match a.format {
        FsmFormat::Dot => keel_engine::fsm::Format::Dot,
        FsmFormat::Mermaid => keel_engine::fsm::Format::Mermaid,
    };
    out!("{}", keel_engine::fsm::render(format))?;
    Ok(ExitCode::SUCCESS)
}
