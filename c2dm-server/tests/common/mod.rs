//! What the server's integration tests share: one request to the router, its answer as JSON.
#![allow(dead_code)] // each test file uses its own part

use axum::Router;
use axum::body::Body;
use c2dm_core::{AuthToken, Sender, StaticToken};
use c2dm_emulator::{Config, Emulator};
use c2dm_server::api::{Key, Keys, router};
use c2dm_server::jobs::{Queues, WorkerOptions, run_workers};
use c2dm_server::serve::open_database;
use c2dm_server::store::Store;
use c2dm_testkit::PostgresCluster;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
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
    pub store: Store,
    pub queues: Queues,
    pub database: Database,
}

impl Api {
    pub async fn start(db: Db) -> Self {
        Self::start_with(db, &WorkerOptions::default()).await
    }

    /// With the queues' heartbeat of `options`.
    pub async fn start_with(db: Db, options: &WorkerOptions) -> Self {
        Self::start_on(db.fresh().await, options).await
    }

    /// On `database`, with the queues' heartbeat of `options`.
    pub async fn start_on(database: Database, options: &WorkerOptions) -> Self {
        let (store, queues) = open_database(&database.url, options).await.unwrap();
        let keys = Keys::new(Key::new(ADMIN).unwrap(), Key::new(DEVICE).unwrap()).unwrap();
        Self {
            app: router(store.clone(), keys),
            store,
            queues,
            database,
        }
    }
}

/// An API over a fresh database, with the emulator standing in for C2DM and workers on
/// demand.
pub struct Server {
    pub app: Router,
    pub store: Store,
    pub queues: Queues,
    pub emulator: Emulator,
    pub database: Database,
}

impl Server {
    pub async fn start(db: Db) -> Self {
        Self::start_with(db, |_| {}, &WorkerOptions::default()).await
    }

    /// With the emulator's configuration changed by `configure`, and the queues' heartbeat of
    /// `options`.
    pub async fn start_with(
        db: Db,
        configure: impl FnOnce(&mut Config),
        options: &WorkerOptions,
    ) -> Self {
        Self::start_on(db.fresh().await, configure, options).await
    }

    /// [`Server::start_with`] on `database`.
    pub async fn start_on(
        database: Database,
        configure: impl FnOnce(&mut Config),
        options: &WorkerOptions,
    ) -> Self {
        let api = Api::start_on(database, options).await;
        let mut config = Config {
            static_tokens: vec!["server-token".into()],
            devices: c2dm_emulator::DeviceRules {
                not_registered_prefixes: vec!["gone-".into()],
                invalid_prefixes: vec!["bad-".into()],
                ..Default::default()
            },
            ..Config::default()
        };
        configure(&mut config);
        let emulator = Emulator::start(config).await.unwrap();
        Self {
            app: api.app,
            store: api.store,
            queues: api.queues,
            emulator,
            database: api.database,
        }
    }

    /// A sender to the emulator, over `transport`.
    pub fn sender_over(&self, transport: impl c2dm_core::Transport + 'static) -> Sender {
        Sender::builder(
            transport,
            StaticToken::new(AuthToken::new("server-token").unwrap()),
        )
        .endpoint(self.emulator.send_url().parse().unwrap())
        .build()
    }

    /// Runs this process's workers until the returned sender is dropped or fired; their
    /// sends are timed, as `c2dm serve` times them.
    pub fn workers(&self, options: WorkerOptions) -> tokio::sync::oneshot::Sender<()> {
        let sender = self.sender_over(c2dm_server::telemetry::MeteredTransport::new(
            c2dm_hyper::HyperTransport::new().unwrap(),
            "c2dm",
        ));
        self.workers_with(sender, options)
    }

