//! A push message's encryption: RFC 8291 (Message Encryption for Web Push) over RFC 8188's
//! `aes128gcm` content coding, one record.
//!
//! The application server makes an ephemeral P-256 key pair for each message, agrees a secret
//! with the subscription's `p256dh` key (ECDH), mixes in the subscription's `auth` secret and a
//! random salt (HKDF-SHA-256), and seals the message with AES-128-GCM. The body is the coding's
//! header (salt, record size, the ephemeral public key) and one record: the plaintext, the
//! last-record delimiter `0x02`, padding, the tag.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use hkdf::Hkdf;
use p256::{PublicKey, SecretKey};
use sha2::Sha256;

use crate::subscription::{AUTH_LEN, P256DH_LEN, Subscription};

/// The record size written in the header: a push service takes bodies of at most 4,096 bytes.
pub const RECORD_SIZE: u32 = 4096;

/// The header's length: salt (16), record size (4), key id length (1), the key id (65).
pub const HEADER_LEN: usize = 16 + 4 + 1 + P256DH_LEN;

/// AES-GCM's tag.
const TAG_LEN: usize = 16;

/// The most plaintext one message carries: 4,096 bytes less the header, the delimiter and the
/// tag.
pub const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - HEADER_LEN - 1 - TAG_LEN;

/// Why a message cannot be encrypted, or a body decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncryptError {
    /// The plaintext (with the padding asked for) does not fit in one 4,096-byte message.
    #[error("the message is {len} bytes with its padding; at most {MAX_PLAINTEXT} fit in a push")]
    TooLarge {
        /// Plaintext and padding.
        len: usize,
    },
    /// The operating system gave no randomness for the key or the salt.
    #[error("no randomness for the message's key: {0}")]
    Random(String),
    /// A body that is not one `aes128gcm` record for this key (a decryption's error).
    #[error("not an aes128gcm push message for this key: {0}")]
    Malformed(&'static str),
}

/// The keys of one message: the content-encryption key and the nonce, derived as RFC 8291 §3.4
/// and RFC 8188 §2.2 say.
struct MessageKeys {
    cek: [u8; 16],
    nonce: [u8; 12],
}

/// Derives the message's keys from the ECDH secret, the `auth` secret, both public keys (as
/// 65-byte uncompressed points) and the salt.
fn message_keys(
    ecdh_secret: &[u8],
    auth: &[u8; AUTH_LEN],
    ua_public: &[u8],
    as_public: &[u8],
    salt: &[u8; 16],
) -> MessageKeys {
    // IKM = HKDF(auth_secret, ecdh_secret, "WebPush: info" || 0x00 || ua_public || as_public, 32)
    let mut key_info = Vec::with_capacity(14 + 2 * P256DH_LEN);
    key_info.extend_from_slice(b"WebPush: info\0");
    key_info.extend_from_slice(ua_public);
    key_info.extend_from_slice(as_public);
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), ecdh_secret)
        .expand(&key_info, &mut ikm)
        .expect("32 bytes is a valid HKDF-SHA-256 length");
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let mut keys = MessageKeys {
        cek: [0; 16],
        nonce: [0; 12],
    };
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut keys.cek)
        .expect("16 bytes is a valid HKDF-SHA-256 length");
    prk.expand(b"Content-Encoding: nonce\0", &mut keys.nonce)
        .expect("12 bytes is a valid HKDF-SHA-256 length");
    keys
}

/// Encrypts `plaintext` for `subscription` with a fresh key and salt from the operating
/// system, padded with `padding` zero bytes (which hide the message's length).
pub fn encrypt(
    plaintext: &[u8],
    subscription: &Subscription,
    padding: usize,
) -> Result<Vec<u8>, EncryptError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| EncryptError::Random(e.to_string()))?;
    let key = random_secret().map_err(|e| EncryptError::Random(e.to_string()))?;
    encrypt_with(plaintext, subscription, padding, &key, &salt)
}

