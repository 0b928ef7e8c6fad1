//! The wire format of the send endpoint, as pure functions: no I/O, time passed in.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};

use crate::error::{Error, ErrorCode};
use crate::message::{Message, MessageId};
use crate::token::AuthToken;

mod server;

pub use server::{
    AUTH_SCHEME, SendForm, UNAUTHORIZED_BODY, accepted_body, auth_token_of, encode_send_answer,
    rejected_body,
};

/// Google's send endpoint, the default everywhere.
pub const DEFAULT_SEND_URL: &str = "https://android.apis.google.com/c2dm/send";

/// The content type of a send request.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded;charset=UTF-8";

/// The header in which the service hands out a rotated Auth token.
pub const UPDATE_CLIENT_AUTH: &str = "update-client-auth";

/// [`UPDATE_CLIENT_AUTH`] as a header name: looking a `&str` up parses it on every answer.
const UPDATE_CLIENT_AUTH_NAME: HeaderName = HeaderName::from_static(UPDATE_CLIENT_AUTH);

/// How much of a malformed body an error keeps, in bytes.
const MALFORMED_BODY_KEEP: usize = 200;

/// Encodes `message` as the form POST the send endpoint expects.
///
/// Fields go in a fixed order: `registration_id`, `collapse_key`, the `data.<key>` pairs in
/// insertion order, and `delay_while_idle=1` only when set. The `Authorization` header is marked
/// sensitive so HTTP stacks keep it out of their logs.
///
/// ```
/// use c2dm_core::{AuthToken, Message, codec};
/// let message = Message::builder("device-1")
///     .collapse_key("orders")
///     .data("message", "shipped & paid")
///     .build()?;
/// let token = AuthToken::new("secret")?;
/// let request = codec::encode_send_request(&message, &token, &codec::default_send_uri());
/// assert_eq!(request.method(), "POST");
/// assert_eq!(request.headers()["authorization"], "GoogleLogin auth=secret");
/// assert_eq!(
///     request.body().as_ref(),
///     b"registration_id=device-1&collapse_key=orders&data.message=shipped+%26+paid"
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode_send_request(message: &Message, token: &AuthToken, endpoint: &Uri) -> Request<Bytes> {
    let body = encode_send_form(message);
    let length = HeaderValue::from(body.len());
    let auth = token.authorization();
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = endpoint.clone();
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(FORM_CONTENT_TYPE));
    headers.insert(AUTHORIZATION, auth);
    headers.insert(CONTENT_LENGTH, length);
    request
}

/// The form body of a send request, without headers.
pub fn encode_send_form(message: &Message) -> Bytes {
    const KEY: &str = "registration_id=";
    let id = message.registration_id().as_str();
    let tail = message.form_tail();
    let mut form = String::with_capacity(KEY.len() + id.len() * 3 + tail.len());
    form.push_str(KEY);
    form.extend(form_urlencoded::byte_serialize(id.as_bytes()));
    form.push_str(tail);
    Bytes::from(form)
}

/// The default send endpoint as a [`Uri`].
pub fn default_send_uri() -> Uri {
    Uri::from_static(DEFAULT_SEND_URL)
}

/// A decoded answer of the send endpoint.
#[derive(Debug, Clone)]
pub struct SendReply {
    /// The accepted message's id, or why it was not accepted.
    pub result: Result<MessageId, Error>,
    /// A rotated token from `Update-Client-Auth`, to use for every later request. The result
    /// above still stands: a rotation is never a reason to resend.
    pub rotated_token: Option<AuthToken>,
}

