//! The token endpoint's answer decoder, the key file reader and the assertion check never
//! panic, whatever the bytes.
#![no_main]

use std::time::UNIX_EPOCH;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let mut response = http::Response::new(bytes::Bytes::copy_from_slice(rest));
    if let Ok(status) = http::StatusCode::from_u16(u16::from(*first) + 200) {
        *response.status_mut() = status;
    }
    let _ = c2dm_fcm::decode_token_answer(&response, UNIX_EPOCH);
    let _ = c2dm_fcm::ServiceAccountKey::from_json(rest);
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = c2dm_fcm::verify_assertion(text, rest);
    }
});
