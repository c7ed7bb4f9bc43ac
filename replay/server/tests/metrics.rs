//! `GET /metrics` against a real server on 127.0.0.1 after demo runs: the text parses as
//! the Prometheus text format (checked strictly: HELP then TYPE per family, sample names of
//! their family, histogram buckets with ascending `le` ending in `+Inf`, cumulative counts,
//! `+Inf` = `_count`), and the engine's counters match what the log holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

use common::{start, APPROVER, VIEWER};
use keel_engine::Event;
use serde_json::json;
use std::collections::BTreeMap;

/// One sample: name, labels (sorted), value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A family: its type and samples.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

/// `{k="v",...}` with the text format's escapes (`\\`, `\"`, `\n`); returns the labels and
/// the rest of the line.
fn parse_labels(s: &str) -> (BTreeMap<String, String>, &str) {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else { return (labels, s) };
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return (labels, r);
        }
        let eq = rest.find("=\"").expect("label without =\"");
        let name = &rest[..eq];
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad label name {name:?}"
        );
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("unterminated label value");
            match c {
                '\\' => match chars.next().expect("dangling escape").1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => panic!("bad escape \\{other}"),
                },
                '"' => break eq + 2 + i + 1,
                '\n' => panic!("raw newline in a label value"),
                c => value.push(c),
            }
        };
        assert!(labels.insert(name.to_owned(), value).is_none(), "label {name} twice");
        rest = &rest[end..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(v: &str) -> f64 {
    match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value {v:?}")),
    }
}

