//! What only SQLite does: one file in WAL mode, this process's writes committed in groups
//! ([`super::group`]) with a busy handler of our own ([`super::busy`]), the upsert in the
//! writer's transaction, batch writes chunked by SQLite's parameter limit, and a page of the
//! walk as one JSON value.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{SqliteConnection, SqlitePool};

use super::group::Writer;
use super::rows::{json_error, millis, tally_update};
use super::shared::{
    BatchRows, BatchWrite, SET_STATE, device_at, enqueue_batches, finish_if_complete,
};
use super::{
    Conn, Device, DeviceState, NewDevice, OutcomeTally, ROWS_PER_WRITE, StoreError, Upserted,
};
use crate::queue;

/// A store's SQLite file: the pool, and the writer every write of this process goes through.
#[derive(Debug, Clone)]
pub(super) struct Sqlite {
    pub(super) pool: SqlitePool,
    /// Runs the writes waiting in one transaction and commits them together ([`Writer`]), so
    /// that this process's writers do not meet in SQLite's busy handler (other processes
    /// still wait in it).
    pub(super) writer: Writer,
}

/// Each connection's page cache, in KiB (SQLite's default is 2,000). Each connection of the
/// pool keeps its own cache, of much the same hot pages, so the process grows by this times
/// the pool's size once its tables are large. This holds the interior pages of the tables a
/// push touches; their leaves come from the operating system's cache. The evidence is in
/// docs/PERFORMANCE.md's decisions.
pub(super) const PAGE_CACHE_KIB: u32 = 512;

/// The pool's connections to a file: the writer keeps one, and the job queue, the batches'
/// reads and the API's share the rest. Each is a thread with its own page cache, which a write
/// of another connection drops, so fewer do more (docs/PERFORMANCE.md's decisions).
const CONNECTIONS: u32 = 4;

/// How many times opening a file another process is turning to WAL is tried again (every
/// 20 ms: a second in all).
const OPEN_TRIES: u32 = 50;

/// The most delivery rows one `INSERT` takes (eight parameters each, within SQLite's 32,766).
const ROWS_PER_STATEMENT: usize = 500;

/// The most ids one `IN (…)` list takes.
const IDS_PER_STATEMENT: usize = 500;

impl Sqlite {
    /// Opens (creating it if needed) the database at `url`, in WAL mode with foreign keys on,
    /// migrated, with its writer started on the current runtime.
    pub(super) async fn open(url: &str) -> Result<Self, StoreError> {
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
        let connect = || {
            SqlitePoolOptions::new()
                // A connection to a file in this process does not go stale: no ping (a round trip
                // to the connection's thread) before each use.
                .test_before_acquire(false)
                .after_connect(|conn, _| Box::pin(super::busy::install(conn)))
                .max_connections(if memory { 1 } else { CONNECTIONS })
                .min_connections(u32::from(memory))
                .idle_timeout((!memory).then_some(Duration::from_secs(600)))
                .max_lifetime((!memory).then_some(Duration::from_secs(3600)))
                .connect_with(options.clone())
        };
        // Turning a fresh file to WAL takes its lock at once, without waiting: processes that
        // start together on one file may be refused ("database is locked") and try again.
        let mut tries = 0;
        let pool = loop {
            match connect().await {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("5") && tries < OPEN_TRIES =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result => break result?,
            }
        };
        super::migrate!("./migrations/sqlite", &pool)?;
        let writer = Writer::start(pool.clone());
        Ok(Self { pool, writer })
    }
}

