//! The send-response decoder never panics, whatever the status, headers and body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((response, now)) = c2dm_fuzz::answer(data) else {
        return;
    };
    let reply = c2dm_core::codec::decode_send_response(
        response.status(),
        response.headers(),
        response.body(),
        now,
    );
    if let Err(err) = &reply.result {
        let _ = (
            err.to_string(),
            err.is_retryable(),
            err.should_remove_registration(),
        );
    }
});
