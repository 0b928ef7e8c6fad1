//! Pushes as durable jobs on apalis: a push job walks the audience and enqueues batch jobs;
//! a batch job runs one [`Sender::broadcast`](c2dm_core::Sender::broadcast) and writes its
//! rows in one transaction. A batch run again (a crashed worker's job, taken over) skips the
//! devices that have a row, so only sends that were in flight can repeat.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use apalis::prelude::{BackendExt, BoxDynError, Data, TaskSink, WorkerBuilder, WorkerBuilderExt};
use apalis_sqlite::SqliteStorage;
use c2dm_core::{BroadcastOptions, Message, RegistrationId, Sender};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

use crate::store::{Audience, DeliveryRow, DeviceState, Store, StoreError};

/// Walk the audience of push `message_id` and enqueue its batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    /// The push.
    pub message_id: i64,
}

/// Send push `message_id` to these devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchJob {
    /// The push.
    pub message_id: i64,
    /// The devices of this batch.
    pub registration_ids: Vec<String>,
}

/// Why a job could not be enqueued or run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job queue failed.
    #[error("job queue: {0}")]
    Queue(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The two queues, on the store's SQLite pool.
#[derive(Debug, Clone)]
pub struct Queues {
    pushes: SqliteStorage<PushJob>,
    batches: SqliteStorage<BatchJob>,
}

impl Queues {
    /// The queues' tables on `pool` (created or migrated now).
    pub async fn open(pool: &SqlitePool) -> Result<Self, JobError> {
        SqliteStorage::setup(pool)
            .await
            .map_err(|e| JobError::Queue(e.to_string()))?;
        Ok(Self {
            pushes: SqliteStorage::new(pool),
            batches: SqliteStorage::new(pool),
        })
    }

    /// Enqueues the job that sends push `message_id`.
    pub async fn enqueue_push(&self, message_id: i64) -> Result<(), JobError> {
        self.pushes
            .clone()
            .push(PushJob { message_id })
            .await
            .map_err(|e| JobError::Queue(e.to_string()))
    }

    async fn enqueue_batch(&self, job: BatchJob) -> Result<(), JobError> {
        self.batches
            .clone()
            .push(job)
            .await
            .map_err(|e| JobError::Queue(e.to_string()))
    }
}

/// How the workers of one process send.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Batch jobs run at once in this process (default 2).
    pub workers: usize,
    /// Sends at once within one batch (default 64).
    pub concurrency: usize,
    /// Devices per batch job (default 1,000): the queue's cost is per job, not per device.
    pub batch_size: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            concurrency: 64,
            batch_size: 1000,
        }
    }
}

/// How often an idle worker looks for jobs. Left to itself, apalis-sqlite's backend looked
/// again only at its heartbeat (30 s), so a job enqueued while a worker idled waited that long.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What the job handlers share.
struct Runner {
    store: Arc<dyn Store>,
    sender: Sender,
    queues: Queues,
    options: WorkerOptions,
}

/// Runs this process's workers until `shutdown` completes: one takes push jobs, and
/// `options.workers` batch jobs run at once.
pub async fn run_workers(
    store: Arc<dyn Store>,
    sender: Sender,
    queues: Queues,
    options: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), JobError> {
    let runner = Arc::new(Runner {
        store,
        sender,
        queues: queues.clone(),
        options,
    });
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let signal = |stop: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.recv().await;
            Ok::<(), std::io::Error>(())
        }
    };
    let pushes = WorkerBuilder::new("c2dm-pushes")
        .backend(queues.pushes.clone().poll_with_interval(POLL))
        .data(Arc::clone(&runner))
        .concurrency(1)
        .build(run_push)
        .run_until(signal(&stop));
    let batches = WorkerBuilder::new("c2dm-batches")
        .backend(queues.batches.clone().poll_with_interval(POLL))
        .data(Arc::clone(&runner))
        .concurrency(runner.options.workers.max(1))
        .build(run_batch)
        .run_until(signal(&stop));
    let stopper = async move {
        shutdown.await;
        let _ = stop.send(());
    };
    let (pushes, batches, ()) = tokio::join!(pushes, batches, stopper);
    pushes.map_err(|e| JobError::Queue(e.to_string()))?;
    batches.map_err(|e| JobError::Queue(e.to_string()))?;
    Ok(())
}

