//! Appends: group commit. Callers hand their appends to one flusher task; it takes every
//! append waiting (up to [`FLUSH_APPENDS_MAX`] appends and [`FLUSH_BYTES_MAX`] payload
//! bytes) into ONE transaction, which locks the rows it decides on, decides each append in
//! arrival order in memory ([`plan`]), writes what was decided in one statement
//! ([`write_sql`]), and commits; then each caller gets its own outcome. Runs are locked in
//! sorted order (run by run its lease, then its head; then the keys claimed), so two
//! processes' flushes wait for each other instead of deadlocking. If a row appeared that the transaction did not lock (another
//! process created the same run or claimed the same new key at the same moment), the whole
//! transaction is rolled back and its appends are retried one per transaction, where the
//! row is then found and locked.

use crate::cached::Cached;
use crate::error::{connection_lost, PgError, Timed};
use crate::herald::Notices;
use crate::pool::Pool;
use deadpool_postgres::ClientWrapper as Client;
use keel_store::{backend, AuxWrite, Claim, Fence, Hash32, Head, NewRecord, RunId, Seq, StoreError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// Most appends one flush takes.
pub(crate) const FLUSH_APPENDS_MAX: usize = 256;
/// Most payload bytes one flush takes (the first append is always taken).
pub(crate) const FLUSH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Times one append is retried alone after losing a race for a new row.
const RACE_TRIES: u32 = 8;

/// One append waiting for a flush.
pub(crate) struct Append {
    pub(crate) run: RunId,
    pub(crate) expected: Seq,
    pub(crate) records: Vec<NewRecord>,
    pub(crate) claim: Option<Claim>,
    pub(crate) fence: Option<Fence>,
    /// Aux writes made with the records, in the same transaction (already checked).
    pub(crate) aux: Vec<AuxWrite>,
    /// The drive's end, recorded with the append where the flush can ([`End`]).
    pub(crate) end: Option<End>,
    pub(crate) reply: Reply,
}

/// The end of a drive an append carries (`AsyncAppend::append_ending_async`): recorded in
/// the queue by a flush in one statement ([`fast_sql`] with its ending part), as `done` by
/// `owner` with no due time, the append's fenced lease released; `recorded` is set once
/// that flush committed. A flush decided the locking way records none: the caller's
/// `done` does then.
pub(crate) struct End {
    pub(crate) owner: String,
    pub(crate) recorded: Arc<AtomicBool>,
}

/// Where an append's outcome goes: a thread blocked in `EventLog::append`, or the future
/// of an `AsyncAppend::append_async`.
pub(crate) enum Reply {
    Blocking(std::sync::mpsc::SyncSender<Result<Head, StoreError>>),
    Async(tokio::sync::oneshot::Sender<Result<Head, StoreError>>),
}

impl Reply {
    /// Hands over the outcome (the caller may have gone: nothing to answer then).
    fn send(self, outcome: Result<Head, StoreError>) {
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Async(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

impl Append {
    fn bytes(&self) -> usize {
        let records: usize = self.records.iter().map(|r| r.payload.len()).sum();
        let aux: usize = self.aux.iter().map(|(k, v)| k.len().saturating_add(v.as_ref().map_or(0, Vec::len))).sum();
        records.saturating_add(aux)
    }
}

/// How the flusher commits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlushMode {
    /// Appends per transaction at most (1: every append alone).
    pub(crate) appends_max: usize,
    /// `SET LOCAL synchronous_commit = off` (Durability::None).
    pub(crate) async_commit: bool,
    /// Flusher tasks (transactions in flight at once).
    pub(crate) flushers: usize,
}

/// Counters of the flusher (see [`crate::PgStats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) flushes: AtomicU64,
    pub(crate) appends: AtomicU64,
    pub(crate) fenced: AtomicU64,
    pub(crate) raced: AtomicU64,
    pub(crate) fast: AtomicU64,
    pub(crate) fast_missed: AtomicU64,
    /// Drives' ends recorded with their appends ([`End`]).
    pub(crate) ended: AtomicU64,
    /// Latency and appends of each committed flush (`EventLog::commit_stats`).
    pub(crate) commits: keel_store::stats::CommitMeter,
}

/// What the flusher takes: an append, or a WAL barrier.
pub(crate) enum Item {
    Append(Append),
    /// Answered once the WAL on disk holds every commit made before it was sent: by the
    /// synchronous commit of the next flush that writes appends (no commit of its own), or
    /// by a flush transaction of its own when there is none ([`flush_tx`]).
    /// A claim's grants wait for one before any granted lease is used.
    Barrier(tokio::sync::oneshot::Sender<Result<(), PgError>>),
}

/// The receiving end of the appends, shared by the flushers.
pub(crate) type Queue = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Item>>>;

/// A flusher task: runs until every sender is gone. With several (`EveryAppend`: one
/// transaction per append, as many at once as there are flushers), each takes its batch
/// under the queue's lock and commits on a session of its own.
pub(crate) async fn flusher(
    pool: Arc<Pool>,
    queue: Queue,
    mode: FlushMode,
    counters: Arc<Counters>,
    heads: Arc<Heads>,
    notices: Arc<Notices>,
) {
    let mut next: Option<Append> = None;
    loop {
        let mut rx = queue.lock().await;
        let mut barriers = Vec::new();
        let first = match next.take() {
            Some(a) => Some(a),
            None => match rx.recv().await {
                Some(Item::Append(a)) => Some(a),
                Some(Item::Barrier(b)) => {
                    barriers.push(b);
                    None
                }
                None => return,
            },
        };
        let mut bytes = first.as_ref().map_or(0, Append::bytes);
        let mut batch: Vec<Append> = first.into_iter().collect();
        while batch.len() < mode.appends_max {
            match rx.try_recv() {
                Ok(Item::Barrier(b)) => barriers.push(b),
                Ok(Item::Append(a)) if !batch.is_empty() && bytes.saturating_add(a.bytes()) > FLUSH_BYTES_MAX => {
                    next = Some(a);
                    break;
                }
                Ok(Item::Append(a)) => {
                    bytes = bytes.saturating_add(a.bytes());
                    batch.push(a);
                }
                Err(_) => break,
            }
        }
        drop(rx);
        let durable =
            !batch.is_empty() && flush(&pool, batch, mode, &counters, &heads, &notices).await && !mode.async_commit;
        if !barriers.is_empty() {
            let answer = if durable { Ok(()) } else { flush_alone(&pool).await };
            for b in barriers {
                let _ = b.send(answer.clone());
            }
        }
    }
}

/// A WAL flush of its own (for barriers no flush covered).
async fn flush_alone(pool: &Arc<Pool>) -> Result<(), PgError> {
    let attempt = async {
        let mut conn = pool.get().await?;
        let result = flush_tx(conn.client()?).await.map_err(PgError::of);
        match &result {
            Err(e) => conn.settled(e),
            Ok(()) => conn.settle(),
        }
        result
    };
    let bounds = pool.bounds();
    match tokio::time::timeout(bounds.call, attempt).await {
        Ok(result) => result,
        Err(_) => Err(PgError::Timeout { what: Timed::Commit, after_ms: bounds.call_ms() }),
    }
}

/// Runs one flush and answers every append of it: whether a transaction with appends in
/// it committed.
async fn flush(
    pool: &Arc<Pool>,
    batch: Vec<Append>,
    mode: FlushMode,
    counters: &Counters,
    heads: &Heads,
    notices: &Arc<Notices>,
) -> bool {
    let outcomes = match flush_once(pool, &batch, mode, counters, heads, notices).await {
        Ok(outcomes) => outcomes,
        Err(Failed::Raced) => {
            counters.raced.fetch_add(1, Ordering::Relaxed);
            let mut outcomes = Vec::with_capacity(batch.len());
            for a in &batch {
                outcomes.push(alone(pool, a, mode, counters, heads, notices).await);
            }
            outcomes
        }
        Err(Failed::Pg(e)) => batch.iter().map(|_| Err(e.clone().into())).collect(),
    };
    let committed = outcomes.iter().any(Result::is_ok);
    for (a, outcome) in batch.into_iter().zip(outcomes) {
        match &outcome {
            Ok(head) => heads.saw(a.run, head.clone()),
            Err(_) => heads.forget(a.run),
        }
        a.reply.send(outcome);
    }
    committed
}

/// One append in a transaction of its own, retried while it loses races for new rows.
async fn alone(
    pool: &Arc<Pool>,
    a: &Append,
    mode: FlushMode,
    counters: &Counters,
    heads: &Heads,
    notices: &Arc<Notices>,
) -> Result<Head, StoreError> {
    for _ in 0..RACE_TRIES {
        match flush_once(pool, std::slice::from_ref(a), mode, counters, heads, notices).await {
            Ok(mut outcomes) => return outcomes.pop().unwrap_or(Err(PgError::Closed.into())),
            Err(Failed::Raced) => counters.raced.fetch_add(1, Ordering::Relaxed),
            Err(Failed::Pg(e)) => return Err(e.into()),
        };
    }
    Err(PgError::Contention { run: a.run, tries: RACE_TRIES }.into())
}

enum Failed {
    /// A row appeared that the transaction did not lock, or the server broke a deadlock:
    /// nothing was written; retry one append per transaction.
    Raced,
    /// Nothing was written ([`PgError::InDoubt`]: maybe it was).
    Pg(PgError),
}

fn failed(e: tokio_postgres::Error) -> Failed {
    let raced = matches!(
        e.code(),
        Some(c) if *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
    );
    if raced {
        Failed::Raced
    } else {
        Failed::Pg(PgError::of(e))
    }
}

async fn flush_once(
    pool: &Arc<Pool>,
    batch: &[Append],
    mode: FlushMode,
    counters: &Counters,
    heads: &Heads,
    notices: &Arc<Notices>,
) -> Result<Vec<Result<Head, StoreError>>, Failed> {
    let bounds = pool.bounds();
    let start = std::time::Instant::now();
    let committing = AtomicBool::new(false);
    let attempt = async {
        let mut conn = pool.get().await.map_err(Failed::Pg)?;
        let client = conn.client().map_err(Failed::Pg)?;
        let result = transaction(client, batch, mode, &committing, heads, counters, notices).await;
        // Every statement was answered: the session goes back unless its connection went.
        match &result {
            Err(Failed::Pg(e)) => conn.settled(e),
            _ => conn.settle(),
        }
        result
    };
    // Cut after the call timeout: dropping `attempt` drops its session mid-statement (not
    // reused, its statement cancelled); the transaction, never committed, is rolled back.
    let result = match tokio::time::timeout(bounds.call, attempt).await {
        Ok(Err(Failed::Pg(e))) => Err(Failed::Pg(e.with_statement_ms(bounds.statement_ms()))),
        Ok(result) => result,
        Err(_) => {
            let what = if committing.load(Ordering::Relaxed) { Timed::Commit } else { Timed::Call };
            Err(Failed::Pg(PgError::Timeout { what, after_ms: bounds.call_ms() }))
        }
    };
    if let Ok(outcomes) = &result {
        counters.flushes.fetch_add(1, Ordering::Relaxed);
        let durable = outcomes.iter().filter(|o| o.is_ok()).count();
        counters.commits.flushed(keel_store::stats::micros_since(start), u64::try_from(durable).unwrap_or(u64::MAX));
        for o in outcomes {
            match o {
                Ok(_) => counters.appends.fetch_add(1, Ordering::Relaxed),
                Err(StoreError::Fenced { .. }) => counters.fenced.fetch_add(1, Ordering::Relaxed),
                Err(_) => 0,
            };
        }
    }
    result
}

// The rows of a flush are found through each table's primary key, one key at a time in
// the order given (sorted by the caller: every flush locks in one order), whatever the
// table's size: `WHERE run = ANY($1)` was planned as a scan of the whole table on small
// tables (a generic plan cannot see the array's length; seen on a table of 1,000 runs),
// and the updates as hash joins over such a scan. The updates are upserts of rows that
// exist and are locked by the flush: each row is found through the arbiter index.
/// The lease (of the fenced runs only) and the head of each run of a flush, locked, in one
/// statement: run by run in the order given (sorted), the lease row, then the head row (as
/// the plan runs the two lookups; the SQL does not fix their order within a run). Every
/// flush locks in that order; a claim locks no head row, passes over lease rows others
/// hold (`SKIP LOCKED`) and grants in run order; so two keel transactions do not wait for
/// each other in a cycle, and a deadlock the server breaks anyway (as with a flush of an
/// older build, which locked all leases then all heads) is a lost race: retried. A run
/// without a row (a new run's head, a fenced run without a lease) gives NULLs.
pub(crate) const LOCK_SQL: &str = "SELECT k.run, l.epoch, h.next_seq, h.last_hash, h.last_kind
     FROM unnest($1::uuid[], $2::bool[]) AS k(run, fenced)
     LEFT JOIN LATERAL (SELECT epoch FROM leases WHERE leases.run = k.run AND k.fenced FOR UPDATE) l ON true
     LEFT JOIN LATERAL (SELECT next_seq, last_hash, last_kind FROM heads WHERE heads.run = k.run FOR UPDATE) h
       ON true";
pub(crate) const CLAIMS_SQL: &str = "SELECT c.key, c.run, c.expires_at_us FROM unnest($1::bytea[]) AS k(key)
     CROSS JOIN LATERAL (SELECT key, run, expires_at_us FROM claims WHERE claims.key = k.key FOR UPDATE) c";

/// The aux writes of one step, as parts of one statement: removals, plain puts (a removal
/// or plain put of a counter's key drops its shards), and counter adds, each to this
/// session's shard of the counter (schema migration 4: concurrent transactions of
/// different sessions seldom wait for each other's row lock on one counter; a read sums
/// the shards). A plain entry stored under a counter's key (an `aux_put`) is folded into
/// the counter first, as the in-process backends read it: a key is in one table or the
/// other. The keys of the parts are disjoint (one write per key), so no row is touched
/// twice.
///
/// A part with nothing to write is left out of the statement, not run with an empty array
/// (a generic plan cannot skip it: the counters' removal, empty in almost every step, was
/// a scan of the counters table on each flush).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AuxParts {
    pub(crate) removed: bool,
    pub(crate) uncounted: bool,
    pub(crate) put: bool,
    pub(crate) counted: bool,
}

impl AuxParts {
    /// The set whose [`AuxParts::index`] is `b` (its low four bits).
    pub(crate) fn from_bits(b: u8) -> AuxParts {
        AuxParts { removed: b & 1 != 0, uncounted: b & 2 != 0, put: b & 4 != 0, counted: b & 8 != 0 }
    }

    pub(crate) fn index(self) -> usize {
        usize::from(self.removed)
            | usize::from(self.uncounted) << 1
            | usize::from(self.put) << 2
            | usize::from(self.counted) << 3
    }
}

/// The common table expressions of `parts`, numbering their parameters with `next`, in
/// this order of the parts present: removed keys; uncounted keys; put keys and values;
/// counter keys, deltas and [`COUNTER_SHARDS`].
fn aux_ctes(parts: AuxParts, next: &mut dyn FnMut() -> usize, guard: Guard) -> Vec<String> {
    let (and, wher) = (guard.and(), guard.wher());
    let mut ctes = Vec::new();
    if parts.removed {
        ctes.push(format!("removed AS (DELETE FROM aux WHERE key = ANY(${}){and})", next()));
    }
    if parts.uncounted {
        ctes.push(format!("uncounted AS (DELETE FROM counters WHERE key = ANY(${}){and})", next()));
    }
    if parts.put {
        let (k, v) = (next(), next());
        ctes.push(format!(
            "put AS (INSERT INTO aux (key, value) SELECT * FROM unnest(${k}::bytea[], ${v}::bytea[]){wher}
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value)"
        ));
    }
    if parts.counted {
        let (k, d, shards) = (next(), next(), next());
        ctes.push(format!("plain AS (DELETE FROM aux WHERE key = ANY(${k}){and} RETURNING key, value)"));
        ctes.push(format!(
            "counted AS (
             INSERT INTO counters (key, shard, value)
             SELECT t.k, pg_backend_pid() % ${shards}, t.d + coalesce((
                 SELECT ('x' || encode(p.value, 'hex'))::bit(64)::bigint FROM plain p
                 WHERE p.key = t.k AND length(p.value) = 8), 0)
             FROM unnest(${k}::bytea[], ${d}::bigint[]) AS t(k, d){wher}
             ON CONFLICT (key, shard) DO UPDATE SET value = counters.value + EXCLUDED.value)"
        ));
    }
    ctes
}

