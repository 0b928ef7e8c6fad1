//! HTTP/2 as FCM needs it: a connection that dies silently (the peer stops reading, as a NAT
//! that forgot the connection makes it look) is found by the keep-alive ping and replaced,
//! rather than holding every send until its timeout. Time is paused: the waits are the
//! clock's.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use c2dm_core::Transport;
use c2dm_hyper::HyperTransport;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// An IO that, once `frozen`, neither reads nor writes again, and never says so: the peer of a
/// connection that died without a word.
struct Freezable<T> {
    io: T,
    frozen: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Freezable<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Freezable<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

struct Server {
    url: String,
    cert_pem: String,
    accepted: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let key_der =
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![key.cert.der().clone()], key_der)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let accepted = Arc::new(AtomicUsize::new(0));
        let connections: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let (counter, all) = (Arc::clone(&accepted), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let frozen = Arc::new(AtomicBool::new(false));
                all.lock().unwrap().push(Arc::clone(&frozen));
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let io = TokioIo::new(Freezable { io: tls, frozen });
                    let service = service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"id=0:1"))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://{addr}/c2dm/send"),
            cert_pem: key.cert.pem(),
            accepted,
            connections,
        }
    }

    /// Every connection open so far goes silent.
    fn freeze(&self) {
        for frozen in self.connections.lock().unwrap().iter() {
            frozen.store(true, Ordering::SeqCst);
        }
    }
}

fn post(url: &str) -> http::Request<Bytes> {
    http::Request::post(url)
        .body(Bytes::from_static(b"registration_id=a"))
        .unwrap()
}

#[tokio::test]
async fn a_connection_that_dies_silently_is_found_by_its_ping_and_replaced() {
    let server = Server::start().await;
    let transport = HyperTransport::builder()
        .only_added_roots()
        .add_root_certificates_pem(server.cert_pem.as_bytes())
        .unwrap()
        .http2(true)
        .http2_keep_alive(Some((Duration::from_secs(5), Duration::from_secs(5))))
        .request_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let first = transport.execute(post(&server.url)).await.unwrap();
    assert_eq!(first.version(), http::Version::HTTP_2);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    server.freeze();
    // Half a minute passes at once, a second at a time: the ping goes out, is not answered,
    // and by its timeout the connection is closed.
    tokio::time::pause();
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::resume();
    // The next send opens a new connection at once; on the silent one it would wait its whole
    // request timeout (the bound here only fails the test, it is not waited out).
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        transport.execute(post(&server.url)),
    )
    .await
    .expect("the send went to the dead connection")
    .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        2,
        "a new connection"
    );
}
