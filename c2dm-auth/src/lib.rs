//! ClientLogin for C2DM senders: how an app server gets its Auth token.
//!
//! - [`Credentials`]: the sender account; the password never shows in `Debug` or errors.
//! - [`codec`]: the login request and answer as pure functions, every error code typed,
//!   CAPTCHA challenges with an absolute image URL.
//! - [`ClientLogin`]: a [`TokenProvider`] over any [`Transport`] that logs in on first use,
//!   caches the token, takes rotated tokens, and logs in again — once for all concurrent callers
//!   — when the token is refused. `ServiceUnavailable` is retried with backoff; bad credentials
//!   are not.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use c2dm_auth::{ClientLogin, Credentials};
//! use c2dm_core::TokenProvider;
//! use c2dm_mock::RecordingTransport;
//!
//! let fake = RecordingTransport::new().account("sender@gmail.com", "app-password");
//! let login = ClientLogin::new(
//!     Credentials::new("sender@gmail.com", "app-password", "shop-app-1"),
//!     fake.clone(),
//! );
//! let token = login.token().await?; // logs in
//! assert_eq!(login.token().await?, token); // cached
//! assert_eq!(fake.successful_logins(), 1);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod codec;
mod credentials;
pub mod server;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use c2dm_core::{AuthToken, Login, TokenCache, TokenError, TokenProvider, Transport};
use http::Uri;

pub use codec::{CaptchaAnswer, CaptchaChallenge, LoginError, LoginErrorCode};
pub use credentials::{AccountType, Credentials, DEFAULT_SOURCE, MissingEnv, Password};

/// Logs in through ClientLogin and keeps the token; a [`TokenProvider`] for the `Sender`.
///
/// A CAPTCHA is answered with [`ClientLogin::answer_captcha`]; the next login sends the answer.
pub struct ClientLogin {
    cache: TokenCache<LoginClient>,
}

struct LoginClient {
    transport: Arc<dyn Transport>,
    credentials: Credentials,
    endpoint: Uri,
    captcha: Mutex<Option<CaptchaAnswer>>,
    max_attempts: u32,
    initial_backoff: Duration,
}

impl fmt::Debug for ClientLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client = self.cache.login();
        f.debug_struct("ClientLogin")
            .field("credentials", &client.credentials)
            .field("endpoint", &client.endpoint)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl ClientLogin {
    /// Logs in as `credentials` at Google's endpoint over `transport`, with the default retries.
    pub fn new(credentials: Credentials, transport: impl Transport + 'static) -> Self {
        Self::builder(credentials, transport).build()
    }

    /// Starts a [`ClientLogin`] with settings; their order does not matter.
    ///
    /// ```
    /// use std::time::Duration;
    /// use c2dm_auth::{ClientLogin, Credentials};
    /// use c2dm_core::AuthToken;
    /// use c2dm_mock::RecordingTransport;
    ///
    /// let login = ClientLogin::builder(
    ///     Credentials::new("sender@example.com", "password", "shop-app-1"),
    ///     RecordingTransport::new(),
    /// )
    /// .token(AuthToken::new("from-an-earlier-login")?)
    /// .endpoint("https://127.0.0.1:8443/accounts/ClientLogin".parse()?)
    /// .retries(5, Duration::from_millis(500))
    /// .build();
    /// assert_eq!(login.login_count(), 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn builder(
        credentials: Credentials,
        transport: impl Transport + 'static,
    ) -> ClientLoginBuilder {
        ClientLoginBuilder {
            client: LoginClient {
                transport: Arc::new(transport),
                credentials,
                endpoint: codec::default_login_uri(),
                captcha: Mutex::new(None),
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
            },
            token: None,
        }
    }

    /// The credentials in use.
    pub fn credentials(&self) -> &Credentials {
        &self.cache.login().credentials
    }

    /// Gives the answer to a CAPTCHA; the next login sends it.
    pub fn answer_captcha(&self, answer: CaptchaAnswer) {
        *self
            .cache
            .login()
            .captcha
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(answer);
    }

    /// Logs in now, whatever is cached, and returns the token or the typed error (with the
    /// CAPTCHA challenge, if one is asked for). The token is cached for later sends, and the
    /// login is counted by [`ClientLogin::login_count`].
    pub async fn login_now(&self) -> Result<AuthToken, LoginError> {
        self.cache.login_now().await.map_err(|err| {
            login_error_of(&err).cloned().unwrap_or_else(|| {
                LoginError::Transport(
                    c2dm_core::TransportError::new(
                        c2dm_core::TransportErrorKind::Other,
                        c2dm_core::RequestSent::No,
                    )
                    .with_message(err.to_string()),
                )
            })
        })
    }

    /// How many logins were attempted: by sends needing a token, and by [`ClientLogin::login_now`].
    pub fn login_count(&self) -> u64 {
        self.cache.login_count()
    }
}

