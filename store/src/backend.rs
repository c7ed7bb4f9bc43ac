//! What a backend outside this crate needs to store exactly what the built-in ones store:
//! the same record values (envelope bytes and chain hash, byte for byte), the same checks
//! on append and on read, the same snapshot values. A backend keeps records as
//! `(run, seq) -> value` pairs however it likes; these functions make and check the values,
//! so `verify`, exports and replay see the same bytes on every backend; and the same
//! payload manifests and chunks.

use crate::envelope::codec::{self, SnapshotV1};
use crate::envelope::record::{self, Records};
use crate::error::StoreError;
use crate::log::{Claim, Head, Limits, NewRecord, Record, RecordIter};
use crate::payloads;
use crate::types::{Hash32, RunId, Seq};

/// The static checks of an append (empty batch, batch and record sizes, kind and key
/// lengths) against `limits`, each with its own error, before anything is locked.
pub fn validate_append(
    run: RunId,
    records: &[NewRecord],
    claim: Option<&Claim>,
    limits: &Limits,
) -> Result<(), StoreError> {
    record::validate_append(run, records, claim, limits)
}

/// The checks of auxiliary writes ([`crate::Coordination::append_with_aux`]): at most
/// `batch_records_max` of them (`TooLarge { what: "aux writes" }`), keys within
/// `key_bytes_max` (`"aux key"`), values within `event_bytes_max` (`"aux value"`).
pub fn validate_aux(aux: &[crate::AuxWrite], limits: &Limits) -> Result<(), StoreError> {
    if aux.len() > limits.batch_records_max {
        return Err(StoreError::TooLarge { what: "aux writes", bytes: aux.len(), max: limits.batch_records_max });
    }
    for (key, value) in aux {
        if key.len() > limits.key_bytes_max {
            return Err(StoreError::TooLarge { what: "aux key", bytes: key.len(), max: limits.key_bytes_max });
        }
        if let Some(v) = value {
            if v.len() > limits.event_bytes_max {
                return Err(StoreError::TooLarge { what: "aux value", bytes: v.len(), max: limits.event_bytes_max });
            }
        }
    }
    Ok(())
}

/// Refuses limits out of their ranges (`InvalidConfig`), as the sled backend does at open.
pub fn validate_limits(limits: &Limits) -> Result<(), StoreError> {
    limits.validate()
}

/// Sealed record values, `(seq, value)` in order: the bytes to store.
pub type Sealed = Vec<(Seq, Vec<u8>)>;

/// Seals `records` onto `head` as schema-version-3 record values ([`Sealed`]) and returns
/// them with the new head.
pub fn seal_batch(run: RunId, head: &Head, records: Vec<NewRecord>) -> Result<(Sealed, Head), StoreError> {
    let (sealed, head) = record::build_batch(run, head, records)?;
    Ok((sealed.into_iter().map(|(seq, v)| (Seq(seq), v)).collect(), head))
}

/// Decodes one stored record value (`prev_hash` left zero): `Corrupted` or
/// `UnknownVersion` if it does not open.
pub fn decode_record(run: RunId, seq: Seq, value: &[u8]) -> Result<Record, StoreError> {
    record::decode_record(run, seq, value)
}

/// The claim rule: `DuplicateKey` if `holder` is another run whose claim is unexpired at
/// `claim.now_us`.
pub fn check_claim(holder: Option<(RunId, i64)>, run: RunId, claim: &Claim) -> Result<(), StoreError> {
    match holder {
        Some((holder, expires_at_us)) if holder != run && expires_at_us > claim.now_us => {
            Err(StoreError::DuplicateKey { existing: holder })
        }
        _ => Ok(()),
    }
}

/// Stored `(seq, value)` pairs of one run, in seq order, as checked records: with
/// `linked`, exactly the checks of [`crate::EventLog::read`] (seq continuity from `from`,
/// the chain link from `prev`, each value decoded); without, the audit view of
/// [`crate::EventLog::scan`] (decoded only). The first bad record ends the iteration.
pub fn checked_records<I, V>(run: RunId, pairs: I, from: Seq, prev: Hash32, linked: bool) -> RecordIter
where
    I: Iterator<Item = Result<(Seq, V), StoreError>> + Send + 'static,
    V: AsRef<[u8]> + Send + 'static,
{
    let keyed = pairs.map(move |p| p.map(|(seq, v)| (record::event_key(run, seq.0), v)));
    Box::new(Records::new(run, keyed, from, prev, linked))
}

