//! The send endpoint's wire format as pure functions: no I/O, time passed in. The server side
//! (what an emulator answers) is here too, so that both sides read and write one format.

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use c2dm_core::AuthToken;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use serde_json::Value;

use crate::error::{FcmError, MIN_QUOTA_BACKOFF, QuotaScope};
use crate::message::FcmMessage;

/// Google's FCM endpoint, before `/v1/projects/{project_id}/messages:send`.
pub const DEFAULT_BASE_URL: &str = "https://fcm.googleapis.com";

/// The content type of a send request and of every answer.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The `@type` of FCM's own error detail.
pub const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

/// The `@type` of a detail naming the fields a request got wrong.
pub const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";

/// The `@type` of a detail saying which quota ran out.
pub const QUOTA_FAILURE_TYPE: &str = "type.googleapis.com/google.rpc.QuotaFailure";

/// How much of a malformed body an error keeps, in bytes.
const MALFORMED_BODY_KEEP: usize = 200;

/// The name FCM gives an accepted message: `projects/{project_id}/messages/{message_id}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MessageName(String);

impl MessageName {
    /// Checks a name as FCM writes it; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("projects/")?;
        let (project, id) = rest.split_once("/messages/")?;
        let valid = |part: &str| {
            !part.is_empty() && !part.contains('/') && !part.contains(char::is_control)
        };
        (valid(project) && valid(id)).then(|| Self(name.to_owned()))
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The message's id: the name's last part.
    pub fn id(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }
}

impl fmt::Debug for MessageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MessageName").field(&self.0).finish()
    }
}

impl fmt::Display for MessageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A project id that cannot be put in the send URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a project id: {0:?} (letters, digits and hyphens)")]
pub struct InvalidProjectId(pub String);

/// The send URL of `project_id` on `base` (Google's is [`DEFAULT_BASE_URL`]; an emulator's is
/// another): `{base}/v1/projects/{project_id}/messages:send`.
///
/// ```
/// let uri = c2dm_fcm::codec::send_uri(c2dm_fcm::codec::DEFAULT_BASE_URL, "my-app")?;
/// assert_eq!(uri, "https://fcm.googleapis.com/v1/projects/my-app/messages:send");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn send_uri(base: &str, project_id: &str) -> Result<Uri, InvalidProjectId> {
    let valid = !project_id.is_empty()
        && project_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b':' || b == b'.');
    if !valid {
        return Err(InvalidProjectId(project_id.to_owned()));
    }
    format!(
        "{}/v1/projects/{project_id}/messages:send",
        base.trim_end_matches('/')
    )
    .parse()
    .map_err(|_| InvalidProjectId(project_id.to_owned()))
}

/// The project of a send URL's path (`/v1/projects/{project_id}/messages:send`), as the
/// emulator reads it.
pub fn project_of(path: &str) -> Option<&str> {
    let project = path
        .strip_prefix("/v1/projects/")?
        .strip_suffix("/messages:send")?;
    (!project.is_empty() && !project.contains('/')).then_some(project)
}

/// The `Authorization` header of a request with `token`: `Bearer <token>`, marked sensitive
/// so HTTP stacks keep it out of their logs.
pub fn bearer(token: &AuthToken) -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
    value.set_sensitive(true);
    value
}

/// Encodes `message` as the POST the send endpoint `uri` expects, with the access token.
/// `validate_only` asks FCM to check the message and send nothing.
pub fn encode_send_request(
    message: &FcmMessage,
    token: &AuthToken,
    uri: &Uri,
    validate_only: bool,
) -> Request<Bytes> {
    let body = message.to_json(validate_only);
    let length = HeaderValue::from(body.len());
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
    headers.insert(AUTHORIZATION, bearer(token));
    headers.insert(CONTENT_LENGTH, length);
    request
}

/// The start of a body, for an error.
fn start_of(body: &[u8]) -> String {
    let keep = body.len().min(MALFORMED_BODY_KEEP);
    String::from_utf8_lossy(&body[..keep]).into_owned()
}

