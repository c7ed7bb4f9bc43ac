//! Deep verification of a run's chain: every payload re-digested, every header re-hashed,
//! every link checked. Names the first bad record and says what is wrong with it.
//!
//! Reasons start with one of:
//! - `altered payload:` the payload no longer decodes or no longer hashes to the stored
//!   payload root (payload bytes changed);
//! - `altered header:` the stored header (kind, time, version, payload root) no longer hashes
//!   to the stored chain hash, while the next record still chains to that hash (for a
//!   schema-version-2 record, whose chain also covers the payload bytes, this includes
//!   payload bytes re-encoded without changing the payload's fields);
//! - `broken link:` the record does not chain to the record stored before it (a record was
//!   removed, reordered or inserted); the reason says at which seq it was written if that can
//!   be found among its neighbours.
//!
//! A removed record that leaves a hole in the seqs is a [`VerifyError::Gap`]. Removing the
//! tail of a run is only detectable against a head hash kept elsewhere (compare
//! [`VerifyReport::head`]); rewriting a record AND every hash after it likewise.

use crate::envelope::digest;
use crate::error::StoreError;
use crate::log::{EventLog, Record};
use crate::types::{Hash32, Payload, RunId, Seq};

/// A verified run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// The run verified.
    pub run: RunId,
    /// Records checked (= the run's next seq).
    pub records: u64,
    /// Chain hash of the last record (zeros for an empty run).
    pub head: Hash32,
}

/// Why a run did not verify.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A record does not chain or its payload does not hash to its stored root;
    /// `reason` says what was altered, removed, reordered or inserted.
    #[error("run {run} seq {seq} does not verify: {reason}")]
    Mismatch {
        /// The run concerned.
        run: RunId,
        /// The seq of the record concerned.
        seq: Seq,
        /// What was seen, in words.
        reason: String,
    },
    /// A record is missing below the head.
    #[error("run {run}: record {expected} missing (broken link: record removed), next stored is {found}")]
    Gap {
        /// The run concerned.
        run: RunId,
        /// The seq that is missing.
        expected: Seq,
        /// The seq of the next stored record.
        found: Seq,
    },
    /// The store failed while reading (other than damage `verify_run` diagnoses).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How far around a bad record [`verify_run`] looks for where it belongs.
const DIAGNOSE_WINDOW: u64 = 8;

/// Deep check of one run (see the module docs). Decodes every payload as `P`.
pub fn verify_run<P: Payload>(log: &dyn EventLog, run: RunId) -> Result<VerifyReport, VerifyError> {
    verify_run_with(log, run, |rec| rec.decode::<P>().map(|p| p.fields()).map_err(|e| e.to_string()))
}

