//! HyperTransport against a local test server on loopback, plain and TLS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use c2dm_core::{RequestSent, Transport, TransportErrorKind};
use c2dm_hyper::{BuildError, HyperTransport};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Answers `id=<n>` and echoes request details in headers.
    Echo,
    /// Accepts the connection and never answers.
    Silent,
    /// Answers with a body of this many bytes.
    Big(usize, bool),
    /// Answers one request as if keeping the connection open, then closes it: a server that
    /// drops idle keep-alive connections (plain HTTP only).
    Hangup,
    /// Accepts connections and reads whatever comes, answering nothing, not even a TLS hello.
    Mute,
    /// Answers the first request it gets, then none (on the same or any connection).
    AnswerOnce,
    /// Holds every answer until this many requests are under way at once, then answers all.
    Gather(usize),
}

/// Wakes the requests a [`Behaviour::Gather`] server holds (one such test at a time).
static GATHERED: Notify = Notify::const_new();

struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections the client has closed, or that ended otherwise.
    closed: Arc<AtomicUsize>,
    closing: Arc<Notify>,
    cert_pem: Option<String>,
}

impl TestServer {
    async fn start(tls: bool, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (acceptor, cert_pem) = if tls {
            let key = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            let cert_der = key.cert.der().clone();
            let key_der =
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
            let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der], key_der)
            .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            (
                Some(TlsAcceptor::from(Arc::new(config))),
                Some(key.cert.pem()),
            )
        } else {
            (None, None)
        };
        let counter = Arc::clone(&accepted);
        let closed = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(Notify::new());
        let (closed_counter, closing_signal) = (Arc::clone(&closed), Arc::clone(&closing));
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (closed_counter, closing_signal) =
                    (Arc::clone(&closed_counter), Arc::clone(&closing_signal));
                let served = Arc::clone(&served);
                tokio::spawn(async move {
                    let _closed = ClosedGuard(closed_counter, closing_signal);
                    match behaviour {
                        Behaviour::Hangup => return answer_once_and_hang_up(stream).await,
                        Behaviour::Mute => return read_forever(stream).await,
                        _ => {}
                    }
                    let served = Arc::clone(&served);
                    let service =
                        service_fn(move |req| handle(req, behaviour, Arc::clone(&served)));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            closed,
            closing,
            cert_pem,
        }
    }

    /// Waits until `n` connections have closed. Not a sleep: it returns as soon as they have,
    /// and gives up (failing the test) after a generous bound.
    async fn wait_closed(&self, n: usize) {
        let wait = async {
            while self.closed.load(Ordering::SeqCst) < n {
                self.closing.notified().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("connections closed");
    }

    fn url(&self) -> String {
        let scheme = if self.cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://localhost:{}/c2dm/send", self.addr.port())
    }

    fn transport(&self) -> HyperTransport {
        let mut builder = HyperTransport::builder().only_added_roots();
        if let Some(pem) = &self.cert_pem {
            builder = builder.add_root_certificates_pem(pem.as_bytes()).unwrap();
        } else {
            builder = builder.webpki_roots(true);
        }
        builder.build().unwrap()
    }
}

struct ClosedGuard(Arc<AtomicUsize>, Arc<Notify>);

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.notify_one();
    }
}

/// Reads one request (head and a `Content-Length` body), answers it without `Connection:
/// close`, and closes the connection.
async fn answer_once_and_hang_up(mut stream: tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                break;
            }
        }
    }
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nid=0:1")
        .await;
}

