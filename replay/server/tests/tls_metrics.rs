//! HTTPS on 127.0.0.1 with a certificate made in the test and a client that trusts it
//! (keel-server's own client); `/metrics` needs a token unless the router opens it;
//! `GET /v1/verify`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{start, start_with, ADMIN, VIEWER};
use keel_engine::Engine;
use keel_server::client::{Client, ClientError};
use keel_server::{Auth, Role, RouterOptions};

#[tokio::test]
async fn metrics_need_a_token_unless_opened() {
    let closed = start().await;
    assert_eq!(closed.get("/metrics", None).await.status, 401);
    let r = closed.get("/metrics", Some(VIEWER)).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("# TYPE keel_runs gauge"), "{}", r.text());

    let open = start_with(RouterOptions { metrics_open: true, ..Default::default() }).await;
    let r = open.get("/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("# TYPE keel_runs gauge"), "{}", r.text());
    // Opening /metrics opens nothing else.
    assert_eq!(open.get("/v1/runs", None).await.status, 401);
    assert_eq!(open.get("/v1/stats", None).await.status, 401);
}

#[tokio::test]
async fn verify_reports_every_run_and_refuses_bad_ids() {
    let s = start().await;
    let run = s.submit_demo(0).await;
    s.engine.run_until_idle().await.unwrap();
    assert_eq!(s.get("/v1/verify", None).await.status, 401);
    let v = s.get("/v1/verify", Some(VIEWER)).await.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["runs"][0]["run"], run.to_string());
    assert_eq!(v["records"], s.events(run).len() as u64);
    assert!(v["failure"].is_null());
    let one = s.get(&format!("/v1/verify?run={run}"), Some(VIEWER)).await.json();
    assert_eq!(one["runs"], v["runs"]);
    let r = s.get("/v1/verify?run=nope", Some(VIEWER)).await;
    assert_eq!((r.status, r.code()), (400, "bad_request".to_owned()));
    let r = s.get(&format!("/v1/verify?run={}", uuid::Uuid::new_v4()), Some(VIEWER)).await;
    assert_eq!((r.status, r.code()), (404, "run_not_found".to_owned()));
}

#[tokio::test]
async fn https_on_loopback_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let other_cert = dir.path().join("other.pem");
    std::fs::write(&other_cert, other.cert.pem()).unwrap();

    let engine = keel_demo::register(Engine::builder().path(dir.path().join("db"))).open().unwrap();
    let auth = Auth::from_tokens([("root", Role::Admin, ADMIN)]).unwrap();
    let config = keel_server::tls::server_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = keel_server::router(engine.clone(), auth);
    tokio::spawn(keel_server::serve_tls(listener, config, app, std::future::pending()));

    let url = format!("https://127.0.0.1:{port}");
    let trusting = Client::new(&url, Some(ADMIN.to_owned()), Some(&cert)).unwrap();
    let a = trusting.get("/v1/runs").await.unwrap();
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json().unwrap()["runs"], serde_json::json!([]));
    assert!(trusting.answers(std::time::Duration::from_secs(5)).await);
    // A wrong token over TLS is still a 401.
    let wrong = Client::new(&url, Some("nope".into()), Some(&cert)).unwrap();
    assert_eq!(wrong.get("/v1/runs").await.unwrap().status, 401);
    // A client that trusts another certificate, or none, refuses the server.
    for ca in [Some(other_cert.as_path()), None] {
        let c = Client::new(&url, Some(ADMIN.to_owned()), ca).unwrap();
        match c.get("/v1/runs").await {
            Err(ClientError::Connect { reason, .. }) => assert!(reason.contains("certificate"), "{reason}"),
            other => panic!("expected a refused certificate, got {other:?}"),
        }
    }
    // Plain HTTP to the TLS port gets no HTTP answer; the server keeps serving after it.
    let plain = Client::new(&format!("http://127.0.0.1:{port}"), Some(ADMIN.to_owned()), None).unwrap();
    assert!(plain.get("/healthz").await.is_err());
    assert_eq!(trusting.get("/healthz").await.unwrap().status, 200);
    // A key that does not go with the certificate is one clear error.
    let e = keel_server::tls::server_config(&other_cert, &key).unwrap_err().to_string();
    assert!(e.contains("do not go together"), "{e}");
}

#[test]
fn client_urls_are_checked() {
    for bad in ["127.0.0.1:7700", "ftp://h:1", "http://h", "http://h:1/v1", "http://:1", "http://u@h:1"] {
        assert!(matches!(Client::new(bad, None, None), Err(ClientError::BadUrl { .. })), "{bad}");
    }
    for good in ["http://127.0.0.1:7700", "http://localhost:1/", "http://[::1]:7700"] {
        assert_eq!(Client::new(good, None, None).unwrap().url(), good.trim_end_matches('/'));
    }
}

#[tokio::test]
async fn export_selects_formats_and_redacts_and_refuses_bad_queries() {
    let s = start().await;
    let run = s.submit_demo(0).await;
    s.engine.run_until_idle().await.unwrap();
    let one = s.get(&format!("/v1/export?format=jsonl&run={run}"), Some(VIEWER)).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.header("content-type"), Some("application/x-ndjson"));
    let all = s.get("/v1/export?format=jsonl&since=0", Some(VIEWER)).await;
    // One run in the database: the same records (the header differs in its selection).
    assert_eq!(one.text().lines().skip(1).collect::<Vec<_>>(), all.text().lines().skip(1).collect::<Vec<_>>());
    let redacted = s.get("/v1/export?format=jsonl&redact=TaskExecuted.output,input", Some(VIEWER)).await;
    assert_eq!(redacted.status, 200);
    assert_ne!(redacted.text(), all.text());
    assert!(redacted.text().contains("redacted"), "{}", redacted.text());
    for bad in [
        "/v1/export?format=pdf".to_owned(),
        format!("/v1/export?format=csv&run={run}&since=0"),
        "/v1/export?format=csv&since=yesterday".to_owned(),
        "/v1/export?format=csv&run=nope".to_owned(),
        "/v1/export?format=csv&redact=".to_owned() + &"a,".repeat(70),
    ] {
        let r = s.get(&bad, Some(VIEWER)).await;
        assert_eq!((r.status, r.code()), (400, "bad_request".to_owned()), "{bad}");
    }
    let r = s.get(&format!("/v1/export?format=html&run={}", uuid::Uuid::new_v4()), Some(VIEWER)).await;
    assert_eq!((r.status, r.code()), (404, "run_not_found".to_owned()));
    // A window that holds no time is refused as `keel export` refuses it (it was 200 and
    // an empty export: found by review), and a bad redaction names the parameter, not
    // the CLI's flag.
    for window in ["since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "since=5&until=5"] {
        let r = s.get(&format!("/v1/export?format=csv&{window}"), Some(VIEWER)).await;
        assert_eq!((r.status, r.code()), (400, "bad_request".to_owned()), "{window}");
        assert!(r.text().contains("holds no time"), "{}", r.text());
    }
    let r = s.get("/v1/export?format=csv&redact=Nope.output", Some(VIEWER)).await;
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.starts_with("redact \"Nope.output\"") && !message.contains("--redact"), "{message}");
}
