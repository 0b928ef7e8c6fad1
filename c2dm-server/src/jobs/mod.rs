//! Pushes as durable jobs on apalis: a push job walks the audience and enqueues batch jobs;
//! a batch job runs one [`Sender::broadcast`](c2dm_core::Sender::broadcast) and writes its
//! rows in one transaction. A batch run again (a crashed worker's job, taken over) skips the
//! devices that have a row, so only sends that were in flight can repeat.
//!
//! - [`run_workers`] here runs a process's two workers, each supervised (started again
//!   when its queue fails: `supervise`), and the watcher that shares the sender's pause
//!   (`account`).
//! - `push`: the push job, which walks the audience into batch jobs.
//! - `batch`: the batch job: load, claim, plan (`plan`, a pure function), reserve, send,
//!   finish.
//! - `retry`: a job's tries of a store operation, and the process's stop.
//! - `queues`, `options`: the queues in the database, and the workers' options.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use apalis::prelude::{
    BackendExt, BoxDynError, PollSnapshot, PollStrategy, WorkerBuilder, WorkerBuilderExt,
};
use c2dm_core::Sender;
use c2dm_fcm::Fcm;

mod account;
mod batch;
mod budget;
mod options;
mod pending;
mod plan;
mod push;
mod queues;
mod retry;
mod supervise;

pub use options::{InvalidOption, WorkerOptions};
pub use queues::Queues;

use crate::health::WorkerHealth;
use crate::queue::{BATCH_QUEUE, PUSH_QUEUE};
pub use crate::queue::{BatchJob, PushJob};
use crate::store::{Store, StoreError};
use account::{watch_account, watch_fcm};
use batch::run_batch;
use push::run_push;
use queues::on_queues;
use supervise::{flatten, supervised};

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

/// Wakes a worker as soon as a job it may take is enqueued, and every [`POLL`] besides: when
/// this process's store enqueues one due now ([`Store::enqueued`]), and on PostgreSQL when the
/// database says any process did (apalis-postgres' `NOTIFY` on insert, for the worker's queue).
/// The poll stays for what neither tells: jobs coming due later, and other processes' jobs on
/// SQLite.
struct Wakes {
    every: Every,
    enqueued: futures::stream::BoxStream<'static, ()>,
    /// PostgreSQL's notices of inserts into this worker's queue, with the pool and queue to
    /// listen again with when the connection is lost.
    news: Option<apalis_postgres::Pubsub>,
}

impl Wakes {
    fn new(store: &Store, queue: &str) -> Self {
        Self::with_poll(store, queue, POLL)
    }

    /// Looking at the queue every `poll`.
    fn with_poll(store: &Store, queue: &str, poll: Duration) -> Self {
        let enqueued = futures::stream::unfold(store.enqueued(), |mut rx| async move {
            rx.changed().await.ok().map(|()| ((), rx))
        });
        Self {
            every: Every::new(poll),
            enqueued: Box::pin(enqueued),
            news: store
                .postgres_pool()
                .map(|pool| apalis_postgres::Pubsub::new(pool.clone(), queue.to_owned())),
        }
    }
}

