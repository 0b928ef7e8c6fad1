//! [`Store`] on SQLite: one file, WAL, nothing to start.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use c2dm_core::OutcomeKind;
use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::queue::{self, BatchJob, PushJob};

use super::group::Writer;
use super::rows::{
    CLEAR_PUSH_FAILING, NOTE_PUSH_ERROR, counts_of, delivery_of, device_counts_of, device_of,
    json_error, message_of, millis, page_of, select_deliveries, select_message, states_among,
    tally_update, time_of, trim_page,
};
use super::{
    Audience, BatchRun, Counts, DeliveryRow, Device, DeviceCounts, DeviceFilter, DeviceState,
    MessageRecord, NewDevice, NewMessage, Page, Positions, Store, StoreError, Tally, Upserted,
};

/// `SELECT` of a device's columns, in the order [`device_of`] reads them, from `devices d`: a
/// macro, so that every query stays one literal string.
macro_rules! select_device {
    ($($rest:literal)*) => {
        concat!(
            "SELECT d.id, d.registration_id, d.device_id, d.user_id, d.app_version, ",
            "d.state, d.reason, d.created_at, d.updated_at, d.state_changed_at, ",
            "(SELECT group_concat(tag, char(31)) FROM ",
            "(SELECT tag FROM device_tags WHERE device = d.id ORDER BY tag)) ",
            "FROM devices d ",
            $($rest),*
        )
    };
}

/// The store on one SQLite file (or `sqlite::memory:`), migrated when opened.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Counts the batches and walks recorded through this store: what a test in the same
    /// process watches instead of polling.
    changes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts the pushes finished (and the cancels asked for) through this store: what a
    /// status request waiting in the same process watches instead of polling.
    finishes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts the cancels asked for through this store: what a batch under way watches.
    cancels: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Every write of this process goes through here: one task, which runs the writes waiting
    /// in one transaction and commits them together (group commit, see [`Writer`]). Writers
    /// do not meet in SQLite's busy handler, which sleeps and retries (a registration's p99
    /// was three quarters of a second at 16 at once); other processes still wait in it.
    writer: Writer,
}

/// Each connection's page cache, in KiB (SQLite's default is 2,000). The pool's connections
/// each keep their own cache, of much the same hot pages, so the process grows by this times
/// the pool's size once its tables are large: with the default, a push to 1,000,000 devices
/// peaked at 85-90 MiB against 52-60 for 10,000; with this, at 71-73 MiB, at the same rate
/// within the noise (docs/PERFORMANCE.md). 128 pages hold the interior pages of the tables a
/// push touches; their leaves come from the operating system's cache.
const PAGE_CACHE_KIB: u32 = 512;

/// The pool's connections to a file: the store's writer keeps one, and the job queue, the
/// batches' reads and the API's share the rest. Each is a thread of its own with its own page
/// cache, dropped whenever another connection writes: with four instead of eight, a push to
/// 300,000 devices was 3-6% faster at 2-6% less CPU a message and 3-6 MiB less memory (three
/// runs each, interleaved).
const CONNECTIONS: u32 = 4;

/// The delivery rows a batch holds before it writes them ([`Store::rows_per_write`]): one
/// `INSERT` takes them all.
const ROWS_PER_WRITE: usize = 500;

/// `SELECT` of one message's columns, in the order [`message_of`] reads them.
const SELECT_MESSAGE: &str = select_message!("WHERE id = ?");

