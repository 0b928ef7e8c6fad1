//! A small soak: a broadcast over TLS with every fault on at once, checked afterwards against the
//! emulator's record. `cargo xtask soak` runs the large version (100,000 messages).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use c2dm_core::{BroadcastOptions, Delivery, Message, Outcome, RegistrationId, RetryPolicy};
use c2dm_emulator::{Config, DeviceRules, Emulator, FaultRate};
use futures::StreamExt;

const N: usize = 4_000;

fn id(i: usize) -> String {
    match i % 100 {
        7 | 57 => format!("gone-{i}"),
        13 => format!("bad-{i}"),
        21 => format!("busy-{i}"),
        _ => format!("device-{i}"),
    }
}

/// Every id has exactly one delivery, and every one is final: an accepted message is in its
/// device's inbox (its id read by `is_it`), a device got a message twice only if its delivery
/// said it might, and a rejected device is to be removed and got nothing.
fn check_deliveries(
    emulator: &Emulator,
    deliveries: &HashMap<String, Delivery>,
    is_it: impl Fn(&str, &c2dm_emulator::InboxMessage) -> bool,
) {
    assert_eq!(deliveries.len(), N);
    for (id, d) in deliveries {
        let inbox = emulator.inbox(id);
        match d.outcome() {
            Outcome::Accepted { message_id } => {
                let name = message_id.as_str();
                assert!(inbox.iter().any(|m| is_it(name, m)), "{id}: {name}");
                assert!(
                    inbox.len() == 1 || d.possible_duplicates() > 0,
                    "{id}: {}",
                    inbox.len()
                );
            }
            Outcome::Rejected { remove, .. } => {
                assert!(*remove, "{id}: {:?}", d.outcome());
                assert!(emulator.is_gone(id), "{id}");
                assert!(inbox.is_empty(), "{id}");
            }
            other => panic!("{id}: not final: {other:?}"),
        }
    }
}

