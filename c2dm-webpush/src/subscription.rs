//! A push subscription: where to send (the push service's endpoint for one app on one device)
//! and the keys a message is encrypted for, checked when it is built.

use std::fmt;

use http::Uri;
use p256::PublicKey;

/// An uncompressed P-256 point's length: `p256dh` keys and VAPID public keys.
pub const P256DH_LEN: usize = 65;

/// The `auth` secret's length.
pub const AUTH_LEN: usize = 16;

/// The longest endpoint taken, in bytes (UnifiedPush's bound).
pub const MAX_ENDPOINT: usize = 1000;

/// Base64url (RFC 4648 §5) as Web Push writes it: unpadded; padding is tolerated when read.
pub mod base64url {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    /// Encodes without padding.
    pub fn encode(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decodes, with or without padding.
    pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))
    }
}

/// Why a subscription is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The endpoint is no absolute URL.
    #[error("the endpoint is not an absolute URL")]
    EndpointNotUrl,
    /// The endpoint is longer than [`MAX_ENDPOINT`] bytes.
    #[error("the endpoint is {0} bytes; at most {MAX_ENDPOINT}")]
    EndpointTooLong(usize),
    /// The endpoint is plain HTTP to a host other than loopback (only HTTPS is taken, but for
    /// tests on this machine).
    #[error("the endpoint must be https (plain http only to 127.0.0.1, [::1] or localhost)")]
    EndpointNotHttps,
    /// `p256dh` is not base64url of an uncompressed P-256 point.
    #[error("p256dh is not base64url of an uncompressed P-256 point (65 bytes)")]
    BadP256dh,
    /// `auth` is not base64url of 16 bytes.
    #[error("auth is not base64url of 16 bytes")]
    BadAuth,
    /// The JSON is not a browser's `PushSubscription` (`endpoint`, `keys.p256dh`, `keys.auth`).
    #[error("not a push subscription's JSON: {0}")]
    Json(String),
}

/// A push subscription, as a browser's `PushSubscription.toJSON()` or a UnifiedPush
/// distributor gives it. Its `Debug` shows the endpoint's origin only: the whole endpoint is a
/// capability (whoever has it can push to the device), and `auth` is a secret.
///
/// ```
/// use c2dm_webpush::Subscription;
///
/// let subscription = Subscription::from_json(br#"{
///     "endpoint": "https://push.example.net/push/JzLQ3raZJfFBR0aqvOMsLrt54w4rJUsV",
///     "expirationTime": null,
///     "keys": {
///         "p256dh": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
///         "auth": "BTBZMqHH6r4Tts7J_aSIgg"
///     }
/// }"#)?;
/// assert_eq!(subscription.origin(), "https://push.example.net");
/// # Ok::<(), c2dm_webpush::SubscriptionError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Subscription {
    endpoint: Uri,
    p256dh: PublicKey,
    auth: [u8; AUTH_LEN],
}

impl Subscription {
    /// A subscription from its endpoint and its keys in base64url.
    pub fn new(endpoint: &str, p256dh: &str, auth: &str) -> Result<Self, SubscriptionError> {
        if endpoint.len() > MAX_ENDPOINT {
            return Err(SubscriptionError::EndpointTooLong(endpoint.len()));
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| SubscriptionError::EndpointNotUrl)?;
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Err(SubscriptionError::EndpointNotUrl);
        };
        match scheme {
            "https" => {}
            "http" if is_loopback(host) => {}
            _ => return Err(SubscriptionError::EndpointNotHttps),
        }
        let key = base64url::decode(p256dh).map_err(|_| SubscriptionError::BadP256dh)?;
        if key.len() != P256DH_LEN || key[0] != 0x04 {
            return Err(SubscriptionError::BadP256dh);
        }
        let p256dh = PublicKey::from_sec1_bytes(&key).map_err(|_| SubscriptionError::BadP256dh)?;
        let auth: [u8; AUTH_LEN] = base64url::decode(auth)
            .ok()
            .and_then(|a| a.try_into().ok())
            .ok_or(SubscriptionError::BadAuth)?;
        Ok(Self {
            endpoint: uri,
            p256dh,
            auth,
        })
    }

    /// A subscription from a browser's `PushSubscription` JSON (other fields, such as
    /// `expirationTime`, are ignored).
    pub fn from_json(json: &[u8]) -> Result<Self, SubscriptionError> {
        #[derive(serde::Deserialize)]
        struct Keys {
            p256dh: String,
            auth: String,
        }
        #[derive(serde::Deserialize)]
        struct Json {
            endpoint: String,
            keys: Keys,
        }
        let json: Json =
            serde_json::from_slice(json).map_err(|e| SubscriptionError::Json(e.to_string()))?;
        Self::new(&json.endpoint, &json.keys.p256dh, &json.keys.auth)
    }

    /// Where its messages are POSTed.
    pub fn endpoint(&self) -> &Uri {
        &self.endpoint
    }

    /// The endpoint's origin (`https://host[:port]`): a VAPID token's audience, and the scope
    /// of a push service's `429`.
    pub fn origin(&self) -> String {
        let scheme = self.endpoint.scheme_str().unwrap_or("https");
        let authority = self.endpoint.authority().map_or("", |a| a.as_str());
        // Any user information is no part of an origin.
        let host = authority.rsplit('@').next().unwrap_or(authority);
        format!("{scheme}://{host}")
    }

    /// The user agent's public key.
    pub fn p256dh(&self) -> &PublicKey {
        &self.p256dh
    }

    /// The user agent's public key as an uncompressed point (65 bytes).
    pub fn p256dh_bytes(&self) -> Box<[u8]> {
        self.p256dh.to_sec1_bytes()
    }

    /// The `auth` secret.
    pub fn auth(&self) -> &[u8; AUTH_LEN] {
        &self.auth
    }

    /// As a browser's `PushSubscription` JSON.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "endpoint": self.endpoint.to_string(),
            "keys": {
                "p256dh": base64url::encode(&self.p256dh_bytes()),
                "auth": base64url::encode(&self.auth),
            }
        })
        .to_string()
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("origin", &self.origin())
            .field("endpoint", &"<redacted>")
            .field("auth", &"<redacted>")
            .finish()
    }
}

