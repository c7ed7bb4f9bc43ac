//! The `keel` command line as a user meets it: one-line errors with the documented exit
//! codes, the stable `--json` outputs, the escalation flow, `--db` / `KEEL_DB` defaults.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, keel_in, keel_once, DemoDb, KEEL};
use std::process::Command;

#[test]
fn errors_are_one_line_with_exit_codes() {
    let db = DemoDb::new(8);
    // Unknown run (full id and prefix).
    let e = keel(&db.db, &["show", "00000000-0000-4000-8000-000000000000"]).one_line_error(1);
    assert_eq!(e, "error: unknown run 00000000-0000-4000-8000-000000000000");
    let e = keel(&db.db, &["replay", "zzzz"]).one_line_error(1);
    assert_eq!(e, "error: unknown run zzzz");
    // An ambiguous prefix names how many runs it matches.
    let ids: Vec<String> = db.runs.iter().map(|r| r.run.to_string()).collect();
    if let Some(c) = "0123456789abcdef".chars().find(|c| ids.iter().filter(|i| i.starts_with(*c)).count() > 1) {
        let e = keel(&db.db, &["show", &c.to_string()]).one_line_error(1);
        assert!(e.contains("ambiguous"), "{e}");
    }
    // Missing database: a clear line, and nothing created.
    let missing = db.path("nowhere");
    let e = keel(&missing, &["runs"]).one_line_error(1);
    assert_eq!(
        e,
        format!("error: no keel database at {} (run `keel demo` to create one, or pass --db DIR)", missing.display())
    );
    assert!(!missing.exists());
    // Not a database.
    let notdb = db.path("notdb");
    std::fs::create_dir(&notdb).unwrap();
    std::fs::write(notdb.join("hello.txt"), "hi").unwrap();
    let e = keel(&notdb, &["runs"]).one_line_error(1);
    assert!(e.contains("is not a keel database"), "{e}");
    // Usage errors exit 2, on one line too.
    for args in [
        &["nope"][..],
        &["show"],
        &["runs", "--status", "sleeping"],
        &["resolve", "x", "--decision", "replan"],
        &["export", "--format", "pdf", "x"],
        &["replay"],
    ] {
        let e = keel(&db.db, args).one_line_error(2);
        assert!(e.len() > 10, "{args:?}: {e}");
    }
    // A failed verification of an edited export exits 1.
    let f = db.path("x.jsonl");
    keel(&db.db, &["export", &db.runs[0].run.to_string(), "--format", "jsonl", "-o", f.to_str().unwrap()]).ok();
    let text = std::fs::read_to_string(&f).unwrap().replacen("\"seq\":3,", "\"seq\":30,", 1);
    std::fs::write(&f, text).unwrap();
    let e = keel(&db.db, &["verify", f.to_str().unwrap()]).one_line_error(1);
    assert!(e.contains("seq 3: header altered (its seq was changed to 30"), "{e}");
    // Replaying (or checking, or forking from) an export that does not verify is refused:
    // an altered history would tell a wrong story, or blame the code for a divergence.
    for args in [&["replay", "--from", f.to_str().unwrap()][..], &["replay", "--from", f.to_str().unwrap(), "--check"]]
    {
        let e = keel(&db.db, args).one_line_error(1);
        assert!(e.contains("does not verify, refusing to replay it"), "{args:?}: {e}");
    }
    // A missing export file.
    let e = keel(&db.db, &["verify", db.path("none.jsonl").to_str().unwrap()]).one_line_error(1);
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn a_database_in_use_is_one_clear_line() {
    let db = DemoDb::new(2);
    let held = db.open();
    // A command that can go through `keel serve` names that route (no server holds it here).
    for args in [&["runs"][..], &["verify"], &["show", &db.runs[0].run.to_string()]] {
        let ran = keel_once(&db.db, args);
        let e = ran.one_line_error(1);
        assert_eq!(
            e,
            format!(
                "error: database {} is in use by another process and no keel serve answers for it \
                 (stop that process, or run `keel serve` on the database: commands then go through it, \
                 or name one with --server URL; a token with --token or KEEL_TOKEN)",
                db.db.display()
            ),
            "{args:?}"
        );
    }
    let e = keel_once(&db.db, &["demo"]).one_line_error(1);
    assert_eq!(
        e,
        format!("error: database {} is in use by another process (close it or copy the directory)", db.db.display())
    );
    drop(held);
    keel(&db.db, &["runs"]).ok();
}

#[test]
fn json_outputs_parse_and_keep_their_fields() {
    let db = DemoDb::new(8);
    let runs = keel(&db.db, &["runs", "--json"]).ok().json();
    let list = runs["runs"].as_array().unwrap();
    assert_eq!(list.len(), 8);
    for r in list {
        for k in [
            "run",
            "workflow",
            "status",
            "priority",
            "accepted_at",
            "accepted_at_us",
            "last_event_at",
            "last_event_us",
            "events",
            "cost_micros",
            "tokens",
            "partial",
            "escalations",
        ] {
            assert!(r.get(k).is_some(), "runs: missing {k}");
        }
    }
    let waiting = keel(&db.db, &["runs", "--status", "awaitinghuman", "--json"]).ok().json();
    assert_eq!(waiting["runs"].as_array().unwrap().len(), 1);

    let run = db.run_of("degraded_partial").to_string();
    let show = keel(&db.db, &["show", &run[..8], "--json"]).ok().json();
    for k in [
        "run",
        "workflow",
        "status",
        "partial",
        "events",
        "revision",
        "budget",
        "totals",
        "tasks",
        "escalations",
        "result",
        "failure",
    ] {
        assert!(show.get(k).is_some(), "show: missing {k}");
    }
    assert_eq!(show["run"], run);
    assert_eq!(show["partial"], true);
    let skipped = show["tasks"].as_array().unwrap().iter().find(|t| t["id"] == "enrich_sentiment").unwrap();
    assert_eq!(skipped["status"], "Skipped");

    let esc = keel(&db.db, &["escalations", "--json"]).ok().json();
    let list = esc["escalations"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["run"], db.run_of("human_escalation").to_string());
    assert_eq!(list[0]["cause"], "CriticalVerdict");
    assert!(list[0]["resolve"].as_str().unwrap().starts_with("keel resolve "));

    let stats = keel(&db.db, &["stats", "--json"]).ok().json();
    let wf = &stats["workflows"][0];
    assert_eq!(wf["workflow"], "support_ticket");
    assert_eq!(wf["runs"], 8);
    assert_eq!(wf["by_status"]["Completed"], 7);

    let check = keel(&db.db, &["replay", &run, "--check", "--json"]).ok().json();
    assert_eq!(check["checked"], 1);
    assert_eq!(check["runs"][0]["divergence"], serde_json::Value::Null);

    let verify = keel(&db.db, &["verify", "--json"]).ok().json();
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["runs"].as_array().unwrap().len(), 8);

    let diff = keel(&db.db, &["diff", &run, &run, "--json"]).ok().json();
    assert_eq!(diff["identical"], true);

    let fsm = keel(&db.db, &["fsm", "--format", "mermaid"]).ok().stdout.clone();
    assert!(fsm.starts_with("stateDiagram-v2"));
    let dot = keel(&db.db, &["fsm"]).ok().stdout.clone();
    assert!(dot.starts_with("digraph keel"));
}

