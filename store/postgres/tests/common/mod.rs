//! What the PostgreSQL tests share: the server's URL, the skip-or-fail rule, a scratch
//! schema per store (dropped when the test ends), and an admin session for the statements
//! a test makes behind the store's back.
#![allow(dead_code)]

use keel_store::{Durability, Store};
use keel_store_postgres::{PgConfig, PgStore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// `KEEL_TEST_PG_URL`, else the local server with trust authentication.
pub fn url() -> String {
    std::env::var("KEEL_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether a missing server fails the tests instead of skipping them (CI).
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("KEEL_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// Whether the server answers. Where it does not: panics if it is [`required`], else
/// prints why the calling test is skipped and returns false.
pub fn ready() -> bool {
    static REACHED: OnceLock<Result<(), String>> = OnceLock::new();
    let reached = REACHED.get_or_init(|| Admin::connect().map(|_| ()));
    match reached {
        Ok(()) => true,
        Err(e) if required() => {
            panic!(
                "PostgreSQL is required here (CI=true or KEEL_REQUIRE_POSTGRES=1) but {} does not answer: {e}",
                url()
            )
        }
        Err(e) => {
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            // Straight to stderr, past the test harness's capture: a skip must show.
            let line = format!("skipped {test}: PostgreSQL at {} does not answer ({e}); set KEEL_TEST_PG_URL\n", url());
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            false
        }
    }
}

/// A session of its own for statements made behind the store's back (on the calling
/// thread; not from inside a runtime).
pub struct Admin {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Admin {
    pub fn connect() -> Result<Admin, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let mut cfg: tokio_postgres::Config = url().parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
        cfg.connect_timeout(std::time::Duration::from_secs(3));
        let client = rt.block_on(async {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| {
                let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
                format!("{e}{cause}")
            })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, String>(client)
        })?;
        Ok(Admin { rt, client })
    }

    pub fn exec(&self, sql: &str) {
        self.rt.block_on(self.client.batch_execute(sql)).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    pub fn rows(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        self.rt.block_on(self.client.query(sql, &[])).unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    /// The server process of this session.
    pub fn pid(&self) -> i32 {
        self.rows("SELECT pg_backend_pid()")[0].get(0)
    }

    pub fn int(&self, sql: &str) -> i64 {
        self.rows(sql)[0].get(0)
    }
}

/// Fresh schemas for stores, each dropped with everything in it when this goes (at the
/// end of the test, also when it fails).
pub struct Scratch {
    schemas: Mutex<Vec<String>>,
    durability: Durability,
}

impl Scratch {
    pub fn new(durability: Durability) -> Scratch {
        Scratch { schemas: Mutex::new(Vec::new()), durability }
    }

    /// A schema name no other test uses.
    pub fn fresh_schema(&self) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("keel_t{}_{}_{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        self.schemas.lock().unwrap().push(name.clone());
        name
    }

    /// The config of a store in a fresh schema.
    pub fn config(&self) -> PgConfig {
        PgConfig { schema: self.fresh_schema(), durability: self.durability, ..PgConfig::new(url()) }
    }

    /// A store in a fresh schema.
    pub fn open(&self) -> PgStore {
        PgStore::open(self.config()).unwrap()
    }

    /// A store in a fresh schema, to share between threads, and the schema's name (for
    /// the statements a test makes behind the store's back).
    pub fn open_shared(&self) -> (Arc<PgStore>, String) {
        let cfg = self.config();
        let schema = cfg.schema.clone();
        (Arc::new(PgStore::open(cfg).unwrap()), schema)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap_or_else(|p| p.into_inner()));
        if schemas.is_empty() {
            return;
        }
        // On its own thread: a test may end inside a runtime.
        let dropped = std::thread::spawn(move || {
            let admin = Admin::connect()?;
            for s in schemas {
                admin
                    .rt
                    .block_on(admin.client.batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE")))
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| "panicked".to_string()) {
            eprintln!("could not drop a scratch schema: {e}");
        }
    }
}

/// A factory of stores, each in a fresh schema dropped when the factory goes.
pub fn fresh_stores(durability: Durability) -> impl Fn() -> Arc<dyn Store> {
    let scratch = Scratch::new(durability);
    move || -> Arc<dyn Store> { Arc::new(scratch.open()) }
}
