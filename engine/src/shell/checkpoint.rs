//! Signed head checkpoints: with a signer (`EngineBuilder::checkpoint_signer`),
//! the engine periodically records every run's record count and head hash, signed, in the
//! store's auxiliary keyspace. A later `keel verify --key PUB` checks that each signed head
//! is still a prefix of its run's chain: history rewritten after a checkpoint, even with
//! every hash recomputed, no longer extends the signed head, and the forger cannot sign a
//! new checkpoint without the private key.
//!
//! The engine holds no cryptography: the signer is a trait object (keel-replay's Ed25519
//! key implements it). The bytes signed are [`message`] (docs/AUDIT.md).
//!
//! Layout: `keel/checkpoint/<at_us, 20 digits>/<part, 6 digits>` = one [`CheckpointPart`]
//! as JSON; a checkpoint of many runs is cut into parts of at most
//! [`CHECKPOINT_RUNS_MAX`] runs (fewer under a small value limit), each signed on its
//! own. The newest
//! [`CHECKPOINTS_KEPT`] checkpoints are kept (the newest covers every run).

use crate::error::EngineError;
use keel_store::{AuxWrite, Store};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Key prefix of checkpoint parts in the auxiliary keyspace.
pub const CHECKPOINT_PREFIX: &[u8] = b"keel/checkpoint/";
/// First line of the signed message and the `format` of a part.
pub const CHECKPOINT_FORMAT: &str = "keel-checkpoint/v1";
/// Most runs per checkpoint part (about 40 KiB of JSON); fewer if the store's value limit
/// (`event_bytes_max`) needs it.
pub const CHECKPOINT_RUNS_MAX: usize = 256;
/// Bytes a run takes in a part at most (`{"run":…,"records":…,"head":…}`), and the rest
/// of a part (format, key, signature).
const RUN_BYTES_MAX: usize = 160;
const PART_OVERHEAD_BYTES: usize = 512;
/// Checkpoints kept; older ones are removed when a new one is written.
pub const CHECKPOINTS_KEPT: usize = 8;
/// Default interval between checkpoints of a running service.
pub const CHECKPOINT_EVERY_MS_DEFAULT: u64 = 60_000;

/// Signs checkpoints. Implemented by keel-replay's `sign::SecretKey` (Ed25519).
pub trait HeadSigner: Send + Sync + 'static {
    /// The algorithm's name as recorded (`ed25519`).
    fn alg(&self) -> &'static str;
    /// The public key, hex: recorded with each part so a verifier can name it.
    fn public_hex(&self) -> String;
    /// The signature of `msg`, hex.
    fn sign_hex(&self, msg: &[u8]) -> String;
}

/// One run in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRun {
    /// Run id.
    pub run: String,
    /// Records of the run at the checkpoint.
    pub records: u64,
    /// Hash of its last record then, hex.
    pub head: String,
}

/// One signed part of a checkpoint, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPart {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// When the checkpoint was taken (the engine's clock), µs since the Unix epoch.
    pub at_us: i64,
    /// This part's index, from 0.
    pub part: u32,
    /// Parts of this checkpoint.
    pub parts: u32,
    /// The runs of this part, in run id order.
    pub runs: Vec<CheckpointRun>,
    /// Signature algorithm (`ed25519`).
    pub alg: String,
    /// The signer's public key, hex.
    pub key: String,
    /// The signature of [`message`], hex.
    pub sig: String,
}

/// The bytes a part's signature covers: `keel-checkpoint/v1\n`, `at_us <µs> part <i> of
/// <n>\n`, then `run <id> <records> <head>\n` per run.
pub fn message(at_us: i64, part: u32, parts: u32, runs: &[CheckpointRun]) -> Vec<u8> {
    let mut m = format!("{CHECKPOINT_FORMAT}\nat_us {at_us} part {part} of {parts}\n");
    for r in runs {
        m.push_str(&format!("run {} {} {}\n", r.run, r.records, r.head));
    }
    m.into_bytes()
}

/// The aux key of a part.
pub fn part_key(at_us: i64, part: u32) -> Vec<u8> {
    let mut k = CHECKPOINT_PREFIX.to_vec();
    k.extend_from_slice(format!("{:020}/{part:06}", at_us.max(0)).as_bytes());
    k
}

/// Every stored checkpoint part, oldest first (unparsed values with their keys).
pub fn stored_parts(log: &dyn Store) -> Result<Vec<keel_store::AuxEntry>, EngineError> {
    let mut hi = CHECKPOINT_PREFIX.to_vec();
    hi.push(0xff);
    let mut out = Vec::new();
    let mut lo = CHECKPOINT_PREFIX.to_vec();
    loop {
        let page = log.aux_range(&lo, &hi, 256)?;
        let Some((last, _)) = page.last() else { break };
        lo = last.clone();
        lo.push(0);
        let full = page.len() == 256;
        out.extend(page);
        if !full {
            break;
        }
    }
    Ok(out)
}

