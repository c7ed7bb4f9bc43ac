//! A small pool of connections, used only on the store's own runtime: at most `size`
//! sessions at once; a session whose connection is lost is dropped, not reused, so the
//! next call opens a fresh one (how the store recovers after the server ended a session).

use crate::error::PgError;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Config, NoTls};

pub(crate) struct Pool {
    config: Config,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// A session taken from the pool; it goes back on drop unless its connection is lost.
pub(crate) struct Conn {
    client: Option<Client>,
    /// A statement on it met a lost connection: never reuse it (the driver may not have
    /// noticed the close yet).
    broken: bool,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub(crate) fn new(config: Config, size: usize) -> Arc<Pool> {
        Arc::new(Pool { config, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(size)) })
    }

    /// A session: an idle one that is still connected, else a new one.
    pub(crate) async fn get(self: &Arc<Self>) -> Result<Conn, PgError> {
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| PgError::Closed)?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Conn { client: Some(client), broken: false, pool: self.clone(), _permit: permit })
    }

    pub(crate) async fn connect(&self) -> Result<Client, PgError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(PgError::of)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }
}

impl Conn {
    /// The session (always present until drop).
    pub(crate) fn client(&mut self) -> Result<&mut Client, PgError> {
        self.client.as_mut().ok_or(PgError::Closed)
    }

    /// A statement's result as the seam's: a lost connection marks the session broken.
    pub(crate) fn ok<T>(&mut self, r: Result<T, tokio_postgres::Error>) -> Result<T, keel_store::StoreError> {
        r.map_err(|e| {
            if crate::error::connection_lost(&e) {
                self.broken = true;
            }
            crate::error::pg(e)
        })
    }

    /// Marks the session as not to be reused.
    pub(crate) fn set_broken(&mut self) {
        self.broken = true;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !self.broken && !c.is_closed() {
                self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(c);
            }
        }
    }
}
