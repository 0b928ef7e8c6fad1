//! The batch job: one broadcast to a batch's devices, its rows written as they come.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use apalis::prelude::{BoxDynError, Data, TaskId};
use c2dm_core::{
    BroadcastOptions, CancelHandle, Message, NotAttempted, Outcome, OutcomeKind, RegistrationId,
};
use futures::StreamExt;
use tokio::time::Instant;

use super::account::adopt_shared_pause;
use super::plan::{Facts, Plan, over_budget, plan};
use super::retry::{Step, Stopped, StoreRetry, retried};
use super::{LOOK, Runner, WorkerOptions};
use crate::queue::BatchJob;
use crate::store::{
    BatchRun, DeliveryRow, DeviceState, OutcomeTally, Positions, Store, StoreError,
};

/// The budget period (periods of `period` since the epoch, at least a second long: with a
/// day, the UTC day) that `now` falls in, and when the next one starts.
pub(super) fn budget_day(now: SystemTime, period: Duration) -> (i64, SystemTime) {
    let period = period.as_secs().max(1);
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs / period;
    // Checked: a period past what the clock can tell (which `WorkerOptions::check` refuses)
    // ends at the furthest time this code waits for, never in a panic.
    let next = (day + 1)
        .checked_mul(period)
        .and_then(|at| std::time::UNIX_EPOCH.checked_add(Duration::from_secs(at)))
        .unwrap_or_else(|| now + WorkerOptions::MAX_BUDGET_PERIOD);
    (i64::try_from(day).unwrap_or(i64::MAX), next)
}

/// How long devices left unsent because the service kept answering `QuotaExceeded` wait
/// before their batch runs again.
pub(super) const QUOTA_RETRY: Duration = Duration::from_secs(15 * 60);

/// A batch writes the rows it holds at least this often while it sends (and at least every
/// [`Store::rows_per_write`] rows), so that a worker that dies leaves little for the batch's
/// next run to send again.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A batch marks its list this many times its concurrency at a time (the next chunk while
/// this one is sent). A mark is a write that waits for the batch's own row writes: one per
/// 64 sends held the sends up on PostgreSQL. A run after a crash counts a possible duplicate
/// for each device below the mark without a row, so a longer chunk can count more.
pub(super) const MARK_CHUNKS: usize = 4;

/// The rows of a batch not written yet, with the devices found gone among them.
pub(super) struct Pending {
    push_id: i64,
    /// The run of the batch the rows are written for.
    run: Arc<BatchRun>,
    /// Set once a later run of the batch has taken it over (a mark or a write refused):
    /// nothing more is sent or written.
    taken_over: Arc<AtomicBool>,
    /// Devices earlier runs may have sent to, each with how many: their rows count that many
    /// possible duplicates more.
    resent: HashMap<String, u32>,
    rows: Vec<DeliveryRow>,
    gone: Vec<(String, String)>,
    flushed_at: Instant,
}

impl Pending {
    fn push(&mut self, mut row: DeliveryRow) {
        if let Some(earlier) = self.resent.get(&row.registration_id) {
            row.possible_duplicates = row.possible_duplicates.saturating_add(*earlier);
        }
        self.rows.push(row);
    }

