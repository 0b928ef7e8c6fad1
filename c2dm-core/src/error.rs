//! What can go wrong with a send, typed so a caller can act on it.

use std::fmt;
use std::time::Duration;

use crate::token::TokenError;
use crate::transport::TransportError;

/// What a sender does about a protocol's refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// The device is gone (or its id was never valid): remove it; no retry.
    RemoveDevice,
    /// The message itself is wrong: no retry fixes it.
    Permanent,
    /// The sender's setup is wrong (another project's device, credentials not allowed): no
    /// retry fixes it, and no other message will go either.
    Configuration,
    /// Retry later; every send of the sender waits.
    RetryEveryone,
    /// Retry later; sends to this device wait.
    RetryDevice,
}

/// A protocol's refusal of a message, with what to do about it: [`Error::Refused`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The protocol's code, as it writes it (`UNREGISTERED`, `QUOTA_EXCEEDED`, …).
    pub code: String,
    /// The service's words.
    pub message: String,
    /// What a sender does about it.
    pub disposition: Disposition,
    /// How long the service asked to wait, if it did.
    pub retry_after: Option<Duration>,
    /// Whether this is the sender's quota running out (the account's rate): what
    /// [`Sender::quota_exceeded_since`](crate::Sender::quota_exceeded_since) follows.
    pub sender_quota: bool,
}

impl Refusal {
    /// Whether sending again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.disposition,
            Disposition::RetryEveryone | Disposition::RetryDevice
        )
    }

    /// Whether the device must be removed.
    pub fn should_remove_registration(&self) -> bool {
        self.disposition == Disposition::RemoveDevice
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(after) = self.retry_after {
            write!(f, ", retry after {}s", after.as_secs())?;
        }
        Ok(())
    }
}

/// An `Error=<code>` answer of the send endpoint (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Too many messages from this sender: back off globally, then retry.
    QuotaExceeded,
    /// Too many messages to this one device: back off for this registration id, then retry.
    DeviceQuotaExceeded,
    /// The request had no `registration_id`: a caller bug.
    MissingRegistration,
    /// The registration id is malformed: remove it.
    InvalidRegistration,
    /// The registration id belongs to another sender: a configuration error.
    MismatchSenderId,
    /// The app was uninstalled or turned pushes off: remove the registration id.
    NotRegistered,
    /// The payload is over the service's limit.
    MessageTooBig,
    /// The request had no `collapse_key`.
    MissingCollapseKey,
    /// A code this library does not know, kept as the service wrote it.
    Unknown(String),
}

impl ErrorCode {
    /// Reads a code as the service writes it; unknown codes are kept as [`ErrorCode::Unknown`].
    ///
    /// ```
    /// use c2dm_core::ErrorCode;
    /// assert_eq!(ErrorCode::parse("NotRegistered"), ErrorCode::NotRegistered);
    /// assert_eq!(ErrorCode::parse("Whatever"), ErrorCode::Unknown("Whatever".into()));
    /// ```
    pub fn parse(code: &str) -> Self {
        match code {
            "QuotaExceeded" => Self::QuotaExceeded,
            "DeviceQuotaExceeded" => Self::DeviceQuotaExceeded,
            "MissingRegistration" => Self::MissingRegistration,
            "InvalidRegistration" => Self::InvalidRegistration,
            "MismatchSenderId" => Self::MismatchSenderId,
            "NotRegistered" => Self::NotRegistered,
            "MessageTooBig" => Self::MessageTooBig,
            "MissingCollapseKey" => Self::MissingCollapseKey,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// The code as the service writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::QuotaExceeded => "QuotaExceeded",
            Self::DeviceQuotaExceeded => "DeviceQuotaExceeded",
            Self::MissingRegistration => "MissingRegistration",
            Self::InvalidRegistration => "InvalidRegistration",
            Self::MismatchSenderId => "MismatchSenderId",
            Self::NotRegistered => "NotRegistered",
            Self::MessageTooBig => "MessageTooBig",
            Self::MissingCollapseKey => "MissingCollapseKey",
            Self::Unknown(code) => code,
        }
    }

    /// The eight codes the protocol documents.
    pub const KNOWN: [ErrorCode; 8] = [
        Self::QuotaExceeded,
        Self::DeviceQuotaExceeded,
        Self::MissingRegistration,
        Self::InvalidRegistration,
        Self::MismatchSenderId,
        Self::NotRegistered,
        Self::MessageTooBig,
        Self::MissingCollapseKey,
    ];

