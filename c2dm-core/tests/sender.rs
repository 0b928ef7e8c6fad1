//! The Sender's rules, each with exact delays and attempt counts, under paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use c2dm_core::retry::Jitter;
use c2dm_core::{
    AuthToken, Error, ErrorCode, Login, Message, RequestSent, RetryPolicy, Sender, StaticToken,
    TokenCache, TokenError, TransportErrorKind,
};
use c2dm_mock::{RecordingTransport, Reply, RetryAfter};
use tokio::time::Instant;

fn token(s: &str) -> AuthToken {
    AuthToken::new(s).unwrap()
}

fn message(id: &str) -> Message {
    Message::builder(id)
        .collapse_key("k")
        .data("m", "x")
        .build()
        .unwrap()
}

/// No jitter, so delays are exact: 1 s, 2 s, 4 s, …
fn exact() -> RetryPolicy {
    RetryPolicy::default().with_jitter(Jitter::None)
}

fn exact_sender(fake: &RecordingTransport) -> Sender {
    Sender::builder(fake.clone(), StaticToken::new(token("tok")))
        .retry_policy(exact())
        .jitter_seed(7)
        .build()
}

#[tokio::test(start_paused = true)]
async fn accepted_on_the_first_attempt() {
    let fake = RecordingTransport::new();
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.attempts, 1);
    assert_eq!(sent.tally.waited, Duration::ZERO);
    assert_eq!(sent.tally.possible_duplicates, 0);
    assert_eq!(
        fake.accepted()[0].accepted_id(),
        Some(sent.message_id.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn unavailable_backs_off_exponentially() {
    let fake = RecordingTransport::new();
    for _ in 0..3 {
        fake.enqueue(Reply::Unavailable(None));
    }
    let start = Instant::now();
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.attempts, 4);
    assert_eq!(sent.tally.waited, Duration::from_secs(1 + 2 + 4));
    assert_eq!(start.elapsed(), Duration::from_secs(7));
    assert_eq!(fake.send_count(), 4);
}

#[tokio::test(start_paused = true)]
async fn server_errors_and_malformed_answers_are_retried() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::server_error());
    fake.enqueue(Reply::Raw {
        status: 502,
        body: String::new(),
    });
    fake.enqueue(Reply::Raw {
        status: 200,
        body: "garbage".into(),
    });
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.attempts, 4);
    assert_eq!(sent.tally.waited, Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn half_jitter_is_seeded_and_within_bounds() {
    let run = |seed| async move {
        let fake = RecordingTransport::new();
        fake.enqueue(Reply::Unavailable(None));
        fake.enqueue(Reply::Unavailable(None));
        let sender = Sender::builder(fake, StaticToken::new(token("t")))
            .jitter_seed(seed)
            .build();
        sender.send(message("d")).await.unwrap().tally.waited
    };
    let a = run(1).await;
    assert_eq!(a, run(1).await, "same seed, same delays");
    assert_ne!(a, run(2).await, "another seed, other delays");
    // d/2 + rand(d) for d = 1 s then 2 s: between 1.5 s and 4.5 s in all.
    assert!(
        a >= Duration::from_millis(1500) && a < Duration::from_millis(4500),
        "{a:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_longer_retry_after_wins_in_both_forms() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::unavailable_for(30));
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.waited, Duration::from_secs(30));

    // An HTTP-date, read against the injected wall clock.
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::Unavailable(Some(RetryAfter::Date(
        now + Duration::from_secs(45),
    ))));
    let sender = Sender::builder(fake.clone(), StaticToken::new(token("t")))
        .retry_policy(exact())
        .wall_clock(move || now)
        .build();
    let sent = sender.send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.waited, Duration::from_secs(45));

    // A Retry-After shorter than the backoff loses to it.
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::Unavailable(None));
    fake.enqueue(Reply::unavailable_for(1));
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.waited, Duration::from_secs(1 + 2));
}

#[tokio::test(start_paused = true)]
async fn a_503_holds_every_concurrent_send() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::unavailable_for(30));
    let sender = exact_sender(&fake);
    let start = Instant::now();
    let first = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send(message("d1")).await }
    });
    // Let the first send meet its 503, then start others a second later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sender.paused_until().is_some());
    // The pause says why it was taken: the answer's error.
    let reason = sender.pause_reason().expect("a reason while paused");
    assert!(reason.contains("503"), "{reason}");
    let others: Vec<_> = (2..=5)
        .map(|i| {
            let sender = sender.clone();
            tokio::spawn(async move { sender.send(message(&format!("d{i}"))).await })
        })
        .collect();
    for other in others {
        let sent = other.await.unwrap().unwrap();
        assert_eq!(sent.tally.attempts, 1, "the others wait instead of failing");
        assert_eq!(sent.tally.waited, Duration::from_secs(29));
    }
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.tally.attempts, 2);
    // Nothing was sent during the pause: one 503, then six accepted at t = 30 s.
    assert_eq!(fake.send_count(), 6);
    assert_eq!(sender.pause_reason(), None, "no pause, no reason");
}

