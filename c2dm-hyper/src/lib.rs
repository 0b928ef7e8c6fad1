//! The production [`Transport`] for C2DM: a pooled hyper 1 client over rustls.
//!
//! - keep-alive connection pool (idle timeout and idle connections per host settable), its own
//!   over `hyper::client::conn`: an HTTP/1.1 connection is driven by the task of the request it
//!   carries, so an exchange never hops between tasks (see `docs/ARCHITECTURE.md`);
//! - HTTP/1.1 by default, HTTP/2 by ALPN when asked for;
//! - a connect timeout and a whole-request timeout on by default, so a server that never answers
//!   cannot hang a caller;
//! - a cap on the response body (64 KiB by default);
//! - certificate verification always on: Mozilla's roots by default (`webpki-roots`), the
//!   operating system's with the `os-roots` feature, and extra roots from PEM by explicit choice.
//!   There is no switch that turns verification off;
//! - plain `http://` URLs work too, for a local emulator or a TLS-terminating proxy in front of
//!   the service;
//! - HTTP proxies ([`Proxy`]), given or from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` when asked
//!   for: each connection through the proxy is a `CONNECT` tunnel, so TLS still runs end to end
//!   and the certificate checked is the service's. Credentials in the proxy URL go as Basic
//!   `Proxy-Authorization` and never show in `Debug` or errors. A proxy that refuses the tunnel
//!   is an error of kind `Connect`, not sent.
//!
//! Failures map to [`TransportError`] honestly: DNS, connect and TLS handshake failures are "not
//! sent"; a timeout or a connection lost after the request was written is "may have been sent".
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use c2dm_core::{AuthToken, Message, Sender, StaticToken};
//! use c2dm_hyper::HyperTransport;
//!
//! let transport = HyperTransport::new()?; // pooled, TLS checked, timeouts on
//! let sender = Sender::new(transport, StaticToken::new(AuthToken::new("DQAAAGgA")?));
//! let message = Message::builder("APA91b-device").collapse_key("news").build()?;
//! let sent = sender.send(message).await?;
//! println!("accepted as {}", sent.message_id);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod drive;
mod pool;
mod proxy;

pub use proxy::{Proxy, ProxyError};

#[cfg(not(any(feature = "ring", feature = "aws-lc-rs")))]
compile_error!("c2dm-hyper needs a crypto provider: enable the `ring` or `aws-lc-rs` feature");

use std::error::Error as StdError;
use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_core::{RequestSent, Transport, TransportError, TransportErrorKind};
use http::header::{CONTENT_LENGTH, HOST, USER_AGENT};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::pool::{Checkout, ConnectError, Key, Pool, TimedOut};
use crate::proxy::{NoProxy, Proxies, ProxyConnector};

/// The `User-Agent` sent unless the request has one.
pub const USER_AGENT_VALUE: &str = concat!("c2dm-rs/", env!("CARGO_PKG_VERSION"));

/// The default cap on a response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How often an HTTP/2 connection is pinged by default ([`HyperTransportBuilder::http2_keep_alive`]).
pub const DEFAULT_HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a ping may go unanswered by default before its connection is closed.
pub const DEFAULT_HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The default of [`HyperTransportBuilder::pool_max_idle_per_host`].
pub const DEFAULT_MAX_IDLE_PER_HOST: usize = 128;

/// Why a [`HyperTransport`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The PEM given as a root certificate could not be read.
    #[error("invalid PEM root certificate: {0}")]
    InvalidPem(String),
    /// The PEM given as a root certificate held no certificate.
    #[error("the PEM holds no certificate")]
    NoCertificate,
    /// A root certificate was refused by rustls.
    #[error("unusable root certificate: {0}")]
    BadRoot(#[source] rustls::Error),
    /// No root certificate at all: nothing could be trusted.
    #[error("no root certificates: enable `webpki-roots` or `os-roots`, or add roots")]
    NoRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
}

/// Settings for a [`HyperTransport`]; see [`HyperTransport::builder`].
#[derive(Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct HyperTransportBuilder {
    connect_timeout: Duration,
    request_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    http2: bool,
    http2_keep_alive: Option<(Duration, Duration)>,
    max_response_bytes: usize,
    webpki_roots: bool,
    os_roots: bool,
    extra_roots: Vec<CertificateDer<'static>>,
    user_agent: HeaderValue,
    proxies: Proxies,
}

impl fmt::Debug for HyperTransportBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperTransportBuilder")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("http2", &self.http2)
            .field("http2_keep_alive", &self.http2_keep_alive)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("webpki_roots", &self.webpki_roots)
            .field("os_roots", &self.os_roots)
            .field("extra_roots", &self.extra_roots.len())
            .field("proxies", &self.proxies)
            .finish()
    }
}

