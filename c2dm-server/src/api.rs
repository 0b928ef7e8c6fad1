//! The HTTP API: JSON in and out, keys in `Authorization: Bearer`, errors as
//! `{"error": {"code", "message", "field"}}`, never a 500 for bad input.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::health::WorkerHealth;
use crate::store::{
    Audience, Counts, DeliveryRow, Device, DeviceCounts, DeviceFilter, DeviceState, MessageRecord,
    MessageState, NewDevice, NewMessage, Store, Upserted,
};

/// The largest request body taken, in bytes (a larger one is refused with 413): room for a
/// push listing its most registration ids.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The most devices one page lists.
pub const MAX_PAGE: u32 = 1000;

/// The longest a request may take, body read and answer written, before it is answered 503
/// `timeout` (a status request's `wait` comes on top). A transaction the request had under way
/// is rolled back.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A key that authorises requests. Compared in constant time; its `Debug` never shows it.
#[derive(Clone)]
pub struct Key(Arc<str>);

/// Why a key, or a pair of keys, is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key has characters a header cannot carry, or none at all.
    #[error("a key must be visible ASCII")]
    NotVisibleAscii,
    /// The key is shorter than [`MIN_KEY_LEN`] bytes: guessable.
    #[error(
        "a key must be at least {MIN_KEY_LEN} characters long (openssl rand -hex 16 makes one)"
    )]
    TooShort,
    /// The admin token and the device key are the same: every app would hold the admin token.
    #[error("the admin token and the device key must differ: every app holds the device key")]
    Same,
}

/// The shortest key taken, in bytes.
pub const MIN_KEY_LEN: usize = 16;

impl Key {
    /// Wraps a key: at least [`MIN_KEY_LEN`] characters of visible ASCII (it travels in a
    /// header), white space around it trimmed.
    ///
    /// ```
    /// use c2dm_server::api::{InvalidKey, Key};
    /// assert!(Key::new("0123456789abcdef").is_ok());
    /// assert_eq!(Key::new("short").unwrap_err(), InvalidKey::TooShort);
    /// assert_eq!(Key::new("has a space in it").unwrap_err(), InvalidKey::NotVisibleAscii);
    /// ```
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidKey> {
        let key = key.as_ref().trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidKey::NotVisibleAscii);
        }
        if key.len() < MIN_KEY_LEN {
            return Err(InvalidKey::TooShort);
        }
        Ok(Self(key.into()))
    }

    /// Whether `given` is this key, in time that does not depend on where they differ.
    fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        let mut differ = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            differ |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        differ == 0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// The two keys: the admin token (every route) and the device key (the device routes only),
/// never the same.
#[derive(Debug, Clone)]
pub struct Keys {
    admin: Key,
    device: Key,
}

impl Keys {
    /// The admin token, which lets operators list devices and send pushes, and the device
    /// key, which lets apps register and unregister their devices; refused if they are the
    /// same (every app ships the device key).
    ///
    /// ```
    /// use c2dm_server::api::{InvalidKey, Key, Keys};
    /// let admin = Key::new("admin-token-0123456789")?;
    /// let device = Key::new("device-key-0123456789")?;
    /// assert!(Keys::new(admin.clone(), device).is_ok());
    /// assert_eq!(Keys::new(admin.clone(), admin).unwrap_err(), InvalidKey::Same);
    /// # Ok::<(), InvalidKey>(())
    /// ```
    pub fn new(admin: Key, device: Key) -> Result<Self, InvalidKey> {
        if admin.0 == device.0 {
            return Err(InvalidKey::Same);
        }
        Ok(Self { admin, device })
    }
}

#[derive(Clone)]
struct AppState {
    store: Arc<dyn Store>,
    keys: Keys,
}

/// The API over `store`, authorised by `keys`.
///
/// | method and path | key | what |
/// |---|---|---|
/// | `POST /v1/devices` | device or admin | register (201) or update (200) a device |
/// | `DELETE /v1/devices/{registration_id}` | device or admin | the app unregisters it (200, or 404) |
/// | `GET /v1/devices?state=&user_id=&tag=&after=&limit=` | admin | a page of devices and the `next` cursor |
/// | `GET /v1/devices/{registration_id}` | admin | one device |
/// | `GET /v1/devices/{registration_id}/deliveries?after=&limit=` | admin | the device's history: its row of each push, newest first |
/// | `GET /v1/device-counts?user_id=&tag=` | admin | how many devices are active, unregistered and gone |
/// | `POST /v1/messages` | admin | a push to ids, a user, a tag or `"all"`, with an optional `Idempotency-Key` header: 202 `{id, state}` (200 for a replayed key) |
/// | `GET /v1/messages?after=&limit=` | admin | the pushes, newest first, each with its tally by outcome |
/// | `GET /v1/messages/{id}` | admin | its state and counts per outcome |
/// | `GET /v1/messages/{id}/deliveries?outcome=&error=&after=&limit=` | admin | a page of its rows, one per device |
/// | `POST /v1/messages/{id}/cancel` | admin | batches not started are not sent, batches under way stop; every device still gets a row |
/// | `GET /healthz` | none | 200 when the database answers, else 503 |
/// | `GET /metrics` | admin | Prometheus text: registrations, pushes, batches, deliveries by outcome, gone devices, queue depth, pauses, deferred devices, logins |
/// | `GET /openapi.json` | none | this API's OpenAPI 3.1 document ([`openapi`]) |
/// | `GET /` | none | the operator's console ([`crate::console`]), which asks for the admin token |
///
/// A push is stored with its job, in one transaction, before the answer; workers
/// ([`run_workers`](crate::jobs::run_workers)) do the sending.
pub fn router(store: Arc<dyn Store>, keys: Keys) -> Router {
    install_metrics();
    // A status request may wait for its push to finish: its bound is longer by that wait.
    let waiting = with_timeout(
        Router::new().route("/v1/messages/{id}", get(status)),
        REQUEST_TIMEOUT + Duration::from_secs(MAX_WAIT),
    );
    let quick = with_timeout(
        Router::new()
            .route("/v1/devices", post(register).get(list))
            .route(
                "/v1/devices/{registration_id}",
                delete(unregister).get(device),
            )
            .route(
                "/v1/devices/{registration_id}/deliveries",
                get(device_history),
            )
            .route("/v1/device-counts", get(device_counts))
            .route("/v1/messages", post(push).get(messages))
            .route("/v1/messages/{id}/deliveries", get(deliveries))
            .route("/v1/messages/{id}/cancel", post(cancel))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics_text))
            .route("/openapi.json", get(openapi_json)),
        REQUEST_TIMEOUT,
    );
    quick
        .merge(waiting)
        .merge(crate::console::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(AppState { store, keys })
}

