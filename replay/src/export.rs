//! Audit export: JSONL (the verifiable format), CSV (a flat table of transitions) and HTML
//! (a self-contained report, see [`crate::html`]). Schemas: docs/EXPORT.md.
//!
//! Exports stream: runs are selected from the run list and each run's records are read
//! from the store one at a time (HTML holds one run in memory while it draws it).

use crate::error::ReplayError;
use crate::format::{self, hex32, rfc3339};
use keel_engine::{read_logged, Event, Logged, RunState};
use keel_store::{digest, EventLog, Hash32, Payload, Record, RunId, Seq};
use serde::Serialize;
use serde_json::{Map, Value};
use std::io::Write;

/// Which payload fields to redact: `FIELD` (any event kind) or `Kind.FIELD`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redaction {
    rules: Vec<(Option<String>, String)>,
}

impl Redaction {
    /// Parses `--redact` values. A kind must be an event kind name.
    pub fn parse(specs: &[String]) -> Result<Redaction, ReplayError> {
        let mut rules = Vec::new();
        for s in specs {
            let s = s.trim();
            let (kind, field) = match s.split_once('.') {
                Some((k, f)) => (Some(k.to_owned()), f.to_owned()),
                None => (None, s.to_owned()),
            };
            if field.is_empty() || field.contains('.') {
                return Err(ReplayError::Invalid(format!(
                    "--redact {s:?}: expected FIELD or Kind.FIELD, e.g. output or TaskExecuted.output"
                )));
            }
            if let Some(k) = &kind {
                if !Event::KINDS.contains(&k.as_str()) {
                    return Err(ReplayError::Invalid(format!(
                        "--redact {s:?}: unknown event kind {k:?} (kinds: {})",
                        Event::KINDS.join(", ")
                    )));
                }
            }
            rules.push((kind, field));
        }
        Ok(Redaction { rules })
    }

    /// Whether no field is redacted.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules as given (`field` or `Kind.field`).
    pub fn specs(&self) -> Vec<String> {
        self.rules.iter().map(|(k, f)| k.as_ref().map_or_else(|| f.clone(), |k| format!("{k}.{f}"))).collect()
    }

    /// Whether `kind.field` is redacted.
    pub fn applies(&self, kind: &str, field: &str) -> bool {
        self.rules.iter().any(|(k, f)| f == field && k.as_deref().is_none_or(|k| k == kind))
    }

    /// Replaces each redacted field's value by `{"$redacted": "<hex field digest>"}`.
    pub fn apply(&self, kind: &str, fields: &mut Map<String, Value>) {
        for (name, value) in fields.iter_mut() {
            if self.applies(kind, name) {
                *value = format::redact_value(value);
            }
        }
    }
}

/// Runs to export: every run of the log whose `RunAccepted` time lies in
/// `[since_us, until_us)` (either bound optional), in run id order.
pub fn select_runs(
    log: &dyn EventLog,
    since_us: Option<i64>,
    until_us: Option<i64>,
) -> Result<Vec<RunId>, ReplayError> {
    let mut out = Vec::new();
    for run in log.runs()? {
        if since_us.is_none() && until_us.is_none() {
            out.push(run);
            continue;
        }
        let first = log.read(run, Seq(0))?.next().transpose()?;
        let Some(first) = first else { continue };
        if since_us.is_some_and(|t| first.time_us < t) || until_us.is_some_and(|t| first.time_us >= t) {
            continue;
        }
        out.push(run);
    }
    Ok(out)
}

/// The header line (field order is the documented order).
#[derive(Serialize)]
struct HeaderLine {
    #[serde(rename = "type")]
    ty: &'static str,
    format: &'static str,
    exported_at: String,
    exported_at_us: i64,
    filter: Value,
    redacted: Vec<String>,
    keel_version: &'static str,
}

/// The trailer line of a run.
#[derive(Serialize)]
struct RunEndLine {
    #[serde(rename = "type")]
    ty: &'static str,
    run: String,
    records: u64,
    head: String,
}

