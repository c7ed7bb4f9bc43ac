//! Key layout, record values and the checked record iterators shared by the backends.
//!
//! Keys (one keyspace, see docs/STORE.md):
//! - `b'e' || run (16) || u64_be(seq)` -> record value
//! - `b's' || run (16)`                -> snapshot value
//! - `b'k' || idempotency key`         -> `run (16) || i64_be(expires_at_us)`
//! - `b'c' || aux key`                -> aux value (not chained; e.g. the response cache)
//! - `b't' || u64_be(due_at_us ^ 1<<63) || run (16)` -> empty (the due-time index)
//! - `b'u' || run (16)`                -> `i64_be(due_at_us)` (the run's current due time)
//! - `b'e' || run (16)`                -> a sealed run's records (`crate::kv::sealed`)
//! - `b'm' || b"format"`               -> [`FORMAT_MARKER`]

use crate::envelope::codec::{self, EnvelopeV3, WireError};
use crate::envelope::digest;
use crate::error::StoreError;
use crate::log::{Claim, Head, Limits, NewRecord, Record, KIND_BYTES_MAX, SCHEMA_VERSION};
use crate::types::{Hash32, RunId, Seq};

pub(crate) const EVENT_PREFIX: u8 = b'e';
pub(crate) const SNAPSHOT_PREFIX: u8 = b's';
pub(crate) const CLAIM_PREFIX: u8 = b'k';
pub(crate) const AUX_PREFIX: u8 = b'c';
pub(crate) const DUE_PREFIX: u8 = b't';
pub(crate) const DUE_OF_RUN_PREFIX: u8 = b'u';
#[cfg(feature = "sled")]
pub(crate) const META_FORMAT_KEY: &[u8] = b"mformat";
/// Written at creation; a store without it (but with keys) is not a keel store.
pub const FORMAT_MARKER: &[u8] = b"keel-store v2";
/// The marker of a store written before sealed runs ([`crate::kv::sealed`]): read as is,
/// and raised to [`FORMAT_MARKER`] by the first open in place (an earlier build then
/// refuses the store by name instead of misreading a sealed run).
pub(crate) const FORMAT_MARKER_V1: &[u8] = b"keel-store v1";

pub(crate) const EVENT_KEY_LEN: usize = 1 + 16 + 8;

pub(crate) fn event_key(run: RunId, seq: u64) -> [u8; EVENT_KEY_LEN] {
    let mut k = [0u8; EVENT_KEY_LEN];
    k[0] = EVENT_PREFIX;
    k[1..17].copy_from_slice(run.as_bytes());
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn run_prefix(run: RunId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = EVENT_PREFIX;
    k[1..].copy_from_slice(run.as_bytes());
    k
}

pub(crate) fn snapshot_key(run: RunId) -> [u8; 17] {
    let mut k = run_prefix(run);
    k[0] = SNAPSHOT_PREFIX;
    k
}

pub(crate) fn aux_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(AUX_PREFIX);
    k.extend_from_slice(key);
    k
}

/// `b't' || u64_be(due_at_us with its sign bit flipped) || run`: ordered by due time.
pub(crate) fn due_key(due_at_us: i64, run: RunId) -> [u8; 25] {
    let mut k = [0u8; 25];
    let order = (due_at_us as u64) ^ (1 << 63);
    let (prefix, rest) = k.split_at_mut(1);
    let (time, id) = rest.split_at_mut(8);
    prefix.copy_from_slice(&[DUE_PREFIX]);
    time.copy_from_slice(&order.to_be_bytes());
    id.copy_from_slice(run.as_bytes());
    k
}

/// `(due_at_us, run)` of a due key; `None` if the key is not one.
pub(crate) fn parse_due_key(k: &[u8]) -> Option<(i64, RunId)> {
    let (&prefix, rest) = k.split_first()?;
    if prefix != DUE_PREFIX || rest.len() != 24 {
        return None;
    }
    let (time, id) = rest.split_at(8);
    let order = u64::from_be_bytes(time.try_into().ok()?);
    Some(((order ^ (1 << 63)) as i64, RunId::from_bytes(id.try_into().ok()?)))
}

/// `b'u' || run` -> `i64_be(due_at_us)`: the run's current due time (to remove its key).
pub(crate) fn due_of_run_key(run: RunId) -> [u8; 17] {
    let mut k = run_prefix(run);
    k[0] = DUE_OF_RUN_PREFIX;
    k
}

