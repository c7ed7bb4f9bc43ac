//! Hashing: field digests, payload root, record digest and chain. Every formula here is
//! specified byte-exactly in docs/STORE.md so that an auditor can recompute it with any
//! SHA-256 tool, and an export can redact a payload field (replace its value by its digest)
//! and still verify the chain.

use crate::types::{Hash32, RunId, Seq};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Domain-separation prefix of [`record_digest`] (schema version 1).
pub const RECORD_DIGEST_DOMAIN: &[u8] = b"keel/record/v1";

/// Domain-separation prefix of [`record_digest_v2`] (schema version 2).
pub const RECORD_DIGEST_DOMAIN_V2: &[u8] = b"keel/record/v2";

/// Domain-separation prefix of [`record_digest_v3`] (schema version 3).
pub const RECORD_DIGEST_DOMAIN_V3: &[u8] = b"keel/record/v3";

fn sha256(parts: &[&[u8]]) -> Hash32 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Canonical JSON: compact (no whitespace), object keys sorted by their UTF-8 bytes at every
/// depth, strings escaped minimally (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other
/// controls below U+0020 as `\u00xx` with lowercase hex; everything else raw UTF-8), numbers
/// as serde_json prints them. Independent of serde_json's map order feature.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_canonical(v, &mut out);
    out
}

/// Where canonical JSON is written: a buffer, or straight into a hasher.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// What is left to write of a canonical document: a value, a key (string and `:`), or
/// punctuation.
enum Pending<'a> {
    Value(&'a Value),
    Key(&'a str),
    Put(&'static [u8]),
}

/// Writes `v` as canonical JSON with an explicit stack instead of recursion, so a value
/// nested arbitrarily deep (user code may hand one to `Json::new` before any depth check,
/// docs/ENGINE.md) cannot overflow the thread's stack.
fn write_canonical(v: &Value, out: &mut impl Sink) {
    // Most payload fields are scalars: no stack for them.
    match v {
        Value::Null => return out.put(b"null"),
        Value::Bool(b) => return out.put(if *b { b"true" } else { b"false" }),
        Value::Number(n) => return write_number(n, out),
        Value::String(s) => return write_string(s, out),
        Value::Array(_) | Value::Object(_) => {}
    }
    let mut stack = vec![Pending::Value(v)];
    while let Some(p) = stack.pop() {
        let v = match p {
            Pending::Put(bytes) => {
                out.put(bytes);
                continue;
            }
            Pending::Key(k) => {
                write_string(k, out);
                out.put(b":");
                continue;
            }
            Pending::Value(v) => v,
        };
        match v {
            Value::Null => out.put(b"null"),
            Value::Bool(true) => out.put(b"true"),
            Value::Bool(false) => out.put(b"false"),
            Value::Number(n) => write_number(n, out),
            Value::String(s) => write_string(s, out),
            Value::Array(items) => {
                out.put(b"[");
                stack.push(Pending::Put(b"]"));
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push(Pending::Value(item));
                    if i > 0 {
                        stack.push(Pending::Put(b","));
                    }
                }
            }
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.put(b"{");
                stack.push(Pending::Put(b"}"));
                for (i, (k, val)) in entries.into_iter().enumerate().rev() {
                    stack.push(Pending::Value(val));
                    stack.push(Pending::Key(k));
                    if i > 0 {
                        stack.push(Pending::Put(b","));
                    }
                }
            }
        }
    }
}

/// serde_json's Display of the number, without a temporary String.
fn write_number(n: &serde_json::Number, out: &mut impl Sink) {
    struct Adapter<'a, S: Sink>(&'a mut S);
    impl<S: Sink> std::fmt::Write for Adapter<'_, S> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.put(s.as_bytes());
            Ok(())
        }
    }
    let _ = std::fmt::Write::write_fmt(&mut Adapter(out), format_args!("{n}"));
}

/// The lowercase hex digit of a nibble (`n < 16`).
fn hex_digit(n: u8) -> u8 {
    match n {
        0..=9 => b'0' + n,
        _ => b'a' + (n & 0xf).saturating_sub(10),
    }
}

fn write_string(s: &str, out: &mut impl Sink) {
    let bytes = s.as_bytes();
    out.put(b"\"");
    // Copy runs of bytes that need no escape in one go. Bytes of multi-byte UTF-8
    // sequences are all >= 0x80 and are copied verbatim.
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            c if c < 0x20 => &[b'\\', b'u', b'0', b'0', hex_digit(c >> 4), hex_digit(c & 0xf)],
            _ => continue,
        };
        out.put(bytes.get(run_start..i).unwrap_or_default());
        out.put(escaped);
        run_start = i + 1;
    }
    out.put(bytes.get(run_start..).unwrap_or_default());
    out.put(b"\"");
}

/// `SHA256(canonical_json(value))`.
pub fn field_digest(value: &Value) -> Hash32 {
    let mut h = Sha256::new();
    write_canonical(value, &mut h);
    h.finalize().into()
}

