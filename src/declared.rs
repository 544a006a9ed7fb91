//! Declared streams (`[[streams]]`): a change of one of the app's own collections → one named event, routed to the declared rooms with per-audience allowlists and tracked fields; no I/O, knows nothing of sockets or of who may join.
//!
//! The built-in orders, payments and settings still go through `normalize` and
//! `route`; a declared stream reuses their vocabulary (rooms, [`RoutedEvent`],
//! allowlist projection) and the mapper's numbering, so ids, recovery, aliases and
//! authorization are the same for both.
//!
//! A tracked field's previous value comes from the change's pre-image when the
//! collection records them, else from a bounded per-stream memory of the last value
//! this process saw, else it is unknown and the payload says so (`known: false`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use bson::{doc, Bson, Document};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::event::{Delivery, Event, EventId, RoutedEvent};
use crate::normalize::{
    get_path, id_string, read_status, truncate, ChangeParts, ChangeView, Op, OwnerBookUse,
    StatusRead, UNHANDLED_OPS,
};
use crate::room::{Room, RoomKind};
use crate::route::{bson_to_json, insert_status, is_under, project, visible_changes};
use crate::status::{is_pickup_type, OrderStatus};

/// Longest id or string value remembered; longer ones are forgotten, never cut.
const MAX_KEPT_LEN: usize = 128;

/// The key under which tracked fields travel in every payload of a declared stream.
pub(crate) const TRACKED_KEY: &str = "tracked";

/// One `[[streams]]` table, validated (see `config/streams.rs`). Serializes in the input's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StreamDecl {
    /// The collection, in every watched database.
    pub(crate) collection: String,
    /// The prefix of the default event names, e.g. `balance`.
    pub(crate) module: String,
    /// Event name per operation.
    pub(crate) events: EventNames,
    /// Which document fields give which rooms.
    pub(crate) rooms: StreamRooms,
    /// What each audience may see of the document.
    pub(crate) allow: StreamAllow,
    /// Fields whose previous value, new value and difference the payloads carry.
    pub(crate) tracked: Vec<String>,
    /// `[streams.status]`: a status field normalized through a table of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<StreamStatus>,
}

/// `[streams.status]`: raw values of one field → canonical statuses, as `[status.order]`
/// does for orders: a change of the field is `{module}:status_changed` and payloads that
/// show the field carry `status`, `previousStatus`, `rawStatus` and `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StreamStatus {
    /// Dotted path of the raw status.
    pub(crate) field: String,
    /// Dotted path of the document's type; when set, a `ready` target splits into
    /// `ready_for_pickup` / `ready_for_delivery` as orders' `ready` does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) type_field: Option<String>,
    /// Type values (lower case) meaning pickup; set only with `type_field`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) pickup_types: Vec<String>,
    /// Raw value (trimmed, lower case) → canonical status.
    pub(crate) map: BTreeMap<String, String>,
}

impl StreamStatus {
    /// (status to show, progress, unknown) for `raw` of a document of type `kind`; an
    /// unknown raw value passes through as itself, as orders' do. No progress: a
    /// declared stream's statuses are no flow changecast knows.
    fn canonical(&self, raw: &str, kind: Option<&str>) -> (String, Option<u8>, bool) {
        match self.map.get(&raw.trim().to_ascii_lowercase()) {
            Some(t) if t == READY && self.type_field.is_some() => {
                let s = if is_pickup_type(&self.pickup_types, kind) {
                    OrderStatus::ReadyForPickup
                } else {
                    OrderStatus::ReadyForDelivery
                };
                (s.as_str().to_owned(), None, false)
            }
            Some(t) => (t.clone(), None, false),
            None => (raw.to_owned(), None, true),
        }
    }
}

/// The target that splits by type (as in `[status.order]`).
pub(crate) const READY: &str = "ready";

/// Event names per operation; defaults `{module}:created|updated|replaced|deleted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct EventNames {
    /// For inserts.
    pub(crate) created: String,
    /// For updates.
    pub(crate) updated: String,
    /// For replaces.
    pub(crate) replaced: String,
    /// For deletes.
    pub(crate) deleted: String,
    /// For a change of the `[streams.status]` field (only with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status_changed: Option<String>,
}

impl EventNames {
    /// Every name, in operation order, then `status_changed` when there is one.
    pub(crate) fn all(&self) -> Vec<&str> {
        [&self.created, &self.updated, &self.replaced, &self.deleted]
            .into_iter()
            .map(String::as_str)
            .chain(self.status_changed.as_deref())
            .collect()
    }
}

/// Document paths whose values name the rooms a change goes to (`"_id"` is the
/// document's own id). At least one room is declared.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub(crate) struct StreamRooms {
    /// `customer:{value}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) customer: Option<String>,
    /// `store:{value}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) store: Option<String>,
    /// `order:{value}` (joined by whoever owns that order, as for payments).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) order: Option<String>,
    /// `storefront:{value}`: any authenticated client may join, so its allowlist is public.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) storefront: Option<String>,
    /// The `admin` room.
    pub(crate) admin: bool,
}

