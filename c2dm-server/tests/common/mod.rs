//! What the server's integration tests share: one request to the router, its answer as JSON.
#![allow(dead_code)] // each test file uses its own part

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use c2dm_server::api::{Key, Keys, router};
use c2dm_server::jobs::{Queues, WorkerOptions};
use c2dm_server::serve::open_database;
use c2dm_server::store::Store;
use c2dm_server::throwaway::PostgresCluster;
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

/// The databases every test of the server's API runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    /// A fresh file.
    Sqlite,
    /// A fresh database on this test binary's throwaway cluster.
    Postgres,
}

/// A fresh database: its URL, and the folder that holds it, if it is a file.
pub struct Database {
    pub url: String,
    pub dir: Option<tempfile::TempDir>,
}

impl Db {
    /// A database no other test uses. A PostgreSQL that cannot start fails the test.
    pub async fn fresh(self) -> Database {
        match self {
            Db::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
                Database {
                    url,
                    dir: Some(dir),
                }
            }
            Db::Postgres => {
                let cluster = PostgresCluster::shared().unwrap_or_else(|e| panic!("{e}"));
                let url = cluster
                    .create_database("test")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                Database { url, dir: None }
            }
        }
    }
}

/// Runs each named `async fn name(db: Db)` of the file once per database, as the tests
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! on_each_database {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::Db::Postgres).await
                }
            )*
        }
    };
}

/// A fresh database, its store and queues, and the API over them with the tests' keys.
pub struct Api {
    pub app: Router,
    pub store: Arc<dyn Store>,
    pub queues: Queues,
    pub database: Database,
}

impl Api {
    pub async fn start(db: Db) -> Self {
        Self::start_with(db, &WorkerOptions::default()).await
    }

    /// With the queues' heartbeat of `options`.
    pub async fn start_with(db: Db, options: &WorkerOptions) -> Self {
        let database = db.fresh().await;
        let (store, queues) = open_database(&database.url, options).await.unwrap();
        let keys = Keys {
            admin: Key::new(ADMIN).unwrap(),
            device: Key::new(DEVICE).unwrap(),
        };
        Self {
            app: router(Arc::clone(&store), queues.clone(), keys),
            store,
            queues,
            database,
        }
    }
}