/// Marks a push finished if its audience is walked and every device has its row:
/// `cancelled` if a cancel was asked for, `done` otherwise; whether it finished (its
/// batches' state is then the caller's to drop, [`drop_batch_state`]).
async fn finish_if_complete(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let finished = sqlx::query(
        "UPDATE messages SET \
         state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'done' END, \
         finished_at = ?1 \
         WHERE id = ?2 AND total IS NOT NULL AND recorded >= total \
         AND state IN ('queued', 'sending')",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(finished.rows_affected() > 0)
}

/// A finished push has no use for its marks and its batches' lists: they go at once, rather
/// than row by row.
async fn drop_batch_state(conn: &mut sqlx::SqliteConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM batch_marks WHERE message_id = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM batch_lists WHERE message_id = ?")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes the queue's jobs that are done, in the write transaction `conn`: each batch's last
/// write does it, so the queue keeps only the few jobs done since the last batch finished.
///
/// apalis-sqlite marks a job done with a statement that SQLite runs as a read of every job
/// its worker (one name per process) has ever taken, done ones included, under the write
/// lock. Kept, they made each batch's end slower than the last for as long as the process
/// ran: in the sqlite3 shell, on a copy of a queue, that statement took 1 ms with 300 done
/// jobs and 3-4 ms with 3,000. Nothing reads a done job again; a failed or killed one is
/// kept.
async fn forget_done_jobs(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM Jobs WHERE job_type IN (?1, ?2) AND status = 'Done'")
        .bind(queue::BATCH_QUEUE)
        .bind(queue::PUSH_QUEUE)
        .execute(conn)
        .await?;
    Ok(())
}

/// Enqueues `batches`, each due at its time (or at once), in the write transaction `conn`:
/// each batch's devices as a list of `batch_lists`, and in the queue a job that names it.
async fn enqueue_batches(
    conn: &mut sqlx::SqliteConnection,
    batches: &[(BatchJob, Option<SystemTime>)],
) -> Result<(), StoreError> {
    let mut jobs = Vec::with_capacity(batches.len());
    for (batch, at) in batches {
        let list: i64 = sqlx::query_scalar(
            "INSERT INTO batch_lists (message_id, job) VALUES (?, ?) RETURNING id",
        )
        .bind(batch.message_id)
        .bind(serde_json::to_string(batch).map_err(json_error)?)
        .fetch_one(&mut *conn)
        .await?;
        jobs.push(queue::task(&BatchJob::stored(batch.message_id, list), *at).map_err(json_error)?);
    }
    if !jobs.is_empty() {
        apalis_sqlite::queries::push_tasks(&mut *conn, queue::BATCH_QUEUE, &jobs)
            .await
            .map_err(queue::queue_failure)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating it if needed) the database at `url` (`sqlite://c2dm.db`,
    /// `sqlite::memory:`), in WAL mode with foreign keys on, and brings its tables up to date.
    /// Its writes go through a task on the tokio runtime it is opened on: they fail once that
    /// runtime has ended.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            // Until the pool's own handler (below) replaces it on each connection.
            .busy_timeout(super::busy::TIMEOUT)
            // Negative: a size in KiB, not in pages.
            .pragma("cache_size", format!("-{PAGE_CACHE_KIB}"));
        // An in-memory database lives as long as its one connection.
        let memory = url.contains(":memory:");
        let pool = SqlitePoolOptions::new()
            // A connection to a file in this process does not go stale: no ping (a round trip
            // to the connection's thread) before each use.
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(super::busy::install(conn)))
            .max_connections(if memory { 1 } else { CONNECTIONS })
            .min_connections(usize::from(memory) as u32)
            .idle_timeout(if memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if memory {
                None
            } else {
                Some(Duration::from_secs(3600))
            })
            .connect_with(options)
            .await?;
        // Our own table of applied migrations: the job queue (apalis) keeps its own in sqlx's
        // default table, and each migrator refuses versions it does not know.
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name("c2dm_migrations");
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError(e.into()))?;
        Ok(Self {
            pool: pool.clone(),
            changes: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            finishes: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            cancels: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            writer: Writer::start(pool.clone()),
        })
    }

    /// Runs `write` in a transaction of this process's writer (maybe shared with other
    /// writes), and returns its result once committed; if it fails, nothing it did is kept.
    async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        self.writer.write(Box::new(write)).await
    }

    /// Tells the watchers of [`Store::changes`] of a write recorded, and those of
    /// [`Store::finishes`] too if it `finished` a push (or asked for a cancel).
    fn changed(&self, finished: bool) {
        self.changes.send_modify(|n| *n += 1);
        if finished {
            self.finishes.send_modify(|n| *n += 1);
        }
    }

    /// Whether a batch's write was kept; a waiter is told if it finished the push.
    fn written(&self, written: BatchWrite) -> bool {
        match written {
            BatchWrite::Refused => false,
            BatchWrite::Written { finished } => {
                self.changed(finished);
                true
            }
        }
    }

    /// The connection pool, shared with whatever else keeps its tables in the same file.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn counts(&self, id: i64, total: Option<u64>) -> Result<Counts, sqlx::Error> {
        let groups = sqlx::query(
            "SELECT outcome, error, COUNT(*) FROM deliveries WHERE message_id = ? \
             GROUP BY outcome, error",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        counts_of(&groups, total)
    }

    async fn set_state(
        &self,
        registration_id: &str,
        state: DeviceState,
        reason: Option<&str>,
    ) -> Result<Option<Device>, StoreError> {
        let now = millis(SystemTime::now());
        let (id, reason) = (registration_id.to_owned(), reason.map(str::to_owned));
        let changed = self
            .write(move |conn| {
                Box::pin(async move {
                    Ok(set_device_state(conn, &id, state, reason.as_deref(), now).await?)
                })
            })
            .await?;
        if changed == 0 {
            return Ok(None);
        }
        self.device(registration_id).await
    }
}

/// Sets a device's state and reason (its state-change time only if the state changes);
/// returns how many devices changed (0 for an unknown id).
async fn set_device_state(
    conn: &mut sqlx::SqliteConnection,
    registration_id: &str,
    state: DeviceState,
    reason: Option<&str>,
    now: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE devices SET state = ?1, reason = ?2, updated_at = ?3, \
         state_changed_at = CASE WHEN state <> ?1 THEN ?3 ELSE state_changed_at END \
         WHERE registration_id = ?4",
    )
    .bind(state.as_str())
    .bind(reason)
    .bind(now)
    .bind(registration_id)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Registers `device`, or updates it if known (and makes it active again), in the write
