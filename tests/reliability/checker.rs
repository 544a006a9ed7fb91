//! The checker, as in Kafka's bounce tests: acknowledged writes and observed deliveries in;
//! missing, duplicated, per-document order inversions and cross-room deliveries out.
//!
//! A change is identified by its event id (the resume token), not by document contents:
//! `updateLookup` returns the document as it is at lookup time, which under fast writes is
//! already a later version. So per document the checker compares the number of acknowledged
//! writes with the number of distinct event ids seen.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::Value;

/// Every acknowledged write, per document key, and the rooms each document may reach.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Acknowledged writes (changes) per document key.
    pub writes: BTreeMap<String, u64>,
    /// Rooms a document's events may be delivered to.
    pub owners: BTreeMap<String, BTreeSet<String>>,
}

impl Ledger {
    /// Declares a document and the rooms it belongs to (before any write).
    pub fn own(&mut self, key: &str, rooms: &[String]) {
        self.owners
            .entry(key.to_owned())
            .or_default()
            .extend(rooms.iter().cloned());
        self.writes.entry(key.to_owned()).or_default();
    }

    /// Records one acknowledged write to `key`.
    pub fn ack(&mut self, key: &str) {
        *self.writes.entry(key.to_owned()).or_default() += 1;
    }

    /// Total acknowledged writes to the documents `filter` keeps.
    pub fn total(&self, filter: impl Fn(&str) -> bool) -> u64 {
        self.writes
            .iter()
            .filter(|(k, _)| filter(k))
            .map(|(_, n)| n)
            .sum()
    }
}

/// One delivery an observer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Document key (`order/ID`, `payment/ID`, `settings/STORE`, `delivery/ID`).
    pub key: String,
    /// Event id: the resume token (what orders changes).
    pub id: String,
    /// The id as the client received it (sealed on sockets): what it sends back as `since`.
    pub wire: String,
    /// Room it arrived in.
    pub room: String,
}

impl Seen {
    /// From a native-protocol `event` message or a `tail` delivery (`event` name + `data`).
    pub fn from_event(event: &str, room: &str, id: &str, data: &Value) -> Option<Seen> {
        let key = doc_key(event, data)?;
        // Socket ids are sealed and do not sort: order is checked on the resume token
        // behind them (`tail` prints the token itself).
        let wire = id.to_owned();
        let id = crate::support::open_id(id).unwrap_or_else(|| id.to_owned());
        Some(Seen {
            key,
            id,
            wire,
            room: room.to_owned(),
        })
    }

    /// From a native-protocol message; `None` for anything but an event.
    pub fn from_message(v: &Value) -> Option<Seen> {
        if v["type"] != "event" {
            return None;
        }
        Self::from_event(
            v["event"].as_str()?,
            v["room"].as_str()?,
            v["id"].as_str()?,
            &v["data"],
        )
    }
}

/// The document key of an event's payload.
pub fn doc_key(event: &str, data: &Value) -> Option<String> {
    let kind = event.split(':').next()?;
    match kind {
        "order" | "payment" => Some(format!("{kind}/{}", data["_id"].as_str()?)),
        "settings" => Some(format!("settings/{}", data["storeId"].as_str()?)),
        // The declared stream of `world::DELIVERIES_STREAM`.
        "delivery" => Some(format!("delivery/{}", data["_id"].as_str()?)),
        _ => None,
    }
}

/// What one observer saw against the ledger.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Changes the observer had to see.
    pub expected: u64,
    /// Deliveries seen (with repeats).
    pub delivered: u64,
    /// Changes never seen.
    pub missing: u64,
    /// More distinct changes of a document than were written (must never happen).
    pub phantom: u64,
    /// Deliveries of a change already seen.
    pub duplicated: u64,
    /// Within one run, a change of a document (in one room) arriving after a later one.
    pub inversions: u64,
    /// Deliveries to a room the document does not belong to.
    pub cross_room: u64,
}

