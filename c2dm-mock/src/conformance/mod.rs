//! A conformance kit for [`Transport`] implementations (feature `conformance`).
//!
//! A transport is right when the [`Sender`](c2dm_core::Sender) can trust what it reports: an
//! answer exactly as the server sent it, any HTTP status as an answer, "not sent" only when
//! nothing can have reached the server (the sender resends those freely, and resends the others
//! counting a possible duplicate), timeouts that hold, and certificates checked; and, for FCM
//! HTTP v1, HTTP/2 negotiated by ALPN, its streams shared on one connection, and a connection
//! that died silently found by the keep-alive ping and replaced. [`run`] starts loopback
//! servers of its own (plain HTTP/1.1, TLS with HTTP/1.1, and TLS with HTTP/2 only, with
//! certificates it makes), builds the transport under test with the [`KitSettings`] it is
//! given, and runs every case of [`CASES`] against it, reporting each by name.
//!
//! ```no_run
//! # async fn demo() {
//! use c2dm_mock::conformance::{self, KitSettings};
//! # fn my_transport(_: &KitSettings) -> c2dm_mock::NeverTransport { c2dm_mock::NeverTransport }
//! // `my_transport` builds yours: trusting `settings.root_certificate_pem` (and nothing else),
//! // with its timeouts and cap.
//! let report = conformance::run(|settings: &KitSettings| my_transport(settings)).await;
//! report.assert_passed(); // panics naming every case that failed, and why
//! # }
//! ```
//!
//! The kit waits for real time three times (a server that never answers, a TLS handshake that
//! never ends, a send on a silent HTTP/2 connection), each for at most
//! [`KitSettings::request_timeout`] (half a second); everything else is as fast as loopback.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use c2dm_core::{RequestSent, Transport, TransportError, TransportErrorKind};
use tokio::net::TcpListener;

mod http2;
mod server;

use server::{Answer, Certificate, Server};

/// What the transport under test is built with.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KitSettings {
    /// The kit's TLS servers' certificate, as PEM: the transport must trust it as a root, and
    /// must not trust certificates merely because it was asked to trust this one.
    pub root_certificate_pem: String,
    /// The longest a whole exchange may take.
    pub request_timeout: Duration,
    /// The longest a connection (TCP, and TLS where the transport bounds it with the
    /// connection) may take: half the request timeout, so that a transport that gives up while
    /// connecting can know that it sent nothing.
    pub connect_timeout: Duration,
    /// The largest answer body the transport must accept; a larger one is an error of kind
    /// [`TransportErrorKind::BodyTooLarge`].
    pub max_response_bytes: usize,
    /// How long an HTTP/2 connection may be quiet before the transport pings it (while
    /// requests wait on it at least): a fifth of the request timeout.
    pub http2_keep_alive_interval: Duration,
    /// How long the transport waits for a ping's answer before it closes the connection
    /// (and the next request opens another): a fifth of the request timeout.
    pub http2_keep_alive_timeout: Duration,
}

/// The cases [`run`] runs, in order.
pub const CASES: &[&str] = &[
    "ordinary_exchange",
    "keep_alive_reuse",
    "sixty_four_at_once",
    "connection_refused",
    "reset_after_request_written",
    "server_never_answers",
    "tls_handshake_never_ends",
    "untrusted_certificate",
    "answer_over_size_cap",
    "chunked_answer",
    "headers_passed_through",
    "http2_streams_share_a_connection",
    "http2_silent_connection_replaced",
];

/// How one case went.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case's name, one of [`CASES`].
    pub name: &'static str,
    /// `Ok`, or what the transport did wrong.
    pub result: Result<(), String>,
}

/// How every case went.
#[derive(Debug, Clone)]
pub struct Report {
    /// One per case of [`CASES`], in order.
    pub cases: Vec<CaseReport>,
}

impl Report {
    /// Whether every case passed.
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.result.is_ok())
    }

    /// The cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CaseReport> {
        self.cases.iter().filter(|c| c.result.is_err())
    }

    /// The report of the case named `name`.
    pub fn case(&self, name: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.name == name)
    }

    /// Panics, listing every failed case by name with its reason, unless all passed.
    #[track_caller]
    pub fn assert_passed(&self) {
        assert!(
            self.passed(),
            "the transport fails the conformance kit:\n{self}"
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for case in &self.cases {
            match &case.result {
                Ok(()) => writeln!(f, "ok     {}", case.name)?,
                Err(why) => writeln!(f, "FAILED {}: {why}", case.name)?,
            }
        }
        Ok(())
    }
}

