//! The ClientLogin decoder never panics, and finds `Auth` wherever it stands.

use c2dm_auth::codec::{self, LoginError};
use http::StatusCode;
use proptest::prelude::*;

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("Auth"),
                    Just("SID"),
                    Just("Error"),
                    Just("Url"),
                    Just("Info"),
                    Just("CaptchaToken"),
                    Just("CaptchaUrl")
                ],
                "[ -~]{0,30}"
            ),
            0..8
        )
        .prop_map(|lines| lines
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect::<String>()
            .into_bytes()),
    ]
}

proptest! {
    #[test]
    fn decoding_never_panics(status in 100u16..1000, body in body()) {
        let status = StatusCode::from_u16(status).unwrap();
        if let Err(err) = codec::decode_login_response(status, &body, &codec::default_login_uri()) {
            let _ = (err.to_string(), err.is_retryable(), err.code(), err.captcha());
        }
    }

    #[test]
    fn auth_is_found_among_other_lines(
        before in proptest::collection::vec("(SID|LSID|X)=[a-z0-9]{0,10}", 0..4),
        after in proptest::collection::vec("(SID|LSID|X)=[a-z0-9]{0,10}", 0..4),
        token in "[A-Za-z0-9_-]{1,40}",
    ) {
        let mut lines = before;
        lines.push(format!("Auth={token}"));
        lines.extend(after);
        let body = lines.join("\n");
        let result = codec::decode_login_response(StatusCode::OK, body.as_bytes(), &codec::default_login_uri());
        let auth = result.unwrap();
        prop_assert_eq!(auth.expose_secret(), token.as_str());
    }

    #[test]
    fn refusals_keep_their_code(code in "[A-Za-z]{1,20}") {
        let body = format!("Error={code}\nCaptchaToken=t\nCaptchaUrl=u");
        match codec::decode_login_response(StatusCode::FORBIDDEN, body.as_bytes(), &codec::default_login_uri()) {
            Err(LoginError::Refused { code: c, .. }) => prop_assert_eq!(c.as_str(), code.as_str()),
            other => prop_assert!(false, "{:?}", other),
        }
    }
}
