//! The device registry: registrations, states, listings and the walk of an audience.

use std::time::SystemTime;

use super::rows::{
    DeviceRecord, PushDelivery, device_counts_of, millis, page_of, select_device, states_among,
};
use super::shared::SET_STATE;
use super::{
    Audience, Conn, Db, DeliveryRow, Device, DeviceCounts, DeviceFilter, DeviceState, NewDevice,
    Page, Positions, Store, StoreError, Upserted, execute, on_pool, postgres, sqlite,
};

impl Store {
    /// Registers a device, or updates a known one and makes it active again, in one
    /// transaction, keeping the fields `device` leaves out; returns which, and the device as
    /// stored. Two registrations of one id at once cannot both create it.
    pub async fn upsert_device(
        &self,
        device: &NewDevice,
    ) -> Result<(Upserted, Device), StoreError> {
        let now = millis(SystemTime::now());
        let device = device.clone();
        self.write(move |conn| {
            Box::pin(async move {
                match conn {
                    Conn::Sqlite(c) => sqlite::upsert(c, &device, now).await,
                    Conn::Postgres(c) => postgres::upsert(c, &device, now).await,
                }
            })
        })
        .await
    }

    /// The app unregistered `registration_id`: its state becomes `unregistered`. `None` when
    /// the id is unknown.
    pub async fn unregister_device(
        &self,
        registration_id: &str,
    ) -> Result<Option<Device>, StoreError> {
        self.set_state(registration_id, DeviceState::Unregistered, None)
            .await
    }

    /// C2DM reported `registration_id` gone with `reason` (its code): the state becomes
    /// `gone`, and no later push picks it. `None` when the id is unknown.
    pub async fn mark_gone(
        &self,
        registration_id: &str,
        reason: &str,
    ) -> Result<Option<Device>, StoreError> {
        self.set_state(registration_id, DeviceState::Gone, Some(reason))
            .await
    }

    async fn set_state(
        &self,
        registration_id: &str,
        state: DeviceState,
        reason: Option<&str>,
    ) -> Result<Option<Device>, StoreError> {
        let now = millis(SystemTime::now());
        let (state, reason) = (state.as_str(), reason.map(str::to_owned));
        let id = registration_id.to_owned();
        let changed = execute!(self, SET_STATE, state, reason, now, id).await?;
        if changed == 0 {
            return Ok(None);
        }
        self.device(registration_id).await
    }

    /// One device, if known.
    pub async fn device(&self, registration_id: &str) -> Result<Option<Device>, StoreError> {
        let row = on_pool!(self, |pool| sqlx::query_as::<_, DeviceRecord>(
            select_device!("WHERE d.registration_id = $1")
        )
        .bind(registration_id)
        .fetch_optional(pool)
        .await)?;
        Ok(row.map(Device::try_from).transpose()?)
    }

    /// How many devices `filter` picks, by state (its `state` is not looked at).
    pub async fn device_counts(&self, filter: &DeviceFilter) -> Result<DeviceCounts, StoreError> {
        let groups = on_pool!(self, |pool| sqlx::query_as(
            "SELECT d.state, COUNT(*) FROM devices d \
             WHERE ($1 IS NULL OR d.user_id = $1) \
             AND ($2 IS NULL OR EXISTS \
             (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = $2)) \
             GROUP BY d.state",
        )
        .bind(&filter.user_id)
        .bind(&filter.tag)
        .fetch_all(pool)
        .await)?;
        Ok(device_counts_of(groups)?)
    }

