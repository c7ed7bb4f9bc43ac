//! The codec: the ONLY module that knows bincode, so the wire format can be swapped in one
//! place.
//!
//! Configuration: `bincode::config::standard()` (little-endian, variable-length integers)
//! with a decode size limit of [`DECODE_BYTES_MAX`], so a corrupt length prefix cannot make
//! the decoder allocate more than that. Decoding refuses trailing bytes.
//!
//! Payload types are encoded through serde. bincode is not self-describing, so payload types
//! must not rely on `deserialize_any` (no `#[serde(untagged)]`, `#[serde(flatten)]` or
//! `serde_json::Value` fields).

use crate::error::StoreError;
use crate::types::Hash32;

/// Upper bound, in bytes, on anything the codec decodes (record envelopes, payloads,
/// snapshots). Configured limits are validated against it at open.
pub const DECODE_BYTES_MAX: usize = 256 * 1024;

type Cfg = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_BYTES_MAX>,
>;

const fn cfg() -> Cfg {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encodes a value with serde + bincode (standard config).
pub fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let err = |e: bincode::error::EncodeError| StoreError::Encode(e.to_string());
    // Size first, then one exact allocation (bincode's serde `encode_to_vec` grows the
    // vector from empty: ~7 reallocations for a 300-byte event).
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, cfg()).map_err(err)?;
    let mut out = Vec::with_capacity(size.bytes_written);
    bincode::serde::encode_into_std_write(value, &mut out, cfg()).map_err(err)?;
    Ok(out)
}

/// The length of [`encode`]'s output for `value`, computed without allocating it.
pub fn encoded_len<T: serde::Serialize>(value: &T) -> Result<usize, StoreError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, cfg()).map_err(|e| StoreError::Encode(e.to_string()))?;
    Ok(size.bytes_written)
}

/// Decodes a value encoded by [`encode`]. Fails (never panics) on malformed input, on
/// input larger than [`DECODE_BYTES_MAX`] and on trailing bytes.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    decode_serde(bytes).map_err(StoreError::Encode)
}

/// [`decode`] with a plain-text error, for callers that wrap it in their own variant.
pub(crate) fn decode_serde<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > DECODE_BYTES_MAX {
        return Err(format!("{} bytes exceed the decode limit of {DECODE_BYTES_MAX}", bytes.len()));
    }
    // Through the borrowing adapter first: strings are read in place, then copied once (see
    // borrowing.rs: bincode's owned path zeroes a buffer first, from malloc's slow path). A
    // payload type whose own visitor takes only owned strings or bytes refuses borrowed
    // ones: on any failure the plain path decides, so what decodes and every error message
    // are bincode's own.
    let seed = crate::envelope::borrowing::Seed::<T>(std::marker::PhantomData);
    let (value, used): (T, usize) = match bincode::serde::seed_decode_from_slice(seed, bytes, cfg()) {
        Ok(decoded) => decoded,
        Err(_) => bincode::serde::decode_from_slice(bytes, cfg()).map_err(|e| e.to_string())?,
    };
    if used != bytes.len() {
        return Err(format!("{} trailing bytes after the value", bytes.len() - used));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------
// Wire structures of the store itself (record envelope, snapshot). See docs/STORE.md.
// ---------------------------------------------------------------------------------------

/// Body of a record envelope of schema version 1 or 2 (follows the version varint). The
/// two versions store the same fields; they differ in what the chain hash covers (version 2
/// also the payload bytes, see docs/STORE.md), not in layout.
#[derive(bincode::Encode, bincode::Decode, Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvelopeV1 {
    pub kind: String,
    pub time_us: i64,
    pub payload: Vec<u8>,
    pub payload_root: Hash32,
    pub hash: Hash32,
}

