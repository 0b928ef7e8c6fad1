//! Rows as both databases give them, decoded by column name, and the SQL that selects them;
//! times are milliseconds since the Unix epoch in both.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use c2dm_core::OutcomeKind;

use super::{
    Counts, DeliveryRow, Device, DeviceCounts, DeviceState, OutcomeTally, Page, Provider, Push,
    PushError, PushState,
};

/// Milliseconds since the Unix epoch, as both databases keep times.
pub(super) fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time a stored millisecond count stands for.
pub(super) fn time_of(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A count as both databases' integers keep it.
pub(super) fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored count.
pub(super) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn decode(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

/// A stored JSON column that does not read back.
pub(super) fn json_error(e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// The tags column's separator: a device's tags are joined by U+001F, sorted (`NULL` for
/// none).
const TAG_SEPARATOR: char = '\u{1f}';

/// `SELECT` of a device's columns, as [`DeviceRecord`] reads them, from `devices d`, followed
/// by the rest of the query: a macro, so that every query stays one literal string. The tags'
/// separator is [`TAG_SEPARATOR`], written out in the literal.
macro_rules! select_device {
    ($($rest:literal)*) => {
        concat!(
            "SELECT d.id, d.registration_id, d.device_id, d.user_id, d.app_version, ",
            "d.state, d.reason, d.provider, d.created_at, d.updated_at, d.state_changed_at, ",
            "(SELECT string_agg(tag, '\u{1f}' ORDER BY tag) FROM device_tags ",
            "WHERE device = d.id) AS tags FROM devices d ",
            $($rest),*
        )
    };
}
pub(super) use select_device;

/// A device as stored.
#[derive(sqlx::FromRow)]
pub(super) struct DeviceRecord {
    id: i64,
    registration_id: String,
    device_id: Option<String>,
    user_id: Option<String>,
    app_version: Option<String>,
    state: String,
    reason: Option<String>,
    provider: String,
    created_at: i64,
    updated_at: i64,
    state_changed_at: i64,
    tags: Option<String>,
}

impl TryFrom<DeviceRecord> for Device {
    type Error = sqlx::Error;

    fn try_from(row: DeviceRecord) -> Result<Self, sqlx::Error> {
        Ok(Device {
            position: row.id,
            registration_id: row.registration_id,
            device_id: row.device_id,
            user_id: row.user_id,
            app_version: row.app_version,
            state: state_of(&row.state)?,
            reason: row.reason,
            provider: Provider::parse(&row.provider)
                .ok_or_else(|| decode(format!("unknown provider {:?}", row.provider)))?,
            created_at: time_of(row.created_at),
            updated_at: time_of(row.updated_at),
            state_changed_at: time_of(row.state_changed_at),
            tags: row
                .tags
                .map(|t| t.split(TAG_SEPARATOR).map(str::to_owned).collect())
                .unwrap_or_default(),
        })
    }
}

/// A device's state as stored.
pub(super) fn state_of(text: &str) -> Result<DeviceState, sqlx::Error> {
    DeviceState::parse(text).ok_or_else(|| decode(format!("unknown device state {text:?}")))
}

/// `SELECT` of a push's columns, as [`PushRecord`] reads them, from `pushes`, followed by the
/// rest of the query.
macro_rules! select_push {
    ($($rest:literal)*) => {
        concat!(
            "SELECT id, audience, collapse_key, data, delay_while_idle, state, ",
            "cancel_requested, total, created_at, finished_at, walk_after, walked, ",
            "accepted, rejected, failed, not_attempted, last_error, last_error_at, ",
            "failing_since FROM pushes ",
            $($rest),*
        )
    };
}
pub(super) use select_push;

/// A push as stored.
#[derive(sqlx::FromRow)]
pub(super) struct PushRecord {
    id: i64,
    audience: String,
    collapse_key: String,
    data: String,
    delay_while_idle: bool,
    state: String,
    cancel_requested: bool,
    pub(super) total: Option<i64>,
    created_at: i64,
    finished_at: Option<i64>,
    walk_after: Option<i64>,
    walked: i64,
    accepted: i64,
    rejected: i64,
    failed: i64,
    not_attempted: i64,
    last_error: Option<String>,
    last_error_at: Option<i64>,
    failing_since: Option<i64>,
}

impl PushRecord {
    /// The push, with `counts` (what its rows say, or zero where a read does not count them).
    pub(super) fn with(self, counts: Counts) -> Result<Push, sqlx::Error> {
        Ok(Push {
            id: self.id,
            audience: serde_json::from_str(&self.audience).map_err(json_error)?,
            collapse_key: self.collapse_key,
            data: serde_json::from_str(&self.data).map_err(json_error)?,
            delay_while_idle: self.delay_while_idle,
            state: PushState::parse(&self.state)
                .ok_or_else(|| decode(format!("unknown push state {:?}", self.state)))?,
            cancel_requested: self.cancel_requested,
            total: self.total.map(count),
            counts,
            created_at: time_of(self.created_at),
            finished_at: self.finished_at.map(time_of),
            walk_after: self.walk_after,
            walked: count(self.walked),
            tally: OutcomeTally {
                accepted: count(self.accepted),
                rejected: count(self.rejected),
                failed: count(self.failed),
                not_attempted: count(self.not_attempted),
            },
            last_error: self.last_error.map(|error| PushError {
                error,
                at: self.last_error_at.map_or(UNIX_EPOCH, time_of),
                failing_since: self.failing_since.map(time_of),
            }),
        })
    }
}

/// `SELECT` of a delivery row's columns, as [`DeliveryRecord`] reads them, from `deliveries`,
/// followed by the rest of the query.
macro_rules! select_deliveries {
    ($($rest:literal)*) => {
        concat!(
            "SELECT registration_id, outcome, message_id, error, attempts, ",
            "possible_duplicates, at FROM deliveries ",
            $($rest),*
        )
    };
}
pub(super) use select_deliveries;

/// A delivery row as stored.
#[derive(sqlx::FromRow)]
pub(super) struct DeliveryRecord {
    registration_id: String,
    outcome: String,
    message_id: Option<String>,
    error: Option<String>,
    attempts: i64,
    possible_duplicates: i64,
    at: i64,
}

impl TryFrom<DeliveryRecord> for DeliveryRow {
    type Error = sqlx::Error;

    fn try_from(row: DeliveryRecord) -> Result<Self, sqlx::Error> {
        Ok(DeliveryRow {
            registration_id: row.registration_id,
            outcome: outcome_of(&row.outcome)?,
            message_id: row.message_id,
            error: row.error,
            attempts: u32::try_from(row.attempts).unwrap_or(u32::MAX),
            possible_duplicates: u32::try_from(row.possible_duplicates).unwrap_or(u32::MAX),
            at: time_of(row.at),
        })
    }
}

/// A device's row of one push, with the push.
#[derive(sqlx::FromRow)]
pub(super) struct PushDelivery {
    pub(super) push_id: i64,
    #[sqlx(flatten)]
    pub(super) row: DeliveryRecord,
}

/// An outcome as stored.
fn outcome_of(text: &str) -> Result<OutcomeKind, sqlx::Error> {
    match text {
        "accepted" => Ok(OutcomeKind::Accepted),
        "rejected" => Ok(OutcomeKind::Rejected),
        "failed" => Ok(OutcomeKind::Failed),
        "not_attempted" => Ok(OutcomeKind::NotAttempted),
        other => Err(decode(format!("unknown outcome {other:?}"))),
    }
}

/// A push's rows with one outcome and error, counted.
#[derive(sqlx::FromRow)]
pub(super) struct OutcomeGroup {
    outcome: String,
    error: Option<String>,
    n: i64,
}

/// The counts of a push from its rows grouped by outcome and error, and its audience's size
/// once walked.
pub(super) fn counts_of(
    groups: Vec<OutcomeGroup>,
    total: Option<u64>,
) -> Result<Counts, sqlx::Error> {
    let mut counts = Counts::default();
    let mut recorded = 0u64;
    for group in groups {
        let n = count(group.n);
        recorded += n;
        let why = group.error.unwrap_or_default();
        let by_why = |map: &mut BTreeMap<String, u64>| *map.entry(why).or_default() += n;
        match outcome_of(&group.outcome)? {
            OutcomeKind::Accepted => counts.accepted += n,
            OutcomeKind::Failed => counts.failed += n,
            OutcomeKind::Rejected => by_why(&mut counts.rejected),
            OutcomeKind::NotAttempted => by_why(&mut counts.not_attempted),
        }
    }
    counts.pending = total.map(|t| t.saturating_sub(recorded));
    Ok(counts)
}

/// Device counts from devices grouped as `(state, count)`.
pub(super) fn device_counts_of(groups: Vec<(String, i64)>) -> Result<DeviceCounts, sqlx::Error> {
    let mut counts = DeviceCounts::default();
    for (state, n) in groups {
        let n = count(n);
        match state_of(&state)? {
            DeviceState::Active => counts.active += n,
            DeviceState::Unregistered => counts.unregistered += n,
            DeviceState::Gone => counts.gone += n,
        }
    }
    Ok(counts)
}

/// A page from rows fetched with one more than `limit`: each converted by `convert`, the next
/// page's cursor taken from the last item kept by `cursor`.
pub(super) fn page_of<R, T>(
    rows: Vec<R>,
    limit: u32,
    convert: impl Fn(R) -> Result<T, sqlx::Error>,
    cursor: impl Fn(&T) -> i64,
) -> Result<Page<T>, sqlx::Error> {
    let items = rows
        .into_iter()
        .map(convert)
        .collect::<Result<Vec<_>, _>>()?;
    let (items, next) = trim_page(items, limit, cursor);
    Ok(Page { items, next })
}

/// Trims a page fetched with one row more than `limit`: the items, and the next page's
/// cursor (of the last item kept) when that extra row came.
pub(super) fn trim_page<T, C>(
    mut items: Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> C,
) -> (Vec<T>, Option<C>) {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        let next = items.last().map(cursor);
        (items, next)
    } else {
        (items, None)
    }
}

/// Those of the devices read as `(registration_id, state)` that `named` names (all of them
/// with `None`), with their states.
pub(super) fn states_among(
    rows: Vec<(String, String)>,
    named: Option<&[String]>,
) -> Result<Vec<(String, DeviceState)>, sqlx::Error> {
    let named: Option<HashSet<&str>> = named.map(|ids| ids.iter().map(String::as_str).collect());
    rows.into_iter()
        .filter(|(id, _)| {
            named
                .as_ref()
                .is_none_or(|named| named.contains(id.as_str()))
        })
        .map(|(id, state)| Ok((id, state_of(&state)?)))
        .collect()
}

/// What a batch adds to a push's counters: `recorded, accepted, rejected, failed,
/// not_attempted`, as the databases' integers.
pub(super) fn tally_update(written: &OutcomeTally) -> [i64; 5] {
    [
        written.recorded(),
        written.accepted,
        written.rejected,
        written.failed,
        written.not_attempted,
    ]
    .map(big)
}
