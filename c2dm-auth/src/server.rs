//! The server side of ClientLogin's wire format: the answers a login service writes. The
//! emulator and `c2dm-mock`'s fake both answer with these, so the client is tested against one
//! encoding, the one [`decode_login_response`](crate::codec::decode_login_response) reads.
//!
//! ```
//! use c2dm_auth::codec::{decode_login_response, default_login_uri};
//! use c2dm_auth::{LoginError, LoginErrorCode, server};
//!
//! let ok = server::login_success("sid", "lsid", "the-token");
//! let token = decode_login_response(http::StatusCode::OK, ok.as_bytes(), &default_login_uri())?;
//! assert_eq!(token.expose_secret(), "the-token");
//!
//! let refused = server::login_refusal(&LoginErrorCode::BadAuthentication, Some("InvalidSecondFactor"));
//! let err = decode_login_response(http::StatusCode::FORBIDDEN, refused.as_bytes(), &default_login_uri())
//!     .unwrap_err();
//! assert!(matches!(err, LoginError::Refused { code: LoginErrorCode::BadAuthentication, .. }));
//! # Ok::<(), LoginError>(())
//! ```

use crate::codec::LoginErrorCode;

/// The `Url=` line of a refusal: Google's page describing login errors.
pub const ERROR_URL: &str = "https://www.google.com/accounts/ErrorMsg";

/// The `Url=` line of a CAPTCHA challenge.
pub const CAPTCHA_URL: &str = "http://www.google.com/login/captcha";

/// A successful login's body (HTTP 200): `SID=`, `LSID=` and `Auth=` lines.
pub fn login_success(sid: &str, lsid: &str, auth: &str) -> String {
    format!("SID={sid}\nLSID={lsid}\nAuth={auth}\n")
}

/// A refused login's body (HTTP 403): `Url=`, `Error=<code>`, and `Info=` when given.
pub fn login_refusal(code: &LoginErrorCode, info: Option<&str>) -> String {
    let mut body = format!("Url={ERROR_URL}\nError={code}\n");
    if let Some(info) = info {
        body.push_str("Info=");
        body.push_str(info);
        body.push('\n');
    }
    body
}

/// A CAPTCHA challenge's body (HTTP 403): `Error=CaptchaRequired` with the token to answer and
/// the image's URL, relative to `https://www.google.com/accounts/` as Google wrote it.
pub fn captcha_challenge(token: &str) -> String {
    format!(
        "Url={CAPTCHA_URL}\nError=CaptchaRequired\nCaptchaToken={token}\nCaptchaUrl=Captcha?ctoken={token}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{LoginError, decode_login_response, default_login_uri};
    use http::StatusCode;

    #[test]
    fn every_answer_decodes_back() {
        for code in LoginErrorCode::KNOWN {
            if code == LoginErrorCode::CaptchaRequired {
                continue; // a challenge, below: without its token it is malformed
            }
            let body = login_refusal(&code, None);
            match decode_login_response(
                StatusCode::FORBIDDEN,
                body.as_bytes(),
                &default_login_uri(),
            ) {
                Err(LoginError::Refused { code: got, .. }) => assert_eq!(got, code),
                other => panic!("{code}: {other:?}"),
            }
        }
        let challenge = captcha_challenge("T0K");
        let err = decode_login_response(
            StatusCode::FORBIDDEN,
            challenge.as_bytes(),
            &default_login_uri(),
        )
        .unwrap_err();
        let captcha = err.captcha().expect("a challenge");
        assert_eq!(captcha.token, "T0K");
        assert_eq!(
            captcha.image_url,
            "https://www.google.com/accounts/Captcha?ctoken=T0K"
        );
    }
}
