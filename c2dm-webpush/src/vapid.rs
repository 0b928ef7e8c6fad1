//! VAPID (RFC 8292): the application server's identity, a P-256 key pair whose public half
//! the app gives the browser or distributor (`applicationServerKey`), and a short-lived token
//! signed with it on each push (`Authorization: vapid t=<JWT>, k=<public key>`).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p256::SecretKey;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePrivateKey, LineEnding};

use crate::subscription::base64url;

/// The longest a token may live: RFC 8292 §2 allows at most 24 hours.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a VAPID key or token cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VapidError {
    /// The key file could not be read.
    #[error("cannot read the VAPID key file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The text is no P-256 private key (PEM, PKCS#8 or SEC1; or base64url of its 32 bytes).
    #[error("not a P-256 private key (a PEM file, or base64url of its 32 bytes)")]
    NotAKey,
    /// The subject is neither a `mailto:` nor an `https:` URL.
    #[error("the VAPID subject must be a mailto: or https: URL")]
    BadSubject,
    /// A token asked for longer than 24 hours.
    #[error("a VAPID token lives at most 24 hours")]
    LifetimeTooLong,
    /// The operating system gave no randomness for a new key.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// The application server's VAPID key pair. Its `Debug` shows the public key only.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use c2dm_webpush::{VapidKey, VapidSubject};
///
/// let key = VapidKey::generate()?;
/// let again = VapidKey::from_pem(&key.to_pem())?;
/// assert_eq!(again.public_key(), key.public_key());
/// let subject = VapidSubject::new("mailto:ops@example.com")?;
/// let header = key.authorization(
///     "https://push.example.net",
///     &subject,
///     SystemTime::now(),
///     Duration::from_secs(12 * 3600),
/// )?;
/// assert!(header.starts_with("vapid t="));
/// # Ok::<(), c2dm_webpush::VapidError>(())
/// ```
#[derive(Clone)]
pub struct VapidKey {
    secret: SecretKey,
}

impl VapidKey {
    /// A new key pair, from the operating system's randomness.
    pub fn generate() -> Result<Self, VapidError> {
        let secret =
            crate::encrypt::random_secret().map_err(|e| VapidError::Random(e.to_string()))?;
        Ok(Self { secret })
    }

    /// A key from PEM text (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`, as `openssl ecparam
    /// -genkey -name prime256v1` writes), or from base64url of the private key's 32 bytes (as
    /// the `web-push` tools print it).
    pub fn from_pem(text: &str) -> Result<Self, VapidError> {
        let text = text.trim();
        let secret = if text.starts_with("-----BEGIN") {
            SecretKey::from_pem(text).map_err(|_| VapidError::NotAKey)?
        } else {
            let bytes = base64url::decode(text).map_err(|_| VapidError::NotAKey)?;
            SecretKey::from_slice(&bytes).map_err(|_| VapidError::NotAKey)?
        };
        Ok(Self { secret })
    }

