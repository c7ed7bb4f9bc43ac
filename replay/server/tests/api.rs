//! The HTTP API against a real server on 127.0.0.1: every route, every role, every error
//! class, a resolution recorded with the token's name, a panicking handler, the OpenAPI
//! document.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{start, submit_body, ADMIN, APPROVER, VIEWER};
use keel_engine::{Decision, Event, RunStatus};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The human_escalation scenario of the demo (a refund above the limit).
const ESCALATING: u64 = 5;
/// The happy_path scenario.
const HAPPY: u64 = 0;

/// Every route of the API: method, path template, the least role that may call it
/// (None: open).
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("get", "/v1/runs", Some("viewer")),
    ("post", "/v1/runs", Some("admin")),
    ("get", "/v1/runs/{run}", Some("viewer")),
    ("get", "/v1/runs/{run}/events", Some("viewer")),
    ("get", "/v1/runs/{run}/export", Some("viewer")),
    ("post", "/v1/runs/{run}/resolve", Some("approver")),
    ("post", "/v1/runs/{run}/cancel", Some("approver")),
    ("get", "/v1/escalations", Some("viewer")),
    ("get", "/v1/stats", Some("viewer")),
    ("get", "/v1/verify", Some("viewer")),
    ("get", "/v1/export", Some("viewer")),
    ("get", "/metrics", Some("viewer")),
    ("get", "/healthz", None),
    ("get", "/readyz", None),
    ("get", "/v1/openapi.json", None),
];

/// Routes that answer with a stream that does not end (their tokens and roles are
/// checked in tests/stream.rs); listed in the OpenAPI document like the others.
const STREAM_ROUTES: &[(&str, &str, Option<&str>)] = &[("get", "/v1/events", Some("viewer"))];

