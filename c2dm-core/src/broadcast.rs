//! Mass sending: one message per device for many devices, with a final outcome for each.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, Stream, StreamExt};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::error::{Error, ErrorCode};
use crate::message::{MessageId, RegistrationId};
use crate::protocol::Protocol;
use crate::sender::Sender;
use crate::sent::{AttemptTally, SendError, Sent};

/// How a broadcast runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct BroadcastOptions {
    concurrency: usize,
    rate: Option<NonZeroU32>,
    budget: Option<u64>,
    quota_give_up_after: Duration,
    delivery_buffer: usize,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        Self {
            concurrency: 64,
            rate: None,
            budget: None,
            quota_give_up_after: Duration::from_secs(15 * 60),
            delivery_buffer: DEFAULT_DELIVERY_BUFFER,
        }
    }
}

impl BroadcastOptions {
    /// How many sends run at once (default 64; 0 is refused by [`Sender::broadcast`]). That many
    /// sending tasks are started, each sending one message at a time.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// At most this many sends start per second (default: no limit).
    pub fn rate_per_second(mut self, rate: NonZeroU32) -> Self {
        self.rate = Some(rate);
        self
    }

    /// At most this many messages are accepted; the rest are reported as not attempted
    /// (e.g. the per-sender daily quota, 200,000 on the real service). Default: no budget.
    pub fn budget(mut self, accepted: u64) -> Self {
        self.budget = Some(accepted);
        self
    }

    /// When the service has answered `QuotaExceeded` for this long with nothing accepted, the
    /// broadcast stops taking new work and reports the rest as not attempted, to be resumed
    /// later (default 15 minutes).
    pub fn quota_give_up_after(mut self, after: Duration) -> Self {
        self.quota_give_up_after = after;
        self
    }

    /// How many finished deliveries may wait to be read before the sending tasks wait for the
    /// reader (default 1,024; at least 1). Memory stays bounded either way, at about a hundred
    /// bytes a delivery. A buffer well above the concurrency lets a burst of answers pass
    /// without stopping the sending tasks, each of which the reader would then have to wake
    /// again (docs/PERFORMANCE.md has the figures).
    pub fn delivery_buffer(mut self, deliveries: usize) -> Self {
        self.delivery_buffer = deliveries;
        self
    }
}

/// The default of [`BroadcastOptions::delivery_buffer`].
const DEFAULT_DELIVERY_BUFFER: usize = 1024;

/// A broadcast's options were unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// A concurrency of 0 would never send anything.
    #[error("broadcast concurrency must be at least 1")]
    ZeroConcurrency,
}

/// Why a message was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotAttempted {
    /// The broadcast was cancelled first.
    Cancelled,
    /// The service kept answering `QuotaExceeded`: resume later.
    QuotaExhausted,
    /// The broadcast's budget of accepted messages was used up.
    BudgetExhausted,
}

impl NotAttempted {
    /// A short name: `cancelled`, `quota_exhausted`, `budget_exhausted`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::QuotaExhausted => "quota_exhausted",
            Self::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Outcome {
    /// Accepted by the service.
    Accepted {
        /// The message id.
        message_id: MessageId,
    },
    /// Permanently refused, with the service's code: one of C2DM's, or another protocol's kept
    /// as it wrote it ([`ErrorCode::Unknown`]).
    Rejected {
        /// The code.
        code: ErrorCode,
        /// Whether the registration id must be removed.
        remove: bool,
    },
    /// Not accepted, and retrying gave up (503s, transport failures, quota, a refused login…).
    Failed {
        /// The last error.
        error: Error,
    },
    /// Never sent.
    NotAttempted(NotAttempted),
}

impl Outcome {
    /// Which of the four outcomes this is.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Self::Accepted { .. } => OutcomeKind::Accepted,
            Self::Rejected { .. } => OutcomeKind::Rejected,
            Self::Failed { .. } => OutcomeKind::Failed,
            Self::NotAttempted(_) => OutcomeKind::NotAttempted,
        }
    }
}