impl Default for HyperTransportBuilder {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: DEFAULT_MAX_IDLE_PER_HOST,
            http2: false,
            http2_keep_alive: Some((
                DEFAULT_HTTP2_KEEP_ALIVE_INTERVAL,
                DEFAULT_HTTP2_KEEP_ALIVE_TIMEOUT,
            )),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            webpki_roots: cfg!(feature = "webpki-roots"),
            os_roots: cfg!(feature = "os-roots"),
            extra_roots: Vec::new(),
            user_agent: HeaderValue::from_static(USER_AGENT_VALUE),
            proxies: Proxies::default(),
        }
    }
}

impl HyperTransportBuilder {
    /// The longest wait for a TCP connection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest wait for a whole exchange (default 30 s): taking or opening a connection,
    /// the TLS handshake, sending, and the answer with its body.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long an idle pooled connection is kept (default 90 s).
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// How many idle connections per host are kept (default 128: twice a broadcast's default
    /// concurrency; connections beyond it are closed when their request ends).
    pub fn pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// Offers HTTP/2 by ALPN on TLS connections (default: HTTP/1.1 only). FCM's endpoint
    /// speaks it: every send to a host shares one connection, as many streams at once as the
    /// server allows.
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval` on each HTTP/2 connection, idle or not, and
    /// the connection closed (and replaced by the next send) when one is not answered within
    /// `timeout`; `None` for no pings. Default: every
    /// [`DEFAULT_HTTP2_KEEP_ALIVE_INTERVAL`], within [`DEFAULT_HTTP2_KEEP_ALIVE_TIMEOUT`].
    pub fn http2_keep_alive(mut self, keep_alive: Option<(Duration, Duration)>) -> Self {
        self.http2_keep_alive = keep_alive;
        self
    }

    /// The largest response body accepted (default 64 KiB); larger is an error.
    pub fn max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// Whether to trust Mozilla's roots (default: on with the `webpki-roots` feature).
    pub fn webpki_roots(mut self, enabled: bool) -> Self {
        self.webpki_roots = enabled && cfg!(feature = "webpki-roots");
        self
    }

    /// Whether to trust the operating system's roots (default: on with the `os-roots` feature).
    pub fn os_roots(mut self, enabled: bool) -> Self {
        self.os_roots = enabled && cfg!(feature = "os-roots");
        self
    }

    /// Trusts every certificate in `pem` as a root, besides the others: how a test trusts the
    /// emulator's certificate.
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, BuildError> {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| BuildError::InvalidPem(e.to_string()))?;
            self.extra_roots.push(cert);
            found += 1;
        }
        if found == 0 {
            return Err(BuildError::NoCertificate);
        }
        Ok(self)
    }

    /// Trusts only the roots added with [`add_root_certificates_pem`](Self::add_root_certificates_pem).
    pub fn only_added_roots(self) -> Self {
        self.webpki_roots(false).os_roots(false)
    }

    /// Sets the `User-Agent` (default `c2dm-rs/<version>`).
    pub fn user_agent(mut self, user_agent: HeaderValue) -> Self {
        self.user_agent = user_agent;
        self
    }

    /// Reaches every host through the HTTP proxy `proxy` (by `CONNECT` tunnels), except those
    /// [`no_proxy`](Self::no_proxy) lists. Replaces proxies set before.
    ///
    /// ```
    /// use c2dm_hyper::{HyperTransport, Proxy};
    /// let transport = HyperTransport::builder()
    ///     .proxy(Proxy::new("http://proxy.internal:3128")?)
    ///     .no_proxy("localhost, .internal")
    ///     .build()?;
    /// # drop(transport);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn proxy(mut self, proxy: Proxy) -> Self {
        let no_proxy = std::mem::take(&mut self.proxies.no_proxy);
        self.proxies = Proxies {
            no_proxy,
            ..Proxies::all(proxy)
        };
        self
    }

    /// The hosts reached without the proxy, as `NO_PROXY` lists them: comma-separated host
    /// names (each also covering its subdomains; a leading `.` is the same), IP addresses, or
    /// `*` for every host; an entry may end in `:port`. CIDR ranges are not understood.
    pub fn no_proxy(mut self, list: &str) -> Self {
        self.proxies.no_proxy = NoProxy::parse(list);
        self
    }

    /// Takes the proxies from the environment, as curl does: `HTTPS_PROXY` for `https://`
    /// hosts, `HTTP_PROXY` for `http://` ones, `NO_PROXY` for hosts reached directly (the
    /// lower-case names too). Replaces proxies set before; nothing set is no proxy. An unusable
    /// proxy URL is an error that names the variable.
    pub fn proxy_from_env(mut self) -> Result<Self, ProxyError> {
        self.proxies = Proxies::from_env(|name| std::env::var(name).ok())?;
        Ok(self)
    }

    fn root_store(&self) -> Result<RootCertStore, BuildError> {
        let mut roots = RootCertStore::empty();
        #[cfg(feature = "webpki-roots")]
        if self.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        #[cfg(feature = "os-roots")]
        if self.os_roots {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "could not load some operating system root certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "operating system roots");
        }
        for cert in &self.extra_roots {
            roots.add(cert.clone()).map_err(BuildError::BadRoot)?;
        }
        if roots.is_empty() {
            return Err(BuildError::NoRoots);
        }
        Ok(roots)
    }

    /// Builds the transport.
    pub fn build(self) -> Result<HyperTransport, BuildError> {
        let provider = Arc::new(crypto_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(BuildError::Tls)?
            .with_root_certificates(self.root_store()?)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_nodelay(true);
        let tcp = ProxyConnector {
            http,
            proxies: self.proxies,
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let https = if self.http2 {
            https.enable_http1().enable_http2().wrap_connector(tcp)
        } else {
            https.enable_http1().wrap_connector(tcp)
        };
        let keep_alive = self
            .http2_keep_alive
            .map(|(interval, timeout)| pool::KeepAlive { interval, timeout });
        let pool = Pool::new(
            https,
            self.pool_idle_timeout,
            self.pool_max_idle_per_host,
            keep_alive,
        );
        Ok(HyperTransport {
            pool,
            request_timeout: self.request_timeout,
            max_response_bytes: self.max_response_bytes,
            user_agent: self.user_agent,
        })
    }
}

#[cfg(feature = "aws-lc-rs")]
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A [`Transport`] over a pooled hyper 1 client with rustls. Build once and share: clones share
/// the connection pool.
#[derive(Clone)]
pub struct HyperTransport {
    pool: Pool,
    request_timeout: Duration,
    max_response_bytes: usize,
    user_agent: HeaderValue,
}

impl fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperTransport")
            .field("request_timeout", &self.request_timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("pool_max_idle_per_host", &self.pool.max_idle_per_host())
            .finish_non_exhaustive()
    }
}

