//! [`PgStore`]: the seam's two traits on PostgreSQL. The seam is synchronous and is called
//! from the engine's blocking sections and from plain threads, so the store runs its own
//! small runtime: each call is spawned there and the caller waits on a std channel (never
//! `block_on`, which panics inside another runtime).

use crate::cached::Cached;
use crate::error::{pg, OpenError, PgError, Timed};
use crate::group::{self, Append, Counters, FlushMode};
use crate::pool::{Bounds, Pool};
use crate::schema;
use deadpool_postgres::ClientWrapper;
use keel_store::{
    backend, AuxEntry, AuxWrite, Claim, Coordination, Durability, EventLog, Fence, Hash32, Head, Lease, Limits,
    NewRecord, PayloadRef, Payloads, RecordIter, ReleaseOnDrop, RunId, RunRecords, Seq, StoreError, OWNER_BYTES_MAX,
    PAYLOAD_BYTES_MAX,
};
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// How to open a [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// `postgres://user@host:port/database` (libpq URL or key=value form).
    pub url: String,
    /// The schema (namespace) holding the store's tables: a plain lower-case identifier.
    /// Several stores can share one database in different schemas. Default `keel`.
    pub schema: String,
    /// When an append returns (docs/STORE.md, "PostgreSQL"). Default: group commit.
    pub durability: Durability,
    /// Size limits (validated at open: `InvalidConfig`).
    pub limits: Limits,
    /// Sessions the store opens at most, of each of its two kinds (appends and reads; the
    /// queue's bookkeeping, committed without waiting for the WAL flush): up to twice this
    /// many server connections, and one more listening for the queue's notifications.
    /// Appends use one at a time. Default 4, 1..=64.
    pub pool_size: usize,
    /// Records fetched per query while reading a run. Default 256, 1..=65536.
    pub read_page_records: usize,
    /// Create the schema and its tables if missing (default true); false => `NotFound`.
    pub create: bool,
    /// How long opening a session may take (TCP connect, startup, authentication), else
    /// [`Timed::Connect`]. Default 10 s, 1..=3_600_000.
    pub connect_timeout_ms: u64,
    /// How long one statement may run on the server (its `statement_timeout`, also bounding
    /// a wait for a row lock), else [`Timed::Statement`]: the server cancels it and rolls
    /// its transaction back. Default 30 s, 1..=3_600_000.
    pub statement_timeout_ms: u64,
    /// How long one call into PostgreSQL may take in all (taking a session, its statements,
    /// its commit; one flush for appends), else [`Timed::Call`] ([`Timed::Commit`] when
    /// COMMIT was in flight); the backstop for a server that does not answer at all.
    /// Default 60 s, 1..=3_600_000.
    pub call_timeout_ms: u64,
    /// How long the server lets a session of this store sit idle inside a transaction
    /// before it ends the session (`idle_in_transaction_session_timeout`): a process
    /// paused between the two round trips of a flush (SIGSTOP, a frozen VM, a partition)
    /// holds its runs' lease and head rows locked until then, so other processes can
    /// take those runs over no sooner. A healthy store is idle in a transaction for a
    /// round trip's time. Default 10 s (the engine's default lease), 1..=3_600_000.
    pub idle_in_transaction_timeout_ms: u64,
    /// Threads of the store's own runtime, which runs its sessions' I/O, the flusher and
    /// the queue's listener. Default: 1 on a machine with at most 2 cores (measured there
    /// with 4 worker processes: a second thread per process only added context switches,
    /// docs/PERFORMANCE.md "Session 14"), else 2. 1..=64.
    pub io_threads: usize,
}

impl PgConfig {
    /// The defaults for the database at `url`.
    pub fn new(url: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            schema: "keel".into(),
            durability: Durability::default(),
            limits: Limits::default(),
            pool_size: 4,
            read_page_records: 256,
            create: true,
            connect_timeout_ms: 10_000,
            statement_timeout_ms: 30_000,
            call_timeout_ms: 60_000,
            idle_in_transaction_timeout_ms: 10_000,
            io_threads: default_io_threads(),
        }
    }
}

/// [`PgConfig::io_threads`]' default: 1 with at most 2 cores, else 2.
fn default_io_threads() -> usize {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() > 2 => 2,
        _ => 1,
    }
}

/// Most threads a store's runtime may have ([`PgConfig::io_threads`]).
const IO_THREADS_MAX: usize = 64;

/// What the store has done since it opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Transactions committed (or rolled back with nothing to write) by the flusher.
    pub flushes: u64,
    /// Appends written.
    pub appends: u64,
    /// Fenced appends refused because their lease epoch was stale.
    pub fenced_refusals: u64,
    /// Flushes rolled back because another writer created a row first (then retried one
    /// append per transaction).
    pub raced_flushes: u64,
    /// Flushes sent as one statement on the heads this process knew (docs/STORE.md 15.2b).
    pub one_statement_flushes: u64,
    /// Of those, the ones whose known heads or leases were not as known: nothing written,
    /// then decided the locking way.
    pub one_statement_misses: u64,
    /// Folds a claim read for the runs it granted, kept for their drives (docs/STORE.md
    /// 15.2a).
    pub claim_folds_read: u64,
    /// Of those, the ones a fold of the run took (its drive's first, as a rule).
    pub claim_folds_used: u64,
    /// Drives whose end was recorded in the queue with their last append, in its one
    /// statement (no `done` of their own; docs/STORE.md 15.2b).
    pub drives_ended_with_append: u64,
}

/// Owns the runtime; shuts it down without waiting (dropping a runtime inside another
/// runtime's task would panic).
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Shared {
    handle: tokio::runtime::Handle,
    bounds: Bounds,
    pool: Arc<Pool>,
    appends: mpsc::UnboundedSender<group::Item>,
    counters: Arc<Counters>,
    /// The heads this process last saw (a flush's hint, [`group::Heads`]).
    heads: Arc<group::Heads>,
    limits: Limits,
    durability: Durability,
    page: i64,
    schema: String,
    /// Where the work queue's listener connects (its own session, outside the pool).
    pg: tokio_postgres::Config,
    wakers: Arc<crate::wakers::Wakers>,
    /// The notifications of ended drives, spaced out ([`crate::herald::Notices`]).
    notices: Arc<crate::herald::Notices>,
    /// The folds a claim read for the runs it granted ([`Prefetched`]).
    prefetched: Arc<Prefetched>,
    // Last: the runtime goes after everything that spawns onto it.
    _rt: Rt,
}

/// Runs `fut` on the store's runtime and waits for it with std primitives, so any thread
/// may call it: a plain one, or a runtime's thread inside `block_in_place` or
/// `spawn_blocking`. After `bound` the call is cut ([`Timed::Call`]): `fut` is dropped
/// there, and with it the session it held (never reused; its statement cancelled).
fn call<T, F>(handle: &tokio::runtime::Handle, bound: Duration, fut: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let out = match tokio::time::timeout(bound, fut).await {
            Ok(out) => out,
            Err(_) => Err(PgError::Timeout { what: Timed::Call, after_ms: millis(bound) }.into()),
        };
        let _ = tx.send(out);
    });
    rx.recv().map_err(|_| StoreError::from(PgError::Closed))?
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Shared {
    fn call<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        call(&self.handle, self.bounds.call, fut)
    }
}