fn token_of(role: &str) -> &'static str {
    match role {
        "viewer" => VIEWER,
        "approver" => APPROVER,
        _ => ADMIN,
    }
}

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 0,
        "approver" => 1,
        _ => 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_missing_bad_and_too_small_tokens() {
    let s = start().await;
    let run = s.submit_demo(HAPPY).await.to_string();
    for (method, template, least) in ROUTES {
        let path = template.replace("{run}", &run);
        let path = if path.ends_with("/export") { format!("{path}?format=jsonl") } else { path };
        let method = method.to_uppercase();
        let body: Option<&[u8]> = (method == "POST").then_some(b"{}");
        let Some(least) = least else {
            let r = s.call(&method, &path, None, body).await;
            assert_eq!(r.status, 200, "{method} {path} is open: {}", r.text());
            continue;
        };
        let r = s.call(&method, &path, None, body).await;
        assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"), "{method} {path} without a token");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = s.call(&method, &path, Some("not-a-token"), body).await;
        assert_eq!(r.status, 401, "{method} {path} with a wrong token");
        for role in ["viewer", "approver", "admin"] {
            let r = s.call(&method, &path, Some(token_of(role)), body).await;
            if rank(role) < rank(least) {
                assert_eq!((r.status, r.code().as_str()), (403, "forbidden"), "{method} {path} as {role}");
            } else {
                assert!(r.status != 401 && r.status != 403, "{method} {path} as {role}: {} {}", r.status, r.text());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_are_open() {
    let s = start().await;
    let r = s.get("/healthz", None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = s.get("/readyz", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["workflows"], json!(["support_ticket"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_once_draining_and_health_stays_200() {
    let readiness = keel_server::Readiness::new();
    let s = common::start_with(keel_server::RouterOptions { readiness: readiness.clone(), ..Default::default() }).await;
    assert_eq!(s.get("/readyz", None).await.status, 200);
    readiness.drain();
    let r = s.get("/readyz", None).await;
    assert_eq!((r.status, r.code().as_str()), (503, "not_ready"));
    assert_eq!(s.get("/healthz", None).await.status, 200);
    assert_eq!(s.get("/v1/runs", Some(VIEWER)).await.status, 200, "requests in flight are still answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_queue_for_the_blocking_permits_and_all_are_answered() {
    let s = common::start_with(keel_server::RouterOptions { blocking_calls_max: 1, ..Default::default() }).await;
    s.submit_demo(HAPPY).await;
    let s = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = s.clone();
        let path = ["/v1/runs", "/v1/escalations", "/v1/stats", "/metrics"][i % 4];
        tasks.push(tokio::spawn(async move { s.get(path, Some(VIEWER)).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_body_limit_is_kept() {
    let s = common::start_with(keel_server::RouterOptions { body_bytes_max: 100, ..Default::default() }).await;
    let body = json!({"workflow": "support_ticket", "input": {"pad": "x".repeat(200)}});
    let r = s.post("/v1/runs", Some(ADMIN), &body).await;
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_201_new_200_duplicate_409_conflict_422_invalid_400_bad_json() {
    let s = start().await;
    let req = keel_demo::request(7, HAPPY);
    let r = s.post("/v1/runs", Some(ADMIN), &submit_body(&req)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let run = r.json()["run"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["duplicate"], json!(false));

    let r = s.post("/v1/runs", Some(ADMIN), &submit_body(&req)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"run": run, "duplicate": true}));

    let mut other = submit_body(&req);
    other["input"]["ticket"]["subject"] = json!("something else");
    let r = s.post("/v1/runs", Some(ADMIN), &other).await;
    assert_eq!((r.status, r.code().as_str()), (409, "idempotency_conflict"), "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains(&run));
    // Another priority is another request too.
    let mut urgent = submit_body(&req);
    urgent["priority"] = json!(9);
    let r = s.post("/v1/runs", Some(ADMIN), &urgent).await;
    assert_eq!((r.status, r.code().as_str()), (409, "idempotency_conflict"), "{}", r.text());

    let r = s.post("/v1/runs", Some(ADMIN), &json!({"workflow": "support_ticket", "input": {}})).await;
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_input"));
    let r = s.post("/v1/runs", Some(ADMIN), &json!({"workflow": "nope", "input": {}})).await;
    assert_eq!((r.status, r.code().as_str()), (422, "unknown_workflow"));

    let r = s.call("POST", "/v1/runs", Some(ADMIN), Some(b"{not json")).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));
    let r = s.post("/v1/runs", Some(ADMIN), &json!({"input": {}})).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "a body without workflow");
    // Only one run was recorded.
    assert_eq!(s.engine.runs().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_filtered_and_paged_as_keel_runs_json() {
    let s = start().await;
    for i in 0..5 {
        s.submit_demo(i).await;
    }
    s.engine.run_until_idle().await.unwrap();
    let all = s.get("/v1/runs", Some(VIEWER)).await.json();
    let runs = all["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 5);
    assert_eq!(all["next_cursor"], Value::Null);
    // The same entries as `keel runs --json` (one function builds both).
    let expected: Vec<Value> = s.engine.runs().unwrap().iter().map(keel_replay::views::run_summary_json).collect();
    assert_eq!(runs, &expected);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/runs?limit=2".to_owned(),
            Some(c) => format!("/v1/runs?limit=2&cursor={c}"),
        };
        let page = s.get(&path, Some(VIEWER)).await.json();
        let entries = page["runs"].as_array().unwrap();
        assert!(entries.len() <= 2);
        seen.extend(entries.iter().map(|e| e["run"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let listed: Vec<String> = runs.iter().map(|e| e["run"].as_str().unwrap().to_owned()).collect();
    assert_eq!(seen, listed, "paging visits every run once, in order");

    let completed = s.get("/v1/runs?status=Completed&workflow=support_ticket", Some(VIEWER)).await.json();
    let n = s.engine.runs().unwrap().iter().filter(|r| r.status == RunStatus::Completed).count();
    assert_eq!(completed["runs"].as_array().unwrap().len(), n);
    assert!(completed["runs"].as_array().unwrap().iter().all(|e| e["status"] == "Completed"));
    let none = s.get("/v1/runs?workflow=other", Some(VIEWER)).await.json();
    assert_eq!(none["runs"], json!([]));

    for bad in ["/v1/runs?status=Sleeping", "/v1/runs?limit=0", "/v1/runs?limit=x", "/v1/runs?cursor=zz"] {
        let r = s.get(bad, Some(VIEWER)).await;
        assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_its_events_and_its_exports() {
    let s = start().await;
    let run = s.submit_demo(HAPPY).await;
    s.engine.run_until_idle().await.unwrap();

    let r = s.get(&format!("/v1/runs/{run}"), Some(VIEWER)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), keel_replay::views::state_json(&s.engine.state(run).unwrap()), "as keel show --json");
    assert_eq!(r.json()["status"], "Completed");

    let events = s.events(run);
    let r = s.get(&format!("/v1/runs/{run}/events"), Some(VIEWER)).await.json();
    assert_eq!(r["events"].as_array().unwrap().len(), events.len());
    assert_eq!(r["events"][0]["kind"], "RunAccepted");
    assert_eq!(r["next_after"], Value::Null);
    let r = s.get(&format!("/v1/runs/{run}/events?after=2&limit=3"), Some(VIEWER)).await.json();
    let seqs: Vec<u64> = r["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(r["next_after"], json!(5));

    let r = s.get(&format!("/v1/runs/{run}/export?format=jsonl"), Some(VIEWER)).await;
    assert_eq!((r.status, r.header("content-type")), (200, Some("application/x-ndjson")));
    let lines: Vec<Value> = r.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= events.len() + 2, "header, records, run end");
    let r = s.get(&format!("/v1/runs/{run}/export?format=csv"), Some(VIEWER)).await;
    assert_eq!((r.status, r.header("content-type")), (200, Some("text/csv; charset=utf-8")));
    assert_eq!(r.text().lines().count(), events.len() + 1, "a header and a row per event");
    let r = s.get(&format!("/v1/runs/{run}/export?format=html"), Some(VIEWER)).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains(&run.to_string()));
    let r = s.get(&format!("/v1/runs/{run}/export?format=xml"), Some(VIEWER)).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));

    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/v1/runs/{unknown}"),
        format!("/v1/runs/{unknown}/events"),
        format!("/v1/runs/{unknown}/export?format=csv"),
    ] {
        let r = s.get(&path, Some(VIEWER)).await;
        assert_eq!((r.status, r.code().as_str()), (404, "run_not_found"), "{path}");
    }
    let r = s.get("/v1/runs/not-a-uuid", Some(VIEWER)).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_through_the_api_is_recorded_with_the_tokens_name() {
    let s = start().await;
    let run = s.submit_demo(ESCALATING).await;
    s.engine.run_until_idle().await.unwrap();
    assert_eq!(s.engine.state(run).unwrap().status, RunStatus::AwaitingHuman);

    let esc = s.get("/v1/escalations", Some(VIEWER)).await.json();
    let expected: Vec<Value> =
        s.engine.escalations().unwrap().iter().map(keel_replay::views::escalation_json).collect();
    assert_eq!(esc["escalations"], json!(expected), "as keel escalations --json");
    assert_eq!(esc["escalations"][0]["run"], run.to_string());

    let path = format!("/v1/runs/{run}/resolve");
    let r = s.post(&path, Some(APPROVER), &json!({"decision": "approve"})).await;
    assert_eq!((r.status, r.code().as_str()), (422, "reason_required"), "no reason");
    let r = s.post(&path, Some(APPROVER), &json!({"decision": "approve", "reason": "  "})).await;
    assert_eq!((r.status, r.code().as_str()), (422, "reason_required"), "a blank reason");
    let r = s.post(&path, Some(APPROVER), &json!({"decision": "maybe", "reason": "r"})).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "an unknown decision");
    let r = s.post(&path, Some(APPROVER), &json!({"decision": "replan", "reason": "r"})).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "replan without a hint");
    let r = s.post(&path, Some(APPROVER), &json!({"decision": "approve", "reason": "r", "by": "mallory"})).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "a free-text by is not accepted");
    let r = s.call("POST", &path, Some(APPROVER), Some(b"{\"decision\": ")).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "bad JSON");
    let unknown = uuid::Uuid::new_v4();
    let r = s
        .post(&format!("/v1/runs/{unknown}/resolve"), Some(APPROVER), &json!({"decision": "approve", "reason": "r"}))
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "run_not_found"));

    let r = s.post(&path, Some(APPROVER), &json!({"decision": "approve", "reason": "refund checked by phone"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"run": run.to_string(), "decision": "approve", "by": "ada"}), "as keel resolve --json");

    let resolved: Vec<_> = s
        .events(run)
        .into_iter()
        .filter_map(|l| match l.event {
            Event::HumanResolved { decision, by, defaulted, reason, .. } => Some((decision, by, defaulted, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(resolved, vec![(Decision::Approve, "ada".to_owned(), false, "refund checked by phone".to_owned())]);

    let r = s.post(&path, Some(APPROVER), &json!({"decision": "approve", "reason": "again"})).await;
    assert_eq!((r.status, r.code().as_str()), (409, "not_awaiting_human"));
    s.engine.run_until_idle().await.unwrap();
    assert!(s.engine.state(run).unwrap().status.is_terminal());
    let esc = s.get("/v1/escalations", Some(VIEWER)).await.json();
    assert_eq!(esc["escalations"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_recorded_with_the_tokens_name_and_a_finished_run_is_409() {
    let s = start().await;
    let run = s.submit_demo(ESCALATING).await;
    let path = format!("/v1/runs/{run}/cancel");
    let r = s.post(&path, Some(APPROVER), &json!({})).await;
    assert_eq!((r.status, r.code().as_str()), (422, "reason_required"), "no reason");
    let r = s.post(&path, Some(APPROVER), &json!({"reason": "customer withdrew"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"run": run.to_string(), "cancelled": true, "by": "ada"}));
    let cancelled: Vec<_> = s
        .events(run)
        .into_iter()
        .filter_map(|l| match l.event {
            Event::RunCancelled { by, reason } => Some((by, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, vec![("ada".to_owned(), "customer withdrew".to_owned())]);
    let r = s.post(&path, Some(APPROVER), &json!({"reason": "again"})).await;
    assert_eq!((r.status, r.code().as_str()), (409, "already_terminal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_as_keel_stats_json() {
    let s = start().await;
    s.submit_demo(HAPPY).await;
    s.engine.run_until_idle().await.unwrap();
    let r = s.get("/v1/stats", Some(VIEWER)).await;
    assert_eq!(r.status, 200);
    let expected: Vec<Value> = s.engine.stats().unwrap().iter().map(keel_replay::views::stats_json).collect();
    assert_eq!(r.json(), json!({ "workflows": expected }));
    assert_eq!(r.json()["workflows"][0]["runs"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_and_the_server_keeps_serving() {
    let s = start().await;
    let r = s.get("/v1/_testing/panic", Some(ADMIN)).await;
    assert_eq!((r.status, r.code().as_str()), (500, "internal"));
    for _ in 0..3 {
        assert_eq!(s.get("/healthz", None).await.status, 200);
        assert_eq!(s.get("/v1/runs", Some(VIEWER)).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_wrong_methods_and_large_bodies_are_json_errors() {
    let s = start().await;
    let r = s.get("/v1/nothing", Some(VIEWER)).await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    let r = s.call("DELETE", "/v1/runs", Some(ADMIN), None).await;
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    let big = vec![b' '; keel_server::BODY_BYTES_MAX + 1];
    let r = s.call("POST", "/v1/runs", Some(ADMIN), Some(&big)).await;
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_parses_and_lists_every_route() {
    let s = start().await;
    let r = s.get("/v1/openapi.json", None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut listed = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            listed.insert((method.clone(), path.clone()));
        }
    }
    let routes: BTreeSet<(String, String)> =
        ROUTES.iter().chain(STREAM_ROUTES).map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(listed, routes);
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // The same document as the library function gives.
    assert_eq!(doc, serde_json::to_value(keel_server::openapi()).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_in_the_prometheus_text_format() {
    let s = start().await;
    s.submit_demo(HAPPY).await;
    s.submit_demo(ESCALATING).await;
    s.engine.run_until_idle().await.unwrap();
    let r = s.get("/metrics", Some(VIEWER)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = r.text();
    for line in [
        "keel_runs{workflow=\"support_ticket\",status=\"Completed\"} 1",
        "keel_runs{workflow=\"support_ticket\",status=\"AwaitingHuman\"} 1",
        "keel_escalations_open{workflow=\"support_ticket\"} 1",
        "# TYPE keel_retries_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("keel_escalation_oldest_age_seconds{workflow=\"support_ticket\"} ")));
    // Every sample line is `name{labels} number`.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let value = l.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{l}");
    }
}

/// `[[...[0]...]]` with `depth` arrays.
fn nested(depth: usize) -> Value {
    let mut v = json!(0);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_nested_deeper_than_the_json_limit_are_422_json_too_deep_and_nothing_is_recorded() {
    let s = start().await;
    // Deeper than serde_json's own limit (128): refused before parsing, with the same code.
    let raw = format!("{{\"workflow\": \"support_ticket\", \"input\": {}0{}}}", "[".repeat(300), "]".repeat(300));
    let r = s.call("POST", "/v1/runs", Some(ADMIN), Some(raw.as_bytes())).await;
    assert_eq!((r.status, r.code().as_str()), (422, "json_too_deep"), "{}", r.text());
    let over = keel_store::json::JSON_DEPTH_MAX + 1;
    let r = s.post("/v1/runs", Some(ADMIN), &json!({"workflow": "support_ticket", "input": nested(over)})).await;
    assert_eq!((r.status, r.code().as_str()), (422, "json_too_deep"), "{}", r.text());
    assert!(s.engine.runs().unwrap().is_empty(), "nothing recorded");
    let r = s
        .post(
            "/v1/runs/00000000-0000-0000-0000-000000000000/resolve",
            Some(APPROVER),
            &json!({"output": nested(over), "reason": "r"}),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (422, "json_too_deep"), "{}", r.text());
}

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

// Found by schemathesis: `ExportFormat` was referenced by the export route's `format`
// parameter but not among the components, so the document could not be resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_of_the_openapi_document_resolves() {
    let doc = serde_json::to_value(keel_server::openapi()).unwrap();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r} is not local"));
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
}

// Found by schemathesis: the 401 answered without a token (and the 403 for a role too
// small, the 413 for a body too large) were not in the document's responses of the routes
// the guards protect, so a client generated from it did not know them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_the_guards_answer_is_documented() {
    let s = start().await;
    let doc = serde_json::to_value(keel_server::openapi()).unwrap();
    for (method, path, role) in ROUTES {
        let responses = &doc["paths"][path][method]["responses"];
        let Some(role) = role else { continue };
        let concrete = path.replace("{run}", &uuid::Uuid::new_v4().to_string());
        let body = if *method == "post" { Some(&b"{}"[..]) } else { None };
        let r = s.call(&method.to_uppercase(), &concrete, None, body).await;
        assert_eq!(r.status, 401, "{method} {path}");
        assert!(responses.get("401").is_some(), "{method} {path}: 401 not documented: {responses}");
        if *role != "viewer" {
            let r = s.call(&method.to_uppercase(), &concrete, Some(VIEWER), body).await;
            assert_eq!(r.status, 403, "{method} {path}");
            assert!(responses.get("403").is_some(), "{method} {path}: 403 not documented");
        }
        if *method == "post" {
            let big = vec![b' '; keel_server::BODY_BYTES_MAX + 1];
            let r = s.call("POST", &concrete, Some(ADMIN), Some(&big)).await;
            assert_eq!(r.status, 413, "{method} {path}");
            assert!(responses.get("413").is_some(), "{method} {path}: 413 not documented");
        }
    }
}

// Found by schemathesis: the export routes answer application/x-ndjson, text/csv or
// text/html, but the document said text/plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_routes_document_the_content_types_they_answer() {
    let s = start().await;
    let run = s.submit_demo(0).await;
    s.engine.run_until_idle().await.unwrap();
    let doc = serde_json::to_value(keel_server::openapi()).unwrap();
    for (route, path) in
        [("/v1/runs/{run}/export", format!("/v1/runs/{run}/export")), ("/v1/export", "/v1/export".to_owned())]
    {
        let documented = doc["paths"][route]["get"]["responses"]["200"]["content"].as_object().unwrap();
        for format in ["jsonl", "csv", "html"] {
            let sep = if path.contains('?') { '&' } else { '?' };
            let r = s.get(&format!("{path}{sep}format={format}"), Some(VIEWER)).await;
            assert_eq!(r.status, 200, "{route} {format}");
            let media = r.header("content-type").unwrap().split(';').next().unwrap().trim().to_owned();
            assert!(documented.contains_key(&media), "{route}: {media} not among {:?}", documented.keys());
        }
    }
}

/// Writes `head` on a new connection and returns what the server answers, and whether it
/// closed the connection, within `within` (None: it did neither).
async fn raw_exchange(addr: std::net::SocketAddr, head: &[u8], within: std::time::Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(head).await.unwrap();
    let mut got = Vec::new();
    match tokio::time::timeout(within, c.read_to_end(&mut got)).await {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

/// A client that sends half a request's headers is cut off after the header read timeout
/// (it held the connection for good before, found by review); one that announces a body
/// over the limit is answered 413 at once, without sending it; one whose body stops half
/// way is answered 408; a path and query over the limit is a JSON 414. Each answer is the
/// API's JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_oversized_requests_are_cut_off_with_json_errors() {
    use std::time::Duration;
    let header_read_timeout = Duration::from_millis(500);
    let s = common::start_serving(
        keel_server::RouterOptions { body_read_timeout: Duration::from_millis(300), ..Default::default() },
        keel_server::ServeOptions { header_read_timeout },
    )
    .await;
    let slack = header_read_timeout + Duration::from_secs(10);
    // Half the headers, then nothing; or nothing at all (the second review: a connection
    // that sent no byte was held for good by the protocol sniffing before the timeout):
    // closed, not held.
    for sent in [&b"GET /healthz HTTP/1.1\r\nHost: x\r\n"[..], b"", b"P"] {
        let half = raw_exchange(s.addr, sent, slack).await;
        assert!(half.is_some(), "a connection that sent {sent:?} was held for {slack:?}");
    }
    // A body announced over the limit: 413 before any of it is sent.
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n",
        common::ADMIN
    );
    let answer =
        raw_exchange(s.addr, head.as_bytes(), Duration::from_secs(10)).await.expect("no answer to a huge body");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"body_too_large\""), "{answer}");
    // A body that stops half way: 408 once the body read timeout passes.
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"workflow\":",
        common::ADMIN
    );
    let answer =
        raw_exchange(s.addr, head.as_bytes(), Duration::from_secs(10)).await.expect("no answer to a stalled body");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    // Without a token, the same stalled body is answered 401 at once: nothing of it is
    // read for a caller who may not call (the second review: the guard ran first).
    let head = "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    let answer = raw_exchange(s.addr, head.as_bytes(), Duration::from_secs(10)).await.expect("no answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // A path and query over the limit.
    let long = format!("/v1/runs?status={}", "x".repeat(keel_server::URI_BYTES_MAX));
    let r = s.get(&long, Some(common::VIEWER)).await;
    assert_eq!((r.status, r.code().as_str()), (414, "uri_too_long"));
    // Nothing of it was recorded, and the server still answers.
    assert_eq!(s.get("/v1/runs", Some(common::VIEWER)).await.json()["runs"].as_array().unwrap().len(), 0);
}

/// A graceful shutdown is not held by a connection that sent half a request: the server
/// returns at once (before, it waited for that client for good: `keel serve` then hit its
/// whole `--shutdown-timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_does_not_hold_a_graceful_shutdown() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_demo::register(keel_engine::Engine::builder().path(dir.path().join("db"))).open().unwrap();
    let auth = keel_server::Auth::from_tokens([("root", keel_server::Role::Admin, common::ADMIN)]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(keel_server::serve(listener, keel_server::router(engine, auth), async move {
        let _ = stopped.await;
    }));
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    // Far less than the header read timeout (65 s): the shutdown closes such a
    // connection at once.
    let bound = std::time::Duration::from_secs(10);
    let ended = tokio::time::timeout(bound, server).await;
    assert!(ended.is_ok(), "the shutdown waited more than {bound:?} for a half-sent request");
    ended.unwrap().unwrap().unwrap();
    drop(c);
}

/// With allowed hosts (what `keel serve` sets on a loopback address), a request naming
/// another host is 421 `host_not_allowed` on every route, open ones included: a page of
/// another site whose name resolves to 127.0.0.1 (DNS rebinding) reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_is_refused_when_hosts_are_listed() {
    let s = common::start_with(keel_server::RouterOptions {
        allowed_hosts: vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        metrics_open: true,
        ..Default::default()
    })
    .await;
    assert_eq!(s.get("/v1/runs", Some(VIEWER)).await.status, 200);
    for path in ["/metrics", "/healthz", "/v1/runs"] {
        let head = format!("GET {path} HTTP/1.1\r\nHost: evil.example:{}\r\nAuthorization: Bearer {VIEWER}\r\nConnection: close\r\n\r\n", s.addr.port());
        let answer =
            raw_exchange(s.addr, head.as_bytes(), std::time::Duration::from_secs(10)).await.expect("no answer");
        assert!(answer.starts_with("HTTP/1.1 421") && answer.contains("\"host_not_allowed\""), "{path}: {answer}");
    }
    let head = format!("GET /healthz HTTP/1.1\r\nHost: LOCALHOST:{}\r\nConnection: close\r\n\r\n", s.addr.port());
    let answer = raw_exchange(s.addr, head.as_bytes(), std::time::Duration::from_secs(10)).await.expect("no answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
