//! What both stores read the same way: rows into devices, pushes and deliveries, counts, and
//! times (milliseconds since the Unix epoch, in both databases).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use c2dm_core::OutcomeKind;

use super::{
    Counts, DeliveryRow, Device, DeviceCounts, DeviceState, MessageRecord, MessageState, Page,
    PushError, Tally,
};

/// The columns a row of either database gives, by position.
pub(super) trait Columns {
    /// An integer column.
    fn int(&self, at: usize) -> Result<i64, sqlx::Error>;
    /// An integer column that may be NULL.
    fn maybe_int(&self, at: usize) -> Result<Option<i64>, sqlx::Error>;
    /// A text column.
    fn text(&self, at: usize) -> Result<String, sqlx::Error>;
    /// A text column that may be NULL.
    fn maybe_text(&self, at: usize) -> Result<Option<String>, sqlx::Error>;
    /// A boolean column (an integer in SQLite).
    fn flag(&self, at: usize) -> Result<bool, sqlx::Error>;
}

macro_rules! columns_of {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, at: usize) -> Result<i64, sqlx::Error> {
                sqlx::Row::try_get(self, at)
            }
            fn maybe_int(&self, at: usize) -> Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, at)
            }
            fn text(&self, at: usize) -> Result<String, sqlx::Error> {
                sqlx::Row::try_get(self, at)
            }
            fn maybe_text(&self, at: usize) -> Result<Option<String>, sqlx::Error> {
                sqlx::Row::try_get(self, at)
            }
            fn flag(&self, at: usize) -> Result<bool, sqlx::Error> {
                sqlx::Row::try_get(self, at)
            }
        }
    };
}

columns_of!(sqlx::sqlite::SqliteRow);
columns_of!(sqlx::postgres::PgRow);

