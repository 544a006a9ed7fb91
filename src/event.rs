//! The event vocabulary: ids, events and their per-room payloads, statuses, and what a change could not be used for; knows nothing of sockets or MongoDB.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::payload::Payload;
use crate::room::{Room, RoomKind};

/// An event id: the change's cluster time, its index at that time and its resume
/// token (see `sequence`).
///
/// Ids sort in commit order as strings, whatever the server's tokens look like, and
/// are identical in every process watching the same stream, which is what makes
/// recovery work across reconnects and across replicas.
#[derive(Clone, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Arc<str>);

impl PartialEq for EventId {
    /// Equal exactly when [`Ord`] says so: the same text with hex letters in either case.
    fn eq(&self, other: &Self) -> bool {
        // The hub compares an event's id with its own messages' copies, which share
        // the text: pointer equality settles those without reading ~100 bytes.
        // Otherwise the order's comparison: it skips the long prefix successive ids
        // share eight bytes at a time (the hub compares each new id with the last).
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.len() == other.0.len() && self.cmp(other) == Ordering::Equal)
    }
}

impl std::hash::Hash for EventId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The text folded as equality folds it, so that equal ids hash alike.
        for b in self.0.bytes() {
            state.write_u8(b.to_ascii_uppercase());
        }
        state.write_u8(0xff);
    }
}

impl EventId {
    /// Wraps an id's text.
    pub fn new(hex: impl Into<Arc<str>>) -> Self {
        Self(hex.into())
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for EventId {
    fn cmp(&self, other: &Self) -> Ordering {
        // Hex digits compare case-insensitively: servers' tokens may be either case.
        // Successive ids share a long prefix: skip the byte-equal part eight bytes at a
        // time (equal bytes are equal in any case), then compare the rest folded.
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let n = a.len().min(b.len());
        let mut i = 0;
        while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
            i += 8;
        }
        a[i..]
            .iter()
            .map(u8::to_ascii_uppercase)
            .cmp(b[i..].iter().map(u8::to_ascii_uppercase))
    }
}

impl PartialOrd for EventId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One named event from one change, before it is addressed to rooms.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The change's resume token; shared by every event derived from that change.
    pub id: EventId,
    /// Canonical name, e.g. `order:status_changed` (shared by the stream's events).
    pub name: Arc<str>,
    /// Commit wall time of the change in Unix milliseconds (0 when the server gave none).
    pub ts_ms: i64,
}

/// The payload one audience (room) receives for an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Where it goes.
    pub room: Room,
    /// What that audience may see: an allowlisted projection, never the raw document;
    /// JSON text shared by every room of the same audience.
    pub data: Payload,
}

/// Who owns an order: the ids `order:{id}` is open to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OrderOwner {
    /// The customer's id (ObjectId hex lowercased), if the order has one.
    pub customer: Option<String>,
    /// The ids of the stores the order belongs to.
    pub stores: Vec<String>,
}

/// An event with its per-room payloads, ready for the hub.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedEvent {
    /// The event.
    pub event: Event,
    /// One entry per room; a room appears at most once.
    pub deliveries: Vec<Delivery>,
    /// For a change of an order document: its owners as of this change, read from
    /// the same document the payloads were. `order:{id}` deliveries reach only
    /// sessions whose principal is among them (rights follow the data, not the join).
    pub owner: Option<Arc<OrderOwner>>,
    /// The database the change came from, when several are watched: rooms are then
    /// per database (a tenant's `customer:c1` is not another tenant's).
    pub database: Option<Arc<str>>,
}

/// The normalized status of a document at one change (orders, payments, and
/// declared streams with a `[streams.status]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusInfo {
    /// Canonical status, or the raw value when it is unknown (the built-in tables'
    /// statuses are static: no copy per change).
    pub status: Cow<'static, str>,
    /// The value as stored in the document.
    pub raw: String,
    /// The canonical (or unknown raw) status before this change, when known
    /// from the pre-image or from the last state this process saw.
    pub previous: Option<Cow<'static, str>>,
    /// Position on the order flow, 0..=100 (see `config::OrderStatus::progress`);
    /// `None` for cancelled, unknown statuses and other tables.
    pub progress: Option<u8>,
    /// The raw value is not in the status table.
    pub unknown: bool,
}