/// How many devices were rejected for good.
fn gone_count(deliveries: &HashMap<String, Delivery>) -> u64 {
    deliveries
        .values()
        .filter(|d| matches!(d.outcome(), Outcome::Rejected { .. }))
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_under_every_fault_loses_nothing() {
    let config = Config {
        devices: DeviceRules {
            not_registered_prefixes: vec!["gone-".into()],
            invalid_prefixes: vec!["bad-".into()],
            device_quota_prefixes: vec!["busy-".into()],
            ..DeviceRules::default()
        },
        unavailable: FaultRate::Every(97),
        retry_after: Duration::ZERO,
        server_errors: FaultRate::Every(89),
        drops: FaultRate::Every(83),
        rotate_token_every: Some(100),
        token_lifetime_sends: Some(500),
        seed: 11,
        ..Config::default()
    };
    let emulator = Emulator::start_tls(config).await.unwrap();
    let (sender, _login) = common::sender(
        &emulator,
        RetryPolicy::default()
            .with_initial_backoff(Duration::from_millis(1))
            .with_max_backoff(Duration::from_millis(20))
            .with_max_attempts(12),
    );
    let template = Message::builder("template")
        .collapse_key("soak")
        .data("message", "test")
        .build()
        .unwrap();
    let ids: Vec<RegistrationId> = (0..N)
        .map(|i| RegistrationId::new(id(i)).unwrap())
        .collect();
    let mut stream = sender
        .broadcast_to(
            futures::stream::iter(ids.clone()),
            &template,
            BroadcastOptions::default(),
        )
        .unwrap();
    let mut deliveries: HashMap<String, Delivery> = HashMap::new();
    while let Some(d) = stream.next().await {
        let previous = deliveries.insert(d.registration_id().to_string(), d);
        assert!(previous.is_none(), "two deliveries for one id");
    }

    let stats = emulator.counters();
    check_deliveries(&emulator, &deliveries, |name, m| name == m.message_id);
    // No send after a permanent rejection: each gone id was answered exactly once.
    let rejections: u64 = ["NotRegistered", "InvalidRegistration"]
        .iter()
        .map(|c| stats.errors.get(*c).copied().unwrap_or(0))
        .sum();
    assert_eq!(rejections, gone_count(&deliveries));
    // Faults were really met, and every expiry cost exactly one login.
    assert!(
        stats.unavailable > 10 && stats.server_errors > 10 && stats.dropped > 10,
        "{stats:?}"
    );
    assert!(stats.rotations > 10, "{stats:?}");
    assert!(stats.expiries >= 5, "{stats:?}");
    assert_eq!(stats.logins, stats.expiries + 1, "{stats:?}");
    let busy: HashSet<&String> = deliveries
        .keys()
        .filter(|k| k.starts_with("busy-"))
        .collect();
    assert!(busy.iter().all(|id| deliveries[*id].attempts() >= 3));
}

/// The same soak through FCM HTTP v1, over HTTP/2: dropped streams, 500s and 503s at once, gone
/// and invalid tokens; every id gets one final delivery, every accepted name is in its inbox,
/// no duplicate goes unreported, and no gone device is sent to twice. (A device's
/// `QUOTA_EXCEEDED` waits at least a minute, as Google asks: `fcm.rs` tests it apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_under_every_fault_over_fcm_loses_nothing() {
    use c2dm_fcm::{Fcm, FcmMessage, ServiceAccountKey, ServiceAccountTokens};
    use std::sync::Arc;

    let config = Config {
        devices: DeviceRules {
            not_registered_prefixes: vec!["gone-".into()],
            invalid_prefixes: vec!["bad-".into()],
            ..DeviceRules::default()
        },
        unavailable: FaultRate::Every(97),
        retry_after: Duration::ZERO,
        server_errors: FaultRate::Every(89),
        drops: FaultRate::Every(83),
        seed: 12,
        ..Config::default()
    };
    let emulator = Emulator::start_tls(config).await.unwrap();
    let transport = common::transport_with(&emulator, |b| b.http2(true));
    let key = ServiceAccountKey::from_json(emulator.fcm_key_file().as_bytes()).unwrap();
    let tokens = Arc::new(ServiceAccountTokens::new(key, transport.clone()));
    let sender = c2dm_core::Sender::with_protocol(
        Fcm::new(c2dm_emulator::fcm::PROJECT_ID).unwrap(),
        transport,
        Arc::clone(&tokens),
    )
    .endpoint(emulator.fcm_send_url().parse().unwrap())
    .retry_policy(
        RetryPolicy::default()
            .with_initial_backoff(Duration::from_millis(1))
            .with_max_backoff(Duration::from_millis(20))
            .with_max_attempts(12),
    )
    .build();
    let template = FcmMessage::builder()
        .token("template")
        .collapse_key("soak")
        .data("message", "test")
        .build()
        .unwrap();
    let ids: Vec<RegistrationId> = (0..N)
        .map(|i| RegistrationId::new(id(i).replace("busy-", "device-")).unwrap())
        .collect();
    let mut stream = sender
        .broadcast_to(
            futures::stream::iter(ids.clone()),
            &template,
            BroadcastOptions::default(),
        )
        .unwrap();
    let mut deliveries: HashMap<String, Delivery> = HashMap::new();
    while let Some(d) = stream.next().await {
        let previous = deliveries.insert(d.registration_id().to_string(), d);
        assert!(previous.is_none(), "two deliveries for one id");
    }
    let stats = emulator.counters();
    check_deliveries(&emulator, &deliveries, |name, m| {
        name.ends_with(&format!("/{}", m.message_id))
    });
    let gone = gone_count(&deliveries);
    let rejections: u64 = ["UNREGISTERED", "INVALID_ARGUMENT"]
        .iter()
        .map(|c| stats.fcm.errors.get(*c).copied().unwrap_or(0))
        .sum();
    assert_eq!(rejections, gone);
    assert!(
        stats.unavailable > 10 && stats.server_errors > 10 && stats.dropped > 10,
        "{stats:?}"
    );
    assert_eq!(stats.fcm.http2, stats.sends, "{stats:?}");
    assert_eq!(tokens.exchanges(), 1);
}
