//! The narrow seam the engine talks to: [`EventLog`], its record types and configuration.

use crate::envelope::codec::DECODE_BYTES_MAX;
use crate::envelope::digest;
use crate::error::StoreError;
use crate::types::{Hash32, Payload, RunId, Seq};

/// Schema version of the record envelope written by this build. Version 3 stores the
/// payload version and its record digest covers it and the stored payload bytes
/// ([`digest::record_digest_v3`]); version 2 records (payload bytes covered,
/// [`digest::record_digest_v2`]) and version 1 records (only the payload root,
/// [`digest::record_digest`]) are still read and verified, with payload version 1.
pub const SCHEMA_VERSION: u16 = 3;

/// Longest event kind name, in bytes.
pub const KIND_BYTES_MAX: usize = 256;

/// A record ready to append (built by [`prepare`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// [`Payload::kind`] of the payload (at most [`KIND_BYTES_MAX`] bytes).
    pub kind: String,
    /// When the record was made, µs since the Unix epoch (the caller's clock).
    pub time_us: i64,
    /// [`Payload::payload_version`] of the payload (stored, never interpreted).
    pub payload_version: u16,
    /// bincode-encoded payload ([`crate::envelope::codec::encode`]).
    pub payload: Vec<u8>,
    /// [`digest::payload_root_of`] the payload's `fields()`.
    pub payload_root: Hash32,
}

/// Encodes a payload and computes its payload root. Fails with `TooLarge` if the encoded
/// payload exceeds the default [`Limits::event_bytes_max`] (the store re-checks its own
/// configured limit on append).
pub fn prepare<P: Payload>(payload: &P, time_us: i64) -> Result<NewRecord, StoreError> {
    prepare_within(payload, time_us, &Limits::default())
}

/// [`prepare`] against the limits a store was opened with ([`EventLog::limits`]): a record
/// that passes is one that store accepts on size.
pub fn prepare_within<P: Payload>(payload: &P, time_us: i64, limits: &Limits) -> Result<NewRecord, StoreError> {
    let bytes = crate::envelope::codec::encode(payload)?;
    let max = limits.event_bytes_max;
    if bytes.len() > max {
        return Err(StoreError::TooLarge { what: "event", bytes: bytes.len(), max });
    }
    let kind = payload.kind();
    if kind.len() > KIND_BYTES_MAX {
        return Err(StoreError::TooLarge { what: "event kind", bytes: kind.len(), max: KIND_BYTES_MAX });
    }
    Ok(NewRecord {
        kind: kind.to_string(),
        time_us,
        payload_version: payload.payload_version(),
        payload: bytes,
        payload_root: digest::payload_root_of(&payload.fields()),
    })
}

/// A record read back.
#[derive(Clone, Debug)]
pub struct Record {
    /// The run it belongs to.
    pub run: RunId,
    /// Its position in the run's log.
    pub seq: Seq,
    /// The envelope's schema version (1-3; picks the record digest, docs/STORE.md).
    pub schema_version: u16,
    /// The event kind stored in the envelope.
    pub kind: String,
    /// When it was recorded, µs since the Unix epoch.
    pub time_us: i64,
    /// The payload's layout version as the domain stated it when appending (schema version
    /// 3); 1 for records of schema versions 1 and 2, which did not store one.
    pub payload_version: u16,
    /// The payload's stored bytes (bincode; decode with [`Record::decode`]).
    pub payload: Vec<u8>,
    /// [`digest::payload_root_of`] the payload's fields, as stored.
    pub payload_root: Hash32,
    /// Chain hash of the record before (zeros for seq 0).
    pub prev_hash: Hash32,
    /// This record's chain hash: `chain(prev_hash, record_digest(..))`.
    pub hash: Hash32,
}

impl Record {
    /// The version of this record's payload layout ([`Payload::payload_version`] of what
    /// was appended; 1 for records of schema versions 1 and 2). The domain reads it to
    /// upcast an older payload; the store never interprets it.
    pub fn payload_version(&self) -> u16 {
        self.payload_version
    }

