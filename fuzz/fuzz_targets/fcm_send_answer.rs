//! FCM's send-answer decoder never panics, whatever the status, headers and body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((response, now)) = c2dm_fuzz::answer(data) else {
        return;
    };
    if let Err(error) = c2dm_fcm::codec::decode_send_answer(&response, now) {
        let _ = (
            error.to_string(),
            error.disposition(),
            error.code(),
            error.retry_after(),
        );
    }
});
