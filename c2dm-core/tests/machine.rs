//! The send machine, one row per answer of the protocol's table and per fault, with no runtime:
//! answers are decoded from status, headers and body, time is a value.

use std::time::{Duration, SystemTime};

use c2dm_core::codec::decode_send_response;
use c2dm_core::machine::{Action, BeforeAttempt, Pause, SendMachine, Step};
use c2dm_core::retry::Jitter;
use c2dm_core::{Error, RequestSent, RetryPolicy, TransportError, TransportErrorKind};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

fn policy() -> RetryPolicy {
    RetryPolicy::default().with_jitter(Jitter::None)
}

fn answer(
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<c2dm_core::MessageId, Error> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    decode_send_response(
        StatusCode::from_u16(status).unwrap(),
        &map,
        body.as_bytes(),
        SystemTime::UNIX_EPOCH,
    )
    .result
}

/// What a step comes to, in a form a table can hold.
#[derive(Debug, PartialEq)]
enum Next {
    Accepted,
    /// Final, with the error's text.
    Fails(String),
    RetryIn(Duration),
    Refresh,
}

#[derive(Debug, PartialEq)]
enum Who {
    Nobody,
    Everyone(Duration),
    Device(Duration),
}

fn read(step: Step, now: Instant) -> (Next, Who) {
    let next = match step.action {
        Action::Finish(Ok(_)) => Next::Accepted,
        Action::Finish(Err(e)) => Next::Fails(e.error.to_string()),
        Action::RetryAt(at) => Next::RetryIn(at - now),
        Action::RefreshToken => Next::Refresh,
    };
    let who = match step.pause {
        None => Who::Nobody,
        Some(Pause::Everyone { until }) => Who::Everyone(until - now),
        Some(Pause::Device { until }) => Who::Device(until - now),
    };
    (next, who)
}

/// The first attempt of a fresh send, answered with `reply`.
fn first(reply: Result<c2dm_core::MessageId, Error>) -> (Next, Who) {
    let policy = policy();
    let now = Instant::now();
    let mut machine = SendMachine::new(&policy, now);
    assert!(matches!(
        machine.before_attempt(None, now),
        BeforeAttempt::Send { deadline: None }
    ));
    read(machine.on_reply(reply, true, now, 0.5), now)
}

const SECOND: Duration = Duration::from_secs(1);

fn fails(text: &str) -> Next {
    Next::Fails(text.to_owned())
}

#[test]
fn every_answer_row_of_the_protocol() {
    use Next::*;
    use Who::*;
    let rows: Vec<(&str, Result<c2dm_core::MessageId, Error>, Next, Who)> = vec![
        ("200 id=", answer(200, &[], "id=0:1%abc"), Accepted, Nobody),
        (
            "200 QuotaExceeded",
            answer(200, &[], "Error=QuotaExceeded"),
            RetryIn(SECOND),
            Everyone(SECOND),
        ),
        (
            "200 DeviceQuotaExceeded",
            answer(200, &[], "Error=DeviceQuotaExceeded"),
            RetryIn(SECOND),
            Device(SECOND),
        ),
        (
            "200 MissingRegistration",
            answer(200, &[], "Error=MissingRegistration"),
            fails("C2DM rejected the message: MissingRegistration"),
            Nobody,
        ),
        (
            "200 InvalidRegistration",
            answer(200, &[], "Error=InvalidRegistration"),
            fails("C2DM rejected the message: InvalidRegistration"),
            Nobody,
        ),
        (
            "200 MismatchSenderId",
            answer(200, &[], "Error=MismatchSenderId"),
            fails("C2DM rejected the message: MismatchSenderId"),
            Nobody,
        ),
        (
            "200 NotRegistered",
            answer(200, &[], "Error=NotRegistered"),
            fails("C2DM rejected the message: NotRegistered"),
            Nobody,
        ),
        (
            "200 MessageTooBig",
            answer(200, &[], "Error=MessageTooBig"),
            fails("C2DM rejected the message: MessageTooBig"),
            Nobody,
        ),
        (
            "200 MissingCollapseKey",
            answer(200, &[], "Error=MissingCollapseKey"),
            fails("C2DM rejected the message: MissingCollapseKey"),
            Nobody,
        ),
        (
            "200 unknown code",
            answer(200, &[], "Error=SomethingNew"),
            fails("C2DM rejected the message: SomethingNew"),
            Nobody,
        ),
        (
            "200 empty code",
            answer(200, &[], "Error="),
            fails("C2DM rejected the message: "),
            Nobody,
        ),
        (
            "200 neither id= nor Error=",
            answer(200, &[], "hello"),
            RetryIn(SECOND),
            Everyone(SECOND),
        ),
        (
            "401 on a token that worked",
            answer(401, &[], "<html>"),
            Refresh,
            Nobody,
        ),
        (
            "503 without Retry-After",
            answer(503, &[], ""),
            RetryIn(SECOND),
            Everyone(SECOND),
        ),
        (
            "503 Retry-After seconds",
            answer(503, &[("retry-after", "30")], ""),
            RetryIn(30 * SECOND),
            Everyone(30 * SECOND),
        ),
        (
            "503 Retry-After date",
            answer(503, &[("retry-after", "Thu, 01 Jan 1970 00:00:45 GMT")], ""),
            RetryIn(45 * SECOND),
            Everyone(45 * SECOND),
        ),
        (
            "503 Retry-After longer than the policy waits",
            answer(503, &[("retry-after", "7200")], ""),
            fails("C2DM is unavailable (HTTP 503), retry after 7200s"),
            Everyone(7200 * SECOND),
        ),
        (
            "500",
            answer(500, &[], ""),
            RetryIn(SECOND),
            Everyone(SECOND),
        ),
        (
            "502",
            answer(502, &[], ""),
            RetryIn(SECOND),
            Everyone(SECOND),
        ),
        (
            "404 (a wrong URL)",
            answer(404, &[], ""),
            fails("unexpected HTTP status 404 from the send endpoint"),
            Nobody,
        ),
        (
            "Update-Client-Auth on an accepted answer",
            answer(200, &[("update-client-auth", "new")], "id=0:2"),
            Accepted,
            Nobody,
        ),
        (
            "connection refused (not sent)",
            Err(TransportError::new(TransportErrorKind::Connect, RequestSent::No).into()),
            RetryIn(SECOND),
            Nobody,
        ),
        (
            "timeout after writing (maybe sent)",
            Err(TransportError::new(TransportErrorKind::Timeout, RequestSent::Maybe).into()),
            RetryIn(SECOND),
            Nobody,
        ),
        (
            "untrusted certificate",
            Err(TransportError::new(TransportErrorKind::Tls, RequestSent::No).into()),
            fails("TLS handshake failed (not sent)"),
            Nobody,
        ),
    ];
    for (name, reply, next, who) in rows {
        assert_eq!(first(reply), (next, who), "{name}");
    }
}

