//! A conformance test per row of the protocol's tables, over real HTTP to a running emulator.
#![allow(clippy::field_reassign_with_default)] // tests set one field at a time

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use c2dm_core::codec::{self, decode_response};
use c2dm_core::{Error, ErrorCode, Transport, TransportErrorKind};
use c2dm_emulator::{
    Account, Config, DEFAULT_EMAIL, DEFAULT_PASSWORD, Emulator, FaultRate, Quota, Stats,
};
use c2dm_hyper::HyperTransport;
use http::{Request, Response, StatusCode};

struct Client {
    emulator: Emulator,
    http: HyperTransport,
}

impl Client {
    async fn start(config: Config) -> Self {
        Self::with(Emulator::start(config).await.unwrap())
    }

    fn with(emulator: Emulator) -> Self {
        let http = common::transport(&emulator);
        Self { emulator, http }
    }

    async fn post(&self, url: &str, auth: Option<&str>, body: &str) -> Response<Bytes> {
        let mut req = Request::post(url)
            .header("content-type", codec::FORM_CONTENT_TYPE)
            .body(Bytes::from(body.to_owned()))
            .unwrap();
        if let Some(token) = auth {
            req.headers_mut().insert(
                "authorization",
                format!("GoogleLogin auth={token}").parse().unwrap(),
            );
        }
        self.http.execute(req).await.unwrap()
    }

    async fn login_as(&self, email: &str, password: &str, extra: &str) -> Response<Bytes> {
        let body = format!(
            "accountType=HOSTED_OR_GOOGLE&Email={}&Passwd={}&service=ac2dm&source=test{extra}",
            email.replace('@', "%40"),
            password
        );
        self.post(&self.emulator.login_url(), None, &body).await
    }

    async fn login(&self) -> String {
        let resp = self.login_as(DEFAULT_EMAIL, DEFAULT_PASSWORD, "").await;
        assert_eq!(resp.status(), 200);
        c2dm_auth::codec::decode_login_response(
            resp.status(),
            resp.body(),
            &codec::default_send_uri(),
        )
        .unwrap()
        .expose_secret()
        .to_owned()
    }

    async fn send(&self, token: &str, body: &str) -> Response<Bytes> {
        self.post(&self.emulator.send_url(), Some(token), body)
            .await
    }

    async fn send_result(&self, token: &str, body: &str) -> Result<c2dm_core::MessageId, Error> {
        decode_response(&self.send(token, body).await, SystemTime::now()).result
    }
}

fn text(resp: &Response<Bytes>) -> &str {
    std::str::from_utf8(resp.body()).unwrap()
}

const OK_FORM: &str = "registration_id=dev-1&collapse_key=k&data.message=test&data.sound=test";

// --- ClientLogin -------------------------------------------------------------------------------

#[tokio::test]
async fn login_success_gives_sid_lsid_auth() {
    let c = Client::start(Config::default()).await;
    let resp = c.login_as(DEFAULT_EMAIL, DEFAULT_PASSWORD, "").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=UTF-8");
    let body = text(&resp);
    for key in ["SID=", "LSID=", "Auth="] {
        assert!(body.lines().any(|l| l.starts_with(key)), "{body}");
    }
    // Each login issues a new token.
    assert_ne!(c.login().await, c.login().await);
    assert_eq!(c.emulator.stats().logins, 3);
}