pub(crate) fn claim_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(CLAIM_PREFIX);
    k.extend_from_slice(key);
    k
}

/// `(run, seq)` of an event key; `None` if the key is not one.
pub(crate) fn parse_event_key(k: &[u8]) -> Option<(RunId, u64)> {
    if k.len() != EVENT_KEY_LEN {
        return None;
    }
    let (&prefix, rest) = k.split_first()?;
    if prefix != EVENT_PREFIX {
        return None;
    }
    let (run, seq) = rest.split_first_chunk::<16>()?;
    Some((RunId::from_bytes(*run), u64::from_be_bytes(seq.try_into().ok()?)))
}

pub(crate) fn claim_value(run: RunId, expires_at_us: i64) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..16].copy_from_slice(run.as_bytes());
    v[16..].copy_from_slice(&expires_at_us.to_be_bytes());
    v
}

pub(crate) fn parse_claim_value(v: &[u8]) -> Result<(RunId, i64), StoreError> {
    let bad = || StoreError::CorruptClaim { reason: format!("claim value has {} bytes, expected 24", v.len()) };
    let (run, exp) = v.split_first_chunk::<16>().ok_or_else(bad)?;
    let exp: [u8; 8] = exp.try_into().map_err(|_| bad())?;
    Ok((RunId::from_bytes(*run), i64::from_be_bytes(exp)))
}

/// The claim rule: refuse if another run holds the key unexpired.
pub(crate) fn check_claim(existing: Option<&[u8]>, run: RunId, claim: &Claim) -> Result<(), StoreError> {
    if let Some(v) = existing {
        let (holder, expires_at_us) = parse_claim_value(v)?;
        if holder != run && expires_at_us > claim.now_us {
            return Err(StoreError::DuplicateKey { existing: holder });
        }
    }
    Ok(())
}

/// Static checks of an append, before any lock is taken.
pub(crate) fn validate_append(
    run: RunId,
    records: &[NewRecord],
    claim: Option<&Claim>,
    limits: &Limits,
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Err(StoreError::EmptyBatch { run });
    }
    if records.len() > limits.batch_records_max {
        return Err(StoreError::TooLarge {
            what: "batch records",
            bytes: records.len(),
            max: limits.batch_records_max,
        });
    }
    for r in records {
        if r.payload.len() > limits.event_bytes_max {
            return Err(StoreError::TooLarge { what: "event", bytes: r.payload.len(), max: limits.event_bytes_max });
        }
        if r.kind.len() > KIND_BYTES_MAX {
            return Err(StoreError::TooLarge { what: "event kind", bytes: r.kind.len(), max: KIND_BYTES_MAX });
        }
    }
    if let Some(c) = claim {
        if c.key.len() > limits.key_bytes_max {
            return Err(StoreError::TooLarge {
                what: "idempotency key",
                bytes: c.key.len(),
                max: limits.key_bytes_max,
            });
        }
    }
    Ok(())
}

/// `(seq, stored value)` of each record of a batch.
pub(crate) type SealedBatch = Vec<(u64, Vec<u8>)>;

/// Seals the records of a batch onto `head`: returns `(seq, value)` pairs and the new head.
pub(crate) fn build_batch(run: RunId, head: &Head, records: Vec<NewRecord>) -> Result<(SealedBatch, Head), StoreError> {
    let mut out = Vec::with_capacity(records.len());
    let mut prev = head.last_hash;
    let mut seq = head.next_seq.0;
    let mut last_kind = None;
    for r in records {
        // Schema version 3: the digest covers the payload version and the payload bytes as
        // stored.
        let payload_digest = digest::payload_digest(&r.payload);
        let d = digest::record_digest_v3(
            run,
            Seq(seq),
            &r.kind,
            r.time_us,
            r.payload_version,
            &r.payload_root,
            &payload_digest,
        );
        let hash = digest::chain(&prev, &d);
        let env = EnvelopeV3 {
            kind: r.kind,
            time_us: r.time_us,
            payload_version: r.payload_version,
            payload: r.payload,
            payload_root: r.payload_root,
            hash,
        };
        let value = codec::seal_record_v3(&env)?;
        // Pair assertion: what we write must read back as what we meant.
        debug_assert!(matches!(codec::open_record(&value), Ok((SCHEMA_VERSION, ref e)) if *e == env));
        out.push((seq, value));
        prev = hash;
        last_kind = Some(env.kind);
        seq = seq.checked_add(1).ok_or(StoreError::TooLarge {
            what: "run length",
            bytes: usize::MAX,
            max: usize::MAX,
        })?;
    }
    Ok((out, Head { next_seq: Seq(seq), last_hash: prev, last_kind }))
}

