//! `POST /v1/pushes/{id}/finish`: a cancelled push, finished by a push to the devices it did
//! not reach, and only them.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use super::auth::Admin;
use super::error::{AdminErrors, ApiError, ErrorBody, KeyErrors, ParamErrors};
use super::extract::PathParam;
use super::pushes::{PushView, find};
use crate::store::{Audience, NewPush, Push, PushState};

/// The idempotency key of the push that finishes push `id`: one finishing push per
/// cancelled push, however often it is asked for.
fn finishing_key(id: i64) -> String {
    format!("c2dm-finish-of-{id}")
}

/// What the push that finishes `cancelled` sends to: the listed ids it did not reach, for a
/// push to listed ids (which may name devices never registered); else the devices it did not
/// reach that are still active, walked from its rows.
fn remaining_audience(cancelled: &Push, rows: Option<Vec<String>>) -> Audience {
    match rows {
        Some(registration_ids) => Audience::RegistrationIds { registration_ids },
        None => Audience::Remaining {
            remaining_of: cancelled.id,
        },
    }
}

/// Finishes a cancelled push: a new push, with the same collapse key and data, to the devices
/// it did not reach (its `not_attempted: cancelled` rows), and only them. Asked again, it
/// answers the same push (200): one finishing push per cancelled push.
#[utoipa::path(
    post, path = "/v1/pushes/{id}/finish", tag = "pushes",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "the cancelled push's id", example = "1")),
    responses(
        (status = 202, description = "the push that finishes it, stored and queued", body = PushView),
        (status = 200, description = "asked again: the push that finishes it, made the first time", body = PushView),
        (status = 404, description = "no such push", body = ErrorBody),
        (status = 409, description = "the push is not cancelled, or has finished (`not_cancelled`), or it reached every device (`nothing_left`)", body = ErrorBody),
        ParamErrors,
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn finish(
    State(state): State<AppState>,
    _: Admin,
    PathParam(id): PathParam,
) -> Result<(StatusCode, Json<PushView>), ApiError> {
    let cancelled = find(&state, &id).await?;
    let key = finishing_key(cancelled.id);
    if let Some(made) = state.store.push_by_idempotency_key(&key).await? {
        return Ok((StatusCode::OK, Json(made.into())));
    }
    if cancelled.state != PushState::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancelled",
            format!(
                "the push is {}: only a cancelled push is finished",
                cancelled.state.as_str()
            ),
        ));
    }
    let left = cancelled
        .counts
        .not_attempted
        .get("cancelled")
        .copied()
        .unwrap_or(0);
    if left == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "nothing_left",
            "the push reached every device before its cancel: nothing is left to send",
        ));
    }
    let listed = match &cancelled.audience {
        Audience::RegistrationIds { .. } => Some(state.store.cancelled_ids(cancelled.id).await?),
        _ => None,
    };
    let push = NewPush {
        idempotency_key: Some(key),
        audience: remaining_audience(&cancelled, listed),
        collapse_key: cancelled.collapse_key.clone(),
        data: cancelled.data.clone(),
        delay_while_idle: cancelled.delay_while_idle,
    };
    let (created, made) = state.store.create_push(&push).await?;
    if !created {
        // Made by another request meanwhile: the same push.
        return Ok((StatusCode::OK, Json(made.into())));
    }
    metrics::counter!("c2dm_pushes_total").increment(1);
    tracing::info!(
        push_id = made.id,
        finishes = cancelled.id,
        devices = left,
        "push made to finish a cancelled one"
    );
    Ok((StatusCode::ACCEPTED, Json(made.into())))
}
