//! The store's sessions: two `deadpool-postgres` pools, used only on the store's own
//! runtime (its sessions' connection tasks are spawned there): sessions whose commits wait
//! for the WAL flush (`synchronous_commit=on`: appends, reads) and lazy sessions whose
//! commits do not (`synchronous_commit=off`: the queue's bookkeeping and lease releases,
//! which a synchronous commit of any session later makes durable, the WAL being one
//! sequence; docs/STORE.md 15.3). A statement alone on a lazy session is its own
//! transaction, so such a write is one message, not a BEGIN, a `SET LOCAL` and a COMMIT
//! around it. At most `size` sessions of each kind at once;
//! opening one is bounded by the connect timeout ([`crate::Timed::Connect`]). A session is
//! put back for reuse only when the last statement sent on it was answered without losing
//! the connection: one that met a lost connection, or whose call was abandoned mid-statement
//! (its timeout fired), is taken out of the pool, so the next call opens a fresh one.

use crate::error::{PgError, Timed};
use deadpool_postgres::ClientWrapper;
use deadpool_postgres::{Manager, ManagerConfig, Object, PoolError, RecyclingMethod, Runtime, TimeoutType};
use std::time::Duration;
use tokio_postgres::{Config, NoTls};

pub(crate) struct Pool {
    inner: deadpool_postgres::Pool,
    lazy: deadpool_postgres::Pool,
    bounds: Bounds,
}

/// The bounds on calls into PostgreSQL (from [`crate::PgConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Opening a session.
    pub(crate) connect: Duration,
    /// One statement (the server's `statement_timeout`).
    pub(crate) statement: Duration,
    /// A whole call, cut by the store.
    pub(crate) call: Duration,
    /// A session idle inside a transaction, ended by the server.
    pub(crate) idle_in_transaction: Duration,
}

impl Bounds {
    pub(crate) fn connect_ms(&self) -> u64 {
        millis(self.connect)
    }

    pub(crate) fn statement_ms(&self) -> u64 {
        millis(self.statement)
    }

    pub(crate) fn call_ms(&self) -> u64 {
        millis(self.call)
    }
}

/// A session taken from the pool; it goes back on drop only if it is settled (see
/// [`Conn::client`] and [`Conn::ok`]).
pub(crate) struct Conn {
    object: Option<Object>,
    /// A statement was sent and its answer not yet seen through [`Conn::ok`] or
    /// [`Conn::settled`], or the connection was lost: never reuse the session (the driver
    /// may not have noticed the close yet; a server still busy with an abandoned statement
    /// would make the next call wait behind it).
    unsettled: bool,
    bounds: Bounds,
}