#[tokio::test]
async fn login_errors() {
    let mut config = Config::default();
    config.accounts = vec![Account::new("a@x", "pw")];
    for code in [
        "NotVerified",
        "TermsNotAgreed",
        "AccountDeleted",
        "AccountDisabled",
        "ServiceUnavailable",
    ] {
        config
            .accounts
            .push(Account::new(format!("{code}@x"), "pw").refuse_with(code));
    }
    let c = Client::start(config).await;
    let cases = [
        ("a@x", "wrong", "BadAuthentication"),
        ("nobody@x", "pw", "BadAuthentication"),
        ("NotVerified@x", "pw", "NotVerified"),
        ("TermsNotAgreed@x", "pw", "TermsNotAgreed"),
        ("AccountDeleted@x", "pw", "AccountDeleted"),
        ("AccountDisabled@x", "pw", "AccountDisabled"),
        ("ServiceUnavailable@x", "pw", "ServiceUnavailable"),
    ];
    for (email, password, code) in cases {
        let resp = c.login_as(email, password, "").await;
        assert_eq!(resp.status(), 403, "{email}");
        assert!(
            text(&resp).contains(&format!("Error={code}\n")),
            "{email}: {}",
            text(&resp)
        );
        assert!(text(&resp).contains("Url="));
    }
    let resp = c.post(&c.emulator.login_url(), None, "Email=a%40x").await;
    assert!(text(&resp).contains("Error=Unknown"));
    let resp = c
        .post(
            &c.emulator.login_url(),
            None,
            "Email=a%40x&Passwd=pw&service=cl",
        )
        .await;
    assert!(text(&resp).contains("Error=ServiceDisabled"));
    assert_eq!(c.emulator.stats().login_failures, 9);
}

#[tokio::test]
async fn captcha_round_trip() {
    let mut config = Config::default();
    config.accounts = vec![Account::new("c@x", "pw").with_captcha("CT", "answer")];
    let c = Client::start(config).await;
    let resp = c.login_as("c@x", "pw", "").await;
    assert_eq!(resp.status(), 403);
    let body = text(&resp);
    assert!(body.contains("Error=CaptchaRequired") && body.contains("CaptchaToken=CT"));
    assert!(body.contains("CaptchaUrl=Captcha?ctoken=CT"));
    let resp = c
        .login_as("c@x", "pw", "&logintoken=CT&logincaptcha=nope")
        .await;
    assert_eq!(resp.status(), 403);
    let resp = c
        .login_as("c@x", "pw", "&logintoken=CT&logincaptcha=answer")
        .await;
    assert_eq!(resp.status(), 200);
    // Solved: later logins pass.
    assert_eq!(c.login_as("c@x", "pw", "").await.status(), 200);
}

// --- Send: one test per row -------------------------------------------------------------------

#[tokio::test]
async fn row_accepted_with_id_and_recorded() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    let resp = c.send(&token, OK_FORM).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=UTF-8");
    let id = text(&resp).strip_prefix("id=").unwrap().to_owned();
    assert!(id.starts_with("0:") && id.contains('%'), "{id}");
    let inbox = c.emulator.inbox("dev-1");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].message_id, id);
    assert_eq!(inbox[0].collapse_key, "k");
    assert_eq!(
        inbox[0].data,
        vec![
            ("message".into(), "test".into()),
            ("sound".into(), "test".into())
        ]
    );
    assert!(!inbox[0].delay_while_idle);
}

#[tokio::test]
async fn row_quota_exceeded() {
    let mut config = Config::default();
    config.sender_quota = Some(Quota {
        limit: 2,
        window: Duration::from_secs(3600),
    });
    let c = Client::start(config).await;
    let token = c.login().await;
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    let err = c.send_result(&token, OK_FORM).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(ErrorCode::QuotaExceeded)));
}

#[tokio::test]
async fn row_quota_window_resets() {
    let mut config = Config::default();
    config.sender_quota = Some(Quota {
        limit: 1,
        window: Duration::from_secs(60),
    });
    let c = Client::start(config).await;
    let token = c.login().await;
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    assert!(c.send_result(&token, OK_FORM).await.is_err());
    c.emulator.advance_clock(Duration::from_secs(59));
    assert!(c.send_result(&token, OK_FORM).await.is_err());
    c.emulator.advance_clock(Duration::from_secs(1));
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
}

#[tokio::test]
async fn row_device_quota_exceeded() {
    let mut config = Config::default();
    config.device_quota = Some(Quota {
        limit: 1,
        window: Duration::from_secs(3600),
    });
    config.devices.device_quota_prefixes = vec!["busy-".into()];
    let c = Client::start(config).await;
    let token = c.login().await;
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    let err = c.send_result(&token, OK_FORM).await.unwrap_err();
    assert!(matches!(
        err,
        Error::Rejected(ErrorCode::DeviceQuotaExceeded)
    ));
    // Another device is not affected.
    assert!(
        c.send_result(&token, "registration_id=dev-2&collapse_key=k")
            .await
            .is_ok()
    );
    // A prefixed device is refused its first two sends only.
    let form = "registration_id=busy-1&collapse_key=k";
    for expect_ok in [false, false, true] {
        assert_eq!(c.send_result(&token, form).await.is_ok(), expect_ok);
    }
}