    /// The emulator's FCM sender: its service account's tokens, over HTTP/2 when TLS.
    pub fn fcm_sender(&self) -> Sender<c2dm_fcm::Fcm> {
        let transport = c2dm_hyper::HyperTransport::builder()
            .http2(true)
            .build()
            .unwrap();
        let key = c2dm_fcm::ServiceAccountKey::from_json(self.emulator.fcm_key_file().as_bytes())
            .unwrap();
        let tokens = c2dm_fcm::ServiceAccountTokens::new(key, transport.clone());
        Sender::with_protocol(
            c2dm_fcm::Fcm::new(c2dm_emulator::fcm::PROJECT_ID).unwrap(),
            transport,
            tokens,
        )
        .endpoint(self.emulator.fcm_send_url().parse().unwrap())
        .build()
    }

    /// Runs workers with `senders` until [`Workers::stop`], which returns once they have
    /// stopped: the next workers started are the only ones to take jobs.
    pub fn stoppable_workers(
        &self,
        senders: impl Into<c2dm_server::jobs::Senders>,
        options: WorkerOptions,
    ) -> Workers {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run_workers(
            self.store.clone(),
            senders.into(),
            self.queues.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Workers { stop, running }
    }

    /// Runs workers with `sender` (or senders) until the returned sender is dropped or fired.
    pub fn workers_with(
        &self,
        sender: impl Into<c2dm_server::jobs::Senders>,
        options: WorkerOptions,
    ) -> tokio::sync::oneshot::Sender<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let store = self.store.clone();
        let senders: c2dm_server::jobs::Senders = sender.into();
        tokio::spawn(run_workers(
            store,
            senders,
            self.queues.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        stop
    }

    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_with(method, uri, key, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        uri: &str,
        key: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let body = body.map(|b| Body::from(b.to_string()));
        call(&self.app, method, uri, Some(key), body, headers).await
    }

    pub async fn register(&self, id: &str, user: Option<&str>, tags: &[&str]) {
        let (status, body) = self
            .call(
                "POST",
                "/v1/devices",
                DEVICE,
                Some(json!({"registration_id": id, "user_id": user, "tags": tags})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn push(&self, to: Value) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/v1/pushes",
                ADMIN,
                Some(json!({"to": to, "collapse_key": "news", "data": {"message": "hello"}})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// The push's status once it is finished (done or cancelled): the server holds the
    /// answer until then (`?wait=`), up to a minute, after which the test fails rather than
    /// hangs.
    pub async fn finished(&self, id: &str) -> Value {
        let (status, message) = self
            .call("GET", &format!("/v1/pushes/{id}?wait=60"), ADMIN, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{message}");
        assert!(
            matches!(message["state"].as_str(), Some("done" | "cancelled")),
            "not finished within a minute: {message}"
        );
        message
    }

    /// Waits, as the store records work in this process, until the push's status passes
    /// `test` (two minutes at most, then the test fails).
    pub async fn until(&self, id: &str, test: impl Fn(&Value) -> bool) -> Value {
        let mut changes = self.store.changes();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let (_, message) = self
                .call("GET", &format!("/v1/pushes/{id}"), ADMIN, None)
                .await;
            if test(&message) {
                return message;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => panic!("still {message}"),
            }
        }
    }

    /// Every row of a push, page after page.
    pub async fn rows(&self, id: &str, query: &str) -> Vec<Value> {
        let mut rows = Vec::new();
        let mut after = String::new();
        loop {
            let uri = format!("/v1/pushes/{id}/deliveries?limit=7{query}{after}");
            let (status, page) = self.call("GET", &uri, ADMIN, None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            rows.extend(page["deliveries"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return rows,
            }
        }
    }
}

/// Workers started by [`Server::stoppable_workers`].
pub struct Workers {
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), c2dm_server::jobs::JobError>>,
}

impl Workers {
    /// Stops the workers and waits until they have.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap().unwrap();
    }
}

/// Fails unless Prometheus' `promtool check metrics` (Debian's `prometheus` package) finds
/// `text` well formed and lint-clean.
pub fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (apt-get install -y prometheus) cannot be run: {e}"));
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
