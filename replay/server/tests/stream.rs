//! Live streams against a real server on 127.0.0.1: a run's events as server-sent events
//! (live, resumed from Last-Event-ID with no gap and no duplicate), every run's status
//! changes, and the tokens they need.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{start, Server, ADMIN, APPROVER, VIEWER};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The human_escalation scenario of the demo (a refund above the limit).
const ESCALATING: u64 = 5;
/// The happy_path scenario.
const HAPPY: u64 = 0;

#[derive(Debug, Clone, PartialEq)]
struct Msg {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// An SSE connection (HTTP/1.0: the body is the event stream itself, ended by close).
struct Sse {
    status: u16,
    s: tokio::net::TcpStream,
    buf: String,
    msgs: Vec<Msg>,
    closed: bool,
}

async fn open(server: &Server, path: &str, token: Option<&str>, last_id: Option<&str>) -> Sse {
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: text/event-stream\r\n", server.addr);
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(id) = last_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut c = Sse { status: 0, s, buf: String::new(), msgs: Vec::new(), closed: false };
    while !c.buf.contains("\r\n\r\n") {
        assert!(c.fill().await, "closed before the headers");
    }
    let split = c.buf.find("\r\n\r\n").unwrap();
    let head = c.buf[..split].to_owned();
    c.buf = c.buf[split + 4..].to_owned();
    c.status = head.split(' ').nth(1).unwrap().parse().unwrap();
    c.parse();
    if c.status == 200 {
        assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    }
    c
}

impl Sse {
    /// Reads more bytes; false once the server closed.
    async fn fill(&mut self) -> bool {
        let mut b = [0u8; 8192];
        let n =
            tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut b)).await.expect("stream stalled").unwrap();
        if n == 0 {
            self.closed = true;
            return false;
        }
        self.buf.push_str(std::str::from_utf8(&b[..n]).unwrap());
        self.parse();
        true
    }

    /// Moves the complete messages of the body out of the buffer (not before the headers
    /// were taken).
    fn parse(&mut self) {
        if self.status == 0 {
            return;
        }
        while let Some(end) = self.buf.find("\n\n") {
            let block = self.buf[..end].to_owned();
            self.buf = self.buf[end + 2..].to_owned();
            let mut m = Msg { id: None, event: None, data: String::new() };
            let mut any = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    m.id = Some(v.trim().to_owned());
                    any = true;
                } else if let Some(v) = line.strip_prefix("event:") {
                    m.event = Some(v.trim().to_owned());
                    any = true;
                } else if let Some(v) = line.strip_prefix("data:") {
                    m.data.push_str(v.trim_start());
                    any = true;
                }
            }
            if any {
                self.msgs.push(m);
            }
        }
    }

    /// Reads until `done` holds for the messages so far (or the stream ends).
    async fn until(&mut self, done: impl Fn(&[Msg]) -> bool) {
        while !done(&self.msgs) {
            if !self.fill().await {
                return;
            }
        }
    }

    async fn read_to_close(&mut self) {
        while self.fill().await {}
    }

    fn ids(&self) -> Vec<u64> {
        self.msgs.iter().filter_map(|m| m.id.as_deref()).map(|i| i.parse().unwrap()).collect()
    }
}

