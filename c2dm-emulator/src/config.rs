//! What the emulator does: accounts, devices, quotas, token life, faults, the inbox.

use std::collections::HashSet;
use std::time::Duration;

/// An account that can log in through ClientLogin. Its `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    /// The email.
    pub email: String,
    /// The password.
    pub password: String,
    /// When set, logins are refused with this `Error=` code (e.g. `AccountDisabled`).
    pub refuse_with: Option<String>,
    /// When set, the first login demands a CAPTCHA with this token, answered by `.1`.
    pub captcha: Option<(String, String)>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("refuse_with", &self.refuse_with)
            .field("captcha", &self.captcha.is_some())
            .finish()
    }
}

impl Account {
    /// An account that logs in with `password`.
    pub fn new(email: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            email: email.into(),
            password: password.into(),
            refuse_with: None,
            captcha: None,
        }
    }

    /// Refuses every login with `Error=<code>`.
    pub fn refuse_with(mut self, code: impl Into<String>) -> Self {
        self.refuse_with = Some(code.into());
        self
    }

    /// Demands a CAPTCHA (token `token`) until it is answered with `answer`.
    pub fn with_captcha(mut self, token: impl Into<String>, answer: impl Into<String>) -> Self {
        self.captcha = Some((token.into(), answer.into()));
        self
    }
}

/// The default account when none is configured.
pub const DEFAULT_EMAIL: &str = "sender@example.com";
/// The default account's password.
pub const DEFAULT_PASSWORD: &str = "emulator-password";

/// Which registration ids are not plain valid devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRules {
    /// Ids answered `NotRegistered`.
    pub not_registered: HashSet<String>,
    /// Id prefixes answered `NotRegistered`.
    pub not_registered_prefixes: Vec<String>,
    /// Ids answered `InvalidRegistration`.
    pub invalid: HashSet<String>,
    /// Id prefixes answered `InvalidRegistration`.
    pub invalid_prefixes: Vec<String>,
    /// Id prefixes answered `MismatchSenderId` (devices of another sender).
    pub mismatch_prefixes: Vec<String>,
    /// Id prefixes answered `DeviceQuotaExceeded` for their first
    /// [`Config::device_quota_prefix_sends`] sends.
    pub device_quota_prefixes: Vec<String>,
}

fn has_prefix(id: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| id.starts_with(p.as_str()))
}

impl DeviceRules {
    /// The permanent error code for `id`, if a rule gives it one.
    pub fn permanent_error(&self, id: &str) -> Option<&'static str> {
        if self.invalid.contains(id) || has_prefix(id, &self.invalid_prefixes) {
            Some("InvalidRegistration")
        } else if self.not_registered.contains(id) || has_prefix(id, &self.not_registered_prefixes)
        {
            Some("NotRegistered")
        } else if has_prefix(id, &self.mismatch_prefixes) {
            Some("MismatchSenderId")
        } else {
            None
        }
    }

    /// Whether `id` is a device the emulator considers gone (remove it).
    pub fn is_gone(&self, id: &str) -> bool {
        matches!(
            self.permanent_error(id),
            Some("InvalidRegistration" | "NotRegistered")
        )
    }

    pub(crate) fn has_device_quota_prefix(&self, id: &str) -> bool {
        has_prefix(id, &self.device_quota_prefixes)
    }
}

/// A quota: at most `limit` accepted messages per `window`.
///
/// What it models, exactly: a fixed window per key (the sender account, or the registration
/// id), opened by the first message it counts and closed `window` later, when the count starts
/// again from zero. It is not a rolling window: a burst at the end of one window and another at
/// the start of the next can both go through. Only accepted messages count: a send refused for
/// either quota (or any other reason) uses up neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Messages allowed per window.
    pub limit: u64,
    /// The window; counts reset when it ends.
    pub window: Duration,
}

/// How often a fault happens: every Nth send, or with a probability (seeded).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FaultRate {
    /// Never (the default).
    #[default]
    Never,
    /// Every Nth send (the Nth, 2Nth, …).
    Every(u64),
    /// Each send with this probability, drawn from the seeded generator.
    Probability(f64),
}

/// What the inbox keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboxMode {
    /// Every accepted message, compactly (the default).
    #[default]
    Full,
    /// Only the number of accepted messages per device, for long benchmarks.
    CountsOnly,
}