/// The four outcomes of a message, without their details: what a journal or a database row
/// stores. With the `serde` feature it serialises as `accepted`, `rejected`, `failed` or
/// `not_attempted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum OutcomeKind {
    /// Accepted by the service.
    Accepted,
    /// Permanently refused, with the service's code: one of C2DM's, or another protocol's kept
    /// as it wrote it ([`ErrorCode::Unknown`]).
    Rejected,
    /// Not accepted, and retrying gave up.
    Failed,
    /// Never sent.
    NotAttempted,
}

impl OutcomeKind {
    /// `accepted`, `rejected`, `failed` or `not_attempted`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::NotAttempted => "not_attempted",
        }
    }

    /// Whether the message needs no more sending: accepted, or refused for good.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Accepted | Self::Rejected)
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The final word on one message of a broadcast.
#[derive(Debug, Clone)]
pub struct Delivery {
    registration_id: RegistrationId,
    outcome: Outcome,
    tally: AttemptTally,
}

impl Delivery {
    /// The device.
    pub fn registration_id(&self) -> &RegistrationId {
        &self.registration_id
    }

    /// What became of the message.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// What the send cost: attempts, time waited, possible duplicates.
    pub fn tally(&self) -> AttemptTally {
        self.tally
    }

    /// Attempts made (0 when not attempted).
    pub fn attempts(&self) -> u32 {
        self.tally.attempts
    }

    /// Time spent waiting for this message.
    pub fn waited(&self) -> Duration {
        self.tally.waited
    }

    /// Resends after failures that may have reached the service: the device may have the message
    /// more than once (or, when it failed, at all).
    pub fn possible_duplicates(&self) -> u32 {
        self.tally.possible_duplicates
    }

    /// Whether the message was accepted.
    pub fn is_accepted(&self) -> bool {
        matches!(self.outcome, Outcome::Accepted { .. })
    }

    /// The accepted message's id.
    pub fn message_id(&self) -> Option<&MessageId> {
        match &self.outcome {
            Outcome::Accepted { message_id } => Some(message_id),
            _ => None,
        }
    }

    /// Whether the registration id is gone and must be removed from the app's store.
    pub fn should_remove(&self) -> bool {
        matches!(self.outcome, Outcome::Rejected { remove: true, .. })
    }

    /// A short description of the error, if the message was not accepted: the C2DM code, the
    /// error text, or the reason it was not attempted.
    pub fn error_text(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Accepted { .. } => None,
            Outcome::Rejected { code, .. } => Some(code.to_string()),
            Outcome::Failed { error } => Some(match error.code_text() {
                Some(code) => code.to_owned(),
                None => error.to_string(),
            }),
            Outcome::NotAttempted(why) => Some(why.as_str().to_owned()),
        }
    }

    fn not_attempted(registration_id: RegistrationId, why: NotAttempted) -> Self {
        Self {
            registration_id,
            outcome: Outcome::NotAttempted(why),
            tally: AttemptTally::default(),
        }
    }

    /// The delivery of one send's result: how [`Sender::broadcast`] classifies every message,
    /// and how a single [`Sender::send`] gets the same record.
    pub fn from_result(registration_id: RegistrationId, result: Result<Sent, SendError>) -> Self {
        match result {
            Ok(sent) => Self {
                registration_id,
                outcome: Outcome::Accepted {
                    message_id: sent.message_id,
                },
                tally: sent.tally,
            },
            Err(failure)
                if failure.tally.attempts == 0
                    && matches!(failure.error, Error::Cancelled { .. }) =>
            {
                Self {
                    tally: failure.tally,
                    ..Self::not_attempted(registration_id, NotAttempted::Cancelled)
                }
            }
            Err(failure) => {
                let possibly = failure.possibly_delivered();
                let outcome = match failure.error {
                    Error::Rejected(code) if !code.is_retryable() => Outcome::Rejected {
                        remove: code.should_remove_registration(),
                        code,
                    },
                    // Another protocol's code, kept as it wrote it.
                    Error::Refused(refusal) if !refusal.is_retryable() => Outcome::Rejected {
                        remove: refusal.should_remove_registration(),
                        code: ErrorCode::Unknown(refusal.code),
                    },
                    error => Outcome::Failed { error },
                };
                let tally = AttemptTally {
                    possible_duplicates: failure.tally.possible_duplicates.max(u32::from(possibly)),
                    ..failure.tally
                };
                Self {
                    registration_id,
                    outcome,
                    tally,
                }
            }
        }
    }
}