#[tokio::test]
async fn row_missing_registration() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    for form in ["collapse_key=k", "registration_id=&collapse_key=k"] {
        let err = c.send_result(&token, form).await.unwrap_err();
        assert!(
            matches!(err, Error::Rejected(ErrorCode::MissingRegistration)),
            "{form}"
        );
    }
}

#[tokio::test]
async fn rows_invalid_mismatch_not_registered() {
    let mut config = Config::default();
    config.devices.invalid_prefixes = vec!["bad-".into()];
    config.devices.mismatch_prefixes = vec!["other-".into()];
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    config.devices.not_registered.insert("exact-gone".into());
    config.devices.invalid.insert("exact-bad".into());
    let c = Client::start(config).await;
    let token = c.login().await;
    for (id, code) in [
        ("bad-1", ErrorCode::InvalidRegistration),
        ("exact-bad", ErrorCode::InvalidRegistration),
        ("other-1", ErrorCode::MismatchSenderId),
        ("gone-1", ErrorCode::NotRegistered),
        ("exact-gone", ErrorCode::NotRegistered),
    ] {
        let err = c
            .send_result(&token, &format!("registration_id={id}&collapse_key=k"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&code), "{id}");
        assert_eq!(
            c.emulator.is_gone(id),
            code.should_remove_registration(),
            "{id}"
        );
        assert_eq!(c.emulator.delivered_count(id), 0);
    }
    assert!(!c.emulator.is_gone("dev-1"));
    let stats = c.emulator.stats();
    assert_eq!(stats.errors["InvalidRegistration"], 2);
    assert_eq!(stats.errors["NotRegistered"], 2);
    assert_eq!(stats.errors["MismatchSenderId"], 1);
}

#[tokio::test]
async fn row_message_too_big_at_1025_bytes() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    // key "k" (1 byte) + 1023 bytes of "é" and "x" = 1024: fine. One more byte: too big.
    let value = "%C3%A9".repeat(511) + "x";
    let ok = format!("registration_id=d&collapse_key=k&data.k={value}");
    assert!(c.send_result(&token, &ok).await.is_ok());
    let err = c.send_result(&token, &format!("{ok}x")).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(ErrorCode::MessageTooBig)));
}

#[tokio::test]
async fn payload_limit_is_a_setting() {
    let mut config = Config::default();
    config.payload_limit = 4;
    let c = Client::start(config).await;
    let token = c.login().await;
    assert!(
        c.send_result(&token, "registration_id=d&collapse_key=k&data.a=bcd")
            .await
            .is_ok()
    );
    assert!(
        c.send_result(&token, "registration_id=d&collapse_key=k&data.a=bcde")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn row_missing_collapse_key() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    let err = c
        .send_result(&token, "registration_id=d")
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Rejected(ErrorCode::MissingCollapseKey)
    ));
}

#[tokio::test]
async fn row_401_for_unknown_or_missing_tokens() {
    let c = Client::start(Config::default()).await;
    let resp = c.send("not-a-token", OK_FORM).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(text(&resp).contains("<HTML>"));
    let resp = c.post(&c.emulator.send_url(), None, OK_FORM).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(c.emulator.stats().unauthorized, 2);
}

#[tokio::test]
async fn static_tokens_work_without_login() {
    let mut config = Config::default();
    config.static_tokens = vec!["PRESET".into()];
    let c = Client::start(config).await;
    assert!(c.send_result("PRESET", OK_FORM).await.is_ok());
}

#[tokio::test]
async fn tokens_expire_after_n_sends() {
    let mut config = Config::default();
    config.token_lifetime_sends = Some(3);
    let c = Client::start(config).await;
    let token = c.login().await;
    for _ in 0..3 {
        assert!(c.send_result(&token, OK_FORM).await.is_ok());
    }
    assert!(matches!(
        c.send_result(&token, OK_FORM).await,
        Err(Error::Unauthorized)
    ));
    assert_eq!(c.emulator.stats().expiries, 1);
    let fresh = c.login().await;
    assert!(c.send_result(&fresh, OK_FORM).await.is_ok());
}

