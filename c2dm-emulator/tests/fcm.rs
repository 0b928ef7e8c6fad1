//! FCM HTTP v1 against the emulator, over TLS: the service account's key file, the token
//! endpoint's checks, every documented answer of the send endpoint, and the inbox.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use c2dm_core::{AuthToken, TokenProvider, Transport};
use c2dm_emulator::{Config, DeviceRules, Emulator, FaultRate, Quota};
use c2dm_fcm::codec::{self, decode_send_answer, encode_send_request};
use c2dm_fcm::{
    FcmError, FcmMessage, QuotaScope, ServiceAccountKey, ServiceAccountTokens, TokenEndpointError,
};

fn config() -> Config {
    Config {
        devices: DeviceRules {
            not_registered_prefixes: vec!["gone-".into()],
            invalid_prefixes: vec!["bad-".into()],
            mismatch_prefixes: vec!["other-".into()],
            ..DeviceRules::default()
        },
        ..Config::default()
    }
}

struct Fcm {
    emulator: Emulator,
    transport: c2dm_hyper::HyperTransport,
    tokens: ServiceAccountTokens,
}

impl Fcm {
    async fn start(config: Config) -> Self {
        let emulator = Emulator::start_tls(config).await.unwrap();
        let transport = common::transport(&emulator);
        let key = ServiceAccountKey::from_json(emulator.fcm_key_file().as_bytes()).unwrap();
        let tokens = ServiceAccountTokens::new(key, transport.clone());
        Self {
            emulator,
            transport,
            tokens,
        }
    }

    async fn send_to(
        &self,
        project: &str,
        message: &FcmMessage,
        token: &AuthToken,
    ) -> Result<c2dm_fcm::MessageName, FcmError> {
        let base = self.emulator.base_url();
        let uri = codec::send_uri(&base, project).unwrap();
        let request = encode_send_request(message, token, &uri, false);
        let response = self.transport.execute(request).await.unwrap();
        decode_send_answer(&response, SystemTime::now())
    }

    async fn send(&self, message: &FcmMessage) -> Result<c2dm_fcm::MessageName, FcmError> {
        let token = self.tokens.token().await.unwrap();
        self.send_to(c2dm_emulator::fcm::PROJECT_ID, message, &token)
            .await
    }

    /// A raw JSON body, sent as is.
    async fn send_json(&self, body: &str) -> Result<c2dm_fcm::MessageName, FcmError> {
        let token = self.tokens.token().await.unwrap();
        let mut request = http::Request::new(Bytes::from(body.to_owned()));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.emulator.fcm_send_url().parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, codec::bearer(&token));
        let response = self.transport.execute(request).await.unwrap();
        decode_send_answer(&response, SystemTime::now())
    }
}

fn to(token: &str) -> FcmMessage {
    FcmMessage::builder()
        .token(token)
        .data("message", "hello")
        .collapse_key("news")
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_accepted_message_is_in_the_inbox_under_its_name() {
    let fcm = Fcm::start(config()).await;
    let name = fcm.send(&to("phone-1")).await.unwrap();
    assert!(
        name.as_str()
            .starts_with("projects/c2dm-emulator/messages/"),
        "{name}"
    );
    let inbox = fcm.emulator.inbox("phone-1");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].message_id, name.id());
    assert_eq!(inbox[0].collapse_key, "news");
    assert_eq!(inbox[0].data, [("message".to_owned(), "hello".to_owned())]);
    // One token for every send.
    for i in 0..5 {
        fcm.send(&to(&format!("phone-{i}"))).await.unwrap();
    }
    let stats = fcm.emulator.stats();
    assert_eq!(stats.fcm.tokens, 1);
    assert_eq!(stats.fcm.accepted, 6);
    assert_eq!(fcm.tokens.exchanges(), 1);
    // A validate_only send is checked, and goes nowhere.
    let token = fcm.tokens.token().await.unwrap();
    let uri = fcm.emulator.fcm_send_url().parse().unwrap();
    let request = encode_send_request(&to("phone-9"), &token, &uri, true);
    let response = fcm.transport.execute(request).await.unwrap();
    assert!(decode_send_answer(&response, SystemTime::now()).is_ok());
    assert!(fcm.emulator.inbox("phone-9").is_empty());
}

#[tokio::test]
async fn each_device_rule_answers_as_fcm_does() {
    let fcm = Fcm::start(config()).await;
    assert_eq!(fcm.send(&to("gone-1")).await, Err(FcmError::Unregistered));
    let bad = fcm.send(&to("bad-1")).await.unwrap_err();
    assert!(matches!(bad, FcmError::InvalidToken { .. }), "{bad:?}");
    assert!(bad.should_remove_registration());
    assert_eq!(
        fcm.send(&to("other-1")).await,
        Err(FcmError::SenderIdMismatch)
    );
    let token = fcm.tokens.token().await.unwrap();
    let wrong = fcm
        .send_to("someone-else", &to("phone-1"), &token)
        .await
        .unwrap_err();
    assert!(
        matches!(wrong, FcmError::PermissionDenied { .. }),
        "{wrong:?}"
    );
    let stats = fcm.emulator.stats();
    assert_eq!(stats.fcm.errors["UNREGISTERED"], 1);
    assert_eq!(stats.fcm.errors["INVALID_ARGUMENT"], 1);
    assert_eq!(stats.fcm.errors["SENDER_ID_MISMATCH"], 1);
    assert_eq!(stats.fcm.accepted, 0);
}

