//! The keep-alive pool behind [`HyperTransport`](crate::HyperTransport), over
//! `hyper::client::conn`.
//!
//! HTTP/1.1 carries one exchange at a time per connection, so a request takes an idle
//! connection of its host (the one used last: the others age out), or opens one, and gives it
//! back once the answer has been read to its end. While a request holds an HTTP/1.1
//! connection, the request's own task drives the connection's I/O: no task per connection, and
//! no hand-over between two tasks for each request, its answer and its body. An idle connection
//! is driven by nobody; a server that closed it meanwhile is noticed when it is next taken, and a
//! request it refused unwritten goes to another connection. When ALPN picks HTTP/2, one
//! connection per host is shared by every request and driven by a task of its own.
//!
//! Unlike hyper-util's pooled client (which does the same with more generality: proxies, any
//! executor, retry policies), it spawns no task per connection and none per request, and a
//! request's future does not carry the connector's. hyper-util's connector (DNS, TCP, connect
//! timeout) and hyper-rustls's TLS still open the connections. Why, with figures:
//! `docs/ARCHITECTURE.md` and `docs/PERFORMANCE.md`.

use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until, timeout_at};
use tower_service::Service;

use crate::proxy::ProxyConnector;

type Body = Full<Bytes>;
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// The shortest pause between two sweeps of idle connections.
const MIN_SWEEP: Duration = Duration::from_millis(10);

/// Which connections can carry a request: same scheme, same host and port.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Key {
    https: bool,
    authority: Authority,
}

impl Key {
    /// The key of an absolute `http://` or `https://` URI; `None` for anything else.
    pub(crate) fn of(uri: &Uri) -> Option<Self> {
        let https = match uri.scheme_str()? {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        Some(Self {
            https,
            authority: uri.authority()?.clone(),
        })
    }
}

/// A connection ready to carry one request.
pub(crate) enum Conn {
    Http1(Http1),
    Http2(Shared),
}

/// A handle on an HTTP/2 connection, with the number that tells it from any other the pool
/// opened (handles do not compare).
#[derive(Clone)]
pub(crate) struct Shared {
    send: http2::SendRequest<Body>,
    id: u64,
}

impl Shared {
    /// Which connection this is.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

pub(crate) use crate::drive::TimedOut;
use crate::drive::{Http1Io, Relay, drive};

/// An HTTP/1.1 connection and the future that runs its I/O, which the holder drives.
pub(crate) struct Http1 {
    send: http1::SendRequest<Body>,
    /// `None` once the connection has ended. Boxed: it is kilobytes long, and the handle
    /// moves in and out of the pool with every request.
    io: Option<Box<http1::Connection<Io, Body>>>,
    /// The deadline of the request it carries. One timer per connection, moved later for each
    /// request: tokio moves a timer to a later deadline without touching its timer wheel,
    /// where a new timer per request would be registered and removed under a lock each time.
    timer: Pin<Box<Sleep>>,
    /// How the connection wakes its holder; see [`Relay`].
    relay: Arc<Relay>,
    relay_waker: Waker,
}

impl Http1 {
    /// Splits off what [`drive`] needs, and the request handle.
    fn split(&mut self) -> (&mut http1::SendRequest<Body>, Http1Io<'_>) {
        (
            &mut self.send,
            Http1Io {
                io: &mut self.io,
                timer: &mut self.timer,
                relay: &self.relay,
                relay_waker: &self.relay_waker,
            },
        )
    }

    /// Whether it can carry a request now; drives it until it says so, ends, or `deadline`.
    async fn ready(&mut self, deadline: Instant) -> Result<bool, TimedOut> {
        let (send, mut io) = self.split();
        let ready = drive(&mut io, deadline, pin!(poll_fn(|cx| send.poll_ready(cx)))).await?;
        Ok(ready.is_ok() && self.io.is_some())
    }
}

impl Conn {
    /// Sends the request in `request` (which must hold one); on an error before anything was
    /// written, the request comes back.
    ///
    /// Taken from an `Option` rather than by value: a request passed by value down the `async`
    /// calls would be stored once more in each of their futures.
    pub(crate) async fn send(
        &mut self,
        request: &mut Option<Request<Body>>,
        deadline: Instant,
    ) -> Result<Result<Response<Incoming>, TrySendError<Request<Body>>>, TimedOut> {
        const NO_REQUEST: &str = "Conn::send is given a request";
        match self {
            Self::Http1(h1) => {
                let (send, mut io) = h1.split();
                // Queued on the first poll, within `drive`: queuing wakes the connection's
                // last poller, and there that wake stays inside the poll.
                let sending = pin!(async {
                    let request = request.take().expect(NO_REQUEST);
                    send.try_send_request(request).await
                });
                drive(&mut io, deadline, sending).await
            }
            Self::Http2(shared) => {
                let request = request.take().expect(NO_REQUEST);
                timeout_at(deadline, shared.send.try_send_request(request))
                    .await
                    .map_err(|_| TimedOut)
            }
        }
    }

