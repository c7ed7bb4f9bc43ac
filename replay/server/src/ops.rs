//! Escalations and stats (role viewer), health and readiness (open), and the OpenAPI
//! document (open: it describes the API, not its data).

use crate::apidoc::GuardResponses;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use keel_replay::views;
use serde_json::{json, Value};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// `GET /v1/escalations`: every escalation waiting for a human, as `keel escalations --json`.
#[utoipa::path(get, path = "/v1/escalations", tag = "escalations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"escalations\": [entry of keel escalations --json]}`", body = Object),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn escalations(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let engine = st.engine.clone();
    // O(history) until the engine keeps an index of open escalations.
    let pending = st.blocking(move || Ok(engine.escalations()?)).await?;
    Ok(Json(json!({ "escalations": pending.iter().map(views::escalation_json).collect::<Vec<_>>() })))
}

/// `GET /v1/stats`: usage and cost per workflow type, as `keel stats --json`.
#[utoipa::path(get, path = "/v1/stats", tag = "ops",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"workflows\": [entry of keel stats --json]}`", body = Object),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn stats(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let engine = st.engine.clone();
    let stats = st.blocking(move || Ok(engine.stats()?)).await?;
    Ok(Json(json!({ "workflows": stats.iter().map(views::stats_json).collect::<Vec<_>>() })))
}

/// `GET /healthz`: the process answers (no token needed, nothing read).
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the process takes work (503 `not_ready` once a shutdown began).
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "`{\"status\": \"ready\", \"workflows\": [registered workflow types]}`", body = Object),
        (status = 503, description = "shutting down", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn readyz(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    if st.readiness.is_draining() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the server is shutting down"));
    }
    Ok(Json(json!({ "status": "ready", "workflows": st.engine.workflows() })))
}

/// `GET /v1/openapi.json`: this API's OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "ops",
    responses((status = 200, description = "the OpenAPI document", body = Object)))]
pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The API's OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "keel", description = "keel's HTTP admin API (docs/SERVER.md)"),
    paths(
        crate::reads::list_runs,
        crate::reads::show_run,
        crate::reads::run_events,
        crate::stream::status_stream,
        crate::reads::export_run,
        crate::actions::submit,
        crate::actions::resolve,
        crate::actions::cancel,
        escalations,
        stats,
        crate::metrics::metrics,
        crate::verify::verify,
        crate::exports::export,
        healthz,
        readyz,
        openapi_json,
    ),
    components(schemas(crate::error::ErrorBody, crate::ErrorDetail, crate::reads::ExportFormat)),
    modifiers(&BearerAuth, &GuardResponses),
)]
pub(crate) struct ApiDoc;

/// Declares the `bearer` security scheme the routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}
