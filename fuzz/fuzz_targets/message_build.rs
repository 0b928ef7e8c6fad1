//! Building a message from any fields either fails with a typed error or gives a message whose
//! encoded form decodes back to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Fields separated by NUL: id, collapse key, then key/value pairs.
    let mut fields = text.split('\0');
    let id = fields.next().unwrap_or_default();
    let collapse_key = fields.next();
    let mut builder = c2dm_core::Message::builder(id);
    if let Some(key) = collapse_key {
        builder = builder.collapse_key(key);
    }
    let mut pairs = Vec::new();
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        builder = builder.data(k, v);
        pairs.push((k.to_owned(), v.to_owned()));
    }
    let Ok(message) = builder.delay_while_idle(data.len() % 2 == 0).build() else {
        return;
    };
    let token = c2dm_core::AuthToken::new("fuzz").unwrap();
    let request = c2dm_core::codec::encode_send_request(
        &message,
        &token,
        &c2dm_core::codec::default_send_uri(),
    );
    let form = c2dm_core::codec::SendForm::parse(request.body());
    assert_eq!(form.registration_id.as_deref(), Some(id));
    assert_eq!(form.collapse_key.as_deref(), collapse_key);
    assert_eq!(form.data, pairs);
    assert_eq!(form.delay_while_idle, message.delay_while_idle());
});