    /// Runs `fut` (reading an answer's body) until `deadline`, driving the connection if this
    /// task must.
    pub(crate) async fn drive<F: Future>(
        &mut self,
        deadline: Instant,
        fut: Pin<&mut F>,
    ) -> Result<F::Output, TimedOut> {
        match self {
            Self::Http1(h1) => drive(&mut h1.split().1, deadline, fut).await,
            Self::Http2(_) => timeout_at(deadline, fut).await.map_err(|_| TimedOut),
        }
    }

    /// Whether the request goes out as HTTP/1.1 (origin-form URI and a `Host` header).
    pub(crate) fn is_http1(&self) -> bool {
        matches!(self, Self::Http1(_))
    }

    /// The shared HTTP/2 connection this is, if it is one.
    pub(crate) fn shared(&self) -> Option<&Shared> {
        match self {
            Self::Http2(shared) => Some(shared),
            Self::Http1(_) => None,
        }
    }
}

/// A connection taken from the pool, or just opened.
pub(crate) struct Checkout {
    pub(crate) conn: Conn,
    /// Whether it carried a request before: a request refused by it unwritten may try another.
    pub(crate) reused: bool,
}

/// Why no connection could be opened. Nothing of the request was written.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// DNS, TCP or TLS failed.
    Connect(Box<dyn StdError + Send + Sync>),
    /// The HTTP/2 preface exchange failed.
    Handshake(hyper::Error),
    /// The request's deadline passed first.
    TimedOut,
}

/// The pool. Clones share it.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// HTTP/2 keep-alive pings, if on.
    keep_alive: Option<KeepAlive>,
    connector: HttpsConnector<ProxyConnector>,
    /// A list, not a map: a transport talks to one or two hosts, and comparing a key or two
    /// costs less than hashing one.
    hosts: Mutex<Hosts>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    /// Whether a task sweeps out idle connections that outlived `idle_timeout`.
    sweeping: AtomicBool,
    /// Numbers the HTTP/2 connections opened.
    next_id: AtomicU64,
}

#[derive(Default)]
struct Hosts(Vec<(Key, Host)>);

impl Hosts {
    fn get_mut(&mut self, key: &Key) -> Option<&mut Host> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, h)| h)
    }

    fn entry(&mut self, key: &Key) -> &mut Host {
        match self.0.iter().position(|(k, _)| k == key) {
            Some(i) => &mut self.0[i].1,
            None => {
                self.0.push((key.clone(), Host::default()));
                &mut self.0.last_mut().expect("just pushed").1
            }
        }
    }
}

#[derive(Default)]
struct Host {
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<Idle>,
    /// The shared HTTP/2 connection, if ALPN picked HTTP/2, and when a request last took it.
    /// The pool lets go of it once it has not been taken for the idle timeout; requests under
    /// way keep it open until they end.
    shared: Option<(Shared, Instant)>,
    /// Over TLS, until a connection has told which protocol the host speaks (ALPN), one
    /// request at a time opens a connection and the others wait for it: were it HTTP/2, they
    /// all share it instead of each opening one of their own.
    learned: bool,
    first_open: Arc<tokio::sync::Mutex<()>>,
}

impl Host {
    /// Forgets the shared connection if it is connection `id`.
    fn forget_shared(&mut self, id: u64) {
        if self.shared.as_ref().is_some_and(|(s, _)| s.id == id) {
            self.shared = None;
        }
    }
}

struct Idle {
    conn: Http1,
    since: Instant,
}

/// HTTP/2 keep-alive pings: one each `interval` (idle or not), and the connection closed if
/// one is not answered within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

