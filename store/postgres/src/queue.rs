//! The shared work queue ([`keel_store::WorkQueue`]) on PostgreSQL: a `work` table of
//! runnable runs claimed with `FOR UPDATE SKIP LOCKED`, each claim granting the run's lease
//! in the same transaction; claimers are woken by `LISTEN/NOTIFY` on one channel (the
//! payload names the schema) and poll as the fallback. docs/STORE.md, "The work queue".

use crate::cached::Cached;
use crate::error::pg;
use crate::herald::CHANNEL;
use crate::pool::Pool;
use crate::store::PgStore;
use crate::wakers::Wakers;
use deadpool_postgres::ClientWrapper;
use keel_store::{
    Claimed, Lease, RunId, Runnable, StoreError, WorkQueue, CLAIM_RUNS_MAX, OWNER_BYTES_MAX, WORKFLOW_BYTES_MAX,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

// Queue bookkeeping (push, done) goes through lazy sessions (`Pool::lazy`) and commits
// without waiting for the WAL flush: the runs' events are durable by their own appends,
// and what a crash of the server loses here (a push, a done) is recovered by the workers'
// periodic scan or costs one idle drive. A claim grants leases: it commits the same way
// (so its locks are not held through a WAL flush), then waits for a flush before any
// granted lease is used (a grant lost in a crash could hand one epoch out twice).

/// Candidates read per claimed run (runs of a workflow type at its limit are passed over).
const CANDIDATES_PER_CLAIM: usize = 4;

/// Runs looked up per statement by [`WorkQueue::unqueued`].
const UNQUEUED_CHUNK: usize = 1024;

/// How long the listener waits before connecting again after losing its session.
const LISTEN_RETRY_MS: u64 = 1_000;

fn too_long(what: &'static str, s: &str, max: usize) -> Result<(), StoreError> {
    if s.len() > max {
        return Err(StoreError::TooLarge { what, bytes: s.len(), max });
    }
    Ok(())
}

/// Queues a run and wakes the claimers of every process (the notification is delivered at
/// commit); a run claimed now is marked to go round again when its driver is done with it.
const PUSH_SQL: &str = "WITH pushed AS (
         INSERT INTO work (run, workflow, priority, accepted_at_us) VALUES ($1, $2, $3, $4)
         ON CONFLICT (run) DO UPDATE SET again = work.again OR work.claimed_by IS NOT NULL)
     SELECT pg_notify($5, $6)";
/// The end of a drive: a run pushed while it was driven (`again`) goes round again, any
/// other leaves the queue, with its due time if it waits for a timer. The UPDATE and the
/// DELETE take disjoint rows (`again` or not, as of the statement's start); a push that
/// sets `again` meanwhile makes the DELETE pass the row over, which stays queued. With
/// `$7` the claimers of every process are notified at commit (a slot of the run's type is
/// free, or the run is queued again); without, the store owes them one ([`Herald`]).
const DONE_SQL: &str = "WITH again AS (
         UPDATE work SET again = false, claimed_by = NULL WHERE run = $1 AND claimed_by = $2 AND again RETURNING run),
     gone AS (DELETE FROM work WHERE run = $1 AND claimed_by = $2 AND NOT again RETURNING run),
     due AS (INSERT INTO due (run, due_at_us) SELECT run, $3::bigint FROM gone WHERE $3::bigint IS NOT NULL
             ON CONFLICT (run) DO UPDATE SET due_at_us = EXCLUDED.due_at_us),
     released AS (UPDATE leases SET owner = NULL, epoch = epoch + 1
                  WHERE run = $1 AND epoch = $4::bigint AND owner IS NOT NULL),
     told AS (SELECT pg_notify($5, $6) WHERE $7::bool)
     SELECT (SELECT count(*) FROM again), (SELECT count(*) FROM told)";

