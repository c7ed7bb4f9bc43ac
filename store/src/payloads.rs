//! The payload store beside the log: opaque byte strings stored by their SHA-256, so an
//! event carries a digest and a size instead of a large value (docs/STORE.md §14).
//!
//! A payload is split into chunks of [`PAYLOAD_CHUNK_BYTES`] (32 KiB, far below the size
//! at which sled moves a value into a blob file it never fsyncs) and written in one atomic
//! batch with its manifest:
//!
//! - `b'P' || sha256 (32)`                 -> manifest: `1u8 || u64_be(bytes) || u32_be(chunks)`
//! - `b'Q' || sha256 (32) || u32_be(index)` -> chunk bytes
//!
//! Durability: a put writes without flushing; the append of the records that reference the
//! payload follows it and flushes everything written before it (sled's flush and the
//! data-file fsync cover the whole keyspace, and sled recovers a prefix of its writes), so
//! a durable record never references a payload that is not.

use crate::error::StoreError;
use crate::types::Hash32;
use sha2::{Digest, Sha256};

/// Bytes of one stored chunk (the last chunk of a payload may be shorter).
pub const PAYLOAD_CHUNK_BYTES: usize = 32 * 1024;

/// The largest payload a store accepts or hands back (`TooLarge { what: "payload" }`).
pub const PAYLOAD_BYTES_MAX: usize = 256 * 1024 * 1024;

pub(crate) const MANIFEST_PREFIX: u8 = b'P';
pub(crate) const CHUNK_PREFIX: u8 = b'Q';
const MANIFEST_VERSION: u8 = 1;
const MANIFEST_LEN: usize = 1 + 8 + 4;

/// A stored payload: its SHA-256 and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PayloadRef {
    /// SHA-256 of the bytes.
    pub digest: Hash32,
    /// Length of the bytes.
    pub bytes: u64,
}

impl PayloadRef {
    /// The reference of `bytes` (what [`Payloads::put_payload`] returns for them).
    pub fn of(bytes: &[u8]) -> PayloadRef {
        PayloadRef { digest: Sha256::digest(bytes).into(), bytes: bytes.len() as u64 }
    }

    /// The digest in lowercase hex.
    pub fn hex(&self) -> String {
        hex::encode(self.digest)
    }
}

/// The payload half of a store (see the module docs). Every backend implements it on
/// purpose: no method has a default.
pub trait Payloads: Send + Sync + 'static {
    /// Stores `bytes` under their SHA-256 (nothing is written if that payload is already
    /// stored) and returns its reference. Durable with the next flush: write a payload
    /// before the records that reference it. Errors: more than [`PAYLOAD_BYTES_MAX`]
    /// bytes (`TooLarge { what: "payload" }`), backend failures.
    fn put_payload(&self, bytes: &[u8]) -> Result<PayloadRef, StoreError>;

    /// The bytes of payload `digest`, checked against it: `None` if it is not stored; a
    /// missing or damaged chunk, a bad manifest or bytes that do not hash to `digest` are
    /// `CorruptPayload` naming the digest. A payload whose manifest says more than
    /// `bytes_max` bytes is `TooLarge { what: "payload" }`, refused before anything is
    /// allocated for it.
    fn get_payload(&self, digest: &Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError>;

    /// The digests of every stored payload, in digest order (for verification).
    fn payload_digests(&self) -> Result<Vec<Hash32>, StoreError>;
}

pub(crate) fn manifest_key(digest: &Hash32) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(MANIFEST_PREFIX);
    k.extend_from_slice(digest);
    k
}

