//! The daily budget of each provider account: the period a moment falls in, and a batch's
//! reservation of its share before it sends.

use std::time::{Duration, SystemTime};

use c2dm_core::RegistrationId;

use super::plan::over_budget;
use super::retry::Step;
use super::{Runner, WorkerOptions};

/// The budget period (periods of `period` since the epoch, at least a second long: with a
/// day, the UTC day) that `now` falls in, and when the next one starts.
pub(super) fn budget_day(now: SystemTime, period: Duration) -> (i64, SystemTime) {
    let period = period.as_secs().max(1);
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs / period;
    // Checked: a period past what the clock can tell (which `WorkerOptions::check` refuses)
    // ends at the furthest time this code waits for, never in a panic.
    let next = (day + 1)
        .checked_mul(period)
        .and_then(|at| std::time::UNIX_EPOCH.checked_add(Duration::from_secs(at)))
        .unwrap_or_else(|| now + WorkerOptions::MAX_BUDGET_PERIOD);
    (i64::try_from(day).unwrap_or(i64::MAX), next)
}

/// What a run reserved of the account's daily budget.
pub(super) struct Budget {
    /// The budget's day, and when the next begins.
    pub(super) day: i64,
    pub(super) tomorrow: SystemTime,
    /// Messages reserved, with a daily budget.
    pub(super) granted: Option<u64>,
    /// The devices the budget does not cover, left for tomorrow.
    pub(super) deferred: Vec<(String, SystemTime)>,
}

/// Reserves `account`'s budget for `send`, which keeps the devices it covers.
pub(super) async fn reserve(
    runner: &Runner,
    push_id: i64,
    account: &str,
    send: &mut Vec<(u64, RegistrationId)>,
    now: SystemTime,
) -> Result<Budget, Step> {
    let (day, tomorrow) = budget_day(now, runner.options.budget_period);
    let granted = match runner.options.daily_budget {
        Some(daily) if !send.is_empty() => {
            let wanted = send.len() as u64;
            let reserved = runner
                .store
                .reserve_budget(account, day, daily, wanted)
                .await?;
            let granted = reserved.granted;
            metrics::gauge!("c2dm_budget_remaining", "account" => account.to_owned())
                .set(reserved.left as f64);
            if granted < wanted {
                tracing::info!(
                    push_id,
                    account,
                    unsent = wanted - granted,
                    "the account's daily budget is spent: the rest waits for tomorrow"
                );
                metrics::counter!("c2dm_budget_deferred_total").increment(wanted - granted);
            }
            Some(granted)
        }
        _ => None,
    };
    let deferred = over_budget(send, granted)
        .into_iter()
        .map(|id| (id.as_str().to_owned(), tomorrow))
        .collect();
    Ok(Budget {
        day,
        tomorrow,
        granted,
        deferred,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::options::BUDGET_DAY;

    #[test]
    fn a_budget_day_is_a_utc_day() {
        let noon = std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 43_200);
        let (day, next) = budget_day(noon, BUDGET_DAY);
        assert_eq!(day, 20_000);
        assert_eq!(
            next,
            std::time::UNIX_EPOCH + Duration::from_secs(20_001 * 86_400)
        );
    }

    #[test]
    fn a_shorter_budget_period_counts_from_the_epoch_too() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_000_030);
        let (period, next) = budget_day(at, Duration::from_secs(60));
        assert_eq!(period, 16_667);
        assert_eq!(
            next,
            std::time::UNIX_EPOCH + Duration::from_secs(16_668 * 60)
        );
        // Less than a second counts as a second, never as a division by zero.
        assert_eq!(budget_day(at, Duration::ZERO).0, 1_000_030);
        // A period past what the clock can tell ends far ahead, without a panic.
        let (period, next) = budget_day(at, Duration::from_secs(u64::MAX));
        assert_eq!(period, 0);
        assert!(next > at);
        let (_, next) = budget_day(at, Duration::MAX);
        assert!(next > at);
    }
}
