//! One server process: the API, the workers, or both, on one database, until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use crate::api::{Keys, router};
use crate::health::WorkerHealth;
use crate::jobs::{JobError, Queues, Senders, WorkerOptions, run_workers_reporting};
use crate::listen::{HttpLimits, serve_http};
use crate::store::{Store, StoreError};

/// What one process does. Its `Debug` hides the database URL's password.
#[derive(Clone)]
pub struct ServeOptions {
    /// The database: `sqlite://c2dm.db` (a file, created if missing) or
    /// `postgres://user@host/db` (shared by many processes).
    pub database: String,
    /// Serve the API on this address, with these keys; `None` for a worker-only process.
    pub api: Option<(SocketAddr, Keys)>,
    /// Write the API's bound port here once it listens (useful with port 0); in a process
    /// without the API, the metrics listener's.
    pub port_file: Option<PathBuf>,
    /// Run workers with these options; `None` for an API-only process.
    pub workers: Option<WorkerOptions>,
    /// Also serve `GET /metrics` and `GET /healthz`, without a key, on this address (for a
    /// worker-only process, whose figures the API's `/metrics` of another process does not
    /// show, and whose health only it can tell).
    pub metrics: Option<SocketAddr>,
    /// Bounds on the listeners' connections: slow heads, idle connections, how many.
    pub http: HttpLimits,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("database", &redacted_url(&self.database))
            .field("api", &self.api)
            .field("port_file", &self.port_file)
            .field("workers", &self.workers)
            .field("metrics", &self.metrics)
            .field("http", &self.http)
            .finish()
    }
}

/// `url` with its password, if it has one (`user:password@`, or `password=` among its
/// parameters), replaced by `<redacted>`: what `Debug` and logs may show of a database URL.
///
/// ```
/// use c2dm_server::serve::redacted_url;
/// assert_eq!(
///     redacted_url("postgres://c2dm:s3cret@db/c2dm?sslmode=require&password=s3cret"),
///     "postgres://c2dm:<redacted>@db/c2dm?sslmode=require&password=<redacted>"
/// );
/// assert_eq!(redacted_url("sqlite://c2dm.db"), "sqlite://c2dm.db");
/// ```
pub fn redacted_url(url: &str) -> String {
    let mut shown = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            shown = format!("{scheme}://{user}:<redacted>@{host}{tail}");
        }
    }
    if let Some((path, query)) = shown.clone().split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                    format!("{key}=<redacted>")
                }
                _ => pair.to_owned(),
            })
            .collect();
        shown = format!("{path}?{}", query.join("&"));
    }
    shown
}

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database URL names no database the server knows.
    #[error("unsupported database URL: it starts with sqlite: or postgres:")]
    UnsupportedDatabase,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The job queue failed.
    #[error(transparent)]
    Jobs(#[from] JobError),
    /// The listening socket or the port file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the API and the workers as `options` says, until `shutdown` completes: then the API
/// stops taking connections and finishes the requests under way (for at most
/// [`HttpLimits::shutdown_grace`]), and each batch in hand stops its sends, writes the rows it
/// has and leaves the rest to its next run. `on_listening` is told the API's address once it listens; in a process without
/// the API, the metrics listener's (whose port then goes to `port_file`).
pub async fn serve(
    options: ServeOptions,
    sender: impl Into<Senders> + Send,
    on_listening: impl FnOnce(SocketAddr) + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    boxed(
        options,
        sender.into(),
        Box::new(on_listening),
        Box::pin(shutdown),
    )
    .await
}

/// [`serve`] as a boxed future: not generic, so that the server (with the queue, the database
/// and the API under it) is compiled once, in this crate and at its optimisation level, not
/// again in each caller's. (A generic function's body, and every future it awaits, are
/// compiled where it is called.)
fn boxed(
    options: ServeOptions,
    sender: Senders,
    on_listening: Box<dyn FnOnce(SocketAddr) + Send>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
) -> Pin<Box<dyn Future<Output = Result<(), ServeError>> + Send>> {
    Box::pin(unboxed(options, sender, on_listening, shutdown))
}

async fn unboxed(
    options: ServeOptions,
    sender: Senders,
    on_listening: Box<dyn FnOnce(SocketAddr) + Send>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
) -> Result<(), ServeError> {
    if let Some(workers) = &options.workers {
        workers.check().map_err(JobError::from)?;
    }
    crate::api::install_metrics();
    let worker_options = options.workers.clone().unwrap_or_default();
    let (store, queues) = open_database(&options.database, &worker_options).await?;
    let fcm_project = sender
        .fcm
        .as_ref()
        .map(|fcm| fcm.protocol().project_id().to_owned());
    match &options.workers {
        Some(w) => tracing::info!(
            database = redacted_url(&options.database),
            api = options.api.is_some(),
            workers = w.workers,
            concurrency = w.concurrency,
            batch_size = w.batch_size,
            account = w.account,
            daily_budget = w.daily_budget,
            c2dm = sender.c2dm.is_some(),
            fcm_project,
            "starting"
        ),
        None => tracing::info!(
            database = redacted_url(&options.database),
            api = options.api.is_some(),
            workers = 0,
            "starting"
        ),
    }
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |stop: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    // What the workers say of themselves, for both listeners' `/healthz`.
    let health = WorkerHealth::default();
    let mut on_listening = Some(on_listening);
    let mut listening = |bound: SocketAddr| -> Result<(), ServeError> {
        if let Some(path) = &options.port_file {
            std::fs::write(path, format!("{}\n", bound.port()))?;
        }
        if let Some(tell) = on_listening.take() {
            tell(bound);
        }
        Ok(())
    };
    let api = match options.api {
        Some((address, keys)) => {
            let listener = tokio::net::TcpListener::bind(address).await?;
            let bound = listener.local_addr()?;
            listening(bound)?;
            tracing::info!(%bound, console = %format!("http://{bound}/"), "API listening");
            let app = router(store.clone(), keys).layer(axum::Extension(health.clone()));
            let signal = stopped(&stop);
            Some(tokio::spawn(serve_http(
                listener,
                app,
                options.http,
                signal,
            )))
        }
        None => None,
    };
    let metrics = match options.metrics {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address).await?;
            let bound = listener.local_addr()?;
            if api.is_none() {
                listening(bound)?;
            }
            tracing::info!(%bound, "metrics and health listening");
            let signal = stopped(&stop);
            let app = crate::api::ops_router(store.clone()).layer(axum::Extension(health.clone()));
            Some(tokio::spawn(serve_http(
                listener,
                app,
                options.http,
                signal,
            )))
        }
        None => None,
    };
    let workers = options.workers.map(|worker_options| {
        let signal = stopped(&stop);
        tokio::spawn(run_workers_reporting(
            store.clone(),
            sender,
            queues.clone(),
            worker_options,
            health.clone(),
            signal,
        ))
    });
    shutdown.await;
    tracing::info!("stopping: finishing the requests and jobs in hand");
    let _ = stop.send(());
    for listener in [api, metrics].into_iter().flatten() {
        listener
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    if let Some(workers) = workers {
        workers
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
    }
    Ok(())
}