/// Whether a statement's writes are made only if its checks held ([`fast_sql`]).
#[derive(Clone, Copy)]
enum Guard {
    None,
    /// Each write reads `chk`'s verdict first (which takes the checks' row locks before
    /// any write) and writes nothing if it is false.
    Checked,
}

impl Guard {
    const CHECK: &'static str = "(SELECT ok FROM chk)";

    fn and(self) -> String {
        match self {
            Guard::None => String::new(),
            Guard::Checked => format!(" AND {}", Guard::CHECK),
        }
    }

    fn wher(self) -> String {
        match self {
            Guard::None => String::new(),
            Guard::Checked => format!(" WHERE {}", Guard::CHECK),
        }
    }
}

/// A counter from 1: the parameter numbers of one statement.
fn numbering() -> impl FnMut() -> usize {
    let mut n = 0;
    move || {
        n += 1;
        n
    }
}

/// The aux writes of `parts` alone, one statement (see [`AuxParts`] for the parameters).
pub(crate) fn aux_sql(parts: AuxParts) -> String {
    format!("WITH {} SELECT 1", aux_ctes(parts, &mut numbering(), Guard::None).join(",\n     "))
}

/// [`aux_sql`] of every set of parts, by [`AuxParts::index`] (index 0, no part, is empty).
static AUX_SQLS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    (0u8..16).map(|b| if b == 0 { String::new() } else { aux_sql(AuxParts::from_bits(b)) }).collect()
});