/// One exported record line (field order is the documented order).
#[derive(Serialize)]
struct RecordLine<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    run: String,
    seq: u64,
    time_us: i64,
    time: String,
    kind: &'a str,
    schema_version: u16,
    payload: Map<String, Value>,
    payload_root: String,
    /// SHA-256 of the stored payload bytes: only for schema version 2 and later, whose
    /// record digest covers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_digest: Option<String>,
    /// The payload's layout version: only for schema version 3 and later, which store it
    /// and whose record digest covers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_version: Option<u16>,
    prev_hash: String,
    hash: String,
}

/// What was exported of one run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunExported {
    /// The run (id).
    pub run: String,
    /// Records written.
    pub records: u64,
    /// The run's head hash (hex): the hash of its last record.
    pub head: String,
}

/// Writes a JSONL export: a header line, then per run its records and a `run_end` line.
pub struct JsonlWriter<W: Write> {
    out: W,
    redaction: Redaction,
    /// Payloads already written to this file (each is written once, before the first
    /// record that refers to it).
    written: std::collections::BTreeSet<Hash32>,
    /// What a signature covers: the header line and every run's trailer so far.
    message: crate::sign::ExportMessage,
    /// The key that signs the file at [`JsonlWriter::finish`], if any.
    signer: Option<crate::sign::SecretKey>,
}

/// The last line of a signed export (docs/EXPORT.md, "Signature").
#[derive(Serialize)]
struct SignatureLine {
    #[serde(rename = "type")]
    ty: &'static str,
    alg: &'static str,
    key: String,
    sig: String,
}

impl<W: Write> JsonlWriter<W> {
    /// Writes the header. `filter` describes the selection (documented in docs/EXPORT.md).
    pub fn new(mut out: W, redaction: Redaction, filter: Value, exported_at_us: i64) -> Result<Self, ReplayError> {
        let header = HeaderLine {
            ty: "header",
            format: format::FORMAT,
            exported_at: rfc3339(exported_at_us),
            exported_at_us,
            filter,
            redacted: redaction.specs(),
            keel_version: env!("CARGO_PKG_VERSION"),
        };
        let line =
            serde_json::to_vec(&header).map_err(|e| ReplayError::io("<export output>", std::io::Error::other(e)))?;
        out.write_all(&line).and_then(|()| out.write_all(b"\n")).map_err(|e| ReplayError::io("<export output>", e))?;
        let message = crate::sign::ExportMessage::new(&line);
        Ok(JsonlWriter { out, redaction, written: Default::default(), message, signer: None })
    }

    /// Signs the file with `key` when it is finished: a last `signature` line over the
    /// header line and every run's trailer ([`crate::sign::ExportMessage`]).
    pub fn signed_by(mut self, key: crate::sign::SecretKey) -> Self {
        self.signer = Some(key);
        self
    }

    /// Streams one run's records from the store.
    pub fn write_run(&mut self, log: &dyn EventLog, run: RunId) -> Result<RunExported, ReplayError> {
        let mut n = 0u64;
        let mut head: Hash32 = [0; 32];
        for rec in log.read(run, Seq(0))? {
            let rec = rec?;
            let line = record_line(&rec, &self.redaction)?;
            self.write_payloads(log, &rec, &line.payload)?;
            write_line(&mut self.out, &line)?;
            head = rec.hash;
            n += 1;
        }
        if n == 0 {
            return Err(ReplayError::UnknownRun(run.to_string()));
        }
        let end = RunEndLine { ty: "run_end", run: run.to_string(), records: n, head: hex32(&head) };
        write_line(&mut self.out, &end)?;
        self.message.add_run(&end.run, n, &end.head);
        Ok(RunExported { run: run.to_string(), records: n, head: hex32(&head) })
    }