impl StreamRooms {
    /// The declared (kind, path) pairs, admin excluded.
    pub(crate) fn keyed(&self) -> impl Iterator<Item = (RoomKind, &str)> {
        [
            (RoomKind::Customer, &self.customer),
            (RoomKind::Store, &self.store),
            (RoomKind::Order, &self.order),
            (RoomKind::Storefront, &self.storefront),
        ]
        .into_iter()
        .filter_map(|(k, p)| Some((k, p.as_deref()?)))
    }
}

/// Allowlists per audience; one is required for each declared room.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub(crate) struct StreamAllow {
    /// `customer:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) customer: Vec<String>,
    /// `store:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) store: Vec<String>,
    /// `order:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) order: Vec<String>,
    /// `storefront:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) storefront: Vec<String>,
    /// The `admin` room.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) admin: Vec<String>,
}

impl StreamAllow {
    /// The list for `kind`.
    pub(crate) fn of(&self, kind: RoomKind) -> &[String] {
        match kind {
            RoomKind::Customer => &self.customer,
            RoomKind::Store => &self.store,
            RoomKind::Order => &self.order,
            RoomKind::Storefront => &self.storefront,
            RoomKind::Admin => &self.admin,
        }
    }
}

/// Something in a declared stream's change that could not be used; counted and
/// logged (rate-limited) by the mapper under the same reasons as the built-ins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeclaredIssue {
    /// An operation that carries no document change (`drop`, `rename`, DDL…).
    UnhandledOperation,
    /// `operationType` missing or unknown.
    UnknownOperation,
    /// A room's field is absent from the document: that room is skipped.
    MissingField {
        /// The room kind.
        room: RoomKind,
    },
    /// A room's field holds a value that is no id (e.g. an array).
    WrongType {
        /// The room kind.
        room: RoomKind,
        /// The BSON type found.
        found: &'static str,
    },
    /// The id is not a valid room id.
    InvalidRoomId {
        /// The room kind.
        room: RoomKind,
    },
    /// A delete without pre-image of a document this process never saw: only the
    /// rooms that need no document (admin, `"_id"`) are known.
    NoOwnerForDelete,
    /// The `[streams.status]` field holds no string; the event carries no status.
    StatusWrongType {
        /// The BSON type found.
        found: &'static str,
    },
    /// A raw status not in the stream's table: passed through marked `unknown: true`,
    /// counted and logged once per value like orders' (not a drop).
    UnknownStatus {
        /// The raw value, at most 128 bytes.
        value: String,
    },
}

impl DeclaredIssue {
    /// A bounded label for `events_dropped_total{reason}` (the built-ins' reasons).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::UnhandledOperation => "unhandled_operation",
            Self::UnknownOperation => "unknown_operation",
            Self::MissingField { .. } => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::InvalidRoomId { .. } => "invalid_room_id",
            Self::NoOwnerForDelete => "no_owner_for_delete",
            Self::StatusWrongType { .. } => "wrong_type",
            Self::UnknownStatus { .. } => "unknown_status",
        }
    }
}

/// What a stream remembers of one document: its room ids and its tracked values.
#[derive(Debug, Clone, Default)]
struct Memo {
    /// Per entry of `StreamRooms::keyed`, in that order.
    keys: Vec<Option<String>>,
    /// Per tracked field: `Some(value)` (`Null` when absent), `None` when unknown.
    tracked: Vec<Option<Bson>>,
    /// The raw status and type last seen (`[streams.status]`), for `previousStatus`.
    status: Option<String>,
    kind: Option<String>,
}

/// Document id → [`Memo`], at most `cap` entries; the least recently written is
/// evicted first (its next change then has an unknown previous value, or, for a
/// delete without pre-image, only the rooms that need no document).
#[derive(Debug)]
struct MemoCache {
    cap: usize,
    gen: u64,
    map: HashMap<String, (u64, Memo)>,
    order: VecDeque<(u64, String)>,
}

impl MemoCache {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            gen: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, id: &str) -> Option<&Memo> {
        self.map.get(id).map(|(_, m)| m)
    }

    /// Callers leave out ids longer than [`MAX_KEPT_LEN`]: too long to be room ids anyway.
    fn put(&mut self, id: &str, memo: Memo) {
        if self.cap == 0 {
            return;
        }
        self.gen += 1;
        self.map.insert(id.to_owned(), (self.gen, memo));
        self.order.push_back((self.gen, id.to_owned()));
        while self.map.len() > self.cap {
            let Some((g, k)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|(mg, _)| *mg == g) {
                self.map.remove(&k);
            }
        }
        // Rewrites leave stale queue entries behind; drop them before the queue outgrows the map.
        if self.order.len() > self.cap.saturating_mul(2).saturating_add(16) {
            let map = &self.map;
            self.order
                .retain(|(g, k)| map.get(k).is_some_and(|(mg, _)| mg == g));
        }
    }

    fn remove(&mut self, id: &str) {
        self.map.remove(id);
    }
}

