//! An FCM HTTP v1 message, validated when built: exactly one target, data keys FCM allows, a
//! payload within FCM's limit, a time to live within its range.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use c2dm_core::RegistrationId;

/// The most bytes of payload a message carries: its data keys and values, with the
/// notification's title, body and image.
pub const MAX_PAYLOAD: usize = 4096;

/// The most bytes of payload a message to a topic carries.
pub const MAX_TOPIC_PAYLOAD: usize = 2048;

/// The longest time to live FCM keeps a message for: 28 days.
pub const MAX_TTL: Duration = Duration::from_secs(28 * 24 * 3600);

/// The longest registration token, topic or condition taken, in bytes.
pub const MAX_TARGET: usize = c2dm_core::MAX_REGISTRATION_ID;

/// Data keys FCM keeps for itself: a message with one is refused.
pub const RESERVED_KEYS: [&str; 3] = ["from", "notification", "message_type"];

/// Prefixes of data keys FCM keeps for itself.
pub const RESERVED_PREFIXES: [&str; 2] = ["google", "gcm"];

/// Whom a message goes to: exactly one of a device's registration token, a topic, or a
/// condition over topics.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// One device, by the registration token its app got from FCM.
    Token(String),
    /// Every device subscribed to the topic (`[a-zA-Z0-9-_.~%]+`, without `/topics/`).
    Topic(String),
    /// Every device whose topics satisfy the condition (e.g. `'news' in topics && 'uk' in
    /// topics`).
    Condition(String),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(token) => f.debug_tuple("Token").field(token).finish(),
            Self::Topic(topic) => f.debug_tuple("Topic").field(topic).finish(),
            Self::Condition(c) => f.debug_tuple("Condition").field(c).finish(),
        }
    }
}

/// How urgently Android delivers a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Delivered when the device is awake (FCM's default for data messages).
    Normal,
    /// Delivered at once, waking a sleeping device.
    High,
}

impl Priority {
    /// As FCM writes it: `NORMAL` or `HIGH`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "NORMAL",
            Self::High => "HIGH",
        }
    }
}

/// A notification the system shows for the app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    /// Its title.
    pub title: Option<String>,
    /// Its text.
    pub body: Option<String>,
    /// The URL of an image to show with it.
    pub image: Option<String>,
}

/// Why a message cannot be built. Each names what is wrong; nothing is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FcmMessageError {
    /// No token, topic or condition was given.
    #[error("a message needs a token, a topic or a condition")]
    NoTarget,
    /// More than one of token, topic and condition was given.
    #[error("a message has exactly one of a token, a topic or a condition")]
    TwoTargets,
    /// The token, topic or condition is empty, too long, or has characters it cannot have.
    #[error("the {what} is not valid: {why}")]
    InvalidTarget {
        /// `token`, `topic` or `condition`.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A data key is empty or kept by FCM.
    #[error("the data key {key:?} is reserved or empty")]
    ReservedKey {
        /// The key.
        key: String,
    },
    /// A data key is given twice.
    #[error("the data key {key:?} is given twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// The payload is over FCM's limit.
    #[error("the payload is {size} bytes, over the limit of {limit}")]
    TooBig {
        /// The payload's size in bytes.
        size: usize,
        /// The limit for this target.
        limit: usize,
    },
    /// The time to live is over 28 days.
    #[error("the time to live is over 28 days")]
    TtlTooLong,
    /// A text field is empty or holds control characters.
    #[error("the {field} is empty or holds control characters")]
    InvalidText {
        /// `collapse_key`, `restricted_package_name`, `title`, `body` or `image`.
        field: &'static str,
    },
    /// FCM has no `delay_while_idle`: a C2DM message asking for it cannot go through FCM as it
    /// is (Android decides when a normal-priority message arrives).
    #[error(
        "FCM has no delay_while_idle: send the message without it (normal priority is the nearest)"
    )]
    DelayWhileIdle,
}

