//! The batch job: one broadcast to a batch's devices, its rows written as they come.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use apalis::prelude::{BoxDynError, Data, TaskId};
use c2dm_core::{
    BroadcastOptions, CancelHandle, Message, NotAttempted, Outcome, Protocol, RegistrationId,
    Sender,
};
use c2dm_fcm::FcmMessage;
use futures::StreamExt;
use tokio::time::Instant;

use super::account::{adopt_shared_pause, fcm_account};
use super::budget::reserve;
use super::pending::Pending;
use super::plan::{Facts, Plan, plan};
use super::retry::{Step, Stopped, StoreRetry, retried};
use super::{LOOK, Runner};
use crate::queue::BatchJob;
use crate::store::{BatchRun, DeliveryRow, DeviceState, Positions, Push, Store};

/// How long devices left unsent because the service kept answering `QuotaExceeded` wait
/// before their batch runs again.
pub(super) const QUOTA_RETRY: Duration = Duration::from_secs(15 * 60);

/// A batch marks its list this many times its concurrency at a time (the next chunk while
/// this one is sent). A mark is a write that waits for the batch's own row writes: one per
/// 64 sends held the sends up on PostgreSQL. A run after a crash counts a possible duplicate
/// for each device below the mark without a row, so a longer chunk can count more.
pub(super) const MARK_CHUNKS: usize = 4;

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

/// One run of a batch job (see [`run_batch`]): load, claim and plan, reserve, send, finish.
pub(super) async fn batch_run(
    job: BatchJob,
    task: &str,
    runner: &Runner,
    retry: &mut StoreRetry,
) -> Result<(), Step> {
    let Some(loaded) = load(job, &runner.store).await? else {
        return Ok(());
    };
    let Some((run, plan)) = claim_and_plan(&loaded, task, &runner.store).await? else {
        return Ok(());
    };
    let Plan {
        send,
        not_sent,
        resent,
    } = plan;
    let (send, fcm_send) = by_provider(&runner.store, &loaded.job, send).await?;
    let now = SystemTime::now();
    let mut pending = Pending {
        push_id: loaded.job.push_id,
        run: Arc::clone(&run),
        taken_over: Arc::new(AtomicBool::new(false)),
        resent,
        rows: Vec::with_capacity((send.len() + not_sent.len()).min(runner.store.rows_per_write())),
        gone: Vec::new(),
        flushed_at: Instant::now(),
    };
    for (id, why) in &not_sent {
        pending.push(DeliveryRow::not_attempted(id, why, now));
    }
    // FCM's devices through FCM's sender, if this process has one and the push suits FCM (no
    // delay_while_idle, no data key FCM keeps for itself).
    let push = &loaded.push;
    let fcm = match (&runner.fcm, fcm_send.first()) {
        (_, None) => None,
        (None, Some(_)) => Some(Err(NO_SENDER)),
        (Some(sender), Some((_, first))) => Some(
            template(push, first.clone())
                .ok()
                .and_then(|t| FcmMessage::from_c2dm(&t).ok())
                .map(|t| (sender, t))
                .ok_or(UNSUPPORTED),
        ),
    };
    if let Some(Err(why)) = fcm {
        for (_, id) in &fcm_send {
            pending.push(DeliveryRow::not_attempted(id.as_str(), why, now));
        }
    }
    let mut run = Sending {
        runner,
        retry,
        loaded: &loaded,
        pending,
        later: Vec::new(),
    };
    let mut sent = Sends::default();
    match &runner.sender {
        Some(sender) => {
            let account = &runner.options.account;
            let c2dm_template = |first| Ok(template(push, first)?);
            sent = budgeted_send(&mut run, sender, account, c2dm_template, send, now).await?;
        }
        None => {
            for (_, id) in &send {
                run.pending
                    .push(DeliveryRow::not_attempted(id.as_str(), NO_SENDER, now));
            }
        }
    }
    if let Some(Ok((fcm, fcm_template))) = fcm {
        let account = fcm_account(fcm);
        // Made above: to whichever device, broadcast_to puts each device's token in.
        let fcm_template = |_| Ok(fcm_template);
        let by_fcm = budgeted_send(&mut run, fcm, &account, fcm_template, fcm_send, now).await?;
        sent.accepted += by_fcm.accepted;
        sent.unsent += by_fcm.unsent;
        sent.left += by_fcm.left;
    }
    let Sending {
        retry,
        pending,
        later,
        ..
    } = run;
    finish(runner, retry, &loaded.job, pending, later, &sent).await
}

