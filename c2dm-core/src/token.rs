//! The sender's Auth token, and where it comes from.

use std::error::Error as StdError;
use std::fmt;
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
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AuthToken {
    /// The whole `Authorization` header, `GoogleLogin auth=<token>`, marked sensitive: built
    /// once, shared by every request that carries the token.
    header: HeaderValue,
}

/// What comes before the token in the `Authorization` header.
const AUTH_SCHEME: &str = "GoogleLogin auth=";

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
        Ok(Self { header })
    }

    /// The secret itself. Put it on the wire; never in a log.
    pub fn expose_secret(&self) -> &str {
        // Visible ASCII by construction, so `to_str` cannot fail.
        self.header
            .to_str()
            .map_or("", |h| h.strip_prefix(AUTH_SCHEME).unwrap_or(h))
    }

    /// The `Authorization` header that carries it (sensitive: `Debug` does not show it).
    pub(crate) fn authorization(&self) -> HeaderValue {
        self.header.clone()
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

    /// The service rotated the token (`Update-Client-Auth`): use `new` for every later request.
    fn rotate(&self, new: AuthToken);

    /// The service refused `refused` (HTTP 401): return a token to try instead.
    ///
    /// Implementations should be single-flight: callers that all saw the same refused token share
    /// one refresh, and a caller whose refused token was already replaced gets the replacement.
    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError>;
}

#[async_trait]
impl<P: TokenProvider + ?Sized> TokenProvider for Arc<P> {
    async fn token(&self) -> Result<AuthToken, TokenError> {
        (**self).token().await
    }
    fn rotate(&self, new: AuthToken) {
        (**self).rotate(new)
    }
    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        (**self).refresh(refused).await
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
/// let tokens = StaticToken::new(AuthToken::new("first")?);
/// tokens.rotate(AuthToken::new("second")?);
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

    fn rotate(&self, new: AuthToken) {
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
        let err = TokenError::Refused;
        assert!(!format!("{err:?} {err}").contains("s3cr3t"));
    }

    #[tokio::test]
    async fn static_token_rotates_and_refuses() {
        let a = AuthToken::new("a").unwrap();
        let b = AuthToken::new("b").unwrap();
        let p = StaticToken::new(a.clone());
        assert_eq!(p.token().await.unwrap(), a);
        assert!(matches!(p.refresh(&a).await, Err(TokenError::Refused)));
        p.rotate(b.clone());
        // A caller still holding the old refused token gets the rotated one.
        assert_eq!(p.refresh(&a).await.unwrap(), b);
        assert!(matches!(p.refresh(&b).await, Err(TokenError::Refused)));
        assert!(!TokenError::Refused.is_retryable());
    }
}

/// Obtains a fresh token, e.g. by ClientLogin. Wrapped by [`TokenCache`], which decides when.
#[async_trait]
pub trait Login: Send + Sync {
    /// Logs in and returns a new token.
    async fn login(&self) -> Result<AuthToken, TokenError>;
}

/// A [`TokenProvider`] over a [`Login`]: logs in on first use, caches the token, takes rotated
/// tokens, and logs in again when the token is refused — once for all concurrent callers that saw
/// the same refused token (single-flight).
///
/// A refused token from the current login (the token itself, or one rotated from it) means the
/// login may have expired, so it logs in again; a refused token from an older login gets the
/// current token, as someone logged in since.
///
/// A failed login is shared the same way: callers that waited for it get its error rather than
/// each logging in again, so a wrong password costs one request, not one per waiting send.
pub struct TokenCache<L> {
    login: L,
    state: RwLock<CacheState>,
    gate: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    current: Option<AuthToken>,
    /// The login the current token belongs to (a rotation keeps it); 0 for a token given at
    /// start.
    session: u64,
    /// Recent tokens with the login each belongs to: how a refusal of an old token is told
    /// from a refusal of the current login.
    recent: std::collections::VecDeque<(AuthToken, u64)>,
    /// Counts finished login attempts, so a waiter can tell whether one finished while it waited.
    logins: u64,
    /// Counts successful logins: the session number of the newest.
    sessions: u64,
    last_error: Option<TokenError>,
}

/// How many recent tokens are remembered with their login.
const RECENT_TOKENS: usize = 64;

impl CacheState {
    fn remember(&mut self, token: AuthToken, session: u64) {
        if self.recent.len() == RECENT_TOKENS {
            self.recent.pop_front();
        }
        self.recent.push_back((token.clone(), session));
        self.current = Some(token);
        self.session = session;
    }

    /// Whether the current token belongs to a newer login than `refused`: then someone logged in
    /// since that refusal, and the current token is the answer. A token from the same login (the
    /// refused one itself, or a rotation of it) is no answer: the login itself may have expired.
    fn has_newer_than(&self, refused: &AuthToken) -> bool {
        let Some(current) = &self.current else {
            return false;
        };
        if current == refused {
            return false;
        }
        match self.recent.iter().rev().find(|(t, _)| t == refused) {
            Some((_, session)) => *session < self.session,
            // Not remembered: older than every recent token.
            None => true,
        }
    }
}

impl<L> fmt::Debug for TokenCache<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("TokenCache")
            .field("has_token", &state.current.is_some())
            .field("logins", &state.logins)
            .finish_non_exhaustive()
    }
}

