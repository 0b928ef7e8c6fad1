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
