//! Serves the HTTP admin API while working runs: `keel serve` (docs/SERVER.md).

use crate::error::{io_err, CliError, CmdResult};
use crate::open::open_db;
use crate::output::errln;
use crate::Registry;
use clap::Args;
use keel_server::{router_with, serve, serve_tls, Auth, Readiness, RouterOptions, TOKENS_FILE};
use keel_store::Store;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address to listen on. Only a loopback address unless --insecure-bind is given.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    pub(crate) listen: SocketAddr,
    /// Listen on a non-loopback address without TLS: bearer tokens then cross the network
    /// in clear text. Put a TLS-terminating proxy in front, or keep to loopback.
    #[arg(long)]
    pub(crate) insecure_bind: bool,
    /// A host name requests may name in their Host header, besides the loopback names
    /// (127.0.0.1, localhost, ::1) a server on a loopback address answers by default (a
    /// reverse proxy that passes its own host name on); repeat for several. A server on a
    /// non-loopback address answers any host unless this is given.
    #[arg(long, value_name = "NAME")]
    pub(crate) allow_host: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Serve GET /metrics without a token (for a scraper on a trusted network).
    #[arg(long)]
    pub(crate) metrics_open: bool,
    /// Server-sent event streams open at once (run tails and status streams); one more is
    /// answered 503 too_many_streams.
    #[arg(long, value_name = "N", default_value_t = keel_server::STREAMS_MAX, value_parser = clap::value_parser!(usize))]
    pub(crate) max_streams: usize,
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT, then the calls
    /// in flight to answer (recorded); the workers stop within twice it.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub(crate) shutdown_timeout: u64,
    /// Seconds to keep serving after SIGTERM or SIGINT with /readyz answering 503, so a
    /// load balancer polling it takes this server out of rotation before it closes its
    /// port (event streams end at once). 0 (the default): close at once. At most 3600.
    #[arg(long, value_name = "SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub(crate) drain_seconds: u64,
    /// How long a driver's run lease lasts unless its heartbeat renews it (several
    /// servers or workers on one PostgreSQL database: a process paused longer loses its
    /// runs to the others). From 30 ms to a day.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = keel_engine::LEASE_TTL_MS_DEFAULT,
        value_parser = clap::value_parser!(u64).range(keel_engine::LEASE_TTL_MS_MIN..=keel_engine::LEASE_TTL_MS_MAX)
    )]
    pub(crate) lease_ttl_ms: u64,
    #[command(flatten)]
    pub(crate) sign: crate::cmd::keygen::SignKeyArgs,
    #[command(flatten)]
    pub(crate) size: crate::registry::SizeWarningArgs,
}

