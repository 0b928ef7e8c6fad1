//! ClientLogin against the recording fake: every error code, CAPTCHA, single-flight, rotation,
//! and secrets kept out of every printed form.

use std::sync::Arc;
use std::time::Duration;

use c2dm_auth::{ClientLogin, Credentials, LoginError, LoginErrorCode, login_error_of};
use c2dm_core::{AuthToken, Error, Message, Sender, TokenError, TokenProvider};
use c2dm_mock::{LoginReply, RecordingTransport};
use tokio::time::Instant;

const EMAIL: &str = "sender@example.com";
const PASSWORD: &str = "correct horse battery staple";

fn credentials() -> Credentials {
    Credentials::new(EMAIL, PASSWORD, "c2dm-rs-tests-1")
}

fn fake() -> RecordingTransport {
    RecordingTransport::new().account(EMAIL, PASSWORD)
}

fn login_over(fake: &RecordingTransport) -> ClientLogin {
    ClientLogin::new(credentials(), fake.clone())
}

#[tokio::test]
async fn logs_in_on_first_use_and_caches() {
    let fake = fake();
    let login = login_over(&fake);
    assert_eq!(fake.login_requests().len(), 0, "nothing before first use");
    let token = login.token().await.unwrap();
    assert_eq!(token.expose_secret(), "fake-auth-1");
    assert_eq!(login.token().await.unwrap(), token);
    let requests = fake.login_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].email, EMAIL);
    assert_eq!(
        requests[0].account_type.as_deref(),
        Some("HOSTED_OR_GOOGLE")
    );
    assert_eq!(requests[0].service.as_deref(), Some("ac2dm"));
    assert_eq!(requests[0].source.as_deref(), Some("c2dm-rs-tests-1"));
    assert!(requests[0].password_matched);
}

#[tokio::test]
async fn takes_rotated_tokens() {
    let login = login_over(&fake());
    let first = login.token().await.unwrap();
    login.rotate(&first, AuthToken::new("rotated").unwrap());
    assert_eq!(login.token().await.unwrap().expose_secret(), "rotated");
}

#[tokio::test]
async fn a_late_rotation_of_an_older_login_is_ignored() {
    let login = login_over(&fake());
    let first = login.token().await.unwrap();
    let second = login.refresh(&first).await.unwrap();
    assert_ne!(first, second);
    // The answer to a request made with the first login's token arrives after the new login.
    login.rotate(&first, AuthToken::new("late").unwrap());
    assert_eq!(login.token().await.unwrap(), second);
    // A rotation of the current login's token is taken.
    login.rotate(&second, AuthToken::new("rotated").unwrap());
    assert_eq!(login.token().await.unwrap().expose_secret(), "rotated");
}

#[tokio::test]
async fn login_now_is_counted_and_its_token_kept() {
    let fake = fake();
    let login = login_over(&fake);
    let token = login.login_now().await.unwrap();
    assert_eq!(login.login_count(), 1);
    assert_eq!(login.token().await.unwrap(), token);
    assert_eq!(fake.successful_logins(), 1);
}

