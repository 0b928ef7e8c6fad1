//! The server side of the send endpoint's wire format: how the service (the emulator, a test
//! fake) reads a request and writes its answer. Pure functions, like the client side.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::error::ErrorCode;
use crate::token::AuthToken;

pub use crate::token::AUTH_SCHEME;

/// The body of a 401, as the service wrote it (HTML).
pub const UNAUTHORIZED_BODY: &str = "<HTML>\n<HEAD>\n<TITLE>Unauthorized</TITLE>\n</HEAD>\n<BODY>\n<H1>Unauthorized</H1>\n<H2>Error 401</H2>\n</BODY>\n</HTML>\n";

/// The fields of a send request's form body, read as the service reads them.
///
/// Unlike [`Message`](crate::Message), nothing is validated: a missing field stays `None`, so a server (the
/// emulator) can answer `MissingRegistration` or `MissingCollapseKey`, and a test fake can show
/// exactly what was sent. Unknown fields are ignored, as the service ignores them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendForm {
    /// `registration_id`, if present.
    pub registration_id: Option<String>,
    /// `collapse_key`, if present.
    pub collapse_key: Option<String>,
    /// The `data.<key>` pairs in order, keys without the prefix.
    pub data: Vec<(String, String)>,
    /// `delay_while_idle`, read as C2DM read it, a presence flag: present with any value but
    /// `0` or `false` (in any case) sets it, so `1`, `true`, `True` (Python's encoding of the
    /// boolean) and the empty value all do.
    pub delay_while_idle: bool,
    /// Fields that were ignored: unknown names, and `data.` with an empty key.
    pub ignored_fields: usize,
}

/// Whether a `delay_while_idle` value sets the flag: anything but `0` or `false`, in any case.
fn is_set(value: &str) -> bool {
    !(value == "0" || value.eq_ignore_ascii_case("false"))
}

impl SendForm {
    /// Parses a form body. Never fails: bad percent-encoding decodes lossily, as servers do.
    ///
    /// ```
    /// use c2dm_core::codec::SendForm;
    /// let form = SendForm::parse(b"registration_id=r&data.a=1&delay_while_idle=true");
    /// assert_eq!(form.registration_id.as_deref(), Some("r"));
    /// assert_eq!(form.collapse_key, None);
    /// assert_eq!(form.data, vec![("a".to_string(), "1".to_string())]);
    /// assert!(form.delay_while_idle);
    /// ```
    pub fn parse(body: &[u8]) -> Self {
        let mut form = Self::default();
        for (key, value) in form_urlencoded::parse(body) {
            match &*key {
                "registration_id" => form.registration_id = Some(value.into_owned()),
                "collapse_key" => form.collapse_key = Some(value.into_owned()),
                "delay_while_idle" => form.delay_while_idle = is_set(&value),
                k => match k.strip_prefix("data.") {
                    // `data.` alone names no key: ignored like any unknown field, so it is
                    // neither delivered nor counted (the client refuses to build one).
                    Some("") => form.ignored_fields += 1,
                    Some(data_key) => form.data.push((data_key.to_owned(), value.into_owned())),
                    None => form.ignored_fields += 1,
                },
            }
        }
        form
    }