/// Milliseconds since the Unix epoch, as both databases keep times.
pub(super) fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time a stored millisecond count stands for.
pub(super) fn time_of(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn decode(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

/// A stored JSON column that does not read back.
pub(super) fn json_error(e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// The tags column: the device's tags joined by U+001F, sorted (`NULL` for none).
pub(super) const TAG_SEPARATOR: char = '\u{1f}';

/// A device from `id, registration_id, device_id, user_id, app_version, state, reason,
/// created_at, updated_at, state_changed_at, tags`.
pub(super) fn device_of(row: &impl Columns) -> Result<Device, sqlx::Error> {
    let state = row.text(5)?;
    Ok(Device {
        position: row.int(0)?,
        registration_id: row.text(1)?,
        device_id: row.maybe_text(2)?,
        user_id: row.maybe_text(3)?,
        app_version: row.maybe_text(4)?,
        state: DeviceState::parse(&state)
            .ok_or_else(|| decode(format!("unknown device state {state:?}")))?,
        reason: row.maybe_text(6)?,
        created_at: time_of(row.int(7)?),
        updated_at: time_of(row.int(8)?),
        state_changed_at: time_of(row.int(9)?),
        tags: row
            .maybe_text(10)?
            .map(|t| t.split(TAG_SEPARATOR).map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

/// The columns of a push, in the order [`message_of`] reads them, from `messages`, followed by
/// the rest of the query: a macro, so that every query stays one literal string.
macro_rules! select_message {
    ($($rest:literal)*) => {
        concat!(
            "SELECT id, audience, collapse_key, data, delay_while_idle, state, ",
            "cancel_requested, total, created_at, finished_at, walk_after, walked, ",
            "accepted, rejected, failed, not_attempted, last_error, last_error_at, ",
            "failing_since FROM messages ",
            $($rest),*
        )
    };
}
pub(super) use select_message;

/// Notes a batch's store error on its push, unless it has finished: `$1` the push, `$2` the
/// error, `$3` when, `$4` since when its batches have been failing (kept if already set). One
/// text for both databases.
pub(super) const NOTE_PUSH_ERROR: &str = "UPDATE messages SET last_error = $2, last_error_at = $3, \
     failing_since = COALESCE(failing_since, $4) \
     WHERE id = $1 AND state NOT IN ('done', 'cancelled')";

/// Clears a push's `failing_since` (`$1` the push): its batches write again.
pub(super) const CLEAR_PUSH_FAILING: &str =
    "UPDATE messages SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL";

/// The columns of a delivery row, in the order [`delivery_of`] reads them, from `deliveries`,
/// followed by the rest of the query: a macro, so that every query stays one literal string.
macro_rules! select_deliveries {
    ($($rest:literal)*) => {
        concat!(
            "SELECT registration_id, outcome, c2dm_message_id, error, attempts, ",
            "possible_duplicates, at FROM deliveries ",
            $($rest),*
        )
    };
}
pub(super) use select_deliveries;

/// A push from `id, audience, collapse_key, data, delay_while_idle, state, cancel_requested,
/// total, created_at, finished_at, walk_after, walked, accepted, rejected, failed,
/// not_attempted, last_error, last_error_at, failing_since` (as [`select_message`] gives
/// them), with `counts`.
pub(super) fn message_of(row: &impl Columns, counts: Counts) -> Result<MessageRecord, sqlx::Error> {
    let state = row.text(5)?;
    Ok(MessageRecord {
        id: row.int(0)?,
        audience: serde_json::from_str(&row.text(1)?).map_err(json_error)?,
        collapse_key: row.text(2)?,
        data: serde_json::from_str(&row.text(3)?).map_err(json_error)?,
        delay_while_idle: row.flag(4)?,
        state: MessageState::parse(&state)
            .ok_or_else(|| decode(format!("unknown message state {state:?}")))?,
        cancel_requested: row.flag(6)?,
        total: row.maybe_int(7)?.map(|t| u64::try_from(t).unwrap_or(0)),
        counts,
        created_at: time_of(row.int(8)?),
        finished_at: row.maybe_int(9)?.map(time_of),
        walk_after: row.maybe_int(10)?,
        walked: u64::try_from(row.int(11)?).unwrap_or(0),
        tally: Tally {
            accepted: u64::try_from(row.int(12)?).unwrap_or(0),
            rejected: u64::try_from(row.int(13)?).unwrap_or(0),
            failed: u64::try_from(row.int(14)?).unwrap_or(0),
            not_attempted: u64::try_from(row.int(15)?).unwrap_or(0),
        },
        last_error: match row.maybe_text(16)? {
            Some(error) => Some(PushError {
                error,
                at: row.maybe_int(17)?.map_or(UNIX_EPOCH, time_of),
                failing_since: row.maybe_int(18)?.map(time_of),
            }),
            None => None,
        },
    })
}

/// An outcome as stored.
pub(super) fn outcome_of(text: &str) -> Result<OutcomeKind, sqlx::Error> {
    match text {
        "accepted" => Ok(OutcomeKind::Accepted),
        "rejected" => Ok(OutcomeKind::Rejected),
        "failed" => Ok(OutcomeKind::Failed),
        "not_attempted" => Ok(OutcomeKind::NotAttempted),
        other => Err(decode(format!("unknown outcome {other:?}"))),
    }
}

/// A delivery row from `registration_id, outcome, c2dm_message_id, error, attempts,
/// possible_duplicates, at`.
pub(super) fn delivery_of(row: &impl Columns) -> Result<DeliveryRow, sqlx::Error> {
    Ok(DeliveryRow {
        registration_id: row.text(0)?,
        outcome: outcome_of(&row.text(1)?)?,
        c2dm_message_id: row.maybe_text(2)?,
        error: row.maybe_text(3)?,
        attempts: u32::try_from(row.int(4)?).unwrap_or(u32::MAX),
        possible_duplicates: u32::try_from(row.int(5)?).unwrap_or(u32::MAX),
        at: time_of(row.int(6)?),
    })
}

/// The counts of a push from its rows grouped as `outcome, error, count`, and its audience's
/// size once walked.
pub(super) fn counts_of(
    groups: &[impl Columns],
    total: Option<u64>,
) -> Result<Counts, sqlx::Error> {
    let mut counts = Counts::default();
    let mut recorded = 0u64;
    for group in groups {
        let n = u64::try_from(group.int(2)?).unwrap_or(0);
        recorded += n;
        let why = group.maybe_text(1)?.unwrap_or_default();
        match outcome_of(&group.text(0)?)? {
            OutcomeKind::Accepted => counts.accepted += n,
            OutcomeKind::Failed => counts.failed += n,
            OutcomeKind::Rejected => *counts.rejected.entry(why).or_default() += n,
            OutcomeKind::NotAttempted => *counts.not_attempted.entry(why).or_default() += n,
        }
    }
    counts.pending = total.map(|t| t.saturating_sub(recorded));
    Ok(counts)
}

/// Device counts from rows grouped as `state, count`.
pub(super) fn device_counts_of(groups: &[impl Columns]) -> Result<DeviceCounts, sqlx::Error> {
    let mut counts = DeviceCounts::default();
    for group in groups {
        let n = u64::try_from(group.int(1)?).unwrap_or(0);
        let state = group.text(0)?;
        match DeviceState::parse(&state) {
            Some(DeviceState::Active) => counts.active += n,
            Some(DeviceState::Unregistered) => counts.unregistered += n,
            Some(DeviceState::Gone) => counts.gone += n,
            None => return Err(decode(format!("unknown device state {state:?}"))),
        }
    }
    Ok(counts)
}

/// What a batch adds to a push's counters: `recorded, accepted, rejected, failed,
/// not_attempted`, as the databases' integers.
pub(super) fn tally_update(written: &Tally) -> [i64; 5] {
    [
        written.recorded(),
        written.accepted,
        written.rejected,
        written.failed,
        written.not_attempted,
    ]
    .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

/// A page from rows fetched with one more than `limit`: each decoded by `decode`, the next
/// page's cursor taken from the last item kept by `cursor`.
pub(super) fn page_of<R, T>(
    rows: &[R],
    limit: u32,
    decode: impl Fn(&R) -> Result<T, sqlx::Error>,
    cursor: impl Fn(&T) -> i64,
) -> Result<Page<T>, sqlx::Error> {
    let items = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
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

/// Those of the devices read as `registration_id, state` that `named` names, with their
/// states: what a batch keeps of the devices not active in the range its devices lie in.
pub(super) fn states_among(
    rows: Vec<(String, String)>,
    named: &[String],
) -> Vec<(String, DeviceState)> {
    let named: HashSet<&str> = named.iter().map(String::as_str).collect();
    rows.into_iter()
        .filter(|(id, _)| named.contains(id.as_str()))
        .filter_map(|(id, state)| DeviceState::parse(&state).map(|state| (id, state)))
        .collect()
}
