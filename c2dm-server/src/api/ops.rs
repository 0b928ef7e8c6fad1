//! `/healthz` and `/metrics`, and the listener of their own for a worker process.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Admin;
use super::error::{AdminErrors, ApiError, KeyErrors};
use crate::health::WorkerHealth;
use crate::store::Store;

/// `/healthz` (no key) and `/metrics` (the admin token) on the API's listener.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
}

/// The Prometheus recorder of this process: installed on first use as the global recorder of
/// the `metrics` crate; if the embedding program installed another one, ours renders what it
/// has (nothing), and theirs gets the figures.
pub(super) fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| match crate::telemetry::builder().install_recorder() {
        Ok(handle) => {
            crate::telemetry::describe();
            handle
        }
        Err(err) => {
            tracing::warn!(%err, "another metrics recorder is installed: /metrics stays empty");
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle()
        }
    })
}

/// Makes sure the recorder is installed before the first figure is counted.
pub fn install_metrics() {
    prometheus();
}

/// Prometheus text, every family described and every known series from 0: registrations,
/// pushes and their durations, deliveries by outcome, rejections by code, gone devices, queue
/// depth and oldest due job, pauses, budget left, logins, the build and the process.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the figures", body = String, content_type = "text/plain; version=0.0.4",
            example = "# HELP c2dm_pushes_total Pushes made through the API.\n# TYPE c2dm_pushes_total counter\nc2dm_pushes_total 1\n"),
        AdminErrors,
        KeyErrors,
    )
)]
pub(super) async fn metrics_text(_: Admin) -> Response {
    rendered_metrics()
}

pub(super) fn rendered_metrics() -> Response {
    crate::telemetry::process().collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// `GET /metrics` and `GET /healthz` over `store`, without a key: for a listener of its own
/// (`c2dm serve --metrics-listen`), where a worker process without the API is scraped and
/// checked. Keep it on an address only the scraper and the process manager reach.
pub fn ops_router(store: Store) -> Router {
    install_metrics();
    Router::new()
        .route("/metrics", get(|| async { rendered_metrics() }))
        .route(
            "/healthz",
            get(
                |State(store): State<Store>, workers: Option<Extension<WorkerHealth>>| async move {
                    health(&store, workers).await
                },
            ),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(store)
}

/// The answer to `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::health)]
pub(super) struct Health {
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
pub(super) async fn healthz(
    State(state): State<AppState>,
    workers: Option<Extension<WorkerHealth>>,
) -> Response {
    health(&state.store, workers).await
}

/// The health check's answer: 200 when `store` answers and this process's workers (told by
/// the `WorkerHealth` extension, where the server adds one) can work, else 503 naming why.
pub(super) async fn health(store: &Store, workers: Option<Extension<WorkerHealth>>) -> Response {
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