/// The bounds of `config`, each checked to be in range.
fn bounds(config: &PgConfig) -> Result<Bounds, OpenError> {
    let ms = |name: &str, v: u64| {
        if (1..=TIMEOUT_MS_MAX).contains(&v) {
            Ok(Duration::from_millis(v))
        } else {
            Err(OpenError::InvalidConfig { reason: format!("{name} {v} not in 1..={TIMEOUT_MS_MAX}") })
        }
    };
    Ok(Bounds {
        connect: ms("connect_timeout_ms", config.connect_timeout_ms)?,
        statement: ms("statement_timeout_ms", config.statement_timeout_ms)?,
        call: ms("call_timeout_ms", config.call_timeout_ms)?,
        idle_in_transaction: ms("idle_in_transaction_timeout_ms", config.idle_in_transaction_timeout_ms)?,
    })
}

/// The longest timeout a config may set (one hour).
const TIMEOUT_MS_MAX: u64 = 3_600_000;

/// keel's event log and coordination on PostgreSQL (docs/STORE.md, "PostgreSQL"). Several
/// processes may open one schema at once: appends are checked by the database (the run's
/// head row, locked), leases live in a table, and a fenced append checks its epoch under
/// the lease row's lock in the append's transaction.
pub struct PgStore {
    shared: Arc<Shared>,
}

impl PgStore {
    /// Connects, creates (with `config.create`) and migrates the schema, and starts the
    /// flusher. Refuses a schema migrated by a newer build ([`OpenError::SchemaTooNew`]).
    pub fn open(config: PgConfig) -> Result<PgStore, OpenError> {
        backend::validate_limits(&config.limits).map_err(OpenError::Limits)?;
        let invalid = |reason: String| Err(OpenError::InvalidConfig { reason });
        if let Some(problem) = schema::schema_name_problem(&config.schema) {
            return invalid(format!("schema {:?} {problem}", config.schema));
        }
        if !(1..=64).contains(&config.pool_size) {
            return invalid(format!("pool_size {} not in 1..=64", config.pool_size));
        }
        if !(1..=65_536).contains(&config.read_page_records) {
            return invalid(format!("read_page_records {} not in 1..=65536", config.read_page_records));
        }
        if !(1..=IO_THREADS_MAX).contains(&config.io_threads) {
            return invalid(format!("io_threads {} not in 1..={IO_THREADS_MAX}", config.io_threads));
        }
        let bounds = bounds(&config)?;
        let mut pg: tokio_postgres::Config =
            config.url.parse().map_err(|e| OpenError::InvalidConfig { reason: crate::error::describe(&e) })?;
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            // libpq would try a Unix socket; keel connects over TCP only.
            return invalid("no host in the URL (keel connects over TCP: postgres://USER@HOST:PORT/DATABASE)".into());
        }
        // `synchronous_commit=on` whatever the server's or role's default: the durability
        // of appends and of the WAL barriers claims wait for rests on it (docs/STORE.md 15.3).
        // The queue's bookkeeping goes through lazy sessions (`synchronous_commit=off`, see
        // `pool.rs`).
        // The URL's own `options` come first: keel's settings after them win for the five
        // it sets, the user's others stay.
        let theirs = pg.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        let options = |sync: &str| {
            format!(
                "{theirs}-c synchronous_commit={sync} -c plan_cache_mode=force_generic_plan -c search_path={} \
                 -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
                config.schema,
                bounds.statement_ms(),
                millis(bounds.idle_in_transaction)
            )
        };
        // The URL's `application_name` if it names one; its `connect_timeout` if shorter.
        if pg.get_application_name().is_none() {
            pg.application_name("keel");
        }
        let connect = pg.get_connect_timeout().map_or(bounds.connect, |t| (*t).min(bounds.connect));
        pg.connect_timeout(connect);
        let mut lazy = pg.clone();
        pg.options(options("on"));
        lazy.options(options("off"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads)
            .thread_name("keel-postgres")
            .enable_all()
            .build()
            .map_err(OpenError::Runtime)?;
        let rt = Rt(Some(rt));
        let handle = rt.0.as_ref().map(|r| r.handle().clone()).ok_or(OpenError::Postgres(PgError::Closed))?;
        // Used only from tasks on the store's runtime: its timers bound the pool's waits and
        // its sessions' connection tasks are spawned there.
        let pool = Arc::new(Pool::new(pg.clone(), lazy, config.pool_size, bounds).map_err(OpenError::Postgres)?);
        {
            let (pool, schema, create) = (pool.clone(), config.schema.clone(), config.create);
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            handle.spawn(async move {
                let migrated = async {
                    let mut conn = pool.get().await.map_err(OpenError::Postgres)?;
                    let client = conn.client().map_err(OpenError::Postgres)?;
                    let result = schema::migrate(client, &schema, create).await;
                    match &result {
                        Err(OpenError::Postgres(e)) => conn.settled(e),
                        _ => conn.settle(),
                    }
                    result.map_err(|e| match e {
                        OpenError::Postgres(e) => OpenError::Postgres(e.with_statement_ms(bounds.statement_ms())),
                        other => other,
                    })
                };
                let result = match tokio::time::timeout(bounds.call, migrated).await {
                    Ok(result) => result,
                    Err(_) => {
                        Err(OpenError::Postgres(PgError::Timeout { what: Timed::Call, after_ms: bounds.call_ms() }))
                    }
                };
                let _ = tx.send(result);
            });
            rx.recv().map_err(|_| OpenError::Postgres(PgError::Closed))??;
        }
        let (appends_max, flushers) = (group::FLUSH_APPENDS_MAX, 1);
        let mode = match config.durability {
            Durability::None => FlushMode { appends_max, async_commit: true, flushers },
            Durability::GroupCommit(_) => FlushMode { appends_max, async_commit: false, flushers },
            // Each append its own transaction, several at once (one per session).
            Durability::EveryAppend(_) => FlushMode { appends_max: 1, async_commit: false, flushers: config.pool_size },
        };
        let counters = Arc::new(Counters::default());
        let heads = Arc::new(group::Heads::default());
        let notices = Arc::new(crate::herald::Notices {
            herald: crate::herald::Herald::default(),
            schema: config.schema.clone(),
            pool: pool.clone(),
        });
        let (appends, rx) = mpsc::unbounded_channel();
        let queue: group::Queue = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..mode.flushers {
            handle.spawn(group::flusher(
                pool.clone(),
                queue.clone(),
                mode,
                counters.clone(),
                heads.clone(),
                notices.clone(),
            ));
        }
        let page = i64::try_from(config.read_page_records).unwrap_or(256);
        Ok(PgStore {
            shared: Arc::new(Shared {
                handle,
                bounds,
                pool,
                appends,
                counters,
                heads,
                limits: config.limits,
                durability: config.durability,
                page,
                schema: config.schema,
                pg,
                wakers: Arc::default(),
                notices,
                prefetched: Arc::default(),
                _rt: rt,
            }),
        })
    }

    /// The schema the store's tables are in.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// Counters since open (flushes, appends, fenced refusals, raced flushes, flushes in one
    /// statement).
    pub fn stats(&self) -> PgStats {
        let c = &self.shared.counters;
        PgStats {
            flushes: c.flushes.load(Ordering::Relaxed),
            appends: c.appends.load(Ordering::Relaxed),
            fenced_refusals: c.fenced.load(Ordering::Relaxed),
            raced_flushes: c.raced.load(Ordering::Relaxed),
            one_statement_flushes: c.fast.load(Ordering::Relaxed),
            one_statement_misses: c.fast_missed.load(Ordering::Relaxed),
            claim_folds_read: self.shared.prefetched.read.load(Ordering::Relaxed),
            claim_folds_used: self.shared.prefetched.used.load(Ordering::Relaxed),
            drives_ended_with_append: c.ended.load(Ordering::Relaxed),
        }
    }