/// A message for FCM HTTP v1, validated: see [`FcmMessage::builder`].
///
/// ```
/// use std::time::Duration;
/// use c2dm_fcm::{FcmMessage, Priority};
///
/// let message = FcmMessage::builder()
///     .token("device-token")
///     .data("order", "shipped")
///     .collapse_key("orders")
///     .priority(Priority::High)
///     .ttl(Duration::from_secs(3600))
///     .build()?;
/// let json: serde_json::Value = serde_json::from_slice(&message.to_json(false))?;
/// assert_eq!(json["message"]["token"], "device-token");
/// assert_eq!(json["message"]["data"]["order"], "shipped");
/// assert_eq!(json["message"]["android"]["ttl"], "3600s");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmMessage {
    target: Target,
    /// What the sender keys device pauses and deliveries by: the token, or `/topics/<topic>`,
    /// or `condition:<the condition, form-encoded>`.
    device: RegistrationId,
    data: Vec<(String, String)>,
    notification: Option<Notification>,
    collapse_key: Option<String>,
    priority: Option<Priority>,
    ttl: Option<Duration>,
    restricted_package_name: Option<String>,
}

/// Builds an [`FcmMessage`]; [`build`](Self::build) checks it.
#[derive(Debug, Clone, Default)]
pub struct FcmMessageBuilder {
    targets: Vec<Target>,
    data: Vec<(String, String)>,
    notification: Option<Notification>,
    collapse_key: Option<String>,
    priority: Option<Priority>,
    ttl: Option<Duration>,
    restricted_package_name: Option<String>,
}

impl FcmMessageBuilder {
    /// Sends to one device, by its registration token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.targets.push(Target::Token(token.into()));
        self
    }

    /// Sends to the devices subscribed to `topic`.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.targets.push(Target::Topic(topic.into()));
        self
    }

    /// Sends to the devices whose topics satisfy `condition`.
    pub fn condition(mut self, condition: impl Into<String>) -> Self {
        self.targets.push(Target::Condition(condition.into()));
        self
    }

    /// Adds a data pair for the app.
    pub fn data(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.data.push((key.into(), value.into()));
        self
    }

    /// Shows a notification with this title and text.
    pub fn notification(mut self, title: impl Into<String>, body: impl Into<String>) -> Self {
        let notification = self.notification.get_or_insert_with(Notification::default);
        notification.title = Some(title.into());
        notification.body = Some(body.into());
        self
    }

    /// Shows the notification with the image at `url`.
    pub fn image(mut self, url: impl Into<String>) -> Self {
        self.notification
            .get_or_insert_with(Notification::default)
            .image = Some(url.into());
        self
    }

    /// Groups messages: while a device is offline, only the last with a key is kept.
    pub fn collapse_key(mut self, key: impl Into<String>) -> Self {
        self.collapse_key = Some(key.into());
        self
    }

    /// How urgently Android delivers it.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }

    /// How long FCM keeps it for a device that is offline (at most 28 days; 0: now or never).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Only the app with this package name receives it.
    pub fn restricted_package_name(mut self, name: impl Into<String>) -> Self {
        self.restricted_package_name = Some(name.into());
        self
    }

    /// Checks the message: exactly one valid target, data keys FCM allows (each once), a payload
    /// within its limit, the texts without control characters, a time to live within 28 days.
    pub fn build(self) -> Result<FcmMessage, FcmMessageError> {
        let mut targets = self.targets.into_iter();
        let target = targets.next().ok_or(FcmMessageError::NoTarget)?;
        if targets.next().is_some() {
            return Err(FcmMessageError::TwoTargets);
        }
        check_target(&target)?;
        let mut seen = std::collections::HashSet::new();
        for (key, _) in &self.data {
            if is_reserved(key) {
                return Err(FcmMessageError::ReservedKey { key: key.clone() });
            }
            if !seen.insert(key.as_str()) {
                return Err(FcmMessageError::DuplicateKey { key: key.clone() });
            }
        }
        if let Some(n) = &self.notification {
            check_text(n.title.as_deref(), "title")?;
            check_text(n.body.as_deref(), "body")?;
            check_text(n.image.as_deref(), "image")?;
        }
        check_text(self.collapse_key.as_deref(), "collapse_key")?;
        check_text(
            self.restricted_package_name.as_deref(),
            "restricted_package_name",
        )?;
        if self.ttl.is_some_and(|ttl| ttl > MAX_TTL) {
            return Err(FcmMessageError::TtlTooLong);
        }
        let device = device_of(&target)?;
        let message = FcmMessage {
            target,
            device,
            data: self.data,
            notification: self.notification,
            collapse_key: self.collapse_key,
            priority: self.priority,
            ttl: self.ttl,
            restricted_package_name: self.restricted_package_name,
        };
        let limit = message.payload_limit();
        let size = message.payload_size();
        if size > limit {
            return Err(FcmMessageError::TooBig { size, limit });
        }
        Ok(message)
    }
}

