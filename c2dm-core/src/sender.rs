//! The `Sender`: one message, sent right, over any [`Transport`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Uri;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tracing::Instrument;

use crate::codec;
use crate::error::{Error, ErrorCode};
use crate::message::{Message, MessageId, RegistrationId};
use crate::retry::{PauseScope, RetryDecision, RetryPolicy};
use crate::token::{AuthToken, TokenProvider};
use crate::transport::Transport;

/// A message the service accepted, and what it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The id the service gave the message.
    pub message_id: MessageId,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// Time spent waiting: backoff, `Retry-After`, and pauses set by other sends.
    pub waited: Duration,
    /// Resends after a failure that may have reached the server: each one may have delivered the
    /// message once more.
    pub possible_duplicates: u32,
}

/// A message that was not accepted, with the final error and what was tried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error} (after {attempts} attempt{})", if *.attempts == 1 { "" } else { "s" })]
pub struct SendError {
    /// Why the last attempt failed.
    #[source]
    pub error: Error,
    /// Attempts made.
    pub attempts: u32,
    /// Time spent waiting.
    pub waited: Duration,
    /// Resends after a failure that may have reached the server.
    pub possible_duplicates: u32,
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
        self.possible_duplicates > 0
            || matches!(&self.error, Error::Transport(t) if t.may_have_been_sent())
    }
}

/// What one send has cost so far.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    attempts: u32,
    waited: Duration,
    possible_duplicates: u32,
}

impl Tally {
    fn sent(self, message_id: MessageId) -> Sent {
        Sent {
            message_id,
            attempts: self.attempts,
            waited: self.waited,
            possible_duplicates: self.possible_duplicates,
        }
    }

    fn failed(self, error: Error) -> SendError {
        SendError {
            error,
            attempts: self.attempts,
            waited: self.waited,
            possible_duplicates: self.possible_duplicates,
        }
    }
}