    /// Runs one statement on a pooled connection, within the call bound (the upserts of
    /// snapshots, aux entries and due times).
    fn exec(&self, sql: &'static str, params: Vec<Box<dyn ToSql + Send + Sync>>) -> Result<(), StoreError> {
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            let result = conn.client()?.exec(sql, &refs).await;
            conn.ok(result)?;
            Ok(())
        })
    }

    pub(crate) fn call<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.shared.call(fut)
    }

    pub(crate) fn pool(&self) -> Arc<Pool> {
        self.shared.pool.clone()
    }

    pub(crate) fn wakers(&self) -> Arc<crate::wakers::Wakers> {
        self.shared.wakers.clone()
    }

    /// What a claim needs to read its runs' folds: the page of a fold's read, the heads
    /// hint, and where the folds are kept ([`Prefetched`]).
    pub(crate) fn fold_reads(&self) -> (i64, Arc<group::Heads>, Arc<Prefetched>) {
        (self.shared.page, self.shared.heads.clone(), self.shared.prefetched.clone())
    }

    /// Drops the fold a claim kept for `run` ([`Prefetched::forget`]).
    pub(crate) fn forget_fold(&self, run: RunId) {
        self.shared.prefetched.forget(run);
    }

    pub(crate) fn notices(&self) -> Arc<crate::herald::Notices> {
        self.shared.notices.clone()
    }

    pub(crate) fn pg_config(&self) -> tokio_postgres::Config {
        self.shared.pg.clone()
    }

    /// Runs `fut` on the store's runtime in the background (it ends with the store).
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.shared.handle.spawn(fut);
    }

    /// An append, fenced or not: checked here, decided and written by the flusher.
    fn submit(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.queue(Append {
            run,
            expected,
            records,
            claim,
            fence,
            aux,
            end: None,
            reply: group::Reply::Blocking(reply),
        })?;
        rx.recv().map_err(|_| StoreError::from(PgError::Closed))?
    }

    /// [`PgStore::submit`] whose outcome is awaited: the flusher answers the future
    /// directly (no thread waits for it). `append` builds the append around its reply.
    fn submit_async(
        &self,
        append: impl FnOnce(group::Reply) -> Append,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Head, StoreError>>, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.queue(append(group::Reply::Async(reply)))?;
        Ok(rx)
    }

    /// Checks `a` and hands it to the flusher (nothing is queued if it is refused). A fold
    /// a claim kept for its run is past once the run is appended to ([`Prefetched`]).
    fn queue(&self, a: Append) -> Result<(), StoreError> {
        self.forget_fold(a.run);
        backend::validate_append(a.run, &a.records, a.claim.as_ref(), &self.shared.limits)?;
        backend::validate_aux(&a.aux, &self.shared.limits)?;
        self.shared.appends.send(group::Item::Append(a)).map_err(|_| StoreError::from(PgError::Closed))
    }

    /// Waits until the WAL on disk holds every commit made before this call: the next
    /// flush of appends covers it (no commit of its own while appends are flowing).
    pub(crate) async fn barrier(appends: &mpsc::UnboundedSender<group::Item>) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        appends.send(group::Item::Barrier(tx)).map_err(|_| StoreError::from(PgError::Closed))?;
        rx.await.map_err(|_| StoreError::from(PgError::Closed))?.map_err(StoreError::from)
    }

    /// The flusher's queue (for [`PgStore::barrier`]).
    pub(crate) fn appends(&self) -> mpsc::UnboundedSender<group::Item> {
        self.shared.appends.clone()
    }

    /// The stored chain hash of record `(run, seq)`, if stored.
    fn stored_hash(&self, run: RunId, seq: u64) -> Result<Option<Hash32>, StoreError> {
        let Some(value) = self.call(record_value(self.pool(), run, seq))? else {
            return Ok(None);
        };
        Ok(Some(backend::decode_record(run, Seq(seq), &value)?.hash))
    }

    pub(crate) fn lease(&self, run: RunId, owner: &str, epoch: i64, expires_at_us: i64) -> Lease {
        let releaser: Arc<dyn ReleaseOnDrop> = Arc::new(Releaser(Arc::downgrade(&self.shared)));
        Lease::releasing_on_drop(run, owner, u64::try_from(epoch).unwrap_or(0), expires_at_us, releaser)
    }

    fn records(&self, run: RunId, from: Seq, linked: bool) -> Result<RecordIter, StoreError> {
        let prev = match from.0.checked_sub(1) {
            None => [0u8; 32],
            Some(p) => match self.stored_hash(run, p) {
                Ok(Some(h)) => h,
                Ok(None) if !linked => [0u8; 32],
                Ok(None) => {
                    // Reading past the end is empty; a missing predecessor of stored
                    // records is a gap.
                    if !self.call(any_from(self.pool(), run, from.0))? {
                        return Ok(Box::new(std::iter::empty()));
                    }
                    return Ok(Box::new(std::iter::once(Err(StoreError::Corrupted {
                        run,
                        seq: Seq(p),
                        reason: "broken link: record missing before the read start (record removed)".into(),
                    }))));
                }
                Err(e) if linked => return Ok(Box::new(std::iter::once(Err(e)))),
                Err(_) => [0u8; 32],
            },
        };
        let pages = Pages { shared: self.shared.clone(), run, next: from.0, buf: VecDeque::new(), done: false };
        Ok(backend::checked_records(run, pages, from, prev, linked))
    }
}

/// Releases a dropped lease (in the database), unless the store is gone.
#[derive(Debug)]
struct Releaser(Weak<Shared>);

impl ReleaseOnDrop for Releaser {
    fn release_dropped(&self, run: RunId, epoch: u64) {
        let Some(shared) = self.0.upgrade() else { return };
        if let Err(e) = shared.call(release(shared.pool.clone(), run, epoch)) {
            tracing::warn!(%run, epoch, error = %e, "releasing a dropped lease failed (it ends at expiry)");
        }
    }
}

/// A run's stored `(seq, value)` pairs from `next`, fetched a page at a time.
struct Pages {
    shared: Arc<Shared>,
    run: RunId,
    next: u64,
    buf: VecDeque<(Seq, Vec<u8>)>,
    done: bool,
}

impl Iterator for Pages {
    type Item = Result<(Seq, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(pair) = self.buf.pop_front() {
            return Some(Ok(pair));
        }
        if self.done {
            return None;
        }
        let fetched = self.shared.call(page(self.shared.pool.clone(), self.run, self.next, self.shared.page));
        match fetched {
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
            Ok(rows) => {
                self.done = i64::try_from(rows.len()).map_or(true, |n| n < self.shared.page);
                match rows.last().map(|(s, _)| s.0.checked_add(1)) {
                    Some(Some(n)) => self.next = n,
                    Some(None) => self.done = true,
                    None => {}
                }
                self.buf.extend(rows);
                self.buf.pop_front().map(Ok)
            }
        }
    }
}