    /// Writes the payloads the record's (possibly redacted) `fields` refer to that this
    /// file does not hold yet, read from `log` (checked against their digests).
    fn write_payloads(
        &mut self,
        log: &dyn EventLog,
        rec: &Record,
        fields: &Map<String, Value>,
    ) -> Result<(), ReplayError> {
        for r in crate::payloads::record_refs(&rec.kind, fields) {
            if self.written.contains(&r.digest) {
                continue;
            }
            let max = usize::try_from(r.bytes).unwrap_or(usize::MAX);
            let bytes = log.get_payload(&r.digest, max)?.ok_or_else(|| {
                ReplayError::Store(keel_store::StoreError::CorruptPayload {
                    digest: r.hex(),
                    reason: format!("missing from the payload store (referenced by run {} seq {})", rec.run, rec.seq.0),
                })
            })?;
            let text = String::from_utf8(bytes).map_err(|_| {
                ReplayError::Invalid(format!(
                    "payload sha256:{} referenced by run {} seq {} is not UTF-8",
                    r.hex(),
                    rec.run,
                    rec.seq.0
                ))
            })?;
            for part in crate::payloads::payload_lines(&r, &text) {
                write_line(&mut self.out, &part)?;
            }
            self.written.insert(r.digest);
        }
        Ok(())
    }

    /// Writes the signature line (if signing), flushes the output and returns it.
    pub fn finish(mut self) -> Result<W, ReplayError> {
        if let Some(key) = &self.signer {
            let line = SignatureLine {
                ty: "signature",
                alg: "ed25519",
                key: key.public().hex(),
                sig: key.sign_hex(self.message.bytes()),
            };
            write_line(&mut self.out, &line)?;
        }
        self.out.flush().map_err(|e| ReplayError::io("<export output>", e))?;
        Ok(self.out)
    }
}

fn record_line<'a>(rec: &'a Record, redaction: &Redaction) -> Result<RecordLine<'a>, ReplayError> {
    // In the layout of its payload version: the chain covers the fields as written.
    let mut fields = keel_engine::model::upcast::stored_fields(rec)?;
    // Pair check: what we write must hash to what the store chained.
    if digest::payload_root_of(&fields) != rec.payload_root {
        return Err(ReplayError::Invalid(format!(
            "run {} seq {}: the decoded payload does not hash to its stored payload root (run `keel verify --run {}`)",
            rec.run, rec.seq, rec.run
        )));
    }
    redaction.apply(&rec.kind, &mut fields);
    Ok(RecordLine {
        ty: "record",
        run: rec.run.to_string(),
        seq: rec.seq.0,
        time_us: rec.time_us,
        time: rfc3339(rec.time_us),
        kind: &rec.kind,
        schema_version: rec.schema_version,
        payload: fields,
        payload_root: hex32(&rec.payload_root),
        payload_digest: (rec.schema_version >= 2).then(|| hex32(&rec.payload_digest())),
        payload_version: (rec.schema_version >= 3).then(|| rec.payload_version()),
        prev_hash: hex32(&rec.prev_hash),
        hash: hex32(&rec.hash),
    })
}

fn write_line<W: Write>(out: &mut W, v: &impl Serialize) -> Result<(), ReplayError> {
    serde_json::to_writer(&mut *out, v).map_err(|e| ReplayError::io("<export output>", std::io::Error::other(e)))?;
    out.write_all(b"\n").map_err(|e| ReplayError::io("<export output>", e))
}

/// CSV columns, in order (docs/EXPORT.md).
pub const CSV_COLUMNS: [&str; 13] = [
    "run",
    "seq",
    "time",
    "kind",
    "task",
    "attempt",
    "verdict_or_class",
    "cost_micros",
    "tokens",
    "run_status",
    "task_status",
    "total_cost_micros",
    "detail",
];

/// Writes the CSV table of transitions.
pub struct CsvWriter<W: Write> {
    out: csv::Writer<W>,
    redaction: Redaction,
}

