//! The two queues (pushes, batches), in the store's database: apalis-sqlite or apalis-postgres.

use std::time::{Duration, SystemTime};

use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use sqlx::{PgPool, SqlitePool};

use super::{JobError, WorkerOptions};
use crate::queue::{BATCH_QUEUE, BatchJob, PUSH_QUEUE, PushJob};
use crate::store::Store;

/// The two queues, in the store's database and on its pool.
#[derive(Debug, Clone)]
pub struct Queues {
    pub(super) backend: QueueBackend,
}

#[derive(Clone)]
pub(super) enum QueueBackend {
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

pub(super) fn queue_error(e: impl std::fmt::Display) -> JobError {
    JobError::Queue(e.to_string())
}

/// Runs `$body` with `$pushes` and `$batches` bound to the queues of whichever database
/// they are in: one body for two storage types that share no trait object.
macro_rules! on_queues {
    ($queues:expr, |$pushes:ident, $batches:ident| $body:expr) => {
        match &$queues.backend {
            $crate::jobs::queues::QueueBackend::Sqlite { pushes, batches } => {
                let ($pushes, $batches) = (pushes.clone(), batches.clone());
                $body
            }
            $crate::jobs::queues::QueueBackend::Postgres { pushes, batches } => {
                let ($pushes, $batches) = (pushes.clone(), batches.clone());
                $body
            }
        }
    };
}
pub(super) use on_queues;

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
        crate::store::run_migrations(&SqliteStorage::<()>::migrations(), pool)
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

    /// The queues in the database `store` is on (created or migrated now), on its pool, with
    /// `options`' heartbeat.
    pub async fn open_beside(store: &Store, options: &WorkerOptions) -> Result<Self, JobError> {
        match (store.sqlite_pool(), store.postgres_pool()) {
            (Some(pool), _) => Self::open_sqlite(pool, options).await,
            (_, Some(pool)) => Self::open_postgres(pool, options).await,
            (None, None) => unreachable!("a store is on one database or the other"),
        }
    }

    /// Jobs of each queue not finished yet (waiting, taken or running): `(pushes, batches)`.
    pub async fn depth(&self) -> Result<(u64, u64), JobError> {
        // The jobs not finished, in the queue's table: apalis-sqlite's `Jobs`, apalis-postgres'
        // `apalis.jobs`.
        macro_rules! waiting {
            () => {
                "WHERE job_type = $1 AND status IN ('Pending', 'Queued', 'Running')"
            };
        }
        let mut depth = [0u64; 2];
        for (slot, queue) in depth.iter_mut().zip([PUSH_QUEUE, BATCH_QUEUE]) {
            let counted: Result<i64, sqlx::Error> = match &self.backend {
                QueueBackend::Sqlite { pushes, .. } => {
                    sqlx::query_scalar(concat!("SELECT COUNT(*) FROM Jobs ", waiting!()))
                        .bind(queue)
                        .fetch_one(pushes.pool())
                        .await
                }
                QueueBackend::Postgres { pushes, .. } => {
                    sqlx::query_scalar(concat!("SELECT COUNT(*) FROM apalis.jobs ", waiting!()))
                        .bind(queue)
                        .fetch_one(pushes.pool())
                        .await
                }
            };
            *slot = u64::try_from(counted.map_err(queue_error)?).unwrap_or(0);
        }
        Ok((depth[0], depth[1]))
    }

    /// How long the oldest job due and not yet taken has waited, in the push queue and in the
    /// batch queue (zero when none waits; jobs due later, such as devices left for the
    /// budget's next period, do not count).
    pub async fn oldest_due(&self) -> Result<(Duration, Duration), JobError> {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let now_secs = i64::try_from(now).unwrap_or(i64::MAX);
        let mut ages = [Duration::ZERO; 2];
        for (slot, queue) in ages.iter_mut().zip([PUSH_QUEUE, BATCH_QUEUE]) {
            // apalis-sqlite keeps `run_at` as Unix seconds, apalis-postgres as a timestamp.
            let oldest: Result<Option<i64>, sqlx::Error> = match &self.backend {
                QueueBackend::Sqlite { pushes, .. } => {
                    sqlx::query_scalar(
                        "SELECT MIN(run_at) FROM Jobs WHERE job_type = $1 \
                         AND status IN ('Pending', 'Queued') AND run_at <= $2",
                    )
                    .bind(queue)
                    .bind(now_secs)
                    .fetch_one(pushes.pool())
                    .await
                }
                QueueBackend::Postgres { pushes, .. } => {
                    sqlx::query_scalar(
                        "SELECT EXTRACT(EPOCH FROM MIN(run_at))::BIGINT FROM apalis.jobs \
                         WHERE job_type = $1 AND status IN ('Pending', 'Queued') \
                         AND run_at <= to_timestamp($2)",
                    )
                    .bind(queue)
                    .bind(now_secs)
                    .fetch_one(pushes.pool())
                    .await
                }
            };
            if let Some(oldest) = oldest.map_err(queue_error)? {
                *slot = Duration::from_secs(u64::try_from(now_secs - oldest).unwrap_or(0));
            }
        }
        Ok((ages[0], ages[1]))
    }
}

/// Heartbeats a worker may miss before its jobs go to another worker.
pub(super) const MISSED_HEARTBEATS: usize = 3;

/// Jobs a worker fetches at once: one. apalis 1.0 sends no heartbeat while a job it fetched
/// waits in its buffer for a free slot (its `poll_ready` looks at the heartbeat timer only
/// when nothing is buffered), and it fetches when one slot is free: a second job fetched with
/// the first would wait for the next slot to free, a whole batch or a 503's pause, while the
/// worker, silent, is taken for dead and its batches given to others.
pub(super) const FETCH: usize = 1;