/// Stops a broadcast: no new message is started; sends waiting (a backoff, a pause) stop
/// waiting and are reported as failed with [`Error::Cancelled`] (which says whether an earlier
/// attempt may have reached the service), or as [`NotAttempted::Cancelled`] when they had made
/// no attempt yet; exchanges under way finish and are reported; every message not yet started
/// is reported as [`NotAttempted::Cancelled`].
#[derive(Debug, Clone)]
pub struct CancelHandle(Arc<watch::Sender<bool>>);

impl CancelHandle {
    /// Cancels the broadcast.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// Whether the broadcast was cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }
}

/// A running broadcast: a stream of [`Delivery`], one per input message, in completion order.
///
/// Dropping it stops the broadcast (sends under way still finish in the background).
#[derive(Debug)]
pub struct Broadcast {
    deliveries: mpsc::Receiver<Delivery>,
    cancel: CancelHandle,
}

impl Broadcast {
    /// A handle that cancels this broadcast, usable from anywhere.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}

impl Stream for Broadcast {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }
}

/// governor's clock on `tokio::time`, so rate limits follow paused time in tests.
#[derive(Debug, Clone)]
struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

type Inputs<M> = std::pin::Pin<Box<dyn Stream<Item = M> + Send>>;

/// What the sending tasks of one broadcast share.
struct Shared<P: Protocol> {
    sender: Sender<P>,
    /// The messages; whoever holds the lock takes the next one and decides whether it may go.
    ///
    /// An unfair lock on purpose: a fair one hands itself to its waiters in turn, so once a
    /// queue formed, every release would wake the next sending task and newcomers would queue
    /// behind it (a lock convoy). With this one, a task that wants it while it is free simply
    /// takes it. docs/PERFORMANCE.md has the measurements.
    inputs: futures::lock::Mutex<Inputs<P::Message>>,
    /// Set once the broadcast stops taking new work: every later message is reported with it.
    stopped: std::sync::Mutex<Option<NotAttempted>>,
    /// Whether `stopped` is set, readable without its lock.
    has_stopped: AtomicBool,
    limiter: Option<Limiter>,
    /// Messages accepted or under way: what counts against the budget. Kept only with a
    /// budget, like the two below.
    reserved: AtomicU64,
    in_flight: AtomicU64,
    /// Signalled whenever a send finishes, for a budget that waits on sends under way.
    finished: Notify,
    options: BroadcastOptions,
}