/// The rooms of the declared streams' documents as the live stream saw them, kept
/// after their deletion, consulted by oplog replays: a replay starts at a client's
/// `since`, so a change to a document deleted since (no lookup, no pre-image) would
/// otherwise have no rooms there (the reason `normalize::OwnerBook`, which holds this
/// one, exists). Bound: `normalize.state_cache_docs` documents over all declared
/// streams, least recently written evicted first.
#[derive(Debug)]
pub(crate) struct DeclaredBook {
    rooms: Mutex<MemoCache>,
}

impl DeclaredBook {
    /// A book of at most `cap` documents (0 disables it).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            rooms: Mutex::new(MemoCache::new(cap)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoCache> {
        // A cache update cannot be left half-done in a way worse than losing it.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(collection: &str, id: &str) -> String {
        format!("{collection}\u{0}{id}")
    }

    fn record(&self, collection: &str, id: &str, keys: &[Option<String>]) {
        let memo = Memo {
            keys: keys.to_vec(),
            ..Memo::default()
        };
        self.lock().put(&Self::key(collection, id), memo);
    }

    /// Rooms only: a tracked value from the book would be the latest, not the one before.
    fn rooms(&self, collection: &str, id: &str) -> Option<Memo> {
        self.lock().get(&Self::key(collection, id)).cloned()
    }
}

/// A value worth remembering: scalars only (an array or sub-document could be
/// large), strings up to [`MAX_KEPT_LEN`].
fn rememberable(v: &Bson) -> bool {
    match v {
        Bson::String(s) => s.len() <= MAX_KEPT_LEN,
        Bson::Double(_)
        | Bson::Int32(_)
        | Bson::Int64(_)
        | Bson::Decimal128(_)
        | Bson::Boolean(_)
        | Bson::Null
        | Bson::DateTime(_) => true,
        _ => false,
    }
}

/// `new - old` for two numbers: an integer when both are integers and it fits,
/// else a double; `null` when either is not a number. Decimal128 has no arithmetic
/// in the driver, so it gives `null` too.
fn delta(old: &Bson, new: &Bson) -> Value {
    fn int(b: &Bson) -> Option<i64> {
        match b {
            Bson::Int32(i) => Some(i64::from(*i)),
            Bson::Int64(i) => Some(*i),
            _ => None,
        }
    }
    // Beyond 2^53 a double is the only answer there is.
    #[allow(clippy::cast_precision_loss)]
    fn float(b: &Bson) -> Option<f64> {
        match b {
            Bson::Double(f) => Some(*f),
            other => int(other).map(|i| i as f64),
        }
    }
    if let (Some(a), Some(b)) = (int(old), int(new)) {
        if let Some(d) = b.checked_sub(a) {
            return Value::from(d);
        }
    }
    match (float(old), float(new)) {
        (Some(a), Some(b)) => {
            serde_json::Number::from_f64(b - a).map_or(Value::Null, Value::Number)
        }
        _ => Value::Null,
    }
}

/// Whether a changed path touches `target`: equal, an ancestor of it, or inside it.
fn touches(changed: &str, target: &str) -> bool {
    changed == target || is_under(target, changed) || is_under(changed, target)
}

/// One declared stream and its memory.
#[derive(Debug)]
struct Stream {
    decl: StreamDecl,
    keyed: Vec<(RoomKind, String)>,
    memo: MemoCache,
}

/// Every declared stream of a configuration; one per mapper (so per live stream
/// and per oplog replay, like the normalizer's state).
#[derive(Debug)]
pub(crate) struct Declared {
    streams: Vec<Stream>,
    cap: usize,
    book: Option<OwnerBookUse>,
}

impl Declared {
    /// The engine for `decls`; each stream remembers at most `memo_docs` documents.
    pub(crate) fn new(decls: &[StreamDecl], memo_docs: usize) -> Self {
        Self {
            streams: decls
                .iter()
                .map(|d| Stream {
                    keyed: d.rooms.keyed().map(|(k, p)| (k, p.to_owned())).collect(),
                    decl: d.clone(),
                    memo: MemoCache::new(memo_docs),
                })
                .collect(),
            cap: memo_docs,
            book: None,
        }
    }

    /// Records rooms in (live stream), or consults (oplog replay), the shared book.
    pub(crate) fn with_owner_book(mut self, book: OwnerBookUse) -> Self {
        self.book = Some(book);
        self
    }