/// An error answer's parts as google.rpc writes them.
#[derive(Debug, Default)]
struct RpcError {
    status: Option<String>,
    message: String,
    fcm_code: Option<String>,
    fields: Vec<String>,
    quota_subjects: Vec<String>,
}

fn rpc_error(body: &[u8]) -> Option<RpcError> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let error = json.get("error")?.as_object()?;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let mut rpc = RpcError {
        status: text(error.get("status")),
        message: text(error.get("message")).unwrap_or_default(),
        ..RpcError::default()
    };
    for detail in error
        .get("details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match detail.get("@type").and_then(Value::as_str) {
            Some(FCM_ERROR_TYPE) => rpc.fcm_code = text(detail.get("errorCode")),
            Some(BAD_REQUEST_TYPE) => rpc.fields.extend(
                detail
                    .get("fieldViolations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| text(v.get("field"))),
            ),
            Some(QUOTA_FAILURE_TYPE) => rpc.quota_subjects.extend(
                detail
                    .get("violations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .flat_map(|v| [text(v.get("subject")), text(v.get("description"))])
                    .flatten(),
            ),
            _ => {}
        }
    }
    Some(rpc)
}

/// Reads an answer of the send endpoint: the accepted message's name, or the error, typed
/// (see [`FcmError`]). Never panics, whatever the status, headers and body.
///
/// An `INVALID_ARGUMENT` is taken for a bad registration token (remove the device) only when
/// FCM says so: a field violation on `message.token`, or FCM's own error detail with no field
/// named and words about the registration token. Any other is a bad message, which removes
/// nothing.
///
/// ```
/// use std::time::SystemTime;
/// use bytes::Bytes;
/// use c2dm_fcm::codec::decode_send_answer;
/// use c2dm_fcm::FcmError;
///
/// let ok = http::Response::new(Bytes::from_static(br#"{"name": "projects/p/messages/0:1"}"#));
/// assert_eq!(decode_send_answer(&ok, SystemTime::now())?.id(), "0:1");
/// let gone = http::Response::builder().status(404).body(Bytes::from_static(
///     br#"{"error": {"code": 404, "message": "Requested entity was not found.",
///         "status": "NOT_FOUND", "details": [{"@type":
///         "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}"#,
/// ))?;
/// let error = decode_send_answer(&gone, SystemTime::now()).unwrap_err();
/// assert_eq!(error, FcmError::Unregistered);
/// assert!(error.should_remove_registration());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_send_answer(
    response: &Response<Bytes>,
    now: SystemTime,
) -> Result<MessageName, FcmError> {
    let status = response.status();
    let body = response.body();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| c2dm_core::codec::parse_retry_after(v, now));
    let malformed = || FcmError::Malformed {
        status: status.as_u16(),
        body: start_of(body),
    };
    if status == StatusCode::OK {
        let json: Value = serde_json::from_slice(body).map_err(|_| malformed())?;
        let name = json
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(malformed)?;
        return MessageName::parse(name).ok_or_else(malformed);
    }
    let rpc = rpc_error(body);
    let code = rpc
        .as_ref()
        .and_then(|r| r.fcm_code.clone().or_else(|| r.status.clone()));
    let message = rpc.as_ref().map(|r| r.message.clone()).unwrap_or_default();
    let error = match (status.as_u16(), code.as_deref()) {
        (_, Some("UNREGISTERED")) => FcmError::Unregistered,
        (_, Some("SENDER_ID_MISMATCH")) => FcmError::SenderIdMismatch,
        (_, Some("THIRD_PARTY_AUTH_ERROR")) => FcmError::ThirdPartyAuth { message },
        (_, Some("QUOTA_EXCEEDED")) | (429, _) => {
            let device = rpc.as_ref().is_some_and(|r| {
                r.quota_subjects
                    .iter()
                    .chain(std::iter::once(&r.message))
                    .any(|s| s.to_ascii_lowercase().contains("device"))
            });
            FcmError::QuotaExceeded {
                scope: if device {
                    QuotaScope::Device
                } else {
                    QuotaScope::Project
                },
                retry_after: retry_after.unwrap_or_default().max(MIN_QUOTA_BACKOFF),
            }
        }
        (400, _) | (_, Some("INVALID_ARGUMENT")) if rpc.is_some() => {
            let rpc = rpc.unwrap_or_default();
            let about_token = rpc.fields.iter().any(|f| f == "message.token")
                || (rpc.fields.is_empty()
                    && rpc.fcm_code.is_some()
                    && rpc
                        .message
                        .to_ascii_lowercase()
                        .contains("registration token"));
            if about_token {
                FcmError::InvalidToken { message }
            } else {
                FcmError::InvalidMessage {
                    field: rpc.fields.into_iter().next(),
                    message,
                }
            }
        }
        (401, _) => FcmError::Unauthenticated,
        (403, _) if rpc.is_some() => FcmError::PermissionDenied { message },
        (404, _) if rpc.is_some() => FcmError::NotFound { message },
        (503, _) => FcmError::Unavailable { retry_after },
        (500..=599, _) => FcmError::Internal {
            status: status.as_u16(),
            retry_after,
        },
        (_, _) if rpc.is_none() => malformed(),
        (status, _) => FcmError::UnexpectedStatus {
            status,
            status_code: code,
            message,
        },
    };
    Err(error)
}

