//! Property tests: the decoders never panic, and encoding round-trips.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use c2dm_core::codec::{self, SendForm};
use c2dm_core::{AuthToken, Message};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;

fn headers() -> impl Strategy<Value = HeaderMap> {
    let name = prop_oneof![
        Just("retry-after".to_string()),
        Just("update-client-auth".to_string()),
        Just("content-type".to_string()),
        "[a-z-]{1,12}",
    ];
    let value = prop_oneof![
        "[0-9]{0,25}",
        "[ -~]{0,40}",
        Just("Sun, 06 Nov 1994 08:49:37 GMT".to_string()),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    proptest::collection::vec((name, value), 0..5).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v.as_bytes()),
            ) {
                map.append(k, v);
            }
        }
        map
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        "(id|Error|error|ID)=[ -~]{0,60}".prop_map(String::into_bytes),
        "[ \t\r\n]{0,3}(id|Error)=[^\n]{0,30}[ \t\r\n]{0,3}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn decoding_any_answer_never_panics(
        status in 100u16..1000,
        headers in headers(),
        body in body(),
        now_secs in 0u64..10_000_000_000,
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(now_secs);
        let reply = codec::decode_send_response(status, &headers, &body, now);
        // Every error can be shown and classified.
        if let Err(err) = &reply.result {
            let _ = (err.to_string(), err.is_retryable(), err.should_remove_registration());
        }
        if status == StatusCode::OK && reply.result.is_ok() {
            prop_assert!(std::str::from_utf8(&body).unwrap().trim().to_ascii_lowercase().starts_with("id="));
        }
    }

    #[test]
    fn retry_after_never_panics(value in "\\PC{0,40}", now_secs in 0u64..10_000_000_000) {
        let now = UNIX_EPOCH + Duration::from_secs(now_secs);
        let _ = codec::parse_retry_after(&value, now);
    }

    #[test]
    fn retry_after_seconds_round_trip(secs in 0u64..u64::MAX) {
        prop_assert_eq!(
            codec::parse_retry_after(&secs.to_string(), SystemTime::now()),
            Some(Duration::from_secs(secs))
        );
    }

    #[test]
    fn form_parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let form = SendForm::parse(&body);
        let _ = form.payload_size();
    }

    #[test]
    fn encode_then_decode_round_trips(
        id in "[A-Za-z0-9_:.-]{1,60}",
        collapse_key in "\\PC{1,20}",
        data in proptest::collection::vec(("[a-z0-9_.é]{1,10}", "\\PC{0,40}"), 0..6),
        delay in any::<bool>(),
    ) {
        let mut builder = Message::builder(id).collapse_key(collapse_key).delay_while_idle(delay);
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &data {
            if k != "from" && !k.starts_with("google.") && seen.insert(k.clone()) {
                builder = builder.data(k.clone(), v.clone());
            }
        }
        let message = builder.build().unwrap();
        let token = AuthToken::new("tok").unwrap();
        let request = codec::encode_send_request(&message, &token, &codec::default_send_uri());
        let form = SendForm::parse(request.body());
        prop_assert_eq!(form.registration_id.as_deref(), Some(message.registration_id().as_str()));
        prop_assert_eq!(form.collapse_key.as_deref(), Some(message.collapse_key().as_str()));
        let sent: Vec<(String, String)> =
            message.data().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        prop_assert_eq!(&form.data, &sent);
        prop_assert_eq!(form.delay_while_idle, delay);
        prop_assert_eq!(form.payload_size(), message.payload_size());
        prop_assert_eq!(codec::auth_token_of(request.headers()), Some(token));
    }
}
