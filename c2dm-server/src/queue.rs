//! The jobs as the queue keeps them: what the store enqueues in its own transactions and the
//! workers take. Its own module, so that the store (which enqueues) and the jobs (which run)
//! share it without importing each other.

use std::time::SystemTime;

use apalis::prelude::{Task, TaskBuilder};
use serde::{Deserialize, Serialize};

/// Walk the audience of push `push_id` and enqueue its batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    /// The push.
    pub push_id: i64,
}

/// Send push `push_id` to these devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchJob {
    /// The push.
    pub push_id: i64,
    /// The devices of this batch (none in a job that names its stored list instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registration_ids: Vec<String>,
    /// Those of them an earlier batch may have sent this push to already (its worker died
    /// mid-send, and they were then put back for later): their rows count one possible
    /// duplicate more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub possibly_sent: Vec<String>,
    /// Where its devices lie in the registry, for a batch walked from it (none for a push's
    /// list of ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Positions>,
    /// The stored list (`batch_lists`) that holds this batch, for a job that names it rather
    /// than carrying its devices: what the store enqueues, so that the queue's row of the job
    /// stays small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<i64>,
}

impl BatchJob {
    /// The job that names stored list `list` of push `push_id`.
    pub fn stored(push_id: i64, list: i64) -> Self {
        Self {
            push_id,
            registration_ids: Vec::new(),
            possibly_sent: Vec::new(),
            positions: None,
            list: Some(list),
        }
    }
}

/// Where the devices of a batch walked from the registry lie in it: each has a position (its
/// device's id) in `(after, through]`. A batch looks up which of its devices stopped being
/// active since the walk by this range, in the index's order, rather than device by device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Positions {
    /// Every device of the batch comes after this position…
    pub after: i64,
    /// …and none after this one.
    pub through: i64,
}

/// The push queue's name in the job tables.
pub(crate) const PUSH_QUEUE: &str = "c2dm-pushes";
/// The batch queue's name in the job tables.
pub(crate) const BATCH_QUEUE: &str = "c2dm-batches";

/// A job as both queues' backends store it (JSON, as their codec writes it), due at once or
/// from `at` on.
pub(crate) fn task(
    job: &impl Serialize,
    at: Option<SystemTime>,
) -> Result<Task<Vec<u8>>, serde_json::Error> {
    let builder = TaskBuilder::new(serde_json::to_vec(job)?);
    Ok(match at {
        Some(at) => builder.run_at_time(at),
        None => builder,
    }
    .build())
}

/// A queue's failure, as the store reports failures.
pub(crate) fn queue_failure(e: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Protocol(format!("job queue: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_job_queued_before_possibly_sent_existed_still_reads() {
        let old: BatchJob =
            serde_json::from_str(r#"{"push_id": 7, "registration_ids": ["a", "b"]}"#).unwrap();
        assert_eq!(old.possibly_sent, Vec::<String>::new());
        assert_eq!(old.positions, None);
        let later = BatchJob {
            push_id: 7,
            registration_ids: vec!["a".into(), "b".into()],
            possibly_sent: vec!["b".into()],
            positions: Some(Positions {
                after: 10,
                through: 12,
            }),
            list: None,
        };
        let text = serde_json::to_string(&later).unwrap();
        assert_eq!(serde_json::from_str::<BatchJob>(&text).unwrap(), later);
        // Nothing new is written when there is nothing to say.
        let plain = serde_json::to_string(&old).unwrap();
        assert!(!plain.contains("possibly_sent"), "{plain}");
        assert!(!plain.contains("positions"), "{plain}");
        // A job that names its list carries nothing else.
        let stored = serde_json::to_string(&BatchJob::stored(7, 3)).unwrap();
        assert_eq!(stored, r#"{"push_id":7,"list":3}"#);
        assert_eq!(
            serde_json::from_str::<BatchJob>(&stored).unwrap(),
            BatchJob::stored(7, 3)
        );
    }
}
