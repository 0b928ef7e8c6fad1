//! A local stand-in for Google's C2DM send service and ClientLogin, which are shut down.
//!
//! It speaks the protocol of the repository's `docs/PROTOCOL.md` exactly: a client that works against it works
//! against the real protocol. Start it in-process from a test, or run the `c2dm-emulator` binary
//! (or `c2dm emulator`).
//!
//! - `POST /accounts/ClientLogin` and `POST /c2dm/send`, every answer of the protocol: accounts
//!   (one can demand a CAPTCHA), a token per login, 401 for unknown or expired tokens, all eight
//!   error codes, the payload limit, the required collapse key, `delay_while_idle`.
//! - Devices: any registration id is valid unless a rule (set or prefix) says it is not
//!   registered, invalid, another sender's, or over its quota.
//! - Quotas per sender and per device, token rotation and expiry, seeded faults (503 with
//!   `Retry-After`, 500, dropped connections, latency).
//! - A delivery record per device, in-process ([`Emulator::inbox`]) and as JSON at
//!   `GET /_emulator/stats`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use c2dm_emulator::{Config, Emulator};
//!
//! let emulator = Emulator::start(Config::default()).await?;
//! println!("send to {}", emulator.send_url());
//! assert_eq!(emulator.stats().sends, 0);
//! emulator.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod arrivals;
#[cfg(feature = "cli")]
pub mod cli;
mod config;
mod inbox;
mod server;
mod service;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use arrivals::{Arrival, ArrivalAnswer};
pub use config::{
    Account, Config, DEFAULT_EMAIL, DEFAULT_PASSWORD, DeviceRules, FaultRate, InboxMode, Quota,
};
pub use inbox::InboxMessage;
pub use service::{FcmStats, Stats};

/// FCM HTTP v1 as the emulator speaks it: its service account, whose key file
/// [`Emulator::fcm_key_file`] writes, and its project.
pub mod fcm {
    pub use crate::service::fcm::{CLIENT_EMAIL, KEY_ID, PROJECT_ID, TOKEN_PATH, key_file};
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate could not be made.
    #[error("could not make a TLS certificate: {0}")]
    Certificate(String),
}

/// Where and how the emulator listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The address (default `127.0.0.1:0`, a free port).
    pub addr: SocketAddr,
    /// Serve HTTPS with a certificate made at start (default: plain HTTP).
    pub tls: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
        }
    }
}

