//! A Google service account's key file, and the signed assertion (RFC 7523: a JWT, RS256)
//! that the token endpoint exchanges for an access token.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Uri;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

/// The scope an access token for FCM needs.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// How long an assertion is valid: an hour, the most Google takes.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// Why a key file cannot be used. Never holds the key, nor any part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read the service account key file {path}: {kind}")]
    Unreadable {
        /// The file.
        path: String,
        /// What went wrong.
        kind: std::io::ErrorKind,
    },
    /// The file is not JSON, or a field has the wrong type.
    #[error("the service account key is not valid JSON (line {line}, column {column})")]
    NotJson {
        /// Where.
        line: usize,
        /// Where.
        column: usize,
    },
    /// A field the key needs is missing or empty.
    #[error("the service account key has no {0}")]
    Missing(&'static str),
    /// The file is a key of another kind than a service account's.
    #[error("the key is of type {0:?}, not \"service_account\"")]
    NotServiceAccount(String),
    /// `private_key` is not an RSA key in PKCS#8 PEM, as Google writes it.
    #[error("the service account's private key is not an RSA key in PKCS#8 PEM")]
    BadPrivateKey,
    /// `token_uri` is not an absolute http(s) URL.
    #[error("the service account's token_uri is not an http(s) URL")]
    BadTokenUri,
    /// The assertion could not be signed.
    #[error("the assertion could not be signed")]
    Signing,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

/// A service account's key: who it is, for which project, where its tokens come from, and the
/// key that signs its assertions. `Debug` shows everything but the key.
#[derive(Clone)]
pub struct ServiceAccountKey {
    client_email: String,
    project_id: String,
    private_key_id: Option<String>,
    token_uri: Uri,
    signer: Arc<RsaKeyPair>,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("project_id", &self.project_id)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

fn required(value: Option<String>, field: &'static str) -> Result<String, KeyError> {
    value
        .filter(|v| !v.trim().is_empty())
        .ok_or(KeyError::Missing(field))
}

impl ServiceAccountKey {
    /// Reads a key file as the Google Cloud console downloads it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| KeyError::Unreadable {
            path: path.display().to_string(),
            kind: e.kind(),
        })?;
        Self::from_json(&bytes)
    }

    /// Reads a key from the JSON of its file.
    ///
    /// ```
    /// use c2dm_fcm::{KeyError, ServiceAccountKey};
    /// let error = ServiceAccountKey::from_json(br#"{"type": "service_account"}"#).unwrap_err();
    /// assert_eq!(error, KeyError::Missing("project_id"));
    /// ```
    pub fn from_json(json: &[u8]) -> Result<Self, KeyError> {
        let file: KeyFile = serde_json::from_slice(json).map_err(|e| KeyError::NotJson {
            line: e.line(),
            column: e.column(),
        })?;
        let kind = required(file.kind, "type")?;
        if kind != "service_account" {
            return Err(KeyError::NotServiceAccount(kind));
        }
        let project_id = required(file.project_id, "project_id")?;
        let client_email = required(file.client_email, "client_email")?;
        let token_uri = required(file.token_uri, "token_uri")?;
        let token_uri: Uri = token_uri.parse().map_err(|_| KeyError::BadTokenUri)?;
        if !matches!(token_uri.scheme_str(), Some("https" | "http")) || token_uri.host().is_none() {
            return Err(KeyError::BadTokenUri);
        }
        let pem = required(file.private_key, "private_key")?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| KeyError::BadPrivateKey)?;
        let signer =
            RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|_| KeyError::BadPrivateKey)?;
        Ok(Self {
            client_email,
            project_id,
            private_key_id: file.private_key_id.filter(|id| !id.is_empty()),
            token_uri,
            signer: Arc::new(signer),
        })
    }

    /// The service account's email: the assertion's issuer.
    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    /// The project it sends for.
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// Which of the account's keys this is, if the file says.
    pub fn private_key_id(&self) -> Option<&str> {
        self.private_key_id.as_deref()
    }

    /// Where access tokens come from.
    pub fn token_uri(&self) -> &Uri {
        &self.token_uri
    }

    /// The same key with its tokens from `token_uri` (an emulator's, say).
    pub fn with_token_uri(mut self, token_uri: Uri) -> Self {
        self.token_uri = token_uri;
        self
    }

    /// The public half of the key (a PKCS#1 `RSAPublicKey`, DER): what checks its signatures.
    pub fn public_key_der(&self) -> &[u8] {
        ring::signature::KeyPair::public_key(self.signer.as_ref()).as_ref()
    }

    /// The signed assertion (RFC 7523) for a token with `scope`, issued at `now` and valid for
    /// [`ASSERTION_LIFETIME`]: `header.claims.signature`, each base64url.
    pub fn assertion(&self, scope: &str, now: SystemTime) -> Result<String, KeyError> {
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
        if let Some(kid) = &self.private_key_id {
            header["kid"] = serde_json::Value::String(kid.clone());
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.token_uri.to_string(),
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        let encode = |value: &serde_json::Value| {
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
        };
        let signed = format!("{}.{}", encode(&header), encode(&claims));
        let mut signature = vec![0; self.signer.public().modulus_len()];
        self.signer
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|_| KeyError::Signing)?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// An assertion's parts, once its signature is checked: what a token endpoint (an emulator's)
/// reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// The issuer: the service account's email.
    pub iss: String,
    /// The scopes asked for, separated by spaces.
    pub scope: String,
    /// The audience: the token endpoint's URL.
    pub aud: String,
    /// Issued at, in seconds since the epoch.
    pub iat: u64,
    /// Expires at, in seconds since the epoch.
    pub exp: u64,
}

