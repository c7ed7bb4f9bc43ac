//! The shared work queue ([`keel_store::WorkQueue`]) on PostgreSQL: a `work` table of
//! runnable runs claimed with `FOR UPDATE SKIP LOCKED`, each claim granting the run's lease
//! in the same transaction; claimers are woken by `LISTEN/NOTIFY` on one channel (the
//! payload names the schema) and poll as the fallback. docs/STORE.md, "The work queue".

use crate::cached::Cached;
use crate::error::pg;
use crate::pool::Pool;
use crate::store::PgStore;
use crate::wakers::Wakers;
use deadpool_postgres::{ClientWrapper, Transaction};
use keel_store::{
    Claimed, RunId, Runnable, StoreError, WorkQueue, CLAIM_RUNS_MAX, OWNER_BYTES_MAX, WORKFLOW_BYTES_MAX,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

/// The channel every keel store notifies on; the payload is the schema's name.
pub(crate) const CHANNEL: &str = "keel_work";

/// Queue bookkeeping (push, done) commits without waiting for the WAL flush: the runs'
/// events are durable by their own appends, and what a crash of the server loses here (a
/// push, a done) is recovered by the workers' periodic scan or costs one idle drive. A
/// claim grants leases: it commits the same way (so its locks are not held through a WAL
/// flush), then waits for a flush before any granted lease is used (a grant lost in a
/// crash could hand one epoch out twice).
const ASYNC_COMMIT: &str = "SET LOCAL synchronous_commit = off";

/// Candidates read per claimed run (runs of a workflow type at its limit are passed over).
const CANDIDATES_PER_CLAIM: usize = 4;

/// How long the listener waits before connecting again after losing its session.
const LISTEN_RETRY_MS: u64 = 1_000;

/// `SELECT pg_notify(...)` for `schema`: sent inside a transaction, delivered at commit.
pub(crate) async fn notify(tx: &Transaction<'_>, schema: &str) -> Result<(), tokio_postgres::Error> {
    tx.exec("SELECT pg_notify($1, $2)", &[&CHANNEL, &schema]).await.map(drop)
}

fn too_long(what: &'static str, s: &str, max: usize) -> Result<(), StoreError> {
    if s.len() > max {
        return Err(StoreError::TooLarge { what, bytes: s.len(), max });
    }
    Ok(())
}

async fn push_tx(client: &mut ClientWrapper, r: Runnable, schema: &str) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Sent together (tokio-postgres pipelines statements issued at once): one round trip.
    // A run claimed now is marked to go round again when its driver is done with it.
    let params: [&(dyn ToSql + Sync); 4] = [&r.run.0, &r.workflow, &r.priority, &r.accepted_at_us];
    tokio::try_join!(
        tx.batch_execute(ASYNC_COMMIT),
        tx.exec(
            "INSERT INTO work (run, workflow, priority, accepted_at_us) VALUES ($1, $2, $3, $4)
             ON CONFLICT (run) DO UPDATE SET again = work.again OR work.claimed_by IS NOT NULL",
            &params,
        ),
        notify(&tx, schema),
    )?;
    tx.commit().await
}

/// Locks the per-workflow claim locks of `workflows` in one order (no two claimers wait
/// on each other's), held to the end of the transaction.
async fn lock_workflows(
    tx: &Transaction<'_>,
    schema: &str,
    workflows: &BTreeSet<&str>,
) -> Result<(), tokio_postgres::Error> {
    for wf in workflows {
        tx.exec(
            "SELECT pg_advisory_xact_lock(hashtext('keel work ' || $1::text || ' ' || $2::text)::bigint)",
            &[&schema, wf],
        )
        .await?;
    }
    Ok(())
}

/// Runs of `workflow` holding a live lease at `now_us`, over all processes.
async fn busy(tx: &Transaction<'_>, workflow: &str, now_us: i64) -> Result<usize, tokio_postgres::Error> {
    let n: i64 = tx
        .row(
            "SELECT count(*) FROM work w JOIN leases l ON l.run = w.run
             WHERE w.workflow = $1 AND l.owner IS NOT NULL AND l.expires_at_us > $2",
            &[&workflow, &now_us],
        )
        .await?
        .get(0);
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// One claim: `(run, workflow, epoch)` of each run taken.
struct Take<'a> {
    owner: &'a str,
    expires_at_us: i64,
    now_us: i64,
    max: usize,
    limits: &'a BTreeMap<String, usize>,
}