/// What the sends of one run share: its runner and its store retry, the batch, the rows it
/// holds, and the devices it leaves for later (with when).
struct Sending<'r> {
    runner: &'r Runner,
    retry: &'r mut StoreRetry,
    loaded: &'r Loaded,
    pending: Pending,
    later: Vec<(String, SystemTime)>,
}

/// Why a device gets no send: this process has no sender for its provider.
const NO_SENDER: &str = "no_sender";

/// Why a device of FCM gets no send: the push asks for what FCM has not (`delay_while_idle`,
/// a data key FCM keeps for itself).
const UNSUPPORTED: &str = "unsupported_by_provider";

/// `send` split by the devices' providers: C2DM's (and ids not registered), then FCM's.
async fn by_provider(
    store: &Store,
    job: &BatchJob,
    send: Vec<(u64, RegistrationId)>,
) -> Result<(Vec<(u64, RegistrationId)>, Vec<(u64, RegistrationId)>), Step> {
    if send.is_empty() {
        return Ok((send, Vec::new()));
    }
    let fcm = store
        .fcm_devices(&job.registration_ids, job.positions)
        .await?;
    if fcm.is_empty() {
        return Ok((send, Vec::new()));
    }
    Ok(send
        .into_iter()
        .partition(|(_, id)| !fcm.contains(id.as_str())))
}

/// A batch's job with its devices, and its push, as a run reads them.
struct Loaded {
    job: BatchJob,
    push: Push,
    /// Cancels asked for in this process from before the push was read.
    cancels: tokio::sync::watch::Receiver<u64>,
}

/// The batch's devices (a job names its stored list of them, or carries them: the devices a
/// batch left for later) and its push; `None` when there is nothing to send.
async fn load(job: BatchJob, store: &Store) -> Result<Option<Loaded>, Step> {
    let job = match job.list {
        Some(list) => match store.batch_list(list).await? {
            Some(stored) => stored,
            None => {
                // Lists go with their push when it finishes: nothing is left to send.
                tracing::info!(push_id = job.push_id, list, "a batch of a finished push");
                return Ok(None);
            }
        },
        None => job,
    };
    // Cancels asked for in this process from here on (its push read next) stop the sends.
    let cancels = store.cancels();
    let push = store.push_to_send(job.push_id).await?;
    // A push whose one batch was enqueued with it (no walk) starts sending with that batch.
    if push
        .as_ref()
        .is_some_and(|push| push.state == crate::store::PushState::Queued)
    {
        store.start_sending(job.push_id).await?;
    }
    Ok(push.map(|push| Loaded { job, push, cancels }))
}

/// Claims the batch for this run and plans it from what the store says of its devices;
/// `None` when an earlier run finished it (its worker died before the queue heard).
async fn claim_and_plan(
    loaded: &Loaded,
    task: &str,
    store: &Store,
) -> Result<Option<(Arc<BatchRun>, Plan)>, Step> {
    let job = &loaded.job;
    // The claim first: whatever an earlier run still going records after it is refused, and
    // what it recorded before is read next.
    let run = Arc::new(store.claim_batch(job.push_id, task).await?);
    if run.finished {
        return Ok(None);
    }
    // A first run has no rows to skip: one lookup per device spared on almost every batch.
    let recorded = if run.run == 1 {
        HashSet::new()
    } else {
        store.recorded(job.push_id, &job.registration_ids).await?
    };
    let cancelled = loaded.push.cancel_requested;
    let inactive: HashMap<String, DeviceState> = if cancelled {
        HashMap::new()
    } else {
        store
            .inactive_devices(&job.registration_ids, job.positions)
            .await?
            .into_iter()
            .collect()
    };
    let plan = plan(&Facts {
        ids: &job.registration_ids,
        recorded: &recorded,
        marked_through: run.marked_through,
        sending_runs: run.sending_runs,
        possibly_sent: &job.possibly_sent,
        cancelled,
        inactive: &inactive,
    });
    if !plan.resent.is_empty() {
        tracing::info!(
            push_id = job.push_id,
            devices = plan.resent.len(),
            "a batch runs again after its worker died: its sends under way may be duplicated"
        );
    }
    Ok(Some((run, plan)))
}

/// What a run's sends came to.
#[derive(Default)]
struct Sends {
    /// Accepted by the service.
    accepted: u64,
    /// Devices never handed to the broadcast (a mark's task failed, or the batch was taken
    /// over, or the process stopped before its turn).
    unsent: usize,
    /// Devices whose sends the process's stop ended: no row; the next run sends them.
    left: usize,
}