/// Decodes one stored record value (through the codec's single upcast point). `prev_hash`
/// is left zero; the iterators fill it in.
pub(crate) fn decode_record(run: RunId, seq: Seq, value: &[u8]) -> Result<Record, StoreError> {
    let (version, env) = codec::open_record_ref(value).map_err(|e| match e {
        WireError::Version(version) => StoreError::UnknownVersion { run, seq, version },
        other => StoreError::Corrupted { run, seq, reason: other.to_string() },
    })?;
    // Check again after reading what was checked before writing.
    if env.kind.len() > KIND_BYTES_MAX || env.payload.len() > Limits::VALUE_BYTES_HARD_MAX {
        return Err(StoreError::Corrupted {
            run,
            seq,
            reason: format!(
                "envelope out of bounds: kind {} bytes, payload {} bytes",
                env.kind.len(),
                env.payload.len()
            ),
        });
    }
    Ok(Record {
        run,
        seq,
        schema_version: version,
        kind: env.kind.to_owned(),
        time_us: env.time_us,
        payload_version: env.payload_version,
        payload: env.payload.to_vec(),
        payload_root: env.payload_root,
        prev_hash: [0; 32],
        hash: env.hash,
    })
}

/// Hashing of a stored record done ahead of its checks (by the read-ahead thread, from the
/// same bytes the checks read).
// Only the sled read-ahead hashes ahead.
#[cfg_attr(not(feature = "sled"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) enum Prehashed {
    /// Nothing: the checks hash everything.
    Nothing,
    /// SHA-256 of the payload bytes of a schema-v2 or -v3 record (its record digest covers it).
    Payload(Hash32),
    /// The record digest itself (what the chain hashes after the previous hash).
    Record(Hash32),
}

/// Hashes a stored record ahead of its checks: the payload only, or (`at_seq`, the seq its
/// key names) the record digest. `None` if the value does not decode (the checks will say
/// why and end the run there); [`Prehashed::Nothing`] for a v1 record's payload (not
/// covered).
#[cfg(feature = "sled")]
pub(crate) fn prehash(run: RunId, at_seq: Option<u64>, value: &[u8]) -> Option<Prehashed> {
    let (version, env) = codec::open_record_ref(value).ok()?;
    let payload = (version >= 2).then(|| digest::payload_digest(env.payload));
    Some(match at_seq {
        Some(seq) => Prehashed::Record(digest::record_digest_of_version(&digest::DigestInput {
            schema_version: version,
            run,
            seq: Seq(seq),
            kind: env.kind,
            time_us: env.time_us,
            payload_version: env.payload_version,
            payload_root: &env.payload_root,
            payload_digest: payload.as_ref(),
        })),
        None => payload.map_or(Prehashed::Nothing, Prehashed::Payload),
    })
}

/// The head implied by a run's last stored record.
pub(crate) fn head_from_last(run: RunId, last: Option<(&[u8], &[u8])>) -> Result<Head, StoreError> {
    let Some((k, v)) = last else {
        return Ok(Head::empty());
    };
    let seq = match parse_event_key(k) {
        Some((r, s)) if r == run => s,
        _ => {
            return Err(StoreError::Corrupted {
                run,
                seq: Seq(0),
                reason: "malformed event key at the end of the run".into(),
            })
        }
    };
    let rec = decode_record(run, Seq(seq), v)?;
    let next = seq.checked_add(1).ok_or_else(|| StoreError::Corrupted {
        run,
        seq: Seq(seq),
        reason: "seq overflow".into(),
    })?;
    Ok(Head { next_seq: Seq(next), last_hash: rec.hash, last_kind: Some(rec.kind) })
}

