//! Test hooks for building and tampering with stored record values, behind the
//! `testing` feature (not part of the API: corruption, tamper and golden tests use them to
//! write bytes the store itself never would).

use crate::envelope::codec::{seal, seal_record, EnvelopeV1, EnvelopeV3};
use crate::error::StoreError;
use crate::types::Hash32;

/// Recomputes the checksum of a stored value in place (for deliberate-tampering tests:
/// change bytes, then re-seal so only the chain can tell).
pub fn reseal(value: &mut [u8]) {
    if let Some((crc, rest)) = value.split_first_chunk_mut::<4>() {
        *crc = crc32fast::hash(rest).to_be_bytes();
    }
}

/// A record value's envelope with its version, editable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEnvelope {
    /// The record's schema version (picks the body layout and the record digest).
    pub version: u16,
    /// The event kind.
    pub kind: String,
    /// Stored only by version 3 and later (1 when read from versions 1 and 2).
    pub payload_version: u16,
    /// The record's time, µs since the Unix epoch.
    pub time_us: i64,
    /// The payload's stored bytes.
    pub payload: Vec<u8>,
    /// The payload root (digest of the payload's fields).
    pub payload_root: Hash32,
    /// The stored chain hash.
    pub hash: Hash32,
}

/// Decodes a record value of any known version (checksum checked).
pub fn open_raw(value: &[u8]) -> Result<RawEnvelope, String> {
    let (version, e) = crate::envelope::codec::open_record(value).map_err(|e| e.to_string())?;
    Ok(RawEnvelope {
        version,
        kind: e.kind,
        payload_version: e.payload_version,
        time_us: e.time_us,
        payload: e.payload,
        payload_root: e.payload_root,
        hash: e.hash,
    })
}

/// Encodes a record value with any version number and a valid checksum (the version-3
/// layout for versions 3 and later, the version-1 layout below; `payload_version` is
/// dropped there).
pub fn seal_raw(e: &RawEnvelope) -> Result<Vec<u8>, StoreError> {
    if e.version >= 3 {
        let body = EnvelopeV3 {
            kind: e.kind.clone(),
            time_us: e.time_us,
            payload_version: e.payload_version,
            payload: e.payload.clone(),
            payload_root: e.payload_root,
            hash: e.hash,
        };
        return seal(e.version, &body, e.payload.len());
    }
    let body = EnvelopeV1 {
        kind: e.kind.clone(),
        time_us: e.time_us,
        payload: e.payload.clone(),
        payload_root: e.payload_root,
        hash: e.hash,
    };
    seal(e.version, &body, e.payload.len())
}

/// Seals one record as schema version 1 (the v1 record digest, which does not cover the
/// payload bytes) at `seq` after `prev`, as a v1 build wrote it: for mixed-version logs
/// in tests (write the value with a raw put). Returns the value and its chain hash.
pub fn seal_v1_record(
    run: crate::types::RunId,
    seq: crate::types::Seq,
    prev: &Hash32,
    rec: &crate::log::NewRecord,
) -> Result<(Vec<u8>, Hash32), StoreError> {
    let d = crate::envelope::digest::record_digest(1, run, seq, &rec.kind, rec.time_us, &rec.payload_root);
    let hash = crate::envelope::digest::chain(prev, &d);
    let env = EnvelopeV1 {
        kind: rec.kind.clone(),
        time_us: rec.time_us,
        payload: rec.payload.clone(),
        payload_root: rec.payload_root,
        hash,
    };
    Ok((seal_record(1, &env)?, hash))
}