/// transaction `tx`: which, and the device as stored.
async fn upsert(
    tx: &mut SqliteConnection,
    device: &NewDevice,
    now: i64,
) -> Result<(Upserted, Device), StoreError> {
    let known: Option<i64> = sqlx::query_scalar("SELECT id FROM devices WHERE registration_id = ?")
        .bind(&device.registration_id)
        .fetch_optional(&mut *tx)
        .await?;
    let (upserted, id) = match known {
        Some(id) => {
            // A field the registration leaves out (its flag set) keeps what is stored.
            sqlx::query(
                "UPDATE devices SET device_id = CASE WHEN ?1 THEN device_id ELSE ?2 END, \
                 user_id = CASE WHEN ?3 THEN user_id ELSE ?4 END, \
                 app_version = CASE WHEN ?5 THEN app_version ELSE ?6 END, \
                 state = 'active', reason = NULL, updated_at = ?7, state_changed_at = \
                 CASE WHEN state <> 'active' THEN ?7 ELSE state_changed_at END \
                 WHERE id = ?8",
            )
            .bind(device.device_id.is_none())
            .bind(device.device_id.clone().flatten())
            .bind(device.user_id.is_none())
            .bind(device.user_id.clone().flatten())
            .bind(device.app_version.is_none())
            .bind(device.app_version.clone().flatten())
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if device.tags.is_some() {
                sqlx::query("DELETE FROM device_tags WHERE device = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            (Upserted::Updated, id)
        }
        None => {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO devices (registration_id, device_id, user_id, app_version, state, \
                 created_at, updated_at, state_changed_at) \
                 VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?5, ?5) RETURNING id",
            )
            .bind(&device.registration_id)
            .bind(device.device_id.clone().flatten())
            .bind(device.user_id.clone().flatten())
            .bind(device.app_version.clone().flatten())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            (Upserted::Created, id)
        }
    };
    for tag in device.tags.iter().flatten() {
        sqlx::query("INSERT OR IGNORE INTO device_tags (tag, device) VALUES (?, ?)")
            .bind(tag)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    let row = sqlx::query(select_device!("WHERE d.id = ?"))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    Ok((upserted, device_of(&row)?))
}

/// Claims a run of batch `batch` of push `id` in the write transaction `tx` (a first run, or
/// the next): the run, the batch's mark, how many runs marked it, and whether the batch or its
/// push is finished. A push already finished has its batches' marks deleted with it, and a
/// claim then writes none back (it would stay for good): run 0, finished.
async fn claim(
    tx: &mut SqliteConnection,
    id: i64,
    batch: &str,
) -> Result<(i64, i64, i64, bool), StoreError> {
    // The guard is the `SELECT`'s `WHERE`: for a finished push it yields no row, so there is
    // nothing to insert and no conflict to update.
    let claimed: Option<(i64, i64, i64, bool)> = sqlx::query_as(
        "INSERT INTO batch_marks (message_id, batch, sent_through, run) \
         SELECT ?1, ?2, 0, 1 WHERE NOT EXISTS (SELECT 1 FROM messages WHERE id = ?1 \
         AND state IN ('done', 'cancelled')) \
         ON CONFLICT (message_id, batch) DO UPDATE SET run = run + 1 \
         RETURNING run, sent_through, sending_runs, finished",
    )
    .bind(id)
    .bind(batch)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(claimed.unwrap_or((0, 0, 0, true)))
}

/// What [`write_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchWrite {
    /// Nothing: the run is not the batch's latest, or the batch's marks went with its
    /// finished push and it had rows to write.
    Refused,
    /// The rows written (maybe none), and whether they finished the push.
    Written { finished: bool },
}

/// The rows and gone devices of `run` of a batch of push `id`, in the write transaction
/// `conn`, then the push finished if complete.
async fn write_batch(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    run: &BatchRun,
    rows: &[DeliveryRow],
    gone: &[(String, String)],
) -> Result<BatchWrite, StoreError> {
    let now = millis(SystemTime::now());
    // Writes are one at a time: a later run's claim comes before or after this whole
    // transaction. Not this run's (or gone with its finished push): nothing is written.
    let latest: Option<i64> =
        sqlx::query_scalar("SELECT run FROM batch_marks WHERE message_id = ?1 AND batch = ?2")
            .bind(id)
            .bind(&run.batch)
            .fetch_optional(&mut *conn)
            .await?;
    if latest != Some(run.run) {
        // No mark at all: it went with the push, which this run's earlier writes finished.
        // Its last write then has nothing to say, and is no news of a takeover.
        return Ok(if latest.is_none() && rows.is_empty() && gone.is_empty() {
            BatchWrite::Written { finished: false }
        } else {
            BatchWrite::Refused
        });
    }
    let mut written = Tally::default();
    let mut recount = false;
    // One statement for a write's rows (up to `ROWS_PER_STATEMENT`): each statement is a
    // round trip to the connection's thread.
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut query = sqlx::query(insert_deliveries(chunk.len()));
        for row in chunk {
            query = query
                .bind(id)
                .bind(row.registration_id.as_str())
                .bind(row.outcome.as_str())
                .bind(row.c2dm_message_id.as_deref())
                .bind(row.error.as_deref())
                .bind(i64::from(row.attempts))
                .bind(i64::from(row.possible_duplicates))
                .bind(millis(row.at));
        }
        let inserted = query.execute(&mut *conn).await?.rows_affected();
        if inserted == chunk.len() as u64 {
            chunk.iter().for_each(|row| written.add(row.outcome));
        } else {
            // Some device had its row already (no run writes one twice, so this is not
            // expected): the push's counts are taken again from its rows, below.
            recount = true;
        }
    }
    for (registration_id, code) in gone {
        set_device_state(conn, registration_id, DeviceState::Gone, Some(code), now).await?;
    }
    let finished = if recount {
        tracing::warn!(
            message_id = id,
            "rows already there: the push's counts are recounted"
        );
        sqlx::query(
            "UPDATE messages SET \
             recorded = (SELECT COUNT(*) FROM deliveries WHERE message_id = ?1), \
             accepted = (SELECT COUNT(*) FROM deliveries WHERE message_id = ?1 \
                         AND outcome = 'accepted'), \
             rejected = (SELECT COUNT(*) FROM deliveries WHERE message_id = ?1 \
                         AND outcome = 'rejected'), \
             failed = (SELECT COUNT(*) FROM deliveries WHERE message_id = ?1 \
                       AND outcome = 'failed'), \
             not_attempted = (SELECT COUNT(*) FROM deliveries WHERE message_id = ?1 \
                              AND outcome = 'not_attempted') \
             WHERE id = ?1",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
        finish_if_complete(conn, id, now).await?
    } else {
        // The counts, and the push finished if these were its last rows, in one statement
        // (each `SET` reads the row as it was).
        let [recorded, accepted, rejected, failed, not_attempted] = tally_update(&written);
        sqlx::query_scalar(
            "UPDATE messages SET recorded = recorded + ?1, accepted = accepted + ?2, \
             rejected = rejected + ?3, failed = failed + ?4, \
             not_attempted = not_attempted + ?5, \
             state = CASE WHEN total IS NOT NULL AND recorded + ?1 >= total \
                          AND state IN ('queued', 'sending') \
                     THEN CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'done' END \
                     ELSE state END, \
             finished_at = CASE WHEN total IS NOT NULL AND recorded + ?1 >= total \
                                AND state IN ('queued', 'sending') \
                           THEN ?6 ELSE finished_at END \
             WHERE id = ?7 \
             RETURNING finished_at IS ?6 AND state IN ('done', 'cancelled')",
        )
        .bind(recorded)
        .bind(accepted)
        .bind(rejected)
        .bind(failed)
        .bind(not_attempted)
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(false)
    };
    if finished {
        drop_batch_state(conn, id).await?;
    }
    Ok(BatchWrite::Written { finished })
}