impl<W: Write> CsvWriter<W> {
    /// A CSV writer with its header row written.
    pub fn new(out: W, redaction: Redaction) -> Result<Self, ReplayError> {
        let mut out = csv::Writer::from_writer(out);
        out.write_record(CSV_COLUMNS).map_err(csv_err)?;
        Ok(CsvWriter { out, redaction })
    }

    /// Streams one run: each event with the run's and the task's status after it.
    pub fn write_run(&mut self, log: &dyn EventLog, run: RunId) -> Result<u64, ReplayError> {
        let mut state: Option<RunState> = None;
        let mut n = 0u64;
        for logged in read_logged(log, run, Seq(0))? {
            let logged = logged?;
            crate::timeline::step_mut(&mut state, &logged)?;
            if let Some(after) = &state {
                self.write_event(&logged, after)?;
            }
            n += 1;
        }
        if n == 0 {
            return Err(ReplayError::UnknownRun(run.to_string()));
        }
        Ok(n)
    }

    /// Writes rows for events already in memory (e.g. read from an export file).
    pub fn write_events(&mut self, events: &[Logged]) -> Result<(), ReplayError> {
        let mut state: Option<RunState> = None;
        for e in events {
            crate::timeline::step_mut(&mut state, e)?;
            if let Some(after) = &state {
                self.write_event(e, after)?;
            }
        }
        Ok(())
    }

    fn write_event(&mut self, e: &Logged, after: &RunState) -> Result<(), ReplayError> {
        let row = csv_row(e, after, &self.redaction);
        self.out.write_record(&row).map_err(csv_err)
    }

    /// Flushes the output.
    pub fn finish(mut self) -> Result<(), ReplayError> {
        self.out.flush().map_err(|e| ReplayError::io("<export output>", e))
    }
}

fn csv_err(e: csv::Error) -> ReplayError {
    ReplayError::io("<export output>", std::io::Error::other(e))
}

fn csv_row(e: &Logged, after: &RunState, redaction: &Redaction) -> Vec<String> {
    let kind = e.event.kind_name();
    let task = format::event_task(&e.event);
    let (attempt, class, usage) = match &e.event {
        Event::TaskDispatched { attempt, .. } => (Some(*attempt), String::new(), None),
        Event::TaskExecuted { attempt, usage, cached, .. } => {
            (Some(*attempt), if *cached { "cached".into() } else { String::new() }, Some(*usage))
        }
        Event::TaskFailed { attempt, class, usage, .. } => {
            (Some(*attempt), format!("{class:?}").to_lowercase(), Some(*usage))
        }
        Event::RetryScheduled { next_attempt, .. } => (Some(*next_attempt), String::new(), None),
        Event::TaskEvaluated { attempt, verdict, usage, .. } => {
            (Some(*attempt), format!("{verdict:?}").to_lowercase(), Some(*usage))
        }
        Event::Escalated(x) => (None, format!("{:?}", x.cause), None),
        Event::HumanResolved { decision, .. } => (None, decision.name().to_owned(), None),
        Event::BudgetExhausted { budget, .. } => (None, format!("{budget:?}"), None),
        _ => (None, String::new(), None),
    };
    let task_status = task
        .and_then(|t| after.task_index.get(t).and_then(|&i| after.tasks.get(i)))
        .map(|t| t.status.name().to_owned())
        .unwrap_or_default();
    let fields = e.event.fields();
    let detail = if fields.keys().any(|f| redaction.applies(kind, f)) {
        format!("{kind} (fields redacted)")
    } else {
        format::event_line(&e.event)
    };
    vec![
        e.run.to_string(),
        e.seq.0.to_string(),
        rfc3339(e.at_us),
        kind.to_owned(),
        task.map(|t| t.0.clone()).unwrap_or_default(),
        attempt.map(|a| a.to_string()).unwrap_or_default(),
        class,
        usage.map(|u| u.cost_micros.to_string()).unwrap_or_default(),
        usage.map(|u| u.tokens.to_string()).unwrap_or_default(),
        after.status.name().to_owned(),
        task_status,
        after.totals.cost_micros.to_string(),
        detail,
    ]
}
