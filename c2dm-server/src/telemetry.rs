//! The Prometheus families the server exports, in one place: each described (its `# HELP`
//! line), each known label value at 0 from the start (so that a rate of failures has a series
//! to evaluate before the first failure), the histograms' buckets, the build's information,
//! and the process's own figures (CPU, memory, file descriptors), read at each scrape.
//!
//! [`MeteredTransport`] is public: it times each exchange of a sender's transport with its
//! provider, for `c2dm_send_duration_seconds`.

use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_core::{Transport, TransportError};
use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::queue::{BATCH_QUEUE, PUSH_QUEUE};

/// Seconds from a push's creation to its end (done or cancelled).
pub(crate) const PUSH_DURATION: &str = "c2dm_push_duration_seconds";

/// Seconds of one exchange with a provider, by provider.
pub(crate) const SEND_DURATION: &str = "c2dm_send_duration_seconds";

/// The send duration's buckets: a provider answers in some milliseconds, a slow one in
/// seconds, a transport gives up at its timeout.
const SEND_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The providers a send duration is kept for from the start.
const PROVIDERS: [&str; 2] = ["c2dm", "fcm"];

/// The push duration's buckets: a push to one device takes well under a second, one to a
/// million some minutes.
const PUSH_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The outcomes a delivery row can have.
const OUTCOMES: [&str; 4] = ["accepted", "rejected", "failed", "not_attempted"];

/// The error codes a rejected delivery is counted by from the start: C2DM's and FCM's that
/// remove a device or refuse a message. Others appear when first met.
const REJECTION_CODES: [&str; 8] = [
    "NotRegistered",
    "InvalidRegistration",
    "MismatchSenderId",
    "MessageTooBig",
    "MissingCollapseKey",
    "UNREGISTERED",
    "INVALID_ARGUMENT",
    "SENDER_ID_MISMATCH",
];

/// A builder for the recorder, with the histograms' buckets.
pub(crate) fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PUSH_DURATION.to_owned()), PUSH_BUCKETS)
        .expect("the buckets are not empty")
        .set_buckets_for_metric(Matcher::Full(SEND_DURATION.to_owned()), SEND_BUCKETS)
        .expect("the buckets are not empty")
}

