//! Folding deliveries into a summary: what a broadcast achieved, and what to do next.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::broadcast::{Delivery, Outcome};
use crate::message::{MessageId, RegistrationId};

/// Counts per outcome and per error code, the registration ids to remove, and (optionally) the
/// accepted message ids: the delivery verification of a broadcast.
///
/// ```
/// use c2dm_core::DeliveryReport;
/// let report = DeliveryReport::new().keep_accepted_ids(true);
/// assert_eq!(report.total(), 0);
/// assert!(report.all_final());
/// ```
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    started: Instant,
    finished: Option<Instant>,
    accepted: u64,
    rejected: u64,
    failed: u64,
    not_attempted: u64,
    possible_duplicates: u64,
    by_code: BTreeMap<String, u64>,
    to_remove: Vec<RegistrationId>,
    accepted_ids: Option<Vec<(RegistrationId, MessageId)>>,
}

impl Default for DeliveryReport {
    fn default() -> Self {
        Self::new()
    }
}

impl DeliveryReport {
    /// An empty report; its clock starts now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            finished: None,
            accepted: 0,
            rejected: 0,
            failed: 0,
            not_attempted: 0,
            possible_duplicates: 0,
            by_code: BTreeMap::new(),
            to_remove: Vec::new(),
            accepted_ids: None,
        }
    }

    /// Also keeps every accepted (registration id, message id) pair: for small runs only, as
    /// it grows with the broadcast.
    pub fn keep_accepted_ids(mut self, keep: bool) -> Self {
        self.accepted_ids = keep.then(Vec::new);
        self
    }

    /// Adds one delivery.
    pub fn record(&mut self, delivery: &Delivery) {
        self.possible_duplicates += u64::from(delivery.possible_duplicates());
        match delivery.outcome() {
            Outcome::Accepted { message_id } => {
                self.accepted += 1;
                if let Some(ids) = &mut self.accepted_ids {
                    ids.push((delivery.registration_id().clone(), message_id.clone()));
                }
            }
            Outcome::Rejected { .. } => self.rejected += 1,
            Outcome::Failed { .. } => self.failed += 1,
            Outcome::NotAttempted(_) => self.not_attempted += 1,
        }
        if let Some(text) = delivery.error_text() {
            *self.by_code.entry(text).or_default() += 1;
        }
        if delivery.should_remove() {
            self.to_remove.push(delivery.registration_id().clone());
        }
    }

    /// Stops the clock (elapsed and rate then stay as they are).
    pub fn finish(&mut self) {
        self.finished.get_or_insert_with(Instant::now);
    }

    /// Messages accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Messages permanently rejected.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Messages that failed after retrying.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Messages never sent.
    pub fn not_attempted(&self) -> u64 {
        self.not_attempted
    }

    /// All deliveries recorded.
    pub fn total(&self) -> u64 {
        self.accepted + self.rejected + self.failed + self.not_attempted
    }

    /// Possible duplicate deliveries reported.
    pub fn possible_duplicates(&self) -> u64 {
        self.possible_duplicates
    }

    /// Counts per error code (or failure text, or not-attempted reason).
    pub fn by_code(&self) -> &BTreeMap<String, u64> {
        &self.by_code
    }

    /// The registration ids to remove from the app's store.
    pub fn to_remove(&self) -> &[RegistrationId] {
        &self.to_remove
    }

    /// The accepted (registration id, message id) pairs, when kept.
    pub fn accepted_ids(&self) -> Option<&[(RegistrationId, MessageId)]> {
        self.accepted_ids.as_deref()
    }

    /// Whether every message ended accepted or rejected: nothing to resume.
    pub fn all_final(&self) -> bool {
        self.failed == 0 && self.not_attempted == 0
    }

    /// Time since the report started (until [`DeliveryReport::finish`]).
    pub fn elapsed(&self) -> Duration {
        self.finished.unwrap_or_else(Instant::now) - self.started
    }

    /// Deliveries per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.total() as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} messages: {} accepted, {} rejected, {} failed, {} not attempted",
            self.total(),
            self.accepted,
            self.rejected,
            self.failed,
            self.not_attempted
        )?;
        for (code, n) in &self.by_code {
            writeln!(f, "  {code}: {n}")?;
        }
        writeln!(f, "registration ids to remove: {}", self.to_remove.len())?;
        if self.possible_duplicates > 0 {
            writeln!(f, "possible duplicates: {}", self.possible_duplicates)?;
        }
        write!(
            f,
            "elapsed {:.2}s, {:.0} messages/s",
            self.elapsed().as_secs_f64(),
            self.rate()
        )
    }
}
