//! What one send comes to: [`Sent`] or [`SendError`], and the bookkeeping both carry, [`AttemptTally`].

use std::time::Duration;

use crate::error::Error;
use crate::message::MessageId;

/// What one message's send cost: the bookkeeping that [`Sent`], [`SendError`] and a
/// broadcast's [`Delivery`](crate::Delivery) all carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttemptTally {
    /// Requests made (0 when the message was never sent).
    pub attempts: u32,
    /// Time spent waiting: backoff, `Retry-After`, and pauses set by other sends.
    pub waited: Duration,
    /// Resends after a failure that may have reached the server: each one may have delivered the
    /// message once more.
    pub possible_duplicates: u32,
}

/// A message the service accepted, and what it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The id the service gave the message.
    pub message_id: MessageId,
    /// Attempts made (this one included), time waited, possible duplicates.
    pub tally: AttemptTally,
}

/// A message that was not accepted, with the final error and what was tried.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{error} (after {} attempt{}{})",
    .tally.attempts,
    if .tally.attempts == 1 { "" } else { "s" },
    if self.possibly_delivered() { "; it may have been delivered" } else { "" }
)]
pub struct SendError {
    /// Why the last attempt failed.
    #[source]
    pub error: Error,
    /// Attempts made, time waited, possible duplicates.
    pub tally: AttemptTally,
}

impl SendError {
    /// Whether the registration id is gone and must be removed from the app's store.
    pub fn should_remove_registration(&self) -> bool {
        self.error.should_remove_registration()
    }

    /// Whether sending the message later may still succeed (e.g. attempts ran out on a 503).
    pub fn is_retryable(&self) -> bool {
        self.error.is_retryable()
    }

    /// Whether the device may have received the message even though it was not confirmed.
    pub fn possibly_delivered(&self) -> bool {
        self.tally.possible_duplicates > 0 || self.error.may_have_been_sent()
    }
}
