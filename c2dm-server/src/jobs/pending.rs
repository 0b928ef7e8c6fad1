//! The rows a batch's run holds until it writes them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use c2dm_core::OutcomeKind;
use tokio::time::Instant;

use crate::queue::BatchJob;
use crate::store::{BatchRun, DeliveryRow, OutcomeTally, Store, StoreError};

/// A batch writes the rows it holds at least this often while it sends (and at least every
/// [`Store::rows_per_write`] rows), so that a worker that dies leaves little for the batch's
/// next run to send again.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// The rows of a batch not written yet, with the devices found gone among them.
pub(super) struct Pending {
    pub(super) push_id: i64,
    /// The run of the batch the rows are written for.
    pub(super) run: Arc<BatchRun>,
    /// Set once a later run of the batch has taken it over (a mark or a write refused):
    /// nothing more is sent or written.
    pub(super) taken_over: Arc<AtomicBool>,
    /// Devices earlier runs may have sent to, each with how many: their rows count that many
    /// possible duplicates more.
    pub(super) resent: HashMap<String, u32>,
    pub(super) rows: Vec<DeliveryRow>,
    pub(super) gone: Vec<(String, String)>,
    pub(super) flushed_at: Instant,
}

impl Pending {
    pub(super) fn push(&mut self, mut row: DeliveryRow) {
        if let Some(earlier) = self.resent.get(&row.registration_id) {
            row.possible_duplicates = row.possible_duplicates.saturating_add(*earlier);
        }
        self.rows.push(row);
    }

    /// Writes the rows held, in one transaction, unless a later run of the batch has taken
    /// it over (then they are dropped: that run sends to these devices again, and counts the
    /// possible duplicates).
    pub(super) async fn flush(&mut self, store: &Store) -> Result<(), StoreError> {
        if self.rows.is_empty() && self.gone.is_empty() || self.taken_over.load(Ordering::Relaxed) {
            return Ok(());
        }
        let written = store
            .record_batch(self.push_id, &self.run, &self.rows, &self.gone)
            .await?;
        self.written(written);
        Ok(())
    }

    /// After a write: its rows counted in the metrics, or, refused, the batch left to the run
    /// that took it over. The rows held go either way.
    fn written(&mut self, written: bool) {
        if written {
            metrics::counter!("c2dm_devices_gone_total").increment(self.gone.len() as u64);
            // Counted by outcome, then told once per outcome: a labelled counter is looked up
            // each time it is named.
            let mut tally = OutcomeTally::default();
            let mut codes: Vec<&str> = Vec::new();
            for row in &self.rows {
                tally.add(row.outcome);
                if row.outcome == OutcomeKind::Rejected {
                    codes.push(row.error.as_deref().unwrap_or("unknown"));
                }
            }
            codes.sort_unstable();
            for run in codes.chunk_by(|a, b| a == b) {
                metrics::counter!("c2dm_rejections_total", "code" => run[0].to_owned())
                    .increment(run.len() as u64);
            }
            for (outcome, n) in [
                (OutcomeKind::Accepted, tally.accepted),
                (OutcomeKind::Rejected, tally.rejected),
                (OutcomeKind::Failed, tally.failed),
                (OutcomeKind::NotAttempted, tally.not_attempted),
            ] {
                if n > 0 {
                    metrics::counter!("c2dm_deliveries_total", "outcome" => outcome.as_str())
                        .increment(n);
                }
            }
        } else {
            tracing::warn!(
                push_id = self.push_id,
                batch = %self.run.batch,
                "another worker took this batch over (this one was taken for dead): leaving it"
            );
            self.taken_over.store(true, Ordering::Relaxed);
        }
        self.rows.clear();
        self.gone.clear();
        self.flushed_at = Instant::now();
    }

    /// Writes the rows held, with the batches of the devices left for later, and marks the
    /// batch finished: one transaction, refused if a later run has taken the batch over.
    pub(super) async fn finish(
        &mut self,
        store: &Store,
        later: &[(BatchJob, SystemTime)],
    ) -> Result<(), StoreError> {
        if self.taken_over.load(Ordering::Relaxed) {
            return Ok(());
        }
        let written = store
            .finish_batch(self.push_id, &self.run, &self.rows, &self.gone, later)
            .await?;
        self.written(written);
        Ok(())
    }

    /// Writes the rows held if there are many, or they have waited long.
    pub(super) async fn flush_if_due(&mut self, store: &Store) -> Result<(), StoreError> {
        if self.rows.len() >= store.rows_per_write() || self.flushed_at.elapsed() >= FLUSH_EVERY {
            self.flush(store).await?;
        }
        Ok(())
    }
}
