//! A small HTTP client for the API (what `keel runs`, `keel resolve`, ... use to reach a
//! running `keel serve`): one request per connection, HTTP/1.1, over plain TCP or TLS
//! (rustls), each step bounded in time and the answer bounded in size. It lives here so
//! that keel-server stays the only crate of keel that knows HTTP.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Largest answer the client reads, in bytes (an export of a run is bounded by the
/// store's limits; this is well above them).
pub const ANSWER_BYTES_MAX: usize = 512 * 1024 * 1024;

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://HOST:PORT` or `https://HOST:PORT` (an optional trailing `/`).
    #[error("{url:?} is not a server URL (http://HOST:PORT or https://HOST:PORT)")]
    BadUrl {
        /// What was given.
        url: String,
    },
    /// No connection could be made.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The server's URL.
        url: String,
        /// The I/O or TLS error.
        reason: String,
    },
    /// The connection was made but the exchange failed.
    #[error("{url}: {reason}")]
    Exchange {
        /// The server's URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A step took longer than its bound.
    #[error("{url}: no answer within {secs}s")]
    Timeout {
        /// The server's URL.
        url: String,
        /// The bound, in seconds.
        secs: u64,
    },
    /// The certificate file given to trust cannot be used.
    #[error("CA certificate {path}: {reason}")]
    CaCert {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// An answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// For an error answer (`{"error": {"code", "message"}}`): its code and message.
    pub fn error(&self) -> Option<(String, String)> {
        let v = self.json().ok()?;
        let e = v.get("error")?;
        Some((e.get("code")?.as_str()?.to_owned(), e.get("message")?.as_str()?.to_owned()))
    }
}

/// A client of one server: its URL, the bearer token it presents and (for `https`) the
/// certificates it trusts.
#[derive(Clone)]
pub struct Client {
    url: String,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    token: Option<String>,
    /// Bound on connecting (TCP and TLS handshake).
    pub connect_timeout: Duration,
    /// Bound on one whole exchange once connected.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("Client").field("url", &self.url).field("token", &self.token.as_ref().map(|_| "…")).finish()
    }
}

impl Client {
    /// A client of the server at `url` (`http://HOST:PORT` or `https://HOST:PORT`).
    /// With `https`, the server's certificate must chain to `ca_cert` (a PEM file of one
    /// or more certificates; a self-signed server certificate may be given itself).
    pub fn new(url: &str, token: Option<String>, ca_cert: Option<&Path>) -> Result<Client, ClientError> {
        let bad = || ClientError::BadUrl { url: url.to_owned() };
        let trimmed = url.trim_end_matches('/');
        let (https, rest) = if let Some(r) = trimmed.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = trimmed.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad());
        };
        if rest.contains('/') || rest.contains('@') {
            return Err(bad());
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad());
        }
        let tls = if https { Some(connector(ca_cert)?) } else { None };
        Ok(Client {
            url: trimmed.to_owned(),
            host,
            port,
            tls,
            token,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(300),
        })
    }

    /// The server's URL (without a trailing `/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether a request would carry the token in clear text to another machine: plain
    /// `http://` to a host that is not a loopback address (nor `localhost`).
    pub fn sends_token_in_clear(&self) -> bool {
        let loopback = self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        self.tls.is_none() && self.token.is_some() && !loopback
    }

    /// `GET path` (path and query, e.g. `/v1/runs?limit=10`).
    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.call("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        self.call("POST", path, Some(body.to_string().into_bytes())).await
    }

    /// Whether a keel server answers `GET /healthz` with 200 within `within`.
    pub async fn answers(&self, within: Duration) -> bool {
        self.probe(within).await.is_ok()
    }

    /// [`Self::answers`], with why not: the connection's or TLS handshake's error, or
    /// the status `/healthz` answered.
    pub async fn probe(&self, within: Duration) -> Result<(), ClientError> {
        let mut probe = self.clone();
        probe.connect_timeout = within;
        probe.request_timeout = within;
        let a = probe.get("/healthz").await?;
        if a.status == 200 {
            Ok(())
        } else {
            Err(ClientError::Exchange { url: self.url.clone(), reason: format!("GET /healthz answered {}", a.status) })
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Answer, ClientError> {
        let addr = format!("{}:{}", bracketed(&self.host), self.port);
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&addr).await.map_err(|e| self.connect_err(e))?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, ClientError>(tcp)
        };
        let tcp = self.bounded(self.connect_timeout, connect).await?;
        match &self.tls {
            None => self.bounded(self.request_timeout, self.exchange(tcp, method, path, body)).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|e| self.connect_err(e))?;
                let stream = self
                    .bounded(self.connect_timeout, async {
                        tls.connect(name, tcp).await.map_err(|e| self.connect_err(tls_reason(&e, &self.host)))
                    })
                    .await?;
                self.bounded(self.request_timeout, self.exchange(stream, method, path, body)).await
            }
        }
    }

    async fn exchange<S>(&self, io: S, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Answer, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let fail = |e: &dyn std::fmt::Display| ClientError::Exchange { url: self.url.clone(), reason: e.to_string() };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| fail(&e))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", bracketed(&self.host), self.port))
            .header(hyper::header::ACCEPT, "application/json, */*");
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| fail(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| fail(&e))?;
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = Limited::new(resp.into_body(), ANSWER_BYTES_MAX).collect().await.map_err(|e| fail(&*e))?;
        driver.abort();
        Ok(Answer { status, content_type, body: body.to_bytes().to_vec() })
    }

    async fn bounded<T>(
        &self,
        within: Duration,
        f: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(within, f)
            .await
            .unwrap_or_else(|_| Err(ClientError::Timeout { url: self.url.clone(), secs: within.as_secs() }))
    }

    fn connect_err(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Connect { url: self.url.clone(), reason: e.to_string() }
    }
}

