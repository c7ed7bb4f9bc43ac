//! The API's error responses: `{"error": {"code": "stable_code", "message": "one line"}}`
//! with an HTTP status, and how engine and extractor failures map onto them.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel_engine::EngineError;
use keel_replay::error::ReplayError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer of the API: an HTTP status, a stable machine-readable code (never
/// renamed; clients branch on it) and one line for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status the answer carries.
    pub status: StatusCode,
    /// Stable code, snake_case (docs/SERVER.md lists them).
    pub code: &'static str,
    /// One clear line (no newlines).
    pub message: String,
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: bad_request, body_too_large, unauthorized, forbidden, not_found,
    /// run_not_found, not_awaiting_human, already_terminal, conflict,
    /// idempotency_conflict, unknown_workflow, invalid_input, invalid_decision, json_too_deep,
    /// output_schema_mismatch, escalation_closed, reason_required, reason_too_long,
    /// method_not_allowed, not_ready, internal.
    pub code: String,
    /// One line for a person.
    pub message: String,
}

impl ApiError {
    /// 422 `json_too_deep`: `what` nests deeper than keel accepts.
    pub fn json_too_deep(what: &str) -> Self {
        let max = keel_store::json::JSON_DEPTH_MAX;
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "json_too_deep",
            format!("{what} nests deeper than keel accepts (JSON documents: at most {max} levels)"),
        )
    }

    /// An error with `status`, `code` and a message flattened to one line.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = message.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        ApiError { status, code, message }
    }

    /// 400 `bad_request`: the request cannot be understood as sent.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 500 `internal`: a failure of the server or its store. The detail goes to the log,
    /// not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        // Quoted and escaped: a store's message may carry a caller's text.
        tracing::error!(detail = ?detail.to_string(), "internal error answering a request");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error (the server log has the detail)")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use StatusCode as S;
        match &e {
            EngineError::UnknownRun { .. } => ApiError::new(S::NOT_FOUND, "run_not_found", e.to_string()),
            EngineError::NotAwaitingHuman { .. } => ApiError::new(S::CONFLICT, "not_awaiting_human", e.to_string()),
            EngineError::AlreadyTerminal { .. } => ApiError::new(S::CONFLICT, "already_terminal", e.to_string()),
            // The run moved on between reading its state and appending the decision.
            EngineError::Transition(_) => ApiError::new(S::CONFLICT, "conflict", e.to_string()),
            EngineError::UnknownWorkflow { .. } => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "unknown_workflow", e.to_string())
            }
            EngineError::InvalidInput { .. } => ApiError::new(S::UNPROCESSABLE_ENTITY, "invalid_input", e.to_string()),
            EngineError::IdempotencyConflict { .. } => {
                ApiError::new(S::CONFLICT, "idempotency_conflict", e.to_string())
            }
            EngineError::SuppliedOutputRejected { .. } => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "output_schema_mismatch", e.to_string())
            }
            EngineError::EscalationClosed { .. } => ApiError::new(S::CONFLICT, "escalation_closed", e.to_string()),
            EngineError::InvalidDecision { .. } => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "invalid_decision", e.to_string())
            }
            EngineError::JsonTooDeep { .. } => ApiError::new(S::UNPROCESSABLE_ENTITY, "json_too_deep", e.to_string()),
            _ => ApiError::internal(e),
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        ApiError::internal(e)
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", r.body_text());
        }
        ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(format!("invalid query string: {}", r.body_text()))
    }
}

/// What a handler returns: its answer or an [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;
