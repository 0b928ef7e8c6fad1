//! Group commit for a SQLite file: this process's writes share transactions, and so the
//! disk's wait at each commit.
//!
//! A commit in WAL mode with `synchronous = FULL` (sqlx's default, kept so that a power cut
//! loses nothing a caller was told is written) waits for the disk. One transaction per write,
//! one at a time, would cap the process at one write per disk wait however small the writes
//! are, and a batch of a push makes a few dozen (docs/PERFORMANCE.md, "Decisions").
//! Here every write goes to one task. It takes all the writes waiting, runs them in one
//! `BEGIN IMMEDIATE` transaction, each after the first in a savepoint, and commits them
//! together. Each write is still all or nothing (a write that fails is rolled back to its
//! savepoint, alone; a first write that fails, with the transaction it began), and its
//! caller hears it succeeded only once the transaction holding it is committed. The writes of
//! other processes on the same file, and the job queue's (which go through the pool), wait for
//! SQLite's lock, trying again every quarter millisecond; when one waits, the writer lets a
//! moment pass before its next transaction ([`super::busy`]). The writer keeps one of the
//! pool's connections while its transactions go well, so that the pages it reads stay in that
//! connection's cache from one transaction to the next.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// The most writes one transaction takes: enough to share a commit among every batch in
/// hand, few enough that a transaction stays short.
const GROUP: usize = 64;

/// How recent a wait of another connection for the lock must be for the writer to let a
/// moment pass before its next transaction, and how long that moment is.
const YIELD: Duration = Duration::from_millis(1);

/// One write, given the connection of the transaction it runs in.
pub(super) type Write<T> = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>> + Send,
>;

/// The writer of one SQLite file in this process: see the module's documentation.
#[derive(Clone)]
pub(super) struct Writer {
    queue: mpsc::UnboundedSender<Box<dyn Queued>>,
    /// Transactions begun so far.
    transactions: Arc<AtomicU64>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("transactions", &self.transactions.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the writing task, on the current tokio runtime. It ends when the last clone of
    /// this writer is dropped.
    pub(super) fn start(pool: SqlitePool) -> Self {
        let (queue, writes) = mpsc::unbounded_channel();
        let transactions = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_groups(pool, writes, Arc::clone(&transactions)));
        Self {
            queue,
            transactions,
        }
    }

    /// How many transactions this writer has begun.
    #[cfg(test)]
    fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Runs `write` in a transaction, maybe with others, and returns its result once the
    /// transaction is committed; if `write` fails, nothing it did is kept. A write under way
    /// goes on to its end even if its caller stops waiting.
    pub(super) async fn write<T: Send + 'static>(&self, write: Write<T>) -> Result<T, StoreError> {
        self.submit(write)?.await.map_err(|_| stopped())?
    }

    /// Queues `write` now; its result comes on the channel returned.
    fn submit<T: Send + 'static>(
        &self,
        write: Write<T>,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let entry = Box::new(Entry {
            write: Some(write),
            result: None,
            reply,
        });
        self.queue.send(entry).map_err(|_| stopped())?;
        Ok(answer)
    }
}

/// A write that could not be run: its cause, for the log.
fn failure(cause: &str) -> StoreError {
    StoreError(sqlx::Error::Io(std::io::Error::other(cause.to_owned())))
}

fn stopped() -> StoreError {
    failure("the store's writer has stopped (the runtime it was opened on ended)")
}

/// A write waiting in the queue, its result type hidden.
trait Queued: Send {
    /// Runs the write; `true` if it succeeded (its result is kept for [`Queued::settle`]).
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// Tells the caller: the write's own failure, or (it succeeded) its result if its
    /// transaction committed, the transaction's failure if not.
    fn settle(self: Box<Self>, committed: Result<(), &sqlx::Error>);
}

/// A write of result type `T`, and where its caller waits.
struct Entry<T> {
    write: Option<Write<T>>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> Queued for Entry<T> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let Some(write) = self.write.take() else {
                return false;
            };
            // A write that panics fails alone; the task goes on with the others.
            let result = AssertUnwindSafe(write(conn))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(failure("the write panicked: it was rolled back")));
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn settle(self: Box<Self>, committed: Result<(), &sqlx::Error>) {
        let result = match (self.result, committed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)) | None, Err(e)) => Err(shared_failure(e)),
            (None, Ok(())) => Err(stopped()),
        };
        // The caller may have stopped waiting: the write stands, unheard.
        let _ = self.reply.send(result);
    }
}

