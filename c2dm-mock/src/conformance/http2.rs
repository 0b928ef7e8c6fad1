//! The kit's HTTP/2 cases, as FCM HTTP v1 needs a transport to behave: many streams on one
//! connection, and a connection that died without a word found by the keep-alive ping and
//! replaced. The server is TLS offering only `h2` by ALPN: a transport that cannot speak
//! HTTP/2 fails these cases at its handshake.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use c2dm_core::Transport;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::server::Certificate;
use super::{bounded, expect_answer};

/// A connection that, once `frozen`, neither reads nor writes again, and never says so: the
/// peer of a connection that died silently (a NAT that forgot it, a host that went away).
struct Freezable<T> {
    io: T,
    frozen: Arc<AtomicBool>,
}

impl<T> Freezable<T> {
    /// `Pending` forever once frozen (nothing will wake it: the connection is dead), else
    /// what `op` says of the connection.
    fn unless_frozen<R>(self: Pin<&mut Self>, op: impl FnOnce(Pin<&mut T>) -> Poll<R>) -> Poll<R>
    where
        T: Unpin,
    {
        let this = self.get_mut();
        if this.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        op(Pin::new(&mut this.io))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Freezable<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.unless_frozen(|io| io.poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Freezable<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.unless_frozen(|io| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.unless_frozen(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.unless_frozen(|io| io.poll_shutdown(cx))
    }
}

/// An HTTP/2 server over TLS (ALPN `h2` only) that answers each request with its own body.
struct H2Server {
    port: u16,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// One switch per connection accepted: set, the connection goes silent.
    switches: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    /// The HTTP version of each request served.
    versions: Arc<Mutex<Vec<http::Version>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Server {
    async fn start(cert: &Certificate) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("the kit could not listen on loopback: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let acceptor = TlsAcceptor::from(cert.config_for(&[b"h2"]));
        let connections = Arc::new(AtomicUsize::new(0));
        let switches: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let versions: Arc<Mutex<Vec<http::Version>>> = Arc::default();
        let (count, all, seen) = (
            Arc::clone(&connections),
            Arc::clone(&switches),
            Arc::clone(&versions),
        );
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let frozen = Arc::new(AtomicBool::new(false));
                all.lock().expect("lock").push(Arc::clone(&frozen));
                let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
                served.spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let seen = Arc::clone(&seen);
                            async move {
                                seen.lock().expect("lock").push(request.version());
                                let body = match request.into_body().collect().await {
                                    Ok(body) => body.to_bytes(),
                                    Err(_) => Bytes::new(),
                                };
                                Ok::<_, Infallible>(http::Response::new(Full::new(body)))
                            }
                        });
                    let io = TokioIo::new(Freezable { io: tls, frozen });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(Self {
            port,
            connections,
            switches,
            versions,
            task,
        })
    }

    fn url(&self) -> String {
        format!(
            "https://localhost:{}/v1/projects/kit/messages:send",
            self.port
        )
    }

    /// Every connection open so far goes silent.
    fn freeze(&self) {
        for frozen in self.switches.lock().expect("lock").iter() {
            frozen.store(true, Ordering::SeqCst);
        }
    }
}

/// One exchange, checked to come back with its own body.
async fn echoed<T: Transport>(transport: &T, url: &str, i: usize) -> Result<(), String> {
    let body = format!("registration_id=device-{i}");
    let request = http::Request::post(url)
        .body(Bytes::from(body.clone()))
        .expect("a valid request");
    let response = expect_answer(transport.execute(request).await)?;
    if response.body().as_ref() != body.as_bytes() {
        return Err(format!(
            "exchange {i} got the answer {:?}, meant for another",
            String::from_utf8_lossy(response.body())
        ));
    }
    Ok(())
}

/// A server, its URL, and one exchange with it: the transport's connection is open.
async fn warmed_up<T: Transport>(
    transport: &T,
    cert: &Certificate,
) -> Result<(H2Server, String), String> {
    let server = H2Server::start(cert).await?;
    let url = server.url();
    bounded(echoed(transport, &url, 0)).await??;
    Ok((server, url))
}

/// One exchange, then 64 at once: all over HTTP/2, as streams of the one connection.
pub(super) async fn http2_streams_share_a_connection<T: Transport>(
    transport: &T,
    cert: &Certificate,
) -> Result<(), String> {
    let (server, url) = warmed_up(transport, cert).await?;
    let exchanges = (1..=64).map(|i| echoed(transport, &url, i));
    for result in bounded(futures::future::join_all(exchanges)).await? {
        result?;
    }
    let versions = server.versions.lock().expect("lock").clone();
    if let Some(other) = versions.iter().find(|v| **v != http::Version::HTTP_2) {
        return Err(format!("a request came over {other:?}, not HTTP/2"));
    }
    match server.connections.load(Ordering::SeqCst) {
        1 => Ok(()),
        n => Err(format!(
            "65 exchanges over HTTP/2 opened {n} connections instead of 1: its streams were not used"
        )),
    }
}

/// How many sends after the silent connection's may still fail: one the transport had
/// already put on the dead connection when its ping's timeout came. A transport that never
/// finds the dead connection fails every one.
const SENDS_AFTER_SILENCE: usize = 3;

/// One exchange; then the connection goes silent, and a send on it fails by the transport's
/// ping (or its request timeout); a send after that one is answered, over a new connection.
pub(super) async fn http2_silent_connection_replaced<T: Transport>(
    transport: &T,
    cert: &Certificate,
) -> Result<(), String> {
    let (server, url) = warmed_up(transport, cert).await?;
    server.freeze();
    // On the dead connection: no answer can come, whatever the transport says of it.
    if bounded(echoed(transport, &url, 1)).await?.is_ok() {
        return Err("an exchange on a silent connection was answered".into());
    }
    let mut last = String::new();
    for i in 0..SENDS_AFTER_SILENCE {
        match bounded(echoed(transport, &url, 2 + i)).await? {
            Ok(()) => {
                return match server.connections.load(Ordering::SeqCst) {
                    2 => Ok(()),
                    n => Err(format!("{n} connections instead of 2")),
                };
            }
            Err(why) => last = why,
        }
    }
    Err(format!(
        "{SENDS_AFTER_SILENCE} sends after a connection went silent all failed, the last with \
         \"{last}\": the transport kept the dead connection (no keep-alive ping?)"
    ))
}