/// The emulator's whole configuration. Everything is off or lenient by default: any
/// registration id is a valid device, no quotas, no faults, tokens live forever.
///
/// Its `Debug` shows neither passwords nor static tokens.
#[derive(Clone)]
pub struct Config {
    /// Accounts that may log in; when empty, [`DEFAULT_EMAIL`] with [`DEFAULT_PASSWORD`].
    pub accounts: Vec<Account>,
    /// Tokens accepted without a login (pre-issued), as if logged in as the first account.
    pub static_tokens: Vec<String>,
    /// Device rules.
    pub devices: DeviceRules,
    /// How many sends a device-quota-prefixed id gets `DeviceQuotaExceeded` for (default 2).
    pub device_quota_prefix_sends: u32,
    /// The per-sender quota (off by default).
    pub sender_quota: Option<Quota>,
    /// The per-device quota (off by default).
    pub device_quota: Option<Quota>,
    /// The payload limit in bytes (default 1024), counted as the protocol decides.
    pub payload_limit: usize,
    /// Rotate a login's token every N accepted sends, with `Update-Client-Auth`.
    pub rotate_token_every: Option<u64>,
    /// How many more sends a rotated-out token stays valid for (default 10,000).
    pub rotation_grace_sends: u64,
    /// A login's tokens expire after this many sends (401 afterwards).
    pub token_lifetime_sends: Option<u64>,
    /// A login's tokens expire after this long.
    pub token_lifetime: Option<Duration>,
    /// How long an FCM access token lives (default an hour, as Google's).
    pub fcm_token_lifetime: Duration,
    /// 503 with `Retry-After` (seconds and HTTP-date, alternating).
    pub unavailable: FaultRate,
    /// The `Retry-After` sent with a 503 (default 1 s).
    pub retry_after: Duration,
    /// HTTP 500.
    pub server_errors: FaultRate,
    /// Close the connection without an answer.
    pub drops: FaultRate,
    /// Added before every answer to a send.
    pub latency: Duration,
    /// The seed of every random choice.
    pub seed: u64,
    /// What the inbox keeps.
    pub inbox: InboxMode,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("accounts", &self.accounts)
            .field(
                "static_tokens",
                &format_args!("<{} redacted>", self.static_tokens.len()),
            )
            .field("devices", &self.devices)
            .field("device_quota_prefix_sends", &self.device_quota_prefix_sends)
            .field("sender_quota", &self.sender_quota)
            .field("device_quota", &self.device_quota)
            .field("payload_limit", &self.payload_limit)
            .field("rotate_token_every", &self.rotate_token_every)
            .field("rotation_grace_sends", &self.rotation_grace_sends)
            .field("token_lifetime_sends", &self.token_lifetime_sends)
            .field("token_lifetime", &self.token_lifetime)
            .field("fcm_token_lifetime", &self.fcm_token_lifetime)
            .field("unavailable", &self.unavailable)
            .field("retry_after", &self.retry_after)
            .field("server_errors", &self.server_errors)
            .field("drops", &self.drops)
            .field("latency", &self.latency)
            .field("seed", &self.seed)
            .field("inbox", &self.inbox)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            accounts: Vec::new(),
            static_tokens: Vec::new(),
            devices: DeviceRules::default(),
            device_quota_prefix_sends: 2,
            sender_quota: None,
            device_quota: None,
            payload_limit: c2dm_core::DEFAULT_PAYLOAD_LIMIT,
            rotate_token_every: None,
            rotation_grace_sends: 10_000,
            token_lifetime_sends: None,
            token_lifetime: None,
            fcm_token_lifetime: Duration::from_secs(3600),
            unavailable: FaultRate::Never,
            retry_after: Duration::from_secs(1),
            server_errors: FaultRate::Never,
            drops: FaultRate::Never,
            latency: Duration::ZERO,
            seed: 0,
            inbox: InboxMode::Full,
        }
    }
}

impl Config {
    /// The accounts in force (the default one when none is configured).
    pub fn effective_accounts(&self) -> Vec<Account> {
        if self.accounts.is_empty() {
            vec![Account::new(DEFAULT_EMAIL, DEFAULT_PASSWORD)]
        } else {
            self.accounts.clone()
        }
    }
}
