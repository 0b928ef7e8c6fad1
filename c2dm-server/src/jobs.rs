//! Pushes as durable jobs on apalis: a push job walks the audience and enqueues batch jobs;
//! a batch job runs one [`Sender::broadcast`](c2dm_core::Sender::broadcast) and writes its
//! rows in one transaction. A batch run again (a crashed worker's job, taken over) skips the
//! devices that have a row, so only sends that were in flight can repeat.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use apalis::prelude::{
    BackendExt, BoxDynError, Data, PollSnapshot, PollStrategy, TaskId, WorkerBuilder,
    WorkerBuilderExt,
};
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use c2dm_core::{
    BroadcastOptions, CancelHandle, Message, NotAttempted, Outcome, OutcomeKind, RegistrationId,
    Sender,
};
use futures::StreamExt;
use sqlx::{PgPool, SqlitePool};
use tokio::time::Instant;

use crate::store::{
    Audience, BatchRun, DeliveryRow, DeviceState, Positions, Store, StoreError, Tally,
};

use crate::health::WorkerHealth;
use crate::queue::{BATCH_QUEUE, PUSH_QUEUE};
pub use crate::queue::{BatchJob, PushJob};

/// Why a job could not be enqueued or run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job queue failed.
    #[error("job queue: {0}")]
    Queue(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An option is beyond what the workers take.
    #[error(transparent)]
    Options(#[from] InvalidOption),
}

/// The two queues, in the store's database and on its pool.
#[derive(Debug, Clone)]
pub struct Queues {
    backend: QueueBackend,
}

#[derive(Clone)]
enum QueueBackend {
    Sqlite {
        pushes: SqliteStorage<PushJob>,
        batches: SqliteStorage<BatchJob>,
    },
    Postgres {
        pushes: PostgresStorage<PushJob>,
        batches: PostgresStorage<BatchJob>,
    },
}

impl std::fmt::Debug for QueueBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite { .. } => "Sqlite",
            Self::Postgres { .. } => "Postgres",
        })
    }
}

fn queue_error(e: impl std::fmt::Display) -> JobError {
    JobError::Queue(e.to_string())
}

/// Runs `$body` with `$pushes` and `$batches` bound to the queues of whichever database
/// they are in: one body for two storage types that share no trait object.
macro_rules! on_queues {
    ($queues:expr, |$pushes:ident, $batches:ident| $body:expr) => {
        match &$queues.backend {
            QueueBackend::Sqlite { pushes, batches } => {
                let ($pushes, $batches) = (pushes.clone(), batches.clone());
                $body
            }
            QueueBackend::Postgres { pushes, batches } => {
                let ($pushes, $batches) = (pushes.clone(), batches.clone());
                $body
            }
        }
    };
}

impl Queues {
    /// The queues' tables in the SQLite file of `pool` (created or migrated now), with the
    /// default heartbeat.
    pub async fn open(pool: &SqlitePool) -> Result<Self, JobError> {
        Self::open_sqlite(pool, &WorkerOptions::default()).await
    }

    /// The queues in a SQLite file, with `options`' heartbeat.
    pub async fn open_sqlite(pool: &SqlitePool, options: &WorkerOptions) -> Result<Self, JobError> {
        // Only the queue's migrations: `SqliteStorage::setup` would also turn off `synchronous`
        // on whichever connection of the shared pool it ran on, and the store's writes on that
        // connection could then be lost to a power cut.
        SqliteStorage::<()>::migrations()
            .run(pool)
            .await
            .map_err(queue_error)?;
        let config = |queue: &str| {
            apalis_sqlite::Config::default()
                .queue(queue)
                .batch_size(FETCH)
                .heartbeat_interval(options.heartbeat)
                .missed_heartbeats(MISSED_HEARTBEATS)
        };
        Ok(Self {
            backend: QueueBackend::Sqlite {
                pushes: SqliteStorage::new(pool).with_config(config(PUSH_QUEUE)),
                batches: SqliteStorage::new(pool).with_config(config(BATCH_QUEUE)),
            },
        })
    }

    /// The queues in a PostgreSQL database (created or migrated now, under a lock, so many
    /// processes may start at once), with `options`' heartbeat.
    pub async fn open_postgres(pool: &PgPool, options: &WorkerOptions) -> Result<Self, JobError> {
        PostgresStorage::setup(pool).await.map_err(queue_error)?;
        let config = |queue: &str| {
            apalis_postgres::Config::default()
                .queue(queue)
                .batch_size(FETCH)
                .heartbeat_interval(options.heartbeat)
                .missed_heartbeats(MISSED_HEARTBEATS)
        };
        Ok(Self {
            backend: QueueBackend::Postgres {
                pushes: PostgresStorage::new(pool).with_config(config(PUSH_QUEUE)),
                batches: PostgresStorage::new(pool).with_config(config(BATCH_QUEUE)),
            },
        })
    }

