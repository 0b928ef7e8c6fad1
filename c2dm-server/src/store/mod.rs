//! Where the server keeps its devices: the [`Store`] trait, with one implementation per
//! database: [`SqliteStore`] (a file, the default) and [`PostgresStore`] (for many processes).

mod busy;
mod group;
mod postgres;
mod rows;
mod sqlite;

use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::queue::Positions;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

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
pub struct NewMessage {
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
pub enum MessageState {
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

impl MessageState {
    /// As stored and as the API writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a state as [`MessageState::as_str`] writes it.
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
pub struct Tally {
    /// Accepted by C2DM.
    pub accepted: u64,
    /// Refused for good.
    pub rejected: u64,
    /// Not accepted after retrying.
    pub failed: u64,
    /// Never sent.
    pub not_attempted: u64,
}

impl Tally {
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
pub struct MessageRecord {
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
    pub state: MessageState,
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
    pub tally: Tally,
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
    /// The id C2DM gave the message, when accepted.
    pub c2dm_message_id: Option<String>,
    /// The C2DM code, the error, or why it was not attempted.
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
            c2dm_message_id: delivery.message_id().map(ToString::to_string),
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
            c2dm_message_id: None,
            error: Some(why.to_owned()),
            attempts: 0,
            possible_duplicates: 0,
            at,
        }
    }
}

/// One run of a batch job, as [`Store::claim_batch`] fenced it: the run's number, and how far
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

/// The server's storage: one implementation per database, where their SQL differs.
#[async_trait]
pub trait Store: Send + Sync {
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// How many rows a batch holds before it writes them (it writes at least every quarter
    /// second too). Each write costs something besides its rows (on PostgreSQL a statement and
    /// its round trip, on SQLite a turn of the store's writer), so fewer, larger writes cost
    /// less; a worker that dies leaves the rows it held unwritten, and their devices are sent
    /// to again (counted as possible duplicates).
    fn rows_per_write(&self) -> usize;

