//! What the store keeps and gives: devices, pushes, their rows, and a batch's run.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What a device is to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Registered, and pushes go to it.
    Active,
    /// The app unregistered it (`DELETE /v1/devices/{id}`).
    Unregistered,
    /// C2DM said it is gone (`NotRegistered`, `InvalidRegistration`).
    Gone,
}

impl DeviceState {
    /// `active`, `unregistered` or `gone`, as stored and as the API writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Unregistered => "unregistered",
            Self::Gone => "gone",
        }
    }

    /// Reads a state as [`DeviceState::as_str`] writes it.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "unregistered" => Some(Self::Unregistered),
            "gone" => Some(Self::Gone),
            _ => None,
        }
    }
}

/// Which service sends to a device.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// C2DM: the device's id is a C2DM registration id.
    #[default]
    C2dm,
    /// FCM HTTP v1: the device's id is an FCM registration token.
    Fcm,
}

impl Provider {
    /// `c2dm` or `fcm`, as stored and as the API writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::C2dm => "c2dm",
            Self::Fcm => "fcm",
        }
    }

    /// Reads a provider as [`Provider::as_str`] writes it.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "c2dm" => Some(Self::C2dm),
            "fcm" => Some(Self::Fcm),
            _ => None,
        }
    }
}

/// A device as the app registers it. Registering an id that exists updates it and makes it
/// active again; a field given as `None` is left as stored (on a new device, empty), so an app
/// that registers again with its id alone keeps its user, tags and version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewDevice {
    /// The registration id C2DM gave the app (checked by [`c2dm_core::RegistrationId`]).
    pub registration_id: String,
    /// The app's own name for the device: `Some(None)` clears it, `None` keeps it.
    pub device_id: Option<Option<String>>,
    /// Whom the device belongs to (pushes can go to every device of a user): `Some(None)`
    /// clears it, `None` keeps it.
    pub user_id: Option<Option<String>>,
    /// Labels (pushes can go to every device with a tag): `Some` replaces them (`Some(vec![])`
    /// clears them), `None` keeps them.
    pub tags: Option<Vec<String>>,
    /// The app's version: `Some(None)` clears it, `None` keeps it.
    pub app_version: Option<Option<String>>,
    /// Which service sends to it: `None` keeps it (on a new device, C2DM).
    pub provider: Option<Provider>,
}

/// A device as the server keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The position in the store's order: what a page's `next` cursor is made of.
    pub position: i64,
    /// The registration id.
    pub registration_id: String,
    /// The app's own name for the device.
    pub device_id: Option<String>,
    /// Whom it belongs to.
    pub user_id: Option<String>,
    /// Its tags, sorted.
    pub tags: Vec<String>,
    /// The app's version.
    pub app_version: Option<String>,
    /// Which service sends to it.
    pub provider: Provider,
    /// Active, unregistered or gone.
    pub state: DeviceState,
    /// Why it is gone: the C2DM code.
    pub reason: Option<String>,
    /// When it was first registered.
    pub created_at: SystemTime,
    /// When it was last registered or changed.
    pub updated_at: SystemTime,
    /// When its state last changed.
    pub state_changed_at: SystemTime,
}

/// Whether an upsert created the device or updated one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// A new registration id.
    Created,
    /// An id that was known (and is active again).
    Updated,
}

/// Which devices a listing wants; every field narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Only devices in this state.
    pub state: Option<DeviceState>,
    /// Only this user's devices.
    pub user_id: Option<String>,
    /// Only devices with this tag.
    pub tag: Option<String>,
    /// Only devices whose registration id starts with this (a scan of the devices the other
    /// fields leave, paged as usual; not for counts).
    pub registration_id_prefix: Option<String>,
}

/// Which pushes a listing wants; every field narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushFilter {
    /// Only pushes in this state.
    pub state: Option<PushState>,
    /// Only pushes whose collapse key starts with this.
    pub collapse_key_prefix: Option<String>,
}

/// One page of a keyset-paged listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in the store's order.
    pub items: Vec<T>,
    /// Where the next page starts (pass it as `after`), or `None` on the last page.
    pub next: Option<i64>,
}