    /// Jobs of each queue not finished yet (waiting, taken or running): `(pushes, batches)`.
    pub async fn depth(&self) -> Result<(u64, u64), JobError> {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        match &self.backend {
            QueueBackend::Sqlite { pushes, .. } => {
                let pool = pushes.pool();
                let mut depth = [0; 2];
                for (slot, queue) in depth.iter_mut().zip([PUSH_QUEUE, BATCH_QUEUE]) {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM Jobs WHERE job_type = ? \
                         AND status IN ('Pending', 'Queued', 'Running')",
                    )
                    .bind(queue)
                    .fetch_one(pool)
                    .await
                    .map_err(queue_error)?;
                    *slot = count(n);
                }
                Ok((depth[0], depth[1]))
            }
            QueueBackend::Postgres { pushes, .. } => {
                let pool = pushes.pool();
                let mut depth = [0; 2];
                for (slot, queue) in depth.iter_mut().zip([PUSH_QUEUE, BATCH_QUEUE]) {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1 \
                         AND status IN ('Pending', 'Queued', 'Running')",
                    )
                    .bind(queue)
                    .fetch_one(pool)
                    .await
                    .map_err(queue_error)?;
                    *slot = count(n);
                }
                Ok((depth[0], depth[1]))
            }
        }
    }
}

/// Heartbeats a worker may miss before its jobs go to another worker.
const MISSED_HEARTBEATS: usize = 3;

/// Jobs a worker fetches at once: one. apalis 1.0 sends no heartbeat while a job it fetched
/// waits in its buffer for a free slot (its `poll_ready` looks at the heartbeat timer only
/// when nothing is buffered), and it fetches when one slot is free: a second job fetched with
/// the first would wait for the next slot to free, a whole batch or a 503's pause, while the
/// worker, silent, is taken for dead and its batches given to others.
const FETCH: usize = 1;

/// How one process's workers send.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Batch jobs sending at once in this process (default 2). One more is readied beside
    /// them (its devices read, its run claimed, its first sends marked), and starts sending
    /// as soon as one of them stops: a batch's start and end, each a few writes' wait, no
    /// longer leave its sending slots idle.
    pub workers: usize,
    /// Sends at once within one batch (default 64).
    pub concurrency: usize,
    /// Devices per batch job (default 1,000): the queue's cost is per job, not per device.
    pub batch_size: usize,
    /// The sender account whose pause and daily budget the workers share, across processes
    /// (default `default`): one name per C2DM sender.
    pub account: String,
    /// Messages the account may have accepted per day (UTC), by all workers together
    /// (default 200,000, the real service's quota); `None` for no budget. Batches reserve
    /// their share before sending; devices over the budget wait for the next day, unsent.
    pub daily_budget: Option<u64>,
    /// The period the budget counts over (default one day): periods are aligned to the Unix
    /// epoch, so a day is a UTC day. Shorter ones suit a service with another quota, and
    /// soak tests that must see the budget run out and come back.
    pub budget_period: Duration,
    /// How often a worker tells the database it is alive (default 5 s). A worker silent
    /// for three heartbeats is taken for dead, and its jobs go to the others.
    pub heartbeat: Duration,
}

/// A [`WorkerOptions`] value beyond what the workers take: the option, and the range it must
/// fall in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option} must be between {min} and {max}")]
pub struct InvalidOption {
    /// The option, as `c2dm serve` names its flag.
    pub option: &'static str,
    /// The least it may be.
    pub min: String,
    /// The most it may be.
    pub max: String,
}

impl WorkerOptions {
    /// The most batches a process may send at once.
    pub const MAX_WORKERS: usize = 1024;
    /// The most sends at once within one batch.
    pub const MAX_CONCURRENCY: usize = 10_000;
    /// The most devices one batch job may hold.
    pub const MAX_BATCH_SIZE: usize = 100_000;
    /// The longest budget period: a leap year. Periods start at multiples of it since the
    /// epoch, which must stay a time the clock can tell.
    pub const MAX_BUDGET_PERIOD: Duration = Duration::from_secs(366 * 86_400);
    /// The longest heartbeat: a day.
    pub const MAX_HEARTBEAT: Duration = Duration::from_secs(86_400);

    /// Every option within what the workers can count and add: checked when they start
    /// ([`run_workers`] and the server's `serve` refuse options that are not), so that no
    /// batch fails on a sum that overflows.
    pub fn check(&self) -> Result<(), InvalidOption> {
        fn within<T: PartialOrd + std::fmt::Debug>(
            option: &'static str,
            value: T,
            min: T,
            max: T,
            show: impl Fn(&T) -> String,
        ) -> Result<(), InvalidOption> {
            if value < min || value > max {
                return Err(InvalidOption {
                    option,
                    min: show(&min),
                    max: show(&max),
                });
            }
            Ok(())
        }
        let count = |n: &usize| n.to_string();
        let secs = |d: &Duration| format!("{} s", d.as_secs_f64());
        within("--workers", self.workers, 1, Self::MAX_WORKERS, count)?;
        within(
            "--concurrency",
            self.concurrency,
            1,
            Self::MAX_CONCURRENCY,
            count,
        )?;
        within(
            "--batch-size",
            self.batch_size,
            1,
            Self::MAX_BATCH_SIZE,
            count,
        )?;
        within(
            "--budget-period",
            self.budget_period,
            Duration::from_secs(1),
            Self::MAX_BUDGET_PERIOD,
            secs,
        )?;
        within(
            "--heartbeat",
            self.heartbeat,
            Duration::from_millis(1),
            Self::MAX_HEARTBEAT,
            secs,
        )
    }
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            concurrency: 64,
            batch_size: 1000,
            account: "default".to_owned(),
            daily_budget: Some(200_000),
            budget_period: BUDGET_DAY,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// How often an idle worker looks for jobs. Left to itself, apalis-sqlite's backend looked
/// again only at its heartbeat (30 s), so a job enqueued while a worker idled waited that long.
const POLL: Duration = Duration::from_millis(100);

/// Wakes a worker every [`POLL`], with the next wake armed whenever it is polled. apalis' own
/// interval strategy arms its next timer only at the poll after the one its timer fired in;
/// a fetch that began and ended within that one poll (a fast database) left no wake at all,
/// and the worker slept until its next heartbeat while other processes took every batch.
struct Every(tokio::time::Interval);

impl Every {
    fn new(period: Duration) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(interval)
    }
}

