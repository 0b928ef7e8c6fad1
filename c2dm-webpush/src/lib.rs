//! Web Push (RFC 8030) for c2dm-rs: the open push protocol that browsers and UnifiedPush
//! distributors speak.
//!
//! - [`Subscription`]: where to push and the keys to encrypt for, checked when built (an
//!   `https` endpoint of at most 1,000 bytes, a P-256 `p256dh` key, a 16-byte `auth` secret).
//! - [`encrypt`]: RFC 8291 message encryption (`aes128gcm`, RFC 8188), on RustCrypto's p256,
//!   hkdf and aes-gcm; [`decrypt`] is the user agent's half.
//! - [`VapidKey`]: the server's identity (RFC 8292), loaded from a PEM file or made anew, and
//!   the `Authorization: vapid` header it signs.
//! - [`answer::decode`]: what a push service's answer means, as a pure function.
//!
//! ```
//! use c2dm_webpush::{Subscription, encrypt};
//!
//! let subscription = Subscription::new(
//!     "https://push.example.net/push/JzLQ3raZJfFBR0aqvOMsLrt54w4rJUsV",
//!     "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
//!     "BTBZMqHH6r4Tts7J_aSIgg",
//! )?;
//! let body = encrypt::encrypt(br#"{"text":"hi"}"#, &subscription, 0)?;
//! assert_eq!(body.len(), encrypt::HEADER_LEN + 13 + 1 + 16);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod answer;
pub mod encrypt;
pub mod subscription;
pub mod vapid;

pub use answer::Answer;
pub use encrypt::{EncryptError, decrypt};
pub use subscription::{Subscription, SubscriptionError, base64url};
pub use vapid::{VapidError, VapidKey, VapidSubject};