/// Body of a record envelope of schema version 3: version 2's fields plus the payload
/// version (the layout version of the payload, chosen by the domain; the store keeps it and
/// never interprets it), which the version-3 record digest covers.
#[derive(bincode::Encode, bincode::Decode, Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvelopeV3 {
    pub kind: String,
    pub time_us: i64,
    pub payload_version: u16,
    pub payload: Vec<u8>,
    pub payload_root: Hash32,
    pub hash: Hash32,
}

/// [`EnvelopeV1`] borrowed from the stored bytes (same layout).
#[derive(bincode::BorrowDecode, Debug, PartialEq, Eq)]
struct EnvelopeRefV1<'a> {
    kind: &'a str,
    time_us: i64,
    payload: &'a [u8],
    payload_root: Hash32,
    hash: Hash32,
}

/// [`EnvelopeV3`] borrowed from the stored bytes (same layout).
#[derive(bincode::BorrowDecode, Debug, PartialEq, Eq)]
struct EnvelopeRefV3<'a> {
    kind: &'a str,
    time_us: i64,
    payload_version: u16,
    payload: &'a [u8],
    payload_root: Hash32,
    hash: Hash32,
}

/// A record envelope of any known schema version, borrowed from the stored bytes, as
/// [`open_record_ref`] decodes it (the in-memory form every version upcasts to).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EnvelopeRef<'a> {
    pub kind: &'a str,
    pub time_us: i64,
    /// Stored from schema version 3 on; 1 for records of versions 1 and 2.
    pub payload_version: u16,
    pub payload: &'a [u8],
    pub payload_root: Hash32,
    pub hash: Hash32,
}

/// Body of a version-1 snapshot value (follows the version varint).
#[derive(bincode::Encode, bincode::Decode, Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotV1 {
    pub next_seq: u64,
    /// Chain hash of record `next_seq - 1` when the snapshot was saved (zeros if 0).
    pub anchor: Hash32,
    pub state: Vec<u8>,
}

/// Why a stored value did not decode.
#[derive(Debug)]
pub(crate) enum WireError {
    /// Fewer bytes than the 4-byte checksum.
    Short(usize),
    /// Checksum mismatch; `truncated` is true when the body also ends early.
    Checksum { stored: u32, computed: u32, truncated: bool },
    /// Checksum fine but the body does not decode (only possible for a writer bug or
    /// deliberate tampering with a recomputed checksum).
    Body(String),
    /// Checksum fine, version not known to this build.
    Version(u16),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Short(n) => {
                write!(f, "truncated: value has {n} bytes, fewer than its 4-byte checksum")
            }
            WireError::Checksum { stored, computed, truncated: true } => write!(
                f,
                "truncated: checksum mismatch (stored {stored:08x}, computed {computed:08x}) \
                 and the envelope ends early"
            ),
            WireError::Checksum { stored, computed, truncated: false } => {
                write!(f, "checksum mismatch (stored {stored:08x}, computed {computed:08x}): bytes altered")
            }
            WireError::Body(e) => write!(f, "envelope does not decode: {e}"),
            WireError::Version(v) => write!(f, "unknown version {v}"),
        }
    }
}

fn native_encode<T: bincode::Encode>(out: &mut Vec<u8>, v: &T) -> Result<(), StoreError> {
    bincode::encode_into_std_write(v, out, cfg()).map(|_| ()).map_err(|e| StoreError::Encode(e.to_string()))
}

fn native_decode_prefix<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<(T, usize), String> {
    bincode::decode_from_slice(bytes, cfg()).map_err(|e| e.to_string())
}

fn native_decode_exact<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, (String, bool)> {
    match bincode::decode_from_slice::<T, _>(bytes, cfg()) {
        Ok((v, used)) if used == bytes.len() => Ok(v),
        Ok((_, used)) => Err((format!("{} trailing bytes", bytes.len() - used), false)),
        Err(e) => {
            let ended = matches!(e, bincode::error::DecodeError::UnexpectedEnd { .. });
            Err((e.to_string(), ended))
        }
    }
}

