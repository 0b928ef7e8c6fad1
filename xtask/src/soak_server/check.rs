//! The soak's checks: the pushes' rows and the devices' states against the emulator's
//! arrivals journal, one function per guarantee (see the module above for the list).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::arrivals::{Arrival, ArrivalAnswer};

/// How late a send may reach the emulator after a 503 started a pause and still count as in
/// flight: the worker that got the 503 stops at once; the others read the shared pause from
/// the database at their next look (every 200 ms).
const PAUSE_GRACE: Duration = Duration::from_secs(1);
/// How late a send of a cancelled push may arrive after the cancel was answered and still
/// count as in flight: a batch looks for a cancel every 200 ms.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Whether the emulator calls `id` gone.
fn is_gone(id: &str) -> bool {
    id.starts_with("gone-") || id.starts_with("bad-")
}

/// One delivery row, as the API gives it.
#[derive(Debug)]
pub(super) struct Row {
    pub(super) outcome: String,
    pub(super) error: Option<String>,
    pub(super) message_id: Option<String>,
    pub(super) possible_duplicates: u64,
}

/// What one push went through, as the run drove it.
pub(super) struct PushRun {
    pub(super) key: String,
    pub(super) id: String,
    pub(super) posted: Instant,
    /// How long until it finished.
    pub(super) took: Option<Duration>,
    /// When the worker was killed, and how many rows there were then.
    pub(super) killed: Option<(u64, u64)>,
    /// When the cancel was asked for, and when it was answered.
    pub(super) cancelled_at_us: Option<(u64, u64)>,
    pub(super) rows: HashMap<String, Row>,
}

/// The budget the run set, when it set one.
#[derive(Clone, Copy)]
pub(super) struct Budget {
    pub(super) limit: u64,
    pub(super) period: Duration,
}

/// What the checks found: figures to print, and problems.
#[derive(Default)]
pub(super) struct Checked {
    pub(super) figures: Vec<String>,
    pub(super) problems: Vec<String>,
}

impl Checked {
    fn problem(&mut self, text: String) {
        self.problems.push(text);
    }
}

/// A soak's record, with what its checks share: each push by its collapse key, and where each
/// device C2DM called gone was first answered so (the arrival's place, and its push).
struct Record<'a> {
    devices: &'a [String],
    states: &'a HashMap<String, String>,
    pushes: &'a [PushRun],
    arrivals: &'a [Arrival],
    by_key: HashMap<&'a str, &'a PushRun>,
    found_gone: HashMap<&'a str, (usize, &'a str)>,
}

impl<'a> Record<'a> {
    fn new(
        devices: &'a [String],
        states: &'a HashMap<String, String>,
        pushes: &'a [PushRun],
        arrivals: &'a [Arrival],
    ) -> Self {
        let mut found_gone: HashMap<&str, (usize, &str)> = HashMap::new();
        for (at, a) in arrivals.iter().enumerate() {
            if let (ArrivalAnswer::Rejected { code }, Some(id), Some(key)) =
                (&a.answer, &a.registration_id, &a.collapse_key)
                && matches!(code.as_str(), "NotRegistered" | "InvalidRegistration")
            {
                found_gone.entry(id.as_str()).or_insert((at, key.as_str()));
            }
        }
        Self {
            devices,
            states,
            pushes,
            arrivals,
            by_key: pushes.iter().map(|p| (p.key.as_str(), p)).collect(),
            found_gone,
        }
    }

    /// One row per device and push, for no other device; a device C2DM called gone has its row in
    /// the push that found it gone, and is in no later push's audience.
    fn one_row_per_device(&self, out: &mut Checked) {
        let devices = self.devices;
        let pushes = self.pushes;
        let found_gone = &self.found_gone;
        let known: std::collections::HashSet<&str> = devices.iter().map(String::as_str).collect();
        for push in pushes {
            let missing = devices
                .iter()
                .filter(|d| !push.rows.contains_key(*d))
                .filter(|d| {
                    !is_gone(d)
                        || found_gone.get(d.as_str()).map(|(_, key)| *key)
                            == Some(push.key.as_str())
                })
                .count();
            let strangers = push
                .rows
                .keys()
                .filter(|d| !known.contains(d.as_str()))
                .count();
            if missing > 0 || strangers > 0 {
                out.problem(format!(
                    "push {}: {missing} devices without a row, {strangers} rows for unknown devices",
                    push.key
                ));
            }
        }
    }