#[test]
fn an_escalation_is_resolved_and_the_run_finishes() {
    let db = DemoDb::new(8);
    let run = db.run_of("human_escalation").to_string();
    // Not waiting: a typed one-line error.
    let e = keel(&db.db, &["resolve", &db.run_of("happy_path").to_string(), "--decision", "approve", "--reason", "r"])
        .one_line_error(1);
    assert!(e.contains("is not awaiting a human"), "{e}");
    // A supplied output nested deeper than the JSON limit: one line with the stable code,
    // nothing recorded (before the check a 300-deep text failed serde_json's own limit
    // with its message, and 65 to 127 levels were recorded).
    let before = keel(&db.db, &["show", &run, "--json"]).ok().stdout.clone();
    for depth in [65, 300] {
        let deep = format!("{}0{}", "[".repeat(depth), "]".repeat(depth));
        let e = keel(&db.db, &["resolve", &run, "--output", &deep, "--reason", "r"]).one_line_error(2);
        assert!(e.contains("json_too_deep"), "{e}");
    }
    assert_eq!(keel(&db.db, &["show", &run, "--json"]).ok().stdout, before);
    // A reason is required, and not blank (usage errors, nothing recorded).
    let e = keel(&db.db, &["resolve", &run, "--decision", "approve", "--by", "alice"]).one_line_error(2);
    assert!(e.contains("--reason"), "{e}");
    let e = keel(&db.db, &["resolve", &run, "--decision", "approve", "--reason", "  "]).one_line_error(2);
    assert!(e.contains("--reason"), "{e}");
    assert_eq!(keel(&db.db, &["show", &run, "--json"]).ok().stdout, before);
    let r = keel(
        &db.db,
        &["resolve", &run[..8], "--decision", "approve", "--by", "alice", "--reason", "refund checked", "--json"],
    )
    .ok()
    .json();
    assert_eq!(r["decision"], "approve");
    assert_eq!(r["by"], "alice");
    let w = keel(&db.db, &["work", "--until-idle", "--json"]).ok().json();
    assert!(w["completed"].as_u64().unwrap() >= 1, "{w}");
    let show = keel(&db.db, &["show", &run, "--json"]).ok().json();
    assert_eq!(show["status"], "Completed");
    assert_eq!(show["escalations"][0]["resolution"]["decision"], "approve");
    assert_eq!(show["escalations"][0]["resolution"]["by"], "alice");
    // The reason is recorded on the HumanResolved event (payload version 2).
    let export = keel(&db.db, &["export", &run, "--format", "jsonl"]).ok().stdout.clone();
    let resolved = export.lines().find(|l| l.contains("\"HumanResolved\"")).expect("a HumanResolved record");
    assert!(resolved.contains("\"reason\":\"refund checked\""), "{resolved}");
    assert_eq!(keel(&db.db, &["escalations", "--json"]).ok().json()["escalations"].as_array().unwrap().len(), 0);
    // The resolved run still replays clean under the current code.
    keel(&db.db, &["replay", "--check", "--all"]).ok();
}