/// Iterates stored `(key, value)` pairs of one run as records (a [`RecordCheck`] over a
/// source of pairs).
pub(crate) struct Records<I> {
    src: I,
    check: RecordCheck,
}

impl<I> Records<I> {
    /// With `linked`, checks seq continuity and the chain link ([`crate::EventLog::read`]);
    /// without, only decodes (audit `scan`).
    pub(crate) fn new(run: RunId, src: I, from: Seq, prev: Hash32, linked: bool) -> Self {
        Records { src, check: RecordCheck::new(run, from, prev, linked) }
    }
}

impl<I, K, V> Iterator for Records<I>
where
    I: Iterator<Item = Result<(K, V), StoreError>>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.check.done {
            return None;
        }
        let kv = self.src.next()?;
        self.check.step(kv)
    }
}

/// The checks of one run's stored pairs, fed one pair at a time in key order. Linked, it
/// checks seq continuity and the chain link and ends the run after the first bad record;
/// unlinked (audit `scan`), it only decodes and still ends at the first undecodable record.
pub(crate) struct RecordCheck {
    run: RunId,
    next_seq: u64,
    prev: Hash32,
    linked: bool,
    done: bool,
}

impl RecordCheck {
    pub(crate) fn new(run: RunId, from: Seq, prev: Hash32, linked: bool) -> Self {
        RecordCheck { run, next_seq: from.0, prev, linked, done: false }
    }

    fn fail(&mut self, e: StoreError) -> Option<Result<Record, StoreError>> {
        self.done = true;
        Some(Err(e))
    }

    /// The record of the next stored pair; `None` once the run has ended.
    pub(crate) fn step<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        kv: Result<(K, V), StoreError>,
    ) -> Option<Result<Record, StoreError>> {
        self.step_prehashed(kv, Prehashed::Nothing)
    }

    /// [`RecordCheck::step`] with part of the pair's hashing done ahead ([`prehash`]).
    pub(crate) fn step_prehashed<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        kv: Result<(K, V), StoreError>,
        pre: Prehashed,
    ) -> Option<Result<Record, StoreError>> {
        if self.done {
            return None;
        }
        let (k, v) = match kv {
            Ok(kv) => kv,
            Err(e) => return self.fail(e),
        };
        let run = self.run;
        let seq = match parse_event_key(k.as_ref()) {
            Some((r, s)) if r == run => s,
            _ => {
                let seq = Seq(self.next_seq);
                return self.fail(StoreError::Corrupted { run, seq, reason: "malformed event key".into() });
            }
        };
        if self.linked && seq != self.next_seq {
            let expected = Seq(self.next_seq);
            return self.fail(StoreError::Corrupted {
                run,
                seq: expected,
                reason: format!(
                    "broken link: record missing, the next stored record has seq {seq} \
                     (record removed)"
                ),
            });
        }
        let mut rec = match decode_record(run, Seq(seq), v.as_ref()) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        rec.prev_hash = self.prev;
        if self.linked && digest::chain(&rec.prev_hash, &Self::digest_of(&rec, pre)) != rec.hash {
            return self.fail(StoreError::Corrupted {
                run,
                seq: Seq(seq),
                reason: if rec.schema_version >= 2 {
                    "broken link: stored hash is not SHA-256(previous hash || digest of the \
                     stored header and payload bytes) (payload or header altered, or a record \
                     removed, reordered or inserted; `verify` tells which)"
                } else {
                    "broken link: stored hash is not SHA-256(previous hash || digest of \
                     the stored header) (header altered, or a record removed, reordered \
                     or inserted; `verify` tells which)"
                }
                .into(),
            });
        }
        self.prev = rec.hash;
        match seq.checked_add(1) {
            Some(n) => self.next_seq = n,
            None => self.done = true,
        }
        Some(Ok(rec))
    }

    fn digest_of(rec: &Record, pre: Prehashed) -> Hash32 {
        match pre {
            Prehashed::Record(d) => {
                debug_assert_eq!(d, rec.digest(), "read-ahead record digest differs at seq {}", rec.seq);
                d
            }
            Prehashed::Payload(pd) if rec.schema_version >= 2 => {
                debug_assert_eq!(pd, rec.payload_digest(), "read-ahead payload digest differs at seq {}", rec.seq);
                rec.digest_at(rec.seq, Some(&pd))
            }
            _ => rec.digest(),
        }
    }
}
