//! What a batch's run does with each device of its list, decided from what the store says
//! before anything is sent: a pure function, so that its rules are tested one by one.

use std::collections::{HashMap, HashSet};

use c2dm_core::RegistrationId;

use crate::store::DeviceState;

/// What the store says of a batch's devices when its run starts.
pub(super) struct Facts<'a> {
    /// The batch's list.
    pub(super) ids: &'a [String],
    /// Those that have their row already (written by an earlier run).
    pub(super) recorded: &'a HashSet<String>,
    /// How far down the list earlier runs marked sends (0 if none sent).
    pub(super) marked_through: u64,
    /// How many earlier runs moved the mark: each may have sent to the devices below it.
    pub(super) sending_runs: u32,
    /// Those an earlier batch may have sent this push to (its worker died mid-send).
    pub(super) possibly_sent: &'a [String],
    /// Whether the push was cancelled.
    pub(super) cancelled: bool,
    /// Those that are not active (unregistered, gone), with their state.
    pub(super) inactive: &'a HashMap<String, DeviceState>,
}

/// A batch's run, planned.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// The devices to send to, each with its position in the list (which the mark counts in),
    /// in the list's order.
    pub(super) send: Vec<(u64, RegistrationId)>,
    /// The devices that get a row without a send, with why: `cancelled`, their state
    /// (`unregistered`, `gone`), or `invalid_registration_id`.
    pub(super) not_sent: Vec<(String, &'static str)>,
    /// The devices an earlier run may have sent to, each with how many times: their rows
    /// count that many possible duplicates more.
    pub(super) resent: HashMap<String, u32>,
}

/// The plan of a batch's run. A device with a row is skipped. One below the earlier runs' mark
/// without a row may have been sent by each of them; one an earlier batch may have sent, once
/// more. A cancelled push sends nothing; an inactive device, or an id C2DM could not have
/// given, is not sent to.
pub(super) fn plan(facts: &Facts<'_>) -> Plan {
    let possibly_sent: HashSet<&String> = facts.possibly_sent.iter().collect();
    let mut plan = Plan::default();
    let todo = (0u64..)
        .zip(facts.ids)
        .filter(|(_, id)| !facts.recorded.contains(*id));
    for (at, id) in todo {
        let below = if at < facts.marked_through {
            facts.sending_runs.max(1)
        } else {
            0
        };
        let earlier = below + u32::from(possibly_sent.contains(id));
        if earlier > 0 {
            plan.resent.insert(id.clone(), earlier);
        }
        if facts.cancelled {
            plan.not_sent.push((id.clone(), "cancelled"));
            continue;
        }
        match (facts.inactive.get(id), RegistrationId::new(id)) {
            (Some(state), _) => plan.not_sent.push((id.clone(), state.as_str())),
            (None, Ok(rid)) => plan.send.push((at, rid)),
            (None, Err(_)) => plan.not_sent.push((id.clone(), "invalid_registration_id")),
        }
    }
    plan
}