fn seq_param(seq: u64) -> i64 {
    // Stored seqs are below i64::MAX (appends refuse longer runs): beyond reads as nothing.
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn stored_seq(run: RunId, seq: i64) -> Result<Seq, StoreError> {
    u64::try_from(seq).map(Seq).map_err(|_| StoreError::Corrupted {
        run,
        seq: Seq(0),
        reason: format!("stored seq {seq}"),
    })
}

async fn page(pool: Arc<Pool>, run: RunId, from: u64, limit: i64) -> Result<Vec<(Seq, Vec<u8>)>, StoreError> {
    let mut conn = pool.get().await?;
    let result = conn
        .client()?
        .rows(
            "SELECT seq, value FROM events WHERE run = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
            &[&run.0, &seq_param(from), &limit],
        )
        .await;
    let rows = conn.ok(result)?;
    rows.into_iter().map(|r| Ok((stored_seq(run, r.try_get(0).map_err(pg)?)?, r.try_get(1).map_err(pg)?))).collect()
}

async fn record_value(pool: Arc<Pool>, run: RunId, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let mut conn = pool.get().await?;
    let result = conn
        .client()?
        .row_opt("SELECT value FROM events WHERE run = $1 AND seq = $2", &[&run.0, &seq_param(seq)])
        .await;
    let row = conn.ok(result)?;
    row.map(|r| r.try_get(0).map_err(pg)).transpose()
}

async fn any_from(pool: Arc<Pool>, run: RunId, from: u64) -> Result<bool, StoreError> {
    let mut conn = pool.get().await?;
    let result = conn
        .client()?
        .row_opt("SELECT EXISTS (SELECT 1 FROM events WHERE run = $1 AND seq >= $2)", &[&run.0, &seq_param(from)])
        .await;
    let row = conn.ok(result)?;
    row.map_or(Ok(false), |row| row.try_get(0).map_err(pg))
}

async fn head_of(pool: Arc<Pool>, run: RunId) -> Result<Head, StoreError> {
    let mut conn = pool.get().await?;
    let result =
        conn.client()?.row_opt("SELECT next_seq, last_hash, last_kind FROM heads WHERE run = $1", &[&run.0]).await;
    let row = conn.ok(result)?;
    let Some(row) = row else { return Ok(Head::empty()) };
    let next_seq = stored_seq(run, row.try_get(0).map_err(pg)?)?;
    let hash: Vec<u8> = row.try_get(1).map_err(pg)?;
    let last_hash = Hash32::try_from(hash.as_slice()).map_err(|_| StoreError::Corrupted {
        run,
        seq: next_seq,
        reason: format!("head row hash has {} bytes", hash.len()),
    })?;
    Ok(Head { next_seq, last_hash, last_kind: Some(row.try_get(2).map_err(pg)?) })
}

/// Runs listed per query by `runs()`.
const RUNS_PAGE: i64 = 10_000;

/// The runs with ids in `lo..=hi` (PostgreSQL orders uuids by their bytes, as `RunId`
/// does), a page at a time.
async fn runs_in(pool: Arc<Pool>, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
    let mut conn = pool.get().await?;
    let mut out: Vec<RunId> = Vec::new();
    loop {
        let client = conn.client()?;
        let rows = match out.last() {
            None => {
                client
                    .rows(
                        "SELECT run FROM heads WHERE run >= $1 AND run <= $2 ORDER BY run LIMIT $3",
                        &[&lo.0, &hi.0, &RUNS_PAGE],
                    )
                    .await
            }
            Some(after) => {
                client
                    .rows(
                        "SELECT run FROM heads WHERE run > $1 AND run <= $2 ORDER BY run LIMIT $3",
                        &[&after.0, &hi.0, &RUNS_PAGE],
                    )
                    .await
            }
        };
        let rows = conn.ok(rows)?;
        let n = rows.len();
        for r in rows {
            out.push(RunId(r.try_get::<_, Uuid>(0).map_err(pg)?));
        }
        if i64::try_from(n).map_or(true, |n| n < RUNS_PAGE) {
            return Ok(out);
        }
    }
}

async fn flush_wal(pool: Arc<Pool>) -> Result<(), StoreError> {
    let mut conn = pool.get().await?;
    let result = group::flush_tx(conn.client()?).await;
    conn.ok(result)
}

/// [`Coordination::remove_run`] in one transaction: the run's head row locked and
/// compared with `expected` (the stored `next_seq` is returned; on a mismatch nothing is
/// changed), then its events, head, snapshot, due time and lease, the given payloads,
/// and the aux writes.
async fn remove_run_tx(
    client: &mut ClientWrapper,
    run: RunId,
    digests: &[Vec<u8>],
    aux: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    expected: Seq,
) -> Result<i64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let row = tx.row_opt("SELECT next_seq FROM heads WHERE run = $1 FOR UPDATE", &[&run.0]).await?;
    let actual: i64 = match row {
        Some(r) => r.try_get(0)?,
        None => 0,
    };
    if u64::try_from(actual).ok() != Some(expected.0) {
        tx.rollback().await?;
        return Ok(actual);
    }
    for table in ["events", "heads", "snapshots", "due"] {
        tx.exec(&format!("DELETE FROM {table} WHERE run = $1"), &[&run.0]).await?;
    }
    if !digests.is_empty() {
        tx.exec("DELETE FROM payloads WHERE digest = ANY($1)", &[&digests]).await?;
        tx.exec("DELETE FROM payload_manifests WHERE digest = ANY($1)", &[&digests]).await?;
    }
    group::aux_statements(&tx, aux).await?;
    tx.commit().await?;
    Ok(actual)
}

/// A range of the aux keyspace: plain entries and counters (the sum of their shards), in
/// key order, at most `$3`. Each part is limited in its own branch, so the read follows
/// the page, not the range: with the limit only over the union, the whole range was read
/// and sorted (57 ms for a range of 100,000 keys under a generic plan).
pub(crate) const AUX_RANGE_SQL: &str =
    "(SELECT key, value FROM aux WHERE key >= $1 AND key <= $2 ORDER BY key LIMIT $3)
     UNION ALL
     (SELECT key, int8send(sum(value)::bigint) FROM counters WHERE key >= $1 AND key <= $2
      GROUP BY key ORDER BY key LIMIT $3)
     ORDER BY key LIMIT $3";

/// Ends a lease if its epoch is still the run's.
pub(crate) const RELEASE_SQL: &str =
    "UPDATE leases SET owner = NULL, epoch = epoch + 1 WHERE run = $1 AND epoch = $2 AND owner IS NOT NULL";

async fn release(pool: Arc<Pool>, run: RunId, epoch: u64) -> Result<(), StoreError> {
    // Not waited for: a release lost in a crash of the server only makes the next holder
    // wait for the expiry; any later synchronous commit (a grant) covers it.
    let Ok(epoch) = i64::try_from(epoch) else { return Ok(()) };
    let mut conn = pool.lazy().await?;
    let result = conn.client()?.exec(RELEASE_SQL, &[&run.0, &epoch]).await;
    conn.ok(result).map(drop)
}

pub(crate) fn expiry(now_us: i64, ttl_ms: u64) -> i64 {
    let ttl_us = i64::try_from(ttl_ms).unwrap_or(i64::MAX).saturating_mul(1000);
    now_us.saturating_add(ttl_us)
}

