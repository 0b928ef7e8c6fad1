//! The push job: walks the audience into batch jobs.

use std::collections::HashSet;
use std::sync::Arc;

use apalis::prelude::{BoxDynError, Data};

use super::Runner;
use super::retry::{Step, StoreRetry, tried};
use crate::queue::PushJob;
use crate::store::{Audience, Positions};

/// A push job: walk the audience, page by page, into batch jobs; then record its size. A
/// store error makes it wait and go on where its walk got to: the queue never sees it.
pub(super) async fn run_push(job: PushJob, runner: Data<Arc<Runner>>) -> Result<(), BoxDynError> {
    let mut retry = StoreRetry::new(&runner, job.push_id, "walk");
    tried(&mut retry, || walk(&job, &runner)).await
}

/// One try of a push job.
pub(super) async fn walk(job: &PushJob, runner: &Runner) -> Result<(), Step> {
    let store = &runner.store;
    let Some(message) = store.push_to_send(job.push_id).await? else {
        tracing::warn!(push_id = job.push_id, "a push job for an unknown message");
        return Ok(());
    };
    if message.total.is_some() {
        return Ok(()); // walked already: this job is a repeat
    }
    store.start_sending(job.push_id).await?;
    let batch = runner.options.batch_size.max(1);
    // A walk that died goes on where its last page left it.
    let mut from = message.walk_after;
    let mut total = message.walked;
    let moved_on = || Step::Other("another walker moved this push's walk on".into());
    match &message.audience {
        Audience::RegistrationIds { registration_ids } => {
            let mut seen = HashSet::new();
            let ids: Vec<String> = registration_ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .cloned()
                .collect();
            let mut start = from
                .map_or(0, |f| usize::try_from(f).unwrap_or(usize::MAX))
                .min(ids.len());
            while start < ids.len() {
                let end = (start + batch).min(ids.len());
                let to = i64::try_from(end).unwrap_or(i64::MAX);
                if !store
                    .walk_page(job.push_id, from, to, &ids[start..end], None)
                    .await?
                {
                    return Err(moved_on());
                }
                total += (end - start) as u64;
                (from, start) = (Some(to), end);
            }
        }
        audience => loop {
            let page = store
                .audience_page(audience, from, u32::try_from(batch).unwrap_or(u32::MAX))
                .await?;
            if page.items.is_empty() {
                break;
            }
            // The last page has no cursor of its own: nothing comes after it.
            let to = page.next.unwrap_or(i64::MAX);
            let positions = page.items.last().map(|(through, _)| Positions {
                after: from.unwrap_or(0),
                through: *through,
            });
            let ids: Vec<String> = page.items.into_iter().map(|(_, id)| id).collect();
            if !store
                .walk_page(job.push_id, from, to, &ids, positions)
                .await?
            {
                return Err(moved_on());
            }
            total += ids.len() as u64;
            from = Some(to);
            if page.next.is_none() {
                break;
            }
        },
    }
    store.finish_walk(job.push_id, total).await?;
    tracing::info!(push_id = job.push_id, total, "push walked its audience");
    Ok(())
}