/// Describes every family and starts each known series at 0; with the recorder installed.
pub(crate) fn describe() {
    let counters = [
        (
            "c2dm_registrations_total",
            "Device registrations by result (created, updated).",
        ),
        ("c2dm_pushes_total", "Pushes made through the API."),
        ("c2dm_batches_total", "Batch runs started."),
        (
            "c2dm_deliveries_total",
            "Delivery rows written, by outcome.",
        ),
        (
            "c2dm_rejections_total",
            "Rejected deliveries, by the provider's error code.",
        ),
        (
            "c2dm_devices_gone_total",
            "Devices marked gone or unregistered by a provider's answer.",
        ),
        (
            "c2dm_pauses_total",
            "Pauses of every send of an account taken by this process.",
        ),
        (
            "c2dm_budget_deferred_total",
            "Devices left for the next budget period, unsent.",
        ),
        (
            "c2dm_logins_total",
            "ClientLogin logins of this process's C2DM sender.",
        ),
        (
            "c2dm_store_errors_total",
            "Store errors met by a job, by step (retried in place).",
        ),
        (
            "c2dm_worker_restarts_total",
            "Workers started again after losing their queue.",
        ),
        (
            "c2dm_http_connections_refused_total",
            "Connections closed for want of a free slot.",
        ),
        (
            "c2dm_sqlite_transactions_total",
            "SQLite write transactions (group commits).",
        ),
        (
            "c2dm_sqlite_writes_total",
            "Writes committed in SQLite's group transactions.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
    }
    describe_gauge!(
        "c2dm_paused",
        "1 while the account's pause of every send is in force."
    );
    describe_gauge!("c2dm_queue_depth", "Jobs waiting or running, by queue.");
    describe_gauge!(
        "c2dm_budget_remaining",
        "Messages left of a provider account's budget for the period, as of this process's last reservation."
    );
    describe_gauge!(
        "c2dm_queue_oldest_seconds",
        "Age of the oldest job due and not yet taken, by queue (0 when none waits)."
    );
    describe_gauge!(
        "c2dm_build_info",
        "Always 1; the labels say which build of c2dm-server runs."
    );
    describe_histogram!(
        PUSH_DURATION,
        metrics::Unit::Seconds,
        "Seconds from a push's creation to its end (done or cancelled)."
    );
    describe_histogram!(
        SEND_DURATION,
        metrics::Unit::Seconds,
        "Seconds of one exchange with a provider, request to whole answer, each attempt apart (including those that failed)."
    );
    for (name, _) in counters {
        if !matches!(
            name,
            "c2dm_registrations_total"
                | "c2dm_deliveries_total"
                | "c2dm_rejections_total"
                | "c2dm_store_errors_total"
                | "c2dm_worker_restarts_total"
        ) {
            metrics::counter!(name).increment(0);
        }
    }
    for result in ["created", "updated"] {
        metrics::counter!("c2dm_registrations_total", "result" => result).increment(0);
    }
    for outcome in OUTCOMES {
        metrics::counter!("c2dm_deliveries_total", "outcome" => outcome).increment(0);
    }
    for code in REJECTION_CODES {
        metrics::counter!("c2dm_rejections_total", "code" => code).increment(0);
    }
    for step in ["walk", "batch", "mark"] {
        metrics::counter!("c2dm_store_errors_total", "step" => step).increment(0);
    }
    for queue in [PUSH_QUEUE, BATCH_QUEUE] {
        metrics::counter!("c2dm_worker_restarts_total", "queue" => queue).increment(0);
        metrics::gauge!("c2dm_queue_depth", "queue" => queue).set(0.0);
        metrics::gauge!("c2dm_queue_oldest_seconds", "queue" => queue).set(0.0);
    }
    for provider in PROVIDERS {
        // A histogram's series exist once registered, with every bucket at 0.
        drop(metrics::histogram!(SEND_DURATION, "provider" => provider));
    }
    metrics::gauge!("c2dm_paused").set(0.0);
    metrics::gauge!("c2dm_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    process().describe();
}

/// The collector of the process's own figures (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, …).
pub(crate) fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// A transport that records how long each exchange takes, in `c2dm_send_duration_seconds`
/// with the label `provider` (`c2dm` or `fcm`), and otherwise passes everything through.
///
/// `c2dm serve` wraps its senders' transports (not their token endpoints') in it. Where no
/// metrics recorder is installed it only passes requests on.
///
/// ```
/// use bytes::Bytes;
/// use c2dm_core::{AuthToken, Sender, StaticToken};
/// use c2dm_server::telemetry::MeteredTransport;
///
/// let accept = |_request: http::Request<Bytes>| async {
///     Ok(http::Response::new(Bytes::from_static(b"id=0:1")))
/// };
/// let token = StaticToken::new(AuthToken::new("token").unwrap());
/// let sender = Sender::new(MeteredTransport::new(accept, "c2dm"), token);
/// # let _ = sender;
/// ```
#[derive(Debug, Clone)]
pub struct MeteredTransport<T> {
    inner: T,
    provider: &'static str,
}

impl<T> MeteredTransport<T> {
    /// Times `inner`'s exchanges under the label `provider`.
    pub fn new(inner: T, provider: &'static str) -> Self {
        Self { inner, provider }
    }
}

#[async_trait]
impl<T: Transport> Transport for MeteredTransport<T> {
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        let started = Instant::now();
        let answer = self.inner.execute(request).await;
        metrics::histogram!(SEND_DURATION, "provider" => self.provider)
            .record(started.elapsed().as_secs_f64());
        answer
    }
}