/// The parts of a flush's writes besides its events: heads updated (rows the flush
/// locked) and inserted (new runs), claims updated and inserted, and its aux writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WriteParts {
    pub(crate) heads_updated: bool,
    pub(crate) heads_inserted: bool,
    pub(crate) claims_updated: bool,
    pub(crate) claims_inserted: bool,
    pub(crate) aux: AuxParts,
}

impl WriteParts {
    /// The set whose [`WriteParts::index`] is `b`.
    #[cfg(test)]
    pub(crate) fn from_bits(b: u8) -> WriteParts {
        WriteParts {
            heads_updated: b & 1 != 0,
            heads_inserted: b & 2 != 0,
            claims_updated: b & 4 != 0,
            claims_inserted: b & 8 != 0,
            aux: AuxParts::from_bits(b >> 4),
        }
    }

    pub(crate) fn index(self) -> usize {
        usize::from(self.heads_updated)
            | usize::from(self.heads_inserted) << 1
            | usize::from(self.claims_updated) << 2
            | usize::from(self.claims_inserted) << 3
            | self.aux.index() << 4
    }
}

/// Every write of a flush in ONE statement (one message and one answer, where one
/// statement per table cost the server a message, a bind and an answer each): the events,
/// then the parts present, each a common table expression, parameters in this order:
/// the events' runs, seqs and values; the heads updated (runs, next seqs, hashes, kinds),
/// the heads inserted (the same four); the claims updated (keys, runs, expiries), the
/// claims inserted (the same three); the aux parts ([`aux_ctes`]). The heads and claims
/// updated are upserts of rows the flush locked (found through the arbiter index); those
/// inserted have no `ON CONFLICT`: a row another process inserted since the locks were
/// taken is a unique violation, which fails the statement (and its COMMIT, already sent,
/// rolls back): a lost race. The parts write disjoint rows.
pub(crate) fn write_sql(parts: WriteParts) -> String {
    let mut next = numbering();
    format!("WITH {} SELECT 1", write_ctes(parts, &mut next, Guard::None).join(",\n     "))
}

/// The common table expressions of [`write_sql`], numbered with `next`, each guarded by
/// `guard`.
fn write_ctes(parts: WriteParts, next: &mut dyn FnMut() -> usize, guard: Guard) -> Vec<String> {
    let wher = guard.wher();
    let (r, s, v) = (next(), next(), next());
    let mut ctes = vec![format!(
        "ev AS (INSERT INTO events (run, seq, value) SELECT * FROM unnest(${r}::uuid[], ${s}::bigint[], ${v}::bytea[]){wher})"
    )];
    let heads = |next: &mut dyn FnMut() -> usize| {
        let (r, n, h, k) = (next(), next(), next(), next());
        format!(
            "INSERT INTO heads (run, next_seq, last_hash, last_kind)
             SELECT * FROM unnest(${r}::uuid[], ${n}::bigint[], ${h}::bytea[], ${k}::text[]){wher}"
        )
    };
    if parts.heads_updated {
        ctes.push(format!(
            "hu AS ({} ON CONFLICT (run) DO UPDATE
               SET next_seq = EXCLUDED.next_seq, last_hash = EXCLUDED.last_hash, last_kind = EXCLUDED.last_kind)",
            heads(next)
        ));
    }
    if parts.heads_inserted {
        ctes.push(format!("hi AS ({})", heads(next)));
    }
    let claims = |next: &mut dyn FnMut() -> usize| {
        let (k, r, e) = (next(), next(), next());
        format!(
            "INSERT INTO claims (key, run, expires_at_us) SELECT * FROM unnest(${k}::bytea[], ${r}::uuid[], ${e}::bigint[]){wher}"
        )
    };
    if parts.claims_updated {
        ctes.push(format!(
            "cu AS ({} ON CONFLICT (key) DO UPDATE SET run = EXCLUDED.run, expires_at_us = EXCLUDED.expires_at_us)",
            claims(next)
        ));
    }
    if parts.claims_inserted {
        ctes.push(format!("ci AS ({})", claims(next)));
    }
    ctes.extend(aux_ctes(parts.aux, next, guard));
    ctes
}