async fn claim_tx(
    client: &mut ClientWrapper,
    t: Take<'_>,
    schema: &str,
) -> Result<Vec<(RunId, String, i64)>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // The grants are made durable below, after the locks are released.
    tx.batch_execute(ASYNC_COMMIT).await?;
    // The claim locks of every limited workflow type are taken before any candidate row is
    // read: a claimer that read (and locked) candidates first, then waited for such a lock,
    // left the highest-priority rows locked while another claimer, skipping them, granted a
    // lower-priority run the one free slot (runs claimed out of priority order).
    let limited: BTreeSet<&str> = t.limits.iter().filter(|(_, l)| **l > 0).map(|(wf, _)| wf.as_str()).collect();
    lock_workflows(&tx, schema, &limited).await?;
    let want = i64::try_from(t.max.saturating_mul(CANDIDATES_PER_CLAIM)).unwrap_or(i64::MAX);
    let rows = tx
        .rows(
            "SELECT w.run, w.workflow FROM work w
             WHERE NOT EXISTS (SELECT 1 FROM leases l
                               WHERE l.run = w.run AND l.owner IS NOT NULL AND l.expires_at_us > $1)
             ORDER BY w.priority DESC, w.accepted_at_us, w.ticket
             LIMIT $2 FOR UPDATE OF w SKIP LOCKED",
            &[&t.now_us, &want],
        )
        .await?;
    let candidates: Vec<(Uuid, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut busy_now: BTreeMap<&str, usize> = BTreeMap::new();
    for wf in candidates.iter().map(|(_, wf)| wf.as_str()).filter(|wf| limited.contains(wf)) {
        if !busy_now.contains_key(wf) {
            busy_now.insert(wf, busy(&tx, wf, t.now_us).await?);
        }
    }
    let mut taken = Vec::new();
    for (run, wf) in &candidates {
        if taken.len() >= t.max {
            break;
        }
        let limit = t.limits.get(wf).copied().unwrap_or(0);
        let n = busy_now.get(wf.as_str()).copied().unwrap_or(0);
        if limit > 0 && n >= limit {
            continue;
        }
        let Some(epoch) = grant(&tx, *run, t.owner, t.expires_at_us, t.now_us).await? else { continue };
        if let Some(n) = busy_now.get_mut(wf.as_str()) {
            *n += 1;
        }
        taken.push((RunId(*run), wf.clone(), epoch));
    }
    tx.commit().await?;
    if !taken.is_empty() {
        // A grant lost in a crash of the server could hand one epoch out twice: the claim
        // is made durable (a synchronous commit flushes the WAL up to it) before any lease
        // is used. The claim locks were not held through that flush.
        crate::store::flush_tx(client).await?;
    }
    Ok(taken)
}

/// Grants `owner` the run's lease (as `try_lease`) and marks the run claimed by it.
async fn grant(
    tx: &Transaction<'_>,
    run: Uuid,
    owner: &str,
    expires_at_us: i64,
    now_us: i64,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = tx
        .row_opt(
            "INSERT INTO leases (run, owner, epoch, expires_at_us) VALUES ($1, $2, 1, $3)
             ON CONFLICT (run) DO UPDATE
               SET owner = EXCLUDED.owner, epoch = leases.epoch + 1, expires_at_us = EXCLUDED.expires_at_us
               WHERE leases.owner IS NULL OR leases.expires_at_us <= $4
             RETURNING epoch",
            &[&run, &owner, &expires_at_us, &now_us],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    tx.exec("UPDATE work SET claimed_by = $2, again = false WHERE run = $1", &[&run, &owner]).await?;
    Ok(Some(row.get(0)))
}

async fn done_tx(
    client: &mut ClientWrapper,
    run: RunId,
    owner: &str,
    due_at_us: Option<i64>,
    schema: &str,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Sent together (one round trip); the notification is delivered at commit: a slot of
    // the run's workflow type is free (or the run is queued again).
    let params: [&(dyn ToSql + Sync); 2] = [&run.0, &owner];
    let (_, again, _) = tokio::try_join!(
        tx.batch_execute(ASYNC_COMMIT),
        tx.exec(
            "UPDATE work SET again = false, claimed_by = NULL WHERE run = $1 AND claimed_by = $2 AND again",
            &params,
        ),
        notify(&tx, schema),
    )?;
    let again = again == 1;
    if !again {
        // The row goes, and a run waiting for a timer gets its due time, in one statement.
        tx.exec(
            "WITH gone AS (DELETE FROM work WHERE run = $1 AND claimed_by = $2 RETURNING run)
             INSERT INTO due (run, due_at_us) SELECT run, $3::bigint FROM gone WHERE $3::bigint IS NOT NULL
             ON CONFLICT (run) DO UPDATE SET due_at_us = EXCLUDED.due_at_us",
            &[&run.0, &owner, &due_at_us],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(again)
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

async fn take_due_q(pool: Arc<Pool>, now_us: i64, limit: i64) -> Result<Vec<RunId>, StoreError> {
    let mut conn = pool.get().await?;
    let result = conn
        .client()?
        .query(
            "DELETE FROM due WHERE run IN (
                 SELECT run FROM due WHERE due_at_us <= $1 ORDER BY due_at_us, run LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING run",
            &[&now_us, &limit],
        )
        .await;
    let rows = conn.ok(result)?;
    rows.into_iter().map(|r| Ok(RunId(r.try_get::<_, Uuid>(0).map_err(pg)?))).collect()
}

impl WorkQueue for PgStore {
    fn push(&self, runnable: &Runnable) -> Result<(), StoreError> {
        too_long("workflow name", &runnable.workflow, WORKFLOW_BYTES_MAX)?;
        let (pool, r, schema) = (self.pool(), runnable.clone(), self.schema().to_owned());
        self.call(async move {
            let mut conn = pool.get().await?;
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
        let taken = self.call(async move {
            let mut conn = pool.get().await?;
            let t = Take { owner: &who, expires_at_us, now_us, max, limits: &lim };
            let result = claim_tx(conn.client()?, t, &schema).await;
            conn.ok(result)
        })?;
        Ok(taken
            .into_iter()
            .map(|(run, workflow, epoch)| Claimed { lease: self.lease(run, owner, epoch, expires_at_us), workflow })
            .collect())
    }

    fn done(&self, run: RunId, owner: &str, due_at_us: Option<i64>) -> Result<bool, StoreError> {
        let (pool, who, schema) = (self.pool(), owner.to_owned(), self.schema().to_owned());
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = done_tx(conn.client()?, run, &who, due_at_us, &schema).await;
            conn.ok(result)
        })
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