#[tokio::test(start_paused = true)]
async fn quota_exceeded_pauses_everyone() {
    let fake = RecordingTransport::new();
    fake.enqueue(ErrorCode::QuotaExceeded);
    let sender = exact_sender(&fake);
    let first = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send(message("d1")).await }
    });
    tokio::task::yield_now().await;
    let start = Instant::now();
    let other = sender.send(message("d2")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(other.tally.attempts, 1);
    assert_eq!(first.await.unwrap().unwrap().tally.attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn device_quota_pauses_only_that_device() {
    let fake = RecordingTransport::new().reply_to_times("slow", ErrorCode::DeviceQuotaExceeded, 2);
    let sender = exact_sender(&fake);
    let start = Instant::now();
    let slow = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send(message("slow")).await }
    });
    tokio::task::yield_now().await;
    let fast = sender.send(message("fast")).await.unwrap();
    assert_eq!(fast.tally.waited, Duration::ZERO);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "other devices go at full speed"
    );
    // A second send to the paused device waits for the pause too: it starts now, while the
    // first one waits out its first second, and goes when that pause ends.
    let second = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send(message("slow")).await }
    });
    tokio::task::yield_now().await;
    assert_eq!(sender.paused_devices(), 1);
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.tally.attempts, 3);
    assert_eq!(slow.tally.waited, Duration::from_secs(1 + 2));
    let second = second.await.unwrap().unwrap();
    assert!(
        second.tally.waited >= Duration::from_secs(1),
        "{:?}",
        second.tally.waited
    );
    assert!(sender.paused_until().is_none());
    assert_eq!(sender.paused_devices(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_is_used_from_the_next_request_and_nothing_is_resent() {
    let fake = RecordingTransport::new();
    fake.rotate_token_on_next_reply(token("rotated"));
    let sender = exact_sender(&fake);
    sender.send(message("d1")).await.unwrap();
    sender.send(message("d2")).await.unwrap();
    let sent = fake.sent();
    assert_eq!(sent.len(), 2, "a rotation is no reason to resend");
    assert_eq!(sent[0].token().unwrap().expose_secret(), "tok");
    assert_eq!(sent[1].token().unwrap().expose_secret(), "rotated");
}

#[tokio::test(start_paused = true)]
async fn rotation_rides_on_error_answers_too() {
    let fake = RecordingTransport::new().reply_to("gone", ErrorCode::NotRegistered);
    fake.rotate_token_on_next_reply(token("rotated"));
    let sender = exact_sender(&fake);
    let err = sender.send(message("gone")).await.unwrap_err();
    assert!(err.should_remove_registration());
    sender.send(message("d2")).await.unwrap();
    assert_eq!(fake.sent()[1].token().unwrap().expose_secret(), "rotated");
}

struct Logins(AtomicU32);

#[async_trait]
impl Login for Logins {
    async fn login(&self) -> Result<AuthToken, TokenError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        // A login takes a while; everyone who meets the 401 meanwhile waits for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(token(&format!("login-{n}")))
    }
}

#[tokio::test(start_paused = true)]
async fn a_401_logs_in_again_once_and_retries() {
    let fake = RecordingTransport::new().accept_only_tokens([token("login-2")]);
    let tokens = Arc::new(TokenCache::new(Logins(AtomicU32::new(0))));
    let sender = Sender::builder(fake.clone(), Arc::clone(&tokens))
        .retry_policy(exact())
        .build();
    let sent = sender.send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.attempts, 2);
    assert_eq!(
        sent.tally.waited,
        Duration::ZERO,
        "a refreshed token is tried at once"
    );
    assert_eq!(tokens.login_count(), 2);
    let sent = fake.sent();
    assert_eq!(sent[0].token().unwrap().expose_secret(), "login-1");
    assert_eq!(sent[1].token().unwrap().expose_secret(), "login-2");
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_sends_meeting_one_401_cause_one_login() {
    let fake = RecordingTransport::new()
        .accept_only_tokens([token("login-2")])
        .latency(Duration::from_millis(10));
    let tokens = Arc::new(TokenCache::with_token(
        Logins(AtomicU32::new(1)),
        token("expired"),
    ));
    let sender = Sender::builder(fake.clone(), Arc::clone(&tokens))
        .retry_policy(exact())
        .build();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let sender = sender.clone();
            tokio::spawn(async move { sender.send(message(&format!("d{i}"))).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().tally.attempts, 2);
    }
    assert_eq!(tokens.login_count(), 1, "one login for all hundred");
    assert_eq!(fake.accepted().len(), 100);
}

#[tokio::test(start_paused = true)]
async fn a_second_401_in_a_row_is_final() {
    let fake = RecordingTransport::new().accept_only_tokens([]);
    let tokens = TokenCache::new(Logins(AtomicU32::new(0)));
    let sender = Sender::builder(fake.clone(), tokens)
        .retry_policy(exact())
        .build();
    let err = sender.send(message("d1")).await.unwrap_err();
    assert!(matches!(err.error, Error::Unauthorized));
    assert_eq!(err.tally.attempts, 2);
    assert_eq!(fake.send_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_static_token_that_is_refused_is_a_final_token_error() {
    let fake = RecordingTransport::new().accept_only_tokens([]);
    let err = exact_sender(&fake).send(message("d1")).await.unwrap_err();
    assert!(matches!(err.error, Error::Token(TokenError::Refused)));
    assert_eq!(err.tally.attempts, 1);
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn transport_failures_not_sent_are_retried_without_duplicates() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::connect_failure());
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.attempts, 2);
    assert_eq!(sent.tally.possible_duplicates, 0);
    assert_eq!(sent.tally.waited, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn possibly_sent_failures_are_retried_and_counted_by_default() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::timeout_after_write());
    let sent = exact_sender(&fake).send(message("d1")).await.unwrap();
    assert_eq!(sent.tally.attempts, 2);
    assert_eq!(sent.tally.possible_duplicates, 1);
}

#[tokio::test(start_paused = true)]
async fn possibly_sent_failures_are_final_when_the_policy_says_so() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::timeout_after_write());
    let sender = Sender::builder(fake.clone(), StaticToken::new(token("t")))
        .retry_policy(exact().with_retry_possible_duplicates(false))
        .build();
    let err = sender.send(message("d1")).await.unwrap_err();
    assert_eq!(err.tally.attempts, 1);
    assert!(err.possibly_delivered());
    match err.error {
        Error::Transport(t) => {
            assert_eq!(t.kind(), TransportErrorKind::Timeout);
            assert_eq!(t.request_sent(), RequestSent::Maybe);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_rejections_are_never_retried() {
    for code in [
        ErrorCode::InvalidRegistration,
        ErrorCode::NotRegistered,
        ErrorCode::MismatchSenderId,
        ErrorCode::MissingRegistration,
        ErrorCode::MessageTooBig,
        ErrorCode::MissingCollapseKey,
        ErrorCode::Unknown("Brand new".into()),
    ] {
        let fake = RecordingTransport::new().reply_to("d", code.clone());
        let err = exact_sender(&fake).send(message("d")).await.unwrap_err();
        assert_eq!(err.tally.attempts, 1, "{code}");
        assert_eq!(fake.send_count(), 1, "{code}");
        assert_eq!(err.error.code(), Some(&code));
        assert_eq!(
            err.should_remove_registration(),
            matches!(
                code,
                ErrorCode::InvalidRegistration | ErrorCode::NotRegistered
            ),
            "{code}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_attempt_bound_holds() {
    let fake = RecordingTransport::new().reply_to("d", Reply::Unavailable(None));
    let sender = Sender::builder(fake.clone(), StaticToken::new(token("t")))
        .retry_policy(exact().with_max_attempts(4))
        .build();
    let err = sender.send(message("d")).await.unwrap_err();
    assert_eq!(err.tally.attempts, 4);
    assert_eq!(fake.send_count(), 4);
    assert_eq!(err.tally.waited, Duration::from_secs(1 + 2 + 4));
    assert!(err.is_retryable(), "the caller may try again later");
    assert_eq!(
        err.to_string(),
        "C2DM is unavailable (HTTP 503) (after 4 attempts)"
    );
}

#[tokio::test(start_paused = true)]
async fn sends_to_the_configured_endpoint() {
    let fake = RecordingTransport::new();
    let sender = Sender::builder(fake.clone(), StaticToken::new(token("t")))
        .endpoint(http::Uri::from_static("http://127.0.0.1:9/c2dm/send"))
        .build();
    sender.send(message("d")).await.unwrap();
    assert_eq!(
        fake.sent()[0].request().uri(),
        "http://127.0.0.1:9/c2dm/send"
    );
}

/// A bare 500 (no Retry-After) pauses every send, as 503 does: before the fix only the send
/// that got it backed off, and the others kept sending into the failing server.
#[tokio::test(start_paused = true)]
async fn a_bare_500_pauses_every_send() {
    for status in [500, 502] {
        let fake = RecordingTransport::new();
        fake.enqueue(Reply::Raw {
            status,
            body: String::new(),
        });
        let sender = exact_sender(&fake);
        let first = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(message("d1")).await }
        });
        tokio::task::yield_now().await;
        assert!(sender.paused_until().is_some(), "{status}");
        let start = Instant::now();
        let other = sender.send(message("d2")).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1), "{status}");
        assert_eq!(other.tally.waited, Duration::from_secs(1));
        assert_eq!(first.await.unwrap().unwrap().tally.attempts, 2);
    }
}