async fn read_forever(mut stream: tokio::net::TcpStream) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            return;
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    behaviour: Behaviour,
    served: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let first = served.fetch_add(1, Ordering::SeqCst) == 0;
    let version = format!("{:?}", req.version());
    let content_type = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let agent = req
        .headers()
        .get("user-agent")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    match behaviour {
        Behaviour::Echo => Ok(Response::builder()
            .header(
                "x-request-body",
                String::from_utf8_lossy(&body).into_owned(),
            )
            .header("x-content-type", content_type)
            .header("x-user-agent", agent)
            .header("x-version", version)
            .body(Full::new(Bytes::from_static(b"id=0:1")))
            .unwrap()),
        Behaviour::Silent => std::future::pending().await,
        Behaviour::AnswerOnce if first => {
            Ok(Response::new(Full::new(Bytes::from_static(b"id=0:1"))))
        }
        Behaviour::AnswerOnce => std::future::pending().await,
        Behaviour::Gather(n) => {
            loop {
                let notified = GATHERED.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if served.load(Ordering::SeqCst) >= n {
                    GATHERED.notify_waiters();
                    break;
                }
                notified.await;
            }
            Ok(Response::new(Full::new(Bytes::from_static(b"id=0:1"))))
        }
        Behaviour::Hangup | Behaviour::Mute => unreachable!("answered without hyper"),
        Behaviour::Big(n, declared) => {
            let body = Bytes::from(vec![b'x'; n]);
            if declared {
                Ok(Response::new(Full::new(body)))
            } else {
                // No Content-Length: stream it, so only the limit on reading catches it.
                let mut resp = Response::new(Full::new(body));
                resp.headers_mut()
                    .insert("transfer-encoding", "chunked".parse().unwrap());
                Ok(resp)
            }
        }
    }
}

fn form_post(url: &str) -> Request<Bytes> {
    Request::post(url)
        .header(
            "content-type",
            "application/x-www-form-urlencoded;charset=UTF-8",
        )
        .body(Bytes::from_static(
            b"registration_id=r&collapse_key=k&data.m=%C3%A9",
        ))
        .unwrap()
}

#[tokio::test]
async fn form_post_round_trip_over_tls() {
    let server = TestServer::start(true, Behaviour::Echo).await;
    let transport = server.transport();
    let resp = transport.execute(form_post(&server.url())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body().as_ref(), b"id=0:1");
    assert_eq!(
        resp.headers()["x-request-body"],
        "registration_id=r&collapse_key=k&data.m=%C3%A9"
    );
    assert_eq!(
        resp.headers()["x-content-type"],
        "application/x-www-form-urlencoded;charset=UTF-8"
    );
    assert_eq!(resp.headers()["x-user-agent"], c2dm_hyper::USER_AGENT_VALUE);
    assert_eq!(resp.headers()["x-version"], "HTTP/1.1");
}

#[tokio::test]
async fn plain_http_works() {
    let server = TestServer::start(false, Behaviour::Echo).await;
    let resp = server
        .transport()
        .execute(form_post(&server.url()))
        .await
        .unwrap();
    assert_eq!(resp.body().as_ref(), b"id=0:1");
}

