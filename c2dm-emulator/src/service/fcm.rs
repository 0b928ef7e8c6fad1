//! FCM HTTP v1 as the emulator speaks it: an OAuth token endpoint for the emulator's own service
//! account, which checks each assertion's signature, issuer, audience, scope and times, and the
//! send endpoint, with Google's JSON errors, the same faults, quotas and device rules as C2DM's,
//! and the same inbox.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use c2dm_core::ErrorCode;
use c2dm_fcm::codec::{self as fcm, MessageName};
use c2dm_fcm::{FCM_SCOPE, JWT_BEARER_GRANT, MAX_PAYLOAD, MAX_TOPIC_PAYLOAD, MAX_TTL};
use http::StatusCode;
use serde_json::{Value, json};

use super::{Fault, SendAnswer, Service};

/// The project the emulator's service account sends for.
pub const PROJECT_ID: &str = "c2dm-emulator";

/// The emulator's service account.
pub const CLIENT_EMAIL: &str = "sender@c2dm-emulator.iam.gserviceaccount.com";

/// The id of the emulator's one key.
pub const KEY_ID: &str = "c2dm-emulator-1";

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/token";

/// The emulator's service account key: a key made for the emulator alone, which nothing but
/// the emulator accepts. Public by design, as the emulator's own static tokens are.
const KEY_PEM: &str = include_str!("../fcm_key.pem");

/// How far an assertion's issue time may be ahead of the emulator's clock.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The service account key file for the emulator whose token endpoint is `token_uri`, as the
/// Google Cloud console writes one.
pub fn key_file(token_uri: &str) -> String {
    let file = json!({
        "type": "service_account",
        "project_id": PROJECT_ID,
        "private_key_id": KEY_ID,
        "private_key": KEY_PEM,
        "client_email": CLIENT_EMAIL,
        "client_id": "100000000000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
    });
    serde_json::to_string_pretty(&file).unwrap_or_default()
}

/// The public half of the emulator's key, to check assertions with.
pub(crate) fn public_key() -> Vec<u8> {
    // The key file's own reader: the key is the one `key_file` hands out.
    c2dm_fcm::ServiceAccountKey::from_json(key_file("https://localhost/token").as_bytes())
        .map(|key| key.public_key_der().to_vec())
        .unwrap_or_default()
}

fn json_answer(status: u16, body: Bytes) -> SendAnswer {
    SendAnswer {
        json: true,
        ..SendAnswer::text(status, body)
    }
}

fn oauth_error(error: &str, description: &str) -> SendAnswer {
    json_answer(
        400,
        Bytes::from(json!({ "error": error, "error_description": description }).to_string()),
    )
}

