//! A worker started again whenever it loses its queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Runner;
use crate::health::WorkerHealth;

/// A worker's end: its task's, then its own.
pub(super) fn flatten<E: std::fmt::Display>(
    ended: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), String> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The waits before a worker that lost its queue starts again: the first, doubled after each
/// start that fails again soon, up to the last.
pub(super) const RESTART: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(15));

/// A worker that ran this long before it failed counts as having worked: its next start
/// waits the first wait again.
pub(super) const RESTART_RESET: Duration = Duration::from_secs(60);

/// A worker of `queue`, made by `start` and run until the process stops, started again (a
/// new worker, under a new name) whenever it ends on its own: apalis ends a worker whose
/// queue fails to answer a poll. Meanwhile `health` says so.
pub(super) async fn supervised<F>(
    queue: &'static str,
    runner: &Arc<Runner>,
    health: &WorkerHealth,
    start: F,
) where
    F: Fn(
        &Arc<Runner>,
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), std::io::Error>> + Send>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>,
{
    let mut wait = RESTART.0;
    let mut restarted = false;
    loop {
        let mut stopping = runner.stopping.clone();
        let signal = Box::pin(async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
            Ok::<(), std::io::Error>(())
        });
        let started = Instant::now();
        let mut running = start(runner, signal);
        let ended = if restarted {
            // Healthy again once the new worker has polled for a heartbeat without failing.
            tokio::select! {
                ended = &mut running => ended,
                () = tokio::time::sleep(runner.options.heartbeat) => {
                    tracing::info!(queue, "the worker works again");
                    health.set(queue, None);
                    running.await
                }
            }
        } else {
            running.await
        };
        if runner.is_stopping() {
            return;
        }
        let why = ended.err().unwrap_or_else(|| "it stopped".to_owned());
        if started.elapsed() >= RESTART_RESET {
            wait = RESTART.0;
        }
        tracing::error!(
            queue,
            error = %why,
            retry_in = ?wait,
            "a worker lost its queue: starting it again"
        );
        metrics::counter!("c2dm_worker_restarts_total", "queue" => queue).increment(1);
        health.set(
            queue,
            Some(format!("the {queue} worker lost its queue: {why}")),
        );
        let mut stopping = runner.stopping.clone();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        wait = (wait * 2).min(RESTART.1);
        restarted = true;
    }
}
