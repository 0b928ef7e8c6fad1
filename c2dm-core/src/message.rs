//! The message an app server sends to one device, and its validated parts.

use std::fmt;
use std::sync::Arc;

/// The payload limit of the C2DM service, in bytes (see [`MessageBuilder::payload_limit`]).
pub const DEFAULT_PAYLOAD_LIMIT: usize = 1024;

/// The longest registration id taken, in bytes (UTF-8). Real ids are a few hundred bytes; the
/// bound keeps one peer from storing, and having sent again, megabytes per device.
pub const MAX_REGISTRATION_ID: usize = 4096;

/// Data keys that the client refuses: reserved by the service for its own use.
const RESERVED_KEYS: &[&str] = &["from"];
/// Data keys with this prefix are refused, as GCM reserved them.
const RESERVED_PREFIX: &str = "google.";

/// Why a [`Message`] could not be built. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The registration id is empty.
    #[error("registration_id: must not be empty")]
    EmptyRegistrationId,
    /// The registration id holds white space, a control character or a format character
    /// (Unicode `Cc`, `Cf`: U+200B, U+202E, …), which no real id has.
    #[error("registration_id: must not contain white space, control or format characters")]
    InvalidRegistrationId,
    /// The registration id is longer than [`MAX_REGISTRATION_ID`] bytes, which no real id is.
    #[error("registration_id: is over {MAX_REGISTRATION_ID} bytes")]
    RegistrationIdTooLong,
    /// No collapse key was given; the service answers `MissingCollapseKey` without one.
    #[error("collapse_key: is required")]
    MissingCollapseKey,
    /// The collapse key is empty.
    #[error("collapse_key: must not be empty")]
    EmptyCollapseKey,
    /// A data key is empty (`data.` alone).
    #[error("data: a key must not be empty")]
    EmptyDataKey,
    /// A data key is reserved (`from`, or starting with `google.`).
    #[error("data.{0}: the key is reserved")]
    ReservedDataKey(String),
    /// The same data key was given twice.
    #[error("data.{0}: the key is given more than once")]
    DuplicateDataKey(String),
    /// The payload (UTF-8 bytes of every data key and value) is over the limit.
    #[error("data: payload is {size} bytes, over the limit of {limit}")]
    PayloadTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// The id an Android app got from C2DM and handed to the app server: the address of one device.
    ///
    /// ```
    /// use c2dm_core::RegistrationId;
    /// let id = RegistrationId::new("APA91b-device-1")?;
    /// assert_eq!(id.as_str(), "APA91b-device-1");
    /// assert!(RegistrationId::new("").is_err());
    /// # Ok::<(), c2dm_core::MessageError>(())
    /// ```
    RegistrationId
);

impl RegistrationId {
    /// Checks and wraps a registration id: non-empty, at most [`MAX_REGISTRATION_ID`] bytes,
    /// without white space, control or format characters.
    pub fn new(id: impl AsRef<str>) -> Result<Self, MessageError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(MessageError::EmptyRegistrationId);
        }
        if id.len() > MAX_REGISTRATION_ID {
            return Err(MessageError::RegistrationIdTooLong);
        }
        if id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || is_format(c))
        {
            return Err(MessageError::InvalidRegistrationId);
        }
        Ok(Self(id.into()))
    }
}

