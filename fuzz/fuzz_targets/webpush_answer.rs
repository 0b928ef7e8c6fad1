//! Web Push's answer decoder never panics, whatever the status, headers and body.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]) % 900 + 100;
    let Ok(status) = http::StatusCode::from_u16(status) else {
        return;
    };
    // Up to the first NUL: a Retry-After value, then a Location; the rest is the body.
    let rest = &data[2..];
    let split = rest.iter().position(|b| *b == 0).unwrap_or(0);
    let (header, body) = rest.split_at(split);
    let mut response = http::Response::new(bytes::Bytes::copy_from_slice(body));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_bytes(header) {
        response.headers_mut().insert(http::header::RETRY_AFTER, value.clone());
        response.headers_mut().insert(http::header::LOCATION, value);
    }
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(data[2]) << 24);
    let answer = c2dm_webpush::answer::decode(&response, now);
    let _ = (answer.is_gone(), format!("{answer:?}"));
});
