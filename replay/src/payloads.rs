//! Payloads in an export file: the large values records refer to (`@sha256:<hex>:<bytes>`
//! in a payload slot, engine `model::payload`) travel beside the records as `payload`
//! lines (docs/EXPORT.md):
//!
//! ```text
//! {"type":"payload","sha256":"<hex>","bytes":N,"part":0,"parts":K,"text":"<JSON text>"}
//! ```
//!
//! Each payload is written once per file, before the first record that refers to it, in
//! `parts` lines of at most [`PART_TEXT_BYTES`] of its text each (parts in order; a line
//! stays far below the reader's line limit). Its digest covers its bytes: `keel verify`
//! hashes every payload and checks that every reference a record makes is in the file.

use crate::format;
use keel_engine::model::payload;
use keel_engine::Event;
use keel_store::{Hash32, PayloadRef};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Most bytes of payload text one `payload` line carries.
pub const PART_TEXT_BYTES: usize = 1024 * 1024;

/// Largest payload an export reader assembles (the engine's largest payload).
pub const PAYLOAD_BYTES_MAX: u64 = keel_store::PAYLOAD_BYTES_MAX as u64;

/// One `payload` line, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportPayload {
    /// 1-based line number in the file.
    pub line: u64,
    /// The SHA-256 the payload is stored under.
    pub digest: Hash32,
    /// Its length in bytes (all parts).
    pub bytes: u64,
    /// This part's index (0-based).
    pub part: u32,
    /// How many parts it has.
    pub parts: u32,
    /// This part's text.
    pub text: String,
}

/// A `payload` line as written.
#[derive(Serialize)]
pub(crate) struct PayloadLine<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    sha256: String,
    bytes: u64,
    part: u32,
    parts: u32,
    text: &'a str,
}

/// The `payload` lines of `text` (stored as `r`).
pub(crate) fn payload_lines<'a>(r: &PayloadRef, text: &'a str) -> Vec<PayloadLine<'a>> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() || parts.is_empty() {
        let mut end = rest.len().min(PART_TEXT_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (head, tail) = rest.split_at(end);
        parts.push(head);
        rest = tail;
    }
    let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    (0u32..)
        .zip(parts)
        .map(|(i, t)| PayloadLine { ty: "payload", sha256: r.hex(), bytes: r.bytes, part: i, parts: n, text: t })
        .collect()
}

/// Why a payload of an export does not assemble.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartError {
    /// Its text does not hash to its digest, or is not as long as stated: edited.
    Altered(String),
    /// Parts out of order, or more parts or bytes than allowed.
    Malformed(String),
}

/// Assembles `payload` lines into payloads, checking each against its digest.
#[derive(Default)]
pub struct PayloadParts {
    open: BTreeMap<Hash32, (u32, String)>,
}

impl PayloadParts {
    /// Takes one `payload` line: `Some((digest, text))` once its last part is in and its
    /// text hashes to its digest.
    pub fn add(&mut self, p: ExportPayload) -> Result<Option<(Hash32, String)>, PartError> {
        let hex = hex::encode(p.digest);
        if p.bytes > PAYLOAD_BYTES_MAX || p.parts == 0 {
            return Err(PartError::Malformed(format!("payload sha256:{hex}: {} bytes in {} parts", p.bytes, p.parts)));
        }
        let (next, text) = self.open.entry(p.digest).or_insert_with(|| (0, String::new()));
        if p.part != *next || p.part >= p.parts {
            return Err(PartError::Malformed(format!(
                "payload sha256:{hex}: part {} of {} where part {next} was expected",
                p.part, p.parts
            )));
        }
        if (text.len() + p.text.len()) as u64 > p.bytes {
            return Err(PartError::Altered(format!(
                "payload sha256:{hex} altered: more than its stated {} bytes",
                p.bytes
            )));
        }
        text.push_str(&p.text);
        *next += 1;
        if *next < p.parts {
            return Ok(None);
        }
        let Some((_, text)) = self.open.remove(&p.digest) else { return Ok(None) };
        let actual: Hash32 = Sha256::digest(text.as_bytes()).into();
        if text.len() as u64 != p.bytes || actual != p.digest {
            return Err(PartError::Altered(format!(
                "payload sha256:{hex} altered (its text hashes to {}, {} bytes; edited after export)",
                hex::encode(actual),
                text.len()
            )));
        }
        Ok(Some((p.digest, text)))
    }
}

/// Whether any string in `fields` (at any depth) starts like a payload reference: a cheap
/// test before [`record_refs`].
pub fn mentions_refs(fields: &Map<String, Value>) -> bool {
    fn any(v: &Value) -> bool {
        match v {
            Value::String(s) => s.starts_with(payload::REF_PREFIX),
            Value::Array(a) => a.iter().any(any),
            Value::Object(m) => m.values().any(any),
            _ => false,
        }
    }
    fields.values().any(any)
}

/// The references the record of `kind` with `fields` makes (in its payload slots; none if
/// it has no reference or cannot be rebuilt, e.g. a redacted one).
pub fn record_refs(kind: &str, fields: &Map<String, Value>) -> Vec<PayloadRef> {
    if !mentions_refs(fields) {
        return Vec::new();
    }
    match Event::from_fields(kind, fields.clone()) {
        Ok(event) => payload::refs(&event),
        Err(_) => Vec::new(),
    }
}

/// Replaces the references of `event` by the payloads in `found`; a reference not there
/// is `Err` (why).
pub fn inflate_from(event: &mut Event, found: &BTreeMap<Hash32, String>) -> Result<(), String> {
    payload::inflate(
        event,
        |r| {
            found
                .get(&r.digest)
                .map(|t| t.as_bytes().to_vec())
                .ok_or_else(|| format!("payload sha256:{} is referenced but not in the file (removed)", r.hex()))
        },
        |why| why,
    )
}

/// Parses the fields of a `payload` line.
pub(crate) fn parse_payload_fields(obj: &Map<String, Value>, line: u64) -> Result<ExportPayload, String> {
    let get_u64 = |k: &str| {
        obj.get(k).and_then(Value::as_u64).ok_or_else(|| format!("field `{k}` missing or not an unsigned integer"))
    };
    let digest = obj
        .get("sha256")
        .and_then(Value::as_str)
        .and_then(format::parse_hash)
        .ok_or("field `sha256` is not 64 lowercase hex digits")?;
    let text = obj.get("text").and_then(Value::as_str).ok_or("field `text` missing or not a string")?.to_owned();
    let part = u32::try_from(get_u64("part")?).map_err(|_| "field `part` out of range".to_owned())?;
    let parts = u32::try_from(get_u64("parts")?).map_err(|_| "field `parts` out of range".to_owned())?;
    Ok(ExportPayload { line, digest, bytes: get_u64("bytes")?, part, parts, text })
}
