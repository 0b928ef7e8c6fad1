//! When to try a send again, and after how long: a pure decision, with randomness passed in.

use std::time::Duration;

use crate::error::Error;

/// How the computed backoff is randomised, so that many senders do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// `d/2 + rand(d)`: between half and one and a half times the computed delay (the default).
    #[default]
    Half,
    /// `rand(d)`: anywhere between zero and the computed delay.
    Full,
    /// Exactly the computed delay. For tests and special needs only.
    None,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this long.
    RetryAfter(Duration),
    /// The error is final.
    GiveUp,
}

/// The retry rules: exponential backoff with jitter, bounded attempts, `Retry-After` honoured.
///
/// ```
/// use std::time::Duration;
/// use c2dm_core::{Error, RetryDecision, RetryPolicy, retry::Jitter};
///
/// let policy = RetryPolicy::default().with_jitter(Jitter::None);
/// let unavailable = Error::Unavailable { retry_after: None };
/// // After the first attempt: about a second; after the third: four.
/// assert_eq!(policy.decide(1, &unavailable, 0.5), RetryDecision::RetryAfter(Duration::from_secs(1)));
/// assert_eq!(policy.decide(3, &unavailable, 0.5), RetryDecision::RetryAfter(Duration::from_secs(4)));
/// // A longer Retry-After wins.
/// let told = Error::Unavailable { retry_after: Some(Duration::from_secs(30)) };
/// assert_eq!(policy.decide(1, &told, 0.5), RetryDecision::RetryAfter(Duration::from_secs(30)));
/// // Attempts are bounded; permanent errors are never retried.
/// assert_eq!(policy.decide(policy.max_attempts(), &unavailable, 0.5), RetryDecision::GiveUp);
/// let gone = Error::Rejected(c2dm_core::ErrorCode::NotRegistered);
/// assert_eq!(policy.decide(1, &gone, 0.5), RetryDecision::GiveUp);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    jitter: Jitter,
    retry_possible_duplicates: bool,
    deadline: Option<Duration>,
    max_token_renewals: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
            max_retry_after: Duration::from_secs(3600),
            jitter: Jitter::Half,
            retry_possible_duplicates: true,
            deadline: None,
            max_token_renewals: 100,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        Self::default().with_max_attempts(1)
    }

    /// The most attempts one message gets, the first included (default 8; at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The delay before the first retry, doubled for each later one (default 1 s).
    pub fn with_initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// The longest computed delay (default 10 minutes).
    pub fn with_max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// The longest `Retry-After` waited out; a longer one makes the error final, so the caller
    /// can schedule the message itself (default 1 hour).
    pub fn with_max_retry_after(mut self, delay: Duration) -> Self {
        self.max_retry_after = delay;
        self
    }

    /// How the computed delay is randomised (default [`Jitter::Half`]).
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Whether to resend after a transport failure that may have reached the server (default
    /// yes: the collapse key limits the harm, and the outcome counts the possible duplicates).
    pub fn with_retry_possible_duplicates(mut self, retry: bool) -> Self {
        self.retry_possible_duplicates = retry;
        self
    }

    /// The longest one message's send may take, over all its attempts and waits (default: no
    /// deadline; attempts and `max_retry_after` bound it). A send still waiting or in flight at
    /// its deadline ends with [`Error::DeadlineExceeded`]; an exchange cut off then may have
    /// reached the service.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// How many times one message is sent again because the token it carried expired under it
    /// (HTTP 401 on a token that had been accepted before), beyond its attempts (default 100).
    /// Such a refusal is not the message's failure: under load with short-lived tokens, one send
    /// can lose the race for a fresh token many times while every login serves others.
    pub fn with_max_token_renewals(mut self, renewals: u32) -> Self {
        self.max_token_renewals = renewals;
        self
    }

    /// The message's deadline, if one is set.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// How many resends an expired token may cost one message.
    pub fn max_token_renewals(&self) -> u32 {
        self.max_token_renewals
    }

    /// The longest `Retry-After` (or pause) one send waits out.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// The most attempts one message gets.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether possible duplicates are resent.
    pub fn retries_possible_duplicates(&self) -> bool {
        self.retry_possible_duplicates
    }

    /// The backoff before retry number `retry` (1 for the first retry), with jitter drawn from
    /// `unit`, a random number in `[0, 1)`.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let factor = 2u32
            .checked_pow(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        let base = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        let unit = unit.clamp(0.0, 1.0);
        let jittered = match self.jitter {
            Jitter::Half => (base / 2).saturating_add(base.mul_f64(unit)),
            Jitter::Full => base.mul_f64(unit),
            Jitter::None => base,
        };
        jittered.min(self.max_backoff)
    }

    /// Decides what follows failed attempt number `attempt` (1 for the first) that ended in
    /// `error`, with `unit` a random number in `[0, 1)` for the jitter.
    ///
    /// HTTP 401 is not decided here: the sender asks its token provider for a new token and
    /// tries once more at once.
    pub fn decide(&self, attempt: u32, error: &Error, unit: f64) -> RetryDecision {
        if self.may_retry(attempt, error) {
            RetryDecision::RetryAfter(self.delay(attempt, error, unit))
        } else {
            RetryDecision::GiveUp
        }
    }

    /// Whether failed attempt number `attempt` that ended in `error` may be followed by another:
    /// the error is retryable, attempts remain, a possible duplicate is allowed, and any
    /// `Retry-After` is within [`RetryPolicy::with_max_retry_after`].
    pub fn may_retry(&self, attempt: u32, error: &Error) -> bool {
        if attempt >= self.max_attempts || !error.is_retryable() {
            return false;
        }
        if let Error::Transport(err) = error
            && err.may_have_been_sent()
            && !self.retry_possible_duplicates
        {
            return false;
        }
        error
            .retry_after()
            .is_none_or(|told| told <= self.max_retry_after)
    }

    /// How long to wait after failed attempt number `attempt`: the backoff, or the error's
    /// `Retry-After` when longer (not bounded by `max_retry_after`: a pause set from it is
    /// what the service asked for, even when this message gives up).
    pub fn delay(&self, attempt: u32, error: &Error, unit: f64) -> Duration {
        let computed = self.backoff(attempt, unit);
        error
            .retry_after()
            .map_or(computed, |told| told.max(computed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::transport::{RequestSent, TransportError, TransportErrorKind};

    fn unavailable() -> Error {
        Error::Unavailable { retry_after: None }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default().with_jitter(Jitter::None);
        let secs: Vec<u64> = (1..=12).map(|r| p.backoff(r, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(p.backoff(1000, 0.0), Duration::from_secs(600));
        assert_eq!(p.backoff(u32::MAX, 0.9), Duration::from_secs(600));
    }

    #[test]
    fn half_jitter_spans_half_to_one_and_a_half() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(2));
        assert_eq!(p.backoff(3, 0.5), Duration::from_secs(4));
        assert_eq!(
            p.backoff(3, 0.999_999),
            Duration::from_secs(6) - Duration::from_micros(4)
        );
        // Jitter never escapes the cap.
        assert_eq!(p.backoff(20, 0.99), Duration::from_secs(600));
    }

    #[test]
    fn full_jitter_is_never_always_zero() {
        let p = RetryPolicy::default().with_jitter(Jitter::Full);
        assert_eq!(p.backoff(2, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(2, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn attempts_are_bounded() {
        let p = RetryPolicy::default().with_max_attempts(3);
        assert!(matches!(
            p.decide(1, &unavailable(), 0.5),
            RetryDecision::RetryAfter(_)
        ));
        assert!(matches!(
            p.decide(2, &unavailable(), 0.5),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(p.decide(3, &unavailable(), 0.5), RetryDecision::GiveUp);
        assert_eq!(
            RetryPolicy::never().decide(1, &unavailable(), 0.5),
            RetryDecision::GiveUp
        );
        assert_eq!(
            RetryPolicy::default().with_max_attempts(0).max_attempts(),
            1
        );
    }

    #[test]
    fn retry_after_wins_when_longer_and_is_bounded() {
        let p = RetryPolicy::default().with_jitter(Jitter::None);
        let short = Error::Unavailable {
            retry_after: Some(Duration::from_millis(10)),
        };
        assert_eq!(
            p.decide(4, &short, 0.0),
            RetryDecision::RetryAfter(Duration::from_secs(8))
        );
        let too_long = Error::Unavailable {
            retry_after: Some(Duration::from_secs(7200)),
        };
        assert_eq!(p.decide(1, &too_long, 0.0), RetryDecision::GiveUp);
    }

    #[test]
    fn possible_duplicates_follow_the_setting() {
        let maybe = Error::Transport(TransportError::new(
            TransportErrorKind::Timeout,
            RequestSent::Maybe,
        ));
        let not_sent = Error::Transport(TransportError::new(
            TransportErrorKind::Connect,
            RequestSent::No,
        ));
        let strict = RetryPolicy::default().with_retry_possible_duplicates(false);
        assert_eq!(strict.decide(1, &maybe, 0.5), RetryDecision::GiveUp);
        assert!(matches!(
            strict.decide(1, &not_sent, 0.5),
            RetryDecision::RetryAfter(_)
        ));
        assert!(matches!(
            RetryPolicy::default().decide(1, &maybe, 0.5),
            RetryDecision::RetryAfter(_)
        ));
    }

    #[test]
    fn permanent_errors_are_never_retried() {
        let p = RetryPolicy::default();
        for code in ErrorCode::KNOWN {
            let retry = matches!(
                p.decide(1, &Error::Rejected(code.clone()), 0.5),
                RetryDecision::RetryAfter(_)
            );
            assert_eq!(retry, code.is_retryable(), "{code}");
        }
        assert_eq!(
            p.decide(1, &Error::UnexpectedStatus { status: 404 }, 0.5),
            RetryDecision::GiveUp
        );
    }
}
