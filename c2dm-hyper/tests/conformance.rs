//! HyperTransport passes the transport conformance kit, and the kit catches a transport that
//! lies about what it sent, one that cannot speak HTTP/2, and one that never pings its HTTP/2
//! connections.

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_core::{RequestSent, Transport, TransportError};
use c2dm_hyper::HyperTransport;
use c2dm_mock::conformance::{self, KitSettings};

/// The transport as the kit asks: HTTP/2 offered by ALPN beside HTTP/1.1, with its pings.
fn hyper_transport(settings: &KitSettings) -> HyperTransport {
    hyper_transport_with(settings, |builder| builder)
}

/// [`hyper_transport`], its builder changed by `change` first.
fn hyper_transport_with(
    settings: &KitSettings,
    change: impl FnOnce(c2dm_hyper::HyperTransportBuilder) -> c2dm_hyper::HyperTransportBuilder,
) -> HyperTransport {
    change(builder(settings))
        .http2(true)
        .http2_keep_alive(Some((
            settings.http2_keep_alive_interval,
            settings.http2_keep_alive_timeout,
        )))
        .build()
        .expect("a transport")
}

fn builder(settings: &KitSettings) -> c2dm_hyper::HyperTransportBuilder {
    HyperTransport::builder()
        .only_added_roots()
        .add_root_certificates_pem(settings.root_certificate_pem.as_bytes())
        .expect("the kit's certificate")
        .request_timeout(settings.request_timeout)
        .connect_timeout(settings.connect_timeout)
        .max_response_bytes(settings.max_response_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_without_http2_or_without_its_pings_fails_those_cases_by_name() {
    let http1 = conformance::run(|settings: &KitSettings| builder(settings).build().unwrap()).await;
    let failed: Vec<&str> = http1.failures().map(|c| c.name).collect();
    assert_eq!(
        failed,
        [
            "http2_streams_share_a_connection",
            "http2_silent_connection_replaced"
        ],
        "{http1}"
    );
    let no_pings = conformance::run(|settings: &KitSettings| {
        builder(settings)
            .http2(true)
            .http2_keep_alive(None)
            .build()
            .unwrap()
    })
    .await;
    let failed: Vec<&str> = no_pings.failures().map(|c| c.name).collect();
    assert_eq!(failed, ["http2_silent_connection_replaced"], "{no_pings}");
    let why = no_pings.cases.last().unwrap().result.clone().unwrap_err();
    assert!(why.contains("kept the dead connection"), "{why}");
}

/// A transport that keeps no connection alive fails the reuse case, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_without_keep_alive_fails_the_reuse_case_by_name() {
    let report = conformance::run(|settings: &KitSettings| {
        hyper_transport_with(settings, |b| b.pool_max_idle_per_host(0))
    })
    .await;
    let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
    assert_eq!(failed, ["keep_alive_reuse"], "{report}");
    let why = report
        .failures()
        .next()
        .unwrap()
        .result
        .clone()
        .unwrap_err();
    assert!(why.contains("opened 10 connections"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_transport_passes_the_whole_kit() {
    let report = conformance::run(hyper_transport).await;
    report.assert_passed();
    assert_eq!(report.cases.len(), conformance::CASES.len());
}

/// A transport that says "not sent" whatever happened: the sender would resend messages that
/// may have been delivered, without counting the duplicates.
struct SaysNotSent(HyperTransport);

#[async_trait]
impl Transport for SaysNotSent {
    async fn execute(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        self.0
            .execute(request)
            .await
            .map_err(|e| TransportError::new(e.kind(), RequestSent::No).with_source(e))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_that_says_not_sent_after_writing_fails_the_kit_by_name() {
    let report =
        conformance::run(|settings: &KitSettings| SaysNotSent(hyper_transport(settings))).await;
    assert!(!report.passed());
    let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
    assert_eq!(
        failed,
        [
            "reset_after_request_written",
            "server_never_answers",
            "answer_over_size_cap"
        ],
        "{report}"
    );
    let why = report
        .case("server_never_answers")
        .and_then(|c| c.result.clone().err())
        .unwrap();
    assert!(why.contains("expected Maybe"), "{why}");
    // And the panic names them.
    let panic = std::panic::catch_unwind(|| report.assert_passed()).unwrap_err();
    let text = panic.downcast_ref::<String>().unwrap();
    assert!(
        text.contains("FAILED reset_after_request_written"),
        "{text}"
    );
}