/// A drive a stop ended ([`WorkQueue::hand_back`]): the row stays, unclaimed (`again`
/// cleared: the next claimer reads the run whole), the drive's lease is released, and a
/// notification goes out at the commit whatever the herald's window (the stopping process
/// may be gone before an owed one would be sent).
const HAND_BACK_SQL: &str = "WITH back AS (
         UPDATE work SET again = false, claimed_by = NULL WHERE run = $1 AND claimed_by = $2 RETURNING run),
     released AS (UPDATE leases SET owner = NULL, epoch = epoch + 1
                  WHERE run = $1 AND epoch = $3::bigint AND owner IS NOT NULL),
     told AS (SELECT pg_notify($4, $5))
     SELECT (SELECT count(*) FROM back), (SELECT count(*) FROM told)";

/// Whether a run of the given workflow types is queued (index `work_by_workflow`).
const ANY_QUEUED_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM work WHERE workflow = ANY($1::text[]) AND NOT run = ANY($2::uuid[]))";

/// A push ([`PUSH_SQL`]): one statement on a lazy session ([`Pool::lazy`]), its own
/// transaction, committed without waiting for the WAL flush (docs/STORE.md 15.3).
async fn push_tx(client: &ClientWrapper, r: Runnable, schema: &str) -> Result<(), tokio_postgres::Error> {
    let params: [&(dyn ToSql + Sync); 6] = [&r.run.0, &r.workflow, &r.priority, &r.accepted_at_us, &CHANNEL, &schema];
    client.exec(PUSH_SQL, &params).await.map(drop)
}

/// Locks the per-workflow claim locks of `workflows` in one order (no two claimers wait
/// on each other's), held to the end of the transaction; the statements are sent together.
async fn lock_workflows(
    client: &ClientWrapper,
    schema: &str,
    workflows: &BTreeSet<&str>,
) -> Result<(), tokio_postgres::Error> {
    futures_util::future::try_join_all(
        workflows.iter().map(|wf| async move { client.exec(LOCK_SQL, &[&schema, wf]).await }),
    )
    .await?;
    Ok(())
}

