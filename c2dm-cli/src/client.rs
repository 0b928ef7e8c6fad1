//! The client stack the global options describe: transport, credentials, token source,
//! sender, and the message of `send` and `broadcast`.

use std::io::BufRead;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use c2dm_auth::{ClientLogin, Credentials};
use c2dm_core::{AuthToken, Message, RetryPolicy, Sender, StaticToken, TokenProvider, Transport};
use c2dm_fcm::{Fcm, FcmMessage, ServiceAccountKey, ServiceAccountTokens};
use c2dm_hyper::{HyperTransport, Proxy};

use crate::args::{Global, MessageArgs};
use crate::error::CliError;

/// Parses a URL given on the command line. Plain `http://` is refused except to a loopback
/// address (a local emulator): the password and the Auth token would cross the network in
/// clear.
pub fn parse_url(flag: &str, url: &str) -> Result<http::Uri, CliError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| CliError::Usage(format!("{flag}: not a URL: {url:?} ({e})")))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") if !host.is_empty() => Err(CliError::Usage(format!(
            "{flag}: plain http:// is allowed only to a loopback address (127.0.0.1, [::1], localhost): \
             credentials and tokens would cross the network unencrypted; use https:// ({url:?})"
        ))),
        _ => Err(CliError::Usage(format!(
            "{flag}: expected an https:// URL (or http:// to a loopback address), got {url:?}"
        ))),
    }
}

/// Whether `host` (as a URL writes it) names this machine only.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The production transport, trusting `--ca-cert` besides the usual roots, through
/// `--proxy` (or the environment's, with `--proxy-from-env`) except for `--no-proxy`. It
/// keeps open at least `sends_at_once` idle connections to a host, so that a command sending
/// that many at once finds one for each (with fewer, say 4 batches of 64 sends against the
/// default 128, it closed and opened connections as it went).
pub fn transport(global: &Global, sends_at_once: usize) -> Result<HyperTransport, CliError> {
    let mut builder = HyperTransport::builder()
        .request_timeout(Duration::from_secs_f64(global.timeout))
        .pool_max_idle_per_host(sends_at_once.max(c2dm_hyper::DEFAULT_MAX_IDLE_PER_HOST))
        // FCM is reached over HTTP/2 (ALPN, on TLS): every send on one connection.
        .http2(global.fcm.is_some());
    if let Some(path) = &global.ca_cert {
        let pem = std::fs::read(path).map_err(|e| {
            CliError::Usage(format!("--ca-cert: cannot read {}: {e}", path.display()))
        })?;
        builder = builder
            .add_root_certificates_pem(&pem)
            .map_err(|e| CliError::Usage(format!("--ca-cert: {}: {e}", path.display())))?;
    }
    if let Some(url) = &global.proxy {
        let proxy = Proxy::new(url).map_err(|e| CliError::Usage(format!("--proxy: {e}")))?;
        builder = builder.proxy(proxy);
    }
    if global.proxy_from_env {
        builder = builder
            .proxy_from_env()
            .map_err(|e| CliError::Usage(format!("--proxy-from-env: {e}")))?;
    }
    if let Some(list) = &global.no_proxy {
        builder = builder.no_proxy(list);
    }
    builder
        .build()
        .map_err(|e| CliError::Usage(format!("TLS setup: {e}")))
}

fn read_password_file(path: &Path) -> Result<String, CliError> {
    let file = std::fs::File::open(path).map_err(|e| {
        CliError::Usage(format!(
            "--password-file: cannot read {}: {e}",
            path.display()
        ))
    })?;
    #[cfg(unix)]
    if let Ok(meta) = file.metadata() {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "--password-file {} can be read by other users (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
    let mut line = String::new();
    std::io::BufReader::new(file)
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("--password-file: {e}")))?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(CliError::Usage(format!(
            "--password-file: {} is empty",
            path.display()
        )));
    }
    Ok(password)
}