#[test]
fn db_defaults_to_keel_data_and_reads_keel_db() {
    let dir = tempfile::tempdir().unwrap();
    let ran = keel_in(Some(dir.path()), &["demo", "--runs", "2"]);
    ran.ok();
    assert!(ran.stderr.is_empty(), "no progress bar on a pipe: {:?}", ran.stderr);
    assert!(dir.path().join("keel-data").is_dir());
    keel_in(Some(dir.path()), &["runs"]).ok();
    let out =
        Command::new(KEEL).args(["runs", "--json"]).env("KEEL_DB", dir.path().join("keel-data")).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    // A second demo batch with the same seed adds no runs (idempotency keys).
    let again = keel_in(Some(dir.path()), &["demo", "--runs", "2", "--json"]);
    assert!(again.ok().json()["runs"].as_array().unwrap().iter().all(|r| r["existing"] == true));
}

#[test]
fn submit_records_a_request_returns_its_run_again_and_refuses_another_request_under_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let db = db.as_path();
    let input = serde_json::to_string(&keel_demo::request(3, 0).input).unwrap();
    let first = keel(db, &["submit", "support_ticket", "--input", &input, "--key", "t-1", "--json"]).ok().json();
    assert_eq!(first["duplicate"], false);
    let again = keel(db, &["submit", "support_ticket", "--input", &input, "--key", "t-1", "--json"]).ok().json();
    assert_eq!((&again["run"], &again["duplicate"]), (&first["run"], &serde_json::json!(true)));
    // Another priority under the same key: one line, exit 1, nothing recorded.
    let e =
        keel(db, &["submit", "support_ticket", "--input", &input, "--key", "t-1", "--priority", "5"]).one_line_error(1);
    assert!(e.starts_with("error: idempotency conflict: "), "{e}");
    assert!(e.contains(first["run"].as_str().unwrap()), "{e}");
    let runs = keel(db, &["runs", "--json"]).ok().json();
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(1), "{runs}");
    // Through a keel serve holding the database: the same line (the review found the
    // `idempotency conflict: ` prefix missing there).
    let root = keel(db, &["token", "add", "root", "--role", "admin"]).ok().stdout.trim().to_owned();
    let (mut server, _) = common::spawn_serve_plain(db.to_str().unwrap());
    let e =
        keel(db, &["--token", &root, "submit", "support_ticket", "--input", &input, "--key", "t-1", "--priority", "5"])
            .one_line_error(1);
    assert!(e.starts_with("error: idempotency conflict: "), "{e}");
    assert!(e.contains(first["run"].as_str().unwrap()), "{e}");
    let _ = server.kill();
    let _ = server.wait();
    // Bad input JSON is a usage error.
    keel(db, &["submit", "support_ticket", "--input", "{not json"]).one_line_error(2);
    // An input nested deeper than the JSON limit: one line with the stable code, exit 2,
    // nothing recorded (it is scanned before it is parsed).
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    let e = keel(db, &["submit", "support_ticket", "--input", &deep]).one_line_error(2);
    assert!(e.contains("json_too_deep"), "{e}");
    let runs = keel(db, &["runs", "--json"]).ok().json();
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(1), "{runs}");
}

