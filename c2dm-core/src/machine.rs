//! The send rules as a state machine with no I/O: answers and the time in, the next step out.
//!
//! [`SendMachine`] holds what one message's send has learned and decides every step of it: when
//! to send, when to wait, when to ask for a new token, whom a failure pauses, and when to stop.
//! It never sleeps, reads a clock or touches the network, so every rule is testable with plain
//! values (as `quinn-proto`'s `Connection` takes `now`). [`Sender`](crate::Sender) drives it with
//! a [`Transport`](crate::Transport), a [`TokenProvider`](crate::TokenProvider) and tokio's clock.
//!
//! ```
//! use std::time::Duration;
//! use c2dm_core::machine::{Action, BeforeAttempt, SendMachine, Pause};
//! use c2dm_core::{Error, RetryPolicy, retry::Jitter};
//! use tokio::time::Instant;
//!
//! let policy = RetryPolicy::default().with_jitter(Jitter::None);
//! let start = Instant::now();
//! let mut machine = SendMachine::new(&policy, start);
//! assert!(matches!(machine.before_attempt(None, start), BeforeAttempt::Send { .. }));
//! // A 503 with Retry-After: 30 pauses every send for 30 s, and this one tries again then.
//! let step = machine.on_reply(
//!     Err(Error::Unavailable { retry_after: Some(Duration::from_secs(30)) }),
//!     false,
//!     start,
//!     0.5,
//! );
//! let later = start + Duration::from_secs(30);
//! assert_eq!(step.pause, Some(Pause::Everyone { until: later }));
//! assert!(matches!(step.action, Action::RetryAt(at) if at == later));
//! ```

use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::message::MessageId;
use crate::protocol::Disposition;
use crate::retry::RetryPolicy;
pub use crate::sent::AttemptTally;
use crate::sent::{SendError, Sent};

/// Who must wait because of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Every send of the sender (503, 500, 502, malformed answers, `QuotaExceeded`).
    Everyone {
        /// When sends may start again.
        until: Instant,
    },
    /// Every send to this message's registration id (`DeviceQuotaExceeded`).
    Device {
        /// When sends to the device may start again.
        until: Instant,
    },
}

/// What the driver does before an attempt.
#[derive(Debug)]
pub enum BeforeAttempt {
    /// Send now; cut the exchange off at `deadline` if there is one.
    Send {
        /// The message's deadline: an exchange still open then is abandoned.
        deadline: Option<Instant>,
    },
    /// A pause is in force: wait until this instant, then ask again.
    WaitUntil(Instant),
    /// Waiting out the pause would pass the message's deadline or the longest wait allowed:
    /// the message fails now, with this error.
    GiveUp(SendError),
}

/// What to do after an answer.
#[derive(Debug)]
pub enum Action {
    /// The send is over: accepted, or failed for good.
    Finish(Result<Sent, SendError>),
    /// Try again at this instant (after [`SendMachine::before_attempt`] again).
    RetryAt(Instant),
    /// The token was refused: get a new one from the token provider (its `refresh`, with the
    /// token that was refused) and send again at once.
    RefreshToken,
}

/// The step after an answer: what this send does, and whom the answer pauses. A pause holds
/// even when the send itself gives up, so the others do not run into the same wall.
#[derive(Debug)]
#[must_use]
pub struct Step {
    /// What this send does next.
    pub action: Action,
    /// Whom to pause, and until when.
    pub pause: Option<Pause>,
}

/// The rules for one message's send, with no I/O: see the [module docs](self).
///
/// The driver calls [`before_attempt`](Self::before_attempt) with the pauses in force, makes the
/// attempt when told to, and hands the answer to [`on_reply`](Self::on_reply). The machine counts
/// attempts and waits, decides retries (bounded attempts, backoff with jitter, `Retry-After`,
/// the message's deadline), the 401 rule, and who must pause.
#[derive(Debug, Clone)]
pub struct SendMachine<'p> {
    policy: &'p RetryPolicy,
    tally: AttemptTally,
    /// Attempts that count against `max_attempts`: all but those answered 401, which the 401
    /// rule bounds instead.
    counted: u32,
    /// Resends because the token expired under the message (a 401 on a token that had worked).
    renewals: u32,
    /// Consecutive 401s on tokens that never worked.
    unproven_refusals: u32,
    deadline: Option<Instant>,
    waiting_since: Option<Instant>,
    last_error: Option<Error>,
}

/// The latest instant this machine uses: about thirty years from `now` (so `now + delay` never
/// overflows, whatever a server asked for).
pub(crate) fn saturating_add(now: Instant, delay: Duration) -> Instant {
    const FOREVER: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    let mut delay = delay.min(FOREVER);
    loop {
        if let Some(at) = now.checked_add(delay) {
            return at;
        }
        delay /= 2;
    }
}

impl<'p> SendMachine<'p> {
    /// A send starting at `now` under `policy` (its deadline counts from `now`).
    pub fn new(policy: &'p RetryPolicy, now: Instant) -> Self {
        Self {
            policy,
            tally: AttemptTally::default(),
            counted: 0,
            renewals: 0,
            unproven_refusals: 0,
            deadline: policy.deadline().map(|d| saturating_add(now, d)),
            waiting_since: None,
            last_error: None,
        }
    }

    /// What the send has cost so far.
    pub fn tally(&self) -> AttemptTally {
        self.tally
    }