/// What each write of a transaction that could not begin or commit is told.
fn shared_failure(e: &sqlx::Error) -> StoreError {
    failure(&format!("the transaction holding this write failed: {e}"))
}

/// The writing task: a transaction for each group of writes waiting, until every sender is
/// gone.
async fn write_groups(
    pool: SqlitePool,
    mut writes: mpsc::UnboundedReceiver<Box<dyn Queued>>,
    transactions: Arc<AtomicU64>,
) {
    let mut group = Vec::with_capacity(GROUP);
    // One connection of the pool kept for the writes while they go well: a connection's
    // page cache stays good across its own transactions, and the pool's are dropped whenever
    // another connection has written. Not with a pool of one (an in-memory database), whose
    // only connection the reads need too.
    let hold = pool.options().get_max_connections() > 1;
    let mut held: Option<PoolConnection<Sqlite>> = None;
    while writes.recv_many(&mut group, GROUP).await > 0 {
        if super::busy::someone_waited_within(YIELD) {
            // Another connection (the job queue's) waits for the lock, trying again every
            // quarter millisecond: a moment between two transactions lets it in. The writes
            // that come meanwhile join this group.
            tokio::time::sleep(YIELD).await;
            while group.len() < GROUP {
                match writes.try_recv() {
                    Ok(write) => group.push(write),
                    Err(_) => break,
                }
            }
        }
        if hold && held.is_none() {
            held = pool.acquire().await.ok();
        }
        let committed = match held.as_mut() {
            Some(conn) => commit(conn, &mut group, &transactions).await,
            None => match pool.acquire().await {
                Ok(mut conn) => commit(&mut conn, &mut group, &transactions).await,
                Err(e) => Err(e),
            },
        };
        if committed.is_err() {
            // Whatever went wrong, the next transaction takes a connection afresh.
            held = None;
        }
        metrics::counter!("c2dm_sqlite_writes_total").increment(group.len() as u64);
        if let Err(e) = &committed {
            tracing::warn!(error = %e, writes = group.len(), "a transaction of writes failed");
        }
        for write in group.drain(..) {
            write.settle(committed.as_ref().map(|_| ()));
        }
    }
}