/// [`verify_run`] with the payload's fields given by `fields_of` (the domain's reader of a
/// stored payload, e.g. one that decodes an older payload version in its own layout: the
/// chain covers the fields as written). An `Err` of `fields_of` is an altered payload.
pub fn verify_run_with(
    log: &dyn EventLog,
    run: RunId,
    fields_of: impl Fn(&crate::Record) -> Result<serde_json::Map<String, serde_json::Value>, String>,
) -> Result<VerifyReport, VerifyError> {
    let mut records = log.scan(run, Seq(0))?.peekable();
    let mut recent: Vec<Hash32> = Vec::new(); // stored hashes of seqs max(0, n-W-1)..n
    let mut prev = [0u8; 32];
    let mut n: u64 = 0;
    while let Some(item) = records.next() {
        let rec = item?;
        if rec.seq.0 != n {
            return Err(VerifyError::Gap { run, expected: Seq(n), found: rec.seq });
        }
        let mismatch = |reason: String| VerifyError::Mismatch { run, seq: rec.seq, reason };
        let fields = fields_of(&rec).map_err(|e| mismatch(format!("altered payload: does not decode: {e}")))?;
        if digest::payload_root_of(&fields) != rec.payload_root {
            return Err(mismatch(
                "altered payload: the payload root recomputed from the payload's fields \
                 differs from the stored one"
                    .into(),
            ));
        }
        // One SHA-256 of the payload bytes per record (version 2), reused by the diagnosis.
        let payload_digest = rec.payload_digest_if_covered();
        if digest::chain(&prev, &rec.digest_at(rec.seq, payload_digest.as_ref())) != rec.hash {
            let next = match records.peek() {
                Some(Ok(r)) => Some(r.clone()),
                _ => None,
            };
            return Err(mismatch(diagnose(&rec, payload_digest.as_ref(), &recent, next.as_ref())));
        }
        recent.push(rec.hash);
        if recent.len() as u64 > DIAGNOSE_WINDOW + 1 {
            recent.remove(0);
        }
        prev = rec.hash;
        n += 1;
    }
    // The store's head must agree with the chain walked. (A head AHEAD of it means records
    // were appended while verifying a live run: fine, they were not part of this walk.)
    let head = log.head(run)?;
    if head.next_seq < Seq(n) || (head.next_seq == Seq(n) && head.last_hash != prev) {
        return Err(VerifyError::Mismatch {
            run,
            seq: Seq(n.saturating_sub(1)),
            reason: format!(
                "broken link: the store's head (next seq {}) does not match the chain walked \
                 ({n} records)",
                head.next_seq
            ),
        });
    }
    Ok(VerifyReport { run, records: n, head: prev })
}

/// Explains why `rec` (at key seq n) does not chain to the record stored before it.
/// `recent` holds the stored hashes of the records just before it (the last is n-1).
fn diagnose(rec: &Record, payload_digest: Option<&Hash32>, recent: &[Hash32], next: Option<&Record>) -> String {
    let n = rec.seq.0;
    if let Some(nx) = next {
        if nx.seq.0 == n + 1 && digest::chain(&rec.hash, &nx.digest()) == nx.hash {
            return if rec.schema_version >= 2 {
                "altered header: the stored kind/time/version/payload root (or the payload \
                 bytes, re-encoded without changing its fields) no longer hash to the stored \
                 chain hash (the next record still chains to it)"
            } else {
                "altered header: the stored kind/time/version/payload root no longer hash \
                 to the stored chain hash (the next record still chains to it)"
            }
            .into();
        }
    }
    // Where was this record written? Try neighbouring seqs and neighbouring predecessors.
    let first_recent = n - recent.len() as u64;
    let mut prevs: Vec<(String, Hash32)> = vec![("no predecessor (seq 0)".into(), [0; 32])];
    for (i, h) in recent.iter().enumerate() {
        prevs.push((format!("the record now at seq {}", first_recent + i as u64), *h));
    }
    if let Some(nx) = next {
        prevs.push((format!("the record now at seq {}", nx.seq), nx.hash));
    }
    let lo = n.saturating_sub(DIAGNOSE_WINDOW);
    let hi = n.saturating_add(DIAGNOSE_WINDOW);
    for s in lo..=hi {
        let d = rec.digest_at(Seq(s), payload_digest);
        for (what, h) in &prevs {
            if digest::chain(h, &d) == rec.hash {
                return if s != n {
                    format!(
                        "broken link: this record was written as seq {s}, chained after {what} \
                         (records removed, reordered or inserted before it)"
                    )
                } else {
                    format!(
                        "broken link: this record was chained after {what}, not after the \
                         record now at seq {} (records removed, reordered or inserted)",
                        n.saturating_sub(1)
                    )
                };
            }
        }
    }
    if next.is_none() {
        "broken link or altered header: the stored hash matches no neighbouring predecessor \
         and no record follows to tell which (inserted, moved or altered last record)"
            .into()
    } else {
        "broken link: the stored hash chains to no neighbouring record of this run (a record \
         inserted here, or records removed before it)"
            .into()
    }
}