/// Something in a change that could not be used; counted under [`Issue::reason`] and
/// logged (rate-limited) by the mapper. Carried strings are at most 128 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Issue {
    /// The change has no usable `_id._data` resume token; the change is dropped.
    MissingEventId,
    /// `operationType` is missing or not one MongoDB documents.
    UnknownOperation {
        /// The value, or `<missing>`, or `<type>`.
        op: String,
    },
    /// A valid operation changecast does not turn into events (`drop`, `rename`,
    /// `invalidate`, DDL, or a delete of a stream that has no delete event).
    UnhandledOperation {
        /// The operation.
        op: String,
    },
    /// `ns.coll` is missing or not a watched collection.
    UnknownCollection {
        /// The value, or `<missing>`.
        collection: String,
    },
    /// A routing field is absent: that route is skipped.
    MissingField {
        /// Which key (`customer`, `store`, `order_id`, `_id`, or a declared room kind).
        field: &'static str,
    },
    /// A field has a type that cannot be used (e.g. an id that is an array).
    WrongType {
        /// Which key (as for `MissingField`, or `status`).
        field: &'static str,
        /// The BSON type found, e.g. `array`.
        found: &'static str,
    },
    /// A status value not in the table; passed through with `unknown: true` (not a drop).
    UnknownStatus {
        /// The raw value.
        value: String,
    },
    /// A delete whose owners are unknown (no pre-image, not seen before): dropped, or
    /// for a declared stream sent only to the rooms that need no document.
    NoOwnerForDelete,
    /// The id for this room kind is not a valid room id (empty, too long, odd characters).
    InvalidRoomId {
        /// The room kind that was skipped.
        kind: RoomKind,
    },
}

impl Issue {
    /// A bounded label for metrics (`events_dropped_total{reason=…}` and the like).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Issue::MissingEventId => "missing_event_id",
            Issue::UnknownOperation { .. } => "unknown_operation",
            Issue::UnhandledOperation { .. } => "unhandled_operation",
            Issue::UnknownCollection { .. } => "unknown_collection",
            Issue::MissingField { .. } => "missing_field",
            Issue::WrongType { .. } => "wrong_type",
            Issue::UnknownStatus { .. } => "unknown_status",
            Issue::NoOwnerForDelete => "no_owner_for_delete",
            Issue::InvalidRoomId { .. } => "invalid_room_id",
        }
    }
}

#[cfg(test)]
mod order_tests {
    use super::EventId;
    use proptest::prelude::*;

    /// What the order means: the ids' bytes compared with hex letters folded to one case.
    fn folded(a: &str, b: &str) -> std::cmp::Ordering {
        a.bytes()
            .map(|c| c.to_ascii_uppercase())
            .cmp(b.bytes().map(|c| c.to_ascii_uppercase()))
    }

    #[test]
    fn ids_compare_case_insensitively_past_a_long_shared_prefix() {
        let p = "82".repeat(20);
        let id = |s: String| EventId::new(s);
        assert!(id(format!("{p}0a")) < id(format!("{p}0B")));
        assert_eq!(
            id(format!("{p}ab")).cmp(&id(format!("{p}AB"))),
            std::cmp::Ordering::Equal
        );
        assert!(id(p.clone()) < id(format!("{p}00")), "a prefix sorts first");
        assert!(id(format!("{p}f")) > id(format!("{p}E0")));
    }

    proptest! {
        /// Ids that share a prefix of any length (the fast path's eight-byte steps end
        /// anywhere inside or after it), in mixed case.
        #[test]
        fn the_order_is_the_folded_byte_order(
            prefix in "[0-9a-fA-F]{0,40}",
            a in "[0-9a-fA-F]{0,12}",
            b in "[0-9a-fA-F]{0,12}",
        ) {
            let (x, y) = (format!("{prefix}{a}"), format!("{prefix}{b}"));
            prop_assert_eq!(EventId::new(x.as_str()).cmp(&EventId::new(y.as_str())), folded(&x, &y));
            let upper = x.to_ascii_uppercase();
            prop_assert_eq!(EventId::new(upper.as_str()).cmp(&EventId::new(y.as_str())), folded(&upper, &y));
        }

        /// Equality and hashing agree with the order: ids equal in it are `==` and hash
        /// alike, whatever the case of their letters.
        #[test]
        fn equality_and_hash_agree_with_the_order(
            x in "[0-9a-fA-F]{0,40}",
            y in "[0-9a-fA-F]{0,40}",
            flip in any::<bool>(),
        ) {
            let hash = |id: &EventId| {
                use std::hash::{BuildHasher, BuildHasherDefault};
                BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id)
            };
            let y = if flip { x.to_ascii_lowercase() } else { y };
            let (a, b) = (EventId::new(x.as_str()), EventId::new(y.as_str()));
            prop_assert_eq!(a == b, a.cmp(&b) == std::cmp::Ordering::Equal);
            if a == b {
                prop_assert_eq!(hash(&a), hash(&b));
            }
        }
    }
}
