//! `keel serve --db postgres://…` (docs/SERVER.md, docs/STORE.md "PostgreSQL"): the API
//! tokens of a deployment on PostgreSQL live in the `tokens` table of its schema (only
//! their SHA-256), so `keel token add --db postgres://…` on any machine adds a token every
//! server on the database accepts. Two real `keel serve` processes on one schema share the
//! tokens and the runs: a run submitted through one and resolved through the other ends.
//! The schema is fresh and dropped; without a server the test says it was skipped (and
//! fails under CI=true or KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
#[path = "../../../store/postgres/tests/common/mod.rs"]
mod pg;

use common::{http_call as call, keel_in, spawn_serve_plain};
use keel_store::Durability;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::process::Child;
use std::time::{Duration, Instant};

fn token_add(db: &str, name: &str, role: &str) -> String {
    let r = keel_in(None, &["--db", db, "token", "add", name, "--role", role]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().to_owned()
}

/// A `keel serve` child on an ephemeral loopback port, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(db: &str) -> Server {
    let (child, addr) = spawn_serve_plain(db);
    Server { child, addr }
}

/// Reads the event stream at `path` until a message of `event` comes (10 s at most);
/// the stream's text up to it.
fn first_sse_event(addr: &str, path: &str, token: &str, event: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let (mut text, mut buf, started) = (String::new(), [0u8; 4096], Instant::now());
    let want = format!("event: {event}\n");
    while !(text.contains(&want) && text[text.find(&want).unwrap()..].contains("\n\n")) {
        assert!(started.elapsed() < Duration::from_secs(10), "no {event} event within 10 s: {text}");
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {text}");
        text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    assert!(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"), "{text}");
    text
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_servers_on_postgres_share_tokens_kept_in_the_database_and_the_runs() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let cfg = scratch.config();
    let sep = if cfg.url.contains('?') { '&' } else { '?' };
    let db = format!("{}{sep}schema={}", cfg.url, cfg.schema);
    let root = token_add(&db, "root", "admin");
    let ada = token_add(&db, "ada", "approver");
    let vic = token_add(&db, "vic", "viewer");
    // Only hashes are stored, with their roles.
    let admin = pg::Admin::connect().unwrap();
    for (name, token, role) in [("root", &root, "admin"), ("ada", &ada, "approver"), ("vic", &vic, "viewer")] {
        let hex = hex::encode(Sha256::digest(token.as_bytes()));
        let q = format!(
            "SELECT count(*) FROM {}.tokens WHERE name = '{name}' AND role = '{role}' AND encode(sha256, 'hex') = '{hex}'",
            cfg.schema
        );
        assert_eq!(admin.int(&q), 1, "{name}");
    }
    let dup = keel_in(None, &["--db", &db, "token", "add", "ada", "--role", "viewer"]);
    assert_eq!(dup.one_line_error(1), "error: a token named \"ada\" already exists");

    let (a, b) = (serve(&db), serve(&db));
    for s in [&a, &b] {
        assert_eq!(call(&s.addr, "GET", "/v1/runs", &vic, None).0, 200);
        assert_eq!(call(&s.addr, "GET", "/v1/runs", "keel_not_a_token", None).0, 401);
        assert_eq!(call(&s.addr, "GET", "/v1/runs", "", None).0, 401);
    }
    // Each server's status stream says, every 2 s, that runs may have changed elsewhere
    // (the other server's changes are not in its engine's feed): the web lists re-list.
    let elsewhere = first_sse_event(&a.addr, "/v1/events", &vic, "elsewhere");
    assert!(elsewhere.contains(r#"data: {"every_ms":2000}"#), "{elsewhere}");
    // A token added while both servers run is accepted by both.
    let late = token_add(&db, "late", "viewer");
    for s in [&a, &b] {
        wait_until("the new token", || call(&s.addr, "GET", "/v1/runs", &late, None).0 == 200);
    }
    // Listed (names and roles only) and removed on the database: both servers refuse it.
    let listed = keel_in(None, &["--db", &db, "token", "list", "--json"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(listed.json()["tokens"].as_array().unwrap().iter().any(|t| t["name"] == "late" && t["role"] == "viewer"));
    assert!(!listed.stdout.contains(&late));
    let removed = keel_in(None, &["--db", &db, "token", "remove", "late"]);
    assert_eq!(removed.code, 0, "{}", removed.stderr);
    for s in [&a, &b] {
        wait_until("the removed token refused", || call(&s.addr, "GET", "/v1/runs", &late, None).0 == 401);
    }

    // Submitted through one server, resolved through the other: the servers' workers
    // (sharing the database's work queue) drive it to its end.
    let req = keel_demo::request(7, 5); // the human_escalation scenario
    let body =
        json!({"workflow": req.workflow, "input": req.input, "idempotency_key": req.idempotency_key, "seed": req.seed});
    let (status, r) = call(&a.addr, "POST", "/v1/runs", &root, Some(&body));
    assert_eq!(status, 201, "{r}");
    let run = r["run"].as_str().unwrap().to_owned();
    wait_until("the escalation", || {
        call(&b.addr, "GET", "/v1/escalations", &ada, None).1["escalations"].as_array().is_some_and(|a| !a.is_empty())
    });
    let resolve = json!({"decision": "approve", "reason": "refund checked"});
    let path = format!("/v1/runs/{run}/resolve");
    assert_eq!(call(&b.addr, "POST", &path, &vic, Some(&resolve)).0, 403, "a viewer may not decide");
    let (status, r) = call(&b.addr, "POST", &path, &ada, Some(&resolve));
    assert_eq!((status, r), (200, json!({"run": run, "decision": "approve", "by": "ada"})));
    wait_until("the run's end", || {
        let s = call(&a.addr, "GET", &format!("/v1/runs/{run}"), &vic, None).1;
        ["Completed", "Failed", "Cancelled"].contains(&s["status"].as_str().unwrap_or(""))
    });
    let s = call(&a.addr, "GET", &format!("/v1/runs/{run}"), &vic, None).1;
    assert_eq!(s["escalations"][0]["resolution"]["by"], "ada");
}
