//! The send-response decoder never panics, whatever the status, headers and body.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]) % 900 + 100;
    let Ok(status) = http::StatusCode::from_u16(status) else {
        return;
    };
    // The next bytes up to a NUL are header lines "name: value"; the rest is the body.
    let rest = &data[2..];
    let split = rest.iter().position(|b| *b == 0).unwrap_or(0);
    let (header_bytes, body) = rest.split_at(split);
    let mut headers = http::HeaderMap::new();
    for line in header_bytes.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(&line[colon + 1..]),
        ) {
            headers.append(name, value);
        }
    }
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(data[2]) << 24);
    let reply = c2dm_core::codec::decode_send_response(status, &headers, body, now);
    if let Err(err) = &reply.result {
        let _ = (err.to_string(), err.is_retryable(), err.should_remove_registration());
    }
});
