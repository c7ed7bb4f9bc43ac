//! Makes API tokens: `keel token add` (docs/SERVER.md).

use crate::error::{CliError, CmdResult};
use crate::open::open_db;
use crate::output::{errln, outln};
use clap::{Args, Subcommand, ValueEnum};
use keel_replay::error::ReplayError;
use keel_server::{add_stored_token, add_token, Role, TOKENS_FILE};
use std::path::Path;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct TokenArgs {
    #[command(subcommand)]
    pub(crate) action: TokenCmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCmd {
    /// Make a token for `keel serve` and print it (the only time it is shown; only its
    /// hash is kept, in DIR/tokens, or in the `tokens` table of a PostgreSQL database,
    /// shared by every `keel serve` on it).
    Add {
        /// The token's name: the identity recorded as `by` for what it decides.
        name: String,
        /// What it may do.
        #[arg(long, value_enum)]
        role: RoleArg,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum RoleArg {
    /// Read runs, events, escalations, exports and stats.
    Viewer,
    /// Read, resolve escalations, cancel runs.
    Approver,
    /// Everything, including submitting runs.
    Admin,
}

pub(crate) fn run(db: &Path, a: TokenArgs) -> CmdResult {
    let TokenCmd::Add { name, role } = a.action;
    let role = match role {
        RoleArg::Viewer => Role::Viewer,
        RoleArg::Approver => Role::Approver,
        RoleArg::Admin => Role::Admin,
    };
    let token = match crate::backend::postgres_config(db) {
        Some(config) => {
            let store = crate::backend::open_postgres_store(db, config?, true)?;
            add_stored_token(&crate::backend::PgTokens(store), &name, role).map_err(CliError::Failed)?
        }
        None => add_to_file(db, &name, role)?,
    };
    outln!("{token}")?;
    errln!("token {name:?} ({}) added; it is shown only now", role.name());
    Ok(ExitCode::SUCCESS)
}

/// Adds a token to the tokens file of the sled database `db`.
fn add_to_file(db: &Path, name: &str, role: Role) -> Result<String, CliError> {
    // The tokens file lives beside the database's files: make the database first, so
    // that a directory holding only `tokens` is never mistaken for something else. A
    // database a running `keel serve` holds exists already.
    match open_db(db, true) {
        Ok(store) => drop(store),
        Err(ReplayError::DbLocked { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    add_token(&db.join(TOKENS_FILE), name, role).map_err(|e| CliError::Failed(e.to_string()))
}