impl PollStrategy for Every {
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _: &PollSnapshot,
    ) -> std::task::Poll<Option<()>> {
        // Polled until pending, so that the next tick's wake is armed on the way out.
        let mut ticked = false;
        while self.0.poll_tick(cx).is_ready() {
            ticked = true;
        }
        if ticked {
            std::task::Poll::Ready(Some(()))
        } else {
            std::task::Poll::Pending
        }
    }
}

/// How often the workers compare their pause with the account's in the database, and how
/// often a batch looks whether its push was cancelled.
const LOOK: Duration = Duration::from_millis(200);

/// Batch jobs a process runs beyond [`WorkerOptions::workers`]: readied, each waits for one of
/// those to stop sending. Measured on SQLite (`docs/PERFORMANCE.md`): with none, a batch sent
/// for about two thirds of its run, and its slots idled through the rest; one ready batch
/// gave as much as two or four.
const READY_AHEAD: usize = 1;

/// What the job handlers share.
struct Runner {
    store: Arc<dyn Store>,
    sender: Sender,
    queues: Queues,
    options: WorkerOptions,
    /// One permit per batch that may send at once ([`WorkerOptions::workers`]), held from a
    /// batch's first send to its last answer.
    sending: Arc<tokio::sync::Semaphore>,
    /// Turns true when the process stops: batches stop their sends and retries, write what
    /// they can, and leave the rest to their next run.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Set while the account's pause cannot be read or shared: the log says so once.
    account_unread: AtomicBool,
}

impl Runner {
    fn new(
        store: Arc<dyn Store>,
        sender: Sender,
        queues: Queues,
        options: WorkerOptions,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            sender,
            queues,
            sending: Arc::new(tokio::sync::Semaphore::new(options.workers.max(1))),
            options,
            stopping,
            account_unread: AtomicBool::new(false),
        }
    }

    /// The account's pause could not be read or shared: said once, until it can be again
    /// (the watcher looks five times a second).
    fn account_unread(&self, error: &StoreError) {
        if !self.account_unread.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, account = self.options.account, "could not read or share the account's pause");
        }
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }
}

/// The waits between tries of a store operation that failed: the first, doubled after each
/// try up to the last.
const STORE_RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// A job's tries of a store operation: after each failure it notes the error (the log at
/// WARN, a metric, the push's status) and waits, with backoff, for the next try, unless the
/// process is stopping.
struct StoreRetry {
    store: Arc<dyn Store>,
    stopping: tokio::sync::watch::Receiver<bool>,
    message_id: i64,
    /// The job's step, as the log and the metric name it.
    step: &'static str,
    failures: u32,
    since: Option<SystemTime>,
    wait: Duration,
}

/// A job stopped with its process before it finished: its next run does the rest.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped with the process: the rest is left to the job's next run")
    }
}

impl std::error::Error for Stopped {}

impl StoreRetry {
    fn new(runner: &Runner, message_id: i64, step: &'static str) -> Self {
        Self {
            store: Arc::clone(&runner.store),
            stopping: runner.stopping.clone(),
            message_id,
            step,
            failures: 0,
            since: None,
            wait: STORE_RETRY.0,
        }
    }

    /// After a failed try: notes `error`, then waits for the next try. `Err` if the process
    /// is stopping: no more tries.
    async fn failed(&mut self, error: &StoreError) -> Result<(), Stopped> {
        self.failures += 1;
        let now = SystemTime::now();
        let since = *self.since.get_or_insert(now);
        metrics::counter!("c2dm_store_errors_total", "step" => self.step).increment(1);
        // Every failure counts; the log says the first, then each time their number doubles.
        if self.failures.is_power_of_two() {
            tracing::warn!(
                message_id = self.message_id,
                step = self.step,
                failures = self.failures,
                %error,
                "a push's job could not use the database: it keeps what it has and tries again"
            );
        }
        // Best effort (the database may be what fails), and waited for, so that this job's
        // notes and its clear (`passed`) reach the push in the order they were made.
        let noted = format!("{}: {error}", self.step);
        let note = self
            .store
            .note_push_error(self.message_id, &noted, now, since);
        tokio::select! {
            _ = note => {}
            _ = self.stopping.wait_for(|stopping| *stopping) => return Err(Stopped),
        }
        let wait = self.wait;
        self.wait = (self.wait * 2).min(STORE_RETRY.1);
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            _ = self.stopping.wait_for(|stopping| *stopping) => Err(Stopped),
        }
    }

    /// After a try that worked: if earlier ones failed, the push is no longer failing.
    async fn passed(&mut self) {
        if self.failures == 0 {
            return;
        }
        tracing::info!(
            message_id = self.message_id,
            step = self.step,
            failures = self.failures,
            "the database answers again: the job goes on"
        );
        (self.failures, self.since, self.wait) = (0, None, STORE_RETRY.0);
        if let Err(error) = self.store.clear_push_failing(self.message_id).await {
            tracing::debug!(%error, "could not note that the push writes again");
        }
    }

    /// The same tries, for another step of the same job.
    fn for_step(&self, step: &'static str) -> Self {
        Self {
            store: Arc::clone(&self.store),
            stopping: self.stopping.clone(),
            message_id: self.message_id,
            step,
            failures: 0,
            since: None,
            wait: STORE_RETRY.0,
        }
    }
}