/// Decodes an answer of the send endpoint. Never panics, whatever the bytes.
///
/// `now` is used to turn an HTTP-date `Retry-After` into a delay.
///
/// ```
/// use c2dm_core::{codec, Error, ErrorCode};
/// let reply = codec::decode_send_response(
///     http::StatusCode::OK,
///     &http::HeaderMap::new(),
///     b"Error=NotRegistered\n",
///     std::time::SystemTime::now(),
/// );
/// let err = reply.result.unwrap_err();
/// assert!(matches!(err, Error::Rejected(ErrorCode::NotRegistered)));
/// assert!(err.should_remove_registration());
/// ```
pub fn decode_send_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> SendReply {
    let rotated_token = headers
        .get(UPDATE_CLIENT_AUTH_NAME)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| AuthToken::new(v.trim()).ok());
    let retry_after = || {
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now))
    };
    let result = match status.as_u16() {
        200 => decode_ok_body(body),
        401 => Err(Error::Unauthorized),
        503 => Err(Error::Unavailable {
            retry_after: retry_after(),
        }),
        s @ 500..=599 => Err(Error::ServerError {
            status: s,
            retry_after: retry_after(),
        }),
        s => Err(Error::UnexpectedStatus { status: s }),
    };
    SendReply {
        result,
        rotated_token,
    }
}

/// [`decode_send_response`] over a whole response.
pub fn decode_response(response: &Response<Bytes>, now: SystemTime) -> SendReply {
    decode_send_response(response.status(), response.headers(), response.body(), now)
}

fn decode_ok_body(body: &[u8]) -> Result<MessageId, Error> {
    let malformed = || Error::MalformedResponse {
        status: 200,
        body: String::from_utf8_lossy(&body[..body.len().min(MALFORMED_BODY_KEEP)]).into_owned(),
    };
    let text = std::str::from_utf8(body).map_err(|_| malformed())?.trim();
    let (key, value) = text.split_once('=').ok_or_else(malformed)?;
    let value = value.trim();
    if key.eq_ignore_ascii_case("error") {
        // Any code, even an empty one, is a refusal: an unknown code is final.
        Err(Error::Rejected(ErrorCode::parse(value)))
    } else if key.eq_ignore_ascii_case("id") && !value.is_empty() {
        Ok(MessageId::new(value))
    } else {
        Err(malformed())
    }
}

