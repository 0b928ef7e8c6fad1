//! The sender's Auth token, and where it comes from.

use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use http::HeaderValue;

/// A ClientLogin `Auth` token: the secret that authorises sends.
///
/// Its `Debug` and `Display` never show the value; only [`AuthToken::expose_secret`] does, for the
/// one place that must put it on the wire.
///
/// ```
/// use c2dm_core::AuthToken;
/// let token = AuthToken::new("DQAAAGgA-secret")?;
/// assert_eq!(format!("{token:?}"), "AuthToken(<redacted>)");
/// assert_eq!(token.to_string(), "<redacted>");
/// assert_eq!(token.expose_secret(), "DQAAAGgA-secret");
/// # Ok::<(), c2dm_core::InvalidToken>(())
/// ```
///
/// Clones share one record of whether the service ever accepted a message sent with the token
/// ([`AuthToken::has_worked`]): how a [`Sender`](crate::Sender) tells a token that expired
/// under load from one that never worked.
#[derive(Clone)]
pub struct AuthToken {
    inner: Arc<TokenInner>,
}

struct TokenInner {
    /// The whole `Authorization` header, `GoogleLogin auth=<token>`, marked sensitive: built
    /// once, shared by every request that carries the token.
    header: HeaderValue,
    /// Whether a message sent with this token was accepted.
    worked: AtomicBool,
}

impl PartialEq for AuthToken {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.header == other.inner.header
    }
}

impl Eq for AuthToken {}

impl std::hash::Hash for AuthToken {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.header.hash(state);
    }
}

/// What comes before the token in the `Authorization` header: `GoogleLogin auth=`.
pub const AUTH_SCHEME: &str = "GoogleLogin auth=";

/// The text given as a token cannot be one: empty, or with characters an HTTP header cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an auth token must be non-empty visible ASCII")]
pub struct InvalidToken;

impl AuthToken {
    /// Wraps a token; it must be non-empty visible ASCII (it travels in a header).
    pub fn new(token: impl AsRef<str>) -> Result<Self, InvalidToken> {
        let token = token.as_ref();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken);
        }
        let mut header =
            HeaderValue::try_from(format!("{AUTH_SCHEME}{token}")).map_err(|_| InvalidToken)?;
        header.set_sensitive(true);
        Ok(Self {
            inner: Arc::new(TokenInner {
                header,
                worked: AtomicBool::new(false),
            }),
        })
    }

    /// The secret itself. Put it on the wire; never in a log.
    pub fn expose_secret(&self) -> &str {
        // Visible ASCII by construction, so `to_str` cannot fail.
        self.inner
            .header
            .to_str()
            .map_or("", |h| h.strip_prefix(AUTH_SCHEME).unwrap_or(h))
    }

    /// The `Authorization` header that carries it (sensitive: `Debug` does not show it).
    pub(crate) fn authorization(&self) -> HeaderValue {
        self.inner.header.clone()
    }

    /// Whether the service accepted a message sent with this token (or a clone of it): then a
    /// later refusal means it expired, not that it was never any good.
    pub fn has_worked(&self) -> bool {
        self.inner.worked.load(Ordering::Relaxed)
    }

    /// Records that the service accepted a message sent with this token.
    pub fn mark_worked(&self) {
        // Read first: after the first acceptance, sends only read the shared flag.
        if !self.has_worked() {
            self.inner.worked.store(true, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl fmt::Display for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The service refused the token and this source has no way to get another (a static token).
    #[error("the auth token was refused and this token source cannot obtain another")]
    Refused,
    /// Getting a token failed; `retryable` says whether trying again later may help.
    #[error("could not obtain an auth token: {source}")]
    Unavailable {
        /// Whether a later attempt may succeed (e.g. the login service was unavailable).
        retryable: bool,
        /// What went wrong (never holds a secret).
        source: Arc<dyn StdError + Send + Sync>,
    },
}

impl TokenError {
    /// Wraps a failure to obtain a token.
    pub fn unavailable(retryable: bool, source: impl StdError + Send + Sync + 'static) -> Self {
        Self::Unavailable {
            retryable,
            source: Arc::new(source),
        }
    }

    /// Whether trying again later may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused => false,
            Self::Unavailable { retryable, .. } => *retryable,
        }
    }
}