/// `router`'s routes, each request answered 503 `timeout` if it takes longer than `limit`.
fn with_timeout<S: Clone + Send + Sync + 'static>(router: Router<S>, limit: Duration) -> Router<S> {
    router.layer(middleware::from_fn(
        move |request: Request, next: Next| async move {
            match tokio::time::timeout(limit, next.run(request)).await {
                Ok(response) => response,
                Err(_) => {
                    tracing::warn!(?limit, "a request took too long: answered 503");
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        format!(
                            "the request took longer than {} s; try again (a push with its Idempotency-Key is never made twice)",
                            limit.as_secs()
                        ),
                    )
                    .into_response()
                }
            }
        },
    ))
}

/// What a request gets when it cannot be served.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A field of the request that is not acceptable (422).
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
    }

    /// A query parameter that is not acceptable (400).
    fn query(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_query", message)
        }
    }

    fn internal(err: impl fmt::Display) -> Self {
        tracing::error!(%err, "the request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server could not complete the request",
        )
    }
}

/// An error's answer: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorDetail {
    /// A stable word to act on: `unauthorized`, `forbidden`, `not_found`, `malformed_body`,
    /// `invalid_body`, `invalid_field`, `invalid_query`, `invalid_header`, `body_too_large`,
    /// `idempotency_key_reused`, `already_finished`, `timeout`, `internal`.
    code: &'static str,
    /// For people: what was wrong, and what to do.
    message: String,
    /// The field, query parameter or header at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

/// What every route that takes a key may answer besides its own answers.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
enum KeyErrors {
    /// No key, or a wrong one (`unauthorized`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The database failed (`internal`; logged, and the answer says nothing of it).
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The request took too long (`timeout`); what it had under way is rolled back.
    #[response(status = 503)]
    Timeout(ErrorBody),
}

/// What an admin route answers the device key.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
enum AdminErrors {
    /// The device key on an admin route (`forbidden`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// What a route with path or query parameters answers a bad one.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
enum ParamErrors {
    /// A query parameter is not acceptable (`invalid_query`, `field` says which), or the path
    /// is not UTF-8 (`invalid_path`).
    #[response(status = 400)]
    BadParameter(ErrorBody),
}

/// What a route that takes a JSON body answers a bad one.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
enum BodyErrors {
    /// The body is not JSON (`malformed_body`), or a push's `Idempotency-Key` is not
    /// acceptable (`invalid_header`).
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// The body is over 2 MiB (`body_too_large`).
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// A field is missing, unknown, of the wrong type (`invalid_body`), or breaks a rule
    /// (`invalid_field`, `field` says which).
    #[response(status = 422)]
    Invalid(ErrorBody),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        Self::internal(err)
    }
}

/// A JSON body, its rejections answered as [`ApiError`]s (400 malformed, 413 too large, 422
/// a field of the wrong type).
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let text = rejection.body_text();
    match rejection {
        JsonRejection::JsonDataError(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", text)
        }
        _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over {BODY_LIMIT} bytes"),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "the body must be JSON (Content-Type: application/json)",
        ),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", text),
    }
}

/// Query parameters, their rejections answered as 400.
struct QueryParams<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        rejection.body_text(),
    )
}

/// A path parameter, its rejection (bytes that are not UTF-8) answered as an [`ApiError`].
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                rejection.body_text(),
            )),
        }
    }
}

/// A push's `Idempotency-Key` header, if it has one: visible text of at most 256 characters,
/// else 400 `invalid_header`.
struct IdempotencyKey(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(Self(None));
        };
        value
            .to_str()
            .ok()
            .and_then(|v| {
                text_field("Idempotency-Key", Some(v.to_owned()))
                    .ok()
                    .flatten()
            })
            .map(|key| Self(Some(key)))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    "Idempotency-Key is visible text of at most 256 characters",
                )
            })
    }
}

/// Which key a request carries: the admin token, the device key, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Admin,
    Device,
}

impl Caller {
    /// The request's key, checked against both keys (in time that does not tell which one
    /// it was): 401 for none or a wrong one.
    fn of(parts: &Parts, keys: &Keys) -> Result<Self, ApiError> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid key is required: Authorization: Bearer <key>",
            )
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(unauthorized)?;
        let admin = keys.admin.matches(given);
        let device = keys.device.matches(given);
        match (admin, device) {
            (true, _) => Ok(Self::Admin),
            (false, true) => Ok(Self::Device),
            (false, false) => Err(unauthorized()),
        }
    }
}

/// The credentials of an `Authorization: Bearer <key>` value. The scheme's name is matched
/// without regard to case, as every scheme's is (RFC 9110, section 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(credentials.trim())
}