impl Pool {
    /// Pools of at most `size` sessions each: to `config` (whose options ask for
    /// synchronous commits) and to `lazy` (whose options do not); they connect on first use.
    pub(crate) fn new(config: Config, lazy: Config, size: usize, bounds: Bounds) -> Result<Pool, PgError> {
        let build = |config: Config| {
            // A pooled session is checked with `is_closed` when taken again (no extra round
            // trip); a session that met a lost connection never gets back (see `Conn`).
            let manager =
                Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
            deadpool_postgres::Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(bounds.connect))
                .recycle_timeout(Some(bounds.connect))
                .build()
                .map_err(|e| PgError::Server { code: String::new(), reason: format!("building the pool: {e}") })
        };
        Ok(Pool { inner: build(config)?, lazy: build(lazy)?, bounds })
    }

    pub(crate) fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// A session whose commits wait for the WAL flush: an idle one that is still
    /// connected, else a new one.
    pub(crate) async fn get(&self) -> Result<Conn, PgError> {
        self.take(&self.inner).await
    }

    /// A lazy session (`synchronous_commit=off`), taken as [`Pool::get`] takes one.
    pub(crate) async fn lazy(&self) -> Result<Conn, PgError> {
        self.take(&self.lazy).await
    }

    async fn take(&self, pool: &deadpool_postgres::Pool) -> Result<Conn, PgError> {
        let b = self.bounds;
        let object = pool.get().await.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
                PgError::Timeout { what: Timed::Connect, after_ms: b.connect_ms() }
            }
            // No wait timeout is set: waiting for a free session is bounded by the call's.
            PoolError::Timeout(TimeoutType::Wait) => PgError::Timeout { what: Timed::Call, after_ms: b.call_ms() },
            // A new session could not be opened: the server is not reached (or refused
            // the login, a server error kept as one).
            PoolError::Backend(e) if crate::error::connection_lost(&e) => {
                PgError::Unreachable { reason: crate::error::describe(&e) }
            }
            PoolError::Backend(e) => PgError::of(e),
            PoolError::Closed => PgError::Closed,
            other => PgError::ConnectionLost { reason: other.to_string() },
        })?;
        Ok(Conn { object: Some(object), unsettled: false, bounds: b })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    /// The session, for a statement about to be sent: until its answer is seen through
    /// [`Conn::ok`] (or [`Conn::settled`]), dropping this discards the session.
    pub(crate) fn client(&mut self) -> Result<&mut ClientWrapper, PgError> {
        self.unsettled = true;
        self.object.as_deref_mut().ok_or(PgError::Closed)
    }

    /// A statement's result as the seam's: the session is settled unless the connection
    /// was lost.
    pub(crate) fn ok<T>(&mut self, r: Result<T, tokio_postgres::Error>) -> Result<T, keel_store::StoreError> {
        r.map_err(|e| {
            let e = PgError::of(e).with_statement_ms(self.bounds.statement_ms());
            self.settled(&e);
            e.into()
        })
        .inspect(|_| self.unsettled = false)
    }

    /// The answer to the statements sent was seen, ending in `e`: the session is settled
    /// unless `e` says the connection is gone.
    pub(crate) fn settled(&mut self, e: &PgError) {
        self.unsettled = matches!(e, PgError::ConnectionLost { .. } | PgError::InDoubt { .. });
    }

    /// Every statement sent was answered: the session may be reused.
    pub(crate) fn settle(&mut self) {
        self.unsettled = false;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else { return };
        if !self.unsettled {
            return; // back to the pool
        }
        let client = Object::take(object);
        if client.is_closed() {
            return;
        }
        // Abandoned mid-statement (its call timed out): ask the server to cancel what it is
        // doing, so the locks it holds go now rather than when it notices the closed socket;
        // bounded like a connect, and skipped if there is no runtime to send it from.
        let token = client.cancel_token();
        let bound = self.bounds.connect;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                match tokio::time::timeout(bound, token.cancel_query(NoTls)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "cancelling an abandoned statement failed"),
                    Err(_) => tracing::debug!("cancelling an abandoned statement timed out"),
                }
            });
        }
        drop(client);
    }
}

#[cfg(test)]
mod tests {
    use crate::cached::Cached;
    use crate::{PgConfig, PgStore};

    /// Whether a missing server fails this test instead of skipping it (as tests/common).
    fn required() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("KEEL_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
    }

