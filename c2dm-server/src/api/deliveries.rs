//! `GET /v1/pushes/{id}/deliveries`: what became of a push on each device, a row per device,
//! and the row as the API shows it (a device's history shows the same rows).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::{AdminErrors, ApiError, ErrorBody, KeyErrors, ParamErrors};
use super::extract::{PathParam, QueryParams};
use super::pushes::find;
use super::{AppState, page_limit, rfc3339};
use crate::store::DeliveryRow;

/// The outcomes a row can have (the `outcome` of a delivery).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Outcome)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum OutcomeName {
    /// Accepted by C2DM.
    Accepted,
    /// Refused for good: `error` is the C2DM code.
    Rejected,
    /// Not accepted after retrying: `error` says why.
    Failed,
    /// Never sent: `error` says why (`cancelled`, `gone`, `unregistered`, …).
    NotAttempted,
}

/// `GET /v1/pushes/{id}/deliveries` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveriesQuery {
    /// Only rows with this outcome.
    #[param(value_type = Option<OutcomeName>, example = "rejected")]
    outcome: Option<String>,
    /// Only rows with this error: a C2DM code (`NotRegistered`), or why not attempted.
    #[param(example = "NotRegistered")]
    error: Option<String>,
    /// Where this page starts: an earlier page's `next`.
    #[param(example = "1")]
    after: Option<String>,
    /// How many rows at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000, example = 50)]
    limit: Option<u32>,
}

/// One row as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeliveryView {
    /// The device.
    registration_id: String,
    /// What became of the push on it.
    #[schema(value_type = OutcomeName)]
    outcome: c2dm_core::OutcomeKind,
    /// The id the device's provider gave the message, when accepted: C2DM's `0:…`, FCM's
    /// `projects/…/messages/…`.
    message_id: Option<String>,
    /// The provider's error code (C2DM's `NotRegistered`, FCM's `UNREGISTERED`…), the
    /// error, or why not attempted.
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
            message_id: r.message_id,
            error: r.error,
            attempts: r.attempts,
            possible_duplicates: r.possible_duplicates,
            at: rfc3339(r.at),
        }
    }
}

/// A page of rows.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::delivery_page)]
pub(super) struct DeliveryPage {
    /// The rows, in registration id order.
    deliveries: Vec<DeliveryView>,
    /// Pass it as `after` for the next page; `null` on the last one.
    next: Option<String>,
}

/// What became of a push on each device: one row per device, in registration id order.
#[utoipa::path(
    get, path = "/v1/pushes/{id}/deliveries", tag = "pushes",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the push's id", example = "1"), DeliveriesQuery),
    responses(
        (status = 200, description = "a page of rows", body = DeliveryPage),
        (status = 404, description = "no such push", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn deliveries(
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