/// The devices of `send` that the budget `granted` (none: no budget) does not cover, taken off
/// its end: they wait for the next period, unsent.
pub(super) fn over_budget(
    send: &mut Vec<(u64, RegistrationId)>,
    granted: Option<u64>,
) -> Vec<RegistrationId> {
    let Some(granted) = granted else {
        return Vec::new();
    };
    let keep = usize::try_from(granted)
        .unwrap_or(usize::MAX)
        .min(send.len());
    send.split_off(keep).into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn sent(plan: &Plan) -> Vec<(u64, &str)> {
        plan.send
            .iter()
            .map(|(at, id)| (*at, id.as_str()))
            .collect()
    }

    /// The facts of a first run of `list`: nothing recorded, marked, cancelled or inactive.
    fn first_run(list: &[String]) -> Facts<'_> {
        static NONE: std::sync::OnceLock<(HashSet<String>, HashMap<String, DeviceState>)> =
            std::sync::OnceLock::new();
        let (recorded, inactive) = NONE.get_or_init(Default::default);
        Facts {
            ids: list,
            recorded,
            marked_through: 0,
            sending_runs: 0,
            possibly_sent: &[],
            cancelled: false,
            inactive,
        }
    }

    #[test]
    fn a_first_run_sends_every_device_in_order_with_its_position() {
        let list = ids(&["a", "b", "c"]);
        let plan = plan(&first_run(&list));
        assert_eq!(sent(&plan), [(0, "a"), (1, "b"), (2, "c")]);
        assert!(plan.not_sent.is_empty() && plan.resent.is_empty());
    }

    #[test]
    fn each_rule_of_a_run_again() {
        let list = ids(&["a", "b", "c", "d", "e", "bad id"]);
        let recorded: HashSet<String> = ids(&["b"]).into_iter().collect();
        let inactive = HashMap::from([
            ("c".to_owned(), DeviceState::Gone),
            ("e".to_owned(), DeviceState::Unregistered),
        ]);
        let possibly_sent = ids(&["d", "e"]);
        // Two earlier runs marked through position 3 ("a".."c"); "d" and "e" lie above it.
        let facts = Facts {
            recorded: &recorded,
            marked_through: 3,
            sending_runs: 2,
            possibly_sent: &possibly_sent,
            inactive: &inactive,
            ..first_run(&list)
        };
        let plan = plan(&facts);
        // | device | row already | below the mark | possibly sent | active | planned |
        // | a      | no          | yes            | no            | yes    | sent, 2 earlier |
        // | b      | yes         | yes            | no            | yes    | skipped |
        // | c      | no          | yes            | no            | gone   | not sent, 2 earlier |
        // | d      | no          | no             | yes           | yes    | sent, 1 earlier |
        // | e      | no          | no             | yes           | unreg. | not sent, 1 earlier |
        // | bad id | no          | no             | no            | -      | not sent |
        assert_eq!(sent(&plan), [(0, "a"), (3, "d")]);
        assert_eq!(
            plan.not_sent,
            [
                ("c".to_owned(), "gone"),
                ("e".to_owned(), "unregistered"),
                ("bad id".to_owned(), "invalid_registration_id"),
            ]
        );
        let expected: HashMap<String, u32> = [("a", 2), ("c", 2), ("d", 1), ("e", 1)]
            .into_iter()
            .map(|(id, n)| (id.to_owned(), n))
            .collect();
        assert_eq!(plan.resent, expected);
    }

    #[test]
    fn a_mark_without_a_counted_run_still_counts_one() {
        let list = ids(&["a", "b"]);
        let facts = Facts {
            marked_through: 1,
            sending_runs: 0,
            ..first_run(&list)
        };
        assert_eq!(plan(&facts).resent, HashMap::from([("a".to_owned(), 1)]));
    }

    #[test]
    fn a_cancelled_push_sends_nothing_and_gives_each_unrecorded_device_a_row() {
        let list = ids(&["a", "b", "c"]);
        let recorded: HashSet<String> = ids(&["a"]).into_iter().collect();
        let facts = Facts {
            recorded: &recorded,
            cancelled: true,
            ..first_run(&list)
        };
        let plan = plan(&facts);
        assert!(plan.send.is_empty());
        assert_eq!(
            plan.not_sent,
            [("b".to_owned(), "cancelled"), ("c".to_owned(), "cancelled")]
        );
    }

    #[test]
    fn the_budget_keeps_the_first_devices_and_defers_the_rest() {
        let list = ids(&["a", "b", "c"]);
        for (granted, kept, deferred) in [
            (None, 3, 0),
            (Some(3), 3, 0),
            (Some(10), 3, 0),
            (Some(1), 1, 2),
            (Some(0), 0, 3),
        ] {
            let mut send = plan(&first_run(&list)).send;
            let later = over_budget(&mut send, granted);
            assert_eq!((send.len(), later.len()), (kept, deferred), "{granted:?}");
            if let Some(first_deferred) = later.first() {
                assert_eq!(first_deferred.as_str(), list[kept], "the last ones wait");
            }
        }
    }
}
