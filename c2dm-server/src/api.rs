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
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{
    Audience, Counts, DeliveryRow, Device, DeviceFilter, DeviceState, MessageRecord, MessageState,
    NewDevice, NewMessage, Store, Upserted,
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

/// A key given is unusable: empty, or with characters a header cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key must be non-empty visible ASCII")]
pub struct InvalidKey;

impl Key {
    /// Wraps a key; it must be non-empty visible ASCII (it travels in a header).
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidKey> {
        let key = key.as_ref().trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidKey);
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

/// The two keys: the admin token (every route) and the device key (the device routes only).
#[derive(Debug, Clone)]
pub struct Keys {
    /// Lets operators list devices and send pushes.
    pub admin: Key,
    /// Lets apps register and unregister their devices.
    pub device: Key,
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
/// | `POST /v1/messages` | admin | a push to ids, a user, a tag or `"all"`, with an optional `Idempotency-Key` header: 202 `{id, state}` (200 for a replayed key) |
/// | `GET /v1/messages/{id}` | admin | its state and counts per outcome |
/// | `GET /v1/messages/{id}/deliveries?outcome=&after=&limit=` | admin | a page of its rows, one per device |
/// | `POST /v1/messages/{id}/cancel` | admin | batches not started are not sent, batches under way stop; every device still gets a row |
/// | `GET /healthz` | none | 200 when the database answers, else 503 |
/// | `GET /metrics` | admin | Prometheus text: registrations, pushes, batches, deliveries by outcome, gone devices, queue depth, pauses, deferred devices, logins |
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
            .route("/v1/devices/{registration_id}", delete(unregister))
            .route("/v1/messages", post(push))
            .route("/v1/messages/{id}/deliveries", get(deliveries))
            .route("/v1/messages/{id}/cancel", post(cancel))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics_text)),
        REQUEST_TIMEOUT,
    );
    quick
        .merge(waiting)
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            field: Option<&'a str>,
        }
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
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

/// Who a request is from, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Admin,
    Device,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
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
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(unauthorized)?;
        // Both compared, whichever matches: the time taken does not tell which key it was.
        let admin = state.keys.admin.matches(given);
        let device = state.keys.device.matches(given);
        match (admin, device) {
            (true, _) => Ok(Self::Admin),
            (false, true) => Ok(Self::Device),
            (false, false) => Err(unauthorized()),
        }
    }
}

impl Caller {
    fn require_admin(self) -> Result<(), ApiError> {
        match self {
            Self::Admin => Ok(()),
            Self::Device => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this route needs the admin token, not the device key",
            )),
        }
    }
}

/// `POST /v1/devices`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    registration_id: String,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    app_version: Option<String>,
}

/// The longest text field taken (ids, versions, tags).
const MAX_TEXT: usize = 256;
/// The most tags a device may have.
const MAX_TAGS: usize = 32;