impl EventLog for PgStore {
    fn append(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
    ) -> Result<Head, StoreError> {
        self.submit(run, expected, records, claim, None, Vec::new())
    }

    fn read(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.records(run, from, true)
    }

    fn head(&self, run: RunId) -> Result<Head, StoreError> {
        self.call(head_of(self.pool(), run))
    }

    fn runs(&self) -> Result<Vec<RunId>, StoreError> {
        self.call(runs_in(self.pool(), RunId(Uuid::nil()), RunId(Uuid::max())))
    }

    fn runs_between(&self, lo: RunId, hi: RunId) -> Result<Vec<RunId>, StoreError> {
        self.call(runs_in(self.pool(), lo, hi))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.call(flush_wal(self.pool()))
    }

    fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn limits(&self) -> Limits {
        self.shared.limits.clone()
    }

    fn commit_stats(&self) -> keel_store::stats::CommitStats {
        self.shared.counters.commits.stats(true)
    }

    fn read_runs<'a>(&'a self, runs: &'a [RunId]) -> RunRecords<'a> {
        keel_store::read_runs_in_turn(self, runs)
    }

    fn scan(&self, run: RunId, from: Seq) -> Result<RecordIter, StoreError> {
        self.records(run, from, false)
    }
}

impl keel_store::AsyncAppend for PgStore {
    fn append_async<'a>(
        &'a self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Option<Fence>,
        aux: Vec<AuxWrite>,
    ) -> keel_store::AppendFuture<'a> {
        let queued = self.submit_async(|reply| Append { run, expected, records, claim, fence, aux, end: None, reply });
        Box::pin(async move { queued?.await.map_err(|_| StoreError::from(PgError::Closed))? })
    }

    /// The append with the drive's end ([`group::End`]): recorded in the flush's one
    /// statement when the flush goes that way (docs/STORE.md 15.2b), else not (the caller
    /// calls `done`).
    fn append_ending_async<'a>(
        &'a self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        fence: Fence,
        aux: Vec<AuxWrite>,
        owner: &'a str,
    ) -> keel_store::EndingFuture<'a> {
        let recorded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let end = (owner.len() <= OWNER_BYTES_MAX)
            .then(|| group::End { owner: owner.to_owned(), recorded: recorded.clone() });
        let queued = self.submit_async(|reply| Append {
            run,
            expected,
            records,
            claim: None,
            fence: Some(fence),
            aux,
            end,
            reply,
        });
        let counters = self.shared.counters.clone();
        Box::pin(async move {
            let head = queued?.await.map_err(|_| StoreError::from(PgError::Closed))??;
            let ended = recorded.load(Ordering::SeqCst);
            if ended {
                counters.ended.fetch_add(1, Ordering::Relaxed);
            }
            Ok((head, ended))
        })
    }

    /// The fold a claim of this store read for `run` if it is still kept ([`Prefetched`]),
    /// else one statement ([`FOLD_SQL`]) on the store's runtime, answered through a oneshot.
    fn fold_source_async<'a>(&'a self, run: RunId) -> keel_store::FoldFuture<'a> {
        if let Some(source) = self.shared.prefetched.take(run) {
            return Box::pin(async move { Ok(Some(source)) });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (pool, page, bound) = (self.pool(), self.shared.page, self.shared.bounds.call);
        let heads = self.shared.heads.clone();
        self.shared.handle.spawn(async move {
            let out = match tokio::time::timeout(bound, fold_source(pool, run, page, &heads)).await {
                Ok(out) => out,
                Err(_) => Err(PgError::Timeout { what: Timed::Call, after_ms: millis(bound) }.into()),
            };
            let _ = tx.send(out);
        });
        Box::pin(async move { rx.await.map_err(|_| StoreError::from(PgError::Closed))? })
    }
}

/// A run's snapshot (a row with a NULL seq: its value and the seq it covers up to) and a
/// page of its records from the one before that seq (from 0 without a snapshot): the
/// record before is the snapshot's anchor and the first link of the tail.
const FOLD_SQL: &str = "WITH s AS (SELECT value, next_seq FROM snapshots WHERE run = $1)
     SELECT NULL::bigint, value, next_seq FROM s
     UNION ALL
     (SELECT seq, value, NULL::bigint FROM events
      WHERE run = $1 AND seq >= greatest(coalesce((SELECT next_seq FROM s), 0) - 1, 0)
      ORDER BY seq LIMIT $2)";

/// [`keel_store::AsyncAppend::fold_source_async`]: one statement; `None` where the
/// two-step read must do it (a snapshot saved before schema migration 6, or one that does
/// not open: those report it; a tail of a page or more: read a page at a time, each
/// within the call bound, and folded as it streams). The records are chain-checked by the
/// caller as it iterates them, not on the store's runtime.
async fn fold_source(
    pool: Arc<Pool>,
    run: RunId,
    page: i64,
    heads: &group::Heads,
) -> Result<Option<keel_store::FoldSource>, StoreError> {
    let rows = {
        let mut conn = pool.get().await?;
        let result = conn.client()?.rows(FOLD_SQL, &[&run.0, &page]).await;
        conn.ok(result)?
    };
    let rows = rows
        .iter()
        .map(|row| Ok((row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?, row.try_get(2).map_err(pg)?)))
        .collect::<Result<Vec<FoldRow>, StoreError>>()?;
    source_of(run, rows, page, heads)
}

/// One row of [`FOLD_SQL`] (or of a run in [`FOLD_MANY_SQL`]): `(seq, value, next_seq)`, a
/// record (`seq`) or the snapshot (no `seq`; the seq it covers up to).
type FoldRow = (Option<i64>, Vec<u8>, Option<i64>);

/// The fold source of `run` from its rows (see [`fold_source`]); `None` where the
/// two-step read must do it.
fn source_of(
    run: RunId,
    rows: Vec<FoldRow>,
    page: i64,
    heads: &group::Heads,
) -> Result<Option<keel_store::FoldSource>, StoreError> {
    let mut snap: Option<(Vec<u8>, Option<i64>)> = None;
    let mut pairs: Vec<(Seq, Vec<u8>)> = Vec::with_capacity(rows.len());
    for (seq, value, covers) in rows {
        match seq {
            None => snap = Some((value, covers)),
            Some(seq) => pairs.push((stored_seq(run, seq)?, value)),
        }
    }
    if i64::try_from(pairs.len()).map_or(true, |n| n >= page) {
        return Ok(None);
    }
    pairs.sort_by_key(|(seq, _)| *seq);
    let (snapshot, from, prev) = match snap {
        None => (None, 0, [0u8; 32]),
        Some((_, None)) => return Ok(None),
        Some((value, Some(covers))) => {
            let covers = u64::try_from(covers).unwrap_or(0);
            let hash_of = |p: u64| -> Result<Option<Hash32>, StoreError> {
                match pairs.iter().find(|(seq, _)| seq.0 == p) {
                    Some((seq, v)) => Ok(Some(backend::decode_record(run, *seq, v)?.hash)),
                    None => Ok(None),
                }
            };
            let Ok((seq, state)) = backend::open_snapshot(run, &value, hash_of) else { return Ok(None) };
            if seq.0 != covers {
                return Ok(None);
            }
            let prev = match seq.0.checked_sub(1) {
                None => [0u8; 32],
                Some(p) => match hash_of(p)? {
                    Some(h) => h,
                    None => return Ok(None),
                },
            };
            (Some((seq, state)), seq.0, prev)
        }
    };
    pairs.retain(|(seq, _)| seq.0 >= from);
    // The run's head as stored: the next flush of the run may take it as known (a hint,
    // checked under the row locks by the statement that uses it).
    if let Some((seq, value)) = pairs.last() {
        if let (Ok(rec), Some(next_seq)) = (backend::decode_record(run, *seq, value), seq.0.checked_add(1)) {
            heads.saw(run, Head { next_seq: Seq(next_seq), last_hash: rec.hash, last_kind: Some(rec.kind) });
        }
    }
    let records = backend::checked_records(run, pairs.into_iter().map(Ok), Seq(from), prev, true);
    Ok(Some(keel_store::FoldSource { snapshot, records }))
}

