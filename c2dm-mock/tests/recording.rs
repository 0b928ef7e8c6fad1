//! Every scripted behaviour of the fake, over the raw `Transport` interface.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use c2dm_core::codec::{self, decode_response};
use c2dm_core::{AuthToken, Error, ErrorCode, Message, RequestSent, Transport, TransportErrorKind};
use c2dm_mock::{LoginReply, NeverTransport, RecordingTransport, Reply, RetryAfter};
use tokio::time::Instant;

fn token(s: &str) -> AuthToken {
    AuthToken::new(s).unwrap()
}

fn request(id: &str, tok: &str) -> http::Request<Bytes> {
    let m = Message::builder(id)
        .collapse_key("orders")
        .data("message", "shipped")
        .data("n", "1")
        .delay_while_idle(true)
        .build()
        .unwrap();
    codec::encode_send_request(&m, &token(tok), &codec::default_send_uri())
}

async fn send(fake: &RecordingTransport, id: &str, tok: &str) -> codec::SendReply {
    let resp = fake.execute(request(id, tok)).await.unwrap();
    decode_response(&resp, UNIX_EPOCH)
}

fn login_request(
    email: &str,
    password: &str,
    captcha: Option<(&str, &str)>,
) -> http::Request<Bytes> {
    let mut form = form_urlencoded_body(&[
        ("accountType", "HOSTED_OR_GOOGLE"),
        ("Email", email),
        ("Passwd", password),
        ("service", "ac2dm"),
        ("source", "test-1"),
    ]);
    if let Some((t, a)) = captcha {
        form.push_str(&format!("&logintoken={t}&logincaptcha={a}"));
    }
    http::Request::post("https://www.google.com/accounts/ClientLogin")
        .body(Bytes::from(form))
        .unwrap()
}

fn form_urlencoded_body(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn records_and_decodes_what_was_sent() {
    let fake = RecordingTransport::new();
    let reply = send(&fake, "device-1", "tok").await;
    let id = reply.result.unwrap();
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.registration_id(), Some("device-1"));
    assert_eq!(s.collapse_key(), Some("orders"));
    assert_eq!(s.data("message"), Some("shipped"));
    assert_eq!(
        s.data_pairs(),
        &[
            ("message".into(), "shipped".into()),
            ("n".into(), "1".into())
        ]
    );
    assert!(s.delay_while_idle());
    assert_eq!(s.token(), Some(&token("tok")));
    assert_eq!(s.accepted_id(), Some(id.as_str()));
    assert!(s.request().body().starts_with(b"registration_id=device-1&"));
    assert_eq!(fake.sent_to("device-1").len(), 1);
    assert!(fake.sent_to("other").is_empty());
    fake.clear();
    assert_eq!(fake.send_count(), 0);
}

#[tokio::test]
async fn accepts_with_unique_ids() {
    let fake = RecordingTransport::new();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..100 {
        assert!(ids.insert(send(&fake, "d", "t").await.result.unwrap()));
    }
}

#[tokio::test]
async fn rules_per_registration_id_for_good_or_n_times() {
    let fake = RecordingTransport::new()
        .reply_to("gone", ErrorCode::NotRegistered)
        .reply_to_times("busy", ErrorCode::DeviceQuotaExceeded, 2);
    for _ in 0..3 {
        let err = send(&fake, "gone", "t").await.result.unwrap_err();
        assert!(matches!(err, Error::Rejected(ErrorCode::NotRegistered)));
    }
    for expected_ok in [false, false, true, true] {
        assert_eq!(send(&fake, "busy", "t").await.result.is_ok(), expected_ok);
    }
    for code in ErrorCode::KNOWN {
        fake.set_rule("x", Reply::Error(code.clone()), None);
        assert_eq!(
            send(&fake, "x", "t").await.result.unwrap_err().code(),
            Some(&code)
        );
    }
    assert!(send(&fake, "fine", "t").await.result.is_ok());
}