/// A uniformly random P-256 private key from the operating system's randomness: 32 random
/// bytes, drawn again in the (2^-32) case of a number that is no valid key.
pub(crate) fn random_secret() -> Result<SecretKey, getrandom::Error> {
    let mut bytes = [0u8; 32];
    loop {
        getrandom::fill(&mut bytes)?;
        if let Ok(secret) = SecretKey::from_slice(&bytes) {
            return Ok(secret);
        }
    }
}

/// [`encrypt`] with the ephemeral key and the salt given: deterministic, for RFC 8291's test
/// vector. Never reuse a key or a salt for two messages.
pub fn encrypt_with(
    plaintext: &[u8],
    subscription: &Subscription,
    padding: usize,
    ephemeral: &SecretKey,
    salt: &[u8; 16],
) -> Result<Vec<u8>, EncryptError> {
    let len = plaintext.len().saturating_add(padding);
    if len > MAX_PLAINTEXT {
        return Err(EncryptError::TooLarge { len });
    }
    let as_public = ephemeral.public_key().to_sec1_bytes();
    let ua_public = subscription.p256dh_bytes();
    let shared = p256::ecdh::diffie_hellman(
        ephemeral.to_nonzero_scalar(),
        subscription.p256dh().as_affine(),
    );
    let keys = message_keys(
        shared.raw_secret_bytes(),
        subscription.auth(),
        &ua_public,
        &as_public,
        salt,
    );
    let mut record = Vec::with_capacity(len + 1);
    record.extend_from_slice(plaintext);
    record.push(0x02);
    record.resize(len + 1, 0);
    let sealed = Aes128Gcm::new(&keys.cek.into())
        .encrypt(&Nonce::from(keys.nonce), record.as_slice())
        .map_err(|_| EncryptError::Malformed("the record could not be sealed"))?;
    let mut body = Vec::with_capacity(HEADER_LEN + sealed.len());
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(P256DH_LEN as u8);
    body.extend_from_slice(&as_public);
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// Decrypts a push message as the user agent does, with its private key and `auth` secret: the
/// plaintext without its delimiter and padding. For tests, and for a push service that hands
/// messages back decrypted (the emulator).
pub fn decrypt(
    body: &[u8],
    ua_private: &SecretKey,
    auth: &[u8; AUTH_LEN],
) -> Result<Vec<u8>, EncryptError> {
    if body.len() < 21 {
        return Err(EncryptError::Malformed("shorter than its header"));
    }
    let salt: [u8; 16] = body[..16].try_into().expect("16 bytes");
    let record_size = u32::from_be_bytes(body[16..20].try_into().expect("4 bytes"));
    let id_len = usize::from(body[20]);
    if id_len != P256DH_LEN {
        return Err(EncryptError::Malformed("its key id is not a P-256 point"));
    }
    let Some(as_public) = body.get(21..21 + P256DH_LEN) else {
        return Err(EncryptError::Malformed("shorter than its header"));
    };
    let sealed = &body[HEADER_LEN..];
    if sealed.len() < TAG_LEN + 1 || sealed.len() > record_size as usize {
        return Err(EncryptError::Malformed(
            "its record is empty or larger than its record size",
        ));
    }
    let sender = PublicKey::from_sec1_bytes(as_public)
        .map_err(|_| EncryptError::Malformed("its key id is not a P-256 point"))?;
    let shared = p256::ecdh::diffie_hellman(ua_private.to_nonzero_scalar(), sender.as_affine());
    let ua_public = ua_private.public_key().to_sec1_bytes();
    let keys = message_keys(
        shared.raw_secret_bytes(),
        auth,
        &ua_public,
        as_public,
        &salt,
    );
    let mut record = Aes128Gcm::new(&keys.cek.into())
        .decrypt(&Nonce::from(keys.nonce), sealed)
        .map_err(|_| EncryptError::Malformed("its tag does not match this key"))?;
    // The padding is zeros after the delimiter; the last record's delimiter is 0x02.
    let end = record
        .iter()
        .rposition(|b| *b != 0)
        .ok_or(EncryptError::Malformed("no delimiter"))?;
    if record[end] != 0x02 {
        return Err(EncryptError::Malformed("not the last record"));
    }
    record.truncate(end);
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscription::base64url;
    use proptest::prelude::*;

    fn d(text: &str) -> Vec<u8> {
        base64url::decode(text).expect("base64url")
    }

    /// RFC 8291's receiver: its key pair and `auth` secret.
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    fn subscription() -> Subscription {
        Subscription::new(
            "https://push.example.net/push/JzLQ3raZJfFBR0aqvOMsLrt54w4rJUsV",
            UA_PUBLIC,
            AUTH,
        )
        .unwrap()
    }

    /// RFC 8291 Appendix A: the same keys, salt and plaintext give the RFC's body, byte for
    /// byte, and the receiver reads the plaintext back.
    #[test]
    fn rfc_8291_appendix_a() {
        let ephemeral =
            SecretKey::from_slice(&d("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")).unwrap();
        assert_eq!(
            base64url::encode(&ephemeral.public_key().to_sec1_bytes()),
            "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
        );
        let salt: [u8; 16] = d("DGv6ra1nlYgDCS1FRnbzlw").try_into().unwrap();
        let plaintext = b"When I grow up, I want to be a watermelon";
        let body = encrypt_with(plaintext, &subscription(), 0, &ephemeral, &salt).unwrap();
        assert_eq!(
            base64url::encode(&body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
        let ua_private = SecretKey::from_slice(&d(UA_PRIVATE)).unwrap();
        let auth: [u8; 16] = d(AUTH).try_into().unwrap();
        assert_eq!(decrypt(&body, &ua_private, &auth).unwrap(), plaintext);
    }

    /// The RFC's intermediate values: the content-encryption key and the nonce.
    #[test]
    fn rfc_8291_keys() {
        let auth: [u8; 16] = d(AUTH).try_into().unwrap();
        let salt: [u8; 16] = d("DGv6ra1nlYgDCS1FRnbzlw").try_into().unwrap();
        let keys = message_keys(
            &d("kyrL1jIIOHEzg3sM2ZWRHDRB62YACZhhSlknJ672kSs"),
            &auth,
            &d(UA_PUBLIC),
            &d(
                "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8",
            ),
            &salt,
        );
        assert_eq!(base64url::encode(&keys.cek), "oIhVW04MRdy2XN9CiKLxTg");
        assert_eq!(base64url::encode(&keys.nonce), "4h_95klXJ5E_qnoN");
    }

    #[test]
    fn a_message_too_large_is_refused_before_anything_is_sealed() {
        let at_most = vec![b'x'; MAX_PLAINTEXT];
        let body = encrypt(&at_most, &subscription(), 0).unwrap();
        assert_eq!(body.len(), RECORD_SIZE as usize, "exactly one full push");
        assert_eq!(
            encrypt(&at_most, &subscription(), 1),
            Err(EncryptError::TooLarge {
                len: MAX_PLAINTEXT + 1
            })
        );
    }

    proptest! {
        /// Whatever is sent, with whatever padding, the receiver reads it back; each message
        /// has a key and a salt of its own.
        #[test]
        fn a_round_trip_decrypts(
            plaintext in proptest::collection::vec(any::<u8>(), 0..600),
            padding in 0usize..200,
        ) {
            let ua_private = SecretKey::from_slice(&d(UA_PRIVATE)).unwrap();
            let auth: [u8; 16] = d(AUTH).try_into().unwrap();
            let body = encrypt(&plaintext, &subscription(), padding).unwrap();
            prop_assert_eq!(body.len(), HEADER_LEN + plaintext.len() + padding + 1 + TAG_LEN);
            prop_assert_eq!(decrypt(&body, &ua_private, &auth).unwrap(), plaintext.clone());
            let again = encrypt(&plaintext, &subscription(), padding).unwrap();
            prop_assert_ne!(&body[..16], &again[..16], "a fresh salt");
        }

        /// Decrypting any bytes fails cleanly or succeeds; it never panics.
        #[test]
        fn any_body_decrypts_or_fails_cleanly(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let ua_private = SecretKey::from_slice(&d(UA_PRIVATE)).unwrap();
            let _ = decrypt(&body, &ua_private, &[0; 16]);
        }
    }
}
