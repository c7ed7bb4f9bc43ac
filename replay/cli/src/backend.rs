//! Which store `--db` names: a directory (sled, one process at a time) or a PostgreSQL
//! URL (`postgres://` or `postgresql://`; several processes at once, docs/STORE.md §15).
//!
//! The URL is libpq's, plus parameters of keel's own, taken out of the URL before
//! connecting: `schema`, the schema (namespace) holding keel's tables, default `keel`;
//! and the store's sizes and bounds ([`PgConfig`]'s fields of the same names, checked by
//! the store's open): `pool_size`, `io_threads`, `read_page_records`,
//! `connect_timeout_ms`, `statement_timeout_ms`, `call_timeout_ms` and
//! `idle_in_transaction_timeout_ms`.
//! `postgres://app@db.internal:5432/prod?schema=keel_orders&io_threads=4&sslmode=disable`
//! opens the tables in schema `keel_orders` of database `prod` with four store threads.

use keel_replay::error::ReplayError;
use keel_server::{Role, StoredToken, TokenStore};
use keel_store::Store;
use keel_store_postgres::{OpenError, PgConfig, PgStore, TokenRow};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The query parameter naming the schema.
const SCHEMA_PARAM: &str = "schema";

/// Sets one [`PgConfig`] field from a URL parameter's value.
type SetField = fn(&mut PgConfig, u64);

/// keel's numeric URL parameters: each sets the [`PgConfig`] field of its name.
const NUMBER_PARAMS: [(&str, SetField); 7] = [
    ("pool_size", |c, v| c.pool_size = usize::try_from(v).unwrap_or(usize::MAX)),
    ("io_threads", |c, v| c.io_threads = usize::try_from(v).unwrap_or(usize::MAX)),
    ("read_page_records", |c, v| c.read_page_records = usize::try_from(v).unwrap_or(usize::MAX)),
    ("connect_timeout_ms", |c, v| c.connect_timeout_ms = v),
    ("statement_timeout_ms", |c, v| c.statement_timeout_ms = v),
    ("call_timeout_ms", |c, v| c.call_timeout_ms = v),
    ("idle_in_transaction_timeout_ms", |c, v| c.idle_in_transaction_timeout_ms = v),
];

/// The PostgreSQL config `db` names, or `None` if it is a directory. Anything else
/// written as a URL (`SCHEME://…`: a misspelled `postgress://`, `POSTGRES://`) is refused,
/// not taken as a directory of that name (where a sled database would have been created).
pub(crate) fn postgres_config(db: &Path) -> Option<Result<PgConfig, ReplayError>> {
    let s = db.to_str()?;
    if is_keyword_string(s) {
        // Not made a directory of that name (with the password in it).
        return Some(Err(ReplayError::BadDbUrl {
            path: redacted(db),
            reason: "a key=value connection string: keel takes a URL, \
                     postgres://USER@HOST:PORT/DATABASE?schema=NAME (a sled database is a directory)"
                .into(),
        }));
    }
    if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
        let scheme = s.split_once("://").map(|(scheme, _)| scheme)?;
        if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) {
            return None;
        }
        return Some(Err(ReplayError::BadDbUrl {
            path: redacted(db),
            reason: format!(
                "`{scheme}://` is not a scheme keel knows (a PostgreSQL URL starts with `postgres://` or \
                 `postgresql://`; a sled database is a directory)"
            ),
        }));
    }
    Some(parse_url(s).map_err(|reason| ReplayError::BadDbUrl { path: redacted(db), reason }))
}

