//! The stock `keel` binary: the keel command line with the demo's workflow type. A
//! service builds its own with its own [`keel_cli::Registry`] (docs/CLI.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    keel_cli::main_with(keel_cli::Registry::demo())
}