/// A flush whose every run's head this process knows ([`Heads`]) in ONE statement, its
/// own transaction (no BEGIN, no COMMIT: one message, one answer, where the locking read
/// first costs a round trip more and two statements): `chk` locks, run by run in order,
/// the lease row (of fenced runs) and the head row, as [`LOCK_SQL`] does, and checks what
/// the flush assumed: the lease's epoch is the fence's, the head is the one known (seq and
/// hash); every write ([`write_ctes`], only heads updated, no claims) reads that verdict
/// first and writes nothing if it is false; the statement returns it. Parameters: the
/// runs, whether fenced, the fences' epochs, the heads' next seqs and hashes, then
/// [`write_sql`]'s.
pub(crate) fn fast_sql(aux: AuxParts, ending: bool) -> String {
    let mut next = numbering();
    let (r, f, e, n, h) = (next(), next(), next(), next(), next());
    let chk = format!(
        "chk AS (
         SELECT coalesce(bool_and(coalesce(
                  (NOT k.fenced OR l.epoch = k.epoch) AND hd.next_seq = k.next_seq AND hd.last_hash = k.hash,
                  false)), false) AS ok
         FROM unnest(${r}::uuid[], ${f}::bool[], ${e}::bigint[], ${n}::bigint[], ${h}::bytea[])
           AS k(run, fenced, epoch, next_seq, hash)
         LEFT JOIN LATERAL (SELECT epoch FROM leases WHERE leases.run = k.run AND k.fenced FOR UPDATE) l ON true
         LEFT JOIN LATERAL (SELECT next_seq, last_hash FROM heads WHERE heads.run = k.run FOR UPDATE) hd ON true)"
    );
    let parts =
        WriteParts { heads_updated: true, heads_inserted: false, claims_updated: false, claims_inserted: false, aux };
    let mut ctes = vec![chk];
    ctes.extend(write_ctes(parts, &mut next, Guard::Checked));
    if !ending {
        return format!("WITH {} SELECT ok FROM chk", ctes.join(",\n     "));
    }
    ctes.extend(ending_ctes(&mut next));
    format!("WITH {} SELECT ok, (SELECT count(*) FROM e_told) FROM chk", ctes.join(",\n     "))
}

/// The drives' ends some appends of a one-statement flush carry ([`End`]), as `done`
/// records them (`queue::DONE_SQL`, no due time), each write reading the flush's verdict
/// first: the runs, their owners and the epochs of their fenced leases; a run queued again
/// meanwhile (`again`) goes round once more, any other leaves the queue; the lease is
/// released (only by its epoch: a lease taken over since is left); then the notification
/// (channel, schema, and whether this flush sends it: [`Herald`]).
fn ending_ctes(next: &mut dyn FnMut() -> usize) -> Vec<String> {
    let check = Guard::CHECK;
    let (r, o, e, ch, sc, tell) = (next(), next(), next(), next(), next(), next());
    vec![
        format!("e AS (SELECT * FROM unnest(${r}::uuid[], ${o}::text[], ${e}::bigint[]) AS e(run, owner, epoch))"),
        // Each run's queue row and lease row found by primary key, one run at a time
        // (joined with the array, the generic plans scanned both tables whole), then
        // written by key. The lease rows are the ones `chk` locked; a queue row a push
        // marked `again` meanwhile is passed over by the delete (its condition is checked
        // again on the row as the push left it), as `done` passes it over: it stays
        // queued, to go round again.
        "e_w AS (SELECT e.run, w.again FROM e CROSS JOIN LATERAL
                (SELECT again FROM work WHERE work.run = e.run AND work.claimed_by = e.owner OFFSET 0) w)"
            .to_owned(),
        "e_l AS (SELECT e.run FROM e CROSS JOIN LATERAL
                (SELECT 1 FROM leases WHERE leases.run = e.run AND leases.epoch = e.epoch
                   AND leases.owner IS NOT NULL OFFSET 0) l)"
            .to_owned(),
        format!(
            "e_again AS (UPDATE work SET again = false, claimed_by = NULL
                WHERE run = ANY(ARRAY(SELECT run FROM e_w WHERE again)) AND again AND {check})"
        ),
        format!(
            "e_gone AS (DELETE FROM work
                WHERE run = ANY(ARRAY(SELECT run FROM e_w WHERE NOT again)) AND NOT again AND {check})"
        ),
        format!(
            "e_free AS (UPDATE leases SET owner = NULL, epoch = epoch + 1
                WHERE run = ANY(ARRAY(SELECT run FROM e_l)) AND {check})"
        ),
        format!("e_told AS (SELECT pg_notify(${ch}, ${sc}) WHERE ${tell}::bool AND {check})"),
    ]
}

/// [`fast_sql`] of every set of aux parts without and with drives' ends, by
/// [`AuxParts::index`] (plus 16 with ends).
static FAST_SQLS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    [false, true]
        .into_iter()
        .flat_map(|ending| (0u8..16).map(move |b| fast_sql(AuxParts::from_bits(b), ending)))
        .collect()
});

/// Most runs whose heads a store remembers ([`Heads`]); past it, it starts over.
const HEADS_KNOWN_MAX: usize = 65_536;

/// The heads this process last saw for runs: after a fold's read (its last record) and
/// after each append it flushed; forgotten on any refusal. Only a hint: [`fast_sql`]
/// checks each under its row lock, and a flush whose hint was wrong writes nothing and
/// goes the locking way.
#[derive(Debug, Default)]
pub(crate) struct Heads(std::sync::Mutex<std::collections::HashMap<RunId, Head>>);

impl Heads {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<RunId, Head>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn saw(&self, run: RunId, head: Head) {
        let mut map = self.map();
        if map.len() >= HEADS_KNOWN_MAX && !map.contains_key(&run) {
            map.clear();
        }
        map.insert(run, head);
    }

    fn forget(&self, run: RunId) {
        self.map().remove(&run);
    }

    fn get(&self, run: RunId) -> Option<Head> {
        self.map().get(&run).cloned()
    }
}

/// [`write_sql`] of every set of parts, by [`WriteParts::index`], made at first use.
static WRITE_SQLS: std::sync::LazyLock<Vec<std::sync::OnceLock<String>>> =
    std::sync::LazyLock::new(|| (0..256).map(|_| std::sync::OnceLock::new()).collect());

fn write_sql_of(parts: WriteParts) -> std::borrow::Cow<'static, str> {
    match WRITE_SQLS.get(parts.index()) {
        Some(cell) => std::borrow::Cow::Borrowed(cell.get_or_init(|| write_sql(parts))),
        // Not reached: an index has eight bits.
        None => std::borrow::Cow::Owned(write_sql(parts)),
    }
}

/// BEGIN a transaction that commits without waiting for the WAL flush.
const BEGIN_ASYNC: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// Prepares `sqls` on the session: from its statement cache after the first time (no
/// round trip). Statements sent together with a BEGIN or a COMMIT must be prepared first:
/// one that is not would be parsed first and executed after the COMMIT sent behind it.
pub(crate) async fn warm(client: &Client, sqls: &[&str]) -> Result<(), tokio_postgres::Error> {
    for sql in sqls {
        client.prepare_cached(sql).await?;
    }
    Ok(())
}

/// [`warm`] for a flush's locking reads (its writes are prepared as they are chosen,
/// [`write`]).
async fn warm_flush(client: &Client) -> Result<(), tokio_postgres::Error> {
    warm(client, &[LOCK_SQL, CLAIMS_SQL]).await
}

