//! Whether this process can do its work: what its workers say of themselves, for `/healthz`.

use std::sync::Arc;

/// Whether this process's workers can work, for its health check: `None` while they can,
/// else why not. Clones share one state.
#[derive(Debug, Clone)]
pub struct WorkerHealth(Arc<tokio::sync::watch::Sender<Problems>>);

/// Each worker's problem, by its queue.
type Problems = std::collections::BTreeMap<&'static str, String>;

impl Default for WorkerHealth {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(Problems::new())))
    }
}

impl WorkerHealth {
    /// Why the workers cannot work now, if they cannot.
    pub fn problem(&self) -> Option<String> {
        Self::problem_in(&self.0.borrow())
    }

    /// Waits until `ok(problem)` holds of the workers' health (`problem` as
    /// [`WorkerHealth::problem`] gives it); at once if it holds now.
    pub async fn wait_for(&self, ok: impl Fn(Option<&str>) -> bool) {
        let mut changes = self.0.subscribe();
        // The sender lives as long as `self`: the wait ends only when `ok` holds.
        let _ = changes
            .wait_for(|problems| ok(Self::problem_in(problems).as_deref()))
            .await;
    }

    fn problem_in(problems: &Problems) -> Option<String> {
        (!problems.is_empty()).then(|| problems.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// The worker of `queue` cannot work, for this reason (`None`: it can).
    pub(crate) fn set(&self, queue: &'static str, problem: Option<String>) {
        self.0.send_modify(|problems| {
            match problem {
                Some(problem) => problems.insert(queue, problem),
                None => problems.remove(queue),
            };
        });
    }
}
