//! Web Push's answer decoder never panics, whatever the status, headers and body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((response, now)) = c2dm_fuzz::answer(data) else {
        return;
    };
    let answer = c2dm_webpush::answer::decode(&response, now);
    let _ = (answer.is_gone(), format!("{answer:?}"));
});