    /// Writes the rows held, in one transaction, unless a later run of the batch has taken
    /// it over (then they are dropped: that run sends to these devices again, and counts the
    /// possible duplicates).
    async fn flush(&mut self, store: &Store) -> Result<(), StoreError> {
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
            self.rows.iter().for_each(|row| tally.add(row.outcome));
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
    async fn finish(
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
    async fn flush_if_due(&mut self, store: &Store) -> Result<(), StoreError> {
        if self.rows.len() >= store.rows_per_write() || self.flushed_at.elapsed() >= FLUSH_EVERY {
            self.flush(store).await?;
        }
        Ok(())
    }
}

/// The devices of `send` (each with its position in the batch's list), each chunk of
/// `chunk` marked as about to be sent (the batch's mark moved past it) before it is handed
/// to the broadcast. A mark that fails is tried again with `retry`'s backoff; the stream ends
/// early if a later run took the batch over, or the process stops first.
pub(super) fn marked(
    retry: StoreRetry,
    run: Arc<BatchRun>,
    taken_over: Arc<AtomicBool>,
    send: &[(u64, RegistrationId)],
    chunk: usize,
) -> impl futures::Stream<Item = RegistrationId> + Send + 'static {
    let chunks: Vec<Vec<(u64, RegistrationId)>> =
        send.chunks(chunk.max(1)).map(<[_]>::to_vec).collect();
    // The next chunk is marked while this one is sent, so the sending slots never wait on
    // it; each mark is a task of its own, driven to its end even while nobody reads the
    // stream (a mark left half done would hold the store's write turn).
    futures::stream::iter(chunks)
        .map(move |chunk| {
            let mut retry = retry.for_step("mark");
            let run = Arc::clone(&run);
            let taken_over = Arc::clone(&taken_over);
            tokio::spawn(async move {
                let through = chunk.last().map_or(0, |(at, _)| at + 1);
                let push_id = retry.push_id;
                let store = retry.store.clone();
                let marked = loop {
                    match store.mark_sending(push_id, &run, through).await {
                        Ok(marked) => break marked,
                        Err(error) => retry.failed(&error).await.ok()?,
                    }
                };
                retry.passed().await;
                if !marked {
                    tracing::warn!(push_id, batch = %run.batch, "another worker took this batch over: it stops sending");
                    taken_over.store(true, Ordering::Relaxed);
                    return None;
                }
                Some(chunk)
            })
        })
        .buffered(2)
        .map(|marked| marked.ok().flatten())
        .take_while(|chunk| std::future::ready(chunk.is_some()))
        .flat_map(|chunk| futures::stream::iter(chunk.unwrap_or_default().into_iter().map(|(_, id)| id)))
}

/// A batch job: one broadcast to the devices that have no row yet; their rows, with the
/// devices C2DM reported gone, are written as they come, in transactions of up to
/// [`Store::rows_per_write`] rows. The batch's mark (keyed by its job's id, which a run again
/// keeps) moves down its list before the sends, so that a run after a crash counts a possible
/// duplicate for each device below it without a row. Devices the account's daily budget does
/// not cover, or that the service's quota kept from being sent, go back to the queue for
/// later, unsent and without a row.
///
/// A store error before the first send makes the batch wait and start again; one after it
/// (a mark, a write of rows) is tried again, with backoff, by this run, which keeps its rows
/// and sends nothing more meanwhile. The queue never sees either: they use up no attempt, and
/// never make the batch send again. When the process stops, the batch stops its sends and
/// their waits, writes the rows it has, and fails: its next run sends the rest.
pub(super) async fn run_batch(
    job: BatchJob,
    task: TaskId,
    runner: Data<Arc<Runner>>,
) -> Result<(), BoxDynError> {
    let mut retry = StoreRetry::new(&runner, job.push_id, "batch");
    let task = task.to_string();
    loop {
        if runner.is_stopping() {
            return Err(Stopped.into());
        }
        match batch_run(job.clone(), &task, &runner, &mut retry).await {
            Ok(()) => {
                retry.passed().await;
                return Ok(());
            }
            Err(Step::Store(error)) => retry.failed(&error).await?,
            Err(Step::Other(error)) => return Err(error),
        }
    }
}

/// One run of a batch job (see [`run_batch`]).
pub(super) async fn batch_run(
    job: BatchJob,
    task: &str,
    runner: &Runner,
    retry: &mut StoreRetry,
) -> Result<(), Step> {
    let store = &runner.store;
    // A job names its stored list of devices, or carries them (the devices a batch left for
    // later).
    let job = match job.list {
        Some(list) => match store.batch_list(list).await? {
            Some(stored) => stored,
            None => {
                // Lists go with their push when it finishes: nothing is left to send.
                tracing::info!(push_id = job.push_id, list, "a batch of a finished push");
                return Ok(());
            }
        },
        None => job,
    };
    // Cancels asked for in this process from here on (its push read next) stop the sends.
    let cancels = store.cancels();
    let Some(message) = store.push_to_send(job.push_id).await? else {
        return Ok(());
    };
    // The claim first: whatever an earlier run still going records after it is refused, and
    // what it recorded before is read next.
    let run = Arc::new(store.claim_batch(job.push_id, task).await?);
    if run.finished {
        // An earlier run wrote all it had to, and its worker died before the queue heard.
        return Ok(());
    }
    // A first run has no rows to skip: one lookup per device spared on almost every batch.
    let recorded = if run.run == 1 {
        HashSet::new()
    } else {
        store.recorded(job.push_id, &job.registration_ids).await?
    };
    let inactive: HashMap<String, DeviceState> = if message.cancel_requested {
        HashMap::new()
    } else {
        store
            .inactive_devices(&job.registration_ids, job.positions)
            .await?
            .into_iter()
            .collect()
    };
    let Plan {
        mut send,
        not_sent,
        resent,
    } = plan(&Facts {
        ids: &job.registration_ids,
        recorded: &recorded,
        marked_through: run.marked_through,
        sending_runs: run.sending_runs,
        possibly_sent: &job.possibly_sent,
        cancelled: message.cancel_requested,
        inactive: &inactive,
    });
    let now = SystemTime::now();
    let mut pending = Pending {
        push_id: job.push_id,
        run: Arc::clone(&run),
        taken_over: Arc::new(AtomicBool::new(false)),
        resent,
        rows: Vec::with_capacity((send.len() + not_sent.len()).min(store.rows_per_write())),
        gone: Vec::new(),
        flushed_at: Instant::now(),
    };
    if !pending.resent.is_empty() {
        tracing::info!(
            push_id = job.push_id,
            devices = pending.resent.len(),
            "a batch runs again after its worker died: its sends under way may be duplicated"
        );
    }
    for (id, why) in &not_sent {
        pending.push(DeliveryRow::not_attempted(id, why, now));
    }
    let mut later: Vec<(String, SystemTime)> = Vec::new();
    let mut unsent = 0usize;
    // Devices whose sends the process's stop ended: no row; the next run sends them.
    let mut left = 0usize;
    let (day, tomorrow) = budget_day(now, runner.options.budget_period);
    let granted = match runner.options.daily_budget {
        Some(daily) if !send.is_empty() => {
            let wanted = send.len() as u64;
            let account = runner.options.account.as_str();
            let granted = store.reserve_budget(account, day, daily, wanted).await?;
            if granted < wanted {
                tracing::info!(
                    push_id = job.push_id,
                    unsent = wanted - granted,
                    "the account's daily budget is spent: the rest waits for tomorrow"
                );
                metrics::counter!("c2dm_budget_deferred_total").increment(wanted - granted);
            }
            Some(granted)
        }
        _ => None,
    };
    later.extend(
        over_budget(&mut send, granted)
            .into_iter()
            .map(|id| (id.as_str().to_owned(), tomorrow)),
    );
    let mut accepted = 0u64;
    if let Some((_, first)) = send.first().cloned() {
        // From here on, a store error is tried again in place: sends may have been made.
        retried!(retry, adopt_shared_pause(runner).await);
        let template = template(&message, first).map_err(|e| Step::Other(e.into()))?;
        let concurrency = runner.options.concurrency.max(1);
        let mut ids = Box::pin(
            marked(
                retry.for_step("mark"),
                Arc::clone(&run),
                Arc::clone(&pending.taken_over),
                &send,
                concurrency.saturating_mul(MARK_CHUNKS),
            )
            .peekable(),
        );
        // Readied: the first sends marked. Then the batch waits its turn to send, unless
        // the process stops first.
        ids.as_mut().peek().await;
        let mut stopping = runner.stopping.clone();
        let sending = tokio::select! {
            permit = Arc::clone(&runner.sending).acquire_owned() => {
                Some(permit.map_err(|e| Step::Other(e.into()))?)
            }
            _ = stopping.wait_for(|stopping| *stopping) => None,
        };
        let mut delivered = 0usize;
        if let Some(sending) = sending {
            let mut deliveries = runner
                .sender
                .broadcast_to(
                    ids,
                    &template,
                    BroadcastOptions::default().concurrency(concurrency),
                )
                .map_err(|e| Step::Other(e.into()))?;
            let watching = tokio::spawn(cancel_when_asked(
                store.clone(),
                job.push_id,
                cancels,
                deliveries.cancel_handle(),
            ));
            let halted = Arc::new(AtomicBool::new(false));
            let halting = tokio::spawn(halt_when_stopping(
                runner.stopping.clone(),
                Arc::clone(&halted),
                deliveries.cancel_handle(),
            ));
            while let Some(delivery) = deliveries.next().await {
                delivered += 1;
                let id = delivery.registration_id().to_string();
                match delivery.outcome() {
                    Outcome::NotAttempted(NotAttempted::BudgetExhausted) => {
                        later.push((id, tomorrow));
                        continue;
                    }
                    Outcome::NotAttempted(NotAttempted::QuotaExhausted) => {
                        later.push((id, SystemTime::now() + QUOTA_RETRY));
                        continue;
                    }
                    Outcome::NotAttempted(NotAttempted::Cancelled)
                    | Outcome::Failed {
                        error: c2dm_core::Error::Cancelled { .. },
                    } if halted.load(Ordering::Relaxed) => {
                        left += 1;
                        continue;
                    }
                    Outcome::Accepted { .. } => accepted += 1,
                    _ => {}
                }
                if delivery.should_remove() {
                    pending
                        .gone
                        .push((id, delivery.error_text().unwrap_or_default()));
                }
                pending.push(DeliveryRow::of(&delivery, SystemTime::now()));
                // The last answer's rows go with the batch's final write, not one of
                // their own. A write that fails holds the sends up until it passes.
                if delivered < send.len() {
                    retried!(retry, pending.flush_if_due(store).await);
                }
            }
            drop(sending);
            watching.abort();
            halting.abort();
        }
        unsent = send.len().saturating_sub(delivered);
    }
    if let Some(granted) = granted {
        let account = runner.options.account.as_str();
        let unused = granted.saturating_sub(accepted);
        retried!(retry, store.release_budget(account, day, unused).await);
    }
    if pending.taken_over.load(Ordering::Relaxed) {
        // The run that took the batch over sends, records and puts back for later whatever
        // this one has not recorded; apalis ignores this run's result.
        return Ok(());
    }
    if left > 0 || unsent > 0 {
        // The process stops (or a mark's task failed): the rows held are written once, and
        // what was not sent, and what waits for later, is the next run's. A batch that sent
        // everything finishes below, stopping or not.
        if let Err(error) = pending.flush(store).await {
            tracing::warn!(
                push_id = job.push_id,
                %error,
                "the batch's last rows could not be written: its next run sends them again"
            );
        }
        if runner.is_stopping() {
            return Err(Stopped.into());
        }
        return Err(Step::Other(
            format!("{unsent} devices of the batch were not sent: it runs again").into(),
        ));
    }
    // The last rows, the devices left for later as batches of their own, and the batch
    // finished, in one transaction: a run after this one does nothing, so nothing goes back
    // twice.
    let later = later_batches(job.push_id, job.positions, later, &pending.resent);
    retried!(retry, pending.finish(store, &later).await);
    metrics::counter!("c2dm_batches_total").increment(1);
    Ok(())
}

/// Cancels a batch's broadcast when the process stops, first setting `halted`: its sends
/// under way finish, the others are not made and their waits end, and none of those gets a
/// row (the batch's next run sends them).
pub(super) async fn halt_when_stopping(
    mut stopping: tokio::sync::watch::Receiver<bool>,
    halted: Arc<AtomicBool>,
    cancel: CancelHandle,
) {
    if stopping.wait_for(|stopping| *stopping).await.is_ok() {
        halted.store(true, Ordering::Relaxed);
        cancel.cancel();
    }
}

/// The devices left for later as batches, one per time they are due; those in `resent` (this
/// batch may have sent to them already) go as possibly sent.
pub(super) fn later_batches(
    push_id: i64,
    positions: Option<Positions>,
    mut later: Vec<(String, SystemTime)>,
    resent: &HashMap<String, u32>,
) -> Vec<(BatchJob, SystemTime)> {
    later.sort_by_key(|(_, at)| *at);
    let mut batches = Vec::new();
    while let Some((_, at)) = later.first().cloned() {
        let split = later.partition_point(|(_, due)| *due <= at);
        let rest = later.split_off(split);
        let ids: Vec<String> = later.into_iter().map(|(id, _)| id).collect();
        let job = BatchJob {
            push_id,
            possibly_sent: ids
                .iter()
                .filter(|id| resent.contains_key(*id))
                .cloned()
                .collect(),
            registration_ids: ids,
            positions,
            list: None,
        };
        batches.push((job, at));
        later = rest;
    }
    batches
}

/// Cancels a batch's broadcast as soon as a cancel of its push is asked for: sends under way
/// finish, the others are not made, and their devices get `not_attempted: cancelled` rows.
/// A cancel through this process's API since `changes` was taken is seen at once; one through
/// another's, at the next look.
pub(super) async fn cancel_when_asked(
    store: Store,
    push_id: i64,
    mut changes: tokio::sync::watch::Receiver<u64>,
    cancel: CancelHandle,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOOK) => {}
            _ = changes.changed() => {}
        }
        match store.push_to_send(push_id).await {
            Ok(Some(message)) if message.cancel_requested => {
                tracing::info!(push_id, "push cancelled: stopping its batch");
                cancel.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not look for a cancel"),
        }
    }
}