#[tokio::test]
async fn queued_one_off_replies_in_order() {
    let fake = RecordingTransport::new();
    let date = UNIX_EPOCH + Duration::from_secs(120);
    fake.enqueue(Reply::unavailable_for(30))
        .enqueue(Reply::Unavailable(Some(RetryAfter::Date(date))))
        .enqueue(Reply::Unavailable(None))
        .enqueue(Reply::server_error())
        .enqueue(Reply::Unauthorized)
        .enqueue(Reply::Raw {
            status: 200,
            body: "nonsense".into(),
        });
    let r = send(&fake, "d", "t").await.result.unwrap_err();
    assert_eq!(r.retry_after(), Some(Duration::from_secs(30)));
    let r = send(&fake, "d", "t").await.result.unwrap_err();
    assert_eq!(r.retry_after(), Some(Duration::from_secs(120)));
    let r = send(&fake, "d", "t").await.result.unwrap_err();
    assert!(matches!(r, Error::Unavailable { retry_after: None }));
    let r = send(&fake, "d", "t").await.result.unwrap_err();
    assert!(matches!(r, Error::ServerError { status: 500, .. }));
    let r = send(&fake, "d", "t").await.result.unwrap_err();
    assert!(matches!(r, Error::Unauthorized));
    let r = send(&fake, "d", "t").await.result.unwrap_err();
    assert!(matches!(r, Error::MalformedResponse { .. }));
    assert!(send(&fake, "d", "t").await.result.is_ok());
    assert_eq!(fake.send_count(), 7);
}

#[tokio::test]
async fn scripted_transport_failures_of_each_kind() {
    let fake = RecordingTransport::new();
    fake.enqueue(Reply::connect_failure())
        .enqueue(Reply::timeout_after_write())
        .enqueue(Reply::Fail {
            kind: TransportErrorKind::ConnectionLost,
            sent: RequestSent::Maybe,
        });
    let e = fake.execute(request("d", "t")).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.request_sent()),
        (TransportErrorKind::Connect, RequestSent::No)
    );
    let e = fake.execute(request("d", "t")).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.request_sent()),
        (TransportErrorKind::Timeout, RequestSent::Maybe)
    );
    let e = fake.execute(request("d", "t")).await.unwrap_err();
    assert_eq!(e.kind(), TransportErrorKind::ConnectionLost);
    // Failed exchanges are recorded too, but never as accepted.
    assert_eq!(fake.send_count(), 3);
    assert!(fake.accepted().is_empty());
}

#[tokio::test]
async fn rotation_on_the_next_reply_and_token_checks() {
    let fake = RecordingTransport::new().accept_only_tokens([token("old")]);
    assert!(matches!(
        send(&fake, "d", "wrong").await.result,
        Err(Error::Unauthorized)
    ));
    fake.rotate_token_on_next_reply(token("new"));
    let reply = send(&fake, "d", "old").await;
    assert_eq!(reply.rotated_token, Some(token("new")));
    assert!(reply.result.is_ok());
    // Only the next reply carries it; both tokens are valid now.
    assert!(send(&fake, "d", "old").await.rotated_token.is_none());
    assert!(send(&fake, "d", "new").await.result.is_ok());
    // Expiry.
    fake.expire_token(&token("old"));
    assert!(matches!(
        send(&fake, "d", "old").await.result,
        Err(Error::Unauthorized)
    ));
    assert!(send(&fake, "d", "new").await.result.is_ok());
}

/// With token checking off, expiring one token refuses that one only. Before, it turned
/// checking on with nothing valid, so every token was refused.
#[tokio::test]
async fn expiring_a_token_with_checking_off_refuses_only_that_token() {
    let fake = RecordingTransport::new();
    assert!(send(&fake, "d", "a").await.result.is_ok());
    fake.expire_token(&token("a"));
    assert!(matches!(
        send(&fake, "d", "a").await.result,
        Err(Error::Unauthorized)
    ));
    assert!(send(&fake, "d", "b").await.result.is_ok());
    assert!(send(&fake, "d", "never-seen").await.result.is_ok());
}