#[tokio::test]
async fn http2_by_alpn_when_asked() {
    let server = TestServer::start(true, Behaviour::Echo).await;
    let transport = HyperTransport::builder()
        .only_added_roots()
        .add_root_certificates_pem(server.cert_pem.as_ref().unwrap().as_bytes())
        .unwrap()
        .http2(true)
        .build()
        .unwrap();
    let resp = transport.execute(form_post(&server.url())).await.unwrap();
    assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
    // Once it is open, every request shares the one HTTP/2 connection, concurrent ones too.
    let concurrent: Vec<_> = (0..16)
        .map(|_| {
            let (transport, url) = (transport.clone(), server.url());
            tokio::spawn(async move { transport.execute(form_post(&url)).await })
        })
        .collect();
    for task in concurrent {
        let resp = task.await.unwrap().unwrap();
        assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hundred_sequential_requests_reuse_one_connection() {
    for tls in [true, false] {
        let server = TestServer::start(tls, Behaviour::Echo).await;
        let transport = server.transport();
        for _ in 0..100 {
            let resp = transport.execute(form_post(&server.url())).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1, "tls: {tls}");
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    // HTTP/1.1 over plain TCP, and the shared connection of HTTP/2 over TLS.
    for http2 in [false, true] {
        let server = TestServer::start(http2, Behaviour::Echo).await;
        let mut builder = HyperTransport::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .http2(http2);
        if let Some(pem) = &server.cert_pem {
            builder = builder.add_root_certificates_pem(pem.as_bytes()).unwrap();
        }
        let transport = builder.build().unwrap();
        let resp = transport.execute(form_post(&server.url())).await.unwrap();
        let version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
        assert_eq!(resp.headers()["x-version"], version);
        assert_eq!(server.closed.load(Ordering::SeqCst), 0, "kept for reuse");
        // Thirty idle seconds pass at once; the pool's sweeper closes the connection.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(31)).await;
        tokio::time::resume();
        server.wait_closed(1).await;
        transport.execute(form_post(&server.url())).await.unwrap();
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2, "{version}");
    }
}

#[tokio::test]
async fn no_idle_connections_kept_when_the_limit_is_zero() {
    let server = TestServer::start(false, Behaviour::Echo).await;
    let transport = HyperTransport::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..3 {
        transport.execute(form_post(&server.url())).await.unwrap();
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 3);
    server.wait_closed(3).await;
}

#[tokio::test]
async fn a_connection_the_server_dropped_is_replaced() {
    let server = TestServer::start(false, Behaviour::Hangup).await;
    let transport = server.transport();
    for i in 1..=20 {
        let resp = transport.execute(form_post(&server.url())).await.unwrap();
        assert_eq!(resp.body().as_ref(), b"id=0:1", "request {i}");
        // Make sure the hang-up has happened before the next request takes the connection.
        server.wait_closed(i).await;
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn a_url_that_is_not_http_is_refused_unsent() {
    let transport = HyperTransport::new().unwrap();
    for url in ["/c2dm/send", "ftp://example.com/c2dm/send"] {
        let err = transport.execute(form_post(url)).await.unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::InvalidRequest, "{url}");
        assert_eq!(err.request_sent(), RequestSent::No, "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_requests() {
    let server = TestServer::start(true, Behaviour::Echo).await;
    let transport = server.transport();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let transport = transport.clone();
            let url = server.url();
            tokio::spawn(async move { transport.execute(form_post(&url)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let opened = server.accepted.load(Ordering::SeqCst);
    assert!((1..=64).contains(&opened), "{opened}");
    // A second wave finds them all idle and opens none.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let transport = transport.clone();
            let url = server.url();
            tokio::spawn(async move { transport.execute(form_post(&url)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        opened,
        "kept alive and reused"
    );
}

/// Idle connections per host are bounded by default: those beyond the bound are closed when
/// their request ends. Before, the default was no bound at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_per_host_are_bounded_by_default() {
    let server = TestServer::start(false, Behaviour::Gather(200)).await;
    let transport = server.transport();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let transport = transport.clone();
            let url = server.url();
            tokio::spawn(async move { transport.execute(form_post(&url)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let opened = server.accepted.load(Ordering::SeqCst);
    assert!(
        opened > c2dm_hyper::DEFAULT_MAX_IDLE_PER_HOST,
        "{opened} opened"
    );
    server
        .wait_closed(opened - c2dm_hyper::DEFAULT_MAX_IDLE_PER_HOST)
        .await;
}

/// Simultaneous first requests to an HTTP/2 host share one connection: before, each opened
/// its own while nobody knew the host spoke HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_requests_over_http2_open_one_connection() {
    let server = TestServer::start(true, Behaviour::Echo).await;
    let transport = HyperTransport::builder()
        .only_added_roots()
        .add_root_certificates_pem(server.cert_pem.as_ref().unwrap().as_bytes())
        .unwrap()
        .http2(true)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (transport, url) = (transport.clone(), server.url());
            tokio::spawn(async move { transport.execute(form_post(&url)).await })
        })
        .collect();
    for task in tasks {
        let resp = task.await.unwrap().unwrap();
        assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_untrusted_certificate_fails_clearly_and_sends_nothing() {
    let server = TestServer::start(true, Behaviour::Echo).await;
    // Mozilla's roots only: the test server's self-signed certificate is not among them.
    let transport = HyperTransport::new().unwrap();
    let err = transport
        .execute(form_post(&server.url()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Tls);
    assert_eq!(err.request_sent(), RequestSent::No);
    let text = err.to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(
        text.starts_with("TLS handshake failed (not sent)"),
        "{text}"
    );
}

/// A transport with a request timeout short enough for a test to wait out.
fn impatient() -> HyperTransport {
    HyperTransport::builder()
        .request_timeout(Duration::from_millis(200))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_silent_server_hits_the_request_timeout() {
    let server = TestServer::start(false, Behaviour::Silent).await;
    let transport = impatient();
    let err = transport
        .execute(form_post(&server.url()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Timeout);
    assert_eq!(err.request_sent(), RequestSent::Maybe);
    // Ended by the request timeout, not by anything else.
    assert!(err.to_string().contains("no answer within 200ms"), "{err}");
}

#[tokio::test]
async fn the_request_timeout_holds_on_a_reused_connection() {
    let server = TestServer::start(false, Behaviour::AnswerOnce).await;
    let transport = impatient();
    transport.execute(form_post(&server.url())).await.unwrap();
    let err = transport
        .execute(form_post(&server.url()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Timeout);
    assert_eq!(err.request_sent(), RequestSent::Maybe);
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "the same connection"
    );
}

#[tokio::test]
async fn a_tls_handshake_that_never_ends_times_out_unsent() {
    let server = TestServer::start(false, Behaviour::Mute).await;
    let transport = impatient();
    let url = server.url().replacen("http://", "https://", 1);
    let err = transport.execute(form_post(&url)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Timeout);
    assert_eq!(err.request_sent(), RequestSent::No, "{err}");
}

/// How many connections wait in the accept queue of the listener on `port`: Linux shows it as
/// the receive queue of the listening socket in /proc/net/tcp. `None` if that cannot be read.
#[cfg(target_os = "linux")]
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (address, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
        if !address.ends_with(&local) || *state != "0A" {
            return None; // not this port, or not listening
        }
        u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
    })
}

/// A TCP connect that never completes ends at the connect timeout, well before the request
/// timeout, with nothing sent. Linux drops a SYN when the listener's accept queue is full: a
/// listener with a backlog of 0 and one connection that nobody accepts makes the next
/// connect hang. Time is paused, so the wait is the clock's, not the test's.
#[cfg(target_os = "linux")]
#[tokio::test(start_paused = true)]
async fn a_connect_that_never_completes_hits_the_connect_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fills the accept queue; completes at once, as the kernel answers for the listener.
    let _queued = std::net::TcpStream::connect(addr).unwrap();
    // The kernel may queue it a moment after the connect returns, under load.
    for _ in 0..100_000 {
        if accept_queue(addr.port()) != Some(0) {
            break;
        }
        tokio::task::yield_now().await;
    }
    let transport = HyperTransport::builder()
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let err = transport
        .execute(form_post(&format!("http://{addr}/c2dm/send")))
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.kind(), TransportErrorKind::Timeout, "{err}");
    assert_eq!(err.request_sent(), RequestSent::No);
    // The connector's timeout, not the exchange's ("no connection within ...").
    assert!(err.to_string().contains("connect: "), "{err}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(60),
        "gave up after {waited:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn a_refused_port_is_not_sent() {
    // Bind then drop a listener so the port is closed.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let transport = HyperTransport::new().unwrap();
    let err = transport
        .execute(form_post(&format!("http://127.0.0.1:{port}/c2dm/send")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect);
    assert_eq!(err.request_sent(), RequestSent::No);
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn an_oversized_response_is_an_error() {
    for declared in [true, false] {
        let server = TestServer::start(false, Behaviour::Big(100_000, declared)).await;
        let err = server
            .transport()
            .execute(form_post(&server.url()))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            TransportErrorKind::BodyTooLarge,
            "declared: {declared}"
        );
    }
    // Under the cap is fine.
    let server = TestServer::start(false, Behaviour::Big(60_000, true)).await;
    let resp = server
        .transport()
        .execute(form_post(&server.url()))
        .await
        .unwrap();
    assert_eq!(resp.body().len(), 60_000);
}

#[test]
fn bad_roots_are_build_errors() {
    assert!(matches!(
        HyperTransport::builder().add_root_certificates_pem(b"not a pem"),
        Err(BuildError::NoCertificate)
    ));
    assert!(matches!(
        HyperTransport::builder().only_added_roots().build(),
        Err(BuildError::NoRoots)
    ));
}