/// The folds a claim read for the runs it granted, in the claim's round trips
/// ([`FOLD_MANY_SQL`], one statement for all of them), each taken by the first fold of
/// its run ([`AsyncAppend::fold_source_async`], the drive's): a statement per run becomes
/// one per claim (docs/STORE.md 15.2a). A kept fold is as fresh as any fold read before
/// the drive decides, a few milliseconds earlier: if another session appended to the run
/// since, the drive's first append from it is a conflict and the drive folds again.
/// Kept [`PREFETCH_FRESH`] at most, [`PREFETCH_MAX`] and [`PREFETCH_KEPT_BYTES_MAX`] at
/// once, and dropped when this store appends to the run or ends its drive.
#[derive(Default)]
pub(crate) struct Prefetched {
    /// By run: when read, the fold, the bytes of its records and snapshot.
    kept: std::sync::Mutex<BTreeMap<RunId, (std::time::Instant, keel_store::FoldSource, usize)>>,
    read: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicU64,
}

/// The most runs of one claim whose folds it reads (the first ones granted).
pub(crate) const PREFETCH_RUNS_MAX: usize = 64;
/// The most records of a run a claim's fold read takes: a longer tail is left to the
/// drive's own read (a page of `read_page_records`, or the two-step read).
pub(crate) const PREFETCH_PAGE_MAX: i64 = 64;
/// The most bytes (records and snapshots) one claim's fold read keeps; beyond, none.
pub(crate) const PREFETCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// The most bytes of folds kept at once; a fold beyond it is not kept.
pub(crate) const PREFETCH_KEPT_BYTES_MAX: usize = 32 * 1024 * 1024;
/// How long a claim waits for its fold read past its WAL barrier, at most: the read is
/// optional, the claim is not (its runs are granted).
pub(crate) const PREFETCH_WAIT: Duration = Duration::from_secs(1);
/// How long a claim's fold of a run is kept for its drive (which starts at once).
pub(crate) const PREFETCH_FRESH: Duration = Duration::from_secs(1);
/// The most claim folds kept at once.
pub(crate) const PREFETCH_MAX: usize = 4 * keel_store::CLAIM_RUNS_MAX;

impl Prefetched {
    fn kept(&self) -> std::sync::MutexGuard<'_, BTreeMap<RunId, (std::time::Instant, keel_store::FoldSource, usize)>> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `folds` with their bytes (the ones past [`PREFETCH_FRESH`] are dropped
    /// first; none beyond [`PREFETCH_MAX`] folds or [`PREFETCH_KEPT_BYTES_MAX`] bytes).
    pub(crate) fn put(&self, folds: Vec<(RunId, keel_store::FoldSource, usize)>) {
        let now = std::time::Instant::now();
        let mut kept = self.kept();
        kept.retain(|_, (at, _, _)| now.saturating_duration_since(*at) < PREFETCH_FRESH);
        let mut bytes: usize = kept.values().map(|(_, _, b)| *b).sum();
        for (run, source, size) in folds {
            bytes = bytes.saturating_add(size);
            if kept.len() >= PREFETCH_MAX || bytes > PREFETCH_KEPT_BYTES_MAX {
                break;
            }
            kept.insert(run, (now, source, size));
            self.read.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The fold kept for `run`, if fresh; it is kept no longer.
    pub(crate) fn take(&self, run: RunId) -> Option<keel_store::FoldSource> {
        let (at, source, _) = self.kept().remove(&run)?;
        let fresh = at.elapsed() < PREFETCH_FRESH;
        if fresh {
            self.used.fetch_add(1, Ordering::Relaxed);
        }
        fresh.then_some(source)
    }

    /// Drops the fold kept for `run` (an append or a `done` of it: the fold is past).
    pub(crate) fn forget(&self, run: RunId) {
        self.kept().remove(&run);
    }
}

/// The snapshot and first page of records of each run of `$1` (as [`FOLD_SQL`] for one),
/// in one statement: a claim reads its runs' folds with it ([`Prefetched`]).
pub(crate) const FOLD_MANY_SQL: &str = "SELECT r.run, f.seq, f.value, f.next_seq
     FROM unnest($1::uuid[]) AS r(run)
     CROSS JOIN LATERAL (
         SELECT NULL::bigint AS seq, s.value, s.next_seq FROM snapshots s WHERE s.run = r.run
         UNION ALL
         (SELECT e.seq, e.value, NULL::bigint FROM events e
          WHERE e.run = r.run
            AND e.seq >= greatest(coalesce((SELECT s2.next_seq FROM snapshots s2 WHERE s2.run = r.run), 0) - 1, 0)
          ORDER BY e.seq LIMIT $2)) AS f";

/// The fold sources of `runs` read in one statement ([`FOLD_MANY_SQL`]), each as
/// [`fold_source`] would give it; a run it cannot serve is left out.
pub(crate) async fn fold_sources(
    pool: Arc<Pool>,
    runs: Vec<RunId>,
    page: i64,
    heads: &group::Heads,
) -> Result<Vec<(RunId, keel_store::FoldSource, usize)>, StoreError> {
    let runs: Vec<RunId> = runs.into_iter().take(PREFETCH_RUNS_MAX).collect();
    let page = page.min(PREFETCH_PAGE_MAX);
    let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
    let rows = {
        let mut conn = pool.get().await?;
        let result = conn.client()?.rows(FOLD_MANY_SQL, &[&ids, &page]).await;
        conn.ok(result)?
    };
    let mut by_run: BTreeMap<RunId, (Vec<FoldRow>, usize)> = runs.iter().map(|r| (*r, (Vec::new(), 0))).collect();
    let mut total = 0usize;
    for row in rows {
        let run = RunId(row.try_get(0).map_err(pg)?);
        let value: Vec<u8> = row.try_get(2).map_err(pg)?;
        total = total.saturating_add(value.len());
        if total > PREFETCH_BYTES_MAX {
            // Large records: the drives read their folds as they come (fewer in memory at once).
            return Ok(Vec::new());
        }
        if let Some((rows, bytes)) = by_run.get_mut(&run) {
            *bytes = bytes.saturating_add(value.len());
            rows.push((row.try_get(1).map_err(pg)?, value, row.try_get(3).map_err(pg)?));
        }
    }
    let mut out = Vec::with_capacity(by_run.len());
    for (run, (rows, bytes)) in by_run {
        if let Some(source) = source_of(run, rows, page, heads)? {
            out.push((run, source, bytes));
        }
    }
    Ok(out)
}

impl Coordination for PgStore {
    fn try_lease(&self, run: RunId, owner: &str, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        if owner.len() > OWNER_BYTES_MAX {
            return Err(StoreError::TooLarge { what: "lease owner", bytes: owner.len(), max: OWNER_BYTES_MAX });
        }
        let expires_at_us = expiry(now_us, ttl_ms);
        let (pool, who) = (self.pool(), owner.to_owned());
        let epoch = self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .row_opt(
                    "INSERT INTO leases (run, owner, epoch, expires_at_us) VALUES ($1, $2, 1, $3)
                     ON CONFLICT (run) DO UPDATE
                       SET owner = EXCLUDED.owner, epoch = leases.epoch + 1, expires_at_us = EXCLUDED.expires_at_us
                       WHERE leases.owner IS NULL OR leases.expires_at_us <= $4
                     RETURNING epoch",
                    &[&run.0, &who, &expires_at_us, &now_us],
                )
                .await;
            let row = conn.ok(result)?;
            row.map(|r| r.try_get::<_, i64>(0).map_err(pg)).transpose()
        })?;
        Ok(epoch.map(|e| self.lease(run, owner, e, expires_at_us)))
    }