pub(crate) fn chunk_key(digest: &Hash32, index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(37);
    k.push(CHUNK_PREFIX);
    k.extend_from_slice(digest);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Key-value writes applied in one atomic batch (`None` removes).
pub(crate) type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The writes that store `bytes` (manifest and chunks) and its reference.
pub(crate) fn payload_writes(bytes: &[u8]) -> Result<(PayloadRef, Writes), StoreError> {
    if bytes.len() > PAYLOAD_BYTES_MAX {
        return Err(StoreError::TooLarge { what: "payload", bytes: bytes.len(), max: PAYLOAD_BYTES_MAX });
    }
    let r = PayloadRef::of(bytes);
    let chunks: Vec<&[u8]> = bytes.chunks(PAYLOAD_CHUNK_BYTES).collect();
    let count = u32::try_from(chunks.len()).map_err(|_| StoreError::TooLarge {
        what: "payload",
        bytes: bytes.len(),
        max: PAYLOAD_BYTES_MAX,
    })?;
    let mut writes = Vec::with_capacity(chunks.len() + 1);
    for (i, chunk) in (0u32..).zip(chunks) {
        writes.push((chunk_key(&r.digest, i), Some(chunk.to_vec())));
    }
    let mut manifest = Vec::with_capacity(MANIFEST_LEN);
    manifest.push(MANIFEST_VERSION);
    manifest.extend_from_slice(&r.bytes.to_be_bytes());
    manifest.extend_from_slice(&count.to_be_bytes());
    // The manifest last: a reader that finds it finds the chunks (the batch is atomic anyway).
    writes.push((manifest_key(&r.digest), Some(manifest)));
    Ok((r, writes))
}

/// `(bytes, chunks)` of a stored manifest, checked for consistency.
pub(crate) fn parse_manifest(digest: &Hash32, v: &[u8]) -> Result<(usize, u32), StoreError> {
    let bad = |reason: String| StoreError::CorruptPayload { digest: hex::encode(digest), reason };
    let (Some(&version), Some(len), Some(count)) = (v.first(), v.get(1..9), v.get(9..13)) else {
        return Err(bad(format!("manifest of {} bytes, expected {MANIFEST_LEN}", v.len())));
    };
    if version != MANIFEST_VERSION || v.len() != MANIFEST_LEN {
        return Err(bad(format!("manifest version {version} / length {} unknown", v.len())));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(len);
    let mut c = [0u8; 4];
    c.copy_from_slice(count);
    let (bytes, chunks) = (u64::from_be_bytes(l), u32::from_be_bytes(c));
    let expected = bytes.div_ceil(PAYLOAD_CHUNK_BYTES as u64);
    if u64::from(chunks) != expected {
        return Err(bad(format!("manifest says {bytes} bytes in {chunks} chunks, expected {expected} chunks")));
    }
    let bytes = usize::try_from(bytes).map_err(|_| bad(format!("{bytes} bytes do not fit in memory")))?;
    Ok((bytes, chunks))
}

/// Assembles a payload from its chunks (`get(index)`), checking each chunk's length and
/// the digest of the whole; `bytes_max` was checked against `bytes` by the caller.
pub(crate) fn assemble(
    digest: &Hash32,
    bytes: usize,
    chunks: u32,
    mut get: impl FnMut(u32) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Vec<u8>, StoreError> {
    let bad = |reason: String| StoreError::CorruptPayload { digest: hex::encode(digest), reason };
    let mut out = Vec::with_capacity(bytes);
    for i in 0..chunks {
        let Some(chunk) = get(i)? else {
            return Err(bad(format!("chunk {i} of {chunks} is missing")));
        };
        let want = (bytes - out.len()).min(PAYLOAD_CHUNK_BYTES);
        if chunk.len() != want {
            return Err(bad(format!("chunk {i} has {} bytes, expected {want}", chunk.len())));
        }
        out.extend_from_slice(&chunk);
    }
    let actual: Hash32 = Sha256::digest(&out).into();
    if &actual != digest {
        return Err(bad(format!("bytes hash to {}", hex::encode(actual))));
    }
    Ok(out)
}

/// Checks every stored payload of `log` (each read back in full and hashed). Returns how
/// many payloads were checked; the first damaged one is the error (`CorruptPayload`).
pub fn verify_payloads(log: &dyn Payloads) -> Result<usize, StoreError> {
    let digests = log.payload_digests()?;
    for d in &digests {
        if log.get_payload(d, PAYLOAD_BYTES_MAX)?.is_none() {
            return Err(StoreError::CorruptPayload {
                digest: hex::encode(d),
                reason: "listed but not readable".to_owned(),
            });
        }
    }
    Ok(digests.len())
}
