//! What only PostgreSQL does: a batch's write as one statement over arrays (`UNNEST`), the
//! upsert as one `INSERT … ON CONFLICT`, and lookups of many ids as `ANY($1)`. Where SQLite
//! takes the database's one write lock, PostgreSQL locks rows: the push's counters are one
//! `UPDATE` that serialises the batches of a push on its row.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use super::rows::millis;
use super::shared::{BatchRows, BatchWrite, device_at, enqueue_batches};
use super::{Conn, DeliveryRow, Device, NewDevice, StoreError, Upserted};

/// Connects to the database at `url` with at most `max_connections` connections (at least
/// two), and brings its tables up to date under the migrator's lock.
pub(super) async fn open(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await?;
    super::migrate!("./migrations/postgres", &pool)?;
    Ok(pool)
}

/// Registers `device`, or updates it if known (and makes it active again), in the
/// transaction `tx`: one statement, so two registrations of one id wait for each other on its
/// row. `xmax = 0` holds for a row this statement inserted. A field the registration leaves
/// out (its flag set) keeps what is stored.
pub(super) async fn upsert(
    tx: &mut PgConnection,
    device: &NewDevice,
    now: i64,
) -> Result<(Upserted, Device), StoreError> {
    let (id, created): (i64, bool) = sqlx::query_as(
        "INSERT INTO devices (registration_id, device_id, user_id, app_version, state, \
         created_at, updated_at, state_changed_at, provider) \
         VALUES ($1, $2, $3, $4, 'active', $5, $5, $5, COALESCE($9, 'c2dm')) \
         ON CONFLICT (registration_id) DO UPDATE SET \
         provider = COALESCE($9, devices.provider), \
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
    .bind(device.provider.map(|p| p.as_str()))
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
    let upserted = if created {
        Upserted::Created
    } else {
        Upserted::Updated
    };
    Ok((upserted, device_at(Conn::Postgres(tx), id).await?))
}

/// A write of a batch's rows, in one statement: the batch's mark locked (until the commit: a
/// later run's claim waits for these rows, and then reads them as recorded), and only if it is
/// still this run's (`$10`), the rows inserted, the push's counters moved by them, the push
/// finished if that recorded its last device (at `$11`), and the batch marked finished if `$12`.
/// It answers the mark's run (none if the mark is gone) and whether it finished the push.
///
/// One statement is a transaction of its own: a write with no gone devices and nothing left
/// for later is one round trip, where a transaction of its statements takes five, and each
/// round trip wakes a server process and this one.
///
/// The rows go without `ON CONFLICT`: a device that has its row already fails the statement.
/// No run writes a device's row twice (a run again reads which devices have theirs first, and
/// the batch's mark refuses an earlier run), so that is not expected; a write that meets one
/// is made again with [`WRITE_ROWS_KEEPING`]. An `ON CONFLICT` insert looks each row's key up
/// before inserting it, takes a lock to insert it alone, and confirms it after (a second
/// change to the row's page, with its log record), which docs/PERFORMANCE.md's decisions
/// weigh.
///
/// The push counts as finished by this write when its state is done (or cancelled) at this
/// write's time: a write of another process that finished it in the same millisecond is
/// taken for this one's too, which only means its batches' state is deleted twice.
macro_rules! write_rows {
    ($($on_conflict:literal)?) => {
        concat!(
            "WITH mark AS (SELECT run FROM batch_marks WHERE push_id = $1 AND batch = $9 \
             FOR UPDATE), \
             ours AS (SELECT FROM mark WHERE run = $10), \
             finishing AS (UPDATE batch_marks SET finished = TRUE \
             WHERE push_id = $1 AND batch = $9 AND $12 AND EXISTS (SELECT FROM ours)), \
             written AS (INSERT INTO deliveries (push_id, registration_id, outcome, \
             message_id, error, attempts, possible_duplicates, at) \
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
             counted AS (UPDATE pushes m SET \
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
const WRITE_ROWS_KEEPING: &str = write_rows!("ON CONFLICT (push_id, registration_id) DO NOTHING ");

/// The rows and gone devices of `run` of a batch of push `id`, the push finished if complete;
/// for its `last` write, the batches put back for later enqueued and the batch marked
/// finished. One statement when there is nothing but rows, else one transaction. Made again,
/// keeping the rows already there, if it met one.
pub(super) async fn write_batch(
    pool: &PgPool,
    batch: &BatchRows<'_>,
) -> Result<BatchWrite, StoreError> {
    let later = batch.last.unwrap_or_default();
    let mut keeping = false;
    loop {
        let written = if batch.gone.is_empty() && later.is_empty() {
            let mut conn = pool.acquire().await?;
            write_rows(&mut conn, batch, keeping).await?
        } else {
            let mut tx = pool.begin().await?;
            let written = write_rows(&mut tx, batch, keeping).await?;
            if let Some(BatchWrite::Written { .. }) = written {
                enqueue_batches(Conn::Postgres(&mut tx), later).await?;
                tx.commit().await?;
            }
            written
        };
        match written {
            Some(written) => return Ok(written),
            None => {
                tracing::warn!(
                    push_id = batch.id,
                    "rows already there: the batch's write is made again, keeping them"
                );
                keeping = true;
            }
        }
    }
}

/// The rows and gone devices of a batch's write, on `conn` (a transaction when there are gone
/// devices: a refused write is rolled back), the push finished if complete, and the batch
/// marked finished if it is the run's last write. `keeping`: whether rows a device has already
/// are to be kept; if not, such a row fails the write, and the answer is `None` (the
/// transaction has failed: the write is to be made again, in a new one, keeping them).
async fn write_rows(
    conn: &mut PgConnection,
    batch: &BatchRows<'_>,
    keeping: bool,
) -> Result<Option<BatchWrite>, StoreError> {
    let (id, run, rows, gone) = (batch.id, batch.run, batch.rows, batch.gone);
    let now = millis(SystemTime::now());
    let column = |f: fn(&DeliveryRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
    let number = |f: fn(&DeliveryRow) -> i64| rows.iter().map(f).collect::<Vec<_>>();
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
    let written: Result<(Option<i64>, bool), sqlx::Error> = sqlx::query_as(if keeping {
        WRITE_ROWS_KEEPING
    } else {
        WRITE_ROWS
    })
    .bind(id)
    .bind(column(|r| Some(r.registration_id.as_str())))
    .bind(column(|r| Some(r.outcome.as_str())))
    .bind(column(|r| r.message_id.as_deref()))
    .bind(column(|r| r.error.as_deref()))
    .bind(number(|r| i64::from(r.attempts)))
    .bind(number(|r| i64::from(r.possible_duplicates)))
    .bind(number(|r| millis(r.at)))
    .bind(&run.batch)
    .bind(run.run)
    .bind(now)
    .bind(batch.last.is_some())
    .fetch_one(&mut *conn)
    .await;
    let (latest, finished) = match written {
        Err(sqlx::Error::Database(e)) if !keeping && e.is_unique_violation() => return Ok(None),
        written => written?,
    };
    Ok(Some(
        BatchWrite::not_ours(latest, run, rows, gone).unwrap_or(BatchWrite::Written { finished }),
    ))
}

/// Those of `ids` that are known and not active, as `(registration_id, state)`.
pub(super) async fn inactive_among(
    pool: &PgPool,
    ids: &[String],
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT registration_id, state FROM devices \
         WHERE registration_id = ANY($1) AND state <> 'active'",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Those of `ids` whose provider is FCM.
pub(super) async fn fcm_among(pool: &PgPool, ids: &[String]) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT registration_id FROM devices WHERE provider = 'fcm' AND registration_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Those of `ids` that have a row for push `id`.
pub(super) async fn recorded(
    pool: &PgPool,
    id: i64,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT registration_id FROM deliveries WHERE push_id = $1 AND registration_id = ANY($2)",
    )
    .bind(id)
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Listens, until the store is dropped, for the database's news of pushes (the trigger
/// `pushes_news`: one finished, or asked to cancel, by whichever process) and tells this
/// process's watchers of [`Store::finishes`](super::Store::finishes) and
/// [`Store::cancels`](super::Store::cancels). A lost connection is made again after a second;
/// meanwhile the watchers' own periodic looks cover for it.
pub(super) async fn listen_for_news(
    pool: PgPool,
    signals: std::sync::Weak<super::Signals>,
    mut dropped: tokio::sync::watch::Receiver<()>,
) {
    loop {
        let listening = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen("c2dm_push_news").await?;
            loop {
                listener.recv().await?;
                let Some(signals) = signals.upgrade() else {
                    return Ok::<(), sqlx::Error>(());
                };
                signals.finishes.send_modify(|n| *n += 1);
                signals.cancels.send_modify(|n| *n += 1);
            }
        };
        tokio::select! {
            result = listening => match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, "listening for pushes' news: connecting again in a second");
                }
            },
            // The store is gone: nobody listens any more.
            _ = dropped.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = dropped.changed() => return,
        }
    }
}