impl PollStrategy for Wakes {
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        snapshot: &PollSnapshot,
    ) -> std::task::Poll<Option<()>> {
        use futures::StreamExt;
        use std::task::Poll;
        // Every source polled until pending, so that each has its next wake armed.
        let mut woken = false;
        while let Poll::Ready(Some(())) = self.enqueued.poll_next_unpin(cx) {
            woken = true;
        }
        if let Some(news) = &mut self.news {
            loop {
                match news.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(_))) => woken = true,
                    // Its connection failed: it says so, then ends.
                    Poll::Ready(Some(Err(_))) => {}
                    Poll::Ready(None) => {
                        // Listen again (a clone starts afresh) at the next look; the poll
                        // covers the meantime.
                        *news = news.clone();
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if self.every.poll_drive(cx, snapshot).is_ready() {
            woken = true;
        }
        if woken {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// How often the workers compare their pause with the account's in the database, and how
/// often a batch looks whether its push was cancelled.
const LOOK: Duration = Duration::from_millis(200);

/// Batch jobs a process runs beyond [`WorkerOptions::workers`]: readied, each waits for one of
/// those to stop sending, so that a worker's slots do not idle while a batch reads and writes
/// around its sends; the value's evidence is in docs/PERFORMANCE.md's decisions.
const READY_AHEAD: usize = 1;

/// The senders a process's workers send through, each if it is set up. A device whose
/// provider has no sender here gets a `not_attempted` row (`no_sender` as its reason).
#[derive(Debug, Clone, Default)]
pub struct Senders {
    /// C2DM's: every device registered for C2DM (and every id not registered).
    pub c2dm: Option<Sender>,
    /// FCM's: every device registered for FCM.
    pub fcm: Option<Sender<Fcm>>,
}

impl From<Sender> for Senders {
    fn from(c2dm: Sender) -> Self {
        Self {
            c2dm: Some(c2dm),
            fcm: None,
        }
    }
}

impl From<Sender<Fcm>> for Senders {
    fn from(fcm: Sender<Fcm>) -> Self {
        Self {
            c2dm: None,
            fcm: Some(fcm),
        }
    }
}

/// What the job handlers share.
struct Runner {
    store: Store,
    /// C2DM's sender, if set up.
    sender: Option<Sender>,
    /// FCM's sender, if set up.
    fcm: Option<Sender<Fcm>>,
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
        store: Store,
        senders: Senders,
        queues: Queues,
        options: WorkerOptions,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            sender: senders.c2dm,
            fcm: senders.fcm,
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
    store: Store,
    sender: impl Into<Senders> + Send,
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
    store: Store,
    sender: impl Into<Senders> + Send,
    queues: Queues,
    options: WorkerOptions,
    health: WorkerHealth,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), JobError> {
    options.check()?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let runner = Arc::new(Runner::new(
        store,
        sender.into(),
        queues.clone(),
        options,
        stopping,
    ));
    let watcher = tokio::spawn(watch_account(Arc::clone(&runner)));
    let fcm_watcher = runner
        .fcm
        .clone()
        .map(|fcm| tokio::spawn(watch_fcm(Arc::clone(&runner), fcm)));
    let stopper = async {
        shutdown.await;
        let _ = stop.send(true);
    };
    let pushes = supervised(PUSH_QUEUE, &runner, &health, |runner, signal| {
        on_queues!(runner.queues, |pushes, _batches| {
            let worker = WorkerBuilder::new(worker_name(PUSH_QUEUE))
                .backend(pushes.poll_with_strategy(Wakes::new(&runner.store, PUSH_QUEUE)))
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
                .backend(batches.poll_with_strategy(Wakes::new(&runner.store, BATCH_QUEUE)))
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
    if let Some(fcm_watcher) = fcm_watcher {
        fcm_watcher.abort();
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender whose sends would fail: these tests never send.
    pub(crate) fn sender() -> Sender {
        let transport = |_request: http::Request<bytes::Bytes>| async {
            Err(c2dm_core::TransportError::new(
                c2dm_core::TransportErrorKind::Connect,
                c2dm_core::RequestSent::No,
            ))
        };
        let token = c2dm_core::AuthToken::new("token").unwrap();
        Sender::new(transport, c2dm_core::StaticToken::new(token))
    }

    /// An FCM sender for project `project` whose sends would fail: these tests never send.
    pub(crate) fn fcm_sender(project: &str) -> Sender<Fcm> {
        let transport = |_request: http::Request<bytes::Bytes>| async {
            Err(c2dm_core::TransportError::new(
                c2dm_core::TransportErrorKind::Connect,
                c2dm_core::RequestSent::No,
            ))
        };
        let token = c2dm_core::AuthToken::new("token").unwrap();
        Sender::with_protocol(
            Fcm::new(project).unwrap(),
            transport,
            c2dm_core::StaticToken::new(token),
        )
        .build()
    }

    /// A job this process's store enqueues wakes its workers at once, not at their next poll
    /// (an hour away here).
    #[tokio::test]
    async fn a_push_made_wakes_the_workers_before_their_poll() {
        use std::task::{Context, Waker};
        let store = Store::open_sqlite("sqlite::memory:").await.unwrap();
        Queues::open_beside(&store, &WorkerOptions::default())
            .await
            .unwrap();
        let mut wakes = Wakes::with_poll(&store, PUSH_QUEUE, Duration::from_secs(3600));
        let mut cx = Context::from_waker(Waker::noop());
        let snapshot = PollSnapshot::default();
        // The first look comes at once (on the timer's next millisecond); then nothing, until
        // the poll or a job.
        std::future::poll_fn(|cx| wakes.poll_drive(cx, &snapshot)).await;
        assert!(wakes.poll_drive(&mut cx, &snapshot).is_pending());
        let push = crate::store::NewPush {
            idempotency_key: None,
            audience: crate::store::Audience::All(crate::store::Everyone::All),
            collapse_key: "k".into(),
            data: Vec::new(),
            delay_while_idle: false,
        };
        store.create_push(&push).await.unwrap();
        assert!(wakes.poll_drive(&mut cx, &snapshot).is_ready());
        assert!(wakes.poll_drive(&mut cx, &snapshot).is_pending());
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
}