/// `SHA256( concat over fields sorted by name bytes of u32_be(len(name)) || name || digest )`.
/// The empty field list gives SHA256 of the empty string.
pub fn payload_root(field_digests: &[(String, Hash32)]) -> Hash32 {
    root_of_sorted(field_digests.iter().map(|(n, d)| (n.as_str(), *d)).collect())
}

fn root_of_sorted(mut fields: Vec<(&str, Hash32)>) -> Hash32 {
    fields.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    for (name, digest) in fields {
        // A field name longer than u32::MAX bytes cannot come from a serde_json map in
        // practice; saturate rather than panic.
        let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
        h.update(len.to_be_bytes());
        h.update(name.as_bytes());
        h.update(digest);
    }
    h.finalize().into()
}

/// [`payload_root`] of the [`field_digest`]s of a payload's top-level fields.
pub fn payload_root_of(fields: &serde_json::Map<String, Value>) -> Hash32 {
    let digests: Vec<(String, Hash32)> = fields.iter().map(|(k, v)| (k.clone(), field_digest(v))).collect();
    payload_root(&digests)
}

/// `SHA256("keel/record/v1" || u16_be(schema_version) || run (16 bytes) || u64_be(seq) ||
/// u32_be(len(kind)) || kind || i64_be(time_us) || payload_root)`.
pub fn record_digest(
    schema_version: u16,
    run: RunId,
    seq: Seq,
    kind: &str,
    time_us: i64,
    payload_root: &Hash32,
) -> Hash32 {
    header_digest(RECORD_DIGEST_DOMAIN, schema_version, run, seq, kind, time_us, &[payload_root])
}

/// `SHA256(domain || u16_be(version) || run || u64_be(seq) || u32_be(len(kind)) || kind ||
/// i64_be(time_us) || tail...)`: the layout every record digest version shares (version 3
/// puts `u16_be(payload_version)` first in its tail).
fn header_digest(
    domain: &[u8],
    version: u16,
    run: RunId,
    seq: Seq,
    kind: &str,
    time_us: i64,
    tail: &[&[u8]],
) -> Hash32 {
    let kind_len = u32::try_from(kind.len()).unwrap_or(u32::MAX);
    let mut h = Sha256::new();
    for part in [
        domain,
        &version.to_be_bytes(),
        run.as_bytes(),
        &seq.0.to_be_bytes(),
        &kind_len.to_be_bytes(),
        kind.as_bytes(),
        &time_us.to_be_bytes(),
    ] {
        h.update(part);
    }
    for part in tail {
        h.update(part);
    }
    h.finalize().into()
}

/// `SHA256(stored payload bytes)`: the payload digest a schema-version-2 record digest
/// covers (the bincode bytes as stored, not their JSON fields).
pub fn payload_digest(payload: &[u8]) -> Hash32 {
    sha256(&[payload])
}

/// Schema version 2: `SHA256("keel/record/v2" || u16_be(2) || run (16 bytes) || u64_be(seq) ||
/// u32_be(len(kind)) || kind || i64_be(time_us) || payload_root || payload_digest)`, with
/// `payload_digest` = [`payload_digest`] of the stored payload bytes. The payload root keeps
/// exports redactable; the payload digest binds the stored bytes to the chain, so a reader
/// needs one SHA-256 over them instead of recomputing the payload's fields.
pub fn record_digest_v2(
    run: RunId,
    seq: Seq,
    kind: &str,
    time_us: i64,
    payload_root: &Hash32,
    payload_digest: &Hash32,
) -> Hash32 {
    header_digest(RECORD_DIGEST_DOMAIN_V2, 2, run, seq, kind, time_us, &[payload_root, payload_digest])
}

/// Schema version 3: `SHA256("keel/record/v3" || u16_be(3) || run (16 bytes) || u64_be(seq) ||
/// u32_be(len(kind)) || kind || i64_be(time_us) || u16_be(payload_version) || payload_root ||
/// payload_digest)`: version 2's digest plus the payload version, so that the version a
/// reader upcasts the payload from cannot be altered undetected.
pub fn record_digest_v3(
    run: RunId,
    seq: Seq,
    kind: &str,
    time_us: i64,
    payload_version: u16,
    payload_root: &Hash32,
    payload_digest: &Hash32,
) -> Hash32 {
    let pv = payload_version.to_be_bytes();
    header_digest(RECORD_DIGEST_DOMAIN_V3, 3, run, seq, kind, time_us, &[&pv, payload_root, payload_digest])
}

/// What a record digest covers, whatever its schema version: the stored header fields, and
/// from version 2 on the payload digest, from version 3 on the payload version.
#[derive(Clone, Copy, Debug)]
pub struct DigestInput<'a> {
    /// The record's schema version (picks the formula).
    pub schema_version: u16,
    /// The run the record belongs to.
    pub run: RunId,
    /// The record's seq (where it claims to be).
    pub seq: Seq,
    /// The event kind stored in the envelope.
    pub kind: &'a str,
    /// The record's time, microseconds since the Unix epoch.
    pub time_us: i64,
    /// The payload version (version 3; ignored by earlier versions).
    pub payload_version: u16,
    /// [`payload_root`] of the payload's fields.
    pub payload_root: &'a Hash32,
    /// [`payload_digest`] of the stored payload bytes, if the caller has it (versions 2
    /// and 3 need it).
    pub payload_digest: Option<&'a Hash32>,
}