    /// Whether sending again later may succeed (only the two quota codes).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::QuotaExceeded | Self::DeviceQuotaExceeded)
    }

    /// Whether the registration id is gone for good and should be deleted from the app's store.
    pub fn should_remove_registration(&self) -> bool {
        matches!(self, Self::NotRegistered | Self::InvalidRegistration)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one send attempt did not end with an accepted message.
///
/// [`Error::is_retryable`] and [`Error::should_remove_registration`] answer the two questions every
/// caller has, following the protocol's table.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service answered `Error=<code>`.
    #[error("C2DM rejected the message: {0}")]
    Rejected(ErrorCode),
    /// A protocol's refusal, with what to do about it (the [`Disposition`] of
    /// [`Refusal::disposition`]); C2DM's own codes are [`Error::Rejected`].
    #[error("the service refused the message: {0}")]
    Refused(Refusal),
    /// HTTP 401: the Auth token is invalid or expired; log in again.
    #[error("the auth token was refused (HTTP 401)")]
    Unauthorized,
    /// HTTP 503: the service is temporarily unavailable.
    #[error("C2DM is unavailable (HTTP 503){}", RetryAfterText(*.retry_after))]
    Unavailable {
        /// How long the service asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// HTTP 5xx other than 503 (500 and 502 are undocumented): treated like 503.
    #[error("C2DM server error (HTTP {status}){}", RetryAfterText(*.retry_after))]
    ServerError {
        /// The HTTP status code.
        status: u16,
        /// How long the service asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// A status the protocol does not use (e.g. 404 from a wrong URL): not retried.
    #[error("unexpected HTTP status {status} from the send endpoint")]
    UnexpectedStatus {
        /// The HTTP status code.
        status: u16,
    },
    /// An answer that is neither `id=` nor `Error=`: a protocol error, retried like a 500.
    #[error("malformed answer from the send endpoint (HTTP {status}): {body:?}")]
    MalformedResponse {
        /// The HTTP status code.
        status: u16,
        /// The start of the body, for diagnosis.
        body: String,
    },
    /// The HTTP exchange did not complete.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// No Auth token could be had.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The message's deadline ([`RetryPolicy::with_deadline`](crate::RetryPolicy::with_deadline))
    /// passed before it was accepted.
    #[error("the message's deadline passed before it was accepted{}", LastText(.last.as_deref()))]
    DeadlineExceeded {
        /// The error of the last attempt, if one had failed.
        last: Option<Box<Error>>,
    },
    /// The send was cancelled while it waited (a backoff or a pause); nothing is in flight.
    #[error("cancelled while waiting to send{}", LastText(.last.as_deref()))]
    Cancelled {
        /// The error of the last attempt, if one had failed.
        last: Option<Box<Error>>,
    },
    /// Every send is paused (after a 503 or `QuotaExceeded`) for longer than this message may
    /// wait ([`RetryPolicy::with_max_retry_after`](crate::RetryPolicy::with_max_retry_after)).
    /// Nothing was sent; try again later.
    #[error("every send is paused for {}s more, longer than a message may wait", .remaining.as_secs())]
    Paused {
        /// How long the pause still runs.
        remaining: Duration,
    },
    /// The transport or token provider panicked during the send (a bug there). The request may
    /// have reached the service.
    #[error("the send panicked: {message}")]
    Panicked {
        /// The panic's message, when it had one.
        message: String,
    },
}

struct LastText<'a>(Option<&'a Error>);

impl fmt::Display for LastText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(last) => write!(f, " (last: {last})"),
            None => Ok(()),
        }
    }
}

struct RetryAfterText(Option<Duration>);

impl fmt::Display for RetryAfterText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, ", retry after {}s", d.as_secs()),
            None => Ok(()),
        }
    }
}