/// The most delivery rows one `INSERT` takes (eight parameters each: SQLite takes 32,766).
const ROWS_PER_STATEMENT: usize = 500;

/// The `INSERT` of `n` delivery rows; the text for a whole write ([`Store::rows_per_write`]
/// rows, most writes) made once.
fn insert_deliveries(n: usize) -> sqlx::SqlStr {
    fn text(n: usize) -> String {
        let mut sql = String::from(
            "INSERT INTO deliveries (message_id, registration_id, outcome, c2dm_message_id, \
             error, attempts, possible_duplicates, at) VALUES ",
        );
        for at in 0..n {
            if at > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?)");
        }
        sql.push_str(" ON CONFLICT (message_id, registration_id) DO NOTHING");
        sql
    }
    static WHOLE: std::sync::OnceLock<sqlx::SqlStr> = std::sync::OnceLock::new();
    if n == ROWS_PER_WRITE {
        WHOLE
            .get_or_init(|| sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(text(n))))
            .clone()
    } else {
        sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(text(n)))
    }
}

/// The query of a page of a push's rows (`?1`), narrowed by outcome (`?2`) and error (`?5`)
/// where given, after `?3`, `?4` at most. Rows with an error are read from the index of those,
/// rows not accepted from the index that keeps only them, the others in the key's order.
fn deliveries_query(outcome: Option<OutcomeKind>, error: bool) -> &'static str {
    macro_rules! page_by {
        ($($narrowed:literal)*) => {
            select_deliveries!(
                $($narrowed)* " AND (?5 IS NULL OR error = ?5) \
                 AND registration_id > ?3 ORDER BY registration_id LIMIT ?4"
            )
        };
    }
    // Each index named, with the condition that lets it be used: without the name, SQLite
    // preferred the key (which holds every column) and read every row of the push.
    match (outcome, error) {
        (_, true) => page_by!(
            "INDEXED BY deliveries_by_error WHERE message_id = ?1 "
            "AND (?2 IS NULL OR outcome = ?2) AND error = ?5"
        ),
        (Some(o), false) if o != OutcomeKind::Accepted => page_by!(
            "INDEXED BY deliveries_by_outcome WHERE message_id = ?1 "
            "AND outcome = ?2 AND outcome <> 'accepted'"
        ),
        _ => page_by!("WHERE message_id = ?1 AND (?2 IS NULL OR outcome = ?2)"),
    }
}

#[async_trait]
impl Store for SqliteStore {
    /// 500: once a write was three statements whatever its size, a push took 2-10 % less of
    /// the server's CPU a message than at 250 (docs/PERFORMANCE.md).
    fn rows_per_write(&self) -> usize {
        ROWS_PER_WRITE
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn finishes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.finishes.subscribe()
    }

    fn cancels(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cancels.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn upsert_device(&self, device: &NewDevice) -> Result<(Upserted, Device), StoreError> {
        let now = millis(SystemTime::now());
        let device = device.clone();
        // In the writer's transaction (IMMEDIATE: the write lock first), so two registrations
        // of one id cannot both read "unknown" and race to insert.
        self.write(move |tx| Box::pin(async move { upsert(tx, &device, now).await }))
            .await
    }

    async fn unregister_device(&self, registration_id: &str) -> Result<Option<Device>, StoreError> {
        self.set_state(registration_id, DeviceState::Unregistered, None)
            .await
    }

    async fn mark_gone(
        &self,
        registration_id: &str,
        reason: &str,
    ) -> Result<Option<Device>, StoreError> {
        self.set_state(registration_id, DeviceState::Gone, Some(reason))
            .await
    }

    async fn device(&self, registration_id: &str) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(select_device!("WHERE d.registration_id = ?"))
            .bind(registration_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(device_of).transpose()?)
    }

