//! What the OpenAPI document says of every route alike, added after the handlers'
//! annotations: the answers the authentication layer and the body limit give on any
//! route they guard (401 and 403, 408, 413, 414), which a handler's own list does not name. A
//! client generated from the document (or a fuzzer checking answers against it) must find
//! every status the server can send.

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response};
use utoipa::Modify;

/// Adds the guards' answers to every operation that needs a token (and, for a POST, the
/// role and body answers).
pub(crate) struct GuardResponses;

fn error_response(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    RefOr::T(ResponseBuilder::new().description(description).content("application/json", content).build())
}

fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses.responses.entry(status.to_owned()).or_insert_with(|| error_response(description));
}

impl Modify for GuardResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let ops = [(false, item.get.as_mut()), (true, item.post.as_mut())];
            for (is_post, op) in ops {
                let Some(op) = op else { continue };
                let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
                if secured {
                    add(op, "401", "no valid bearer token (`unauthorized`)");
                    add(op, "403", "the token's role is too small (`forbidden`)");
                }
                add(op, "414", "the path and query are over the server's limit (`uri_too_long`)");
                add(op, "421", "the Host header names a host the server does not serve (`host_not_allowed`)");
                if is_post {
                    add(op, "413", "the body is over the server's limit (`body_too_large`)");
                    add(op, "408", "the body did not arrive in time (`request_timeout`)");
                }
            }
        }
    }
}
