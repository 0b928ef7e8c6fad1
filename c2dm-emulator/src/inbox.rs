//! The delivery record: every accepted message per device, kept compactly.
//!
//! A message is one allocation: its number, flag, collapse key and data pairs packed with
//! variable-length integers. A device with one message holds it inline, without a `Vec`.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Mutex;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::InboxMode;

const SHARDS: usize = 64;

/// One accepted message as the emulator recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// The message id the emulator answered with.
    pub message_id: String,
    /// The collapse key.
    pub collapse_key: String,
    /// The data pairs, in the order sent (a JSON object).
    #[serde(serialize_with = "pairs_as_map", deserialize_with = "map_as_pairs")]
    pub data: Vec<(String, String)>,
    /// Whether `delay_while_idle` was set.
    pub delay_while_idle: bool,
}

fn pairs_as_map<S: Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

fn map_as_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::new();
            while let Some(entry) = map.next_entry()? {
                pairs.push(entry);
            }
            Ok(pairs)
        }
    }
    d.deserialize_map(Visitor)
}

enum Slot {
    One(Box<[u8]>),
    Many(Vec<Box<[u8]>>),
    Count(u64),
}

impl Slot {
    fn len(&self) -> u64 {
        match self {
            Slot::One(_) => 1,
            Slot::Many(v) => v.len() as u64,
            Slot::Count(n) => *n,
        }
    }

    fn records(&self) -> &[Box<[u8]>] {
        match self {
            Slot::One(r) => std::slice::from_ref(r),
            Slot::Many(v) => v,
            Slot::Count(_) => &[],
        }
    }
}

/// The per-device record, sharded so concurrent sends rarely wait for each other.
pub(crate) struct Inbox {
    mode: InboxMode,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<Box<str>, Slot>>>,
    tag: u64,
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(input: &mut &[u8]) -> usize {
    let mut n = 0usize;
    let mut shift = 0;
    while let Some((&byte, rest)) = input.split_first() {
        *input = rest;
        n |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    n
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn get_str(input: &mut &[u8]) -> String {
    let len = get_varint(input).min(input.len());
    let (s, rest) = input.split_at(len);
    *input = rest;
    String::from_utf8_lossy(s).into_owned()
}

/// The message id for message number `n` of a sender tagged `tag`.
pub(crate) fn message_id(n: u64, tag: u64) -> String {
    format!("0:{n}%{tag:016x}")
}

impl Inbox {
    pub(crate) fn new(mode: InboxMode, tag: u64) -> Self {
        Self {
            mode,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            tag,
        }
    }

    fn shard(&self, id: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Slot>> {
        let i = (self.hasher.hash_one(id) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record(
        &self,
        id: &str,
        number: u64,
        collapse_key: &str,
        data: &[(String, String)],
        delay_while_idle: bool,
    ) {
        let mut shard = self.shard(id);
        if self.mode == InboxMode::CountsOnly {
            match shard.get_mut(id) {
                Some(Slot::Count(n)) => *n += 1,
                _ => {
                    shard.insert(id.into(), Slot::Count(1));
                }
            }
            return;
        }
        let mut out = Vec::with_capacity(
            12 + collapse_key.len()
                + data
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>(),
        );
        out.extend_from_slice(&number.to_le_bytes());
        out.push(delay_while_idle as u8);
        put_str(&mut out, collapse_key);
        put_varint(&mut out, data.len());
        for (k, v) in data {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        let record = out.into_boxed_slice();
        match shard.get_mut(id) {
            None => {
                shard.insert(id.into(), Slot::One(record));
            }
            Some(slot) => {
                let old = std::mem::replace(slot, Slot::Count(0));
                *slot = match old {
                    Slot::One(first) => Slot::Many(vec![first, record]),
                    Slot::Many(mut v) => {
                        v.push(record);
                        Slot::Many(v)
                    }
                    Slot::Count(n) => Slot::Count(n + 1),
                };
            }
        }
    }

    fn decode(&self, record: &[u8]) -> InboxMessage {
        let mut input = record;
        let (number, rest) = input.split_at(8.min(input.len()));
        let number = u64::from_le_bytes(number.try_into().unwrap_or([0; 8]));
        input = rest;
        let delay = input.first().is_some_and(|b| *b == 1);
        input = input.get(1..).unwrap_or(&[]);
        let collapse_key = get_str(&mut input);
        let n = get_varint(&mut input);
        let data = (0..n)
            .map(|_| (get_str(&mut input), get_str(&mut input)))
            .collect();
        InboxMessage {
            message_id: message_id(number, self.tag),
            collapse_key,
            data,
            delay_while_idle: delay,
        }
    }

    /// The messages recorded for one device (empty in counts-only mode).
    pub(crate) fn messages(&self, id: &str) -> Vec<InboxMessage> {
        self.shard(id)
            .get(id)
            .map(|slot| slot.records().iter().map(|r| self.decode(r)).collect())
            .unwrap_or_default()
    }

    /// How many messages one device got.
    pub(crate) fn count(&self, id: &str) -> u64 {
        self.shard(id).get(id).map_or(0, Slot::len)
    }

    /// Every device's messages, sorted by registration id.
    pub(crate) fn all(&self) -> BTreeMap<String, Vec<InboxMessage>> {
        let mut all = BTreeMap::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (id, slot) in shard.iter() {
                all.insert(
                    id.to_string(),
                    slot.records().iter().map(|r| self.decode(r)).collect(),
                );
            }
        }
        all
    }

    /// Every device's message count, sorted by registration id.
    pub(crate) fn counts(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (id, slot) in shard.iter() {
                all.insert(id.to_string(), slot.len());
            }
        }
        all
    }

    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_back() {
        let inbox = Inbox::new(InboxMode::Full, 0xabc);
        let data = vec![
            ("message".to_string(), "é".repeat(200)),
            ("k".into(), String::new()),
        ];
        inbox.record("dev", 7, "orders", &data, true);
        inbox.record("dev", 9, "other", &[], false);
        let got = inbox.messages("dev");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].message_id, "0:7%0000000000000abc");
        assert_eq!(got[0].collapse_key, "orders");
        assert_eq!(got[0].data, data);
        assert!(got[0].delay_while_idle);
        assert_eq!(got[1].message_id, "0:9%0000000000000abc");
        assert!(!got[1].delay_while_idle);
        assert_eq!(inbox.count("dev"), 2);
        assert_eq!(inbox.count("nobody"), 0);
        assert_eq!(inbox.all().len(), 1);
    }

    #[test]
    fn counts_only_keeps_numbers() {
        let inbox = Inbox::new(InboxMode::CountsOnly, 0);
        inbox.record("a", 1, "k", &[], false);
        inbox.record("a", 2, "k", &[], false);
        assert_eq!(inbox.count("a"), 2);
        assert!(inbox.messages("a").is_empty());
        assert_eq!(inbox.counts()["a"], 2);
    }

    #[test]
    fn json_data_is_an_object_in_order() {
        let m = InboxMessage {
            message_id: "0:1%x".into(),
            collapse_key: "k".into(),
            data: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            delay_while_idle: false,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"message_id":"0:1%x","collapse_key":"k","data":{"b":"2","a":"1"},"delay_while_idle":false}"#
        );
        let back: InboxMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
