//! `/v1/devices` and `/v1/device-counts`: phones register, operators look them up.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, AnyKey};
use super::deliveries::DeliveryView;
use super::error::{AdminErrors, ApiError, BodyErrors, ErrorBody, KeyErrors, ParamErrors};
use super::extract::{JsonBody, PathParam, QueryParams};
use super::{
    AppState, MAX_TAGS, NewestFirstQuery, cursor, page_limit, query_text, rfc3339, text_field,
};
use crate::store::{
    Device, DeviceCounts, DeviceFilter, DeviceState, NewDevice, Provider, Upserted,
};

/// The device routes: registering and unregistering (either key), and looking devices up
/// (the admin token).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/devices", post(register).get(list_devices))
        .route(
            "/v1/devices/{registration_id}",
            delete(unregister).get(device),
        )
        .route(
            "/v1/devices/{registration_id}/deliveries",
            get(device_history),
        )
        .route("/v1/device-counts", get(device_counts))
}

/// `POST /v1/devices`: a device registers (or registers again). A field left out keeps what is
/// stored (a new device has none); `null` (or `[]` for `tags`) clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = super::examples::registration)]
pub(super) struct Registration {
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
    /// Which service sends to the device: `c2dm` (the id is a C2DM registration id) or `fcm`
    /// (an FCM registration token); left out, kept (a new device: `c2dm`).
    #[serde(default)]
    provider: Option<Provider>,
}

/// A field that is present (`Some`, holding `None` for `null`); with `#[serde(default)]`, a
/// field left out is `None`.
pub(super) fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// What the OpenAPI document says a registration id is: what
/// [`c2dm_core::RegistrationId::new`] takes, but for its bound in bytes (the document's
/// `maxLength` counts characters). The format characters (Unicode `Cf`) are written out, those
/// past the BMP as themselves: the pattern dialects that read the document know no `\p{Cf}`.
pub(super) const REGISTRATION_ID_PATTERN: &str = "^[^\\s\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890\\u0891\\u08e2\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb\u{110BD}\u{110CD}\u{13430}-\u{1343F}\u{1BCA0}-\u{1BCA3}\u{1D173}-\u{1D17A}\u{E0001}\u{E0020}-\u{E007F}]+$";

/// A tag: non-empty, at most 256 characters, no control characters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]+$")]
pub(super) struct Tag(String);

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
            provider: self.provider,
        })
    }
}

/// A device as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::device)]
pub(super) struct DeviceView {
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
    /// Which service sends to it.
    provider: Provider,
    /// Whether pushes go to it.
    state: DeviceState,
    /// Why it is gone: the service's code (`NotRegistered`, `UNREGISTERED`, …).
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

impl From<Device> for DeviceView {
    fn from(d: Device) -> Self {
        Self {
            registration_id: d.registration_id,
            device_id: d.device_id,
            user_id: d.user_id,
            tags: d.tags,
            app_version: d.app_version,
            provider: d.provider,
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
pub(super) async fn register(
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

pub(super) fn no_such_device() -> ApiError {
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
    params(("registration_id" = String, Path, description = "the device's registration id", example = super::examples::registration_id)),
    responses(
        (status = 200, description = "the device, now unregistered", body = DeviceView),
        (status = 404, description = "no device has this id", body = ErrorBody),
        ParamErrors,
        KeyErrors,
    )
)]
pub(super) async fn unregister(
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
    params(("registration_id" = String, Path, description = "the device's registration id", example = super::examples::registration_id)),
    responses(
        (status = 200, description = "the device", body = DeviceView),
        (status = 404, description = "no device has this id", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn device(
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
pub(super) struct ListQuery {
    /// Only devices in this state.
    #[param(value_type = Option<DeviceState>, example = "active")]
    state: Option<String>,
    /// Only this user's devices.
    #[param(example = "alice")]
    user_id: Option<String>,
    /// Only devices with this tag.
    #[param(example = "beta")]
    tag: Option<String>,
    /// Only devices whose registration id starts with this.
    #[param(
        min_length = 1,
        max_length = 256,
        example = "APA91b",
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    registration_id_prefix: Option<String>,
    /// Where this page starts: an earlier page's `next`.
    #[param(pattern = "^[1-9][0-9]{0,17}$", example = "1")]
    after: Option<String>,
    /// How many devices at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000, example = 50)]
    limit: Option<u32>,
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::device_page)]
pub(super) struct DevicePage {
    /// The devices, in the order they first registered.
    devices: Vec<DeviceView>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
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
pub(super) async fn list_devices(
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
        registration_id_prefix: query_text("registration_id_prefix", query.registration_id_prefix)?,
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
pub(super) struct CountsQuery {
    /// Only this user's devices.
    #[param(example = "alice")]
    user_id: Option<String>,
    /// Only devices with this tag.
    #[param(example = "beta")]
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
pub(super) async fn device_counts(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams<CountsQuery>,
) -> Result<Json<DeviceCounts>, ApiError> {
    let filter = DeviceFilter {
        user_id: query.user_id,
        tag: query.tag,
        ..DeviceFilter::default()
    };
    Ok(Json(state.store.device_counts(&filter).await?))
}

/// What became of one push on one device, as a device's history shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeviceDelivery {
    /// The push.
    push_id: String,
    /// What became of it.
    #[serde(flatten)]
    row: DeliveryView,
}

/// A page of a device's history.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::device_history)]
pub(super) struct DeviceHistory {
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
        ("registration_id" = String, Path, description = "the device's registration id", example = super::examples::registration_id),
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
pub(super) async fn device_history(
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
                push_id: id.to_string(),
                row: row.into(),
            })
            .collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

/// The schema of a registration id (as [`REGISTRATION_ID_PATTERN`] says).
pub(super) fn registration_id_schema() -> utoipa::openapi::Object {
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