    /// Each accepted message seen once, except sends in flight at a kill, which their rows count;
    /// and each row's outcome is what the emulator said.
    fn each_acceptance_seen_once_or_counted(&self, out: &mut Checked) {
        let pushes = self.pushes;
        let arrivals = self.arrivals;
        let by_key = &self.by_key;
        let mut accepted: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
        for a in arrivals {
            if let (ArrivalAnswer::Accepted { message_id }, Some(id), Some(key)) =
                (&a.answer, &a.registration_id, &a.collapse_key)
            {
                accepted
                    .entry((key.as_str(), id.as_str()))
                    .or_default()
                    .push(message_id);
            }
        }
        let (mut copies, mut marked, mut rows_marked) = (0u64, 0u64, 0u64);
        for push in pushes {
            for (id, row) in &push.rows {
                marked += row.possible_duplicates;
                rows_marked += u64::from(row.possible_duplicates > 0);
                let got = accepted
                    .get(&(push.key.as_str(), id.as_str()))
                    .map_or(&[][..], Vec::as_slice);
                if row.outcome == "accepted"
                    && !row.message_id.as_deref().is_some_and(|m| got.contains(&m))
                {
                    out.problem(format!(
                        "push {} {id}: the row says accepted as {:?}; the emulator accepted {got:?}",
                        push.key, row.message_id
                    ));
                }
                if !got.is_empty() && row.outcome != "accepted" && row.possible_duplicates == 0 {
                    out.problem(format!(
                        "push {} {id}: the emulator accepted it, the row says {} {:?} unmarked",
                        push.key, row.outcome, row.error
                    ));
                }
                let extra = (got.len() as u64).saturating_sub(1);
                copies += extra;
                if extra > row.possible_duplicates {
                    out.problem(format!(
                        "push {} {id}: {} copies, {} possible duplicates marked",
                        push.key,
                        got.len(),
                        row.possible_duplicates
                    ));
                }
            }
        }
        for (key, id) in accepted.keys() {
            if !by_key.contains_key(key) {
                out.problem(format!(
                    "{id}: a message with collapse key {key} nobody pushed"
                ));
            }
        }
        out.figures.push(format!(
            "copies beyond the first: {copies}; possible duplicates marked: {marked} (on {rows_marked} rows); every copy is on a marked row"
        ));
    }

    /// No send to a device after C2DM called it gone, but a send again of a batch whose worker
    /// died (its row marked); and each device in its state.
    fn nothing_sent_after_gone(&self, out: &mut Checked) {
        let devices = self.devices;
        let states = self.states;
        let arrivals = self.arrivals;
        let by_key = &self.by_key;
        let found_gone = &self.found_gone;
        let mut after_gone = 0u64;
        for (at, a) in arrivals.iter().enumerate() {
            let (Some(id), Some(key)) = (&a.registration_id, &a.collapse_key) else {
                continue;
            };
            let Some((_, first_key)) = found_gone
                .get(id.as_str())
                .filter(|(gone_at, _)| *gone_at < at)
            else {
                continue;
            };
            let resent = *first_key == key.as_str()
                && by_key
                    .get(key.as_str())
                    .and_then(|p| p.rows.get(id))
                    .is_some_and(|r| r.possible_duplicates > 0);
            if !resent {
                after_gone += 1;
                out.problem(format!(
                    "{id}: sent for push {key} after it went gone in push {first_key}"
                ));
            }
        }
        let wrong_state = devices
            .iter()
            .filter(|d| {
                let state = states.get(*d).map_or("", String::as_str);
                (state == "gone") != is_gone(d)
            })
            .count();
        if wrong_state > 0 {
            out.problem(format!(
                "{wrong_state} devices in the wrong state (gone or not)"
            ));
        }
        out.figures.push(format!(
            "devices gone: {} (each sent to once, in the first push); sends after gone: {after_gone}",
            found_gone.len()
        ));
    }

