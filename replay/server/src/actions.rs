//! Routes that change runs: resolve and cancel (role approver), submit (role admin).
//! Every decision is recorded with the caller's token name as `by`.

use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};
use crate::state::{parse_run, AppState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_engine::{Decision, Json as CanonicalJson, Request, Resolution};
use keel_replay::views;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

/// Levels of a request body around the JSON documents it carries (`{"input": ...}`,
/// `{"output": ...}`).
const BODY_ENVELOPE_DEPTH: usize = 1;

/// Longest `reason`, in bytes.
pub(crate) const REASON_BYTES_MAX: usize = 2048;

/// A JSON body: 400 `bad_request` when it is not JSON of the expected shape, whatever its
/// content type (so a client's missing header is not a different error).
///
/// The body's nesting is checked first, by a scan of its bytes (nothing recursive runs on
/// a body too deep): at most `JSON_DEPTH_MAX` levels for the JSON documents it carries
/// plus [`BODY_ENVELOPE_DEPTH`] for the body around them (the engine checks those
/// documents exactly); deeper is 422 `json_too_deep`.
fn body<T: DeserializeOwned>(b: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let b = b?;
    keel_store::json::check_text_depth_max(&b, keel_store::json::JSON_DEPTH_MAX + BODY_ENVELOPE_DEPTH)
        .map_err(|_| ApiError::json_too_deep("the body"))?;
    serde_json::from_slice(&b).map_err(|e| ApiError::bad_request(format!("the body is not the expected JSON: {e}")))
}

/// A required reason: non-empty after trimming (422 `reason_required`), at most
/// [`REASON_BYTES_MAX`] bytes (422 `reason_too_long`).
fn reason(r: Option<&str>) -> ApiResult<String> {
    let r = r.unwrap_or_default().trim();
    if r.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_required",
            "a non-empty \"reason\" is required: every human action records why",
        ));
    }
    if r.len() > REASON_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_too_long",
            format!("\"reason\" is longer than {REASON_BYTES_MAX} bytes"),
        ));
    }
    Ok(r.to_owned())
}

/// The body of `POST /v1/runs/{run}/resolve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveBody {
    /// approve, reject, abort, replan (needs `hint`) or supply (needs `output`); also
    /// replan_with_hint and supply_output. Left out with `output`: supply.
    decision: Option<String>,
    /// The escalated task's output, supplied by hand (any JSON).
    #[schema(value_type = Object)]
    output: Option<Value>,
    /// A hint for the planner (with replan).
    hint: Option<String>,
    /// Why (required, 1..=2048 bytes; recorded on `HumanResolved`).
    #[serde(default)]
    reason: Option<String>,
}

/// The [`Decision`] a resolve body asks for, as `keel resolve` reads its flags.
fn decision(b: &ResolveBody) -> ApiResult<Decision> {
    let bad = |m: &str| ApiError::bad_request(m);
    let d = b.decision.as_deref();
    match (d, &b.output, &b.hint) {
        (None | Some("supply" | "supply_output" | "approve"), Some(out), None) => {
            Ok(Decision::SupplyOutput(CanonicalJson::new(out)))
        }
        (Some("replan" | "replan_with_hint"), None, Some(h)) => Ok(Decision::ReplanWithHint(h.clone())),
        (Some("approve"), None, None) => Ok(Decision::Approve),
        (Some("reject"), None, None) => Ok(Decision::Reject),
        (Some("abort"), None, None) => Ok(Decision::Abort),
        (Some("replan" | "replan_with_hint"), _, None) => Err(bad("decision replan needs \"hint\"")),
        (Some("supply" | "supply_output"), None, _) => Err(bad("decision supply needs \"output\"")),
        (None, None, _) => Err(bad("give \"decision\": approve, reject, abort, replan or supply (or \"output\")")),
        (_, Some(_), Some(_)) => Err(bad("\"output\" and \"hint\" do not go together")),
        (Some(d @ ("approve" | "reject" | "abort")), _, _) => {
            Err(ApiError::bad_request(format!("decision {d} takes neither \"output\" nor \"hint\"")))
        }
        (Some(d), _, _) => {
            Err(ApiError::bad_request(format!("unknown decision {d:?} (approve, reject, abort, replan or supply)")))
        }
    }
}

