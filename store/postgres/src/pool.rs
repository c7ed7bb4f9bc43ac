//! The store's sessions: a `deadpool-postgres` pool, used only on the store's own runtime
//! (its sessions' connection tasks are spawned there). At most `size` sessions at once;
//! opening one is bounded by the connect timeout ([`crate::Timed::Connect`]). A session is
//! put back for reuse only when the last statement sent on it was answered without losing
//! the connection: one that met a lost connection, or whose call was abandoned mid-statement
//! (its timeout fired), is taken out of the pool, so the next call opens a fresh one.

use crate::error::{PgError, Timed};
use deadpool_postgres::ClientWrapper;
use deadpool_postgres::{Manager, ManagerConfig, Object, PoolError, RecyclingMethod, Runtime, TimeoutType};
use std::time::Duration;
use tokio_postgres::{Config, NoTls};

pub(crate) struct Pool {
    inner: deadpool_postgres::Pool,
    bounds: Bounds,
}

/// The bounds on calls into PostgreSQL (from [`crate::PgConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Opening a session.
    pub(crate) connect: Duration,
    /// One statement (the server's `statement_timeout`).
    pub(crate) statement: Duration,
    /// A whole call, cut by the store.
    pub(crate) call: Duration,
}

impl Bounds {
    pub(crate) fn connect_ms(&self) -> u64 {
        millis(self.connect)
    }

    pub(crate) fn statement_ms(&self) -> u64 {
        millis(self.statement)
    }

    pub(crate) fn call_ms(&self) -> u64 {
        millis(self.call)
    }
}

/// A session taken from the pool; it goes back on drop only if it is settled (see
/// [`Conn::client`] and [`Conn::ok`]).
pub(crate) struct Conn {
    object: Option<Object>,
    /// A statement was sent and its answer not yet seen through [`Conn::ok`] or
    /// [`Conn::settled`], or the connection was lost: never reuse the session (the driver
    /// may not have noticed the close yet; a server still busy with an abandoned statement
    /// would make the next call wait behind it).
    unsettled: bool,
    bounds: Bounds,
}

impl Pool {
    /// A pool of at most `size` sessions to `config`; it connects lazily.
    pub(crate) fn new(config: Config, size: usize, bounds: Bounds) -> Result<Pool, PgError> {
        // A pooled session is checked with `is_closed` when taken again (no extra round
        // trip); a session that met a lost connection never gets back (see `Conn`).
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let inner = deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(bounds.connect))
            .recycle_timeout(Some(bounds.connect))
            .build()
            .map_err(|e| PgError::Server { code: String::new(), reason: format!("building the pool: {e}") })?;
        Ok(Pool { inner, bounds })
    }

    pub(crate) fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// A session: an idle one that is still connected, else a new one.
    pub(crate) async fn get(&self) -> Result<Conn, PgError> {
        let b = self.bounds;
        let object = self.inner.get().await.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
                PgError::Timeout { what: Timed::Connect, after_ms: b.connect_ms() }
            }
            // No wait timeout is set: waiting for a free session is bounded by the call's.
            PoolError::Timeout(TimeoutType::Wait) => PgError::Timeout { what: Timed::Call, after_ms: b.call_ms() },
            PoolError::Backend(e) => PgError::of(e),
            PoolError::Closed => PgError::Closed,
            other => PgError::ConnectionLost { reason: other.to_string() },
        })?;
        Ok(Conn { object: Some(object), unsettled: false, bounds: b })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    /// The session, for a statement about to be sent: until its answer is seen through
    /// [`Conn::ok`] (or [`Conn::settled`]), dropping this discards the session.
    pub(crate) fn client(&mut self) -> Result<&mut ClientWrapper, PgError> {
        self.unsettled = true;
        self.object.as_deref_mut().ok_or(PgError::Closed)
    }

    /// A statement's result as the seam's: the session is settled unless the connection
    /// was lost.
    pub(crate) fn ok<T>(&mut self, r: Result<T, tokio_postgres::Error>) -> Result<T, keel_store::StoreError> {
        r.map_err(|e| {
            let e = PgError::of(e).with_statement_ms(self.bounds.statement_ms());
            self.settled(&e);
            e.into()
        })
        .inspect(|_| self.unsettled = false)
    }

    /// The answer to the statements sent was seen, ending in `e`: the session is settled
    /// unless `e` says the connection is gone.
    pub(crate) fn settled(&mut self, e: &PgError) {
        self.unsettled = matches!(e, PgError::ConnectionLost { .. } | PgError::InDoubt { .. });
    }

    /// Every statement sent was answered: the session may be reused.
    pub(crate) fn settle(&mut self) {
        self.unsettled = false;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else { return };
        if !self.unsettled {
            return; // back to the pool
        }
        let client = Object::take(object);
        if client.is_closed() {
            return;
        }
        // Abandoned mid-statement (its call timed out): ask the server to cancel what it is
        // doing, so the locks it holds go now rather than when it notices the closed socket;
        // bounded like a connect, and skipped if there is no runtime to send it from.
        let token = client.cancel_token();
        let bound = self.bounds.connect;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                match tokio::time::timeout(bound, token.cancel_query(NoTls)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "cancelling an abandoned statement failed"),
                    Err(_) => tracing::debug!("cancelling an abandoned statement timed out"),
                }
            });
        }
        drop(client);
    }
}