/// A Retry-After longer than the policy waits fails that message, and still pauses everyone:
/// the others fail at once too (not sent, retryable), instead of running into the server.
#[tokio::test(start_paused = true)]
async fn a_retry_after_too_long_to_wait_still_pauses_everyone() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::unavailable_for(7200));
    let sender = exact_sender(&fake);
    let err = sender.send(message("d1")).await.unwrap_err();
    assert!(matches!(err.error, Error::Unavailable { .. }));
    let until = sender.paused_until().expect("everyone is paused");
    assert_eq!(until - Instant::now(), Duration::from_secs(7200));
    let other = sender.send(message("d2")).await.unwrap_err();
    assert!(matches!(other.error, Error::Paused { .. }), "{other}");
    assert!(other.is_retryable() && !other.possibly_delivered());
    assert_eq!(fake.send_count(), 1, "nothing more reached the server");
}

/// Running out of attempts on 503s leaves the pause it learned in force for the rest.
#[tokio::test(start_paused = true)]
async fn running_out_of_attempts_on_503_leaves_the_pause() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::unavailable_for(5));
    let sender = Sender::builder(fake.clone(), StaticToken::new(token("tok")))
        .retry_policy(RetryPolicy::never().with_jitter(Jitter::None))
        .build();
    assert!(sender.send(message("d1")).await.is_err());
    let start = Instant::now();
    let other = sender.send(message("d2")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(other.tally.waited, Duration::from_secs(5));
}