/// `keel runs --limit N` pages through the run index: the pages, followed by their
/// cursors, are the whole listing in order; `--workflow` filters; bad flags are usage
/// errors (exit 2).
#[test]
fn runs_are_listed_a_page_at_a_time_by_cursor() {
    let d = DemoDb::new(8);
    let all = keel(&d.db, &["runs", "--json"]).ok().json();
    assert!(all["next_cursor"].is_null(), "{all}");
    let all: Vec<String> =
        all["runs"].as_array().unwrap().iter().map(|r| r["run"].as_str().unwrap().to_owned()).collect();
    assert_eq!(all.len(), 8);
    let (mut paged, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let mut args = vec!["runs", "--limit", "3", "--json"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let page = keel(&d.db, &args).ok().json();
        let runs = page["runs"].as_array().unwrap();
        assert!(runs.len() <= 3, "{page}");
        paged.extend(runs.iter().map(|r| r["run"].as_str().unwrap().to_owned()));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(Some(next), paged.last().map(String::as_str), "the cursor is the page's last run");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!((paged, pages), (all.clone(), 3));
    // The text says how to get the next page, with the database it read: that command, run
    // from another directory, lists the next page.
    let text = keel(&d.db, &["runs", "--limit", "3"]).ok().stdout.clone();
    let more = text.lines().find_map(|l| l.strip_prefix("more runs follow: keel ")).unwrap_or_else(|| panic!("{text}"));
    assert!(more.ends_with(&format!("runs --limit 3 --cursor {}", all[2])), "{more}");
    let elsewhere = tempfile::tempdir().unwrap();
    let next = keel_in(Some(elsewhere.path()), &more.split(' ').collect::<Vec<_>>()).ok().stdout.clone();
    let listed: Vec<&str> =
        next.lines().skip(1).filter_map(|l| l.split_whitespace().next()).filter(|w| w.len() == 36).collect();
    assert_eq!(listed, all[3..6].iter().map(String::as_str).collect::<Vec<_>>(), "{next}");
    // A relative --db: the command names the directory as an absolute path, so it runs
    // from anywhere.
    let (parent, name) = (d.db.parent().unwrap(), d.db.file_name().unwrap().to_str().unwrap());
    let text = keel_in(Some(parent), &["--db", name, "runs", "--limit", "3"]).ok().stdout.clone();
    let more = text.lines().find_map(|l| l.strip_prefix("more runs follow: keel ")).unwrap_or_else(|| panic!("{text}"));
    assert!(more.starts_with(&format!("--db {} ", std::path::absolute(&d.db).unwrap().display())), "{more}");
    let next = keel_in(Some(elsewhere.path()), &more.split(' ').collect::<Vec<_>>()).ok().stdout.clone();
    let listed: Vec<&str> =
        next.lines().skip(1).filter_map(|l| l.split_whitespace().next()).filter(|w| w.len() == 36).collect();
    assert_eq!(listed, all[3..6].iter().map(String::as_str).collect::<Vec<_>>(), "{next}");
    assert!(!keel(&d.db, &["runs", "--limit", "8"]).ok().stdout.contains("more runs follow"));
    // By workflow: every demo run is a support ticket.
    let mine = keel(&d.db, &["runs", "--workflow", "support_ticket", "--json"]).ok().json();
    assert_eq!(mine["runs"].as_array().unwrap().len(), 8);
    let none = keel(&d.db, &["runs", "--workflow", "refunds", "--json"]).ok().json();
    assert_eq!(none["runs"].as_array().unwrap().len(), 0);
    for bad in [&["runs", "--limit", "0"][..], &["runs", "--limit", "1001"], &["runs", "--cursor", "nope"]] {
        let e = keel(&d.db, bad).one_line_error(2);
        assert!(e.contains("--limit") || e.contains("--cursor"), "{bad:?}: {e}");
    }
}

#[test]
fn a_size_warning_is_recorded_and_shown_by_runs_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keel-data");
    keel(&db, &["demo", "--runs", "2", "--warn-events", "8", "--json"]).ok();
    let runs = keel(&db, &["runs", "--json"]).ok().json();
    let runs = runs["runs"].as_array().unwrap();
    let warned: Vec<&serde_json::Value> = runs.iter().filter(|r| !r["size_warning"].is_null()).collect();
    assert!(!warned.is_empty(), "{runs:?}");
    for r in &warned {
        let w = &r["size_warning"];
        assert_eq!(w["events_max"], 8, "{w}");
        assert_eq!(w["bytes_max"], keel_engine::SIZE_WARNING_BYTES_DEFAULT, "{w}");
        assert_eq!(w["events_crossed"], true, "{w}");
        assert_eq!(w["bytes_crossed"], false, "{w}");
        assert!(w["events"].as_u64().unwrap() >= 8 && w["bytes"].as_u64().unwrap() > 0, "{w}");
    }
    // Recorded once: the export holds exactly one RunSizeWarning for the run.
    let run = warned[0]["run"].as_str().unwrap();
    let export = keel(&db, &["export", run, "--format", "jsonl"]).ok().stdout.clone();
    assert_eq!(export.lines().filter(|l| l.contains("\"RunSizeWarning\"")).count(), 1, "{export}");
    // The text listing marks it; show prints it; the determinism check accepts it.
    let text = keel(&db, &["runs"]).ok().stdout.clone();
    let line = text.lines().find(|l| l.starts_with(run)).unwrap();
    assert!(line.contains("!size"), "{line}");
    let show = keel(&db, &["show", run]).ok().stdout.clone();
    assert!(show.contains("size warning: "), "{show}");
    assert_eq!(keel(&db, &["show", run, "--json"]).ok().json()["size_warning"], warned[0]["size_warning"]);
    keel(&db, &["replay", "--all", "--check"]).ok();
    // A threshold that is not a number is a usage error on one line.
    let e = keel(&db, &["work", "--until-idle", "--warn-events", "many"]).one_line_error(2);
    assert!(e.contains("--warn-events"), "{e}");
}

/// A PostgreSQL URL that cannot be reached is one line that says so (not "is not a keel
/// database"), exit 1, with no password shown; a misspelled scheme is refused, not made a
/// directory.
#[test]
fn an_unreachable_or_misspelled_database_url_is_one_clear_line() {
    let url = "postgres://app:s3cret@127.0.0.1:1/test?password=pw2&schema=k";
    let e = keel_in(None, &["--db", url, "runs"]).one_line_error(1);
    assert!(e.contains("cannot open the database at postgres://app:***@127.0.0.1:1/test?password=***"), "{e}");
    assert!(!e.contains("not a keel database") && !e.contains("s3cret") && !e.contains("pw2"), "{e}");
    // Not reached is said so, not "connection lost" (a new user's wrong port).
    assert!(e.contains("cannot connect to postgres") && !e.contains("lost"), "{e}");
    // A URL that cannot be used is a usage error (exit 2) that names what is wrong in it,
    // and creates nothing.
    let dir = tempfile::tempdir().unwrap();
    for (url, says) in [
        ("postgress://u@127.0.0.1/test", "`postgress://` is not a scheme keel knows"),
        ("postgres://u@127.0.0.1:notaport/test", "invalid value for option `port`"),
        ("postgres://u@127.0.0.1/test?sslmode=bogus", "invalid value for option `sslmode`"),
        ("postgres://u@127.0.0.1/test?schema=Bad-Name", "schema \"Bad-Name\" is not a lower-case identifier"),
        ("postgres://u@127.0.0.1/test?schema=a&schema=b", "`schema` given twice"),
        ("postgres://u@127.0.0.1/test?schema=pg_x", "keeps for its own schemas"),
        ("postgres://u@127.0.0.1/test?schema=user", "is a reserved word"),
        ("postgres:///test", "no host in the URL"),
        // keel's own sizes and bounds, checked before connecting.
        ("postgres://u@127.0.0.1/test?io_threads=0", "io_threads 0 not in 1..=64"),
        ("postgres://u@127.0.0.1/test?pool_size=65", "pool_size 65 not in 1..=64"),
        ("postgres://u@127.0.0.1/test?call_timeout_ms=0", "call_timeout_ms 0 not in 1..=3600000"),
        ("postgres://u@127.0.0.1/test?io_threads=many", "`io_threads` must be a whole number, not \"many\""),
        ("host=127.0.0.1 dbname=test password=pw3", "a key=value connection string"),
    ] {
        let e = keel_in(Some(dir.path()), &["--db", url, "demo"]).one_line_error(2);
        assert!(e.contains("is not a usable database URL: ") && e.contains(says), "{url}: {e}");
        assert!(!e.contains("pw3"), "the password is shown: {e}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "something was created");
    // A copy from nowhere says which flag named it, and creates nothing.
    let missing = dir.path().join("missing");
    let to = dir.path().join("to");
    let e = keel_in(Some(dir.path()), &["copy", "--from", missing.to_str().unwrap(), "--to", to.to_str().unwrap()])
        .one_line_error(1);
    assert!(e.contains("(--from names the database to copy from)"), "{e}");
    assert!(!to.exists() && !missing.exists(), "something was created");
    // An out-of-range lease is a usage error too.
    for cmd in ["work", "serve"] {
        let e = keel_in(Some(dir.path()), &[cmd, "--lease-ttl-ms", "0"]).one_line_error(2);
        assert!(e.contains("--lease-ttl-ms") && e.contains("30..=86400000"), "{cmd}: {e}");
    }
}

/// A server that answers 200 with something that is not keel's answer (a proxy's page, an
/// empty object) fails `verify` and `submit` through it with one line: a verification that
/// checked nothing is not a pass (the new-user review: `keel --server URL verify` against
/// `{}` printed nothing and exited 0).
#[test]
fn a_server_answer_that_is_not_keel_s_fails_verify_and_submit() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 8192];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            );
        }
    });
    let url = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let e = keel_in(Some(dir.path()), &["--server", &url, "--token", "t", "verify"]).one_line_error(1);
    assert!(e.contains("is not a verification"), "{e}");
    let input = serde_json::to_string(&keel_demo::request(3, 0).input).unwrap();
    let e =
        keel_in(Some(dir.path()), &["--server", &url, "--token", "t", "submit", "support_ticket", "--input", &input])
            .one_line_error(1);
    assert!(e.contains("names no run id"), "{e}");
    // Listings and a run's state are not printed empty from such an answer either (the
    // second review: `runs`, `escalations` and `stats` printed "0 run(s)" and exited 0).
    for (args, says) in [
        (&["runs"][..], "no `runs` list"),
        (&["runs", "--json"][..], "no `runs` list"),
        (&["escalations"][..], "no `escalations` list"),
        (&["stats", "--json"][..], "no `workflows` list"),
        (&["show", "00000000-0000-4000-8000-000000000001", "--json"][..], "is not the run's state"),
    ] {
        let mut all = vec!["--server", url.as_str(), "--token", "t"];
        all.extend_from_slice(args);
        let e = keel_in(Some(dir.path()), &all).one_line_error(1);
        assert!(e.contains(says) && e.contains("is this a keel serve?"), "{args:?}: {e}");
    }
}

