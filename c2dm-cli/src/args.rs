//! The command line, exactly as documented: scripts rely on these names.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Send Android push notifications through C2DM, or run a local stand-in for it.
#[derive(Debug, Parser)]
#[command(name = "c2dm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes: where to connect and how, and how much to print.
#[derive(Args)]
#[command(next_help_heading = "Connection options")]
pub struct Global {
    /// The C2DM send endpoint.
    #[arg(long, global = true, env = "C2DM_SEND_URL", default_value = c2dm_core::codec::DEFAULT_SEND_URL)]
    pub send_url: String,
    /// The ClientLogin endpoint.
    #[arg(long, global = true, env = "C2DM_LOGIN_URL", default_value = c2dm_auth::codec::DEFAULT_LOGIN_URL)]
    pub login_url: String,
    /// Send through FCM HTTP v1 instead of C2DM, as the service account of this key file
    /// (JSON, as the Google Cloud console downloads it): its project, its token endpoint.
    #[arg(
        long,
        global = true,
        env = "C2DM_FCM_KEY_FILE",
        value_name = "KEY_FILE"
    )]
    pub fcm: Option<PathBuf>,
    /// FCM's endpoint, before `/v1/projects/…` (the emulator's, say).
    #[arg(long, global = true, env = "C2DM_FCM_URL", default_value = c2dm_fcm::codec::DEFAULT_BASE_URL)]
    pub fcm_url: String,
    /// An extra trusted root certificate (PEM), e.g. the emulator's.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Reach the service through this HTTP proxy, by CONNECT tunnels (TLS stays end to end):
    /// http://host:port, or http://user:password@host:port.
    #[arg(
        long,
        global = true,
        env = "C2DM_PROXY",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub proxy: Option<String>,
    /// Take the proxy from HTTPS_PROXY (https:// URLs), HTTP_PROXY (http:// URLs) and NO_PROXY.
    #[arg(long, global = true, conflicts_with = "proxy")]
    pub proxy_from_env: bool,
    /// Hosts reached without the proxy, as NO_PROXY lists them: host names (with their
    /// subdomains), IP addresses, `*`; an entry may end in :port.
    #[arg(
        long,
        global = true,
        value_name = "LIST",
        conflicts_with = "proxy_from_env"
    )]
    pub no_proxy: Option<String>,
    /// Use this Auth token (otherwise log in with --email and the password).
    #[arg(long, global = true, env = "C2DM_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The sender account for ClientLogin; the password comes from C2DM_PASSWORD or --password-file.
    #[arg(long, global = true, env = "C2DM_EMAIL")]
    pub email: Option<String>,
    /// A file whose first line is the password.
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The `source` sent to ClientLogin (company-app-version).
    #[arg(long, global = true, env = "C2DM_SOURCE")]
    pub source: Option<String>,
    /// The longest wait for one answer, in seconds.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_seconds)]
    pub timeout: f64,
    /// The most attempts one message gets (retries on 503, timeouts and the like).
    #[arg(long, global = true, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// The first retry delay, in seconds; each later one doubles it (with jitter).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 1.0, value_parser = parse_seconds)]
    pub initial_backoff: f64,
    /// The longest one message may take over all its attempts and waits, in seconds
    /// [default: 100 for send, none for broadcast].
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_seconds)]
    pub deadline: Option<f64>,
    /// Machine-readable output (JSON).
    #[arg(long, global = true, help_heading = "Output options")]
    pub json: bool,
    /// More log output on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet", help_heading = "Output options")]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, help_heading = "Output options")]
    pub quiet: bool,
    /// How log lines on stderr are written: `text` for people, `json` (one object a line) for
    /// log collectors. Which lines: `C2DM_LOG` or `RUST_LOG` (`info,sqlx=warn` say), else -v/-q.
    #[arg(long, global = true, env = "C2DM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = "Output options")]
    pub log_format: LogFormat,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

