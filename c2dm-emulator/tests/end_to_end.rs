//! The whole client stack (Sender, ClientLogin, HyperTransport over TLS) against the emulator.
#![allow(clippy::field_reassign_with_default)] // tests set one field at a time

mod common;

use c2dm_core::{Message, RetryPolicy, retry::Jitter};
use c2dm_emulator::{Config, Emulator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_rotate_expire_and_send_over_tls() {
    let mut config = Config::default();
    config.devices.not_registered_prefixes = vec!["gone-".into()];
    config.rotate_token_every = Some(5);
    config.token_lifetime_sends = Some(12);
    let emulator = Emulator::start_tls(config).await.unwrap();
    let (sender, _login) =
        common::sender(&emulator, RetryPolicy::default().with_jitter(Jitter::None));
    for i in 0..30 {
        let message = Message::builder(format!("device-{i}"))
            .collapse_key("news")
            .data("message", "test")
            .data("sound", "test")
            .build()
            .unwrap();
        let sent = sender.send(message).await.unwrap();
        let inbox = emulator.inbox(&format!("device-{i}"));
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].message_id, sent.message_id.as_str());
    }
    let gone = Message::builder("gone-1")
        .collapse_key("news")
        .build()
        .unwrap();
    assert!(
        sender
            .send(gone)
            .await
            .unwrap_err()
            .should_remove_registration()
    );
    let stats = emulator.counters();
    assert_eq!(stats.accepted, 30);
    assert!(stats.rotations >= 2, "{stats:?}");
    // Every expiry cost exactly one login more.
    assert_eq!(stats.logins, stats.expiries + 1, "{stats:?}");
    assert!(stats.expiries >= 2, "{stats:?}");
}

/// Tokens that expire after 10 accepted sends, under a broadcast of 64 at once: every send
/// that meets an expired token renews it, nothing fails, and logins stay near sends / 10.
/// Before the 401 rule changed (a second 401 in a row was final), a run of 2,000 ids at
/// concurrency 32 ended with 1,290 failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_under_load_fail_nothing() {
    use c2dm_core::{BroadcastOptions, DeliveryReport, RegistrationId};
    use futures::StreamExt;

    let mut config = Config::default();
    config.token_lifetime_sends = Some(10);
    let emulator = Emulator::start(config).await.unwrap();
    let (sender, login) = common::sender(&emulator, RetryPolicy::default());
    let ids: Vec<RegistrationId> = (0..10_000)
        .map(|i| RegistrationId::new(format!("device-{i}")).unwrap())
        .collect();
    let template = Message::builder("t").collapse_key("k").build().unwrap();
    let mut deliveries = sender
        .broadcast_to(
            futures::stream::iter(ids),
            &template,
            BroadcastOptions::default().concurrency(64),
        )
        .unwrap();
    let mut report = DeliveryReport::new();
    while let Some(delivery) = deliveries.next().await {
        report.record(&delivery);
    }
    assert_eq!(report.accepted(), 10_000, "{report}");
    let stats = emulator.counters();
    assert_eq!(stats.accepted, 10_000);
    // One login per ten sends, and a few more where logins overlapped.
    let logins = login.login_count();
    assert!(
        (1_000..=1_100).contains(&logins),
        "{logins} logins: {stats:?}"
    );
}