/// Log lines on a stderr that is not a terminal (a file, a pipe, a journal) are plain
/// text: no ANSI colour codes (the new-user review found them in a server's log file).
#[test]
fn logs_to_a_file_or_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::KEEL)
        .args(["--db", dir.path().join("db").to_str().unwrap(), "demo", "--runs", "1"])
        .env("KEEL_LOG", "info")
        .env_remove("KEEL_DB")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(" INFO "), "no log line: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in: {stderr}");
}

/// `keel token list` shows names and roles (never a token or its hash); `keel token
/// remove NAME` revokes a token: a running server refuses it (401) from the next request.
#[test]
fn a_token_is_listed_and_removed_and_then_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let db_s = db.to_str().unwrap();
    let add = |name: &str, role: &str| {
        let r = keel(&db, &["token", "add", name, "--role", role]);
        r.stdout.trim().to_owned()
    };
    // A name that cannot be stored is a usage error (exit 2; it was 1), and makes nothing.
    let e = keel_in(None, &["--db", db_s, "token", "add", "a b", "--role", "viewer"]).one_line_error(2);
    assert!(e.contains("invalid token name"), "{e}");
    assert!(!db.exists(), "a refused token add created the database");
    let (alice, bob) = (add("alice", "admin"), add("bob", "viewer"));
    let listed = keel(&db, &["token", "list", "--json"]).ok().json();
    assert_eq!(
        listed,
        serde_json::json!({"tokens": [{"name": "alice", "role": "admin"}, {"name": "bob", "role": "viewer"}]})
    );
    let text = keel(&db, &["token", "list"]).ok().stdout.clone();
    assert!(!text.contains(&bob) && !text.contains(&alice) && text.contains("2 token(s)"), "{text}");
    let (mut server, addr) = common::spawn_serve_plain(db_s);
    assert_eq!(common::http_call(&addr, "GET", "/v1/runs", &bob, None).0, 200);
    let removed = keel_in(None, &["--db", db_s, "token", "remove", "bob"]);
    assert!(removed.ok().stdout.contains("removed token \"bob\""), "{}", removed.stdout);
    assert_eq!(common::http_call(&addr, "GET", "/v1/runs", &bob, None).0, 401, "a removed token is refused");
    assert_eq!(common::http_call(&addr, "GET", "/v1/runs", &alice, None).0, 200, "the others stay");
    let _ = server.kill();
    let _ = server.wait();
    let again = keel_in(None, &["--db", db_s, "token", "remove", "bob"]).one_line_error(1);
    assert!(again.contains("no token named \"bob\""), "{again}");
    let listed = keel(&db, &["token", "list", "--json"]).ok().json();
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 1);
}