impl<L: Login> TokenCache<L> {
    /// Wraps `login`; nothing happens until the first token is asked for.
    pub fn new(login: L) -> Self {
        Self {
            login,
            state: RwLock::new(CacheState::default()),
            gate: tokio::sync::Mutex::new(()),
        }
    }

    /// Starts with `token` (obtained earlier) and logs in only when it is refused.
    pub fn with_token(login: L, token: AuthToken) -> Self {
        let cache = Self::new(login);
        cache.write().remember(token, 0);
        cache
    }

    /// Gives back the wrapped login (and drops any cached token).
    pub fn into_login(self) -> L {
        self.login
    }

    /// The wrapped login.
    pub fn login(&self) -> &L {
        &self.login
    }

    /// How many logins were attempted through this cache.
    pub fn login_count(&self) -> u64 {
        self.read().logins
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CacheState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CacheState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs in unless `usable` finds a token to return in the state, or a login finished (and
    /// failed) while this caller waited its turn.
    async fn login_unless(
        &self,
        usable: impl Fn(&CacheState) -> bool,
    ) -> Result<AuthToken, TokenError> {
        let seen = {
            let state = self.read();
            if usable(&state) {
                if let Some(token) = &state.current {
                    return Ok(token.clone());
                }
            }
            state.logins
        };
        let _turn = self.gate.lock().await;
        {
            let state = self.read();
            if usable(&state) {
                if let Some(token) = &state.current {
                    return Ok(token.clone());
                }
            }
            if state.logins != seen {
                if let Some(err) = &state.last_error {
                    return Err(err.clone());
                }
            }
        }
        let result = self.login.login().await;
        let mut state = self.write();
        state.logins += 1;
        match &result {
            Ok(token) => {
                state.sessions += 1;
                let session = state.sessions;
                state.remember(token.clone(), session);
                state.last_error = None;
            }
            Err(err) => state.last_error = Some(err.clone()),
        }
        result
    }
}

#[async_trait]
impl<L: Login> TokenProvider for TokenCache<L> {
    async fn token(&self) -> Result<AuthToken, TokenError> {
        self.login_unless(|state| state.current.is_some()).await
    }

    fn rotate(&self, new: AuthToken) {
        let mut state = self.write();
        let session = state.session;
        state.remember(new, session);
    }

    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        self.login_unless(|state| state.has_newer_than(refused))
            .await
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counting {
        calls: AtomicU32,
        fail: bool,
    }

    #[async_trait]
    impl Login for Counting {
        async fn login(&self) -> Result<AuthToken, TokenError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::task::yield_now().await;
            if self.fail {
                Err(TokenError::Refused)
            } else {
                Ok(AuthToken::new(format!("t{n}")).unwrap())
            }
        }
    }

    fn counting(fail: bool) -> Arc<TokenCache<Counting>> {
        Arc::new(TokenCache::new(Counting {
            calls: AtomicU32::new(0),
            fail,
        }))
    }

    #[tokio::test]
    async fn logs_in_once_and_caches() {
        let cache = counting(false);
        assert_eq!(cache.token().await.unwrap().expose_secret(), "t1");
        assert_eq!(cache.token().await.unwrap().expose_secret(), "t1");
        assert_eq!(cache.login_count(), 1);
    }

    // current_thread: every task is spawned before any runs, so all of them meet the refusal.
    #[tokio::test]
    async fn concurrent_refreshes_of_one_token_log_in_once() {
        let cache = counting(false);
        let first = cache.token().await.unwrap();
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let first = first.clone();
                tokio::spawn(async move { cache.refresh(&first).await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().expose_secret(), "t2");
        }
        assert_eq!(cache.login().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_login_is_shared_by_its_waiters() {
        let cache = counting(true);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.token().await })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap().is_err());
        }
        // All 50 waited for the same login and share its failure.
        assert_eq!(cache.login().calls.load(Ordering::SeqCst), 1);
        // A later caller (after the failure) tries again.
        assert!(cache.token().await.is_err());
        assert_eq!(cache.login().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn rotation_replaces_the_token_and_a_stale_refusal_keeps_it() {
        let cache = counting(false);
        let t1 = cache.token().await.unwrap();
        let rotated = AuthToken::new("rotated").unwrap();
        cache.rotate(rotated.clone());
        assert_eq!(cache.token().await.unwrap(), rotated);
        // A refusal of a token from the current login (even the rotated-out one) logs in again:
        // the whole login may have expired.
        let t2 = cache.refresh(&t1).await.unwrap();
        assert_eq!(t2.expose_secret(), "t2");
        assert_eq!(cache.login_count(), 2);
        // Refusals of tokens from the older login get the new token, without a login.
        assert_eq!(cache.refresh(&t1).await.unwrap(), t2);
        assert_eq!(cache.refresh(&rotated).await.unwrap(), t2);
        assert_eq!(cache.login_count(), 2);
        // A token given at start counts as the oldest login.
        let given = TokenCache::with_token(
            Counting {
                calls: AtomicU32::new(0),
                fail: false,
            },
            AuthToken::new("given").unwrap(),
        );
        assert_eq!(given.token().await.unwrap().expose_secret(), "given");
        let fresh = given
            .refresh(&AuthToken::new("given").unwrap())
            .await
            .unwrap();
        assert_eq!(fresh.expose_secret(), "t1");
        assert_eq!(
            given
                .refresh(&AuthToken::new("given").unwrap())
                .await
                .unwrap(),
            fresh
        );
    }
}