/// Whether `host` names this machine: a loopback address or `localhost`.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn a_subscription_is_checked_when_built() {
        let ok = |endpoint: &str| Subscription::new(endpoint, P256DH, AUTH);
        assert!(ok("https://fcm.googleapis.com/fcm/send/abc").is_ok());
        assert!(ok("http://127.0.0.1:8080/push/1").is_ok());
        assert!(ok("http://[::1]:8080/push/1").is_ok());
        assert!(ok("http://localhost/push/1").is_ok());
        assert_eq!(
            ok("http://push.example.net/1"),
            Err(SubscriptionError::EndpointNotHttps)
        );
        assert_eq!(ok("ftp://x/1"), Err(SubscriptionError::EndpointNotHttps));
        assert_eq!(ok("/push/1"), Err(SubscriptionError::EndpointNotUrl));
        let long = format!("https://push.example.net/{}", "a".repeat(1000));
        assert_eq!(
            ok(&long),
            Err(SubscriptionError::EndpointTooLong(long.len()))
        );
        let bad_key = Subscription::new("https://x/1", &P256DH[..40], AUTH);
        assert_eq!(bad_key, Err(SubscriptionError::BadP256dh));
        // 65 bytes that are no point of the curve.
        let off_curve = base64url::encode(&[4; 65]);
        assert_eq!(
            Subscription::new("https://x/1", &off_curve, AUTH),
            Err(SubscriptionError::BadP256dh)
        );
        assert_eq!(
            Subscription::new("https://x/1", P256DH, "c2hvcnQ"),
            Err(SubscriptionError::BadAuth)
        );
        // Padded base64url is read too.
        assert!(Subscription::new("https://x/1", P256DH, "BTBZMqHH6r4Tts7J_aSIgg==").is_ok());
    }

    #[test]
    fn its_json_round_trips_and_its_debug_shows_no_secret() {
        let s = Subscription::new(
            "https://user@push.example.net:8443/p/secret-token",
            P256DH,
            AUTH,
        )
        .unwrap();
        assert_eq!(s.origin(), "https://push.example.net:8443");
        assert_eq!(Subscription::from_json(s.to_json().as_bytes()).unwrap(), s);
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("secret-token") && !shown.contains(AUTH),
            "{shown}"
        );
        assert!(matches!(
            Subscription::from_json(br#"{"endpoint": "https://x/1"}"#),
            Err(SubscriptionError::Json(_))
        ));
    }

    proptest! {
        /// Any JSON, or any bytes, is a subscription or a typed error; never a panic.
        #[test]
        fn any_bytes_are_a_subscription_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Subscription::from_json(&bytes);
        }

        #[test]
        fn any_fields_are_a_subscription_or_an_error(
            endpoint in "\\PC{0,80}",
            p256dh in "[A-Za-z0-9_=-]{0,100}",
            auth in "[A-Za-z0-9_=-]{0,30}",
        ) {
            let _ = Subscription::new(&endpoint, &p256dh, &auth);
        }
    }
}