/// Reads a `Retry-After` value: delta-seconds or an HTTP-date (relative to `now`).
///
/// A date in the past gives zero; anything unreadable gives `None`.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use c2dm_core::codec::parse_retry_after;
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
/// assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
/// assert_eq!(
///     parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
///     Some(Duration::from_secs(30))
/// );
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Longer than u64 seconds: as good as forever; the retry cap bounds it anyway.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RegistrationId;
    use std::time::UNIX_EPOCH;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn token() -> AuthToken {
        AuthToken::new("tok").unwrap()
    }

    fn decode(status: u16, headers: &[(&str, &str)], body: &str) -> SendReply {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        decode_send_response(
            StatusCode::from_u16(status).unwrap(),
            &map,
            body.as_bytes(),
            now(),
        )
    }

    #[test]
    fn encodes_the_exact_request() {
        let m = Message::builder("APA91b-x")
            .collapse_key("orders")
            .data("message", "test")
            .data("sound", "test")
            .delay_while_idle(true)
            .build()
            .unwrap();
        let req = encode_send_request(&m, &token(), &default_send_uri());
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), DEFAULT_SEND_URL);
        assert_eq!(
            req.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded;charset=UTF-8"
        );
        assert_eq!(req.headers()[AUTHORIZATION], "GoogleLogin auth=tok");
        assert!(req.headers()[AUTHORIZATION].is_sensitive());
        assert_eq!(req.headers()[CONTENT_LENGTH], req.body().len().to_string());
        assert_eq!(
            req.body().as_ref(),
            b"registration_id=APA91b-x&collapse_key=orders&data.message=test&data.sound=test&delay_while_idle=1"
        );
        assert_eq!(req.headers().len(), 3);
    }

    #[test]
    fn omits_delay_while_idle_when_unset() {
        let m = Message::builder("r").collapse_key("k").build().unwrap();
        assert_eq!(
            encode_send_form(&m).as_ref(),
            b"registration_id=r&collapse_key=k"
        );
    }

    #[test]
    fn form_encodes_any_utf8() {
        let m = Message::builder("r")
            .collapse_key("a b&c=d")
            .data("ключ", "é 😀\t\n+%")
            .build()
            .unwrap();
        let body = encode_send_form(&m);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "registration_id=r&collapse_key=a+b%26c%3Dd&data.%D0%BA%D0%BB%D1%8E%D1%87=%C3%A9+%F0%9F%98%80%09%0A%2B%25"
        );
        let form = SendForm::parse(&body);
        assert_eq!(form.collapse_key.as_deref(), Some("a b&c=d"));
        assert_eq!(form.data, vec![("ключ".into(), "é 😀\t\n+%".into())]);
    }

    #[test]
    fn copies_of_a_template_encode_their_own_device_and_the_shared_rest() {
        let template = Message::builder("first")
            .collapse_key("k")
            .data("m", "a&b")
            .delay_while_idle(true)
            .build()
            .unwrap();
        let copy = template.with_registration_id(RegistrationId::new("APA91b+x/y=").unwrap());
        assert_eq!(
            encode_send_form(&copy).as_ref(),
            b"registration_id=APA91b%2Bx%2Fy%3D&collapse_key=k&data.m=a%26b&delay_while_idle=1"
        );
        assert_eq!(
            encode_send_form(&template).as_ref(),
            b"registration_id=first&collapse_key=k&data.m=a%26b&delay_while_idle=1"
        );
    }

    #[test]
    fn row_accepted_with_id() {
        let r = decode(200, &[], "id=0:1326885481081626%900b347100019e5f\n");
        assert_eq!(
            r.result.unwrap().as_str(),
            "0:1326885481081626%900b347100019e5f"
        );
        assert!(r.rotated_token.is_none());
    }

    fn rejected(code: &str) -> ErrorCode {
        match decode(200, &[], &format!("Error={code}")).result {
            Err(Error::Rejected(c)) => c,
            other => panic!("{code}: {other:?}"),
        }
    }

    #[test]
    fn row_quota_exceeded() {
        let c = rejected("QuotaExceeded");
        assert_eq!(c, ErrorCode::QuotaExceeded);
        assert!(c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_device_quota_exceeded() {
        let c = rejected("DeviceQuotaExceeded");
        assert_eq!(c, ErrorCode::DeviceQuotaExceeded);
        assert!(c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_missing_registration() {
        let c = rejected("MissingRegistration");
        assert_eq!(c, ErrorCode::MissingRegistration);
        assert!(!c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_invalid_registration() {
        let c = rejected("InvalidRegistration");
        assert_eq!(c, ErrorCode::InvalidRegistration);
        assert!(!c.is_retryable() && c.should_remove_registration());
    }

    #[test]
    fn row_mismatch_sender_id() {
        let c = rejected("MismatchSenderId");
        assert_eq!(c, ErrorCode::MismatchSenderId);
        assert!(!c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_not_registered() {
        let c = rejected("NotRegistered");
        assert_eq!(c, ErrorCode::NotRegistered);
        assert!(!c.is_retryable() && c.should_remove_registration());
    }

    #[test]
    fn row_message_too_big() {
        let c = rejected("MessageTooBig");
        assert_eq!(c, ErrorCode::MessageTooBig);
        assert!(!c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_missing_collapse_key() {
        let c = rejected("MissingCollapseKey");
        assert_eq!(c, ErrorCode::MissingCollapseKey);
        assert!(!c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_unknown_code_kept_as_text() {
        let c = rejected("SomethingNew");
        assert_eq!(c, ErrorCode::Unknown("SomethingNew".into()));
        assert!(!c.is_retryable() && !c.should_remove_registration());
    }

    #[test]
    fn row_401_unauthorized() {
        let r = decode(401, &[], "<html><body>Unauthorized</body></html>");
        assert!(matches!(r.result, Err(Error::Unauthorized)));
    }

    #[test]
    fn row_503_with_and_without_retry_after() {
        let r = decode(503, &[("retry-after", "30")], "");
        assert!(matches!(
            r.result,
            Err(Error::Unavailable { retry_after: Some(d) }) if d == Duration::from_secs(30)
        ));
        let r = decode(503, &[("retry-after", "Sun, 06 Nov 1994 08:51:37 GMT")], "");
        assert_eq!(
            r.result.unwrap_err().retry_after(),
            Some(Duration::from_secs(120))
        );
        let r = decode(503, &[], "");
        assert!(matches!(
            r.result,
            Err(Error::Unavailable { retry_after: None })
        ));
    }

    #[test]
    fn row_500_and_502_like_503() {
        for status in [500, 502] {
            let r = decode(status, &[("retry-after", "5")], "oops");
            let err = r.result.unwrap_err();
            assert!(matches!(err, Error::ServerError { status: s, .. } if s == status));
            assert!(err.is_retryable());
            assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
        }
    }

    #[test]
    fn row_update_client_auth_on_any_answer() {
        for (status, body) in [
            (200, "id=1"),
            (200, "Error=NotRegistered"),
            (503, ""),
            (401, ""),
        ] {
            let r = decode(status, &[("update-client-auth", "NEWTOKEN")], body);
            assert_eq!(
                r.rotated_token.as_ref().map(|t| t.expose_secret()),
                Some("NEWTOKEN")
            );
        }
        // The answer itself still stands.
        let r = decode(200, &[("Update-Client-Auth", " NEW ")], "id=7");
        assert_eq!(r.result.unwrap().as_str(), "7");
        assert_eq!(r.rotated_token.unwrap().expose_secret(), "NEW");
        // An empty or unusable header is no rotation.
        assert!(
            decode(200, &[("update-client-auth", "")], "id=7")
                .rotated_token
                .is_none()
        );
    }

    #[test]
    fn malformed_200_bodies() {
        for body in ["", "hello", "id=", "id= ", "=x", "foo=bar", "<html>"] {
            let r = decode(200, &[], body);
            let err = r.result.unwrap_err();
            assert!(
                matches!(err, Error::MalformedResponse { status: 200, .. }),
                "{body:?}"
            );
            assert!(err.is_retryable());
        }
        let r = decode_send_response(
            StatusCode::OK,
            &HeaderMap::new(),
            &[0xff, 0xfe, b'='],
            now(),
        );
        assert!(matches!(r.result, Err(Error::MalformedResponse { .. })));
        // Long bodies are cut in the error.
        let long = "x".repeat(10_000);
        match decode(200, &[], &long).result {
            Err(Error::MalformedResponse { body, .. }) => assert_eq!(body.len(), 200),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_error_code_is_an_unknown_code_and_final() {
        let err = decode(200, &[], "Error=\n").result.unwrap_err();
        assert!(matches!(&err, Error::Rejected(ErrorCode::Unknown(code)) if code.is_empty()));
        assert!(!err.is_retryable());
    }

    #[test]
    fn body_is_trimmed_and_split_on_first_equals() {
        let r = decode(200, &[], "  \r\nid=0:1%a=b\r\n");
        assert_eq!(r.result.unwrap().as_str(), "0:1%a=b");
    }

    #[test]
    fn other_statuses_are_unexpected() {
        for status in [400, 403, 404, 301] {
            assert!(matches!(
                decode(status, &[], "").result,
                Err(Error::UnexpectedStatus { status: s }) if s == status
            ));
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("0", now()), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(" 45 ", now()),
            Some(Duration::from_secs(45))
        );
        // A date in the past means "now".
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        // Garbage.
        for bad in ["", "-5", "1.5", "soon", "Sun, 06 Nov 1994", "30s"] {
            assert_eq!(parse_retry_after(bad, now()), None, "{bad:?}");
        }
        // Absurdly large numbers saturate rather than fail.
        assert_eq!(
            parse_retry_after("99999999999999999999999", now()),
            Some(Duration::from_secs(u64::MAX))
        );
    }
}