    /// Decodes the payload; the error names run and seq.
    pub fn decode<P: Payload>(&self) -> Result<P, StoreError> {
        crate::envelope::codec::decode_serde(&self.payload).map_err(|reason| StoreError::Decode {
            run: self.run,
            seq: self.seq,
            reason,
        })
    }

    /// Decodes the payload of a record read with [`EventLog::read`], checked against what
    /// the chain covers; use it where the log is folded into state (resume, replay). A
    /// payload whose bytes were replaced and re-checksummed is never returned:
    ///
    /// - schema version 2: the record digest covers `SHA256(payload bytes)`, so `read`'s
    ///   link check already refused such a record (`Corrupted`, `broken link`); this only
    ///   decodes (no recomputation of `fields()`). It relies on the record coming from
    ///   `read`: a record from [`EventLog::scan`] (no link check) is checked by
    ///   [`crate::verify::verify_run`], not here.
    /// - schema version 1: the chain covers only the payload root, so this recomputes it
    ///   from `fields()` (a JSON conversion, several us per event) and returns
    ///   `Corrupted { run, seq, reason: "altered payload: ..." }` if it differs.
    pub fn decode_verified<P: Payload>(&self) -> Result<P, StoreError> {
        let payload: P = self.decode()?;
        if self.schema_version < 2 && digest::payload_root_of(&payload.fields()) != self.payload_root {
            return Err(StoreError::Corrupted {
                run: self.run,
                seq: self.seq,
                reason: "altered payload: the payload's fields do not hash to the chained \
                         payload root"
                    .into(),
            });
        }
        Ok(payload)
    }

    /// `SHA256` of the stored payload bytes ([`digest::payload_digest`]); part of the record
    /// digest from schema version 2 on.
    pub fn payload_digest(&self) -> Hash32 {
        digest::payload_digest(&self.payload)
    }

    /// The record digest of this record's stored header (and, from schema version 2, of its
    /// payload bytes; from version 3, of its payload version): [`digest::record_digest`] for
    /// version 1, [`digest::record_digest_v2`] for version 2, [`digest::record_digest_v3`]
    /// for version 3. Hashes the payload bytes from version 2 on.
    pub fn digest(&self) -> Hash32 {
        self.digest_at(self.seq, self.payload_digest_if_covered().as_ref())
    }

    /// [`Record::payload_digest`] if this record's version covers it (2 and later), else
    /// `None`.
    pub(crate) fn payload_digest_if_covered(&self) -> Option<Hash32> {
        (self.schema_version >= 2).then(|| self.payload_digest())
    }

    /// The digest this record would have at `seq`, given its payload digest if its version
    /// covers one (computed once by callers that try several seqs).
    pub(crate) fn digest_at(&self, seq: Seq, payload_digest: Option<&Hash32>) -> Hash32 {
        digest::record_digest_of_version(&digest::DigestInput {
            schema_version: self.schema_version,
            run: self.run,
            seq,
            kind: &self.kind,
            time_us: self.time_us,
            payload_version: self.payload_version,
            payload_root: &self.payload_root,
            payload_digest,
        })
    }
}

/// Where a run's log ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Seq the next append must pass as `expected` (= number of records).
    pub next_seq: Seq,
    /// Chain hash of the last record (zeros for an empty run).
    pub last_hash: Hash32,
    /// Kind of the last record.
    pub last_kind: Option<String>,
}

impl Head {
    /// The head of a run with no records.
    pub fn empty() -> Head {
        Head { next_seq: Seq(0), last_hash: [0; 32], last_kind: None }
    }
}

/// Idempotency-key claim made atomically with an append (normally a run's first).
/// A key held by another run with `expires_at_us > now_us` fails the append with
/// `DuplicateKey { existing }`; an expired claim is overwritten; a claim held by the same
/// run is refreshed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The idempotency key (at most `key_bytes_max` bytes).
    pub key: Vec<u8>,
    /// The caller's now, µs since the Unix epoch: a claim with `expires_at_us <= now_us`
    /// is expired.
    pub now_us: i64,
    /// When this claim expires, µs since the Unix epoch.
    pub expires_at_us: i64,
}

/// A streaming iterator of records.
pub type RecordIter = Box<dyn Iterator<Item = Result<Record, StoreError>> + Send + 'static>;