/// Why one try of a job ended early.
enum Step {
    /// The store failed before anything was sent: the job tries again from its start.
    Store(StoreError),
    /// Anything else: the job fails, and the queue runs it again.
    Other(BoxDynError),
}

impl From<StoreError> for Step {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl From<Stopped> for Step {
    fn from(stopped: Stopped) -> Self {
        Self::Other(stopped.into())
    }
}

/// `$op` (a store operation), tried again with `$retry`'s backoff until it works; `?` on the
/// process stopping first.
macro_rules! retried {
    ($retry:expr, $op:expr) => {
        loop {
            match $op {
                Ok(value) => {
                    $retry.passed().await;
                    break value;
                }
                Err(error) => $retry.failed(&error).await?,
            }
        }
    };
}

/// Runs one try of a job after another until one ends other than on a store error, which
/// `retry` notes and waits out.
async fn tried<F, Fut>(retry: &mut StoreRetry, mut one_try: F) -> Result<(), BoxDynError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Step>>,
{
    loop {
        match one_try().await {
            Ok(()) => {
                retry.passed().await;
                return Ok(());
            }
            Err(Step::Store(error)) => retry.failed(&error).await?,
            Err(Step::Other(error)) => return Err(error),
        }
    }
}

/// A name no other worker has, in this process or another: apalis tells a dead worker's jobs
/// by the name that locked them, so two processes sharing a name would never see each other
/// die.
fn worker_name(queue: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{queue}-{}-{nanos:09}-{n}", std::process::id())
}

/// Runs this process's workers until `shutdown` completes: one takes push jobs, and
/// `options.workers` batch jobs send at once, with one more readied beside them. Meanwhile the
/// sender's pause is shared with every other worker of the account through the database, and
/// the queues' depth is kept in the metrics. A worker that loses its queue (the database went
/// away) starts again, with backoff, under a new name; the jobs it held go to the workers
/// that are alive once its heartbeat is missed.
pub async fn run_workers(
    store: Arc<dyn Store>,
    sender: Sender,
    queues: Queues,
    options: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), JobError> {
    run_workers_reporting(
        store,
        sender,
        queues,
        options,
        WorkerHealth::default(),
        shutdown,
    )
    .await
}

/// [`run_workers`], telling `health` whether the workers can work (for `/healthz`).
pub async fn run_workers_reporting(
    store: Arc<dyn Store>,
    sender: Sender,
    queues: Queues,
    options: WorkerOptions,
    health: WorkerHealth,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), JobError> {
    options.check()?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let runner = Arc::new(Runner::new(
        store,
        sender,
        queues.clone(),
        options,
        stopping,
    ));
    let watcher = tokio::spawn(watch_account(Arc::clone(&runner)));
    let stopper = async {
        shutdown.await;
        let _ = stop.send(true);
    };
    let pushes = supervised(PUSH_QUEUE, &runner, &health, |runner, signal| {
        on_queues!(runner.queues, |pushes, _batches| {
            let worker = WorkerBuilder::new(worker_name(PUSH_QUEUE))
                .backend(pushes.poll_with_strategy(Every::new(POLL)))
                .data(Arc::clone(runner))
                .concurrency(1)
                .build(|job, runner| on_own_task(run_push(job, runner)))
                .run_until(signal);
            Box::pin(async move { flatten(owned_task(worker).await) })
        })
    });
    let batches = supervised(BATCH_QUEUE, &runner, &health, |runner, signal| {
        on_queues!(runner.queues, |_pushes, batches| {
            let worker = WorkerBuilder::new(worker_name(BATCH_QUEUE))
                .backend(batches.poll_with_strategy(Every::new(POLL)))
                .data(Arc::clone(runner))
                .concurrency(runner.options.workers.max(1) + READY_AHEAD)
                .build(|job, task, runner| on_own_task(run_batch(job, task, runner)))
                .run_until(signal);
            Box::pin(async move { flatten(owned_task(worker).await) })
        })
    });
    // Each worker on a task of its own (`owned_task`). Polled together on one task, each woke
    // the other: the end of one's empty fetch polled the other, which then fetched again at
    // once, so an idle process queried its queue about a thousand times a second and kept
    // most of a core busy (the poll interval never came into play).
    let ((), (), ()) = tokio::join!(pushes, batches, stopper);
    watcher.abort();
    Ok(())
}

/// A worker's end: its task's, then its own.
fn flatten<E: std::fmt::Display>(
    ended: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), String> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The waits before a worker that lost its queue starts again: the first, doubled after each
/// start that fails again soon, up to the last.
const RESTART: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(15));

/// A worker that ran this long before it failed counts as having worked: its next start
/// waits the first wait again.
const RESTART_RESET: Duration = Duration::from_secs(60);