/// A TLS handshake's failure in words: the certificate problems a person setting up a
/// server meets, said as what to do (rustls' own text names library types).
fn tls_reason(e: &std::io::Error, host: &str) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let what = match tls {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server's certificate is not valid for {host} (its subject alternative names must include \
             the host the URL names)"
        ),
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not signed by a CA this client trusts (give the CA's certificate, \
             or a self-signed certificate itself, with --ca-cert)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired".to_owned()
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the server's certificate is not valid yet".to_owned()
        }
        rustls::Error::InvalidCertificate(C::Other(other)) if other.to_string().contains("CaUsedAsEndEntity") => {
            "the server's certificate is a CA certificate (basicConstraints CA:TRUE), which a client may not \
             accept as a server's: serve a certificate made for the server (docs/SERVER.md, TLS)"
                .to_owned()
        }
        other => return format!("TLS: {other}"),
    };
    format!("TLS: {what}")
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// A TLS connector that trusts the certificates of `ca_cert` (none given: none trusted,
/// so every `https` server is refused with a message that says to give one).
fn connector(ca_cert: Option<&Path>) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_cert {
        let err = |reason: String| ClientError::CaCert { path: path.display().to_string(), reason };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in the file".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(crate::tls::provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::CaCert { path: String::new(), reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::Client;

    /// The CLI warns when a token would go in clear text to another machine (found by
    /// review: it was sent over http:// to a non-loopback server without a word).
    #[test]
    fn a_token_over_plain_http_to_another_machine_is_told_apart() {
        let t = || Some("keel_t".to_owned());
        assert!(Client::new("http://192.0.2.2:7700", t(), None).unwrap().sends_token_in_clear());
        assert!(Client::new("http://keel.internal:7700", t(), None).unwrap().sends_token_in_clear());
        for local in ["http://127.0.0.1:7700", "http://[::1]:7700", "http://localhost:7700", "http://127.8.9.1:1"] {
            assert!(!Client::new(local, t(), None).unwrap().sends_token_in_clear(), "{local}");
        }
        assert!(!Client::new("https://192.0.2.2:7700", t(), None).unwrap().sends_token_in_clear());
        assert!(!Client::new("http://192.0.2.2:7700", None, None).unwrap().sends_token_in_clear());
    }
}
