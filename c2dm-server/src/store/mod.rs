//! Where the server keeps its devices: the [`Store`] trait, with one implementation per
//! database ([`SqliteStore`] today).

mod sqlite;

use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use sqlite::SqliteStore;

/// What a device is to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
/// active again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewDevice {
    /// The registration id C2DM gave the app (checked by [`c2dm_core::RegistrationId`]).
    pub registration_id: String,
    /// The app's own name for the device.
    pub device_id: Option<String>,
    /// Whom the device belongs to: pushes can go to every device of a user.
    pub user_id: Option<String>,
    /// Labels: pushes can go to every device with a tag.
    pub tags: Vec<String>,
    /// The app's version.
    pub app_version: Option<String>,
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

/// A store failed. Never holds a secret; the message is for the log, not for API clients.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct StoreError(#[from] pub sqlx::Error);

/// The server's storage: one implementation per database, where their SQL differs.
#[async_trait]
pub trait Store: Send + Sync {
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Registers a device, or updates a known one and makes it active again, in one
    /// transaction; returns which, and the device as stored.
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

    /// Up to `limit` devices matching `filter` whose position is after `after`, in order.
    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<Device>, StoreError>;
}
