//! `/v1/pushes`: pushes, their progress, and a row per device.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::devices::registration_id_schema;
use super::error::{AdminErrors, ApiError, BodyErrors, ErrorBody, KeyErrors, ParamErrors};
use super::extract::{IdempotencyKey, JsonBody, PathParam, QueryParams};
use super::{AppState, cursor, page_limit, query_text, rfc3339, text_field};
use crate::store::{Audience, Counts, NewPush, Push, PushFilter, PushState, Store};

/// The push routes that answer at once (the admin token).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/pushes", post(push).get(list_pushes))
        .route(
            "/v1/pushes/{id}/deliveries",
            get(super::deliveries::deliveries),
        )
        .route("/v1/pushes/{id}/cancel", post(cancel))
        .route("/v1/pushes/{id}/finish", post(super::finish::finish))
}

/// The push routes that may wait (a status with `wait`), up to [`MAX_WAIT`] seconds.
pub(super) fn waiting_routes() -> Router<AppState> {
    Router::new().route("/v1/pushes/{id}", get(status))
}

// What the OpenAPI document says of an `Audience` (which the API reads and writes).
/// Who a push goes to, as a push is asked for.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = Audience)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum AudienceSchema {
    /// These registration ids.
    RegistrationIds(ToIds),
    /// Every active device of a user.
    User(ToUser),
    /// Every active device with a tag.
    Tag(ToTag),
    /// Every active device: the word `"all"`.
    All(crate::store::Everyone),
}

/// Who a push goes to, as a push shows it: as asked for, or, for the push that finishes a
/// cancelled one, the devices that push did not reach.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = PushAudience)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum PushAudienceSchema {
    /// As asked for.
    Asked(AudienceSchema),
    /// The devices a cancelled push did not reach.
    Remaining(ToRemaining),
}

/// The devices a cancelled push did not reach, still active (`POST /v1/pushes/{id}/finish`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) struct ToRemaining {
    /// The cancelled push's id.
    #[schema(minimum = 1)]
    remaining_of: i64,
}

/// A push to these registration ids (registered or not; known ones that are not active get a
/// `not_attempted` row instead of a send).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) struct ToIds {
    /// At most 10,000 ids.
    #[schema(schema_with = registration_ids_schema)]
    registration_ids: Vec<String>,
}

/// The schema of a push's list of ids: at most 10,000 registration ids.
pub(super) fn registration_ids_schema() -> utoipa::openapi::Array {
    utoipa::openapi::ArrayBuilder::new()
        .items(registration_id_schema())
        .max_items(Some(MAX_LISTED))
        .description(Some("At most 10,000 ids."))
        .build()
}

/// A push to every active device of a user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) struct ToUser {
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
pub(super) struct ToTag {
    /// The tag.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    tag: String,
}