    /// The payload size as the limit counts it.
    pub fn payload_size(&self) -> usize {
        crate::message::payload_size(self.data.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// Reads the token out of an `Authorization: GoogleLogin auth=<token>` header, if well formed.
pub fn auth_token_of(headers: &HeaderMap) -> Option<AuthToken> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix(AUTH_SCHEME)?;
    AuthToken::new(token).ok()
}

/// The body of an accepted message's answer: `id=<message id>`.
pub fn accepted_body(message_id: &str) -> String {
    format!("id={message_id}")
}

/// The body of a refusal: `Error=<code>`.
pub fn rejected_body(code: &ErrorCode) -> String {
    format!("Error={code}")
}

/// An answer of the send endpoint as the service wrote it: `text/plain`, with `Retry-After`
/// and `Update-Client-Auth` when given (values that cannot be header values are left out).
///
/// ```
/// use c2dm_core::codec::{self, decode_response};
/// use c2dm_core::{AuthToken, ErrorCode};
/// let rotated = AuthToken::new("new-token")?;
/// let answer = codec::encode_send_answer(
///     200,
///     codec::rejected_body(&ErrorCode::NotRegistered),
///     None,
///     Some(&rotated),
/// );
/// let reply = decode_response(&answer, std::time::SystemTime::now());
/// assert_eq!(reply.rotated_token, Some(rotated));
/// assert!(reply.result.unwrap_err().should_remove_registration());
/// # Ok::<(), c2dm_core::InvalidToken>(())
/// ```
pub fn encode_send_answer(
    status: u16,
    body: impl Into<Bytes>,
    retry_after: Option<&str>,
    rotated_token: Option<&AuthToken>,
) -> Response<Bytes> {
    let mut response = Response::new(body.into());
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        headers.insert(RETRY_AFTER, value);
    }
    if let Some(value) = rotated_token.and_then(|t| HeaderValue::from_str(t.expose_secret()).ok()) {
        headers.insert(super::UPDATE_CLIENT_AUTH, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{default_send_uri, encode_send_request};
    use crate::message::Message;

    fn token() -> AuthToken {
        AuthToken::new("tok").unwrap()
    }

    #[test]
    fn parses_delay_while_idle_as_the_emulator_decides() {
        for (body, set) in [
            ("delay_while_idle=1", true),
            ("delay_while_idle=true", true),
            ("delay_while_idle=", true),
            ("delay_while_idle", true),
            ("delay_while_idle=True", true),
            ("delay_while_idle=yes", true),
            ("delay_while_idle=0", false),
            ("delay_while_idle=false", false),
            ("delay_while_idle=FALSE", false),
            ("delay_while_idle=False", false),
            ("", false),
        ] {
            assert_eq!(
                SendForm::parse(body.as_bytes()).delay_while_idle,
                set,
                "{body}"
            );
        }
    }

    /// The original article's Python sender, byte for byte: `urllib.urlencode` of its dict,
    /// with the boolean `True` for `delay_while_idle`.
    #[test]
    fn reads_the_original_python_senders_body() {
        let body = b"registration_id=APA91bH-device&collapse_key=score&data.message=Hello+World&delay_while_idle=True";
        let form = SendForm::parse(body);
        assert!(form.delay_while_idle);
        assert_eq!(form.registration_id.as_deref(), Some("APA91bH-device"));
        assert_eq!(
            form.data,
            vec![("message".to_string(), "Hello World".to_string())]
        );
    }

    #[test]
    fn an_empty_data_key_is_ignored_not_delivered() {
        let form = SendForm::parse(b"registration_id=r&collapse_key=k&data.=x&data.a=1&other=2");
        assert_eq!(form.data, vec![("a".to_string(), "1".to_string())]);
        assert_eq!(form.ignored_fields, 2);
        assert_eq!(form.payload_size(), 2);
    }

    #[test]
    fn reads_the_auth_header_back() {
        let m = Message::builder("r").collapse_key("k").build().unwrap();
        let req = encode_send_request(&m, &token(), &default_send_uri());
        assert_eq!(auth_token_of(req.headers()), Some(token()));
        assert_eq!(auth_token_of(&HeaderMap::new()), None);
    }

    // One test per row of the protocol's response table.

    #[test]
    fn answers_decode_back_as_written() {
        use crate::codec::decode_response;
        use crate::error::Error;
        let now = std::time::SystemTime::now();
        let ok = encode_send_answer(200, accepted_body("0:1%x"), None, None);
        assert_eq!(decode_response(&ok, now).result.unwrap().as_str(), "0:1%x");
        let busy = encode_send_answer(503, "", Some("30"), None);
        assert!(matches!(
            decode_response(&busy, now).result,
            Err(Error::Unavailable { retry_after: Some(d) }) if d.as_secs() == 30
        ));
        let refused = encode_send_answer(401, UNAUTHORIZED_BODY, None, None);
        assert!(matches!(
            decode_response(&refused, now).result,
            Err(Error::Unauthorized)
        ));
    }
}