/// Registers `device`, or updates it if known (and makes it active again), in the writer's
/// transaction (`BEGIN IMMEDIATE`: the write lock first, so two registrations of one id cannot
/// both read "unknown"): which, and the device as stored.
pub(super) async fn upsert(
    tx: &mut SqliteConnection,
    device: &NewDevice,
    now: i64,
) -> Result<(Upserted, Device), StoreError> {
    let known: Option<i64> =
        sqlx::query_scalar("SELECT id FROM devices WHERE registration_id = $1")
            .bind(&device.registration_id)
            .fetch_optional(&mut *tx)
            .await?;
    let (upserted, id) = match known {
        Some(id) => {
            // A field the registration leaves out (its flag set) keeps what is stored.
            sqlx::query(
                "UPDATE devices SET device_id = CASE WHEN $1 THEN device_id ELSE $2 END, \
                 user_id = CASE WHEN $3 THEN user_id ELSE $4 END, \
                 app_version = CASE WHEN $5 THEN app_version ELSE $6 END, \
                 provider = COALESCE($9, provider), \
                 state = 'active', reason = NULL, updated_at = $7, state_changed_at = \
                 CASE WHEN state <> 'active' THEN $7 ELSE state_changed_at END \
                 WHERE id = $8",
            )
            .bind(device.device_id.is_none())
            .bind(device.device_id.clone().flatten())
            .bind(device.user_id.is_none())
            .bind(device.user_id.clone().flatten())
            .bind(device.app_version.is_none())
            .bind(device.app_version.clone().flatten())
            .bind(now)
            .bind(id)
            .bind(device.provider.map(|p| p.as_str()))
            .execute(&mut *tx)
            .await?;
            if device.tags.is_some() {
                sqlx::query("DELETE FROM device_tags WHERE device = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            (Upserted::Updated, id)
        }
        None => {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO devices (registration_id, device_id, user_id, app_version, state, \
                 created_at, updated_at, state_changed_at, provider) \
                 VALUES ($1, $2, $3, $4, 'active', $5, $5, $5, $6) RETURNING id",
            )
            .bind(&device.registration_id)
            .bind(device.device_id.clone().flatten())
            .bind(device.user_id.clone().flatten())
            .bind(device.app_version.clone().flatten())
            .bind(now)
            .bind(device.provider.unwrap_or_default().as_str())
            .fetch_one(&mut *tx)
            .await?;
            (Upserted::Created, id)
        }
    };
    for tag in device.tags.iter().flatten() {
        sqlx::query("INSERT OR IGNORE INTO device_tags (tag, device) VALUES ($1, $2)")
            .bind(tag)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok((upserted, device_at(Conn::Sqlite(tx), id).await?))
}

/// The rows and gone devices of `run` of a batch of push `id`, in the writer's transaction
/// `conn`, then the push finished if complete; for its `last` write, the batches put back for
/// later enqueued and the batch marked finished.
pub(super) async fn write_batch(
    conn: &mut SqliteConnection,
    batch: &BatchRows<'_>,
) -> Result<BatchWrite, StoreError> {
    let BatchRows {
        id,
        run,
        rows,
        gone,
        last,
    } = *batch;
    let now = millis(SystemTime::now());
    // Writes are one at a time: a later run's claim comes before or after this whole
    // transaction.
    let latest: Option<i64> =
        sqlx::query_scalar("SELECT run FROM batch_marks WHERE push_id = $1 AND batch = $2")
            .bind(id)
            .bind(&run.batch)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(answer) = BatchWrite::not_ours(latest, run, rows, gone) {
        return Ok(answer);
    }
    let mut written = OutcomeTally::default();
    let mut recount = false;
    // One statement for a write's rows: each statement is a round trip to the connection's
    // thread.
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut query = sqlx::query(insert_deliveries(chunk.len()));
        for row in chunk {
            query = query
                .bind(id)
                .bind(row.registration_id.as_str())
                .bind(row.outcome.as_str())
                .bind(row.message_id.as_deref())
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
        sqlx::query(SET_STATE)
            .bind(DeviceState::Gone.as_str())
            .bind(code)
            .bind(now)
            .bind(registration_id)
            .execute(&mut *conn)
            .await?;
    }
    let finished = if recount {
        tracing::warn!(
            push_id = id,
            "rows already there: the push's counts are recounted"
        );
        sqlx::query(
            "UPDATE pushes SET \
             recorded = (SELECT COUNT(*) FROM deliveries WHERE push_id = $1), \
             accepted = (SELECT COUNT(*) FROM deliveries WHERE push_id = $1 \
                         AND outcome = 'accepted'), \
             rejected = (SELECT COUNT(*) FROM deliveries WHERE push_id = $1 \
                         AND outcome = 'rejected'), \
             failed = (SELECT COUNT(*) FROM deliveries WHERE push_id = $1 \
                       AND outcome = 'failed'), \
             not_attempted = (SELECT COUNT(*) FROM deliveries WHERE push_id = $1 \
                              AND outcome = 'not_attempted') \
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
        finish_if_complete(Conn::Sqlite(conn), id, now).await?
    } else {
        // The counts, and the push finished if these were its last rows, in one statement
        // (each `SET` reads the row as it was).
        let [recorded, accepted, rejected, failed, not_attempted] = tally_update(&written);
        sqlx::query_scalar(
            "UPDATE pushes SET recorded = recorded + $1, accepted = accepted + $2, \
             rejected = rejected + $3, failed = failed + $4, \
             not_attempted = not_attempted + $5, \
             state = CASE WHEN total IS NOT NULL AND recorded + $1 >= total \
                          AND state IN ('queued', 'sending') \
                     THEN CASE WHEN cancel_requested THEN 'cancelled' ELSE 'done' END \
                     ELSE state END, \
             finished_at = CASE WHEN total IS NOT NULL AND recorded + $1 >= total \
                                AND state IN ('queued', 'sending') \
                           THEN $6 ELSE finished_at END \
             WHERE id = $7 \
             RETURNING finished_at IS $6 AND state IN ('done', 'cancelled')",
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
    if let Some(later) = last {
        enqueue_batches(Conn::Sqlite(conn), later).await?;
        sqlx::query("UPDATE batch_marks SET finished = TRUE WHERE push_id = $1 AND batch = $2")
            .bind(id)
            .bind(&run.batch)
            .execute(&mut *conn)
            .await?;
        forget_done_jobs(conn).await?;
    }
    Ok(BatchWrite::Written { finished })
}

/// The `INSERT` of `n` delivery rows; the text for a whole write ([`ROWS_PER_WRITE`] rows,
/// most writes) made once.
fn insert_deliveries(n: usize) -> sqlx::SqlStr {
    fn text(n: usize) -> String {
        let mut sql = String::from(
            "INSERT INTO deliveries (push_id, registration_id, outcome, message_id, \
             error, attempts, possible_duplicates, at) VALUES ",
        );
        for at in 0..n {
            if at > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?)");
        }
        sql.push_str(" ON CONFLICT (push_id, registration_id) DO NOTHING");
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

/// Deletes the queue's jobs that are done, in the write transaction `conn`: each batch's last
/// write does it, so the queue keeps only the few jobs done since the last batch finished.
///
/// apalis-sqlite marks a job done with a statement that SQLite runs as a read of every job its
/// worker (one name per process) has ever taken, done ones included, under the write lock:
/// kept, they made each batch's end slower than the last for as long as the process ran.
/// Nothing reads a done job again; a failed or killed one is kept.
async fn forget_done_jobs(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM Jobs WHERE job_type IN ($1, $2) AND status = 'Done'")
        .bind(queue::BATCH_QUEUE)
        .bind(queue::PUSH_QUEUE)
        .execute(conn)
        .await?;
    Ok(())
}

/// The page of a walk as [`super::devices`] reads it on SQLite: one JSON value, an array of
/// `[position, registration_id]`, in order. Rows come from the connection's thread one at a
/// time, each a hand-off between threads that costs more than the row (`benches/store.rs`
/// measures it), so SQLite aggregates them first.
pub(super) fn walked_page(page: Option<String>) -> Result<Vec<(i64, String)>, StoreError> {
    let mut items: Vec<(i64, String)> = match page {
        Some(page) => serde_json::from_str(&page).map_err(json_error)?,
        None => Vec::new(),
    };
    // SQLite aggregates an ordered subquery's rows in its order; the walk's next page starts
    // after the last, so that is checked (an `ORDER BY` in the aggregate sorts them again, at
    // a cost).
    if !items.is_sorted_by_key(|(at, _)| *at) {
        items.sort_unstable_by_key(|(at, _)| *at);
    }
    Ok(items)
}

/// Runs `query` (ending in `IN (`) for each chunk of `ids`, the list closed after them, and
/// collects the rows: SQLite takes at most 32,766 parameters a statement.
async fn in_chunks<T>(
    pool: &SqlitePool,
    query: &'static str,
    id: Option<i64>,
    ids: &[String],
) -> Result<Vec<T>, StoreError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
{
    let mut found = Vec::new();
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let mut builder = sqlx::QueryBuilder::<sqlx::Sqlite>::new(query);
        if let Some(id) = id {
            builder.push_bind(id);
            builder.push(" AND registration_id IN (");
        }
        let mut list = builder.separated(", ");
        for rid in chunk {
            list.push_bind(rid);
        }
        builder.push(")");
        found.extend(builder.build_query_as::<T>().fetch_all(pool).await?);
    }
    Ok(found)
}

/// Those of `ids` that are known and not active, as `(registration_id, state)`.
pub(super) async fn inactive_among(
    pool: &SqlitePool,
    ids: &[String],
) -> Result<Vec<(String, String)>, StoreError> {
    let query = "SELECT registration_id, state FROM devices WHERE state <> 'active' \
                 AND registration_id IN (";
    in_chunks(pool, query, None, ids).await
}

/// Those of `ids` whose provider is FCM.
pub(super) async fn fcm_among(
    pool: &SqlitePool,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let query = "SELECT registration_id FROM devices WHERE provider = 'fcm' \
                 AND registration_id IN (";
    let rows: Vec<(String,)> = in_chunks(pool, query, None, ids).await?;
    Ok(rows.into_iter().map(|(rid,)| rid).collect())
}

/// Those of `ids` that have a row for push `id`.
pub(super) async fn recorded(
    pool: &SqlitePool,
    id: i64,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let query = "SELECT registration_id FROM deliveries WHERE push_id = ";
    let rows: Vec<(String,)> = in_chunks(pool, query, Some(id), ids).await?;
    Ok(rows.into_iter().map(|(rid,)| rid).collect())
}

#[cfg(test)]
mod tests {
    use c2dm_core::OutcomeKind;
    use sqlx::Row;

    use super::*;
    use crate::store::pushes::deliveries_query;
    use crate::store::{Audience, Store};

    #[tokio::test]
    async fn a_walk_reads_every_active_device_once_in_order_whatever_its_id_holds() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c2dm.db").display());
        let store = Store::open_sqlite(&url).await.unwrap();
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
        let store = Store::open_sqlite("sqlite::memory:").await.unwrap();
        let cases = [
            (None, true, "deliveries_by_error"),
            (Some(OutcomeKind::Rejected), true, "deliveries_by_error"),
            (Some(OutcomeKind::Failed), false, "deliveries_by_outcome"),
            (Some(OutcomeKind::Accepted), false, "PRIMARY KEY"),
            (None, false, "PRIMARY KEY"),
        ];
        for (outcome, error, index) in cases {
            let sql = format!(
                "EXPLAIN QUERY PLAN {}",
                deliveries_query(true, outcome, error)
            );
            let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(1_i64)
                .bind(outcome.map(|o| o.as_str()))
                .bind("")
                .bind(101_i64)
                .bind(error.then_some("NotRegistered"))
                .fetch_all(store.sqlite_pool().unwrap())
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
        let store = Store::open_sqlite(&url).await.unwrap();
        // Two at once: a second connection is opened with the same settings.
        let mut first = store.sqlite_pool().unwrap().acquire().await.unwrap();
        let mut second = store.sqlite_pool().unwrap().acquire().await.unwrap();
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
        let store = Store::open_sqlite(&url).await.unwrap();
        let mut holder = store
            .sqlite_pool()
            .unwrap()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .unwrap();
        let pool = store.sqlite_pool().unwrap().clone();
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
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap();
        assert_eq!(accounts, 2);
    }
}