/// The settings [`run`] builds transports with.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How much later than its timeout a transport may give up (a loaded machine is slow).
const SLACK: Duration = Duration::from_secs(10);

/// The form a [`Sender`](c2dm_core::Sender) posts, with bytes that a careless transport could
/// re-encode: a percent-encoded é and a `+`.
const FORM: &[u8] = b"registration_id=APA91b-device&collapse_key=k&data.m=%C3%A9+1";
const TOKEN: &str = "GoogleLogin auth=kit-token";

/// Runs every case of [`CASES`] against transports `build` makes (one per case, so that a
/// case's connections cannot help another), and reports each by name. Needs a Tokio runtime
/// with I/O and time enabled, on real time (a paused clock would end loopback exchanges by
/// their timeouts).
pub async fn run<T, F>(build: F) -> Report
where
    T: Transport,
    F: Fn(&KitSettings) -> T,
{
    let trusted = Certificate::new();
    let untrusted = Certificate::new();
    let settings = KitSettings {
        root_certificate_pem: trusted.pem.clone(),
        request_timeout: REQUEST_TIMEOUT,
        connect_timeout: REQUEST_TIMEOUT / 2,
        max_response_bytes: MAX_RESPONSE_BYTES,
        http2_keep_alive_interval: REQUEST_TIMEOUT / 5,
        http2_keep_alive_timeout: REQUEST_TIMEOUT / 5,
    };
    let mut cases = Vec::with_capacity(CASES.len());
    for &name in CASES {
        let transport = build(&settings);
        let case = match name {
            "ordinary_exchange" => ordinary_exchange(&transport, &trusted).await,
            "keep_alive_reuse" => keep_alive_reuse(&transport, &trusted).await,
            "sixty_four_at_once" => sixty_four_at_once(&transport, &trusted).await,
            "connection_refused" => connection_refused(&transport).await,
            "reset_after_request_written" => reset_after_request_written(&transport).await,
            "server_never_answers" => server_never_answers(&transport).await,
            "tls_handshake_never_ends" => tls_handshake_never_ends(&transport).await,
            "untrusted_certificate" => untrusted_certificate(&transport, &untrusted).await,
            "answer_over_size_cap" => answer_over_size_cap(&transport, &trusted).await,
            "chunked_answer" => chunked_answer(&transport, &trusted).await,
            "headers_passed_through" => headers_passed_through(&transport, &trusted).await,
            "http2_streams_share_a_connection" => {
                http2::http2_streams_share_a_connection(&transport, &trusted).await
            }
            "http2_silent_connection_replaced" => {
                http2::http2_silent_connection_replaced(&transport, &trusted).await
            }
            _ => Err(format!("no such case: {name}")),
        };
        cases.push(CaseReport { name, result: case });
    }
    Report { cases }
}

/// The form post a sender makes, to `url`.
fn form_post(url: &str) -> http::Request<Bytes> {
    http::Request::post(url)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded;charset=UTF-8",
        )
        .header(http::header::AUTHORIZATION, TOKEN)
        .body(Bytes::from_static(FORM))
        .expect("a valid request")
}

/// Runs `exchange` under a bound far beyond the kit's timeouts, so that a transport that never
/// gives up fails its case rather than hanging the kit.
async fn bounded<F: std::future::Future>(exchange: F) -> Result<F::Output, String> {
    tokio::time::timeout(REQUEST_TIMEOUT + SLACK, exchange)
        .await
        .map_err(|_| {
            format!(
                "no result within {:?}: the transport ignores its timeouts",
                REQUEST_TIMEOUT + SLACK
            )
        })
}

fn expect_answer(
    result: Result<http::Response<Bytes>, TransportError>,
) -> Result<http::Response<Bytes>, String> {
    result.map_err(|e| format!("expected an answer, got an error: {e}"))
}

/// The error of a failed exchange, checked for its kind (any of `kinds`) and for `sent`.
fn expect_error(
    result: Result<http::Response<Bytes>, TransportError>,
    kinds: &[TransportErrorKind],
    sent: RequestSent,
) -> Result<TransportError, String> {
    let err = match result {
        Ok(response) => {
            return Err(format!(
                "expected an error, got an answer: {}",
                response.status()
            ));
        }
        Err(err) => err,
    };
    if !kinds.contains(&err.kind()) {
        return Err(format!(
            "expected an error of kind {kinds:?}, got {:?}: {err}",
            err.kind()
        ));
    }
    if err.request_sent() != sent {
        return Err(format!(
            "expected {sent:?} for whether the request was sent, got {:?}: {err}",
            err.request_sent()
        ));
    }
    Ok(err)
}