const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(hashtext('keel work ' || $1::text || ' ' || $2::text)::bigint)";
/// A claim in one statement, run right after the claim locks of the limited workflow types
/// (a statement of its own before this one: this statement's snapshot is taken once they
/// are held, so it sees every grant committed by the claimer that held them before):
/// - `cand`: up to `$2` runs without a live lease, in queue order (priority, then accepted
///   time, then the order pushed), locked, passing over rows other claimers lock;
/// - `busy`: the live leases of each limited type (from the leases held, index
///   `leases_held`, schema migration 5), not read at all when no type is limited (a
///   one-time filter: a generic plan cannot see that the array is empty), each one's
///   workflow type looked up by the queue's primary key;
/// - `free`, `usable`: the candidates' lease rows, locked, passing over rows another
///   session holds locked, and the candidates whose lease row is free or does not exist
///   (a worker paused between the two round trips of a flush holds its runs' lease and
///   head rows: waiting for them stalled every claim of every process until that
///   session's transaction was ended; passing over them after the limit below left a
///   claimer with few free workers taking nothing while runs behind them waited); each
///   candidate's lease row found through the primary key (a lateral lookup, `OFFSET 0`
///   keeping it one: as joins, the generic plans read all of `leases`, a row per run
///   ever leased, on each claim; `a_claim_reads_no_table_whole`);
/// - `chosen`: the usable candidates in queue order, up to `$5`, passing over the runs of
///   a type at its limit (`$3`/`$4`: limited types and their limits; each run chosen
///   counts);
/// - `g`: the grants (as `try_lease`: a run whose lease another holds live is passed over),
///   lease rows locked in run order by every granter; `marked`: the runs marked claimed;
///   the runs granted are returned in queue order.
///
/// The grant decision is made inside the database, so the claim locks are held for one
/// statement and the COMMIT behind it (sent together), not across a round trip to the
/// claimer and back: claimers of one limited type in several processes queue on them.
pub(crate) const CLAIM_SQL: &str = "WITH cand AS (
         SELECT w.run, w.workflow, w.priority, w.accepted_at_us, w.ticket FROM work w
         WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.run = w.run AND l.owner IS NOT NULL AND l.expires_at_us > $1)
         ORDER BY w.priority DESC, w.accepted_at_us, w.ticket
         LIMIT $2 FOR UPDATE OF w SKIP LOCKED),
     lim AS (SELECT * FROM unnest($3::text[], $4::bigint[]) AS t(workflow, cap)),
     busy AS (
         SELECT w.workflow, count(*) AS n FROM leases l
         CROSS JOIN LATERAL (SELECT workflow FROM work WHERE work.run = l.run OFFSET 0) w
         WHERE cardinality($3::text[]) > 0
           AND l.owner IS NOT NULL AND l.expires_at_us > $1 AND w.workflow = ANY($3) GROUP BY w.workflow),
     free AS (
         SELECT l.run FROM cand c
         CROSS JOIN LATERAL (SELECT run FROM leases WHERE leases.run = c.run FOR UPDATE SKIP LOCKED) l),
     usable AS (
         SELECT c.* FROM cand c
         LEFT JOIN LATERAL (SELECT true AS leased FROM leases WHERE leases.run = c.run OFFSET 0) e ON true
         WHERE c.run IN (SELECT run FROM free) OR e.leased IS NULL),
     ranked AS (
         SELECT c.*, row_number() OVER (PARTITION BY c.workflow ORDER BY c.priority DESC, c.accepted_at_us, c.ticket) AS nth
         FROM usable c),
     chosen AS (
         SELECT r.run, r.workflow, r.priority, r.accepted_at_us, r.ticket FROM ranked r
         LEFT JOIN lim ON lim.workflow = r.workflow
         LEFT JOIN busy ON busy.workflow = r.workflow
         WHERE lim.cap IS NULL OR coalesce(busy.n, 0) + r.nth <= lim.cap
         ORDER BY r.priority DESC, r.accepted_at_us, r.ticket
         LIMIT $5),
     g AS (
         INSERT INTO leases (run, owner, epoch, expires_at_us)
         SELECT c.run, $6, 1, $7 FROM chosen c
         ORDER BY c.run
         ON CONFLICT (run) DO UPDATE
           SET owner = EXCLUDED.owner, epoch = leases.epoch + 1, expires_at_us = EXCLUDED.expires_at_us
           WHERE leases.owner IS NULL OR leases.expires_at_us <= $1
         RETURNING run, epoch),
     marked AS (UPDATE work SET claimed_by = $6, again = false FROM g WHERE work.run = g.run)
     SELECT g.run, c.workflow, g.epoch FROM g JOIN chosen c ON c.run = g.run
     ORDER BY c.priority DESC, c.accepted_at_us, c.ticket";

/// One claim: `(run, workflow, epoch)` of each run taken.
struct Take<'a> {
    owner: &'a str,
    expires_at_us: i64,
    now_us: i64,
    max: usize,
    limits: &'a BTreeMap<String, usize>,
}

