//! Building the client stack from the global options, and the `login` and `send` commands.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use c2dm_auth::{CaptchaAnswer, ClientLogin, Credentials, LoginError};
use c2dm_core::{AuthToken, Message, RetryPolicy, Sender, StaticToken, TokenProvider};
use c2dm_hyper::HyperTransport;

use crate::args::{Global, LoginArgs, MessageArgs, SendArgs};
use crate::journal::JournalLine;

/// A failure, and the exit code it earns.
#[derive(Debug)]
pub enum CliError {
    /// Bad input, found before anything was sent: exit 2.
    Usage(String),
    /// Something failed on the way: exit 1.
    Failure(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(text) | Self::Failure(text) => f.write_str(text),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::from(2),
            Self::Failure(_) => ExitCode::from(1),
        }
    }
}

/// Parses a URL given on the command line.
pub fn parse_url(flag: &str, url: &str) -> Result<http::Uri, CliError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| CliError::Usage(format!("{flag}: not a URL: {url:?} ({e})")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(CliError::Usage(format!(
            "{flag}: expected an http:// or https:// URL, got {url:?}"
        ))),
    }
}

/// The production transport, trusting `--ca-cert` besides the usual roots.
pub fn transport(global: &Global) -> Result<HyperTransport, CliError> {
    let mut builder =
        HyperTransport::builder().request_timeout(Duration::from_secs_f64(global.timeout));
    if let Some(path) = &global.ca_cert {
        let pem = std::fs::read(path).map_err(|e| {
            CliError::Usage(format!("--ca-cert: cannot read {}: {e}", path.display()))
        })?;
        builder = builder
            .add_root_certificates_pem(&pem)
            .map_err(|e| CliError::Usage(format!("--ca-cert: {}: {e}", path.display())))?;
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

/// The sender for `send` and `broadcast`.
pub fn sender(global: &Global) -> Result<Sender, CliError> {
    let endpoint = parse_url("--send-url", &global.send_url)?;
    let transport = transport(global)?;
    let tokens = token_provider(global, &transport)?;
    Ok(Sender::builder(transport, tokens)
        .endpoint(endpoint)
        .retry_policy(RetryPolicy::default().with_max_attempts(global.max_attempts))
        .build())
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

fn print_login_error(err: &LoginError) -> CliError {
    CliError::Failure(err.to_string())
}

/// `c2dm login`.
pub async fn login(global: &Global, args: LoginArgs) -> Result<ExitCode, CliError> {
    let transport = transport(global)?;
    let Some(credentials) = credentials(global)? else {
        return Err(CliError::Usage(
            "login needs --email (or C2DM_EMAIL) and C2DM_PASSWORD or --password-file".into(),
        ));
    };
    let login = client_login(global, credentials, transport, None)?;
    if let (Some(token), Some(answer)) = (args.captcha_token, args.captcha_answer) {
        login.answer_captcha(CaptchaAnswer { token, answer });
    }
    let token = loop {
        match login.login_now().await {
            Ok(token) => break token,
            Err(err) => {
                let Some(challenge) = err.captcha() else {
                    return Err(print_login_error(&err));
                };
                if !std::io::stdin().is_terminal() {
                    return Err(CliError::Failure(format!(
                        "{err}\nCAPTCHA image: {}\nanswer it with --captcha-token {} --captcha-answer ANSWER",
                        challenge.image_url, challenge.token
                    )));
                }
                eprintln!("ClientLogin asks for a CAPTCHA: {}", challenge.image_url);
                eprint!("Type the characters you see: ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                std::io::stdin()
                    .read_line(&mut answer)
                    .map_err(|e| CliError::Failure(format!("reading the answer: {e}")))?;
                login.answer_captcha(challenge.answer(answer.trim()));
            }
        }
    };
    if global.json {
        println!("{}", serde_json::json!({ "token": token.expose_secret() }));
    } else {
        println!("{}", token.expose_secret());
    }
    Ok(ExitCode::SUCCESS)
}

/// `c2dm send`.
pub async fn send(global: &Global, args: SendArgs) -> Result<ExitCode, CliError> {
    let message = message(&args.message, &args.to)?;
    let sender = sender(global)?;
    let result = sender.send(message).await;
    let line = JournalLine::of_send(&args.to, &result);
    if global.json {
        println!("{}", line.to_json());
    }
    match result {
        Ok(sent) => {
            if !global.json {
                println!("{}", sent.message_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            if !global.json {
                if let Some(code) = failure.error.code().filter(|c| !c.is_retryable()) {
                    let advice = if failure.should_remove_registration() {
                        "remove this registration id"
                    } else {
                        "keep this registration id"
                    };
                    println!("rejected: {code} ({advice})");
                } else {
                    eprintln!("error: {failure}");
                }
            }
            Ok(ExitCode::from(1))
        }
    }
}
