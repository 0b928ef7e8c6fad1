//! The server under faults that are not a crash: a database write that fails for a while (a
//! trigger standing in for a full disk), a database that goes away (a locked SQLite file, a
//! PostgreSQL cluster stopped and started again). No push is left stuck, no device is sent a
//! push twice without its row counting it, and the health check says when the workers cannot
//! work. Real faults, against the emulator.

#[macro_use]
mod common;

use std::time::Duration;

use c2dm_server::health::WorkerHealth;
use c2dm_server::jobs::{WorkerOptions, run_workers_reporting};
use c2dm_testkit::PostgresCluster;
use serde_json::{Value, json};
use sqlx::Connection;

use common::{Database, Db, Server};

/// Workers that report to `health`, until the returned sender is dropped.
fn workers(
    server: &Server,
    options: WorkerOptions,
    health: &WorkerHealth,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sender = server.sender_over(c2dm_hyper::HyperTransport::new().unwrap());
    tokio::spawn(run_workers_reporting(
        server.store.clone(),
        sender,
        server.queues.clone(),
        options,
        health.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    stop
}

/// `GET /healthz` of the server's API with its workers' `health`, as `c2dm serve` wires them.
async fn healthz(server: &Server, health: &WorkerHealth) -> (u16, Value) {
    let app = server.app.clone().layer(axum::Extension(health.clone()));
    let (status, answer) = common::call(&app, "GET", "/healthz", None, None, &[]).await;
    (status.as_u16(), answer)
}

/// Waits until the workers cannot work, and checks that `/healthz` says so.
async fn workers_unavailable(server: &Server, health: &WorkerHealth) {
    health_until(health, "failing", |problem| problem.is_some()).await;
    let (status, answer) = healthz(server, health).await;
    assert_eq!(status, 503, "{answer}");
    let said = answer["status"].as_str().unwrap();
    assert!(said.contains("workers unavailable"), "{answer}");
}

/// Waits until the workers can work again, and checks that `/healthz` says so.
async fn workers_available(server: &Server, health: &WorkerHealth) {
    health_until(health, "healthy", |problem| problem.is_none()).await;
    assert_eq!(healthz(server, health).await.0, 200);
}

/// Waits until the workers' health passes `ok` (two minutes at most).
async fn health_until(health: &WorkerHealth, what: &str, ok: impl Fn(Option<&str>) -> bool) {
    tokio::time::timeout(Duration::from_secs(120), health.wait_for(ok))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the workers' health never became {what}: {:?}",
                health.problem()
            )
        });
}

async fn register(server: &Server, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("phone-{i:04}")).collect();
    for id in &ids {
        server.register(id, None, &[]).await;
    }
    ids
}

/// Every device has exactly one row, and every copy the emulator took beyond the first is
/// counted as a possible duplicate in it.
async fn every_device_once_and_every_copy_counted(server: &Server, id: &str, ids: &[String]) {
    let rows = server.rows(id, "").await;
    assert_eq!(rows.len(), ids.len(), "one row per device");
    let mut uncounted = Vec::new();
    for row in &rows {
        let device = row["registration_id"].as_str().unwrap();
        let copies = server.emulator.inbox(device).len() as u64;
        let counted = row["possible_duplicates"].as_u64().unwrap();
        if copies > counted + 1 {
            uncounted.push(format!("{device}: {copies} copies, {counted} counted"));
        }
        assert_eq!(row["outcome"], "accepted", "{row}");
    }
    assert!(uncounted.is_empty(), "copies not counted: {uncounted:?}");
}

/// `INSERT INTO deliveries` fails (a trigger) until it is dropped: as a full disk or an I/O
/// error would.
async fn fail_row_writes(db: Db, url: &str) {
    match db {
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::raw_sql(
                "CREATE TRIGGER fail_rows BEFORE INSERT ON deliveries \
                 BEGIN SELECT RAISE(ABORT, 'disk full (a test''s trigger)'); END",
            )
            .execute(&mut conn)
            .await
            .unwrap();
        }
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(
                "CREATE FUNCTION fail_rows() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'disk full (a test''s trigger)'; END $$; \
                 CREATE TRIGGER fail_rows BEFORE INSERT ON deliveries \
                 FOR EACH STATEMENT EXECUTE FUNCTION fail_rows()",
            )
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
}

