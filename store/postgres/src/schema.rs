//! The tables, as numbered migrations applied in order at open (docs/STORE.md, "PostgreSQL").
//!
//! `schema_version` holds one row per applied migration. Opening takes a transaction-scoped
//! advisory lock so that processes opening one schema at once migrate it once, applies the
//! missing migrations in that transaction, and refuses a schema whose version is newer than
//! [`SCHEMA_VERSION`] ([`OpenError::SchemaTooNew`]) without touching it.

use crate::error::{OpenError, PgError};
use tokio_postgres::Client;

/// The migrations, in order: `(version, statements)`. Never edit one that has shipped: add
/// the next.
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE events (
        run uuid NOT NULL,
        seq bigint NOT NULL CHECK (seq >= 0),
        value bytea NOT NULL,
        PRIMARY KEY (run, seq)
    );
    CREATE TABLE heads (
        run uuid PRIMARY KEY,
        next_seq bigint NOT NULL CHECK (next_seq > 0),
        last_hash bytea NOT NULL,
        last_kind text NOT NULL
    );
    CREATE TABLE claims (
        key bytea PRIMARY KEY,
        run uuid NOT NULL,
        expires_at_us bigint NOT NULL
    );
    CREATE TABLE leases (
        run uuid PRIMARY KEY,
        owner text,
        epoch bigint NOT NULL,
        expires_at_us bigint NOT NULL
    );
    CREATE TABLE snapshots (
        run uuid PRIMARY KEY,
        value bytea NOT NULL
    );
    CREATE TABLE aux (
        key bytea PRIMARY KEY,
        value bytea NOT NULL
    );
    CREATE TABLE due (
        run uuid PRIMARY KEY,
        due_at_us bigint NOT NULL
    );
    CREATE INDEX due_by_time ON due (due_at_us, run);",
    ),
    (
        2,
        "CREATE TABLE payload_manifests (
        digest bytea PRIMARY KEY,
        manifest bytea NOT NULL
    );
    CREATE TABLE payloads (
        digest bytea NOT NULL,
        chunk integer NOT NULL CHECK (chunk >= 0),
        bytes bytea NOT NULL,
        PRIMARY KEY (digest, chunk)
    );",
    ),
    (
        3,
        "CREATE TABLE work (
        run uuid PRIMARY KEY,
        workflow text NOT NULL,
        priority integer NOT NULL,
        accepted_at_us bigint NOT NULL,
        ticket bigserial NOT NULL,
        claimed_by text,
        again boolean NOT NULL DEFAULT false
    );
    CREATE INDEX work_order ON work (priority DESC, accepted_at_us, ticket);
    CREATE INDEX work_by_workflow ON work (workflow);
    CREATE TABLE tokens (
        name text PRIMARY KEY,
        role text NOT NULL,
        sha256 bytea NOT NULL UNIQUE,
        created_at timestamptz NOT NULL DEFAULT now()
    );",
    ),
    (
        4,
        // Counters (keys under `keel_store::COUNTER_PREFIX`) move out of `aux` into
        // shards: each session adds to its own row of a counter, so the flushes of several
        // processes no longer queue on one row lock held through each commit's WAL flush.
        // A counter's value is the sum of its shards.
        "CREATE TABLE counters (
        key bytea NOT NULL,
        shard integer NOT NULL,
        value bigint NOT NULL,
        PRIMARY KEY (key, shard)
    );
    INSERT INTO counters (key, shard, value)
        SELECT key, 0, ('x' || encode(value, 'hex'))::bit(64)::bigint FROM aux
        WHERE key >= '\\x236e2f'::bytea AND key < '\\x236e30'::bytea AND length(value) = 8;
    DELETE FROM aux WHERE key >= '\\x236e2f'::bytea AND key < '\\x236e30'::bytea AND length(value) = 8;",
    ),
    (
        5,
        // The leases held (few: one per run being driven, over all processes), for a
        // claim's count of a limited workflow type's live leases: the `leases` table keeps
        // a row per run ever leased, and `work` every queued run.
        "CREATE INDEX IF NOT EXISTS leases_held ON leases (run) WHERE owner IS NOT NULL;",
    ),
    (
        6,
        // The seq a snapshot covers up to (also inside its sealed value), so a fold reads
        // the snapshot and the records after it in one statement. NULL in the rows of
        // snapshots saved before: those are read in two steps, as before.
        "ALTER TABLE snapshots ADD COLUMN IF NOT EXISTS next_seq bigint;",
    ),
];

