//! [`Store`] on SQLite: one file, WAL, nothing to start.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, SqlitePool};

use super::{Device, DeviceFilter, DeviceState, NewDevice, Page, Store, StoreError, Upserted};

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
}

fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn time_of(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn device_of(row: &SqliteRow) -> Result<Device, sqlx::Error> {
    let state: String = row.try_get(5)?;
    let tags: Option<String> = row.try_get(10)?;
    Ok(Device {
        position: row.try_get(0)?,
        registration_id: row.try_get(1)?,
        device_id: row.try_get(2)?,
        user_id: row.try_get(3)?,
        app_version: row.try_get(4)?,
        state: DeviceState::parse(&state)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown device state {state:?}").into()))?,
        reason: row.try_get(6)?,
        created_at: time_of(row.try_get(7)?),
        updated_at: time_of(row.try_get(8)?),
        state_changed_at: time_of(row.try_get(9)?),
        tags: tags
            .map(|t| t.split('\u{1f}').map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

impl SqliteStore {
    /// Opens (creating it if needed) the database at `url` (`sqlite://c2dm.db`,
    /// `sqlite::memory:`), in WAL mode with foreign keys on, and brings its tables up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // An in-memory database lives as long as its one connection.
        let memory = url.contains(":memory:");
        let pool = SqlitePoolOptions::new()
            .max_connections(if memory { 1 } else { 8 })
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
        Ok(Self { pool })
    }

    /// The connection pool, shared with whatever else keeps its tables in the same file.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn set_state(
        &self,
        registration_id: &str,
        state: DeviceState,
        reason: Option<&str>,
    ) -> Result<Option<Device>, StoreError> {
        let now = millis(SystemTime::now());
        let changed = sqlx::query(
            "UPDATE devices SET state = ?1, reason = ?2, updated_at = ?3, \
             state_changed_at = CASE WHEN state <> ?1 THEN ?3 ELSE state_changed_at END \
             WHERE registration_id = ?4",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(now)
        .bind(registration_id)
        .execute(&self.pool)
        .await?;
        if changed.rows_affected() == 0 {
            return Ok(None);
        }
        self.device(registration_id).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn upsert_device(&self, device: &NewDevice) -> Result<(Upserted, Device), StoreError> {
        let now = millis(SystemTime::now());
        // IMMEDIATE: take the write lock first, so two registrations of one id cannot both
        // read "unknown" and race to insert.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let known: Option<i64> =
            sqlx::query_scalar("SELECT id FROM devices WHERE registration_id = ?")
                .bind(&device.registration_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (upserted, id) = match known {
            Some(id) => {
                sqlx::query(
                    "UPDATE devices SET device_id = ?1, user_id = ?2, app_version = ?3, \
                     state = 'active', reason = NULL, updated_at = ?4, \
                     state_changed_at = CASE WHEN state <> 'active' THEN ?4 ELSE state_changed_at END \
                     WHERE id = ?5",
                )
                .bind(&device.device_id)
                .bind(&device.user_id)
                .bind(&device.app_version)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM device_tags WHERE device = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                (Upserted::Updated, id)
            }
            None => {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO devices (registration_id, device_id, user_id, app_version, state, \
                     created_at, updated_at, state_changed_at) \
                     VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?5, ?5) RETURNING id",
                )
                .bind(&device.registration_id)
                .bind(&device.device_id)
                .bind(&device.user_id)
                .bind(&device.app_version)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                (Upserted::Created, id)
            }
        };
        for tag in &device.tags {
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
        let stored = device_of(&row)?;
        tx.commit().await?;
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
        let row = sqlx::query(select_device!("WHERE d.registration_id = ?"))
            .bind(registration_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(device_of).transpose()?)
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
        let mut items = rows.iter().map(device_of).collect::<Result<Vec<_>, _>>()?;
        let next = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|d| d.position)
        } else {
            None
        };
        Ok(Page { items, next })
    }
}
