//! A Web Push body (and a subscription's JSON) is decrypted, or parsed, or refused: never a
//! panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = c2dm_webpush::Subscription::from_json(data);
    // A fixed receiver: RFC 8291's.
    let key = c2dm_webpush::base64url::decode("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")
        .expect("base64url");
    let private = p256::SecretKey::from_slice(&key).expect("a P-256 key");
    let _ = c2dm_webpush::decrypt(data, &private, &[7; 16]);
});
