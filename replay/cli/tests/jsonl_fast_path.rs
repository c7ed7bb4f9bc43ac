//! The fast path of `export_runs` (borrowed line fields, payload deserialized straight into
//! the event) rebuilds exactly the events the slow path (`ExportReader` + `to_logged`)
//! rebuilds, and reports exactly the errors it reports, on real demo exports and on
//! damaged ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{keel, lines, write_lines, DemoDb};
use keel_engine::Logged;
use keel_replay::source::{read_export, rebuild_record_fast};
use keel_replay::{export_runs, ExportLine};
use keel_store::RunId;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What reading the runs of an export gives: each run's events, or the error (Debug, so
/// every field of it is compared: variant, path, line, reason / run, seq, kind, field).
type Outcome = Vec<Result<(RunId, Vec<Logged>), String>>;

/// An edit of an export's lines.
type Damage = Box<dyn Fn(&mut Vec<Value>)>;

/// `export_runs` as it was before the fast path: every line through `ExportReader`, every
/// record through `ExportRecord::to_logged`.
fn slow_runs(path: &Path) -> Outcome {
    let mut out = Vec::new();
    slow_runs_each(path, |r| out.push(r));
    out
}

/// [`slow_runs`], handing each run (or the error) to `each` as it is read.
fn slow_runs_each(path: &Path, mut each: impl FnMut(Result<(RunId, Vec<Logged>), String>)) {
    let mut reader = read_export(path).unwrap().peekable();
    loop {
        let mut run: Option<RunId> = None;
        let mut events = Vec::new();
        let step = (|| -> Result<(), keel_replay::ReplayError> {
            loop {
                if let (Some(r), Some(Ok(ExportLine::Record(next)))) = (run, reader.peek()) {
                    if next.run != r {
                        break;
                    }
                }
                let Some(line) = reader.next() else { break };
                match line? {
                    ExportLine::Header(_) => {}
                    ExportLine::Record(rec) => {
                        run = Some(rec.run);
                        if rec.seq != events.len() as u64 {
                            return Err(keel_replay::ReplayError::Export {
                                path: path.to_path_buf(),
                                line: rec.line,
                                reason: format!(
                                    "run {} seq {}: expected seq {} (run `keel verify` on this file)",
                                    rec.run,
                                    rec.seq,
                                    events.len()
                                ),
                            });
                        }
                        events.push(rec.to_logged(path)?);
                    }
                    ExportLine::RunEnd(end) => {
                        if run == Some(end.run) {
                            break;
                        }
                    }
                    // The demo's values are small: its exports hold no payload lines.
                    ExportLine::Payload(p) => panic!("line {}: unexpected payload line", p.line),
                    ExportLine::Signature(_) => {}
                }
            }
            Ok(())
        })();
        match step {
            Err(e) => {
                each(Err(format!("{e:?}")));
                return;
            }
            Ok(()) => match run {
                Some(r) => each(Ok((r, events))),
                None => return,
            },
        }
    }
}

fn fast_runs(path: &Path) -> Outcome {
    export_runs(path).unwrap().map(|r| r.map_err(|e| format!("{e:?}"))).collect()
}

/// Both paths give the same outcome; returns it.
fn same(path: &Path, what: &str) -> Outcome {
    let slow = slow_runs(path);
    let fast = fast_runs(path);
    assert_eq!(fast, slow, "{what}: the fast path differs from the slow path");
    fast
}

fn the_error(outcome: &Outcome) -> &str {
    outcome.iter().find_map(|r| r.as_ref().err()).map(String::as_str).unwrap_or("")
}