    /// None of a cancelled push after the cancel took effect, but those in flight.
    fn nothing_sent_after_a_cancel(&self, out: &mut Checked) {
        let pushes = self.pushes;
        let arrivals = self.arrivals;
        for push in pushes {
            let Some((asked, cancelled)) = push.cancelled_at_us else {
                continue;
            };
            let late: Vec<u64> = arrivals
                .iter()
                .filter(|a| a.collapse_key.as_deref() == Some(push.key.as_str()))
                .filter(|a| a.at_us > cancelled)
                .map(|a| a.at_us - cancelled)
                .collect();
            // Sends of the push in the second before the cancel was asked for, and while it was
            // being answered: whether it met sends under way.
            let of_push = || {
                arrivals
                    .iter()
                    .filter(|a| a.collapse_key.as_deref() == Some(push.key.as_str()))
            };
            let flowing = of_push()
                .filter(|a| a.at_us <= asked && a.at_us + 1_000_000 > asked)
                .count();
            let quiet_ms = of_push()
                .filter(|a| a.at_us <= asked)
                .map(|a| asked - a.at_us)
                .min()
                .map_or(0.0, |us| us as f64 / 1e3);
            let answering = of_push()
                .filter(|a| a.at_us > asked && a.at_us <= cancelled)
                .count();
            let grace = u64::try_from(CANCEL_GRACE.as_micros()).unwrap_or(u64::MAX);
            let too_late = late.iter().filter(|us| **us > grace).count();
            if too_late > 0 {
                out.problem(format!(
                    "push {}: {too_late} sends more than {CANCEL_GRACE:?} after its cancel",
                    push.key
                ));
            }
            let cancelled_rows = push
                .rows
                .values()
                .filter(|r| r.error.as_deref() == Some("cancelled"))
                .count();
            out.figures.push(format!(
                "push {} cancelled: {flowing} sends in the second before the cancel was asked for (the last {quiet_ms:.0} ms before), {answering} in the {:.0} ms it took to answer; {} arrived after it was answered (in flight), the last {:.0} ms after; {cancelled_rows} devices not attempted",
                push.key,
                cancelled.saturating_sub(asked) as f64 / 1e3,
                late.len(),
                late.iter().max().copied().unwrap_or(0) as f64 / 1e3
            ));
        }
    }

    /// No send while a 503 had paused the sender, but those in flight when it came.
    fn nothing_sent_during_a_pause(&self, out: &mut Checked) {
        let arrivals = self.arrivals;
        let times: Vec<u64> = arrivals.iter().map(|a| a.at_us).collect();
        let grace = u64::try_from(PAUSE_GRACE.as_micros()).unwrap_or(u64::MAX);
        let (mut pauses, mut in_flight, mut latest) = (0u64, 0usize, 0u64);
        let mut paused_for = 0u64;
        for a in arrivals {
            let ArrivalAnswer::Unavailable { until_us } = a.answer else {
                continue;
            };
            pauses += 1;
            paused_for += until_us.saturating_sub(a.at_us);
            let start = times.partition_point(|t| *t <= a.at_us);
            let grace_end = times.partition_point(|t| *t < a.at_us + grace);
            let end = times.partition_point(|t| *t < until_us);
            in_flight += grace_end.saturating_sub(start);
            if let Some(last) = times[start..grace_end.max(start)].last() {
                latest = latest.max(last - a.at_us);
            }
            if end > grace_end {
                out.problem(format!(
                    "{} sends during the pause of a 503 at {} µs (until {until_us} µs)",
                    end - grace_end,
                    a.at_us
                ));
            }
        }
        out.figures.push(format!(
            "pauses (503): {pauses}, {:.0} s in all; sends that arrived within {PAUSE_GRACE:?} of one (in flight): {in_flight}, the last {:.0} ms after it",
            paused_for as f64 / 1e6,
            latest as f64 / 1e3
        ));
    }

