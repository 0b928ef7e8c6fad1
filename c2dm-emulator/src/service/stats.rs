//! What the emulator counts, and its statistics as `GET /_emulator/stats` reports them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use c2dm_core::ErrorCode;
use serde::{Deserialize, Serialize};

use super::Service;
use crate::inbox::InboxMessage;

/// What the emulator has seen, as `GET /_emulator/stats` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Send requests received, whatever became of them.
    pub sends: u64,
    /// Messages accepted (`id=`).
    pub accepted: u64,
    /// `Error=` answers by code.
    pub errors: BTreeMap<String, u64>,
    /// HTTP 401 answers.
    pub unauthorized: u64,
    /// HTTP 503 answers.
    pub unavailable: u64,
    /// HTTP 500 answers.
    pub server_errors: u64,
    /// Connections closed without an answer.
    pub dropped: u64,
    /// Successful logins.
    pub logins: u64,
    /// Refused logins.
    pub login_failures: u64,
    /// Tokens rotated with `Update-Client-Auth`.
    pub rotations: u64,
    /// Logins whose tokens expired.
    pub expiries: u64,
    /// Accepted messages per registration id (omitted when asked for without the inbox, and
    /// empty in counts-only mode; see `delivered`).
    #[serde(default)]
    pub inbox: BTreeMap<String, Vec<InboxMessage>>,
    /// Accepted message counts per registration id (only when asked for).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delivered: BTreeMap<String, u64>,
    /// What FCM's endpoints saw (its sends count in `sends`, and its 401s, 503s, 500s and
    /// dropped connections with C2DM's).
    #[serde(default)]
    pub fcm: FcmStats,
}

/// What the emulator's FCM endpoints have seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FcmStats {
    /// Messages accepted (a `validate_only` send is not).
    pub accepted: u64,
    /// Error answers by FCM's code (`UNREGISTERED`, `QUOTA_EXCEEDED`, …), beside the faults.
    pub errors: BTreeMap<String, u64>,
    /// Access tokens issued.
    pub tokens: u64,
    /// Token requests refused.
    pub token_refusals: u64,
    /// Send requests that came over HTTP/2 (as FCM's clients send them).
    pub http2: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) sends: AtomicU64,
    pub(super) accepted: AtomicU64,
    pub(super) errors: [AtomicU64; 8],
    /// `Error=` answers with a code the protocol does not list, by code.
    pub(super) other_errors: Mutex<BTreeMap<String, u64>>,
    pub(super) unauthorized: AtomicU64,
    pub(super) unavailable: AtomicU64,
    pub(super) server_errors: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) logins: AtomicU64,
    pub(super) login_failures: AtomicU64,
    pub(super) rotations: AtomicU64,
    pub(super) expiries: AtomicU64,
    pub(super) fcm_accepted: AtomicU64,
    pub(super) fcm_errors: Mutex<BTreeMap<String, u64>>,
    pub(super) fcm_tokens: AtomicU64,
    pub(super) fcm_token_refusals: AtomicU64,
    pub(super) fcm_http2: AtomicU64,
}

impl Counters {
    /// Counts an `Error=` answer under its own code, listed or not.
    pub(super) fn count_error(&self, code: &ErrorCode) {
        match ErrorCode::KNOWN.iter().position(|c| c == code) {
            Some(i) => {
                self.errors[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let mut other = self.other_errors.lock().unwrap_or_else(|e| e.into_inner());
                *other.entry(code.to_string()).or_default() += 1;
            }
        }
    }
}

impl Service {
    pub(crate) fn stats(&self, inbox: bool, delivered: bool) -> Stats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut errors: BTreeMap<String, u64> = ErrorCode::KNOWN
            .iter()
            .zip(&c.errors)
            .filter(|(_, n)| load(n) > 0)
            .map(|(code, n)| (code.to_string(), load(n)))
            .collect();
        errors.extend(
            c.other_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(code, n)| (code.clone(), *n)),
        );
        Stats {
            sends: load(&c.sends),
            accepted: load(&c.accepted),
            errors,
            unauthorized: load(&c.unauthorized),
            unavailable: load(&c.unavailable),
            server_errors: load(&c.server_errors),
            dropped: load(&c.dropped),
            logins: load(&c.logins),
            login_failures: load(&c.login_failures),
            rotations: load(&c.rotations),
            expiries: load(&c.expiries),
            inbox: if inbox {
                self.inbox.all()
            } else {
                BTreeMap::new()
            },
            delivered: if delivered {
                self.inbox.counts()
            } else {
                BTreeMap::new()
            },
            fcm: FcmStats {
                accepted: load(&c.fcm_accepted),
                errors: c
                    .fcm_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
                tokens: load(&c.fcm_tokens),
                token_refusals: load(&c.fcm_token_refusals),
                http2: load(&c.fcm_http2),
            },
        }
    }
}
