//! A real server on 127.0.0.1 (ephemeral port) over the demo's workflow, and a minimal
//! HTTP/1.1 client (one request per connection) so the tests need no HTTP client crate.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use keel_engine::{Engine, Logged, Request, RunId};
use keel_server::{Auth, Role};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const VIEWER: &str = "tok-viewer-0123456789";
pub const APPROVER: &str = "tok-approver-0123456789";
pub const ADMIN: &str = "tok-admin-0123456789";

pub struct Server {
    pub addr: SocketAddr,
    pub engine: Engine,
    _dir: tempfile::TempDir,
}

/// Starts the router on a fresh sled database with the demo's workflow and three tokens:
/// "vera" (viewer), "ada" (approver), "root" (admin). No workers run: tests drive runs
/// with `run_until_idle` so that what they see is settled.
pub async fn start() -> Server {
    start_with(keel_server::RouterOptions::default()).await
}

/// [`start`] with explicit router options.
pub async fn start_with(options: keel_server::RouterOptions) -> Server {
    start_serving(options, keel_server::ServeOptions::default()).await
}

/// [`start`] with explicit router and connection options.
pub async fn start_serving(options: keel_server::RouterOptions, serve: keel_server::ServeOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_demo::register(Engine::builder().path(dir.path().join("db"))).open().unwrap();
    let auth = Auth::from_tokens([
        ("vera", Role::Viewer, VIEWER),
        ("ada", Role::Approver, APPROVER),
        ("root", Role::Admin, ADMIN),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = keel_server::router_with(engine.clone(), auth, options);
    tokio::spawn(keel_server::serve_on(listener, app, std::future::pending(), serve));
    Server { addr, engine, _dir: dir }
}

/// [`start`] with the tokens read from a tokens file in the database's directory, which
/// the test may change while the server runs (`keel token add` and `remove` do): the
/// server and the file's path, holding "vera" (viewer) and "root" (admin).
pub async fn start_with_tokens_file() -> (Server, std::path::PathBuf, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_demo::register(Engine::builder().path(dir.path().join("db"))).open().unwrap();
    let path = dir.path().join(keel_server::TOKENS_FILE);
    let vera = keel_server::add_token(&path, "vera", Role::Viewer).unwrap();
    let root = keel_server::add_token(&path, "root", Role::Admin).unwrap();
    let auth = Auth::from_file(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = keel_server::router(engine.clone(), auth);
    tokio::spawn(keel_server::serve(listener, app, std::future::pending()));
    (Server { addr, engine, _dir: dir }, path, vera, root)
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The error code of a JSON error answer.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {}", self.text())).to_owned()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Server {
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> Resp {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        parse(&raw)
    }
    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.call("GET", path, token, None).await
    }
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.call("POST", path, token, Some(body.to_string().as_bytes())).await
    }

    /// Submits the demo's request `index` (batch seed 7) through the API as admin.
    pub async fn submit_demo(&self, index: u64) -> RunId {
        let r = self.post("/v1/runs", Some(ADMIN), &submit_body(&keel_demo::request(7, index))).await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["run"].as_str().unwrap().parse().unwrap()
    }

    pub fn events(&self, run: RunId) -> Vec<Logged> {
        self.engine.events(run).unwrap()
    }
}

pub fn submit_body(req: &Request) -> Value {
    json!({
        "workflow": req.workflow,
        "input": req.input,
        "idempotency_key": req.idempotency_key,
        "seed": req.seed,
    })
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}
