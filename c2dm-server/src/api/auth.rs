//! The two keys, and each route's permission as an extractor: [`Admin`] or [`AnyKey`], checked
//! before anything else of the request is read.

use std::fmt;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::AppState;
use super::error::ApiError;

/// A key that authorises requests. Compared in constant time; its `Debug` never shows it.
#[derive(Clone)]
pub struct Key(Arc<str>);

/// Why a key, or a pair of keys, is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key has characters a header cannot carry, or none at all.
    #[error("a key must be visible ASCII")]
    NotVisibleAscii,
    /// The key is shorter than [`MIN_KEY_LEN`] bytes: guessable.
    #[error(
        "a key must be at least {MIN_KEY_LEN} characters long (openssl rand -hex 16 makes one)"
    )]
    TooShort,
    /// The admin token and the device key are the same: every app would hold the admin token.
    #[error("the admin token and the device key must differ: every app holds the device key")]
    Same,
}

/// The shortest key taken, in bytes.
pub const MIN_KEY_LEN: usize = 16;

impl Key {
    /// Wraps a key: at least [`MIN_KEY_LEN`] characters of visible ASCII (it travels in a
    /// header), white space around it trimmed.
    ///
    /// ```
    /// use c2dm_server::api::{InvalidKey, Key};
    /// assert!(Key::new("0123456789abcdef").is_ok());
    /// assert_eq!(Key::new("short").unwrap_err(), InvalidKey::TooShort);
    /// assert_eq!(Key::new("has a space in it").unwrap_err(), InvalidKey::NotVisibleAscii);
    /// ```
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidKey> {
        let key = key.as_ref().trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidKey::NotVisibleAscii);
        }
        if key.len() < MIN_KEY_LEN {
            return Err(InvalidKey::TooShort);
        }
        Ok(Self(key.into()))
    }

    /// Whether `given` is this key, in time that does not depend on where they differ.
    fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        let mut differ = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            differ |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        differ == 0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// The two keys: the admin token (every route) and the device key (the device routes only),
/// never the same.
#[derive(Debug, Clone)]
pub struct Keys {
    admin: Key,
    device: Key,
}

impl Keys {
    /// The admin token, which lets operators list devices and send pushes, and the device
    /// key, which lets apps register and unregister their devices; refused if they are the
    /// same (every app ships the device key).
    ///
    /// ```
    /// use c2dm_server::api::{InvalidKey, Key, Keys};
    /// let admin = Key::new("admin-token-0123456789")?;
    /// let device = Key::new("device-key-0123456789")?;
    /// assert!(Keys::new(admin.clone(), device).is_ok());
    /// assert_eq!(Keys::new(admin.clone(), admin).unwrap_err(), InvalidKey::Same);
    /// # Ok::<(), InvalidKey>(())
    /// ```
    pub fn new(admin: Key, device: Key) -> Result<Self, InvalidKey> {
        if admin.0 == device.0 {
            return Err(InvalidKey::Same);
        }
        Ok(Self { admin, device })
    }
}

/// Which key a request carries: the admin token, the device key, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    Admin,
    Device,
}

impl Caller {
    /// The request's key, checked against both keys (in time that does not tell which one
    /// it was): 401 for none or a wrong one.
    fn of(parts: &Parts, keys: &Keys) -> Result<Self, ApiError> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid key is required: Authorization: Bearer <key>",
            )
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(unauthorized)?;
        let admin = keys.admin.matches(given);
        let device = keys.device.matches(given);
        match (admin, device) {
            (true, _) => Ok(Self::Admin),
            (false, true) => Ok(Self::Device),
            (false, false) => Err(unauthorized()),
        }
    }
}

/// The credentials of an `Authorization: Bearer <key>` value. The scheme's name is matched
/// without regard to case, as every scheme's is (RFC 9110, section 11.1).
pub(super) fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(credentials.trim())
}

/// A handler's permission: the request carries the admin token. The device key is refused
/// 403, no key or a wrong one 401; either before the body is read, so a handler that takes
/// `Admin` cannot run for anyone else, whatever it is sent.
pub(super) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match Caller::of(parts, &state.keys)? {
            Caller::Admin => Ok(Self),
            Caller::Device => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this route needs the admin token, not the device key",
            )),
        }
    }
}

/// A handler's permission: the request carries either key (no key or a wrong one: 401,
/// before the body is read).
pub(super) struct AnyKey;

impl FromRequestParts<AppState> for AnyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::of(parts, &state.keys).map(|_| Self)
    }
}