/// `crc32(BE) || varint(version) || bincode(body)`.
pub(crate) fn seal<T: bincode::Encode>(version: u16, body: &T, size_hint: usize) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(size_hint + 96);
    out.extend_from_slice(&[0u8; 4]);
    native_encode(&mut out, &version)?;
    native_encode(&mut out, body)?;
    if let Some((crc, rest)) = out.split_first_chunk_mut::<4>() {
        *crc = crc32fast::hash(rest).to_be_bytes();
    }
    Ok(out)
}

/// Checks the checksum and splits off the version. Returns (version, body bytes).
/// `body_ends_early(version, body)` tells truncation from bit flips: whether a body of
/// that version ends before its last field (false for a version it does not know).
fn unseal(value: &[u8], body_ends_early: fn(u16, &[u8]) -> bool) -> Result<(u16, &[u8]), WireError> {
    if value.len() < 4 {
        return Err(WireError::Short(value.len()));
    }
    let (crc_bytes, rest) = value.split_at(4);
    let stored = u32::from_be_bytes(crc_bytes.try_into().map_err(|_| WireError::Short(value.len()))?);
    let computed = crc32fast::hash(rest);
    if stored != computed {
        // Tell a torn/short value apart from flipped bits: does the body end early?
        let truncated = match native_decode_prefix::<u16>(rest) {
            Ok((version, n)) => rest.get(n..).is_some_and(|body| body_ends_early(version, body)),
            Err(_) => true,
        };
        return Err(WireError::Checksum { stored, computed, truncated });
    }
    let (version, n) = native_decode_prefix::<u16>(rest).map_err(WireError::Body)?;
    let body = rest.get(n..).ok_or_else(|| WireError::Body("version past the end".into()))?;
    Ok((version, body))
}

/// Record value of schema version 1 or 2 (same body, see [`EnvelopeV1`]).
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub(crate) fn seal_record(version: u16, env: &EnvelopeV1) -> Result<Vec<u8>, StoreError> {
    seal(version, env, env.payload.len() + env.kind.len())
}

/// Record value of schema version 3 ([`EnvelopeV3`]).
pub(crate) fn seal_record_v3(env: &EnvelopeV3) -> Result<Vec<u8>, StoreError> {
    seal(3, env, env.payload.len() + env.kind.len())
}

fn record_body_ends_early(version: u16, body: &[u8]) -> bool {
    match version {
        1 | 2 => matches!(native_decode_exact::<EnvelopeV1>(body), Err((_, true))),
        3 => matches!(native_decode_exact::<EnvelopeV3>(body), Err((_, true))),
        _ => false,
    }
}

fn borrow_exact<'a, T: bincode::BorrowDecode<'a, ()>>(body: &'a [u8]) -> Result<T, WireError> {
    match bincode::borrow_decode_from_slice::<T, _>(body, cfg()) {
        Ok((e, used)) if used == body.len() => Ok(e),
        Ok((_, used)) => Err(WireError::Body(format!("{} trailing bytes", body.len().saturating_sub(used)))),
        Err(e) => Err(WireError::Body(e.to_string())),
    }
}

/// THE upcast point: every stored record value is decoded here, whatever its version, into
/// the current in-memory envelope, borrowed from `value` (reading a record needs no zeroed
/// buffer for its payload, and the read-ahead hashes records without copying them).
/// Versions 1 and 2 share the body layout and have payload version 1; version 3 stores the
/// payload version. The schema version is returned with the envelope because it decides
/// the record digest (docs/STORE.md). A future version with another layout adds a match arm
/// that decodes its own body and converts it.
pub(crate) fn open_record_ref(value: &[u8]) -> Result<(u16, EnvelopeRef<'_>), WireError> {
    let (version, body) = unseal(value, record_body_ends_early)?;
    match version {
        v @ (1 | 2) => {
            let e: EnvelopeRefV1<'_> = borrow_exact(body)?;
            let env = EnvelopeRef {
                kind: e.kind,
                time_us: e.time_us,
                payload_version: 1,
                payload: e.payload,
                payload_root: e.payload_root,
                hash: e.hash,
            };
            Ok((v, env))
        }
        3 => {
            let e: EnvelopeRefV3<'_> = borrow_exact(body)?;
            let env = EnvelopeRef {
                kind: e.kind,
                time_us: e.time_us,
                payload_version: e.payload_version,
                payload: e.payload,
                payload_root: e.payload_root,
                hash: e.hash,
            };
            Ok((3, env))
        }
        other => Err(WireError::Version(other)),
    }
}

