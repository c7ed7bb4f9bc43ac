//! The web escalation inbox and run explorer: a page served from this binary (every asset
//! embedded with `include_str!`, nothing fetched from elsewhere), and the defence of the
//! state-changing routes against cross-site request forgery.
//!
//! The page is plain HTML, CSS and JavaScript (`replay/server/assets/`). It reads and
//! decides through the JSON API with the token as a bearer header, kept in the tab's
//! `sessionStorage`: the browser never attaches it on its own (no cookie), so a form or
//! script of another site cannot act with it. On top of that, [`same_origin`] refuses a
//! state-changing request whose `Origin` (or `Sec-Fetch-Site`) says it comes from another
//! site, whatever it carries. docs/SERVER.md ("The web inbox", "Login and CSRF").

use crate::error::ApiError;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The page's HTML shell.
const INDEX_HTML: &str = include_str!("../assets/index.html");
/// The page's script.
const APP_JS: &str = include_str!("../assets/app.js");
/// The page's style sheet.
const APP_CSS: &str = include_str!("../assets/app.css");

/// What the page may load and where it may connect: this server only, no inline script,
/// no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The page's routes (open: the page holds no data; it asks for a token and every call it
/// makes is authenticated): `/` redirects to `/ui/`, which serves the shell, and
/// `/ui/app.js`, `/ui/app.css` its assets.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/ui/app.js", get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/ui/app.css", get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }))
}

/// An embedded asset with its content type and the page's security headers.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Middleware: a request that may change something (any method but GET, HEAD, OPTIONS)
/// sent by a page of another site is 403 `cross_origin`, before authentication: its
/// `Origin` names a different host than the request's `Host`, or `Origin` is `null`, or
/// the browser marks it `Sec-Fetch-Site: cross-site` / `same-site`. Clients that are not
/// browsers send neither header and pass.
pub(crate) async fn same_origin(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    if let Some(why) = cross_site(req.headers()) {
        tracing::warn!(method = %req.method(), path = %req.uri().path(), %why, "cross-site request refused");
        return ApiError::new(StatusCode::FORBIDDEN, "cross_origin", format!("refused: {why}")).into_response();
    }
    next.run(req).await
}

/// Middleware (state: [`crate::RouterOptions::allowed_hosts`]): a request whose `Host`
/// names another host than those listed is 421 `host_not_allowed`, before anything else
/// (no list: every host).
pub(crate) async fn allowed_host(
    axum::extract::State(allowed): axum::extract::State<std::sync::Arc<Vec<String>>>,
    req: Request,
    next: Next,
) -> Response {
    if allowed.is_empty() {
        return next.run(req).await;
    }
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(host_name);
    match host {
        Some(h) if allowed.iter().any(|a| a.eq_ignore_ascii_case(h)) => next.run(req).await,
        other => {
            let shown = other.unwrap_or("(none)");
            tracing::warn!(host = ?shown, "request for a host this server does not serve refused");
            ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "host_not_allowed",
                format!("this server does not serve host {shown:?} (keel serve --allow-host NAME adds one)"),
            )
            .into_response()
        }
    }
}

/// The host name of a `Host` header's value: without its port, an IPv6 address without
/// its brackets.
fn host_name(v: &str) -> &str {
    let v = v.trim();
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    v.rsplit_once(':').map_or(v, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { v })
}

/// Why the headers show a request from another site, if they do.
fn cross_site(h: &HeaderMap) -> Option<String> {
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return Some(format!("the browser says the request is {site}"));
        }
    }
    let origin = h.get(header::ORIGIN)?;
    let Ok(origin) = origin.to_str() else { return Some("an unreadable Origin header".to_owned()) };
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    // "scheme://host[:port]": the scheme one a page of this server has, and what follows
    // it the Host header.
    let (scheme, authority) = origin.split_once("://").unwrap_or(("", ""));
    let web = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    if origin == "null" || !web || authority.is_empty() || !authority.eq_ignore_ascii_case(host) {
        return Some(format!("Origin {origin:?} is not this server ({host:?})"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_host_header_is_read_as_its_name() {
        assert_eq!(host_name("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("[::1]:7700"), "::1");
        assert_eq!(host_name("evil.example:80"), "evil.example");
        assert_eq!(host_name("a:b"), "a:b");
    }

    /// An Origin of another scheme than a web page's is not this server's page (found by
    /// review: `ftp://127.0.0.1:7700` passed).
    #[test]
    fn an_origin_of_another_scheme_is_refused() {
        for origin in ["ftp://127.0.0.1:7700", "file://127.0.0.1:7700", "chrome-extension://127.0.0.1:7700"] {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("127.0.0.1:7700"));
            h.insert("origin", HeaderValue::from_str(origin).unwrap_or_else(|_| HeaderValue::from_static("x")));
            assert!(cross_site(&h).is_some(), "{origin}");
        }
        let ok = headers(&[("host", "127.0.0.1:7700"), ("origin", "HTTPS://127.0.0.1:7700")]);
        assert_eq!(cross_site(&ok), None);
    }

    #[test]
    fn only_a_foreign_or_null_origin_or_a_cross_site_fetch_is_refused() {
        assert_eq!(cross_site(&headers(&[("host", "127.0.0.1:7700")])), None, "no Origin: not a browser form");
        let same = headers(&[("host", "127.0.0.1:7700"), ("origin", "http://127.0.0.1:7700")]);
        assert_eq!(cross_site(&same), None);
        let same = headers(&[
            ("host", "127.0.0.1:7700"),
            ("origin", "http://127.0.0.1:7700"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(cross_site(&same), None);
        for bad in [
            headers(&[("host", "127.0.0.1:7700"), ("origin", "http://evil.example")]),
            headers(&[("host", "127.0.0.1:7700"), ("origin", "http://127.0.0.1:7701")]),
            headers(&[("host", "127.0.0.1:7700"), ("origin", "null")]),
            headers(&[("host", "127.0.0.1:7700"), ("sec-fetch-site", "cross-site")]),
        ] {
            assert!(cross_site(&bad).is_some(), "{bad:?}");
        }
    }
}