impl<P: Protocol> Shared<P> {
    fn stopped(&self) -> Option<NotAttempted> {
        if !self.has_stopped.load(Ordering::Acquire) {
            return None;
        }
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self, why: NotAttempted) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        stopped.get_or_insert(why);
        self.has_stopped.store(true, Ordering::Release);
    }

    fn budgeted(&self) -> bool {
        self.options.budget.is_some()
    }

    /// Waits until a send may start: budget, quota and rate allowing. Called with the inputs
    /// locked, so one caller at a time.
    async fn room(
        &self,
        cancel: &mut watch::Receiver<bool>,
        tx: &mpsc::Sender<Delivery>,
    ) -> Result<(), NotAttempted> {
        // Cancelled, or nobody is listening any more (the stream was dropped).
        if *cancel.borrow() || tx.is_closed() {
            return Err(NotAttempted::Cancelled);
        }
        // The budget: wait for sends under way when they could still free some.
        if let Some(budget) = self.options.budget {
            loop {
                let notified = self.finished.notified();
                if self.reserved.load(Ordering::SeqCst) < budget {
                    break;
                }
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    return Err(NotAttempted::BudgetExhausted);
                }
                tokio::select! {
                    _ = notified => {}
                    _ = cancel.wait_for(|c| *c) => return Err(NotAttempted::Cancelled),
                }
            }
        }
        // The quota.
        if self
            .sender
            .quota_exceeded_since()
            .is_some_and(|since| since.elapsed() >= self.options.quota_give_up_after)
        {
            tracing::warn!("the sender's quota stays exceeded: stopping the broadcast");
            return Err(NotAttempted::QuotaExhausted);
        }
        // The rate.
        if let Some(limiter) = &self.limiter {
            loop {
                match limiter.check() {
                    Ok(()) => break,
                    Err(not_until) => {
                        let wait = not_until.wait_time_from(limiter.clock().now());
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = cancel.wait_for(|c| *c) => return Err(NotAttempted::Cancelled),
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// One sending slot: takes the next message, sends it (or reports why not), hands over the
/// delivery, and again, until the messages run out or nobody listens.
async fn worker<P: Protocol>(
    shared: Arc<Shared<P>>,
    tx: mpsc::Sender<Delivery>,
    mut cancel: watch::Receiver<bool>,
) {
    loop {
        let (message, verdict) = {
            let mut inputs = shared.inputs.lock().await;
            let Some(message) = inputs.next().await else {
                return;
            };
            let verdict = match shared.stopped() {
                Some(why) => Err(why),
                None => shared.room(&mut cancel, &tx).await,
            };
            match verdict {
                Ok(()) if shared.budgeted() => {
                    shared.reserved.fetch_add(1, Ordering::SeqCst);
                    shared.in_flight.fetch_add(1, Ordering::SeqCst);
                }
                Ok(()) => {}
                Err(why) => shared.stop(why),
            }
            (message, verdict)
        };
        let id = P::device(&message).clone();
        let delivery = match verdict {
            Err(why) => Delivery::not_attempted(id, why),
            Ok(()) => {
                // Released however the send ends: accepted, failed, panicked or dropped.
                let mut budget = BudgetGuard {
                    shared: &shared,
                    accepted: false,
                };
                let result = AssertUnwindSafe(shared.sender.send_cancellable(message, &mut cancel))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| Err(panicked(&*panic)));
                let delivery = Delivery::from_result(id, result);
                budget.accepted = delivery.is_accepted();
                delivery
            }
        };
        // Waiting here until the delivery is taken keeps this slot busy: a slow consumer slows
        // the broadcast instead of piling deliveries up in memory.
        if tx.send(delivery).await.is_err() {
            return; // nobody is listening any more
        }
    }
}

/// A send that counts against the budget: on drop (whatever ended the send) it leaves the
/// in-flight count and, unless the message was accepted, gives its reservation back, then wakes
/// the tasks waiting for room.
struct BudgetGuard<'a, P: Protocol> {
    shared: &'a Shared<P>,
    accepted: bool,
}

impl<P: Protocol> Drop for BudgetGuard<'_, P> {
    fn drop(&mut self) {
        let shared = self.shared;
        if !shared.budgeted() {
            return;
        }
        if !self.accepted {
            shared.reserved.fetch_sub(1, Ordering::SeqCst);
        }
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        shared.finished.notify_waiters();
    }
}

/// The failure reported for a send that panicked (in a transport or token provider): the
/// request may have reached the service, so the delivery says so.
fn panicked(panic: &(dyn std::any::Any + Send)) -> SendError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    tracing::error!(%message, "a send panicked");
    SendError {
        error: Error::Panicked { message },
        tally: AttemptTally {
            attempts: 1,
            ..AttemptTally::default()
        },
    }
}

