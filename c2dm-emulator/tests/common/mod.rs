//! What the emulator's integration tests share: a client stack that trusts only the emulator.
#![allow(dead_code)] // each test file uses its own part

use std::sync::Arc;

use c2dm_auth::{ClientLogin, Credentials};
use c2dm_core::{RetryPolicy, Sender};
use c2dm_emulator::{DEFAULT_EMAIL, DEFAULT_PASSWORD, Emulator};
use c2dm_hyper::HyperTransport;

/// The production transport, trusting only the emulator's certificate when it serves TLS.
pub fn transport(emulator: &Emulator) -> HyperTransport {
    transport_with(emulator, |b| b)
}

/// [`transport`], with more settings.
pub fn transport_with(
    emulator: &Emulator,
    settings: impl FnOnce(c2dm_hyper::HyperTransportBuilder) -> c2dm_hyper::HyperTransportBuilder,
) -> HyperTransport {
    let mut builder = settings(HyperTransport::builder());
    if let Some(pem) = emulator.cert_pem() {
        builder = builder
            .only_added_roots()
            .add_root_certificates_pem(pem.as_bytes())
            .unwrap();
    }
    builder.build().unwrap()
}

/// A sender that logs in to the emulator with the default account, and its login.
pub fn sender(emulator: &Emulator, policy: RetryPolicy) -> (Sender, Arc<ClientLogin>) {
    let transport = transport(emulator);
    let login = Arc::new(
        ClientLogin::builder(
            Credentials::new(DEFAULT_EMAIL, DEFAULT_PASSWORD, "c2dm-rs-tests"),
            transport.clone(),
        )
        .endpoint(emulator.login_url().parse().unwrap())
        .build(),
    );
    let sender = Sender::builder(transport, Arc::clone(&login))
        .endpoint(emulator.send_url().parse().unwrap())
        .retry_policy(policy)
        .jitter_seed(5)
        .build();
    (sender, login)
}