async fn allow_row_writes(db: Db, url: &str) {
    let sql = "DROP TRIGGER fail_rows";
    match db {
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql("DROP TRIGGER fail_rows ON deliveries")
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// Rows that cannot be written for a while: each batch keeps its rows and tries again, with
/// backoff, without sending again; the push's status says what fails and since when; once
/// the writes pass, the push finishes with one row per device, each device sent once.
async fn a_failing_write_is_retried_in_place_and_never_resends(db: Db) {
    let server = Server::start(db).await;
    let ids = register(&server, 600).await;
    fail_row_writes(db, &server.database.url).await;
    let health = WorkerHealth::default();
    let _workers = workers(
        &server,
        WorkerOptions {
            batch_size: 200,
            concurrency: 16,
            ..WorkerOptions::default()
        },
        &health,
    );
    let id = server.push(json!("all")).await;
    let failing = server
        .until(&id, |m| {
            !m["last_error"]["failing_since"].is_null()
                && m["last_error"]["failing_since"].is_string()
        })
        .await;
    assert!(
        failing["last_error"]["error"]
            .as_str()
            .unwrap()
            .contains("disk full"),
        "{failing}"
    );
    assert_eq!(failing["state"], "sending");
    assert!(server.emulator.counters().accepted <= 600);
    allow_row_writes(db, &server.database.url).await;
    let done = server.finished(&id).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["tally"]["accepted"], 600, "{done}");
    assert!(done["last_error"]["failing_since"].is_null(), "{done}");
    assert!(
        done["last_error"]["error"].is_string(),
        "the last error stays: {done}"
    );
    assert_eq!(
        server.emulator.counters().accepted,
        600,
        "nothing sent again"
    );
    every_device_once_and_every_copy_counted(&server, &id, &ids).await;
    assert_eq!(health.problem(), None);
}

on_each_database!(a_failing_write_is_retried_in_place_and_never_resends);

/// Another process holds the SQLite file's write lock for longer than a connection waits:
/// the workers' queue fails, the health check says so, and the workers start again when the
/// lock is released; a push made then finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_carry_on_after_a_locked_sqlite_file() {
    let options = WorkerOptions {
        heartbeat: Duration::from_secs(1),
        ..WorkerOptions::default()
    };
    let server = Server::start_with(Db::Sqlite, |_| {}, &options).await;
    let ids = register(&server, 50).await;
    let health = WorkerHealth::default();
    let _workers = workers(&server, options, &health);
    let first = server.push(json!("all")).await;
    server.finished(&first).await;
    server.emulator.clear_inbox();

    let mut locker = sqlx::SqliteConnection::connect(&server.database.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    workers_unavailable(&server, &health).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();

    let second = server.push(json!("all")).await;
    let done = server.finished(&second).await;
    assert_eq!(done["tally"]["accepted"], 50, "{done}");
    every_device_once_and_every_copy_counted(&server, &second, &ids).await;
    workers_available(&server, &health).await;
}

/// A PostgreSQL cluster stopped at once in the middle of a push, for longer than a connection
/// is waited for, then started again: the workers' queue fails, the health check says so, the
/// workers start again, and the push finishes by itself with one row per device and every
/// extra copy counted; a push made after it finishes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_carry_on_after_a_postgres_outage_mid_push() {
    // Commits durable before they are answered, as in production: the throwaway cluster's
    // default (`synchronous_commit=off`) loses the last ones at a crash, a mark among them.
    let cluster = PostgresCluster::start_with(&[("synchronous_commit", "on")])
        .unwrap_or_else(|e| panic!("{e}"));
    let url = cluster
        .create_database("outage")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let options = WorkerOptions {
        heartbeat: Duration::from_secs(1),
        batch_size: 100,
        concurrency: 4,
        ..WorkerOptions::default()
    };
    let database = Database { url, dir: None };
    let server = Server::start_on(
        database,
        |config| config.latency = Duration::from_millis(5),
        &options,
    )
    .await;
    let ids = register(&server, 1000).await;
    let health = WorkerHealth::default();
    let _workers = workers(&server, options, &health);
    let id = server.push(json!("all")).await;
    // Mid-push: some rows written, not all.
    server
        .until(&id, |m| m["tally"]["accepted"].as_u64().unwrap_or(0) > 0)
        .await;
    cluster.stop_immediately().unwrap();
    workers_unavailable(&server, &health).await;
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again().unwrap();
        cluster
    })
    .await
    .unwrap();

    let done = server.finished(&id).await;
    assert_eq!(done["tally"]["accepted"], 1000, "{done}");
    every_device_once_and_every_copy_counted(&server, &id, &ids).await;
    let after = server.push(json!("all")).await;
    server.finished(&after).await;
    workers_available(&server, &health).await;
}
