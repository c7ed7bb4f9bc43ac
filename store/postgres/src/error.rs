//! How PostgreSQL failures reach the seam: as [`StoreError::Io`] whose inner error is a
//! [`PgError`] (typed: the caller can tell a lost connection from a refusal by the server),
//! and [`OpenError`] for what can go wrong opening a store.

use keel_store::StoreError;
use tokio_postgres::error::SqlState;

/// A failure talking to PostgreSQL, carried inside [`StoreError::Io`] (`io::Error::get_ref`
/// downcasts to it). Its `io::ErrorKind` is `ConnectionAborted` for a lost connection,
/// `ConnectionRefused` for a server that could not be reached, `TimedOut` for a timeout.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// The connection was lost (closed, or ended by the server). A call that failed this
    /// way wrote nothing, except an append whose COMMIT was in flight
    /// ([`PgError::InDoubt`]).
    #[error("postgres connection lost: {reason}")]
    ConnectionLost {
        /// What the driver said.
        reason: String,
    },
    /// No session could be opened: the server refused or did not take the connection
    /// (down, wrong host or port). Nothing was sent.
    #[error("cannot connect to postgres: {reason}")]
    Unreachable {
        /// What the driver said.
        reason: String,
    },
    /// The connection was lost while COMMIT was in flight: the append may or may not have
    /// been written. Read the run's head to know.
    #[error("postgres connection lost during COMMIT, outcome unknown (read the head): {reason}")]
    InDoubt {
        /// What the driver said.
        reason: String,
    },
    /// The server refused a statement.
    #[error("postgres error {code}: {reason}")]
    Server {
        /// The SQLSTATE code (empty if the driver gave none).
        code: String,
        /// What the server or driver said.
        reason: String,
    },
    /// An append lost the same race against other writers this many times in a row.
    #[error("append to run {run} lost {tries} races in a row against other writers")]
    Contention {
        /// The run appended to.
        run: keel_store::RunId,
        /// Attempts made.
        tries: u32,
    },
    /// A bound on a call into PostgreSQL ran out ([`PgError::timed_out`]). Nothing was
    /// written, except when `what` is [`Timed::Commit`]: then the append may or may not
    /// have been (read the run's head to know). Its `io::ErrorKind` is `TimedOut`.
    #[error("postgres {what} timed out after {after_ms} ms")]
    Timeout {
        /// What ran out of time.
        what: Timed,
        /// The bound that ran out, in milliseconds.
        after_ms: u64,
    },
    /// The store's own runtime is gone (the store was dropped while this call waited).
    #[error("the store was closed")]
    Closed,
}

/// What a [`PgError::Timeout`] bounded (docs/STORE.md, "PostgreSQL", timeouts).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timed {
    /// Opening a session (TCP connect, startup and authentication): `connect_timeout_ms`.
    Connect,
    /// One statement, cancelled by the server (`statement_timeout`, from
    /// `statement_timeout_ms`); a statement cancelled by an operator reads the same. The
    /// statement's transaction was rolled back.
    Statement,
    /// A whole call (taking a session, its statements, its commit), cut by the store:
    /// `call_timeout_ms`. The session is dropped and its statement cancelled; its
    /// transaction, never committed, is rolled back by the server.
    Call,
    /// A flush's COMMIT was in flight when `call_timeout_ms` ran out: outcome unknown.
    Commit,
}

impl std::fmt::Display for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Timed::Connect => "connect",
            Timed::Statement => "statement (statement_timeout)",
            Timed::Call => "call",
            Timed::Commit => "COMMIT (outcome unknown: read the head)",
        })
    }
}

/// The driver's message with its cause (the server's text for a database error).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl PgError {
    /// Whether this is a [`PgError::Timeout`].
    pub fn timed_out(&self) -> Option<Timed> {
        match self {
            PgError::Timeout { what, .. } => Some(*what),
            _ => None,
        }
    }

    /// Classifies a driver error: statement timeout, lost connection or server refusal.
    /// A statement cancelled by the server (SQLSTATE 57014) is [`Timed::Statement`], its
    /// bound filled in by [`PgError::with_statement_ms`].
    pub(crate) fn of(e: tokio_postgres::Error) -> PgError {
        if e.code() == Some(&SqlState::QUERY_CANCELED) {
            PgError::Timeout { what: Timed::Statement, after_ms: 0 }
        } else if connection_lost(&e) {
            PgError::ConnectionLost { reason: describe(&e) }
        } else {
            PgError::Server { code: e.code().map(|c| c.code().to_owned()).unwrap_or_default(), reason: describe(&e) }
        }
    }

    /// This error, with the statement timeout named when it is one.
    pub(crate) fn with_statement_ms(self, ms: u64) -> PgError {
        match self {
            PgError::Timeout { what: Timed::Statement, .. } => {
                PgError::Timeout { what: Timed::Statement, after_ms: ms }
            }
            other => other,
        }
    }

    /// A driver error met while COMMIT was in flight.
    pub(crate) fn at_commit(e: tokio_postgres::Error) -> PgError {
        if connection_lost(&e) {
            PgError::InDoubt { reason: describe(&e) }
        } else {
            PgError::of(e)
        }
    }
}

/// Whether the error means the session is gone (nothing more can be sent on it).
pub(crate) fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => e.as_db_error().is_none(),
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
        }
    }
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> StoreError {
        let kind = match &e {
            PgError::ConnectionLost { .. } | PgError::InDoubt { .. } | PgError::Closed => {
                std::io::ErrorKind::ConnectionAborted
            }
            PgError::Unreachable { .. } => std::io::ErrorKind::ConnectionRefused,
            PgError::Timeout { .. } => std::io::ErrorKind::TimedOut,
            PgError::Server { .. } | PgError::Contention { .. } => std::io::ErrorKind::Other,
        };
        StoreError::Io(std::io::Error::new(kind, e))
    }
}

/// A driver error as the seam's error.
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    PgError::of(e).into()
}

/// What opening a [`crate::PgStore`] can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database's keel schema was migrated by a newer build: this code does not know
    /// its tables. Nothing was changed.
    #[error("the keel schema `{schema}` is at version {found}, newer than this build's {supported}: upgrade keel")]
    SchemaTooNew {
        /// The schema (namespace) opened.
        schema: String,
        /// The version recorded in its `schema_version` table.
        found: i32,
        /// The newest version this build migrates to.
        supported: i32,
    },
    /// `create: false` and the schema holds no keel tables.
    #[error("no keel store in schema `{schema}`")]
    NotFound {
        /// The schema (namespace) opened.
        schema: String,
    },
    /// The URL or another setting is not usable.
    #[error("invalid postgres store config: {reason}")]
    InvalidConfig {
        /// What was seen, in words.
        reason: String,
    },
    /// The store's limits are out of range.
    #[error(transparent)]
    Limits(StoreError),
    /// The database could not be reached or refused a statement while opening.
    #[error("opening the postgres store: {0}")]
    Postgres(#[source] PgError),
    /// The store's runtime threads could not start.
    #[error("starting the store's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> StoreError {
        match e {
            OpenError::Limits(e) => e,
            OpenError::InvalidConfig { reason } => StoreError::InvalidConfig { reason },
            OpenError::Postgres(e) => e.into(),
            OpenError::Runtime(e) => StoreError::Io(e),
            other @ OpenError::NotFound { .. } => {
                StoreError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, other))
            }
            other @ OpenError::SchemaTooNew { .. } => {
                StoreError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, other))
            }
        }
    }
}
