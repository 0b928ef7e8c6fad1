//! The ClientLogin decoder never panics, and a success always carries a usable token.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let status = if first % 2 == 0 {
        http::StatusCode::OK
    } else {
        http::StatusCode::FORBIDDEN
    };
    match c2dm_auth::codec::decode_login_response(
        status,
        body,
        &c2dm_auth::codec::default_login_uri(),
    ) {
        Ok(token) => assert!(!token.expose_secret().is_empty()),
        Err(err) => {
            let _ = (err.to_string(), err.is_retryable(), err.captcha());
        }
    }
});
