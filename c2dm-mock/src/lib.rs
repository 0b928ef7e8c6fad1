//! Test doubles for code that sends C2DM push messages: no network, no real sleeping.
//!
//! - [`RecordingTransport`]: a fake service that records every request, decodes it back into a
//!   message, and answers from a script (per registration id, one-off replies, faults, token
//!   rotation and refusal, ClientLogin accounts).
//! - [`NeverTransport`]: a transport that never answers, for timeout tests.
//! - [`MockTransport`]: mockall's generated mock, for those who prefer expectations.
//! - `conformance` (feature `conformance`): the kit that tells the author of a transport whether
//!   it is right, case by case, against loopback servers of its own.
//!
//! The story "when an order ships, device X gets `message=shipped` under collapse key `orders`":
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use c2dm_core::{AuthToken, Message, Sender, StaticToken};
//! use c2dm_mock::RecordingTransport;
//!
//! // The application code under test.
//! async fn ship(sender: &Sender, device: &str) -> Result<(), Box<dyn std::error::Error>> {
//!     let message = Message::builder(device)
//!         .collapse_key("orders")
//!         .data("message", "shipped")
//!         .build()?;
//!     sender.send(message).await?;
//!     Ok(())
//! }
//!
//! let fake = RecordingTransport::new();
//! let sender = Sender::new(fake.clone(), StaticToken::new(AuthToken::new("test-token")?));
//! ship(&sender, "device-1").await?;
//!
//! let sent = fake.sent_to("device-1");
//! assert_eq!(sent.len(), 1);
//! assert_eq!(sent[0].collapse_key(), Some("orders"));
//! assert_eq!(sent[0].data("message"), Some("shipped"));
//! assert_eq!(sent[0].token().map(|t| t.expose_secret().to_owned()), Some("test-token".into()));
//! # Ok(())
//! # }
//! ```
//!
//! The story "when C2DM says NotRegistered, the device is deleted":
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::collections::BTreeSet;
//! use c2dm_core::{AuthToken, ErrorCode, Message, Sender, StaticToken};
//! use c2dm_mock::RecordingTransport;
//!
//! let mut devices: BTreeSet<String> = ["gone-device", "device-1"].map(String::from).into();
//! let fake = RecordingTransport::new().reply_to("gone-device", ErrorCode::NotRegistered);
//! let sender = Sender::new(fake.clone(), StaticToken::new(AuthToken::new("t")?));
//!
//! for device in devices.clone() {
//!     let message = Message::builder(&device).collapse_key("news").build()?;
//!     if let Err(failure) = sender.send(message).await {
//!         if failure.should_remove_registration() {
//!             devices.remove(&device);
//!         }
//!     }
//! }
//! assert_eq!(devices, BTreeSet::from(["device-1".to_string()]));
//! assert_eq!(fake.sent_to("gone-device").len(), 1); // never retried
//! # Ok(())
//! # }
//! ```
//!
//! With mockall expectations instead:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use c2dm_core::{AuthToken, Message, Sender, StaticToken};
//! use c2dm_mock::MockTransport;
//!
//! let mut mock = MockTransport::new();
//! mock.expect_execute()
//!     .withf(|request| request.body().starts_with(b"registration_id=device-1&"))
//!     .times(1)
//!     .returning(|_| Ok(http::Response::new(Bytes::from_static(b"id=0:7"))));
//! let sender = Sender::new(mock, StaticToken::new(AuthToken::new("t")?));
//! let message = Message::builder("device-1").collapse_key("k").build()?;
//! assert_eq!(sender.send(message).await?.message_id.as_str(), "0:7");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod recording;

pub use c2dm_core::{MockTokenProvider, MockTransport};
pub use recording::{LoginReply, LoginRequest, RecordingTransport, Reply, RetryAfter, SentRequest};

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_core::{Transport, TransportError};

/// A transport that never answers: every request waits forever.
///
/// Use it to test timeouts: wrap the send in `tokio::time::timeout` under paused time, or give it
/// to code whose own timeout you want to see fire.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use c2dm_core::Transport;
/// let never = c2dm_mock::NeverTransport;
/// let request = http::Request::new(bytes::Bytes::new());
/// let result = tokio::time::timeout(Duration::from_secs(30), never.execute(request)).await;
/// assert!(result.is_err()); // timed out, instantly, under paused time
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverTransport;

#[async_trait]
impl Transport for NeverTransport {
    async fn execute(
        &self,
        _request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        std::future::pending().await
    }
}