async fn ordinary_exchange<T: Transport>(transport: &T, cert: &Certificate) -> Result<(), String> {
    let answer = Bytes::from_static(b"id=0:1234%7B\xC3\xA9\r\n");
    let server = Server::start(
        Some(cert),
        Answer::Fixed {
            status: 200,
            headers: vec![("content-type", "text/plain".to_owned())],
            body: answer.clone(),
            chunks: None,
        },
    )
    .await?;
    let response = expect_answer(bounded(transport.execute(form_post(&server.url()))).await?)?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("status {} instead of 200", response.status()));
    }
    if response.body() != &answer {
        return Err(format!(
            "the answer's body changed on the way: {:?} instead of {answer:?}",
            response.body()
        ));
    }
    let received = server.received();
    let [request] = received.as_slice() else {
        return Err(format!(
            "the server got {} requests instead of 1",
            received.len()
        ));
    };
    let line = &request.head[0];
    if line != "POST /c2dm/send?kit=1 HTTP/1.1" {
        return Err(format!(
            "request line {line:?} instead of \"POST /c2dm/send?kit=1 HTTP/1.1\""
        ));
    }
    if request.body != FORM {
        return Err(format!(
            "the request's body changed on the way: {:?}",
            String::from_utf8_lossy(&request.body)
        ));
    }
    for (name, value) in [
        (
            "content-type",
            "application/x-www-form-urlencoded;charset=UTF-8",
        ),
        ("authorization", TOKEN),
        ("content-length", &FORM.len().to_string()),
    ] {
        if request.header(name) != Some(value) {
            return Err(format!(
                "header {name}: {:?} instead of {value:?}",
                request.header(name)
            ));
        }
    }
    match request.header("host") {
        Some(host) if host == format!("localhost:{}", server.port) => Ok(()),
        other => Err(format!(
            "header host: {other:?} instead of \"localhost:{}\"",
            server.port
        )),
    }
}

/// Exchanges one after another that keep-alive must carry on connections already open.
const REUSE_EXCHANGES: usize = 10;

/// Connections kept alive are used again. Not always exactly one: a pool may open a second
/// connection for a request that comes while the last answer's connection is on its way back
/// (hyper-util's legacy client races the two, hyperium/hyper#4134), more often on a loaded
/// machine. A transport without keep-alive opens one per exchange; one with it reuses most.
async fn keep_alive_reuse<T: Transport>(transport: &T, cert: &Certificate) -> Result<(), String> {
    let server = Server::start(Some(cert), Answer::Echo).await?;
    for _ in 0..REUSE_EXCHANGES {
        expect_answer(bounded(transport.execute(form_post(&server.url()))).await?)?;
    }
    match server.connections.load(Ordering::SeqCst) {
        n if n <= REUSE_EXCHANGES / 2 => Ok(()),
        n => Err(format!(
            "{REUSE_EXCHANGES} exchanges one after another opened {n} connections: fewer than half reused one"
        )),
    }
}

async fn sixty_four_at_once<T: Transport>(transport: &T, cert: &Certificate) -> Result<(), String> {
    let server = Server::start(Some(cert), Answer::Echo).await?;
    let url = server.url();
    let exchanges = (0..64).map(|i| {
        let request = http::Request::post(url.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Bytes::from(format!("registration_id=device-{i}")))
            .expect("a valid request");
        async move { (i, transport.execute(request).await) }
    });
    let results = bounded(futures::future::join_all(exchanges)).await?;
    for (i, result) in results {
        let response = expect_answer(result)?;
        let expected = format!("registration_id=device-{i}");
        if response.body().as_ref() != expected.as_bytes() {
            return Err(format!(
                "exchange {i} got the answer {:?}, meant for another",
                String::from_utf8_lossy(response.body())
            ));
        }
    }
    Ok(())
}

async fn connection_refused<T: Transport>(transport: &T) -> Result<(), String> {
    // A port that was just free: nothing listens there.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        listener.local_addr().map_err(|e| e.to_string())?.port()
    };
    let url = format!("http://127.0.0.1:{port}/c2dm/send");
    let result = bounded(transport.execute(form_post(&url))).await?;
    expect_error(result, &[TransportErrorKind::Connect], RequestSent::No).map(drop)
}