/// Runs `group` in one transaction on `conn` and commits: the first write in the transaction
/// itself, each other in a savepoint of its own.
///
/// Each statement is a round trip to the connection's thread, which wakes it and then the
/// task, and these round trips, not SQLite's work, were most of what a savepoint cost: so the
/// first write has none (if it fails, the transaction holds nothing else, and is rolled back
/// whole), one savepoint is released and the next taken in one round trip, and the last is
/// left for the commit, which releases it.
async fn commit(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn Queued>],
    transactions: &AtomicU64,
) -> Result<(), sqlx::Error> {
    let mut rest = group;
    while let Some((first, others)) = rest.split_first_mut() {
        transactions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("c2dm_sqlite_transactions_total").increment(1);
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        if !first.run(&mut tx).await {
            tx.rollback().await?;
            rest = others;
            continue;
        }
        for (at, write) in others.iter_mut().enumerate() {
            let savepoint = if at == 0 {
                "SAVEPOINT write"
            } else {
                "RELEASE write; SAVEPOINT write"
            };
            sqlx::raw_sql(savepoint).execute(&mut *tx).await?;
            if !write.run(&mut tx).await {
                sqlx::raw_sql("ROLLBACK TO write").execute(&mut *tx).await?;
            }
        }
        return tx.commit().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    use super::*;

    async fn pool() -> SqlitePool {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").unwrap();
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    /// A write that inserts `k`, then fails if `fail`.
    fn insert(k: &'static str, fail: bool) -> Write<&'static str> {
        Box::new(move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO t (k) VALUES (?)")
                    .bind(k)
                    .execute(&mut *conn)
                    .await?;
                if fail {
                    return Err(StoreError(sqlx::Error::RowNotFound));
                }
                Ok(k)
            })
        })
    }

    async fn keys(pool: &SqlitePool) -> Vec<String> {
        sqlx::query_scalar("SELECT k FROM t ORDER BY k")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// Submits a write that takes the transaction, tells when it has it, and holds it until
    /// told to go on.
    async fn hold(
        writer: &Writer,
    ) -> (
        oneshot::Sender<()>,
        oneshot::Receiver<Result<(), StoreError>>,
    ) {
        let (started, has) = oneshot::channel::<()>();
        let (go, wait) = oneshot::channel::<()>();
        let held = writer
            .submit::<()>(Box::new(move |conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO t (k) VALUES ('a')")
                        .execute(&mut *conn)
                        .await?;
                    let _ = started.send(());
                    let _ = wait.await;
                    Ok(())
                })
            }))
            .unwrap();
        has.await.unwrap();
        (go, held)
    }

    #[tokio::test]
    async fn the_writes_waiting_share_one_transaction_and_a_failed_one_is_undone_alone() {
        let pool = pool().await;
        let writer = Writer::start(pool.clone());
        let (go, held) = hold(&writer).await;
        let b = writer.submit(insert("b", false)).unwrap();
        let c = writer.submit(insert("c", true)).unwrap();
        let d = writer.submit(insert("d", false)).unwrap();
        let e = writer.submit(insert("b", false)).unwrap();
        go.send(()).unwrap();
        held.await.unwrap().unwrap();
        assert_eq!(b.await.unwrap().unwrap(), "b");
        // Its own failure, and its row gone with it; the others stand.
        assert!(matches!(
            c.await.unwrap(),
            Err(StoreError(sqlx::Error::RowNotFound))
        ));
        assert_eq!(d.await.unwrap().unwrap(), "d");
        // A statement that fails (the key is taken) fails its write only.
        assert!(e.await.unwrap().is_err());
        assert_eq!(keys(&pool).await, ["a", "b", "d"]);
        // The held write's transaction, and one for the four that waited behind it.
        assert_eq!(writer.transactions(), 2);
    }

    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_the_writer_goes_on() {
        let pool = pool().await;
        let writer = Writer::start(pool.clone());
        let (go, held) = hold(&writer).await;
        let panics = writer
            .submit::<()>(Box::new(|_| Box::pin(async { panic!("a bug") })))
            .unwrap();
        let z = writer.submit(insert("z", false)).unwrap();
        go.send(()).unwrap();
        held.await.unwrap().unwrap();
        assert!(panics.await.unwrap().is_err());
        assert_eq!(z.await.unwrap().unwrap(), "z");
        assert_eq!(keys(&pool).await, ["a", "z"]);
        // The held write's; the one the panicking write began, first of its group (rolled
        // back whole); and the one `z` went on in.
        assert_eq!(writer.transactions(), 3);
    }

    #[tokio::test]
    async fn a_write_goes_on_when_its_caller_stops_waiting() {
        let pool = pool().await;
        let writer = Writer::start(pool.clone());
        drop(writer.submit(insert("w", false)).unwrap());
        // The next write is committed after it, in order.
        writer.write(insert("x", false)).await.unwrap();
        assert_eq!(keys(&pool).await, ["w", "x"]);
    }

    #[tokio::test]
    async fn a_file_s_writes_keep_to_one_connection_and_a_pool_of_one_is_left_free() {
        // A temporary table is its connection's own: a later transaction sees it only on the
        // same connection.
        let make = || -> Write<()> {
            Box::new(|conn| {
                Box::pin(async move {
                    sqlx::query("CREATE TEMP TABLE mine (x)")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
        };
        let count = || -> Write<i64> {
            Box::new(|conn| {
                Box::pin(async move {
                    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM temp.mine")
                        .fetch_one(&mut *conn)
                        .await?)
                })
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::from_str(&format!(
            "sqlite://{}",
            dir.path().join("w.db").display()
        ))
        .unwrap()
        .create_if_missing(true);
        let file = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        let writer = Writer::start(file.clone());
        writer.write(make()).await.unwrap();
        // Other users of the pool take three connections meanwhile: one given back would be
        // among them.
        let mut readers = Vec::new();
        for _ in 0..3 {
            readers.push(file.acquire().await.unwrap());
        }
        assert_eq!(writer.write(count()).await.unwrap(), 0);
        drop(readers);
        assert_eq!(writer.write(count()).await.unwrap(), 0);

        // With a pool of one, the writer gives its connection back after each transaction.
        let pool = pool().await;
        let writer = Writer::start(pool.clone());
        writer.write(insert("a", false)).await.unwrap();
        assert_eq!(keys(&pool).await, ["a"]);
    }
}
