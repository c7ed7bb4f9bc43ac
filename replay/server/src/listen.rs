//! The accept loop of [`crate::serve`] and [`crate::serve_tls`]: axum's own loop, HTTP/1.1
//! only (hyper's HTTP/1 server, no protocol sniffing), with the bound a server facing
//! clients it does not control needs: a connection must send a request's headers within
//! [`crate::ServeOptions::header_read_timeout`] of opening (or of the previous answer, so
//! it is also how long an idle kept-alive connection stays open), else hyper closes it.
//! A request's body is bounded in size and time by the router's guard
//! ([`crate::RouterOptions::body_read_timeout`]). So a client that opens connections and
//! sends nothing, or half a request, holds each for that long, not for good. A graceful
//! shutdown closes at once every connection the router is handling no request of (idle,
//! or half a head), and lets a request in flight finish.

use axum::serve::Listener;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Default of [`crate::ServeOptions::header_read_timeout`]: 65 s, longer than the idle
/// keep-alive of common proxies and load balancers (60 s), so the server never closes a
/// kept-alive connection a proxy is about to reuse (which it would answer 502).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(65);

/// Serves `app` on `listener` until `shutdown` completes; then accepts nothing more, asks
/// every connection to finish its request in flight and close, and returns once all have.
pub(crate) async fn run<L, F>(
    mut listener: L,
    app: Router,
    shutdown: F,
    header_read_timeout: Duration,
) -> std::io::Result<()>
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
        // Requests of this connection the router is handling: a shutdown closes the
        // connection at once when there is none (idle, or half a request's head: the
        // server has done nothing for it), else lets the one in flight finish.
        let busy = Arc::new(AtomicUsize::new(0));
        let counted = busy.clone();
        let app = app.clone().layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let busy = Busy(counted);
                    let (parts, body) = next.run(req).await.into_parts();
                    // Busy until the answer's body is written whole (or dropped): an
                    // event stream too.
                    let body = axum::body::Body::new(Counted { inner: body, _busy: busy });
                    axum::response::Response::from_parts(parts, body)
                }
            },
        ));
        let service = TowerToHyperService::new(app);
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
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
                        if busy.load(Ordering::SeqCst) == 0 {
                            // Nothing was started for it: dropped (closed) now.
                            break;
                        }
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

/// One request of a connection being handled; dropped when its answer is written whole.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body, holding its request's [`Busy`] until it is dropped; its length and
/// end are the body's own (a `Content-Length` answer stays one).
struct Counted {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Counted {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