/// A handler's permission: the request carries the admin token. The device key is refused
/// 403, no key or a wrong one 401; either before the body is read, so a handler that takes
/// `Admin` cannot run for anyone else, whatever it is sent.
struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match Caller::of(parts, &state.keys)? {
            Caller::Admin => Ok(Self),
            Caller::Device => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this route needs the admin token, not the device key",
            )),
        }
    }
}

/// A handler's permission: the request carries either key (no key or a wrong one: 401,
/// before the body is read).
struct AnyKey;

impl FromRequestParts<AppState> for AnyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::of(parts, &state.keys).map(|_| Self)
    }
}

/// `POST /v1/devices`: a device registers (or registers again). A field left out keeps what is
/// stored (a new device has none); `null` (or `[]` for `tags`) clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Registration {
    /// The id C2DM gave the app: at most 4,096 bytes, no white space, control or format
    /// characters.
    #[schema(schema_with = registration_id_schema)]
    registration_id: String,
    /// The app's own name for the device; left out, kept; `null`, cleared.
    #[serde(default, deserialize_with = "present")]
    #[schema(
        value_type = Option<String>,
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    device_id: Option<Option<String>>,
    /// Whom the device belongs to (pushes can go to every device of a user); left out, kept;
    /// `null`, cleared.
    #[serde(default, deserialize_with = "present")]
    #[schema(
        value_type = Option<String>,
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    user_id: Option<Option<String>>,
    /// Labels (pushes can go to every device with a tag), at most 32: they replace the stored
    /// ones; left out, kept; `null` or `[]`, cleared.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<Tag>>, max_items = 32, inline)]
    tags: Option<Option<Vec<Tag>>>,
    /// The app's version; left out, kept; `null`, cleared.
    #[serde(default, deserialize_with = "present")]
    #[schema(
        value_type = Option<String>,
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    app_version: Option<Option<String>>,
}

/// A field that is present (`Some`, holding `None` for `null`); with `#[serde(default)]`, a
/// field left out is `None`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// What the OpenAPI document says a registration id is: what
/// [`c2dm_core::RegistrationId::new`] takes, but for its bound in bytes (the document's
/// `maxLength` counts characters). The format characters (Unicode `Cf`) are written out, those
/// past the BMP as themselves: the pattern dialects that read the document know no `\p{Cf}`.
const REGISTRATION_ID_PATTERN: &str = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890\\u0891\\u08e2\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb\u{110BD}\u{110CD}\u{13430}-\u{1343F}\u{1BCA0}-\u{1BCA3}\u{1D173}-\u{1D17A}\u{E0001}\u{E0020}-\u{E007F}]+$";

/// A tag: non-empty, at most 256 characters, no control characters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]+$")]
struct Tag(String);

/// The longest text field taken (ids, versions, tags), in characters.
const MAX_TEXT: usize = 256;
/// The most tags a device may have.
const MAX_TAGS: usize = 32;

fn text_field(field: &'static str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::field(field, format!("{field} is empty"))),
        Some(v) if v.chars().count() > MAX_TEXT => Err(ApiError::field(
            field,
            format!("{field} is over {MAX_TEXT} characters"),
        )),
        Some(v) if v.chars().any(char::is_control) => Err(ApiError::field(
            field,
            format!("{field} has control characters"),
        )),
        other => Ok(other),
    }
}

impl Registration {
    /// Every rule, before anything is stored.
    fn check(self) -> Result<NewDevice, ApiError> {
        let id = c2dm_core::RegistrationId::new(&self.registration_id)
            .map_err(|e| ApiError::field("registration_id", e.to_string()))?;
        let tags = match self.tags {
            None => None,
            Some(given) => {
                let given = given.unwrap_or_default();
                if given.len() > MAX_TAGS {
                    return Err(ApiError::field("tags", format!("at most {MAX_TAGS} tags")));
                }
                let mut tags = Vec::with_capacity(given.len());
                for Tag(tag) in given {
                    tags.extend(text_field("tags", Some(tag))?);
                }
                tags.sort();
                tags.dedup();
                Some(tags)
            }
        };
        let given =
            |field, value: Option<Option<String>>| value.map(|v| text_field(field, v)).transpose();
        Ok(NewDevice {
            registration_id: id.as_str().to_owned(),
            device_id: given("device_id", self.device_id)?,
            user_id: given("user_id", self.user_id)?,
            tags,
            app_version: given("app_version", self.app_version)?,
        })
    }
}

/// A device as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
struct DeviceView {
    /// Its registration id.
    registration_id: String,
    /// The app's own name for it.
    device_id: Option<String>,
    /// Whom it belongs to.
    user_id: Option<String>,
    /// Its tags, sorted.
    tags: Vec<String>,
    /// The app's version.
    app_version: Option<String>,
    /// Whether pushes go to it.
    state: DeviceState,
    /// Why it is gone: the C2DM code (`NotRegistered`, `InvalidRegistration`).
    reason: Option<String>,
    /// When it first registered (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// When it last registered or changed.
    #[schema(format = DateTime)]
    updated_at: String,
    /// When its state last changed.
    #[schema(format = DateTime)]
    state_changed_at: String,
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

impl From<Device> for DeviceView {
    fn from(d: Device) -> Self {
        Self {
            registration_id: d.registration_id,
            device_id: d.device_id,
            user_id: d.user_id,
            tags: d.tags,
            app_version: d.app_version,
            state: d.state,
            reason: d.reason,
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            state_changed_at: rfc3339(d.state_changed_at),
        }
    }
}

/// Registers a device, or updates a known one and makes it active again.
#[utoipa::path(
    post, path = "/v1/devices", tag = "devices",
    security(("device_key" = []), ("admin_token" = [])),
    request_body = Registration,
    responses(
        (status = 201, description = "a new device", body = DeviceView),
        (status = 200, description = "a known device, updated and active again", body = DeviceView),
        BodyErrors,
        KeyErrors,
    )
)]
async fn register(
    State(state): State<AppState>,
    _: AnyKey,
    JsonBody(registration): JsonBody<Registration>,
) -> Result<(StatusCode, Json<DeviceView>), ApiError> {
    let device = registration.check()?;
    let (upserted, stored) = state.store.upsert_device(&device).await?;
    let (status, result) = match upserted {
        Upserted::Created => (StatusCode::CREATED, "created"),
        Upserted::Updated => (StatusCode::OK, "updated"),
    };
    metrics::counter!("c2dm_registrations_total", "result" => result).increment(1);
    tracing::debug!(?upserted, "device registered");
    Ok((status, Json(stored.into())))
}