/// The record digest of a record of `schema_version`: [`record_digest_v3`] for version 3
/// and [`record_digest_v2`] for version 2 (both need the `payload_digest`),
/// [`record_digest`] with the stated version otherwise (a version-2 or -3 record without
/// its payload digest cannot match its chain hash). The one place that picks the formula
/// for stored records and export lines alike.
pub fn record_digest_of_version(d: &DigestInput<'_>) -> Hash32 {
    match (d.schema_version, d.payload_digest) {
        (3, Some(pd)) => record_digest_v3(d.run, d.seq, d.kind, d.time_us, d.payload_version, d.payload_root, pd),
        (2, Some(pd)) => record_digest_v2(d.run, d.seq, d.kind, d.time_us, d.payload_root, pd),
        (v, _) => record_digest(v, d.run, d.seq, d.kind, d.time_us, d.payload_root),
    }
}

/// `SHA256(prev || record_digest)`; the `prev` of seq 0 is 32 zero bytes.
pub fn chain(prev: &Hash32, record_digest: &Hash32) -> Hash32 {
    sha256(&[prev, record_digest])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_recursively_and_is_compact() {
        let v = json!({"b": [1, {"z": null, "a": true}], "a": "x\"\n\u{1}é"});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap_or_default(),
            "{\"a\":\"x\\\"\\n\\u0001é\",\"b\":[1,{\"a\":true,\"z\":null}]}"
        );
    }

    #[test]
    fn streamed_field_digest_equals_digest_of_canonical_bytes() {
        let v = json!({"z": "a\u{1f}\\\"\t b", "a": [1.5, -2, null, {"k": "é"}]});
        assert_eq!(field_digest(&v), sha256(&[&canonical_json(&v)]));
        let m = v.as_object().cloned().unwrap_or_default();
        let listed: Vec<(String, Hash32)> = m.iter().map(|(k, x)| (k.clone(), field_digest(x))).collect();
        assert_eq!(payload_root_of(&m), payload_root(&listed));
    }

    #[test]
    fn payload_root_is_order_independent() {
        let a = vec![("x".to_string(), [1u8; 32]), ("a".to_string(), [2u8; 32])];
        let b = vec![("a".to_string(), [2u8; 32]), ("x".to_string(), [1u8; 32])];
        assert_eq!(payload_root(&a), payload_root(&b));
    }

    #[test]
    fn v2_digest_is_its_formula_and_differs_from_v1() {
        let run = RunId::from_bytes([5; 16]);
        let (root, pd) = ([1u8; 32], payload_digest(b"payload"));
        let mut bytes = b"keel/record/v2".to_vec();
        bytes.extend_from_slice(&2u16.to_be_bytes());
        bytes.extend_from_slice(&[5; 16]);
        bytes.extend_from_slice(&9u64.to_be_bytes());
        bytes.extend_from_slice(&4u32.to_be_bytes());
        bytes.extend_from_slice(b"Kind");
        bytes.extend_from_slice(&(-3i64).to_be_bytes());
        bytes.extend_from_slice(&root);
        bytes.extend_from_slice(&pd);
        let v2 = record_digest_v2(run, Seq(9), "Kind", -3, &root, &pd);
        assert_eq!(v2, sha256(&[&bytes]));
        assert_ne!(v2, record_digest(2, run, Seq(9), "Kind", -3, &root));
        assert_ne!(v2, record_digest_v2(run, Seq(9), "Kind", -3, &root, &payload_digest(b"payloae")));
    }

    #[test]
    fn v3_digest_is_its_formula_and_covers_the_payload_version() {
        let run = RunId::from_bytes([5; 16]);
        let (root, pd) = ([1u8; 32], payload_digest(b"payload"));
        let mut bytes = b"keel/record/v3".to_vec();
        bytes.extend_from_slice(&3u16.to_be_bytes());
        bytes.extend_from_slice(&[5; 16]);
        bytes.extend_from_slice(&9u64.to_be_bytes());
        bytes.extend_from_slice(&4u32.to_be_bytes());
        bytes.extend_from_slice(b"Kind");
        bytes.extend_from_slice(&(-3i64).to_be_bytes());
        bytes.extend_from_slice(&7u16.to_be_bytes());
        bytes.extend_from_slice(&root);
        bytes.extend_from_slice(&pd);
        let v3 = record_digest_v3(run, Seq(9), "Kind", -3, 7, &root, &pd);
        assert_eq!(v3, sha256(&[&bytes]));
        assert_ne!(v3, record_digest_v3(run, Seq(9), "Kind", -3, 8, &root, &pd));
        assert_ne!(v3, record_digest_v2(run, Seq(9), "Kind", -3, &root, &pd));
    }

    #[test]
    fn known_answer_of_empty_root() {
        // SHA-256 of the empty string.
        assert_eq!(hex::encode(payload_root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
