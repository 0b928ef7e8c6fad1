//! The kit's HTTP/1.1 servers, plain and TLS, written by hand so that each case can answer,
//! stall, reset or stay mute exactly as it needs; and the certificates they serve.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A certificate for `localhost` and `127.0.0.1`, self-signed, and the acceptor that serves it
/// with HTTP/1.1.
pub(super) struct Certificate {
    pub(super) pem: String,
    key: rcgen::CertifiedKey<rcgen::KeyPair>,
    acceptor: TlsAcceptor,
}

impl Certificate {
    pub(super) fn new() -> Self {
        let key = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("a certificate for localhost");
        let acceptor = TlsAcceptor::from(server_config(&key, &[b"http/1.1"]));
        Self {
            pem: key.cert.pem(),
            key,
            acceptor,
        }
    }

    /// A server configuration with this certificate, offering `alpn` (in that order).
    pub(super) fn config_for(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        server_config(&self.key, alpn)
    }
}

/// A server configuration with `key`'s certificate, offering `alpn` (in that order).
fn server_config(
    key: &rcgen::CertifiedKey<rcgen::KeyPair>,
    alpn: &[&[u8]],
) -> Arc<rustls::ServerConfig> {
    let der = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![der], private)
    .expect("a server configuration");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What a kit server does with each request.
#[derive(Clone)]
pub(super) enum Answer {
    /// This status, headers and body; the body in chunks of the given size if `Some`.
    Fixed {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
        chunks: Option<usize>,
    },
    /// `200`, the request's body as the answer's.
    Echo,
    /// Reads the request, then resets the connection (plain HTTP only).
    Reset,
    /// Reads the request and never answers.
    Silent,
    /// Accepts the connection and never speaks, not even TLS (plain listener only).
    Mute,
}

/// One request as the server read it.
#[derive(Debug, Clone)]
pub(super) struct Received {
    /// The request line and the headers, as sent (lines without their CRLF).
    pub(super) head: Vec<String>,
    pub(super) body: Vec<u8>,
}

impl Received {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// A loopback server of the kit's.
pub(super) struct Server {
    pub(super) port: u16,
    tls: bool,
    pub(super) connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub(super) async fn start(tls: Option<&Certificate>, answer: Answer) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("the kit could not listen on loopback: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tls.map(|c| c.acceptor.clone());
        let (count, record) = (Arc::clone(&connections), Arc::clone(&received));
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (acceptor, answer, record) =
                    (acceptor.clone(), answer.clone(), Arc::clone(&record));
                served.spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match (acceptor, &answer) {
                        (_, Answer::Mute) => read_forever(stream).await,
                        (_, Answer::Reset) => {
                            let mut stream = stream;
                            if let Ok(Some(request)) = read_request(&mut stream).await {
                                record.lock().expect("lock").push(request);
                                // A reset, not a clean close: the request was written, and no
                                // answer comes.
                                let _ = stream.set_zero_linger();
                            }
                        }
                        (Some(acceptor), _) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, &answer, &record).await;
                            }
                        }
                        (None, _) => serve(stream, &answer, &record).await,
                    }
                });
            }
        });
        Ok(Self {
            port,
            tls: tls.is_some(),
            connections,
            received,
            task,
        })
    }

    pub(super) fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://localhost:{}/c2dm/send?kit=1", self.port)
    }

    pub(super) fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

async fn read_forever(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Serves requests on one connection until the client closes it.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    answer: &Answer,
    record: &Mutex<Vec<Received>>,
) {
    while let Ok(Some(request)) = read_request(&mut stream).await {
        let body = request.body.clone();
        record.lock().expect("lock").push(request);
        let bytes = match answer {
            Answer::Fixed {
                status,
                headers,
                body,
                chunks,
            } => encode(*status, headers, body, *chunks),
            Answer::Echo => encode(200, &[], &Bytes::from(body), None),
            Answer::Silent => return std::future::pending().await,
            Answer::Reset | Answer::Mute => return,
        };
        if stream.write_all(&bytes).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// An HTTP/1.1 answer, kept alive; chunked if `chunks` is given.
fn encode(
    status: u16,
    headers: &[(&'static str, String)],
    body: &Bytes,
    chunks: Option<usize>,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} Kit\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    match chunks {
        None => {
            out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
        }
        Some(size) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            for chunk in body.chunks(size.max(1)) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    out
}

/// Reads one request: its head, then a body of its `Content-Length`. `None` when the client
/// closed the connection between requests.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<Received>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head: Vec<String> = String::from_utf8_lossy(&buf[..end])
        .split("\r\n")
        .map(str::to_owned)
        .collect();
    let mut request = Received {
        head,
        body: buf[end + 4..].to_vec(),
    };
    let length = request
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    while request.body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        request.body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(request))
}
