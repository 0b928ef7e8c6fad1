//! FcmMessage's rules: one target, the keys FCM allows, the payload limit, the ttl range, and
//! the JSON it writes.

use std::time::Duration;

use c2dm_fcm::{
    FcmMessage, FcmMessageBuilder, FcmMessageError, MAX_PAYLOAD, MAX_TARGET, MAX_TOPIC_PAYLOAD,
    MAX_TTL, duration_text,
};
use proptest::prelude::*;

#[test]
fn a_message_needs_exactly_one_valid_target() {
    let cases: Vec<(FcmMessageBuilder, FcmMessageError)> = vec![
        (FcmMessage::builder(), FcmMessageError::NoTarget),
        (
            FcmMessage::builder().token("a").topic("b"),
            FcmMessageError::TwoTargets,
        ),
        (
            FcmMessage::builder().token(""),
            FcmMessageError::InvalidTarget {
                what: "token",
                why: "it is empty",
            },
        ),
        (
            FcmMessage::builder().token("a b"),
            FcmMessageError::InvalidTarget {
                what: "token",
                why: "it holds spaces or control characters",
            },
        ),
        (
            FcmMessage::builder().token("x".repeat(MAX_TARGET + 1)),
            FcmMessageError::InvalidTarget {
                what: "token",
                why: "it is over 4,096 bytes",
            },
        ),
        (
            FcmMessage::builder().topic("/topics/news"),
            FcmMessageError::InvalidTarget {
                what: "topic",
                why: "a topic is letters, digits and -_.~% only, without /topics/",
            },
        ),
        (
            FcmMessage::builder().condition("'a' in topics\n"),
            FcmMessageError::InvalidTarget {
                what: "condition",
                why: "it holds control characters",
            },
        ),
    ];
    for (builder, error) in cases {
        assert_eq!(builder.clone().build(), Err(error), "{builder:?}");
    }
    assert!(FcmMessage::builder().topic("news-uk_1.~%").build().is_ok());
    assert!(
        FcmMessage::builder()
            .condition("'news' in topics && 'uk' in topics")
            .build()
            .is_ok()
    );
}

#[test]
fn reserved_and_repeated_keys_are_refused() {
    for key in [
        "",
        "from",
        "notification",
        "message_type",
        "google.x",
        "gcm",
        "gcm.n",
    ] {
        let built = FcmMessage::builder().token("t").data(key, "v").build();
        assert_eq!(
            built,
            Err(FcmMessageError::ReservedKey { key: key.into() }),
            "{key:?}"
        );
    }
    // FCM overrides these with its own, but takes them.
    assert!(
        FcmMessage::builder()
            .token("t")
            .data("collapse_key", "v")
            .data("googleapis", "no")
            .build()
            .is_err()
    );
    assert!(
        FcmMessage::builder()
            .token("t")
            .data("collapse_key", "v")
            .build()
            .is_ok()
    );
    assert_eq!(
        FcmMessage::builder()
            .token("t")
            .data("k", "1")
            .data("k", "2")
            .build(),
        Err(FcmMessageError::DuplicateKey { key: "k".into() })
    );
}

#[test]
fn the_payload_limit_counts_keys_values_and_the_notification() {
    let exactly = FcmMessage::builder()
        .token("t")
        .data("k", "v".repeat(MAX_PAYLOAD - 1))
        .build()
        .unwrap();
    assert_eq!(exactly.payload_size(), MAX_PAYLOAD);
    let over = FcmMessage::builder()
        .token("t")
        .data("k", "v".repeat(MAX_PAYLOAD - 1))
        .notification("t", "")
        .build();
    assert!(matches!(
        over,
        Err(FcmMessageError::InvalidText { field: "body" })
    ));
    let over = FcmMessage::builder()
        .token("t")
        .data("k", "v".repeat(MAX_PAYLOAD - 2))
        .notification("t", "b")
        .build();
    assert_eq!(
        over,
        Err(FcmMessageError::TooBig {
            size: MAX_PAYLOAD + 1,
            limit: MAX_PAYLOAD
        })
    );
    let topic = FcmMessage::builder()
        .topic("news")
        .data("k", "v".repeat(MAX_TOPIC_PAYLOAD))
        .build();
    assert_eq!(
        topic,
        Err(FcmMessageError::TooBig {
            size: MAX_TOPIC_PAYLOAD + 1,
            limit: MAX_TOPIC_PAYLOAD
        })
    );
}

#[test]
fn the_ttl_is_at_most_28_days_and_written_as_protobuf_does() {
    assert_eq!(
        FcmMessage::builder()
            .token("t")
            .ttl(MAX_TTL + Duration::from_nanos(1))
            .build(),
        Err(FcmMessageError::TtlTooLong)
    );
    assert!(
        FcmMessage::builder()
            .token("t")
            .ttl(MAX_TTL)
            .build()
            .is_ok()
    );
    assert_eq!(duration_text(Duration::from_secs(3600)), "3600s");
    assert_eq!(duration_text(Duration::from_millis(1500)), "1.5s");
    assert_eq!(duration_text(Duration::from_nanos(1)), "0.000000001s");
    assert_eq!(duration_text(Duration::ZERO), "0s");
}

#[test]
fn a_c2dm_message_maps_and_delay_while_idle_is_refused() {
    let c2dm = c2dm_core::Message::builder("device")
        .collapse_key("orders")
        .data("message", "shipped")
        .build()
        .unwrap();
    let fcm = FcmMessage::from_c2dm(&c2dm).unwrap();
    assert_eq!(fcm.token(), Some("device"));
    assert_eq!(fcm.collapse_key(), Some("orders"));
    assert_eq!(fcm.data(), [("message".to_owned(), "shipped".to_owned())]);
    let idle = c2dm_core::Message::builder("device")
        .collapse_key("orders")
        .delay_while_idle(true)
        .build()
        .unwrap();
    assert_eq!(
        FcmMessage::from_c2dm(&idle),
        Err(FcmMessageError::DelayWhileIdle)
    );
}

proptest! {
    #[test]
    fn a_valid_message_writes_json_that_reads_back(
        token in "[A-Za-z0-9:_-]{1,200}",
        data in proptest::collection::btree_map("[a-f]{1,8}", ".{0,40}", 0..8),
        collapse in proptest::option::of("[a-z]{1,10}"),
        ttl in proptest::option::of(0u64..=2_419_200),
        validate in any::<bool>(),
    ) {
        let mut builder = FcmMessage::builder().token(&token);
        for (k, v) in &data {
            builder = builder.data(k, v);
        }
        if let Some(c) = &collapse {
            builder = builder.collapse_key(c);
        }
        if let Some(ttl) = ttl {
            builder = builder.ttl(Duration::from_secs(ttl));
        }
        // Within every limit: each of these builds.
        let message = builder.build().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&message.to_json(validate)).unwrap();
        prop_assert_eq!(&json["message"]["token"], &serde_json::Value::String(token));
        for (k, v) in &data {
            prop_assert_eq!(&json["message"]["data"][k], &serde_json::Value::String(v.clone()));
        }
        prop_assert_eq!(json["validate_only"].as_bool(), validate.then_some(true));
        if let Some(ttl) = ttl {
            let expected = format!("{ttl}s");
            prop_assert_eq!(json["message"]["android"]["ttl"].as_str(), Some(expected.as_str()));
        }
    }
}
