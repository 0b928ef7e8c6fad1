//! Broadcasts under paused time against the recording fake.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use c2dm_core::retry::Jitter;
use c2dm_core::{
    AuthToken, BroadcastError, BroadcastOptions, Delivery, DeliveryReport, ErrorCode, Login,
    Message, NotAttempted, Outcome, RegistrationId, RetryPolicy, Sender, StaticToken, TokenCache,
    TokenError,
};
use c2dm_mock::{RecordingTransport, Reply};
use futures::StreamExt;
use tokio::time::Instant;

fn template() -> Message {
    Message::builder("template")
        .collapse_key("news")
        .data("message", "hello")
        .build()
        .unwrap()
}

fn ids(n: usize) -> Vec<RegistrationId> {
    (0..n)
        .map(|i| RegistrationId::new(format!("dev-{i}")).unwrap())
        .collect()
}

fn static_sender(fake: &RecordingTransport) -> Sender {
    Sender::builder(fake.clone(), StaticToken::new(AuthToken::new("t").unwrap()))
        .retry_policy(RetryPolicy::default().with_jitter(Jitter::None))
        .jitter_seed(1)
        .build()
}

async fn collect(mut stream: c2dm_core::Broadcast) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Some(d) = stream.next().await {
        out.push(d);
    }
    out
}

struct Logins(AtomicU32);

#[async_trait]
impl Login for Logins {
    async fn login(&self) -> Result<AuthToken, TokenError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(AuthToken::new(format!("login-{n}")).unwrap())
    }
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_ids_with_every_kind_of_answer() {
    const N: usize = 10_000;
    let mut fake = RecordingTransport::new()
        .latency(Duration::from_millis(2))
        .accept_only_tokens([AuthToken::new("login-1").unwrap()]);
    let mut gone = HashSet::new();
    let mut quota_devices = HashSet::new();
    for i in 0..N {
        let id = format!("dev-{i}");
        if i % 50 == 7 {
            fake = fake.reply_to(&id, ErrorCode::NotRegistered);
            gone.insert(id);
        } else if i % 100 == 13 {
            fake = fake.reply_to(&id, ErrorCode::InvalidRegistration);
            gone.insert(id);
        } else if i % 37 == 5 {
            fake = fake.reply_to_times(&id, ErrorCode::DeviceQuotaExceeded, 1);
            quota_devices.insert(id);
        }
    }
    for _ in 0..3 {
        fake.enqueue(Reply::unavailable_for(5));
    }
    fake.rotate_token_on_next_reply(AuthToken::new("rotated-1").unwrap());
    let tokens = Arc::new(TokenCache::new(Logins(AtomicU32::new(0))));
    let sender = Sender::builder(fake.clone(), Arc::clone(&tokens))
        .retry_policy(RetryPolicy::default().with_jitter(Jitter::None))
        .build();

    // Half way: the token expires (a 401 for everyone) and the service is briefly unavailable.
    let watcher = {
        let fake = fake.clone();
        tokio::spawn(async move {
            while fake.send_count() < N / 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            fake.allow_token(AuthToken::new("login-2").unwrap());
            fake.expire_token(&AuthToken::new("rotated-1").unwrap());
            fake.expire_token(&AuthToken::new("login-1").unwrap());
            fake.enqueue(Reply::Unavailable(None));
        })
    };

    let stream = sender
        .broadcast_to(
            futures::stream::iter(ids(N)),
            &template(),
            BroadcastOptions::default(),
        )
        .unwrap();
    let deliveries = collect(stream).await;
    watcher.await.unwrap();

    // Exactly one delivery per id.
    assert_eq!(deliveries.len(), N);
    let by_id: HashMap<&str, &Delivery> = deliveries
        .iter()
        .map(|d| (d.registration_id().as_str(), d))
        .collect();
    assert_eq!(by_id.len(), N);

    // The right ones are marked for removal, and only they.
    let removed: HashSet<String> = deliveries
        .iter()
        .filter(|d| d.should_remove())
        .map(|d| d.registration_id().to_string())
        .collect();
    assert_eq!(removed, gone);

    // Everything else was accepted, device-quota devices after a retry.
    for d in &deliveries {
        let id = d.registration_id().as_str();
        if gone.contains(id) {
            assert!(matches!(d.outcome(), Outcome::Rejected { .. }));
            assert_eq!(d.attempts(), 1, "{id}: never retried");
        } else {
            assert!(d.is_accepted(), "{id}: {:?}", d.outcome());
        }
        if quota_devices.contains(id) {
            assert!(d.attempts() >= 2, "{id}");
        }
    }

    // Nothing was accepted twice (no failure here could have duplicated anything).
    let mut accepted_per_id: HashMap<String, u32> = HashMap::new();
    for request in fake.accepted() {
        *accepted_per_id
            .entry(request.registration_id().unwrap().to_owned())
            .or_default() += 1;
    }
    for (id, n) in &accepted_per_id {
        let reported = by_id[id.as_str()].possible_duplicates();
        assert!(*n == 1 || reported > 0, "{id} accepted {n} times");
    }
    assert_eq!(accepted_per_id.len(), N - gone.len());
    // The rotated token was used, and the mid-way 401 cost exactly one more login.
    assert!(
        fake.sent()
            .iter()
            .any(|r| r.token().unwrap().expose_secret() == "rotated-1")
    );
    assert_eq!(tokens.login_count(), 2);

    let mut report = DeliveryReport::new();
    for d in &deliveries {
        report.record(d);
    }
    assert_eq!(report.accepted() as usize, N - gone.len());
    assert_eq!(report.rejected() as usize, gone.len());
    assert!(report.all_final());
    assert_eq!(report.to_remove().len(), gone.len());
    assert_eq!(report.by_code()["NotRegistered"], 200);
    assert_eq!(report.by_code()["InvalidRegistration"], 100);
}

