//! What the store's operations and the database modules both run inside a write: a device's
//! state, a device read back, a push finished, batches enqueued, and what a batch's write is
//! and did. Below both, so that neither imports the other.

use std::time::SystemTime;

use apalis::prelude::Task;

use super::rows::{DeviceRecord, json_error, select_device};
use super::{BatchRun, Conn, DeliveryRow, Device, StoreError, on_conn};
use crate::queue::{self, BatchJob};

/// Sets a device's state (`$1`) and reason (`$2`) at `$3`, its state-change time only if the
/// state changes, by registration id (`$4`).
pub(super) const SET_STATE: &str = "UPDATE devices SET state = $1, reason = $2, updated_at = $3, \
     state_changed_at = CASE WHEN state <> $1 THEN $3 ELSE state_changed_at END \
     WHERE registration_id = $4";

/// The device at position `id`, on the connection of a write.
pub(super) async fn device_at(conn: Conn<'_>, id: i64) -> Result<Device, sqlx::Error> {
    on_conn!(conn, |c| sqlx::query_as::<_, DeviceRecord>(select_device!(
        "WHERE d.id = $1"
    ))
    .bind(id)
    .fetch_one(c)
    .await)?
    .try_into()
}

/// Marks push `id` finished if its audience is walked and every device has its row:
/// `cancelled` if a cancel was asked for, `done` otherwise. Whether it finished: its batches'
/// state is then the caller's to drop, after the commit ([`Store::drop_batch_state`]).
pub(super) async fn finish_if_complete(
    conn: Conn<'_>,
    id: i64,
    now: i64,
) -> Result<bool, sqlx::Error> {
    on_conn!(conn, |c| sqlx::query(
        "UPDATE pushes SET \
         state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'done' END, \
         finished_at = $1 \
         WHERE id = $2 AND total IS NOT NULL AND recorded >= total \
         AND state IN ('queued', 'sending')",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await
    .map(|done| done.rows_affected() > 0))
}

/// Enqueues `batches`, each due at its time (or at once), in the transaction of `conn`: each
/// batch's devices as a list of `batch_lists`, and in the queue a job that names it.
pub(super) async fn enqueue_batches(
    mut conn: Conn<'_>,
    batches: &[(BatchJob, Option<SystemTime>)],
) -> Result<(), StoreError> {
    let mut jobs = Vec::with_capacity(batches.len());
    for (batch, at) in batches {
        let job = serde_json::to_string(batch).map_err(json_error)?;
        let list: i64 = on_conn!(conn.reborrow(), |c| sqlx::query_scalar(
            "INSERT INTO batch_lists (push_id, job) VALUES ($1, $2) RETURNING id",
        )
        .bind(batch.push_id)
        .bind(&job)
        .fetch_one(c)
        .await)?;
        jobs.push(queue::task(&BatchJob::stored(batch.push_id, list), *at).map_err(json_error)?);
    }
    push_tasks(conn, queue::BATCH_QUEUE, jobs).await
}

/// Adds `jobs` to `queue`, in the transaction of `conn`.
pub(super) async fn push_tasks(
    conn: Conn<'_>,
    queue: &str,
    jobs: Vec<Task<Vec<u8>>>,
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    match conn {
        Conn::Sqlite(c) => apalis_sqlite::queries::push_tasks(c, queue, &jobs)
            .await
            .map_err(queue::queue_failure)?,
        Conn::Postgres(c) => apalis_postgres::queries::push_tasks(c, queue, jobs)
            .await
            .map_err(queue::queue_failure)?,
    };
    Ok(())
}

/// What a batch's write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BatchWrite {
    /// Nothing: the run is not the batch's latest, or the batch's marks went with its
    /// finished push and it had rows to write.
    Refused,
    /// The rows written (maybe none), and whether they finished the push.
    Written { finished: bool },
}

/// One write of a batch's run, as a database's module takes it.
pub(super) struct BatchRows<'a> {
    /// The push.
    pub(super) id: i64,
    /// The run writing.
    pub(super) run: &'a BatchRun,
    /// Its rows.
    pub(super) rows: &'a [DeliveryRow],
    /// The devices C2DM reported gone, with the code.
    pub(super) gone: &'a [(String, String)],
    /// For the run's last write: the batches it put back for later, each due at its time.
    pub(super) last: Option<&'a [(BatchJob, Option<SystemTime>)]>,
}

impl BatchWrite {
    /// What a write of `run` does when the batch's mark says its latest run is `latest`
    /// (`None`: the mark is gone), if that is not `run`: refused, unless the mark went with
    /// the push, which this run's earlier writes finished, and the write has nothing to say
    /// (then it is no news of a takeover).
    pub(super) fn not_ours(
        latest: Option<i64>,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
    ) -> Option<Self> {
        (latest != Some(run.run)).then(|| {
            if latest.is_none() && rows.is_empty() && gone.is_empty() {
                Self::Written { finished: false }
            } else {
                Self::Refused
            }
        })
    }
}