/// Writes a checkpoint of every run's head at `at_us`, then removes checkpoints beyond the
/// newest [`CHECKPOINTS_KEPT`]. Returns the runs covered.
pub fn write(log: &dyn Store, signer: &dyn HeadSigner, at_us: i64) -> Result<usize, EngineError> {
    let mut runs = Vec::new();
    for run in log.runs()? {
        let head = log.head(run)?;
        if head.next_seq.0 > 0 {
            runs.push(CheckpointRun {
                run: run.to_string(),
                records: head.next_seq.0,
                head: hex::encode(head.last_hash),
            });
        }
    }
    let covered = runs.len();
    let per_part = (log.limits().event_bytes_max.saturating_sub(PART_OVERHEAD_BYTES) / RUN_BYTES_MAX)
        .clamp(1, CHECKPOINT_RUNS_MAX);
    let chunks: Vec<&[CheckpointRun]> = if runs.is_empty() { vec![&[]] } else { runs.chunks(per_part).collect() };
    let parts = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let part = u32::try_from(i).unwrap_or(u32::MAX);
        let sig = signer.sign_hex(&message(at_us, part, parts, chunk));
        let value = CheckpointPart {
            format: CHECKPOINT_FORMAT.to_owned(),
            at_us,
            part,
            parts,
            runs: chunk.to_vec(),
            alg: signer.alg().to_owned(),
            key: signer.public_hex(),
            sig,
        };
        let bytes = serde_json::to_vec(&value).map_err(|e| EngineError::Internal(format!("checkpoint: {e}")))?;
        log.aux_put(&part_key(at_us, part), &bytes)?;
    }
    prune(log)?;
    log.flush()?;
    Ok(covered)
}

/// Removes the parts of all but the newest [`CHECKPOINTS_KEPT`] checkpoints.
fn prune(log: &dyn Store) -> Result<(), EngineError> {
    let parts = stored_parts(log)?;
    // The checkpoint a key belongs to: its `<at_us>` segment.
    let stamp = |k: &[u8]| k.get(CHECKPOINT_PREFIX.len()..CHECKPOINT_PREFIX.len() + 20).map(<[u8]>::to_vec);
    let mut stamps: Vec<Vec<u8>> = parts.iter().filter_map(|(k, _)| stamp(k)).collect();
    stamps.dedup();
    let Some(cut) = stamps.len().checked_sub(CHECKPOINTS_KEPT).and_then(|n| stamps.get(n)) else {
        return Ok(());
    };
    let old: Vec<AuxWrite> =
        parts.iter().filter(|(k, _)| stamp(k).is_some_and(|s| s < *cut)).map(|(k, _)| (k.clone(), None)).collect();
    for chunk in old.chunks(log.limits().batch_records_max.max(1)) {
        log.aux_apply(chunk.to_vec())?;
    }
    Ok(())
}

/// The engine's checkpoint settings (`EngineBuilder::checkpoint_signer`).
pub(crate) struct Checkpointing {
    pub signer: std::sync::Arc<dyn HeadSigner>,
    pub every_ms: u64,
    /// When the last checkpoint was written (monotonic).
    pub last: Mutex<Option<std::time::Instant>>,
}

impl Checkpointing {
    /// Writes a checkpoint now, at `now_us` (the engine's clock).
    pub(crate) fn write_now(&self, log: &dyn Store, now_us: i64) -> Result<(), EngineError> {
        write(log, self.signer.as_ref(), now_us)?;
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
        Ok(())
    }

    /// Writes a checkpoint if the interval passed since the last one (service workers call
    /// it on every tick); a failure is logged, the service goes on.
    pub(crate) fn tick(&self, log: &dyn Store, now_us: i64) {
        let due = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|t| t.elapsed().as_millis() >= u128::from(self.every_ms));
        if due {
            if let Err(e) = self.write_now(log, now_us) {
                tracing::warn!(error = %e, "cannot write a signed head checkpoint");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use keel_store::{prepare, EventLog, MemStore, RunId, Seq};

    /// Signs with SHA-256 of the message (no key: the engine only needs *a* signer).
    struct Digesting;
    impl HeadSigner for Digesting {
        fn alg(&self) -> &'static str {
            "test-sha256"
        }
        fn public_hex(&self) -> String {
            "00".repeat(32)
        }
        fn sign_hex(&self, msg: &[u8]) -> String {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(msg))
        }
    }

    fn parts(log: &dyn Store) -> Vec<CheckpointPart> {
        stored_parts(log).unwrap().iter().map(|(_, v)| serde_json::from_slice(v).unwrap()).collect()
    }

    #[test]
    fn a_checkpoint_signs_every_head_in_parts_and_only_the_newest_are_kept() {
        let log = MemStore::new();
        let n = CHECKPOINT_RUNS_MAX + 1;
        for i in 0..n {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let e = crate::Event::RunCancelled { by: "t".into(), reason: String::new() };
            log.append(RunId::from_bytes(id), Seq(0), vec![prepare(&e, 0).unwrap()], None).unwrap();
        }
        assert_eq!(write(&log, &Digesting, 1_000).unwrap(), n);
        let first = parts(&log);
        assert_eq!(first.len(), 2, "{n} runs make two parts");
        assert_eq!(first[0].runs.len() + first[1].runs.len(), n);
        for p in &first {
            assert_eq!((p.at_us, p.parts), (1_000, 2));
            assert_eq!(p.sig, Digesting.sign_hex(&message(p.at_us, p.part, p.parts, &p.runs)));
        }
        let head = log.head(first[0].runs[0].run.parse().unwrap()).unwrap();
        assert_eq!(first[0].runs[0].records, head.next_seq.0);
        assert_eq!(first[0].runs[0].head, hex::encode(head.last_hash));
        for t in 2..=(CHECKPOINTS_KEPT as i64 + 3) {
            write(&log, &Digesting, t * 1_000).unwrap();
        }
        let kept: std::collections::BTreeSet<i64> = parts(&log).iter().map(|p| p.at_us).collect();
        let newest: Vec<i64> = (4..=(CHECKPOINTS_KEPT as i64 + 3)).map(|t| t * 1_000).collect();
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), newest);
    }
}