pub(crate) async fn run(db: &Path, a: ServeArgs, registry: &Registry) -> CmdResult {
    if !a.listen.ip().is_loopback() && !a.insecure_bind && a.tls_cert.is_none() {
        return Err(CliError::Usage(format!(
            "{} is not a loopback address: without TLS tokens would cross the network in clear text; \
             give --tls-cert FILE --tls-key FILE, or --insecure-bind to do it anyway (behind a TLS proxy)",
            a.listen
        )));
    }
    // Read the certificate before anything else: a bad one is one line, nothing started.
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            Some(keel_server::tls::server_config(cert, key).map_err(|e| CliError::Failed(e.to_string()))?)
        }
        _ => None,
    };
    let key = a.sign.load()?;
    // The port before the database: a port in use is one line and creates nothing (a
    // connection made while the database opens waits in the backlog).
    let listener =
        tokio::net::TcpListener::bind(a.listen).await.map_err(|e| io_err(&format!("listening on {}", a.listen), e))?;
    let (store, auth) = store_and_auth(db)?;
    let engine = registry.engine_signing(store, a.lease_ttl_ms, key.as_ref(), a.size)?;
    registry.refuse_unknown_unfinished(&engine)?;
    if auth.is_empty() {
        errln!(
            "keel: no tokens yet: every route that reads or changes runs answers 401 until \
             `keel token add NAME --role ROLE`"
        );
    }
    let shared = crate::backend::postgres_config(db).is_some();
    let addr = listener.local_addr().map_err(|e| io_err("the listening socket", e))?;
    let readiness = Readiness::new();
    let options = RouterOptions {
        readiness: readiness.clone(),
        metrics_open: a.metrics_open,
        streams_max: a.max_streams,
        allowed_hosts: allowed_hosts(addr, &a.allow_host),
        ..Default::default()
    };
    let app = router_with(engine.clone(), auth, options);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let reach = reach_url(scheme, addr);
    // Where `keel runs`, `keel resolve`, ... on this database find the server (removed
    // when it stops; a file left by a killed server is checked before it is used).
    // Written before the "serving" line, so whoever reads that line finds the file.
    let ca_cert = a.tls_cert.as_deref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    // A database several servers share (PostgreSQL) has no directory to write it in.
    if !shared {
        crate::remote::write_server_file(db, &crate::remote::server_file_json(&reach, ca_cert.as_deref()))?;
    }
    // Listening for the stop signals from before the "serving" line is printed.
    let stop = crate::sys::stop_signal();
    let workers = engine.start();
    errln!("keel: serving {url} for {} (SIGINT or SIGTERM to stop)", crate::backend::redacted(db).display());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = Duration::from_secs(a.drain_seconds);
    let shutdown = {
        let readiness = readiness.clone();
        async move {
            stop.await;
            readiness.drain();
            if !drain.is_zero() {
                errln!("keel: stopping: /readyz answers 503; serving on for {}s (--drain-seconds)", drain.as_secs());
                tokio::time::sleep(drain).await;
            }
            errln!("keel: stopping: no new connections; letting requests in flight finish");
            let _ = stop_tx.send(true);
        }
    };
    let serving = async move {
        match tls {
            Some(config) => serve_tls(listener, config, app, shutdown).await,
            None => serve(listener, app, shutdown).await,
        }
    };
    let grace = Duration::from_secs(a.shutdown_timeout);
    // The graceful shutdown waits for in-flight requests; a request that hangs must not
    // keep the process alive past the grace period.
    let deadline = async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(grace).await;
    };
    let served = tokio::select! {
        r = serving => r.map_err(|e| io_err("serving", e)),
        () = deadline => {
            errln!("keel: requests still in flight after {}s; stopping anyway", grace.as_secs());
            Ok(())
        }
    };
    if !shared {
        crate::remote::remove_server_file(db);
    }
    served?;
    // The calls in flight answer (recorded) for up to `grace`; then the drivers still
    // waiting stop (their calls are redelivered by the next start).
    match tokio::time::timeout(grace.saturating_mul(2), workers.drain(grace)).await {
        Ok(report) => errln!("keel: stopped after {} driver pass(es)", report.driven),
        Err(_) => errln!("keel: the workers did not stop within {}s; exiting", grace.saturating_mul(2).as_secs()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The database `db` names and its API tokens: the `tokens` table of a PostgreSQL
/// database (shared by every server on it), or the tokens file of a sled directory.
fn store_and_auth(db: &Path) -> Result<(Arc<dyn Store>, Auth), CliError> {
    match crate::backend::postgres_config(db) {
        Some(config) => {
            let pg = crate::backend::open_postgres_store(db, config?, true)?;
            let auth = Auth::from_store(Arc::new(crate::backend::PgTokens(pg.clone()))).map_err(CliError::Failed)?;
            Ok((pg, auth))
        }
        None => {
            let store = open_db(db, true)?;
            let auth = Auth::from_file(db.join(TOKENS_FILE)).map_err(|e| CliError::Failed(e.to_string()))?;
            Ok((store, auth))
        }
    }
}

/// The host names a server on `addr` answers: on a loopback address its loopback names
/// and `extra` (a page of another site pointed at 127.0.0.1 by its DNS is refused);
/// elsewhere `extra`, or any host when none is given.
fn allowed_hosts(addr: std::net::SocketAddr, extra: &[String]) -> Vec<String> {
    let loopback = ["127.0.0.1".to_owned(), "localhost".to_owned(), "::1".to_owned(), addr.ip().to_string()];
    let mut hosts: Vec<String> = Vec::new();
    let given = extra.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty());
    for h in loopback.into_iter().filter(|_| addr.ip().is_loopback()).chain(given) {
        if !hosts.iter().any(|k| k.eq_ignore_ascii_case(&h)) {
            hosts.push(h);
        }
    }
    hosts
}

/// Where a client on this machine reaches a server listening on `addr` (what `serve.addr`
/// records): a wildcard address (0.0.0.0, ::) is not one to connect to, nor a name a
/// certificate is made for; its loopback is.
fn reach_url(scheme: &str, addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("{scheme}://{}", std::net::SocketAddr::new(ip, addr.port()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::reach_url;

    /// A server on a wildcard address is recorded at its loopback (the review's
    /// `--listen 0.0.0.0:7700 --tls-cert` recorded `https://0.0.0.0:7700`, which no
    /// certificate names); any other address as it is.
    /// A server on loopback answers its loopback names (and those given), so a page of
    /// another site pointed at 127.0.0.1 by its DNS (rebinding) is refused; elsewhere only
    /// the names given, or any.
    #[test]
    fn a_loopback_server_answers_its_loopback_names_only() {
        let h = super::allowed_hosts("127.0.0.1:7700".parse().unwrap(), &[]);
        assert!(h.contains(&"127.0.0.1".to_owned()) && h.contains(&"localhost".to_owned()), "{h:?}");
        assert!(!h.iter().any(|n| n.contains("example")));
        let h = super::allowed_hosts("127.0.0.1:7700".parse().unwrap(), &["keel.example.org".to_owned()]);
        assert!(h.contains(&"keel.example.org".to_owned()) && h.contains(&"localhost".to_owned()), "{h:?}");
        assert!(super::allowed_hosts("0.0.0.0:7700".parse().unwrap(), &[]).is_empty(), "any host");
        assert_eq!(super::allowed_hosts("10.0.0.1:7700".parse().unwrap(), &["a".to_owned()]), vec!["a".to_owned()]);
    }

    #[test]
    fn a_wildcard_address_is_reached_at_its_loopback() {
        assert_eq!(reach_url("https", "0.0.0.0:7700".parse().unwrap()), "https://127.0.0.1:7700");
        assert_eq!(reach_url("https", "[::]:7700".parse().unwrap()), "https://[::1]:7700");
        assert_eq!(reach_url("http", "127.0.0.1:7700".parse().unwrap()), "http://127.0.0.1:7700");
        assert_eq!(reach_url("https", "10.1.2.3:443".parse().unwrap()), "https://10.1.2.3:443");
    }
}
