//! What a send is answered: an answer, or a fault instead.

use bytes::Bytes;
use c2dm_core::ErrorCode;
use c2dm_core::codec;

/// How a send is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SendAnswer {
    pub status: u16,
    pub body: Bytes,
    pub retry_after: Option<String>,
    pub rotated_token: Option<String>,
    /// Close the connection instead of answering.
    pub drop: bool,
    /// The body is JSON (FCM's answers), not text.
    pub json: bool,
}

/// A fault a send meets instead of its answer.
pub(super) enum Fault {
    /// The connection (or stream) is closed with no answer.
    Drop,
    /// HTTP 500.
    ServerError,
    /// HTTP 503, the `nth` so far.
    Unavailable { nth: u64 },
}

impl SendAnswer {
    /// No answer: the connection is closed.
    pub(super) fn dropped() -> Self {
        Self {
            drop: true,
            ..Self::text(0, Bytes::new())
        }
    }

    pub(super) fn text(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            body: body.into(),
            retry_after: None,
            rotated_token: None,
            drop: false,
            json: false,
        }
    }

    pub(super) fn error(code: &ErrorCode) -> Self {
        Self::text(200, codec::rejected_body(code))
    }
}
