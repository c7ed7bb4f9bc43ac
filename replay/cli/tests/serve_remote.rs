//! The CLI through a running `keel serve` (real processes, a real sled database): while
//! the server holds the database, `keel runs`, `show`, `escalations`, `stats`, `verify`,
//! `export`, `resolve` and `cancel` print what they print on the database itself; a
//! resolution is recorded with the token's name; a refused token is one line; a file left
//! by a killed server does not mislead; SIGTERM during work leaves a log that verifies and
//! runs that `keel work` finishes; HTTPS with a self-signed certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{dir_files, http_call as call, keel, keel_in, spawn_serve, DemoDb, Ran, KEEL};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn token_add(db: &Path, name: &str, role: &str) -> String {
    let r = keel_in(None, &["--db", db.to_str().unwrap(), "token", "add", name, "--role", role]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().to_owned()
}

/// `keel --db DB args...` with `KEEL_TOKEN` set (or unset with `None`).
fn keel_as(db: &Path, token: Option<&str>, args: &[&str]) -> Ran {
    let mut cmd = Command::new(KEEL);
    cmd.arg("--db").arg(db).args(args).env_remove("KEEL_DB").env_remove("KEEL_LOG").env_remove("KEEL_SERVER");
    cmd.env_remove("KEEL_CA_CERT");
    match token {
        Some(t) => cmd.env("KEEL_TOKEN", t),
        None => cmd.env_remove("KEEL_TOKEN"),
    };
    let out = cmd.output().unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

/// Waits (at most `secs`) for the child to exit; its exit code.
fn exit_code(child: &mut Child, secs: u64) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "keel serve did not stop within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The read commands compared through the server and on the database.
fn reads(run: &str) -> Vec<Vec<String>> {
    let r = run.to_owned();
    let short = run[..8].to_owned();
    [
        vec!["runs", "--json"],
        vec!["runs"],
        vec!["runs", "--status", "awaitinghuman"],
        vec!["runs", "--limit", "3", "--json"],
        vec!["runs", "--limit", "3"],
        vec!["runs", "--workflow", "support_ticket", "--limit", "2", "--cursor", &r, "--json"],
        vec!["runs", "--workflow", "no such workflow", "--json"],
        vec!["escalations", "--json"],
        vec!["escalations"],
        vec!["stats", "--json"],
        vec!["stats"],
        vec!["show", &r, "--json"],
        vec!["show", &short],
        vec!["verify", "--json"],
        vec!["verify"],
        vec!["verify", "--run", &short],
    ]
    .into_iter()
    .map(|a| a.into_iter().map(str::to_owned).collect())
    .collect()
}

/// The `damaged-*` directories in `db`.
fn damaged(db: &Path) -> Vec<String> {
    std::fs::read_dir(db)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("damaged-"))
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn the_cli_goes_through_a_running_server_with_the_same_output() {
    let d = DemoDb::new(8);
    let db = d.db.clone();
    let root = token_add(&db, "root", "admin");
    let vera = token_add(&db, "vera", "viewer");
    let waiting = d.run_of("human_escalation").to_string();
    let before: Vec<Ran> = reads(&waiting).iter().map(|a| keel(&db, &strs(a)).ok().to_owned_ran()).collect();
    // Prefixes that are not one run's: one digit (shared by several of the 8 runs, or
    // not), and a digit no run begins with.
    let firsts: Vec<char> = d.runs.iter().map(|r| r.run.to_string().chars().next().unwrap()).collect();
    let unused = "0123456789abcdef".chars().find(|c| !firsts.contains(c)).unwrap().to_string();
    let prefixes = [waiting[..1].to_owned(), unused];
    let prefixes_before: Vec<Ran> = prefixes.iter().map(|p| keel(&db, &["show", p]).to_owned_ran()).collect();
    let local_all = d.path("local.jsonl");
    let all_args = |out: &Path| -> Vec<String> {
        [
            "export",
            "--all",
            "--since",
            "0",
            "--format",
            "jsonl",
            "--redact",
            "TaskExecuted.output",
            "-o",
            out.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    keel(&db, &strs(&all_args(&local_all))).ok();
    let csv_before = keel(&db, &["export", &waiting, "--format", "csv"]).ok().stdout.clone();
    let early = d.path("early.jsonl");
    let early = early.to_str().unwrap();
    keel(&db, &["export", &waiting, "--format", "jsonl", "-o", early]).ok();
    let against_before = keel(&db, &["verify", early, "--against-db", "--json"]).ok().stdout.clone();

    let (mut child, url) = spawn_serve(db.to_str().unwrap(), &[]);
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(db.join("serve.addr")).unwrap()).unwrap();
    assert_eq!(recorded["url"], url);

    // Every read, text and JSON, as it was on the database (the server's workers find
    // nothing to do: every demo run is finished or waits for a human).
    for (args, was) in reads(&waiting).iter().zip(&before) {
        let now = keel_as(&db, Some(&vera), &strs(args));
        assert_eq!(now.code, 0, "{args:?}: {}", now.stderr);
        assert_eq!(now.stdout, was.stdout, "{args:?} through the server");
    }
    // Finding the server wrote nothing into the database's directory (it used to open the
    // database for writing to see whether it was held: an evidence copy of the files in
    // use, `damaged-*`, each time).
    assert_eq!(damaged(&db), Vec::<String>::new());
    for (p, was) in prefixes.iter().zip(&prefixes_before) {
        let now = keel_as(&db, Some(&vera), &["show", p]);
        assert_eq!((now.code, &now.stdout, &now.stderr), (was.code, &was.stdout, &was.stderr), "show {p}");
    }
    // An export of the run through the server verifies against its own chain.
    let file = d.path("run.jsonl");
    keel_as(&db, Some(&vera), &["export", &waiting[..8], "--format", "jsonl", "-o", file.to_str().unwrap()]);
    keel_in(None, &["verify", file.to_str().unwrap()]).ok();

    // Every run, redacted, as the database exports them (the header's export time aside).
    let remote_all = d.path("remote.jsonl");
    let r = keel_as(&db, Some(&vera), &strs(&all_args(&remote_all)));
    assert_eq!(r.code, 0, "{}", r.stderr);
    keel_in(None, &["verify", remote_all.to_str().unwrap()]).ok();
    let records = |p: &Path| std::fs::read_to_string(p).unwrap().lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(records(&remote_all), records(&local_all));
    assert!(records(&remote_all).len() > 8);
    let csv = keel_as(&db, Some(&vera), &["export", &waiting, "--format", "csv"]);
    assert_eq!(csv.stdout, csv_before);
    let against = keel_as(&db, Some(&vera), &["verify", early, "--against-db", "--json"]);
    assert_eq!((against.code, &against.stdout), (0, &against_before), "{}", against.stderr);

    // A resolution through the server is recorded with the token's name.
    let r = keel_as(&db, Some(&root), &["resolve", &waiting[..8], "--decision", "approve", "--reason", "checked"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with(&format!("resolved run {waiting}: approve by root\n")), "{}", r.stdout);
    wait_until("the resolved run's end", || {
        let s = keel_as(&db, Some(&vera), &["show", &waiting, "--json"]).json();
        ["Completed", "Failed", "Cancelled"].contains(&s["status"].as_str().unwrap_or(""))
    });
    let state = keel_as(&db, Some(&vera), &["show", &waiting, "--json"]).json();
    assert_eq!(state["escalations"][0]["resolution"]["by"], "root");
    let through = keel_as(&db, Some(&vera), &["runs", "--json"]);
    assert_eq!(through.code, 0);
    // The server has written since its open (its manifest no longer ends in a clean close):
    // finding it still writes nothing into the directory.
    assert_eq!(damaged(&db), Vec::<String>::new());
    // The early export is a genuine export of a run that went on since: reported, not
    // failed, through the server as on the database.
    let moved = keel_as(&db, Some(&vera), &["verify", early, "--against-db"]);
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    assert!(moved.stdout.contains("more events since this export"), "{}", moved.stdout);

    signal(&child, "-TERM");
    assert_eq!(exit_code(&mut child, 30), Some(0));
    assert!(!db.join("serve.addr").exists(), "the address file is removed on shutdown");
    // What the server said is what the database says once it has stopped.
    assert_eq!(keel(&db, &["runs", "--json"]).ok().stdout, through.stdout);
    assert_eq!(keel(&db, &["verify", early, "--against-db"]).ok().stdout, moved.stdout);
    keel(&db, &["verify"]).ok();
}

/// Finding the server a database's `serve.addr` names writes nothing into the database's
/// directory: the CLI used to open the database for writing to see whether it was held,
/// which, with the server's files in use (not a clean close), first made an evidence copy
/// of them (`damaged-*`, the size of the database) on every command, refused or not.
#[test]
fn finding_the_server_writes_nothing_into_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    keel(&db, &["demo", "--runs", "16"]).ok();
    let vera = token_add(&db, "vera", "viewer");
    let (mut child, _url) = spawn_serve(db.to_str().unwrap(), &[]);
    for token in [Some(vera.as_str()), None] {
        for args in [&["runs"][..], &["stats"], &["escalations"]] {
            let r = keel_as(&db, token, args);
            assert_eq!(r.code, if token.is_some() { 0 } else { 1 }, "{args:?}: {}", r.stderr);
        }
    }
    assert_eq!(damaged(&db), Vec::<String>::new());
    signal(&child, "-TERM");
    assert_eq!(exit_code(&mut child, 30), Some(0));
}

#[test]
fn refused_tokens_are_one_line_and_a_stale_address_does_not_mislead() {
    let d = DemoDb::new(8);
    let db = d.db.clone();
    let vera = token_add(&db, "vera", "viewer");
    let ada = token_add(&db, "ada", "admin");
    let waiting = d.run_of("human_escalation").to_string();
    let (mut child, url) = spawn_serve(db.to_str().unwrap(), &[]);

    let e = keel_as(&db, None, &["runs"]).one_line_error(1);
    assert!(e.contains("401 unauthorized") && e.contains("KEEL_TOKEN"), "{e}");
    // Without --metrics-open, /metrics needs a token too.
    let addr = url.trim_start_matches("http://");
    assert_eq!(call(addr, "GET", "/metrics", "", None).0, 401);
    let e = keel_as(&db, Some("keel_wrong"), &["escalations", "--json"]).one_line_error(1);
    assert!(e.contains("401 unauthorized"), "{e}");
    let e =
        keel_as(&db, Some(&vera), &["resolve", &waiting, "--decision", "approve", "--reason", "x"]).one_line_error(1);
    assert!(e.contains("403 forbidden"), "{e}");
    let e = keel_as(&db, Some(&vera), &["cancel", &waiting, "--reason", "x"]).one_line_error(1);
    assert!(e.contains("403 forbidden"), "{e}");
    // --server and --token name them explicitly (and a free-text --by is refused).
    let r = keel_in(None, &["--server", &url, "--token", &vera, "escalations", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["escalations"][0]["run"], waiting);
    // A submit goes through the server too (it wrote to a database of its own in the
    // working directory, `./keel-data`, whatever --server said): an admin's is recorded
    // there, a viewer's refused.
    let cwd = tempfile::tempdir().unwrap();
    let ticket = r#"{"id": "T-remote", "customer": "C-1", "subject": "Question about shipping", "body": "Where?"}"#;
    let input = format!(r#"{{"index": 1000, "ticket": {ticket}}}"#);
    let input = input.as_str();
    let submit = ["--server", &url, "--token", &vera, "submit", "support_ticket", "--input", input, "--json"];
    let e = keel_in(Some(cwd.path()), &submit).one_line_error(1);
    assert!(e.contains("403 forbidden"), "{e}");
    let submit = ["--server", &url, "--token", &ada, "submit", "support_ticket", "--input", input, "--json"];
    let r = keel_in(Some(cwd.path()), &submit);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let run = r.json()["run"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["duplicate"], false);
    assert!(!cwd.path().join("keel-data").exists(), "a database was created in the working directory");
    let r = keel_in(None, &["--server", &url, "--token", &vera, "show", &run, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A verify through a server named by --server says it read that server's database,
    // not the --db it was not given (a new user saw `./keel-data` named).
    let r = keel_in(Some(cwd.path()), &["--server", &url, "--token", &vera, "verify", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["source"], url.as_str(), "{}", r.stdout);
    // The flags are checked as on the database before anything is sent: too deep an
    // output is the same one line (exit 2), a resolution without a reason is refused.
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let e = keel_as(&db, Some(&vera), &["resolve", &waiting, "--output", &deep, "--reason", "x"]).one_line_error(2);
    assert!(e.contains("json_too_deep"), "{e}");
    let e = keel_as(&db, Some(&vera), &["resolve", &waiting, "--decision", "approve"]).one_line_error(2);
    assert!(e.contains("--reason"), "{e}");
    let e = keel_as(&db, Some(&vera), &["resolve", &waiting, "--decision", "approve", "--reason", "x", "--by", "me"])
        .one_line_error(2);
    assert!(e.contains("--by"), "{e}");

    assert_eq!(damaged(&db), Vec::<String>::new(), "refused commands wrote into the database");

    // Killed: the address file stays behind, but the database is free, so it is read: from
    // a scratch copy, as always (nothing in the directory changes), by several readers at
    // once (they used to open it for writing, one at a time, the others "in use").
    signal(&child, "-KILL");
    let _ = child.wait();
    assert!(db.join("serve.addr").exists());
    let files = dir_files(&db);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn({
                let db = db.clone();
                move || keel_as(&db, None, &["runs", "--json"])
            })
        })
        .collect();
    for r in readers {
        let r = r.join().unwrap();
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    assert_eq!(dir_files(&db), files, "a read command wrote into the database's directory");
    // Held by another process while the file names a server that does not answer.
    let held = d.open();
    let e = keel_as(&db, None, &["runs"]).one_line_error(1);
    assert!(e.contains("serve.addr") && e.contains(&url) && e.contains("is gone or does not answer"), "{e}");
    // A file whose process is gone is not used even when its address answers: there a
    // server of another database may be listening now.
    let other = tempfile::tempdir().unwrap();
    let (mut other_server, other_url) = spawn_serve(other.path().join("db").to_str().unwrap(), &[]);
    let dead_pid = child.id();
    std::fs::write(db.join("serve.addr"), json!({"url": other_url, "pid": dead_pid, "ca_cert": null}).to_string())
        .unwrap();
    let e = keel_as(&db, Some(&vera), &["runs", "--json"]).one_line_error(1);
    assert!(e.contains(&other_url) && e.contains("is gone or does not answer"), "{e}");
    signal(&other_server, "-TERM");
    assert_eq!(exit_code(&mut other_server, 30), Some(0));
    std::fs::remove_file(db.join("serve.addr")).unwrap();
    let e = keel_as(&db, None, &["escalations"]).one_line_error(1);
    assert!(
        e.contains("is in use by another process") && e.contains("keel serve") && e.contains("--server URL"),
        "{e}"
    );
    drop(held);
}

#[test]
fn sigterm_during_work_exits_0_and_leaves_a_log_that_verifies_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let root = token_add(&db, "root", "admin");
    let (mut child, url) = spawn_serve(db.to_str().unwrap(), &["--metrics-open"]);
    let addr = url.trim_start_matches("http://").to_owned();
    // --metrics-open: /metrics answers without a token (and nothing else does).
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200") && raw.contains("# TYPE keel_runs gauge"), "{raw}");
    assert_eq!(call(&addr, "GET", "/v1/runs", "", None).0, 401);
    let n = 48u64;
    for i in 0..n {
        let req = keel_demo::request(11, i);
        let body = json!({"workflow": req.workflow, "input": req.input, "idempotency_key": req.idempotency_key, "seed": req.seed});
        let (status, r) = call(&addr, "POST", "/v1/runs", &root, Some(&body));
        assert_eq!(status, 201, "{r}");
    }
    // Stop while the workers drive them.
    signal(&child, "-TERM");
    assert_eq!(exit_code(&mut child, 30), Some(0));
    keel(&db, &["verify"]).ok();
    let w = keel(&db, &["work", "--until-idle", "--json"]);
    assert_eq!(w.code, 0, "{}", w.stderr);
    eprintln!("after SIGTERM, keel work --until-idle: {}", w.stdout);
    let runs = keel(&db, &["runs", "--json"]).ok().json();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len() as u64, n);
    for r in runs {
        let s = r["status"].as_str().unwrap();
        assert!(["Completed", "Failed", "Cancelled", "AwaitingHuman"].contains(&s), "{r}");
    }
    keel(&db, &["verify"]).ok();
}

#[test]
fn https_with_a_self_signed_certificate_and_the_cli_trusting_it() {
    let d = DemoDb::new(8);
    let db = d.db.clone();
    let vera = token_add(&db, "vera", "viewer");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = d.path("cert.pem");
    let key = d.path("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let before = keel(&db, &["escalations", "--json"]).ok().stdout.clone();

    let (mut child, url) =
        spawn_serve(db.to_str().unwrap(), &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    // Found through serve.addr, which names the certificate to trust.
    let r = keel_as(&db, Some(&vera), &["escalations", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, before);
    // Named explicitly, with the certificate to trust; without it the server is not trusted.
    let r = keel_in(
        None,
        &["--server", &url, "--token", &vera, "--ca-cert", cert.to_str().unwrap(), "escalations", "--json"],
    );
    assert_eq!(r.stdout, before, "{}", r.stderr);
    let e = keel_in(None, &["--server", &url, "--token", &vera, "escalations", "--json"]).one_line_error(1);
    assert!(e.contains("cannot connect") && e.contains("certificate"), "{e}");
    assert!(e.contains("not signed by a CA this client trusts") && e.contains("--ca-cert"), "{e}");
    // Plain HTTP to the TLS port gets no answer.
    let e = keel_in(None, &["--server", &url.replace("https", "http"), "--token", &vera, "runs"]).one_line_error(1);
    assert!(e.contains(&url.replace("https", "http")), "{e}");
    signal(&child, "-INT");
    assert_eq!(exit_code(&mut child, 30), Some(0));
}

#[test]
fn a_non_loopback_address_is_taken_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let e = keel_in(None, &["--db", db.to_str().unwrap(), "serve", "--listen", "0.0.0.0:0"]).one_line_error(2);
    assert!(e.contains("--tls-cert") && e.contains("--insecure-bind"), "{e}");
    let missing = dir.path().join("none.pem");
    let e = keel_in(
        None,
        &[
            "--db",
            db.to_str().unwrap(),
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            missing.to_str().unwrap(),
            "--tls-key",
            missing.to_str().unwrap(),
        ],
    )
    .one_line_error(1);
    assert!(e.starts_with("error: TLS: ") && e.contains("none.pem"), "{e}");
}

trait Owned {
    fn to_owned_ran(&self) -> Ran;
}
impl Owned for Ran {
    fn to_owned_ran(&self) -> Ran {
        Ran { code: self.code, stdout: self.stdout.clone(), stderr: self.stderr.clone() }
    }
}

/// A certificate a client cannot accept is one line saying what is wrong with it, in
/// words (the review met `invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))`
/// for an `openssl req -x509` certificate, and a misleading "gone or does not answer"
/// through `serve.addr`): a certificate made for another name, and a CA certificate
/// served as the server's.
#[test]
fn a_certificate_the_client_cannot_accept_is_said_in_words() {
    let d = DemoDb::new(1);
    let db = d.db.clone();
    let vera = token_add(&db, "vera", "viewer");
    // 1. Made for another name than the URL's host.
    let other = rcgen::generate_simple_self_signed(vec!["keel.example.org".to_owned()]).unwrap();
    let (cert, key) = (d.path("other.pem"), d.path("other.key"));
    std::fs::write(&cert, other.cert.pem()).unwrap();
    std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
    let (mut child, url) =
        spawn_serve(db.to_str().unwrap(), &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let e = keel_in(None, &["--server", &url, "--token", &vera, "--ca-cert", cert.to_str().unwrap(), "runs"])
        .one_line_error(1);
    assert!(e.contains("the server's certificate is not valid for 127.0.0.1"), "{e}");
    // Through serve.addr: the same reason, not "gone or does not answer".
    let r = keel_as(&db, Some(&vera), &["runs"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("not valid for 127.0.0.1") && !r.stderr.contains("is gone"), "{}", r.stderr);
    signal(&child, "-INT");
    assert_eq!(exit_code(&mut child, 30), Some(0));
    // 2. A CA certificate (basicConstraints CA:TRUE) served as the server's own.
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let (cert, key) = (d.path("ca.pem"), d.path("ca.key"));
    std::fs::write(&cert, ca.pem()).unwrap();
    std::fs::write(&key, ca_key.serialize_pem()).unwrap();
    let (mut child, url) =
        spawn_serve(db.to_str().unwrap(), &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let e = keel_in(None, &["--server", &url, "--token", &vera, "--ca-cert", cert.to_str().unwrap(), "runs"])
        .one_line_error(1);
    assert!(e.contains("is a CA certificate") && !e.contains("OtherError"), "{e}");
    signal(&child, "-INT");
    assert_eq!(exit_code(&mut child, 30), Some(0));
}

/// A resolve or cancel that opens the database itself (no server holds it) while a token
/// is given says so: the token names nobody there, and the line says who is recorded
/// (found by review: on PostgreSQL `KEEL_TOKEN` was silently ignored and the decision
/// recorded as "cli"). Reads say nothing.
#[test]
fn a_token_given_to_a_direct_resolve_is_said_to_be_unused() {
    let d = DemoDb::new(16);
    let db = d.db.clone();
    let waiting: Vec<String> =
        d.runs.iter().filter(|r| r.status == "AwaitingHuman").map(|r| r.run.to_string()).collect();
    assert!(waiting.len() >= 2, "{:?}", d.runs);
    let r = keel_as(
        &db,
        Some("keel_sometoken"),
        &["resolve", &waiting[0], "--decision", "approve", "--reason", "ok", "--by", "ops-ada"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("no keel serve is used") && r.stderr.contains("by \"ops-ada\""), "{}", r.stderr);
    let r = keel_as(&db, Some("keel_sometoken"), &["cancel", &waiting[1], "--reason", "done", "--by", "ops-bob"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("by \"ops-bob\""), "{}", r.stderr);
    let r = keel_as(&db, Some("keel_sometoken"), &["runs"]);
    assert!(!r.stderr.contains("note:"), "{}", r.stderr);
    let r = keel_as(&db, None, &["show", &waiting[1]]);
    assert!(!r.stderr.contains("note:"), "{}", r.stderr);
}

/// With `--drain-seconds`, a stopped server keeps serving for that long with `/readyz`
/// answering 503, so a load balancer polling it sees the drain (found by review: the port
/// closed at once, so `not_ready` could never be observed), then exits 0.
#[test]
fn a_draining_server_answers_not_ready_before_it_closes() {
    let d = DemoDb::new(1);
    let db = d.db.clone();
    let vera = token_add(&db, "vera", "viewer");
    let (mut child, url) = spawn_serve(db.to_str().unwrap(), &["--drain-seconds", "3"]);
    let addr = url.trim_start_matches("http://").to_owned();
    assert_eq!(common::http_call(&addr, "GET", "/readyz", "", None).0, 200);
    signal(&child, "-TERM");
    wait_until("readyz turns 503", || common::http_call(&addr, "GET", "/readyz", "", None).0 == 503);
    let (status, body) = common::http_call(&addr, "GET", "/readyz", "", None);
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("not_ready")));
    // Everything else is still served meanwhile.
    assert_eq!(common::http_call(&addr, "GET", "/v1/runs", &vera, None).0, 200);
    assert_eq!(exit_code(&mut child, 30), Some(0));
    // Without it, the default: closed at once.
    let (mut child, _) = spawn_serve(db.to_str().unwrap(), &[]);
    let t = Instant::now();
    signal(&child, "-TERM");
    assert_eq!(exit_code(&mut child, 30), Some(0));
    eprintln!("stopped in {:?} without --drain-seconds", t.elapsed());
}

/// A port already in use is one line, exit 1, and creates no database (found by review:
/// the directory was made before the bind failed).
#[test]
fn a_port_in_use_creates_no_database() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let listen = format!("127.0.0.1:{port}");
    let e = keel_in(None, &["--db", db.to_str().unwrap(), "serve", "--listen", &listen]).one_line_error(1);
    assert!(e.contains(&format!("listening on {listen}")), "{e}");
    assert!(!db.exists(), "a serve that could not listen created the database");
}
