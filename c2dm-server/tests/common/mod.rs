//! What the server's integration tests share: one request to the router, its answer as JSON.
#![allow(dead_code)] // each test file uses its own part

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use c2dm_server::api::{Key, Keys, router};
use c2dm_server::jobs::Queues;
use c2dm_server::store::SqliteStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Sends one request to `app`: with `key` as a Bearer key, `body` as JSON, and `headers`. An
/// answer that is not JSON fails the test (every answer of the API is), but an empty one.
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Body>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            body
        }
        None => Body::empty(),
    };
    let response = app
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    if bytes.is_empty() {
        return (status, Value::Null);
    }
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

/// The admin token of the tests' servers.
pub const ADMIN: &str = "admin-token-for-tests";
/// The device key of the tests' servers.
pub const DEVICE: &str = "device-key-for-tests";

/// A fresh SQLite file, its store and queues, and the API over them with the tests' keys.
pub struct Api {
    pub app: Router,
    pub store: SqliteStore,
    pub queues: Queues,
    pub dir: tempfile::TempDir,
}

impl Api {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let queues = Queues::open(store.pool()).await.unwrap();
        let keys = Keys {
            admin: Key::new(ADMIN).unwrap(),
            device: Key::new(DEVICE).unwrap(),
        };
        Self {
            app: router(Arc::new(store.clone()), queues.clone(), keys),
            store,
            queues,
            dir,
        }
    }
}
