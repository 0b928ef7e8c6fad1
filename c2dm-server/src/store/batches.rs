//! A batch's runs: each claims the batch (fencing off earlier ones), marks how far down its
//! list it is about to send, and writes its rows.

use std::collections::HashSet;
use std::time::SystemTime;

use super::rows::{big, json_error};
use super::shared::{BatchRows, BatchWrite};
use super::{
    BatchRun, Db, DeliveryRow, Store, StoreError, execute, on_conn, on_pool, postgres, sqlite,
};
use crate::queue::BatchJob;

impl Store {
    /// The batch stored as list `list` (what a job that names its list runs), if it is still
    /// there: a push's lists go when it finishes.
    pub async fn batch_list(&self, list: i64) -> Result<Option<BatchJob>, StoreError> {
        let job: Option<String> = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT job FROM batch_lists WHERE id = $1"
        )
        .bind(list)
        .fetch_optional(pool)
        .await)?;
        Ok(job
            .map(|job| serde_json::from_str(&job).map_err(json_error))
            .transpose()?)
    }

    /// Those of `registration_ids` that already have a row for push `id` (a batch run again
    /// after a crash skips them).
    pub async fn recorded(
        &self,
        id: i64,
        registration_ids: &[String],
    ) -> Result<HashSet<String>, StoreError> {
        let found = match &self.db {
            Db::Sqlite(db) => sqlite::recorded(&db.pool, id, registration_ids).await?,
            Db::Postgres(pool) => postgres::recorded(pool, id, registration_ids).await?,
        };
        Ok(found.into_iter().collect())
    }

    /// Starts a run of batch `batch` (its job's id) of push `id`: this run is the batch's
    /// latest from now on, and an earlier run still going (on a worker taken for dead that is
    /// alive after all) can mark and record nothing more. Returns the run, with how far the
    /// earlier runs had marked the list. Read which devices have a row only after this: rows an
    /// earlier run writes are either in that answer or refused.
    ///
    /// A push already finished has its batches' marks deleted with it, and a claim then
    /// writes none back (it would stay for good): run 0, finished. A claim that read the push
    /// before its last write committed claims as usual, and the deletion that follows that
    /// write takes its mark too.
    pub async fn claim_batch(&self, id: i64, batch: &str) -> Result<BatchRun, StoreError> {
        let owned = batch.to_owned();
        let claimed: Option<(i64, i64, i64, bool)> = self
            .write_one(move |conn| {
                Box::pin(async move {
                    // The guard is the `SELECT`'s `WHERE`: for a finished push it yields no
                    // row, so there is nothing to insert and no conflict to update.
                    Ok(on_conn!(conn, |c| sqlx::query_as(
                        "INSERT INTO batch_marks (push_id, batch, sent_through, run) \
                         SELECT $1, $2, 0, 1 WHERE NOT EXISTS (SELECT 1 FROM pushes \
                         WHERE id = $1 AND state IN ('done', 'cancelled')) \
                         ON CONFLICT (push_id, batch) DO UPDATE SET run = batch_marks.run + 1 \
                         RETURNING run, sent_through, sending_runs, finished",
                    )
                    .bind(id)
                    .bind(&owned)
                    .fetch_optional(c)
                    .await)?)
                })
            })
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

    /// Notes that `run` of a batch of push `id` is about to send to the devices at positions
    /// below `through` in its list, before those sends start (a mark only grows): were the
    /// worker to die, the batch's next run knows which of its devices without a row may have
    /// been sent to. `false` (and nothing noted) if a later run has claimed the batch: this
    /// one must stop sending. A push's marks go when it finishes.
    pub async fn mark_sending(
        &self,
        id: i64,
        run: &BatchRun,
        through: u64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE batch_marks SET \
             sent_through = CASE WHEN sent_through > $3 THEN sent_through ELSE $3 END, \
             sending_runs = sending_runs + CASE WHEN marked_run = $4 THEN 0 ELSE 1 END, \
             marked_run = $4 \
             WHERE push_id = $1 AND batch = $2 AND run = $4";
        let (batch, through, run) = (run.batch.clone(), big(through), run.run);
        Ok(execute!(self, SQL, id, batch, through, run).await? == 1)
    }

    /// Rows of `run` of a batch of push `id` (all of them, or those done so far), and the
    /// devices C2DM reported gone (with the code), in one transaction; a row a device already
    /// has is kept (a batch run twice writes nothing twice). Finishes the push when every
    /// device of its walked audience has its row. `false` (and nothing written) if a later
    /// run has claimed the batch, or its push has finished.
    pub async fn record_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
    ) -> Result<bool, StoreError> {
        self.write_batch(id, run, rows, gone, None).await
    }

    /// The last write of `run` of a batch of push `id`: its last rows and gone devices (as
    /// [`Store::record_batch`]), the batch jobs of the devices it put back for later (each due
    /// at its time), and the batch marked finished, in one transaction. A run after that (its
    /// worker died before the queue heard) finds the batch finished, so nothing is put back
    /// twice. `false` (and nothing written) if a later run has claimed the batch.
    pub async fn finish_batch(
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
        self.write_batch(id, run, rows, gone, Some(later)).await
    }

    /// A batch's write, by the database's own means; for its `last` write, with the batches
    /// put back for later and the batch marked finished. Then the push's batches' state
    /// dropped if the write finished it, and the watchers told.
    async fn write_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
        last: Option<Vec<(BatchJob, Option<SystemTime>)>>,
    ) -> Result<bool, StoreError> {
        let written = match &self.db {
            Db::Sqlite(db) => {
                let (run, rows, gone) = (run.clone(), rows.to_vec(), gone.to_vec());
                db.writer
                    .write(Box::new(move |c| {
                        Box::pin(async move {
                            let batch = BatchRows {
                                id,
                                run: &run,
                                rows: &rows,
                                gone: &gone,
                                last: last.as_deref(),
                            };
                            sqlite::write_batch(c, &batch).await
                        })
                    }))
                    .await?
            }
            Db::Postgres(pool) => {
                let batch = BatchRows {
                    id,
                    run,
                    rows,
                    gone,
                    last: last.as_deref(),
                };
                postgres::write_batch(pool, &batch).await?
            }
        };
        match written {
            BatchWrite::Refused => Ok(false),
            BatchWrite::Written { finished } => {
                if finished {
                    self.drop_batch_state(id).await?;
                    self.log_finished(id).await;
                }
                self.changed(finished);
                Ok(true)
            }
        }
    }
}
