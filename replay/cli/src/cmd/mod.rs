//! One module per `keel` command: its arguments and what it does.

pub(crate) mod archive;
pub(crate) mod bench;
pub(crate) mod cancel;
pub(crate) mod copy;
pub(crate) mod demo;
pub(crate) mod diff;
pub(crate) mod doctor;
pub(crate) mod escalations;
pub(crate) mod export;
pub(crate) mod fork;
pub(crate) mod fsm;
pub(crate) mod keygen;
pub(crate) mod replay;
pub(crate) mod resolve;
pub(crate) mod runs;
pub(crate) mod serve;
pub(crate) mod show;
pub(crate) mod stats;
pub(crate) mod submit;
pub(crate) mod token;
pub(crate) mod verify;
pub(crate) mod work;

use clap::Args;

/// The arguments of a command whose only option is `--json`.
#[derive(Args, Debug)]
pub(crate) struct JsonArgs {
    /// Print JSON (stable schema, docs/CLI.md).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Who a human action is recorded as: `--by NAME`, else `$USER`, else "cli".
pub(crate) fn who(by: Option<&str>) -> String {
    by.map(str::to_owned)
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "cli".to_owned())
}