fn no_such_device() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no device has this registration id",
    )
}

/// The app unregisters its device: pushes no longer go to it.
#[utoipa::path(
    delete, path = "/v1/devices/{registration_id}", tag = "devices",
    security(("device_key" = []), ("admin_token" = [])),
    params(("registration_id" = String, Path, description = "the device's registration id")),
    responses(
        (status = 200, description = "the device, now unregistered", body = DeviceView),
        (status = 404, description = "no device has this id", body = ErrorBody),
        ParamErrors,
        KeyErrors,
    )
)]
async fn unregister(
    State(state): State<AppState>,
    _: AnyKey,
    PathParam(registration_id): PathParam,
) -> Result<Json<DeviceView>, ApiError> {
    match state.store.unregister_device(&registration_id).await? {
        Some(device) => Ok(Json(device.into())),
        None => Err(no_such_device()),
    }
}

/// One device.
#[utoipa::path(
    get, path = "/v1/devices/{registration_id}", tag = "devices",
    security(("admin_token" = [])),
    params(("registration_id" = String, Path, description = "the device's registration id")),
    responses(
        (status = 200, description = "the device", body = DeviceView),
        (status = 404, description = "no device has this id", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn device(
    State(state): State<AppState>,
    _: Admin,
    PathParam(registration_id): PathParam,
) -> Result<Json<DeviceView>, ApiError> {
    match state.store.device(&registration_id).await? {
        Some(device) => Ok(Json(device.into())),
        None => Err(no_such_device()),
    }
}

/// `GET /v1/devices` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only devices in this state.
    #[param(value_type = Option<DeviceState>)]
    state: Option<String>,
    /// Only this user's devices.
    user_id: Option<String>,
    /// Only devices with this tag.
    tag: Option<String>,
    /// Where this page starts: an earlier page's `next`.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    after: Option<String>,
    /// How many devices at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
struct DevicePage {
    /// The devices, in the order they first registered.
    devices: Vec<DeviceView>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
}

/// A numeric cursor from an earlier page's `next`: digits only.
fn cursor(text: Option<&str>) -> Result<Option<i64>, ApiError> {
    text.map(|cursor| {
        Some(cursor)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse::<i64>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ApiError::query("after", "after is a cursor from an earlier page's next")
            })
    })
    .transpose()
}

/// A page size: 1 to 1000, 100 if not given.
fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::query("limit", "limit is between 1 and 1000"))
    }
}