#[tokio::test]
async fn builder_settings_in_any_order_keep_the_token() {
    let fake = fake();
    let given = AuthToken::new("given").unwrap();
    let token_first = ClientLogin::builder(credentials(), fake.clone())
        .token(given.clone())
        .endpoint("https://127.0.0.1:1/accounts/ClientLogin".parse().unwrap())
        .retries(2, Duration::from_millis(1))
        .build();
    assert_eq!(token_first.token().await.unwrap(), given);
    assert_eq!(token_first.login_count(), 0);
    assert_eq!(fake.login_requests().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_login_error_code_is_typed_and_only_unavailable_is_retried() {
    for code in LoginErrorCode::KNOWN {
        if code == LoginErrorCode::CaptchaRequired {
            continue; // its own test below
        }
        let fake = fake();
        for _ in 0..3 {
            fake.enqueue_login(LoginReply::error(code.clone()));
        }
        let login = login_over(&fake);
        let err = login.login_now().await.unwrap_err();
        assert_eq!(err.code(), Some(&code));
        let expected_requests = if code == LoginErrorCode::ServiceUnavailable {
            3
        } else {
            1
        };
        assert_eq!(fake.login_requests().len(), expected_requests, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn service_unavailable_is_retried_with_backoff_then_succeeds() {
    let fake = fake();
    fake.enqueue_login(LoginReply::error(LoginErrorCode::ServiceUnavailable));
    fake.enqueue_login(LoginReply::Raw {
        status: 503,
        body: String::new(),
    });
    let login = login_over(&fake);
    let start = Instant::now();
    let token = login.token().await.unwrap();
    assert_eq!(token.expose_secret(), "fake-auth-1");
    assert_eq!(start.elapsed(), Duration::from_secs(1 + 2));
    assert_eq!(fake.login_requests().len(), 3);
}

#[tokio::test]
async fn bad_authentication_is_final_and_says_why() {
    let fake = RecordingTransport::new().account(EMAIL, "another password");
    let login = login_over(&fake);
    let err = login.token().await.unwrap_err();
    assert!(!err.is_retryable());
    let login_err = login_error_of(&err).expect("a LoginError inside");
    assert_eq!(login_err.code(), Some(&LoginErrorCode::BadAuthentication));
    assert_eq!(fake.login_requests().len(), 1);
}

#[tokio::test]
async fn invalid_second_factor_hints_at_app_passwords() {
    let fake = fake();
    fake.enqueue_login(LoginReply::Error {
        code: c2dm_auth::LoginErrorCode::BadAuthentication,
        info: Some("InvalidSecondFactor".into()),
    });
    let err = login_over(&fake).login_now().await.unwrap_err();
    assert!(
        err.to_string().contains("application-specific password"),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_answers_are_errors_not_panics() {
    for body in ["", "<html><body>Oops</body></html>", "SID=a\nLSID=b"] {
        let fake = fake();
        fake.enqueue_login(LoginReply::Raw {
            status: 200,
            body: body.into(),
        });
        let err = login_over(&fake).login_now().await.unwrap_err();
        assert!(
            matches!(err, LoginError::Malformed { .. }),
            "{body:?}: {err}"
        );
    }
}

#[tokio::test]
async fn captcha_round_trip() {
    let fake = fake().require_captcha(EMAIL, "CAPTCHA-TOKEN", "w0rds");
    let login = login_over(&fake);
    let err = login.login_now().await.unwrap_err();
    let challenge = err.captcha().expect("a CAPTCHA challenge").clone();
    assert_eq!(challenge.token, "CAPTCHA-TOKEN");
    assert_eq!(
        challenge.image_url,
        "https://www.google.com/accounts/Captcha?ctoken=CAPTCHA-TOKEN"
    );
    // Through the TokenProvider the same challenge is reachable.
    let token_err = login.token().await.unwrap_err();
    assert!(login_error_of(&token_err).unwrap().captcha().is_some());

    login.answer_captcha(challenge.answer("w0rds"));
    let token = login.token().await.unwrap();
    assert_eq!(token.expose_secret(), "fake-auth-1");
    let last = fake.login_requests().pop().unwrap();
    assert_eq!(last.login_token.as_deref(), Some("CAPTCHA-TOKEN"));
    assert_eq!(last.login_captcha.as_deref(), Some("w0rds"));
}

#[tokio::test]
async fn a_wrong_captcha_answer_gets_a_new_challenge() {
    let fake = fake().require_captcha(EMAIL, "T", "right");
    let login = login_over(&fake);
    login.answer_captcha(c2dm_auth::CaptchaAnswer {
        token: "T".into(),
        answer: "wrong".into(),
    });
    let err = login.login_now().await.unwrap_err();
    assert!(err.captcha().is_some());
    // The used answer is not sent again.
    let err = login.login_now().await.unwrap_err();
    assert!(err.captcha().is_some());
    assert_eq!(fake.login_requests()[1].login_captcha, None);
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_sends_hitting_401_cause_one_login() {
    let fake = fake()
        .accept_only_tokens([])
        .latency(Duration::from_millis(5));
    let login = Arc::new(
        ClientLogin::builder(credentials(), fake.clone())
            .token(AuthToken::new("stale").unwrap())
            .build(),
    );
    let sender = Sender::new(fake.clone(), Arc::clone(&login));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let sender = sender.clone();
            tokio::spawn(async move {
                let m = Message::builder(format!("device-{i}"))
                    .collapse_key("k")
                    .build()
                    .unwrap();
                sender.send(m).await
            })
        })
        .collect();
    for task in tasks {
        let sent = task.await.unwrap().unwrap();
        assert_eq!(sent.tally.attempts, 2);
    }
    assert_eq!(fake.successful_logins(), 1);
    assert_eq!(login.login_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn expired_token_mid_run_logs_in_again() {
    let fake = fake().accept_only_tokens([]);
    let login = Arc::new(login_over(&fake));
    let sender = Sender::new(fake.clone(), Arc::clone(&login));
    let m = || Message::builder("d").collapse_key("k").build().unwrap();
    sender.send(m()).await.unwrap();
    fake.expire_token(&AuthToken::new("fake-auth-1").unwrap());
    sender.send(m()).await.unwrap();
    assert_eq!(fake.successful_logins(), 2);
    assert_eq!(
        fake.sent().last().unwrap().token().unwrap().expose_secret(),
        "fake-auth-2"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_login_surfaces_through_the_sender() {
    let fake = RecordingTransport::new(); // no accounts: BadAuthentication
    let sender = Sender::new(fake.clone(), login_over(&fake));
    let err = sender
        .send(Message::builder("d").collapse_key("k").build().unwrap())
        .await
        .unwrap_err();
    let Error::Token(token_err) = &err.error else {
        panic!("{err:?}")
    };
    assert_eq!(
        login_error_of(token_err).unwrap().code(),
        Some(&LoginErrorCode::BadAuthentication)
    );
    assert_eq!(fake.send_count(), 0, "nothing is sent without a token");
}

#[tokio::test]
async fn no_secret_in_any_debug_or_display() {
    let fake = fake();
    let login = login_over(&fake);
    let token = login.token().await.unwrap();
    let bad = RecordingTransport::new();
    let failed = login_over(&bad).token().await.unwrap_err();
    let login_err = login_over(&bad).login_now().await.unwrap_err();
    let texts = [
        format!("{:?}", credentials()),
        format!("{:#?}", credentials()),
        format!("{:?}", credentials().password()),
        credentials().password().to_string(),
        format!("{login:?}"),
        format!("{token:?} {token}"),
        format!("{failed:?} {failed}"),
        format!("{login_err:?} {login_err}"),
        format!("{:?}", TokenError::Refused),
        format!("{:?}", fake.login_requests()),
    ];
    for text in texts {
        assert!(!text.contains(PASSWORD), "password in {text}");
        assert!(!text.contains("fake-auth-1"), "token in {text}");
    }
}