/// A running emulator. Dropping it stops accepting connections; [`Emulator::shutdown`] also
/// waits for open exchanges to finish.
pub struct Emulator {
    service: Arc<service::Service>,
    addr: SocketAddr,
    cert_pem: Option<String>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("tls", &self.cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Starts a plain-HTTP emulator on a free loopback port.
    pub async fn start(config: Config) -> Result<Emulator, StartError> {
        Self::start_on(config, Listen::default()).await
    }

    /// Starts an HTTPS emulator on a free loopback port, with a certificate made now; trust
    /// [`Emulator::cert_pem`] to talk to it.
    pub async fn start_tls(config: Config) -> Result<Emulator, StartError> {
        Self::start_on(
            config,
            Listen {
                tls: true,
                ..Listen::default()
            },
        )
        .await
    }

    /// Starts an emulator as `listen` says.
    pub async fn start_on(config: Config, listen: Listen) -> Result<Emulator, StartError> {
        let listener = TcpListener::bind(listen.addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: listen.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: listen.addr,
            source,
        })?;
        let (acceptor, cert_pem) = if listen.tls {
            let cert = server::generate_cert()?;
            (Some(cert.acceptor), Some(cert.pem))
        } else {
            (None, None)
        };
        let service = Arc::new(service::Service::new(config));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server::serve(
            listener,
            acceptor,
            Arc::clone(&service),
            stopped,
        ));
        tracing::info!(%addr, tls = listen.tls, "C2DM emulator listening");
        Ok(Emulator {
            service,
            addr,
            cert_pem,
            stop,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        server::local_url(self.addr, self.cert_pem.is_some())
    }

    /// The send endpoint: `<base>/c2dm/send`.
    pub fn send_url(&self) -> String {
        format!("{}/c2dm/send", self.base_url())
    }

    /// The ClientLogin endpoint: `<base>/accounts/ClientLogin`.
    pub fn login_url(&self) -> String {
        format!("{}/accounts/ClientLogin", self.base_url())
    }

    /// FCM's token endpoint: `<base>/token`.
    pub fn fcm_token_url(&self) -> String {
        format!("{}{}", self.base_url(), fcm::TOKEN_PATH)
    }

    /// FCM's send endpoint for the emulator's project:
    /// `<base>/v1/projects/c2dm-emulator/messages:send`.
    pub fn fcm_send_url(&self) -> String {
        format!(
            "{}/v1/projects/{}/messages:send",
            self.base_url(),
            fcm::PROJECT_ID
        )
    }

    /// The service account key file of the emulator's FCM project, its `token_uri` this
    /// emulator's token endpoint: what `c2dm_fcm::ServiceAccountKey::from_json` and Google's
    /// own client libraries read. The key is the emulator's alone: nothing else takes it.
    pub fn fcm_key_file(&self) -> String {
        fcm::key_file(&self.fcm_token_url())
    }

    /// The statistics endpoint: `<base>/_emulator/stats`.
    pub fn stats_url(&self) -> String {
        format!("{}/_emulator/stats", self.base_url())
    }

    /// The PEM of the certificate made at start (TLS only).
    pub fn cert_pem(&self) -> Option<&str> {
        self.cert_pem.as_deref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        self.service.config()
    }

    /// The accounts that may log in.
    pub fn accounts(&self) -> &[Account] {
        self.service.accounts()
    }

    /// Everything seen so far, with the whole inbox.
    pub fn stats(&self) -> Stats {
        self.service.stats(true, false)
    }

    /// Everything seen so far, without the inbox (cheap).
    pub fn counters(&self) -> Stats {
        self.service.stats(false, false)
    }

    /// Accepted message counts for every device (works in counts-only mode too).
    pub fn delivered(&self) -> std::collections::BTreeMap<String, u64> {
        self.service.inbox().counts()
    }

    /// The messages accepted for one device, in order (empty in counts-only mode).
    pub fn inbox(&self, registration_id: &str) -> Vec<InboxMessage> {
        self.service.inbox().messages(registration_id)
    }

    /// How many messages one device got.
    pub fn delivered_count(&self, registration_id: &str) -> u64 {
        self.service.inbox().count(registration_id)
    }

    /// Forgets every recorded message (counters stay).
    pub fn clear_inbox(&self) {
        self.service.inbox().clear()
    }

    /// Whether the emulator considers `registration_id` gone (`NotRegistered` or
    /// `InvalidRegistration`): a sender should remove exactly these.
    pub fn is_gone(&self, registration_id: &str) -> bool {
        self.service.config().devices.is_gone(registration_id)
    }

    /// Moves the emulator's clock forward by `by`, without waiting: quota windows and token
    /// lifetimes see the jump. For tests.
    pub fn advance_clock(&self, by: std::time::Duration) {
        self.service.advance_clock(by)
    }

    /// From now on, writes one JSON line ([`Arrival`]) per send request to `out`, as it is
    /// answered: when it came, to whom, and how it was answered. Buffered: see
    /// [`Emulator::flush_arrivals`]; [`Emulator::shutdown`] flushes.
    pub fn journal_arrivals(&self, out: impl std::io::Write + Send + 'static) {
        self.service.arrivals().start(Box::new(out));
    }

    /// Writes out the arrivals journal's buffer.
    pub fn flush_arrivals(&self) -> std::io::Result<()> {
        self.service.arrivals().flush()
    }

    /// Stops accepting, lets open exchanges finish, and waits for that; then flushes the
    /// arrivals journal.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Err(e) = self.service.arrivals().flush() {
            tracing::warn!(error = %e, "could not write the arrivals journal");
        }
    }

    /// [`Emulator::shutdown`], then everything it saw, inbox included: the final record.
    pub async fn shutdown_with_stats(self) -> Stats {
        let service = Arc::clone(&self.service);
        self.shutdown().await;
        service.stats(true, false)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