    /// Whether `collection` is a declared stream's.
    pub(crate) fn handles(&self, collection: &str) -> bool {
        self.streams.iter().any(|s| s.decl.collection == collection)
    }

    /// Forgets every remembered document (after a gap in the stream).
    pub(crate) fn forget(&mut self) {
        for s in &mut self.streams {
            s.memo = MemoCache::new(self.cap);
        }
    }

    /// Maps one change of a declared collection, numbered `id` by the caller.
    /// `None` when the operation carries no document change; an event with no
    /// deliveries when no room could be named.
    pub(crate) fn map(
        &mut self,
        change: &Document,
        id: EventId,
        issues: &mut Vec<DeclaredIssue>,
    ) -> Option<RoutedEvent> {
        let coll = change.get_document("ns").ok()?.get_str("coll").ok()?;
        let stream = self
            .streams
            .iter_mut()
            .find(|s| s.decl.collection == coll)?;
        stream.map(change, id, self.book.as_ref(), issues)
    }
}

impl Stream {
    fn map(
        &mut self,
        change: &Document,
        id: EventId,
        book: Option<&OwnerBookUse>,
        issues: &mut Vec<DeclaredIssue>,
    ) -> Option<RoutedEvent> {
        let op = match change.get_str("operationType") {
            Ok("insert") => Op::Insert,
            Ok("update") => Op::Update,
            Ok("replace") => Op::Replace,
            Ok("delete") => Op::Delete,
            Ok(other) if UNHANDLED_OPS.contains(&other) => {
                issues.push(DeclaredIssue::UnhandledOperation);
                return None;
            }
            _ => {
                issues.push(DeclaredIssue::UnknownOperation);
                return None;
            }
        };
        let ChangeParts {
            ts_ms,
            full,
            pre,
            id: key,
        } = ChangeParts::of(change, op);
        let id_bson = key.filter(|b| !matches!(b, Bson::Null));
        let doc_id = id_bson.and_then(|b| id_string(b).ok());
        let (updated, removed): (Option<&Document>, Vec<&str>) =
            match change.get_document("updateDescription") {
                Ok(u) if op == Op::Update => (
                    u.get_document("updatedFields").ok(),
                    u.get_array("removedFields")
                        .map(|a| a.iter().filter_map(Bson::as_str).collect())
                        .unwrap_or_default(),
                ),
                _ => (None, Vec::new()),
            };
        let changed: Vec<String> = if op == Op::Update {
            updated
                .iter()
                .flat_map(|d| d.keys().cloned())
                .chain(removed.iter().map(|s| (*s).to_owned()))
                .collect()
        } else {
            Vec::new()
        };
        let source = if op == Op::Delete { pre } else { full };
        let coll = &self.decl.collection;
        let remembered = doc_id.as_deref().and_then(|i| {
            self.memo.get(i).cloned().or_else(|| match book {
                Some(OwnerBookUse::Consult(b)) => b.declared().rooms(coll, i),
                _ => None,
            })
        });

        // Room ids: from the document, else (a delete without pre-image, a lookup that
        // found nothing) from memory; `"_id"` is always the document key.
        let mut keys: Vec<Option<String>> = Vec::with_capacity(self.keyed.len());
        let mut owner_unknown = false;
        for (i, (kind, path)) in self.keyed.iter().enumerate() {
            let key = if path == "_id" {
                doc_id.clone()
            } else if let Some(doc) = source {
                match get_path(doc, path) {
                    None | Some(Bson::Null) => {
                        issues.push(DeclaredIssue::MissingField { room: *kind });
                        None
                    }
                    Some(v) => match id_string(v) {
                        Ok(s) => Some(s),
                        Err(found) => {
                            issues.push(DeclaredIssue::WrongType { room: *kind, found });
                            None
                        }
                    },
                }
            } else if let Some(k) = remembered.as_ref().and_then(|m| m.keys.get(i).cloned()) {
                k
            } else {
                owner_unknown = true;
                None
            };
            keys.push(key);
        }
        if owner_unknown && op == Op::Delete {
            issues.push(DeclaredIssue::NoOwnerForDelete);
        } else if owner_unknown {
            issues.push(DeclaredIssue::MissingField {
                room: self.keyed.first().map_or(RoomKind::Admin, |k| k.0),
            });
        }

        // Tracked values: (old, new), `None` = unknown, `Some(Null)` = absent.
        let tracked: Vec<(Option<Bson>, Option<Bson>)> = self
            .decl
            .tracked
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let new = match op {
                    Op::Delete => Some(Bson::Null),
                    // The update's own value first: the looked-up document may be newer.
                    Op::Update if removed.iter().any(|r| touches(r, path)) => Some(Bson::Null),
                    _ => updated
                        .and_then(|u| u.get(path.as_str()).cloned())
                        .or_else(|| full.map(|d| get_path(d, path).cloned().unwrap_or(Bson::Null))),
                };
                let before = || {
                    pre.map(|p| get_path(p, path).cloned().unwrap_or(Bson::Null))
                        .or_else(|| {
                            remembered
                                .as_ref()
                                .and_then(|m| m.tracked.get(i).cloned().flatten())
                        })
                };
                match op {
                    Op::Insert => (Some(Bson::Null), new),
                    // The update description lists every changed path: this one did not
                    // move, so whichever of its values is known is both (the lookup may
                    // have found nothing).
                    Op::Update if !changed.iter().any(|c| touches(c, path)) => {
                        let v = new.or_else(before);
                        (v.clone(), v)
                    }
                    _ => (before(), new),
                }
            })
            .collect();

        let status = self.decl.status.as_ref().map(|st| {
            let read = read_status(
                &ChangeView {
                    op,
                    pre,
                    source,
                    updated,
                    changed: &changed,
                },
                &st.field,
                st.type_field.as_deref(),
                remembered
                    .as_ref()
                    .map(|m| (m.status.as_deref(), m.kind.as_deref())),
                |raw, kind| st.canonical(raw, kind),
            );
            if let Some(found) = read.wrong_type {
                issues.push(DeclaredIssue::StatusWrongType { found });
            }
            if let Some(info) = read.info.as_ref().filter(|i| i.unknown) {
                issues.push(DeclaredIssue::UnknownStatus {
                    value: truncate(&info.raw),
                });
            }
            read
        });
        let status_moved = status.as_ref().is_some_and(|s| s.touched);

        if let Some(i) = doc_id.as_deref().filter(|i| i.len() <= MAX_KEPT_LEN) {
            let kept: Vec<Option<String>> = keys
                .iter()
                .map(|k| k.clone().filter(|s| s.len() <= MAX_KEPT_LEN))
                .collect();
            if let (Some(OwnerBookUse::Record(b)), true) = (book, op != Op::Delete) {
                b.declared().record(&self.decl.collection, i, &kept);
            }
            if op == Op::Delete {
                self.memo.remove(i);
            } else {
                let short = |v: &Option<String>| v.clone().filter(|s| s.len() <= MAX_KEPT_LEN);
                let memo = Memo {
                    keys: kept,
                    tracked: tracked
                        .iter()
                        .map(|(_, new)| new.clone().filter(rememberable))
                        .collect(),
                    status: status.as_ref().and_then(|s| short(&s.raw)),
                    kind: status.as_ref().and_then(|s| short(&s.kind)),
                };
                self.memo.put(i, memo);
            }
        }

        let events = &self.decl.events;
        let name = match (op, events.status_changed.as_ref()) {
            (Op::Update | Op::Replace, Some(moved)) if status_moved => moved,
            (Op::Insert, _) => &events.created,
            (Op::Update, _) => &events.updated,
            (Op::Replace, _) => &events.replaced,
            (Op::Delete, _) => &events.deleted,
        };
        let status_info = status.and_then(|s: StatusRead| s.info);
        // Deletes without a pre-image still show their `_id` to audiences allowed to see it.
        let only_id;
        let doc = match source {
            Some(d) => d,
            None => {
                only_id = id_bson.map_or_else(Document::new, |b| doc! {"_id": b.clone()});
                &only_id
            }
        };
        let admin = self
            .decl
            .rooms
            .admin
            .then_some((RoomKind::Admin, String::new()));
        let targets = self
            .keyed
            .iter()
            .map(|(k, _)| *k)
            .zip(keys)
            .filter_map(|(k, key)| Some((k, key?)))
            .chain(admin);
        let mut deliveries = Vec::new();
        for (kind, key) in targets {
            let Ok(room) = Room::new(kind, &key) else {
                issues.push(DeclaredIssue::InvalidRoomId { room: kind });
                continue;
            };
            let allow = self.decl.allow.of(kind);
            let visible = visible_changes(&changed, allow);
            // Updates that touch nothing an audience may see are not news to it.
            if op == Op::Update && visible.is_empty() {
                continue;
            }
            let mut data = project(doc, allow);
            let mut tracked_out = Map::new();
            for (path, (old, new)) in self.decl.tracked.iter().zip(&tracked) {
                // A tracked field reaches only the audiences whose allowlist shows it.
                if !allow.iter().any(|a| a == path || is_under(path, a)) {
                    continue;
                }
                tracked_out.insert(path.clone(), tracked_value(old.as_ref(), new.as_ref()));
            }
            if !tracked_out.is_empty() {
                data.insert(TRACKED_KEY.into(), Value::Object(tracked_out));
            }
            // Like a tracked field, the status reaches only the audiences that may see it.
            if let (Some(info), Some(st)) = (&status_info, &self.decl.status) {
                if allow
                    .iter()
                    .any(|a| a == &st.field || is_under(&st.field, a))
                {
                    insert_status(&mut data, info, false);
                }
            }
            if op == Op::Update {
                data.insert(
                    "changedFields".into(),
                    Value::Array(visible.into_iter().map(Value::String).collect()),
                );
            }
            deliveries.push(Delivery {
                room,
                data: Value::Object(data),
            });
        }
        Some(RoutedEvent {
            event: Event {
                id,
                name: name.clone(),
                ts_ms,
            },
            deliveries,
            // No ownership re-check: `order:` rooms of a declared stream work as a
            // payment's do (whoever owns the order may be in the room).
            owner: None,
            database: None,
        })
    }
}

