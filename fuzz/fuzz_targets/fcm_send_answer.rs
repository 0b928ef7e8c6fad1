//! FCM's send-answer decoder never panics, whatever the status, headers and body.
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
    // Up to the first NUL: a Retry-After value; the rest is the body.
    let rest = &data[2..];
    let split = rest.iter().position(|b| *b == 0).unwrap_or(0);
    let (retry_after, body) = rest.split_at(split);
    let mut response = http::Response::new(bytes::Bytes::copy_from_slice(body));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_bytes(retry_after) {
        response.headers_mut().insert(http::header::RETRY_AFTER, value);
    }
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(data[2]) << 24);
    if let Err(error) = c2dm_fcm::codec::decode_send_answer(&response, now) {
        let _ = (error.to_string(), error.disposition(), error.code(), error.retry_after());
    }
});