type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Sends messages over a [`Transport`] with a [`TokenProvider`], and does everything the
/// protocol asks of a sender:
///
/// - every `Update-Client-Auth` goes to the token provider, and is never a reason to resend;
/// - on HTTP 401 it asks the provider for a new token (single-flight in the provider) and tries
///   once more; a second 401 in a row is final;
/// - 503, 500, 502 and malformed answers are retried with exponential backoff and jitter, bounded
///   by the [`RetryPolicy`]; a longer `Retry-After` wins;
/// - 503 and `QuotaExceeded` pause **every** send on this sender (and its clones) until the delay
///   ends; `DeviceQuotaExceeded` pauses only that registration id;
/// - transport failures are retried when the request was not sent, and when it may have been
///   sent only if the policy allows (counted in `possible_duplicates`);
/// - permanent rejections are final, and say whether to remove the registration id.
///
/// It is cheap to clone; clones share the token, the pauses and the jitter source. Sleeping uses
/// `tokio::time`, so tests run under paused time.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use async_trait::async_trait;
/// use bytes::Bytes;
/// use c2dm_core::{AuthToken, Message, Sender, StaticToken, Transport, TransportError};
///
/// struct Accept;
/// #[async_trait]
/// impl Transport for Accept {
///     async fn execute(&self, _: http::Request<Bytes>) -> Result<http::Response<Bytes>, TransportError> {
///         Ok(http::Response::new(Bytes::from_static(b"id=0:42")))
///     }
/// }
///
/// let sender = Sender::new(Accept, StaticToken::new(AuthToken::new("token")?));
/// let message = Message::builder("device-1").collapse_key("orders").build()?;
/// let sent = sender.send(message).await?;
/// assert_eq!(sent.message_id.as_str(), "0:42");
/// assert_eq!(sent.attempts, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    tokens: Arc<dyn TokenProvider>,
    endpoint: Uri,
    policy: RetryPolicy,
    rng: Mutex<StdRng>,
    wall_clock: WallClock,
    global_pause: Mutex<Option<Instant>>,
    device_pauses: Mutex<HashMap<RegistrationId, Instant>>,
    /// When `QuotaExceeded` started being answered with no acceptance since.
    quota_exceeded_since: Mutex<Option<Instant>>,
    /// Set with (and under the lock of) the three above, so that every send need not take
    /// three locks shared by all sends to learn that nothing is paused: the usual case.
    global_paused: AtomicBool,
    devices_paused: AtomicUsize,
    quota_exceeded: AtomicBool,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("endpoint", &self.inner.endpoint)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Sender`]; see [`Sender::builder`].
#[must_use = "a builder does nothing until build() is called"]
pub struct SenderBuilder {
    transport: Arc<dyn Transport>,
    tokens: Arc<dyn TokenProvider>,
    endpoint: Uri,
    policy: RetryPolicy,
    seed: Option<u64>,
    wall_clock: WallClock,
}

impl fmt::Debug for SenderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderBuilder")
            .field("endpoint", &self.endpoint)
            .field("policy", &self.policy)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl SenderBuilder {
    /// Sends to `endpoint` instead of Google's send URL (e.g. a local emulator).
    pub fn endpoint(mut self, endpoint: Uri) -> Self {
        self.endpoint = endpoint;
        self
    }

    /// Uses `policy` for retries (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Seeds the jitter, for reproducible delays (default: seeded from the OS).
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The wall clock used to read HTTP-date `Retry-After` values (default
    /// [`SystemTime::now`]); tests inject a fixed one.
    pub fn wall_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.wall_clock = Arc::new(clock);
        self
    }

    /// Builds the sender.
    pub fn build(self) -> Sender {
        let rng = match self.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sender {
            inner: Arc::new(Inner {
                transport: self.transport,
                tokens: self.tokens,
                endpoint: self.endpoint,
                policy: self.policy,
                rng: Mutex::new(rng),
                wall_clock: self.wall_clock,
                global_pause: Mutex::new(None),
                device_pauses: Mutex::new(HashMap::new()),
                quota_exceeded_since: Mutex::new(None),
                global_paused: AtomicBool::new(false),
                devices_paused: AtomicUsize::new(0),
                quota_exceeded: AtomicBool::new(false),
            }),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding one of these short locks leaves consistent data.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sender {
    /// A sender to Google's endpoint with the default retry policy.
    pub fn new(
        transport: impl Transport + 'static,
        tokens: impl TokenProvider + 'static,
    ) -> Sender {
        Self::builder(transport, tokens).build()
    }

    /// Starts a sender with settings.
    pub fn builder(
        transport: impl Transport + 'static,
        tokens: impl TokenProvider + 'static,
    ) -> SenderBuilder {
        SenderBuilder {
            transport: Arc::new(transport),
            tokens: Arc::new(tokens),
            endpoint: codec::default_send_uri(),
            policy: RetryPolicy::default(),
            seed: None,
            wall_clock: Arc::new(SystemTime::now),
        }
    }

    /// The endpoint messages go to.
    pub fn endpoint(&self) -> &Uri {
        &self.inner.endpoint
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }

    /// The token provider in use.
    pub fn token_provider(&self) -> &Arc<dyn TokenProvider> {
        &self.inner.tokens
    }

    /// When the global pause (set by 503 or `QuotaExceeded`) ends, if one is in force.
    pub fn paused_until(&self) -> Option<Instant> {
        if !self.inner.global_paused.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.inner.global_pause).filter(|until| *until > Instant::now())
    }

    /// Since when the service has answered `QuotaExceeded` with no message accepted since.
    pub fn quota_exceeded_since(&self) -> Option<Instant> {
        if !self.inner.quota_exceeded.load(Ordering::Acquire) {
            return None;
        }
        *lock(&self.inner.quota_exceeded_since)
    }

    /// Sends `message` and returns its id, or the final error once retrying cannot help.
    pub async fn send(&self, message: Message) -> Result<Sent, SendError> {
        let span = tracing::debug_span!("c2dm.send", registration_id = %message.registration_id());
        self.send_inner(&message).instrument(span).await
    }

    async fn send_inner(&self, message: &Message) -> Result<Sent, SendError> {
        let inner = &*self.inner;
        let mut tally = Tally::default();
        let mut refreshed: Option<AuthToken> = None;
        let mut last_was_unauthorized = false;
        loop {
            tally.waited += self.wait_for_pauses(message.registration_id()).await;
            tally.attempts += 1;
            let error = match self
                .attempt(message, tally.attempts, refreshed.take())
                .await
            {
                Ok(message_id) => {
                    self.clear_device_pause(message.registration_id());
                    if inner.quota_exceeded.load(Ordering::Acquire) {
                        let mut since = lock(&inner.quota_exceeded_since);
                        *since = None;
                        inner.quota_exceeded.store(false, Ordering::Release);
                    }
                    return Ok(tally.sent(message_id));
                }
                Err((Error::Unauthorized, Some(used))) => {
                    // A second 401 in a row is final: the new token was refused too.
                    if last_was_unauthorized || tally.attempts >= inner.policy.max_attempts() {
                        return Err(tally.failed(Error::Unauthorized));
                    }
                    last_was_unauthorized = true;
                    match inner.tokens.refresh(&used).await {
                        Ok(token) => {
                            tracing::debug!("token refused; retrying with a new one");
                            refreshed = Some(token);
                            continue;
                        }
                        Err(token_error) => Error::Token(token_error),
                    }
                }
                Err((error, _)) => error,
            };
            last_was_unauthorized = false;
            if matches!(error, Error::Rejected(ErrorCode::QuotaExceeded)) {
                let mut since = lock(&inner.quota_exceeded_since);
                since.get_or_insert_with(Instant::now);
                inner.quota_exceeded.store(true, Ordering::Release);
            }
            let unit: f64 = lock(&inner.rng).random();
            match inner.policy.decide(tally.attempts, &error, unit) {
                RetryDecision::GiveUp => {
                    self.clear_device_pause(message.registration_id());
                    tracing::debug!(attempts = tally.attempts, %error, "send failed");
                    return Err(tally.failed(error));
                }
                RetryDecision::RetryAfter(delay) => {
                    if matches!(&error, Error::Transport(t) if t.may_have_been_sent()) {
                        tally.possible_duplicates += 1;
                    }
                    tracing::debug!(
                        attempts = tally.attempts,
                        %error,
                        delay_ms = delay.as_millis() as u64,
                        "retrying"
                    );
                    let until = Instant::now() + delay;
                    match PauseScope::of(&error) {
                        PauseScope::Global => self.pause_all_until(until),
                        PauseScope::Device => {
                            let mut pauses = lock(&inner.device_pauses);
                            let entry = pauses
                                .entry(message.registration_id().clone())
                                .or_insert(until);
                            *entry = (*entry).max(until);
                            inner.devices_paused.store(pauses.len(), Ordering::Release);
                        }
                        PauseScope::This => {}
                    }
                    // This send waits at least its own delay, whatever the pauses say.
                    tokio::time::sleep_until(until).await;
                    tally.waited += delay;
                }
            }
        }
    }

    /// One exchange. On failure, also returns the token that was used, for a refresh after 401.
    async fn attempt(
        &self,
        message: &Message,
        attempt: u32,
        token: Option<AuthToken>,
    ) -> Result<MessageId, (Error, Option<AuthToken>)> {
        let inner = &*self.inner;
        let span = tracing::trace_span!("c2dm.attempt", attempt);
        async move {
            let token = match token {
                Some(token) => token,
                // Called on the trait object itself: through the `Arc` impl, each call would
                // box one more future.
                None => TokenProvider::token(&*inner.tokens)
                    .await
                    .map_err(|e| (Error::Token(e), None))?,
            };
            let request = codec::encode_send_request(message, &token, &inner.endpoint);
            let response = Transport::execute(&*inner.transport, request)
                .await
                .map_err(|e| (Error::Transport(e), None))?;
            let reply = codec::decode_response(&response, (inner.wall_clock)());
            if let Some(rotated) = reply.rotated_token {
                tracing::debug!("token rotated by Update-Client-Auth");
                inner.tokens.rotate(rotated);
            }
            reply.result.map_err(|e| (e, Some(token)))
        }
        .instrument(span)
        .await
    }

    /// Pauses every send on this sender until `until` (extends, never shortens, a pause).
    pub fn pause_all_until(&self, until: Instant) {
        let mut pause = lock(&self.inner.global_pause);
        *pause = Some(pause.map_or(until, |p| p.max(until)));
        self.inner.global_paused.store(true, Ordering::Release);
    }

    /// Waits out the global pause and this device's pause; returns how long that took.
    async fn wait_for_pauses(&self, id: &RegistrationId) -> Duration {
        let mut start = None;
        loop {
            let global = self.global_pause();
            let device = if self.inner.devices_paused.load(Ordering::Acquire) > 0 {
                lock(&self.inner.device_pauses).get(id).copied()
            } else {
                None
            };
            let until = match (global, device) {
                (Some(a), Some(b)) => a.max(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            let now = Instant::now();
            if until <= now {
                break;
            }
            start.get_or_insert(now);
            tokio::time::sleep_until(until).await;
        }
        start.map_or(Duration::ZERO, |start| start.elapsed())
    }

    /// The global pause, if one is set; one that has ended is cleared.
    fn global_pause(&self) -> Option<Instant> {
        if !self.inner.global_paused.load(Ordering::Acquire) {
            return None;
        }
        let mut pause = lock(&self.inner.global_pause);
        if pause.is_some_and(|until| until <= Instant::now()) {
            *pause = None;
            self.inner.global_paused.store(false, Ordering::Release);
        }
        *pause
    }

    fn clear_device_pause(&self, id: &RegistrationId) {
        if self.inner.devices_paused.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pauses = lock(&self.inner.device_pauses);
        if pauses.get(id).is_some_and(|until| *until <= Instant::now()) {
            pauses.remove(id);
            self.inner
                .devices_paused
                .store(pauses.len(), Ordering::Release);
        }
    }
}
