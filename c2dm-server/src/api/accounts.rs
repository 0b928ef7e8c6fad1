//! `/v1/accounts`: the sender accounts every worker shares, with their pause and budget, so
//! that an operator (and the console's banner) sees that sends are paused, until when and why.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{AdminErrors, ApiError, KeyErrors};
use super::{AppState, rfc3339};
use crate::store::AccountState;

/// `GET /v1/accounts` (the admin token).
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/accounts", get(accounts))
}

/// A sender account as the workers share it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::account)]
pub(super) struct AccountView {
    /// C2DM's account by its name; an FCM project as `fcm:<project id>`.
    account: String,
    /// Until when no worker sends for it (RFC 3339); `null` when it is not paused.
    paused_until: Option<String>,
    /// Why it is paused: the provider's answer that began or last extended the pause.
    pause_reason: Option<String>,
    /// The budget period (days since the epoch, UTC, in periods of `--budget-period`) that
    /// `budget_used` counts.
    budget_day: i64,
    /// Messages reserved in that period by every worker.
    budget_used: u64,
}

impl From<AccountState> for AccountView {
    fn from(a: AccountState) -> Self {
        Self {
            account: a.account,
            paused_until: a.paused_until.map(rfc3339),
            pause_reason: a.pause_reason,
            budget_day: a.budget_day,
            budget_used: a.budget_used,
        }
    }
}

/// The sender accounts.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::accounts)]
pub(super) struct AccountList {
    /// By name; an account appears once a worker has reserved budget or paused for it.
    accounts: Vec<AccountView>,
}

/// The sender accounts every worker shares: whether each is paused, until when and why, and
/// its budget's use.
#[utoipa::path(
    get, path = "/v1/accounts", tag = "operations",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the accounts", body = AccountList),
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn accounts(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<AccountList>, ApiError> {
    let accounts = state.store.accounts().await?;
    Ok(Json(AccountList {
        accounts: accounts.into_iter().map(AccountView::from).collect(),
    }))
}
