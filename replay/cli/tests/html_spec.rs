//! The HTML report opened in a real headless Chromium: the DOM has the timeline with task
//! rows and the plan DAG as SVG nodes and edges, and a screenshot renders.
//!
//! Chromium is installed by .ci/run. Without it this test FAILS, unless KEEL_SKIP_BROWSER=1
//! is set (then it says it skipped).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, DemoDb};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh").args(["-c", &format!("command -v {name}")]).output() {
            let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !p.is_empty() {
                return Some(PathBuf::from(p));
            }
        }
    }
    None
}

/// Runs chromium headless with the flags of a sandboxed CI, killing it after 90 s.
fn run_chromium(bin: &Path, profile: &Path, extra: &[String], url: &str) -> String {
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend_from_slice(extra);
    args.push(url.to_owned());
    let out_path = profile.join("stdout.txt");
    let stdout = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(bin).args(&args).stdout(stdout).stderr(Stdio::null()).spawn().expect("start chromium");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium exited with {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::read_to_string(out_path).unwrap()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn html_report_renders_in_headless_chromium() {
    // Check the report is self-contained first (no browser needed for that).
    let db = DemoDb::new(8);
    let run = db.run_of("human_escalation");
    let events = db.events(run);
    let state = keel_engine::fold(&events).unwrap().unwrap();
    let report = db.path("report.html");
    keel(&db.db, &["export", &run.to_string(), "--format", "html", "-o", report.to_str().unwrap()]).ok();
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(!html.contains("<script"), "no scripts");
    assert!(!html.contains("<link"), "no external stylesheets");
    let without_ns = html.replace("http://www.w3.org/2000/svg", "");
    assert!(!without_ns.contains("http://") && !without_ns.contains("https://"), "no network references");
    for id in ["timeline", "dag", "fsm", "budget", "escalations"] {
        assert_eq!(count(&html, &format!("id=\"{id}\"")), 1, "#{id}");
    }

    let Some(bin) = chromium() else {
        if std::env::var("KEEL_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("SKIPPED: chromium not found and KEEL_SKIP_BROWSER=1");
            return;
        }
        panic!("chromium is not installed: install it (apt-get install -y chromium) or set KEEL_SKIP_BROWSER=1 to skip this test");
    };
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", report.display());

    // The DOM as the browser parsed it.
    let dom = run_chromium(&bin, profile.path(), &["--dump-dom".to_owned()], &url);
    let timeline = dom.split("id=\"timeline\"").nth(1).expect("#timeline in the DOM");
    let timeline = timeline.split("id=\"fsm\"").next().unwrap();
    let dispatches = events.iter().filter(|e| e.event.kind_name() == "TaskDispatched").count();
    assert!(count(timeline, "class=\"task-row\"") >= dispatches, "a row per attempt ({dispatches})");
    for t in &state.tasks {
        if t.attempt > 0 {
            assert!(timeline.contains(&format!("data-task=\"{}\"", t.spec.id.0)), "timeline row of {}", t.spec.id);
        }
    }
    let dag = dom.split("id=\"dag\"").nth(1).expect("#dag in the DOM").split("id=\"timeline\"").next().unwrap();
    assert!(dag.contains("<svg"), "#dag holds an SVG");
    assert_eq!(count(dag, "class=\"node\""), state.tasks.len(), "one node per task");
    let deps: usize = state.tasks.iter().map(|t| t.spec.depends_on.len()).sum();
    assert_eq!(count(dag, "class=\"edge\""), deps, "one edge per dependency");
    let fsm = dom.split("id=\"fsm\"").nth(1).expect("#fsm in the DOM");
    assert!(
        fsm.contains("class=\"state visited\" data-state=\"AwaitingHuman\""),
        "the path taken reaches AwaitingHuman"
    );
    assert!(dom.contains("id=\"escalations\"") && dom.contains("CriticalVerdict"));

    // A screenshot renders and is not blank.
    let png = db.path("report.png");
    run_chromium(
        &bin,
        profile.path(),
        &[format!("--screenshot={}", png.display()), "--window-size=1280,2000".to_owned()],
        &url,
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 2000));
    assert!(bytes.len() > 40_000, "a near-empty screenshot ({} bytes)", bytes.len());
    if let Ok(dir) = std::env::var("KEEL_SCREENSHOT_DIR") {
        std::fs::copy(&png, Path::new(&dir).join("keel-report.png")).unwrap();
    }
}
