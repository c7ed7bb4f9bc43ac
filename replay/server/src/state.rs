//! What every handler shares: the state they see (the engine, the readiness, the permits
//! for blocking calls) and the run id of a path.

use crate::error::{ApiError, ApiResult};
use keel_engine::Engine;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Whether the process is taking work: `/readyz` answers 503 once [`Readiness::drain`]
/// was called (a shutdown began), so a load balancer stops sending requests.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// A readiness that is ready.
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Marks the process as shutting down: `/readyz` answers 503 from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Readiness::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// What every handler sees.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: Engine,
    pub(crate) readiness: Readiness,
    /// Permits for blocking engine calls at once: listing folds every run today, so a
    /// burst of requests must queue here rather than fill tokio's blocking pool.
    pub(crate) blocking_permits: Arc<Semaphore>,
    /// One permit per open event stream (`RouterOptions::streams_max`).
    pub(crate) streams: Arc<Semaphore>,
}

impl AppState {
    /// Runs a blocking engine call on tokio's blocking pool once a permit is free. A
    /// panic inside it is a 500.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce() -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self.blocking_permits.acquire().await.map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?
    }
}

impl AppState {
    /// A permit for one more event stream, held until the stream is dropped; 503
    /// `too_many_streams` when `streams_max` are open.
    pub(crate) fn stream_permit(&self) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                "too many event streams are open on this server; retry later, or poll GET /v1/runs/{run}/events",
            )
        })
    }
}

/// A run id from a path: the full UUID (prefixes are a CLI convenience, not an API's).
pub(crate) fn parse_run(
    p: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<keel_store::RunId> {
    let axum::extract::Path(s) = p.map_err(|r| ApiError::bad_request(format!("bad path: {}", r.body_text())))?;
    s.parse().map_err(|_| ApiError::bad_request(format!("{s:?} is not a run id (a UUID)")))
}
