//! Shared helpers of the keel-replay tests: a demo database made by the real `keel`
//! binary, and a way to run the binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs, dead_code)]

use keel_engine::Logged;
use keel_store::{RunId, SledStore};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// What `keel` printed and how it exited.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr: {}", self.stdout, self.stderr))
    }
    /// Asserts a failure reported as exactly one `error: ` line on stderr.
    pub fn one_line_error(&self, code: i32) -> String {
        assert_eq!(self.code, code, "exit code; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line, got:\n{}", self.stderr);
        assert!(lines[0].starts_with("error: "), "stderr: {}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        lines[0].to_owned()
    }
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "keel failed; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

pub fn keel_in(dir: Option<&Path>, args: &[&str]) -> Ran {
    let mut cmd = Command::new(KEEL);
    cmd.args(args).env_remove("KEEL_DB").env_remove("KEEL_LOG");
    // Commands here read the database itself unless a test names a server.
    cmd.env_remove("KEEL_SERVER").env_remove("KEEL_TOKEN").env_remove("KEEL_CA_CERT");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out: Output = cmd.output().expect("run keel");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `keel --db DB args...`. sled releases a database's lock from background threads a
/// little after its last handle in this test process is dropped: while the binary says the
/// database is in use, it is asked again (for up to 10 s).
pub fn keel(db: &Path, args: &[&str]) -> Ran {
    let mut all = vec!["--db", db.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    let start = std::time::Instant::now();
    loop {
        let ran = keel_in(None, &all);
        if ran.stderr.contains("is in use by another process") && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        return ran;
    }
}

/// `keel --db DB args...` once, without waiting for a lock.
pub fn keel_once(db: &Path, args: &[&str]) -> Ran {
    let mut all = vec!["--db", db.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    keel_in(None, &all)
}

/// A demo run: id and scenario.
#[derive(Clone, Debug)]
pub struct DemoRun {
    pub run: RunId,
    pub scenario: String,
    pub status: String,
}

/// A temp dir with a demo database of `n` runs made by `keel demo`.
pub struct DemoDb {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub runs: Vec<DemoRun>,
    /// Every run's events, read once (a sled db can be open in one place at a time).
    pub events: std::collections::BTreeMap<RunId, Vec<Logged>>,
}

impl DemoDb {
    pub fn new(n: u64) -> DemoDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("keel-data");
        let ran = keel(&db, &["demo", "--runs", &n.to_string(), "--json"]);
        ran.ok();
        let v = ran.json();
        let runs = v["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .map(|r| DemoRun {
                run: r["run"].as_str().unwrap().parse().unwrap(),
                scenario: r["scenario"].as_str().unwrap().to_owned(),
                status: r["status"].as_str().unwrap().to_owned(),
            })
            .collect::<Vec<DemoRun>>();
        let store = open_retrying(&db);
        let events =
            runs.iter().map(|r| (r.run, keel_replay::load_run_from_db(&store, r.run).expect("load run"))).collect();
        drop(store);
        DemoDb { dir, db, runs, events }
    }

    pub fn run_of(&self, scenario: &str) -> RunId {
        self.runs.iter().find(|r| r.scenario == scenario).unwrap_or_else(|| panic!("no {scenario} run")).run
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Opens the database in this process (the binary cannot open it meanwhile). sled
    /// releases its lock from background threads shortly after the last handle is dropped,
    /// so a reopen right after a close retries for a while.
    pub fn open(&self) -> SledStore {
        open_retrying(&self.db)
    }

    /// Every event of `run`.
    pub fn events(&self, run: RunId) -> Vec<Logged> {
        self.events.get(&run).cloned().unwrap_or_else(|| panic!("no run {run}"))
    }
}

/// Opens a database, retrying while sled still holds the lock of a handle just dropped.
pub fn open_retrying(db: &Path) -> SledStore {
    let start = std::time::Instant::now();
    loop {
        match SledStore::open(db, keel_store::StoreConfig { create: false, ..Default::default() }) {
            Err(keel_store::StoreError::Locked { .. }) if start.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.expect("open db"),
        }
    }
}

/// The export lines of a file, as JSON values.
pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Writes JSON values as an export file.
pub fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{}\n", serde_json::to_string(l).unwrap())).collect();
    std::fs::write(path, text).unwrap();
}

/// Starts `keel --db DB serve --listen 127.0.0.1:0 --shutdown-timeout 5 EXTRA…` (with
/// `KEEL_DB` and `KEEL_LOG` unset) and waits for its `keel: serving URL` line: the child
/// (its stderr drained from then on, so it never blocks on a full pipe) and the URL
/// (`http://127.0.0.1:PORT`, or `https://…` with TLS).
pub fn spawn_serve(db: &str, extra: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = Command::new(KEEL)
        .args(["--db", db, "serve", "--listen", "127.0.0.1:0", "--shutdown-timeout", "5"])
        .args(extra)
        .env_remove("KEEL_DB")
        .env_remove("KEEL_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "keel serve ended before serving");
        if let Some(rest) = line.split("keel: serving ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, url)
}

/// [`spawn_serve`] without flags: the child and its `host:port`.
pub fn spawn_serve_plain(db: &str) -> (std::process::Child, String) {
    let (child, url) = spawn_serve(db, &[]);
    let addr = url.strip_prefix("http://").unwrap_or(&url).to_owned();
    (child, addr)
}

/// One HTTP/1.1 request on its own connection (an empty `token`: none sent): (status,
/// JSON body, `null` when it is not JSON).
pub fn http_call(addr: &str, method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Every file under `dir`: bytes and modification time.
pub fn dir_files(dir: &Path) -> std::collections::BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            out.extend(dir_files(&e.path()));
        } else {
            out.insert(e.path(), (std::fs::read(e.path()).unwrap(), m.modified().unwrap()));
        }
    }
    out
}
