#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::error::Error as StdError;
use std::fmt;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use c2dm_core::{RequestSent, Transport, TransportError, TransportErrorKind};

/// The default cap on an answer's body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A [`Transport`] over a [`reqwest::Client`]. Clones share the client (and its pool).
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl fmt::Debug for ReqwestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestTransport")
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl ReqwestTransport {
    /// A transport over `client`, with the default cap on answers.
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// The largest answer body accepted (default 64 KiB); a larger one is an error of kind
    /// [`TransportErrorKind::BodyTooLarge`].
    #[must_use]
    pub fn max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// The client this transport sends with.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn too_large(&self) -> TransportError {
        TransportError::new(TransportErrorKind::BodyTooLarge, RequestSent::Maybe).with_message(
            format!(
                "the response body is over {} bytes",
                self.max_response_bytes
            ),
        )
    }
}

#[async_trait]
impl Transport for ReqwestTransport {
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        let request =
            reqwest::Request::try_from(request.map(reqwest::Body::from)).map_err(|e| {
                TransportError::new(TransportErrorKind::InvalidRequest, RequestSent::No)
                    .with_source(e)
            })?;
        let mut response = self.client.execute(request).await.map_err(classify)?;
        if response
            .content_length()
            .is_some_and(|n| n > self.max_response_bytes as u64)
        {
            return Err(self.too_large());
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(self.too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let mut answer = http::Response::new(body.freeze());
        *answer.status_mut() = response.status();
        *answer.version_mut() = response.version();
        *answer.headers_mut() = std::mem::take(response.headers_mut());
        Ok(answer)
    }
}

/// What a reqwest error says about the exchange: before the request left (building it, or
/// connecting: TCP, TLS) nothing was sent; after, it may have been. The error stays as the
/// cause, so its whole chain shows.
fn classify(err: reqwest::Error) -> TransportError {
    let (kind, sent) = if err.is_builder() {
        (TransportErrorKind::InvalidRequest, RequestSent::No)
    } else if err.is_connect() {
        let kind = if err.is_timeout() {
            TransportErrorKind::Timeout
        } else if is_tls(&err) {
            TransportErrorKind::Tls
        } else {
            TransportErrorKind::Connect
        };
        (kind, RequestSent::No)
    } else if err.is_timeout() {
        (TransportErrorKind::Timeout, RequestSent::Maybe)
    } else if err.is_request() || err.is_body() || err.is_decode() {
        (TransportErrorKind::ConnectionLost, RequestSent::Maybe)
    } else {
        (TransportErrorKind::Other, RequestSent::Maybe)
    };
    TransportError::new(kind, sent).with_source(err)
}

/// Whether a TLS library refused the connection: rustls and native-tls report through an
/// `io::Error` of kind `InvalidData`.
fn is_tls(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
            if let Some(inner) = io.get_ref() {
                next = Some(inner as &(dyn StdError + 'static));
                continue;
            }
        }
        next = e.source();
    }
    false
}
