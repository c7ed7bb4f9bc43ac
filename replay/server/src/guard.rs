//! What a request may send before a handler sees it, checked for every route once its
//! token and role are (a caller without a valid token is answered 401 before any of its
//! body is read): its path
//! and query at most [`URI_BYTES_MAX`] bytes (414 `uri_too_long`), its body at most
//! [`crate::RouterOptions::body_bytes_max`] bytes (413 `body_too_large`, at once when its
//! `Content-Length` says so) and read whole within
//! [`crate::RouterOptions::body_read_timeout`] (default [`BODY_READ_TIMEOUT`]; 408
//! `request_timeout`). A body is read here, bounded, before the handler runs; the
//! handlers read it from memory.

use crate::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::time::Duration;

/// Longest path and query string a request may have, in bytes.
pub const URI_BYTES_MAX: usize = 8 * 1024;

/// How long a request's body may take to arrive, once its headers have (the default of
/// [`crate::RouterOptions::body_read_timeout`]).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn too_large(limit: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is over the server's limit of {limit} bytes"),
    )
    .into_response()
}

/// The middleware (state: the body limit in bytes, and how long a body may take).
pub(crate) async fn guard(State((limit, within)): State<(usize, Duration)>, req: Request, next: Next) -> Response {
    let uri_bytes = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > URI_BYTES_MAX {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request's path and query are {uri_bytes} bytes, over the limit of {URI_BYTES_MAX}"),
        )
        .into_response();
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return too_large(limit);
    }
    let has_body = declared.is_some_and(|n| n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING);
    if !has_body {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(within, Limited::new(body, limit).collect()).await {
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {} ms", within.as_millis()),
        )
        .into_response(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => too_large(limit),
        Ok(Err(e)) => ApiError::bad_request(format!("cannot read the request body: {e}")).into_response(),
        Ok(Ok(collected)) => next.run(Request::from_parts(parts, Body::from(collected.to_bytes()))).await,
    }
}