/// Builds a [`ClientLogin`]; see [`ClientLogin::builder`].
#[must_use = "a builder does nothing until build() is called"]
pub struct ClientLoginBuilder {
    client: LoginClient,
    token: Option<AuthToken>,
}

impl fmt::Debug for ClientLoginBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientLoginBuilder")
            .field("credentials", &self.client.credentials)
            .field("endpoint", &self.client.endpoint)
            .field("has_token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientLoginBuilder {
    /// Logs in at `endpoint` instead of Google's (e.g. a local emulator).
    pub fn endpoint(mut self, endpoint: Uri) -> Self {
        self.client.endpoint = endpoint;
        self
    }

    /// How many times one login is tried when the service is unavailable (default 3, at least
    /// 1), waiting `initial_backoff` (default 1 s), then twice that, and so on, in between.
    pub fn retries(mut self, max_attempts: u32, initial_backoff: Duration) -> Self {
        self.client.max_attempts = max_attempts.max(1);
        self.client.initial_backoff = initial_backoff;
        self
    }

    /// Starts with a token obtained earlier; logs in only when it is refused.
    pub fn token(mut self, token: AuthToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Builds the [`ClientLogin`].
    pub fn build(self) -> ClientLogin {
        let cache = match self.token {
            Some(token) => TokenCache::with_token(self.client, token),
            None => TokenCache::new(self.client),
        };
        ClientLogin { cache }
    }
}

impl LoginClient {
    async fn login_once(&self) -> Result<AuthToken, LoginError> {
        let answer = self
            .captcha
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let request =
            codec::encode_login_request(&self.credentials, answer.as_ref(), &self.endpoint);
        let response = self.transport.execute(request).await?;
        let result =
            codec::decode_login_response(response.status(), response.body(), &self.endpoint);
        if answer.is_some() {
            // An answer is good for one try: a new challenge needs a new answer.
            *self.captcha.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        result
    }

    async fn login_with_retries(&self) -> Result<AuthToken, LoginError> {
        let mut delay = self.initial_backoff;
        let mut attempt = 1;
        loop {
            match self.login_once().await {
                Ok(token) => {
                    tracing::info!(email = %self.credentials.email(), "logged in");
                    return Ok(token);
                }
                Err(err) if err.is_retryable() && attempt < self.max_attempts => {
                    tracing::warn!(%err, attempt, "login failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
                Err(err) => {
                    tracing::warn!(%err, "login failed");
                    return Err(err);
                }
            }
        }
    }
}

#[async_trait]
impl Login for LoginClient {
    async fn login(&self) -> Result<AuthToken, TokenError> {
        self.login_with_retries()
            .await
            .map_err(|err| TokenError::unavailable(err.is_retryable(), err))
    }
}

#[async_trait]
impl TokenProvider for ClientLogin {
    async fn token(&self) -> Result<AuthToken, TokenError> {
        self.cache.token().await
    }

    fn rotate(&self, used: &AuthToken, new: AuthToken) {
        self.cache.rotate(used, new)
    }

    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        self.cache.refresh(refused).await
    }

    fn logins(&self) -> Option<u64> {
        Some(self.login_count())
    }
}

/// The [`LoginError`] behind a [`TokenError`] from [`ClientLogin`], if that is what it is: how a
/// caller of `Sender::send` finds a CAPTCHA challenge.
pub fn login_error_of(err: &TokenError) -> Option<&LoginError> {
    match err {
        TokenError::Unavailable { source, .. } => source.downcast_ref::<LoginError>(),
        _ => None,
    }
}
