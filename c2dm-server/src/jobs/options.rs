//! How one process's workers send, and the bounds on each option.

use std::time::Duration;

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
    /// Messages each provider account (the C2DM account, and each FCM project as
    /// `fcm:<project_id>`) may have accepted per day (UTC), by all workers together (default
    /// 200,000, C2DM's quota); `None` for no budget. Batches reserve their share before
    /// sending; devices over the budget wait for the next day, unsent.
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
    /// ([`run_workers`](super::run_workers) and the server's `serve` refuse options that are not), so that no
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

/// The budget's default period: a day.
pub(super) const BUDGET_DAY: Duration = Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use super::*;

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