fn approve() -> Value {
    json!({"decision": "approve", "reason": "checked with the customer"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_event_stream_is_live_and_resumes_from_last_event_id_without_gap_or_duplicate() {
    let s = start().await;
    let run = s.submit_demo(ESCALATING).await;
    s.engine.run_until_idle().await.unwrap();
    let before = s.events(run);
    let last_before = before.last().unwrap().seq.0;
    let path = format!("/v1/runs/{run}/events");

    // Live: the stream sends what is recorded, stays open while the run waits...
    let mut live = open(&s, &path, Some(VIEWER), None).await;
    assert_eq!(live.status, 200);
    live.until(|m| m.iter().any(|m| m.id.as_deref() == Some(&last_before.to_string()))).await;
    assert!(!live.closed, "the stream of a waiting run ended");
    assert_eq!(live.ids(), (0..=last_before).collect::<Vec<_>>());
    // ...and a client that drops after seq 3 resumes from there.
    let resume_after = 3u64;
    let mut resumed = open(&s, &path, Some(VIEWER), Some(&resume_after.to_string())).await;
    assert_eq!(resumed.status, 200);

    // The resolution and what follows arrive on both streams as they are recorded.
    let r = s.post(&format!("/v1/runs/{run}/resolve"), Some(APPROVER), &approve()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    s.engine.run_until_idle().await.unwrap();
    live.read_to_close().await;
    resumed.read_to_close().await;
    let all = s.events(run);
    assert!(all.len() > before.len());
    let seqs: Vec<u64> = all.iter().map(|e| e.seq.0).collect();
    assert_eq!(live.ids(), seqs, "live stream: a gap or a duplicate");
    assert_eq!(resumed.ids(), seqs[(resume_after as usize + 1)..].to_vec(), "resumed stream: a gap or a duplicate");
    // Each message is the event entry of the JSON page, named by its kind.
    for (m, e) in live.msgs.iter().zip(&all) {
        let data: Value = serde_json::from_str(&m.data).unwrap();
        assert_eq!(data["seq"], json!(e.seq.0));
        assert_eq!(m.event.as_deref(), Some(e.event.kind_name()));
        assert_eq!(data["kind"], json!(e.event.kind_name()));
    }
    assert!(live.msgs.iter().any(|m| m.event.as_deref() == Some("HumanResolved")));

    // A finished run's stream sends the rest of its log and ends; past the end, nothing.
    let mut end = open(&s, &path, Some(VIEWER), Some(&seqs[seqs.len() - 2].to_string())).await;
    end.read_to_close().await;
    assert_eq!(end.ids(), vec![*seqs.last().unwrap()]);
    let mut past = open(&s, &path, Some(VIEWER), Some(&seqs.last().unwrap().to_string())).await;
    past.read_to_close().await;
    assert!(past.ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_need_a_token_and_refuse_a_bad_run_or_last_event_id() {
    let s = start().await;
    let run = s.submit_demo(HAPPY).await;
    let path = format!("/v1/runs/{run}/events");
    for p in [path.as_str(), "/v1/events"] {
        let none = open(&s, p, None, None).await;
        assert_eq!(none.status, 401, "{p}");
        let wrong = open(&s, p, Some("tok-nobody-0123456789"), None).await;
        assert_eq!(wrong.status, 401, "{p}");
        // Every role may read: the least, viewer, is let in.
        let mut ok = open(&s, p, Some(VIEWER), None).await;
        assert_eq!(ok.status, 200, "{p}");
        if p == path {
            ok.until(|m| !m.is_empty()).await;
            assert_eq!(ok.msgs[0].id.as_deref(), Some("0"));
        }
    }
    let bad_id = open(&s, &path, Some(VIEWER), Some("soon")).await;
    assert_eq!(bad_id.status, 400);
    let unknown =
        open(&s, &format!("/v1/runs/{}/events", keel_engine::RunId::from_bytes([9; 16])), Some(VIEWER), None).await;
    assert_eq!(unknown.status, 404);
    // Without the Accept header the route is the JSON page, as before.
    let page = s.get(&path, Some(VIEWER)).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.json()["events"][0]["seq"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_stream_tells_every_status_change_of_a_run_in_order() {
    let s = start().await;
    let mut changes = open(&s, "/v1/events", Some(VIEWER), None).await;
    assert_eq!(changes.status, 200);
    let run = s.submit_demo(HAPPY).await.to_string();
    s.engine.run_until_idle().await.unwrap();
    let is_end = |m: &Msg| {
        let d: Value = serde_json::from_str(&m.data).unwrap();
        d["run"] == json!(run) && d["status"] == json!("Completed")
    };
    changes.until(|m| m.iter().any(is_end)).await;
    let of_run: Vec<Value> = changes
        .msgs
        .iter()
        .map(|m| {
            assert_eq!(m.event.as_deref(), Some("status"));
            serde_json::from_str::<Value>(&m.data).unwrap()
        })
        .filter(|d| d["run"] == json!(run))
        .collect();
    assert_eq!(of_run[0]["previous"], Value::Null);
    assert_eq!(of_run[0]["status"], json!("Accepted"));
    assert_eq!(of_run[0]["workflow"], json!("support_ticket"));
    // Each change starts where the one before ended.
    for w in of_run.windows(2) {
        assert_eq!(w[1]["previous"], w[0]["status"]);
        assert!(w[1]["next_seq"].as_u64() > w[0]["next_seq"].as_u64());
    }
    assert_eq!(of_run.last().unwrap()["status"], json!("Completed"));
    let _ = ADMIN;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_cap_get_503_too_many_streams_until_one_closes() {
    let s = common::start_with(keel_server::RouterOptions { streams_max: 2, ..Default::default() }).await;
    let waiting = s.submit_demo(ESCALATING).await;
    s.engine.run_until_idle().await.unwrap();
    let tail = format!("/v1/runs/{waiting}/events");
    // Two open streams (a run's tail, the status stream): the cap.
    let mut first = open(&s, &tail, Some(VIEWER), None).await;
    assert_eq!(first.status, 200);
    first.until(|m| !m.is_empty()).await;
    let second = open(&s, "/v1/events", Some(VIEWER), None).await;
    assert_eq!(second.status, 200);
    // A third of either kind is refused with a JSON error, and nothing else changes.
    for p in [tail.as_str(), "/v1/events"] {
        let mut refused = open(&s, p, Some(VIEWER), None).await;
        assert_eq!(refused.status, 503, "{p}");
        refused.read_to_close().await;
        let body: Value = serde_json::from_str(refused.buf.trim()).unwrap();
        assert_eq!(body["error"]["code"], json!("too_many_streams"), "{body}");
    }
    // The JSON page of the same route is not a stream: it is served.
    assert_eq!(s.get(&tail, Some(VIEWER)).await.status, 200);
    // Once a stream ends (its client closed: the server sees it when it next writes to it,
    // here the status changes of new runs), its slot is free again.
    drop(second);
    let mut again = None;
    for _ in 0..100 {
        s.submit_demo(HAPPY).await;
        let c = open(&s, "/v1/events", Some(VIEWER), None).await;
        if c.status == 200 {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "the slot of the closed stream was never freed");
    // The open tail still works: resolving the run ends it with the run's last event.
    let r = s.post(&format!("/v1/runs/{waiting}/resolve"), Some(APPROVER), &approve()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    s.engine.run_until_idle().await.unwrap();
    first.read_to_close().await;
    let last = first.msgs.last().unwrap();
    assert!(matches!(last.event.as_deref(), Some("RunCompleted" | "RunFailed")), "{last:?}");
}

/// A stream ends once its token is removed (found by review: it kept delivering until
/// the server stopped, though new requests got 401); a stream of another token stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_ends_once_its_token_is_removed() {
    let (s, tokens, vera, root) = common::start_with_tokens_file().await;
    let submit = |index: u64| {
        let body = common::submit_body(&keel_demo::request(7, index));
        let (s, root) = (&s, &root);
        async move {
            let r = s.post("/v1/runs", Some(root), &body).await;
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["run"].as_str().unwrap().to_owned()
        }
    };
    let run = submit(ESCALATING).await;
    s.engine.run_until_idle().await.unwrap();
    let mut revoked = open(&s, "/v1/events", Some(&vera), None).await;
    let mut tail = open(&s, &format!("/v1/runs/{run}/events"), Some(&vera), None).await;
    let mut kept = open(&s, "/v1/events", Some(&root), None).await;
    assert_eq!((revoked.status, tail.status, kept.status), (200, 200, 200));
    tail.until(|m| !m.is_empty()).await;
    assert!(keel_server::remove_token(&tokens, "vera").unwrap());
    let within = keel_server::TOKEN_RECHECK_EVERY + Duration::from_secs(10);
    for (what, stream) in [("status stream", &mut revoked), ("run tail", &mut tail)] {
        let ended = tokio::time::timeout(within, stream.read_to_close()).await;
        assert!(ended.is_ok(), "the {what} of a removed token was still open after {within:?}");
    }
    // The other token's stream is still open and live.
    let other = submit(HAPPY).await;
    kept.until(|m| m.iter().any(|m| m.data.contains(&other))).await;
    assert!(!kept.closed, "the stream of a token still stored ended");
    assert_eq!(s.get("/v1/runs", Some(&vera)).await.status, 401);
}