/// Whether FCM keeps `key` for itself (or it is empty).
pub fn is_reserved(key: &str) -> bool {
    key.is_empty()
        || RESERVED_KEYS.contains(&key)
        || RESERVED_PREFIXES
            .iter()
            .any(|prefix| key.starts_with(prefix))
}

fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

fn check_text(text: Option<&str>, field: &'static str) -> Result<(), FcmMessageError> {
    match text {
        Some(text) if text.is_empty() || has_control(text) => {
            Err(FcmMessageError::InvalidText { field })
        }
        _ => Ok(()),
    }
}

/// The key of `target` as a registration id.
fn device_of(target: &Target) -> Result<RegistrationId, FcmMessageError> {
    let key = match target {
        Target::Token(t) => t.clone(),
        Target::Topic(t) => format!("/topics/{t}"),
        // A condition has spaces and quotes: its key is its form-encoding.
        Target::Condition(c) => format!(
            "condition:{}",
            form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
        ),
    };
    RegistrationId::new(key).map_err(|_| FcmMessageError::InvalidTarget {
        what: "target",
        why: "it is not valid as a registration id",
    })
}

fn check_target(target: &Target) -> Result<(), FcmMessageError> {
    let (what, text) = match target {
        Target::Token(t) => ("token", t),
        Target::Topic(t) => ("topic", t),
        Target::Condition(c) => ("condition", c),
    };
    let invalid = |why| Err(FcmMessageError::InvalidTarget { what, why });
    if text.is_empty() {
        return invalid("it is empty");
    }
    if text.len() > MAX_TARGET {
        return invalid("it is over 4,096 bytes");
    }
    match target {
        Target::Token(t) if t.chars().any(|c| c.is_control() || c.is_whitespace()) => {
            invalid("it holds spaces or control characters")
        }
        Target::Topic(t)
            if t.starts_with("/topics/")
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)) =>
        {
            invalid("a topic is letters, digits and -_.~% only, without /topics/")
        }
        Target::Condition(c) if has_control(c) => invalid("it holds control characters"),
        _ => Ok(()),
    }
}

impl FcmMessage {
    /// A builder; nothing is checked until [`FcmMessageBuilder::build`].
    pub fn builder() -> FcmMessageBuilder {
        FcmMessageBuilder::default()
    }

    /// The C2DM message as FCM sends it: its registration id as the token, its collapse key,
    /// its `data.<key>` pairs as data. C2DM's `delay_while_idle` has no FCM counterpart: a
    /// message that asks for it is refused ([`FcmMessageError::DelayWhileIdle`]) rather than
    /// sent without it.
    pub fn from_c2dm(message: &c2dm_core::Message) -> Result<Self, FcmMessageError> {
        if message.delay_while_idle() {
            return Err(FcmMessageError::DelayWhileIdle);
        }
        let mut builder = Self::builder()
            .token(message.registration_id().as_str())
            .collapse_key(message.collapse_key().as_str());
        for (key, value) in message.data() {
            builder = builder.data(key, value);
        }
        builder.build()
    }

    /// The same message to another device: the template's checks hold, only the token is
    /// checked.
    pub fn with_token(&self, token: impl Into<String>) -> Result<Self, FcmMessageError> {
        let target = Target::Token(token.into());
        check_target(&target)?;
        Ok(Self {
            device: device_of(&target)?,
            target,
            ..self.clone()
        })
    }

    /// The same message to the device `token`, already checked as a registration id (no
    /// control characters, at most 4,096 bytes): how a broadcast fans a template out.
    pub fn to_device(&self, token: RegistrationId) -> Self {
        Self {
            target: Target::Token(token.as_str().to_owned()),
            device: token,
            ..self.clone()
        }
    }

