//! `GET /v1/verify` (role viewer): the store's deep check of the database, as `keel verify`
//! does it without a file — what the CLI asks the server for while `keel serve` holds the
//! database.

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use keel_replay::verify::verify_db;
use keel_store::RunId;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

/// The query of `GET /v1/verify`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct VerifyQuery {
    /// Only this run (its full id); default: every run.
    run: Option<String>,
}

/// `GET /v1/verify?run=`: every run's hash chain and stored payloads checked, as
/// `keel verify --json` reports it (without `source`). A failed check is a 200 with
/// `"ok": false` and the first failure; it is the answer, not an error of the request.
#[utoipa::path(get, path = "/v1/verify", tag = "ops", params(VerifyQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`{\"ok\", \"status\", \"records\", \"runs\": [{\"run\", \"records\", \"head\"}], \"failure\": null or {\"what\", \"run\", \"seq\", \"line\", \"message\"}, \"archived\": [tombstones], …}` (the shape of `keel verify --json`)", body = Object),
        (status = 400, description = "bad run id", body = crate::error::ErrorBody),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
        (status = 404, description = "no such run", body = crate::error::ErrorBody),
    ))]
pub(crate) async fn verify(
    State(st): State<AppState>,
    q: Result<Query<VerifyQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let run = q
        .run
        .as_deref()
        .map(|r| r.parse::<RunId>().map_err(|_| ApiError::bad_request(format!("{r:?} is not a run id (a UUID)"))))
        .transpose()?;
    let engine = st.engine.clone();
    let (v, archived) = st
        .blocking(move || {
            let log = engine.store();
            let runs = match run {
                Some(r) => {
                    engine.state(r)?; // 404 for a run that does not exist
                    vec![r]
                }
                None => log.runs().map_err(keel_replay::error::ReplayError::Store)?,
            };
            // Archived runs, accounted for by their tombstones (all runs only).
            let archived = match run {
                Some(_) => Vec::new(),
                None => keel_replay::anchor::tombstones(log.as_ref())?,
            };
            Ok((verify_db(log.as_ref(), &runs, || ())?, archived))
        })
        .await?;
    // The shape of `keel verify --json` on a database (signatures and checkpoints are
    // checked by the CLI on the database itself, never here).
    Ok(Json(json!({
        "ok": v.ok(),
        "status": if v.ok() { "verified" } else { "failed" },
        "records": v.records(),
        "runs": v.runs,
        "failure": v.failure,
        "signed_by": null,
        "continued": [],
        "archived": archived,
        "checkpoints": null,
        "events_after_expected_head": null,
    })))
}
