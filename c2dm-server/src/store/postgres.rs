//! [`Store`] on PostgreSQL: one database shared by any number of server processes.
//!
//! Where SQLite takes the database's one write lock (`BEGIN IMMEDIATE`), PostgreSQL locks rows:
//! an upsert is one `INSERT … ON CONFLICT`, a batch's rows go in as arrays (`UNNEST`), and the
//! push's counter is one `UPDATE` that serialises the batches of a push on its row.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use c2dm_core::OutcomeKind;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::queue::{self, BatchJob, PushJob};

use super::rows::{
    CLEAR_PUSH_FAILING, NOTE_PUSH_ERROR, counts_of, delivery_of, device_counts_of, device_of,
    json_error, message_of, millis, page_of, select_deliveries, select_message, states_among,
    time_of, trim_page,
};
use super::{
    Audience, BatchRun, Counts, DeliveryRow, Device, DeviceCounts, DeviceFilter, DeviceState,
    MessageRecord, NewDevice, NewMessage, Page, Positions, Store, StoreError, Upserted,
};

/// `SELECT` of a device's columns, in the order `device_of` reads them, from `devices d`: a
/// macro, so that every query stays one literal string.
macro_rules! select_device {
    ($($rest:literal)*) => {
        concat!(
            "SELECT d.id, d.registration_id, d.device_id, d.user_id, d.app_version, ",
            "d.state, d.reason, d.created_at, d.updated_at, d.state_changed_at, ",
            "(SELECT string_agg(tag, chr(31) ORDER BY tag) FROM device_tags WHERE device = d.id) ",
            "FROM devices d ",
            $($rest),*
        )
    };
}

/// `SELECT` of one message's columns, in the order `message_of` reads them.
const SELECT_MESSAGE: &str = select_message!("WHERE id = $1");

/// The store on a PostgreSQL database, migrated when opened.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Counts the batches and walks recorded through this store: what a test in the same
    /// process watches (other processes' work is seen when it looks again).
    changes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts the pushes finished (and the cancels asked for) through this store: what a
    /// status request waiting in the same process watches (other processes' work is seen
    /// when it looks again).
    finishes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts the cancels asked for through this store: what a batch under way watches.
    cancels: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