#[tokio::test]
async fn a_message_fcm_would_refuse_is_refused_with_its_field() {
    let fcm = Fcm::start(config()).await;
    let cases = [
        (
            r#"{"message": {"token": "p", "data": {"from": "x"}}}"#,
            Some("message.data[0].key"),
        ),
        (
            r#"{"message": {"token": "p", "data": {"k": 1}}}"#,
            Some("message.data[0].value"),
        ),
        (
            r#"{"message": {"token": "p", "topic": "t"}}"#,
            Some("message"),
        ),
        (
            r#"{"message": {"token": "p", "android": {"ttl": "2419201s"}}}"#,
            Some("message.android.ttl"),
        ),
        (r#"{"nope": 1}"#, Some("message")),
        ("not json", None),
    ];
    for (body, field) in cases {
        match fcm.send_json(body).await {
            Err(FcmError::InvalidMessage { field: got, .. }) => {
                assert_eq!(got.as_deref(), field, "{body}");
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    let big = format!(
        r#"{{"message": {{"token": "p", "data": {{"k": "{}"}}}}}}"#,
        "v".repeat(4096)
    );
    assert!(matches!(
        fcm.send_json(&big).await,
        Err(FcmError::InvalidMessage { .. })
    ));
    assert!(fcm.emulator.inbox("p").is_empty());
}

#[tokio::test]
async fn an_unknown_or_expired_token_is_refused_and_a_renewed_one_works() {
    let fcm = Fcm::start(Config {
        fcm_token_lifetime: Duration::from_secs(600),
        ..config()
    })
    .await;
    let nobody = AuthToken::new("ya29.not-issued").unwrap();
    let refused = fcm
        .send_to(c2dm_emulator::fcm::PROJECT_ID, &to("phone-1"), &nobody)
        .await;
    assert_eq!(refused, Err(FcmError::Unauthenticated));
    let token = fcm.tokens.token().await.unwrap();
    fcm.emulator.advance_clock(Duration::from_secs(601));
    let expired = fcm
        .send_to(c2dm_emulator::fcm::PROJECT_ID, &to("phone-1"), &token)
        .await;
    assert_eq!(expired, Err(FcmError::Unauthenticated));
    let renewed = fcm.tokens.refresh(&token).await.unwrap();
    assert_ne!(renewed, token);
    fcm.send_to(c2dm_emulator::fcm::PROJECT_ID, &to("phone-1"), &renewed)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_token_endpoint_checks_the_signature_the_issuer_and_the_audience() {
    let emulator = Emulator::start_tls(config()).await.unwrap();
    let transport = common::transport(&emulator);
    let exchange = |key: ServiceAccountKey| {
        let transport = transport.clone();
        async move {
            let request = c2dm_fcm::encode_token_request(&key, SystemTime::now()).unwrap();
            let response = transport.execute(request).await.unwrap();
            c2dm_fcm::decode_token_answer(&response, SystemTime::now())
        }
    };
    let good = ServiceAccountKey::from_json(emulator.fcm_key_file().as_bytes()).unwrap();
    let granted = exchange(good.clone()).await.unwrap();
    assert_eq!(granted.expires_in, Duration::from_secs(3599));
    // Another account's key, pointed at the emulator: its signature is not the emulator's.
    let stranger = ServiceAccountKey::from_json(include_bytes!(
        "../../c2dm-fcm/tests/data/service-account.json"
    ))
    .unwrap()
    .with_token_uri(emulator.fcm_token_url().parse().unwrap());
    assert!(matches!(
        exchange(stranger).await,
        Err(TokenEndpointError::InvalidGrant { .. })
    ));
    // The right key, but an audience that is not this endpoint.
    let elsewhere = good.with_token_uri(format!("{}/other", emulator.base_url()).parse().unwrap());
    let request = c2dm_fcm::encode_token_request(&elsewhere, SystemTime::now()).unwrap();
    let mut request = request;
    *request.uri_mut() = emulator.fcm_token_url().parse().unwrap();
    let response = transport.execute(request).await.unwrap();
    assert!(matches!(
        c2dm_fcm::decode_token_answer(&response, SystemTime::now()),
        Err(TokenEndpointError::InvalidGrant { .. })
    ));
    let stats = emulator.stats();
    assert_eq!((stats.fcm.tokens, stats.fcm.token_refusals), (1, 2));
}

#[tokio::test]
async fn faults_and_quotas_answer_as_fcm_does() {
    let fcm = Fcm::start(Config {
        unavailable: FaultRate::Every(3),
        retry_after: Duration::from_secs(7),
        device_quota: Some(Quota {
            limit: 1,
            window: Duration::from_secs(3600),
        }),
        ..config()
    })
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(fcm.send(&to("phone-q")).await);
    }
    assert!(seen[0].is_ok());
    assert_eq!(
        seen[1],
        Err(FcmError::QuotaExceeded {
            scope: QuotaScope::Device,
            retry_after: c2dm_fcm::MIN_QUOTA_BACKOFF,
        })
    );
    assert_eq!(
        seen[2],
        Err(FcmError::Unavailable {
            retry_after: Some(Duration::from_secs(7))
        })
    );
    assert_eq!(fcm.tokens.exchanges(), 1);
}

/// The same Sender and broadcast as C2DM's, over FCM: every device gets one delivery, gone
/// ones are reported for removal, faults are retried, and an expired token is renewed.
#[tokio::test]
async fn a_broadcast_over_fcm_keeps_every_rule_of_the_sender() {
    use c2dm_core::{BroadcastOptions, DeliveryReport, RegistrationId, RetryPolicy, Sender};
    use c2dm_fcm::Fcm;
    use futures::StreamExt;

    let emulator = Emulator::start_tls(Config {
        server_errors: FaultRate::Every(7),
        unavailable: FaultRate::Every(11),
        // Retried at once: the test waits for nothing real.
        retry_after: Duration::ZERO,
        fcm_token_lifetime: Duration::from_secs(600),
        ..config()
    })
    .await
    .unwrap();
    // Over HTTP/2, as FCM is reached: every send on one connection.
    let transport = common::transport_with(&emulator, |b| b.http2(true));
    let key = ServiceAccountKey::from_json(emulator.fcm_key_file().as_bytes()).unwrap();
    let tokens = Arc::new(ServiceAccountTokens::new(key, transport.clone()));
    let fcm = Fcm::new(c2dm_emulator::fcm::PROJECT_ID).unwrap();
    let sender = Sender::with_protocol(fcm, transport, Arc::clone(&tokens))
        .endpoint(emulator.fcm_send_url().parse().unwrap())
        .retry_policy(
            RetryPolicy::default()
                .with_max_attempts(8)
                .with_initial_backoff(Duration::ZERO),
        )
        .jitter_seed(7)
        .build();
    let template = FcmMessage::builder()
        .token("template")
        .data("message", "hello")
        .collapse_key("news")
        .build()
        .unwrap();
    let ids: Vec<RegistrationId> = (0..60)
        .map(|i| match i % 20 {
            0 => format!("gone-{i}"),
            1 => format!("bad-{i}"),
            _ => format!("phone-{i}"),
        })
        .map(|id| RegistrationId::new(id).unwrap())
        .collect();
    let run = |ids: Vec<RegistrationId>| {
        let sender = sender.clone();
        let template = template.clone();
        async move {
            let mut deliveries = sender
                .broadcast_to(
                    futures::stream::iter(ids),
                    &template,
                    BroadcastOptions::default().concurrency(8),
                )
                .unwrap();
            let mut report = DeliveryReport::new();
            let mut removed = Vec::new();
            while let Some(delivery) = deliveries.next().await {
                if delivery.should_remove() {
                    removed.push(delivery.registration_id().to_string());
                }
                report.record(&delivery);
            }
            removed.sort();
            (report, removed)
        }
    };
    let (report, removed) = run(ids.clone()).await;
    assert_eq!(
        (report.accepted(), report.rejected()),
        (54, 6),
        "{report:?}"
    );
    assert_eq!(
        removed,
        ["bad-1", "bad-21", "bad-41", "gone-0", "gone-20", "gone-40"]
    );
    for i in (0..60).filter(|i| i % 20 >= 2) {
        assert_eq!(emulator.inbox(&format!("phone-{i}")).len(), 1, "phone-{i}");
    }
    let stats = emulator.stats();
    assert!(
        stats.server_errors > 0 && stats.unavailable > 0,
        "{stats:?}"
    );
    assert_eq!(
        stats.fcm.http2, stats.sends,
        "every send over HTTP/2: {stats:?}"
    );
    assert_eq!(tokens.exchanges(), 1);
    // Past the token's life (the emulator's clock only: the client's token still looks fresh),
    // the service refuses it, and the sender renews it once and carries on.
    emulator.advance_clock(Duration::from_secs(601));
    emulator.clear_inbox();
    let phones: Vec<RegistrationId> = ids
        .into_iter()
        .filter(|id| id.as_str().starts_with("phone-"))
        .collect();
    let (report, _) = run(phones).await;
    assert_eq!(report.accepted(), 54, "{report:?}");
    assert_eq!(tokens.exchanges(), 2);
}