impl<P: Protocol> Sender<P> {
    /// Sends every message of `messages`, `options.concurrency` at a time, and returns the
    /// stream of their deliveries: exactly one per input, in completion order.
    ///
    /// Inputs are pulled only as capacity frees up and nothing is kept per message after its
    /// delivery, so memory stays constant however many there are. Everything the sender does
    /// per message (pauses on 503 and `QuotaExceeded`, per-device pauses, re-login, rotation)
    /// holds across the broadcast. Must be called within a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// use c2dm_core::{AuthToken, BroadcastOptions, DeliveryReport, ErrorCode, Message, RegistrationId, Sender, StaticToken};
    /// use c2dm_mock::RecordingTransport;
    ///
    /// let fake = RecordingTransport::new().reply_to("old-phone", ErrorCode::NotRegistered);
    /// let sender = Sender::new(fake, StaticToken::new(AuthToken::new("token")?));
    /// let template = Message::builder("template").collapse_key("news").data("message", "hello").build()?;
    /// let mut devices = vec!["phone-1".to_string(), "old-phone".into(), "phone-2".into()];
    /// let ids: Vec<RegistrationId> = devices.iter().map(RegistrationId::new).collect::<Result<_, _>>()?;
    ///
    /// let mut deliveries = sender.broadcast_to(futures::stream::iter(ids), &template, BroadcastOptions::default())?;
    /// let mut report = DeliveryReport::new();
    /// while let Some(delivery) = deliveries.next().await {
    ///     // The "disable invalid devices" story: delete gone devices as their deliveries arrive.
    ///     if delivery.should_remove() {
    ///         devices.retain(|d| d != delivery.registration_id().as_str());
    ///     }
    ///     report.record(&delivery);
    /// }
    /// assert_eq!(devices, ["phone-1", "phone-2"]);
    /// assert_eq!((report.accepted(), report.rejected()), (2, 1));
    /// # Ok(())
    /// # }
    /// ```
    pub fn broadcast<S>(
        &self,
        messages: S,
        options: BroadcastOptions,
    ) -> Result<Broadcast, BroadcastError>
    where
        S: Stream<Item = P::Message> + Send + 'static,
    {
        if options.concurrency == 0 {
            return Err(BroadcastError::ZeroConcurrency);
        }
        let (tx, rx) = mpsc::channel(options.delivery_buffer.max(1));
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            sender: self.clone(),
            // Fused: every sending task asks once more after the end.
            inputs: futures::lock::Mutex::new(Box::pin(messages.fuse())),
            stopped: std::sync::Mutex::new(None),
            has_stopped: AtomicBool::new(false),
            limiter: options.rate.map(|rate| {
                RateLimiter::direct_with_clock(
                    Quota::per_second(rate),
                    TokioClock {
                        origin: Instant::now(),
                    },
                )
            }),
            reserved: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            finished: Notify::new(),
            options,
        });
        // One task per slot, each sending one message at a time: the concurrency bound holds by
        // construction, and no task is spawned per message.
        for _ in 0..shared.options.concurrency {
            tokio::spawn(worker(Arc::clone(&shared), tx.clone(), cancel_rx.clone()));
        }
        Ok(Broadcast {
            deliveries: rx,
            cancel: CancelHandle(Arc::new(cancel_tx)),
        })
    }

    /// [`Sender::broadcast`] of one `template` message to every registration id of `ids`.
    pub fn broadcast_to<S>(
        &self,
        ids: S,
        template: &P::Message,
        options: BroadcastOptions,
    ) -> Result<Broadcast, BroadcastError>
    where
        S: Stream<Item = RegistrationId> + Send + 'static,
    {
        let template = template.clone();
        self.broadcast(ids.map(move |id| P::to_device(&template, id)), options)
    }
}