/// The stored value of a snapshot of the state covering seqs `< next_seq`, anchored to the
/// chain hash of record `next_seq - 1` (zeros for 0) and checksummed.
pub fn seal_snapshot(next_seq: Seq, anchor: Hash32, state: &[u8]) -> Result<Vec<u8>, StoreError> {
    codec::seal_snapshot_v1(&SnapshotV1 { next_seq: next_seq.0, anchor, state: state.to_vec() })
}

/// Opens a stored snapshot value of `run` and checks it against the log: `stored_hash(p)`
/// is the chain hash of the run's stored record `p` (`None` if there is none). Any damage
/// or mismatch is `CorruptSnapshot`.
pub fn open_snapshot(
    run: RunId,
    value: &[u8],
    stored_hash: impl FnOnce(u64) -> Result<Option<Hash32>, StoreError>,
) -> Result<(Seq, Vec<u8>), StoreError> {
    let bad = |reason: String| StoreError::CorruptSnapshot { run, reason };
    let snap = codec::open_snapshot(value).map_err(|e| bad(e.to_string()))?;
    if snap.state.len() > Limits::VALUE_BYTES_HARD_MAX {
        return Err(bad(format!("state of {} bytes exceeds the hard max", snap.state.len())));
    }
    let expected_anchor = match snap.next_seq.checked_sub(1) {
        None => Some([0u8; 32]),
        Some(p) => stored_hash(p).map_err(|e| bad(format!("cannot read log record {p} to check it: {e}")))?,
    };
    match expected_anchor {
        None => Err(bad(format!(
            "covers seqs < {} but the log has no record {}",
            snap.next_seq,
            snap.next_seq.saturating_sub(1)
        ))),
        Some(a) if a != snap.anchor => {
            Err(bad(format!("does not match the log: chain hash at seq {} differs", snap.next_seq.saturating_sub(1))))
        }
        Some(_) => Ok((Seq(snap.next_seq), snap.state)),
    }
}

/// A payload cut as the built-in backends store it ([`crate::Payloads`]).
#[derive(Debug)]
pub struct SplitPayload {
    /// Its reference (digest and length).
    pub reference: crate::PayloadRef,
    /// The manifest value (version, length, chunk count), as stored under the digest.
    pub manifest: Vec<u8>,
    /// The chunks in order, each [`crate::PAYLOAD_CHUNK_BYTES`] long but the last (none for
    /// an empty payload).
    pub chunks: Vec<Vec<u8>>,
}

/// Cuts `bytes` into what a backend stores for them; more than
/// [`crate::PAYLOAD_BYTES_MAX`] bytes is `TooLarge { what: "payload" }`.
pub fn split_payload(bytes: &[u8]) -> Result<SplitPayload, StoreError> {
    let (reference, mut writes) = payloads::payload_writes(bytes)?;
    // The manifest is the last write, after the chunks in index order.
    let manifest =
        writes.pop().and_then(|(_, v)| v).ok_or_else(|| StoreError::Encode("payload without a manifest".into()))?;
    let chunks = writes.into_iter().filter_map(|(_, v)| v).collect();
    Ok(SplitPayload { reference, manifest, chunks })
}

/// The length and chunk count a stored manifest value states, checked for consistency
/// (`CorruptPayload` naming `digest` otherwise).
pub fn open_manifest(digest: &Hash32, manifest: &[u8]) -> Result<(usize, u32), StoreError> {
    payloads::parse_manifest(digest, manifest)
}

/// Assembles a payload of `bytes` bytes from its `chunks` (`get(index)`), checking each
/// chunk's length and the digest of the whole (`CorruptPayload` otherwise).
pub fn assemble_payload(
    digest: &Hash32,
    bytes: usize,
    chunks: u32,
    get: impl FnMut(u32) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Vec<u8>, StoreError> {
    payloads::assemble(digest, bytes, chunks, get)
}
