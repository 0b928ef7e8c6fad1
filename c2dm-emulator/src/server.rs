//! The HTTP side: a hyper 1 server on loopback, plain or TLS, routing to the service.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::service::Service;

/// The largest request body read; larger gets HTTP 413.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A certificate for `localhost` and `127.0.0.1`, made at start.
pub(crate) struct GeneratedCert {
    pub pem: String,
    pub acceptor: TlsAcceptor,
}

pub(crate) fn generate_cert() -> Result<GeneratedCert, crate::StartError> {
    let key = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(|e| crate::StartError::Certificate(e.to_string()))?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| crate::StartError::Certificate(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(vec![key.cert.der().clone()], key_der)
    .map_err(|e| crate::StartError::Certificate(e.to_string()))?;
    let mut config = config;
    // HTTP/2 by ALPN, as FCM serves it; HTTP/1.1 for clients that offer only that.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(GeneratedCert {
        pem: key.cert.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}

/// Accepts connections until `stop` turns true, then lets open exchanges finish.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    service: Arc<Service>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = Arc::clone(&service);
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let service = Arc::clone(&service);
                async move { route(&service, req).await }
            });
            // HTTP/1.1, or HTTP/2 when ALPN chose it (or a client speaks it in the clear).
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let conn = builder.serve_connection(TokioIo::new(tls), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Err(err) => {
                        tracing::debug!(%peer, %err, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(err) = result {
                tracing::trace!(%peer, %err, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Why a connection is closed without an answer (an injected fault).
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

fn text(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    resp
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(body) => Ok(body.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(text(413, "request body too large"))
        }
        Err(_) => Err(text(400, "could not read the request body")),
    }
}

/// A send request's `Authorization` and body, read after the configured latency (a body
/// refused on its size is answered at once).
async fn read_send(
    service: &Service,
    req: Request<Incoming>,
) -> Result<(Option<String>, Bytes), Response<Full<Bytes>>> {
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = read_body(req).await?;
    let latency = service.config().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    Ok((authorization, body))
}

async fn route(
    service: &Service,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, "/c2dm/send") => {
            let (authorization, body) = match read_send(service, req).await {
                Ok(send) => send,
                Err(resp) => return Ok(resp),
            };
            let answer = service.send(authorization.as_deref(), &body);
            if answer.drop {
                return Err(Dropped);
            }
            let rotated = answer
                .rotated_token
                .and_then(|t| c2dm_core::AuthToken::new(t).ok());
            Ok(c2dm_core::codec::encode_send_answer(
                answer.status,
                answer.body,
                answer.retry_after.as_deref(),
                rotated.as_ref(),
            )
            .map(Full::new))
        }
        (Method::POST, "/accounts/ClientLogin") => {
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(resp) => return Ok(resp),
            };
            let (status, body) = service.login(&body);
            Ok(text(status, body))
        }
        (Method::GET, "/_emulator/stats") => {
            let query = req.uri().query().unwrap_or("");
            let flag = |name: &str, default: bool| {
                form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == name)
                    .map_or(default, |(_, v)| !matches!(&*v, "0" | "false" | "no"))
            };
            let stats = service.stats(flag("inbox", true), flag("delivered", false));
            let Ok(json) = serde_json::to_vec(&stats) else {
                return Ok(text(500, "could not encode the statistics"));
            };
            let mut resp = Response::new(Full::new(Bytes::from(json)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(resp)
        }
        (Method::POST, crate::service::fcm::TOKEN_PATH) => {
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(resp) => return Ok(resp),
            };
            answer(service.fcm_token(&body))
        }
        (Method::POST, path) if c2dm_fcm::codec::project_of(path).is_some() => {
            let project = c2dm_fcm::codec::project_of(path)
                .unwrap_or_default()
                .to_owned();
            if req.version() == http::Version::HTTP_2 {
                service.note_fcm_http2();
            }
            let (authorization, body) = match read_send(service, req).await {
                Ok(send) => send,
                Err(resp) => return Ok(resp),
            };
            answer(service.fcm_send(&project, authorization.as_deref(), &body))
        }
        (_, "/c2dm/send" | "/accounts/ClientLogin") => Ok(text(405, "method not allowed")),
        _ => Ok(text(404, "not found")),
    }
}

/// A JSON answer of the FCM endpoints (or a dropped connection).
fn answer(answer: crate::service::SendAnswer) -> Result<Response<Full<Bytes>>, Dropped> {
    if answer.drop {
        return Err(Dropped);
    }
    let mut resp = Response::new(Full::new(answer.body));
    *resp.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if answer.json {
        "application/json; charset=UTF-8"
    } else {
        "text/plain; charset=UTF-8"
    };
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(value) = answer
        .retry_after
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        resp.headers_mut().insert(http::header::RETRY_AFTER, value);
    }
    Ok(resp)
}

pub(crate) fn local_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{addr}")
}