/// An error answer as FCM writes one, for an emulator: `status` with the google.rpc body of
/// `code` (its HTTP code), `rpc_status` (`NOT_FOUND`, …), FCM's `error_code` detail if given,
/// and `message`.
pub fn error_body(
    status: StatusCode,
    rpc_status: &str,
    error_code: Option<&str>,
    message: &str,
) -> Bytes {
    let mut error = serde_json::json!({
        "code": status.as_u16(),
        "message": message,
        "status": rpc_status,
    });
    if let Some(code) = error_code {
        error["details"] = serde_json::json!([{ "@type": FCM_ERROR_TYPE, "errorCode": code }]);
    }
    Bytes::from(serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default())
}

/// The body of an accepted message, for an emulator.
pub fn accepted_body(name: &MessageName) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({ "name": name.as_str() })).unwrap_or_default(),
    )
}

/// `Retry-After` in whole seconds, as an emulator writes it.
pub fn retry_after_value(after: Duration) -> HeaderValue {
    HeaderValue::from(after.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Disposition;
    use proptest::prelude::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Bytes> {
        let mut builder = Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Bytes::from(body.to_owned())).unwrap()
    }

    fn fcm(status: u16, rpc: &str, code: &str, message: &str) -> String {
        let status = StatusCode::from_u16(status).unwrap();
        String::from_utf8(error_body(status, rpc, Some(code), message).to_vec()).unwrap()
    }

    #[test]
    fn each_documented_error_has_its_disposition() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let bad_field = r#"{"error": {"code": 400, "message": "Invalid value at 'message.data[0].value'",
            "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.data[0].value", "description": "x"}]}]}}"#;
        let bad_token_field = r#"{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.token"}]}]}}"#;
        let device_quota = r#"{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "QUOTA_EXCEEDED"},
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"subject": "device message rate"}]}]}}"#;
        let cases: Vec<(Response<Bytes>, FcmError, Disposition)> = vec![
            (
                answer(404, &[], &fcm(404, "NOT_FOUND", "UNREGISTERED", "gone")),
                FcmError::Unregistered,
                Disposition::RemoveDevice,
            ),
            (
                answer(
                    400,
                    &[],
                    &fcm(
                        400,
                        "INVALID_ARGUMENT",
                        "INVALID_ARGUMENT",
                        "The registration token is not a valid FCM registration token",
                    ),
                ),
                FcmError::InvalidToken {
                    message: "The registration token is not a valid FCM registration token".into(),
                },
                Disposition::RemoveDevice,
            ),
            (
                answer(400, &[], bad_token_field),
                FcmError::InvalidToken {
                    message: "bad".into(),
                },
                Disposition::RemoveDevice,
            ),
            (
                answer(400, &[], bad_field),
                FcmError::InvalidMessage {
                    field: Some("message.data[0].value".into()),
                    message: "Invalid value at 'message.data[0].value'".into(),
                },
                Disposition::Permanent,
            ),
            (
                answer(
                    400,
                    &[],
                    &fcm(
                        400,
                        "INVALID_ARGUMENT",
                        "INVALID_ARGUMENT",
                        "Message is too big",
                    ),
                ),
                FcmError::InvalidMessage {
                    field: None,
                    message: "Message is too big".into(),
                },
                Disposition::Permanent,
            ),
            (
                answer(
                    403,
                    &[],
                    &fcm(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "x"),
                ),
                FcmError::SenderIdMismatch,
                Disposition::Configuration,
            ),
            (
                answer(
                    429,
                    &[("retry-after", "120")],
                    &fcm(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "x"),
                ),
                FcmError::QuotaExceeded {
                    scope: QuotaScope::Project,
                    retry_after: Duration::from_secs(120),
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(429, &[("retry-after", "5")], device_quota),
                FcmError::QuotaExceeded {
                    scope: QuotaScope::Device,
                    retry_after: MIN_QUOTA_BACKOFF,
                },
                Disposition::RetryDevice,
            ),
            (
                answer(
                    503,
                    &[("retry-after", "30")],
                    &fcm(503, "UNAVAILABLE", "UNAVAILABLE", "x"),
                ),
                FcmError::Unavailable {
                    retry_after: Some(Duration::from_secs(30)),
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(500, &[], &fcm(500, "INTERNAL", "INTERNAL", "x")),
                FcmError::Internal {
                    status: 500,
                    retry_after: None,
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(
                    401,
                    &[],
                    &fcm(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR", "apns"),
                ),
                FcmError::ThirdPartyAuth {
                    message: "apns".into(),
                },
                Disposition::Configuration,
            ),
            (
                answer(
                    401,
                    &[],
                    r#"{"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}}"#,
                ),
                FcmError::Unauthenticated,
                Disposition::RenewToken,
            ),
            (
                answer(401, &[], ""),
                FcmError::Unauthenticated,
                Disposition::RenewToken,
            ),
            (
                answer(
                    403,
                    &[],
                    r#"{"error": {"code": 403, "message": "no", "status": "PERMISSION_DENIED"}}"#,
                ),
                FcmError::PermissionDenied {
                    message: "no".into(),
                },
                Disposition::Configuration,
            ),
            (
                answer(
                    404,
                    &[],
                    r#"{"error": {"code": 404, "message": "no project", "status": "NOT_FOUND"}}"#,
                ),
                FcmError::NotFound {
                    message: "no project".into(),
                },
                Disposition::Configuration,
            ),
            (
                answer(502, &[], "<html>bad gateway</html>"),
                FcmError::Internal {
                    status: 502,
                    retry_after: None,
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(200, &[], "{}"),
                FcmError::Malformed {
                    status: 200,
                    body: "{}".into(),
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(200, &[], r#"{"name": "messages/1"}"#),
                FcmError::Malformed {
                    status: 200,
                    body: r#"{"name": "messages/1"}"#.into(),
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(404, &[], "not found"),
                FcmError::Malformed {
                    status: 404,
                    body: "not found".into(),
                },
                Disposition::RetryEveryone,
            ),
            (
                answer(
                    409,
                    &[],
                    r#"{"error": {"code": 409, "message": "x", "status": "ABORTED"}}"#,
                ),
                FcmError::UnexpectedStatus {
                    status: 409,
                    status_code: Some("ABORTED".into()),
                    message: "x".into(),
                },
                Disposition::Permanent,
            ),
        ];
        for (response, error, disposition) in cases {
            let decoded = decode_send_answer(&response, now);
            assert_eq!(decoded.as_ref(), Err(&error), "{response:?}");
            assert_eq!(error.disposition(), disposition, "{error:?}");
            // Every error reads as words, with its code.
            assert!(!error.to_string().is_empty());
            assert!(!error.code().is_empty());
        }
    }

    #[test]
    fn an_accepted_answer_gives_the_message_name() {
        let name = MessageName::parse("projects/p-1/messages/0:1500415314455276%31bd1c9631bd1c96")
            .unwrap();
        let response = answer(
            200,
            &[],
            std::str::from_utf8(&accepted_body(&name)).unwrap(),
        );
        let decoded = decode_send_answer(&response, SystemTime::now()).unwrap();
        assert_eq!(decoded, name);
        assert_eq!(decoded.id(), "0:1500415314455276%31bd1c9631bd1c96");
        for bad in [
            "",
            "projects/",
            "projects/p/messages/",
            "projects//messages/1",
            "x/p/messages/1",
            "projects/p/messages/a/b",
        ] {
            assert_eq!(MessageName::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_send_request_carries_the_message_and_a_sensitive_bearer() {
        let message = FcmMessage::builder()
            .token("t")
            .data("k", "v")
            .build()
            .unwrap();
        let token = AuthToken::new("ya29.secret").unwrap();
        let uri = send_uri("http://127.0.0.1:9/", "proj").unwrap();
        assert_eq!(uri, "http://127.0.0.1:9/v1/projects/proj/messages:send");
        assert_eq!(project_of(uri.path()), Some("proj"));
        let request = encode_send_request(&message, &token, &uri, false);
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.headers()[CONTENT_TYPE], JSON_CONTENT_TYPE);
        let auth = &request.headers()[AUTHORIZATION];
        assert_eq!(auth, "Bearer ya29.secret");
        assert!(auth.is_sensitive());
        assert!(!format!("{:?}", request.headers()).contains("secret"));
        assert_eq!(request.body(), &message.to_json(false));
        for bad in ["", "a/b", "a b", "é"] {
            assert!(send_uri(DEFAULT_BASE_URL, bad).is_err(), "{bad:?}");
        }
        assert_eq!(project_of("/v1/projects//messages:send"), None);
        assert_eq!(project_of("/v1/projects/a/b/messages:send"), None);
    }

    proptest! {
        #[test]
        fn decoding_any_answer_never_panics(
            status in 100u16..1000,
            retry_after in proptest::option::of(".{0,20}"),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let Ok(status) = StatusCode::from_u16(status) else { return Ok(()) };
            let mut builder = Response::builder().status(status);
            if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                builder = builder.header(RETRY_AFTER, value);
            }
            let response = builder.body(Bytes::from(body)).unwrap();
            if let Err(error) = decode_send_answer(&response, SystemTime::UNIX_EPOCH) {
                let _ = (error.to_string(), error.disposition(), error.code(), error.retry_after());
            }
        }

        #[test]
        fn what_the_server_side_writes_reads_back(
            code in prop::sample::select(vec!["UNREGISTERED", "SENDER_ID_MISMATCH", "QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL", "THIRD_PARTY_AUTH_ERROR"]),
            message in "[ -~]{0,40}",
        ) {
            let (status, rpc) = match code {
                "UNREGISTERED" => (404, "NOT_FOUND"),
                "SENDER_ID_MISMATCH" => (403, "PERMISSION_DENIED"),
                "QUOTA_EXCEEDED" => (429, "RESOURCE_EXHAUSTED"),
                "UNAVAILABLE" => (503, "UNAVAILABLE"),
                "INTERNAL" => (500, "INTERNAL"),
                _ => (401, "UNAUTHENTICATED"),
            };
            let response = answer(status, &[], &fcm(status, rpc, code, &message));
            let error = decode_send_answer(&response, SystemTime::UNIX_EPOCH).unwrap_err();
            prop_assert_eq!(error.code(), code);
        }
    }
}