/// Whether `c` is a format character (Unicode general category `Cf`, as of Unicode 16):
/// invisible characters that change how text around them shows (zero-width spaces, direction
/// overrides), which an id can only carry to mislead.
fn is_format(c: char) -> bool {
    const CF: &[(u32, u32)] = &[
        (0xAD, 0xAD),
        (0x600, 0x605),
        (0x61C, 0x61C),
        (0x6DD, 0x6DD),
        (0x70F, 0x70F),
        (0x890, 0x891),
        (0x8E2, 0x8E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    let c = u32::from(c);
    CF.iter().any(|&(low, high)| (low..=high).contains(&c))
}

string_newtype!(
    /// Groups like messages: while a device is offline, only the last message per key is kept.
    CollapseKey
);

impl CollapseKey {
    /// Checks and wraps a collapse key (non-empty).
    pub fn new(key: impl AsRef<str>) -> Result<Self, MessageError> {
        let key = key.as_ref();
        if key.is_empty() {
            return Err(MessageError::EmptyCollapseKey);
        }
        Ok(Self(key.into()))
    }
}

string_newtype!(
    /// The id the service gave an accepted message, e.g. `0:1326885481081626%900b347100019e5f`.
    MessageId
);

impl MessageId {
    /// Wraps a message id as the service returned it.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(id.as_ref().into())
    }
}

/// One push message for one device, valid by construction.
///
/// Build it with [`Message::builder`]; everything the protocol forbids is refused there, so a
/// `Message` can always be sent.
///
/// ```
/// use c2dm_core::Message;
/// let message = Message::builder("APA91b-device-1")
///     .collapse_key("orders")
///     .data("message", "shipped")
///     .delay_while_idle(true)
///     .build()?;
/// assert_eq!(message.data_value("message"), Some("shipped"));
/// assert_eq!(message.payload_size(), "message".len() + "shipped".len());
/// # Ok::<(), c2dm_core::MessageError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    registration_id: RegistrationId,
    /// Everything but the device, shared by every message a template fans out to.
    content: Arc<Content>,
}

#[derive(PartialEq, Eq)]
struct Content {
    collapse_key: CollapseKey,
    data: Box<[(String, String)]>,
    delay_while_idle: bool,
    /// The send form after the registration id (`&collapse_key=…&data.<key>=…`), encoded once
    /// for all the devices a template goes to.
    form_tail: String,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("registration_id", &self.registration_id)
            .field("collapse_key", &self.content.collapse_key)
            .field("data", &self.content.data)
            .field("delay_while_idle", &self.content.delay_while_idle)
            .finish()
    }
}

impl Message {
    /// Starts a message to `registration_id`; nothing is checked until [`MessageBuilder::build`].
    pub fn builder(registration_id: impl Into<String>) -> MessageBuilder {
        MessageBuilder {
            registration_id: registration_id.into(),
            collapse_key: None,
            data: Vec::new(),
            delay_while_idle: false,
            payload_limit: DEFAULT_PAYLOAD_LIMIT,
        }
    }

    /// The device this message goes to.
    pub fn registration_id(&self) -> &RegistrationId {
        &self.registration_id
    }

    /// The collapse key.
    pub fn collapse_key(&self) -> &CollapseKey {
        &self.content.collapse_key
    }

    /// The data pairs, in the order they were added (keys without the `data.` prefix).
    pub fn data(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.content
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of one data key, if present.
    pub fn data_value(&self, key: &str) -> Option<&str> {
        self.content
            .data
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the device should get the message only when it wakes.
    pub fn delay_while_idle(&self) -> bool {
        self.content.delay_while_idle
    }

    /// The payload size as the limit counts it: the UTF-8 bytes of every data key and value.
    pub fn payload_size(&self) -> usize {
        payload_size(self.data())
    }

    /// The send form after the registration id, already encoded.
    pub(crate) fn form_tail(&self) -> &str {
        &self.content.form_tail
    }

    /// The same message addressed to another device: how one template fans out in a broadcast.
    ///
    /// The data is shared, not copied, and so is its encoding: this is cheap, and so is sending
    /// each copy.
    pub fn with_registration_id(&self, registration_id: RegistrationId) -> Message {
        Message {
            registration_id,
            content: Arc::clone(&self.content),
        }
    }
}

/// The payload size of a set of data pairs, as the protocol counts it.
pub fn payload_size<'a>(data: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    data.into_iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Builds a [`Message`]; see [`Message::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct MessageBuilder {
    registration_id: String,
    collapse_key: Option<String>,
    data: Vec<(String, String)>,
    delay_while_idle: bool,
    payload_limit: usize,
}

impl MessageBuilder {
    /// Sets the collapse key (required).
    pub fn collapse_key(mut self, key: impl Into<String>) -> Self {
        self.collapse_key = Some(key.into());
        self
    }