/// A page of devices, in the order they first registered.
#[utoipa::path(
    get, path = "/v1/devices", tag = "devices",
    security(("admin_token" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "a page of devices", body = DevicePage),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn list(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<DevicePage>, ApiError> {
    let filter = DeviceFilter {
        state: query
            .state
            .as_deref()
            .map(|s| {
                DeviceState::parse(s).ok_or_else(|| {
                    ApiError::query("state", "state is one of active, unregistered, gone")
                })
            })
            .transpose()?,
        user_id: query.user_id,
        tag: query.tag,
    };
    let after = cursor(query.after.as_deref())?;
    let limit = page_limit(query.limit)?;
    let page = state.store.list_devices(&filter, after, limit).await?;
    Ok(Json(DevicePage {
        devices: page.items.into_iter().map(DeviceView::from).collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

/// `GET /v1/device-counts` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CountsQuery {
    /// Only this user's devices.
    user_id: Option<String>,
    /// Only devices with this tag.
    tag: Option<String>,
}

/// How many devices are in each state: all of them, a user's or a tag's (the `active` figure
/// is the size of a push to them).
#[utoipa::path(
    get, path = "/v1/device-counts", tag = "devices",
    security(("admin_token" = [])),
    params(CountsQuery),
    responses(
        (status = 200, description = "the counts", body = DeviceCounts),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn device_counts(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams<CountsQuery>,
) -> Result<Json<DeviceCounts>, ApiError> {
    let filter = DeviceFilter {
        state: None,
        user_id: query.user_id,
        tag: query.tag,
    };
    Ok(Json(state.store.device_counts(&filter).await?))
}

/// `GET /v1/devices/{registration_id}/deliveries` and `GET /v1/messages` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct NewestFirstQuery {
    /// Where this page starts: an earlier page's `next`.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    after: Option<String>,
    /// How many at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// What became of one push on one device, as a device's history shows it.
#[derive(Debug, Serialize, ToSchema)]
struct DeviceDelivery {
    /// The push.
    message_id: String,
    /// What became of it.
    #[serde(flatten)]
    row: DeliveryView,
}

/// A page of a device's history.
#[derive(Debug, Serialize, ToSchema)]
struct DeviceHistory {
    /// Its row of each push that went to it, newest push first.
    deliveries: Vec<DeviceDelivery>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
}

/// A device's history: what became of each push that went to it, newest first.
#[utoipa::path(
    get, path = "/v1/devices/{registration_id}/deliveries", tag = "devices",
    security(("admin_token" = [])),
    params(
        ("registration_id" = String, Path, description = "the device's registration id"),
        NewestFirstQuery,
    ),
    responses(
        (status = 200, description = "a page of its history", body = DeviceHistory),
        (status = 404, description = "no device has this id", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn device_history(
    State(state): State<AppState>,
    _: Admin,
    PathParam(registration_id): PathParam,
    QueryParams(query): QueryParams<NewestFirstQuery>,
) -> Result<Json<DeviceHistory>, ApiError> {
    let before = cursor(query.after.as_deref())?;
    let limit = page_limit(query.limit)?;
    if state.store.device(&registration_id).await?.is_none() {
        return Err(no_such_device());
    }
    let page = state
        .store
        .device_deliveries(&registration_id, before, limit)
        .await?;
    Ok(Json(DeviceHistory {
        deliveries: page
            .items
            .into_iter()
            .map(|(id, row)| DeviceDelivery {
                message_id: id.to_string(),
                row: row.into(),
            })
            .collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

// What the OpenAPI document says of an `Audience` (which the API reads and writes).
/// Who a push goes to.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = Audience)]
#[allow(dead_code)] // read only by the OpenAPI document
enum AudienceSchema {
    /// These registration ids.
    RegistrationIds(ToIds),
    /// Every active device of a user.
    User(ToUser),
    /// Every active device with a tag.
    Tag(ToTag),
    /// Every active device: the word `"all"`.
    All(crate::store::Everyone),
}

/// A push to these registration ids (registered or not; known ones that are not active get a
/// `not_attempted` row instead of a send).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only by the OpenAPI document
struct ToIds {
    /// At most 10,000 ids.
    #[schema(schema_with = registration_ids_schema)]
    registration_ids: Vec<String>,
}

/// The schema of a push's list of ids: at most 10,000 registration ids.
fn registration_ids_schema() -> utoipa::openapi::Array {
    utoipa::openapi::ArrayBuilder::new()
        .items(registration_id_schema())
        .max_items(Some(MAX_LISTED))
        .description(Some("At most 10,000 ids."))
        .build()
}

/// The schema of a registration id (as [`REGISTRATION_ID_PATTERN`] says).
fn registration_id_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(
            "A registration id: at most 4,096 bytes (UTF-8), no white space, control or format characters.",
        ))
        .min_length(Some(1))
        .max_length(Some(c2dm_core::MAX_REGISTRATION_ID))
        .pattern(Some(REGISTRATION_ID_PATTERN))
        .build()
}

/// A push to every active device of a user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only by the OpenAPI document
struct ToUser {
    /// The user.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    user_id: String,
}

/// A push to every active device with a tag.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only by the OpenAPI document
struct ToTag {
    /// The tag.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    tag: String,
}

/// `POST /v1/messages`: a push.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Push {
    /// Who it goes to.
    #[schema(value_type = AudienceSchema)]
    to: Audience,
    /// Groups like messages: while a device is offline, only the last one per key is kept.
    #[schema(min_length = 1)]
    collapse_key: String,
    /// The `data.<key>` pairs the app receives: keys and values together at most 1024 bytes
    /// (UTF-8); no key is empty, is `from` or starts with `google.`.
    #[serde(default)]
    #[schema(schema_with = data_schema)]
    data: std::collections::BTreeMap<String, String>,
    /// Deliver only when the device wakes.
    #[serde(default)]
    delay_while_idle: bool,
}

/// The schema of a push's `data`: text values under keys that are not empty, not `from` and
/// do not start with `google.` (the size limit, over keys and values together, is beyond what
/// a schema says).
fn data_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .pattern(Some(r"^(?!google\.)(?!from$)")),
        ))
        .build()
}

/// The most registration ids one push may list.
const MAX_LISTED: usize = 10_000;

impl Push {
    /// Every rule of the protocol (the message builds), before anything is stored.
    fn check(self, idempotency_key: Option<String>) -> Result<NewMessage, ApiError> {
        let mut builder = c2dm_core::Message::builder("audience-placeholder")
            .collapse_key(&self.collapse_key)
            .delay_while_idle(self.delay_while_idle);
        for (key, value) in &self.data {
            builder = builder.data(key, value);
        }
        builder.build().map_err(|e| {
            let field = match e {
                c2dm_core::MessageError::MissingCollapseKey
                | c2dm_core::MessageError::EmptyCollapseKey => "collapse_key",
                _ => "data",
            };
            ApiError::field(field, e.to_string())
        })?;
        match &self.to {
            Audience::RegistrationIds { registration_ids } => {
                if registration_ids.len() > MAX_LISTED {
                    return Err(ApiError::field(
                        "to",
                        format!(
                            "at most {MAX_LISTED} registration ids; use a user, a tag or \"all\""
                        ),
                    ));
                }
                for id in registration_ids {
                    c2dm_core::RegistrationId::new(id)
                        .map_err(|e| ApiError::field("to", format!("{id:?}: {e}")))?;
                }
            }
            Audience::User { user_id } => {
                text_field("to", Some(user_id.clone()))?;
            }
            Audience::Tag { tag } => {
                text_field("to", Some(tag.clone()))?;
            }
            Audience::All(_) => {}
        }
        Ok(NewMessage {
            idempotency_key,
            audience: self.to,
            collapse_key: self.collapse_key,
            data: self.data.into_iter().collect(),
            delay_while_idle: self.delay_while_idle,
        })
    }
}

/// A push's rows by outcome so far.
#[derive(Debug, Serialize, ToSchema)]
struct TallyView {
    /// Accepted by C2DM.
    accepted: u64,
    /// Refused for good (by code in the push's `counts`).
    rejected: u64,
    /// Not accepted after retrying.
    failed: u64,
    /// Never sent (cancelled, or the device is not active).
    not_attempted: u64,
    /// Devices without their row yet; `null` until the audience has been walked.
    pending: Option<u64>,
}

/// A push, as a list of pushes shows it.
#[derive(Debug, Serialize, ToSchema)]
struct MessageSummary {
    /// Its id.
    id: String,
    /// Where it is.
    state: MessageState,
    /// Who it goes to.
    #[schema(value_type = AudienceSchema)]
    to: Audience,
    /// Its collapse key.
    collapse_key: String,
    /// Whether a cancel was asked for.
    cancel_requested: bool,
    /// How many devices its audience has; `null` until walked.
    total: Option<u64>,
    /// Its rows by outcome so far.
    tally: TallyView,
    /// When it was made (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// When its last row was written.
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    /// The last database error its batches met, if any: each batch keeps its rows and tries
    /// again until the database takes them.
    last_error: Option<PushErrorView>,
}

/// A database error a push's batch met.
#[derive(Debug, Serialize, ToSchema)]
struct PushErrorView {
    /// What failed, and how.
    error: String,
    /// When it last happened (RFC 3339).
    #[schema(format = DateTime)]
    at: String,
    /// Since when its batches have been failing (RFC 3339); `null` once they write again.
    #[schema(format = DateTime)]
    failing_since: Option<String>,
}

/// A push with its counts by outcome and code.
#[derive(Debug, Serialize, ToSchema)]
struct MessageView {
    #[serde(flatten)]
    summary: MessageSummary,
    /// Its rows by outcome, the rejected and not attempted by code or reason.
    counts: Counts,
}

impl From<MessageRecord> for MessageSummary {
    fn from(m: MessageRecord) -> Self {
        Self {
            id: m.id.to_string(),
            state: m.state,
            to: m.audience,
            collapse_key: m.collapse_key,
            cancel_requested: m.cancel_requested,
            total: m.total,
            tally: TallyView {
                accepted: m.tally.accepted,
                rejected: m.tally.rejected,
                failed: m.tally.failed,
                not_attempted: m.tally.not_attempted,
                pending: m.total.map(|t| t.saturating_sub(m.tally.recorded())),
            },
            created_at: rfc3339(m.created_at),
            finished_at: m.finished_at.map(rfc3339),
            last_error: m.last_error.map(|e| PushErrorView {
                error: e.error,
                at: rfc3339(e.at),
                // A finished push is failing no more, whichever batch said so last.
                failing_since: e
                    .failing_since
                    .filter(|_| matches!(m.state, MessageState::Queued | MessageState::Sending))
                    .map(rfc3339),
            }),
        }
    }
}

impl From<MessageRecord> for MessageView {
    fn from(mut m: MessageRecord) -> Self {
        let counts = std::mem::take(&mut m.counts);
        Self {
            summary: m.into(),
            counts,
        }
    }
}

/// Sends a push: stored with its job before the answer; workers do the sending.
#[utoipa::path(
    post, path = "/v1/messages", tag = "messages",
    security(("admin_token" = [])),
    params((
        "Idempotency-Key" = Option<String>, Header,
        description = "the same key gives the same push, never a second one (visible text, at most 256 characters)",
        max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$"
    )),
    request_body = Push,
    responses(
        (status = 202, description = "stored and queued", body = MessageView),
        (status = 200, description = "a replayed Idempotency-Key: the push made the first time", body = MessageView),
        (status = 409, description = "the Idempotency-Key was used for another push", body = ErrorBody),
        BodyErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn push(
    State(state): State<AppState>,
    _: Admin,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(push): JsonBody<Push>,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    let message = push.check(key)?;
    let (created, stored) = state.store.create_message(&message).await?;
    if !created {
        let same = stored.audience == message.audience
            && stored.collapse_key == message.collapse_key
            && stored.data == message.data
            && stored.delay_while_idle == message.delay_while_idle;
        if !same {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another push",
            ));
        }
        return Ok((StatusCode::OK, Json(stored.into())));
    }
    metrics::counter!("c2dm_pushes_total").increment(1);
    Ok((StatusCode::ACCEPTED, Json(stored.into())))
}

/// A page of pushes.
#[derive(Debug, Serialize, ToSchema)]
struct MessagePage {
    /// The pushes, newest first.
    messages: Vec<MessageSummary>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
}

/// The pushes, newest first, each with its tally by outcome.
#[utoipa::path(
    get, path = "/v1/messages", tag = "messages",
    security(("admin_token" = [])),
    params(NewestFirstQuery),
    responses(
        (status = 200, description = "a page of pushes", body = MessagePage),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn messages(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams<NewestFirstQuery>,
) -> Result<Json<MessagePage>, ApiError> {
    let before = cursor(query.after.as_deref())?;
    let limit = page_limit(query.limit)?;
    let page = state.store.messages(before, limit).await?;
    Ok(Json(MessagePage {
        messages: page.items.into_iter().map(MessageSummary::from).collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

fn no_such_message() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such message")
}

fn message_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(no_such_message)
}

async fn find(state: &AppState, id: &str) -> Result<MessageRecord, ApiError> {
    state
        .store
        .message(message_id(id)?)
        .await?
        .ok_or_else(no_such_message)
}

/// `GET /v1/messages/{id}` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StatusQuery {
    /// Hold the answer until the push is finished, for at most this many seconds (up to 60).
    #[param(minimum = 0, maximum = 60)]
    wait: Option<u64>,
}

/// The longest `wait` a status request may ask for, in seconds.
const MAX_WAIT: u64 = 60;

/// A push's state and counts; with `wait`, once it is finished (or the wait is over).
#[utoipa::path(
    get, path = "/v1/messages/{id}", tag = "messages",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the push's id"), StatusQuery),
    responses(
        (status = 200, description = "the push", body = MessageView),
        (status = 404, description = "no such push", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn status(
    State(state): State<AppState>,
    _: Admin,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<StatusQuery>,
) -> Result<Json<MessageView>, ApiError> {
    let wait = query.wait.unwrap_or(0);
    if wait > MAX_WAIT {
        return Err(ApiError::query("wait", "wait is at most 60 seconds"));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut finishes = state.store.finishes();
    // Read without its counts until the answer: counting a push's rows costs what it has.
    let mut message = state
        .store
        .message_to_send(message_id(&id)?)
        .await?
        .ok_or_else(no_such_message)?;
    loop {
        let finished = matches!(message.state, MessageState::Done | MessageState::Cancelled);
        if finished || tokio::time::Instant::now() >= deadline {
            let counted = state.store.message(message.id).await?.unwrap_or(message);
            return Ok(Json(counted.into()));
        }
        // Woken by a push finished in this process, or after a while for one finished by
        // another process.
        tokio::select! {
            _ = finishes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        message = state
            .store
            .message_to_send(message.id)
            .await?
            .ok_or_else(no_such_message)?;
    }
}

/// Cancels a push: batches not started are not sent, batches under way stop; every device
/// still gets its row (`not_attempted: cancelled`).
#[utoipa::path(
    post, path = "/v1/messages/{id}/cancel", tag = "messages",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the push's id")),
    responses(
        (status = 200, description = "the push, its cancel asked for", body = MessageView),
        (status = 404, description = "no such push", body = ErrorBody),
        (status = 409, description = "the push has finished (`already_finished`, the message says whether done or cancelled): nothing changes", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn cancel(
    State(state): State<AppState>,
    _: Admin,
    PathParam(id): PathParam,
) -> Result<Json<MessageView>, ApiError> {
    let message = find(&state, &id).await?;
    if matches!(message.state, MessageState::Done | MessageState::Cancelled) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!(
                "the push is {}: nothing is left to cancel",
                message.state.as_str()
            ),
        ));
    }
    let cancelled = state
        .store
        .request_cancel(message.id)
        .await?
        .unwrap_or(message);
    Ok(Json(cancelled.into()))
}

/// The outcomes a row can have (the `outcome` of a delivery).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Outcome)]
#[allow(dead_code)] // read only by the OpenAPI document
enum OutcomeName {
    /// Accepted by C2DM.
    Accepted,
    /// Refused for good: `error` is the C2DM code.
    Rejected,
    /// Not accepted after retrying: `error` says why.
    Failed,
    /// Never sent: `error` says why (`cancelled`, `gone`, `unregistered`, …).
    NotAttempted,
}

/// `GET /v1/messages/{id}/deliveries` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeliveriesQuery {
    /// Only rows with this outcome.
    #[param(value_type = Option<OutcomeName>)]
    outcome: Option<String>,
    /// Only rows with this error: a C2DM code (`NotRegistered`), or why not attempted.
    error: Option<String>,
    /// Where this page starts: an earlier page's `next`.
    after: Option<String>,
    /// How many rows at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// One row as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
struct DeliveryView {
    /// The device.
    registration_id: String,
    /// What became of the push on it.
    #[schema(value_type = OutcomeName)]
    outcome: c2dm_core::OutcomeKind,
    /// The id C2DM gave the message, when accepted.
    c2dm_message_id: Option<String>,
    /// The C2DM code, the error, or why not attempted.
    error: Option<String>,
    /// Requests made.
    attempts: u32,
    /// Sends that may have reached the device without an answer saying so.
    possible_duplicates: u32,
    /// When the row was written (RFC 3339).
    #[schema(format = DateTime)]
    at: String,
}

impl From<DeliveryRow> for DeliveryView {
    fn from(r: DeliveryRow) -> Self {
        Self {
            registration_id: r.registration_id,
            outcome: r.outcome,
            c2dm_message_id: r.c2dm_message_id,
            error: r.error,
            attempts: r.attempts,
            possible_duplicates: r.possible_duplicates,
            at: rfc3339(r.at),
        }
    }
}

/// A page of rows.
#[derive(Debug, Serialize, ToSchema)]
struct DeliveryPage {
    /// The rows, in registration id order.
    deliveries: Vec<DeliveryView>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
}

/// What became of a push on each device: one row per device, in registration id order.
#[utoipa::path(
    get, path = "/v1/messages/{id}/deliveries", tag = "messages",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the push's id"), DeliveriesQuery),
    responses(
        (status = 200, description = "a page of rows", body = DeliveryPage),
        (status = 404, description = "no such push", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
async fn deliveries(
    State(state): State<AppState>,
    _: Admin,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<DeliveriesQuery>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let message = find(&state, &id).await?;
    let outcome = match query.outcome.as_deref() {
        None => None,
        Some(text) => Some(
            serde_json::from_value::<c2dm_core::OutcomeKind>(serde_json::Value::from(text))
                .map_err(|_| {
                    ApiError::query(
                        "outcome",
                        "outcome is one of accepted, rejected, failed, not_attempted",
                    )
                })?,
        ),
    };
    let limit = page_limit(query.limit)?;
    let (rows, next) = state
        .store
        .deliveries(
            message.id,
            outcome,
            query.error.as_deref(),
            query.after.as_deref(),
            limit,
        )
        .await?;
    Ok(Json(DeliveryPage {
        deliveries: rows.into_iter().map(DeliveryView::from).collect(),
        next,
    }))
}

/// The Prometheus recorder of this process: installed on first use as the global recorder of
/// the `metrics` crate; if the embedding program installed another one, ours renders what it
/// has (nothing), and theirs gets the figures.
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
        builder.install_recorder().unwrap_or_else(|err| {
            tracing::warn!(%err, "another metrics recorder is installed: /metrics stays empty");
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle()
        })
    })
}

/// Makes sure the recorder is installed before the first figure is counted.
pub fn install_metrics() {
    prometheus();
}

/// Prometheus text: registrations, pushes, batches, deliveries by outcome, gone devices, queue
/// depth, pauses, deferred devices, logins.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the figures", body = String, content_type = "text/plain; version=0.0.4"),
        AdminErrors,
        KeyErrors,
    )
)]
async fn metrics_text(_: Admin) -> Response {
    rendered_metrics()
}

fn rendered_metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// `GET /metrics` and `GET /healthz` over `store`, without a key: for a listener of its own
/// (`c2dm serve --metrics-listen`), where a worker process without the API is scraped and
/// checked. Keep it on an address only the scraper and the process manager reach.
pub fn ops_router(store: Arc<dyn Store>) -> Router {
    install_metrics();
    Router::new()
        .route("/metrics", get(|| async { rendered_metrics() }))
        .route(
            "/healthz",
            get(
                |State(store): State<Arc<dyn Store>>,
                 workers: Option<Extension<WorkerHealth>>| async move {
                    health(store.as_ref(), workers).await
                },
            ),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(store)
}

/// The answer to `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
struct Health {
    /// `ok`, or what is wrong: `database unavailable`, or `workers unavailable: …` with why.
    status: String,
}

/// Whether the server can serve: 200 when its database answers and its workers (if any) can
/// work. No key needed.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    security(()),
    responses(
        (status = 200, description = "the database answers", body = Health),
        (status = 503, description = "the database does not answer, this process's workers cannot work, or the request took too long", body = Health),
    )
)]
async fn healthz(
    State(state): State<AppState>,
    workers: Option<Extension<WorkerHealth>>,
) -> Response {
    health(state.store.as_ref(), workers).await
}

/// The health check's answer: 200 when `store` answers and this process's workers (told by
/// the `WorkerHealth` extension, where the server adds one) can work, else 503 naming why.
async fn health(store: &dyn Store, workers: Option<Extension<WorkerHealth>>) -> Response {
    if let Some(problem) = workers.and_then(|Extension(workers)| workers.problem()) {
        tracing::debug!(%problem, "health check: the workers cannot work");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: format!("workers unavailable: {problem}"),
            }),
        )
            .into_response();
    }
    match store.ping().await {
        Ok(()) => Json(Health {
            status: "ok".to_owned(),
        })
        .into_response(),
        Err(err) => {
            tracing::warn!(%err, "health check: the database does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: "database unavailable".to_owned(),
                }),
            )
                .into_response()
        }
    }
}