/// Never shows `--token`: options may be logged.
impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("send_url", &self.send_url)
            .field("login_url", &self.login_url)
            .field("fcm", &self.fcm)
            .field("fcm_url", &self.fcm_url)
            .field("ca_cert", &self.ca_cert)
            .field(
                "proxy",
                &self
                    .proxy
                    .as_deref()
                    .map(|url| c2dm_hyper::Proxy::new(url).map_err(|_| "<invalid>")),
            )
            .field("proxy_from_env", &self.proxy_from_env)
            .field("no_proxy", &self.no_proxy)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("email", &self.email)
            .field("password_file", &self.password_file)
            .field("source", &self.source)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("deadline", &self.deadline)
            .field("json", &self.json)
            .field("verbose", &self.verbose)
            .field("quiet", &self.quiet)
            .field("log_format", &self.log_format)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in with ClientLogin and print the Auth token.
    Login(LoginArgs),
    /// Send one message.
    Send(SendArgs),
    /// Send one message to every registration id of a list, with a journal.
    Broadcast(BroadcastArgs),
    /// Run the application server: device registry and pushes over HTTP, workers that send.
    Serve(ServeArgs),
    /// Run the local C2DM and ClientLogin emulator.
    Emulator(Box<c2dm_emulator::cli::EmulatorArgs>),
    /// Run everything locally: emulator, login, a send, a broadcast, and verify delivery.
    Demo(DemoArgs),
    /// Web Push's VAPID key pair: make one, or print a key file's public key.
    #[command(subcommand)]
    Vapid(VapidCommand),
}