async fn reset_after_request_written<T: Transport>(transport: &T) -> Result<(), String> {
    let server = Server::start(None, Answer::Reset).await?;
    let result = bounded(transport.execute(form_post(&server.url()))).await?;
    expect_error(
        result,
        &[
            TransportErrorKind::ConnectionLost,
            TransportErrorKind::Other,
        ],
        RequestSent::Maybe,
    )?;
    match server.received().len() {
        0 => Err("the server never got the request".to_owned()),
        _ => Ok(()),
    }
}

async fn server_never_answers<T: Transport>(transport: &T) -> Result<(), String> {
    let server = Server::start(None, Answer::Silent).await?;
    let started = std::time::Instant::now();
    let result = bounded(transport.execute(form_post(&server.url()))).await?;
    let waited = started.elapsed();
    expect_error(result, &[TransportErrorKind::Timeout], RequestSent::Maybe)?;
    if waited + Duration::from_millis(50) < REQUEST_TIMEOUT {
        return Err(format!(
            "gave up after {waited:?}, before the request timeout"
        ));
    }
    Ok(())
}

async fn tls_handshake_never_ends<T: Transport>(transport: &T) -> Result<(), String> {
    let server = Server::start(None, Answer::Mute).await?;
    let url = server.url().replacen("http://", "https://", 1);
    let result = bounded(transport.execute(form_post(&url))).await?;
    expect_error(result, &[TransportErrorKind::Timeout], RequestSent::No).map(drop)
}

async fn untrusted_certificate<T: Transport>(
    transport: &T,
    other: &Certificate,
) -> Result<(), String> {
    let server = Server::start(Some(other), Answer::Echo).await?;
    let result = bounded(transport.execute(form_post(&server.url()))).await?;
    expect_error(result, &[TransportErrorKind::Tls], RequestSent::No)?;
    match server.received().len() {
        0 => Ok(()),
        n => Err(format!(
            "{n} requests reached a server whose certificate is not trusted"
        )),
    }
}

async fn answer_over_size_cap<T: Transport>(
    transport: &T,
    cert: &Certificate,
) -> Result<(), String> {
    let over = Bytes::from(vec![b'x'; MAX_RESPONSE_BYTES + 1]);
    for (chunks, how) in [(None, "with a Content-Length"), (Some(8192), "chunked")] {
        let server = Server::start(
            Some(cert),
            Answer::Fixed {
                status: 200,
                headers: Vec::new(),
                body: over.clone(),
                chunks,
            },
        )
        .await?;
        let result = bounded(transport.execute(form_post(&server.url()))).await?;
        expect_error(
            result,
            &[TransportErrorKind::BodyTooLarge],
            RequestSent::Maybe,
        )
        .map_err(|e| format!("an answer of the cap and one byte, {how}: {e}"))?;
    }
    Ok(())
}

async fn chunked_answer<T: Transport>(transport: &T, cert: &Certificate) -> Result<(), String> {
    // Exactly the cap, in uneven chunks: all of it, in order.
    let body: Bytes = (0..MAX_RESPONSE_BYTES).map(|i| (i % 251) as u8).collect();
    let server = Server::start(
        Some(cert),
        Answer::Fixed {
            status: 200,
            headers: Vec::new(),
            body: body.clone(),
            chunks: Some(1000),
        },
    )
    .await?;
    let response = expect_answer(bounded(transport.execute(form_post(&server.url()))).await?)?;
    if response.body() != &body {
        return Err(format!(
            "a chunked answer of {} bytes came back as {} different bytes",
            body.len(),
            response.body().len()
        ));
    }
    Ok(())
}

async fn headers_passed_through<T: Transport>(
    transport: &T,
    cert: &Certificate,
) -> Result<(), String> {
    let server = Server::start(
        Some(cert),
        Answer::Fixed {
            status: 503,
            headers: vec![
                ("Update-Client-Auth", "DQAAAGgA-rotated_token/+=".to_owned()),
                ("Retry-After", "Fri, 31 Dec 1999 23:59:59 GMT".to_owned()),
            ],
            body: Bytes::new(),
            chunks: None,
        },
    )
    .await?;
    let response = expect_answer(bounded(transport.execute(form_post(&server.url()))).await?)?;
    if response.status() != http::StatusCode::SERVICE_UNAVAILABLE {
        return Err(format!("status {} instead of 503", response.status()));
    }
    for (name, value) in [
        ("update-client-auth", "DQAAAGgA-rotated_token/+="),
        ("retry-after", "Fri, 31 Dec 1999 23:59:59 GMT"),
    ] {
        let got = response.headers().get(name).map(|v| v.as_bytes());
        if got != Some(value.as_bytes()) {
            return Err(format!("header {name}: {got:?} instead of {value:?}"));
        }
    }
    Ok(())
}
