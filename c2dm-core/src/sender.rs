//! The `Sender`: one message, sent right, over any [`Transport`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http::Uri;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::Error;
use crate::machine::{Action, BeforeAttempt, Pause, SendMachine};
use crate::message::{MessageId, RegistrationId};
use crate::protocol::{C2dm, Protocol};
use crate::retry::RetryPolicy;
use crate::sent::{SendError, Sent};
use crate::token::{AuthToken, TokenProvider};
use crate::transport::{RequestSent, Transport, TransportError, TransportErrorKind};

type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Sends messages over a [`Transport`] with a [`TokenProvider`], and does everything the
/// protocol asks of a sender:
///
/// - every `Update-Client-Auth` goes to the token provider, and is never a reason to resend;
/// - on HTTP 401 it asks the provider for a new token (single-flight in the provider) and tries
///   again: a token that had worked expired, and is renewed as often as needed (within
///   [`RetryPolicy::with_max_token_renewals`]); two refusals in a row of tokens that never
///   worked are final;
/// - 503, 500, 502 and malformed answers are retried with exponential backoff and jitter, bounded
///   by the [`RetryPolicy`]; a longer `Retry-After` wins;
/// - those and `QuotaExceeded` pause **every** send on this sender (and its clones) until the
///   delay ends, even when the send that met them gives up; `DeviceQuotaExceeded` pauses only
///   that registration id;
/// - a message's deadline ([`RetryPolicy::with_deadline`]) bounds all its attempts and waits;
/// - transport failures are retried when the request was not sent, and when it may have been
///   sent only if the policy allows (counted in `possible_duplicates`);
/// - permanent rejections are final, and say whether to remove the registration id.
///
/// The rules themselves live in [`SendMachine`](crate::machine::SendMachine), with no I/O; the
/// sender drives it. It is cheap to clone; clones share the token, the pauses and the jitter
/// source. Sleeping uses `tokio::time`, so tests run under paused time.
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
/// assert_eq!(sent.tally.attempts, 1);
/// # Ok(())
/// # }
/// ```
pub struct Sender<P: Protocol = C2dm> {
    inner: Arc<Inner<P>>,
}

impl<P: Protocol> Clone for Sender<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<P> {
    protocol: P,
    transport: Arc<dyn Transport>,
    tokens: Arc<dyn TokenProvider>,
    endpoint: Uri,
    policy: RetryPolicy,
    rng: Mutex<StdRng>,
    wall_clock: WallClock,
    global_pause: Mutex<Option<Instant>>,
    /// What the answer that last began or extended the global pause said.
    pause_reason: Mutex<Option<String>>,
    device_pauses: Mutex<HashMap<RegistrationId, Instant>>,
    /// When `QuotaExceeded` started being answered with no acceptance since.
    quota_exceeded_since: Mutex<Option<Instant>>,
    /// Set with (and under the lock of) the three above, so that every send need not take
    /// three locks shared by all sends to learn that nothing is paused: the usual case.
    global_paused: AtomicBool,
    devices_paused: AtomicUsize,
    quota_exceeded: AtomicBool,
    /// The global pause's end each time it moves on, for [`Sender::pause_changes`].
    pause_changes: tokio::sync::watch::Sender<Option<Instant>>,
}