/// Marks a push finished if its audience is walked and every device has its row; whether it
/// did. Its marks and its batches' lists are then [`drop_batch_state`]'s to delete, after the
/// commit: deleting the marks here would lock those of batches whose transactions wait for
/// this one's lock on the push.
async fn finish_if_complete(
    conn: &mut sqlx::PgConnection,
    id: i64,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let finished = sqlx::query(
        "UPDATE messages SET \
         state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'done' END, \
         finished_at = $1 \
         WHERE id = $2 AND total IS NOT NULL AND recorded >= total \
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
async fn drop_batch_state(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM batch_marks WHERE message_id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM batch_lists WHERE message_id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Enqueues `batches`, each due at its time (or at once), in the transaction `conn`: each
/// batch's devices as a list of `batch_lists`, and in the queue a job that names it.
async fn enqueue_batches(
    conn: &mut sqlx::PgConnection,
    batches: &[(BatchJob, Option<SystemTime>)],
) -> Result<(), StoreError> {
    let mut jobs = Vec::with_capacity(batches.len());
    for (batch, at) in batches {
        let list: i64 = sqlx::query_scalar(
            "INSERT INTO batch_lists (message_id, job) VALUES ($1, $2) RETURNING id",
        )
        .bind(batch.message_id)
        .bind(serde_json::to_string(batch).map_err(json_error)?)
        .fetch_one(&mut *conn)
        .await?;
        jobs.push(queue::task(&BatchJob::stored(batch.message_id, list), *at).map_err(json_error)?);
    }
    if !jobs.is_empty() {
        apalis_postgres::queries::push_tasks(&mut *conn, queue::BATCH_QUEUE, jobs)
            .await
            .map_err(queue::queue_failure)?;
    }
    Ok(())
}

/// Sets a device's state and reason (its state-change time only if the state changes);
/// returns how many devices changed (0 for an unknown id).
async fn set_device_state(
    conn: &mut sqlx::PgConnection,
    registration_id: &str,
    state: DeviceState,
    reason: Option<&str>,
    now: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE devices SET state = $1, reason = $2, updated_at = $3, \
         state_changed_at = CASE WHEN state <> $1 THEN $3 ELSE state_changed_at END \
         WHERE registration_id = $4",
    )
    .bind(state.as_str())
    .bind(reason)
    .bind(now)
    .bind(registration_id)
    .execute(conn)
    .await?
    .rows_affected())
}

/// A count as PostgreSQL's `BIGINT` keeps it.
fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// A batch's write in one transaction: [`write_batch`], and for its `last` write the
    /// batches of the devices put back for later (each due at its time) and the batch marked
    /// finished. Made again, keeping the rows already there, if it met one. `false` (and
    /// nothing written) if a later run has claimed the batch.
    async fn write_batch_then(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
        last: Option<&[(BatchJob, Option<SystemTime>)]>,
    ) -> Result<bool, StoreError> {
        let finishing = last.is_some();
        let later = last.unwrap_or_default();
        let mut rows_may_exist = false;
        let finished = loop {
            if gone.is_empty() && later.is_empty() {
                // One statement, a transaction of its own.
                let mut conn = self.pool.acquire().await?;
                match write_batch(&mut conn, id, run, rows, gone, finishing, rows_may_exist).await?
                {
                    BatchWrite::Refused => return Ok(false),
                    BatchWrite::RowsThere => rows_may_exist = true,
                    BatchWrite::Written { finished } => break finished,
                }
            } else {
                let mut tx = self.pool.begin().await?;
                match write_batch(&mut tx, id, run, rows, gone, finishing, rows_may_exist).await? {
                    BatchWrite::Refused => return Ok(false),
                    BatchWrite::RowsThere => {
                        tx.rollback().await?;
                        rows_may_exist = true;
                    }
                    BatchWrite::Written { finished } => {
                        enqueue_batches(&mut tx, later).await?;
                        tx.commit().await?;
                        break finished;
                    }
                }
            }
            tracing::warn!(
                message_id = id,
                "rows already there: the batch's write is made again, keeping them"
            );
        };
        if finished {
            drop_batch_state(&self.pool, id).await?;
        }
        self.changed(finished);
        Ok(true)
    }

    /// Connects to the database at `url` (`postgres://user@host/db`) with at most
    /// `max_connections` connections, and brings its tables up to date. Many processes may
    /// open one database at once: the migrations take a lock.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name("c2dm_migrations");
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError(e.into()))?;
        Ok(Self {
            pool,
            changes: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            finishes: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            cancels: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// Tells the watchers of [`Store::changes`] of a write recorded, and those of
    /// [`Store::finishes`] too if it `finished` a push (or asked for a cancel).
    fn changed(&self, finished: bool) {
        self.changes.send_modify(|n| *n += 1);
        if finished {
            self.finishes.send_modify(|n| *n += 1);
        }
    }

    /// The connection pool, shared with the job queues.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn counts(&self, id: i64, total: Option<u64>) -> Result<Counts, sqlx::Error> {
        let groups = sqlx::query(
            "SELECT outcome, error, COUNT(*) FROM deliveries WHERE message_id = $1 \
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
        let mut conn = self.pool.acquire().await?;
        if set_device_state(&mut conn, registration_id, state, reason, now).await? == 0 {
            return Ok(None);
        }
        drop(conn);
        self.device(registration_id).await
    }
}

/// What [`write_batch`] did.
enum BatchWrite {
    /// Nothing: the run is not the batch's latest, or the batch's marks went with its
    /// finished push and it had rows to write.
    Refused,
    /// Its rows and gone devices, and whether that finished the push (now).
    Written { finished: bool },
    /// Nothing: a device had its row already, and `rows_may_exist` was false. The
    /// transaction has failed; the write is to be made again, in a new one, with it true.
    RowsThere,
}

/// A write of a batch's rows, in one statement: the batch's mark locked (until the commit: a
/// later run's claim waits for these rows, and then reads them as recorded), and only if it is
/// still this run's (`$10`), the rows inserted, the push's counters moved by them, the push
/// finished if that recorded its last device (at `$11`), and the batch marked finished if `$12`.
/// It answers the mark's run (none if the mark is gone) and whether it finished the push.
///
/// One statement is a transaction of its own: a write with no gone devices and nothing left
/// for later is one round trip, where a transaction of its statements took five. Each round
/// trip wakes a server process and this one, and in a push to 200,000 devices the database
/// made about 9,400 of them (docs/PERFORMANCE.md).
///
/// The rows go without `ON CONFLICT`: a device that has its row already fails the statement.
/// No run writes a device's row twice (a run again reads which devices have theirs first, and
/// the batch's mark refuses an earlier run), so that is not expected; a write that meets one
/// is made again with [`WRITE_ROWS_KEEPING`]. An `ON CONFLICT` insert looks each row's key up
/// before inserting it, takes a lock to insert it alone, and confirms it after (a second
/// change to the row's page, with its log record): rows written that way took 1.4-1.6 times as
/// long (docs/PERFORMANCE.md).
///
/// The push counts as finished by this write when its state is done (or cancelled) at this
/// write's time: a write of another process that finished it in the same millisecond is
/// taken for this one's too, which only means its batches' state is deleted twice.
macro_rules! write_rows {
    ($($on_conflict:literal)?) => {
        concat!(
            "WITH mark AS (SELECT run FROM batch_marks WHERE message_id = $1 AND batch = $9 \
             FOR UPDATE), \
             ours AS (SELECT FROM mark WHERE run = $10), \
             finishing AS (UPDATE batch_marks SET finished = TRUE \
             WHERE message_id = $1 AND batch = $9 AND $12 AND EXISTS (SELECT FROM ours)), \
             written AS (INSERT INTO deliveries (message_id, registration_id, outcome, \
             c2dm_message_id, error, attempts, possible_duplicates, at) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::bigint[], $8::bigint[]) WHERE EXISTS (SELECT FROM ours) ",
            $($on_conflict,)?
            "RETURNING outcome), \
             tally AS (SELECT COUNT(*) AS n, \
             COUNT(*) FILTER (WHERE outcome = 'accepted') AS accepted, \
             COUNT(*) FILTER (WHERE outcome = 'rejected') AS rejected, \
             COUNT(*) FILTER (WHERE outcome = 'failed') AS failed, \
             COUNT(*) FILTER (WHERE outcome = 'not_attempted') AS not_attempted \
             FROM written), \
             counted AS (UPDATE messages m SET \
             recorded = m.recorded + t.n, accepted = m.accepted + t.accepted, \
             rejected = m.rejected + t.rejected, failed = m.failed + t.failed, \
             not_attempted = m.not_attempted + t.not_attempted, \
             state = CASE WHEN m.total IS NOT NULL AND m.recorded + t.n >= m.total \
             AND m.state IN ('queued', 'sending') \
             THEN CASE WHEN m.cancel_requested THEN 'cancelled' ELSE 'done' END \
             ELSE m.state END, \
             finished_at = CASE WHEN m.total IS NOT NULL AND m.recorded + t.n >= m.total \
             AND m.state IN ('queued', 'sending') THEN $11 ELSE m.finished_at END \
             FROM tally t WHERE m.id = $1 AND EXISTS (SELECT FROM ours) \
             RETURNING m.state IN ('done', 'cancelled') AND m.finished_at = $11 AS finished) \
             SELECT (SELECT run FROM mark), COALESCE((SELECT finished FROM counted), FALSE)"
        )
    };
}

/// A batch's rows, with its mark, the push's counters and its end, in one statement.
const WRITE_ROWS: &str = write_rows!();

/// [`WRITE_ROWS`], keeping the row a device has already (it is not counted again).
const WRITE_ROWS_KEEPING: &str =
    write_rows!("ON CONFLICT (message_id, registration_id) DO NOTHING ");

/// The rows and gone devices of `run` of a batch of push `id`, on `conn` (a transaction when
/// there are gone devices: a refused write is rolled back), the push finished if complete,
/// and the batch marked finished if `finishing`. `rows_may_exist`: whether rows a device has
/// already are to be kept (else such a row fails the write, see [`BatchWrite::RowsThere`]).
async fn write_batch(
    conn: &mut sqlx::PgConnection,
    id: i64,
    run: &BatchRun,
    rows: &[DeliveryRow],
    gone: &[(String, String)],
    finishing: bool,
    rows_may_exist: bool,
) -> Result<BatchWrite, StoreError> {
    let now = millis(SystemTime::now());
    let ids: Vec<&str> = rows.iter().map(|r| r.registration_id.as_str()).collect();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
    let message_ids: Vec<Option<&str>> =
        rows.iter().map(|r| r.c2dm_message_id.as_deref()).collect();
    let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
    let attempts: Vec<i64> = rows.iter().map(|r| i64::from(r.attempts)).collect();
    let duplicates: Vec<i64> = rows
        .iter()
        .map(|r| i64::from(r.possible_duplicates))
        .collect();
    let at: Vec<i64> = rows.iter().map(|r| millis(r.at)).collect();

    if !gone.is_empty() {
        // Devices in one order in every transaction, so that two batches never wait on each
        // other's rows the other way round. Before the rows' statement, so that the push's row
        // it locks is held for as short a time as it can be; a write refused there is rolled
        // back, these with it.
        let mut gone: Vec<&(String, String)> = gone.iter().collect();
        gone.sort();
        let gone_ids: Vec<&str> = gone.iter().map(|(id, _)| id.as_str()).collect();
        let gone_codes: Vec<&str> = gone.iter().map(|(_, code)| code.as_str()).collect();
        sqlx::query(
            "UPDATE devices SET state = 'gone', reason = g.code, updated_at = $3, \
             state_changed_at = CASE WHEN devices.state <> 'gone' THEN $3 \
             ELSE devices.state_changed_at END \
             FROM UNNEST($1::text[], $2::text[]) AS g(id, code) \
             WHERE devices.registration_id = g.id",
        )
        .bind(&gone_ids)
        .bind(&gone_codes)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    let written: Result<(Option<i64>, bool), sqlx::Error> = sqlx::query_as(if rows_may_exist {
        WRITE_ROWS_KEEPING
    } else {
        WRITE_ROWS
    })
    .bind(id)
    .bind(&ids)
    .bind(&outcomes)
    .bind(&message_ids)
    .bind(&errors)
    .bind(&attempts)
    .bind(&duplicates)
    .bind(&at)
    .bind(&run.batch)
    .bind(run.run)
    .bind(now)
    .bind(finishing)
    .fetch_one(&mut *conn)
    .await;
    let (latest, finished) = match written {
        Err(sqlx::Error::Database(e)) if !rows_may_exist && e.is_unique_violation() => {
            return Ok(BatchWrite::RowsThere);
        }
        written => written?,
    };
    if latest != Some(run.run) {
        // Not this run's mark. No mark at all: it went with the push, which this run's earlier
        // writes finished. Its last write then has nothing to say, and is no news of a
        // takeover.
        return Ok(if latest.is_none() && rows.is_empty() && gone.is_empty() {
            BatchWrite::Written { finished: false }
        } else {
            BatchWrite::Refused
        });
    }
    Ok(BatchWrite::Written { finished })
}

#[async_trait]
impl Store for PostgresStore {
    /// 500: the database spent 7-19 % less CPU a message than at 250, and a tenth more at 100
    /// (docs/PERFORMANCE.md).
    fn rows_per_write(&self) -> usize {
        500
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
        let mut tx = self.pool.begin().await?;
        // One statement: two registrations of one id wait for each other on its row.
        // `xmax = 0` holds for a row this statement inserted. A field the registration leaves
        // out (its flag set) keeps what is stored.
        let (id, created): (i64, bool) = sqlx::query_as(
            "INSERT INTO devices (registration_id, device_id, user_id, app_version, state, \
             created_at, updated_at, state_changed_at) \
             VALUES ($1, $2, $3, $4, 'active', $5, $5, $5) \
             ON CONFLICT (registration_id) DO UPDATE SET \
             device_id = CASE WHEN $6 THEN devices.device_id ELSE EXCLUDED.device_id END, \
             user_id = CASE WHEN $7 THEN devices.user_id ELSE EXCLUDED.user_id END, \
             app_version = CASE WHEN $8 THEN devices.app_version ELSE EXCLUDED.app_version END, \
             state = 'active', reason = NULL, updated_at = EXCLUDED.updated_at, \
             state_changed_at = CASE WHEN devices.state <> 'active' \
             THEN EXCLUDED.updated_at ELSE devices.state_changed_at END \
             RETURNING id, (xmax = 0)",
        )
        .bind(&device.registration_id)
        .bind(device.device_id.clone().flatten())
        .bind(device.user_id.clone().flatten())
        .bind(device.app_version.clone().flatten())
        .bind(now)
        .bind(device.device_id.is_none())
        .bind(device.user_id.is_none())
        .bind(device.app_version.is_none())
        .fetch_one(&mut *tx)
        .await?;
        if !created && device.tags.is_some() {
            sqlx::query("DELETE FROM device_tags WHERE device = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(tags) = device.tags.as_ref().filter(|tags| !tags.is_empty()) {
            sqlx::query(
                "INSERT INTO device_tags (tag, device) SELECT t, $2 FROM UNNEST($1::text[]) t \
                 ON CONFLICT DO NOTHING",
            )
            .bind(tags)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let row = sqlx::query(select_device!("WHERE d.id = $1"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let stored = device_of(&row)?;
        tx.commit().await?;
        let upserted = if created {
            Upserted::Created
        } else {
            Upserted::Updated
        };
        Ok((upserted, stored))
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
        let row = sqlx::query(select_device!("WHERE d.registration_id = $1"))
            .bind(registration_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(device_of).transpose()?)
    }

    async fn device_counts(&self, filter: &DeviceFilter) -> Result<DeviceCounts, StoreError> {
        let groups = sqlx::query(
            "SELECT d.state, COUNT(*) FROM devices d \
             WHERE ($1::text IS NULL OR d.user_id = $1) \
             AND ($2::text IS NULL OR EXISTS \
             (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = $2)) \
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
             JOIN deliveries d ON d.message_id = m.id AND d.registration_id = $1 \
             WHERE m.id < $2 ORDER BY m.id DESC LIMIT $3",
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
        let rows = sqlx::query(select_device!(
            "WHERE d.id > $1 "
            "AND ($2::text IS NULL OR d.state = $2) "
            "AND ($3::text IS NULL OR d.user_id = $3) "
            "AND ($4::text IS NULL OR EXISTS "
            "(SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = $4)) "
            "ORDER BY d.id LIMIT $5"
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
        let (user, tag) = match audience {
            Audience::User { user_id } => (Some(user_id.as_str()), None),
            Audience::Tag { tag } => (None, Some(tag.as_str())),
            Audience::All(_) => (None, None),
            Audience::RegistrationIds { .. } => {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
        };
        let rows = sqlx::query(
            "SELECT d.id, d.registration_id FROM devices d \
             WHERE d.id > $1 AND d.state = 'active' \
             AND ($2::text IS NULL OR d.user_id = $2) \
             AND ($3::text IS NULL OR EXISTS \
             (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = $3)) \
             ORDER BY d.id LIMIT $4",
        )
        .bind(after.unwrap_or(0))
        .bind(user)
        .bind(tag)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<(i64, String)>, sqlx::Error>>()?;
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
                "SELECT registration_id, state FROM devices \
                 WHERE state IN ('unregistered', 'gone') AND id > $1 AND id <= $2",
            )
            .bind(positions.after)
            .bind(positions.through)
            .fetch_all(&self.pool)
            .await?;
            return Ok(states_among(rows, registration_ids));
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT registration_id, state FROM devices \
             WHERE registration_id = ANY($1) AND state <> 'active'",
        )
        .bind(registration_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, state)| DeviceState::parse(&state).map(|state| (id, state)))
            .collect())
    }

    async fn create_message(
        &self,
        message: &NewMessage,
    ) -> Result<(bool, MessageRecord), StoreError> {
        let now = millis(SystemTime::now());
        let audience = serde_json::to_string(&message.audience).map_err(json_error)?;
        let data = serde_json::to_string(&message.data).map_err(json_error)?;
        let mut tx = self.pool.begin().await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO messages (idempotency_key, audience, collapse_key, data, \
             delay_while_idle, state, created_at) VALUES ($1, $2, $3, $4, $5, 'queued', $6) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        )
        .bind(&message.idempotency_key)
        .bind(audience)
        .bind(&message.collapse_key)
        .bind(data)
        .bind(message.delay_while_idle)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let (created, id) = match inserted {
            Some(id) => {
                let job = queue::task(&PushJob { message_id: id }, None).map_err(json_error)?;
                apalis_postgres::queries::push_tasks(&mut *tx, queue::PUSH_QUEUE, vec![job])
                    .await
                    .map_err(queue::queue_failure)?;
                (true, id)
            }
            None => (
                false,
                sqlx::query_scalar("SELECT id FROM messages WHERE idempotency_key = $1")
                    .bind(&message.idempotency_key)
                    .fetch_one(&mut *tx)
                    .await?,
            ),
        };
        tx.commit().await?;
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
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE messages SET walk_after = $1, walked = walked + $2 \
             WHERE id = $3 AND walk_after IS NOT DISTINCT FROM $4",
        )
        .bind(to)
        .bind(big(registration_ids.len() as u64))
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
            registration_ids: registration_ids.to_vec(),
            possibly_sent: Vec::new(),
            positions,
            list: None,
        };
        enqueue_batches(&mut tx, &[(batch, None)]).await?;
        tx.commit().await?;
        Ok(true)
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
        let rows = sqlx::query(select_message!("WHERE id < $1 ORDER BY id DESC LIMIT $2"))
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let decode = |row: &_| message_of(row, Counts::default());
        Ok(page_of(&rows, limit, decode, |m| m.id)?)
    }

    async fn start_sending(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE messages SET state = 'sending' WHERE id = $1 AND state = 'queued'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish_walk(&self, id: i64, total: u64) -> Result<(), StoreError> {
        let now = millis(SystemTime::now());
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE messages SET total = $1 WHERE id = $2")
            .bind(big(total))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let finished = finish_if_complete(&mut tx, id, now).await?;
        tx.commit().await?;
        if finished {
            drop_batch_state(&self.pool, id).await?;
        }
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
        sqlx::query(NOTE_PUSH_ERROR)
            .bind(id)
            .bind(error)
            .bind(millis(at))
            .bind(millis(since))
            .execute(&self.pool)
            .await?;
        self.changed(false);
        Ok(())
    }

    async fn clear_push_failing(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query(CLEAR_PUSH_FAILING)
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.changed(false);
        Ok(())
    }

    async fn request_cancel(&self, id: i64) -> Result<Option<MessageRecord>, StoreError> {
        sqlx::query(
            "UPDATE messages SET cancel_requested = TRUE \
             WHERE id = $1 AND state NOT IN ('done', 'cancelled')",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.changed(true);
        self.cancels.send_modify(|n| *n += 1);
        self.message(id).await
    }

    async fn batch_list(&self, list: i64) -> Result<Option<BatchJob>, StoreError> {
        let job: Option<String> = sqlx::query_scalar("SELECT job FROM batch_lists WHERE id = $1")
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
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT registration_id FROM deliveries \
             WHERE message_id = $1 AND registration_id = ANY($2)",
        )
        .bind(id)
        .bind(registration_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().collect())
    }

    async fn claim_batch(&self, id: i64, batch: &str) -> Result<BatchRun, StoreError> {
        // A push already finished has its batches' marks deleted with it (just after its
        // last write), and a claim then writes none back (it would stay for good): run 0,
        // finished. A claim that read the push before that write committed claims as usual,
        // and the deletion that follows the write takes its mark too.
        let claimed: Option<(i64, i64, i64, bool)> = sqlx::query_as(
            "INSERT INTO batch_marks (message_id, batch, sent_through, run) \
             SELECT $1, $2, 0, 1 WHERE NOT EXISTS (SELECT FROM messages WHERE id = $1 \
             AND state IN ('done', 'cancelled')) \
             ON CONFLICT (message_id, batch) DO UPDATE SET run = batch_marks.run + 1 \
             RETURNING run, sent_through, sending_runs, finished",
        )
        .bind(id)
        .bind(batch)
        .fetch_optional(&self.pool)
        .await?;
        let (run, through, sending_runs, finished) = claimed.unwrap_or((0, 0, 0, true));
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
        let marked = sqlx::query(
            "UPDATE batch_marks SET sent_through = GREATEST(sent_through, $3), \
             sending_runs = sending_runs + CASE WHEN marked_run = $4 THEN 0 ELSE 1 END, \
             marked_run = $4 \
             WHERE message_id = $1 AND batch = $2 AND run = $4",
        )
        .bind(id)
        .bind(&run.batch)
        .bind(i64::try_from(through).unwrap_or(i64::MAX))
        .bind(run.run)
        .execute(&self.pool)
        .await?;
        Ok(marked.rows_affected() == 1)
    }

    async fn record_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
    ) -> Result<bool, StoreError> {
        self.write_batch_then(id, run, rows, gone, None).await
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
        self.write_batch_then(id, run, rows, gone, Some(&later))
            .await
    }

    async fn deliveries(
        &self,
        id: i64,
        outcome: Option<OutcomeKind>,
        error: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<DeliveryRow>, Option<String>), StoreError> {
        // A page of the push's rows, narrowed by outcome as `$outcome` says.
        macro_rules! page_by {
            ($outcome:literal) => {
                select_deliveries!(
                    "WHERE message_id = $1 AND " $outcome " AND ($5::text IS NULL OR error = $5) \
                     AND registration_id > $3 ORDER BY registration_id LIMIT $4"
                )
            };
        }
        // Rows with an error are read from the index of those, rows not accepted from the
        // index that keeps only them, the others in the key's order. The condition written
        // out is what lets the planner use an index: `($5 IS NULL OR error = $5)` alone does
        // not.
        let rows = sqlx::query(match (outcome, error) {
            (_, Some(_)) => page_by!("($2::text IS NULL OR outcome = $2) AND error = $5"),
            (Some(o), None) if o != OutcomeKind::Accepted => {
                page_by!("outcome = $2 AND outcome <> 'accepted'")
            }
            _ => page_by!("($2::text IS NULL OR outcome = $2)"),
        })
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
            sqlx::query_scalar("SELECT paused_until FROM sender_accounts WHERE account = $1")
                .bind(account)
                .fetch_optional(&self.pool)
                .await?;
        let now = SystemTime::now();
        Ok(until.flatten().map(time_of).filter(|until| *until > now))
    }

    async fn pause_account(&self, account: &str, until: SystemTime) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sender_accounts (account, paused_until) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET paused_until = \
             GREATEST(COALESCE(sender_accounts.paused_until, 0), EXCLUDED.paused_until)",
        )
        .bind(account)
        .bind(millis(until))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reserve_budget(
        &self,
        account: &str,
        day: i64,
        daily: u64,
        wanted: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO sender_accounts (account) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(account)
            .execute(&mut *tx)
            .await?;
        let (stored_day, used): (i64, i64) = sqlx::query_as(
            "SELECT budget_day, budget_used FROM sender_accounts WHERE account = $1 FOR UPDATE",
        )
        .bind(account)
        .fetch_one(&mut *tx)
        .await?;
        let used = if stored_day == day {
            u64::try_from(used).unwrap_or(0)
        } else {
            0
        };
        let granted = super::grant(daily, used, wanted);
        sqlx::query(
            "UPDATE sender_accounts SET budget_day = $2, budget_used = $3 WHERE account = $1",
        )
        .bind(account)
        .bind(day)
        .bind(big(used + granted))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(granted)
    }

    async fn release_budget(&self, account: &str, day: i64, unused: u64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sender_accounts SET budget_used = GREATEST(budget_used - $1, 0) \
             WHERE account = $2 AND budget_day = $3",
        )
        .bind(big(unused))
        .bind(account)
        .bind(day)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