/// Who a push goes to: `{"registration_ids": [...]}`, `{"user_id": ...}`, `{"tag": ...}` or
/// `"all"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum Audience {
    /// These registration ids (registered or not; known ones that are no longer active get a
    /// `not_attempted` row instead of a send).
    RegistrationIds {
        /// The ids.
        registration_ids: Vec<String>,
    },
    /// Every active device of this user.
    User {
        /// The user.
        user_id: String,
    },
    /// Every active device with this tag.
    Tag {
        /// The tag.
        tag: String,
    },
    /// Every active device.
    All(Everyone),
    /// The devices a cancelled push did not reach (its `not_attempted: cancelled` rows) that
    /// are still active: the audience of the push that finishes it
    /// (`POST /v1/pushes/{id}/finish`).
    Remaining {
        /// The cancelled push.
        remaining_of: i64,
    },
}

/// As a log line says it: `all`, `user alice`, `tag beta`, `3 registration ids`.
impl std::fmt::Display for Audience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RegistrationIds { registration_ids } => {
                write!(f, "{} registration ids", registration_ids.len())
            }
            Self::User { user_id } => write!(f, "user {user_id}"),
            Self::Tag { tag } => write!(f, "tag {tag}"),
            Self::All(_) => f.write_str("all"),
            Self::Remaining { remaining_of } => {
                write!(f, "the devices push {remaining_of} did not reach")
            }
        }
    }
}

/// The one word for "every active device": `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Everyone {
    /// Every active device.
    All,
}

/// A push as the API takes it (validated before it gets here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPush {
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<String>,
    /// Who it goes to.
    pub audience: Audience,
    /// The collapse key.
    pub collapse_key: String,
    /// The `data.<key>` pairs, in order.
    pub data: Vec<(String, String)>,
    /// Deliver only when the device wakes.
    pub delay_while_idle: bool,
}

/// Where a push is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PushState {
    /// Stored; its job has not started.
    Queued,
    /// Its devices are being sent to.
    Sending,
    /// Every device has its final row.
    Done,
    /// Cancelled; every device still has its final row (`not_attempted: cancelled` for those
    /// not sent).
    Cancelled,
}

impl PushState {
    /// As stored and as the API writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a state as [`PushState::as_str`] writes it.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "queued" => Some(Self::Queued),
            "sending" => Some(Self::Sending),
            "done" => Some(Self::Done),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// How many devices of a push came to each outcome so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Counts {
    /// Accepted by C2DM.
    pub accepted: u64,
    /// Refused for good, by C2DM error code.
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Not accepted after retrying.
    pub failed: u64,
    /// Never sent, by reason (`cancelled`, `gone`, …).
    pub not_attempted: std::collections::BTreeMap<String, u64>,
    /// Devices of the audience without a final row yet (known once the audience is walked).
    pub pending: Option<u64>,
}

/// How many devices of a push came to each outcome so far, counted as its rows are written
/// (what a list of pushes shows without counting their rows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeTally {
    /// Accepted by C2DM.
    pub accepted: u64,
    /// Refused for good.
    pub rejected: u64,
    /// Not accepted after retrying.
    pub failed: u64,
    /// Never sent.
    pub not_attempted: u64,
}

impl OutcomeTally {
    /// Devices with their final row.
    pub fn recorded(&self) -> u64 {
        self.accepted + self.rejected + self.failed + self.not_attempted
    }

    /// Counts one more row with `outcome`.
    pub fn add(&mut self, outcome: c2dm_core::OutcomeKind) {
        match outcome {
            c2dm_core::OutcomeKind::Accepted => self.accepted += 1,
            c2dm_core::OutcomeKind::Rejected => self.rejected += 1,
            c2dm_core::OutcomeKind::Failed => self.failed += 1,
            c2dm_core::OutcomeKind::NotAttempted => self.not_attempted += 1,
        }
    }
}

/// How many devices are in each state (of those a filter picks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"active": 48494, "unregistered": 311, "gone": 1207}))]
pub struct DeviceCounts {
    /// Pushes go to them.
    pub active: u64,
    /// Unregistered by their app.
    pub unregistered: u64,
    /// Reported gone by C2DM.
    pub gone: u64,
}