impl<P: Protocol> fmt::Debug for Sender<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("endpoint", &self.inner.endpoint)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Sender`]; see [`Sender::builder`] and [`Sender::with_protocol`].
#[must_use = "a builder does nothing until build() is called"]
pub struct SenderBuilder<P: Protocol = C2dm> {
    protocol: P,
    transport: Arc<dyn Transport>,
    tokens: Arc<dyn TokenProvider>,
    endpoint: Uri,
    policy: RetryPolicy,
    seed: Option<u64>,
    wall_clock: WallClock,
}

impl<P: Protocol> fmt::Debug for SenderBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderBuilder")
            .field("endpoint", &self.endpoint)
            .field("policy", &self.policy)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl<P: Protocol> SenderBuilder<P> {
    /// Sends to `endpoint` instead of the protocol's own (e.g. a local emulator).
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
    pub fn build(self) -> Sender<P> {
        let rng = match self.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sender {
            inner: Arc::new(Inner {
                protocol: self.protocol,
                transport: self.transport,
                tokens: self.tokens,
                endpoint: self.endpoint,
                policy: self.policy,
                rng: Mutex::new(rng),
                wall_clock: self.wall_clock,
                global_pause: Mutex::new(None),
                pause_reason: Mutex::new(None),
                device_pauses: Mutex::new(HashMap::new()),
                quota_exceeded_since: Mutex::new(None),
                global_paused: AtomicBool::new(false),
                devices_paused: AtomicUsize::new(0),
                quota_exceeded: AtomicBool::new(false),
                pause_changes: tokio::sync::watch::Sender::new(None),
            }),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding one of these short locks leaves consistent data.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sender {
    /// A C2DM sender to Google's endpoint with the default retry policy.
    pub fn new(
        transport: impl Transport + 'static,
        tokens: impl TokenProvider + 'static,
    ) -> Sender {
        Self::builder(transport, tokens).build()
    }

    /// Starts a C2DM sender with settings.
    pub fn builder(
        transport: impl Transport + 'static,
        tokens: impl TokenProvider + 'static,
    ) -> SenderBuilder {
        Sender::with_protocol(C2dm, transport, tokens)
    }
}

impl<P: Protocol> Sender<P> {
    /// Starts a sender of `protocol` (its own endpoint unless told otherwise), with settings:
    /// the same rules, pauses and retries as C2DM's, as the protocol's answers say.
    pub fn with_protocol(
        protocol: P,
        transport: impl Transport + 'static,
        tokens: impl TokenProvider + 'static,
    ) -> SenderBuilder<P> {
        SenderBuilder {
            endpoint: protocol.default_endpoint(),
            protocol,
            transport: Arc::new(transport),
            tokens: Arc::new(tokens),
            policy: RetryPolicy::default(),
            seed: None,
            wall_clock: Arc::new(SystemTime::now),
        }
    }

    /// The protocol it sends.
    pub fn protocol(&self) -> &P {
        &self.inner.protocol
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

    /// Why the global pause in force was taken: the error of the answer that began or last
    /// extended it (`None` without a pause, or for one only set by [`Sender::pause_all_until`]).
    pub fn pause_reason(&self) -> Option<String> {
        self.paused_until()?;
        lock(&self.inner.pause_reason).clone()
    }

    /// Since when the service has answered `QuotaExceeded` with no message accepted since.
    pub fn quota_exceeded_since(&self) -> Option<Instant> {
        if !self.inner.quota_exceeded.load(Ordering::Acquire) {
            return None;
        }
        *lock(&self.inner.quota_exceeded_since)
    }

    /// Sends `message` and returns its id, or the final error once retrying cannot help.
    pub async fn send(&self, message: P::Message) -> Result<Sent, SendError> {
        let span = tracing::debug_span!("c2dm.send", registration_id = %P::device(&message));
        self.send_inner(&message, None).instrument(span).await
    }

    /// [`Sender::send`], ended early when `cancel` turns true while the send waits (a backoff,
    /// a pause): it then fails at once with [`Error::Cancelled`], saying whether an earlier
    /// attempt may have reached the service. An exchange under way is not interrupted.
    pub(crate) async fn send_cancellable(
        &self,
        message: P::Message,
        cancel: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Sent, SendError> {
        let span = tracing::debug_span!("c2dm.send", registration_id = %P::device(&message));
        self.send_inner(&message, Some(cancel))
            .instrument(span)
            .await
    }

    /// Drives a [`SendMachine`]: waits, attempts, refreshes and pauses as it says.
    async fn send_inner(
        &self,
        message: &P::Message,
        mut cancel: Option<&mut tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Sent, SendError> {
        let inner = &*self.inner;
        let id = P::device(message);
        let mut machine = SendMachine::new(&inner.policy, Instant::now());
        let mut device_pause = DevicePauseGuard {
            sender: self,
            id,
            set: None,
        };
        // The token refused by the last attempt, to be refreshed by the next.
        let mut refused: Option<AuthToken> = None;
        loop {
            let deadline = match machine.before_attempt(self.pause_for(id), Instant::now()) {
                BeforeAttempt::WaitUntil(until) => {
                    if !wait_until(until, cancel.as_deref_mut()).await {
                        return Err(machine.cancelled(Instant::now()));
                    }
                    continue;
                }
                BeforeAttempt::GiveUp(failure) => return Err(failure),
                BeforeAttempt::Send { deadline } => deadline,
            };
            // The token this attempt's refresh replaces, if it refreshes one.
            let replaced = refused.clone();
            let (reply, used) = self.attempt(message, refused.take(), deadline).await;
            // Read now, not when the earlier refusal came: by the time a new login's token is
            // refused too, the acceptances of the old one (answered before it expired, but
            // perhaps read by other tasks after that refusal) have been counted.
            let worked = [&used, &replaced]
                .into_iter()
                .flatten()
                .any(AuthToken::has_worked);
            match &reply {
                Ok(_) => {
                    if let Some(token) = &used {
                        token.mark_worked();
                    }
                    if inner.quota_exceeded.load(Ordering::Acquire) {
                        *lock(&inner.quota_exceeded_since) = None;
                        inner.quota_exceeded.store(false, Ordering::Release);
                    }
                }
                Err(error) if error.is_sender_quota() => {
                    lock(&inner.quota_exceeded_since).get_or_insert_with(Instant::now);
                    inner.quota_exceeded.store(true, Ordering::Release);
                }
                Err(_) => {}
            }
            // The jitter source is shared by every send: drawn from only when there is a
            // delay to jitter, not for each accepted message.
            let unit: f64 = if reply.is_err() {
                lock(&inner.rng).random()
            } else {
                0.0
            };
            // What a pause of everyone is for, said when one begins.
            let reason = match &reply {
                Err(error) if error.pauses() == Some(crate::Disposition::RetryEveryone) => {
                    Some(error.to_string())
                }
                _ => None,
            };
            let step = machine.on_reply(reply, worked, Instant::now(), unit);
            match step.pause {
                Some(Pause::Everyone { until }) => {
                    if self.paused_until().is_none() {
                        let seconds = until
                            .saturating_duration_since(Instant::now())
                            .as_secs_f64();
                        tracing::info!(
                            seconds,
                            reason = reason.as_deref().unwrap_or_default(),
                            "pausing every send"
                        );
                    }
                    if let Some(reason) = reason {
                        *lock(&inner.pause_reason) = Some(reason);
                    }
                    self.pause_all_until(until);
                }
                Some(Pause::Device { until }) => device_pause.extend(until),
                None => {}
            }
            match step.action {
                Action::Finish(result) => {
                    device_pause.clear_if_over();
                    return result;
                }
                Action::RetryAt(at) => {
                    if !wait_until(at, cancel.as_deref_mut()).await {
                        return Err(machine.cancelled(Instant::now()));
                    }
                }
                Action::RefreshToken => refused = used,
            }
        }
    }

    /// One exchange: a token (a refresh of `refused`, if given), the request, the answer.
    /// Returns the decoded answer and the token it carried. An exchange still open at
    /// `deadline` is abandoned as a timeout that may have reached the service.
    async fn attempt(
        &self,
        message: &P::Message,
        refused: Option<AuthToken>,
        deadline: Option<Instant>,
    ) -> (Result<MessageId, Error>, Option<AuthToken>) {
        let inner = &*self.inner;
        let attempt = async {
            let token = match refused {
                Some(refused) => inner.tokens.refresh(&refused).await,
                // Called on the trait object itself: through the `Arc` impl, each call would
                // box one more future.
                None => TokenProvider::token(&*inner.tokens).await,
            };
            let token = match token {
                Ok(token) => token,
                Err(e) => return (Err(Error::Token(e)), None),
            };
            let request = inner.protocol.encode(message, &token, &inner.endpoint);
            let response = match Transport::execute(&*inner.transport, request).await {
                Ok(response) => response,
                Err(e) => return (Err(Error::Transport(e)), Some(token)),
            };
            let reply = inner.protocol.decode(&response, (inner.wall_clock)());
            if let Some(rotated) = reply.rotated_token {
                tracing::debug!("token rotated by Update-Client-Auth");
                inner.tokens.rotate(&token, rotated);
            }
            (reply.result, Some(token))
        }
        .instrument(tracing::trace_span!("c2dm.attempt"));
        match deadline {
            None => attempt.await,
            Some(deadline) => match tokio::time::timeout_at(deadline, attempt).await {
                Ok(done) => done,
                Err(_) => (
                    Err(Error::Transport(
                        TransportError::new(TransportErrorKind::Timeout, RequestSent::Maybe)
                            .with_message("the message's deadline passed during the exchange"),
                    )),
                    None,
                ),
            },
        }
    }

    /// The latest pause in force for a send to `id`: everyone's or the device's.
    fn pause_for(&self, id: &RegistrationId) -> Option<Instant> {
        let global = self.global_pause();
        let device = if self.inner.devices_paused.load(Ordering::Acquire) > 0 {
            lock(&self.inner.device_pauses).get(id).copied()
        } else {
            None
        };
        global.max(device)
    }

    /// How many registration ids have a pause (after `DeviceQuotaExceeded`) recorded: ids whose
    /// sends are waiting, or whose pause has not been cleared yet.
    pub fn paused_devices(&self) -> usize {
        lock(&self.inner.device_pauses).len()
    }

    /// Pauses every send on this sender until `until` (extends, never shortens, a pause).
    pub fn pause_all_until(&self, until: Instant) {
        let mut pause = lock(&self.inner.global_pause);
        let end = pause.map_or(until, |p| p.max(until));
        *pause = Some(end);
        self.inner.global_paused.store(true, Ordering::Release);
        // Under the pause's lock, so that two pauses taken at once are told in their order.
        self.inner.pause_changes.send_if_modified(|told| {
            let later = *told != Some(end);
            *told = Some(end);
            later
        });
    }

    /// Tells of each new end of the global pause, as it is taken (from a 503, a 5xx, a
    /// `QuotaExceeded` or [`Sender::pause_all_until`]): for sharing it with other senders of
    /// the same account at once, rather than at the next look at
    /// [`Sender::paused_until`]. The value is the latest end set so far, which may have
    /// passed; `None` until the first pause.
    ///
    /// ```
    /// # use c2dm_core::{AuthToken, Sender, StaticToken};
    /// # use c2dm_mock::RecordingTransport;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sender = Sender::new(RecordingTransport::new(), StaticToken::new(AuthToken::new("t")?));
    /// let mut pauses = sender.pause_changes();
    /// let until = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    /// sender.pause_all_until(until);
    /// pauses.changed().await?;
    /// assert_eq!(*pauses.borrow(), Some(until));
    /// # Ok(())
    /// # }
    /// ```
    pub fn pause_changes(&self) -> tokio::sync::watch::Receiver<Option<Instant>> {
        self.inner.pause_changes.subscribe()
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
}

