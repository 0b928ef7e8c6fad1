//! The core of c2dm-rs: the vocabulary and the policy of Google's Cloud to Device Messaging
//! (C2DM) protocol, with no I/O of its own.
//!
//! - [`Message`] is validated when built, so nothing invalid can be sent.
//! - [`codec`] turns a message into an `http::Request` and an answer into a typed result, byte
//!   for byte as the protocol says, as pure functions.
//! - [`Error`] and [`ErrorCode`] say what went wrong and whether to retry or remove the device.
//! - [`Transport`] is the seam to an HTTP stack; [`TokenProvider`] is where the Auth token comes
//!   from.
//! - [`Protocol`] is the seam to a push protocol: C2DM ([`C2dm`]) is the default, and the same
//!   [`Sender`] and broadcast drive any other (`c2dm-fcm`'s FCM HTTP v1), whose refusals are
//!   [`Error::Refused`].
//!
//! ```
//! use c2dm_core::{AuthToken, Message, codec};
//!
//! let message = Message::builder("APA91b-registration-id")
//!     .collapse_key("orders")
//!     .data("message", "shipped")
//!     .build()?; // invalid input stops here
//! let token = AuthToken::new("DQAAAGgA")?;
//! let request = codec::encode_send_request(&message, &token, &codec::default_send_uri());
//! assert_eq!(request.uri(), "https://android.apis.google.com/c2dm/send");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod broadcast;
pub mod codec;
mod error;
pub mod machine;
mod message;
pub mod protocol;
mod report;
pub mod retry;
mod sender;
mod sent;
mod token;
mod token_cache;
mod transport;

pub use broadcast::{
    Broadcast, BroadcastError, BroadcastOptions, CancelHandle, Delivery, NotAttempted, Outcome,
    OutcomeKind,
};
pub use error::{Error, ErrorCode};
pub use message::{
    CollapseKey, DEFAULT_PAYLOAD_LIMIT, MAX_REGISTRATION_ID, Message, MessageBuilder, MessageError,
    MessageId, RegistrationId, payload_size,
};
pub use protocol::{C2dm, Disposition, Protocol, Refusal};
pub use report::DeliveryReport;
pub use retry::{RetryDecision, RetryPolicy};
pub use sender::{Sender, SenderBuilder};
pub use sent::{AttemptTally, SendError, Sent};
#[cfg(any(test, feature = "mock"))]
pub use token::MockTokenProvider;
pub use token::{AuthToken, InvalidToken, StaticToken, TokenError, TokenProvider};
pub use token_cache::{Login, TokenCache};
#[cfg(any(test, feature = "mock"))]
pub use transport::MockTransport;
pub use transport::{RequestSent, Transport, TransportError, TransportErrorKind};
