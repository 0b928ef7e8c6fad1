//! The HTTP listener: hyper's HTTP/1 on each accepted connection, within bounds that keep the
//! server answering when peers misbehave.
//!
//! - A request head must arrive whole within [`HttpLimits::header_timeout`] of its first byte.
//! - A connection with no request under way is closed after [`HttpLimits::idle_timeout`].
//! - At most [`HttpLimits::max_connections`] are open at once. A connection accepted beyond
//!   that closes the connection that has waited longest without a request under way (a socket
//!   that sent half a head and stopped, an idle keep-alive); if every one has a request under
//!   way, the new one is closed instead. Running out of file descriptors does the same, so the
//!   listener never spins or stops.
//!
//! A stop (the `shutdown` future of [`serve_http`]) stops accepting, lets each request under
//! way finish and closes each idle connection; whatever is still open after
//! [`HttpLimits::shutdown_grace`] is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::Service;

/// Bounds on the listener's connections (see the [module](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The longest a request head may take to arrive, from its first byte (default 10 s).
    pub header_timeout: Duration,
    /// The longest a connection may wait for its next request (default 75 s: longer than the
    /// idle timeouts of common load balancers, so that they close first).
    pub idle_timeout: Duration,
    /// The most connections open at once (default 512: well below the common limit of 1,024
    /// open files, with room for the database's).
    pub max_connections: usize,
    /// How long a stop waits for the requests under way (default 10 s).
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// `NONE` in a connection's millisecond fields: not set.
const NONE: u64 = u64::MAX;

/// One open connection, as its task and the listener see it.
struct Conn {
    /// Requests dispatched and not yet answered in full (their bodies written).
    in_flight: AtomicUsize,
    /// When it last had no request under way (accepted, or its last answer written), in
    /// milliseconds since [`Connections::epoch`].
    idle_since: AtomicU64,
    /// When the first byte of a head arrived while it had no request under way; [`NONE`]
    /// until one does.
    head_since: AtomicU64,
    /// Told to close by the listener (to make room); its task closes it.
    close: Notify,
    /// Its state changed: its task recomputes its deadline.
    changed: Notify,
}

impl Conn {
    /// When it is to be closed if nothing changes; `None` while a request is under way.
    fn deadline(&self, epoch: Instant, limits: &HttpLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |millis: u64| epoch + Duration::from_millis(millis);
        Some(match self.head_since.load(Ordering::Acquire) {
            NONE => at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout,
            head => at(head) + limits.header_timeout,
        })
    }

    /// Since when it has waited without a request under way; `None` while one is.
    fn waiting_since(&self) -> Option<u64> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.head_since.load(Ordering::Acquire) {
            NONE => self.idle_since.load(Ordering::Acquire),
            head => head,
        })
    }
}

/// The open connections.
struct Connections {
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Connections {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn len(&self) -> usize {
        self.open.lock().map_or(0, |open| open.len())
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now()),
            head_since: AtomicU64::new(NONE),
            close: Notify::new(),
            changed: Notify::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, Arc::clone(&conn));
        }
        (id, conn)
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id);
        }
    }

    /// Closes the connection that has waited longest without a request under way; false if
    /// every one has a request under way.
    fn evict_idle(&self) -> bool {
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        let oldest = open
            .iter()
            .filter_map(|(id, conn)| conn.waiting_since().map(|since| (since, *id)))
            .min();
        match oldest.and_then(|(_, id)| open.remove(&id)) {
            Some(conn) => {
                conn.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's socket, noting the first byte of each request head.
struct Tracked {
    stream: TcpStream,
    conn: Arc<Conn>,
    connections: Arc<Connections>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.conn.in_flight.load(Ordering::Acquire) == 0
            && self.conn.head_since.load(Ordering::Acquire) == NONE
        {
            let now = self.connections.now();
            self.conn.head_since.store(now, Ordering::Release);
            self.conn.changed.notify_one();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Held from a request's dispatch until its answer is written (its body dropped): while any
/// is held, the connection is not idle.
struct Answering {
    conn: Arc<Conn>,
    connections: Arc<Connections>,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since
                .store(self.connections.now(), Ordering::Release);
        }
        self.conn.changed.notify_one();
    }
}

/// Whether an accept failed for want of file descriptors or memory (Linux's `EMFILE`,
/// `ENFILE`, `ENOBUFS`, `ENOMEM`): the process must make room, not give up.
fn out_of_resources(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes (see the
/// [module](self)).
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let connections = Arc::new(Connections {
        epoch: Instant::now(),
        next: AtomicU64::new(0),
        open: Mutex::new(HashMap::new()),
    });
    let (stopping, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let full = AtomicBool::new(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Ended connections' tasks, reaped as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) if out_of_resources(&err) => {
                tracing::warn!(%err, "out of file descriptors: closing an idle connection");
                if !connections.evict_idle() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
            Err(err) => {
                // The peer gave up before it was accepted, and the like.
                tracing::debug!(%err, "accept failed");
                continue;
            }
        };
        if connections.len() >= limits.max_connections {
            if !full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = limits.max_connections,
                    "open connections at their limit: the longest idle are closed for new ones"
                );
            }
            if !connections.evict_idle() {
                metrics::counter!("c2dm_http_connections_refused_total").increment(1);
                drop(stream);
                continue;
            }
        } else {
            full.store(false, Ordering::Relaxed);
        }
        let _ = stream.set_nodelay(true);
        tasks.spawn(connection(
            stream,
            router.clone(),
            limits,
            Arc::clone(&connections),
            stop.clone(),
        ));
    }
    drop(listener);
    let _ = stopping.send(true);
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            open = tasks.len(),
            "connections still open after the shutdown grace: closed"
        );
        tasks.shutdown().await;
    }
}