/// Parses the text format strictly (panics on anything out of form).
fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut pending_help: Option<String> = None;
    assert!(text.ends_with('\n'), "the text ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!families.contains_key(name), "family {name} twice");
            assert!(pending_help.is_none(), "HELP without TYPE before {line}");
            pending_help = Some(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(pending_help.take().as_deref(), Some(name), "TYPE {name} right after its HELP");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "type {kind}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "name {name}");
            families.insert(name.to_owned(), Family { kind: kind.to_owned(), samples: Vec::new() });
            current = Some(name.to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment {line:?}");
        assert!(!line.is_empty(), "empty line");
        let fam_name = current.clone().unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        let (labels, rest) = parse_labels(&line[name_end..]);
        let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value: {line}"));
        assert!(!value.contains(' '), "a timestamp or junk after the value: {line}");
        let fam = families.get_mut(&fam_name).unwrap();
        let allowed: Vec<String> = if fam.kind == "histogram" {
            ["_bucket", "_sum", "_count"].iter().map(|s| format!("{fam_name}{s}")).collect()
        } else {
            vec![fam_name.clone()]
        };
        assert!(allowed.iter().any(|a| a == name), "sample {name} in family {fam_name}");
        fam.samples.push((name.to_owned(), labels, parse_value(value)));
    }
    assert!(pending_help.is_none(), "HELP without TYPE at the end");
    for (name, fam) in &families {
        // A family without samples is allowed (no open escalation: no series).
        if fam.kind == "histogram" {
            check_histogram(name, fam);
        } else {
            let mut seen = std::collections::BTreeSet::new();
            for (_, labels, v) in &fam.samples {
                assert!(seen.insert(labels.clone()), "{name}: series {labels:?} twice");
                assert!(v.is_finite() && *v >= 0.0 || fam.kind == "gauge", "{name}: {v}");
            }
        }
    }
    families
}

/// `_bucket`s with ascending `le` ending in `+Inf`, cumulative, then `_sum` and `_count`
/// with `+Inf` = `_count` (one series: no other labels).
fn check_histogram(name: &str, fam: &Family) {
    let buckets: Vec<&Sample> = fam.samples.iter().filter(|s| s.0.ends_with("_bucket")).collect();
    assert!(buckets.len() >= 2, "{name}: buckets");
    let mut last_le = f64::NEG_INFINITY;
    let mut last_count = 0.0;
    for (_, labels, v) in &buckets {
        assert_eq!(labels.len(), 1, "{name}: only le: {labels:?}");
        let le = parse_value(&labels["le"]);
        assert!(le > last_le, "{name}: le {le} after {last_le}");
        assert!(*v >= last_count, "{name}: bucket counts are cumulative");
        last_le = le;
        last_count = *v;
    }
    assert_eq!(buckets.last().unwrap().1["le"], "+Inf", "{name}: the last bucket is +Inf");
    let n = buckets.len();
    let tail: Vec<&str> = fam.samples[n..].iter().map(|s| s.0.as_str()).collect();
    assert_eq!(tail, [format!("{name}_sum"), format!("{name}_count")], "{name}: _sum then _count after the buckets");
    assert_eq!(fam.samples[n + 1].2, last_count, "{name}: +Inf bucket = _count");
    assert!(fam.samples[n].2 >= 0.0, "{name}: _sum");
}

/// The value of the one sample of `family` named `name` with exactly `labels`.
fn value(f: &BTreeMap<String, Family>, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let fam = f.get(family).unwrap_or_else(|| panic!("no family {family}"));
    let hits: Vec<f64> = fam.samples.iter().filter(|s| s.0 == name && s.1 == want).map(|s| s.2).collect();
    assert_eq!(hits.len(), 1, "{name}{want:?} in {family}");
    hits[0]
}

#[test]
fn the_checker_refuses_what_the_format_does_not_allow() {
    let ok = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
    parse(ok);
    for bad in [
        // Buckets out of order, no +Inf, +Inf != count, TYPE without HELP, a sample of
        // another name, an unterminated label.
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 2\nh_sum 3\nh_count 2\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 3\n",
        "# TYPE c counter\nc 1\n",
        "# HELP c x\n# TYPE c counter\nd 1\n",
        "# HELP c x\n# TYPE c counter\nc{a=\"1} 1\n",
    ] {
        assert!(std::panic::catch_unwind(|| parse(bad)).is_err(), "accepted:\n{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_histograms_and_verdicts_match_the_log() {
    let s = start().await;
    // All eight demo scenarios: retries, replans, an escalation, a budget exhaustion (its
    // tight budget is not a field of the API's request: submitted to the engine itself).
    let mut runs = Vec::new();
    for i in 0..7 {
        runs.push(s.submit_demo(i).await);
    }
    runs.push(s.engine.submit(keel_demo::request(7, 7)).await.unwrap().run);
    s.engine.run_until_idle().await.unwrap();
    let r = s.get("/metrics", Some(VIEWER)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = r.text();
    let f = parse(&text);

    // What the log holds.
    let logs: Vec<Vec<keel_engine::Logged>> = runs.iter().map(|run| s.events(*run)).collect();
    let events: usize = logs.iter().map(Vec::len).sum();
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    let mut verdicts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut exhaustions: BTreeMap<(String, String), u64> = BTreeMap::new();
    for log in &logs {
        for l in log {
            *by_kind.entry(l.event.kind_name()).or_insert(0) += 1;
            match &l.event {
                Event::TaskEvaluated { task, verdict, .. } => {
                    *verdicts.entry(("support_ticket".into(), task.0.clone(), format!("{verdict:?}"))).or_insert(0) += 1
                }
                Event::BudgetExhausted { budget, .. } => {
                    *exhaustions.entry(("support_ticket".into(), format!("{budget:?}"))).or_insert(0) += 1
                }
                _ => {}
            }
        }
    }
    assert!(!verdicts.is_empty() && !exhaustions.is_empty(), "the demo records both");

    // Transitions: one per recorded event, by kind, every kind listed.
    for kind in Event::KINDS {
        let got = value(&f, "keel_transitions_total", "keel_transitions_total", &[("kind", kind)]);
        assert_eq!(got, *by_kind.get(kind).unwrap_or(&0) as f64, "transitions of {kind}");
    }
    let transitions: f64 = f["keel_transitions_total"].samples.iter().map(|s| s.2).sum();
    assert_eq!(transitions, events as f64);

    // Verdicts and exhaustions: exactly the series the log gives.
    let got: BTreeMap<(String, String, String), u64> = f["keel_verdicts_total"]
        .samples
        .iter()
        .map(|(_, l, v)| ((l["workflow"].clone(), l["task"].clone(), l["verdict"].clone()), *v as u64))
        .collect();
    assert_eq!(got, verdicts);
    let got: BTreeMap<(String, String), u64> = f["keel_budget_exhaustions_total"]
        .samples
        .iter()
        .map(|(_, l, v)| ((l["workflow"].clone(), l["budget"].clone()), *v as u64))
        .collect();
    assert_eq!(got, exhaustions);

    // Appends: each timed once; group commit (the sled default) made each durable in
    // exactly one flush, so the batch sizes add up to the appends.
    let appends = value(&f, "keel_appends_total", "keel_appends_total", &[]);
    assert!(appends >= runs.len() as f64 && appends <= events as f64, "{appends} appends for {events} events");
    assert_eq!(value(&f, "keel_append_errors_total", "keel_append_errors_total", &[]), 0.0);
    assert_eq!(value(&f, "keel_append_latency_seconds", "keel_append_latency_seconds_count", &[]), appends);
    assert_eq!(value(&f, "keel_commit_batch_appends", "keel_commit_batch_appends_sum", &[]), appends);
    let flushes = value(&f, "keel_flush_latency_seconds", "keel_flush_latency_seconds_count", &[]);
    assert_eq!(value(&f, "keel_commit_batch_appends", "keel_commit_batch_appends_count", &[]), flushes);
    assert!(flushes >= 1.0 && flushes <= appends);
    assert!(value(&f, "keel_append_latency_seconds", "keel_append_latency_seconds_sum", &[]) > 0.0);

    // A resolution through the API is one append of one HumanResolved: the counters move
    // by exactly that.
    let escalated = runs[5];
    let r = s
        .post(
            &format!("/v1/runs/{escalated}/resolve"),
            Some(APPROVER),
            &json!({"decision": "approve", "reason": "metrics test"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after = parse(&s.get("/metrics", Some(VIEWER)).await.text());
    assert_eq!(value(&after, "keel_appends_total", "keel_appends_total", &[]), appends + 1.0);
    let resolved = |f: &BTreeMap<String, Family>| {
        value(f, "keel_transitions_total", "keel_transitions_total", &[("kind", "HumanResolved")])
    };
    assert_eq!(resolved(&after), resolved(&f) + 1.0);
    let sum: f64 = after["keel_transitions_total"].samples.iter().map(|s| s.2).sum();
    assert_eq!(sum, transitions + 1.0);
    assert_eq!(value(&after, "keel_commit_batch_appends", "keel_commit_batch_appends_sum", &[]), appends + 1.0);

    // The engine's own snapshot says the same as the text.
    let m = s.engine.metrics();
    assert_eq!(m.appends as f64, appends + 1.0);
    assert_eq!(m.verdicts.iter().map(|v| v.count).sum::<u64>(), verdicts.values().sum::<u64>());
}