/// Splits keel's own parameters (`schema` and [`NUMBER_PARAMS`]) off a PostgreSQL URL;
/// the rest is the driver's. Each may be given once; a number must be a plain decimal
/// (its range is checked by the store's open, before connecting).
fn parse_url(url: &str) -> Result<PgConfig, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut schema = None;
    let mut numbers: Vec<(&str, SetField, u64)> = Vec::new();
    let mut rest = Vec::new();
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            rest.push(pair);
            continue;
        };
        if key == SCHEMA_PARAM {
            // Percent-decoded, as the driver decodes the URL's other parameters.
            let v = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| format!("`{SCHEMA_PARAM}` is not UTF-8 once percent-decoded"))?;
            if schema.replace(v.into_owned()).is_some() {
                return Err(format!("`{SCHEMA_PARAM}` given twice"));
            }
        } else if let Some((name, set)) = NUMBER_PARAMS.iter().find(|(name, _)| *name == key) {
            if numbers.iter().any(|(n, _, _)| n == name) {
                return Err(format!("`{name}` given twice"));
            }
            let v = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            let n = match v.parse::<u64>() {
                Ok(n) if !v.starts_with('+') => n,
                _ => return Err(format!("`{name}` must be a whole number, not {:?}", v.as_ref())),
            };
            numbers.push((name, *set, n));
        } else {
            rest.push(pair);
        }
    }
    let url = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
    let mut config = PgConfig::new(url);
    if let Some(schema) = schema {
        config.schema = schema;
    }
    for (_, set, n) in numbers {
        set(&mut config, n);
    }
    Ok(config)
}

/// `db` with any password in it replaced by `***` (for messages and reports): the one in
/// the URL's user info and every `password=` parameter (its name percent-decoded, as the
/// driver reads it). The user info is read as the driver reads it: everything up to the
/// URL's FIRST `@` (a password may hold `/` or `?` unescaped), its password after the first
/// `:`; then each `&`-separated parameter anywhere in the URL is checked, so a `password=`
/// is hidden wherever the driver would take it from.
pub(crate) fn redacted(db: &Path) -> PathBuf {
    let s = db.to_string_lossy();
    let Some((scheme, rest)) = s.split_once("://") else { return PathBuf::from(keyword_redacted(&s)) };
    let rest = match rest.split_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{after}"),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    let pieces: Vec<String> = rest
        .split('&')
        .map(|piece| {
            // A parameter is what follows the piece's `?` (the first piece), or the piece.
            let (head, param) = match piece.split_once('?') {
                Some((head, param)) => (Some(head), param),
                None => (None, piece),
            };
            let param = match param.split_once('=') {
                Some((k, _)) if is_password_key(k) => format!("{k}=***"),
                _ => param.to_owned(),
            };
            match head {
                Some(head) => format!("{head}?{param}"),
                None => param,
            }
        })
        .collect();
    PathBuf::from(format!("{scheme}://{}", pieces.join("&")))
}

/// Whether `s` is a libpq `key=value` connection string (`host=db dbname=prod …`): words
/// separated by spaces, each `key=value`, one of them naming a host or a database.
fn is_keyword_string(s: &str) -> bool {
    let words: Vec<&str> = s.split_whitespace().collect();
    words.iter().all(|w| w.split_once('=').is_some_and(|(k, _)| !k.is_empty() && !k.contains('/')))
        && words.iter().any(|w| {
            w.split_once('=').is_some_and(|(k, _)| matches!(k, "host" | "hostaddr" | "dbname" | "port" | "user"))
        })
}

/// A libpq `key=value` connection string given as `--db` (refused, see
/// [`is_keyword_string`]): any `password=VALUE` in it shown as `password=***`.
fn keyword_redacted(s: &str) -> String {
    s.split(' ')
        .map(|w| match w.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => w.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a query parameter's name is `password` once percent-decoded (any case).
fn is_password_key(k: &str) -> bool {
    percent_encoding::percent_decode_str(k).decode_utf8_lossy().eq_ignore_ascii_case("password")
}

/// Opens the PostgreSQL store of `config` (`create`: make the schema if missing).
pub(crate) fn open_postgres(db: &Path, config: PgConfig, create: bool) -> Result<Arc<dyn Store>, ReplayError> {
    Ok(open_postgres_store(db, config, create)?)
}

/// [`open_postgres`], as the PostgreSQL store itself (its tokens table too).
pub(crate) fn open_postgres_store(db: &Path, mut config: PgConfig, create: bool) -> Result<Arc<PgStore>, ReplayError> {
    config.create = create;
    match PgStore::open(config) {
        Ok(store) => Ok(Arc::new(store)),
        Err(OpenError::NotFound { .. }) => Err(ReplayError::DbNotFound { path: redacted(db) }),
        // Not reached or failed while opening: not a verdict on what is there.
        Err(OpenError::Postgres(e)) => Err(ReplayError::DbUnreachable { path: redacted(db), reason: e.to_string() }),
        Err(e @ OpenError::Runtime(_)) => Err(ReplayError::DbUnreachable { path: redacted(db), reason: e.to_string() }),
        // The URL or the schema name cannot be used: nothing was opened.
        Err(OpenError::InvalidConfig { reason }) => Err(ReplayError::BadDbUrl { path: redacted(db), reason }),
        Err(e) => Err(ReplayError::NotADb { path: redacted(db), reason: e.to_string() }),
    }
}

/// The API tokens of a deployment on PostgreSQL: its schema's `tokens` table, shared by
/// every `keel serve` on the database.
pub(crate) struct PgTokens(pub(crate) Arc<PgStore>);

impl std::fmt::Debug for PgTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PgTokens").field(&self.0.schema()).finish()
    }
}