/// A stored push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Its id.
    pub id: i64,
    /// Who it goes to.
    pub audience: Audience,
    /// The collapse key.
    pub collapse_key: String,
    /// The data pairs.
    pub data: Vec<(String, String)>,
    /// Deliver only when the device wakes.
    pub delay_while_idle: bool,
    /// Where it is.
    pub state: PushState,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// How many devices the audience has, once walked.
    pub total: Option<u64>,
    /// Where the walk of the audience goes on from (the last page's cursor), while it is
    /// under way.
    pub walk_after: Option<i64>,
    /// Devices the walk has put into batch jobs so far.
    pub walked: u64,
    /// Its rows so far, counted by outcome and code (left at zero where a read says so).
    pub counts: Counts,
    /// Its rows so far by outcome, as counted when written (always read).
    pub tally: OutcomeTally,
    /// When it was stored.
    pub created_at: SystemTime,
    /// When its last row was written.
    pub finished_at: Option<SystemTime>,
    /// The last store error its batches met (each retried until it passed), if any.
    pub last_error: Option<PushError>,
}

/// A store error a push's batch met: the batch keeps its rows and tries again, with backoff,
/// until the database takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushError {
    /// What failed, and how (for the operator; never a secret).
    pub error: String,
    /// When it last happened.
    pub at: SystemTime,
    /// Since when its batches have been failing; `None` once a batch that failed wrote again.
    pub failing_since: Option<SystemTime>,
}

/// What became of a push on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    /// The device.
    pub registration_id: String,
    /// Accepted, rejected, failed or not attempted.
    pub outcome: c2dm_core::OutcomeKind,
    /// The id the device's provider gave the message, when accepted.
    pub message_id: Option<String>,
    /// The provider's error code, the error, or why it was not attempted.
    pub error: Option<String>,
    /// Requests made.
    pub attempts: u32,
    /// Sends that may have reached the device without an answer saying so.
    pub possible_duplicates: u32,
    /// When the row was written.
    pub at: SystemTime,
}

impl DeliveryRow {
    /// The row of one delivery of a broadcast.
    pub fn of(delivery: &c2dm_core::Delivery, at: SystemTime) -> Self {
        Self {
            registration_id: delivery.registration_id().to_string(),
            outcome: delivery.outcome().kind(),
            message_id: delivery.message_id().map(ToString::to_string),
            error: delivery.error_text(),
            attempts: delivery.attempts(),
            possible_duplicates: delivery.possible_duplicates(),
            at,
        }
    }

    /// A device that was never sent to, and why.
    pub fn not_attempted(registration_id: &str, why: &str, at: SystemTime) -> Self {
        Self {
            registration_id: registration_id.to_owned(),
            outcome: c2dm_core::OutcomeKind::NotAttempted,
            message_id: None,
            error: Some(why.to_owned()),
            attempts: 0,
            possible_duplicates: 0,
            at,
        }
    }
}

/// One run of a batch job, as [`Store::claim_batch`](super::Store::claim_batch) fenced it: the run's number, and how far
/// the batch's earlier runs had marked its list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRun {
    /// The batch (its job's id, which a run again keeps).
    pub batch: String,
    /// This run's number: the batch's runs count up, and only the latest may mark or record.
    /// Run 1 is the batch's first: no device of it has a row yet. 0 for a push already
    /// finished: nothing was claimed (and [`BatchRun::finished`] is set).
    pub run: i64,
    /// How far earlier runs had marked the batch's list: the devices below it without a row
    /// may have been sent to (0 if no run sent).
    pub marked_through: u64,
    /// How many earlier runs moved the mark: each may have sent to the devices below it.
    pub sending_runs: u32,
    /// An earlier run finished the batch (wrote its last rows and put back what waits for
    /// later), or the whole push is finished: this run has nothing to do.
    pub finished: bool,
}

/// A store failed. Never holds a secret; the message is for the log, not for API clients.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct StoreError(#[from] pub sqlx::Error);

/// What [`Store::reserve_budget`](super::Store::reserve_budget) reserved of an account's
/// budget for a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Messages granted to this reservation (fewer than asked once the budget runs low).
    pub granted: u64,
    /// Messages left of the period's budget after it.
    pub left: u64,
}

/// A sender account as every worker shares it ([`Store::accounts`](super::Store::accounts)):
/// C2DM's account by its name, an FCM project as `fcm:<project id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    /// The account's name.
    pub account: String,
    /// Until when no worker sends for it, if that is still to come.
    pub paused_until: Option<SystemTime>,
    /// Why, while it is paused: the answer that began or last extended the pause.
    pub pause_reason: Option<String>,
    /// The budget period (days since the epoch, UTC) that `budget_used` counts.
    pub budget_day: i64,
    /// Messages reserved in that period by every worker.
    pub budget_used: u64,
}