    /// Adds one `data.<key>` pair. Keys keep their order.
    pub fn data(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.data.push((key.into(), value.into()));
        self
    }

    /// Sets whether the message waits until the device is awake (default: no).
    pub fn delay_while_idle(mut self, delay: bool) -> Self {
        self.delay_while_idle = delay;
        self
    }

    /// Sets the payload limit in bytes (default [`DEFAULT_PAYLOAD_LIMIT`]). The original counting
    /// rule is lost, so the limit is a setting here and in the emulator.
    pub fn payload_limit(mut self, limit: usize) -> Self {
        self.payload_limit = limit;
        self
    }

    /// Checks every field and returns the message, or the first problem found.
    pub fn build(self) -> Result<Message, MessageError> {
        let registration_id = RegistrationId::new(&self.registration_id)?;
        let collapse_key = CollapseKey::new(
            self.collapse_key
                .as_deref()
                .ok_or(MessageError::MissingCollapseKey)?,
        )?;
        for (i, (key, _)) in self.data.iter().enumerate() {
            if key.is_empty() {
                return Err(MessageError::EmptyDataKey);
            }
            if RESERVED_KEYS.contains(&key.as_str()) || key.starts_with(RESERVED_PREFIX) {
                return Err(MessageError::ReservedDataKey(key.clone()));
            }
            if self.data[..i].iter().any(|(k, _)| k == key) {
                return Err(MessageError::DuplicateDataKey(key.clone()));
            }
        }
        let size = payload_size(self.data.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if size > self.payload_limit {
            return Err(MessageError::PayloadTooLarge {
                size,
                limit: self.payload_limit,
            });
        }
        let form_tail = encode_form_tail(&collapse_key, &self.data, self.delay_while_idle);
        Ok(Message {
            registration_id,
            content: Arc::new(Content {
                collapse_key,
                data: self.data.into(),
                delay_while_idle: self.delay_while_idle,
                form_tail,
            }),
        })
    }
}

/// What follows the registration id in the send form, `&` included: every field but the
/// device. [`Message`] keeps it, encoded once, for all the devices a template goes to.
fn encode_form_tail(
    collapse_key: &CollapseKey,
    data: &[(String, String)],
    delay_while_idle: bool,
) -> String {
    let capacity = 32 + payload_size(data.iter().map(|(k, v)| (k.as_str(), v.as_str()))) * 3 / 2;
    let mut tail = String::with_capacity(capacity);
    tail.push('&');
    // Pairs after position 1 get their `&`; the first follows the one above.
    let mut form = form_urlencoded::Serializer::for_suffix(tail, 1);
    form.append_pair("collapse_key", collapse_key.as_str());
    let mut key = String::new();
    for (k, v) in data {
        key.clear();
        key.push_str("data.");
        key.push_str(k);
        form.append_pair(&key, v);
    }
    if delay_while_idle {
        form.append_pair("delay_while_idle", "1");
    }
    form.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> MessageBuilder {
        Message::builder("reg-1").collapse_key("k")
    }

    #[test]
    fn valid_message_keeps_data_order() {
        let m = base().data("b", "2").data("a", "1").build().unwrap();
        let data: Vec<_> = m.data().collect();
        assert_eq!(data, vec![("b", "2"), ("a", "1")]);
        assert_eq!(m.registration_id().as_str(), "reg-1");
        assert_eq!(m.collapse_key().as_str(), "k");
        assert!(!m.delay_while_idle());
    }

    #[test]
    fn registration_id_is_checked() {
        assert_eq!(
            Message::builder("").collapse_key("k").build(),
            Err(MessageError::EmptyRegistrationId)
        );
        for bad in [
            "a b",
            "a\nb",
            "a\u{7f}b",
            " a",
            "a\u{200b}b",
            "a\u{202e}b",
            "\u{feff}a",
            "a\u{e0041}",
        ] {
            assert_eq!(
                Message::builder(bad).collapse_key("k").build(),
                Err(MessageError::InvalidRegistrationId),
                "{bad:?}"
            );
        }
        let longest = "a".repeat(MAX_REGISTRATION_ID);
        assert!(RegistrationId::new(&longest).is_ok());
        assert_eq!(
            RegistrationId::new(format!("{longest}b")),
            Err(MessageError::RegistrationIdTooLong)
        );
        // Letters of every script are fine; only the format characters are not.
        assert!(RegistrationId::new("APA91b-ü-ж-中").is_ok());
    }

    #[test]
    fn collapse_key_is_required_and_non_empty() {
        assert_eq!(
            Message::builder("r").build(),
            Err(MessageError::MissingCollapseKey)
        );
        assert_eq!(
            Message::builder("r").collapse_key("").build(),
            Err(MessageError::EmptyCollapseKey)
        );
    }

    #[test]
    fn data_keys_are_checked() {
        assert_eq!(
            base().data("", "v").build(),
            Err(MessageError::EmptyDataKey)
        );
        assert_eq!(
            base().data("from", "v").build(),
            Err(MessageError::ReservedDataKey("from".into()))
        );
        assert_eq!(
            base().data("google.x", "v").build(),
            Err(MessageError::ReservedDataKey("google.x".into()))
        );
        assert_eq!(
            base().data("a", "1").data("a", "2").build(),
            Err(MessageError::DuplicateDataKey("a".into()))
        );
        // Control characters and any UTF-8 are fine: form encoding carries them.
        assert!(
            base()
                .data("tab\tkey", "line\nbreak \u{1}é😀")
                .build()
                .is_ok()
        );
        assert!(base().data("fromage", "v").build().is_ok());
    }

    #[test]
    fn payload_limit_counts_utf8_bytes_of_keys_and_values() {
        // "k" (1 byte) + 1023 bytes = 1024: accepted.
        let exact = "é".repeat(511) + "x"; // 511 * 2 + 1 = 1023 bytes
        assert_eq!(exact.len(), 1023);
        let m = base().data("k", exact.clone()).build().unwrap();
        assert_eq!(m.payload_size(), 1024);
        // One more byte: refused, with the sizes.
        let over = exact + "x";
        assert_eq!(
            base().data("k", over).build(),
            Err(MessageError::PayloadTooLarge {
                size: 1025,
                limit: 1024
            })
        );
        // Multi-byte in the key counts too: "ü" is 2 bytes.
        let value = "v".repeat(1022);
        assert!(base().data("ü", value.clone()).build().is_ok());
        assert!(base().data("üx", value).build().is_err());
    }

    #[test]
    fn payload_limit_is_settable() {
        assert!(base().data("k", "vvvv").payload_limit(5).build().is_ok());
        assert_eq!(
            base().data("k", "vvvvv").payload_limit(5).build(),
            Err(MessageError::PayloadTooLarge { size: 6, limit: 5 })
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            MessageError::MissingCollapseKey
                .to_string()
                .starts_with("collapse_key")
        );
        assert_eq!(
            MessageError::ReservedDataKey("from".into()).to_string(),
            "data.from: the key is reserved"
        );
    }

    #[test]
    fn with_registration_id_shares_the_rest() {
        let m = base()
            .data("a", "1")
            .delay_while_idle(true)
            .build()
            .unwrap();
        let other = m.with_registration_id(RegistrationId::new("reg-2").unwrap());
        assert_eq!(other.registration_id().as_str(), "reg-2");
        assert_eq!(other.data_value("a"), Some("1"));
        assert!(other.delay_while_idle());
    }
}
