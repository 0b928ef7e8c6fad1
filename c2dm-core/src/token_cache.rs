//! [`TokenCache`]: a [`TokenProvider`] over a [`Login`], single-flight.

use std::fmt;
use std::sync::RwLock;

use async_trait::async_trait;

use crate::token::{AuthToken, TokenError, TokenProvider};

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

    /// The wrapped login.
    pub fn login(&self) -> &L {
        &self.login
    }

    /// Logs in now, whatever is cached (waiting for a login under way first), and keeps the
    /// token for later callers. Counted by [`TokenCache::login_count`].
    pub async fn login_now(&self) -> Result<AuthToken, TokenError> {
        self.login_unless(|_| false).await
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
            if usable(&state)
                && let Some(token) = &state.current
            {
                return Ok(token.clone());
            }
            state.logins
        };
        let _turn = self.gate.lock().await;
        {
            let state = self.read();
            if usable(&state)
                && let Some(token) = &state.current
            {
                return Ok(token.clone());
            }
            if state.logins != seen
                && let Some(err) = &state.last_error
            {
                return Err(err.clone());
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

    /// Taken unless `used` belongs to an older login than the current token.
    fn rotate(&self, used: &AuthToken, new: AuthToken) {
        let mut state = self.write();
        if state.has_newer_than(used) {
            tracing::debug!("ignoring a rotation of a token from an older login");
            return;
        }
        let session = state.session;
        state.remember(new, session);
    }

    async fn refresh(&self, refused: &AuthToken) -> Result<AuthToken, TokenError> {
        self.login_unless(|state| state.has_newer_than(refused))
            .await
    }

    fn logins(&self) -> Option<u64> {
        Some(self.login_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
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
        cache.rotate(&t1, rotated.clone());
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