impl HyperTransport {
    /// A transport with the default settings.
    pub fn new() -> Result<Self, BuildError> {
        Self::builder().build()
    }

    /// Starts a transport with settings.
    pub fn builder() -> HyperTransportBuilder {
        HyperTransportBuilder::default()
    }

    /// One exchange, all of it before one deadline: a connection (idle or new), the request,
    /// the answer. A request that a reused connection refused before writing a byte goes to
    /// another connection.
    async fn exchange(&self, request: Request<Bytes>) -> Result<Response<Bytes>, TransportError> {
        let deadline = deadline_after(self.request_timeout);
        let (mut parts, body) = request.into_parts();
        let Some(key) = Key::of(&parts.uri) else {
            return Err(
                TransportError::new(TransportErrorKind::InvalidRequest, RequestSent::No)
                    .with_message(format!(
                        "{} is not an absolute http:// or https:// URL",
                        parts.uri
                    )),
            );
        };
        parts
            .headers
            .entry(USER_AGENT)
            .or_insert_with(|| self.user_agent.clone());
        let uri = parts.uri.clone();
        // In an `Option` that `send` takes it from: passed by value, the request would be
        // stored again in the future of each `async fn` it went through.
        let mut request = Some(Request::from_parts(parts, Full::new(body)));
        loop {
            let Checkout { mut conn, reused } = self
                .pool
                .checkout(&key, &uri, deadline)
                .await
                .map_err(|e| connect_error(e, self.request_timeout))?;
            if let Some(request) = &mut request {
                if conn.is_http1() {
                    to_http1(request, &uri);
                } else {
                    *request.uri_mut() = uri.clone();
                }
            }
            let sent = conn
                .send(&mut request, deadline)
                .await
                .map_err(|TimedOut| self.timed_out())?;
            let response = match sent {
                Ok(response) => response,
                Err(mut err) => match err.take_message() {
                    // Refused before a byte was written: a connection the server closed while
                    // it sat idle. Another one may take it.
                    Some(unsent) if reused => {
                        if let Some(shared) = conn.shared() {
                            self.pool.forget_shared(&key, shared.id());
                        }
                        request = Some(unsent);
                        continue;
                    }
                    Some(_) => return Err(send_error(&err.into_error(), RequestSent::No)),
                    None => return Err(send_error(&err.into_error(), RequestSent::Maybe)),
                },
            };
            let reading = pin!(self.read(response));
            let response = conn
                .drive(deadline, reading)
                .await
                .map_err(|TimedOut| self.timed_out())??;
            self.pool.checkin(&key, conn);
            return Ok(response);
        }
    }

