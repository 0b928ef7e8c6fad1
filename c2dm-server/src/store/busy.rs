//! Waiting for a SQLite file's write lock in turns of a quarter of a millisecond, and a word
//! to this process's writer when someone waits.
//!
//! SQLite's own busy handler sleeps 1, 2, 5, 10, … up to 100 ms between tries. The group
//! writer ([`super::group`]) holds the lock nearly all the time while a push sends, and
//! releases it only for the moment between one transaction and the next: a connection of the
//! job queue (apalis takes, starts and finishes each job in a write of its own, through the
//! pool) slept past that moment again and again, while its worker's slot sent nothing
//! (docs/PERFORMANCE.md, "Decisions"). Here a waiting connection tries again every
//! [`RETRY`], and says so; the writer, told, lets a moment pass before its next transaction
//! (see [`someone_waited_within`]), and the waiting connection takes the lock in it.

// SQLite's busy handler has no safe binding in sqlx: the one call below sets it, on a handle
// that sqlx's lock keeps ours for the call.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::SqliteConnection;

/// How long a waiting connection sleeps between two tries.
pub(super) const RETRY: Duration = Duration::from_micros(250);

/// How long a connection waits for the lock in all before its statement fails as busy.
pub(super) const TIMEOUT: Duration = Duration::from_secs(10);

/// When a connection of this process last found the lock taken, in microseconds since
/// [`epoch`] (0: never). One for the process: a hint, which at worst makes a writer of
/// another file pause a moment.
static WAITED_AT: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_micros() -> u64 {
    u64::try_from(epoch().elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Whether a connection of this process found the write lock taken within `window`.
pub(super) fn someone_waited_within(window: Duration) -> bool {
    waited_within(WAITED_AT.load(Ordering::Relaxed), now_micros(), window)
}

/// Whether a wait last seen at `at` (0: none) is within `window` of `now` (both in
/// microseconds since [`epoch`]).
fn waited_within(at: u64, now: u64, window: Duration) -> bool {
    at != 0 && now.saturating_sub(at) <= u64::try_from(window.as_micros()).unwrap_or(u64::MAX)
}

/// SQLite calls this when a statement finds the lock taken, with how many times it has
/// already for that statement: nonzero to try again, zero to give up (the statement fails
/// with `SQLITE_BUSY`).
extern "C" fn on_busy(_: *mut c_void, tries: c_int) -> c_int {
    WAITED_AT.store(now_micros(), Ordering::Relaxed);
    let most = TIMEOUT.as_micros() / RETRY.as_micros();
    if u128::try_from(tries).unwrap_or(u128::MAX) >= most {
        return 0;
    }
    std::thread::sleep(RETRY);
    1
}

/// Sets this module's busy handler on `conn` (in place of the busy timeout of its options).
pub(super) async fn install(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle();
    // SAFETY: `db` is a live connection, and the lock held on it keeps any other call off it
    // for the duration; `on_busy` neither unwinds nor touches the connection, and has no
    // data to outlive (a null pointer).
    let rc = unsafe {
        libsqlite3_sys::sqlite3_busy_handler(db.as_ptr(), Some(on_busy), std::ptr::null_mut())
    };
    if rc == libsqlite3_sys::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "could not set the busy handler (SQLite error {rc})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_seen_for_its_window_only() {
        let window = Duration::from_millis(1);
        assert!(!waited_within(0, 5_000, window), "no wait yet");
        assert!(waited_within(4_000, 5_000, window));
        assert!(!waited_within(3_999, 5_000, window));
        assert!(waited_within(5_000, 5_000, window));
    }
}
