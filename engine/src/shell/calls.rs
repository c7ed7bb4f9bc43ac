//! Where calls out of the engine run: a runtime of their own.
//!
//! A planner, handler, evaluator or sink may block its thread (a synchronous HTTP client,
//! `std::thread::sleep`, a long computation in `poll`). Polled on the driver's task, such a
//! call would hold the driver (and on a current-thread runtime everything else): no timer
//! of the driver's could fire, so a timeout could not be recorded until the call returned,
//! and a run's deadline could not cut it. So every call is spawned on this pool, a
//! multi-thread tokio runtime with its own threads, and answers through the driver's
//! channel; the driver keeps its own timer for each call (`driver.rs`), records a timeout
//! when it fires whether or not the call's thread is blocked, and discards an answer that
//! arrives after that.
//!
//! A blocked call holds one of the pool's threads until it returns (a thread cannot be
//! interrupted); the pool's other threads keep running the other calls.

use crate::error::EngineError;
use std::future::Future;
use tokio::task::{AbortHandle, JoinSet};

/// The runtime calls out of the engine run on (see the module docs).
pub(crate) struct CallPool {
    /// `Some` until dropped: a runtime cannot be dropped inside an async context (the
    /// engine may be dropped there), so `Drop` shuts it down in the background.
    rt: Option<tokio::runtime::Runtime>,
}

impl CallPool {
    /// A pool of `threads` threads (at least 1).
    pub(crate) fn new(threads: usize) -> Result<CallPool, EngineError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("keel-call")
            .enable_all()
            .build()
            .map_err(|e| EngineError::Config(format!("cannot start the call pool: {e}")))?;
        Ok(CallPool { rt: Some(rt) })
    }

    /// Spawns `fut` on the pool into `set` (dropping the set aborts it at its next await).
    pub(crate) fn spawn<F>(&self, set: &mut JoinSet<()>, fut: F) -> Option<AbortHandle>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let rt = self.rt.as_ref()?;
        Some(set.spawn_on(fut, rt.handle()))
    }
}

impl Drop for CallPool {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