    fn url() -> String {
        std::env::var("KEEL_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// A store on a fresh schema of its own, or None (skipped) without a server outside CI.
    fn store(tag: &str) -> Option<(PgStore, String)> {
        let schema = format!("keel_pool_test_{}_{tag}", std::process::id());
        match PgStore::open(PgConfig { schema: schema.clone(), ..PgConfig::new(url()) }) {
            Ok(store) => Some((store, schema)),
            Err(e) if !required() => {
                eprintln!("skipped: PostgreSQL at {} does not answer ({e})", url());
                None
            }
            Err(e) => panic!("PostgreSQL is required here (CI=true) but {} does not answer: {e}", url()),
        }
    }

    /// The two kinds of session carry the settings the store's durability rests on: a
    /// session that waits for the WAL flush at commit, a lazy one that does not; generic
    /// plans on both.
    #[test]
    fn sessions_wait_for_the_wal_at_commit_and_lazy_sessions_do_not() {
        let Some((store, schema)) = store("settings") else { return };
        let pool = store.pool();
        let shown = store
            .call(async move {
                let mut shown = Vec::new();
                for lazy in [false, true] {
                    let mut conn = if lazy { pool.lazy().await? } else { pool.get().await? };
                    let mut row = Vec::new();
                    for setting in ["synchronous_commit", "plan_cache_mode"] {
                        let r = conn.client()?.rows(&format!("SHOW {setting}"), &[]).await;
                        let rows = conn.ok(r)?;
                        let value: String = rows.first().map(|r| r.get(0)).unwrap_or_default();
                        row.push(value);
                    }
                    shown.push(row);
                }
                let mut conn = pool.get().await?;
                let r = conn.client()?.exec(&format!("DROP SCHEMA {schema} CASCADE"), &[]).await;
                conn.ok(r)?;
                Ok(shown)
            })
            .unwrap();
        assert_eq!(
            shown,
            vec![
                vec!["on".to_owned(), "force_generic_plan".to_owned()],
                vec!["off".into(), "force_generic_plan".into()]
            ]
        );
    }

    /// Runs `setup` (rows, `ANALYZE`, `PREPARE`s) on a store of its own, then each of
    /// `explains` (`EXPLAIN EXECUTE …`, generic plans as on every session of the store):
    /// their plans, as text. The schema is dropped after.
    fn plans(tag: &str, setup: &str, explains: Vec<String>) -> Option<Vec<String>> {
        let (store, schema) = store(tag)?;
        let (pool, setup) = (store.pool(), setup.to_owned());
        let plans = store
            .call(async move {
                let mut conn = pool.get().await?;
                let r = conn.client()?.batch_execute(&setup).await;
                conn.ok(r)?;
                let mut plans = Vec::new();
                for explain in explains {
                    let r = conn.client()?.simple_query(&explain).await;
                    let lines = conn.ok(r)?;
                    let plan: Vec<String> = lines
                        .iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                            _ => None,
                        })
                        .collect();
                    plans.push(plan.join("\n"));
                }
                let r = conn.client()?.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
                conn.ok(r)?;
                Ok(plans)
            })
            .unwrap();
        Some(plans)
    }

