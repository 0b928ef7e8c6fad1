//! What FCM's send endpoint can answer besides a message name, typed by what a sender does
//! about it.

use std::fmt;
use std::time::Duration;

/// The least a `QUOTA_EXCEEDED` makes a sender wait, whatever `Retry-After` says: Google asks
/// for at least a minute.
pub const MIN_QUOTA_BACKOFF: Duration = Duration::from_secs(60);

/// Whose sends a `QUOTA_EXCEEDED` stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaScope {
    /// The project's rate (or a topic's): every send of the sender waits.
    Project,
    /// The device's rate: sends to this token wait.
    Device,
}

/// What a sender does about an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// The device is gone (or its token was never valid): remove it, do not retry.
    RemoveDevice,
    /// The message itself is wrong: no retry fixes it.
    Permanent,
    /// The sender's setup is wrong (another project's token, the API or its credentials not
    /// allowed): no retry fixes it, and no other message will go either.
    Configuration,
    /// The access token was refused: renew it and send again.
    RenewToken,
    /// Try again later; everyone waits for the service.
    RetryEveryone,
    /// Try again later; sends to this device wait.
    RetryDevice,
}

/// An error answer of the send endpoint (or one it should not have given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FcmError {
    /// `UNREGISTERED` (404): the app was uninstalled or its token expired.
    #[error("FCM: the registration token is no longer registered (UNREGISTERED)")]
    Unregistered,
    /// `INVALID_ARGUMENT` (400) about the registration token: it is not one FCM gave.
    #[error("FCM: the registration token is not valid (INVALID_ARGUMENT): {message}")]
    InvalidToken {
        /// FCM's words.
        message: String,
    },
    /// `INVALID_ARGUMENT` (400) about the message: a field FCM refused.
    #[error("FCM refused the message (INVALID_ARGUMENT){}: {message}", FieldText(.field.as_deref()))]
    InvalidMessage {
        /// The field FCM named, as `message.data[0].value`, if it did.
        field: Option<String>,
        /// FCM's words.
        message: String,
    },
    /// `SENDER_ID_MISMATCH` (403): the token belongs to another project.
    #[error("FCM: the registration token belongs to another project (SENDER_ID_MISMATCH)")]
    SenderIdMismatch,
    /// `QUOTA_EXCEEDED` (429): too many messages, for the project or for the device.
    #[error("FCM: quota exceeded for the {} (QUOTA_EXCEEDED); retry after {}s", ScopeText(*.scope), .retry_after.as_secs())]
    QuotaExceeded {
        /// Whose rate it is.
        scope: QuotaScope,
        /// How long to wait: `Retry-After`, at least [`MIN_QUOTA_BACKOFF`].
        retry_after: Duration,
    },
    /// `UNAVAILABLE` (503): the service is overloaded.
    #[error("FCM is unavailable (UNAVAILABLE){}", RetryText(*.retry_after))]
    Unavailable {
        /// How long the service asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// `INTERNAL` (500), or another 5xx: the service failed.
    #[error("FCM failed (HTTP {status}){}", RetryText(*.retry_after))]
    Internal {
        /// The HTTP status.
        status: u16,
        /// How long the service asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// `THIRD_PARTY_AUTH_ERROR` (401): the APNs or Web Push credentials of the project are
    /// wrong. A configuration fault, not the access token's.
    #[error(
        "FCM: the project's third-party credentials were refused (THIRD_PARTY_AUTH_ERROR): {message}"
    )]
    ThirdPartyAuth {
        /// FCM's words.
        message: String,
    },
    /// 401 `UNAUTHENTICATED`: the access token expired or is not valid.
    #[error("FCM refused the access token (HTTP 401)")]
    Unauthenticated,
    /// 403 `PERMISSION_DENIED`: the service account may not send for this project (or the API
    /// is not enabled for it).
    #[error("FCM: permission denied (HTTP 403): {message}")]
    PermissionDenied {
        /// FCM's words.
        message: String,
    },
    /// 404 other than `UNREGISTERED`: most often a wrong project id in the send URL.
    #[error("FCM: not found (HTTP 404): {message}")]
    NotFound {
        /// FCM's words.
        message: String,
    },
    /// A status FCM does not document for a send.
    #[error("FCM answered HTTP {status}{}: {message}", CodeText(.status_code.as_deref()))]
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
        /// The google.rpc status (`FAILED_PRECONDITION`, …), if the body had one.
        status_code: Option<String>,
        /// FCM's words, or the start of the body.
        message: String,
    },
    /// An answer that is not what FCM writes: retried like a 500.
    #[error("malformed answer from FCM (HTTP {status}): {body:?}")]
    Malformed {
        /// The HTTP status.
        status: u16,
        /// The start of the body, for diagnosis.
        body: String,
    },
}