/// [`open_record_ref`], owned (as a version-3 body, whatever the stored version).
pub(crate) fn open_record(value: &[u8]) -> Result<(u16, EnvelopeV3), WireError> {
    open_record_ref(value).map(|(v, e)| {
        let env = EnvelopeV3 {
            kind: e.kind.to_owned(),
            time_us: e.time_us,
            payload_version: e.payload_version,
            payload: e.payload.to_vec(),
            payload_root: e.payload_root,
            hash: e.hash,
        };
        (v, env)
    })
}

pub(crate) fn seal_snapshot_v1(s: &SnapshotV1) -> Result<Vec<u8>, StoreError> {
    seal(1, s, s.state.len())
}

pub(crate) fn open_snapshot(value: &[u8]) -> Result<SnapshotV1, WireError> {
    let (version, body) = unseal(value, |version, body| {
        version == 1 && matches!(native_decode_exact::<SnapshotV1>(body), Err((_, true)))
    })?;
    match version {
        1 => native_decode_exact::<SnapshotV1>(body).map_err(|(e, _)| WireError::Body(e)),
        other => Err(WireError::Version(other)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
/// The borrowing adapter (borrowing.rs) seen through the codec that uses it: same values,
/// same errors as bincode's plain path.
mod borrowing_tests {
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Inner(String);

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum E {
        Unit,
        New(Inner),
        Tuple(String, Vec<u8>),
        Struct { name: String, bytes: Vec<u8>, map: BTreeMap<String, Option<String>>, t: (u8, String) },
    }

    #[test]
    fn owned_strings_and_bytes_decode_the_same_through_the_borrowing_path() {
        let values = vec![
            E::Unit,
            E::New(Inner("é\u{0}x".into())),
            E::Tuple(String::new(), vec![0, 255, 7]),
            E::Struct {
                name: "n".repeat(300),
                bytes: vec![1; 70],
                map: [("a".to_string(), None), ("b".to_string(), Some("ü".to_string()))].into(),
                t: (9, "t".into()),
            },
        ];
        for v in values {
            let bytes = super::encode(&v).unwrap();
            let back: E = super::decode(&bytes).unwrap();
            assert_eq!(back, v);
        }
    }

    /// A string type whose visitor takes only owned strings (bincode's owned path hands it
    /// one; the adapter hands it a borrowed one, which it refuses).
    #[derive(Debug, PartialEq)]
    struct OwnedOnly(String);

    impl<'de> Deserialize<'de> for OwnedOnly {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            // Deliberately the misuse clippy names: such visitors exist in the wild.
            #[allow(clippy::serde_api_misuse)]
            impl serde::de::Visitor<'_> for V {
                type Value = OwnedOnly;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an owned string")
                }
                fn visit_string<E: serde::de::Error>(self, s: String) -> Result<OwnedOnly, E> {
                    Ok(OwnedOnly(s))
                }
            }
            d.deserialize_string(V)
        }
    }

    #[test]
    fn a_visitor_that_takes_only_owned_strings_still_decodes() {
        let bytes = super::encode(&"abc".to_string()).unwrap();
        assert_eq!(super::decode::<OwnedOnly>(&bytes).unwrap(), OwnedOnly("abc".into()));
    }

    #[test]
    fn invalid_utf8_is_still_an_error() {
        let mut bytes = super::encode(&Inner("ab".into())).unwrap();
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        assert!(super::decode::<Inner>(&bytes).is_err());
    }
}