#[tokio::test]
async fn tokens_expire_after_a_duration() {
    let mut config = Config::default();
    config.token_lifetime = Some(Duration::from_secs(3600));
    let c = Client::start(config).await;
    let token = c.login().await;
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    c.emulator.advance_clock(Duration::from_secs(3599));
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    c.emulator.advance_clock(Duration::from_secs(1));
    assert!(matches!(
        c.send_result(&token, OK_FORM).await,
        Err(Error::Unauthorized)
    ));
}

#[tokio::test]
async fn row_update_client_auth_rotation_with_grace() {
    let mut config = Config::default();
    config.rotate_token_every = Some(2);
    config.rotation_grace_sends = 1;
    let c = Client::start(config).await;
    let old = c.login().await;
    assert!(
        c.send(&old, OK_FORM)
            .await
            .headers()
            .get("update-client-auth")
            .is_none()
    );
    let resp = c.send(&old, OK_FORM).await;
    assert_eq!(resp.status(), 200, "the rotating answer still accepts");
    let new = resp.headers()["update-client-auth"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(new, old);
    // The old token is good for one more send (the grace), then refused.
    assert!(c.send_result(&old, OK_FORM).await.is_ok());
    assert!(matches!(
        c.send_result(&old, OK_FORM).await,
        Err(Error::Unauthorized)
    ));
    assert!(c.send_result(&new, OK_FORM).await.is_ok());
    // Accepted sends 3 (old, in grace) and 4 (new): the fourth rotates again.
    assert_eq!(c.emulator.stats().rotations, 2);
}

#[tokio::test]
async fn row_503_with_retry_after_in_both_forms() {
    let mut config = Config::default();
    config.unavailable = FaultRate::Every(1);
    config.retry_after = Duration::from_secs(7);
    let c = Client::start(config).await;
    let token = c.login().await;
    let first = c.send(&token, OK_FORM).await;
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "7");
    let second = c.send(&token, OK_FORM).await;
    let date = second.headers()["retry-after"].to_str().unwrap();
    let when = httpdate::parse_http_date(date).unwrap();
    let wait = when.duration_since(SystemTime::now()).unwrap();
    assert!(
        wait >= Duration::from_secs(6) && wait <= Duration::from_secs(9),
        "{wait:?}"
    );
    let err = decode_response(&second, SystemTime::now())
        .result
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Unavailable {
            retry_after: Some(_)
        }
    ));
    assert_eq!(c.emulator.stats().unavailable, 2);
    assert_eq!(c.emulator.stats().accepted, 0);
}

#[tokio::test]
async fn row_500_every_nth() {
    let mut config = Config::default();
    config.server_errors = FaultRate::Every(2);
    let c = Client::start(config).await;
    let token = c.login().await;
    assert_eq!(c.send(&token, OK_FORM).await.status(), 200);
    assert_eq!(c.send(&token, OK_FORM).await.status(), 500);
    assert_eq!(c.send(&token, OK_FORM).await.status(), 200);
}

#[tokio::test]
async fn dropped_connections_are_transport_errors() {
    let mut config = Config::default();
    config.drops = FaultRate::Every(1);
    config.static_tokens = vec!["T".into()];
    let c = Client::start(config).await;
    let req = Request::post(c.emulator.send_url())
        .header("authorization", "GoogleLogin auth=T")
        .body(Bytes::from_static(OK_FORM.as_bytes()))
        .unwrap();
    let err = c.http.execute(req).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::ConnectionLost);
    assert!(err.may_have_been_sent());
    assert_eq!(c.emulator.stats().dropped, 1);
}

#[tokio::test]
async fn probability_faults_are_seeded() {
    let run = |seed| async move {
        let mut config = Config::default();
        config.unavailable = FaultRate::Probability(0.3);
        config.seed = seed;
        config.static_tokens = vec!["T".into()];
        let c = Client::start(config).await;
        let mut pattern = Vec::new();
        for _ in 0..40 {
            pattern.push(c.send("T", OK_FORM).await.status().as_u16());
        }
        pattern
    };
    let a = run(1).await;
    assert_eq!(a, run(1).await);
    assert_ne!(a, run(2).await);
    let unavailable = a.iter().filter(|s| **s == 503).count();
    assert!((4..=20).contains(&unavailable), "{unavailable} of 40");
}