    /// Where it goes, as the sender keys pauses and deliveries: the token, `/topics/<topic>`
    /// or `condition:<the condition, form-encoded>`.
    pub fn device(&self) -> &RegistrationId {
        &self.device
    }

    /// Whom it goes to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The registration token, for a message to one device.
    pub fn token(&self) -> Option<&str> {
        match &self.target {
            Target::Token(token) => Some(token),
            _ => None,
        }
    }

    /// The data pairs, in the order given.
    pub fn data(&self) -> &[(String, String)] {
        &self.data
    }

    /// The notification, if any.
    pub fn notification(&self) -> Option<&Notification> {
        self.notification.as_ref()
    }

    /// The collapse key, if any.
    pub fn collapse_key(&self) -> Option<&str> {
        self.collapse_key.as_deref()
    }

    /// The priority, if set.
    pub fn priority(&self) -> Option<Priority> {
        self.priority
    }

    /// The time to live, if set.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// The only package that receives it, if set.
    pub fn restricted_package_name(&self) -> Option<&str> {
        self.restricted_package_name.as_deref()
    }

    /// The payload's size as FCM counts it: data keys and values, and the notification's texts.
    pub fn payload_size(&self) -> usize {
        let data: usize = self.data.iter().map(|(k, v)| k.len() + v.len()).sum();
        let notification = self.notification.as_ref().map_or(0, |n| {
            [&n.title, &n.body, &n.image]
                .iter()
                .map(|t| t.as_ref().map_or(0, String::len))
                .sum()
        });
        data + notification
    }

    /// The payload limit for its target.
    pub fn payload_limit(&self) -> usize {
        match self.target {
            Target::Topic(_) => MAX_TOPIC_PAYLOAD,
            _ => MAX_PAYLOAD,
        }
    }

    /// The request body: `{"message": {...}, "validate_only": …}` (`validate_only` only when
    /// set: FCM then checks the message and sends nothing).
    pub fn to_json(&self, validate_only: bool) -> Bytes {
        use serde_json::{Map, Value};
        let mut message = Map::new();
        let (key, value) = match &self.target {
            Target::Token(t) => ("token", t),
            Target::Topic(t) => ("topic", t),
            Target::Condition(c) => ("condition", c),
        };
        message.insert(key.into(), Value::String(value.clone()));
        if !self.data.is_empty() {
            let data: Map<String, Value> = self
                .data
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            message.insert("data".into(), Value::Object(data));
        }
        if let Some(n) = &self.notification {
            let mut notification = Map::new();
            for (field, text) in [("title", &n.title), ("body", &n.body), ("image", &n.image)] {
                if let Some(text) = text {
                    notification.insert(field.into(), Value::String(text.clone()));
                }
            }
            message.insert("notification".into(), Value::Object(notification));
        }
        let mut android = Map::new();
        if let Some(key) = &self.collapse_key {
            android.insert("collapse_key".into(), Value::String(key.clone()));
        }
        if let Some(priority) = self.priority {
            android.insert("priority".into(), Value::String(priority.as_str().into()));
        }
        if let Some(ttl) = self.ttl {
            android.insert("ttl".into(), Value::String(duration_text(ttl)));
        }
        if let Some(name) = &self.restricted_package_name {
            android.insert(
                "restricted_package_name".into(),
                Value::String(name.clone()),
            );
        }
        if !android.is_empty() {
            message.insert("android".into(), Value::Object(android));
        }
        let mut body = Map::new();
        body.insert("message".into(), Value::Object(message));
        if validate_only {
            body.insert("validate_only".into(), Value::Bool(true));
        }
        Bytes::from(serde_json::to_vec(&Value::Object(body)).unwrap_or_default())
    }
}

/// A duration as protobuf's JSON writes one: seconds, with up to nine decimals, and `s`.
pub fn duration_text(duration: Duration) -> String {
    let nanos = duration.subsec_nanos();
    if nanos == 0 {
        format!("{}s", duration.as_secs())
    } else {
        let fraction = format!("{nanos:09}");
        format!("{}.{}s", duration.as_secs(), fraction.trim_end_matches('0'))
    }
}
