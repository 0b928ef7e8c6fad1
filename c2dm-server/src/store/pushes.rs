//! Pushes: made with their job, walked into batches, read with their counts and rows,
//! cancelled, finished.

use std::time::SystemTime;

use c2dm_core::OutcomeKind;

use super::rows::{
    DeliveryRecord, OutcomeGroup, PushRecord, big, count, counts_of, json_error, millis, page_of,
    select_deliveries, select_push, trim_page,
};
use super::shared::{enqueue_batches, finish_if_complete, push_tasks};
use super::{
    Audience, Counts, Db, DeliveryRow, NewPush, Page, Positions, Push, PushFilter, Store,
    StoreError, execute, on_conn, on_pool,
};
use crate::queue::{self, BatchJob, PushJob};

/// The query of a page of a push's rows (`$1`), narrowed by outcome (`$2`) and error (`$5`)
/// where given, after `$3`, `$4` at most. Rows with an error are read from the index of
/// those, rows not accepted from the index that keeps only them, the others in the key's
/// order. The narrowing condition is written out for each, which is what lets a planner use
/// the index; SQLite is also told which index, without which it preferred the key (which
/// holds every column) and read every row of the push.
pub(super) fn deliveries_query(
    sqlite: bool,
    outcome: Option<OutcomeKind>,
    error: bool,
) -> &'static str {
    macro_rules! page_by {
        ($($narrowed:literal)*) => {
            select_deliveries!(
                $($narrowed)* " AND ($5 IS NULL OR error = $5) \
                 AND registration_id > $3 ORDER BY registration_id LIMIT $4"
            )
        };
    }
    let not_accepted = outcome.is_some_and(|o| o != OutcomeKind::Accepted);
    match (sqlite, error, not_accepted) {
        (true, true, _) => page_by!(
            "INDEXED BY deliveries_by_error WHERE push_id = $1 "
            "AND ($2 IS NULL OR outcome = $2) AND error = $5"
        ),
        (false, true, _) => {
            page_by!("WHERE push_id = $1 AND ($2 IS NULL OR outcome = $2) AND error = $5")
        }
        (true, false, true) => page_by!(
            "INDEXED BY deliveries_by_outcome WHERE push_id = $1 "
            "AND outcome = $2 AND outcome <> 'accepted'"
        ),
        (false, false, true) => {
            page_by!("WHERE push_id = $1 AND outcome = $2 AND outcome <> 'accepted'")
        }
        (_, false, false) => page_by!("WHERE push_id = $1 AND ($2 IS NULL OR outcome = $2)"),
    }
}