/// Claims up to `t.max` runs in one round trip on a lazy session (its commit does not
/// wait for the WAL flush): BEGIN, the claim locks of the limited workflow types,
/// [`CLAIM_SQL`] and the COMMIT, sent together and executed in that order (a statement
/// that fails aborts the transaction, and the COMMIT behind it rolls back). The caller
/// waits for a WAL flush before using a granted lease ([`PgStore::barrier`]).
async fn claim_tx(
    client: &mut ClientWrapper,
    t: Take<'_>,
    schema: &str,
) -> Result<Vec<(RunId, String, i64)>, tokio_postgres::Error> {
    crate::group::warm(client, &[LOCK_SQL, CLAIM_SQL]).await?;
    let client: &ClientWrapper = client;
    // The claim locks of every limited workflow type are taken before any candidate row is
    // read: a claimer that read (and locked) candidates first, then waited for such a lock,
    // left the highest-priority rows locked while another claimer, skipping them, granted a
    // lower-priority run the one free slot (runs claimed out of priority order).
    let (names, caps): (Vec<&str>, Vec<i64>) = t
        .limits
        .iter()
        .filter(|(_, l)| **l > 0)
        .map(|(wf, l)| (wf.as_str(), i64::try_from(*l).unwrap_or(i64::MAX)))
        .unzip();
    let limited: BTreeSet<&str> = names.iter().copied().collect();
    let want = i64::try_from(t.max.saturating_mul(CANDIDATES_PER_CLAIM)).unwrap_or(i64::MAX);
    let max = i64::try_from(t.max).unwrap_or(i64::MAX);
    let params: [&(dyn ToSql + Sync); 7] = [&t.now_us, &want, &names, &caps, &max, &t.owner, &t.expires_at_us];
    // `biased`: polled in the order sent, so the error returned is the first statement's,
    // not the "transaction is aborted" of one after it.
    let sent = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        lock_workflows(client, schema, &limited),
        client.rows(CLAIM_SQL, &params),
        client.batch_execute("COMMIT"),
    );
    let rows = match sent {
        Ok((_, (), rows, _)) => rows,
        Err(e) => {
            // The COMMIT sent behind a failed statement rolled the transaction back; one
            // that failed before the COMMIT went out (a parameter it could not encode)
            // would leave the session in a transaction holding the claim locks.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    rows.iter().map(|r| Ok((RunId(r.try_get(0)?), r.try_get::<_, String>(1)?, r.try_get::<_, i64>(2)?))).collect()
}

/// The end of a drive (see [`WorkQueue::done`]) in one round trip and one statement;
/// with `release` (the drive's lease epoch) the lease is released in the same
/// transaction. The notification is delivered at commit: a slot of the run's workflow type
/// is free (or the run is queued again).
async fn done_tx(
    client: &ClientWrapper,
    run: RunId,
    owner: &str,
    due_at_us: Option<i64>,
    release: Option<i64>,
    schema: &str,
    tell: bool,
) -> Result<bool, tokio_postgres::Error> {
    let params: [&(dyn ToSql + Sync); 7] = [&run.0, &owner, &due_at_us, &release, &CHANNEL, &schema, &tell];
    let rows = client.rows(DONE_SQL, &params).await?;
    let again: i64 = match rows.first() {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    Ok(again > 0)
}

/// Keeps one session listening on [`CHANNEL`], calling `wakers` for this schema's
/// notifications and after every (re)connect (notifications may have been missed).
async fn listen(mut config: tokio_postgres::Config, schema: String, wakers: Arc<Wakers>) {
    // Named so an operator (or a test) sees which schema's queue a session listens for.
    config.application_name(format!("keel-listen-{schema}"));
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let polling = tokio::spawn(async move {
                    while let Some(msg) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => {
                                let _ = tx.send(n.payload().to_owned());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "work queue listener lost its session");
                                break;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %e, "cannot LISTEN for the work queue");
                } else {
                    wakers.wake_all();
                    while let Some(payload) = rx.recv().await {
                        if payload == schema {
                            wakers.wake_all();
                        }
                    }
                }
                polling.abort();
            }
            Err(e) => tracing::warn!(error = %e, "work queue listener cannot connect (polling meanwhile)"),
        }
        tokio::time::sleep(Duration::from_millis(LISTEN_RETRY_MS)).await;
    }
}

