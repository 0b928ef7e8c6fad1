//! Where the server keeps its devices and pushes: one [`Store`], on a SQLite file (the
//! default) or a PostgreSQL database (for many processes).
//!
//! Each operation has one body. Most run one SQL text on either database (both bind `$N`
//! placeholders), dispatched by `on_pool!` for reads and `Store::write` for writes. What
//! truly differs lives in a module per database: `sqlite` (the group commit of this
//! process's writes, the busy handler, the upsert, batch writes chunked by SQLite's parameter
//! limit) and `postgres` (a batch's write as one statement over arrays, `ANY($1)` lookups,
//! the budget's row lock).

mod accounts;
mod batches;
mod busy;
mod devices;
mod group;
mod postgres;
mod pushes;
mod rows;
mod shared;
mod sqlite;
mod types;

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool, SqliteConnection, SqlitePool};
use tokio::sync::watch;

pub use crate::queue::Positions;
pub use types::{
    AccountState, Audience, BatchRun, Counts, DeliveryRow, Device, DeviceCounts, DeviceFilter,
    DeviceState, Everyone, NewDevice, NewPush, OutcomeTally, Page, Provider, Push, PushError,
    PushFilter, PushState, Reservation, StoreError, Upserted,
};

/// The server's storage, on whichever database it was opened on. Cheap to clone: clones
/// share the connections and the signals.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    signals: Arc<Signals>,
}

/// The database a store is on.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(sqlite::Sqlite),
    Postgres(PgPool),
}

/// What a write tells this process's watchers (other processes' writes are seen when they
/// look again).
#[derive(Debug)]
struct Signals {
    /// Each batch, walk, cancel or push error recorded.
    changes: watch::Sender<u64>,
    /// Each push finished, and each cancel asked for.
    finishes: watch::Sender<u64>,
    /// Each cancel asked for.
    cancels: watch::Sender<u64>,
    /// Each job enqueued due now (a push's, or a batch of its walk): the workers of this
    /// process fetch at once rather than at their next poll.
    enqueued: watch::Sender<u64>,
    /// Never sent: its receivers learn that the store is gone (its listener stops).
    dropped: watch::Sender<()>,
}

/// A connection of either database, inside one of [`Store::write`]'s transactions.
enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl Conn<'_> {
    /// The same connection, for one more statement.
    fn reborrow(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(c) => Conn::Sqlite(c),
            Self::Postgres(c) => Conn::Postgres(c),
        }
    }
}

/// Runs `$body` with `$pool` bound to the store's pool, whichever database it is: one body,
/// compiled once for each database's types.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::store::Db::Sqlite(db) => {
                let $pool = &db.pool;
                $body
            }
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}
use on_pool;

/// Runs `$body` with `$c` bound to the connection of a [`Conn`], as [`on_pool!`] does.
macro_rules! on_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::Conn::Sqlite($c) => $body,
            $crate::store::Conn::Postgres($c) => $body,
        }
    };
}
use on_conn;

/// Runs one statement, `$sql` with the variables `$arg` bound in order (each moved into the
/// write, so owned), as [`Store::write_one`]: the rows it changed.
macro_rules! execute {
    ($store:expr, $sql:expr $(, $arg:ident)* $(,)?) => {{
        $store.write_one(move |conn| {
            Box::pin(async move {
                Ok($crate::store::on_conn!(conn, |c| sqlx::query($sql)
                    $(.bind(&$arg))*
                    .execute(c)
                    .await
                    .map(|done| done.rows_affected()))?)
            })
        })
    }};
}
use execute;

/// Applies the migrations in `$dir` to `$pool`, recorded in a table of our own: the job
/// queue (apalis) keeps its own in sqlx's default table, and each migrator refuses versions it
/// does not know. See [`run_migrations`] for processes that start at once.
macro_rules! migrate {
    ($dir:literal, $pool:expr) => {{
        let mut migrator = sqlx::migrate!($dir);
        migrator.dangerous_set_table_name("c2dm_migrations");
        $crate::store::run_migrations(&migrator, $pool)
            .await
            .map_err(|e| $crate::store::StoreError(e.into()))
    }};
}

/// How many times a migration that failed to execute is run again: each failure means another
/// process applied one, so this bounds the migrations times the processes racing.
const MIGRATION_TRIES: u32 = 50;

/// Runs `migrator` on `pool`, again if a migration fails to execute: on SQLite, which has no
/// lock for migrations, processes started at once on a fresh file each begin the first
/// migration, and all but the one that commits first fail ("table … already exists", or the
/// migration's record already there); run again, they find it applied. A migration that fails
/// for any other reason fails each time, and so in the end.
pub(crate) async fn run_migrations<'a, A>(
    migrator: &sqlx::migrate::Migrator,
    pool: A,
) -> Result<(), sqlx::migrate::MigrateError>
where
    A: sqlx::Acquire<'a> + Copy,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    let mut tries = 0;
    loop {
        match migrator.run(pool).await {
            Err(
                sqlx::migrate::MigrateError::ExecuteMigration(..)
                | sqlx::migrate::MigrateError::Execute(_),
            ) if tries < MIGRATION_TRIES => tries += 1,
            result => return result,
        }
    }
}
use migrate;

/// A write, given the connection of the transaction it runs in.
type WriteFn<T> = Box<dyn for<'c> FnOnce(Conn<'c>) -> BoxFuture<'c, Result<T, StoreError>> + Send>;

