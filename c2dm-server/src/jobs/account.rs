//! The sender account's pause, shared with every worker of the account through the database.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use c2dm_core::{Protocol, Sender};
use c2dm_fcm::Fcm;
use tokio::time::Instant;

use super::{LOOK, Runner};
use crate::queue::{BATCH_QUEUE, PUSH_QUEUE};
use crate::store::StoreError;

/// The wall-clock time an instant of the sender's clock stands for.
pub(super) fn wall_time_of(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

/// The sender's clock's instant for a wall-clock time.
pub(super) fn instant_of(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(behind) => Instant::now()
            .checked_sub(behind.duration())
            .unwrap_or_else(Instant::now),
    }
}

/// Takes `account`'s pause from the database into `sender`, now: what a batch does before it
/// sends, so that it never starts during a pause another worker learned of.
pub(super) async fn adopt_shared_pause<P: Protocol>(
    runner: &Runner,
    sender: &Sender<P>,
    account: &str,
) -> Result<(), StoreError> {
    if let Some(until) = runner.store.shared_pause(account).await? {
        adopt_pause(sender, until);
    }
    Ok(())
}

/// The account an FCM sender's pause is shared under: its project's, apart from every C2DM
/// account.
pub(super) fn fcm_account(sender: &Sender<Fcm>) -> String {
    format!("fcm:{}", sender.protocol().project_id())
}

/// How far two readings of one pause may differ, from converting between the sender's clock
/// and the wall clock, and still be the same pause.
pub(super) const ROUNDING: Duration = Duration::from_millis(5);

/// Pauses the sender until `until`, if that is later than its own pause by more than the
/// clocks' rounding: the same pause read back changes nothing, so it is not told again
/// (and shared again) through [`Sender::pause_changes`].
pub(super) fn adopt_pause<P: Protocol>(sender: &Sender<P>, until: SystemTime) {
    let mine = sender.paused_until().map(wall_time_of);
    if mine.is_none_or(|mine| until > mine + ROUNDING) {
        sender.pause_all_until(instant_of(until));
    }
}

/// Keeps the sender's pause and the account's in the database the same, both ways, and
/// the queue depth in the metrics, until aborted. A pause this process's sender takes goes
/// to the database at once, not at the next look: a worker that dies just after a 503 must
/// not take the pause with it.
pub(super) async fn watch_account(runner: Arc<Runner>) {
    let mut shared: Option<SystemTime> = None;
    let mut ticks = 0u64;
    let mut looks = tokio::time::interval(LOOK);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pauses = runner.sender.as_ref().map(Sender::pause_changes);
    loop {
        let looked = tokio::select! {
            _ = looks.tick() => true,
            () = async {
                // Without a C2DM sender, only the looks (for the queues' depth).
                let Some(pauses) = pauses.as_mut() else {
                    return std::future::pending::<()>().await;
                };
                if pauses.changed().await.is_err() {
                    // The sender is gone (it cannot be, while the runner holds it).
                    std::future::pending::<()>().await;
                }
            } => false,
        };
        shared = share_pause(&runner, shared).await;
        metrics::gauge!("c2dm_paused").set(if shared.is_some() { 1.0 } else { 0.0 });
        if !looked {
            continue;
        }
        ticks += 1;
        if let Some(logins) = runner
            .sender
            .as_ref()
            .and_then(|sender| sender.token_provider().logins())
        {
            metrics::counter!("c2dm_logins_total").absolute(logins);
        }
        if ticks.is_multiple_of(5) {
            match runner.queues.depth().await {
                Ok((pushes, batches)) => {
                    metrics::gauge!("c2dm_queue_depth", "queue" => PUSH_QUEUE).set(pushes as f64);
                    metrics::gauge!("c2dm_queue_depth", "queue" => BATCH_QUEUE).set(batches as f64);
                }
                Err(e) => tracing::debug!(error = %e, "could not count the queues"),
            }
            match runner.queues.oldest_due().await {
                Ok((pushes, batches)) => {
                    metrics::gauge!("c2dm_queue_oldest_seconds", "queue" => PUSH_QUEUE)
                        .set(pushes.as_secs_f64());
                    metrics::gauge!("c2dm_queue_oldest_seconds", "queue" => BATCH_QUEUE)
                        .set(batches.as_secs_f64());
                }
                Err(e) => tracing::debug!(error = %e, "could not read the queues' oldest jobs"),
            }
        }
    }
}