/// A worker of `queue`, made by `start` and run until the process stops, started again (a
/// new worker, under a new name) whenever it ends on its own: apalis ends a worker whose
/// queue fails to answer a poll. Meanwhile `health` says so.
async fn supervised<F>(queue: &'static str, runner: &Arc<Runner>, health: &WorkerHealth, start: F)
where
    F: Fn(
        &Arc<Runner>,
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), std::io::Error>> + Send>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>,
{
    let mut wait = RESTART.0;
    let mut restarted = false;
    loop {
        let mut stopping = runner.stopping.clone();
        let signal = Box::pin(async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
            Ok::<(), std::io::Error>(())
        });
        let started = Instant::now();
        let mut running = start(runner, signal);
        let ended = if restarted {
            // Healthy again once the new worker has polled for a heartbeat without failing.
            tokio::select! {
                ended = &mut running => ended,
                () = tokio::time::sleep(runner.options.heartbeat) => {
                    tracing::info!(queue, "the worker works again");
                    health.set(queue, None);
                    running.await
                }
            }
        } else {
            running.await
        };
        if runner.is_stopping() {
            return;
        }
        let why = ended.err().unwrap_or_else(|| "it stopped".to_owned());
        if started.elapsed() >= RESTART_RESET {
            wait = RESTART.0;
        }
        tracing::error!(
            queue,
            error = %why,
            retry_in = ?wait,
            "a worker lost its queue: starting it again"
        );
        metrics::counter!("c2dm_worker_restarts_total", "queue" => queue).increment(1);
        health.set(
            queue,
            Some(format!("the {queue} worker lost its queue: {why}")),
        );
        let mut stopping = runner.stopping.clone();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        wait = (wait * 2).min(RESTART.1);
        restarted = true;
    }
}

/// Runs a job on a task of its own, and aborts it if the job's future is dropped (its worker
/// stopped without waiting): as if it ran in place, but for one thing. apalis polls a
/// worker's queue each time anything wakes the worker while it has a free slot; a job run in
/// place wakes it at each send it finishes, which cost the database a queue poll every few
/// milliseconds per process. Apart, a job wakes its worker once, when it ends.
async fn on_own_task<F>(job: F) -> Result<(), BoxDynError>
where
    F: std::future::Future<Output = Result<(), BoxDynError>> + Send + 'static,
{
    // In the job's span, which apalis opened for it: its logs still say which job.
    match owned_task(tracing::Instrument::in_current_span(job)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(format!("the job panicked: {e}").into()),
        Err(e) => Err(e.to_string().into()),
    }
}

/// Runs `work` on a task of its own, aborted if the future returned is dropped before the
/// task ends: whoever drops it stops the work, as if it ran in place.
async fn owned_task<F>(work: F) -> Result<F::Output, tokio::task::JoinError>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Aborts the task when dropped.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let handle = tokio::spawn(work);
    let _abort = AbortOnDrop(handle.abort_handle());
    handle.await
}

/// The wall-clock time an instant of the sender's clock stands for.
fn wall_time_of(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

/// The sender's clock's instant for a wall-clock time.
fn instant_of(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(behind) => Instant::now()
            .checked_sub(behind.duration())
            .unwrap_or_else(Instant::now),
    }
}

/// Takes the account's pause from the database into the sender, now: what a batch does
/// before it sends, so that it never starts during a pause another worker learned of.
async fn adopt_shared_pause(runner: &Runner) -> Result<(), StoreError> {
    if let Some(until) = runner.store.shared_pause(&runner.options.account).await? {
        adopt_pause(&runner.sender, until);
    }
    Ok(())
}

/// How far two readings of one pause may differ, from converting between the sender's clock
/// and the wall clock, and still be the same pause.
const ROUNDING: Duration = Duration::from_millis(5);

/// Pauses the sender until `until`, if that is later than its own pause by more than the
/// clocks' rounding: the same pause read back changes nothing, so it is not told again
/// (and shared again) through [`Sender::pause_changes`].
fn adopt_pause(sender: &Sender, until: SystemTime) {
    let mine = sender.paused_until().map(wall_time_of);
    if mine.is_none_or(|mine| until > mine + ROUNDING) {
        sender.pause_all_until(instant_of(until));
    }
}

/// Keeps the sender's pause and the account's in the database the same, both ways, and
/// the queue depth in the metrics, until aborted. A pause this process's sender takes goes
/// to the database at once, not at the next look: a worker that dies just after a 503 must
/// not take the pause with it.
async fn watch_account(runner: Arc<Runner>) {
    let mut shared: Option<SystemTime> = None;
    let mut ticks = 0u64;
    let mut looks = tokio::time::interval(LOOK);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pauses = runner.sender.pause_changes();
    loop {
        let looked = tokio::select! {
            _ = looks.tick() => true,
            () = async {
                if pauses.changed().await.is_err() {
                    // The sender is gone (it cannot be, while the runner holds it).
                    std::future::pending::<()>().await;
                }
            } => false,
        };
        shared = share_pause(&runner, shared).await;
        if !looked {
            continue;
        }
        ticks += 1;
        if let Some(logins) = runner.sender.token_provider().logins() {
            metrics::counter!("c2dm_logins_total").absolute(logins);
        }
        if ticks.is_multiple_of(5) {
            match runner.queues.depth().await {
                Ok((pushes, batches)) => {
                    metrics::gauge!("c2dm_queue_depth", "queue" => PUSH_QUEUE).set(pushes as f64);
                    metrics::gauge!("c2dm_queue_depth", "queue" => BATCH_QUEUE).set(batches as f64);
                }
                Err(e) => tracing::debug!(error = %e, "could not count the queues"),
            }
        }
    }
}