/// The message of a stored push, addressed to `to` (a broadcast copies it to each device).
pub(super) fn template(
    message: &crate::store::Push,
    to: RegistrationId,
) -> Result<Message, c2dm_core::MessageError> {
    let mut builder = Message::builder(to.as_str())
        .collapse_key(&message.collapse_key)
        .delay_while_idle(message.delay_while_idle);
    for (key, value) in &message.data {
        builder = builder.data(key, value);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::options::BUDGET_DAY;

    #[test]
    fn a_budget_day_is_a_utc_day() {
        let noon = std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 43_200);
        let (day, next) = budget_day(noon, BUDGET_DAY);
        assert_eq!(day, 20_000);
        assert_eq!(
            next,
            std::time::UNIX_EPOCH + Duration::from_secs(20_001 * 86_400)
        );
    }

    #[test]
    fn devices_left_for_later_go_back_one_batch_per_time_with_what_may_have_been_sent() {
        let t = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
        let later = vec![
            ("c".to_owned(), t(20)),
            ("a".to_owned(), t(10)),
            ("b".to_owned(), t(10)),
        ];
        let resent: HashMap<String, u32> = [("b".to_owned(), 2), ("z".to_owned(), 1)].into();
        let positions = Some(Positions {
            after: 100,
            through: 200,
        });
        let batches = later_batches(7, positions, later, &resent);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].1, t(10));
        assert_eq!(batches[0].0.registration_ids, ["a", "b"]);
        assert_eq!(batches[0].0.possibly_sent, ["b"]);
        assert_eq!(batches[1].1, t(20));
        assert_eq!(batches[1].0.registration_ids, ["c"]);
        assert!(batches[1].0.possibly_sent.is_empty());
        // What goes back lies where its batch did.
        assert!(batches.iter().all(|(job, _)| job.positions == positions));
        assert!(later_batches(7, None, Vec::new(), &resent).is_empty());
    }

    #[test]
    fn a_shorter_budget_period_counts_from_the_epoch_too() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_000_030);
        let (period, next) = budget_day(at, Duration::from_secs(60));
        assert_eq!(period, 16_667);
        assert_eq!(
            next,
            std::time::UNIX_EPOCH + Duration::from_secs(16_668 * 60)
        );
        // Less than a second counts as a second, never as a division by zero.
        assert_eq!(budget_day(at, Duration::ZERO).0, 1_000_030);
        // A period past what the clock can tell ends far ahead, without a panic.
        let (period, next) = budget_day(at, Duration::from_secs(u64::MAX));
        assert_eq!(period, 0);
        assert!(next > at);
        let (_, next) = budget_day(at, Duration::MAX);
        assert!(next > at);
    }
}