    /// Up to `limit` rows of the device `registration_id`, one per push, newest push first,
    /// from pushes older than `before` (a push id): what became of each push on it.
    pub async fn device_deliveries(
        &self,
        registration_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, DeliveryRow)>, StoreError> {
        // Pushes newest first, each looked up by its key: no index by device is kept (it
        // would cost every push's writes), and pushes are few beside their rows.
        let rows: Vec<PushDelivery> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT d.registration_id, d.outcome, d.message_id, d.error, d.attempts, \
             d.possible_duplicates, d.at, p.id AS push_id FROM pushes p \
             JOIN deliveries d ON d.push_id = p.id AND d.registration_id = $1 \
             WHERE p.id < $2 ORDER BY p.id DESC LIMIT $3",
        )
        .bind(registration_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(pool)
        .await)?;
        let convert = |r: PushDelivery| Ok((r.push_id, r.row.try_into()?));
        Ok(page_of(rows, limit, convert, |(id, _)| *id)?)
    }

    /// Up to `limit` devices matching `filter` whose position is after `after`, in order.
    pub async fn list_devices(
        &self,
        filter: &DeviceFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Device>, StoreError> {
        // One more than asked: whether it comes says whether there is a next page.
        let rows: Vec<DeviceRecord> = on_pool!(self, |pool| sqlx::query_as(select_device!(
            "WHERE d.id > $1 "
            "AND ($2 IS NULL OR d.state = $2) "
            "AND ($3 IS NULL OR d.user_id = $3) "
            "AND ($4 IS NULL OR EXISTS "
            "(SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = $4)) "
            "AND ($6 IS NULL OR substr(d.registration_id, 1, length($6)) = $6) "
            "ORDER BY d.id LIMIT $5"
        ))
        .bind(after.unwrap_or(0))
        .bind(filter.state.map(|s| s.as_str()))
        .bind(&filter.user_id)
        .bind(&filter.tag)
        .bind(i64::from(limit) + 1)
        .bind(&filter.registration_id_prefix)
        .fetch_all(pool)
        .await)?;
        Ok(page_of(rows, limit, Device::try_from, |d| d.position)?)
    }

    /// One page of the active devices a user, tag or `all` audience names, each as its
    /// position and registration id, in position order after `after` (an id list is not
    /// walked here).
    pub async fn audience_page(
        &self,
        audience: &Audience,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, String)>, StoreError> {
        let (user, tag, remaining_of) = match audience {
            Audience::User { user_id } => (Some(user_id.as_str()), None, None),
            Audience::Tag { tag } => (None, Some(tag.as_str()), None),
            Audience::All(_) => (None, None, None),
            Audience::Remaining { remaining_of } => (None, None, Some(*remaining_of)),
            Audience::RegistrationIds { .. } => {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
        };
        // The active devices after `$1` (of user `$2`, with tag `$3`, that push `$4` did not
        // reach because it was cancelled, where given), `$5` at most, in position order.
        macro_rules! active_after {
            () => {
                "SELECT d.id, d.registration_id FROM devices d \
                 WHERE d.id > $1 AND d.state = 'active' \
                 AND ($2 IS NULL OR d.user_id = $2) \
                 AND ($3 IS NULL OR EXISTS \
                 (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.tag = $3)) \
                 AND ($4 IS NULL OR EXISTS (SELECT 1 FROM deliveries r \
                 WHERE r.push_id = $4 AND r.registration_id = d.registration_id \
                 AND r.outcome = 'not_attempted' AND r.error = 'cancelled')) \
                 ORDER BY d.id LIMIT $5"
            };
        }
        let (after, limit_rows) = (after.unwrap_or(0), i64::from(limit));
        let items = match &self.db {
            Db::Sqlite(db) => sqlite::walked_page(
                sqlx::query_scalar(concat!(
                    "SELECT json_group_array(json_array(id, registration_id)) FROM (",
                    active_after!(),
                    ")"
                ))
                .bind(after)
                .bind(user)
                .bind(tag)
                .bind(remaining_of)
                .bind(limit_rows)
                .fetch_one(&db.pool)
                .await?,
            )?,
            Db::Postgres(pool) => {
                sqlx::query_as(active_after!())
                    .bind(after)
                    .bind(user)
                    .bind(tag)
                    .bind(remaining_of)
                    .bind(limit_rows)
                    .fetch_all(pool)
                    .await?
            }
        };
        let next = if items.len() == limit as usize {
            items.last().map(|(at, _)| *at)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Those of `registration_ids` whose provider is FCM (a batch sends to them through FCM,
    /// to the others through C2DM; ids not registered are C2DM's). With `positions`, as for
    /// [`Store::inactive_devices`]: the range read in position order, no lookup one by one.
    pub async fn fcm_devices(
        &self,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let found: Vec<String> = match positions {
            Some(positions) => {
                let in_range: Vec<String> = on_pool!(self, |pool| sqlx::query_scalar(
                    "SELECT registration_id FROM devices \
                     WHERE provider = 'fcm' AND id > $1 AND id <= $2"
                )
                .bind(positions.after)
                .bind(positions.through)
                .fetch_all(pool)
                .await)?;
                let named: std::collections::HashSet<&str> =
                    registration_ids.iter().map(String::as_str).collect();
                in_range
                    .into_iter()
                    .filter(|id| named.contains(id.as_str()))
                    .collect()
            }
            None => match &self.db {
                Db::Sqlite(db) => sqlite::fcm_among(&db.pool, registration_ids).await?,
                Db::Postgres(pool) => postgres::fcm_among(pool, registration_ids).await?,
            },
        };
        Ok(found.into_iter().collect())
    }

    /// Those of `registration_ids` that are known and not active, with their states (a
    /// batch sends to the others). With `positions`, where every one of them lies in the
    /// registry, the devices not active in that range are read in position order and those
    /// not named left out: no lookup device by device.
    pub async fn inactive_devices(
        &self,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<Vec<(String, DeviceState)>, StoreError> {
        let Some(positions) = positions else {
            let rows = match &self.db {
                Db::Sqlite(db) => sqlite::inactive_among(&db.pool, registration_ids).await?,
                Db::Postgres(pool) => postgres::inactive_among(pool, registration_ids).await?,
            };
            return Ok(states_among(rows, None)?);
        };
        let sql = match &self.db {
            // By the index on (state, id), whatever the statistics say: where nearly every
            // device is active, SQLite rates a range of positions about as well.
            Db::Sqlite(_) => {
                "SELECT registration_id, state FROM devices INDEXED BY devices_by_state \
                 WHERE state IN ('unregistered', 'gone') AND id > $1 AND id <= $2"
            }
            Db::Postgres(_) => {
                "SELECT registration_id, state FROM devices \
                 WHERE state IN ('unregistered', 'gone') AND id > $1 AND id <= $2"
            }
        };
        let rows = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(positions.after)
            .bind(positions.through)
            .fetch_all(pool)
            .await)?;
        Ok(states_among(rows, Some(registration_ids))?)
    }
}