#[tokio::test(start_paused = true)]
async fn latency_uses_tokio_time() {
    let fake = RecordingTransport::new().latency(Duration::from_secs(5));
    let start = Instant::now();
    send(&fake, "d", "t").await.result.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn counts_requests_in_flight() {
    let fake = RecordingTransport::new().latency(Duration::from_millis(10));
    let tasks: Vec<_> = (0..7)
        .map(|i| {
            let fake = fake.clone();
            tokio::spawn(async move { fake.execute(request(&format!("d{i}"), "t")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(fake.max_in_flight(), 7);
}

#[tokio::test]
async fn client_login_accounts() {
    let fake = RecordingTransport::new().account("me@example.com", "pw");
    let resp = fake
        .execute(login_request("me@example.com", "pw", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = std::str::from_utf8(resp.body()).unwrap();
    assert!(body.contains("\nAuth=fake-auth-1\n"), "{body}");
    let resp = fake
        .execute(login_request("me@example.com", "bad", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(
        std::str::from_utf8(resp.body())
            .unwrap()
            .contains("Error=BadAuthentication")
    );
    assert_eq!(fake.successful_logins(), 1);
    let logins = fake.login_requests();
    assert_eq!(logins.len(), 2);
    assert_eq!(logins[0].service.as_deref(), Some("ac2dm"));
    assert!(logins[0].password_matched && !logins[1].password_matched);
}

#[tokio::test]
async fn client_login_errors_and_captcha() {
    let fake = RecordingTransport::new()
        .account("me@example.com", "pw")
        .require_captcha("me@example.com", "CT0KEN", "answer");
    fake.enqueue_login(LoginReply::Error {
        code: c2dm_auth::LoginErrorCode::BadAuthentication,
        info: Some("InvalidSecondFactor".into()),
    });
    let resp = fake
        .execute(login_request("me@example.com", "pw", None))
        .await
        .unwrap();
    let body = std::str::from_utf8(resp.body()).unwrap().to_owned();
    assert!(
        body.contains("Error=BadAuthentication\nInfo=InvalidSecondFactor"),
        "{body}"
    );

    let resp = fake
        .execute(login_request("me@example.com", "pw", None))
        .await
        .unwrap();
    let body = std::str::from_utf8(resp.body()).unwrap().to_owned();
    assert_eq!(resp.status(), 403);
    assert!(body.contains("Error=CaptchaRequired") && body.contains("CaptchaToken=CT0KEN"));
    // A wrong answer gets the challenge again; the right one logs in.
    let resp = fake
        .execute(login_request(
            "me@example.com",
            "pw",
            Some(("CT0KEN", "wrong")),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = fake
        .execute(login_request(
            "me@example.com",
            "pw",
            Some(("CT0KEN", "answer")),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.successful_logins(), 1);

    fake.enqueue_login(LoginReply::Raw {
        status: 500,
        body: "<html>".into(),
    });
    let resp = fake
        .execute(login_request("me@example.com", "pw", None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
}

#[tokio::test]
async fn issued_tokens_become_valid_when_tokens_are_checked() {
    let fake = RecordingTransport::new()
        .account("me@example.com", "pw")
        .accept_only_tokens([]);
    assert!(matches!(
        send(&fake, "d", "fake-auth-1").await.result,
        Err(Error::Unauthorized)
    ));
    fake.execute(login_request("me@example.com", "pw", None))
        .await
        .unwrap();
    assert!(send(&fake, "d", "fake-auth-1").await.result.is_ok());
}

#[tokio::test(start_paused = true)]
async fn never_transport_never_answers() {
    let result = tokio::time::timeout(
        Duration::from_secs(3600),
        NeverTransport.execute(request("d", "t")),
    )
    .await;
    assert!(result.is_err());
}

#[tokio::test]
async fn default_reply_and_allowed_tokens() {
    let fake = RecordingTransport::new()
        .reply_to("special", ErrorCode::NotRegistered)
        .accept_only_tokens([]);
    fake.allow_token(token("later"));
    fake.set_default_reply(Some(Reply::Error(ErrorCode::QuotaExceeded)));
    let err = send(&fake, "anyone", "later").await.result.unwrap_err();
    assert!(matches!(err, Error::Rejected(ErrorCode::QuotaExceeded)));
    // A device's own rule wins over the default.
    let err = send(&fake, "special", "later").await.result.unwrap_err();
    assert!(matches!(err, Error::Rejected(ErrorCode::NotRegistered)));
    fake.set_default_reply(None);
    assert!(send(&fake, "anyone", "later").await.result.is_ok());
}

#[tokio::test]
async fn every_scripted_reply_is_used_or_named() {
    let fake = RecordingTransport::new().reply_to_times("d", ErrorCode::DeviceQuotaExceeded, 2);
    fake.enqueue(Reply::Unavailable(None));
    let unused = fake.unused_replies();
    assert_eq!(unused.len(), 2, "{unused:?}");
    assert!(unused[1].contains("2 more"), "{unused:?}");
    // The queued 503, then the device's two refusals: all used.
    for _ in 0..3 {
        assert!(send(&fake, "d", "t").await.result.is_err());
    }
    fake.assert_all_replies_used();
    assert!(send(&fake, "d", "t").await.result.is_ok());
}
