//! FCM HTTP v1 as a [`Protocol`] of c2dm-core: the same [`Sender`](c2dm_core::Sender), send
//! machine and broadcast as C2DM's, FCM's answers read as the machine's outcomes.

use std::time::SystemTime;

use bytes::Bytes;
use c2dm_core::codec::SendReply;
use c2dm_core::{AuthToken, Error, Protocol, Refusal, RegistrationId};
use http::{Request, Response, Uri};

use crate::codec::{self, InvalidProjectId};
use crate::error::{Disposition, FcmError, QuotaScope};
use crate::message::FcmMessage;

/// Messages a second FCM allows a project by default: its quota of 600,000 a minute.
pub const DEFAULT_RATE: u32 = 10_000;

/// FCM HTTP v1 for one project, as a [`Protocol`]:
/// `Sender::with_protocol(Fcm::new("my-project")?, transport, tokens)`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use bytes::Bytes;
/// use c2dm_core::{AuthToken, Sender, StaticToken};
/// use c2dm_fcm::{Fcm, FcmMessage};
///
/// let fcm = |request: http::Request<Bytes>| async move {
///     assert_eq!(request.uri(), "https://fcm.googleapis.com/v1/projects/my-project/messages:send");
///     Ok(http::Response::new(Bytes::from_static(br#"{"name": "projects/my-project/messages/7"}"#)))
/// };
/// let sender = Sender::with_protocol(Fcm::new("my-project")?, fcm, StaticToken::new(AuthToken::new("ya29.t")?))
///     .build();
/// let sent = sender.send(FcmMessage::builder().token("device").data("k", "v").build()?).await?;
/// assert_eq!(sent.message_id.as_str(), "projects/my-project/messages/7");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fcm {
    project_id: String,
    validate_only: bool,
}

impl Fcm {
    /// FCM for `project_id`, at Google's endpoint unless the sender is told otherwise.
    pub fn new(project_id: impl Into<String>) -> Result<Self, InvalidProjectId> {
        let project_id = project_id.into();
        codec::send_uri(codec::DEFAULT_BASE_URL, &project_id)?;
        Ok(Self {
            project_id,
            validate_only: false,
        })
    }

    /// Asks FCM to check each message and send nothing (a dry run).
    pub fn validate_only(mut self, validate_only: bool) -> Self {
        self.validate_only = validate_only;
        self
    }

    /// The project.
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// The send URL of this project on `base` (an emulator's, say).
    pub fn send_uri(&self, base: &str) -> Uri {
        codec::send_uri(base, &self.project_id)
            .unwrap_or_else(|_| unreachable!("the project id was checked when made"))
    }
}

/// An FCM error as the send machine's: the token refused, the service failing (everyone
/// waits), or a refusal with what to do about it.
pub fn core_error(error: FcmError) -> Error {
    let disposition = match error.disposition() {
        Disposition::RenewToken => return Error::Unauthorized,
        Disposition::RemoveDevice => c2dm_core::Disposition::RemoveDevice,
        Disposition::Permanent => c2dm_core::Disposition::Permanent,
        Disposition::Configuration => c2dm_core::Disposition::Configuration,
        Disposition::RetryEveryone => c2dm_core::Disposition::RetryEveryone,
        Disposition::RetryDevice => c2dm_core::Disposition::RetryDevice,
    };
    match error {
        FcmError::Unavailable { retry_after } => Error::Unavailable { retry_after },
        FcmError::Internal {
            status,
            retry_after,
        } => Error::ServerError {
            status,
            retry_after,
        },
        FcmError::Malformed { status, body } => Error::MalformedResponse { status, body },
        error => Error::Refused(Refusal {
            code: error.code().to_owned(),
            message: error.to_string(),
            disposition,
            retry_after: error.retry_after(),
            sender_quota: matches!(
                error,
                FcmError::QuotaExceeded {
                    scope: QuotaScope::Project,
                    ..
                }
            ),
        }),
    }
}

impl Protocol for Fcm {
    type Message = FcmMessage;

    fn device(message: &FcmMessage) -> &RegistrationId {
        message.device()
    }

    fn to_device(template: &FcmMessage, device: RegistrationId) -> FcmMessage {
        template.to_device(device)
    }

    fn default_endpoint(&self) -> Uri {
        self.send_uri(codec::DEFAULT_BASE_URL)
    }

    fn encode(&self, message: &FcmMessage, token: &AuthToken, endpoint: &Uri) -> Request<Bytes> {
        codec::encode_send_request(message, token, endpoint, self.validate_only)
    }

    /// FCM's default quota: 600,000 messages a minute per project.
    fn default_rate(&self) -> Option<u32> {
        Some(DEFAULT_RATE)
    }

    fn decode(&self, response: &Response<Bytes>, now: SystemTime) -> SendReply {
        let result = codec::decode_send_answer(response, now)
            .map(|name| c2dm_core::MessageId::new(name.as_str()))
            .map_err(core_error);
        SendReply {
            result,
            rotated_token: None,
        }
    }
}