/// Locks, plans, writes and commits one flush in two round trips: BEGIN with the locking
/// reads, then the writes with the COMMIT (a write that fails aborts the transaction, and
/// the COMMIT behind it rolls back).
async fn transaction(
    client: &mut Client,
    batch: &[Append],
    mode: FlushMode,
    committing: &AtomicBool,
    heads: &Heads,
    counters: &Counters,
    notices: &Arc<Notices>,
) -> Result<Vec<Result<Head, StoreError>>, Failed> {
    if let Some(fast) = Fast::of(batch, mode, heads) {
        counters.fast.fetch_add(1, Ordering::Relaxed);
        if let Some(outcomes) = fast.run(client, committing, notices).await? {
            return Ok(outcomes);
        }
        // A head or lease was not as known: nothing written; the locking way decides.
        counters.fast_missed.fetch_add(1, Ordering::Relaxed);
        committing.store(false, Ordering::Relaxed);
    }
    warm_flush(client).await.map_err(failed)?;
    // Each run of the batch once, in order, and whether an append of it is fenced.
    let mut runs: BTreeMap<Uuid, bool> = BTreeMap::new();
    for a in batch {
        let fenced = a.fence.is_some_and(|f| f.run == a.run);
        let entry = runs.entry(a.run.0).or_insert(false);
        *entry = *entry || fenced;
    }
    let (runs, fenced): (Vec<Uuid>, Vec<bool>) = runs.into_iter().unzip();
    let mut keys: Vec<&[u8]> = batch.iter().filter_map(|a| a.claim.as_ref().map(|c| c.key.as_slice())).collect();
    keys.sort();
    keys.dedup();

    // Sent together (one round trip), executed in this order: the locks are taken run by
    // run (lease, then head), then the claims'.
    // The flusher's sessions start with `synchronous_commit = on` (their connection
    // options, `store.rs`; the lazy ones, `off`, never append), not the server's default:
    // an operator default of `off` would make acknowledged appends (and the WAL barriers a
    // flush answers) lose durability.
    let begin = if mode.async_commit { BEGIN_ASYNC } else { "BEGIN" };
    let rows = {
        let client: &Client = client;
        let rows = async { client.rows(LOCK_SQL, &[&runs, &fenced]).await };
        let claims = async {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            client.rows(CLAIMS_SQL, &[&keys]).await
        };
        match tokio::try_join!(biased; client.batch_execute(begin), rows, claims) {
            Ok(((), rows, claims)) => Ok((rows, claims)),
            Err(e) => Err(e),
        }
    };
    let (rows, claims) = match rows {
        Ok(read) => read,
        Err(e) => return Err(rolled_back(client, e).await),
    };
    let locked = match locked(rows, claims) {
        Ok(locked) => locked,
        Err(e) => return Err(rolled_back(client, e).await),
    };
    let plan = plan(batch.iter().map(Intent::of), locked);
    if plan.events.is_empty() {
        client.batch_execute("ROLLBACK").await.map_err(failed)?;
        return Ok(plan.outcomes);
    }
    // The writes' statement is sent with the COMMIT: prepared first (see [`warm`]).
    let writes = Writes::of(&plan);
    if let Err(e) = client.prepare_cached(&writes.sql()).await {
        return Err(rolled_back(client, e).await);
    }
    // From here the outcome is in doubt if the connection goes or the call is cut.
    committing.store(true, Ordering::Relaxed);
    write(client, &writes).await?;
    Ok(plan.outcomes)
}

/// A flush sent as one statement ([`fast_sql`]): every append of it is to a run whose
/// head this process knows, at that head, with no key claimed, one append per run, on a
/// store whose commits wait for the WAL flush. Planned as the locking way would plan it
/// if the rows were as known; the statement checks that they are.
struct Fast {
    plan: Plan,
    runs: Vec<Uuid>,
    fenced: Vec<bool>,
    epochs: Vec<i64>,
    next_seqs: Vec<i64>,
    hashes: Vec<Vec<u8>>,
    /// The drives' ends carried (fenced appends only): runs, owners, lease epochs, and
    /// where each is told it was recorded.
    end_runs: Vec<Uuid>,
    end_owners: Vec<String>,
    end_epochs: Vec<i64>,
    end_flags: Vec<Arc<AtomicBool>>,
}

impl Fast {
    fn of(batch: &[Append], mode: FlushMode, heads: &Heads) -> Option<Fast> {
        if mode.async_commit {
            return None;
        }
        let mut known: BTreeMap<Uuid, (Option<u64>, Head)> = BTreeMap::new();
        for a in batch {
            if a.claim.is_some() {
                return None;
            }
            let head = heads.get(a.run)?;
            if head.next_seq != a.expected || head.next_seq.0 == 0 {
                return None;
            }
            let epoch = match a.fence {
                Some(f) if f.run == a.run => Some(f.epoch),
                Some(_) => return None,
                None => None,
            };
            if known.insert(a.run.0, (epoch, head)).is_some() {
                return None;
            }
        }
        let mut locked = Locked::default();
        let mut f = Fast {
            plan: Plan::default(),
            runs: Vec::with_capacity(known.len()),
            fenced: Vec::with_capacity(known.len()),
            epochs: Vec::with_capacity(known.len()),
            next_seqs: Vec::with_capacity(known.len()),
            hashes: Vec::with_capacity(known.len()),
            end_runs: Vec::new(),
            end_owners: Vec::new(),
            end_epochs: Vec::new(),
            end_flags: Vec::new(),
        };
        for a in batch {
            if let (Some(end), Some(fence)) = (&a.end, a.fence.filter(|f| f.run == a.run)) {
                f.end_runs.push(a.run.0);
                f.end_owners.push(end.owner.clone());
                f.end_epochs.push(i64::try_from(fence.epoch).ok()?);
                f.end_flags.push(end.recorded.clone());
            }
        }
        for (run, (epoch, head)) in known {
            f.runs.push(run);
            f.fenced.push(epoch.is_some());
            f.epochs.push(match epoch {
                Some(e) => i64::try_from(e).ok()?,
                None => 0,
            });
            f.next_seqs.push(i64::try_from(head.next_seq.0).ok()?);
            f.hashes.push(head.last_hash.to_vec());
            if let Some(e) = epoch {
                locked.epochs.insert(RunId(run), e);
            }
            locked.heads.insert(RunId(run), Ok(head));
        }
        f.plan = plan(batch.iter().map(Intent::of), locked);
        if f.plan.events.is_empty() || f.plan.outcomes.iter().any(Result::is_err) {
            return None;
        }
        Some(f)
    }

    /// Sends the statement: the outcomes if its checks held and it committed, `None` if
    /// they did not hold or it failed otherwise (nothing written either way: one
    /// statement is one transaction); a connection lost is in doubt.
    async fn run(
        self,
        client: &Client,
        committing: &AtomicBool,
        notices: &Arc<Notices>,
    ) -> Result<Option<Vec<Result<Head, StoreError>>>, Failed> {
        let ending = !self.end_runs.is_empty();
        // Told at this commit only if the store sent none lately (else owed, below).
        let tell = ending && notices.herald.take_window();
        let held = {
            let writes = Writes::of(&self.plan);
            let index = writes.aux.parts().index() + if ending { 16 } else { 0 };
            let Some(sql) = FAST_SQLS.get(index) else { return Ok(None) };
            let mut params: Vec<&(dyn ToSql + Sync)> =
                vec![&self.runs, &self.fenced, &self.epochs, &self.next_seqs, &self.hashes];
            params.extend(writes.params());
            if ending {
                params.extend([
                    &self.end_runs as &(dyn ToSql + Sync),
                    &self.end_owners,
                    &self.end_epochs,
                    &crate::herald::CHANNEL,
                    &notices.schema,
                    &tell,
                ]);
            }
            // Prepared before anything is in doubt (the first time on a session: a round
            // trip that writes nothing).
            let statement = match client.prepare_cached(sql).await {
                Ok(st) => st,
                Err(e) if connection_lost(&e) => return Err(Failed::Pg(PgError::of(e))),
                Err(_) => return Ok(None),
            };
            committing.store(true, Ordering::Relaxed);
            match client.query(&statement, &params).await {
                Ok(rows) => rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()).unwrap_or(false),
                Err(e) if connection_lost(&e) => return Err(Failed::Pg(PgError::at_commit(e))),
                Err(_) => false,
            }
        };
        if held && ending {
            for flag in &self.end_flags {
                flag.store(true, Ordering::SeqCst);
            }
            if let Some(send) = notices.owed(tell) {
                tokio::spawn(send);
            }
        }
        Ok(held.then_some(self.plan.outcomes))
    }
}