#[test]
fn a_possible_duplicate_is_counted_when_resent() {
    let policy = policy();
    let now = Instant::now();
    let mut machine = SendMachine::new(&policy, now);
    let _ = machine.before_attempt(None, now);
    let maybe = TransportError::new(TransportErrorKind::ConnectionLost, RequestSent::Maybe);
    let step = machine.on_reply(Err(maybe.into()), false, now, 0.5);
    assert!(matches!(step.action, Action::RetryAt(_)));
    assert_eq!(machine.tally().possible_duplicates, 1);
    let strict = policy.clone().with_retry_possible_duplicates(false);
    let mut machine = SendMachine::new(&strict, now);
    let _ = machine.before_attempt(None, now);
    let maybe = TransportError::new(TransportErrorKind::ConnectionLost, RequestSent::Maybe);
    match machine.on_reply(Err(maybe.into()), false, now, 0.5).action {
        Action::Finish(Err(e)) => assert!(e.possibly_delivered()),
        other => panic!("{other:?}"),
    }
}

/// Runs out of attempts on 503s: the last one still pauses everyone.
#[test]
fn running_out_of_attempts_on_a_503_still_pauses_everyone() {
    let policy = policy().with_max_attempts(2);
    let mut now = Instant::now();
    let mut machine = SendMachine::new(&policy, now);
    let _ = machine.before_attempt(None, now);
    let step = machine.on_reply(answer(503, &[], ""), false, now, 0.5);
    let Action::RetryAt(at) = step.action else {
        panic!("{step:?}")
    };
    now = at;
    let _ = machine.before_attempt(None, now);
    let step = machine.on_reply(answer(503, &[("retry-after", "20")], ""), false, now, 0.5);
    assert!(matches!(step.action, Action::Finish(Err(_))));
    assert_eq!(
        step.pause,
        Some(Pause::Everyone {
            until: now + 20 * SECOND
        })
    );
    let tally = machine.tally();
    assert_eq!((tally.attempts, tally.waited), (2, SECOND));
}

#[test]
fn the_401_rule() {
    let policy = policy();
    let now = Instant::now();
    let unauthorized = || answer(401, &[], "");
    // A token that had worked expired: renewed, again and again, without using up attempts.
    let mut machine = SendMachine::new(&policy, now);
    for _ in 0..50 {
        let _ = machine.before_attempt(None, now);
        let step = machine.on_reply(unauthorized(), true, now, 0.5);
        assert!(matches!(step.action, Action::RefreshToken));
    }
    let _ = machine.before_attempt(None, now);
    assert!(matches!(
        machine.on_reply(answer(200, &[], "id=1"), true, now, 0.5).action,
        Action::Finish(Ok(ref sent)) if sent.tally.attempts == 51
    ));
    // ... within the renewals the policy allows.
    let few = policy.clone().with_max_token_renewals(2);
    let mut machine = SendMachine::new(&few, now);
    let mut steps = Vec::new();
    for _ in 0..3 {
        let _ = machine.before_attempt(None, now);
        steps.push(machine.on_reply(unauthorized(), true, now, 0.5).action);
    }
    assert!(matches!(steps[1], Action::RefreshToken));
    assert!(matches!(steps[2], Action::Finish(Err(_))));
    // Tokens that never worked: the second refusal in a row is final.
    let mut machine = SendMachine::new(&policy, now);
    let _ = machine.before_attempt(None, now);
    let step = machine.on_reply(unauthorized(), false, now, 0.5);
    assert!(matches!(step.action, Action::RefreshToken));
    let _ = machine.before_attempt(None, now);
    match machine.on_reply(unauthorized(), false, now, 0.5).action {
        Action::Finish(Err(e)) => {
            assert!(matches!(e.error, Error::Unauthorized));
            assert_eq!(e.tally.attempts, 2);
        }
        other => panic!("{other:?}"),
    }
    // A refusal of a token that worked between two that did not breaks the streak.
    let mut machine = SendMachine::new(&policy, now);
    for worked in [false, true, false] {
        let _ = machine.before_attempt(None, now);
        let step = machine.on_reply(unauthorized(), worked, now, 0.5);
        assert!(matches!(step.action, Action::RefreshToken), "{worked}");
    }
}