/// The API's contract, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "c2dm-server",
        description = "The C2DM application server: devices register, operators push, every device gets a record of what became of each push. Keys travel as `Authorization: Bearer <key>`: the device key on the device routes, the admin token on every route.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        register, unregister, device, list, device_counts, device_history, push, messages,
        status, cancel, deliveries, healthz, metrics_text,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerKeys),
    tags(
        (name = "devices", description = "Phones register their ids; operators look them up."),
        (name = "messages", description = "Pushes, their progress, and a row per device."),
        (name = "operations", description = "Health and figures."),
    )
)]
struct ApiDoc;

/// Declares the two keys, both `Authorization: Bearer`.
struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("admin_token", "the admin token: every route"),
            (
                "device_key",
                "the device key: registering and unregistering devices",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The API's OpenAPI 3.1 document, as `GET /openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The contract is public: it holds no secret, and clients (and fuzzers) read it first.
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(|| openapi().to_pretty_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn answer(router: Router, path: &str) -> (StatusCode, serde_json::Value) {
        let request = Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_takes_too_long_is_answered_503_timeout() {
        let router = with_timeout(
            Router::new()
                .route("/stuck", get(std::future::pending::<&'static str>))
                .route("/quick", get(|| async { "done" })),
            REQUEST_TIMEOUT,
        );
        let started = tokio::time::Instant::now();
        let (status, body) = answer(router.clone(), "/stuck").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "timeout");
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
        let (status, _) = answer(router, "/quick").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn the_openapi_document_is_3_1_and_names_every_route_and_key() {
        let doc = serde_json::to_value(openapi()).expect("serializes");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented: Vec<String> = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                documented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        documented.sort();
        let mut routes = vec![
            "POST /v1/devices",
            "GET /v1/devices",
            "GET /v1/devices/{registration_id}",
            "DELETE /v1/devices/{registration_id}",
            "GET /v1/devices/{registration_id}/deliveries",
            "GET /v1/device-counts",
            "POST /v1/messages",
            "GET /v1/messages",
            "GET /v1/messages/{id}",
            "GET /v1/messages/{id}/deliveries",
            "POST /v1/messages/{id}/cancel",
            "GET /healthz",
            "GET /metrics",
        ];
        routes.sort_unstable();
        assert_eq!(documented, routes);
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["admin_token"]["scheme"], "bearer");
        assert_eq!(schemes["device_key"]["scheme"], "bearer");
        // Every operation but the health check needs a key, and documents what a wrong one
        // gets.
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                let responses = op["responses"].as_object().expect("responses");
                assert!(responses.contains_key("503"), "{method} {path}: no 503");
                if path != "/healthz" {
                    assert!(responses.contains_key("401"), "{method} {path}: no 401");
                    assert!(op["security"].as_array().is_some_and(|s| !s.is_empty()));
                }
            }
        }
    }
}
