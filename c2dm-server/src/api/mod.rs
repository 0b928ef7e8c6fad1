//! The HTTP API: JSON in and out, keys in `Authorization: Bearer`, errors as
//! `{"error": {"code", "message", "field"}}`, never a 500 for bad input.
//!
//! One module per resource, each owning its routes' handlers and types: `devices`
//! (`/v1/devices`, `/v1/device-counts`), `pushes` (`/v1/pushes`), `deliveries` (a push's
//! rows), `accounts`
//! (`/v1/accounts`: pauses and budgets), `ops`
//! (`/healthz`, `/metrics`) and `openapi` (the contract); beside them `auth` (the keys, and
//! the permission extractors), `error` (the one error type) and `extract` (the extractors
//! whose rejections are errors). The API's table lives in one place, the OpenAPI document
//! ([`openapi`](openapi::openapi)).

mod accounts;
mod auth;
mod deliveries;
mod devices;
mod error;
mod examples;
mod extract;
mod finish;
mod openapi;
mod ops;
mod pushes;

pub use auth::{InvalidKey, Key, Keys, MIN_KEY_LEN};
pub use error::ApiError;
pub use openapi::openapi;
pub use ops::{install_metrics, ops_router};

use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::store::Store;

/// The largest request body taken, in bytes (a larger one is refused with 413): room for a
/// push listing its most registration ids.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The most devices one page lists.
pub const MAX_PAGE: u32 = 1000;

/// The longest a request may take, body read and answer written, before it is answered 503
/// `timeout` (a status request's `wait` comes on top). A transaction the request had under way
/// is rolled back.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    store: Store,
    keys: Keys,
}

/// The API over `store`, authorised by `keys`: each resource's routes, the operator's console
/// ([`crate::console`]) at `/`, and the contract at `/openapi.json`. The routes, their keys and
/// their answers are listed in one place, the OpenAPI document ([`openapi()`]).
///
/// A push is stored with its job, in one transaction, before the answer; workers
/// ([`run_workers`](crate::jobs::run_workers)) do the sending.
pub fn router(store: Store, keys: Keys) -> Router {
    install_metrics();
    let quick = devices::routes()
        .merge(pushes::routes())
        .merge(accounts::routes())
        .merge(ops::routes())
        .route("/openapi.json", get(openapi::openapi_json));
    with_timeout(quick, REQUEST_TIMEOUT)
        // A status request may wait for its push to finish: its bound is longer by that wait.
        .merge(with_timeout(
            pushes::waiting_routes(),
            REQUEST_TIMEOUT + Duration::from_secs(pushes::MAX_WAIT),
        ))
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

/// The longest text field taken (ids, versions, tags), in characters.
const MAX_TEXT: usize = 256;
/// The most tags a device may have.
const MAX_TAGS: usize = 32;

fn text_field(field: &'static str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value.as_deref().and_then(|v| text_problem(field, v)) {
        Some(problem) => Err(ApiError::field(field, problem)),
        None => Ok(value),
    }
}

/// A text query parameter, checked as [`text_field`] checks a body's (400 when wrong).
fn query_text(param: &'static str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value.as_deref().and_then(|v| text_problem(param, v)) {
        Some(problem) => Err(ApiError::query(param, problem)),
        None => Ok(value),
    }
}

/// What is wrong with a text field's value, if anything: empty, too long, control characters.
fn text_problem(field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        Some(format!("{field} is empty"))
    } else if value.chars().count() > MAX_TEXT {
        Some(format!("{field} is over {MAX_TEXT} characters"))
    } else if value.chars().any(char::is_control) {
        Some(format!("{field} has control characters"))
    } else {
        None
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
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

/// `GET /v1/devices/{registration_id}/deliveries` and `GET /v1/pushes` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct NewestFirstQuery {
    /// Where this page starts: an earlier page's `next`.
    #[param(pattern = "^[1-9][0-9]{0,17}$", example = "1")]
    after: Option<String>,
    /// How many at most (1 to 1000, 100 if not given).
    #[param(minimum = 1, maximum = 1000, example = 50)]
    limit: Option<u32>,
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
        let mut operation_ids = std::collections::HashSet::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                documented.push(format!("{} {path}", method.to_uppercase()));
                // A client generated from the document names its methods by these.
                let id = op["operationId"].as_str().expect("an operationId");
                assert!(
                    operation_ids.insert(id.to_owned()),
                    "operationId {id} twice"
                );
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
            "POST /v1/pushes",
            "GET /v1/pushes",
            "GET /v1/pushes/{id}",
            "GET /v1/pushes/{id}/deliveries",
            "POST /v1/pushes/{id}/cancel",
            "POST /v1/pushes/{id}/finish",
            "GET /v1/accounts",
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