/// A send dropped while it waits out its device's pause takes the pause with it: before the
/// fix the entry stayed in the sender for ever.
#[tokio::test(start_paused = true)]
async fn a_dropped_send_leaves_no_device_pause_behind() {
    let fake = RecordingTransport::new().reply_to("busy", ErrorCode::DeviceQuotaExceeded);
    let sender = exact_sender(&fake);
    let attempt =
        tokio::time::timeout(Duration::from_millis(500), sender.send(message("busy"))).await;
    assert!(attempt.is_err(), "still waiting when dropped");
    assert_eq!(sender.paused_devices(), 0);
    // A finished send whose device pause ran out leaves none either.
    let fake = RecordingTransport::new().reply_to_times("busy", ErrorCode::DeviceQuotaExceeded, 1);
    let sender = exact_sender(&fake);
    sender.send(message("busy")).await.unwrap();
    assert_eq!(sender.paused_devices(), 0);
}

/// A server that accepts and never answers: the deadline ends the send, however many attempts
/// fit, with an error that counts them and says the message may have been delivered.
#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_send_to_a_server_that_never_answers() {
    let sender = Sender::builder(c2dm_mock::NeverTransport, StaticToken::new(token("tok")))
        .retry_policy(exact().with_deadline(Duration::from_secs(120)))
        .build();
    let start = Instant::now();
    let err = sender.send(message("d1")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(120));
    assert!(matches!(err.error, Error::DeadlineExceeded { .. }), "{err}");
    assert_eq!(err.tally.attempts, 1);
    assert!(err.possibly_delivered());
    assert!(err.to_string().contains("may have been delivered"), "{err}");
}

/// A pause taken from an answer is told at once to whoever watches for pauses (a server
/// sharing it with its other workers), with its end; a shorter one later tells nothing.
#[tokio::test(start_paused = true)]
async fn a_pause_is_told_as_it_is_taken() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::unavailable_for(30));
    let sender = exact_sender(&fake);
    let mut pauses = sender.pause_changes();
    assert_eq!(*pauses.borrow_and_update(), None);
    let start = Instant::now();
    let first = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send(message("d1")).await }
    });
    pauses.changed().await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "told before any time passed"
    );
    let until = pauses.borrow_and_update().expect("a pause");
    assert_eq!(until - start, Duration::from_secs(30));
    assert_eq!(sender.paused_until(), Some(until));
    sender.pause_all_until(start + Duration::from_secs(5));
    assert!(
        !pauses.has_changed().unwrap(),
        "a shorter pause changes nothing"
    );
    assert_eq!(first.await.unwrap().unwrap().tally.attempts, 2);
}