/// Ends the transaction after `e` (best effort: a session whose connection went is not
/// reused anyway); `e` as the flush's failure.
async fn rolled_back(client: &Client, e: tokio_postgres::Error) -> Failed {
    let _ = client.batch_execute("ROLLBACK").await;
    failed(e)
}

/// What the locking reads found.
fn locked(rows: Vec<tokio_postgres::Row>, claims: Vec<tokio_postgres::Row>) -> Result<Locked, tokio_postgres::Error> {
    let mut locked = Locked::default();
    for row in rows {
        let run = RunId(row.try_get(0)?);
        if let Some(epoch) = row.try_get::<_, Option<i64>>(1)? {
            locked.epochs.insert(run, u64::try_from(epoch).unwrap_or(0));
        }
        let next_seq: Option<i64> = row.try_get(2)?;
        let hash: Option<Vec<u8>> = row.try_get(3)?;
        let kind: Option<String> = row.try_get(4)?;
        // A head row's columns are NOT NULL: all three NULL is a run without one.
        match (next_seq, hash, kind) {
            (None, None, None) => {}
            (Some(next_seq), Some(hash), Some(kind)) => {
                locked.heads.insert(run, stored_head(run, next_seq, &hash, kind));
            }
            _ => {
                let reason = "head row has a NULL column".to_owned();
                locked.heads.insert(run, Err(StoreError::Corrupted { run, seq: Seq(0), reason }));
            }
        }
    }
    for row in claims {
        let key: Vec<u8> = row.try_get(0)?;
        let run = RunId(row.try_get(1)?);
        let expires: i64 = row.try_get(2)?;
        locked.claims.insert(key, (run, expires));
    }
    Ok(locked)
}

/// A stored head row; a damaged one gives a head no append can match (the run's appends
/// then conflict; `read` names the damage).
fn stored_head(run: RunId, next_seq: i64, hash: &[u8], kind: String) -> Result<Head, StoreError> {
    let bad = |reason: String| StoreError::Corrupted { run, seq: Seq(0), reason };
    let next_seq = u64::try_from(next_seq).map_err(|_| bad(format!("head row has next_seq {next_seq}")))?;
    let last_hash = Hash32::try_from(hash).map_err(|_| bad(format!("head row hash has {} bytes", hash.len())))?;
    Ok(Head { next_seq: Seq(next_seq), last_hash, last_kind: Some(kind) })
}

/// The columns of a flush's writes ([`write_sql`]'s parameters).
struct Writes<'a> {
    run: Vec<Uuid>,
    seq: Vec<i64>,
    value: Vec<&'a [u8]>,
    upd: HeadCols,
    ins: HeadCols,
    cu: ClaimCols<'a>,
    ci: ClaimCols<'a>,
    aux: AuxCols<'a>,
}

impl<'a> Writes<'a> {
    fn of(plan: &'a Plan) -> Writes<'a> {
        let (mut upd, mut ins) = (HeadCols::default(), HeadCols::default());
        for (run, (head, existed)) in &plan.heads {
            let cols = if *existed { &mut upd } else { &mut ins };
            cols.push(*run, head);
        }
        let (mut cu, mut ci) = (ClaimCols::default(), ClaimCols::default());
        for (key, (run, expires, existed)) in &plan.claims {
            let cols = if *existed { &mut cu } else { &mut ci };
            cols.key.push(key.as_slice());
            cols.run.push(run.0);
            cols.expires.push(*expires);
        }
        let mut run = Vec::with_capacity(plan.events.len());
        let mut seq = Vec::with_capacity(plan.events.len());
        let mut value = Vec::with_capacity(plan.events.len());
        for (r, s, v) in &plan.events {
            run.push(r.0);
            // Below i64::MAX: `decide` refused longer runs.
            seq.push(i64::try_from(s.0).unwrap_or(i64::MAX));
            value.push(v.as_slice());
        }
        Writes { run, seq, value, upd, ins, cu, ci, aux: AuxCols::of(&plan.aux) }
    }

    fn parts(&self) -> WriteParts {
        WriteParts {
            heads_updated: !self.upd.run.is_empty(),
            heads_inserted: !self.ins.run.is_empty(),
            claims_updated: !self.cu.key.is_empty(),
            claims_inserted: !self.ci.key.is_empty(),
            aux: self.aux.parts(),
        }
    }

    fn sql(&self) -> std::borrow::Cow<'static, str> {
        write_sql_of(self.parts())
    }

    /// The parameters of [`Writes::sql`], in its order.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut p: Vec<&(dyn ToSql + Sync)> = vec![&self.run, &self.seq, &self.value];
        for h in [&self.upd, &self.ins].into_iter().filter(|h| !h.run.is_empty()) {
            p.extend([&h.run as &(dyn ToSql + Sync), &h.next_seq, &h.hash, &h.kind]);
        }
        for c in [&self.cu, &self.ci].into_iter().filter(|c| !c.key.is_empty()) {
            p.extend([&c.key as &(dyn ToSql + Sync), &c.run, &c.expires]);
        }
        self.aux.push_params(&mut p);
        p
    }
}

/// Writes what a plan decided and commits: one statement ([`write_sql`]) and the COMMIT
/// sent together (one round trip), the statement prepared already. A head or claim row
/// that another process inserted since the locks were taken is a unique violation: a lost
/// race, nothing committed.
async fn write(client: &Client, writes: &Writes<'_>) -> Result<(), Failed> {
    let (sql, params) = (writes.sql(), writes.params());
    // `biased`: polled in the order sent, so the error returned is the statement's (a lost
    // race's unique violation), not the "transaction is aborted" of the COMMIT.
    let written = tokio::try_join!(
        biased;
        client.exec(&sql, &params),
        client.batch_execute("COMMIT"),
    );
    match written {
        Ok(_) => Ok(()),
        // The COMMIT may have been carried out.
        Err(e) if connection_lost(&e) => Err(Failed::Pg(PgError::at_commit(e))),
        Err(e) => Err(failed(e)),
    }
}

/// The aux writes of one atomic step by key, counter adds of one key summed
/// ([`keel_store::merge_aux`]).
pub(crate) fn aux_map(aux: Vec<AuxWrite>) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    let mut map = BTreeMap::new();
    for (key, value) in aux {
        keel_store::merge_aux(&mut map, &key, value.as_deref());
    }
    map
}

/// Shards per counter: a session adds to shard `pg_backend_pid() % COUNTER_SHARDS` of it
/// (see [`AuxParts`]).
pub(crate) const COUNTER_SHARDS: i32 = 64;

/// Aux writes on `c` (a transaction, or a session inside one) in one statement
/// ([`aux_sql`] of the parts they need); nothing is sent for none.
pub(crate) async fn aux_statements<C: Cached>(
    c: &C,
    aux: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> Result<(), tokio_postgres::Error> {
    let cols = AuxCols::of(aux);
    let Some(sql) = AUX_SQLS.get(cols.parts().index()).filter(|s| !s.is_empty()) else { return Ok(()) };
    let mut params = Vec::with_capacity(7);
    cols.push_params(&mut params);
    c.exec(sql, &params).await?;
    Ok(())
}

/// The columns of a step's aux writes, by part ([`AuxParts`]).
#[derive(Default)]
struct AuxCols<'a> {
    removed: Vec<&'a [u8]>,
    uncounted: Vec<&'a [u8]>,
    put_key: Vec<&'a [u8]>,
    put_value: Vec<&'a [u8]>,
    counter_keys: Vec<&'a [u8]>,
    deltas: Vec<i64>,
}

