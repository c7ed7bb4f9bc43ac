//! keel-server: keel's HTTP admin API, the only crate of keel that knows HTTP.
//!
//! [`router`] gives an axum [`Router`] over a running [`Engine`] that a service mounts in
//! its own HTTP server (`keel serve` mounts it alone). JSON under `/v1` in the shapes of
//! the CLI's `--json` outputs (keel-replay's `views` build both), bearer tokens with
//! roles ([`Auth`], [`Role`]), errors as `{"error": {"code", "message"}}` ([`ApiError`]),
//! and an OpenAPI document at `/v1/openapi.json` generated from the handlers
//! ([`openapi`]). docs/SERVER.md describes every route.
//!
//! A panic in a handler is answered 500 (and logged); the server keeps serving. Request
//! bodies are limited ([`RouterOptions::body_bytes_max`]). Engine reads are blocking
//! (sled), so handlers run them on tokio's blocking pool.

#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]

mod actions;
mod apidoc;
mod auth;
pub mod client;
mod error;
mod exports;
mod guard;
mod listen;
mod metrics;
mod ops;
mod reads;
mod state;
mod stream;
pub mod tls;
mod verify;
mod web;

pub use auth::{
    add_stored_token, add_token, check_token_name, list_tokens, remove_token, Auth, AuthError, Identity, Role,
    StoredToken, TokenStore, TOKENS_FILE, TOKENS_FILE_BYTES_MAX, TOKENS_RELOAD_MS, TOKEN_NAME_BYTES_MAX,
};
pub use error::{ApiError, ApiResult, ErrorBody, ErrorDetail};
pub use guard::{BODY_READ_TIMEOUT, URI_BYTES_MAX};
pub use listen::HEADER_READ_TIMEOUT;
pub use stream::TOKEN_RECHECK_EVERY;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keel_engine::Engine;
use state::AppState;
pub use state::Readiness;
use std::sync::Arc;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;

/// Default largest request body, in bytes (a resolution's supplied output or a request's
/// input; the engine's own limits are 16 KiB each, JSON escaping included).
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Default number of blocking engine calls running at once.
pub const BLOCKING_CALLS_MAX: usize = 8;

/// Default number of server-sent event streams open at once (run tails and the status
/// stream together).
pub const STREAMS_MAX: usize = 1024;

/// How [`router_with`] builds the router (what [`router`] takes by default).
#[derive(Clone, Debug)]
pub struct RouterOptions {
    /// Largest request body, in bytes; a larger one is answered 413 `body_too_large`.
    pub body_bytes_max: usize,
    /// How long a request's body may take to arrive once its headers have (default
    /// [`BODY_READ_TIMEOUT`]); a slower one is answered 408 `request_timeout`.
    pub body_read_timeout: std::time::Duration,
    /// What `/readyz` reports.
    pub readiness: Readiness,
    /// Blocking engine calls (store reads, folds, exports) running at once; more wait
    /// their turn (at least 1).
    pub blocking_calls_max: usize,
    /// Whether `GET /metrics` is open (no token needed); by default it needs a viewer's.
    pub metrics_open: bool,
    /// Server-sent event streams open at once (each holds a connection and an engine
    /// subscription until it ends); one more is answered 503 `too_many_streams`.
    pub streams_max: usize,
    /// The host names a request's `Host` header may name (any port; compared without
    /// case), else it is answered 421 `host_not_allowed`: a server on a loopback address
    /// lists its loopback names, so a page of another site whose name an attacker points
    /// at 127.0.0.1 (DNS rebinding) cannot read even its open routes. Empty (the
    /// default): any host.
    pub allowed_hosts: Vec<String>,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            body_bytes_max: BODY_BYTES_MAX,
            body_read_timeout: BODY_READ_TIMEOUT,
            readiness: Readiness::new(),
            blocking_calls_max: BLOCKING_CALLS_MAX,
            metrics_open: false,
            streams_max: STREAMS_MAX,
            allowed_hosts: Vec::new(),
        }
    }
}

/// The API over `engine`, with `auth`'s tokens, and the default [`RouterOptions`].
/// Mount it in a service's own server (`axum::serve(listener, router(engine, auth))`);
/// the engine's workers run wherever the service starts them ([`Engine::start`]).
pub fn router(engine: Engine, auth: Auth) -> Router {
    router_with(engine, auth, RouterOptions::default())
}