/// `POST /v1/runs/{run}/resolve`: records the caller's decision on the run's open
/// escalation, with the caller's token name as `by`, and queues the run.
#[utoipa::path(post, path = "/v1/runs/{run}/resolve", tag = "escalations",
    params(("run" = String, Path, description = "run id (UUID)")),
    request_body = ResolveBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"run\", \"decision\", \"by\"}` as `keel resolve --json`", body = Object),
        (status = 400, description = "bad JSON or decision", body = crate::error::ErrorBody),
        (status = 403, description = "the token's role is below approver", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
        (status = 409, description = "the run is not waiting for a human", body = crate::error::ErrorBody),
        (status = 422, description = "no reason (`reason_required`), the decision is not one of the escalation's options, or a supplied output fails the task's output schema", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn resolve(
    State(st): State<AppState>,
    Extension(who): Extension<Identity>,
    run: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let run = parse_run(run)?;
    let b: ResolveBody = body(b)?;
    let why = reason(b.reason.as_deref())?;
    let decision = decision(&b)?;
    let name = decision.name();
    // Logged once recorded: a refused resolution (409, 422) is the caller's answer, not
    // a decision.
    let logged = why.clone();
    st.engine.resolve(run, Resolution { decision, by: who.name.clone(), reason: why }).await?;
    tracing::info!(%run, decision = name, by = %who.name, reason = ?logged, "resolution recorded through the API");
    Ok(Json(views::resolution_json(run, name, &who.name)))
}

/// The body of `POST /v1/runs/{run}/cancel`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelBody {
    /// Why (required, 1..=2048 bytes; recorded in `RunCancelled`).
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/runs/{run}/cancel`: records `RunCancelled` with the caller's token name as
/// `by` and the reason.
#[utoipa::path(post, path = "/v1/runs/{run}/cancel", tag = "runs",
    params(("run" = String, Path, description = "run id (UUID)")),
    request_body = CancelBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"run\", \"cancelled\": true, \"by\"}`", body = Object),
        (status = 400, description = "bad JSON", body = crate::error::ErrorBody),
        (status = 422, description = "no reason (`reason_required`)", body = crate::error::ErrorBody),
        (status = 403, description = "the token's role is below approver", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
        (status = 409, description = "the run already finished", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn cancel(
    State(st): State<AppState>,
    Extension(who): Extension<Identity>,
    run: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let run = parse_run(run)?;
    let b: CancelBody = body(b)?;
    let why = reason(b.reason.as_deref())?;
    st.engine.cancel(run, &who.name, &why).await?;
    tracing::info!(%run, by = %who.name, reason = ?why, "cancellation recorded through the API");
    Ok(Json(views::cancellation_json(run, &who.name)))
}

/// The body of `POST /v1/runs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitBody {
    /// A registered workflow type.
    workflow: String,
    /// The request's input (validated against the workflow's input schema).
    #[schema(value_type = Object)]
    input: Value,
    /// A second request with the same key (within the workflow type's dedup window)
    /// returns the first run (200) if it asks for the same thing (workflow, input,
    /// priority), and 409 `idempotency_conflict` if it does not.
    idempotency_key: Option<String>,
    /// Higher runs first (default 0).
    #[serde(default)]
    priority: i32,
    /// Seed of the run's pseudo-random choices (default: derived from the run id).
    seed: Option<u64>,
}

/// `POST /v1/runs`: submits a request of a registered workflow type.
#[utoipa::path(post, path = "/v1/runs", tag = "runs",
    request_body = SubmitBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "a new run: `{\"run\", \"duplicate\": false}`", body = Object),
        (status = 200, description = "the idempotency key's existing run, same request: `{\"run\", \"duplicate\": true}`", body = Object),
        (status = 400, description = "bad JSON", body = crate::error::ErrorBody),
        (status = 403, description = "the token's role is below admin", body = crate::error::ErrorBody),
        (status = 409, description = "the idempotency key belongs to a run of a different request", body = crate::error::ErrorBody),
        (status = 422, description = "unknown workflow type or invalid input", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn submit(
    State(st): State<AppState>,
    Extension(who): Extension<Identity>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: SubmitBody = body(b)?;
    let mut req = Request::new(b.workflow.clone(), b.input);
    req.idempotency_key = b.idempotency_key;
    req.priority = b.priority;
    req.seed = b.seed;
    let s = st.engine.submit(req).await?;
    if !s.duplicate {
        tracing::info!(run = %s.run, workflow = %b.workflow, by = %who.name, "run submitted through the API");
        return Ok((StatusCode::CREATED, Json(json!({ "run": s.run.to_string(), "duplicate": false }))));
    }
    // A different request under the same key is the engine's IdempotencyConflict (409).
    Ok((StatusCode::OK, Json(json!({ "run": s.run.to_string(), "duplicate": true }))))
}