/// The store and the queues in the database at `url`: `sqlite:…` or `postgres:…` (also
/// `postgresql:…`), created or migrated now; the queues' heartbeat is `options`'.
pub async fn open_database(
    url: &str,
    options: &WorkerOptions,
) -> Result<(Store, Queues), ServeError> {
    if url.starts_with("sqlite:") {
        let store = Store::open_sqlite(url).await?;
        let queues = Queues::open_beside(&store, options).await?;
        Ok((store, queues))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        // The batches at once, the push walker, the API's requests and the account watcher.
        let connections = u32::try_from(options.workers)
            .unwrap_or(64)
            .saturating_add(8);
        let store = Store::open_postgres(url, connections).await?;
        let queues = Queues::open_beside(&store, options).await?;
        Ok((store, queues))
    } else {
        Err(ServeError::UnsupportedDatabase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_debug_hides_the_database_password() {
        let options = ServeOptions {
            database: "postgres://c2dm:hunter2@db:5432/c2dm?password=hunter2".into(),
            api: None,
            port_file: None,
            workers: None,
            metrics: None,
            http: HttpLimits::default(),
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://c2dm:<redacted>@db:5432/c2dm"),
            "{shown}"
        );
    }

    #[test]
    fn urls_without_a_password_are_shown_whole() {
        for url in [
            "sqlite://c2dm.db",
            "sqlite::memory:",
            "postgres://c2dm@db/c2dm",
            "postgres://db/c2dm?sslmode=require",
        ] {
            assert_eq!(redacted_url(url), url);
        }
        assert_eq!(
            redacted_url("postgresql://u:p@h"),
            "postgresql://u:<redacted>@h"
        );
    }
}