    async fn device_counts(&self, filter: &DeviceFilter) -> Result<DeviceCounts, StoreError> {
        let groups = sqlx::query(
            "SELECT d.state, COUNT(*) FROM devices d \
             WHERE (?1 IS NULL OR d.user_id = ?1) \
             AND (?2 IS NULL OR EXISTS \
             (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = ?2)) \
             GROUP BY d.state",
        )
        .bind(&filter.user_id)
        .bind(&filter.tag)
        .fetch_all(&self.pool)
        .await?;
        Ok(device_counts_of(&groups)?)
    }

    async fn device_deliveries(
        &self,
        registration_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, DeliveryRow)>, StoreError> {
        // Pushes newest first, each looked up by its key: no index by device is kept (it
        // would cost every push's writes), and pushes are few beside their rows.
        let rows = sqlx::query(
            "SELECT d.registration_id, d.outcome, d.c2dm_message_id, d.error, d.attempts, \
             d.possible_duplicates, d.at, m.id FROM messages m \
             JOIN deliveries d ON d.message_id = m.id AND d.registration_id = ?1 \
             WHERE m.id < ?2 ORDER BY m.id DESC LIMIT ?3",
        )
        .bind(registration_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let decode = |row: &_| Ok((Row::try_get::<i64, _>(row, 7)?, delivery_of(row)?));
        Ok(page_of(&rows, limit, decode, |(id, _)| *id)?)
    }

    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Device>, StoreError> {
        // One more than asked: whether it comes says whether there is a next page.
        let rows = sqlx::query(select_device!(
            "WHERE d.id > ?1 "
            "AND (?2 IS NULL OR d.state = ?2) "
            "AND (?3 IS NULL OR d.user_id = ?3) "
            "AND (?4 IS NULL OR EXISTS "
            "(SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = ?4)) "
            "ORDER BY d.id LIMIT ?5"
        ))
        .bind(after.unwrap_or(0))
        .bind(filter.state.map(|s| s.as_str()))
        .bind(&filter.user_id)
        .bind(&filter.tag)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(page_of(&rows, limit, device_of, |d| d.position)?)
    }

    async fn audience_page(
        &self,
        audience: &Audience,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, String)>, StoreError> {
        let (user, tag, everyone) = match audience {
            Audience::User { user_id } => (Some(user_id.as_str()), None, false),
            Audience::Tag { tag } => (None, Some(tag.as_str()), false),
            Audience::All(_) => (None, None, true),
            Audience::RegistrationIds { .. } => {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
        };
        // The page as one JSON value: rows come from the connection's thread one at a time,
        // each a hand-off between threads that cost more than the row (the page took 2.3
        // times as long, measured in `benches/store.rs`).
        let page: Option<String> = sqlx::query_scalar(
            "SELECT json_group_array(json_array(id, registration_id)) FROM \
             (SELECT d.id, d.registration_id FROM devices d \
             WHERE d.id > ?1 AND d.state = 'active' \
             AND (?2 IS NULL OR d.user_id = ?2) \
             AND (?3 IS NULL OR EXISTS \
             (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = ?3)) \
             AND (?4 OR ?2 IS NOT NULL OR ?3 IS NOT NULL) \
             ORDER BY d.id LIMIT ?5)",
        )
        .bind(after.unwrap_or(0))
        .bind(user)
        .bind(tag)
        .bind(everyone)
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await?;
        let mut items: Vec<(i64, String)> = match page {
            Some(page) => serde_json::from_str(&page).map_err(json_error)?,
            None => Vec::new(),
        };
        // SQLite aggregates an ordered subquery's rows in its order; the walk's next page
        // starts after the last, so that is checked (an `ORDER BY` in the aggregate sorted
        // them again, at 60% more for the page).
        if !items.is_sorted_by_key(|(at, _)| *at) {
            items.sort_unstable_by_key(|(at, _)| *at);
        }
        let next = if items.len() == limit as usize {
            items.last().map(|(at, _)| *at)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    async fn inactive_devices(
        &self,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<Vec<(String, DeviceState)>, StoreError> {
        if let Some(positions) = positions {
            let rows: Vec<(String, String)> = sqlx::query_as(
                // By the index on (state, id), whatever the statistics say: where nearly
                // every device is active, they rate a range of positions about as well.
                "SELECT registration_id, state FROM devices INDEXED BY devices_by_state \
                 WHERE state IN ('unregistered', 'gone') AND id > ?1 AND id <= ?2",
            )
            .bind(positions.after)
            .bind(positions.through)
            .fetch_all(&self.pool)
            .await?;
            return Ok(states_among(rows, registration_ids));
        }
        let mut states = Vec::new();
        // A statement per chunk: SQLite takes at most 32,766 parameters.
        for chunk in registration_ids.chunks(500) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT registration_id, state FROM devices WHERE state <> 'active' \
                 AND registration_id IN (",
            );
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id);
            }
            query.push(")");
            for row in query.build().fetch_all(&self.pool).await? {
                let state: String = row.try_get(1)?;
                if let Some(state) = DeviceState::parse(&state) {
                    states.push((row.try_get(0)?, state));
                }
            }
        }
        Ok(states)
    }

    async fn create_message(
        &self,
        message: &NewMessage,
    ) -> Result<(bool, MessageRecord), StoreError> {
        let now = millis(SystemTime::now());
        let audience = serde_json::to_string(&message.audience).map_err(json_error)?;
        let data = serde_json::to_string(&message.data).map_err(json_error)?;
        let idempotency_key = message.idempotency_key.clone();
        let collapse_key = message.collapse_key.clone();
        let delay_while_idle = message.delay_while_idle;
        let (created, id) = self
            .write(move |tx| {
                Box::pin(async move {
                    let inserted: Option<i64> = sqlx::query_scalar(
                        "INSERT INTO messages (idempotency_key, audience, collapse_key, data, \
                         delay_while_idle, state, created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?) \
                         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                    )
                    .bind(&idempotency_key)
                    .bind(audience)
                    .bind(&collapse_key)
                    .bind(data)
                    .bind(delay_while_idle)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let (created, id) = match inserted {
                        Some(id) => {
                            let job = queue::task(&PushJob { message_id: id }, None)
                                .map_err(json_error)?;
                            apalis_sqlite::queries::push_tasks(&mut *tx, queue::PUSH_QUEUE, &[job])
                                .await
                                .map_err(queue::queue_failure)?;
                            (true, id)
                        }
                        None => (
                            false,
                            sqlx::query_scalar("SELECT id FROM messages WHERE idempotency_key = ?")
                                .bind(&idempotency_key)
                                .fetch_one(&mut *tx)
                                .await?,
                        ),
                    };
                    Ok((created, id))
                })
            })
            .await?;
        let stored = self
            .message(id)
            .await?
            .ok_or_else(|| StoreError(sqlx::Error::RowNotFound))?;
        Ok((created, stored))
    }

    async fn walk_page(
        &self,
        id: i64,
        from: Option<i64>,
        to: i64,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<bool, StoreError> {
        let registration_ids = registration_ids.to_vec();
        self.write(move |tx| {
            Box::pin(async move {
                let moved = sqlx::query(
                    "UPDATE messages SET walk_after = ?1, walked = walked + ?2 \
                     WHERE id = ?3 AND walk_after IS ?4",
                )
                .bind(to)
                .bind(i64::try_from(registration_ids.len()).unwrap_or(i64::MAX))
                .bind(id)
                .bind(from)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if moved == 0 {
                    return Ok(false);
                }
                let batch = BatchJob {
                    message_id: id,
                    registration_ids,
                    possibly_sent: Vec::new(),
                    positions,
                    list: None,
                };
                enqueue_batches(tx, &[(batch, None)]).await?;
                Ok(true)
            })
        })
        .await
    }

    async fn message(&self, id: i64) -> Result<Option<MessageRecord>, StoreError> {
        let Some(row) = sqlx::query(SELECT_MESSAGE)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let total: Option<i64> = row.try_get(7)?;
        let counts = self
            .counts(id, total.map(|t| u64::try_from(t).unwrap_or(0)))
            .await?;
        Ok(Some(message_of(&row, counts)?))
    }

    async fn message_to_send(&self, id: i64) -> Result<Option<MessageRecord>, StoreError> {
        let row = sqlx::query(SELECT_MESSAGE)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .as_ref()
            .map(|row| message_of(row, Counts::default()))
            .transpose()?)
    }

    async fn messages(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<MessageRecord>, StoreError> {
        let rows = sqlx::query(select_message!("WHERE id < ? ORDER BY id DESC LIMIT ?"))
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let decode = |row: &_| message_of(row, Counts::default());
        Ok(page_of(&rows, limit, decode, |m| m.id)?)
    }

    async fn start_sending(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE messages SET state = 'sending' WHERE id = ? AND state = 'queued'",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn finish_walk(&self, id: i64, total: u64) -> Result<(), StoreError> {
        let now = millis(SystemTime::now());
        let finished = self
            .write(move |tx| {
                Box::pin(async move {
                    sqlx::query("UPDATE messages SET total = ? WHERE id = ?")
                        .bind(i64::try_from(total).unwrap_or(i64::MAX))
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    let finished = finish_if_complete(tx, id, now).await?;
                    if finished {
                        drop_batch_state(tx, id).await?;
                    }
                    Ok(finished)
                })
            })
            .await?;
        self.changed(finished);
        Ok(())
    }

    async fn note_push_error(
        &self,
        id: i64,
        error: &str,
        at: SystemTime,
        since: SystemTime,
    ) -> Result<(), StoreError> {
        let (error, at, since) = (error.to_owned(), millis(at), millis(since));
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query(NOTE_PUSH_ERROR)
                    .bind(id)
                    .bind(error)
                    .bind(at)
                    .bind(since)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            })
        })
        .await?;
        self.changed(false);
        Ok(())
    }