/// Sends to `send` through `sender` as far as `account`'s daily budget allows (see
/// [`send_all`]): the devices it does not cover are left for the budget's next day, and what
/// the sends did not use of the reservation goes back.
async fn budgeted_send<P: Protocol>(
    run: &mut Sending<'_>,
    sender: &Sender<P>,
    account: &str,
    template: impl FnOnce(RegistrationId) -> Result<P::Message, BoxDynError>,
    mut send: Vec<(u64, RegistrationId)>,
    now: SystemTime,
) -> Result<Sends, Step> {
    let runner = run.runner;
    let budget = reserve(runner, run.loaded.job.push_id, account, &mut send, now).await?;
    run.later.extend(budget.deferred);
    let sent = send_all(run, sender, account, template, &send, budget.tomorrow).await?;
    if let Some(granted) = budget.granted {
        let unused = granted.saturating_sub(sent.accepted);
        let store = &runner.store;
        retried!(
            run.retry,
            store.release_budget(account, budget.day, unused).await
        );
    }
    Ok(sent)
}

/// Sends to `send` in one broadcast, once the batch's turn comes: each chunk marked first,
/// rows held in the run's `pending` and written as they come, devices the budget (until
/// `tomorrow`) or the quota kept back added to its `later`.
async fn send_all<P: Protocol>(
    run: &mut Sending<'_>,
    sender: &Sender<P>,
    account: &str,
    template: impl FnOnce(RegistrationId) -> Result<P::Message, BoxDynError>,
    send: &[(u64, RegistrationId)],
    tomorrow: SystemTime,
) -> Result<Sends, Step> {
    let (runner, loaded) = (run.runner, run.loaded);
    let retry = &mut *run.retry;
    let (pending, later) = (&mut run.pending, &mut run.later);
    let mut sends = Sends::default();
    let Some((_, first)) = send.first().cloned() else {
        return Ok(sends);
    };
    let store = &runner.store;
    // From here on, a store error is tried again in place: sends may have been made.
    retried!(retry, adopt_shared_pause(runner, sender, account).await);
    let template = template(first).map_err(Step::Other)?;
    let concurrency = runner.options.concurrency.max(1);
    let mut ids = Box::pin(
        marked(
            retry.for_step("mark"),
            Arc::clone(&pending.run),
            Arc::clone(&pending.taken_over),
            send,
            concurrency.saturating_mul(MARK_CHUNKS),
        )
        .peekable(),
    );
    // Readied: the first sends marked. Then the batch waits its turn to send, unless the
    // process stops first.
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
        let mut deliveries = sender
            .broadcast_to(
                ids,
                &template,
                BroadcastOptions::default().concurrency(concurrency),
            )
            .map_err(|e| Step::Other(e.into()))?;
        let watching = tokio::spawn(cancel_when_asked(
            store.clone(),
            loaded.job.push_id,
            loaded.cancels.clone(),
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
                    sends.left += 1;
                    continue;
                }
                Outcome::Accepted { .. } => sends.accepted += 1,
                _ => {}
            }
            if delivery.should_remove() {
                pending
                    .gone
                    .push((id, delivery.error_text().unwrap_or_default()));
            }
            pending.push(DeliveryRow::of(&delivery, SystemTime::now()));
            // The last answer's rows go with the batch's final write, not one of their own.
            // A write that fails holds the sends up until it passes.
            if delivered < send.len() {
                retried!(retry, pending.flush_if_due(store).await);
            }
        }
        drop(sending);
        watching.abort();
        halting.abort();
    }
    sends.unsent = send.len().saturating_sub(delivered);
    Ok(sends)
}

/// The run's last write: its last rows, the devices left for later as batches of their own,
/// and the batch finished, in one transaction, so that a run after this one does nothing and
/// nothing goes back twice. A run taken over leaves all that to the run that took it; one
/// whose sends did not all happen writes its rows and fails, for its next run to send the
/// rest.
async fn finish(
    runner: &Runner,
    retry: &mut StoreRetry,
    job: &BatchJob,
    mut pending: Pending,
    later: Vec<(String, SystemTime)>,
    sends: &Sends,
) -> Result<(), Step> {
    let store = &runner.store;
    if pending.taken_over.load(Ordering::Relaxed) {
        // apalis ignores this run's result.
        return Ok(());
    }
    if sends.left > 0 || sends.unsent > 0 {
        // A batch that sent everything finishes below, stopping or not.
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
        let unsent = sends.unsent;
        return Err(Step::Other(
            format!("{unsent} devices of the batch were not sent: it runs again").into(),
        ));
    }
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
}