impl Report {
    /// Adds another observer's report.
    pub fn add(&mut self, o: &Report) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.missing += o.missing;
        self.phantom += o.phantom;
        self.duplicated += o.duplicated;
        self.inversions += o.inversions;
        self.cross_room += o.cross_room;
    }

    /// The figure line.
    pub fn line(&self) -> String {
        format!(
            "expected {} delivered {} missing {} duplicated {} inversions {} cross-room {} phantom {}",
            self.expected,
            self.delivered,
            self.missing,
            self.duplicated,
            self.inversions,
            self.cross_room,
            self.phantom
        )
    }
}

/// Checks one observer. `runs` are its deliveries, one list per process run or per
/// connection lifetime, each in arrival order; order is checked within a run only
/// (a restarted worker legitimately repeats its last checkpoint window). `must_see`
/// selects the documents whose every change the observer must have received.
pub fn check(ledger: &Ledger, must_see: impl Fn(&str) -> bool, runs: &[Vec<Seen>]) -> Report {
    let mut r = Report::default();
    // Distinct changes per (room, document): one change reaches a room once.
    let mut distinct: HashMap<(&str, &str), HashSet<&str>> = HashMap::new();
    for run in runs {
        let mut last: HashMap<(&str, &str), &str> = HashMap::new();
        for s in run {
            r.delivered += 1;
            if !ledger
                .owners
                .get(&s.key)
                .is_some_and(|rooms| rooms.contains(&s.room))
            {
                r.cross_room += 1;
            }
            let k = (s.room.as_str(), s.key.as_str());
            if !distinct.entry(k).or_default().insert(s.id.as_str()) {
                r.duplicated += 1;
            }
            if let Some(prev) = last.insert(k, s.id.as_str()) {
                if s.id.as_str() < prev {
                    r.inversions += 1;
                }
            }
        }
    }
    // Per document, the changes seen in any of its rooms (an observer in several rooms
    // of one document must see each change in each, checked per room below).
    let mut per_room_doc: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for ((room, key), ids) in &distinct {
        per_room_doc
            .entry(room)
            .or_default()
            .insert(key, ids.len() as u64);
    }
    for (key, &written) in &ledger.writes {
        if !must_see(key) {
            continue;
        }
        r.expected += written;
        // The observer must see every change in at least one room; take the best room.
        let seen = per_room_doc
            .values()
            .filter_map(|docs| docs.get(key.as_str()).copied())
            .max()
            .unwrap_or(0);
        r.missing += written.saturating_sub(seen);
        r.phantom += seen.saturating_sub(written);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(key: &str, id: &str) -> Seen {
        Seen {
            key: key.into(),
            id: id.into(),
            wire: id.into(),
            room: "admin".into(),
        }
    }

    /// The checker itself must be able to fail: each kind of fault is counted.
    #[test]
    fn counts_each_kind_of_fault() {
        let mut l = Ledger::default();
        l.own("order/a", &["admin".into()]);
        l.ack("order/a");
        l.ack("order/a");
        l.ack("order/a");
        let clean = check(
            &l,
            |_| true,
            &[vec![
                seen("order/a", "1"),
                seen("order/a", "2"),
                seen("order/a", "3"),
            ]],
        );
        assert_eq!(
            clean.missing + clean.duplicated + clean.inversions + clean.cross_room,
            0
        );
        let bad = check(
            &l,
            |_| true,
            &[
                vec![seen("order/a", "2"), seen("order/a", "1")],
                vec![
                    seen("order/a", "1"),
                    Seen {
                        room: "customer:x".into(),
                        ..seen("order/a", "1")
                    },
                ],
            ],
        );
        assert_eq!(bad.missing, 1);
        assert_eq!(bad.inversions, 1);
        assert_eq!(bad.duplicated, 1);
        assert_eq!(bad.cross_room, 1);
    }
}