    async fn clear_push_failing(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query(CLEAR_PUSH_FAILING)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            })
        })
        .await?;
        self.changed(false);
        Ok(())
    }

    async fn request_cancel(&self, id: i64) -> Result<Option<MessageRecord>, StoreError> {
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE messages SET cancel_requested = 1 \
                     WHERE id = ? AND state NOT IN ('done', 'cancelled')",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                Ok(())
            })
        })
        .await?;
        self.changed(true);
        self.cancels.send_modify(|n| *n += 1);
        self.message(id).await
    }

    async fn batch_list(&self, list: i64) -> Result<Option<BatchJob>, StoreError> {
        let job: Option<String> = sqlx::query_scalar("SELECT job FROM batch_lists WHERE id = ?")
            .bind(list)
            .fetch_optional(&self.pool)
            .await?;
        Ok(job
            .map(|job| serde_json::from_str(&job).map_err(json_error))
            .transpose()?)
    }

    async fn recorded(
        &self,
        id: i64,
        registration_ids: &[String],
    ) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        // A statement per chunk: SQLite takes at most 32,766 parameters.
        for chunk in registration_ids.chunks(500) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT registration_id FROM deliveries WHERE message_id = ",
            );
            query.push_bind(id);
            query.push(" AND registration_id IN (");
            let mut list = query.separated(", ");
            for rid in chunk {
                list.push_bind(rid);
            }
            query.push(")");
            for row in query.build().fetch_all(&self.pool).await? {
                found.insert(row.try_get(0)?);
            }
        }
        Ok(found)
    }

    async fn claim_batch(&self, id: i64, batch: &str) -> Result<BatchRun, StoreError> {
        let owned = batch.to_owned();
        let (run, through, sending_runs, finished) = self
            .write(move |tx| Box::pin(async move { claim(tx, id, &owned).await }))
            .await?;
        Ok(BatchRun {
            batch: batch.to_owned(),
            run,
            marked_through: u64::try_from(through).unwrap_or(0),
            sending_runs: u32::try_from(sending_runs).unwrap_or(u32::MAX),
            finished,
        })
    }

    async fn mark_sending(
        &self,
        id: i64,
        run: &BatchRun,
        through: u64,
    ) -> Result<bool, StoreError> {
        let (batch, run) = (run.batch.clone(), run.run);
        self.write(move |tx| {
            Box::pin(async move {
                let marked = sqlx::query(
                    "UPDATE batch_marks SET sent_through = MAX(sent_through, ?3), \
                     sending_runs = sending_runs + CASE WHEN marked_run = ?4 THEN 0 ELSE 1 END, \
                     marked_run = ?4 \
                     WHERE message_id = ?1 AND batch = ?2 AND run = ?4",
                )
                .bind(id)
                .bind(&batch)
                .bind(i64::try_from(through).unwrap_or(i64::MAX))
                .bind(run)
                .execute(&mut *tx)
                .await?;
                Ok(marked.rows_affected() == 1)
            })
        })
        .await
    }

    async fn record_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let (run, rows, gone) = (run.clone(), rows.to_vec(), gone.to_vec());
        let written = self
            .write(move |tx| Box::pin(async move { write_batch(tx, id, &run, &rows, &gone).await }))
            .await?;
        Ok(self.written(written))
    }

    async fn finish_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
        later: &[(BatchJob, SystemTime)],
    ) -> Result<bool, StoreError> {
        let later: Vec<(BatchJob, Option<SystemTime>)> = later
            .iter()
            .map(|(job, at)| (job.clone(), Some(*at)))
            .collect();
        let (run, rows, gone) = (run.clone(), rows.to_vec(), gone.to_vec());
        let written = self
            .write(move |tx| {
                Box::pin(async move {
                    let written = write_batch(tx, id, &run, &rows, &gone).await?;
                    if written == BatchWrite::Refused {
                        return Ok(written);
                    }
                    enqueue_batches(tx, &later).await?;
                    sqlx::query(
                        "UPDATE batch_marks SET finished = 1 WHERE message_id = ?1 AND batch = ?2",
                    )
                    .bind(id)
                    .bind(&run.batch)
                    .execute(&mut *tx)
                    .await?;
                    forget_done_jobs(tx).await?;
                    Ok(written)
                })
            })
            .await?;
        Ok(self.written(written))
    }

    async fn deliveries(
        &self,
        id: i64,
        outcome: Option<OutcomeKind>,
        error: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<DeliveryRow>, Option<String>), StoreError> {
        let rows = sqlx::query(deliveries_query(outcome, error.is_some()))
            .bind(id)
            .bind(outcome.map(|o| o.as_str()))
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit) + 1)
            .bind(error)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(delivery_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(trim_page(items, limit, |d| d.registration_id.clone()))
    }

    async fn shared_pause(&self, account: &str) -> Result<Option<SystemTime>, StoreError> {
        let until: Option<Option<i64>> =
            sqlx::query_scalar("SELECT paused_until FROM sender_accounts WHERE account = ?")
                .bind(account)
                .fetch_optional(&self.pool)
                .await?;
        let now = SystemTime::now();
        Ok(until.flatten().map(time_of).filter(|until| *until > now))
    }

    async fn pause_account(&self, account: &str, until: SystemTime) -> Result<(), StoreError> {
        let account = account.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO sender_accounts (account, paused_until) VALUES (?1, ?2) \
                     ON CONFLICT (account) DO UPDATE SET paused_until = \
                     MAX(COALESCE(paused_until, 0), excluded.paused_until)",
                )
                .bind(&account)
                .bind(millis(until))
                .execute(&mut *tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn reserve_budget(
        &self,
        account: &str,
        day: i64,
        daily: u64,
        wanted: u64,
    ) -> Result<u64, StoreError> {
        let account = account.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let row: Option<(i64, i64)> = sqlx::query_as(
                    "SELECT budget_day, budget_used FROM sender_accounts WHERE account = ?",
                )
                .bind(&account)
                .fetch_optional(&mut *tx)
                .await?;
                let used = match row {
                    Some((stored_day, used)) if stored_day == day => {
                        u64::try_from(used).unwrap_or(0)
                    }
                    _ => 0,
                };
                let granted = super::grant(daily, used, wanted);
                sqlx::query(
            "INSERT INTO sender_accounts (account, budget_day, budget_used) VALUES (?1, ?2, ?3) \
             ON CONFLICT (account) DO UPDATE SET budget_day = ?2, budget_used = ?3",
        )
        .bind(&account)
        .bind(day)
        .bind(i64::try_from(used + granted).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
                Ok(granted)
            })
        })
        .await
    }

    async fn release_budget(&self, account: &str, day: i64, unused: u64) -> Result<(), StoreError> {
        let account = account.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE sender_accounts SET budget_used = MAX(budget_used - ?1, 0) \
                     WHERE account = ?2 AND budget_day = ?3",
                )
                .bind(i64::try_from(unused).unwrap_or(i64::MAX))
                .bind(&account)
                .bind(day)
                .execute(&mut *tx)
                .await?;
                Ok(())
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_walk_reads_every_active_device_once_in_order_whatever_its_id_holds() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        // The page comes back as JSON: ids that JSON must escape come back as they went in.
        let ids = [
            "plain",
            r#"quo"te"#,
            r"back\slash",
            "ünïcode",
            "slash/and+plus=",
            "emoji-📱",
            "gone-one",
        ];
        for id in ids {
            store
                .upsert_device(&NewDevice {
                    registration_id: id.to_owned(),
                    user_id: Some(Some("u".into())),
                    ..NewDevice::default()
                })
                .await
                .unwrap();
        }
        store.unregister_device("gone-one").await.unwrap();
        for audience in [
            Audience::All(crate::store::Everyone::All),
            Audience::User {
                user_id: "u".into(),
            },
        ] {
            let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
            loop {
                let page = store.audience_page(&audience, after, 2).await.unwrap();
                pages += 1;
                assert!(page.items.len() <= 2);
                seen.extend(page.items);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            // Six active devices, two a page: the third page is full, so a fourth, empty, ends
            // the walk.
            assert_eq!(pages, 4, "{audience:?}");
            assert!(seen.is_sorted_by_key(|(at, _)| *at), "{seen:?}");
            let walked: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
            assert_eq!(walked, ids[..6], "{audience:?}");
        }
        let nobody = Audience::User {
            user_id: "nobody".into(),
        };
        let page = store.audience_page(&nobody, None, 2).await.unwrap();
        assert!(page.items.is_empty() && page.next.is_none());
    }

    #[tokio::test]
    async fn a_list_of_rows_by_error_or_outcome_reads_its_index() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let cases = [
            (None, true, "deliveries_by_error"),
            (Some(OutcomeKind::Rejected), true, "deliveries_by_error"),
            (Some(OutcomeKind::Failed), false, "deliveries_by_outcome"),
            (Some(OutcomeKind::Accepted), false, "PRIMARY KEY"),
            (None, false, "PRIMARY KEY"),
        ];
        for (outcome, error, index) in cases {
            let sql = format!("EXPLAIN QUERY PLAN {}", deliveries_query(outcome, error));
            let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(1_i64)
                .bind(outcome.map(|o| o.as_str()))
                .bind("")
                .bind(101_i64)
                .bind(error.then_some("NotRegistered"))
                .fetch_all(store.pool())
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>(3))
                .collect();
            let plan = plan.join("; ");
            assert!(
                plan.contains(&format!("SEARCH deliveries USING {index}"))
                    || plan.contains(&format!("SEARCH deliveries USING INDEX {index}")),
                "{outcome:?} {error}: {plan}"
            );
            // In the key's order already: no sort.
            assert!(!plan.contains("TEMP B-TREE"), "{outcome:?} {error}: {plan}");
        }
    }

    #[tokio::test]
    async fn every_connection_keeps_a_page_cache_of_the_set_size() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        // Two at once: a second connection is opened with the same settings.
        let mut first = store.pool().acquire().await.unwrap();
        let mut second = store.pool().acquire().await.unwrap();
        for conn in [&mut first, &mut second] {
            let size: i64 = sqlx::query_scalar("PRAGMA cache_size")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(size, -i64::from(PAGE_CACHE_KIB));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_finds_the_lock_taken_says_so_and_gets_it_once_free() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let mut holder = store.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
        let pool = store.pool().clone();
        let waiter = tokio::spawn(async move {
            sqlx::query("INSERT INTO sender_accounts (account) VALUES ('waiter')")
                .execute(&pool)
                .await
        });
        // The waiting connection's handler says it waits; SQLite's own would not.
        let said = async {
            while !super::super::busy::someone_waited_within(Duration::from_secs(3600)) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), said)
            .await
            .expect("no wait was told");
        sqlx::query("INSERT INTO sender_accounts (account) VALUES ('holder')")
            .execute(&mut *holder)
            .await
            .unwrap();
        holder.commit().await.unwrap();
        waiter
            .await
            .unwrap()
            .expect("the waiting write went through");
        let accounts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sender_accounts")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(accounts, 2);
    }
}