    /// The budget, all workers together: what was accepted by the end of each period is within the
    /// periods' budgets so far (a batch reserves before it sends, so a send may arrive in the
    /// period after the one it counted in, never before).
    fn within_the_budget(&self, budget: Budget, out: &mut Checked) {
        let arrivals = self.arrivals;
        let period_us = u64::try_from(budget.period.as_micros()).unwrap_or(u64::MAX);
        let mut per_period: std::collections::BTreeMap<u64, u64> = Default::default();
        for a in arrivals {
            if matches!(a.answer, ArrivalAnswer::Accepted { .. }) {
                *per_period.entry(a.at_us / period_us).or_default() += 1;
            }
        }
        let first = per_period.keys().next().copied().unwrap_or(0);
        let mut so_far = 0u64;
        let mut full = 0;
        for (period, n) in &per_period {
            so_far += n;
            let allowed = budget.limit * (period - first + 1);
            if so_far > allowed {
                out.problem(format!(
                    "budget: {so_far} accepted by the end of period {period}, {allowed} allowed"
                ));
            }
            full += usize::from(*n * 100 >= budget.limit * 95);
        }
        let total: u64 = per_period.values().sum();
        if total <= budget.limit {
            out.problem(format!(
                "the budget ({}) was not below the total accepted ({total}): lower it",
                budget.limit
            ));
        }
        out.figures.push(format!(
            "budget {} per {:?}: accepted per period {:?}; {full} periods used it up",
            budget.limit,
            budget.period,
            per_period.values().collect::<Vec<_>>()
        ));
    }
}