/// An error answer of the send endpoint: `status`, its google.rpc status, FCM's code, and
/// extra details.
fn rpc_error(
    status: u16,
    rpc: &str,
    code: Option<&str>,
    message: &str,
    details: &[Value],
) -> SendAnswer {
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body: Value = serde_json::from_slice(&fcm::error_body(status_code, rpc, code, message))
        .unwrap_or_default();
    if !details.is_empty() {
        let all = body["error"]["details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        body["error"]["details"] =
            Value::Array(all.into_iter().chain(details.iter().cloned()).collect());
    }
    json_answer(status, Bytes::from(body.to_string()))
}

/// A 400 naming the field of the message that is wrong.
fn bad_field(field: &str, message: &str) -> SendAnswer {
    let violation = json!({
        "@type": fcm::BAD_REQUEST_TYPE,
        "fieldViolations": [{ "field": field, "description": message }],
    });
    rpc_error(400, "INVALID_ARGUMENT", None, message, &[violation])
}

/// Whether `ttl` is a protobuf duration (`3600s`, `1.5s`) within FCM's 28 days.
fn valid_ttl(ttl: &str) -> bool {
    let Some(number) = ttl.strip_suffix('s') else {
        return false;
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 9 {
        return false;
    }
    whole.parse::<u64>().is_ok_and(|secs| {
        Duration::from_secs(secs) <= MAX_TTL
            && !(secs == MAX_TTL.as_secs() && fraction.bytes().any(|b| b != b'0'))
    })
}

/// What a send asked for, read from its JSON: the device (or topic), collapse key and data.
struct Asked {
    target: String,
    topic: bool,
    collapse_key: String,
    data: Vec<(String, String)>,
    validate_only: bool,
}

/// Reads a send's body, or the 400 FCM gives for it.
fn read_message(body: &[u8]) -> Result<Asked, SendAnswer> {
    let json: Value = serde_json::from_slice(body).map_err(|_| {
        rpc_error(
            400,
            "INVALID_ARGUMENT",
            None,
            "Invalid JSON payload received.",
            &[],
        )
    })?;
    let message = json
        .get("message")
        .and_then(Value::as_object)
        .ok_or_else(|| bad_field("message", "The message is missing."))?;
    let targets: Vec<(&str, &str)> = ["token", "topic", "condition"]
        .into_iter()
        .filter_map(|k| Some((k, message.get(k)?.as_str()?)))
        .collect();
    let [(kind, target)] = targets[..] else {
        return Err(bad_field(
            "message",
            "Exactly one of token, topic or condition must be specified.",
        ));
    };
    if target.is_empty() {
        return Err(bad_field(&format!("message.{kind}"), "It is empty."));
    }
    let mut data = Vec::new();
    if let Some(fields) = message.get("data") {
        let fields = fields
            .as_object()
            .ok_or_else(|| bad_field("message.data", "Data must be a map of strings."))?;
        for (i, (key, value)) in fields.iter().enumerate() {
            let value = value.as_str().ok_or_else(|| {
                bad_field(
                    &format!("message.data[{i}].value"),
                    &format!("Invalid value at 'message.data[{i}].value' (TYPE_STRING)"),
                )
            })?;
            if c2dm_fcm::is_reserved(key) {
                return Err(bad_field(
                    &format!("message.data[{i}].key"),
                    &format!("Invalid data key: {key}"),
                ));
            }
            data.push((key.clone(), value.to_owned()));
        }
    }
    let android = message.get("android");
    let text = |field: &str| {
        android
            .and_then(|a| a.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(ttl) = text("ttl")
        && !valid_ttl(&ttl)
    {
        return Err(bad_field("message.android.ttl", "Invalid TTL."));
    }
    let notification_size: usize = message
        .get("notification")
        .and_then(Value::as_object)
        .map_or(0, |n| {
            n.values().filter_map(Value::as_str).map(str::len).sum()
        });
    let size = data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + notification_size;
    let limit = if kind == "topic" {
        MAX_TOPIC_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if size > limit {
        return Err(rpc_error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "Message is too big",
            &[],
        ));
    }
    Ok(Asked {
        target: if kind == "token" {
            target.to_owned()
        } else {
            format!("/{kind}s/{target}")
        },
        topic: kind != "token",
        collapse_key: text("collapse_key").unwrap_or_default(),
        data,
        validate_only: json.get("validate_only").and_then(Value::as_bool) == Some(true),
    })
}

impl Service {
    /// The emulator's wall clock: real time plus what [`Service::advance_clock`] added.
    fn wall_now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_micros(self.clock_offset_micros.load(Ordering::Relaxed))
    }

    /// Answers a token request: the form's assertion, checked, for an access token.
    pub(crate) fn fcm_token(&self, body: &[u8]) -> SendAnswer {
        let c = &self.counters;
        let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let refuse = |error: &str, description: &str| {
            c.fcm_token_refusals.fetch_add(1, Ordering::Relaxed);
            oauth_error(error, description)
        };
        if field("grant_type") != Some(JWT_BEARER_GRANT) {
            return refuse("unsupported_grant_type", "Invalid grant_type.");
        }
        let Some(assertion) = field("assertion") else {
            return refuse("invalid_request", "Missing required parameter: assertion");
        };
        let claims = match c2dm_fcm::verify_assertion(assertion, &self.fcm_public_key) {
            Ok(claims) => claims,
            Err(_) => return refuse("invalid_grant", "Invalid JWT Signature."),
        };
        if claims.iss != CLIENT_EMAIL {
            return refuse(
                "invalid_grant",
                "Invalid JWT: the issuer is not a known service account.",
            );
        }
        let audience_path = claims
            .aud
            .parse::<http::Uri>()
            .map(|uri| uri.path().to_owned())
            .unwrap_or_default();
        if audience_path != TOKEN_PATH {
            return refuse(
                "invalid_grant",
                "Invalid JWT: the audience is not this token endpoint.",
            );
        }
        if !claims.scope.split(' ').any(|s| s == FCM_SCOPE) {
            return refuse(
                "invalid_scope",
                "The scope does not allow sending with FCM.",
            );
        }
        let now = self
            .wall_now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if claims.exp <= claims.iat
            || lifetime > c2dm_fcm::ASSERTION_LIFETIME.as_secs()
            || claims.iat > now + CLOCK_SKEW.as_secs()
            || claims.exp <= now
        {
            return refuse(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
            );
        }
        let token = format!("ya29.{}", self.new_token());
        let lifetime = self.config.fcm_token_lifetime;
        {
            let expires = self.now() + lifetime;
            let mut tokens = self.fcm_tokens.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.now();
            tokens.sweep_if_grown(|_, expires| *expires > now);
            tokens.map.insert(token.clone().into_boxed_str(), expires);
        }
        c.fcm_tokens.fetch_add(1, Ordering::Relaxed);
        json_answer(
            200,
            Bytes::from(
                json!({
                    "access_token": token,
                    // As Google does: a second less than it lives.
                    "expires_in": lifetime.as_secs().saturating_sub(1),
                    "token_type": "Bearer",
                })
                .to_string(),
            ),
        )
    }

    /// Whether `authorization` carries an access token this emulator issued, still valid.
    fn fcm_authorized(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
        else {
            return false;
        };
        let now = self.now();
        self.fcm_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(token)
            .is_some_and(|expires| *expires > now)
    }

    /// Counts a send request that came over HTTP/2.
    pub(crate) fn note_fcm_http2(&self) {
        self.counters.fcm_http2.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers a send of `project`: the faults first, as for C2DM, then the token, the project,
    /// the message, the device's rules and the quotas; an accepted message goes to the inbox.
    pub(crate) fn fcm_send(
        &self,
        project: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> SendAnswer {
        let c = &self.counters;
        let refused = |answer: SendAnswer, code: &str| {
            *c.fcm_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(code.to_owned())
                .or_default() += 1;
            answer
        };
        match self.send_fault() {
            Some(Fault::Drop) => return SendAnswer::dropped(),
            Some(Fault::ServerError) => {
                let message = "Internal error encountered.";
                return rpc_error(500, "INTERNAL", Some("INTERNAL"), message, &[]);
            }
            Some(Fault::Unavailable { .. }) => {
                let message = "The service is currently unavailable.";
                return SendAnswer {
                    retry_after: Some(self.config.retry_after.as_secs().to_string()),
                    ..rpc_error(503, "UNAVAILABLE", Some("UNAVAILABLE"), message, &[])
                };
            }
            None => {}
        }
        if !self.fcm_authorized(authorization) {
            c.unauthorized.fetch_add(1, Ordering::Relaxed);
            return rpc_error(
                401,
                "UNAUTHENTICATED",
                None,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                &[],
            );
        }
        if project != PROJECT_ID {
            return refused(
                rpc_error(
                    403,
                    "PERMISSION_DENIED",
                    None,
                    "Permission 'cloudmessaging.messages.create' denied on resource.",
                    &[],
                ),
                "PERMISSION_DENIED",
            );
        }
        let asked = match read_message(body) {
            Ok(asked) => asked,
            Err(answer) => return refused(answer, "INVALID_ARGUMENT"),
        };
        let id = asked.target.as_str();
        if !asked.topic {
            match self.config.devices.permanent_error(id) {
                Some("NotRegistered") => {
                    return refused(
                        rpc_error(
                            404,
                            "NOT_FOUND",
                            Some("UNREGISTERED"),
                            "Requested entity was not found.",
                            &[],
                        ),
                        "UNREGISTERED",
                    );
                }
                Some("InvalidRegistration") => {
                    return refused(
                        rpc_error(
                            400,
                            "INVALID_ARGUMENT",
                            Some("INVALID_ARGUMENT"),
                            "The registration token is not a valid FCM registration token",
                            &[],
                        ),
                        "INVALID_ARGUMENT",
                    );
                }
                Some(_) => {
                    return refused(
                        rpc_error(
                            403,
                            "PERMISSION_DENIED",
                            Some("SENDER_ID_MISMATCH"),
                            "SenderId mismatch",
                            &[],
                        ),
                        "SENDER_ID_MISMATCH",
                    );
                }
                None => {}
            }
        }
        let quota = |subject: &str| {
            let failure = json!({
                "@type": fcm::QUOTA_FAILURE_TYPE,
                "violations": [{ "subject": subject, "description": "Quota exceeded." }],
            });
            refused(
                SendAnswer {
                    retry_after: Some(self.config.retry_after.as_secs().to_string()),
                    ..rpc_error(
                        429,
                        "RESOURCE_EXHAUSTED",
                        Some("QUOTA_EXCEEDED"),
                        "Quota exceeded.",
                        &[failure],
                    )
                },
                "QUOTA_EXCEEDED",
            )
        };
        if self.config.devices.has_device_quota_prefix(id) {
            let limited = super::Quota {
                limit: u64::from(self.config.device_quota_prefix_sends),
                window: Duration::MAX,
            };
            if self.count_in_window(&self.device_refusals, id.into(), limited) {
                return quota("device message rate");
            }
        }
        // The project's quota is the sender's: one account apart from every C2DM one.
        match self.take_quotas(id, usize::MAX) {
            Err(ErrorCode::DeviceQuotaExceeded) => return quota("device message rate"),
            Err(_) => return quota("project message rate"),
            Ok(()) => {}
        }
        let number = self.message_counter.fetch_add(1, Ordering::Relaxed);
        // The inbox's id of the message, as C2DM's answer gives it: one record for both.
        let id_text = crate::inbox::message_id(number, self.inbox_tag());
        let name = MessageName::parse(&format!("projects/{PROJECT_ID}/messages/{id_text}"))
            .unwrap_or_else(|| unreachable!("a name of this form parses"));
        if !asked.validate_only {
            self.inbox
                .record(id, number, &asked.collapse_key, &asked.data, false);
            c.fcm_accepted.fetch_add(1, Ordering::Relaxed);
        }
        json_answer(200, fcm::accepted_body(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_read_as_protobuf_durations_within_28_days() {
        for ok in [
            "0s",
            "3600s",
            "1.5s",
            "2419200s",
            "2419200.000s",
            "0.000000001s",
        ] {
            assert!(valid_ttl(ok), "{ok}");
        }
        for bad in [
            "",
            "s",
            "3600",
            "-1s",
            "1.s1",
            "2419201s",
            "2419200.1s",
            "1.0000000001s",
            "1e3s",
        ] {
            assert!(!valid_ttl(bad), "{bad}");
        }
    }

    #[test]
    fn the_key_file_reads_back_as_the_emulator_s_service_account() {
        let key =
            c2dm_fcm::ServiceAccountKey::from_json(key_file("http://127.0.0.1:1/token").as_bytes())
                .unwrap();
        assert_eq!(key.project_id(), PROJECT_ID);
        assert_eq!(key.client_email(), CLIENT_EMAIL);
        assert_eq!(key.public_key_der(), public_key());
    }
}