/// A push job: walk the audience, page by page, into batch jobs; then record its size.
async fn run_push(job: PushJob, runner: Data<Arc<Runner>>) -> Result<(), BoxDynError> {
    let store = &runner.store;
    let Some(message) = store.message_to_send(job.message_id).await? else {
        tracing::warn!(
            message_id = job.message_id,
            "a push job for an unknown message"
        );
        return Ok(());
    };
    if message.total.is_some() {
        return Ok(()); // walked already: this job is a repeat
    }
    store.start_sending(job.message_id).await?;
    let batch = runner.options.batch_size.max(1);
    let mut total = 0u64;
    match &message.audience {
        Audience::RegistrationIds { registration_ids } => {
            let mut seen = HashSet::new();
            let ids: Vec<String> = registration_ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .cloned()
                .collect();
            for chunk in ids.chunks(batch) {
                total += chunk.len() as u64;
                runner
                    .queues
                    .enqueue_batch(BatchJob {
                        message_id: job.message_id,
                        registration_ids: chunk.to_vec(),
                    })
                    .await?;
            }
        }
        audience => {
            let mut after = None;
            loop {
                let page = store
                    .audience_page(audience, after, u32::try_from(batch).unwrap_or(u32::MAX))
                    .await?;
                if !page.items.is_empty() {
                    total += page.items.len() as u64;
                    runner
                        .queues
                        .enqueue_batch(BatchJob {
                            message_id: job.message_id,
                            registration_ids: page.items,
                        })
                        .await?;
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
    }
    store.finish_walk(job.message_id, total).await?;
    tracing::info!(
        message_id = job.message_id,
        total,
        "push walked its audience"
    );
    Ok(())
}

/// A batch job: one broadcast to the devices that have no row yet, and their rows, with the
/// devices C2DM reported gone, in one transaction.
async fn run_batch(job: BatchJob, runner: Data<Arc<Runner>>) -> Result<(), BoxDynError> {
    let store = &runner.store;
    let Some(message) = store.message_to_send(job.message_id).await? else {
        return Ok(());
    };
    let recorded = store
        .recorded(job.message_id, &job.registration_ids)
        .await?;
    let todo: Vec<&String> = job
        .registration_ids
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    let now = SystemTime::now();
    let mut rows = Vec::with_capacity(todo.len());
    let mut gone = Vec::new();
    if message.cancel_requested {
        rows.extend(
            todo.iter()
                .map(|id| DeliveryRow::not_attempted(id, "cancelled", now)),
        );
    } else {
        let owned: Vec<String> = todo.iter().map(|id| (*id).clone()).collect();
        let inactive: std::collections::HashMap<String, DeviceState> = store
            .device_states(&owned)
            .await?
            .into_iter()
            .filter(|(_, state)| *state != DeviceState::Active)
            .collect();
        let mut send = Vec::with_capacity(todo.len());
        for id in todo {
            match (inactive.get(id.as_str()), RegistrationId::new(id.as_str())) {
                (Some(state), _) => rows.push(DeliveryRow::not_attempted(id, state.as_str(), now)),
                (None, Ok(rid)) => send.push(rid),
                (None, Err(_)) => rows.push(DeliveryRow::not_attempted(
                    id,
                    "invalid_registration_id",
                    now,
                )),
            }
        }
        if let Some(first) = send.first().cloned() {
            let template = template(&message, first)?;
            let mut deliveries = runner.sender.broadcast_to(
                futures::stream::iter(send),
                &template,
                BroadcastOptions::default().concurrency(runner.options.concurrency.max(1)),
            )?;
            while let Some(delivery) = deliveries.next().await {
                if delivery.should_remove() {
                    gone.push((
                        delivery.registration_id().to_string(),
                        delivery.error_text().unwrap_or_default(),
                    ));
                }
                rows.push(DeliveryRow::of(&delivery, SystemTime::now()));
            }
        }
    }
    store.record_batch(job.message_id, &rows, &gone).await?;
    metrics::counter!("c2dm_batches_total").increment(1);
    metrics::counter!("c2dm_devices_gone_total").increment(gone.len() as u64);
    for row in &rows {
        metrics::counter!("c2dm_deliveries_total", "outcome" => row.outcome.as_str()).increment(1);
    }
    Ok(())
}

/// The message of a stored push, addressed to `to` (a broadcast copies it to each device).
fn template(
    message: &crate::store::MessageRecord,
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