/// Checks the pushes' rows and the devices' states against the emulator's arrivals: one
/// function per guarantee.
pub(super) fn check(
    devices: &[String],
    states: &HashMap<String, String>,
    pushes: &[PushRun],
    arrivals: &[Arrival],
    budget: Option<Budget>,
) -> Checked {
    let record = Record::new(devices, states, pushes, arrivals);
    let mut out = Checked::default();
    record.one_row_per_device(&mut out);
    record.each_acceptance_seen_once_or_counted(&mut out);
    record.nothing_sent_after_gone(&mut out);
    record.nothing_sent_after_a_cancel(&mut out);
    record.nothing_sent_during_a_pause(&mut out);
    if let Some(budget) = budget {
        record.within_the_budget(budget, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(at_us: u64, id: &str, key: &str, answer: ArrivalAnswer) -> Arrival {
        Arrival {
            at_us,
            registration_id: Some(id.into()),
            collapse_key: Some(key.into()),
            answer,
        }
    }

    fn accepted(m: &str) -> ArrivalAnswer {
        ArrivalAnswer::Accepted {
            message_id: m.into(),
        }
    }

    fn row(outcome: &str, m: Option<&str>, duplicates: u64) -> Row {
        Row {
            outcome: outcome.into(),
            error: None,
            message_id: m.map(str::to_owned),
            possible_duplicates: duplicates,
        }
    }

    fn one_push(rows: Vec<(&str, Row)>) -> Vec<PushRun> {
        vec![PushRun {
            key: "k".into(),
            id: "1".into(),
            posted: Instant::now(),
            took: None,
            killed: None,
            cancelled_at_us: None,
            rows: rows.into_iter().map(|(d, r)| (d.to_owned(), r)).collect(),
        }]
    }

    fn states(devices: &[String]) -> HashMap<String, String> {
        devices
            .iter()
            .map(|d| {
                let state = if is_gone(d) { "gone" } else { "active" };
                (d.clone(), state.to_owned())
            })
            .collect()
    }

    #[test]
    fn a_clean_run_has_no_problems_and_each_fault_is_found() {
        let devices = vec!["device-1".to_owned(), "gone-2".to_owned()];
        let rejected = ArrivalAnswer::Rejected {
            code: "NotRegistered".into(),
        };
        let clean = [
            arrival(1_000, "device-1", "k", accepted("m1")),
            arrival(2_000, "gone-2", "k", rejected.clone()),
        ];
        let pushes = one_push(vec![
            ("device-1", row("accepted", Some("m1"), 0)),
            ("gone-2", row("rejected", None, 0)),
        ]);
        let ok = check(&devices, &states(&devices), &pushes, &clean, None);
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);

        // A second copy its row does not count; a send after gone; a send in a pause.
        let mut faulty = clean.to_vec();
        faulty.push(arrival(3_000, "device-1", "k", accepted("m2")));
        faulty.push(arrival(4_000, "gone-2", "k", rejected));
        faulty.push(arrival(
            10_000_000,
            "device-9",
            "k",
            ArrivalAnswer::Unavailable {
                until_us: 14_000_000,
            },
        ));
        faulty.push(arrival(
            12_000_000,
            "device-9",
            "k",
            ArrivalAnswer::ServerError,
        ));
        let found = check(&devices, &states(&devices), &pushes, &faulty, None);
        let text = found.problems.join("\n");
        assert!(text.contains("2 copies, 0 possible duplicates"), "{text}");
        assert!(text.contains("after it went gone"), "{text}");
        assert!(text.contains("1 sends during the pause"), "{text}");
    }

    #[test]
    fn rows_that_disagree_with_the_emulator_are_problems() {
        let devices = vec!["device-1".to_owned(), "device-2".to_owned()];
        let arrivals = [arrival(1_000, "device-2", "k", accepted("m2"))];
        let pushes = one_push(vec![
            ("device-1", row("accepted", Some("m1"), 0)),
            ("device-2", row("failed", None, 0)),
        ]);
        let found = check(&devices, &states(&devices), &pushes, &arrivals, None);
        let text = found.problems.join("\n");
        assert!(text.contains("device-1: the row says accepted"), "{text}");
        assert!(
            text.contains("device-2: the emulator accepted it"),
            "{text}"
        );

        let missing = one_push(vec![("device-1", row("accepted", Some("m1"), 0))]);
        let found = check(&devices, &states(&devices), &missing, &arrivals, None);
        assert!(
            found
                .problems
                .join("\n")
                .contains("1 devices without a row")
        );
    }

    #[test]
    fn the_budget_is_checked_over_the_periods_so_far() {
        let devices: Vec<String> = (0..3).map(|i| format!("device-{i}")).collect();
        let budget = Budget {
            limit: 1,
            period: Duration::from_secs(1),
        };
        // Two accepted in the first period: over.
        let arrivals = [
            arrival(100, "device-0", "k", accepted("m0")),
            arrival(200, "device-1", "k", accepted("m1")),
            arrival(1_500_000, "device-2", "k", accepted("m2")),
        ];
        let pushes = one_push(
            devices
                .iter()
                .enumerate()
                .map(|(i, d)| (d.as_str(), row("accepted", Some(["m0", "m1", "m2"][i]), 0)))
                .collect(),
        );
        let found = check(
            &devices,
            &states(&devices),
            &pushes,
            &arrivals,
            Some(budget),
        );
        assert!(
            found
                .problems
                .join("\n")
                .contains("2 accepted by the end of period 0"),
            "{:?}",
            found.problems
        );
        // One in each period: within it.
        let spread = [
            arrival(100, "device-0", "k", accepted("m0")),
            arrival(1_200_000, "device-1", "k", accepted("m1")),
            arrival(2_500_000, "device-2", "k", accepted("m2")),
        ];
        let ok = check(&devices, &states(&devices), &pushes, &spread, Some(budget));
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    }
}