/// The records of several runs, run after run, each with the position of its run in the
/// list read ([`EventLog::read_runs`]).
pub type RunRecords<'a> = Box<dyn Iterator<Item = (usize, Result<Record, StoreError>)> + Send + 'a>;

/// The log proper: append, read and the run heads, with the payload store beside it
/// ([`crate::Payloads`]: large values referenced from records by digest). Coordination (leases, claims lookup,
/// snapshots, aux entries, due times) is [`crate::Coordination`]; the engine holds both as
/// one [`crate::Store`]. Object safe; no method has a default, so every backend and every
/// wrapper implements each on purpose.
pub trait EventLog: crate::Payloads + Send + Sync + 'static {
    /// Appends `records` to `run` all-or-nothing. `expected` must equal the run's next seq,
    /// else `Conflict { run, expected, actual }` and nothing is written. With a `claim`, the
    /// idempotency key is claimed in the same atomic write. Returns the new head, only once
    /// the batch is durable per the store's [`Durability`].
    fn append(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<Head, StoreError>;

    /// Streams the run's records from `from` in seq order, each CRC-checked and link-checked
    /// (`hash == chain(prev, record_digest(stored header))`, no gap; from schema version 2
    /// the record digest also covers the payload bytes). The first bad record
    /// yields `Err(Corrupted { run, seq, reason })` (or `UnknownVersion`) and the iteration
    /// ends; the records before it are yielded fine.
    fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError>;

    /// The run's head (`Head::empty()` for an unknown run).
    fn head(&self, run: RunId) -> Result<Head, StoreError>;

    /// Every run with at least one record, sorted.
    fn runs(&self) -> Result<Vec<RunId>, StoreError>;

    /// The runs of [`EventLog::runs`] whose ids lie in `lo..=hi`, sorted: what a run id
    /// prefix can name (`keel show 0c67a0`). The default filters `runs()`; the stores
    /// here read only that range of their run order. A store may add runs in the range it
    /// knows were committed but no longer holds (sled's manifest), so that a prefix names
    /// them and their use reports the loss.
    fn runs_between(&self, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
        Ok(self.runs()?.into_iter().filter(|r| (lo..=hi).contains(r)).collect())
    }

    /// Makes everything appended so far durable at the strongest level (power loss),
    /// whatever the configured mode.
    fn flush(&self) -> Result<(), StoreError>;

    /// The configured durability.
    fn durability(&self) -> Durability;

    /// The size limits this store enforces (its configured ones, which `prepare`'s default
    /// check may be looser or stricter than).
    fn limits(&self) -> Limits;

    /// What the store measured about the flushes that made appends durable (their
    /// latency, appends per flush). By default nothing: a store that never flushes (in
    /// memory) keeps this; the sled store reports its group commit.
    fn commit_stats(&self) -> crate::stats::CommitStats {
        crate::stats::CommitStats::default()
    }

    /// The whole logs of `runs`, one run after another in the order given, each exactly as
    /// [`EventLog::read`] from seq 0 yields it (same records, same checks; a run's first
    /// error ends that run, and the next run follows; an unknown run yields nothing). Each
    /// item carries the position of its run in `runs` (a run may be listed twice). For
    /// tools that go through many runs (offline replay). The sled store reads ahead on a
    /// second thread, so that sled's reads overlap with the caller's decoding and folding
    /// (docs/STORE.md); there, a panic inside sled ends the pass with a `Panicked` error
    /// for the run being read and one for each run not read, where `read` would unwind.
    /// A backend without read-ahead returns [`crate::read_runs_in_turn`]. Dropping the
    /// iterator early stops the reading.
    fn read_runs<'a>(&'a self, runs: &'a [RunId]) -> RunRecords<'a>;

    /// Audit view: the records stored for `run` from `from`, in key order, CRC-checked and
    /// decoded, WITHOUT the gap and chain-link checks of [`EventLog::read`]; `prev_hash` is
    /// the stored hash of the record stored before. [`crate::verify`] uses it to name exactly
    /// what is wrong past a broken link. A backend that cannot do better returns `read`.
    fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError>;
}