/// The runs due at `$1`, at most `$2`, taken out of the due-time index. The rows to delete
/// are picked first (`due_by_time`), then deleted by key: `run IN (subquery)` was planned,
/// generically, as a hash join over a scan of the whole table (the planner's guess of the
/// subquery's rows), at every worker's read of the index.
pub(crate) const TAKE_DUE_SQL: &str = "DELETE FROM due WHERE run = ANY(ARRAY(
         SELECT run FROM due WHERE due_at_us <= $1 ORDER BY due_at_us, run LIMIT $2 FOR UPDATE SKIP LOCKED))
     RETURNING run";

async fn take_due_q(pool: Arc<Pool>, now_us: i64, limit: i64) -> Result<Vec<RunId>, StoreError> {
    let mut conn = pool.get().await?;
    let result = conn.client()?.rows(TAKE_DUE_SQL, &[&now_us, &limit]).await;
    let rows = conn.ok(result)?;
    rows.into_iter().map(|r| Ok(RunId(r.try_get::<_, Uuid>(0).map_err(pg)?))).collect()
}

impl WorkQueue for PgStore {
    fn push(&self, runnable: &Runnable) -> Result<(), StoreError> {
        too_long("workflow name", &runnable.workflow, WORKFLOW_BYTES_MAX)?;
        let (pool, r, schema) = (self.pool(), runnable.clone(), self.schema().to_owned());
        self.call(async move {
            let mut conn = pool.lazy().await?;
            let result = push_tx(conn.client()?, r, &schema).await;
            conn.ok(result)
        })
    }

    fn claim(
        &self,
        owner: &str,
        ttl_ms: u64,
        now_us: i64,
        max: usize,
        limits: &BTreeMap<String, usize>,
    ) -> Result<Vec<Claimed>, StoreError> {
        too_long("lease owner", owner, OWNER_BYTES_MAX)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        if max > CLAIM_RUNS_MAX {
            return Err(StoreError::TooLarge { what: "runs claimed", bytes: max, max: CLAIM_RUNS_MAX });
        }
        let expires_at_us = crate::store::expiry(now_us, ttl_ms);
        let (pool, who, lim, schema) = (self.pool(), owner.to_owned(), limits.clone(), self.schema().to_owned());
        let fold_pool = self.pool();
        let appends = self.appends();
        let (page, heads, prefetched) = self.fold_reads();
        let taken = self.call(async move {
            let mut conn = pool.lazy().await?;
            let t = Take { owner: &who, expires_at_us, now_us, max, limits: &lim };
            let result = claim_tx(conn.client()?, t, &schema).await;
            let taken = conn.ok(result)?;
            drop(conn);
            if !taken.is_empty() {
                // A grant lost in a crash of the server could hand one epoch out twice: the
                // claim is made durable before any lease is used, by the next flush of
                // appends (whose synchronous commit flushes the WAL past the claim's) or a
                // flush of its own. The claim locks were not held through it. Meanwhile
                // the granted runs' folds are read, for their drives (`Prefetched`).
                let runs: Vec<RunId> = taken.iter().map(|(run, _, _)| *run).collect();
                // Waited for a moment at most: the read is optional, the claim is made.
                let read = tokio::time::timeout(
                    crate::store::PREFETCH_WAIT,
                    crate::store::fold_sources(fold_pool, runs, page, &heads),
                );
                let (folds, durable) = tokio::join!(read, PgStore::barrier(&appends));
                durable?;
                match folds {
                    Ok(Ok(folds)) => prefetched.put(folds),
                    // The drives read their folds themselves.
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the claimed runs' folds"),
                    Err(_) => tracing::debug!("the claimed runs' folds were not read in time"),
                }
            }
            Ok(taken)
        })?;
        Ok(taken
            .into_iter()
            .map(|(run, workflow, epoch)| Claimed { lease: self.lease(run, owner, epoch, expires_at_us), workflow })
            .collect())
    }