    fn timed_out(&self) -> TransportError {
        TransportError::new(TransportErrorKind::Timeout, RequestSent::Maybe)
            .with_message(format!("no answer within {:?}", self.request_timeout))
    }

    /// Reads the whole answer, within the size cap.
    async fn read(&self, response: Response<Incoming>) -> Result<Response<Bytes>, TransportError> {
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_response_bytes as u64) {
            return Err(too_large(self.max_response_bytes));
        }
        let body = Limited::new(body, self.max_response_bytes)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    too_large(self.max_response_bytes)
                } else {
                    TransportError::new(TransportErrorKind::ConnectionLost, RequestSent::Maybe)
                        .with_message(describe(&*err))
                }
            })?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// HTTP/1.1 to an origin server: the path alone on the request line, the host in `Host`.
fn to_http1(request: &mut Request<Full<Bytes>>, uri: &Uri) {
    if !request.headers().contains_key(HOST) {
        let authority = uri.authority().map_or("", |a| a.as_str());
        let host = authority.rsplit('@').next().unwrap_or(authority);
        if let Ok(value) = HeaderValue::from_str(host) {
            request.headers_mut().insert(HOST, value);
        }
    }
    *request.uri_mut() = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
}

fn too_large(max: usize) -> TransportError {
    TransportError::new(TransportErrorKind::BodyTooLarge, RequestSent::Maybe)
        .with_message(format!("the response body is over {max} bytes"))
}

/// The next error in a chain. `io::Error::source` skips the error it wraps (rustls puts its
/// own errors there), so for those the wrapped error comes next.
fn next_cause<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    match err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        Some(inner) => Some(inner as &(dyn StdError + 'static)),
        None => err.source(),
    }
}

fn find_in_chain<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = next_cause(e);
    }
    None
}

/// `timeout` from now; a timeout too long to count to is a deadline decades away.
fn deadline_after(timeout: Duration) -> Instant {
    const DECADES: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + DECADES)
}

fn connect_error(err: ConnectError, timeout: Duration) -> TransportError {
    match err {
        ConnectError::TimedOut => TransportError::new(TransportErrorKind::Timeout, RequestSent::No)
            .with_message(format!("no connection within {timeout:?}")),
        ConnectError::Connect(err) => {
            let root: &(dyn StdError + 'static) = &*err;
            let kind = if find_in_chain::<rustls::Error>(root).is_some() {
                TransportErrorKind::Tls
            } else if find_in_chain::<std::io::Error>(root)
                .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
            {
                TransportErrorKind::Timeout
            } else {
                TransportErrorKind::Connect
            };
            TransportError::new(kind, RequestSent::No)
                .with_message(format!("connect: {}", describe(root)))
        }
        ConnectError::Handshake(err) => {
            TransportError::new(TransportErrorKind::Connect, RequestSent::No)
                .with_message(format!("HTTP/2 handshake: {}", describe(&err)))
        }
    }
}

/// An error from sending a request; `sent` says whether hyper gave the request back unwritten.
fn send_error(err: &hyper::Error, sent: RequestSent) -> TransportError {
    let kind = if err.is_timeout() {
        TransportErrorKind::Timeout
    } else if err.is_user() {
        TransportErrorKind::InvalidRequest
    } else {
        TransportErrorKind::ConnectionLost
    };
    let sent = if err.is_user() { RequestSent::No } else { sent };
    TransportError::new(kind, sent).with_message(describe(err))
}

/// The error and its causes on one line, without repeating what a cause already says.
fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = next_cause(e);
    }
    parts.join(": ")
}

#[async_trait]
impl Transport for HyperTransport {
    async fn execute(&self, request: Request<Bytes>) -> Result<Response<Bytes>, TransportError> {
        // The whole exchange runs under the request timeout: see `exchange`.
        let uri = tracing::enabled!(tracing::Level::DEBUG).then(|| request.uri().clone());
        let result = self.exchange(request).await;
        if let (Err(err), Some(uri)) = (&result, uri) {
            tracing::debug!(%uri, %err, "exchange failed");
        }
        result
    }
}
