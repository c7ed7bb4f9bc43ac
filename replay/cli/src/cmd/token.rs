//! Makes API tokens: `keel token add` (docs/SERVER.md).

use crate::error::{CliError, CmdResult};
use crate::open::open_db;
use crate::output::{errln, outln};
use clap::{Args, Subcommand, ValueEnum};
use keel_replay::error::ReplayError;
use keel_server::{add_stored_token, add_token, list_tokens, remove_token, Role, TOKENS_FILE};
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
    /// List the tokens' names and roles (never the tokens nor their hashes).
    List {
        /// Print JSON: `{"tokens": [{"name", "role"}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Remove (revoke) the token named NAME: every `keel serve` on the database refuses it
    /// (401) from its next look at the tokens (at once for a tokens file, within a second
    /// for PostgreSQL's table).
    Remove {
        /// The token's name.
        name: String,
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
    let (name, role) = match a.action {
        TokenCmd::Add { name, role } => (name, role),
        TokenCmd::List { json } => return list(db, json),
        TokenCmd::Remove { name } => return remove(db, &name),
    };
    // A name that cannot be stored is a usage error, refused before anything is made.
    keel_server::check_token_name(&name).map_err(|e| CliError::Usage(e.to_string()))?;
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

/// Where the tokens of `db` are: the `tokens` table of a PostgreSQL database, or the
/// tokens file of an existing sled database directory.
enum Tokens {
    Table(crate::backend::PgTokens),
    File(std::path::PathBuf),
}

fn tokens_of(db: &Path) -> Result<Tokens, CliError> {
    match crate::backend::postgres_config(db) {
        Some(config) => {
            Ok(Tokens::Table(crate::backend::PgTokens(crate::backend::open_postgres_store(db, config?, false)?)))
        }
        None if db.is_dir() => Ok(Tokens::File(db.join(TOKENS_FILE))),
        None => Err(ReplayError::DbNotFound { path: db.to_path_buf() }.into()),
    }
}

/// `keel token list`.
fn list(db: &Path, json: bool) -> CmdResult {
    let tokens: Vec<(String, Role)> = match tokens_of(db)? {
        Tokens::Table(t) => {
            keel_server::TokenStore::list(&t).map_err(CliError::Failed)?.into_iter().map(|t| (t.name, t.role)).collect()
        }
        Tokens::File(path) => list_tokens(&path).map_err(|e| CliError::Failed(e.to_string()))?,
    };
    if json {
        let rows: Vec<serde_json::Value> =
            tokens.iter().map(|(name, role)| serde_json::json!({ "name": name, "role": role.name() })).collect();
        crate::output::print_json(&serde_json::json!({ "tokens": rows }))?;
    } else {
        for (name, role) in &tokens {
            outln!("{name}  {}", role.name())?;
        }
        outln!("{} token(s)", tokens.len())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel token remove NAME`.
fn remove(db: &Path, name: &str) -> CmdResult {
    let removed = match tokens_of(db)? {
        Tokens::Table(t) => keel_server::TokenStore::remove(&t, name).map_err(CliError::Failed)?,
        Tokens::File(path) => remove_token(&path, name).map_err(|e| CliError::Failed(e.to_string()))?,
    };
    if !removed {
        return Err(CliError::Failed(format!("no token named {name:?}")));
    }
    outln!("removed token {name:?}: refused from now on")?;
    Ok(ExitCode::SUCCESS)
}