#[test]
fn pauses_are_waited_out_within_bounds() {
    let policy = policy().with_max_retry_after(Duration::from_secs(60));
    let now = Instant::now();
    let mut machine = SendMachine::new(&policy, now);
    // A pause within the bound: wait, and the wait is counted.
    assert!(matches!(
        machine.before_attempt(Some(now + 10 * SECOND), now),
        BeforeAttempt::WaitUntil(at) if at == now + 10 * SECOND
    ));
    assert!(matches!(
        machine.before_attempt(Some(now + 10 * SECOND), now + 10 * SECOND),
        BeforeAttempt::Send { .. }
    ));
    assert_eq!(machine.tally().waited, 10 * SECOND);
    // A pause longer than a message may wait: fail now, not sent, retryable later.
    let mut machine = SendMachine::new(&policy, now);
    match machine.before_attempt(Some(now + 3600 * SECOND), now) {
        BeforeAttempt::GiveUp(e) => {
            assert!(matches!(e.error, Error::Paused { .. }));
            assert!(e.is_retryable());
            assert!(!e.possibly_delivered());
            assert_eq!(e.tally.attempts, 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_deadline_bounds_attempts_and_waits() {
    let policy = policy().with_deadline(Duration::from_secs(10));
    let start = Instant::now();
    let mut machine = SendMachine::new(&policy, start);
    assert_eq!(machine.deadline(), Some(start + 10 * SECOND));
    assert!(matches!(
        machine.before_attempt(None, start),
        BeforeAttempt::Send { deadline: Some(d) } if d == start + 10 * SECOND
    ));
    // A retry that would start after the deadline is not scheduled.
    let step = machine.on_reply(answer(503, &[("retry-after", "30")], ""), false, start, 0.5);
    match step.action {
        Action::Finish(Err(e)) => {
            assert!(matches!(e.error, Error::DeadlineExceeded { .. }), "{e}");
            assert!(e.to_string().contains("after 1 attempt"), "{e}");
            assert!(e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    // The pause still holds for the others.
    assert_eq!(
        step.pause,
        Some(Pause::Everyone {
            until: start + 30 * SECOND
        })
    );
    // A pause ending after the deadline is not waited for.
    let mut machine = SendMachine::new(&policy, start);
    assert!(matches!(
        machine.before_attempt(Some(start + 20 * SECOND), start),
        BeforeAttempt::GiveUp(_)
    ));
    // An exchange cut off at the deadline may have been sent, and the error says so.
    let mut machine = SendMachine::new(&policy, start);
    let _ = machine.before_attempt(None, start);
    let cut = TransportError::new(TransportErrorKind::Timeout, RequestSent::Maybe);
    match machine
        .on_reply(Err(cut.into()), false, start + 10 * SECOND, 0.5)
        .action
    {
        Action::Finish(Err(e)) => {
            assert!(e.possibly_delivered());
            assert!(e.to_string().contains("may have been delivered"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_server_bytes_or_settings_overflow_the_clock() {
    let policy = policy()
        .with_max_retry_after(Duration::MAX)
        .with_max_backoff(Duration::MAX)
        .with_jitter(Jitter::Half);
    let now = Instant::now();
    let mut machine = SendMachine::new(&policy, now);
    let _ = machine.before_attempt(None, now);
    let huge = answer(503, &[("retry-after", "99999999999999999999")], "");
    let step = machine.on_reply(huge, false, now, 0.999);
    assert!(matches!(step.action, Action::RetryAt(at) if at > now));
    // The jitter sum saturates however large the delays are set.
    let extreme = policy.clone().with_initial_backoff(Duration::MAX);
    for attempt in [1, 32, u32::MAX] {
        assert_eq!(extreme.backoff(attempt, 0.999), Duration::MAX, "{attempt}");
    }
    let mut machine = SendMachine::new(&extreme, now);
    let _ = machine.before_attempt(None, now);
    let step = machine.on_reply(answer(500, &[], ""), false, now, 0.999);
    assert!(matches!(step.action, Action::RetryAt(at) if at > now));
}