/// Why an assertion was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssertionError {
    /// Not three base64url parts of JSON, or not RS256.
    #[error("the assertion is not an RS256 JWT")]
    Malformed,
    /// The signature is not the key's.
    #[error("the assertion's signature is not valid for the key")]
    BadSignature,
}

/// Checks `assertion`'s RS256 signature against `public_key_der` (a PKCS#1 `RSAPublicKey`,
/// as [`ServiceAccountKey::public_key_der`] gives it) and reads its claims. The claims' values
/// (audience, scope, times) are the caller's to judge. Never panics, whatever the input.
pub fn verify_assertion(assertion: &str, public_key_der: &[u8]) -> Result<Claims, AssertionError> {
    let mut parts = assertion.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AssertionError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| AssertionError::Malformed)
    };
    let header: serde_json::Value =
        serde_json::from_slice(&decode(header)?).map_err(|_| AssertionError::Malformed)?;
    if header.get("alg").and_then(serde_json::Value::as_str) != Some("RS256") {
        return Err(AssertionError::Malformed);
    }
    let signature = decode(signature)?;
    let signed_len = assertion.len() - signature_part_len(assertion);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key_der,
    )
    .verify(&assertion.as_bytes()[..signed_len], &signature)
    .map_err(|_| AssertionError::BadSignature)?;
    serde_json::from_slice(&decode(claims)?).map_err(|_| AssertionError::Malformed)
}

/// The length of the last part of a JWT with its dot.
fn signature_part_len(jwt: &str) -> usize {
    jwt.rfind('.').map_or(jwt.len(), |dot| jwt.len() - dot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = include_bytes!("../tests/data/service-account.json");

    #[test]
    fn a_key_file_reads_and_its_debug_hides_the_key() {
        let key = ServiceAccountKey::from_json(KEY).unwrap();
        assert_eq!(key.project_id(), "c2dm-test");
        assert_eq!(
            key.client_email(),
            "sender@c2dm-test.iam.gserviceaccount.com"
        );
        assert_eq!(key.private_key_id(), Some("test-key-1"));
        assert_eq!(key.token_uri(), "https://oauth2.googleapis.com/token");
        let shown = format!("{key:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(
            !shown.contains("PRIVATE KEY") && !shown.contains("MII"),
            "{shown}"
        );
    }

    #[test]
    fn the_assertion_is_signed_by_the_key_and_says_what_google_asks() {
        let key = ServiceAccountKey::from_json(KEY).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let assertion = key.assertion(FCM_SCOPE, now).unwrap();
        let claims = verify_assertion(&assertion, key.public_key_der()).unwrap();
        assert_eq!(
            claims,
            Claims {
                iss: "sender@c2dm-test.iam.gserviceaccount.com".into(),
                scope: FCM_SCOPE.into(),
                aud: "https://oauth2.googleapis.com/token".into(),
                iat: 1_700_000_000,
                exp: 1_700_003_600,
            }
        );
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(assertion.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["kid"], "test-key-1");
        // One byte changed anywhere signed, and the signature no longer holds.
        let mut forged = assertion.clone().into_bytes();
        let at = forged.iter().position(|b| *b == b'.').unwrap() + 3;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        assert!(
            verify_assertion(std::str::from_utf8(&forged).unwrap(), key.public_key_der()).is_err()
        );
    }

    #[test]
    fn a_bad_key_file_says_what_is_wrong() {
        let mut file: serde_json::Value = serde_json::from_slice(KEY).unwrap();
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut f = file.clone();
            change(&mut f);
            ServiceAccountKey::from_json(&serde_json::to_vec(&f).unwrap()).unwrap_err()
        };
        assert_eq!(
            with(&|f| f["type"] = "authorized_user".into()),
            KeyError::NotServiceAccount("authorized_user".into())
        );
        assert_eq!(
            with(&|f| f["client_email"] = "".into()),
            KeyError::Missing("client_email")
        );
        assert_eq!(
            with(&|f| f["token_uri"] = "ftp://x/token".into()),
            KeyError::BadTokenUri
        );
        assert_eq!(
            with(&|f| f["token_uri"] = "/token".into()),
            KeyError::BadTokenUri
        );
        assert_eq!(
            with(&|f| f["private_key"] =
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into()),
            KeyError::BadPrivateKey
        );
        assert_eq!(
            with(&|f| {
                f.as_object_mut().unwrap().remove("private_key");
            }),
            KeyError::Missing("private_key")
        );
        assert!(matches!(
            ServiceAccountKey::from_json(b"{nope"),
            Err(KeyError::NotJson { .. })
        ));
        file["private_key"] = "secret-material".into();
        let error = ServiceAccountKey::from_json(&serde_json::to_vec(&file).unwrap()).unwrap_err();
        assert!(!error.to_string().contains("secret-material"));
        assert!(matches!(
            ServiceAccountKey::from_file("/nonexistent/key.json"),
            Err(KeyError::Unreadable {
                kind: std::io::ErrorKind::NotFound,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_as_a_key_file_or_an_assertion_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), text in ".{0,200}") {
            let _ = ServiceAccountKey::from_json(&bytes);
            let key = ServiceAccountKey::from_json(KEY).unwrap();
            let _ = verify_assertion(&text, key.public_key_der());
            let _ = verify_assertion(&format!("{text}.{text}.{text}"), key.public_key_der());
        }
    }
}