/// The declared rooms whose field no sampled document holds: a typo in
/// `[streams.rooms]` would route nothing there, silently. `"_id"` always exists;
/// an empty sample says nothing.
pub(crate) fn unsampled_rooms<'a>(
    decl: &'a StreamDecl,
    sample: &[Document],
) -> Vec<(RoomKind, &'a str)> {
    if sample.is_empty() {
        return Vec::new();
    }
    decl.rooms
        .keyed()
        .filter(|(_, path)| {
            *path != "_id"
                && !sample
                    .iter()
                    .any(|d| get_path(d, path).is_some_and(|v| !matches!(v, Bson::Null)))
        })
        .collect()
}

/// `{"old", "new", "delta", "known"}` for one tracked field.
fn tracked_value(old: Option<&Bson>, new: Option<&Bson>) -> Value {
    let j = |b: Option<&Bson>| b.map_or(Value::Null, bson_to_json);
    let d = match (old, new) {
        (Some(o), Some(n)) => delta(o, n),
        _ => Value::Null,
    };
    serde_json::json!({
        "old": j(old),
        "new": j(new),
        "delta": d,
        "known": old.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::testing::change;
    use serde_json::json;

    const USERS: &str = r#"
[[streams]]
collection = "users"
module = "balance"
tracked = ["balance"]
[streams.rooms]
customer = "_id"
admin = true
[streams.allow]
customer = ["_id", "balance"]
admin = ["_id", "balance", "email"]

[[streams]]
collection = "deliveries"
module = "delivery"
[streams.rooms]
customer = "customerId"
store = "storeId"
[streams.allow]
customer = ["status"]
store = ["status", "notes"]
"#;

    fn engine() -> Declared {
        let c = crate::config::test_config(USERS, "t").unwrap();
        Declared::new(&c.streams, 100)
    }

    fn update(coll: &str, id: &str, full: Document, set: Document) -> Document {
        let mut d = change("update", coll, Bson::String(id.into()), Some(full));
        d.insert(
            "updateDescription",
            doc! {"updatedFields": set, "removedFields": []},
        );
        d
    }

    fn run(e: &mut Declared, d: &Document) -> RoutedEvent {
        let mut issues = Vec::new();
        let r = e.map(d, EventId::new("x"), &mut issues).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        r
    }

    fn rooms(r: &RoutedEvent) -> Vec<String> {
        r.deliveries.iter().map(|d| d.room.to_string()).collect()
    }

    #[test]
    fn balance_from_memory_then_from_the_pre_image() {
        let mut e = engine();
        let ins = change(
            "insert",
            "users",
            Bson::String("u1".into()),
            Some(doc! {"_id": "u1", "balance": 10, "email": "a@b"}),
        );
        let r = run(&mut e, &ins);
        assert_eq!(r.event.name, "balance:created");
        assert_eq!(rooms(&r), ["customer:u1", "admin"]);
        assert_eq!(
            r.deliveries[0].data,
            json!({"_id": "u1", "balance": 10, "tracked": {"balance": {"old": null, "new": 10, "delta": null, "known": true}}})
        );
        assert_eq!(r.deliveries[1].data["email"], "a@b");

        let upd = update(
            "users",
            "u1",
            doc! {"_id": "u1", "balance": 25},
            doc! {"balance": 25},
        );
        let r = run(&mut e, &upd);
        assert_eq!(r.event.name, "balance:updated");
        assert_eq!(
            r.deliveries[0].data["tracked"]["balance"],
            json!({"old": 10, "new": 25, "delta": 15, "known": true})
        );
        assert_eq!(r.deliveries[0].data["changedFields"], json!(["balance"]));

        // The pre-image wins over memory (here they disagree on purpose).
        let mut upd = update(
            "users",
            "u1",
            doc! {"_id": "u1", "balance": 30.5},
            doc! {"balance": 30.5},
        );
        upd.insert(
            "fullDocumentBeforeChange",
            doc! {"_id": "u1", "balance": 20},
        );
        let r = run(&mut e, &upd);
        assert_eq!(
            r.deliveries[0].data["tracked"]["balance"],
            json!({"old": 20, "new": 30.5, "delta": 10.5, "known": true})
        );
    }

    #[test]
    fn an_unseen_document_has_an_unknown_old_value() {
        let mut e = engine();
        let upd = update(
            "users",
            "u9",
            doc! {"_id": "u9", "balance": 5},
            doc! {"balance": 5},
        );
        let r = run(&mut e, &upd);
        assert_eq!(
            r.deliveries[0].data["tracked"]["balance"],
            json!({"old": null, "new": 5, "delta": null, "known": false})
        );
        // An update that does not touch the field: it is known not to have moved.
        let upd = update(
            "users",
            "u8",
            doc! {"_id": "u8", "balance": 5, "email": "x"},
            doc! {"email": "x"},
        );
        let r = run(&mut e, &upd);
        // Only admin may see `email`: the customer hears nothing of it.
        assert_eq!(rooms(&r), ["admin"]);
        assert_eq!(
            r.deliveries[0].data["tracked"]["balance"],
            json!({"old": 5, "new": 5, "delta": 0, "known": true})
        );
    }

    #[test]
    fn audiences_see_their_allowlists_and_deletes_use_memory() {
        let mut e = engine();
        let ins = change(
            "insert",
            "deliveries",
            Bson::String("d1".into()),
            Some(
                doc! {"_id": "d1", "customerId": "c1", "storeId": "s1", "status": "scheduled", "notes": "gate code 12"},
            ),
        );
        let r = run(&mut e, &ins);
        assert_eq!(r.event.name, "delivery:created");
        assert_eq!(rooms(&r), ["customer:c1", "store:s1"]);
        assert_eq!(r.deliveries[0].data, json!({"status": "scheduled"}));
        assert_eq!(
            r.deliveries[1].data,
            json!({"status": "scheduled", "notes": "gate code 12"})
        );

        // No pre-image: the rooms come from what the stream saw.
        let del = change("delete", "deliveries", Bson::String("d1".into()), None);
        let r = run(&mut e, &del);
        assert_eq!(r.event.name, "delivery:deleted");
        assert_eq!(rooms(&r), ["customer:c1", "store:s1"]);
        // Forgotten after the delete: a second delete has no owner.
        let mut issues = Vec::new();
        let r = e.map(&del, EventId::new("y"), &mut issues).unwrap();
        assert!(r.deliveries.is_empty());
        assert_eq!(issues, [DeclaredIssue::NoOwnerForDelete]);
    }

    #[test]
    fn room_fields_no_sampled_document_has_are_named() {
        let c = crate::config::test_config(USERS, "t").unwrap();
        let deliveries = &c.streams[1];
        let sample = [
            doc! {"customerId": "c1", "storId": "typo"},
            doc! {"customerId": null},
        ];
        assert_eq!(
            unsampled_rooms(deliveries, &sample),
            [(RoomKind::Store, "storeId")]
        );
        assert!(unsampled_rooms(deliveries, &[]).is_empty());
        // "_id" needs no sample.
        assert!(unsampled_rooms(&c.streams[0], &[doc! {}]).is_empty());
    }

    #[test]
    fn an_untouched_field_keeps_its_known_value_when_the_lookup_finds_nothing() {
        let mut e = engine();
        let ins = change(
            "insert",
            "users",
            Bson::String("u1".into()),
            Some(doc! {"_id": "u1", "balance": 7}),
        );
        run(&mut e, &ins);
        // Deleted since: no fullDocument; only `email` changed.
        let mut upd = change("update", "users", Bson::String("u1".into()), None);
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"email": "x"}, "removedFields": []},
        );
        let r = run(&mut e, &upd);
        // Only admin may see `email`.
        assert_eq!(rooms(&r), ["admin"]);
        assert_eq!(
            r.deliveries[0].data["tracked"]["balance"],
            json!({"old": 7, "new": 7, "delta": 0, "known": true})
        );
        let upd = update(
            "users",
            "u1",
            doc! {"_id": "u1", "balance": 9},
            doc! {"balance": 9},
        );
        let r = run(&mut e, &upd);
        assert_eq!(r.deliveries[0].data["tracked"]["balance"]["old"], 7);
    }

    const WITH_STATUS: &str = r#"