/// Keeps the FCM sender's pause and its project's in the database the same, both ways, as
/// [`watch_account`] does for C2DM's, until aborted.
pub(super) async fn watch_fcm(runner: Arc<Runner>, fcm: Sender<Fcm>) {
    let account = fcm_account(&fcm);
    let mut shared: Option<SystemTime> = None;
    let mut looks = tokio::time::interval(LOOK);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pauses = fcm.pause_changes();
    loop {
        tokio::select! {
            _ = looks.tick() => {}
            () = async {
                if pauses.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => {}
        }
        shared = share_pause_of(&runner, &fcm, &account, shared).await;
    }
}

/// One look at the C2DM sender's pause and its account's ([`share_pause_of`]).
pub(super) async fn share_pause(runner: &Runner, shared: Option<SystemTime>) -> Option<SystemTime> {
    match &runner.sender {
        Some(sender) => share_pause_of(runner, sender, &runner.options.account, shared).await,
        None => None,
    }
}

/// One look at the pauses: `sender`'s, if later than `account`'s (`shared`, as last read),
/// goes to the database; then the account's comes back into the sender. Returns the
/// account's pause as read now.
pub(super) async fn share_pause_of<P: Protocol>(
    runner: &Runner,
    sender: &Sender<P>,
    account: &str,
    shared: Option<SystemTime>,
) -> Option<SystemTime> {
    let store = &runner.store;
    let mine = sender.paused_until().map(wall_time_of);
    // Later than the database's by more than the clocks' rounding: tell the others.
    if let Some(mine) = mine
        && shared.is_none_or(|s| mine > s + ROUNDING)
    {
        let reason = sender.pause_reason();
        match store.pause_account(account, mine, reason.as_deref()).await {
            Ok(()) => {
                metrics::counter!("c2dm_pauses_total").increment(1);
                tracing::info!(
                    account,
                    until = ?mine,
                    reason = reason.as_deref().unwrap_or_default(),
                    "pausing every worker of the account"
                );
            }
            Err(e) => runner.account_unread(&e),
        }
    }
    match store.shared_pause(account).await {
        Ok(until) => {
            if runner.account_unread.swap(false, Ordering::Relaxed) {
                tracing::info!(account, "the account's pause can be read again");
            }
            if let Some(until) = until {
                adopt_pause(sender, until);
            }
            until
        }
        Err(e) => {
            runner.account_unread(&e);
            shared
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::{fcm_sender, sender};
    use crate::jobs::{Queues, WorkerOptions};
    use crate::store::Store;

    #[tokio::test]
    async fn a_pause_one_worker_learns_reaches_the_others_of_its_account_only() {
        let store = Store::open_sqlite("sqlite::memory:").await.unwrap();
        let queues = Queues::open_beside(&store, &WorkerOptions::default())
            .await
            .unwrap();
        let runner = |account: &str| {
            let options = WorkerOptions {
                account: account.to_owned(),
                ..WorkerOptions::default()
            };
            Runner::new(
                store.clone(),
                sender().into(),
                queues.clone(),
                options,
                tokio::sync::watch::channel(false).1,
            )
        };
        let (first, second, elsewhere) = (runner("acct"), runner("acct"), runner("other"));
        assert_eq!(share_pause(&second, None).await, None);

        // The first worker's sender is paused (a 503 with Retry-After: 30, say).
        let until = Instant::now() + Duration::from_secs(30);
        first.sender.as_ref().unwrap().pause_all_until(until);
        let shared = share_pause(&first, None).await.expect("shared");
        // The second learns it at its next look, to the millisecond; the other account not.
        assert_eq!(share_pause(&second, None).await, Some(shared));
        let learned = second
            .sender
            .as_ref()
            .unwrap()
            .paused_until()
            .expect("paused");
        let off = if learned > until {
            learned - until
        } else {
            until - learned
        };
        assert!(off < Duration::from_millis(5), "{off:?}");
        assert_eq!(share_pause(&elsewhere, None).await, None);
        assert_eq!(elsewhere.sender.as_ref().unwrap().paused_until(), None);

        // Looking again changes nothing: the pause is not extended by being read back, nor
        // told again (which would share it again, and again).
        let mut told = [
            first.sender.as_ref().unwrap().pause_changes(),
            second.sender.as_ref().unwrap().pause_changes(),
        ];
        for pauses in &mut told {
            pauses.borrow_and_update();
        }
        assert_eq!(share_pause(&first, Some(shared)).await, Some(shared));
        assert_eq!(share_pause(&second, Some(shared)).await, Some(shared));
        adopt_shared_pause(&second, second.sender.as_ref().unwrap(), "acct")
            .await
            .unwrap();
        for pauses in &told {
            assert!(!pauses.has_changed().unwrap());
        }
    }

    #[tokio::test]
    async fn an_fcm_pause_reaches_the_project_s_workers_and_no_c2dm_account() {
        let store = Store::open_sqlite("sqlite::memory:").await.unwrap();
        let queues = Queues::open_beside(&store, &WorkerOptions::default())
            .await
            .unwrap();
        let runner = |project: &str| {
            let senders = crate::jobs::Senders {
                c2dm: Some(sender()),
                fcm: Some(fcm_sender(project)),
            };
            let options = WorkerOptions {
                account: "acct".to_owned(),
                ..WorkerOptions::default()
            };
            let stopping = tokio::sync::watch::channel(false).1;
            Runner::new(store.clone(), senders, queues.clone(), options, stopping)
        };
        let (first, second, elsewhere) = (runner("proj"), runner("proj"), runner("other"));
        let fcm = |r: &Runner| r.fcm.clone().expect("an FCM sender");
        assert_eq!(fcm_account(&fcm(&first)), "fcm:proj");

        // The first worker's FCM sender is paused (a QUOTA_EXCEEDED, say).
        let until = Instant::now() + Duration::from_secs(60);
        fcm(&first).pause_all_until(until);
        let shared = share_pause_of(&first, &fcm(&first), "fcm:proj", None).await;
        assert!(shared.is_some());
        // The project's other worker learns it; another project does not, nor does C2DM.
        assert_eq!(
            share_pause_of(&second, &fcm(&second), "fcm:proj", None).await,
            shared
        );
        assert!(fcm(&second).paused_until().is_some());
        assert_eq!(
            share_pause_of(&elsewhere, &fcm(&elsewhere), "fcm:other", None).await,
            None
        );
        assert_eq!(share_pause(&second, None).await, None);
        assert_eq!(second.sender.as_ref().unwrap().paused_until(), None);
    }
}