/// Where the Auth token for sends comes from.
///
/// Implementations are shared by every concurrent send, so they must be cheap to call and safe to
/// call at once. [`StaticToken`] holds a token obtained elsewhere; `c2dm-auth`'s `ClientLogin`
/// logs in and logs in again when a token is refused.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait TokenProvider: Send + Sync {
    /// The token to send with now.
    async fn token(&self) -> Result<AuthToken, TokenError>;

    /// The service rotated the token (`Update-Client-Auth`) in its answer to a request made with
    /// `used`: use `new` for every later request, unless `used` is older than the current token
    /// (a late answer to a request made before a new login must not undo that login).
    fn rotate(&self, used: &AuthToken, new: AuthToken);

    /// The service refused `refused` (HTTP 401): return a token to try instead.
    ///
    /// Implementations should be single-flight: callers that all saw the same refused token share
    /// one refresh, and a caller whose refused token was already replaced gets the replacement.
    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError>;

    /// How many logins this provider has attempted, for a process's metrics; `None` (the
    /// default) for a provider that never logs in.
    fn logins(&self) -> Option<u64> {
        None
    }
}

#[async_trait]
impl<P: TokenProvider + ?Sized> TokenProvider for Arc<P> {
    async fn token(&self) -> Result<AuthToken, TokenError> {
        (**self).token().await
    }
    fn rotate(&self, used: &AuthToken, new: AuthToken) {
        (**self).rotate(used, new)
    }
    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        (**self).refresh(refused).await
    }
    fn logins(&self) -> Option<u64> {
        (**self).logins()
    }
}

/// A token obtained once (by `c2dm login`, say) and used until refused.
///
/// It takes rotated tokens, so a long run keeps working across `Update-Client-Auth`; when the
/// current token is refused it cannot get another and answers [`TokenError::Refused`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use c2dm_core::{AuthToken, StaticToken, TokenProvider};
/// let first = AuthToken::new("first")?;
/// let tokens = StaticToken::new(first.clone());
/// tokens.rotate(&first, AuthToken::new("second")?);
/// assert_eq!(tokens.token().await?.expose_secret(), "second");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct StaticToken {
    current: RwLock<AuthToken>,
}

impl StaticToken {
    /// Uses `token` until it is rotated or refused.
    pub fn new(token: AuthToken) -> Self {
        Self {
            current: RwLock::new(token),
        }
    }

    fn current(&self) -> AuthToken {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl TokenProvider for StaticToken {
    async fn token(&self) -> Result<AuthToken, TokenError> {
        Ok(self.current())
    }

    /// A static token has no logins to be older or newer than: every rotation is taken.
    fn rotate(&self, _used: &AuthToken, new: AuthToken) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
    }

    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        let current = self.current();
        if &current == refused {
            Err(TokenError::Refused)
        } else {
            Ok(current)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_validation() {
        assert!(AuthToken::new("").is_err());
        assert!(AuthToken::new("a b").is_err());
        assert!(AuthToken::new("a\nb").is_err());
        assert!(AuthToken::new("é").is_err());
        assert!(AuthToken::new("DQAAAGgA_-.~+/=").is_ok());
    }

    #[test]
    fn token_is_never_printed() {
        let t = AuthToken::new("s3cr3t").unwrap();
        assert!(!format!("{t:?} {t} {t:#?}").contains("s3cr3t"));
        // The header it builds hides it from Debug too.
        assert!(!format!("{:?}", t.authorization()).contains("s3cr3t"));
    }

    #[tokio::test]
    async fn static_token_rotates_and_refuses() {
        let a = AuthToken::new("a").unwrap();
        let b = AuthToken::new("b").unwrap();
        let p = StaticToken::new(a.clone());
        assert_eq!(p.token().await.unwrap(), a);
        assert!(matches!(p.refresh(&a).await, Err(TokenError::Refused)));
        p.rotate(&a, b.clone());
        // A caller still holding the old refused token gets the rotated one.
        assert_eq!(p.refresh(&a).await.unwrap(), b);
        assert!(matches!(p.refresh(&b).await, Err(TokenError::Refused)));
        assert!(!TokenError::Refused.is_retryable());
    }
}