fn export_all(db: &DemoDb, name: &str, extra: &[&str]) -> PathBuf {
    let file = db.path(name);
    let mut args = vec!["export", "--all", "--format", "jsonl", "-o", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    keel(&db.db, &args).ok();
    file
}

fn text_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn write_text(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// Index of the first record line of `kind`.
fn record_of(lines: &[Value], kind: &str) -> usize {
    lines.iter().position(|l| l["type"] == "record" && l["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_fast_path_rebuilds_every_record_of_a_demo_export_exactly() {
    let db = DemoDb::new(16);
    let file = export_all(&db, "all.jsonl", &[]);

    // Line by line: every record is taken by the fast path and equals `to_logged`.
    let raw = std::fs::read(&file).unwrap();
    let mut kinds = BTreeSet::new();
    let mut records = 0;
    for (line, item) in raw.split(|b| *b == b'\n').filter(|l| !l.is_empty()).zip(read_export(&file).unwrap()) {
        match item.unwrap() {
            ExportLine::Record(rec) => {
                let slow = rec.to_logged(&file).unwrap();
                let fast = rebuild_record_fast(line)
                    .unwrap_or_else(|| panic!("line {}: the fast path did not take it", rec.line));
                assert_eq!(fast, slow, "line {}", rec.line);
                kinds.insert(rec.kind.clone());
                records += 1;
            }
            _ => assert!(rebuild_record_fast(line).is_none()),
        }
    }
    assert!(records > 100, "{records} records");
    for kind in ["RunAccepted", "Planned", "TaskDispatched", "TaskExecuted", "TaskEvaluated", "RunCompleted"] {
        assert!(kinds.contains(kind), "the demo export has no {kind}: {kinds:?}");
    }

    // Run by run: the same runs as the slow path, and as the database holds them.
    let runs = same(&file, "intact export");
    assert_eq!(runs.len(), db.runs.len());
    for r in runs {
        let (run, events) = r.unwrap();
        assert_eq!(events, db.events(run), "run {run}");
    }
}

#[test]
fn a_redaction_marker_on_any_field_leaves_the_line_to_the_slow_path() {
    let db = DemoDb::new(16);
    let file = export_all(&db, "all.jsonl", &[]);
    let marker = json!({"$redacted": hex::encode([7u8; 32])});
    let mut tried = BTreeSet::new();
    for line in lines(&file).into_iter().filter(|l| l["type"] == "record") {
        let kind = line["kind"].as_str().unwrap().to_owned();
        for field in line["payload"].as_object().unwrap().keys() {
            if !tried.insert((kind.clone(), field.clone())) {
                continue;
            }
            let mut l = line.clone();
            l["payload"][field] = marker.clone();
            let text = serde_json::to_string(&l).unwrap();
            assert!(rebuild_record_fast(text.as_bytes()).is_none(), "{kind}.{field}: a marker was taken");
        }
    }
    assert!(tried.len() > 30, "{tried:?}");
}

#[test]
fn errors_are_the_slow_paths_errors() {
    let db = DemoDb::new(8);
    let file = export_all(&db, "all.jsonl", &[]);
    let original = lines(&file);
    let text = text_lines(&file);
    let t = db.path("t.jsonl");

    // Redacted fields: `Redacted` names the first one.
    for rule in ["output", "TaskDispatched.input", "budget", "RunAccepted.input"] {
        let red = export_all(&db, "red.jsonl", &["--redact", rule, "--force"]);
        let out = same(&red, rule);
        assert!(the_error(&out).starts_with("Redacted"), "{rule}: {out:?}");
    }
    // A redaction marker put on a field whose type would take an object (Budget: all
    // fields optional) is still a redacted field.
    let mut l = original.clone();
    let i = record_of(&l, "RunAccepted");
    l[i]["payload"]["budget"] = json!({"$redacted": hex::encode([7u8; 32])});
    write_lines(&t, &l);
    let out = same(&t, "redacted budget");
    assert!(the_error(&out).contains("field: \"budget\""), "{out:?}");

    let damaged: Vec<(&str, Damage)> = vec![
        ("malformed marker digest", Box::new(|l| set(l, "TaskExecuted", "output", json!({"$redacted": "zz"})))),
        (
            "marker with another key",
            Box::new(|l| set(l, "TaskExecuted", "output", json!({"$redacted": hex::encode([1u8; 32]), "x": 1}))),
        ),
        ("bad payload field", Box::new(|l| set(l, "TaskExecuted", "attempt", json!("x")))),
        ("missing payload field", Box::new(|l| remove(l, "TaskExecuted", "usage"))),
        ("unknown payload field", Box::new(|l| set(l, "TaskExecuted", "zzz", json!([1, {"a": null}])))),
        (
            "nested unknown field",
            Box::new(|l| set(l, "TaskExecuted", "usage", json!({"cost_micros": 1, "tokens": 2, "x": 3}))),
        ),
        ("unknown kind", Box::new(|l| envelope(l, "TaskExecuted", "kind", json!("Nope")))),
        ("kind not a string", Box::new(|l| envelope(l, "TaskExecuted", "kind", json!(7)))),
        ("payload not an object", Box::new(|l| envelope(l, "TaskExecuted", "payload", json!([1, 2])))),
        ("payload null", Box::new(|l| envelope(l, "TaskExecuted", "payload", Value::Null))),
        ("seq negative", Box::new(|l| envelope(l, "TaskExecuted", "seq", json!(-1)))),
        ("seq float", Box::new(|l| envelope(l, "TaskExecuted", "seq", json!(1.0)))),
        ("seq gap", Box::new(|l| envelope(l, "TaskExecuted", "seq", json!(99)))),
        ("time_us too big", Box::new(|l| envelope(l, "TaskExecuted", "time_us", json!(u64::MAX)))),
        ("schema_version out of range", Box::new(|l| envelope(l, "TaskExecuted", "schema_version", json!(70000)))),
        ("payload_version out of range", Box::new(|l| envelope(l, "TaskExecuted", "payload_version", json!(70000)))),
        ("payload_version a string", Box::new(|l| envelope(l, "TaskExecuted", "payload_version", json!("1")))),
        ("bad hash", Box::new(|l| envelope(l, "TaskExecuted", "hash", json!("AB".repeat(32))))),
        ("bad run", Box::new(|l| envelope(l, "TaskExecuted", "run", json!("not-a-run")))),
        ("no type", Box::new(|l| drop_envelope(l, "TaskExecuted", "type"))),
        ("unknown type", Box::new(|l| envelope(l, "TaskExecuted", "type", json!("nope")))),
        ("no time", Box::new(|l| drop_envelope(l, "TaskExecuted", "time"))),
        ("time a number", Box::new(|l| envelope(l, "TaskExecuted", "time", json!(5)))),
        ("extra envelope field", Box::new(|l| envelope(l, "TaskExecuted", "note", json!({"x": [1]})))),
        ("dropped record", Box::new(|l| drop(l, "TaskEvaluated"))),
        ("escalated as array", Box::new(|l| envelope_any(l, "Escalated", "payload", json!([1])))),
        ("bad run_end", Box::new(|l| run_end(l, "records", json!("x")))),
        ("run_end with a payload", Box::new(|l| run_end(l, "payload", json!({"a": 1})))),
        ("run_end of another run", Box::new(|l| run_end(l, "run", json!(RunId::from_bytes([9; 16]).to_string())))),
        ("not an object", Box::new(|l| l.insert(2, json!([1, 2, 3])))),
    ];
    for (what, damage) in &damaged {
        let mut l = original.clone();
        damage(&mut l);
        write_lines(&t, &l);
        same(&t, what);
    }
    // The ones that must fail do, naming the line.
    for (what, needle) in [
        ("malformed marker digest", "must be 64 lowercase hex digits"),
        ("bad payload field", "payload does not decode as TaskExecuted"),
        ("unknown kind", "unknown event kind"),
        ("payload not an object", "field `payload` is not an object"),
        ("seq gap", "expected seq"),
        ("dropped record", "expected seq"),
    ] {
        let (_, damage) = damaged.iter().find(|(w, _)| *w == what).unwrap();
        let mut l = original.clone();
        damage(&mut l);
        write_lines(&t, &l);
        let out = fast_runs(&t);
        assert!(the_error(&out).contains(needle) && the_error(&out).contains("line: "), "{what}: {out:?}");
    }

    // Damage a `Value` round trip cannot express: edits of the line's text.
    let i = text.iter().position(|l| l.contains("\"kind\":\"TaskExecuted\"")).unwrap();
    let texts: Vec<(&str, String)> = vec![
        ("garbage line", "{\"type\":\"record\",".to_owned()),
        ("trailing garbage", format!("{} x", text[i])),
        ("duplicate envelope key", text[i].replacen("{", "{\"kind\":\"RunFailed\",", 1)),
        ("duplicate payload key", text[i].replacen("\"payload\":{", "\"payload\":{\"attempt\":7,", 1)),
        ("escaped run id", escape_first_char_of(&text[i], "\"run\":\"")),
        ("escaped kind", text[i].replacen("\"kind\":\"T", "\"kind\":\"\\u0054", 1)),
        ("escaped marker key", text[i].replacen("\"payload\":{", "\"payload\":{\"zz\":{\"\\u0024redacted\":1},", 1)),
        ("number out of range in an unknown field", text[i].replacen("{", "{\"zz\":1e400,", 1)),
        (
            "number out of range in an unknown payload field",
            text[i].replacen("\"payload\":{", "\"payload\":{\"zz\":[1e400],", 1),
        ),
        (
            "lone surrogate in an unknown field",
            text[i].replacen("\"payload\":{", "\"payload\":{\"zz\":\"\\ud800\",", 1),
        ),
        (
            "deep unknown field",
            text[i].replacen(
                "\"payload\":{",
                &format!("\"payload\":{{\"zz\":{}1{},", "[".repeat(200), "]".repeat(200)),
                1,
            ),
        ),
        ("payload before kind", {
            let v: Value = serde_json::from_str(&text[i]).unwrap();
            let mut s = String::from("{\"payload\":");
            s.push_str(&v["payload"].to_string());
            for (k, x) in v.as_object().unwrap() {
                if k != "payload" {
                    s.push_str(&format!(",{}:{}", json!(k), x));
                }
            }
            s.push('}');
            s
        }),
        ("whitespace", text[i].replace(",\"", " ,\n\t\"").replace("\n", " ")),
        ("blank lines", format!("\n  \n{}", text[i])),
    ];
    for (what, line) in &texts {
        let mut l = text.clone();
        l[i] = line.clone();
        write_text(&t, &l);
        same(&t, what);
    }
    // Invalid UTF-8 inside a string of an unknown field.
    let mut bytes = Vec::new();
    for (n, line) in text.iter().enumerate() {
        if n == i {
            let mut b = line.replacen("{", "{\"zz\":\"\u{e9}\",", 1).into_bytes();
            let at = b.windows(2).position(|w| w == [0xc3, 0xa9]).unwrap();
            b[at] = 0xff;
            bytes.extend_from_slice(&b);
        } else {
            bytes.extend_from_slice(line.as_bytes());
        }
        bytes.push(b'\n');
    }
    std::fs::write(&t, &bytes).unwrap();
    let out = same(&t, "invalid UTF-8");
    assert!(the_error(&out).contains("not valid JSON"), "{out:?}");
}

#[test]
fn random_damage_reads_the_same_both_ways() {
    let db = DemoDb::new(3);
    let file = export_all(&db, "all.jsonl", &[]);
    let original = std::fs::read(&file).unwrap();
    let t = db.path("t.jsonl");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const BYTES: &[u8] = b"{}[]\",:\\0123456789eE-.+ \nabtnulrsfx$";
    for round in 0..400 {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() as usize) % bytes.len();
            let b = BYTES[(next() as usize) % BYTES.len()];
            match next() % 3 {
                0 => bytes[at] = b,
                1 => bytes.insert(at, b),
                _ => {
                    bytes.remove(at);
                }
            }
        }
        std::fs::write(&t, &bytes).unwrap();
        same(&t, &format!("round {round}"));
    }
}

/// `line` with the first character after `after` written as a `\u00XX` escape.
fn escape_first_char_of(line: &str, after: &str) -> String {
    let at = line.find(after).unwrap() + after.len();
    let c = line[at..].chars().next().unwrap();
    format!("{}\\u{:04x}{}", &line[..at], c as u32, &line[at + c.len_utf8()..])
}

/// Thread CPU time, seconds: what one core spends, whatever else the machine runs.
#[allow(unsafe_code)] // test-only: thread CPU time has no safe std API
fn cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Folds a run as `keel bench`'s `fold_export` does; returns its events.
fn fold(events: &[Logged]) -> u64 {
    let mut it = events.iter();
    let Some(first) = it.next() else { return 0 };
    let mut s = keel_engine::apply(None, first).unwrap();
    for e in it {
        keel_engine::apply_mut(&mut s, e).unwrap();
    }
    events.len() as u64
}

/// `KEEL_JSONL=FILE cargo test --release -p keel-replay --test jsonl_fast_path -- --ignored
/// --nocapture`: events per second of thread CPU time, reading FILE (e.g. the export
/// `keel bench --keep` leaves) with `export_runs` and with the slow path, folding like
/// `keel bench`'s `replay.jsonl`. CPU time, not wall time: a shared machine's load does not
/// count.
#[test]
#[ignore]
fn cpu_time_per_event_fast_and_slow() {
    let Ok(path) = std::env::var("KEEL_JSONL") else {
        eprintln!("set KEEL_JSONL to an export file");
        return;
    };
    let path = PathBuf::from(path);
    let (mut fast, mut slow) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = cpu_s();
        let n: u64 = export_runs(&path).unwrap().map(|r| fold(&r.unwrap().1)).sum();
        fast.push(n as f64 / (cpu_s() - t));
        let t = cpu_s();
        let mut m = 0;
        slow_runs_each(&path, |r| m += fold(&r.unwrap().1));
        slow.push(m as f64 / (cpu_s() - t));
        assert_eq!(n, m);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let k = |v: &[f64]| v.iter().map(|x| format!("{:.1}k", x / 1e3)).collect::<Vec<_>>().join(" ");
    eprintln!("fast path: {} events/cpu-s", k(&fast));
    eprintln!("slow path: {} events/cpu-s", k(&slow));
    let (f, s) = (median(&mut fast), median(&mut slow));
    eprintln!("medians: fast {:.1}k/s, slow {:.1}k/s, x{:.2}", f / 1e3, s / 1e3, f / s);
}

fn set(l: &mut [Value], kind: &str, field: &str, v: Value) {
    let i = record_of(l, kind);
    l[i]["payload"][field] = v;
}

fn remove(l: &mut [Value], kind: &str, field: &str) {
    let i = record_of(l, kind);
    l[i]["payload"].as_object_mut().unwrap().remove(field);
}

fn envelope(l: &mut [Value], kind: &str, field: &str, v: Value) {
    let i = record_of(l, kind);
    l[i][field] = v;
}

/// Like [`envelope`], or nothing if the export has no record of `kind`.
fn envelope_any(l: &mut [Value], kind: &str, field: &str, v: Value) {
    if let Some(i) = l.iter().position(|x| x["type"] == "record" && x["kind"] == kind) {
        l[i][field] = v;
    }
}

fn drop_envelope(l: &mut [Value], kind: &str, field: &str) {
    let i = record_of(l, kind);
    l[i].as_object_mut().unwrap().remove(field);
}

fn drop(l: &mut Vec<Value>, kind: &str) {
    let i = record_of(l, kind);
    l.remove(i);
}

fn run_end(l: &mut [Value], field: &str, v: Value) {
    let i = l.iter().position(|x| x["type"] == "run_end").unwrap();
    l[i][field] = v;
}