/// `POST /v1/pushes`: a push.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = super::examples::push_request)]
pub(super) struct PushRequest {
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
pub(super) fn data_schema() -> utoipa::openapi::Object {
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
pub(super) const MAX_LISTED: usize = 10_000;

impl PushRequest {
    /// Every rule of the protocol (the message builds), before anything is stored.
    fn check(self, idempotency_key: Option<String>) -> Result<NewPush, ApiError> {
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
                if registration_ids.is_empty() {
                    return Err(ApiError::field("to", "at least one registration id"));
                }
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
            Audience::Remaining { .. } => {
                return Err(ApiError::field(
                    "to",
                    "the devices a cancelled push did not reach are sent to by POST /v1/pushes/{id}/finish",
                ));
            }
        }
        Ok(NewPush {
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
pub(super) struct TallyView {
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
pub(super) struct PushSummary {
    /// Its id.
    id: String,
    /// Where it is.
    state: PushState,
    /// Who it goes to.
    #[schema(value_type = PushAudienceSchema)]
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
pub(super) struct PushErrorView {
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
#[schema(example = super::examples::push)]
pub(super) struct PushView {
    #[serde(flatten)]
    summary: PushSummary,
    /// Its rows by outcome, the rejected and not attempted by code or reason.
    counts: Counts,
}

impl From<Push> for PushSummary {
    fn from(m: Push) -> Self {
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
                    .filter(|_| matches!(m.state, PushState::Queued | PushState::Sending))
                    .map(rfc3339),
            }),
        }
    }
}

impl From<Push> for PushView {
    fn from(mut m: Push) -> Self {
        let counts = std::mem::take(&mut m.counts);
        Self {
            summary: m.into(),
            counts,
        }
    }
}

/// Sends a push: stored with its job before the answer; workers do the sending. A push whose
/// audience holds no active device is refused (422, field `to`).
#[utoipa::path(
    post, path = "/v1/pushes", tag = "pushes",
    security(("admin_token" = [])),
    params((
        "Idempotency-Key" = Option<String>, Header,
        description = "the same key gives the same push, never a second one (visible text, at most 256 characters)",
        example = "b6f0c1d2-5a1e-4c8e-9f1a-3d2b7c6e8a90",
        max_length = 256, pattern = r"^[!-~]([ -~]*[!-~])?$"
    )),
    request_body = PushRequest,
    responses(
        (status = 202, description = "stored and queued", body = PushView),
        (status = 200, description = "a replayed Idempotency-Key: the push made the first time", body = PushView),
        (status = 409, description = "the Idempotency-Key was used for another push", body = ErrorBody),
        BodyErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn push(
    State(state): State<AppState>,
    _: Admin,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(push): JsonBody<PushRequest>,
) -> Result<(StatusCode, Json<PushView>), ApiError> {
    let message = push.check(key)?;
    if reaches_no_device(&state.store, &message).await? {
        return Err(ApiError::field(
            "to",
            "no active device is in this audience: the push would reach no one",
        ));
    }
    let (created, stored) = state.store.create_push(&message).await?;
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
    tracing::info!(
        push_id = stored.id,
        audience = %stored.audience,
        collapse_key = stored.collapse_key,
        "push made"
    );
    Ok((StatusCode::ACCEPTED, Json(stored.into())))
}

/// Whether `push`'s audience holds no active device (a user, a tag or everyone; a list of ids
/// is never empty: its ids not active get rows), read as the walk's first page of one device,
/// which stops at the first. A replay of a push made when its audience was not empty is still
/// a replay, answered as one.
async fn reaches_no_device(store: &Store, push: &NewPush) -> Result<bool, ApiError> {
    if matches!(
        push.audience,
        Audience::RegistrationIds { .. } | Audience::Remaining { .. }
    ) || !store
        .audience_page(&push.audience, None, 1)
        .await?
        .items
        .is_empty()
    {
        return Ok(false);
    }
    Ok(match &push.idempotency_key {
        Some(key) => store.push_by_idempotency_key(key).await?.is_none(),
        None => true,
    })
}

/// A page of pushes.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::push_page)]
pub(super) struct PushPage {
    /// The pushes, newest first.
    pushes: Vec<PushSummary>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
}

/// `GET /v1/pushes` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PushListQuery {
    /// Only pushes in this state.
    #[param(value_type = Option<PushState>, example = "done")]
    state: Option<String>,
    /// Only pushes whose collapse key starts with this.
    #[param(
        min_length = 1,
        max_length = 256,
        example = "order-",
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    collapse_key: Option<String>,
    /// Where this page starts: an earlier page's `next`.
    #[param(pattern = "^[1-9][0-9]{0,17}$", example = "9")]
    after: Option<String>,
    /// How many at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000, example = 50)]
    limit: Option<u32>,
}

/// The pushes, newest first, each with its tally by outcome; by state, and by the start of
/// their collapse key.
#[utoipa::path(
    get, path = "/v1/pushes", tag = "pushes",
    security(("admin_token" = [])),
    params(PushListQuery),
    responses(
        (status = 200, description = "a page of pushes", body = PushPage),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn list_pushes(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams<PushListQuery>,
) -> Result<Json<PushPage>, ApiError> {
    let filter = PushFilter {
        state: query
            .state
            .as_deref()
            .map(|s| {
                PushState::parse(s).ok_or_else(|| {
                    ApiError::query("state", "state is one of queued, sending, done, cancelled")
                })
            })
            .transpose()?,
        collapse_key_prefix: query_text("collapse_key", query.collapse_key)?,
    };
    let before = cursor(query.after.as_deref())?;
    let limit = page_limit(query.limit)?;
    let page = state.store.pushes(&filter, before, limit).await?;
    Ok(Json(PushPage {
        pushes: page.items.into_iter().map(PushSummary::from).collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

pub(super) fn no_such_message() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such message")
}

pub(super) fn push_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(no_such_message)
}

pub(super) async fn find(state: &AppState, id: &str) -> Result<Push, ApiError> {
    state
        .store
        .push(push_id(id)?)
        .await?
        .ok_or_else(no_such_message)
}

/// `GET /v1/pushes/{id}` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct StatusQuery {
    /// Hold the answer until the push is finished, for at most this many seconds (up to 60).
    #[param(minimum = 0, maximum = 60, example = 10)]
    wait: Option<u64>,
}

/// The longest `wait` a status request may ask for, in seconds.
pub(super) const MAX_WAIT: u64 = 60;

/// A push's state and counts; with `wait`, once it is finished (or the wait is over).
#[utoipa::path(
    get, path = "/v1/pushes/{id}", tag = "pushes",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the push's id", example = "1"), StatusQuery),
    responses(
        (status = 200, description = "the push", body = PushView),
        (status = 404, description = "no such push", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn status(
    State(state): State<AppState>,
    _: Admin,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<StatusQuery>,
) -> Result<Json<PushView>, ApiError> {
    let wait = query.wait.unwrap_or(0);
    if wait > MAX_WAIT {
        return Err(ApiError::query("wait", "wait is at most 60 seconds"));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut finishes = state.store.finishes();
    // Read without its counts until the answer: counting a push's rows costs what it has.
    let mut message = state
        .store
        .push_to_send(push_id(&id)?)
        .await?
        .ok_or_else(no_such_message)?;
    loop {
        let finished = matches!(message.state, PushState::Done | PushState::Cancelled);
        if finished || tokio::time::Instant::now() >= deadline {
            let counted = state.store.push(message.id).await?.unwrap_or(message);
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
            .push_to_send(message.id)
            .await?
            .ok_or_else(no_such_message)?;
    }
}

/// Cancels a push: batches not started are not sent, batches under way stop; every device
/// still gets its row (`not_attempted: cancelled`).
#[utoipa::path(
    post, path = "/v1/pushes/{id}/cancel", tag = "pushes",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the push's id", example = "1")),
    responses(
        (status = 200, description = "the push, its cancel asked for", body = PushView),
        (status = 404, description = "no such push", body = ErrorBody),
        (status = 409, description = "the push has finished (`already_finished`, the message says whether done or cancelled): nothing changes", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn cancel(
    State(state): State<AppState>,
    _: Admin,
    PathParam(id): PathParam,
) -> Result<Json<PushView>, ApiError> {
    let message = find(&state, &id).await?;
    if matches!(message.state, PushState::Done | PushState::Cancelled) {
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