impl<'a> AuxCols<'a> {
    fn of(aux: &'a BTreeMap<Vec<u8>, Option<Vec<u8>>>) -> AuxCols<'a> {
        let mut c = AuxCols::default();
        for (key, value) in aux {
            if let Some(d) = keel_store::counter_delta(key, value.as_deref()) {
                c.counter_keys.push(key.as_slice());
                c.deltas.push(d);
                continue;
            }
            if key.starts_with(keel_store::COUNTER_PREFIX) {
                c.uncounted.push(key.as_slice());
            }
            match value {
                Some(v) => {
                    c.put_key.push(key.as_slice());
                    c.put_value.push(v.as_slice());
                }
                None => c.removed.push(key.as_slice()),
            }
        }
        c
    }

    fn parts(&self) -> AuxParts {
        AuxParts {
            removed: !self.removed.is_empty(),
            uncounted: !self.uncounted.is_empty(),
            put: !self.put_key.is_empty(),
            counted: !self.counter_keys.is_empty(),
        }
    }

    /// The parameters of the parts present, in [`aux_ctes`]' order.
    fn push_params<'s>(&'s self, params: &mut Vec<&'s (dyn ToSql + Sync)>) {
        let parts = self.parts();
        if parts.removed {
            params.push(&self.removed);
        }
        if parts.uncounted {
            params.push(&self.uncounted);
        }
        if parts.put {
            params.extend([&self.put_key as &(dyn ToSql + Sync), &self.put_value]);
        }
        if parts.counted {
            params.extend([&self.counter_keys as &(dyn ToSql + Sync), &self.deltas, &COUNTER_SHARDS]);
        }
    }
}

/// Aux writes outside any append, in one transaction of their own; retried (a few times)
/// when the server broke a deadlock with a flush writing the same keys.
pub(crate) async fn apply_aux(
    client: &mut Client,
    aux: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> Result<(), tokio_postgres::Error> {
    let mut tries = 0;
    loop {
        let attempt = async {
            let tx = client.transaction().await?;
            aux_statements(&tx, aux).await?;
            tx.commit().await
        };
        match attempt.await {
            Err(e) if tries + 1 < RACE_TRIES && retryable(&e) => tries += 1,
            other => return other,
        }
    }
}

/// Whether `e` is a broken deadlock or a serialization failure (worth a retry).
fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

#[derive(Default)]
struct HeadCols {
    run: Vec<Uuid>,
    next_seq: Vec<i64>,
    hash: Vec<Vec<u8>>,
    kind: Vec<String>,
}

impl HeadCols {
    fn push(&mut self, run: RunId, head: &Head) {
        self.run.push(run.0);
        // Below i64::MAX: `decide` refused longer runs.
        self.next_seq.push(i64::try_from(head.next_seq.0).unwrap_or(i64::MAX));
        self.hash.push(head.last_hash.to_vec());
        self.kind.push(head.last_kind.clone().unwrap_or_default());
    }
}

#[derive(Default)]
struct ClaimCols<'a> {
    key: Vec<&'a [u8]>,
    run: Vec<Uuid>,
    expires: Vec<i64>,
}

/// What the transaction read under its locks.
#[derive(Debug, Default)]
pub(crate) struct Locked {
    /// Lease epochs of the fenced runs that have a lease row.
    pub(crate) epochs: BTreeMap<RunId, u64>,
    /// Heads of the runs that have records (`Err`: a damaged head row).
    pub(crate) heads: BTreeMap<RunId, Result<Head, StoreError>>,
    /// Claims on the keys claimed: `(holder, expires_at_us)`.
    pub(crate) claims: BTreeMap<Vec<u8>, (RunId, i64)>,
}

/// One append as the planner sees it.
pub(crate) struct Intent<'a> {
    pub(crate) run: RunId,
    pub(crate) expected: Seq,
    pub(crate) records: &'a [NewRecord],
    pub(crate) claim: Option<&'a Claim>,
    pub(crate) fence: Option<Fence>,
    pub(crate) aux: &'a [AuxWrite],
}

impl<'a> Intent<'a> {
    fn of(a: &'a Append) -> Intent<'a> {
        Intent {
            run: a.run,
            expected: a.expected,
            records: &a.records,
            claim: a.claim.as_ref(),
            fence: a.fence,
            aux: &a.aux,
        }
    }
}

/// What one flush writes, decided in memory.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Each append's outcome, in arrival order.
    pub(crate) outcomes: Vec<Result<Head, StoreError>>,
    /// The final head of each run written, and whether its row existed.
    pub(crate) heads: BTreeMap<RunId, (Head, bool)>,
    /// Each claim written: `(holder, expires_at_us, row existed)`.
    pub(crate) claims: BTreeMap<Vec<u8>, (RunId, i64, bool)>,
    /// The record values to insert: `(run, seq, value)`.
    pub(crate) events: Vec<(RunId, Seq, Vec<u8>)>,
    /// The aux writes of the appends written, the last one per key in arrival order
    /// (`None`: remove the entry).
    pub(crate) aux: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// Decides each append in arrival order against the locked rows and the appends before it
/// in the same flush: the rules of the in-process backends (fence, then OCC, then claim),
/// each refusal writing nothing of its append.
pub(crate) fn plan<'a>(intents: impl Iterator<Item = Intent<'a>>, locked: Locked) -> Plan {
    let Locked { epochs, heads: stored, claims: stored_claims } = locked;
    let mut p = Plan::default();
    for i in intents {
        let outcome = decide(&i, &epochs, &stored, &stored_claims, &mut p);
        p.outcomes.push(outcome);
    }
    p
}

fn decide(
    i: &Intent<'_>,
    epochs: &BTreeMap<RunId, u64>,
    stored: &BTreeMap<RunId, Result<Head, StoreError>>,
    stored_claims: &BTreeMap<Vec<u8>, (RunId, i64)>,
    p: &mut Plan,
) -> Result<Head, StoreError> {
    let run = i.run;
    if let Some(f) = i.fence {
        if f.run != run {
            return Err(StoreError::Fenced { run, fence: f.epoch, current: 0 });
        }
        let current = epochs.get(&run).copied().unwrap_or(0);
        if current != f.epoch {
            return Err(StoreError::Fenced { run, fence: f.epoch, current });
        }
    }
    let (head, existed) = match (p.heads.get(&run), stored.get(&run)) {
        (Some((h, existed)), _) => (h.clone(), *existed),
        (None, Some(Ok(h))) => (h.clone(), true),
        (None, Some(Err(e))) => return Err(clone_err(e)),
        (None, None) => (Head::empty(), false),
    };
    if i.expected != head.next_seq {
        return Err(StoreError::Conflict { run, expected: i.expected, actual: head.next_seq });
    }
    if let Some(c) = i.claim {
        let holder = match p.claims.get(&c.key) {
            Some((r, e, _)) => Some((*r, *e)),
            None => stored_claims.get(&c.key).copied(),
        };
        backend::check_claim(holder, run, c)?;
    }
    let (sealed, new_head) = backend::seal_batch(run, &head, i.records.to_vec())?;
    if i64::try_from(new_head.next_seq.0).is_err() {
        return Err(StoreError::TooLarge { what: "run length", bytes: usize::MAX, max: usize::MAX });
    }
    if let Some(c) = i.claim {
        let existed = p.claims.get(&c.key).map_or(stored_claims.contains_key(&c.key), |(_, _, e)| *e);
        p.claims.insert(c.key.clone(), (run, c.expires_at_us, existed));
    }
    p.events.extend(sealed.into_iter().map(|(seq, v)| (run, seq, v)));
    p.heads.insert(run, (new_head.clone(), existed));
    for (key, value) in i.aux {
        keel_store::merge_aux(&mut p.aux, key, value.as_deref());
    }
    Ok(new_head)
}