#[tokio::test]
async fn delay_while_idle_is_a_flag() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    for (value, set) in [
        ("1", true),
        ("true", true),
        ("", true),
        ("True", true),
        ("0", false),
        ("false", false),
        ("False", false),
    ] {
        let id = format!("dwi-{value}");
        let form = format!("registration_id={id}&collapse_key=k&delay_while_idle={value}");
        c.send_result(&token, &form).await.unwrap();
        assert_eq!(c.emulator.inbox(&id)[0].delay_while_idle, set, "{value:?}");
    }
}

/// The original article's Python sender posts `urllib.urlencode` of a dict with the boolean
/// `True`: C2DM read the field as a presence flag, and so does the emulator.
#[tokio::test]
async fn the_original_python_senders_body_sets_delay_while_idle() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    let body = "registration_id=APA91bH-device&collapse_key=score&data.message=Hello+World&delay_while_idle=True";
    c.send_result(&token, body).await.unwrap();
    let got = c.emulator.inbox("APA91bH-device");
    assert!(got[0].delay_while_idle);
}

/// `data.` with no key is no data key: ignored like an unknown field (the client refuses to
/// build one), so it is neither delivered nor counted against the payload limit.
#[tokio::test]
async fn an_empty_data_key_is_ignored() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    c.send_result(&token, "registration_id=e&collapse_key=k&data.=x&data.a=1")
        .await
        .unwrap();
    let got = c.emulator.inbox("e");
    assert_eq!(got[0].data, vec![("a".to_string(), "1".to_string())]);
    assert!(
        c2dm_core::Message::builder("e")
            .collapse_key("k")
            .data("", "x")
            .build()
            .is_err()
    );
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    let form = format!("{OK_FORM}&time_to_live=3&foo=bar");
    assert!(c.send_result(&token, &form).await.is_ok());
}

#[tokio::test]
async fn stats_over_http_match_in_process() {
    let c = Client::start(Config::default()).await;
    let token = c.login().await;
    c.send_result(&token, OK_FORM).await.unwrap();
    c.send_result(&token, "registration_id=d")
        .await
        .unwrap_err();
    let resp = c
        .http
        .execute(
            Request::get(c.emulator.stats_url())
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let over_http: Stats = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(over_http, c.emulator.stats());
    assert_eq!(over_http.sends, 2);
    assert_eq!(over_http.accepted, 1);
    assert_eq!(over_http.errors["MissingCollapseKey"], 1);
    assert_eq!(over_http.logins, 1);
    assert_eq!(over_http.inbox["dev-1"].len(), 1);
    let json: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
    for key in [
        "sends",
        "accepted",
        "errors",
        "unauthorized",
        "unavailable",
        "logins",
        "inbox",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    let resp = c
        .http
        .execute(
            Request::get(format!("{}?inbox=false", c.emulator.stats_url()))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let light: Stats = serde_json::from_slice(resp.body()).unwrap();
    assert!(light.inbox.is_empty());
}

#[tokio::test]
async fn other_paths_and_methods() {
    let c = Client::start(Config::default()).await;
    let resp = c
        .http
        .execute(
            Request::get(c.emulator.send_url())
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let resp = c
        .post(&format!("{}/nope", c.emulator.base_url()), None, "")
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn tls_with_the_generated_certificate() {
    let c = Client::with(Emulator::start_tls(Config::default()).await.unwrap());
    assert!(c.emulator.send_url().starts_with("https://127.0.0.1:"));
    let token = c.login().await;
    assert!(c.send_result(&token, OK_FORM).await.is_ok());
    // Without the certificate trusted: a TLS error, and nothing recorded.
    let untrusted = HyperTransport::new().unwrap();
    let err = untrusted
        .execute(
            Request::post(c.emulator.send_url())
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Tls);
    assert_eq!(c.emulator.stats().sends, 1);
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.send_url();
    emulator.shutdown().await;
    let err = HyperTransport::new()
        .unwrap()
        .execute(Request::post(url).body(Bytes::new()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect);
}
