//! What every worker of every process shares about a sender account: its pause and its daily
//! budget.

use std::time::SystemTime;

use super::rows::{big, count, millis, time_of};
use super::{AccountState, Conn, Reservation, Store, StoreError, execute, grant, on_conn, on_pool};

/// A `sender_accounts` row: account, paused until, why, budget day, budget used.
type AccountRow = (String, Option<i64>, Option<String>, i64, i64);

impl Store {
    /// Until when every worker of `account` must not send (a 503 or `QuotaExceeded` one of
    /// them saw), if that is still to come.
    pub async fn shared_pause(&self, account: &str) -> Result<Option<SystemTime>, StoreError> {
        let until: Option<Option<i64>> = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT paused_until FROM sender_accounts WHERE account = $1"
        )
        .bind(account)
        .fetch_optional(pool)
        .await)?;
        let now = SystemTime::now();
        Ok(until.flatten().map(time_of).filter(|until| *until > now))
    }

    /// Every worker of `account` pauses until `until` (extends, never shortens, a pause),
    /// because of `reason` (kept with the pause it extends; a pause given without one keeps
    /// the reason it had).
    pub async fn pause_account(
        &self,
        account: &str,
        until: SystemTime,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO sender_accounts (account, paused_until, pause_reason) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (account) DO UPDATE SET \
             pause_reason = CASE WHEN sender_accounts.paused_until > excluded.paused_until \
             THEN sender_accounts.pause_reason \
             ELSE COALESCE(excluded.pause_reason, sender_accounts.pause_reason) END, \
             paused_until = CASE WHEN sender_accounts.paused_until > excluded.paused_until \
             THEN sender_accounts.paused_until ELSE excluded.paused_until END";
        let (account, until) = (account.to_owned(), millis(until));
        let reason = reason.map(str::to_owned);
        execute!(self, SQL, account, until, reason).await?;
        Ok(())
    }

    /// Every sender account the workers have shared a pause or a budget for, by name: its
    /// pause (if still to come, with why) and its budget's use.
    pub async fn accounts(&self) -> Result<Vec<AccountState>, StoreError> {
        let rows: Vec<AccountRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT account, paused_until, pause_reason, budget_day, budget_used \
                 FROM sender_accounts ORDER BY account"
        )
        .fetch_all(pool)
        .await)?;
        let now = SystemTime::now();
        Ok(rows
            .into_iter()
            .map(|(account, until, reason, budget_day, used)| {
                let paused_until = until.map(time_of).filter(|until| *until > now);
                AccountState {
                    account,
                    pause_reason: reason.filter(|_| paused_until.is_some()),
                    paused_until,
                    budget_day,
                    budget_used: count(used),
                }
            })
            .collect())
    }

    /// Reserves up to `wanted` messages of `account`'s budget for `day` (days since the
    /// epoch, UTC), of which `daily` may be used in all; returns how many it got (0 once the
    /// day's budget is spent) and how many are left. A new day starts from zero.
    pub async fn reserve_budget(
        &self,
        account: &str,
        day: i64,
        daily: u64,
        wanted: u64,
    ) -> Result<Reservation, StoreError> {
        let account = account.to_owned();
        self.write(move |mut conn| {
            Box::pin(async move {
                on_conn!(conn.reborrow(), |c| sqlx::query(
                    "INSERT INTO sender_accounts (account) VALUES ($1) ON CONFLICT DO NOTHING"
                )
                .bind(&account)
                .execute(c)
                .await
                .map(drop))?;
                // SQLite's writes are one at a time; PostgreSQL's reservations of one account
                // wait for each other on its row.
                let (stored_day, used): (i64, i64) = match conn.reborrow() {
                    Conn::Sqlite(c) => {
                        sqlx::query_as(
                            "SELECT budget_day, budget_used FROM sender_accounts \
                             WHERE account = $1",
                        )
                        .bind(&account)
                        .fetch_one(c)
                        .await?
                    }
                    Conn::Postgres(c) => {
                        sqlx::query_as(
                            "SELECT budget_day, budget_used FROM sender_accounts \
                             WHERE account = $1 FOR UPDATE",
                        )
                        .bind(&account)
                        .fetch_one(c)
                        .await?
                    }
                };
                let used = if stored_day == day { count(used) } else { 0 };
                let granted = grant(daily, used, wanted);
                on_conn!(conn, |c| sqlx::query(
                    "UPDATE sender_accounts SET budget_day = $2, budget_used = $3 \
                     WHERE account = $1"
                )
                .bind(&account)
                .bind(day)
                .bind(big(used + granted))
                .execute(c)
                .await
                .map(drop))?;
                Ok(Reservation {
                    granted,
                    left: daily.saturating_sub(used + granted),
                })
            })
        })
        .await
    }

    /// Gives back `unused` messages of a reservation made for `day` (nothing if the day is
    /// over).
    pub async fn release_budget(
        &self,
        account: &str,
        day: i64,
        unused: u64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "UPDATE sender_accounts SET budget_used = \
             CASE WHEN budget_used > $1 THEN budget_used - $1 ELSE 0 END \
             WHERE account = $2 AND budget_day = $3";
        let (unused, account) = (big(unused), account.to_owned());
        execute!(self, SQL, unused, account, day).await?;
        Ok(())
    }
}
