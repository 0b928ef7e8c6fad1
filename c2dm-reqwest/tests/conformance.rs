//! ReqwestTransport passes the transport conformance kit, over a reqwest client with rustls.

use std::sync::Arc;

use c2dm_mock::conformance::{self, KitSettings};
use c2dm_reqwest::ReqwestTransport;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn reqwest_transport(settings: &KitSettings) -> ReqwestTransport {
    // The kit's certificate and nothing else as roots; ring as rustls' provider.
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(settings.root_certificate_pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("a root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    // HTTP/2 by ALPN beside HTTP/1.1, as FCM wants: a configuration of one's own offers what
    // it says.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .http2_keep_alive_interval(settings.http2_keep_alive_interval)
        .http2_keep_alive_timeout(settings.http2_keep_alive_timeout)
        .http2_keep_alive_while_idle(true)
        .build()
        .expect("a client");
    ReqwestTransport::new(client).max_response_bytes(settings.max_response_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_transport_passes_the_whole_kit() {
    conformance::run(reqwest_transport).await.assert_passed();
}
