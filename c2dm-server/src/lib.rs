//! The C2DM application server: phones register their registration ids over HTTP, the server
//! keeps them in a database, and sends pushes through durable jobs, with a row for what became
//! of each push on each device.
//!
//! - [`store`]: the [`Store`](store::Store), on a SQLite file (WAL) or a PostgreSQL database
//!   (for many processes), migrated when opened.
//! - [`api`]: the axum [`router`](api::router) with its keys and JSON errors.
//! - [`jobs`]: the push and batch jobs on apalis, and [`run_workers`](jobs::run_workers).
//! - [`health`]: whether this process's workers can work, as `/healthz` tells it.
//! - [`listen`]: the HTTP listener, with bounds on slow, idle and too many connections.
//! - [`telemetry`]: [`MeteredTransport`](telemetry::MeteredTransport), which times a sender's
//!   exchanges for the server's metrics.
//! - [`serve`]: one process, the API, the workers or both, until told to stop (`c2dm serve`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use c2dm_server::api::{Key, Keys, router};
//! use c2dm_server::jobs::{Queues, WorkerOptions};
//! use c2dm_server::store::Store;
//!
//! let store = Store::open_sqlite("sqlite::memory:").await?;
//! // The queues' tables, in the same database: the API enqueues into them.
//! let queues = Queues::open_beside(&store, &WorkerOptions::default()).await?;
//! let keys = Keys::new(Key::new("admin-token-0123456789")?, Key::new("device-key-0123456789")?)?;
//! let app = router(store, keys);
//! // jobs::run_workers(store, sender, queues, WorkerOptions::default(), shutdown) sends.
//! # let _ = queues;
//! // axum::serve(listener, app).await?;
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! [`serve::open_database`] opens either database, with its queues, by its URL. The repository's
//! `docs/SERVER.md` has the API with examples, the life of one push, and what many processes on
//! one PostgreSQL database share and guarantee.

pub mod api;
pub mod console;
pub mod health;
pub mod jobs;
pub mod listen;
pub mod queue;
pub mod serve;
pub mod store;
pub mod telemetry;
