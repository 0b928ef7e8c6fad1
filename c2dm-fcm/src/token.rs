//! Access tokens for FCM from a service account: the token endpoint's wire format as pure
//! functions, and [`ServiceAccountTokens`], a token provider that keeps one token until shortly
//! before it expires and renews it once for every send waiting.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use c2dm_core::{
    AuthToken, Login, TokenCache, TokenError, TokenProvider, Transport, TransportErrorKind,
};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use crate::key::{FCM_SCOPE, KeyError, ServiceAccountKey};

/// The grant type of an assertion exchanged for a token (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// How long before its expiry a token is renewed (a quarter of its life, for a token that
/// lives less than twenty minutes): sends never carry a token about to lapse.
pub const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// When a token that lives `lifetime` is renewed, before its expiry.
fn renewal_margin(lifetime: Duration) -> Duration {
    RENEW_BEFORE.min(lifetime / 4)
}

/// A token and how long it lives, as the token endpoint gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The token (redacted in `Debug` and `Display`).
    pub token: AuthToken,
    /// How long it is valid from the answer.
    pub expires_in: Duration,
}

/// Why the token endpoint gave no token. Never holds the key, the assertion or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenEndpointError {
    /// The key could not make an assertion.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// `invalid_grant`: the assertion was refused (a deleted or disabled key, a clock far off,
    /// a wrong audience). Not retried.
    #[error(
        "the token endpoint refused the service account's assertion (invalid_grant): {description}"
    )]
    InvalidGrant {
        /// The endpoint's words.
        description: String,
    },
    /// Another OAuth error (`invalid_client`, `unauthorized_client`, `invalid_scope`, …). Not
    /// retried.
    #[error("the token endpoint refused the request ({error}): {description}")]
    Refused {
        /// The OAuth error code.
        error: String,
        /// The endpoint's words.
        description: String,
    },
    /// A 5xx or 429: retried.
    #[error("the token endpoint is unavailable (HTTP {status})")]
    Unavailable {
        /// The HTTP status.
        status: u16,
        /// How long it asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// An answer that is not what an OAuth token endpoint writes: retried.
    #[error("malformed answer from the token endpoint (HTTP {status})")]
    Malformed {
        /// The HTTP status.
        status: u16,
    },
    /// The exchange did not complete: retried.
    #[error("the token endpoint could not be reached: {detail}")]
    Transport {
        /// What kind of failure.
        kind: TransportErrorKind,
        /// The failure, in words.
        detail: String,
    },
}

impl TokenEndpointError {
    /// Whether asking again later may give a token.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Malformed { .. } | Self::Transport { .. }
        )
    }
}

/// The token request for `key`, made at `now`: a form POST of the signed assertion to the
/// key's `token_uri`.
pub fn encode_token_request(
    key: &ServiceAccountKey,
    now: SystemTime,
) -> Result<Request<Bytes>, KeyError> {
    let assertion = key.assertion(FCM_SCOPE, now)?;
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", JWT_BEARER_GRANT)
        .append_pair("assertion", &assertion)
        .finish();
    let body = Bytes::from(body);
    let length = HeaderValue::from(body.len());
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = key.token_uri().clone();
    let headers = request.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(CONTENT_LENGTH, length);
    Ok(request)
}

