//! Statements prepared once per session: each statement text is parsed and described by
//! the server the first time a session runs it, and later runs on that session only bind
//! and execute (one round trip instead of two). `deadpool-postgres` keeps the cache per
//! session; a session that is discarded (docs/STORE.md 15.5) takes its cache with it.

use deadpool_postgres::{ClientWrapper, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row};

/// The parameters of a statement.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// `execute`/`query` through the session's statement cache.
pub(crate) trait Cached {
    /// Prepares `sql` (or takes it from the cache) and executes it: rows affected.
    async fn exec(&self, sql: &str, params: &Params<'_>) -> Result<u64, Error>;
    /// Prepares `sql` (or takes it from the cache) and returns its rows.
    async fn rows(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, Error>;
    /// At most one row.
    async fn row_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, Error>;
}

/// The same three methods for each type that has `prepare_cached` (a transaction and a
/// session: deadpool's `GenericClient` covers its pool object, not the session itself).
macro_rules! cached_for {
    ($($t:ty),*) => {$(
        impl Cached for $t {
            async fn exec(&self, sql: &str, params: &Params<'_>) -> Result<u64, Error> {
                let st = self.prepare_cached(sql).await?;
                self.execute(&st, params).await
            }
            async fn rows(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, Error> {
                let st = self.prepare_cached(sql).await?;
                self.query(&st, params).await
            }
            async fn row_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, Error> {
                let st = self.prepare_cached(sql).await?;
                self.query_opt(&st, params).await
            }
        }
    )*};
}

cached_for!(Transaction<'_>, ClientWrapper);