/// The credentials, if both an email and a password were given.
pub fn credentials(global: &Global) -> Result<Option<Credentials>, CliError> {
    let password = match &global.password_file {
        Some(path) => Some(read_password_file(path)?),
        None => std::env::var("C2DM_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
    };
    match (&global.email, password) {
        (Some(email), Some(password)) => {
            let source = global
                .source
                .clone()
                .unwrap_or_else(|| c2dm_auth::DEFAULT_SOURCE.to_owned());
            Ok(Some(Credentials::new(email, password, source)))
        }
        (Some(_), None) => Err(CliError::Usage(
            "--email needs a password: set C2DM_PASSWORD or give --password-file".into(),
        )),
        (None, _) if global.password_file.is_some() => Err(CliError::Usage(
            "--password-file needs --email (or C2DM_EMAIL)".into(),
        )),
        (None, _) => Ok(None),
    }
}

/// Whether C2DM's credentials are given (`--token`, or `--email` with its password).
pub fn has_c2dm_credentials(global: &Global) -> Result<bool, CliError> {
    Ok(global.token.is_some() || credentials(global)?.is_some())
}

/// ClientLogin over `transport` at `--login-url`, starting with `token` if one is given.
pub fn client_login(
    global: &Global,
    credentials: Credentials,
    transport: HyperTransport,
    token: Option<AuthToken>,
) -> Result<ClientLogin, CliError> {
    let endpoint = parse_url("--login-url", &global.login_url)?;
    let builder = ClientLogin::builder(credentials, transport).endpoint(endpoint);
    Ok(match token {
        Some(token) => builder.token(token),
        None => builder,
    }
    .build())
}

/// Where the Auth token comes from: `--token` (logging in again when refused, if credentials
/// are there too), or a login.
pub fn token_provider(
    global: &Global,
    transport: &HyperTransport,
) -> Result<Arc<dyn TokenProvider>, CliError> {
    let token = match &global.token {
        Some(text) => Some(AuthToken::new(text).map_err(|_| {
            CliError::Usage("--token: an Auth token is non-empty visible ASCII".into())
        })?),
        None => None,
    };
    match (token, credentials(global)?) {
        (Some(token), Some(credentials)) => Ok(Arc::new(client_login(
            global,
            credentials,
            transport.clone(),
            Some(token),
        )?)),
        (Some(token), None) => Ok(Arc::new(StaticToken::new(token))),
        (None, Some(credentials)) => Ok(Arc::new(client_login(
            global,
            credentials,
            transport.clone(),
            None,
        )?)),
        (None, None) => Err(CliError::Usage(
            "no credentials: give --token (or C2DM_AUTH_TOKEN), or --email with C2DM_PASSWORD or --password-file".into(),
        )),
    }
}

/// The sender for `send` (`default_deadline` applies without `--deadline`), `broadcast` and
/// `serve`, which send up to `sends_at_once` messages at once.
pub fn sender(
    global: &Global,
    default_deadline: Option<Duration>,
    sends_at_once: usize,
) -> Result<Sender, CliError> {
    sender_over(global, default_deadline, sends_at_once, |transport| {
        transport
    })
}

/// [`sender`], its sends (not its logins) through `wrap` of the transport: `serve` times
/// them for its metrics.
pub fn sender_over<T: Transport + 'static>(
    global: &Global,
    default_deadline: Option<Duration>,
    sends_at_once: usize,
    wrap: impl FnOnce(HyperTransport) -> T,
) -> Result<Sender, CliError> {
    let endpoint = parse_url("--send-url", &global.send_url)?;
    let transport = transport(global, sends_at_once)?;
    let tokens = token_provider(global, &transport)?;
    Ok(Sender::builder(wrap(transport), tokens)
        .endpoint(endpoint)
        .retry_policy(retry_policy(global, default_deadline))
        .build())
}

/// The FCM sender for `send` and `broadcast` when `--fcm` names a key file: the key's project
/// at `--fcm-url`, its tokens from the key's token endpoint; `None` without `--fcm`.
pub fn fcm_sender(
    global: &Global,
    default_deadline: Option<Duration>,
    sends_at_once: usize,
) -> Result<Option<Sender<Fcm>>, CliError> {
    fcm_sender_over(global, default_deadline, sends_at_once, |transport| {
        transport
    })
}

/// [`fcm_sender`], its sends (not its token requests) through `wrap` of the transport.
pub fn fcm_sender_over<T: Transport + 'static>(
    global: &Global,
    default_deadline: Option<Duration>,
    sends_at_once: usize,
    wrap: impl FnOnce(HyperTransport) -> T,
) -> Result<Option<Sender<Fcm>>, CliError> {
    let Some(path) = &global.fcm else {
        return Ok(None);
    };
    let key =
        ServiceAccountKey::from_file(path).map_err(|e| CliError::Usage(format!("--fcm: {e}")))?;
    // The token endpoint is the key file's; plain HTTP only to loopback, as for every URL.
    parse_url("--fcm (its token_uri)", &key.token_uri().to_string())?;
    let base = parse_url("--fcm-url", &global.fcm_url)?.to_string();
    let fcm = Fcm::new(key.project_id()).map_err(|e| CliError::Usage(format!("--fcm: {e}")))?;
    let endpoint = fcm.send_uri(&base);
    let transport = transport(global, sends_at_once)?;
    let tokens = ServiceAccountTokens::new(key, transport.clone());
    Ok(Some(
        Sender::with_protocol(fcm, wrap(transport), tokens)
            .endpoint(endpoint)
            .retry_policy(retry_policy(global, default_deadline))
            .build(),
    ))
}