/// One look at the pauses: the sender's, if later than the account's (`shared`, as last
/// read), goes to the database; then the account's comes back into the sender. Returns the
/// account's pause as read now.
async fn share_pause(runner: &Runner, shared: Option<SystemTime>) -> Option<SystemTime> {
    let store = &runner.store;
    let account = runner.options.account.as_str();
    let mine = runner.sender.paused_until().map(wall_time_of);
    // Later than the database's by more than the clocks' rounding: tell the others.
    if let Some(mine) = mine
        && shared.is_none_or(|s| mine > s + ROUNDING)
    {
        match store.pause_account(account, mine).await {
            Ok(()) => {
                metrics::counter!("c2dm_pauses_total").increment(1);
                tracing::info!(account, until = ?mine, "pausing every worker of the account");
            }
            Err(e) => runner.account_unread(&e),
        }
    }
    match store.shared_pause(account).await {
        Ok(until) => {
            if runner.account_unread.swap(false, Ordering::Relaxed) {
                tracing::info!(account, "the account's pause can be read again");
            }
            if let Some(until) = until {
                adopt_pause(&runner.sender, until);
            }
            metrics::gauge!("c2dm_paused").set(if until.is_some() { 1.0 } else { 0.0 });
            until
        }
        Err(e) => {
            runner.account_unread(&e);
            shared
        }
    }
}

/// A push job: walk the audience, page by page, into batch jobs; then record its size. A
/// store error makes it wait and go on where its walk got to: the queue never sees it.
async fn run_push(job: PushJob, runner: Data<Arc<Runner>>) -> Result<(), BoxDynError> {
    let mut retry = StoreRetry::new(&runner, job.message_id, "walk");
    tried(&mut retry, || walk(&job, &runner)).await
}

/// One try of a push job.
async fn walk(job: &PushJob, runner: &Runner) -> Result<(), Step> {
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
    // A walk that died goes on where its last page left it.
    let mut from = message.walk_after;
    let mut total = message.walked;
    let moved_on = || Step::Other("another walker moved this push's walk on".into());
    match &message.audience {
        Audience::RegistrationIds { registration_ids } => {
            let mut seen = HashSet::new();
            let ids: Vec<String> = registration_ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .cloned()
                .collect();
            let mut start = from
                .map_or(0, |f| usize::try_from(f).unwrap_or(usize::MAX))
                .min(ids.len());
            while start < ids.len() {
                let end = (start + batch).min(ids.len());
                let to = i64::try_from(end).unwrap_or(i64::MAX);
                if !store
                    .walk_page(job.message_id, from, to, &ids[start..end], None)
                    .await?
                {
                    return Err(moved_on());
                }
                total += (end - start) as u64;
                (from, start) = (Some(to), end);
            }
        }
        audience => loop {
            let page = store
                .audience_page(audience, from, u32::try_from(batch).unwrap_or(u32::MAX))
                .await?;
            if page.items.is_empty() {
                break;
            }
            // The last page has no cursor of its own: nothing comes after it.
            let to = page.next.unwrap_or(i64::MAX);
            let positions = page.items.last().map(|(through, _)| Positions {
                after: from.unwrap_or(0),
                through: *through,
            });
            let ids: Vec<String> = page.items.into_iter().map(|(_, id)| id).collect();
            if !store
                .walk_page(job.message_id, from, to, &ids, positions)
                .await?
            {
                return Err(moved_on());
            }
            total += ids.len() as u64;
            from = Some(to);
            if page.next.is_none() {
                break;
            }
        },
    }
    store.finish_walk(job.message_id, total).await?;
    tracing::info!(
        message_id = job.message_id,
        total,
        "push walked its audience"
    );
    Ok(())
}

/// The budget's default period: a day.
const BUDGET_DAY: Duration = Duration::from_secs(86_400);