    fn renew_lease(&self, lease: &Lease, ttl_ms: u64, now_us: i64) -> Result<Option<Lease>, StoreError> {
        let Ok(epoch) = i64::try_from(lease.epoch()) else { return Ok(None) };
        let expires_at_us = expiry(now_us, ttl_ms);
        let (pool, run) = (self.pool(), lease.run());
        let renewed = self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .row_opt(
                    "UPDATE leases SET epoch = epoch + 1, expires_at_us = $3
                     WHERE run = $1 AND epoch = $2 AND owner IS NOT NULL AND expires_at_us > $4
                     RETURNING epoch",
                    &[&run.0, &epoch, &expires_at_us, &now_us],
                )
                .await;
            let row = conn.ok(result)?;
            row.map(|r| r.try_get::<_, i64>(0).map_err(pg)).transpose()
        })?;
        Ok(renewed.map(|e| self.lease(run, lease.owner(), e, expires_at_us)))
    }

    fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.call(release(self.pool(), lease.run(), lease.epoch()))
    }

    fn append_fenced(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
    ) -> Result<Head, StoreError> {
        self.submit(run, expected, records, claim, Some(fence), Vec::new())
    }

    fn append_fenced_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        fence: Fence,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.submit(run, expected, records, claim, Some(fence), aux)
    }

    fn append_with_aux(
        &self,
        run: RunId,
        expected: Seq,
        records: Vec<NewRecord>,
        claim: Option<Claim>,
        aux: Vec<AuxWrite>,
    ) -> Result<Head, StoreError> {
        self.submit(run, expected, records, claim, None, aux)
    }

    fn aux_apply(&self, aux: Vec<AuxWrite>) -> Result<(), StoreError> {
        backend::validate_aux(&aux, &self.shared.limits)?;
        if aux.is_empty() {
            return Ok(());
        }
        // The last write of a key wins, as if applied one by one; keys in order.
        let writes = group::aux_map(aux);
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = group::apply_aux(conn.client()?, &writes).await;
            conn.ok(result)?;
            Ok(())
        })
    }

    /// Nothing to do: PostgreSQL's open cost does not grow with rows (a run's records stay
    /// rows of `events`).
    fn seal_runs(&self, _runs: &[RunId]) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn remove_run(
        &self,
        run: RunId,
        expected: Seq,
        payloads: Vec<Hash32>,
        aux: Vec<AuxWrite>,
    ) -> Result<(), StoreError> {
        backend::validate_aux(&aux, &self.shared.limits)?;
        let writes = group::aux_map(aux);
        let digests: Vec<Vec<u8>> = payloads.iter().map(|d| d.to_vec()).collect();
        let pool = self.pool();
        let actual = self.call(async move {
            let mut conn = pool.get().await?;
            let result = remove_run_tx(conn.client()?, run, &digests, &writes, expected).await;
            conn.ok(result)
        })?;
        let actual = stored_seq(run, actual)?;
        if actual != expected {
            return Err(StoreError::Conflict { run, expected, actual });
        }
        Ok(())
    }

    fn aux_range(&self, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<AuxEntry>, StoreError> {
        if lo > hi || limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (pool, lo, hi) = (self.pool(), lo.to_vec(), hi.to_vec());
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn.client()?.rows(AUX_RANGE_SQL, &[&lo, &hi, &limit]).await;
            let rows = conn.ok(result)?;
            rows.iter().map(|r| Ok((r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?))).collect()
        })
    }

    fn lookup_key(&self, key: &[u8], now_us: i64) -> Result<Option<RunId>, StoreError> {
        let (pool, key) = (self.pool(), key.to_vec());
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .row_opt("SELECT run FROM claims WHERE key = $1 AND expires_at_us > $2", &[&key, &now_us])
                .await;
            let row = conn.ok(result)?;
            row.map(|r| r.try_get::<_, Uuid>(0).map(RunId).map_err(pg)).transpose()
        })
    }

    fn save_snapshot(&self, run: RunId, next_seq: Seq, state: &[u8]) -> Result<(), StoreError> {
        let max = self.shared.limits.snapshot_bytes_max;
        if state.len() > max {
            return Err(StoreError::TooLarge { what: "snapshot", bytes: state.len(), max });
        }
        let head = self.head(run)?;
        if next_seq > head.next_seq {
            return Err(StoreError::SnapshotBeyondHead { run, next_seq, head: head.next_seq });
        }
        let anchor = match next_seq.0.checked_sub(1) {
            None => [0u8; 32],
            Some(p) => self.stored_hash(run, p)?.ok_or(StoreError::Corrupted {
                run,
                seq: Seq(p),
                reason: "record missing below the head".into(),
            })?,
        };
        let value = backend::seal_snapshot(next_seq, anchor, state)?;
        self.exec(
            "INSERT INTO snapshots (run, value, next_seq) VALUES ($1, $2, $3)
             ON CONFLICT (run) DO UPDATE SET value = EXCLUDED.value, next_seq = EXCLUDED.next_seq",
            vec![Box::new(run.0), Box::new(value), Box::new(seq_param(next_seq.0)) as Box<dyn ToSql + Send + Sync>],
        )
    }

    fn load_snapshot(&self, run: RunId) -> Result<Option<(Seq, Vec<u8>)>, StoreError> {
        let pool = self.pool();
        let value: Option<Vec<u8>> = self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn.client()?.row_opt("SELECT value FROM snapshots WHERE run = $1", &[&run.0]).await;
            let row = conn.ok(result)?;
            row.map(|r| r.try_get(0).map_err(pg)).transpose()
        })?;
        let Some(value) = value else { return Ok(None) };
        backend::open_snapshot(run, &value, |p| self.stored_hash(run, p)).map(Some)
    }

    fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let max = self.shared.limits.key_bytes_max;
        if key.len() > max {
            return Err(StoreError::TooLarge { what: "aux key", bytes: key.len(), max });
        }
        let (pool, key) = (self.pool(), key.to_vec());
        self.call(async move {
            let mut conn = pool.get().await?;
            // A counter's shards summed (a key is in one table or the other).
            let result = conn
                .client()?
                .row_opt(
                    "SELECT value FROM aux WHERE key = $1
                     UNION ALL
                     SELECT int8send(sum(value)::bigint) FROM counters WHERE key = $1 HAVING count(*) > 0",
                    &[&key],
                )
                .await;
            let row = conn.ok(result)?;
            row.map(|r| r.try_get(0).map_err(pg)).transpose()
        })
    }

    fn aux_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let limits = &self.shared.limits;
        if key.len() > limits.key_bytes_max {
            return Err(StoreError::TooLarge { what: "aux key", bytes: key.len(), max: limits.key_bytes_max });
        }
        if value.len() > limits.event_bytes_max {
            return Err(StoreError::TooLarge { what: "aux value", bytes: value.len(), max: limits.event_bytes_max });
        }
        if key.starts_with(keel_store::COUNTER_PREFIX) {
            // Replaces the counter's shards, as a put replaces an entry.
            let (pool, key, value) = (self.pool(), key.to_vec(), value.to_vec());
            return self.call(async move {
                let mut conn = pool.get().await?;
                let client = conn.client()?;
                let result = async {
                    let tx = client.transaction().await?;
                    tx.exec("DELETE FROM counters WHERE key = $1", &[&key]).await?;
                    tx.exec(
                        "INSERT INTO aux (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&key, &value],
                    )
                    .await?;
                    tx.commit().await
                }
                .await;
                conn.ok(result)
            });
        }
        self.exec(
            "INSERT INTO aux (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            vec![Box::new(key.to_vec()), Box::new(value.to_vec())],
        )
    }

    fn put_due(&self, run: RunId, due_at_us: i64) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO due (run, due_at_us) VALUES ($1, $2)
             ON CONFLICT (run) DO UPDATE SET due_at_us = EXCLUDED.due_at_us",
            vec![Box::new(run.0), Box::new(due_at_us)],
        )
    }

    fn remove_due(&self, run: RunId) -> Result<(), StoreError> {
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn.client()?.exec("DELETE FROM due WHERE run = $1", &[&run.0]).await;
            conn.ok(result)?;
            Ok(())
        })
    }

    fn due(&self, now_us: i64, limit: usize) -> Result<Vec<(RunId, i64)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .rows(
                    "SELECT run, due_at_us FROM due WHERE due_at_us <= $1 ORDER BY due_at_us, run LIMIT $2",
                    &[&now_us, &limit],
                )
                .await;
            let rows = conn.ok(result)?;
            rows.into_iter()
                .map(|r| Ok((RunId(r.try_get::<_, Uuid>(0).map_err(pg)?), r.try_get::<_, i64>(1).map_err(pg)?)))
                .collect()
        })
    }
    /// Several processes share this store: their workers claim runs from its `work` table.
    fn work_queue(&self) -> Option<&dyn keel_store::WorkQueue> {
        Some(self)
    }

    fn async_appends(&self) -> Option<&dyn keel_store::AsyncAppend> {
        Some(self)
    }
}