#[tokio::test(start_paused = true)]
async fn concurrency_never_exceeds_the_bound() {
    let fake = RecordingTransport::new().latency(Duration::from_millis(5));
    let stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(500)),
            &template(),
            BroadcastOptions::default().concurrency(16),
        )
        .unwrap();
    assert_eq!(collect(stream).await.len(), 500);
    assert_eq!(fake.max_in_flight(), 16);
}

#[tokio::test]
async fn zero_concurrency_is_an_error() {
    let fake = RecordingTransport::new();
    let err = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(1)),
            &template(),
            BroadcastOptions::default().concurrency(0),
        )
        .unwrap_err();
    assert_eq!(err, BroadcastError::ZeroConcurrency);
}

#[tokio::test(start_paused = true)]
async fn cancellation_mid_way_reports_everything() {
    let fake = RecordingTransport::new().latency(Duration::from_millis(10));
    let mut stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(1000)),
            &template(),
            BroadcastOptions::default().concurrency(8),
        )
        .unwrap();
    let cancel = stream.cancel_handle();
    let mut deliveries = Vec::new();
    while let Some(d) = stream.next().await {
        deliveries.push(d);
        if deliveries.len() == 100 {
            cancel.cancel();
        }
    }
    assert!(cancel.is_cancelled());
    assert_eq!(deliveries.len(), 1000);
    let not_attempted: Vec<_> = deliveries
        .iter()
        .filter(|d| matches!(d.outcome(), Outcome::NotAttempted(NotAttempted::Cancelled)))
        .collect();
    let accepted = deliveries.iter().filter(|d| d.is_accepted()).count();
    assert_eq!(accepted + not_attempted.len(), 1000);
    // In-flight sends finished; at most a slot's worth more than the 100 seen.
    assert!((100..=100 + 8 + 8).contains(&accepted), "{accepted}");
    for d in not_attempted {
        assert!(fake.sent_to(d.registration_id().as_str()).is_empty());
        assert_eq!(d.attempts(), 0);
    }
    assert_eq!(fake.send_count(), accepted);
}

#[tokio::test(start_paused = true)]
async fn persistent_quota_exceeded_stops_and_reports_the_rest() {
    let fake = RecordingTransport::new().latency(Duration::from_millis(1));
    fake.set_default_reply(Some(Reply::Error(ErrorCode::QuotaExceeded)));
    let sender = Sender::builder(fake.clone(), StaticToken::new(AuthToken::new("t").unwrap()))
        .retry_policy(
            RetryPolicy::default()
                .with_jitter(Jitter::None)
                .with_max_attempts(20)
                .with_max_backoff(Duration::from_secs(60)),
        )
        .build();
    let stream = sender
        .broadcast_to(
            futures::stream::iter(ids(200)),
            &template(),
            BroadcastOptions::default()
                .concurrency(4)
                .quota_give_up_after(Duration::from_secs(30)),
        )
        .unwrap();
    let deliveries = collect(stream).await;
    assert_eq!(deliveries.len(), 200);
    let exhausted = deliveries
        .iter()
        .filter(|d| {
            matches!(
                d.outcome(),
                Outcome::NotAttempted(NotAttempted::QuotaExhausted)
            )
        })
        .count();
    let failed = deliveries
        .iter()
        .filter(|d| matches!(d.outcome(), Outcome::Failed { .. }))
        .count();
    assert_eq!(exhausted + failed, 200);
    assert!(exhausted >= 190, "{exhausted} not attempted");
    assert!(failed >= 4, "the first sends ran out of attempts");
    assert!(deliveries.iter().all(|d| !d.is_accepted()));
    let mut report = DeliveryReport::new();
    deliveries.iter().for_each(|d| report.record(d));
    assert!(!report.all_final());
    assert_eq!(report.by_code()["quota_exhausted"] as usize, exhausted);
    assert_eq!(report.by_code()["QuotaExceeded"] as usize, failed);
}