/// A reason is the caller's text: in the server's log it is one quoted field, escaped, so
/// a reason holding a newline and a made-up log line cannot forge a line (found by
/// review). The event log keeps the reason as given.
#[test]
fn a_reason_cannot_forge_a_line_in_the_server_log() {
    use std::io::BufRead;
    let demo = common::DemoDb::new(8);
    let db = demo.db.to_str().unwrap().to_owned();
    let waiting: Vec<String> =
        demo.runs.iter().filter(|r| r.status == "AwaitingHuman").map(|r| r.run.to_string()).collect();
    assert!(!waiting.is_empty(), "the demo left no run waiting");
    let root = keel(&demo.db, &["token", "add", "root", "--role", "admin"]).ok().stdout.trim().to_owned();
    let mut child = std::process::Command::new(common::KEEL)
        .args(["--db", &db, "serve", "--listen", "127.0.0.1:0", "--shutdown-timeout", "5"])
        .env_remove("KEEL_DB")
        .env("KEEL_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("keel serve did not start");
        lines.push(line.clone());
        if let Some(rest) = line.split("keel: serving ").nth(1) {
            break rest.split_whitespace().next().unwrap().trim_start_matches("http://").to_owned();
        }
    };
    let forged = "\n2026-01-01T00:00:00.000000Z  INFO keel_server::actions: FORGED by=mallory";
    let body = serde_json::json!({"decision": "approve", "reason": format!("fine{forged}")});
    let (status, answer) =
        common::http_call(&addr, "POST", &format!("/v1/runs/{}/resolve", waiting[0]), &root, Some(&body));
    assert_eq!(status, 200, "{answer}");
    let body = serde_json::json!({"reason": format!("stop{forged}")});
    let (status, answer) =
        common::http_call(&addr, "POST", &format!("/v1/runs/{}/cancel", waiting[0]), &root, Some(&body));
    assert!(status == 200 || status == 409, "{status} {answer}");
    terminate(&child);
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(5)) {
        lines.push(line);
    }
    let logged =
        lines.iter().find(|l| l.contains("resolution recorded through the API")).expect("no resolution logged");
    assert!(logged.contains("FORGED"), "the reason is not in the log line: {logged}");
    for l in &lines {
        assert!(!l.trim_start().starts_with("2026-01-01T00:00:00.000000Z"), "a forged log line: {l}\n{lines:#?}");
    }
    // The event log has the reason as given.
    let shown = keel(&demo.db, &["export", &waiting[0], "--format", "jsonl"]).ok().stdout.clone();
    assert!(shown.contains("fine\\n2026-01-01"), "{shown}");
}

/// SIGTERM to a child (the server's graceful stop).
fn terminate(child: &std::process::Child) {
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
}
