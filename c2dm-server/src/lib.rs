//! The C2DM application server's device registry: phones register their registration ids over
//! HTTP, the server keeps them in a database, and operators list them.
//!
//! - [`store`]: the [`Store`](store::Store) trait and [`SqliteStore`](store::SqliteStore) (one
//!   file, WAL, migrated when opened).
//! - [`api`]: the axum [`router`](api::router) with its keys and JSON errors.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use c2dm_server::api::{Key, Keys, router};
//! use c2dm_server::store::SqliteStore;
//!
//! let store = SqliteStore::open("sqlite::memory:").await?;
//! let keys = Keys { admin: Key::new("admin-secret")?, device: Key::new("device-secret")? };
//! let app = router(Arc::new(store), keys);
//! // axum::serve(listener, app).await?;
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! Pushes (messages, durable jobs, delivery rows), PostgreSQL and the `c2dm serve` command
//! build on this; see the repository's `docs/SERVER.md` for what exists so far.

pub mod api;
pub mod store;
