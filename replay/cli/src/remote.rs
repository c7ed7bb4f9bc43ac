//! Commands through a running `keel serve`: while the server holds the sled database,
//! `keel runs`, `show`, `escalations`, `resolve`, `cancel`, `export`, `stats` and `verify`
//! ask its API (docs/SERVER.md) and print what they print when they read the database.
//!
//! The route: `--server URL` names a server; otherwise, when the database is held by
//! another process and `DIR/serve.addr` (written by `keel serve` while it runs) names a
//! server that answers `/healthz`, that one. The token comes from `--token` or
//! `KEEL_TOKEN`. HTTP itself is keel-server's ([`keel_server::client`]).

use crate::error::{io_err, CliError, CmdResult};
use crate::output::{errln, out, outln, print_json};
use clap::Args;
use keel_replay::error::ReplayError;
use keel_replay::source::resolve_run_in;
use keel_server::client::{Answer, Client};
use keel_store::RunId;
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The file in the database directory where a running `keel serve` records its address.
pub(crate) const SERVER_FILE: &str = "serve.addr";

/// Largest `serve.addr` read, in bytes.
const SERVER_FILE_BYTES_MAX: u64 = 4096;

/// How long a server named by `serve.addr` has to answer `/healthz` before it is taken as
/// gone (a stale file of a killed server).
const PROBE: Duration = Duration::from_secs(2);

/// Most pages of runs read to list them (1000 runs a page).
const RUN_PAGES_MAX: usize = 100_000;

/// How to reach a running server (global options).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ConnArgs {
    /// A running `keel serve` to go through (http://HOST:PORT or https://HOST:PORT);
    /// default: the one that holds --db, if any (it records its address in DIR/serve.addr).
    #[arg(long, global = true, env = "KEEL_SERVER", value_name = "URL")]
    pub(crate) server: Option<String>,
    /// The bearer token for the server (`keel token add`).
    #[arg(long, global = true, env = "KEEL_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub(crate) token: Option<String>,
    /// A PEM file of the certificate(s) to trust for an https server (its CA, or a
    /// self-signed certificate itself); default: the one `keel serve --tls-cert` recorded.
    #[arg(long, global = true, env = "KEEL_CA_CERT", value_name = "FILE")]
    pub(crate) ca_cert: Option<PathBuf>,
}

/// A server the command goes through.
pub(crate) struct Remote {
    client: Client,
    /// Named by `--server` (not found through the database's `serve.addr`): what the
    /// command reads is that server's database, whatever `--db` says.
    named: bool,
}

/// What `keel serve` records in `DIR/serve.addr`.
pub(crate) fn server_file_json(url: &str, ca_cert: Option<&Path>) -> Value {
    json!({
        "url": url,
        "pid": std::process::id(),
        "ca_cert": ca_cert.map(|p| p.display().to_string()),
    })
}

/// Records the server's address (written to a temporary file and renamed).
pub(crate) fn write_server_file(db: &Path, doc: &Value) -> Result<(), CliError> {
    let path = db.join(SERVER_FILE);
    let tmp = db.join(format!("{SERVER_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{doc}\n")).map_err(|e| io_err(&tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path.display().to_string(), e))
}

/// Removes `DIR/serve.addr` if it is still this process's.
pub(crate) fn remove_server_file(db: &Path) {
    let path = db.join(SERVER_FILE);
    if read_server_file(db).and_then(|v| v.get("pid").and_then(Value::as_u64)) == Some(u64::from(std::process::id())) {
        let _ = std::fs::remove_file(path);
    }
}

