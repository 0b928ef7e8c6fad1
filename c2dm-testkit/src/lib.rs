//! What the project's tests and benchmarks share, kept out of the published crates: a
//! throwaway PostgreSQL cluster ([`PostgresCluster`]) that the server's and the CLI's tests
//! and `cargo xtask`'s benchmarks and soaks start, each database of it fresh.
//!
//! It builds no product crate (no axum, no sqlx): `cargo xtask` depends on it, not on them.

mod postgres;

pub use postgres::{ClusterError, PostgresCluster};