#[tokio::test(start_paused = true)]
async fn budget_caps_accepted_messages() {
    let mut fake = RecordingTransport::new().latency(Duration::from_millis(1));
    for i in 0..10 {
        fake = fake.reply_to(&format!("dev-{i}"), ErrorCode::NotRegistered);
    }
    let stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(100)),
            &template(),
            BroadcastOptions::default().concurrency(8).budget(30),
        )
        .unwrap();
    let deliveries = collect(stream).await;
    assert_eq!(deliveries.len(), 100);
    let accepted = deliveries.iter().filter(|d| d.is_accepted()).count();
    let rejected = deliveries.iter().filter(|d| d.should_remove()).count();
    let budget_left = deliveries
        .iter()
        .filter(|d| {
            matches!(
                d.outcome(),
                Outcome::NotAttempted(NotAttempted::BudgetExhausted)
            )
        })
        .count();
    assert_eq!(accepted, 30);
    assert_eq!(rejected, 10);
    assert_eq!(budget_left, 60);
    assert_eq!(fake.accepted().len(), 30);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_spaces_the_sends() {
    let fake = RecordingTransport::new();
    let start = Instant::now();
    let stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(100)),
            &template(),
            BroadcastOptions::default().rate_per_second(NonZeroU32::new(10).unwrap()),
        )
        .unwrap();
    assert_eq!(collect(stream).await.len(), 100);
    // A burst of 10, then one every 100 ms: 9 s for 100.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(8_900) && elapsed <= Duration::from_millis(9_100),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn inputs_are_pulled_only_as_capacity_frees() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let inputs = futures::stream::iter(ids(10_000)).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let fake = RecordingTransport::new();
    let mut stream = static_sender(&fake)
        .broadcast_to(
            inputs,
            &template(),
            BroadcastOptions::default()
                .concurrency(4)
                .delivery_buffer(4),
        )
        .unwrap();
    // Take a few, then stop reading for a while: the broadcast must not run ahead.
    for _ in 0..3 {
        stream.next().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let ahead = pulled.load(Ordering::SeqCst);
    assert!(
        ahead <= 3 + 4 + 4 + 1,
        "pulled {ahead} inputs while the consumer slept"
    );
    // Reading resumes where it left off, and everything arrives.
    let mut rest = 3;
    while stream.next().await.is_some() {
        rest += 1;
    }
    assert_eq!(rest, 10_000);
}

#[tokio::test(start_paused = true)]
async fn report_counts_and_keeps_ids_when_asked() {
    let fake = RecordingTransport::new().reply_to("dev-1", ErrorCode::MismatchSenderId);
    let stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(3)),
            &template(),
            BroadcastOptions::default(),
        )
        .unwrap();
    let mut report = DeliveryReport::new().keep_accepted_ids(true);
    for d in collect(stream).await {
        report.record(&d);
    }
    report.finish();
    assert_eq!(report.total(), 3);
    assert_eq!(report.accepted_ids().unwrap().len(), 2);
    assert_eq!(report.by_code()["MismatchSenderId"], 1);
    assert!(report.to_remove().is_empty());
    let text = report.to_string();
    assert!(
        text.starts_with("3 messages: 2 accepted, 1 rejected, 0 failed, 0 not attempted"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_stops_the_broadcast() {
    let fake = RecordingTransport::new().latency(Duration::from_millis(10));
    let mut stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(10_000)),
            &template(),
            BroadcastOptions::default().concurrency(4),
        )
        .unwrap();
    for _ in 0..5 {
        stream.next().await.unwrap();
    }
    drop(stream);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let sent = fake.send_count();
    assert!(
        sent <= 5 + 4 + 4 + 1,
        "{sent} sends after the stream was dropped"
    );
}

/// A stream that counts how often it is polled after it ended (which streams need not allow).
struct Strict {
    left: std::vec::IntoIter<RegistrationId>,
    ended: bool,
    polled_after_end: Arc<AtomicUsize>,
}