fn read_server_file(db: &Path) -> Option<Value> {
    use std::io::Read;
    let f = std::fs::File::open(db.join(SERVER_FILE)).ok()?;
    let mut text = String::new();
    f.take(SERVER_FILE_BYTES_MAX).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Where the command goes: `Some` server, or `None` for the database itself.
///
/// `--server` always goes there. Otherwise the database's lock is looked at (nothing is
/// opened or written): a database no process has open is not held by a server (a
/// `serve.addr` left by a killed server is ignored). A held one goes through the server
/// `serve.addr` names if it answers; if none answers, the error says what the route would
/// have been.
pub(crate) async fn route(db: &Path, conn: &ConnArgs) -> Result<Option<Remote>, CliError> {
    if let Some(url) = &conn.server {
        let client = Client::new(url, conn.token.clone(), conn.ca_cert.as_deref())
            .map_err(|e| CliError::Usage(format!("--server: {e}")))?;
        if client.sends_token_in_clear() {
            crate::output::errln!(
                "keel: warning: the token goes in clear text to {} (plain http:// to another machine: \
                 anyone on the way can read and reuse it); serve with --tls-cert and use https://",
                client.url()
            );
        }
        return Ok(Some(Remote { client, named: true }));
    }
    // Without an address file there is no server to find: the command opens the database
    // itself (and, if another process holds it, says that a server would be the route).
    if !db.join(SERVER_FILE).exists() {
        return Ok(None);
    }
    // Who holds the database, found without opening it (a writable open here wrote into
    // it: an evidence copy while the server holds it, a rewritten manifest after a server
    // was killed) and without excluding other readers.
    match keel_store::SledStore::held_by_a_writer(db) {
        Ok(false) => Ok(None),
        Ok(true) => {
            let file = read_server_file(db);
            let url = file.as_ref().and_then(|v| v.get("url")).and_then(Value::as_str);
            let Some(url) = url else { return Err(locked(db, None)) };
            let recorded_ca = file.as_ref().and_then(|v| v.get("ca_cert")).and_then(Value::as_str).map(PathBuf::from);
            let ca = conn.ca_cert.clone().or(recorded_ca);
            let client =
                Client::new(url, conn.token.clone(), ca.as_deref()).map_err(|e| locked_at(db, url, &e.to_string()))?;
            // The recorded process must still exist (a server that answers on a port a
            // dead one left behind serves another database), and answer.
            let pid = file.as_ref().and_then(|v| v.get("pid")).and_then(Value::as_u64);
            let alive = pid.and_then(|p| u32::try_from(p).ok()).is_some_and(crate::sys::process_exists);
            if !alive {
                return Err(locked(db, Some(url)));
            }
            match client.probe(PROBE).await {
                Ok(()) => Ok(Some(Remote { client, named: false })),
                Err(e) => Err(locked_at(db, url, &e.to_string())),
            }
        }
        // Not found, not a database, ...: the command reports it as it always has.
        Err(_) => Ok(None),
    }
}

/// The "in use" error when the server `serve.addr` names runs but cannot be used: why.
fn locked_at(db: &Path, url: &str, why: &str) -> CliError {
    let d = db.display();
    CliError::Failed(format!(
        "database {d} is in use by the keel serve that {d}/{SERVER_FILE} names ({url}), which cannot be \
         reached: {why} (or name a server with --server URL)"
    ))
}

/// The "in use" error, naming the route through a server.
pub(crate) fn locked(db: &Path, stale: Option<&str>) -> CliError {
    let d = db.display();
    CliError::Failed(match stale {
        None => format!(
            "database {d} is in use by another process and no keel serve answers for it \
             (stop that process, or run `keel serve` on the database: commands then go through it, \
             or name one with --server URL; a token with --token or KEEL_TOKEN)"
        ),
        Some(url) => format!(
            "database {d} is in use by another process and the keel serve that {d}/{SERVER_FILE} names \
             ({url}) is gone or does not answer (stop that process, or name a running server with --server URL)"
        ),
    })
}

impl Remote {
    /// What the command read, for its report: the database directory when the server was
    /// found through it, the server's URL when `--server` named it (`--db` may then be
    /// the default directory, unrelated to the server's database).
    fn source(&self, db: &Path) -> String {
        if self.named {
            self.client.url().to_owned()
        } else {
            db.display().to_string()
        }
    }

    /// GET, with an error answer turned into one line.
    async fn get(&self, path: &str) -> Result<Answer, CliError> {
        let a = self.client.get(path).await.map_err(|e| CliError::Failed(e.to_string()))?;
        self.ok(a)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Answer, CliError> {
        let a = self.client.post_json(path, body).await.map_err(|e| CliError::Failed(e.to_string()))?;
        self.ok(a)
    }

    async fn get_json(&self, path: &str) -> Result<Value, CliError> {
        let a = self.get(path).await?;
        a.json().map_err(|e| CliError::Failed(format!("{}{path}: the answer is not JSON: {e}", self.client.url())))
    }

    /// A 2xx answer, or the server's error as one line: 401/403 name the token's problem,
    /// anything else the server's message (as the command says it locally).
    fn ok(&self, a: Answer) -> Result<Answer, CliError> {
        if (200..300).contains(&a.status) {
            return Ok(a);
        }
        let url = self.client.url();
        let (code, message) = a.error().unwrap_or_else(|| {
            (format!("http_{}", a.status), String::from_utf8_lossy(&a.body).chars().take(200).collect())
        });
        Err(CliError::Failed(match a.status {
            401 => {
                format!("{url} refused the request (401 {code}): {message}; give a token with --token or KEEL_TOKEN")
            }
            403 => format!("{url} refused the request (403 {code}): {message}"),
            _ => message,
        }))
    }

    /// `v`'s list `key`, which keel's answer to `path` always has: an answer without it
    /// (a proxy's page, `{}`) is not a keel server's, and is not printed as an empty list.
    fn list(&self, v: &Value, path: &str, key: &str) -> Result<Vec<Value>, CliError> {
        match v.get(key).and_then(Value::as_array) {
            Some(list) => Ok(list.clone()),
            None => Err(CliError::Failed(format!(
                "{}{path}: the answer has no `{key}` list (is this a keel serve?)",
                self.client.url()
            ))),
        }
    }

    /// Runs (optionally of one status and workflow) after `cursor`, page by page: `limit`
    /// of them and the cursor of the next page, or every one.
    async fn runs_after(
        &self,
        status: Option<&str>,
        workflow: Option<&str>,
        limit: Option<u16>,
        mut cursor: Option<String>,
    ) -> Result<(Vec<Value>, Option<String>), CliError> {
        let mut out = Vec::new();
        for _ in 0..RUN_PAGES_MAX {
            let mut q = format!("/v1/runs?limit={}", limit.unwrap_or(crate::cmd::runs::LIMIT_MAX));
            if let Some(s) = status {
                q.push_str(&format!("&status={s}"));
            }
            if let Some(w) = workflow {
                q.push_str(&format!("&workflow={}", percent_encoding::utf8_percent_encode(w, QUERY_VALUE)));
            }
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let page = self.get_json(&q).await?;
            out.extend(self.list(&page, &q, "runs")?);
            let next = page.get("next_cursor").and_then(Value::as_str).map(str::to_owned);
            match next {
                Some(next) if limit.is_some() => return Ok((out, Some(next))),
                Some(next) if cursor.as_deref() != Some(next.as_str()) => cursor = Some(next),
                _ => return Ok((out, None)),
            }
        }
        Err(CliError::Failed(format!(
            "{}: more than {RUN_PAGES_MAX} pages of runs; narrow the listing with --status",
            self.client.url()
        )))
    }

    /// A run id or a unique prefix of one, as the CLI takes them.
    async fn run_id(&self, given: &str) -> Result<RunId, CliError> {
        if let Ok(id) = given.parse::<RunId>() {
            return Ok(id);
        }
        // Only the runs in the range the prefix begins: listed in run id order from just
        // below its lowest id, page by page until past its highest (O(matches), not every
        // run of the database).
        let Some((lo, hi)) = keel_replay::source::prefix_range(given) else {
            return Err(ReplayError::UnknownRun(given.to_owned()).into());
        };
        let mut cursor = lo.0.as_u128().checked_sub(1).map(|below| RunId(uuid::Uuid::from_u128(below)).to_string());
        let mut ids: Vec<RunId> = Vec::new();
        for _ in 0..RUN_PAGES_MAX {
            let (page, next) = self.runs_after(None, None, Some(crate::cmd::runs::LIMIT_MAX), cursor).await?;
            let listed: Vec<RunId> =
                page.iter().filter_map(|r| r.get("run").and_then(Value::as_str).and_then(|s| s.parse().ok())).collect();
            let past = listed.last().is_none_or(|last| *last > hi);
            ids.extend(listed.into_iter().filter(|r| (lo..=hi).contains(r)));
            match next {
                Some(n) if !past => cursor = Some(n),
                _ => break,
            }
        }
        Ok(resolve_run_in(&ids, given)?)
    }
}

/// `keel runs`.
pub(crate) async fn runs(r: &Remote, db: &Path, a: crate::cmd::runs::RunsArgs) -> CmdResult {
    let status = crate::cmd::runs::parse_status(a.status.as_deref())?;
    let cursor = a.cursor_id()?.map(|c| c.to_string());
    let (runs, next) = r.runs_after(status.map(|s| s.name()), a.workflow.as_deref(), a.limit, cursor).await?;
    // The next page's command names where this one read: the server given, or the database
    // (whose serve.addr found the server).
    let source = if r.named { format!("--server {}", r.client.url()) } else { crate::cmd::runs::db_flag(db) };
    crate::cmd::runs::print(&runs, next, &a, &source)
}

/// What a query value must not hold as it is: everything but unreserved characters.
const QUERY_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// `keel show`: `--json` is the server's state object; the text is folded here from the
/// run's (verified) JSONL export, as `keel replay --from` does.
pub(crate) async fn show(r: &Remote, a: crate::cmd::show::ShowArgs) -> CmdResult {
    let run = r.run_id(&a.run).await?;
    if a.json {
        let path = format!("/v1/runs/{run}");
        let state = r.get_json(&path).await?;
        if state.get("run").and_then(Value::as_str) != Some(run.to_string().as_str()) {
            return Err(CliError::Failed(format!(
                "{}{path}: the answer is not the run's state (no `run` naming it; is this a keel serve?)",
                r.client.url()
            )));
        }
        print_json(&state)?;
        return Ok(ExitCode::SUCCESS);
    }
    let export = r.get(&format!("/v1/runs/{run}/export?format=jsonl")).await?;
    let mut f = tempfile::NamedTempFile::new().map_err(|e| io_err("a temporary file", e))?;
    std::io::Write::write_all(&mut f, &export.body).map_err(|e| io_err("a temporary file", e))?;
    let loaded = crate::source::load_from_file(f.path(), Some(&run.to_string()))?;
    let replay = keel_replay::Replay::new(loaded.events)?;
    let state = replay.state_at(replay.last_seq())?;
    out!("{}", keel_replay::views::state_text(&state))?;
    Ok(ExitCode::SUCCESS)
}

/// `keel escalations`.
pub(crate) async fn escalations(r: &Remote, a: crate::cmd::JsonArgs) -> CmdResult {
    let v = r.get_json("/v1/escalations").await?;
    let pending = r.list(&v, "/v1/escalations", "escalations")?;
    crate::cmd::escalations::print(&pending, a.json)
}

/// `keel stats`.
pub(crate) async fn stats(r: &Remote, a: crate::cmd::JsonArgs) -> CmdResult {
    let v = r.get_json("/v1/stats").await?;
    let stats = r.list(&v, "/v1/stats", "workflows")?;
    crate::cmd::stats::print(&stats, a.json)
}

/// `keel resolve`: recorded with the token's name as `by` (a `--by` is refused).
pub(crate) async fn resolve(r: &Remote, a: crate::cmd::resolve::ResolveArgs) -> CmdResult {
    use crate::cmd::resolve::DecisionArg;
    if a.by.is_some() {
        return Err(CliError::Usage(
            "--by is not taken through keel serve: the token's name is recorded as who decided".into(),
        ));
    }
    let reason = a.reason.trim();
    if reason.is_empty() {
        return Err(CliError::Usage("--reason must not be empty (say why: it is recorded)".into()));
    }
    // The flags are checked as they are locally (same messages), then sent as given.
    crate::cmd::resolve::decision(a.decision, a.output.as_deref(), a.hint.as_deref())?;
    let decision = match a.decision {
        None => "supply",
        Some(DecisionArg::Approve) if a.output.is_some() => "supply",
        Some(DecisionArg::Approve) => "approve",
        Some(DecisionArg::Reject) => "reject",
        Some(DecisionArg::Abort) => "abort",
        Some(DecisionArg::Replan) => "replan",
        Some(DecisionArg::Supply) => "supply",
    };
    let mut body = serde_json::Map::new();
    body.insert("decision".into(), json!(decision));
    body.insert("reason".into(), json!(reason));
    if let Some(out) = &a.output {
        let v: Value = serde_json::from_str(out).map_err(|e| CliError::Usage(format!("--output is not JSON: {e}")))?;
        body.insert("output".into(), v);
    }
    if let Some(h) = &a.hint {
        body.insert("hint".into(), json!(h));
    }
    let body = Value::Object(body);
    let run = r.run_id(&a.run).await?;
    let answer = r.post(&format!("/v1/runs/{run}/resolve"), &body).await?;
    let v = answer.json().map_err(|e| CliError::Failed(format!("the answer is not JSON: {e}")))?;
    if a.json {
        print_json(&v)?;
    } else {
        let by = v.get("by").and_then(Value::as_str).unwrap_or_default();
        let name = v.get("decision").and_then(Value::as_str).unwrap_or_default();
        outln!("resolved run {run}: {name} by {by}")?;
        outln!("the workers of the keel serve at {} continue it", r.client.url())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel cancel`: recorded with the token's name as `by` (a `--by` is refused).
/// `keel submit`: `POST /v1/runs` (an admin token), printed as locally.
pub(crate) async fn submit(r: &Remote, a: crate::cmd::submit::SubmitArgs) -> CmdResult {
    let input = crate::cmd::submit::input(&a)?;
    let body = json!({ "workflow": a.workflow, "input": input, "idempotency_key": a.key, "priority": a.priority });
    let answer = r.client.post_json("/v1/runs", &body).await.map_err(|e| CliError::Failed(e.to_string()))?;
    // Said as the command says it on the database itself.
    if answer.status == 409 {
        if let Some((_, message)) = answer.error().filter(|(code, _)| code == "idempotency_conflict") {
            return Err(CliError::Failed(format!("idempotency conflict: {message}")));
        }
    }
    let v = r.ok(answer)?;
    let v = v.json().map_err(|e| CliError::Failed(format!("the answer is not JSON: {e}")))?;
    // The run id is the one thing a submit must say: an answer without it (not keel's
    // server) is a failure, not a blank id.
    let run = v.get("run").and_then(Value::as_str).filter(|r| r.parse::<RunId>().is_ok()).ok_or_else(|| {
        CliError::Failed(format!("{}/v1/runs: the answer names no run id (is this a keel serve?)", r.client.url()))
    })?;
    let duplicate = v.get("duplicate").and_then(Value::as_bool).unwrap_or(false);
    crate::cmd::submit::report(run, duplicate, a.json)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn cancel(r: &Remote, a: crate::cmd::cancel::CancelArgs) -> CmdResult {
    if a.by.is_some() {
        return Err(CliError::Usage(
            "--by is not taken through keel serve: the token's name is recorded as who cancelled".into(),
        ));
    }
    let reason = a.reason.trim();
    if reason.is_empty() {
        return Err(CliError::Usage("--reason must not be empty".into()));
    }
    let run = r.run_id(&a.run).await?;
    let v = r.post(&format!("/v1/runs/{run}/cancel"), &json!({ "reason": reason })).await?;
    let v = v.json().map_err(|e| CliError::Failed(format!("the answer is not JSON: {e}")))?;
    if a.json {
        print_json(&v)?;
    } else {
        outln!("cancelled run {run} by {}: {reason}", v.get("by").and_then(Value::as_str).unwrap_or_default())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel export`: the server's export (`GET /v1/export`, the same selection, format and
/// redactions), to stdout or (complete, renamed) to `-o FILE`.
pub(crate) async fn export(r: &Remote, db: &Path, a: crate::cmd::export::ExportArgs) -> CmdResult {
    use crate::cmd::export::ExportFormat;
    if !a.all && a.run.is_none() {
        return Err(CliError::Usage("name a RUN or use --all".into()));
    }
    // Checked here as locally (same messages) before anything is asked.
    keel_replay::export::Redaction::parse(&a.redact).map_err(|e| CliError::Usage(e.to_string()))?;
    crate::cmd::export::time_window(a.since.as_deref(), a.until.as_deref())?;
    let target = crate::safe_file::Target::open(a.output.as_deref(), a.force, db)?;
    let format = match a.format {
        ExportFormat::Jsonl => "jsonl",
        ExportFormat::Csv => "csv",
        ExportFormat::Html => "html",
    };
    let mut q = format!("/v1/export?format={format}");
    if let Some(given) = a.run.as_deref() {
        q.push_str(&format!("&run={}", r.run_id(given).await?));
    }
    for (name, v) in [("since", &a.since), ("until", &a.until)] {
        if let Some(v) = v {
            q.push_str(&format!("&{name}={}", query_value(v)));
        }
    }
    if !a.redact.is_empty() {
        q.push_str(&format!("&redact={}", query_value(&a.redact.join(","))));
    }
    let body = r.get(&q).await?.body;
    let mut out = target.writer()?;
    let written = out.write_all(&body).and_then(|()| out.flush());
    drop(out);
    written.map_err(|e| target.stream_err(io_err("the export", e)))?;
    if let Some(path) = target.finish()? {
        errln!("exported {} byte(s) to {} (through {})", body.len(), path.display(), r.client.url());
    }
    Ok(ExitCode::SUCCESS)
}

/// `v` percent-encoded for a query string (everything but unreserved characters).
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `keel verify` of the database: the server runs the check (`GET /v1/verify`).
/// `keel verify FILE --against-db`: the file is verified here, and each of its runs' head
/// compared with the database's as the server reports it.
pub(crate) async fn verify(r: &Remote, db: &Path, a: crate::cmd::verify::VerifyArgs) -> CmdResult {
    if let Some(file) = &a.file {
        let mut v = keel_replay::verify::verify_export(file)?;
        if let Some(given) = &a.run {
            let ids: Vec<RunId> = v.runs.iter().filter_map(|x| x.run.parse().ok()).collect();
            if v.ok() {
                let run = resolve_run_in(&ids, given)?.to_string();
                v.runs.retain(|x| x.run == run);
            }
        }
        let mut continued = Vec::new();
        if a.against_db && v.ok() {
            v.failure = compare_heads(r, &v.runs, &mut continued).await?;
        }
        // The shape of `keel verify --json` (runs missing from an `--all` export are found
        // only on the database itself).
        let status = if !v.ok() {
            "failed"
        } else if continued.is_empty() {
            "verified"
        } else {
            "continued"
        };
        let doc = json!({
            "source": file.display().to_string(),
            "ok": v.ok(),
            "status": status,
            "records": v.records(),
            "runs": v.runs,
            "failure": v.failure,
            "signed_by": v.signed_by,
            "continued": continued,
            "archived": [],
            "checkpoints": null,
            "events_after_expected_head": null,
        });
        return crate::cmd::verify::print(&doc, a.json);
    }
    let path = match &a.run {
        Some(given) => format!("/v1/verify?run={}", r.run_id(given).await?),
        None => "/v1/verify".to_owned(),
    };
    let mut doc = r.get_json(&path).await?;
    // A verdict is a gate: an answer that is not one (no `ok`, no `runs`: not keel's
    // server) fails, and `ok: false` fails even without a failure named.
    let ok = doc.get("ok").and_then(Value::as_bool);
    let runs = doc.get("runs").map(Value::is_array).unwrap_or(false);
    let Some(ok) = ok.filter(|_| runs) else {
        return Err(CliError::Failed(format!(
            "{}{path}: the answer is not a verification (no `ok` and `runs`; is this a keel serve?)",
            r.client.url()
        )));
    };
    if let Some(m) = doc.as_object_mut() {
        m.insert("source".into(), json!(r.source(db)));
        if !ok && m.get("failure").is_none_or(Value::is_null) {
            m.insert("failure".into(), json!({ "message": "the server's verification failed" }));
        }
    }
    crate::cmd::verify::print(&doc, a.json)
}

/// `keel_replay::verify::compare_heads` through the server: each exported run's record
/// count and head against the database's (as the server's check of that run reports them).
async fn compare_heads(
    r: &Remote,
    runs: &[keel_replay::verify::RunVerified],
    continued: &mut Vec<keel_replay::anchor::RunContinued>,
) -> Result<Option<keel_replay::verify::Failure>, CliError> {
    use keel_replay::verify::{Failure, Tamper};
    let failure = |what, run: &str, message: String| {
        Some(Failure { what, run: Some(run.to_owned()), seq: None, line: None, message })
    };
    for v in runs {
        let path = format!("/v1/verify?run={}", v.run);
        let answer = r.client.get(&path).await.map_err(|e| CliError::Failed(e.to_string()))?;
        if answer.status == 404 {
            return Ok(failure(Tamper::Inserted, &v.run, format!("run {}: not in the database", v.run)));
        }
        let got = r.ok(answer)?.json().map_err(|e| CliError::Failed(format!("the answer is not JSON: {e}")))?;
        if got.get("ok").and_then(Value::as_bool) != Some(true) {
            let why = got.pointer("/failure/message").and_then(Value::as_str).unwrap_or_default();
            return Ok(failure(
                Tamper::Altered,
                &v.run,
                format!("run {}: the database's copy does not verify: {why}", v.run),
            ));
        }
        let db = got.pointer("/runs/0").cloned().unwrap_or(Value::Null);
        let db_records = db.get("records").and_then(Value::as_u64).unwrap_or_default();
        let db_head = db.get("head").and_then(Value::as_str).unwrap_or_default();
        if db_records > v.records && holds_head(r, v).await? {
            continued.push(keel_replay::anchor::RunContinued {
                run: v.run.clone(),
                exported: v.records,
                database: db_records,
                more: db_records - v.records,
            });
            continue;
        }
        if db_records != v.records || db_head != v.head {
            return Ok(failure(
                Tamper::Altered,
                &v.run,
                format!(
                    "run {}: the export ({} records, head {}) differs from the database ({} records, head {db_head})",
                    v.run,
                    v.records,
                    v.head.get(..16).unwrap_or(&v.head),
                    db_records
                ),
            ));
        }
    }
    Ok(None)
}

/// Whether the server's copy of the run holds the export's head at the export's last seq
/// (the run went on since): read from the server's JSONL export of the run.
async fn holds_head(r: &Remote, v: &keel_replay::verify::RunVerified) -> Result<bool, CliError> {
    let body = r.get(&format!("/v1/export?format=jsonl&run={}", v.run)).await?.body;
    let last = v.records.saturating_sub(1);
    Ok(body.split(|b| *b == b'\n').filter_map(|l| serde_json::from_slice::<Value>(l).ok()).any(|l| {
        l.get("type").and_then(Value::as_str) == Some("record")
            && l.get("seq").and_then(Value::as_u64) == Some(last)
            && l.get("hash").and_then(Value::as_str) == Some(v.head.as_str())
    }))
}

/// Whether `command` goes through a running server when one holds the database.
pub(crate) fn goes_through(command: &crate::Cmd) -> bool {
    use crate::Cmd;
    match command {
        Cmd::Runs(_) | Cmd::Show(_) | Cmd::Escalations(_) | Cmd::Resolve(_) | Cmd::Cancel(_) => true,
        // A signed export is written here: the key never leaves this process.
        Cmd::Export(e) => e.sign.is_none(),
        Cmd::Stats(_) => true,
        Cmd::Submit(_) => true,
        // An export file is verified here; the database through the server.
        // Checkpoints, --expect-head and --deep are checked here, on the database itself.
        Cmd::Verify(v) => !v.deep && (v.file.is_none() || v.against_db) && v.key.is_none() && v.expect_head.is_none(),
        _ => false,
    }
}

/// Runs `command` through a server if it is one that can go through one and
/// [`route`] finds a server; gives the command back to run on the database otherwise.
pub(crate) async fn dispatch(db: &Path, conn: &ConnArgs, command: crate::Cmd) -> Result<CmdResult, crate::Cmd> {
    use crate::Cmd;
    if !goes_through(&command) {
        return Err(command);
    }
    let r = match route(db, conn).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(command),
        Err(e) => return Ok(Err(e)),
    };
    Ok(match command {
        Cmd::Runs(a) => runs(&r, db, a).await,
        Cmd::Show(a) => show(&r, a).await,
        Cmd::Escalations(a) => escalations(&r, a).await,
        Cmd::Resolve(a) => resolve(&r, a).await,
        Cmd::Cancel(a) => cancel(&r, a).await,
        Cmd::Export(a) => export(&r, db, a).await,
        Cmd::Stats(a) => stats(&r, a).await,
        Cmd::Verify(a) => verify(&r, db, a).await,
        Cmd::Submit(a) => submit(&r, a).await,
        other => return Err(other),
    })
}