[[streams]]
collection = "deliveries"
module = "delivery"
[streams.rooms]
customer = "customerId"
store = "storeId"
[streams.allow]
customer = ["_id"]
store = ["_id", "state", "notes"]
[streams.status]
field = "state"
type_field = "kind"
[streams.status.map]
Scheduled = "pending"
loaded = "ready"
dropped_off = "delivered"
"#;

    fn status_engine() -> Declared {
        let c = crate::config::test_config(WITH_STATUS, "t").unwrap();
        Declared::new(&c.streams, 100)
    }

    fn delivery(id: &str, state: &str, kind: &str) -> Document {
        doc! {"_id": id, "customerId": "c1", "storeId": "s1", "state": state, "kind": kind}
    }

    #[test]
    fn a_status_field_is_normalized_and_its_change_is_status_changed() {
        let mut e = status_engine();
        let ins = change(
            "insert",
            "deliveries",
            Bson::String("d1".into()),
            Some(delivery("d1", "scheduled", "pickup")),
        );
        let r = run(&mut e, &ins);
        assert_eq!(r.event.name, "delivery:created");
        // The customer may not see `state`: no status for them, as for a tracked field.
        assert_eq!(r.deliveries[0].data, json!({"_id": "d1"}));
        assert_eq!(
            r.deliveries[1].data,
            json!({"_id": "d1", "state": "scheduled", "status": "pending", "rawStatus": "scheduled",
                   "previousStatus": null, "unknown": false})
        );

        // `ready` splits by the type field, as orders' does.
        let upd = update(
            "deliveries",
            "d1",
            delivery("d1", "loaded", "pickup"),
            doc! {"state": "loaded"},
        );
        let r = run(&mut e, &upd);
        assert_eq!(r.event.name, "delivery:status_changed");
        assert_eq!(rooms(&r), ["store:s1"]);
        let d = &r.deliveries[0].data;
        assert_eq!(
            (&d["status"], &d["previousStatus"], &d["rawStatus"]),
            (
                &json!("ready_for_pickup"),
                &json!("pending"),
                &json!("loaded")
            )
        );
        assert_eq!(d["changedFields"], json!(["state"]));
        assert!(d.get("progress").is_none(), "{d}");

        // Another field: a plain update, the status unchanged.
        let upd = update(
            "deliveries",
            "d1",
            delivery("d1", "loaded", "pickup"),
            doc! {"notes": "gate"},
        );
        let r = run(&mut e, &upd);
        assert_eq!(r.event.name, "delivery:updated");
        assert_eq!(r.deliveries[0].data["previousStatus"], "ready_for_pickup");

        // A replace that changes the raw value is a status change too.
        let rep = change(
            "replace",
            "deliveries",
            Bson::String("d1".into()),
            Some(delivery("d1", "dropped_off", "delivery")),
        );
        let r = run(&mut e, &rep);
        assert_eq!(r.event.name, "delivery:status_changed");
        assert_eq!(r.deliveries[1].data["status"], "delivered");
        let r = run(&mut e, &rep);
        assert_eq!(r.event.name, "delivery:replaced");
    }

    #[test]
    fn an_unknown_raw_status_passes_through_marked_and_is_reported() {
        let mut e = status_engine();
        let ins = change(
            "insert",
            "deliveries",
            Bson::String("d2".into()),
            Some(delivery("d2", "Lost", "delivery")),
        );
        let mut issues = Vec::new();
        let r = e.map(&ins, EventId::new("x"), &mut issues).unwrap();
        assert_eq!(
            issues,
            [DeclaredIssue::UnknownStatus {
                value: "Lost".into()
            }]
        );
        let d = &r.deliveries[1].data;
        assert_eq!(
            (&d["status"], &d["unknown"]),
            (&json!("Lost"), &json!(true))
        );
        // A status that is no string: no status at all, reported.
        let ins = change(
            "insert",
            "deliveries",
            Bson::String("d3".into()),
            Some(doc! {"_id": "d3", "customerId": "c1", "storeId": "s1", "state": 3}),
        );
        let mut issues = Vec::new();
        let r = e.map(&ins, EventId::new("y"), &mut issues).unwrap();
        assert_eq!(issues, [DeclaredIssue::StatusWrongType { found: "int" }]);
        assert!(r.deliveries[1].data.get("status").is_none());
    }

    #[test]
    fn without_a_status_table_names_and_payloads_are_unchanged() {
        let mut e = engine();
        let ins = change(
            "insert",
            "deliveries",
            Bson::String("d1".into()),
            Some(doc! {"_id": "d1", "customerId": "c1", "storeId": "s1", "status": "new"}),
        );
        run(&mut e, &ins);
        let upd = update(
            "deliveries",
            "d1",
            doc! {"_id": "d1", "customerId": "c1", "storeId": "s1", "status": "done"},
            doc! {"status": "done"},
        );
        let r = run(&mut e, &upd);
        assert_eq!(r.event.name, "delivery:updated");
        assert_eq!(
            r.deliveries[0].data,
            json!({"status": "done", "changedFields": ["status"]})
        );
    }

    #[test]
    fn deltas() {
        assert_eq!(delta(&Bson::Int32(10), &Bson::Int64(25)), json!(15));
        assert_eq!(
            delta(&Bson::Int64(i64::MIN), &Bson::Int64(1)),
            json!(9.223_372_036_854_776e18)
        );
        assert_eq!(delta(&Bson::Double(1.5), &Bson::Int32(2)), json!(0.5));
        assert_eq!(
            delta(&Bson::String("a".into()), &Bson::Int32(2)),
            Value::Null
        );
    }
}