/// Chunks written or read per statement (at most 2 MiB of a payload in one message).
const PAYLOAD_CHUNKS_PER_STATEMENT: usize = 64;

async fn put_payload_tx(
    client: &mut ClientWrapper,
    digest: &[u8],
    manifest: &[u8],
    chunks: &[&[u8]],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Another session storing the same bytes waits here until it commits, then this
    // writes nothing: a manifest is only ever stored with all its chunks.
    let inserted = tx
        .exec(
            "INSERT INTO payload_manifests (digest, manifest) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING",
            &[&digest, &manifest],
        )
        .await?;
    if inserted == 1 {
        for (start, group) in
            (0i32..).step_by(PAYLOAD_CHUNKS_PER_STATEMENT).zip(chunks.chunks(PAYLOAD_CHUNKS_PER_STATEMENT))
        {
            let index: Vec<i32> = (start..).take(group.len()).collect();
            tx.exec(
                "INSERT INTO payloads (digest, chunk, bytes) SELECT $1, * FROM unnest($2::integer[], $3::bytea[])",
                &[&digest, &index, &group],
            )
            .await?;
        }
    }
    tx.commit().await
}

impl Payloads for PgStore {
    fn put_payload(&self, bytes: &[u8]) -> Result<PayloadRef, StoreError> {
        let split = backend::split_payload(bytes)?;
        let r = split.reference;
        let pool = self.pool();
        self.call(async move {
            let chunks: Vec<&[u8]> = split.chunks.iter().map(Vec::as_slice).collect();
            let mut conn = pool.get().await?;
            let result = put_payload_tx(conn.client()?, &r.digest, &split.manifest, &chunks).await;
            conn.ok(result)
        })?;
        Ok(r)
    }

    fn get_payload(&self, digest: &Hash32, bytes_max: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let (pool, d) = (self.pool(), *digest);
        self.call(async move {
            let mut conn = pool.get().await?;
            let result = conn
                .client()?
                .row_opt("SELECT manifest FROM payload_manifests WHERE digest = $1", &[&d.as_slice()])
                .await;
            let Some(row) = conn.ok(result)? else { return Ok(None) };
            let manifest: Vec<u8> = row.try_get(0).map_err(pg)?;
            let (bytes, chunks) = backend::open_manifest(&d, &manifest)?;
            let max = bytes_max.min(PAYLOAD_BYTES_MAX);
            if bytes > max {
                return Err(StoreError::TooLarge { what: "payload", bytes, max });
            }
            let mut stored: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
            let per = i32::try_from(PAYLOAD_CHUNKS_PER_STATEMENT).unwrap_or(64);
            let mut from = 0i32;
            while u32::try_from(from).is_ok_and(|f| f < chunks) {
                let result = conn
                    .client()?
                    .rows(
                        "SELECT chunk, bytes FROM payloads WHERE digest = $1 AND chunk >= $2 AND chunk < $3 ORDER BY chunk",
                        &[&d.as_slice(), &from, &from.saturating_add(per)],
                    )
                    .await;
                for row in conn.ok(result)? {
                    let index: i32 = row.try_get(0).map_err(pg)?;
                    if let Ok(index) = u32::try_from(index) {
                        stored.insert(index, row.try_get(1).map_err(pg)?);
                    }
                }
                from = from.saturating_add(per);
            }
            backend::assemble_payload(&d, bytes, chunks, |i| Ok(stored.remove(&i))).map(Some)
        })
    }

    fn payload_digests(&self) -> Result<Vec<Hash32>, StoreError> {
        let pool = self.pool();
        self.call(async move {
            let mut conn = pool.get().await?;
            let mut out: Vec<Hash32> = Vec::new();
            loop {
                let client = conn.client()?;
                let rows = match out.last() {
                    None => {
                        client
                            .rows("SELECT digest FROM payload_manifests ORDER BY digest LIMIT $1", &[&RUNS_PAGE])
                            .await
                    }
                    Some(after) => {
                        client
                            .rows(
                                "SELECT digest FROM payload_manifests WHERE digest > $1 ORDER BY digest LIMIT $2",
                                &[&after.as_slice(), &RUNS_PAGE],
                            )
                            .await
                    }
                };
                let rows = conn.ok(rows)?;
                let n = rows.len();
                for row in rows {
                    let d: Vec<u8> = row.try_get(0).map_err(pg)?;
                    out.push(Hash32::try_from(d.as_slice()).map_err(|_| StoreError::CorruptPayload {
                        digest: format!("{d:02x?}"),
                        reason: "stored digest of a wrong length".into(),
                    })?);
                }
                if i64::try_from(n).map_or(true, |n| n < RUNS_PAGE) {
                    return Ok(out);
                }
            }
        })
    }
}