/// The schema version this build migrates to (its last migration's number).
pub const SCHEMA_VERSION: i32 = 6;

const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// Why `name` cannot be keel's schema, if it cannot: it is written into statements
/// unquoted, so it must be a plain lower-case identifier that is not one of PostgreSQL's
/// reserved key words (`user`, `order`: `CREATE SCHEMA user` is a syntax error), and not
/// one of PostgreSQL's own schemas (`pg_*`, `information_schema`: keel's tables were
/// created in `information_schema`).
pub(crate) fn schema_name_problem(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    let plain =
        matches!(chars.next(), Some('a'..='z' | '_')) && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if !plain || name.len() > 63 {
        Some("is not a lower-case identifier of at most 63 bytes (a-z, 0-9, _; not starting with a digit)")
    } else if name.starts_with("pg_") || name == "information_schema" {
        Some("is a name PostgreSQL keeps for its own schemas (pg_*, information_schema)")
    } else if RESERVED.contains(&name) {
        Some("is a reserved word of PostgreSQL's SQL")
    } else {
        None
    }
}

/// PostgreSQL's reserved key words (reserved, and reserved that can be a function or type
/// name): none can name a schema unquoted.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Creates (with `create`) and migrates `schema`; returns the version it is at.
pub(crate) async fn migrate(client: &mut Client, schema: &str, create: bool) -> Result<i32, OpenError> {
    let err = |e| OpenError::Postgres(PgError::of(e));
    let tx = client.transaction().await.map_err(err)?;
    // One migrator per schema at a time, across processes; released at COMMIT/ROLLBACK.
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('keel schema ' || $1::text)::bigint)", &[&schema])
        .await
        .map_err(err)?;
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'schema_version')",
            &[&schema],
        )
        .await
        .map_err(err)?
        .get(0);
    if !exists {
        if !create {
            return Err(OpenError::NotFound { schema: schema.to_owned() });
        }
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE {schema}.schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(err)?;
    }
    let found: i32 = tx
        .query_one(&format!("SELECT coalesce(max(version), 0) FROM {schema}.schema_version"), &[])
        .await
        .map_err(err)?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(OpenError::SchemaTooNew { schema: schema.to_owned(), found, supported: SCHEMA_VERSION });
    }
    for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(&format!("SET LOCAL search_path TO {schema};\n{statements}")).await.map_err(err)?;
        tx.execute(&format!("INSERT INTO {schema}.schema_version (version) VALUES ($1)"), &[version])
            .await
            .map_err(err)?;
        tracing::info!(schema, version, "applied keel schema migration");
    }
    tx.commit().await.map_err(err)?;
    Ok(SCHEMA_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_schema_name(name: &str) -> bool {
        schema_name_problem(name).is_none()
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["keel", "_t1", "keel_test_42"] {
            assert!(valid_schema_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Keel",
            "a-b",
            "a;drop",
            "a b",
            &"x".repeat(64),
            "information_schema",
            "pg_catalog",
            "pg_x",
            "user",
            "order",
            "select",
        ] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
        assert!(schema_name_problem("pg_x").unwrap().contains("keeps for its own"));
        assert!(schema_name_problem("user").unwrap().contains("reserved word"));
        // Not reserved: usable unquoted.
        for ok in ["users", "orders", "public_keel", "name", "type"] {
            assert!(valid_schema_name(ok), "{ok}");
        }
    }

    #[test]
    fn migrations_are_numbered_one_by_one() {
        for (i, (v, _)) in (1..).zip(MIGRATIONS) {
            assert_eq!(*v, i);
        }
    }
}
