//! What the fuzz targets share: an HTTP answer read from the fuzzer's bytes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An answer made of fuzz bytes: a status from the first two, then header lines
/// `name: value` up to the first NUL, the rest the body; and a clock from the third byte.
/// `None` when there are too few bytes or no valid status.
pub fn answer(data: &[u8]) -> Option<(http::Response<bytes::Bytes>, SystemTime)> {
    if data.len() < 3 {
        return None;
    }
    let status = u16::from_le_bytes([data[0], data[1]]) % 900 + 100;
    let status = http::StatusCode::from_u16(status).ok()?;
    let rest = &data[2..];
    let split = rest.iter().position(|b| *b == 0).unwrap_or(0);
    let (header_bytes, body) = rest.split_at(split);
    let mut response = http::Response::new(bytes::Bytes::copy_from_slice(body));
    *response.status_mut() = status;
    for line in header_bytes.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(&line[colon + 1..]),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(data[2]) << 24);
    Some((response, now))
}