    /// A flush finds the rows it locks and updates through the primary keys, not by a
    /// scan of the whole table (as the generic plans of `run = ANY($1)` and of a join with
    /// the array did on a table of 1,000 rows: the planner cannot see the array's length).
    #[test]
    fn a_flush_finds_its_rows_through_the_primary_keys() {
        let setup = format!(
            "INSERT INTO heads (run, next_seq, last_hash, last_kind)
               SELECT gen_random_uuid(), 3, '\\x00', 'TaskExecuted' FROM generate_series(1, 1000);
             INSERT INTO leases (run, owner, epoch, expires_at_us)
               SELECT run, 'w', 1, 0 FROM heads;
             INSERT INTO claims (key, run, expires_at_us)
               SELECT int8send(i), gen_random_uuid(), 0 FROM generate_series(1, 1000) i;
             INSERT INTO work (run, workflow, priority, accepted_at_us, claimed_by)
               SELECT run, 'wf', 0, 0, 'w' FROM heads;
             INSERT INTO work (run, workflow, priority, accepted_at_us)
               SELECT gen_random_uuid(), 'wf', 0, i FROM generate_series(1, 19000) i;
             INSERT INTO leases (run, owner, epoch, expires_at_us)
               SELECT gen_random_uuid(), NULL, 2, 0 FROM generate_series(1, 19000);
             ANALYZE heads; ANALYZE leases; ANALYZE claims; ANALYZE work;
             PREPARE flush_lock (uuid[], bool[]) AS {};
             PREPARE claims_lock (bytea[]) AS {};
             PREPARE flush_one (uuid[], bool[], bigint[], bigint[], bytea[], uuid[], bigint[], bytea[],
                                uuid[], bigint[], bytea[], text[], uuid[], text[], bigint[], text, text, bool) AS {};
             PREPARE flush_write (uuid[], bigint[], bytea[], uuid[], bigint[], bytea[], text[],
                                  bytea[], uuid[], bigint[]) AS {};",
            crate::group::LOCK_SQL,
            crate::group::CLAIMS_SQL,
            crate::group::fast_sql(crate::group::AuxParts::from_bits(0), true),
            crate::group::write_sql(crate::group::WriteParts {
                heads_updated: true,
                heads_inserted: false,
                claims_updated: true,
                claims_inserted: false,
                aux: crate::group::AuxParts::from_bits(0),
            }),
        );
        let ids = "ARRAY['00000000-0000-0000-0000-000000000001'::uuid, '00000000-0000-0000-0000-000000000002']";
        let explains = vec![
            format!("EXPLAIN EXECUTE flush_lock ({ids}, ARRAY[true, false])"),
            "EXPLAIN EXECUTE claims_lock (ARRAY['\\x01'::bytea, '\\x02'])".to_owned(),
            format!(
                "EXPLAIN EXECUTE flush_one ({ids}, ARRAY[true, false], ARRAY[1, 0], ARRAY[3, 3],
                   ARRAY['\\x00'::bytea, '\\x00'], {ids}, ARRAY[3, 3], ARRAY['\\x01'::bytea, '\\x01'],
                   {ids}, ARRAY[4, 4], ARRAY['\\x01'::bytea, '\\x01'], ARRAY['a', 'a'],
                   {ids}, ARRAY['w', 'w'], ARRAY[1, 1], 'keel_work', 'keel_none', false)"
            ),
            format!(
                "EXPLAIN EXECUTE flush_write ({ids}, ARRAY[4, 4], ARRAY['\\x01'::bytea, '\\x01'],
                   {ids}, ARRAY[4, 4], ARRAY['\\x01'::bytea, '\\x01'], ARRAY['a', 'a'],
                   ARRAY['\\x01'::bytea, '\\x02'], {ids}, ARRAY[1, 1])"
            ),
        ];
        let Some(plans) = plans("plans", &setup, explains) else { return };
        for plan in plans {
            assert!(!plan.contains("Seq Scan"), "a whole table read:\n{plan}");
            assert!(plan.contains("_pkey"), "not through the primary key:\n{plan}");
        }
    }

    /// A claim reads the candidates it takes, their lease rows and the leases held, each
    /// through an index, whatever the sizes of the queue and of the lease table (a row per
    /// run ever leased): the generic plans of the joins it had read all of `leases` twice
    /// and all of `work` once per claim on tables of 1,000 rows (1.96 ms against 0.97 ms by
    /// `EXPLAIN ANALYZE`, 64 leases held).
    #[test]
    fn a_claim_reads_no_table_whole() {
        let setup = format!(
            "INSERT INTO work (run, workflow, priority, accepted_at_us)
               SELECT gen_random_uuid(), 'wf', 0, i FROM generate_series(1, 1000) i;
             INSERT INTO leases (run, owner, epoch, expires_at_us)
               SELECT run, 'w', 1, 9000000000000000 FROM work ORDER BY accepted_at_us LIMIT 64;
             INSERT INTO leases (run, owner, epoch, expires_at_us)
               SELECT gen_random_uuid(), NULL, 2, 0 FROM generate_series(1, 1000);
             ANALYZE work; ANALYZE leases;
             PREPARE claim (bigint, bigint, text[], bigint[], bigint, text, bigint) AS {};",
            crate::queue::CLAIM_SQL
        );
        let explains =
            vec!["EXPLAIN EXECUTE claim (1000, 16, ARRAY['wf'], ARRAY[1024::bigint], 4, 'me', 9000000000000001)"
                .to_owned()];
        let Some(plans) = plans("claim", &setup, explains) else { return };
        for plan in plans {
            assert!(!plan.contains("Seq Scan"), "a whole table read:\n{plan}");
        }
    }

    /// The folds a claim reads for its runs, in one statement, go through the primary keys
    /// of `snapshots` and `events`, run by run, whatever the tables' sizes.
    #[test]
    fn a_claims_fold_read_goes_run_by_run_through_the_primary_keys() {
        let setup = format!(
            "INSERT INTO events (run, seq, value)
               SELECT md5(i::text)::uuid, s, '\\x00' FROM generate_series(1, 2000) i, generate_series(0, 12) s;
             INSERT INTO snapshots (run, value, next_seq)
               SELECT md5(i::text)::uuid, '\\x00', 6 FROM generate_series(1, 2000, 3) i;
             ANALYZE events; ANALYZE snapshots;
             PREPARE folds (uuid[], bigint) AS {};",
            crate::store::FOLD_MANY_SQL
        );
        let explains =
            vec!["EXPLAIN EXECUTE folds (ARRAY[md5('1')::uuid, md5('2')::uuid, md5('3')::uuid], 256)".to_owned()];
        let Some(plans) = plans("folds", &setup, explains) else { return };
        for plan in plans {
            assert!(!plan.contains("Seq Scan"), "a whole table read:\n{plan}");
            assert!(plan.contains("events_pkey") && plan.contains("snapshots_pkey"), "not through the keys:\n{plan}");
        }
    }

    /// A worker's read of the due-time index and a page of an aux range follow what they
    /// return, not the table or the range: `run IN (subquery)` was planned as a hash join
    /// over a scan of all of `due`, and a union limited only as a whole sorted the range.
    #[test]
    fn due_reads_and_aux_pages_do_not_read_the_whole_table() {
        let setup = format!(
            "INSERT INTO due (run, due_at_us) SELECT gen_random_uuid(), i FROM generate_series(1, 20000) i;
             INSERT INTO aux (key, value) SELECT int8send(i), '\\x' FROM generate_series(1, 20000) i;
             INSERT INTO counters (key, shard, value)
               SELECT int8send(i), s, 1 FROM generate_series(1, 10000) i, generate_series(0, 1) s;
             ANALYZE due; ANALYZE aux; ANALYZE counters;
             PREPARE take_due (bigint, bigint) AS {};
             PREPARE aux_page (bytea, bytea, bigint) AS {};",
            crate::queue::TAKE_DUE_SQL,
            crate::store::AUX_RANGE_SQL
        );
        let explains = vec![
            "EXPLAIN EXECUTE take_due (15000, 64)".to_owned(),
            "EXPLAIN EXECUTE aux_page ('\\x00', '\\xff', 100)".to_owned(),
        ];
        let Some(plans) = plans("pages", &setup, explains) else { return };
        for plan in plans {
            assert!(!plan.contains("Seq Scan"), "a whole table read:\n{plan}");
            assert!(!plan.contains("Sort  ("), "a whole range sorted:\n{plan}");
        }
    }

    /// A step's aux writes run only the parts they need: with one text for all, the
    /// removal of counters (empty in almost every step) was a scan of the counters table
    /// on each flush (a generic plan cannot skip a part whose array is empty).
    #[test]
    fn a_steps_aux_writes_read_no_table_whole() {
        use crate::group::{aux_sql, AuxParts};
        let step = aux_sql(AuxParts { removed: true, uncounted: false, put: true, counted: true });
        let setup = format!(
            "INSERT INTO aux (key, value) SELECT int8send(i), '\\x' FROM generate_series(1, 2000) i;
             INSERT INTO counters (key, shard, value)
               SELECT int8send(i), s, 1 FROM generate_series(1, 20) i, generate_series(0, 9) s;
             ANALYZE aux; ANALYZE counters;
             PREPARE step (bytea[], bytea[], bytea[], bytea[], bigint[], integer) AS {step};"
        );
        let explains = vec!["EXPLAIN EXECUTE step (ARRAY['\\x01'::bytea], ARRAY['\\x02'::bytea], ARRAY['\\x'::bytea],
               ARRAY['\\x0000000000000003'::bytea], ARRAY[1::bigint], 64)"
            .to_owned()];
        let Some(plans) = plans("auxstep", &setup, explains) else { return };
        for plan in plans {
            assert!(!plan.contains("Seq Scan"), "a whole table read:\n{plan}");
        }
    }

    /// The parameters the aux parts `a` take (see `group::aux_ctes`).
    fn aux_params(a: crate::group::AuxParts) -> usize {
        usize::from(a.removed) + usize::from(a.uncounted) + 2 * usize::from(a.put) + 3 * usize::from(a.counted)
    }

    /// Asserts that `sql` names each of `$1` to `$want` (whole: `$1` is not `$12`'s start)
    /// and nothing above.
    fn assert_numbered(sql: &str, want: usize, what: &dyn std::fmt::Debug) {
        for n in 1..=want {
            let named = sql.match_indices(&format!("${n}")).any(|(at, m)| {
                !sql.get(at + m.len()..).and_then(|rest| rest.chars().next()).is_some_and(|c| c.is_ascii_digit())
            });
            assert!(named, "{what:?}: ${n} missing in {sql}");
        }
        assert!(!sql.contains(&format!("${}", want + 1)), "{what:?}: more than {want} parameters in {sql}");
    }

    /// Each statement of a flush's writes numbers its parameters from 1 without a gap, as
    /// the flush sends them: events (3), each heads part (4), each claims part (3), then
    /// the aux parts; and has each part present, and no other.
    #[test]
    fn flush_writes_number_their_parameters_in_order() {
        use crate::group::{write_sql, WriteParts};
        for bits in 0u8..=255 {
            let parts = WriteParts::from_bits(bits);
            assert_eq!(parts.index(), usize::from(bits));
            let a = parts.aux;
            let want = 3
                + 4 * usize::from(parts.heads_updated)
                + 4 * usize::from(parts.heads_inserted)
                + 3 * usize::from(parts.claims_updated)
                + 3 * usize::from(parts.claims_inserted)
                + aux_params(a);
            let sql = write_sql(parts);
            assert_numbered(&sql, want, &parts);
            assert_eq!(sql.contains("hu AS"), parts.heads_updated, "{parts:?}: {sql}");
            assert_eq!(sql.contains("hi AS"), parts.heads_inserted, "{parts:?}: {sql}");
            assert_eq!(sql.contains("cu AS"), parts.claims_updated, "{parts:?}: {sql}");
            assert_eq!(sql.contains("ci AS"), parts.claims_inserted, "{parts:?}: {sql}");
            assert_eq!(sql.contains("FROM counters WHERE"), a.uncounted, "{parts:?}: {sql}");
        }
    }

    /// Each one-statement flush numbers its parameters from 1 without a gap (the checks'
    /// five, then events, heads updated and the aux parts, then with drives' ends their
    /// six, as `Fast::run` sends them), and every data-modifying part of it (and the
    /// notification of ended drives) acts only if the checks held.
    #[test]
    fn one_statement_flushes_number_their_parameters_and_guard_every_write() {
        use crate::group::{fast_sql, AuxParts};
        for ending in [false, true] {
            for bits in 0u8..16 {
                let a = AuxParts::from_bits(bits);
                let sql = fast_sql(a, ending);
                assert_numbered(&sql, 5 + 3 + 4 + aux_params(a) + if ending { 6 } else { 0 }, &(a, ending));
                let writes = ["INSERT INTO", "DELETE FROM", "UPDATE work SET", "UPDATE leases SET", "pg_notify("]
                    .iter()
                    .map(|w| sql.matches(w).count())
                    .sum::<usize>();
                let guarded = sql.matches("(SELECT ok FROM chk)").count();
                assert_eq!(guarded, writes, "{a:?}: a write without the checks' verdict in {sql}");
                assert!(
                    writes >= 2 && !sql.contains("hi AS") && !sql.contains("cu AS") && !sql.contains("ci AS"),
                    "{sql}"
                );
                assert_eq!(sql.contains("e_free AS"), ending, "{sql}");
            }
        }
    }

    /// Each aux statement numbers its parameters from 1 without a gap, as
    /// `aux_statements` sends them.
    #[test]
    fn aux_statements_number_their_parameters_in_order() {
        use crate::group::{aux_sql, AuxParts};
        for bits in 1u8..16 {
            let parts = AuxParts::from_bits(bits);
            assert_eq!(parts.index(), usize::from(bits));
            let sql = aux_sql(parts);
            assert_numbered(&sql, aux_params(parts), &parts);
            assert_eq!(sql.contains("FROM counters WHERE"), parts.uncounted, "{parts:?}: {sql}");
        }
    }
}