impl futures::Stream for Strict {
    type Item = RegistrationId;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<RegistrationId>> {
        if self.ended {
            self.polled_after_end.fetch_add(1, Ordering::SeqCst);
            return std::task::Poll::Ready(None);
        }
        let next = self.left.next();
        self.ended = next.is_none();
        std::task::Poll::Ready(next)
    }
}

#[tokio::test(start_paused = true)]
async fn the_input_stream_is_never_polled_after_it_ends() {
    let polled_after_end = Arc::new(AtomicUsize::new(0));
    let inputs = Strict {
        left: ids(100).into_iter(),
        ended: false,
        polled_after_end: Arc::clone(&polled_after_end),
    };
    let fake = RecordingTransport::new();
    let stream = static_sender(&fake)
        .broadcast_to(
            inputs,
            &template(),
            BroadcastOptions::default().concurrency(8),
        )
        .unwrap();
    assert_eq!(collect(stream).await.len(), 100);
    assert_eq!(polled_after_end.load(Ordering::SeqCst), 0);
}

/// Panics for one device, answers `id=` for the others.
struct PanicsFor(&'static str);

#[async_trait]
impl c2dm_core::Transport for PanicsFor {
    async fn execute(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, c2dm_core::TransportError> {
        let form = c2dm_core::codec::SendForm::parse(request.body());
        if form.registration_id.as_deref() == Some(self.0) {
            panic!("transport bug");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(http::Response::new(bytes::Bytes::from_static(b"id=0:1")))
    }
}

/// A panic inside one send of a budgeted broadcast: before the fix the panicking task left the
/// budget's in-flight count raised, and the others waited for room for ever.
#[tokio::test(start_paused = true)]
async fn a_send_that_panics_gets_a_delivery_and_releases_the_budget() {
    let sender = Sender::new(
        PanicsFor("dev-3"),
        StaticToken::new(AuthToken::new("t").unwrap()),
    );
    let stream = sender
        .broadcast_to(
            futures::stream::iter(ids(20)),
            &template(),
            BroadcastOptions::default().concurrency(4).budget(10),
        )
        .unwrap();
    let deliveries = tokio::time::timeout(Duration::from_secs(3600), collect(stream))
        .await
        .expect("the broadcast ends");
    assert_eq!(deliveries.len(), 20);
    let boom = deliveries
        .iter()
        .find(|d| d.registration_id().as_str() == "dev-3")
        .unwrap();
    match boom.outcome() {
        Outcome::Failed { error } => {
            assert!(
                matches!(error, c2dm_core::Error::Panicked { message } if message == "transport bug")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(boom.possible_duplicates(), 1, "it may have been sent");
    assert_eq!(deliveries.iter().filter(|d| d.is_accepted()).count(), 10);
}

/// Cancelling ends the waits at once: before the fix a send waiting out a long Retry-After (up
/// to `max_retry_after`, an hour) held the broadcast until it ended.
#[tokio::test(start_paused = true)]
async fn cancelling_ends_sends_that_wait() {
    let fake = RecordingTransport::new().latency(Duration::from_millis(1));
    // Every answer asks everyone to wait 50 minutes; one device had a timeout after its
    // request was written, so its resend may be a second copy.
    fake.set_default_reply(Some(Reply::unavailable_for(3000)));
    let fake = fake.reply_to_times("dev-5", Reply::timeout_after_write(), 1);
    let mut stream = static_sender(&fake)
        .broadcast_to(
            futures::stream::iter(ids(20)),
            &template(),
            BroadcastOptions::default().concurrency(8),
        )
        .unwrap();
    let cancel = stream.cancel_handle();
    let start = Instant::now();
    // Let every slot start and meet the pause, then cancel.
    tokio::time::sleep(Duration::from_secs(60)).await;
    cancel.cancel();
    let mut deliveries = Vec::new();
    while let Some(d) = stream.next().await {
        deliveries.push(d);
    }
    assert_eq!(deliveries.len(), 20);
    assert!(
        start.elapsed() < Duration::from_secs(61),
        "{:?}",
        start.elapsed()
    );
    for d in &deliveries {
        match d.outcome() {
            Outcome::NotAttempted(NotAttempted::Cancelled) => assert_eq!(d.attempts(), 0),
            Outcome::Failed { error } => {
                assert!(
                    matches!(error, c2dm_core::Error::Cancelled { .. }),
                    "{error}"
                );
                assert!(d.attempts() >= 1);
            }
            other => panic!("{other:?}"),
        }
    }
    let dev5 = deliveries
        .iter()
        .find(|d| d.registration_id().as_str() == "dev-5")
        .unwrap();
    assert_eq!(dev5.possible_duplicates(), 1, "it may have been sent");
    assert_eq!(fake.accepted().len(), 0);
}