impl FcmError {
    /// What a sender does about it.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Unregistered | Self::InvalidToken { .. } => Disposition::RemoveDevice,
            Self::InvalidMessage { .. } => Disposition::Permanent,
            Self::SenderIdMismatch
            | Self::ThirdPartyAuth { .. }
            | Self::PermissionDenied { .. }
            | Self::NotFound { .. } => Disposition::Configuration,
            Self::Unauthenticated => Disposition::RenewToken,
            Self::QuotaExceeded {
                scope: QuotaScope::Device,
                ..
            } => Disposition::RetryDevice,
            Self::QuotaExceeded { .. }
            | Self::Unavailable { .. }
            | Self::Internal { .. }
            | Self::Malformed { .. } => Disposition::RetryEveryone,
            Self::UnexpectedStatus { status, .. } if *status == 429 || *status >= 500 => {
                Disposition::RetryEveryone
            }
            Self::UnexpectedStatus { .. } => Disposition::Permanent,
        }
    }

    /// Whether sending again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.disposition(),
            Disposition::RenewToken | Disposition::RetryEveryone | Disposition::RetryDevice
        )
    }

    /// Whether the device's token is gone for good and should be deleted.
    pub fn should_remove_registration(&self) -> bool {
        self.disposition() == Disposition::RemoveDevice
    }

    /// How long the service asked to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::QuotaExceeded { retry_after, .. } => Some(*retry_after),
            Self::Unavailable { retry_after } | Self::Internal { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// FCM's error code as it writes it (`UNREGISTERED`, `QUOTA_EXCEEDED`, …), or for an answer
    /// without one, what this library calls it.
    pub fn code(&self) -> &str {
        match self {
            Self::Unregistered => "UNREGISTERED",
            Self::InvalidToken { .. } | Self::InvalidMessage { .. } => "INVALID_ARGUMENT",
            Self::SenderIdMismatch => "SENDER_ID_MISMATCH",
            Self::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Self::Unavailable { .. } => "UNAVAILABLE",
            Self::Internal { .. } => "INTERNAL",
            Self::ThirdPartyAuth { .. } => "THIRD_PARTY_AUTH_ERROR",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied { .. } => "PERMISSION_DENIED",
            Self::NotFound { .. } => "NOT_FOUND",
            Self::UnexpectedStatus { status_code, .. } => {
                status_code.as_deref().unwrap_or("UNEXPECTED_STATUS")
            }
            Self::Malformed { .. } => "MALFORMED_RESPONSE",
        }
    }
}

struct RetryText(Option<Duration>);

impl fmt::Display for RetryText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(after) => write!(f, "; retry after {}s", after.as_secs()),
            None => Ok(()),
        }
    }
}

struct ScopeText(QuotaScope);

impl fmt::Display for ScopeText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            QuotaScope::Project => "project",
            QuotaScope::Device => "device",
        })
    }
}

struct FieldText<'a>(Option<&'a str>);

impl fmt::Display for FieldText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => write!(f, " at {field}"),
            None => Ok(()),
        }
    }
}

struct CodeText<'a>(Option<&'a str>);

impl fmt::Display for CodeText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => write!(f, " ({code})"),
            None => Ok(()),
        }
    }
}