impl Error {
    /// Whether sending the same message again may succeed: quota codes, 401 (after a new login),
    /// 5xx, malformed answers, transient transport failures (not a refused certificate),
    /// retryable token failures, a passed deadline and a pause too long to wait out.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rejected(code) => code.is_retryable(),
            Self::Refused(refusal) => refusal.is_retryable(),
            Self::Unauthorized
            | Self::Unavailable { .. }
            | Self::ServerError { .. }
            | Self::MalformedResponse { .. } => true,
            Self::Transport(err) => err.is_retryable(),
            Self::UnexpectedStatus { .. } | Self::Panicked { .. } => false,
            Self::Token(err) => err.is_retryable(),
            // Later, with a new deadline, the send may succeed.
            Self::DeadlineExceeded { .. } | Self::Paused { .. } | Self::Cancelled { .. } => true,
        }
    }

    /// Whether the request may have reached the service even though no answer says it was
    /// accepted: a transport failure after the request may have been written, a panic, or a
    /// deadline that cut such an exchange off.
    pub fn may_have_been_sent(&self) -> bool {
        match self {
            Self::Transport(err) => err.may_have_been_sent(),
            Self::Panicked { .. } => true,
            Self::DeadlineExceeded { last } | Self::Cancelled { last } => {
                last.as_ref().is_some_and(|e| e.may_have_been_sent())
            }
            _ => false,
        }
    }

    /// Whether the registration id is gone (`NotRegistered`, `InvalidRegistration`) and must be
    /// removed from the app's store.
    pub fn should_remove_registration(&self) -> bool {
        match self {
            Self::Rejected(code) => code.should_remove_registration(),
            Self::Refused(refusal) => refusal.should_remove_registration(),
            _ => false,
        }
    }

    /// The code the service answered with, as it wrote it: C2DM's (`NotRegistered`), or
    /// another protocol's (`UNREGISTERED`).
    pub fn code_text(&self) -> Option<&str> {
        match self {
            Self::Rejected(code) => Some(code.as_str()),
            Self::Refused(refusal) => Some(&refusal.code),
            _ => None,
        }
    }

    /// Whether this is the sender's quota running out: C2DM's `QuotaExceeded`, or a refusal
    /// that says so.
    pub fn is_sender_quota(&self) -> bool {
        match self {
            Self::Rejected(code) => *code == ErrorCode::QuotaExceeded,
            Self::Refused(refusal) => refusal.sender_quota,
            _ => false,
        }
    }

    /// Whom the error makes wait: everybody (the service's trouble, or the sender's quota),
    /// one device, or only this send.
    pub(crate) fn pauses(&self) -> Option<Disposition> {
        match self {
            Self::Unavailable { .. }
            | Self::ServerError { .. }
            | Self::MalformedResponse { .. }
            | Self::Rejected(ErrorCode::QuotaExceeded) => Some(Disposition::RetryEveryone),
            Self::Rejected(ErrorCode::DeviceQuotaExceeded) => Some(Disposition::RetryDevice),
            Self::Refused(refusal) if refusal.is_retryable() => Some(refusal.disposition),
            _ => None,
        }
    }

    /// The C2DM error code, when the service answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Rejected(code) => Some(code),
            _ => None,
        }
    }

    /// The `Retry-After` the service sent with a 5xx, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after } | Self::ServerError { retry_after, .. } => {
                *retry_after
            }
            Self::Refused(refusal) => refusal.retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{RequestSent, TransportErrorKind};

    #[test]
    fn codes_round_trip_through_text() {
        for code in ErrorCode::KNOWN {
            assert_eq!(ErrorCode::parse(code.as_str()), code);
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!(ErrorCode::parse("Nope").as_str(), "Nope");
    }

    #[test]
    fn retry_and_removal_follow_the_protocol_table() {
        use ErrorCode::*;
        let table = [
            (QuotaExceeded, true, false),
            (DeviceQuotaExceeded, true, false),
            (MissingRegistration, false, false),
            (InvalidRegistration, false, true),
            (MismatchSenderId, false, false),
            (NotRegistered, false, true),
            (MessageTooBig, false, false),
            (MissingCollapseKey, false, false),
            (Unknown("X".into()), false, false),
        ];
        for (code, retry, remove) in table {
            let err = Error::Rejected(code.clone());
            assert_eq!(err.is_retryable(), retry, "{code}");
            assert_eq!(err.should_remove_registration(), remove, "{code}");
        }
        assert!(Error::Unauthorized.is_retryable());
        assert!(Error::Unavailable { retry_after: None }.is_retryable());
        assert!(
            Error::ServerError {
                status: 500,
                retry_after: None
            }
            .is_retryable()
        );
        assert!(!Error::UnexpectedStatus { status: 404 }.is_retryable());
        assert!(
            Error::Transport(TransportError::new(
                TransportErrorKind::Connect,
                RequestSent::No
            ))
            .is_retryable()
        );
        assert!(!Error::Token(TokenError::Refused).is_retryable());
        for (kind, retry) in [
            (TransportErrorKind::Connect, true),
            (TransportErrorKind::Timeout, true),
            (TransportErrorKind::ConnectionLost, true),
            (TransportErrorKind::Other, true),
            (TransportErrorKind::Tls, false),
            (TransportErrorKind::InvalidRequest, false),
            (TransportErrorKind::BodyTooLarge, false),
        ] {
            let err = Error::Transport(TransportError::new(kind, RequestSent::No));
            assert_eq!(err.is_retryable(), retry, "{kind:?}");
        }
    }

    #[test]
    fn display_is_readable() {
        assert_eq!(
            Error::Unavailable {
                retry_after: Some(Duration::from_secs(30))
            }
            .to_string(),
            "C2DM is unavailable (HTTP 503), retry after 30s"
        );
        assert_eq!(
            Error::Rejected(ErrorCode::NotRegistered).to_string(),
            "C2DM rejected the message: NotRegistered"
        );
    }
}