    fn any_queued(&self, workflows: &[&str], except: &[RunId]) -> Result<bool, StoreError> {
        for wf in workflows {
            too_long("workflow name", wf, WORKFLOW_BYTES_MAX)?;
        }
        let names: Vec<String> = workflows.iter().map(|w| (*w).to_owned()).collect();
        let except: Vec<Uuid> = except.iter().map(|r| r.0).collect();
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn.client()?.row_opt(ANY_QUEUED_SQL, &[&names, &except]).await;
            let row = conn.ok(result)?;
            row.map_or(Ok(false), |r| r.try_get(0).map_err(pg))
        })
    }

    fn done(
        &self,
        run: RunId,
        owner: &str,
        due_at_us: Option<i64>,
        lease: Option<&mut Lease>,
    ) -> Result<bool, StoreError> {
        let lease = lease.filter(|l| l.run() == run);
        let release = lease.as_ref().and_then(|l| i64::try_from(l.epoch()).ok());
        let (pool, who, schema) = (self.pool(), owner.to_owned(), self.schema().to_owned());
        let notices = self.notices();
        let tell = notices.herald.take_window();
        self.forget_fold(run);
        let again = self.call(async move {
            let mut conn = pool.lazy().await?;
            let result = done_tx(conn.client()?, run, &who, due_at_us, release, &schema, tell).await;
            conn.ok(result)
        });
        // Owed also after a failure: it may have committed (a call cut after its COMMIT
        // went out); one notification too many costs a look at the queue.
        if let Some(send) = notices.owed(tell) {
            self.spawn(send);
        }
        let again = again?;
        if let Some(l) = lease {
            l.released_elsewhere();
        }
        Ok(again)
    }

    fn hand_back(&self, run: RunId, owner: &str, lease: Option<&mut Lease>) -> Result<bool, StoreError> {
        let lease = lease.filter(|l| l.run() == run);
        let release = lease.as_ref().and_then(|l| i64::try_from(l.epoch()).ok());
        let (pool, who, schema) = (self.pool(), owner.to_owned(), self.schema().to_owned());
        self.forget_fold(run);
        let kept = self.call(async move {
            let mut conn = pool.lazy().await?;
            let params: [&(dyn ToSql + Sync); 5] = [&run.0, &who, &release, &CHANNEL, &schema];
            let result = conn.client()?.rows(HAND_BACK_SQL, &params).await;
            let rows = conn.ok(result)?;
            match rows.first() {
                Some(row) => Ok(row.try_get::<_, i64>(0).map_err(pg)? > 0),
                None => Ok(false),
            }
        })?;
        if let Some(l) = lease {
            l.released_elsewhere();
        }
        Ok(kept)
    }

    fn unqueued(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError> {
        let mut out = Vec::new();
        for chunk in runs.chunks(UNQUEUED_CHUNK) {
            let ids: Vec<Uuid> = chunk.iter().map(|r| r.0).collect();
            let pool = self.pool();
            let left: BTreeSet<Uuid> = self.call(async move {
                let mut conn = pool.get().await?;
                let result = conn
                    .client()?
                    .rows(
                        "SELECT r FROM unnest($1::uuid[]) AS t(r)
                         WHERE NOT EXISTS (SELECT 1 FROM work w WHERE w.run = t.r)",
                        &[&ids],
                    )
                    .await;
                let rows = conn.ok(result)?;
                rows.iter().map(|r| r.try_get::<_, Uuid>(0).map_err(pg)).collect()
            })?;
            out.extend(chunk.iter().filter(|r| left.contains(&r.0)));
        }
        Ok(out)
    }

    fn take_due(&self, now_us: i64, limit: usize) -> Result<Vec<RunId>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.call(take_due_q(self.pool(), now_us, limit))
    }

    fn on_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let wakers = self.wakers();
        wakers.calls.lock().unwrap_or_else(PoisonError::into_inner).push(wake);
        let mut listening = wakers.listening.lock().unwrap_or_else(PoisonError::into_inner);
        if !*listening {
            *listening = true;
            self.spawn(listen(self.pg_config(), self.schema().to_owned(), wakers.clone()));
        }
    }
}