fn text_field(field: &'static str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::field(field, format!("{field} is empty"))),
        Some(v) if v.len() > MAX_TEXT => Err(ApiError::field(
            field,
            format!("{field} is over {MAX_TEXT} bytes"),
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
        if self.tags.len() > MAX_TAGS {
            return Err(ApiError::field("tags", format!("at most {MAX_TAGS} tags")));
        }
        let mut tags = Vec::with_capacity(self.tags.len());
        for tag in self.tags {
            tags.extend(text_field("tags", Some(tag))?);
        }
        tags.sort();
        tags.dedup();
        Ok(NewDevice {
            registration_id: id.as_str().to_owned(),
            device_id: text_field("device_id", self.device_id)?,
            user_id: text_field("user_id", self.user_id)?,
            tags,
            app_version: text_field("app_version", self.app_version)?,
        })
    }
}

/// A device as the API shows it.
#[derive(Debug, Serialize)]
struct DeviceView {
    registration_id: String,
    device_id: Option<String>,
    user_id: Option<String>,
    tags: Vec<String>,
    app_version: Option<String>,
    state: DeviceState,
    reason: Option<String>,
    created_at: String,
    updated_at: String,
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

async fn register(
    State(state): State<AppState>,
    _caller: Caller,
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

async fn unregister(
    State(state): State<AppState>,
    _caller: Caller,
    Path(registration_id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    match state.store.unregister_device(&registration_id).await? {
        Some(device) => Ok(Json(device.into())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no device has this registration id",
        )),
    }
}

/// `GET /v1/devices` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    user_id: Option<String>,
    tag: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

/// A page of devices.
#[derive(Debug, Serialize)]
struct DevicePage {
    devices: Vec<DeviceView>,
    next: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<DevicePage>, ApiError> {
    caller.require_admin()?;
    let bad = ApiError::query;
    let filter = DeviceFilter {
        state: match query.state.as_deref() {
            None => None,
            Some(s) => Some(
                DeviceState::parse(s)
                    .ok_or_else(|| bad("state", "state is one of active, unregistered, gone"))?,
            ),
        },
        user_id: query.user_id,
        tag: query.tag,
    };
    let after = match query.after.as_deref() {
        None => None,
        Some(cursor) => Some(
            cursor
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("after", "after is a cursor from an earlier page's next"))?,
        ),
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(bad("limit", "limit is between 1 and 1000"));
    }
    let page = state.store.list_devices(&filter, after, limit).await?;
    Ok(Json(DevicePage {
        devices: page.items.into_iter().map(DeviceView::from).collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

/// `POST /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Push {
    to: Audience,
    collapse_key: String,
    #[serde(default)]
    data: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    delay_while_idle: bool,
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

/// A push as the API shows it.
#[derive(Debug, Serialize)]
struct MessageView {
    id: String,
    state: MessageState,
    to: Audience,
    collapse_key: String,
    cancel_requested: bool,
    total: Option<u64>,
    counts: Counts,
    created_at: String,
    finished_at: Option<String>,
}

impl From<MessageRecord> for MessageView {
    fn from(m: MessageRecord) -> Self {
        Self {
            id: m.id.to_string(),
            state: m.state,
            to: m.audience,
            collapse_key: m.collapse_key,
            cancel_requested: m.cancel_requested,
            total: m.total,
            counts: m.counts,
            created_at: rfc3339(m.created_at),
            finished_at: m.finished_at.map(rfc3339),
        }
    }
}

async fn push(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    JsonBody(push): JsonBody<Push>,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    caller.require_admin()?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| {
                    text_field("Idempotency-Key", Some(v.to_owned()))
                        .ok()
                        .flatten()
                })
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_header",
                        "Idempotency-Key is visible text of at most 256 bytes",
                    )
                })?,
        ),
    };
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

fn message_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such message"))
}

async fn find(state: &AppState, id: &str) -> Result<MessageRecord, ApiError> {
    state
        .store
        .message(message_id(id)?)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such message"))
}

/// `GET /v1/messages/{id}` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    /// Hold the answer until the push is finished, for at most this many seconds (up to 60).
    wait: Option<u64>,
}

/// The longest `wait` a status request may ask for, in seconds.
const MAX_WAIT: u64 = 60;

async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<StatusQuery>,
) -> Result<Json<MessageView>, ApiError> {
    caller.require_admin()?;
    let wait = query.wait.unwrap_or(0);
    if wait > MAX_WAIT {
        return Err(ApiError::query("wait", "wait is at most 60 seconds"));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut changes = state.store.changes();
    // Read without its counts until the answer: counting a push's rows costs what it has.
    let mut message = state
        .store
        .message_to_send(message_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such message"))?;
    loop {
        let finished = matches!(message.state, MessageState::Done | MessageState::Cancelled);
        if finished || tokio::time::Instant::now() >= deadline {
            let counted = state.store.message(message.id).await?.unwrap_or(message);
            return Ok(Json(counted.into()));
        }
        // Woken by a batch recorded in this process, or after a while for one recorded by
        // another process.
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        message = match state.store.message_to_send(message.id).await? {
            Some(now) => now,
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such message",
                ));
            }
        };
    }
}

async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    caller.require_admin()?;
    let message = find(&state, &id).await?;
    let cancelled = state
        .store
        .request_cancel(message.id)
        .await?
        .unwrap_or(message);
    Ok(Json(cancelled.into()))
}

/// `GET /v1/messages/{id}/deliveries` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    outcome: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

/// One row as the API shows it.
#[derive(Debug, Serialize)]
struct DeliveryView {
    registration_id: String,
    outcome: c2dm_core::OutcomeKind,
    c2dm_message_id: Option<String>,
    error: Option<String>,
    attempts: u32,
    possible_duplicates: u32,
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
#[derive(Debug, Serialize)]
struct DeliveryPage {
    deliveries: Vec<DeliveryView>,
    next: Option<String>,
}

async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<DeliveriesQuery>,
) -> Result<Json<DeliveryPage>, ApiError> {
    caller.require_admin()?;
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
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::query("limit", "limit is between 1 and 1000"));
    }
    let (rows, next) = state
        .store
        .deliveries(message.id, outcome, query.after.as_deref(), limit)
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

async fn metrics_text(caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    Ok(rendered_metrics())
}

fn rendered_metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// `GET /metrics` alone, without a key: for a listener of its own (`c2dm serve
/// --metrics-listen`), where a worker process without the API is scraped. Keep it on an
/// address only the scraper reaches.
pub fn metrics_router() -> Router {
    install_metrics();
    Router::new()
        .route("/metrics", get(|| async { rendered_metrics() }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
}

/// The answer to `GET /healthz`.
#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(Health { status: "ok" }).into_response(),
        Err(err) => {
            tracing::warn!(%err, "health check: the database does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: "database unavailable",
                }),
            )
                .into_response()
        }
    }
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
}
