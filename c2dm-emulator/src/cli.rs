//! The command line of the emulator, shared by the `c2dm-emulator` binary and `c2dm emulator`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::{Account, Config, DeviceRules, Emulator, FaultRate, InboxMode, Listen, Quota};

/// The token and answer of the CAPTCHA demanded by `--captcha-account`.
pub const CAPTCHA_TOKEN: &str = "EMULATOR-CAPTCHA";
/// The answer that unlocks `--captcha-account`.
pub const CAPTCHA_ANSWER: &str = "c2dm";

/// Flags of the emulator. Its `Debug` shows neither passwords (accounts are [`Account`]s)
/// nor static tokens.
#[derive(Clone, Args)]
pub struct EmulatorArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Write the bound port to this file once listening.
    #[arg(long, value_name = "FILE")]
    pub port_file: Option<PathBuf>,
    /// Serve HTTPS with a certificate made at start.
    #[arg(long)]
    pub tls: bool,
    /// Write the certificate (PEM) to this file, for clients to trust.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub cert_out: Option<PathBuf>,
    /// Write the FCM service account's key file (its `token_uri` this emulator's) to this file,
    /// for FCM senders to use.
    #[arg(long, value_name = "FILE")]
    pub fcm_key_out: Option<PathBuf>,
    /// How long an FCM access token lives, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub fcm_token_lifetime: u64,
    /// An account that may log in (repeatable). Default: sender@example.com:emulator-password.
    #[arg(long = "account", value_name = "EMAIL:PASSWORD", value_parser = parse_account)]
    pub accounts: Vec<Account>,
    /// An account whose first login demands a CAPTCHA (token EMULATOR-CAPTCHA, answer c2dm).
    #[arg(long = "captcha-account", value_name = "EMAIL:PASSWORD", value_parser = parse_account)]
    pub captcha_accounts: Vec<Account>,
    /// A token accepted without a login (repeatable).
    #[arg(long = "static-token", value_name = "TOKEN")]
    pub tokens: Vec<String>,
    /// Registration ids starting with this are NotRegistered (repeatable).
    #[arg(long = "not-registered-prefix", value_name = "P")]
    pub not_registered_prefixes: Vec<String>,
    /// Registration ids starting with this are InvalidRegistration (repeatable).
    #[arg(long = "invalid-prefix", value_name = "P")]
    pub invalid_prefixes: Vec<String>,
    /// Registration ids starting with this are MismatchSenderId (repeatable).
    #[arg(long = "mismatch-prefix", value_name = "P")]
    pub mismatch_prefixes: Vec<String>,
    /// Registration ids starting with this get DeviceQuotaExceeded for their first two sends.
    #[arg(long = "device-quota-prefix", value_name = "P")]
    pub device_quota_prefixes: Vec<String>,
    /// Answer every Nth send with 503 and Retry-After (seconds and HTTP-date, alternating).
    #[arg(long, value_name = "N", conflicts_with = "unavailable_probability")]
    pub unavailable_every: Option<u64>,
    /// Answer each send with 503 with this probability (seeded).
    #[arg(long, value_name = "P")]
    pub unavailable_probability: Option<f64>,
    /// The Retry-After of a 503, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Answer every Nth send with HTTP 500.
    #[arg(long, value_name = "N")]
    pub server_error_every: Option<u64>,
    /// Close the connection without an answer on every Nth send.
    #[arg(long, value_name = "N")]
    pub drop_every: Option<u64>,
    /// Wait this long before answering each send, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Rotate a login's token every N accepted sends (Update-Client-Auth).
    #[arg(long, value_name = "N")]
    pub rotate_token_every: Option<u64>,
    /// How many more sends a rotated-out token stays valid for.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub rotation_grace: u64,
    /// Expire a login's tokens after N sends.
    #[arg(long, value_name = "N")]
    pub token_lifetime_sends: Option<u64>,
    /// Expire a login's tokens after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub token_lifetime_secs: Option<u64>,
    /// Per-sender quota: messages per window (QuotaExceeded beyond it).
    #[arg(long, value_name = "N")]
    pub sender_quota: Option<u64>,
    /// Per-device quota: messages per window (DeviceQuotaExceeded beyond it).
    #[arg(long, value_name = "N")]
    pub device_quota: Option<u64>,
    /// The quota window, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400)]
    pub quota_window_secs: u64,
    /// The payload limit in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = c2dm_core::DEFAULT_PAYLOAD_LIMIT)]
    pub payload_limit: usize,
    /// On stop, write everything the emulator saw (the stats JSON, inbox included) to this file.
    #[arg(long, value_name = "FILE")]
    pub stats_out: Option<PathBuf>,
    /// Write one JSON line per send request to this file as it is answered: when it came, its
    /// registration_id and collapse_key, and its answer (for checks of order and time).
    #[arg(long, value_name = "FILE")]
    pub arrivals_out: Option<PathBuf>,
    /// Keep only message counts per device, not the messages (for long benchmarks).
    #[arg(long)]
    pub counts_only: bool,
    /// The seed of every random choice.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