/// What a durable append survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Level {
    /// sled's flush (write + `sync_file_range`): survives a crash or `kill -9` of the
    /// process, not a power loss or kernel crash.
    ProcessCrash,
    /// sled's flush then `fdatasync` of sled's data file: survives power loss on a device
    /// that honours flushes.
    #[default]
    PowerLoss,
}

/// When an append returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// No flush: sled's background flusher (every 500 ms) only. Tests.
    None,
    /// Each append flushes on its own before returning.
    EveryAppend(Level),
    /// Concurrent appends share one flush; each returns once a flush that started after its
    /// write has completed.
    GroupCommit(Level),
}

impl Default for Durability {
    fn default() -> Self {
        Durability::GroupCommit(Level::PowerLoss)
    }
}

/// Size limits, each with its own `TooLarge { what }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Encoded payload bytes of one event (`what = "event"`). Default 64 KiB; at most
    /// [`Limits::VALUE_BYTES_HARD_MAX`] so that sled never moves a node holding events into its
    /// un-fsynced blob files (see docs/STORE.md).
    pub event_bytes_max: usize,
    /// Records per append (`what = "batch records"`). Default 1024.
    pub batch_records_max: usize,
    /// Snapshot state bytes (`what = "snapshot"`). Default 100 KiB.
    pub snapshot_bytes_max: usize,
    /// Idempotency key bytes (`what = "idempotency key"`). Default 512.
    pub key_bytes_max: usize,
}

impl Limits {
    /// Hard cap for `event_bytes_max` and `snapshot_bytes_max`.
    pub const VALUE_BYTES_HARD_MAX: usize = 128 * 1024;

    /// Refuses limits out of their ranges (`InvalidConfig`); checked when a store opens.
    #[cfg_attr(not(feature = "sled"), allow(dead_code))]
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        let bad = |reason: String| Err(StoreError::InvalidConfig { reason });
        if self.event_bytes_max == 0 || self.event_bytes_max > Self::VALUE_BYTES_HARD_MAX {
            return bad(format!("event_bytes_max {} not in 1..={}", self.event_bytes_max, Self::VALUE_BYTES_HARD_MAX));
        }
        if self.snapshot_bytes_max == 0 || self.snapshot_bytes_max > Self::VALUE_BYTES_HARD_MAX {
            return bad(format!(
                "snapshot_bytes_max {} not in 1..={}",
                self.snapshot_bytes_max,
                Self::VALUE_BYTES_HARD_MAX
            ));
        }
        if self.batch_records_max == 0 || self.batch_records_max > 65_536 {
            return bad(format!("batch_records_max {} not in 1..=65536", self.batch_records_max));
        }
        if self.key_bytes_max == 0 || self.key_bytes_max > 4096 {
            return bad(format!("key_bytes_max {} not in 1..=4096", self.key_bytes_max));
        }
        const _: () = assert!(Limits::VALUE_BYTES_HARD_MAX + 1024 < DECODE_BYTES_MAX);
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            event_bytes_max: 64 * 1024,
            batch_records_max: 1024,
            snapshot_bytes_max: 100 * 1024,
            key_bytes_max: 512,
        }
    }
}

/// How to open a `SledStore` (the `sled` feature).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// When an append returns (default: group commit, power-loss durable).
    pub durability: Durability,
    /// Size limits (validated at open: `InvalidConfig`).
    pub limits: Limits,
    /// sled's page cache size in bytes. Default 64 MiB.
    pub cache_capacity_bytes: u64,
    /// Create the store if there is none (default true); false => `NotFound`.
    pub create: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::default(),
            limits: Limits::default(),
            cache_capacity_bytes: 64 * 1024 * 1024,
            create: true,
        }
    }
}

/// [`crate::EventLog::read_runs`] on the caller's thread: `read` run after run (what a backend without
/// read-ahead returns, and what a one-core replay measures).
pub fn read_runs_in_turn<'a, L: crate::EventLog + ?Sized>(log: &'a L, runs: &'a [RunId]) -> RunRecords<'a> {
    Box::new(runs.iter().enumerate().flat_map(move |(i, &run)| {
        let records: crate::RecordIter = match log.read(run, Seq(0)) {
            Ok(it) => it,
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        records.map(move |r| (i, r))
    }))
}