/// Reads the token endpoint's answer: the token and its lifetime, or why there is none.
/// Never panics, whatever the answer.
pub fn decode_token_answer(
    response: &Response<Bytes>,
    now: SystemTime,
) -> Result<AccessToken, TokenEndpointError> {
    let status = response.status();
    let malformed = TokenEndpointError::Malformed {
        status: status.as_u16(),
    };
    let json: Option<Value> = serde_json::from_slice(response.body()).ok();
    let text = |field: &str| {
        json.as_ref()
            .and_then(|j| j.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if status == StatusCode::OK {
        let token = text("access_token")
            .and_then(|t| AuthToken::new(t).ok())
            .ok_or(malformed.clone())?;
        if text("token_type").is_some_and(|t| !t.eq_ignore_ascii_case("bearer")) {
            return Err(malformed);
        }
        let expires_in = json
            .as_ref()
            .and_then(|j| j.get("expires_in"))
            .and_then(Value::as_u64)
            .ok_or(malformed)?;
        return Ok(AccessToken {
            token,
            expires_in: Duration::from_secs(expires_in),
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| c2dm_core::codec::parse_retry_after(v, now));
        return Err(TokenEndpointError::Unavailable {
            status: status.as_u16(),
            retry_after,
        });
    }
    let description = text("error_description").unwrap_or_default();
    match text("error") {
        Some(error) if error == "invalid_grant" => {
            Err(TokenEndpointError::InvalidGrant { description })
        }
        Some(error) => Err(TokenEndpointError::Refused { error, description }),
        None => Err(malformed),
    }
}

/// Tokens of one service account, each with when it is to be renewed (on tokio's clock).
#[derive(Debug, Default)]
struct Expiries(VecDeque<(AuthToken, Instant)>);

/// How many tokens' expiries are remembered.
const REMEMBERED: usize = 8;

impl Expiries {
    fn note(&mut self, token: AuthToken, at: Instant) {
        if self.0.len() == REMEMBERED {
            self.0.pop_front();
        }
        self.0.push_back((token, at));
    }

    fn of(&self, token: &AuthToken) -> Option<Instant> {
        self.0
            .iter()
            .rev()
            .find(|(t, _)| t == token)
            .map(|(_, at)| *at)
    }
}

/// The exchange of an assertion for a token, as a [`Login`] for [`TokenCache`].
struct AssertionLogin {
    key: ServiceAccountKey,
    transport: Arc<dyn Transport>,
    expiries: Arc<Mutex<Expiries>>,
    wall_clock: fn() -> SystemTime,
}

#[async_trait]
impl Login for AssertionLogin {
    async fn login(&self) -> Result<AuthToken, TokenError> {
        let fail = |e: TokenEndpointError| TokenError::unavailable(e.is_retryable(), e);
        let now = (self.wall_clock)();
        let request = encode_token_request(&self.key, now).map_err(|e| fail(e.into()))?;
        let asked = Instant::now();
        let response = self.transport.execute(request).await.map_err(|e| {
            fail(TokenEndpointError::Transport {
                kind: e.kind(),
                detail: e.to_string(),
            })
        })?;
        let answer = decode_token_answer(&response, (self.wall_clock)()).map_err(fail)?;
        // Counted from the request: the token may have been made as it left.
        let renew_at = asked + answer.expires_in - renewal_margin(answer.expires_in);
        self.expiries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(answer.token.clone(), renew_at);
        tracing::info!(
            client_email = self.key.client_email(),
            expires_in_s = answer.expires_in.as_secs(),
            "FCM access token obtained"
        );
        Ok(answer.token)
    }
}

/// A [`TokenProvider`] for FCM from a service account key: exchanges a signed assertion for an
/// access token on first use, keeps it until [`RENEW_BEFORE`] before its expiry (a quarter of
/// its life before, for a short-lived one), then renews it once for every send that asks
/// meanwhile; renews on a refusal (401) the same way, and shares a failed exchange with those
/// waiting for it (see [`TokenCache`]).
///
/// ```no_run
/// # async fn run(transport: impl c2dm_core::Transport + 'static) -> Result<(), Box<dyn std::error::Error>> {
/// use c2dm_core::TokenProvider;
/// use c2dm_fcm::{ServiceAccountKey, ServiceAccountTokens};
///
/// let key = ServiceAccountKey::from_file("service-account.json")?;
/// let tokens = ServiceAccountTokens::new(key, transport);
/// let token = tokens.token().await?;
/// # let _ = token;
/// # Ok(())
/// # }
/// ```
pub struct ServiceAccountTokens {
    cache: TokenCache<AssertionLogin>,
    expiries: Arc<Mutex<Expiries>>,
}

impl std::fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountTokens")
            .field("client_email", &self.cache.login().key.client_email())
            .field("logins", &self.cache.login_count())
            .finish_non_exhaustive()
    }
}

impl ServiceAccountTokens {
    /// Tokens of `key`'s service account, from its token endpoint through `transport`.
    pub fn new(key: ServiceAccountKey, transport: impl Transport + 'static) -> Self {
        Self::with_clock(key, transport, SystemTime::now)
    }

    /// As [`new`](Self::new), with the wall clock the assertions are dated by.
    pub fn with_clock(
        key: ServiceAccountKey,
        transport: impl Transport + 'static,
        wall_clock: fn() -> SystemTime,
    ) -> Self {
        let expiries = Arc::new(Mutex::new(Expiries::default()));
        Self {
            cache: TokenCache::new(AssertionLogin {
                key,
                transport: Arc::new(transport),
                expiries: Arc::clone(&expiries),
                wall_clock,
            }),
            expiries,
        }
    }

    /// The service account's key.
    pub fn key(&self) -> &ServiceAccountKey {
        &self.cache.login().key
    }

    /// How many tokens were asked of the token endpoint.
    pub fn exchanges(&self) -> u64 {
        self.cache.login_count()
    }

    fn renew_at(&self, token: &AuthToken) -> Option<Instant> {
        self.expiries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .of(token)
    }
}

#[async_trait]
impl TokenProvider for ServiceAccountTokens {
    async fn token(&self) -> Result<AuthToken, TokenError> {
        let token = self.cache.token().await?;
        match self.renew_at(&token) {
            // About to lapse: renewed once, whoever else asks meanwhile (they pass the same
            // token, and the cache gives them the new one).
            Some(renew_at) if Instant::now() >= renew_at => self.cache.refresh(&token).await,
            _ => Ok(token),
        }
    }

    fn rotate(&self, used: &AuthToken, new: AuthToken) {
        self.cache.rotate(used, new)
    }

    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        self.cache.refresh(refused).await
    }

    fn logins(&self) -> Option<u64> {
        Some(self.exchanges())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use c2dm_core::TransportError;
    use std::sync::atomic::{AtomicU64, Ordering};

    const KEY: &[u8] = include_bytes!("../tests/data/service-account.json");

    fn key() -> ServiceAccountKey {
        ServiceAccountKey::from_json(KEY).unwrap()
    }

    fn answer(status: u16, body: &str) -> Response<Bytes> {
        Response::builder()
            .status(status)
            .body(Bytes::from(body.to_owned()))
            .unwrap()
    }

    #[test]
    fn the_token_request_posts_a_signed_assertion_to_the_token_uri() {
        let key = key();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let request = encode_token_request(&key, now).unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), key.token_uri());
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(request.body())
                .into_owned()
                .collect();
        assert_eq!(form["grant_type"], JWT_BEARER_GRANT);
        let claims =
            crate::key::verify_assertion(&form["assertion"], key.public_key_der()).unwrap();
        assert_eq!(claims.scope, FCM_SCOPE);
        assert_eq!(claims.iat, 1_700_000_000);
    }

    #[test]
    fn each_answer_of_the_token_endpoint_is_typed() {
        let now = SystemTime::UNIX_EPOCH;
        let ok = decode_token_answer(
            &answer(
                200,
                r#"{"access_token": "ya29.a", "expires_in": 3599, "token_type": "Bearer"}"#,
            ),
            now,
        )
        .unwrap();
        assert_eq!(ok.token.expose_secret(), "ya29.a");
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        assert!(!format!("{ok:?}").contains("ya29"));
        let cases = [
            (
                answer(
                    400,
                    r#"{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}"#,
                ),
                TokenEndpointError::InvalidGrant {
                    description: "Invalid JWT Signature.".into(),
                },
                false,
            ),
            (
                answer(
                    401,
                    r#"{"error": "invalid_client", "error_description": "disabled"}"#,
                ),
                TokenEndpointError::Refused {
                    error: "invalid_client".into(),
                    description: "disabled".into(),
                },
                false,
            ),
            (
                answer(503, ""),
                TokenEndpointError::Unavailable {
                    status: 503,
                    retry_after: None,
                },
                true,
            ),
            (
                answer(400, "<html>"),
                TokenEndpointError::Malformed { status: 400 },
                true,
            ),
            (
                answer(
                    200,
                    r#"{"access_token": "a", "token_type": "mac", "expires_in": 1}"#,
                ),
                TokenEndpointError::Malformed { status: 200 },
                true,
            ),
            (
                answer(200, r#"{"access_token": "a"}"#),
                TokenEndpointError::Malformed { status: 200 },
                true,
            ),
        ];
        for (response, error, retryable) in cases {
            assert_eq!(decode_token_answer(&response, now), Err(error.clone()));
            assert_eq!(error.is_retryable(), retryable, "{error:?}");
        }
    }

    /// A token endpoint that hands out `ya29.<n>` tokens living `lifetime`, counting them.
    fn endpoint(
        lifetime: u64,
        issued: Arc<AtomicU64>,
    ) -> impl Fn(Request<Bytes>) -> std::future::Ready<Result<Response<Bytes>, TransportError>>
    + Send
    + Sync {
        move |request: Request<Bytes>| {
            let form: std::collections::HashMap<String, String> =
                form_urlencoded::parse(request.body())
                    .into_owned()
                    .collect();
            assert_eq!(form["grant_type"], JWT_BEARER_GRANT);
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Ok(answer(
                200,
                &format!(
                    r#"{{"access_token": "ya29.{n}", "expires_in": {lifetime}, "token_type": "Bearer"}}"#
                ),
            )))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_exchange_serves_every_send_until_the_token_nears_its_expiry() {
        let issued = Arc::new(AtomicU64::new(0));
        let tokens = Arc::new(ServiceAccountTokens::new(
            key(),
            endpoint(3600, Arc::clone(&issued)),
        ));
        let asks: Vec<_> = (0..100)
            .map(|_| {
                let tokens = Arc::clone(&tokens);
                tokio::spawn(async move { tokens.token().await.unwrap() })
            })
            .collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap().expose_secret(), "ya29.1");
        }
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        // Until five minutes before its hour is up, the same token.
        tokio::time::advance(Duration::from_secs(3600) - RENEW_BEFORE - Duration::from_secs(1))
            .await;
        assert_eq!(tokens.token().await.unwrap().expose_secret(), "ya29.1");
        tokio::time::advance(Duration::from_secs(1)).await;
        let asks: Vec<_> = (0..50)
            .map(|_| {
                let tokens = Arc::clone(&tokens);
                tokio::spawn(async move { tokens.token().await.unwrap() })
            })
            .collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap().expose_secret(), "ya29.2");
        }
        assert_eq!(issued.load(Ordering::SeqCst), 2, "renewed once for all");
        assert_eq!(tokens.exchanges(), 2);
        // A refusal renews once too.
        let refused = tokens.token().await.unwrap();
        let (a, b) = tokio::join!(tokens.refresh(&refused), tokens.refresh(&refused));
        assert_eq!(a.unwrap().expose_secret(), "ya29.3");
        assert_eq!(b.unwrap().expose_secret(), "ya29.3");
        assert_eq!(issued.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_lived_token_is_renewed_at_three_quarters_of_its_life() {
        let issued = Arc::new(AtomicU64::new(0));
        let tokens = ServiceAccountTokens::new(key(), endpoint(60, Arc::clone(&issued)));
        assert_eq!(tokens.token().await.unwrap().expose_secret(), "ya29.1");
        tokio::time::advance(Duration::from_secs(44)).await;
        assert_eq!(tokens.token().await.unwrap().expose_secret(), "ya29.1");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(tokens.token().await.unwrap().expose_secret(), "ya29.2");
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        assert_eq!(renewal_margin(Duration::from_secs(3600)), RENEW_BEFORE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_assertion_is_typed_final_and_shared() {
        let asked = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&asked);
        let refusing = move |_: Request<Bytes>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                // The answer takes a moment: the other sends ask meanwhile.
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, TransportError>(answer(
                    400,
                    r#"{"error": "invalid_grant", "error_description": "account not found"}"#,
                ))
            }
        };
        let tokens = Arc::new(ServiceAccountTokens::new(key(), refusing));
        let asks: Vec<_> = (0..10)
            .map(|_| {
                let tokens = Arc::clone(&tokens);
                tokio::spawn(async move { tokens.token().await })
            })
            .collect();
        for ask in asks {
            let error = ask.await.unwrap().unwrap_err();
            assert!(!error.is_retryable());
            assert!(error.to_string().contains("invalid_grant"), "{error}");
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }
}
