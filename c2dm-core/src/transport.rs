//! The seam between the protocol and an HTTP stack: one exchange, bring your own client.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// Carries one HTTP exchange: a request in, the whole response out.
///
/// `c2dm-hyper` implements it over hyper and rustls; `c2dm-mock` offers recording fakes; a library
/// with its own HTTP stack implements it in a few lines. It is object-safe, so
/// `Arc<dyn Transport>` works wherever a transport is asked for.
///
/// ```
/// use async_trait::async_trait;
/// use bytes::Bytes;
/// use c2dm_core::{Transport, TransportError};
///
/// /// Accepts everything, as a stand-in for a real HTTP client.
/// struct AlwaysAccept;
///
/// #[async_trait]
/// impl Transport for AlwaysAccept {
///     async fn execute(
///         &self,
///         _request: http::Request<Bytes>,
///     ) -> Result<http::Response<Bytes>, TransportError> {
///         Ok(http::Response::new(Bytes::from_static(b"id=0:1")))
///     }
/// }
///
/// let shared: std::sync::Arc<dyn Transport> = std::sync::Arc::new(AlwaysAccept);
/// # let _ = shared;
/// ```
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Transport: Send + Sync {
    /// Sends `request` and returns the response with its whole body.
    ///
    /// Any HTTP status is a response, not an error; errors are for exchanges that did not complete.
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError>;
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        (**self).execute(request).await
    }
}

/// A closure from a request to a future of its answer is a transport, as in oauth2-rs: a test
/// or an example need not write a struct.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use bytes::Bytes;
/// use c2dm_core::{AuthToken, Message, Sender, StaticToken};
///
/// let accept_all = |request: http::Request<Bytes>| async move {
///     assert_eq!(request.uri(), "https://android.apis.google.com/c2dm/send");
///     Ok(http::Response::new(Bytes::from_static(b"id=0:42")))
/// };
/// let sender = Sender::new(accept_all, StaticToken::new(AuthToken::new("token")?));
/// let sent = sender.send(Message::builder("device").collapse_key("k").build()?).await?;
/// assert_eq!(sent.message_id.as_str(), "0:42");
/// # Ok(())
/// # }
/// ```
#[async_trait]
impl<F, Fut> Transport for F
where
    F: Fn(http::Request<Bytes>) -> Fut + Send + Sync,
    Fut: std::future::Future<Output = Result<http::Response<Bytes>, TransportError>> + Send,
{
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        self(request).await
    }
}

/// Whether a failed request can have reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestSent {
    /// The request never left (no connection, TLS handshake failed): resending cannot duplicate.
    No,
    /// The request may have been written before the failure (timeout, connection lost while
    /// waiting): resending may deliver the message twice.
    Maybe,
}

/// What kind of failure stopped an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// Name resolution or the TCP connection failed.
    Connect,
    /// The TLS handshake failed, e.g. an untrusted certificate.
    Tls,
    /// No answer came within the time allowed.
    Timeout,
    /// The connection closed or broke before a whole response arrived.
    ConnectionLost,
    /// The response body was larger than the transport accepts.
    BodyTooLarge,
    /// The request could not be sent as given (e.g. an unusable URL).
    InvalidRequest,
    /// Anything else.
    Other,
}

impl fmt::Display for TransportErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "could not connect",
            Self::Tls => "TLS handshake failed",
            Self::Timeout => "timed out",
            Self::ConnectionLost => "connection lost",
            Self::BodyTooLarge => "response body too large",
            Self::InvalidRequest => "invalid request",
            Self::Other => "transport failure",
        })
    }
}

/// An HTTP exchange that did not complete, and whether the request may have reached the server.
///
/// ```
/// use c2dm_core::{RequestSent, TransportError, TransportErrorKind};
/// let err = TransportError::new(TransportErrorKind::Connect, RequestSent::No)
///     .with_message("connection refused");
/// assert!(!err.may_have_been_sent());
/// assert_eq!(err.to_string(), "could not connect (not sent): connection refused");
/// ```
#[derive(Clone, thiserror::Error)]
#[error("{kind} ({}){}", match .sent { RequestSent::No => "not sent", RequestSent::Maybe => "may have been sent" }, DisplayCause(.source.as_deref()))]
pub struct TransportError {
    kind: TransportErrorKind,
    sent: RequestSent,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

struct DisplayCause<'a>(Option<&'a (dyn StdError + Send + Sync + 'static)>);

impl fmt::Display for DisplayCause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain on one line, so a log shows the root cause (e.g. the certificate problem).
        let mut next: Option<&(dyn StdError + 'static)> =
            self.0.map(|e| e as &(dyn StdError + 'static));
        while let Some(err) = next {
            write!(f, ": {err}")?;
            next = err.source();
        }
        Ok(())
    }
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportError")
            .field("kind", &self.kind)
            .field("sent", &self.sent)
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Message {}

impl TransportError {
    /// A failure of `kind`, where `sent` says whether the request can have reached the server.
    pub fn new(kind: TransportErrorKind, sent: RequestSent) -> Self {
        Self {
            kind,
            sent,
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Attaches a plain description as the cause.
    pub fn with_message(self, message: impl Into<String>) -> Self {
        self.with_source(Message(message.into()))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }

    /// Whether the request can have reached the server.
    pub fn request_sent(&self) -> RequestSent {
        self.sent
    }

    /// Whether trying again may help: connection failures, timeouts and lost connections may
    /// pass; a refused certificate, an unusable request or an oversized answer will not.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.kind,
            TransportErrorKind::Tls
                | TransportErrorKind::InvalidRequest
                | TransportErrorKind::BodyTooLarge
        )
    }

    /// `true` when resending could deliver the message twice.
    pub fn may_have_been_sent(&self) -> bool {
        self.sent == RequestSent::Maybe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn display_shows_the_whole_chain() {
        let err = TransportError::new(TransportErrorKind::Tls, RequestSent::No).with_source(Outer(
            std::io::Error::other("invalid peer certificate: UnknownIssuer"),
        ));
        assert_eq!(
            err.to_string(),
            "TLS handshake failed (not sent): outer: invalid peer certificate: UnknownIssuer"
        );
        let bare = TransportError::new(TransportErrorKind::Timeout, RequestSent::Maybe);
        assert_eq!(bare.to_string(), "timed out (may have been sent)");
        assert!(bare.may_have_been_sent());
    }

    #[tokio::test]
    async fn mock_transport_is_object_safe() {
        let mut mock = MockTransport::new();
        mock.expect_execute()
            .returning(|_| Ok(http::Response::new(Bytes::from_static(b"id=1"))));
        let shared: Arc<dyn Transport> = Arc::new(mock);
        let resp = shared
            .execute(http::Request::new(Bytes::new()))
            .await
            .unwrap();
        assert_eq!(resp.body().as_ref(), b"id=1");
    }
}