fn parse_account(text: &str) -> Result<Account, String> {
    match text.split_once(':') {
        Some((email, password)) if !email.is_empty() && !password.is_empty() => {
            Ok(Account::new(email, password))
        }
        _ => Err("expected EMAIL:PASSWORD".into()),
    }
}

impl std::fmt::Debug for EmulatorArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Everything the flags say, through the configuration (whose Debug hides the
        // secrets), plus what is not configuration.
        f.debug_struct("EmulatorArgs")
            .field("listen", &self.listen)
            .field("port_file", &self.port_file)
            .field("tls", &self.tls)
            .field("cert_out", &self.cert_out)
            .field("fcm_key_out", &self.fcm_key_out)
            .field("fcm_token_lifetime", &self.fcm_token_lifetime)
            .field("stats_out", &self.stats_out)
            .field("arrivals_out", &self.arrivals_out)
            .field("config", &self.config())
            .finish()
    }
}

fn every(n: Option<u64>) -> FaultRate {
    n.filter(|n| *n > 0)
        .map_or(FaultRate::Never, FaultRate::Every)
}

impl EmulatorArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> Config {
        let window = Duration::from_secs(self.quota_window_secs.max(1));
        let accounts = self.accounts.iter().cloned();
        let captcha_accounts = self
            .captcha_accounts
            .iter()
            .map(|a| a.clone().with_captcha(CAPTCHA_TOKEN, CAPTCHA_ANSWER));
        Config {
            accounts: accounts.chain(captcha_accounts).collect(),
            static_tokens: self.tokens.clone(),
            devices: DeviceRules {
                not_registered_prefixes: self.not_registered_prefixes.clone(),
                invalid_prefixes: self.invalid_prefixes.clone(),
                mismatch_prefixes: self.mismatch_prefixes.clone(),
                device_quota_prefixes: self.device_quota_prefixes.clone(),
                ..DeviceRules::default()
            },
            unavailable: match (self.unavailable_every, self.unavailable_probability) {
                (Some(n), _) => every(Some(n)),
                (None, Some(p)) => FaultRate::Probability(p),
                (None, None) => FaultRate::Never,
            },
            retry_after: Duration::from_secs(self.retry_after_secs),
            server_errors: every(self.server_error_every),
            drops: every(self.drop_every),
            latency: Duration::from_millis(self.latency_ms),
            rotate_token_every: self.rotate_token_every.filter(|n| *n > 0),
            rotation_grace_sends: self.rotation_grace,
            token_lifetime_sends: self.token_lifetime_sends,
            token_lifetime: self.token_lifetime_secs.map(Duration::from_secs),
            sender_quota: self.sender_quota.map(|limit| Quota { limit, window }),
            device_quota: self.device_quota.map(|limit| Quota { limit, window }),
            payload_limit: self.payload_limit,
            inbox: if self.counts_only {
                InboxMode::CountsOnly
            } else {
                InboxMode::Full
            },
            seed: self.seed,
            fcm_token_lifetime: Duration::from_secs(self.fcm_token_lifetime),
            ..Config::default()
        }
    }
}

