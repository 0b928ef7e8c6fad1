//! What the sender and the broadcast cost on their own: a broadcast over a transport that
//! answers at once, in memory. Prints the CPU time per message.
//!
//! `cargo run --release -p c2dm-core --example overhead [-- MESSAGES]`

use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_core::{
    AuthToken, BroadcastOptions, Message, RegistrationId, Sender, StaticToken, Transport,
    TransportError,
};
use futures::StreamExt;

/// Accepts everything at once.
struct Instant200;

#[async_trait]
impl Transport for Instant200 {
    async fn execute(
        &self,
        _request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        Ok(http::Response::new(Bytes::from_static(b"id=0:1%abc")))
    }
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cpu = cpu_seconds();
    let start = Instant::now();
    let accepted = runtime.block_on(async move {
        tokio::spawn(async move {
            let sender = Sender::new(Instant200, StaticToken::new(AuthToken::new("t").unwrap()));
            let template = Message::builder("x")
                .collapse_key("k")
                .data("message", "test")
                .build()
                .unwrap();
            let ids = futures::stream::iter(0..n)
                .map(|i| RegistrationId::new(format!("device-{i}")).unwrap());
            let mut deliveries = sender
                .broadcast_to(ids, &template, BroadcastOptions::default())
                .unwrap();
            let mut accepted = 0;
            while let Some(d) = deliveries.next().await {
                accepted += usize::from(d.is_accepted());
            }
            accepted
        })
        .await
        .unwrap()
    });
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(accepted, n);
    println!(
        "{n} messages in {elapsed:.2} s: {:.0}/s, {:.2} us CPU per message",
        n as f64 / elapsed,
        (cpu_seconds() - cpu) * 1e6 / n as f64
    );
}