    /// A key from a file, as [`VapidKey::from_pem`] reads it.
    pub fn from_file(path: &Path) -> Result<Self, VapidError> {
        let text = std::fs::read_to_string(path).map_err(|e| VapidError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_pem(&text)
    }

    /// The private key as PKCS#8 PEM, for a file only the server reads.
    pub fn to_pem(&self) -> String {
        self.secret
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .expect("a P-256 key encodes as PKCS#8")
    }

    /// The public key, base64url of its uncompressed point: the `applicationServerKey` an app
    /// subscribes with, and the `k=` of each push.
    pub fn public_key(&self) -> String {
        base64url::encode(&self.secret.public_key().to_sec1_bytes())
    }

    /// A signed token (JWT, ES256) for pushes to `audience` (a push service's origin, such as
    /// [`Subscription::origin`](crate::Subscription::origin)), valid from `now` for `lifetime`
    /// (at most 24 hours).
    pub fn token(
        &self,
        audience: &str,
        subject: &VapidSubject,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, VapidError> {
        if lifetime > MAX_TOKEN_LIFETIME {
            return Err(VapidError::LifetimeTooLong);
        }
        let expires = (now + lifetime)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let header = base64url::encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({"aud": audience, "exp": expires, "sub": subject.0});
        let claims = base64url::encode(claims.to_string().as_bytes());
        let signing_input = format!("{header}.{claims}");
        let signature: Signature = SigningKey::from(&self.secret).sign(signing_input.as_bytes());
        Ok(format!(
            "{signing_input}.{}",
            base64url::encode(&signature.to_bytes())
        ))
    }

    /// The `Authorization` header's value for pushes to `audience`: `vapid t=<token>,
    /// k=<public key>`.
    pub fn authorization(
        &self,
        audience: &str,
        subject: &VapidSubject,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, VapidError> {
        let token = self.token(audience, subject, now, lifetime)?;
        Ok(format!("vapid t={token}, k={}", self.public_key()))
    }
}

impl fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VapidKey")
            .field("public_key", &self.public_key())
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// Who runs the application server, for the push service to reach: a `mailto:` or `https:`
/// URL (a token's `sub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VapidSubject(String);

impl VapidSubject {
    /// `mailto:` with an address, or an `https:` URL.
    pub fn new(subject: &str) -> Result<Self, VapidError> {
        let ok = match subject.split_once(':') {
            Some(("mailto", address)) => {
                address.contains('@') && !address.contains(char::is_whitespace)
            }
            Some(("https", rest)) => {
                rest.starts_with("//")
                    && subject
                        .parse::<http::Uri>()
                        .is_ok_and(|u| u.host().is_some())
            }
            _ => false,
        };
        if ok {
            Ok(Self(subject.to_owned()))
        } else {
            Err(VapidError::BadSubject)
        }
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier;

    fn claims_of(token: &str) -> serde_json::Value {
        let claims = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&base64url::decode(claims).unwrap()).unwrap()
    }

    #[test]
    fn a_token_is_signed_es256_for_its_audience_and_expires() {
        let key = VapidKey::generate().unwrap();
        let subject = VapidSubject::new("mailto:ops@example.com").unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        let header = key
            .authorization(
                "https://push.example.net",
                &subject,
                now,
                Duration::from_secs(3600),
            )
            .unwrap();
        let (token, k) = header
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap();
        assert_eq!(k, key.public_key());
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let head: serde_json::Value =
            serde_json::from_slice(&base64url::decode(parts[0]).unwrap()).unwrap();
        assert_eq!(head, serde_json::json!({"typ": "JWT", "alg": "ES256"}));
        assert_eq!(
            claims_of(token),
            serde_json::json!({"aud": "https://push.example.net", "exp": 1_765_003_600u64, "sub": "mailto:ops@example.com"})
        );
        // The push service's check: the signature over the first two parts, by `k`.
        let verifying = VerifyingKey::from_sec1_bytes(&base64url::decode(k).unwrap()).unwrap();
        let signature = Signature::from_slice(&base64url::decode(parts[2]).unwrap()).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        assert!(verifying.verify(input.as_bytes(), &signature).is_ok());
        assert_eq!(
            key.token(
                "https://x",
                &subject,
                now,
                MAX_TOKEN_LIFETIME + Duration::from_secs(1)
            ),
            Err(VapidError::LifetimeTooLong)
        );
    }

    #[test]
    fn a_key_is_read_from_pem_or_base64url_and_never_shown() {
        let key = VapidKey::generate().unwrap();
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        assert_eq!(
            VapidKey::from_pem(&pem).unwrap().public_key(),
            key.public_key()
        );
        // The raw 32 bytes, as the web-push tools print a private key.
        let raw = base64url::encode(&key.secret.to_bytes());
        assert_eq!(
            VapidKey::from_pem(&raw).unwrap().public_key(),
            key.public_key()
        );
        // SEC1, as openssl ecparam writes it.
        let sec1 = key.secret.to_sec1_pem(LineEnding::LF).unwrap();
        assert_eq!(
            VapidKey::from_pem(&sec1).unwrap().public_key(),
            key.public_key()
        );
        assert_eq!(
            VapidKey::from_pem("not a key").unwrap_err(),
            VapidError::NotAKey
        );
        let shown = format!("{key:?}");
        assert!(
            !shown.contains(&raw) && shown.contains(&key.public_key()),
            "{shown}"
        );
        assert_eq!(base64url::decode(&key.public_key()).unwrap().len(), 65);
    }

    #[test]
    fn a_subject_is_a_mailto_or_https_url() {
        for good in ["mailto:ops@example.com", "https://example.com/contact"] {
            assert_eq!(VapidSubject::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "ops@example.com",
            "http://example.com",
            "mailto:nobody",
            "https:nothing",
            "",
        ] {
            assert_eq!(VapidSubject::new(bad), Err(VapidError::BadSubject), "{bad}");
        }
    }
}
