//! Firebase Cloud Messaging HTTP v1, C2DM's living successor, for c2dm-rs: the message,
//! validated when built; the send endpoint's wire format as pure functions, every error typed by
//! what a sender does about it; and access tokens from a service account's key.
//!
//! - [`FcmMessage`]: exactly one target (a registration token, a topic or a condition), data
//!   pairs, a notification, and Android's collapse key, priority, time to live and package.
//!   [`FcmMessage::from_c2dm`] maps a C2DM message.
//! - [`codec`]: [`encode_send_request`](codec::encode_send_request) and
//!   [`decode_send_answer`](codec::decode_send_answer), with the emulator's side.
//! - [`FcmError`] and its [`Disposition`]: remove the device, a fault no retry fixes, a
//!   configuration fault, renew the token, or retry after a time, for everyone or one device.
//! - [`Fcm`]: FCM as a [`Protocol`](c2dm_core::Protocol), for c2dm-core's `Sender` and
//!   broadcast, with every rule they keep for C2DM (retries, pauses for everyone or one
//!   device, the token renewed on a 401, gone devices reported).
//! - [`ServiceAccountKey`] and [`ServiceAccountTokens`]: the key file, the signed assertion
//!   (RS256, with ring), and a [`TokenProvider`](c2dm_core::TokenProvider) over any
//!   [`Transport`](c2dm_core::Transport) that renews before expiry, once for every send waiting.
//!
//! ```
//! use std::time::SystemTime;
//! use c2dm_core::AuthToken;
//! use c2dm_fcm::{FcmMessage, codec};
//!
//! let message = FcmMessage::builder().token("device-token").data("order", "shipped").build()?;
//! let uri = codec::send_uri(codec::DEFAULT_BASE_URL, "my-project")?;
//! let request = codec::encode_send_request(&message, &AuthToken::new("ya29.token")?, &uri, false);
//! assert_eq!(request.headers()["authorization"], "Bearer ya29.token");
//! let answer = http::Response::new(bytes::Bytes::from_static(
//!     br#"{"name": "projects/my-project/messages/0:1"}"#,
//! ));
//! let name = codec::decode_send_answer(&answer, SystemTime::now())?;
//! assert_eq!(name.id(), "0:1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The repository's `docs/PROTOCOL.md` describes the protocol and how it maps to C2DM's.

pub mod codec;
mod error;
mod key;
mod message;
mod protocol;
mod token;

pub use codec::MessageName;
pub use error::{Disposition, FcmError, MIN_QUOTA_BACKOFF, QuotaScope};
pub use key::{
    ASSERTION_LIFETIME, AssertionError, Claims, FCM_SCOPE, KeyError, ServiceAccountKey,
    verify_assertion,
};
pub use message::{
    FcmMessage, FcmMessageBuilder, FcmMessageError, MAX_PAYLOAD, MAX_TARGET, MAX_TOPIC_PAYLOAD,
    MAX_TTL, Notification, Priority, RESERVED_KEYS, RESERVED_PREFIXES, Target, duration_text,
    is_reserved,
};
pub use protocol::{DEFAULT_RATE, Fcm, core_error};
pub use token::{
    AccessToken, JWT_BEARER_GRANT, RENEW_BEFORE, ServiceAccountTokens, TokenEndpointError,
    decode_token_answer, encode_token_request,
};