/// The budget period (periods of `period` since the epoch, at least a second long: with a
/// day, the UTC day) that `now` falls in, and when the next one starts.
fn budget_day(now: SystemTime, period: Duration) -> (i64, SystemTime) {
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
const QUOTA_RETRY: Duration = Duration::from_secs(15 * 60);

/// A batch writes the rows it holds at least this often while it sends (and at least every
/// [`Store::rows_per_write`] rows), so that a worker that dies leaves little for the batch's
/// next run to send again.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A batch marks its list this many times its concurrency at a time (the next chunk while
/// this one is sent). A mark is a write that waits for the batch's own row writes: one per
/// 64 sends held the sends up on PostgreSQL. A run after a crash counts a possible duplicate
/// for each device below the mark without a row, so a longer chunk can count more.
const MARK_CHUNKS: usize = 4;

/// The rows of a batch not written yet, with the devices found gone among them.
struct Pending {
    message_id: i64,
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
    async fn flush(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        if self.rows.is_empty() && self.gone.is_empty() || self.taken_over.load(Ordering::Relaxed) {
            return Ok(());
        }
        let written = store
            .record_batch(self.message_id, &self.run, &self.rows, &self.gone)
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
            let mut tally = Tally::default();
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
                message_id = self.message_id,
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
        store: &dyn Store,
        later: &[(BatchJob, SystemTime)],
    ) -> Result<(), StoreError> {
        if self.taken_over.load(Ordering::Relaxed) {
            return Ok(());
        }
        let written = store
            .finish_batch(self.message_id, &self.run, &self.rows, &self.gone, later)
            .await?;
        self.written(written);
        Ok(())
    }

    /// Writes the rows held if there are many, or they have waited long.
    async fn flush_if_due(&mut self, store: &dyn Store) -> Result<(), StoreError> {
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
fn marked(
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
                let message_id = retry.message_id;
                let store = Arc::clone(&retry.store);
                let marked = loop {
                    match store.mark_sending(message_id, &run, through).await {
                        Ok(marked) => break marked,
                        Err(error) => retry.failed(&error).await.ok()?,
                    }
                };
                retry.passed().await;
                if !marked {
                    tracing::warn!(message_id, batch = %run.batch, "another worker took this batch over: it stops sending");
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
async fn run_batch(
    job: BatchJob,
    task: TaskId,
    runner: Data<Arc<Runner>>,
) -> Result<(), BoxDynError> {
    let mut retry = StoreRetry::new(&runner, job.message_id, "batch");
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
async fn batch_run(
    job: BatchJob,
    task: &str,
    runner: &Runner,
    retry: &mut StoreRetry,
) -> Result<(), Step> {
    let store = &runner.store;
    // A job names its stored list of devices (one queued before lists were kept carries them).
    let job = match job.list {
        Some(list) => match store.batch_list(list).await? {
            Some(stored) => stored,
            None => {
                // Lists go with their push when it finishes: nothing is left to send.
                tracing::info!(
                    message_id = job.message_id,
                    list,
                    "a batch of a finished push"
                );
                return Ok(());
            }
        },
        None => job,
    };
    // Cancels asked for in this process from here on (its push read next) stop the sends.
    let cancels = store.cancels();
    let Some(message) = store.message_to_send(job.message_id).await? else {
        return Ok(());
    };
    // The claim first: whatever an earlier run still going records after it is refused, and
    // what it recorded before is read next.
    let run = Arc::new(store.claim_batch(job.message_id, task).await?);
    if run.finished {
        // An earlier run wrote all it had to, and its worker died before the queue heard.
        return Ok(());
    }
    let marked_through = run.marked_through;
    let possibly_sent: HashSet<&String> = job.possibly_sent.iter().collect();
    // A first run has no rows to skip: one lookup per device spared on almost every batch.
    let recorded = if run.run == 1 {
        HashSet::new()
    } else {
        store
            .recorded(job.message_id, &job.registration_ids)
            .await?
    };
    // Each device with its position in the list, which the mark counts in.
    let todo: Vec<(u64, &String)> = (0u64..)
        .zip(&job.registration_ids)
        .filter(|(_, id)| !recorded.contains(*id))
        .collect();
    let now = SystemTime::now();
    let mut pending = Pending {
        message_id: job.message_id,
        run: Arc::clone(&run),
        taken_over: Arc::new(AtomicBool::new(false)),
        resent: todo
            .iter()
            .filter_map(|(at, id)| {
                let below = if *at < marked_through {
                    run.sending_runs.max(1)
                } else {
                    0
                };
                let earlier = below + u32::from(possibly_sent.contains(id));
                (earlier > 0).then(|| ((*id).clone(), earlier))
            })
            .collect(),
        rows: Vec::with_capacity(todo.len().min(store.rows_per_write())),
        gone: Vec::new(),
        flushed_at: Instant::now(),
    };
    if !pending.resent.is_empty() {
        tracing::info!(
            message_id = job.message_id,
            devices = pending.resent.len(),
            "a batch runs again after its worker died: its sends under way may be duplicated"
        );
    }
    let mut later: Vec<(String, SystemTime)> = Vec::new();
    let mut unsent = 0usize;
    // Devices whose sends the process's stop ended: no row; the next run sends them.
    let mut left = 0usize;
    if message.cancel_requested {
        for (_, id) in &todo {
            pending.push(DeliveryRow::not_attempted(id, "cancelled", now));
        }
    } else {
        let ids: Vec<String> = todo.iter().map(|(_, id)| (*id).clone()).collect();
        let inactive: HashMap<String, DeviceState> = store
            .inactive_devices(&ids, job.positions)
            .await?
            .into_iter()
            .collect();
        let mut send = Vec::with_capacity(todo.len());
        for &(at, id) in &todo {
            match (inactive.get(id.as_str()), RegistrationId::new(id.as_str())) {
                (Some(state), _) => {
                    pending.push(DeliveryRow::not_attempted(id, state.as_str(), now))
                }
                (None, Ok(rid)) => send.push((at, rid)),
                (None, Err(_)) => pending.push(DeliveryRow::not_attempted(
                    id,
                    "invalid_registration_id",
                    now,
                )),
            }
        }
        let (day, tomorrow) = budget_day(now, runner.options.budget_period);
        let granted = match runner.options.daily_budget {
            Some(daily) if !send.is_empty() => {
                let wanted = send.len() as u64;
                let account = runner.options.account.as_str();
                let granted = store.reserve_budget(account, day, daily, wanted).await?;
                if granted < wanted {
                    tracing::info!(
                        message_id = job.message_id,
                        unsent = wanted - granted,
                        "the account's daily budget is spent: the rest waits for tomorrow"
                    );
                    metrics::counter!("c2dm_budget_deferred_total").increment(wanted - granted);
                }
                Some(granted)
            }
            _ => None,
        };
        if let Some(granted) = granted {
            let keep = usize::try_from(granted)
                .unwrap_or(usize::MAX)
                .min(send.len());
            later.extend(
                send.split_off(keep)
                    .into_iter()
                    .map(|(_, id)| (id.as_str().to_owned(), tomorrow)),
            );
        }
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
                    Arc::clone(store),
                    job.message_id,
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
                        retried!(retry, pending.flush_if_due(store.as_ref()).await);
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
        if let Err(error) = pending.flush(store.as_ref()).await {
            tracing::warn!(
                message_id = job.message_id,
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
    let later = later_batches(job.message_id, job.positions, later, &pending.resent);
    retried!(retry, pending.finish(store.as_ref(), &later).await);
    metrics::counter!("c2dm_batches_total").increment(1);
    Ok(())
}

/// Cancels a batch's broadcast when the process stops, first setting `halted`: its sends
/// under way finish, the others are not made and their waits end, and none of those gets a
/// row (the batch's next run sends them).
async fn halt_when_stopping(
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
fn later_batches(
    message_id: i64,
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
            message_id,
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
async fn cancel_when_asked(
    store: Arc<dyn Store>,
    message_id: i64,
    mut changes: tokio::sync::watch::Receiver<u64>,
    cancel: CancelHandle,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOOK) => {}
            _ = changes.changed() => {}
        }
        match store.message_to_send(message_id).await {
            Ok(Some(message)) if message.cancel_requested => {
                tracing::info!(message_id, "push cancelled: stopping its batch");
                cancel.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not look for a cancel"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// A sender whose sends would fail: these tests never send.
    fn sender() -> Sender {
        let transport = |_request: http::Request<bytes::Bytes>| async {
            Err(c2dm_core::TransportError::new(
                c2dm_core::TransportErrorKind::Connect,
                c2dm_core::RequestSent::No,
            ))
        };
        let token = c2dm_core::AuthToken::new("token").unwrap();
        Sender::new(transport, c2dm_core::StaticToken::new(token))
    }

    #[tokio::test]
    async fn a_pause_one_worker_learns_reaches_the_others_of_its_account_only() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let queues = Queues::open(store.pool()).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let runner = |account: &str| {
            let options = WorkerOptions {
                account: account.to_owned(),
                ..WorkerOptions::default()
            };
            Runner::new(
                Arc::clone(&store),
                sender(),
                queues.clone(),
                options,
                tokio::sync::watch::channel(false).1,
            )
        };
        let (first, second, elsewhere) = (runner("acct"), runner("acct"), runner("other"));
        assert_eq!(share_pause(&second, None).await, None);

        // The first worker's sender is paused (a 503 with Retry-After: 30, say).
        let until = Instant::now() + Duration::from_secs(30);
        first.sender.pause_all_until(until);
        let shared = share_pause(&first, None).await.expect("shared");
        // The second learns it at its next look, to the millisecond; the other account not.
        assert_eq!(share_pause(&second, None).await, Some(shared));
        let learned = second.sender.paused_until().expect("paused");
        let off = if learned > until {
            learned - until
        } else {
            until - learned
        };
        assert!(off < Duration::from_millis(5), "{off:?}");
        assert_eq!(share_pause(&elsewhere, None).await, None);
        assert_eq!(elsewhere.sender.paused_until(), None);

        // Looking again changes nothing: the pause is not extended by being read back, nor
        // told again (which would share it again, and again).
        let mut told = [first.sender.pause_changes(), second.sender.pause_changes()];
        for pauses in &mut told {
            pauses.borrow_and_update();
        }
        assert_eq!(share_pause(&first, Some(shared)).await, Some(shared));
        assert_eq!(share_pause(&second, Some(shared)).await, Some(shared));
        adopt_shared_pause(&second).await.unwrap();
        for pauses in &told {
            assert!(!pauses.has_changed().unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_poll_always_leaves_its_next_wake_armed() {
        use std::sync::atomic::AtomicUsize;
        use std::task::{Context, Wake, Waker};
        struct Wakes(AtomicUsize);
        impl Wake for Wakes {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut every = Every::new(POLL);
        let look = |every: &mut Every, cx: &mut Context<'_>| {
            every.poll_drive(cx, &PollSnapshot::default())
        };
        // The first look comes at once. Polled once, and never again until woken, the strategy
        // still wakes the worker for each look after it.
        assert!(look(&mut every, &mut cx).is_ready());
        for woken in 1..=2 {
            tokio::time::sleep(POLL).await;
            assert_eq!(wakes.0.load(Ordering::SeqCst), woken);
            assert!(look(&mut every, &mut cx).is_ready());
            assert!(look(&mut every, &mut cx).is_pending());
        }
    }

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

    #[test]
    fn options_beyond_what_the_workers_can_add_are_refused() {
        assert_eq!(WorkerOptions::default().check(), Ok(()));
        for (options, option) in [
            (
                WorkerOptions {
                    budget_period: Duration::from_secs(u64::MAX),
                    ..WorkerOptions::default()
                },
                "--budget-period",
            ),
            (
                WorkerOptions {
                    budget_period: Duration::ZERO,
                    ..WorkerOptions::default()
                },
                "--budget-period",
            ),
            (
                WorkerOptions {
                    heartbeat: Duration::ZERO,
                    ..WorkerOptions::default()
                },
                "--heartbeat",
            ),
            (
                WorkerOptions {
                    workers: 0,
                    ..WorkerOptions::default()
                },
                "--workers",
            ),
            (
                WorkerOptions {
                    concurrency: usize::MAX,
                    ..WorkerOptions::default()
                },
                "--concurrency",
            ),
            (
                WorkerOptions {
                    batch_size: WorkerOptions::MAX_BATCH_SIZE + 1,
                    ..WorkerOptions::default()
                },
                "--batch-size",
            ),
        ] {
            let err = options.check().unwrap_err();
            assert_eq!(err.option, option, "{err}");
        }
        let longest = WorkerOptions {
            budget_period: WorkerOptions::MAX_BUDGET_PERIOD,
            ..WorkerOptions::default()
        };
        assert_eq!(longest.check(), Ok(()));
    }
}
