//! The protocol seam: what a push protocol must say for the send machine, the [`Sender`] and a
//! broadcast to work for it. C2DM ([`C2dm`]) is one protocol and the default; `c2dm-fcm` is
//! another.
//!
//! A protocol turns a message and a token into a request, and an answer into one of the
//! machine's outcomes: accepted with an id; the token refused ([`Error::Unauthorized`]) or
//! rotated ([`SendReply::rotated_token`]); the service unavailable or failing, for everyone
//! ([`Error::Unavailable`], [`Error::ServerError`], [`Error::MalformedResponse`]); or refused, with
//! what to do about it ([`Error::Rejected`] for C2DM's codes, [`Error::Refused`] with a
//! [`Disposition`] for any protocol's).
//!
//! [`Sender`]: crate::Sender

use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response, Uri};

use crate::codec::{self, SendReply};
use crate::error::Error;
pub use crate::error::{Disposition, Refusal};
use crate::message::{Message, RegistrationId};
use crate::token::AuthToken;

/// A push protocol, as the [`Sender`](crate::Sender) drives it.
pub trait Protocol: Send + Sync + 'static {
    /// The message this protocol sends.
    type Message: Clone + Send + Sync + 'static;

    /// Where a message goes: the device (or, for a protocol that has them, the topic) that
    /// device pauses and a broadcast's deliveries are keyed by.
    fn device(message: &Self::Message) -> &RegistrationId;

    /// `template` to another device: how a broadcast fans one message out.
    fn to_device(template: &Self::Message, device: RegistrationId) -> Self::Message;

    /// Where messages go unless the sender is told otherwise.
    fn default_endpoint(&self) -> Uri;

    /// The request that sends `message` with `token` to `endpoint`. The token's header must be
    /// marked sensitive.
    fn encode(&self, message: &Self::Message, token: &AuthToken, endpoint: &Uri) -> Request<Bytes>;

    /// Reads an answer (at `now`, for a `Retry-After` date). Must not panic, whatever the
    /// answer.
    fn decode(&self, response: &Response<Bytes>, now: SystemTime) -> SendReply;

    /// The sends per second the service allows a sender by default, for a protocol whose
    /// service publishes one: what a broadcast keeps to unless told otherwise. `None` (the
    /// default): no published rate.
    fn default_rate(&self) -> Option<u32> {
        None
    }
}

/// C2DM, the default protocol: a form POST with `GoogleLogin auth=`, answered `id=` or
/// `Error=` (see [`codec`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct C2dm;

impl Protocol for C2dm {
    type Message = Message;

    fn device(message: &Message) -> &RegistrationId {
        message.registration_id()
    }

    fn to_device(template: &Message, device: RegistrationId) -> Message {
        template.with_registration_id(device)
    }

    fn default_endpoint(&self) -> Uri {
        codec::default_send_uri()
    }

    fn encode(&self, message: &Message, token: &AuthToken, endpoint: &Uri) -> Request<Bytes> {
        codec::encode_send_request(message, token, endpoint)
    }

    fn decode(&self, response: &Response<Bytes>, now: SystemTime) -> SendReply {
        codec::decode_response(response, now)
    }
}

/// The reply of an answer that is only an error.
pub fn error_reply(error: Error) -> SendReply {
    SendReply {
        result: Err(error),
        rotated_token: None,
    }
}