/// Prints a line; a closed standard output (a reader that went away) is no reason to stop.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Runs the emulator until Ctrl-C: prints its URLs and accounts, writes the port and
/// certificate files, then serves.
pub async fn run(args: EmulatorArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let emulator = Emulator::start_on(
        args.config(),
        Listen {
            addr: args.listen,
            tls: args.tls,
        },
    )
    .await?;
    if let Some(path) = &args.arrivals_out {
        let file = std::fs::File::create(path)
            .map_err(|e| format!("could not create {}: {e}", path.display()))?;
        emulator.journal_arrivals(file);
    }
    if let (Some(path), Some(pem)) = (&args.cert_out, emulator.cert_pem()) {
        std::fs::write(path, pem)
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.fcm_key_out {
        std::fs::write(path, emulator.fcm_key_file())
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.port_file {
        std::fs::write(path, emulator.addr().port().to_string())
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
    }
    say!("C2DM emulator listening on {}", emulator.base_url());
    say!("  send:   {}", emulator.send_url());
    say!("  login:  {}", emulator.login_url());
    say!("  stats:  {}", emulator.stats_url());
    for account in emulator.accounts() {
        let captcha = if account.captcha.is_some() {
            " (demands a CAPTCHA: answer c2dm)"
        } else {
            ""
        };
        say!("  account: {}:{}{captcha}", account.email, account.password);
    }
    if let Some(path) = &args.cert_out {
        say!("  certificate: {}", path.display());
    }
    say!("  FCM send:  {}", emulator.fcm_send_url());
    say!("  FCM token: {}", emulator.fcm_token_url());
    if let Some(path) = &args.fcm_key_out {
        say!("  FCM key file: {}", path.display());
    }
    say!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    say!("stopping");
    if let Some(path) = &args.stats_out {
        let stats = emulator.shutdown_with_stats().await;
        let json = serde_json::to_vec(&stats)?;
        std::fs::write(path, json)
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
        say!("statistics written to {}", path.display());
    } else {
        emulator.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: EmulatorArgs,
    }

    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        Wrapper::command().debug_assert();
    }

    #[test]
    fn flags_make_the_config() {
        let w = Wrapper::parse_from([
            "x",
            "--account",
            "a@b:pw",
            "--captcha-account",
            "c@d:pw2",
            "--not-registered-prefix",
            "gone-",
            "--invalid-prefix",
            "bad-",
            "--mismatch-prefix",
            "other-",
            "--device-quota-prefix",
            "busy-",
            "--unavailable-every",
            "10",
            "--rotate-token-every",
            "5",
            "--token-lifetime-sends",
            "100",
            "--seed",
            "7",
            "--counts-only",
            "--static-token",
            "T",
        ]);
        let c = w.args.config();
        assert_eq!(c.accounts.len(), 2);
        assert_eq!(c.accounts[1].captcha.as_ref().unwrap().1, CAPTCHA_ANSWER);
        assert!(c.devices.is_gone("gone-1") && c.devices.is_gone("bad-1"));
        assert_eq!(
            c.devices.permanent_error("other-1"),
            Some("MismatchSenderId")
        );
        assert_eq!(c.unavailable, FaultRate::Every(10));
        assert_eq!(c.rotate_token_every, Some(5));
        assert_eq!(c.token_lifetime_sends, Some(100));
        assert_eq!(c.seed, 7);
        assert_eq!(c.inbox, InboxMode::CountsOnly);
        assert_eq!(c.static_tokens, ["T"]);
        assert!(Wrapper::try_parse_from(["x", "--account", "nocolon"]).is_err());
    }

    #[test]
    fn debug_shows_no_password_and_no_static_token() {
        let w = Wrapper::try_parse_from([
            "x",
            "--account",
            "a@example.com:pass-that-must-not-show",
            "--captcha-account",
            "b@example.com:other-pass-that-must-not-show",
            "--static-token",
            "token-that-must-not-show",
        ])
        .unwrap();
        let shown = format!("{:?} {:#?} {:?}", w.args, w.args, w.args.config());
        assert!(!shown.contains("must-not-show"), "{shown}");
        assert!(shown.contains("a@example.com"), "{shown}");
    }
}