    /// Changes each time a batch, a walk, a cancel or a push's error is recorded through this
    /// store in this process: what a test watches between its looks at a push.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Changes each time a push finishes, or a cancel is asked for, through this store in
    /// this process: what a status request waiting for its push watches between its looks
    /// (a look after every batch's write was hundreds of reads a push).
    fn finishes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Changes each time a cancel is asked for through this store in this process: what a
    /// batch under way watches, without looking at its push at every write of the others.
    fn cancels(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Registers a device, or updates a known one and makes it active again, in one
    /// transaction, keeping the fields `device` leaves out; returns which, and the device as
    /// stored.
    async fn upsert_device(&self, device: &NewDevice) -> Result<(Upserted, Device), StoreError>;

    /// The app unregistered `registration_id`: its state becomes `unregistered`. `None` when
    /// the id is unknown.
    async fn unregister_device(&self, registration_id: &str) -> Result<Option<Device>, StoreError>;

    /// C2DM reported `registration_id` gone with `reason` (its code): the state becomes
    /// `gone`, and no later push picks it. `None` when the id is unknown.
    async fn mark_gone(
        &self,
        registration_id: &str,
        reason: &str,
    ) -> Result<Option<Device>, StoreError>;

    /// One device, if known.
    async fn device(&self, registration_id: &str) -> Result<Option<Device>, StoreError>;

    /// How many devices `filter` picks, by state (its `state` is not looked at).
    async fn device_counts(&self, filter: &DeviceFilter) -> Result<DeviceCounts, StoreError>;

    /// Up to `limit` rows of the device `registration_id`, one per push, newest push first,
    /// from pushes older than `before` (a push id): what became of each push on it.
    async fn device_deliveries(
        &self,
        registration_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, DeliveryRow)>, StoreError>;

    /// Up to `limit` devices matching `filter` whose position is after `after`, in order.
    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Device>, StoreError>;

    /// One page of the active devices a user, tag or `all` audience names, each as its
    /// position and registration id, in position order after `after` (an id list is not
    /// walked here).
    async fn audience_page(
        &self,
        audience: &Audience,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, String)>, StoreError>;

    /// Those of `registration_ids` that are known and not active, with their states (a
    /// batch sends to the others). With `positions`, where every one of them lies in the
    /// registry, the devices not active in that range are read in position order and those
    /// not named left out: no lookup device by device.
    async fn inactive_devices(
        &self,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<Vec<(String, DeviceState)>, StoreError>;

    /// Stores a push, queued, with the job that will send it, in one transaction: a push is
    /// never stored without its job. With an idempotency key already used, stores nothing and
    /// returns the push stored under it: `(false, that push)`.
    async fn create_message(
        &self,
        message: &NewMessage,
    ) -> Result<(bool, MessageRecord), StoreError>;

    /// One push with its counts, if it exists.
    async fn message(&self, id: i64) -> Result<Option<MessageRecord>, StoreError>;

    /// Up to `limit` pushes older than `before` (a push id), newest first, with their tallies
    /// but not their counts (left at zero).
    async fn messages(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Page<MessageRecord>, StoreError>;

    /// One push without its counts (left at zero), if it exists: what a job needs to send it,
    /// at a cost that does not grow with the rows it has.
    async fn message_to_send(&self, id: i64) -> Result<Option<MessageRecord>, StoreError>;

    /// A queued push starts sending (a push in any other state stays as it is).
    async fn start_sending(&self, id: i64) -> Result<(), StoreError>;

    /// One page of the walk of push `id`'s audience: enqueues a batch job for
    /// `registration_ids` and moves the walk on from `from` to `to`, in one transaction, so
    /// that a walk that dies goes on where it was, never enqueuing a page twice. Does nothing
    /// and returns false if the walk is no longer at `from` (another walker moved it).
    /// `positions` says where the devices lie in the registry, if the page was read from it.
    async fn walk_page(
        &self,
        id: i64,
        from: Option<i64>,
        to: i64,
        registration_ids: &[String],
        positions: Option<Positions>,
    ) -> Result<bool, StoreError>;

    /// The batch stored as list `list` (what a job that names its list runs), if it is still
    /// there: a push's lists go when it finishes.
    async fn batch_list(&self, list: i64) -> Result<Option<crate::queue::BatchJob>, StoreError>;

    /// The push's audience has been walked: `total` devices. When every one has its row
    /// already (none at all, say), the push is finished now.
    async fn finish_walk(&self, id: i64, total: u64) -> Result<(), StoreError>;

    /// Notes on the push that a batch of it met `error` at `at` (its batches failing since
    /// `since`, if not already noted earlier): best effort, for the push's status, while the
    /// batch tries again.
    async fn note_push_error(
        &self,
        id: i64,
        error: &str,
        at: SystemTime,
        since: SystemTime,
    ) -> Result<(), StoreError>;

    /// Notes on the push that a batch that failed wrote again: it is no longer failing (its
    /// last error stays, with when it happened).
    async fn clear_push_failing(&self, id: i64) -> Result<(), StoreError>;

    /// Asks to cancel a push: batches not started write `not_attempted: cancelled` rows.
    /// A push already finished (`done` or `cancelled`) is left as it is. `None` for an unknown
    /// push.
    async fn request_cancel(&self, id: i64) -> Result<Option<MessageRecord>, StoreError>;

    /// Those of `registration_ids` that already have a row for push `id` (a batch run again
    /// after a crash skips them).
    async fn recorded(
        &self,
        id: i64,
        registration_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError>;

    /// Starts a run of batch `batch` (its job's id) of push `id`: this run is the batch's
    /// latest from now on, and an earlier run still going (on a worker taken for dead that is
    /// alive after all) can mark and record nothing more. Returns the run, with how far the
    /// earlier runs had marked the list. Read which devices have a row only after this: rows an
    /// earlier run writes are either in that answer or refused.
    async fn claim_batch(&self, id: i64, batch: &str) -> Result<BatchRun, StoreError>;

    /// Notes that `run` of a batch of push `id` is about to send to the devices at positions
    /// below `through` in its list, before those sends start (a mark only grows): were the
    /// worker to die, the batch's next run knows which of its devices without a row may have
    /// been sent to. `false` (and nothing noted) if a later run has claimed the batch: this
    /// one must stop sending. A push's marks go when it finishes.
    async fn mark_sending(&self, id: i64, run: &BatchRun, through: u64)
    -> Result<bool, StoreError>;

    /// Rows of `run` of a batch of push `id` (all of them, or those done so far), and the
    /// devices C2DM reported gone (with the code), in one transaction; a row a device already
    /// has is kept (a batch run twice writes nothing twice). Finishes the push when every
    /// device of its walked audience has its row. `false` (and nothing written) if a later
    /// run has claimed the batch, or its push has finished.
    async fn record_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
    ) -> Result<bool, StoreError>;

    /// The last write of `run` of a batch of push `id`: its last rows and gone devices (as
    /// [`Store::record_batch`]), the batch jobs of the devices it put back for later (each due
    /// at its time), and the batch marked finished, in one transaction. A run after that (its
    /// worker died before the queue heard) finds the batch finished, so nothing is put back
    /// twice. `false` (and nothing written) if a later run has claimed the batch.
    async fn finish_batch(
        &self,
        id: i64,
        run: &BatchRun,
        rows: &[DeliveryRow],
        gone: &[(String, String)],
        later: &[(crate::queue::BatchJob, SystemTime)],
    ) -> Result<bool, StoreError>;

    /// Up to `limit` rows of push `id` (only those with `outcome` and `error`, where given),
    /// in registration id order after `after`; the next page's cursor is the last id.
    async fn deliveries(
        &self,
        id: i64,
        outcome: Option<c2dm_core::OutcomeKind>,
        error: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<DeliveryRow>, Option<String>), StoreError>;

    /// Until when every worker of `account` must not send (a 503 or `QuotaExceeded` one of
    /// them saw), if that is still to come.
    async fn shared_pause(&self, account: &str) -> Result<Option<SystemTime>, StoreError>;

    /// Every worker of `account` pauses until `until` (extends, never shortens, a pause).
    async fn pause_account(&self, account: &str, until: SystemTime) -> Result<(), StoreError>;

    /// Reserves up to `wanted` messages of `account`'s budget for `day` (days since the
    /// epoch, UTC), of which `daily` may be used in all; returns how many it got (0 once the
    /// day's budget is spent). A new day starts from zero.
    async fn reserve_budget(
        &self,
        account: &str,
        day: i64,
        daily: u64,
        wanted: u64,
    ) -> Result<u64, StoreError>;

    /// Gives back `unused` messages of a reservation made for `day` (nothing if the day is
    /// over).
    async fn release_budget(&self, account: &str, day: i64, unused: u64) -> Result<(), StoreError>;
}

/// How much of a reservation a budget grants: what is left of `daily` after `used`, at most
/// `wanted`.
pub(crate) fn grant(daily: u64, used: u64, wanted: u64) -> u64 {
    daily.saturating_sub(used).min(wanted)
}
