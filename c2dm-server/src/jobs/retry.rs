//! A job's tries of a store operation: backoff, notes on the push, and the stop.

use std::time::{Duration, SystemTime};

use apalis::prelude::BoxDynError;

use super::Runner;
use crate::store::{Store, StoreError};

/// The waits between tries of a store operation that failed: the first, doubled after each
/// try up to the last.
pub(super) const STORE_RETRY: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(10));

/// A job's tries of a store operation: after each failure it notes the error (the log at
/// WARN, a metric, the push's status) and waits, with backoff, for the next try, unless the
/// process is stopping.
pub(super) struct StoreRetry {
    pub(super) store: Store,
    stopping: tokio::sync::watch::Receiver<bool>,
    pub(super) push_id: i64,
    /// The job's step, as the log and the metric name it.
    step: &'static str,
    failures: u32,
    since: Option<SystemTime>,
    wait: Duration,
}

/// A job stopped with its process before it finished: its next run does the rest.
#[derive(Debug)]
pub(super) struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped with the process: the rest is left to the job's next run")
    }
}

impl std::error::Error for Stopped {}

impl StoreRetry {
    pub(super) fn new(runner: &Runner, push_id: i64, step: &'static str) -> Self {
        Self {
            store: runner.store.clone(),
            stopping: runner.stopping.clone(),
            push_id,
            step,
            failures: 0,
            since: None,
            wait: STORE_RETRY.0,
        }
    }

    /// After a failed try: notes `error`, then waits for the next try. `Err` if the process
    /// is stopping: no more tries.
    pub(super) async fn failed(&mut self, error: &StoreError) -> Result<(), Stopped> {
        self.failures += 1;
        let now = SystemTime::now();
        let since = *self.since.get_or_insert(now);
        metrics::counter!("c2dm_store_errors_total", "step" => self.step).increment(1);
        // Every failure counts; the log says the first, then each time their number doubles.
        if self.failures.is_power_of_two() {
            tracing::warn!(
                push_id = self.push_id,
                step = self.step,
                failures = self.failures,
                %error,
                "a push's job could not use the database: it keeps what it has and tries again"
            );
        }
        // Best effort (the database may be what fails), and waited for, so that this job's
        // notes and its clear (`passed`) reach the push in the order they were made.
        let noted = format!("{}: {error}", self.step);
        let note = self.store.note_push_error(self.push_id, &noted, now, since);
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
    pub(super) async fn passed(&mut self) {
        if self.failures == 0 {
            return;
        }
        tracing::info!(
            push_id = self.push_id,
            step = self.step,
            failures = self.failures,
            "the database answers again: the job goes on"
        );
        (self.failures, self.since, self.wait) = (0, None, STORE_RETRY.0);
        if let Err(error) = self.store.clear_push_failing(self.push_id).await {
            tracing::debug!(%error, "could not note that the push writes again");
        }
    }

    /// The same tries, for another step of the same job.
    pub(super) fn for_step(&self, step: &'static str) -> Self {
        Self {
            store: self.store.clone(),
            stopping: self.stopping.clone(),
            push_id: self.push_id,
            step,
            failures: 0,
            since: None,
            wait: STORE_RETRY.0,
        }
    }
}

/// Why one try of a job ended early.
pub(super) enum Step {
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
pub(super) use retried;

/// Runs one try of a job after another until one ends other than on a store error, which
/// `retry` notes and waits out.
pub(super) async fn tried<F, Fut>(retry: &mut StoreRetry, mut one_try: F) -> Result<(), BoxDynError>
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
