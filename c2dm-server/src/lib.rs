//! The C2DM application server: phones register their registration ids over HTTP, the server
//! keeps them in a database, and sends pushes through durable jobs, with a row for what became
//! of each push on each device.
//!
//! - [`store`]: the [`Store`](store::Store) trait and [`SqliteStore`](store::SqliteStore) (one
//!   file, WAL, migrated when opened).
//! - [`api`]: the axum [`router`](api::router) with its keys and JSON errors.
//! - [`jobs`]: the push and batch jobs on apalis, and [`run_workers`](jobs::run_workers).
//! - [`serve`]: one process, the API, the workers or both, until told to stop (`c2dm serve`).
//! - [`throwaway`]: a PostgreSQL cluster of its own for tests and benchmarks.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use c2dm_server::api::{Key, Keys, router};
//! use c2dm_server::jobs::Queues;
//! use c2dm_server::store::SqliteStore;
//!
//! let store = SqliteStore::open("sqlite::memory:").await?;
//! let queues = Queues::open(store.pool()).await?;
//! let keys = Keys { admin: Key::new("admin-secret")?, device: Key::new("device-secret")? };
//! let app = router(Arc::new(store), queues, keys);
//! // axum::serve(listener, app).await?;
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! PostgreSQL, the shared pause and budget and metrics build on this;
//! see the repository's `docs/SERVER.md` for what exists so far.

pub mod api;
pub mod jobs;
pub mod serve;
pub mod store;
pub mod throwaway;