/// The FCM message of `send` (to `to`) or the template of `broadcast`. C2DM's
/// `--delay-while-idle` has no FCM counterpart: refused, not dropped.
pub fn fcm_message(args: &MessageArgs, to: &str) -> Result<FcmMessage, CliError> {
    FcmMessage::from_c2dm(&message(args, to)?)
        .map_err(|e| CliError::Usage(format!("invalid message for FCM: {e}")))
}

/// The retry policy the global options describe; `default_deadline` applies when
/// `--deadline` is not given.
pub fn retry_policy(global: &Global, default_deadline: Option<Duration>) -> RetryPolicy {
    let policy = RetryPolicy::default()
        .with_max_attempts(global.max_attempts)
        .with_initial_backoff(Duration::from_secs_f64(global.initial_backoff));
    match global
        .deadline
        .map(Duration::from_secs_f64)
        .or(default_deadline)
    {
        Some(deadline) => policy.with_deadline(deadline),
        None => policy,
    }
}

/// The message of `send` (to `to`) or the template of `broadcast`.
pub fn message(args: &MessageArgs, to: &str) -> Result<Message, CliError> {
    let mut builder = Message::builder(to)
        .collapse_key(&args.collapse_key)
        .delay_while_idle(args.delay_while_idle);
    for (key, value) in &args.data {
        builder = builder.data(key, value);
    }
    builder
        .build()
        .map_err(|e| CliError::Usage(format!("invalid message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "https://android.apis.google.com/c2dm/send",
            "http://127.0.0.1:8080/c2dm/send",
            "http://127.1.2.3/x",
            "http://[::1]:9/x",
            "http://localhost:1/x",
        ] {
            assert!(parse_url("--send-url", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://android.apis.google.com/c2dm/send",
            "http://10.0.0.1/x",
            "http://[::2]/x",
            "http://localhost.example.com/x",
            "ftp://127.0.0.1/x",
            "not a url",
        ] {
            let err = parse_url("--send-url", bad).unwrap_err();
            assert!(matches!(err, CliError::Usage(_)), "{bad}");
        }
        let err =
            parse_url("--login-url", "http://www.google.com/accounts/ClientLogin").unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn proxy_options_reach_the_transport_and_never_show_the_password() {
        use clap::Parser;
        let cli = |args: &[&str]| {
            crate::args::Cli::try_parse_from(["c2dm"].iter().chain(args).chain(&["login"]).copied())
        };
        let parsed = cli(&[
            "--proxy",
            "http://alice:hunter2@proxy.internal:3128",
            "--no-proxy",
            "localhost",
        ])
        .unwrap();
        assert!(transport(&parsed.global, 1).is_ok());
        let shown = format!("{:?}", parsed.global);
        assert!(shown.contains("proxy.internal:3128"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");

        let parsed = cli(&["--proxy", "socks5://alice:hunter2@proxy:1080"]).unwrap();
        let err = transport(&parsed.global, 1).unwrap_err().to_string();
        assert!(err.starts_with("--proxy: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!format!("{:?}", parsed.global).contains("hunter2"));

        // One source of proxies at a time.
        assert!(cli(&["--proxy", "http://p:1", "--proxy-from-env"]).is_err());
    }

    #[tokio::test]
    async fn the_transport_keeps_a_connection_for_each_send_at_once() {
        use clap::Parser;
        let parsed = crate::args::Cli::try_parse_from(["c2dm", "login"]).unwrap();
        let idle = |sends: usize| format!("{:?}", transport(&parsed.global, sends).unwrap());
        let kept = |n: usize| format!("pool_max_idle_per_host: {n},");
        assert!(idle(256).contains(&kept(256)), "{}", idle(256));
        // Never fewer than the library's default.
        let default = c2dm_hyper::DEFAULT_MAX_IDLE_PER_HOST;
        assert!(idle(1).contains(&kept(default)), "{}", idle(1));
    }
}
