//! The send machine's table for FCM: each answer FCM documents, read by the FCM protocol, and
//! what the machine does with it (as `c2dm-core/tests/machine.rs` does for C2DM's).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use c2dm_core::machine::{Action, BeforeAttempt, Pause, SendMachine};
use c2dm_core::retry::Jitter;
use c2dm_core::{Error, Protocol, RetryPolicy};
use c2dm_fcm::codec::error_body;
use c2dm_fcm::{Fcm, MIN_QUOTA_BACKOFF};
use http::StatusCode;
use tokio::time::Instant;

#[derive(Debug, PartialEq)]
enum Next {
    Accepted,
    /// Final; whether the device is to be removed.
    Fails {
        remove: bool,
    },
    RetryIn(Duration),
    Refresh,
}

#[derive(Debug, PartialEq)]
enum Who {
    Nobody,
    Everyone(Duration),
    Device(Duration),
}

fn reply(
    status: u16,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<c2dm_core::MessageId, Error> {
    let mut builder = http::Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Fcm::new("p")
        .unwrap()
        .decode(&builder.body(body).unwrap(), SystemTime::UNIX_EPOCH)
        .result
}

fn fcm(status: u16, rpc: &str, code: &str) -> Bytes {
    error_body(
        StatusCode::from_u16(status).unwrap(),
        rpc,
        Some(code),
        "words",
    )
}

fn first(reply: Result<c2dm_core::MessageId, Error>) -> (Next, Who) {
    let policy = RetryPolicy::default().with_jitter(Jitter::None);
    let now = Instant::now();
    let mut machine = SendMachine::new(&policy, now);
    assert!(matches!(
        machine.before_attempt(None, now),
        BeforeAttempt::Send { .. }
    ));
    let step = machine.on_reply(reply, true, now, 0.5);
    let next = match step.action {
        Action::Finish(Ok(_)) => Next::Accepted,
        Action::Finish(Err(e)) => Next::Fails {
            remove: e.error.should_remove_registration(),
        },
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

#[test]
fn every_answer_fcm_documents() {
    use Next::*;
    use Who::*;
    let second = Duration::from_secs(1);
    let device_quota = Bytes::from(
        r#"{"error": {"code": 429, "message": "q", "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "QUOTA_EXCEEDED"},
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"subject": "device"}]}]}}"#,
    );
    let bad_message = Bytes::from(
        r#"{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT", "details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.data"}]}]}}"#,
    );
    let rows: Vec<(&str, Result<c2dm_core::MessageId, Error>, Next, Who)> = vec![
        (
            "200 name",
            reply(
                200,
                &[],
                Bytes::from_static(br#"{"name": "projects/p/messages/1"}"#),
            ),
            Accepted,
            Nobody,
        ),
        (
            "404 UNREGISTERED",
            reply(404, &[], fcm(404, "NOT_FOUND", "UNREGISTERED")),
            Fails { remove: true },
            Nobody,
        ),
        (
            "400 INVALID_ARGUMENT, the token",
            reply(
                400,
                &[],
                error_body(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    Some("INVALID_ARGUMENT"),
                    "The registration token is not a valid FCM registration token",
                ),
            ),
            Fails { remove: true },
            Nobody,
        ),
        (
            "400 INVALID_ARGUMENT, the message",
            reply(400, &[], bad_message),
            Fails { remove: false },
            Nobody,
        ),
        (
            "403 SENDER_ID_MISMATCH",
            reply(
                403,
                &[],
                fcm(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
            ),
            Fails { remove: false },
            Nobody,
        ),
        (
            "401 THIRD_PARTY_AUTH_ERROR",
            reply(
                401,
                &[],
                fcm(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"),
            ),
            Fails { remove: false },
            Nobody,
        ),
        (
            "401 UNAUTHENTICATED",
            reply(401, &[], Bytes::new()),
            Refresh,
            Nobody,
        ),
        (
            "429 QUOTA_EXCEEDED, the project",
            reply(
                429,
                &[("retry-after", "90")],
                fcm(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
            ),
            RetryIn(Duration::from_secs(90)),
            Everyone(Duration::from_secs(90)),
        ),
        (
            "429 QUOTA_EXCEEDED, a device, at least a minute",
            reply(429, &[("retry-after", "1")], device_quota),
            RetryIn(MIN_QUOTA_BACKOFF),
            Device(MIN_QUOTA_BACKOFF),
        ),
        (
            "503 UNAVAILABLE with Retry-After",
            reply(
                503,
                &[("retry-after", "30")],
                fcm(503, "UNAVAILABLE", "UNAVAILABLE"),
            ),
            RetryIn(Duration::from_secs(30)),
            Everyone(Duration::from_secs(30)),
        ),
        (
            "500 INTERNAL",
            reply(500, &[], fcm(500, "INTERNAL", "INTERNAL")),
            RetryIn(second),
            Everyone(second),
        ),
        (
            "200 not FCM's",
            reply(200, &[], Bytes::from_static(b"id=0:1")),
            RetryIn(second),
            Everyone(second),
        ),
    ];
    for (row, reply, next, who) in rows {
        assert_eq!(first(reply), (next, who), "{row}");
    }
}

#[test]
fn the_project_quota_is_the_sender_s_and_a_device_quota_is_not() {
    let project = reply(429, &[], fcm(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")).unwrap_err();
    assert!(project.is_sender_quota());
    assert_eq!(project.code_text(), Some("QUOTA_EXCEEDED"));
    let gone = reply(404, &[], fcm(404, "NOT_FOUND", "UNREGISTERED")).unwrap_err();
    assert!(!gone.is_sender_quota());
    assert_eq!(gone.code_text(), Some("UNREGISTERED"));
}