/// `c2dm vapid`'s commands.
#[derive(Debug, Subcommand)]
pub enum VapidCommand {
    /// Make a new key pair: the private key to FILE (PKCS#8 PEM, readable by its owner only),
    /// the public key (an app's applicationServerKey) printed.
    New {
        /// Where the private key goes; an existing file is kept unless --force.
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a private key file (PEM, or base64url of its 32 bytes).
    PublicKey {
        /// The private key's file.
        #[arg(long, value_name = "FILE")]
        key: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The CAPTCHA token to answer (from an earlier CaptchaRequired).
    #[arg(long, requires = "captcha_answer")]
    pub captcha_token: Option<String>,
    /// The answer to the CAPTCHA.
    #[arg(long, requires = "captcha_token")]
    pub captcha_answer: Option<String>,
}

/// The message fields shared by `send` and `broadcast`.
#[derive(Debug, Args)]
pub struct MessageArgs {
    /// The collapse key.
    #[arg(long)]
    pub collapse_key: String,
    /// A data pair, sent as data.KEY=VALUE (repeatable).
    #[arg(short = 'd', long = "data", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub data: Vec<(String, String)>,
    /// Deliver only when the device wakes.
    #[arg(long)]
    pub delay_while_idle: bool,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The registration id of the device.
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub message: MessageArgs,
}

#[derive(Debug, Args)]
pub struct BroadcastArgs {
    /// The registration ids, one per line (blank lines and # comments skipped); - for stdin.
    #[arg(long, value_name = "FILE|-")]
    pub ids: String,
    #[command(flatten)]
    pub message: MessageArgs,
    /// Sends at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// At most this many sends per second [default: none for C2DM; with --fcm, 10,000, FCM's
    /// default quota of 600,000 a minute per project].
    #[arg(long, value_name = "PER_SECOND", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Record every final delivery here, as JSON Lines.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// Skip ids the journal already shows accepted or rejected, and append the rest.
    #[arg(long, requires = "journal")]
    pub resume: bool,
    /// Write the registration ids to delete here, one per line.
    #[arg(long, value_name = "FILE")]
    pub remove_list: Option<PathBuf>,
    /// Stop abruptly after this many journal lines, as a crash would. A test hook: debug builds
    /// only, never in a release binary.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    pub abort_after: Option<u64>,
}

/// `c2dm serve`'s options; `Debug` hides the database URL's password.
#[derive(Args)]
pub struct ServeArgs {
    /// The database: sqlite://FILE (created if missing) or postgres://USER@HOST/DB (shared by
    /// many processes).
    #[arg(
        long,
        env = "C2DM_DATABASE_URL",
        default_value = "sqlite://c2dm.db",
        value_name = "URL"
    )]
    pub database: String,
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Write the API's port here once it listens (useful with port 0); with --no-api, the
    /// metrics listener's.
    #[arg(long, value_name = "FILE")]
    pub port_file: Option<PathBuf>,
    /// A file whose first line is the admin token (else C2DM_SERVER_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A file whose first line is the device key (else C2DM_SERVER_DEVICE_KEY).
    #[arg(long, value_name = "FILE")]
    pub device_key_file: Option<PathBuf>,
    /// Batch jobs sending at once in this process (one more is readied beside them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// Sends at once within one batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Devices per batch job.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// The sender account whose pause and daily budget the workers of every process share
    /// (default: the C2DM account's email, else "default").
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// Messages each provider account (the C2DM account, each FCM project) may have
    /// accepted per day (UTC), by every worker together; devices over it wait, unsent, for
    /// the next day.
    #[arg(
        long,
        default_value_t = 200_000,
        value_name = "N",
        conflicts_with = "no_daily_budget"
    )]
    pub daily_budget: u64,
    /// No daily budget.
    #[arg(long)]
    pub no_daily_budget: bool,
    /// The period the daily budget counts over, in seconds (periods aligned to the Unix
    /// epoch: 86400 is the UTC day).
    #[arg(long, default_value_t = 86_400, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub budget_period: u64,
    /// How often a worker tells the database it is alive, in seconds; one silent for three
    /// heartbeats is taken for dead and its jobs go to the others.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_seconds)]
    pub heartbeat: f64,
    /// Also serve GET /metrics, without a key, here (for a worker process with --no-api).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long a request head may take to arrive, from its first byte, in seconds.
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_seconds)]
    pub header_timeout: f64,
    /// How long a connection may wait for its next request before it is closed, in seconds.
    #[arg(long, default_value = "75", value_name = "SECS", value_parser = parse_seconds)]
    pub idle_timeout: f64,
    /// The most connections open at once on each listener; past it, the longest idle one is
    /// closed for a new one. Keep it well below the open-file limit (ulimit -n).
    #[arg(long, default_value_t = 512, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// How long a stop (SIGTERM, Ctrl-C) may take, in seconds: the requests under way finish,
    /// the batches in hand stop and write what they have; past it the process stops at once.
    #[arg(long, default_value = "20", value_name = "SECS", value_parser = parse_seconds)]
    pub shutdown_timeout: f64,
    /// A worker process only: no API.
    #[arg(long, conflicts_with = "no_workers")]
    pub no_api: bool,
    /// An API process only: no workers.
    #[arg(long)]
    pub no_workers: bool,
    /// Settings from this TOML file: one key per option (its long name, `workers = 4`,
    /// `admin-token-file = "/etc/c2dm/admin-token"`); options and environment variables
    /// override it. Secrets are given as file paths.
    #[arg(long, env = "C2DM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings in effect (options over environment over --config file over
    /// defaults, secrets redacted) as TOML, with where each came from, and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field(
                "database",
                &c2dm_server::serve::redacted_url(&self.database),
            )
            .field("listen", &self.listen)
            .field("port_file", &self.port_file)
            .field("admin_token_file", &self.admin_token_file)
            .field("device_key_file", &self.device_key_file)
            .field("workers", &self.workers)
            .field("concurrency", &self.concurrency)
            .field("batch_size", &self.batch_size)
            .field("account", &self.account)
            .field("daily_budget", &self.daily_budget)
            .field("no_daily_budget", &self.no_daily_budget)
            .field("budget_period", &self.budget_period)
            .field("heartbeat", &self.heartbeat)
            .field("metrics_listen", &self.metrics_listen)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("no_api", &self.no_api)
            .field("no_workers", &self.no_workers)
            .field("config", &self.config)
            .field("print_config", &self.print_config)
            .finish()
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many generated devices the broadcast goes to.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,
    /// The Retry-After of the emulator's injected 503s, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// How many devices register with the application server in its act.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub server_devices: u32,
    /// After the verdict, leave the emulator, the server and its console running, and print
    /// the console's address and its admin token, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() && secs <= 86_400.0 => Ok(secs),
        _ => Err(format!(
            "expected a number of seconds above 0, got {text:?}"
        )),
    }
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
        None => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}