/// Sleeps until `until`; false if `cancel` turned true first.
async fn wait_until(
    until: Instant,
    cancel: Option<&mut tokio::sync::watch::Receiver<bool>>,
) -> bool {
    match cancel {
        None => {
            tokio::time::sleep_until(until).await;
            true
        }
        Some(cancel) => tokio::select! {
            _ = tokio::time::sleep_until(until) => true,
            _ = cancel.wait_for(|cancelled| *cancelled) => false,
        },
    }
}

/// The pause a send set for its device (`DeviceQuotaExceeded`). It is removed when the send
/// ends after the pause ran out, and also when the send is dropped while waiting (a cancelled
/// future, a timeout around `send`), so no entry outlives every send that could clear it.
struct DevicePauseGuard<'a, P: Protocol> {
    sender: &'a Sender<P>,
    id: &'a RegistrationId,
    /// The instant this send last wrote for its device.
    set: Option<Instant>,
}

impl<P: Protocol> DevicePauseGuard<'_, P> {
    fn extend(&mut self, until: Instant) {
        let inner = &*self.sender.inner;
        let mut pauses = lock(&inner.device_pauses);
        let entry = pauses.entry(self.id.clone()).or_insert(until);
        *entry = (*entry).max(until);
        self.set = Some(*entry);
        inner.devices_paused.store(pauses.len(), Ordering::Release);
    }

    /// Removes the device's pause if it is over (a later send to the device would find nothing
    /// to wait for anyway).
    fn clear_if_over(&mut self) {
        self.remove_if(|until| until <= Instant::now());
    }

    fn remove_if(&mut self, over: impl Fn(Instant) -> bool) {
        if self.set.take().is_none()
            && self.sender.inner.devices_paused.load(Ordering::Acquire) == 0
        {
            return;
        }
        let inner = &*self.sender.inner;
        let mut pauses = lock(&inner.device_pauses);
        if pauses.get(self.id).is_some_and(|until| over(*until)) {
            pauses.remove(self.id);
            inner.devices_paused.store(pauses.len(), Ordering::Release);
        }
    }
}

impl<P: Protocol> Drop for DevicePauseGuard<'_, P> {
    fn drop(&mut self) {
        // Dropped mid-send: remove the pause this send wrote, unless another send extended it
        // since. A finished send already cleared `set`.
        if let Some(set) = self.set {
            self.remove_if(|until| until == set);
        }
    }
}