/// The delivery rows a batch holds before it writes them ([`Store::rows_per_write`]).
const ROWS_PER_WRITE: usize = 500;

impl Store {
    /// Opens (creating it if needed) the SQLite database at `url` (`sqlite://c2dm.db`,
    /// `sqlite::memory:`), in WAL mode with foreign keys on, and brings its tables up to date.
    /// Its writes go through a task on the tokio runtime it is opened on: they fail once that
    /// runtime has ended.
    pub async fn open_sqlite(url: &str) -> Result<Self, StoreError> {
        Ok(Self::on(Db::Sqlite(sqlite::Sqlite::open(url).await?)))
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user@host/db`) with at most
    /// `max_connections` connections, and brings its tables up to date. Many processes may
    /// open one database at once: the migrations take a lock.
    pub async fn open_postgres(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let store = Self::on(Db::Postgres(postgres::open(url, max_connections).await?));
        if let Db::Postgres(pool) = &store.db {
            // What other processes finish or cancel, told by the database at once.
            tokio::spawn(postgres::listen_for_news(
                pool.clone(),
                Arc::downgrade(&store.signals),
                store.signals.dropped.subscribe(),
            ));
        }
        Ok(store)
    }

    fn on(db: Db) -> Self {
        let signal = || watch::channel(0).0;
        Self {
            db,
            signals: Arc::new(Signals {
                changes: signal(),
                finishes: signal(),
                cancels: signal(),
                enqueued: signal(),
                dropped: watch::channel(()).0,
            }),
        }
    }

    /// The SQLite pool, if the store is on SQLite: shared with whatever else keeps its tables
    /// in the same file (the job queues).
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.db {
            Db::Sqlite(db) => Some(&db.pool),
            Db::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool, if the store is on PostgreSQL: shared with the job queues.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.db {
            Db::Postgres(pool) => Some(pool),
            Db::Sqlite(_) => None,
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    /// How many rows a batch holds before it writes them (it writes at least every quarter
    /// second too). Each write costs something besides its rows (on PostgreSQL a statement and
    /// its round trip, on SQLite a turn of the store's writer), so fewer, larger writes cost
    /// less; a worker that dies leaves the rows it held unwritten, and their devices are sent
    /// to again (counted as possible duplicates). The value's evidence is in
    /// docs/PERFORMANCE.md's decisions.
    pub fn rows_per_write(&self) -> usize {
        ROWS_PER_WRITE
    }

    /// Changes each time a batch, a walk, a cancel or a push's error is recorded through this
    /// store in this process: what a test watches between its looks at a push.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.signals.changes.subscribe()
    }

    /// Changes each time a push finishes, or a cancel is asked for, through this store in
    /// this process: what a status request waiting for its push watches between its looks
    /// (rather than a look after every batch's write).
    pub fn finishes(&self) -> watch::Receiver<u64> {
        self.signals.finishes.subscribe()
    }

    /// Changes each time a cancel is asked for through this store in this process: what a
    /// batch under way watches, without looking at its push at every write of the others.
    pub fn cancels(&self) -> watch::Receiver<u64> {
        self.signals.cancels.subscribe()
    }

    /// Changes each time this process's store enqueues a job due now (a push made, a page of a
    /// walk): what this process's workers watch, to fetch it at once.
    pub fn enqueued(&self) -> watch::Receiver<u64> {
        self.signals.enqueued.subscribe()
    }

    /// Tells this process's workers that a job due now was enqueued (after its commit).
    fn enqueued_now(&self) {
        self.signals.enqueued.send_modify(|n| *n += 1);
    }

    /// Tells the watchers of [`Store::changes`] of a write recorded, and those of
    /// [`Store::finishes`] too if it `finished` a push (or asked for a cancel).
    fn changed(&self, finished: bool) {
        self.signals.changes.send_modify(|n| *n += 1);
        if finished {
            self.signals.finishes.send_modify(|n| *n += 1);
        }
    }

    /// Runs `write` in one transaction and returns its result once committed; if it fails,
    /// nothing it did is kept. On SQLite the transaction is the writer's, maybe shared with
    /// other writes of this process ([`group`]).
    async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(Conn<'c>) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        self.write_as(Box::new(write), true).await
    }

    /// Runs `write`, one statement, as [`Store::write`] does; on PostgreSQL outside a
    /// transaction block (the statement is a transaction of its own), saving the round trips of
    /// `BEGIN` and `COMMIT`.
    async fn write_one<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(Conn<'c>) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        self.write_as(Box::new(write), false).await
    }

    async fn write_as<T: Send + 'static>(
        &self,
        write: WriteFn<T>,
        transaction: bool,
    ) -> Result<T, StoreError> {
        match &self.db {
            Db::Sqlite(db) => {
                db.writer
                    .write(Box::new(move |c| write(Conn::Sqlite(c))))
                    .await
            }
            Db::Postgres(pool) if transaction => {
                let mut tx = pool.begin().await?;
                let written = write(Conn::Postgres(&mut tx)).await?;
                tx.commit().await?;
                Ok(written)
            }
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                write(Conn::Postgres(&mut conn)).await
            }
        }
    }
}

/// How much of a reservation a budget grants: what is left of `daily` after `used`, at most
/// `wanted`.
fn grant(daily: u64, used: u64, wanted: u64) -> u64 {
    daily.saturating_sub(used).min(wanted)
}