/// A damaged head row's error, once per append that meets it.
fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Corrupted { run, seq, reason } => {
            StoreError::Corrupted { run: *run, seq: *seq, reason: reason.clone() }
        }
        other => StoreError::Corrupted { run: RunId::from_bytes([0; 16]), seq: Seq(0), reason: other.to_string() },
    }
}

/// Waits until every commit made before it (those with `synchronous_commit` off included)
/// is flushed to the WAL on disk. A transaction that only takes an id (`txid_current()`)
/// writes no WAL of its own and commits without a flush; a transactional logical message
/// is a WAL record of this transaction, so its synchronous commit flushes the WAL up to
/// its end, which covers every earlier commit. It needs no table and no privilege beyond
/// the default (the function is executable by every role unless an operator revoked it).
/// One round trip: the COMMIT goes as a message of its own, so it is carried out (as a
/// ROLLBACK after a failure) whatever happened before it.
pub(crate) async fn flush_tx(client: &Client) -> Result<(), tokio_postgres::Error> {
    tokio::try_join!(
        biased;
        client.batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'keel', 'flush')"
        ),
        client.batch_execute("COMMIT"),
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn rec(i: u8) -> NewRecord {
        NewRecord {
            kind: "K".into(),
            time_us: i64::from(i),
            payload_version: 1,
            payload: vec![i],
            payload_root: [i; 32],
        }
    }

    fn run(n: u8) -> RunId {
        RunId::from_bytes([n; 16])
    }

    struct A {
        run: RunId,
        expected: u64,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<AuxWrite>,
    }

    fn a(run: RunId, expected: u64, n: u8) -> A {
        A { run, expected, records: (0..n).map(rec).collect(), claim: None, fence: None, aux: Vec::new() }
    }

    fn planned(appends: &[A], locked: Locked) -> Plan {
        plan(
            appends.iter().map(|x| Intent {
                run: x.run,
                expected: Seq(x.expected),
                records: &x.records,
                claim: x.claim.as_ref(),
                fence: x.fence,
                aux: &x.aux,
            }),
            locked,
        )
    }

    #[test]
    fn appends_of_one_run_in_one_flush_chain_on_each_other_and_a_stale_one_conflicts() {
        let p = planned(&[a(run(1), 0, 2), a(run(1), 2, 1), a(run(1), 2, 1), a(run(2), 0, 1)], Locked::default());
        assert_eq!(p.outcomes[0].as_ref().unwrap().next_seq, Seq(2));
        let third = p.outcomes[1].as_ref().unwrap();
        assert_eq!(third.next_seq, Seq(3));
        assert!(matches!(p.outcomes[2], Err(StoreError::Conflict { expected: Seq(2), actual: Seq(3), .. })));
        // One sealing, as one append of three records would be.
        let (whole, head) = backend::seal_batch(run(1), &Head::empty(), vec![rec(0), rec(1), rec(0)]).unwrap();
        let ours: Vec<_> = p.events.iter().filter(|(r, _, _)| *r == run(1)).map(|(_, s, v)| (*s, v.clone())).collect();
        assert_eq!(ours, whole);
        assert_eq!(p.heads[&run(1)], (head, false));
        assert_eq!(p.events.len(), 4);
    }

    #[test]
    fn a_key_claimed_earlier_in_the_flush_is_held_and_a_stale_fence_writes_nothing() {
        let claim = |now_us| Some(Claim { key: b"k".to_vec(), now_us, expires_at_us: 100 });
        let mut first = a(run(1), 0, 1);
        first.claim = claim(0);
        let mut second = a(run(2), 0, 1);
        second.claim = claim(0);
        let mut fenced = a(run(3), 0, 1);
        fenced.fence = Some(Fence { run: run(3), epoch: 4 });
        let mut other_run = a(run(3), 0, 1);
        other_run.fence = Some(Fence { run: run(9), epoch: 5 });
        let mut locked = Locked::default();
        locked.epochs.insert(run(3), 5);
        let p = planned(&[first, second, fenced, other_run], locked);
        assert!(p.outcomes[0].is_ok());
        assert!(matches!(p.outcomes[1], Err(StoreError::DuplicateKey { existing }) if existing == run(1)));
        assert!(matches!(p.outcomes[2], Err(StoreError::Fenced { fence: 4, current: 5, .. })));
        assert!(matches!(p.outcomes[3], Err(StoreError::Fenced { fence: 5, current: 0, .. })));
        assert_eq!(p.claims.get(b"k".as_slice()), Some(&(run(1), 100, false)));
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.heads.keys().copied().collect::<Vec<_>>(), vec![run(1)]);
    }

    #[test]
    fn only_written_appends_bring_their_aux_writes_and_the_last_write_of_a_key_wins() {
        let put = |k: &[u8], v: &[u8]| (k.to_vec(), Some(v.to_vec()));
        let mut first = a(run(1), 0, 1);
        first.aux = vec![put(b"x", b"1"), put(b"y", b"1")];
        let mut stale = a(run(1), 0, 1);
        stale.aux = vec![put(b"z", b"2")];
        let mut fenced = a(run(2), 0, 1);
        fenced.fence = Some(Fence { run: run(2), epoch: 1 });
        fenced.aux = vec![put(b"w", b"3")];
        let mut later = a(run(1), 1, 1);
        later.aux = vec![(b"x".to_vec(), None), put(b"y", b"4")];
        let mut locked = Locked::default();
        locked.epochs.insert(run(2), 2);
        let p = planned(&[first, stale, fenced, later], locked);
        assert!(p.outcomes[0].is_ok() && p.outcomes[3].is_ok());
        assert!(matches!(p.outcomes[1], Err(StoreError::Conflict { .. })));
        assert!(matches!(p.outcomes[2], Err(StoreError::Fenced { .. })));
        let aux: Vec<(&[u8], Option<&[u8]>)> = p.aux.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect();
        assert_eq!(aux, vec![(b"x".as_slice(), None), (b"y".as_slice(), Some(b"4".as_slice()))]);
    }

    #[test]
    fn a_locked_head_and_claim_are_the_starting_point() {
        let (sealed, head) = backend::seal_batch(run(1), &Head::empty(), vec![rec(7)]).unwrap();
        assert_eq!(sealed.len(), 1);
        let mut locked = Locked::default();
        locked.heads.insert(run(1), Ok(head.clone()));
        locked.heads.insert(run(2), Err(StoreError::Corrupted { run: run(2), seq: Seq(0), reason: "x".into() }));
        locked.claims.insert(b"k".to_vec(), (run(5), 50));
        let mut expired = a(run(1), 1, 1);
        expired.claim = Some(Claim { key: b"k".to_vec(), now_us: 50, expires_at_us: 90 });
        let p = planned(&[a(run(1), 0, 1), expired, a(run(2), 0, 1)], locked);
        assert!(matches!(p.outcomes[0], Err(StoreError::Conflict { actual: Seq(1), .. })));
        assert_eq!(p.outcomes[1].as_ref().unwrap().next_seq, Seq(2));
        assert!(matches!(p.outcomes[2], Err(StoreError::Corrupted { .. })));
        assert!(p.heads[&run(1)].1, "the row existed: updated, not inserted");
        assert_eq!(p.claims.get(b"k".as_slice()), Some(&(run(1), 90, true)));
        assert_eq!(p.events[0].2, {
            let (v, _) = backend::seal_batch(run(1), &head, vec![rec(0)]).unwrap();
            v[0].1.clone()
        });
    }
}