impl Pool {
    pub(crate) fn new(
        connector: HttpsConnector<ProxyConnector>,
        idle_timeout: Duration,
        max_idle_per_host: usize,
        keep_alive: Option<KeepAlive>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                keep_alive,
                hosts: Mutex::new(Hosts::default()),
                idle_timeout,
                max_idle_per_host,
                sweeping: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The most idle HTTP/1.1 connections kept per host.
    pub(crate) fn max_idle_per_host(&self) -> usize {
        self.inner.max_idle_per_host
    }

    /// A connection for `key`: the shared HTTP/2 one, the most recently used idle HTTP/1.1 one
    /// that is still open, or a new one to `uri`.
    pub(crate) async fn checkout(
        &self,
        key: &Key,
        uri: &Uri,
        deadline: Instant,
    ) -> Result<Checkout, ConnectError> {
        while let Some(conn) = self.take_idle(key) {
            match conn {
                Conn::Http2(_) => return Ok(Checkout { conn, reused: true }),
                Conn::Http1(mut h1) => {
                    // Ready at once unless the server closed it meanwhile: then try the next.
                    if h1
                        .ready(deadline)
                        .await
                        .map_err(|TimedOut| ConnectError::TimedOut)?
                    {
                        return Ok(Checkout {
                            conn: Conn::Http1(h1),
                            reused: true,
                        });
                    }
                }
            }
        }
        // Boxed: opening a connection is rare, and its future is large enough that carrying
        // it inline would make every request's future kilobytes long.
        timeout_at(deadline, Box::pin(self.open(key, uri, deadline)))
            .await
            .map_err(|_| ConnectError::TimedOut)?
    }

    /// Opens a connection for `key`; while nobody knows whether the host speaks HTTP/2, one
    /// request at a time (see [`Host::first_open`]), and a request that waited takes the shared
    /// connection if the first one turned out to be HTTP/2.
    async fn open(
        &self,
        key: &Key,
        uri: &Uri,
        deadline: Instant,
    ) -> Result<Checkout, ConnectError> {
        let gate = {
            let mut hosts = self.inner.lock();
            let host = hosts.entry(key);
            (key.https && !host.learned).then(|| Arc::clone(&host.first_open))
        };
        let Some(gate) = gate else {
            return self.connect(key, uri, deadline).await;
        };
        let first = gate.lock().await;
        // Someone may have opened the first connection while this request waited: HTTP/2 is
        // shared; HTTP/1.1 means a connection of its own, opened without the gate.
        let learned = {
            let mut hosts = self.inner.lock();
            let host = hosts.entry(key);
            match &mut host.shared {
                Some((shared, since)) if !shared.send.is_closed() => {
                    *since = Instant::now();
                    return Ok(Checkout {
                        conn: Conn::Http2(shared.clone()),
                        reused: true,
                    });
                }
                _ => host.learned,
            }
        };
        if learned {
            drop(first);
            return self.connect(key, uri, deadline).await;
        }
        let opened = self.connect(key, uri, deadline).await;
        if opened.is_ok() {
            self.inner.lock().entry(key).learned = true;
        }
        opened
    }

    fn take_idle(&self, key: &Key) -> Option<Conn> {
        let mut hosts = self.inner.lock();
        let host = hosts.get_mut(key)?;
        let now = Instant::now();
        if let Some((shared, since)) = &mut host.shared {
            if !shared.send.is_closed() && now.duration_since(*since) < self.inner.idle_timeout {
                *since = now;
                return Some(Conn::Http2(shared.clone()));
            }
            host.shared = None;
        }
        while let Some(idle) = host.idle.pop() {
            if now.duration_since(idle.since) >= self.inner.idle_timeout {
                // The most recent one is too old, so all of them are.
                host.idle.clear();
                return None;
            }
            if !idle.conn.send.is_closed() {
                return Some(Conn::Http1(idle.conn));
            }
        }
        None
    }

    async fn connect(
        &self,
        key: &Key,
        uri: &Uri,
        deadline: Instant,
    ) -> Result<Checkout, ConnectError> {
        let mut connector = self.inner.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ConnectError::Connect)?;
        let io = connector
            .call(uri.clone())
            .await
            .map_err(ConnectError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            if let Some(keep_alive) = self.inner.keep_alive {
                // A ping while the connection is open, answered or the connection closes: one
                // that died silently (a NAT that forgot it, a peer gone) is found and replaced
                // before a send waits on it for its whole timeout.
                builder
                    .keep_alive_interval(keep_alive.interval)
                    .keep_alive_timeout(keep_alive.timeout)
                    .keep_alive_while_idle(true);
            }
            let (send, connection) = builder
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(%err, "HTTP/2 connection closed with an error");
                }
            });
            let shared = Shared {
                send,
                id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            };
            if !self.inner.idle_timeout.is_zero() {
                let mut hosts = self.inner.lock();
                let host = hosts.entry(key);
                if host.shared.as_ref().is_none_or(|(s, _)| s.send.is_closed()) {
                    host.shared = Some((shared.clone(), Instant::now()));
                }
            }
            self.sweep_soon();
            Ok(Checkout {
                conn: Conn::Http2(shared),
                reused: false,
            })
        } else {
            let (send, io) = http1::handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            Ok(Checkout {
                conn: Conn::Http1({
                    let (relay, relay_waker) = Relay::new();
                    Http1 {
                        send,
                        io: Some(Box::new(io)),
                        timer: Box::pin(sleep_until(deadline)),
                        relay,
                        relay_waker,
                    }
                }),
                reused: false,
            })
        }
    }

    /// Gives back a connection whose last answer was read to its end. HTTP/2 connections stay
    /// shared and need no giving back.
    pub(crate) fn checkin(&self, key: &Key, conn: Conn) {
        let Conn::Http1(conn) = conn else {
            return;
        };
        if conn.io.is_none() || conn.send.is_closed() || self.inner.idle_timeout.is_zero() {
            return;
        }
        {
            let mut hosts = self.inner.lock();
            let host = hosts.entry(key);
            if host.idle.len() >= self.inner.max_idle_per_host {
                return;
            }
            host.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        self.sweep_soon();
    }

    /// Makes sure a sweeper runs.
    fn sweep_soon(&self) {
        if !self.inner.sweeping.load(Ordering::Relaxed) {
            self.start_sweeping();
        }
    }

    /// Forgets the shared HTTP/2 connection `id` of `key`, after it refused a request; a
    /// connection that replaced it meanwhile stays.
    pub(crate) fn forget_shared(&self, key: &Key, id: u64) {
        if let Some(host) = self.inner.lock().get_mut(key) {
            host.forget_shared(id);
        }
    }

    /// Starts a task that closes idle connections once they outlive the idle timeout. It holds
    /// the pool weakly, and ends when the pool is dropped or holds nothing; the next connection
    /// kept starts another.
    fn start_sweeping(&self) {
        if self.inner.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let period = (self.inner.idle_timeout / 2).max(MIN_SWEEP);
        // Counted from now, not from the task's first poll. A timeout too long to count to
        // never comes: nothing to sweep.
        let Some(mut next) = Instant::now().checked_add(period) else {
            return;
        };
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut flag = SweepingFlag(Some(pool.clone()));
            loop {
                tokio::time::sleep_until(next).await;
                let Some(inner) = pool.upgrade() else {
                    return;
                };
                if !inner.sweep() {
                    // `sweep` lowered the flag itself, under the lock.
                    flag.0 = None;
                    return;
                }
                next = match next.checked_add(period) {
                    Some(next) => next,
                    None => return,
                };
            }
        });
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Hosts> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // push, pop or assignment), so a poisoned lock is still usable.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops idle connections that are too old or closed, and hosts with nothing left. Returns
    /// whether connections remain; if none do, lowers [`Inner::sweeping`] before letting
    /// go of the lock, so a connection given back meanwhile starts a new sweeper.
    fn sweep(&self) -> bool {
        let now = Instant::now();
        let mut hosts = self.lock();
        hosts.0.retain_mut(|(_, host)| {
            host.idle.retain(|idle| {
                now.duration_since(idle.since) < self.idle_timeout && !idle.conn.send.is_closed()
            });
            if host.shared.as_ref().is_some_and(|(s, since)| {
                s.send.is_closed() || now.duration_since(*since) >= self.idle_timeout
            }) {
                host.shared = None;
            }
            !host.idle.is_empty() || host.shared.is_some()
        });
        let remain = !hosts.0.is_empty();
        if !remain {
            self.sweeping.store(false, Ordering::Release);
        }
        remain
    }
}