/// One connection, until it ends, is closed for room, runs past its deadline, or the stop's
/// graceful close ends it.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: HttpLimits,
    connections: Arc<Connections>,
    mut stop: watch::Receiver<bool>,
) {
    let (id, conn) = connections.add();
    let service = {
        let (conn, connections) = (Arc::clone(&conn), Arc::clone(&connections));
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            conn.in_flight.fetch_add(1, Ordering::AcqRel);
            conn.head_since.store(NONE, Ordering::Release);
            let answering = Answering {
                conn: Arc::clone(&conn),
                connections: Arc::clone(&connections),
            };
            let mut router = router.clone();
            async move {
                let response = match router.call(request.map(Body::new)).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                // The answer counts as under way until its body is written and dropped.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _held = &answering;
                        frame
                    }))
                }))
            }
        })
    };
    let io = TokioIo::new(Tracked {
        stream,
        conn: Arc::clone(&conn),
        connections: Arc::clone(&connections),
    });
    let served = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(served);
    let mut closing = false;
    loop {
        let deadline = conn.deadline(connections.epoch, &limits);
        tokio::select! {
            ended = served.as_mut() => {
                if let Err(err) = ended {
                    tracing::debug!(%err, "connection ended");
                }
                break;
            }
            () = conn.close.notified() => {
                tracing::debug!("connection closed to make room for another");
                break;
            }
            () = conn.changed.notified() => {}
            Ok(_) = stop.wait_for(|stopping| *stopping), if !closing => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if conn.deadline(connections.epoch, &limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!("connection closed: no request, or a head too slow");
                    break;
                }
            }
        }
    }
    connections.remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn started(limits: HttpLimits) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "ok" }));
        let server = tokio::spawn(serve_http(listener, router, limits, std::future::pending()));
        (address, server)
    }

    /// Reads until the peer closes; true if it did (false if it answered instead).
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 256];
        matches!(stream.read(&mut buf).await, Ok(0) | Err(_))
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_stalls_and_an_idle_connection_are_closed_at_their_timeouts() {
        let limits = HttpLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            ..HttpLimits::default()
        };
        let (address, _server) = started(limits).await;
        let mut half = TcpStream::connect(address).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(address).await.unwrap();
        let started = Instant::now();
        assert!(closed(&mut half).await);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
        assert!(closed(&mut idle).await);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(75) && took < Duration::from_secs(76),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_is_closed_when_idle_not_while_answered() {
        let (address, _server) = started(HttpLimits::default()).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = vec![0u8; 1024];
            let n = stream.read(&mut answer).await.unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{n}");
        }
        let started = Instant::now();
        assert!(closed(&mut stream).await);
        assert_eq!(started.elapsed().as_secs(), 75);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_limit_the_longest_idle_connection_makes_room() {
        let limits = HttpLimits {
            max_connections: 4,
            ..HttpLimits::default()
        };
        let (address, _server) = started(limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(address).await.unwrap());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut fresh = TcpStream::connect(address).await.unwrap();
        fresh
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        fresh.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert!(closed(&mut idle[0]).await, "the oldest idle was closed");
    }
}