/// [`router`] with explicit options.
pub fn router_with(engine: Engine, auth: Auth, options: RouterOptions) -> Router {
    let auth = Arc::new(auth);
    let permits = Arc::new(tokio::sync::Semaphore::new(options.blocking_calls_max.max(1)));
    let streams = Arc::new(tokio::sync::Semaphore::new(options.streams_max));
    let state = AppState { engine, readiness: options.readiness, blocking_permits: permits, streams };
    // What a request may send (guard.rs), checked once the route's token and role are:
    // a caller without a token is answered 401 before any of its body is read.
    let guard = from_fn_with_state((options.body_bytes_max, options.body_read_timeout), guard::guard);
    let viewer = Router::new()
        .route("/v1/runs", get(reads::list_runs))
        .route("/v1/runs/{run}", get(reads::show_run))
        .route("/v1/runs/{run}/events", get(stream::run_events_or_stream))
        .route("/v1/events", get(stream::status_stream))
        .route("/v1/runs/{run}/export", get(reads::export_run))
        .route("/v1/escalations", get(ops::escalations))
        .route("/v1/stats", get(ops::stats))
        .route("/v1/verify", get(verify::verify))
        .route("/v1/export", get(exports::export))
        .merge(metrics_route(!options.metrics_open))
        .route_layer(guard.clone())
        .route_layer(from_fn_with_state((auth.clone(), Role::Viewer), auth::require));
    let approver = Router::new()
        .route("/v1/runs/{run}/resolve", post(actions::resolve))
        .route("/v1/runs/{run}/cancel", post(actions::cancel))
        .route_layer(guard.clone())
        .route_layer(from_fn_with_state((auth.clone(), Role::Approver), auth::require));
    let admin = Router::new()
        .route("/v1/runs", post(actions::submit))
        .route_layer(guard.clone())
        .route_layer(from_fn_with_state((auth.clone(), Role::Admin), auth::require));
    let open = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/v1/openapi.json", get(ops::openapi_json))
        .merge(metrics_route(options.metrics_open))
        .merge(web::routes())
        .route_layer(guard);
    let app = viewer.merge(approver).merge(admin).merge(open).merge(testing_routes(auth));
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(web::same_origin))
        .layer(from_fn_with_state(Arc::new(options.allowed_hosts), web::allowed_host))
        .layer(DefaultBodyLimit::max(options.body_bytes_max))
        .layer(CatchPanicLayer::custom(panic_response))
}

/// `GET /metrics` when `here` (it goes with the viewer's routes, or the open ones with
/// [`RouterOptions::metrics_open`]).
fn metrics_route(here: bool) -> Router<AppState> {
    if here {
        Router::new().route("/metrics", get(metrics::metrics))
    } else {
        Router::new()
    }
}

/// The OpenAPI 3.1 document of the API (what `/v1/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    ops::ApiDoc::openapi()
}

#[cfg(feature = "testing")]
fn testing_routes(auth: Arc<Auth>) -> Router<AppState> {
    // Panics on purpose: the test that a handler's panic is a 500 and the server keeps
    // serving. Behind the `testing` feature, and admin-only even there.
    async fn panic_on_purpose() -> &'static str {
        panic!("the testing route panics on purpose")
    }
    Router::new()
        .route("/v1/_testing/panic", get(panic_on_purpose))
        .route_layer(from_fn_with_state((auth, Role::Admin), auth::require))
}

#[cfg(not(feature = "testing"))]
fn testing_routes(_auth: Arc<Auth>) -> Router<AppState> {
    Router::new()
}

/// The answer to a handler's panic: a 500 like any internal error, and a log line with
/// the panic's message.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)");
    tracing::error!(panic = %what, "a request handler panicked; answered 500");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error (the server log has the detail)")
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route (GET /v1/openapi.json lists them)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
}

/// How [`serve_on`] holds connections.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// How long a connection may take to send a request's headers, from its opening or
    /// from the previous answer (so also how long an idle kept-alive connection stays
    /// open) before it is closed. Default [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: std::time::Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { header_read_timeout: HEADER_READ_TIMEOUT }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting
/// connections and waits for the requests in flight (bound that wait yourself, as
/// `keel serve` does). The one place a binary needs to hold HTTP: the `keel` CLI calls
/// this and knows no HTTP crate. HTTP/1.1, with the default [`ServeOptions`].
pub async fn serve<F>(listener: tokio::net::TcpListener, app: Router, shutdown: F) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    serve_on(listener, app, shutdown, ServeOptions::default()).await
}

/// [`serve`] over TLS: the connections of `listener` are TLS with `config`
/// ([`tls::server_config`] reads it from PEM files); a handshake that fails or takes
/// longer than [`tls::HANDSHAKE_TIMEOUT`] drops that connection only.
pub async fn serve_tls<F>(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    serve_on(tls::TlsListener::new(listener, config)?, app, shutdown, ServeOptions::default()).await
}

/// [`serve`] on any listener (a `tokio::net::TcpListener`, a [`tls::TlsListener`]) with
/// explicit [`ServeOptions`].
pub async fn serve_on<L, F>(listener: L, app: Router, shutdown: F, options: ServeOptions) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    listen::run(listener, app, shutdown, options.header_read_timeout).await
}