    /// The message's deadline, if the policy sets one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn fail(&self, error: Error) -> SendError {
        SendError {
            error,
            tally: self.tally,
        }
    }

    fn deadline_exceeded(&self) -> SendError {
        self.fail(Error::DeadlineExceeded {
            last: self.last_error.clone().map(Box::new),
        })
    }

    /// The send was cancelled while waiting (before an attempt, or between two): its failure,
    /// with what it cost and the last attempt's error.
    pub fn cancelled(&mut self, now: Instant) -> SendError {
        if let Some(since) = self.waiting_since.take() {
            self.tally.waited += now.saturating_duration_since(since);
        }
        self.fail(Error::Cancelled {
            last: self.last_error.clone().map(Box::new),
        })
    }

    /// Before each attempt: `paused_until` is the latest of the pauses in force for this message
    /// (everyone's and its device's), if any. Counts the time waited since the last call.
    pub fn before_attempt(&mut self, paused_until: Option<Instant>, now: Instant) -> BeforeAttempt {
        if let Some(since) = self.waiting_since.take() {
            self.tally.waited += now.saturating_duration_since(since);
        }
        if self.deadline.is_some_and(|deadline| now >= deadline) {
            return BeforeAttempt::GiveUp(self.deadline_exceeded());
        }
        match paused_until {
            Some(until) if until > now => {
                if self.deadline.is_some_and(|deadline| until >= deadline) {
                    return BeforeAttempt::GiveUp(self.deadline_exceeded());
                }
                let remaining = until - now;
                if remaining > self.policy.max_retry_after() {
                    return BeforeAttempt::GiveUp(self.fail(Error::Paused { remaining }));
                }
                self.waiting_since = Some(now);
                BeforeAttempt::WaitUntil(until)
            }
            _ => {
                self.tally.attempts += 1;
                BeforeAttempt::Send {
                    deadline: self.deadline,
                }
            }
        }
    }

    /// After an attempt: its answer (`Err(Error::Token(..))` when no token could be had),
    /// whether the token it carried had been accepted (some message was accepted with it; the
    /// driver also counts the token this attempt's refresh replaced, read at this moment), the
    /// time, and `unit`, a random number in `[0, 1)` for the jitter.
    pub fn on_reply(
        &mut self,
        reply: Result<MessageId, Error>,
        token_had_worked: bool,
        now: Instant,
        unit: f64,
    ) -> Step {
        let error = match reply {
            Ok(message_id) => {
                return Step {
                    action: Action::Finish(Ok(Sent {
                        message_id,
                        tally: self.tally,
                    })),
                    pause: None,
                };
            }
            Err(error) => error,
        };
        if matches!(error, Error::Unauthorized) {
            return self.on_unauthorized(token_had_worked);
        }
        if matches!(error, Error::Token(_)) {
            // No token, so no request: not an attempt to report, though it counts against
            // `max_attempts` below so that a login that keeps failing ends the send.
            self.tally.attempts = self.tally.attempts.saturating_sub(1);
        }
        self.unproven_refusals = 0;
        self.counted += 1;
        let delay = self.policy.delay(self.counted, &error, unit);
        let until = saturating_add(now, delay);
        let pause = match PauseScope::of(&error) {
            PauseScope::Everyone => Some(Pause::Everyone { until }),
            PauseScope::Device => Some(Pause::Device { until }),
            PauseScope::This => None,
        };
        let action = if !self.policy.may_retry(self.counted, &error) {
            tracing::debug!(attempts = self.tally.attempts, %error, "send failed");
            Action::Finish(Err(self.fail(error)))
        } else if self.deadline.is_some_and(|deadline| until >= deadline) {
            self.last_error = Some(error);
            Action::Finish(Err(self.deadline_exceeded()))
        } else {
            if matches!(&error, Error::Transport(t) if t.may_have_been_sent()) {
                self.tally.possible_duplicates += 1;
            }
            tracing::debug!(
                attempts = self.tally.attempts,
                %error,
                delay_ms = delay.as_millis() as u64,
                "retrying"
            );
            self.last_error = Some(error);
            self.waiting_since = Some(now);
            Action::RetryAt(until)
        };
        Step { action, pause }
    }

    /// The 401 rule. A token that had worked was refused because it expired (other sends used
    /// it up, or its login aged): ask for a new one and try again, without counting the attempt
    /// against `max_attempts` (bounded by `max_token_renewals` and the deadline instead). A
    /// token that never worked is suspect: two such refusals in a row are final, so unusable
    /// credentials do not log in again and again (wrong ones fail at the login itself).
    fn on_unauthorized(&mut self, token_had_worked: bool) -> Step {
        let finish = |machine: &Self| Step {
            action: Action::Finish(Err(machine.fail(Error::Unauthorized))),
            pause: None,
        };
        if self.policy.max_attempts() <= 1 {
            // A policy that never retries does not log in again either.
            return finish(self);
        }
        if token_had_worked {
            self.unproven_refusals = 0;
            self.renewals += 1;
            if self.renewals > self.policy.max_token_renewals() {
                return finish(self);
            }
        } else {
            self.unproven_refusals += 1;
            if self.unproven_refusals >= 2 {
                return finish(self);
            }
        }
        tracing::debug!("token refused; retrying with a new one");
        self.last_error = Some(Error::Unauthorized);
        Step {
            action: Action::RefreshToken,
            pause: None,
        }
    }
}

/// Who must wait after an error: everybody, one device, or only the send that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PauseScope {
    Everyone,
    Device,
    This,
}

impl PauseScope {
    /// 503, 500, 502 (any 5xx) and malformed answers are the service's trouble, and
    /// `QuotaExceeded` the sender's: everyone waits. `DeviceQuotaExceeded`: that device waits.
    /// Another protocol's refusal says which itself.
    fn of(error: &Error) -> Self {
        match error.pauses() {
            Some(Disposition::RetryEveryone) => Self::Everyone,
            Some(Disposition::RetryDevice) => Self::Device,
            _ => Self::This,
        }
    }
}