impl Store {
    /// Stores a push, queued, with the job that will send it, in one transaction: a push is
    /// never stored without its job. With an idempotency key already used, stores nothing and
    /// returns the push stored under it: `(false, that push)`.
    pub async fn create_push(&self, push: &NewPush) -> Result<(bool, Push), StoreError> {
        let now = millis(SystemTime::now());
        let audience = serde_json::to_string(&push.audience).map_err(json_error)?;
        let data = serde_json::to_string(&push.data).map_err(json_error)?;
        let (key, collapse_key) = (push.idempotency_key.clone(), push.collapse_key.clone());
        let delay_while_idle = push.delay_while_idle;
        let direct = direct_batch(&push.audience);
        let (created, id) = self
            .write(move |mut conn| {
                Box::pin(async move {
                    let inserted: Option<i64> = on_conn!(conn.reborrow(), |c| sqlx::query_scalar(
                        "INSERT INTO pushes (idempotency_key, audience, collapse_key, data, \
                         delay_while_idle, state, created_at) \
                         VALUES ($1, $2, $3, $4, $5, 'queued', $6) \
                         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                    )
                    .bind(&key)
                    .bind(&audience)
                    .bind(&collapse_key)
                    .bind(&data)
                    .bind(delay_while_idle)
                    .bind(now)
                    .fetch_optional(c)
                    .await)?;
                    if let Some(id) = inserted {
                        match direct {
                            // Its one batch, with it: no walk to wait for.
                            Some(ids) => {
                                let total = big(ids.len() as u64);
                                on_conn!(conn.reborrow(), |c| sqlx::query(
                                    "UPDATE pushes SET walk_after = $1, walked = $1, \
                                     total = $1 WHERE id = $2"
                                )
                                .bind(total)
                                .bind(id)
                                .execute(c)
                                .await
                                .map(drop))?;
                                let batch = BatchJob {
                                    push_id: id,
                                    registration_ids: ids,
                                    possibly_sent: Vec::new(),
                                    positions: None,
                                    list: None,
                                };
                                enqueue_batches(conn, &[(batch, None)]).await?;
                            }
                            None => {
                                let job = queue::task(&PushJob { push_id: id }, None)
                                    .map_err(json_error)?;
                                push_tasks(conn, queue::PUSH_QUEUE, vec![job]).await?;
                            }
                        }
                        return Ok((true, id));
                    }
                    let known: i64 = on_conn!(conn, |c| sqlx::query_scalar(
                        "SELECT id FROM pushes WHERE idempotency_key = $1"
                    )
                    .bind(&key)
                    .fetch_one(c)
                    .await)?;
                    Ok((false, known))
                })
            })
            .await?;
        if created {
            self.enqueued_now();
        }
        let stored = self
            .push(id)
            .await?
            .ok_or_else(|| StoreError(sqlx::Error::RowNotFound))?;
        Ok((created, stored))
    }

    /// The registration ids push `id` did not reach because it was cancelled (its
    /// `not_attempted: cancelled` rows), in id order.
    pub async fn cancelled_ids(&self, id: i64) -> Result<Vec<String>, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT registration_id FROM deliveries WHERE push_id = $1 \
             AND outcome = 'not_attempted' AND error = 'cancelled' ORDER BY registration_id"
        )
        .bind(id)
        .fetch_all(pool)
        .await)?)
    }

    /// The push stored under an idempotency key, if one is.
    pub async fn push_by_idempotency_key(&self, key: &str) -> Result<Option<Push>, StoreError> {
        let id: Option<i64> = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT id FROM pushes WHERE idempotency_key = $1"
        )
        .bind(key)
        .fetch_optional(pool)
        .await)?;
        match id {
            Some(id) => self.push(id).await,
            None => Ok(None),
        }
    }

    async fn push_record(&self, id: i64) -> Result<Option<PushRecord>, sqlx::Error> {
        on_pool!(self, |pool| sqlx::query_as(select_push!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await)
    }

    /// One push with its counts, if it exists.
    pub async fn push(&self, id: i64) -> Result<Option<Push>, StoreError> {
        let Some(record) = self.push_record(id).await? else {
            return Ok(None);
        };
        let groups: Vec<OutcomeGroup> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT outcome, error, COUNT(*) AS n FROM deliveries WHERE push_id = $1 \
             GROUP BY outcome, error",
        )
        .bind(id)
        .fetch_all(pool)
        .await)?;
        let counts = counts_of(groups, record.total.map(count))?;
        Ok(Some(record.with(counts)?))
    }

    /// One push without its counts (left at zero), if it exists: what a job needs to send it,
    /// at a cost that does not grow with the rows it has.
    pub async fn push_to_send(&self, id: i64) -> Result<Option<Push>, StoreError> {
        let record = self.push_record(id).await?;
        Ok(record.map(|r| r.with(Counts::default())).transpose()?)
    }

    /// Up to `limit` pushes that `filter` leaves older than `before` (a push id), newest
    /// first, with their tallies but not their counts (left at zero).
    pub async fn pushes(
        &self,
        filter: &PushFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<Push>, StoreError> {
        let rows: Vec<PushRecord> = on_pool!(self, |pool| sqlx::query_as(select_push!(
            "WHERE id < $1 "
            "AND ($3 IS NULL OR state = $3) "
            "AND ($4 IS NULL OR substr(collapse_key, 1, length($4)) = $4) "
            "ORDER BY id DESC LIMIT $2"
        ))
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .bind(filter.state.map(|s| s.as_str()))
        .bind(&filter.collapse_key_prefix)
        .fetch_all(pool)
        .await)?;
        Ok(page_of(
            rows,
            limit,
            |r| r.with(Counts::default()),
            |p| p.id,
        )?)
    }

    /// A queued push starts sending (a push in any other state stays as it is).
    pub async fn start_sending(&self, id: i64) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE pushes SET state = 'sending' WHERE id = $1 AND state = 'queued'";
        execute!(self, SQL, id).await?;
        Ok(())
    }

    /// One page of the walk of push `id`'s audience: enqueues a batch job for
    /// `registration_ids` and moves the walk on from `from` to `to`, in one transaction, so
    /// that a walk that dies goes on where it was, never enqueuing a page twice. Does nothing
    /// and returns false if the walk is no longer at `from` (another walker moved it).
    /// `positions` says where the devices lie in the registry, if the page was read from it.
    pub async fn walk_page(
        &self,
        id: i64,
        from: Option<i64>,
        to: i64,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<bool, StoreError> {
        let batch = BatchJob {
            push_id: id,
            registration_ids: registration_ids.to_vec(),
            possibly_sent: Vec::new(),
            positions,
            list: None,
        };
        self.write(move |mut conn| {
            Box::pin(async move {
                let moved = on_conn!(conn.reborrow(), |c| sqlx::query(
                    "UPDATE pushes SET walk_after = $1, walked = walked + $2 \
                     WHERE id = $3 AND walk_after IS NOT DISTINCT FROM $4",
                )
                .bind(to)
                .bind(big(batch.registration_ids.len() as u64))
                .bind(id)
                .bind(from)
                .execute(c)
                .await
                .map(|done| done.rows_affected()))?;
                if moved == 0 {
                    return Ok(false);
                }
                enqueue_batches(conn, &[(batch, None)]).await?;
                Ok(true)
            })
        })
        .await
        .inspect(|moved| {
            if *moved {
                self.enqueued_now();
            }
        })
    }

    /// The push's audience has been walked: `total` devices. When every one has its row
    /// already (none at all, say), the push is finished now.
    pub async fn finish_walk(&self, id: i64, total: u64) -> Result<(), StoreError> {
        let now = millis(SystemTime::now());
        let finished = self
            .write(move |mut conn| {
                Box::pin(async move {
                    on_conn!(conn.reborrow(), |c| sqlx::query(
                        "UPDATE pushes SET total = $1 WHERE id = $2"
                    )
                    .bind(big(total))
                    .bind(id)
                    .execute(c)
                    .await
                    .map(drop))?;
                    Ok(finish_if_complete(conn, id, now).await?)
                })
            })
            .await?;
        if finished {
            self.drop_batch_state(id).await?;
            self.log_finished(id).await;
        }
        self.changed(finished);
        Ok(())
    }

    /// Says in the log that push `id` has finished: its state, counts and duration (a push
    /// finishes once, in the write that records its last device).
    pub(super) async fn log_finished(&self, id: i64) {
        let push = match self.push(id).await {
            Ok(Some(push)) => push,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(push_id = id, %error, "push finished; its counts could not be read");
                return;
            }
        };
        let seconds = push
            .finished_at
            .and_then(|at| at.duration_since(push.created_at).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let c = &push.counts;
        metrics::histogram!(crate::telemetry::PUSH_DURATION).record(seconds);
        tracing::info!(
            push_id = id,
            state = push.state.as_str(),
            total = push.total.unwrap_or(0),
            accepted = c.accepted,
            rejected = c.rejected.values().sum::<u64>(),
            failed = c.failed,
            not_attempted = c.not_attempted.values().sum::<u64>(),
            seconds,
            "push finished"
        );
    }

    /// A finished push has no use for its marks and its batches' lists: they go at once,
    /// rather than row by row. After the write that finished it, in a transaction of its own:
    /// in that write, on PostgreSQL, it would lock the marks of batches whose transactions
    /// wait for its lock on the push.
    pub(super) async fn drop_batch_state(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |mut conn| {
            Box::pin(async move {
                on_conn!(conn.reborrow(), |c| sqlx::query(
                    "DELETE FROM batch_marks WHERE push_id = $1"
                )
                .bind(id)
                .execute(c)
                .await
                .map(drop))?;
                on_conn!(conn, |c| sqlx::query(
                    "DELETE FROM batch_lists WHERE push_id = $1"
                )
                .bind(id)
                .execute(c)
                .await
                .map(drop))?;
                Ok(())
            })
        })
        .await
    }

    /// Notes on the push that a batch of it met `error` at `at` (its batches failing since
    /// `since`, if not already noted earlier), unless it has finished: best effort, for the
    /// push's status, while the batch tries again.
    pub async fn note_push_error(
        &self,
        id: i64,
        error: &str,
        at: SystemTime,
        since: SystemTime,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE pushes SET last_error = $2, last_error_at = $3, \
             failing_since = COALESCE(failing_since, $4) \
             WHERE id = $1 AND state NOT IN ('done', 'cancelled')";
        let (error, at, since) = (error.to_owned(), millis(at), millis(since));
        execute!(self, SQL, id, error, at, since).await?;
        self.changed(false);
        Ok(())
    }

    /// Notes on the push that a batch that failed wrote again: it is no longer failing (its
    /// last error stays, with when it happened).
    pub async fn clear_push_failing(&self, id: i64) -> Result<(), StoreError> {
        const SQL: &str =
            "UPDATE pushes SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL";
        execute!(self, SQL, id).await?;
        self.changed(false);
        Ok(())
    }

    /// Asks to cancel a push: batches not started write `not_attempted: cancelled` rows.
    /// A push already finished (`done` or `cancelled`) is left as it is. `None` for an unknown
    /// push.
    pub async fn request_cancel(&self, id: i64) -> Result<Option<Push>, StoreError> {
        const SQL: &str = "UPDATE pushes SET cancel_requested = TRUE \
             WHERE id = $1 AND state NOT IN ('done', 'cancelled')";
        execute!(self, SQL, id).await?;
        self.changed(true);
        self.signals.cancels.send_modify(|n| *n += 1);
        self.push(id).await
    }

    /// Up to `limit` rows of push `id` (only those with `outcome` and `error`, where given),
    /// in registration id order after `after`; the next page's cursor is the last id.
    pub async fn deliveries(
        &self,
        id: i64,
        outcome: Option<OutcomeKind>,
        error: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<DeliveryRow>, Option<String>), StoreError> {
        let sqlite = matches!(self.db, Db::Sqlite(_));
        let sql = deliveries_query(sqlite, outcome, error.is_some());
        let rows: Vec<DeliveryRecord> = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(id)
            .bind(outcome.map(|o| o.as_str()))
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit) + 1)
            .bind(error)
            .fetch_all(pool)
            .await)?;
        let items = rows
            .into_iter()
            .map(DeliveryRow::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(trim_page(items, limit, |d| d.registration_id.clone()))
    }
}

/// The most listed devices a push may have for its one batch to be enqueued with it, without a
/// walk (the workers' default batch size).
pub(crate) const DIRECT_BATCH: usize = 1000;

/// The one batch of a push to at most [`DIRECT_BATCH`] listed devices, each once, in the order
/// listed, as its walk would make it; `None` for any other audience, walked by its push job.
fn direct_batch(audience: &Audience) -> Option<Vec<String>> {
    let Audience::RegistrationIds { registration_ids } = audience else {
        return None;
    };
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<String> = registration_ids
        .iter()
        .filter(|id| seen.insert(id.as_str()))
        .cloned()
        .collect();
    (!ids.is_empty() && ids.len() <= DIRECT_BATCH).then_some(ids)
}