impl TokenStore for PgTokens {
    fn list(&self) -> Result<Vec<StoredToken>, String> {
        let rows = self.0.tokens().map_err(|e| e.to_string())?;
        rows.into_iter()
            .map(|r| match Role::parse(&r.role) {
                Some(role) => Ok(StoredToken { name: r.name, role, sha256: r.sha256 }),
                None => Err(format!("stored token {:?} has an unknown role {:?}", r.name, r.role)),
            })
            .collect()
    }

    fn insert(&self, t: &StoredToken) -> Result<bool, String> {
        let row = TokenRow { name: t.name.clone(), role: t.role.name().to_owned(), sha256: t.sha256 };
        self.0.add_token(&row).map_err(|e| e.to_string())
    }

    fn remove(&self, name: &str) -> Result<bool, String> {
        self.0.remove_token(name).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_schema_parameter_is_keel_s_and_the_rest_is_passed_on() {
        let c = parse_url("postgres://u@h:5432/test?schema=keel_a&sslmode=disable").unwrap();
        assert_eq!((c.url.as_str(), c.schema.as_str()), ("postgres://u@h:5432/test?sslmode=disable", "keel_a"));
        let c = parse_url("postgresql://u@h/test").unwrap();
        assert_eq!((c.url.as_str(), c.schema.as_str()), ("postgresql://u@h/test", "keel"));
        assert!(parse_url("postgres://h/t?schema=a&schema=b").is_err());
        // Percent-decoded as libpq decodes the URL's other parameters.
        assert_eq!(parse_url("postgres://h/t?schema=keel%5Fa").unwrap().schema, "keel_a");
        assert!(parse_url("postgres://h/t?schema=%FF").is_err());
        assert!(postgres_config(Path::new("./keel-data")).is_none());
        assert!(postgres_config(Path::new("postgres://h/t?schema=x")).is_some());
    }

    #[test]
    fn the_store_s_sizes_and_bounds_are_keel_s_parameters_too() {
        let c = parse_url(
            "postgres://u@h/test?io_threads=4&sslmode=disable&pool_size=8&read_page_records=512\
             &connect_timeout_ms=2000&statement_timeout_ms=3000&call_timeout_ms=4000\
             &idle_in_transaction_timeout_ms=5000&schema=k",
        )
        .unwrap();
        assert_eq!(c.url, "postgres://u@h/test?sslmode=disable");
        assert_eq!((c.io_threads, c.pool_size, c.read_page_records), (4, 8, 512));
        assert_eq!(
            (c.connect_timeout_ms, c.statement_timeout_ms, c.call_timeout_ms, c.idle_in_transaction_timeout_ms),
            (2000, 3000, 4000, 5000)
        );
        // Unset ones keep the store's defaults.
        let d = PgConfig::new("x");
        let c = parse_url("postgres://h/t?io_threads=1").unwrap();
        assert_eq!((c.io_threads, c.pool_size, c.call_timeout_ms), (1, d.pool_size, d.call_timeout_ms));
        // Not a number, or given twice: refused with the parameter's name.
        for (url, said) in [
            ("postgres://h/t?io_threads=two", "`io_threads` must be a whole number, not \"two\""),
            ("postgres://h/t?pool_size=-1", "`pool_size` must be a whole number, not \"-1\""),
            ("postgres://h/t?pool_size=+1", "`pool_size` must be a whole number, not \"+1\""),
            ("postgres://h/t?call_timeout_ms=", "`call_timeout_ms` must be a whole number, not \"\""),
            ("postgres://h/t?io_threads=1&io_threads=2", "`io_threads` given twice"),
        ] {
            assert_eq!(parse_url(url).unwrap_err(), said, "{url}");
        }
        // A parameter keel does not know is the driver's.
        assert_eq!(parse_url("postgres://h/t?threads=2").unwrap().url, "postgres://h/t?threads=2");
    }

    #[test]
    fn passwords_are_not_shown() {
        let shown = redacted(Path::new("postgres://app:s3cret@db:5432/prod?schema=k"));
        assert_eq!(shown, Path::new("postgres://app:***@db:5432/prod?schema=k"));
        assert_eq!(redacted(Path::new("/var/keel")), Path::new("/var/keel"));
        // libpq also takes the password as a parameter.
        let shown = redacted(Path::new("postgres://app@db/prod?password=s3cret&schema=k"));
        assert_eq!(shown, Path::new("postgres://app@db/prod?password=***&schema=k"));
        // The driver takes `/`, `?` and `@` in a password unescaped (the new-user review
        // saw `s3cr/et` and `hun?ter` shown whole), and a percent-encoded parameter name.
        for (url, secret) in [
            ("postgres://app:s3cr/et@db:5432/prod?schema=k", "s3cr/et"),
            ("postgres://app:hun?ter@db/prod", "hun?ter"),
            ("postgres://app:a@b@db/prod", "a@b"),
            ("postgres://app@db/prod?pass%77ord=s3cret", "s3cret"),
            ("postgres://app@db/prod?PASSWORD=s3cret", "s3cret"),
            // An `@` after the user info (the driver's user info ends at the first one).
            ("postgres://app@db/prod?password=se@cret&schema=k", "se@cret"),
            ("postgres://app@db/prod?password=s3cret&application_name=me@laptop", "s3cret"),
            ("postgres://db/prod?password=s3cret&user=admin@corp", "s3cret"),
        ] {
            let shown = redacted(Path::new(url)).display().to_string();
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("***"), "{url} -> {shown}");
        }
        assert_eq!(redacted(Path::new("postgres://db/prod?schema=k")), Path::new("postgres://db/prod?schema=k"));
        // A libpq key=value string (refused: keel takes a URL) hides it too.
        let kv = Path::new("host=db user=app password=s3cret dbname=prod");
        assert_eq!(redacted(kv), Path::new("host=db user=app password=*** dbname=prod"));
        let e = postgres_config(kv).unwrap().unwrap_err().to_string();
        assert!(e.contains("a key=value connection string") && !e.contains("s3cret"), "{e}");
        // A directory name with `=` in it is still a directory.
        assert!(postgres_config(Path::new("./data=2024")).is_none());
        assert!(postgres_config(Path::new("/var/keel/a=b")).is_none());
        // Nothing hidden, nothing mangled, without a password.
        let plain = "postgres://app@127.0.0.1:5432/test?schema=k&application_name=a:b@c";
        assert_eq!(redacted(Path::new(plain)), Path::new(plain));
    }

    /// A misspelled scheme is refused, not made a directory of that name (a new user's
    /// `postgress://…` created a sled database under `./postgress:/…` and exited 0).
    #[test]
    fn a_url_of_another_scheme_is_refused() {
        for url in ["postgress://u@h/t", "POSTGRES://u@h/t", "mysql://u@h/t"] {
            let e = postgres_config(Path::new(url)).unwrap().unwrap_err().to_string();
            assert!(e.contains("is not a usable database URL: `"), "{url}: {e}");
            assert!(e.contains("is not a scheme keel knows"), "{url}: {e}");
        }
        assert!(postgres_config(Path::new("./dir with :// inside")).is_none());
    }
}
