//! The accept loop of [`crate::serve`] and [`crate::serve_tls`]: axum's own loop, with
//! the bounds a server facing clients it does not control needs. A connection must send
//! a request's headers within [`HEADER_READ_TIMEOUT`] of opening (or of the previous
//! answer), else hyper closes it; a request's body is bounded in size and time by
//! [`crate::guard_body`]. So a client that opens a connection and sends half a request
//! holds it for seconds, not forever, and does not hold a graceful shutdown for the whole
//! of `keel serve --shutdown-timeout` either.

use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::sync::watch;

/// How long a connection may take to send a request's headers (from its opening, or from
/// the previous answer on a kept-alive connection) before it is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` completes; then accepts nothing more, asks
/// every connection to finish its request in flight and close, and returns once all have.
pub(crate) async fn run<L, F>(mut listener: L, app: Router, shutdown: F) -> std::io::Result<()>
where
    L: Listener,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    // Dropped when `shutdown` completes: every connection task hears it.
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    // Each connection task holds a receiver: `closed()` resolves once all are gone.
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (io, _addr) = tokio::select! {
            conn = listener.accept() => conn,
            _ = signal_tx.closed() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let mut signal = std::pin::pin!(signal_tx.closed());
            let mut asked = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    () = &mut signal, if !asked => {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
    Ok(())
}
