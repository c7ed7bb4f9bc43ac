//! The web page against a real server on 127.0.0.1: its assets are embedded and refer to
//! nothing outside the server, and state-changing routes are safe against cross-site
//! request forgery (a form post from another origin is refused and records nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{start, Resp, Server, APPROVER};
use keel_engine::{Event, RunStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The escalating demo scenario (human_escalation).
const ESCALATING: u64 = 5;

/// A request with exactly these extra headers (a browser's form post sends an `Origin`,
/// a form content type and no `Authorization`).
async fn raw(s: &Server, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        s.addr,
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    c.write_all(body).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    // Reuse the common parser through a GET-shaped response: split head and body here.
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    Resp { status, headers, body: out[split + 4..].to_vec() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_from_the_binary_and_refers_to_nothing_outside_it() {
    let s = start().await;
    let r = s.get("/", None).await;
    assert!(matches!(r.status, 303 | 307 | 308), "{}", r.status);
    assert_eq!(r.header("location"), Some("/ui/"));
    let page = s.get("/ui/", None).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let html = page.text();
    assert!(html.contains("src=\"/ui/app.js\"") && html.contains("href=\"/ui/app.css\""), "{html}");
    for (path, ty) in [("/ui/app.js", "text/javascript; charset=utf-8"), ("/ui/app.css", "text/css; charset=utf-8")] {
        let r = s.get(path, None).await;
        assert_eq!((r.status, r.header("content-type")), (200, Some(ty)), "{path}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        // Nothing from outside: no absolute URL but the SVG namespace name (not fetched).
        let text = r.text().replace("http://www.w3.org/2000/svg", "");
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{path} refers outside"
        );
    }
    assert!(!html.replace("http://", "").contains("https://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_post_from_another_origin_is_refused_and_records_nothing() {
    let s = start().await;
    let run = s.submit_demo(ESCALATING).await;
    s.engine.run_until_idle().await.unwrap();
    assert_eq!(s.engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
    let path = format!("/v1/runs/{run}/resolve");
    let form = b"decision=approve&reason=csrf";
    let form_type = ("Content-Type", "application/x-www-form-urlencoded");
    let bearer = format!("Bearer {APPROVER}");

    // What a page of another site can send: a form post, with its Origin, no credentials.
    let r = raw(&s, "POST", &path, &[form_type, ("Origin", "http://evil.example")], form).await;
    assert_eq!((r.status, r.code().as_str()), (403, "cross_origin"), "{}", r.text());
    let r = raw(&s, "POST", &path, &[form_type, ("Origin", "null")], form).await;
    assert_eq!((r.status, r.code().as_str()), (403, "cross_origin"), "a sandboxed frame's null origin");
    let r = raw(&s, "POST", &path, &[form_type, ("Sec-Fetch-Site", "cross-site")], form).await;
    assert_eq!((r.status, r.code().as_str()), (403, "cross_origin"), "a cross-site fetch without Origin");
    // Even a request that somehow carries a valid token is refused from another origin
    // (the cancel route as well).
    let body = br#"{"decision":"approve","reason":"csrf"}"#;
    let json_type = ("Content-Type", "application/json");
    let r =
        raw(&s, "POST", &path, &[json_type, ("Authorization", &bearer), ("Origin", "http://127.0.0.1:1")], body).await;
    assert_eq!((r.status, r.code().as_str()), (403, "cross_origin"), "another port is another origin");
    let cancel = format!("/v1/runs/{run}/cancel");
    let r = raw(
        &s,
        "POST",
        &cancel,
        &[json_type, ("Authorization", &bearer), ("Origin", "http://evil.example")],
        br#"{"reason":"x"}"#,
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (403, "cross_origin"));
    // A form without Origin carries no bearer token: 401, nothing else.
    let r = raw(&s, "POST", &path, &[form_type], form).await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    // A preflight from another origin is granted nothing (no CORS headers at all).
    let r = raw(
        &s,
        "OPTIONS",
        &path,
        &[
            ("Origin", "http://evil.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.header("access-control-allow-origin"), None, "{:?}", r.headers);
    assert_eq!(r.header("access-control-allow-headers"), None);

    // Nothing was recorded: the run still waits, no HumanResolved, no RunCancelled.
    assert_eq!(s.engine.state(run).unwrap().status, RunStatus::AwaitingHuman);
    assert!(!s.events(run).iter().any(|l| matches!(l.event, Event::HumanResolved { .. } | Event::RunCancelled { .. })));

    // The page's own request (same origin, bearer header) goes through.
    let origin = format!("http://{}", s.addr);
    let r = raw(
        &s,
        "POST",
        &path,
        &[json_type, ("Authorization", &bearer), ("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let reasons: Vec<String> = s
        .events(run)
        .into_iter()
        .filter_map(|l| match l.event {
            Event::HumanResolved { reason, by, .. } => Some(format!("{by}: {reason}")),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec!["ada: csrf".to_owned()]);
}