/// Clears [`Inner::sweeping`] when the sweeping task ends early (its runtime may shut down
/// under it), so that the next give-back starts another.
struct SweepingFlag(Option<Weak<Inner>>);

impl Drop for SweepingFlag {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take().and_then(|pool| pool.upgrade()) {
            inner.sweeping.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_need_a_known_scheme_and_a_host() {
        let key = |s: &str| Key::of(&s.parse().unwrap());
        assert!(key("https://android.apis.google.com/c2dm/send").is_some());
        assert!(key("http://127.0.0.1:8080/c2dm/send").is_some());
        assert!(key("/c2dm/send").is_none());
        assert!(key("ftp://example.com/").is_none());
        assert!(
            key("https://Example.com/a") == key("https://example.com/b"),
            "hosts compare without case"
        );
        assert!(key("https://example.com/") != key("http://example.com/"));
        assert!(key("https://example.com:8443/") != key("https://example.com/"));
    }

    /// A handle on an HTTP/2 connection to an in-memory server.
    async fn h2_handle(id: u64) -> Shared {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                TokioIo::new(server),
                hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Body::default()))
                }),
            ),
        );
        let (send, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(connection);
        Shared { send, id }
    }

    /// A request refused by the old shared connection forgets that one, not the fresh one that
    /// replaced it meanwhile. Before, it forgot whatever was shared.
    #[tokio::test]
    async fn forgetting_a_refused_connection_keeps_its_replacement() {
        let mut host = Host {
            shared: Some((h2_handle(2).await, Instant::now())),
            ..Host::default()
        };
        host.forget_shared(1);
        assert_eq!(host.shared.as_ref().map(|(s, _)| s.id()), Some(2));
        host.forget_shared(2);
        assert!(host.shared.is_none());
    }
}
