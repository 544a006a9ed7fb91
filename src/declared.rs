//! The one stream engine: a change of a watched collection → at most one named event, routed to the rooms its [`Spec`] names with per-audience payloads; no I/O, knows nothing of sockets or of who may join.
//!
//! Every watched collection is a [`Spec`]: each `[[streams]]` declaration, and
//! orders, payments and settings, which are presets the code builds from their
//! config sections (`presets`). One path reads every change (`normalize`: operation,
//! documents, key, status) and addresses it (`route`: rooms, allowlist projections);
//! a spec's [`Shape`] decides only what its payloads carry beyond the projection.
//!
//! A tracked field's previous value comes from the change's pre-image when the
//! collection records them, else from a bounded per-stream memory of the last value
//! this process saw, else it is unknown and the payload says so (`known: false`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bson::raw::{RawBsonRef, RawDocument, RawDocumentBuf};
use bson::{Bson, Document};
use serde::Serialize;
use serde_json::{Map, Value};
use smallvec::SmallVec;

use crate::authz::extract_owner;
use crate::bsonscan;
use crate::config::{Config, SettingsSection};
use crate::docpath::{
    get_path, is_under, raw_doc, raw_id_string, raw_lookup_id, raw_path, raw_str, raw_type_name,
    to_bson, touches, Lookup,
};
use crate::event::{Delivery, Event, EventId, Issue, RoutedEvent};
use crate::normalize::{
    read_status, truncate, ChangeParts, ChangeView, Op, StatusRead, UNHANDLED_OPS,
};
use crate::payload::{Obj, Payload, Plan, Source, Written};
use crate::room::{Room, RoomKind};
use crate::route::{any_visible, bson_to_json, visible_changes, write_status, STATUS_KEYS};
use crate::status::{is_pickup_type, status_key, OrderStatus, StatusTable};

/// Longest id or string value remembered; longer ones are forgotten, never cut.
const MAX_KEPT_LEN: usize = 128;

/// The key under which tracked fields travel in every payload of a declared stream.
pub(crate) const TRACKED_KEY: &str = "tracked";

/// One `[[streams]]` table, validated (see `config.rs`). Serializes in the input's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StreamDecl {
    /// The collection, in every watched database.
    pub collection: String,
    /// The prefix of the default event names, e.g. `balance`.
    pub module: String,
    /// Event name per operation.
    pub events: EventNames,
    /// Which document fields give which rooms.
    pub rooms: StreamRooms,
    /// What each audience may see of the document.
    pub allow: StreamAllow,
    /// Fields whose previous value, new value and difference the payloads carry.
    pub tracked: Vec<String>,
    /// `[streams.status]`: a status field normalized through a table of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<StreamStatus>,
}

/// `[streams.status]`: raw values of one field → canonical statuses, as `[status.order]`
/// does for orders: a change of the field is `{module}:status_changed` and payloads that
/// show the field carry `status`, `previousStatus`, `rawStatus` and `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StreamStatus {
    /// Dotted path of the raw status.
    pub field: String,
    /// Dotted path of the document's type; when set, a `ready` target splits into
    /// `ready_for_pickup` / `ready_for_delivery` as orders' `ready` does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_field: Option<String>,
    /// Type values (lower case) meaning pickup; set only with `type_field`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pickup_types: Vec<String>,
    /// Raw value (trimmed, lower case) → canonical status.
    pub map: BTreeMap<String, String>,
}

impl StreamStatus {
    /// (status to show, progress, unknown) for `raw` of a document of type `kind`; an
    /// unknown raw value passes through as itself, as orders' do. No progress: a
    /// declared stream's statuses are no flow changecast knows.
    fn canonical(&self, raw: &str, kind: Option<&str>) -> (Cow<'static, str>, Option<u8>, bool) {
        match self.map.get(&*status_key(raw)) {
            Some(t) if t == READY && self.type_field.is_some() => {
                let s = if is_pickup_type(&self.pickup_types, kind) {
                    OrderStatus::ReadyForPickup
                } else {
                    OrderStatus::ReadyForDelivery
                };
                (s.as_str().into(), None, false)
            }
            Some(t) => (t.clone().into(), None, false),
            None => (raw.to_owned().into(), None, true),
        }
    }
}

impl StreamStatus {
    /// The statuses its payloads can carry besides unknown raw values: the table's
    /// targets, a `ready` split into its two halves when there is a type field.
    pub(crate) fn targets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in self.map.values() {
            let split = [
                OrderStatus::ReadyForPickup.as_str(),
                OrderStatus::ReadyForDelivery.as_str(),
            ];
            let these: &[&str] = if t == READY && self.type_field.is_some() {
                &split
            } else {
                &[t.as_str()]
            };
            for s in these {
                if !out.contains(s) {
                    out.push(s);
                }
            }
        }
        out
    }
}

/// Whether an alias of `event` may filter on `status` (`[[socketio.aliases]] statuses`):
/// `None` when `event` is no declared stream's (the built-in tables decide), else
/// whether `status` is one of that stream's targets, or why not.
pub(crate) fn alias_status(
    streams: &[StreamDecl],
    event: &str,
    status: &str,
) -> Option<Result<(), String>> {
    let decl = streams.iter().find(|s| s.events.all().contains(&event))?;
    Some(match &decl.status {
        None => Err(format!(
            "the stream of {:?} has no status table ([streams.status]), so its events carry no status",
            decl.collection
        )),
        Some(st) if st.targets().contains(&status) => Ok(()),
        Some(st) => Err(format!(
            "{status:?} is not a status of the stream of {:?}; expected one of: {}",
            decl.collection,
            st.targets().join(", ")
        )),
    })
}

/// The target that splits by type (as in `[status.order]`).
pub(crate) const READY: &str = "ready";

/// Event names per operation; defaults `{module}:created|updated|replaced|deleted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct EventNames {
    /// For inserts.
    pub created: String,
    /// For updates.
    pub updated: String,
    /// For replaces.
    pub replaced: String,
    /// For deletes.
    pub deleted: String,
    /// For a change of the `[streams.status]` field (only with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_changed: Option<String>,
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
    pub customer: Option<String>,
    /// `store:{value}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// `order:{value}` (joined by whoever owns that order, as for payments).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// `storefront:{value}`: any authenticated client may join, so its allowlist is public.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storefront: Option<String>,
    /// The `admin` room.
    pub admin: bool,
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
    pub customer: Vec<String>,
    /// `store:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub store: Vec<String>,
    /// `order:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<String>,
    /// `storefront:` rooms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub storefront: Vec<String>,
    /// The `admin` room.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admin: Vec<String>,
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
///
/// Keyed by foldhash (seeded per process: the ids come from documents, so a fixed
/// hash could be flooded), the id's text shared by the map and the queue.
#[derive(Debug)]
struct MemoCache {
    cap: usize,
    gen: u64,
    /// Boxed memos keep the table's slots small: it is sized for `cap` up front
    /// (growing a table of large slots by doubling cost page faults on every change
    /// burst), and each slot of an unused capacity costs 32 bytes.
    map: HashMap<Arc<str>, (u64, Box<Memo>), foldhash::fast::RandomState>,
    order: VecDeque<(u64, Arc<str>)>,
}

impl MemoCache {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            gen: 0,
            map: HashMap::with_capacity_and_hasher(cap.min(1 << 17), Default::default()),
            order: VecDeque::new(),
        }
    }

    fn get(&self, id: &str) -> Option<&Memo> {
        self.map.get(id).map(|(_, m)| &**m)
    }

    /// Writes `id`'s memo with `fill`, in place when there is one: most changes are
    /// updates of documents seen before, and refilling the memo's strings reuses their
    /// buffers where building a new memo allocated each again (and freed the old ones).
    /// Callers leave out ids longer than [`MAX_KEPT_LEN`]: too long to be room ids anyway.
    fn write(&mut self, id: &str, fill: impl FnOnce(&mut Memo)) {
        if self.cap == 0 {
            return;
        }
        self.gen += 1;
        // A rewrite reuses the key's text; its old queue entry goes stale.
        let known = self.map.get_key_value(id).map(|(k, _)| k.clone());
        let key: Arc<str> = match known.zip(self.map.get_mut(id)) {
            Some((k, (g, m))) => {
                *g = self.gen;
                fill(m);
                k
            }
            None => {
                let key: Arc<str> = Arc::from(id);
                let mut m = Box::default();
                fill(&mut m);
                self.map.insert(key.clone(), (self.gen, m));
                key
            }
        };
        self.order.push_back((self.gen, key));
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

/// The rooms of every stream's documents as the live stream saw them, kept after
/// their deletion, consulted by oplog replays: a replay starts at a client's `since`,
/// so a change to a document written before that point and deleted since (the lookup
/// finds nothing, no pre-image) would otherwise have no rooms there and be dropped — a
/// silent gap the live clients never had. Bound: `normalize.state_cache_docs` documents
/// over all streams (~150 bytes each), least recently written evicted first.
#[derive(Debug)]
pub(crate) struct OwnerBook {
    rooms: Mutex<MemoCache>,
}

impl OwnerBook {
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

    /// Calls `f` with the book's key of `id` in `collection` (every change of the live
    /// stream is recorded, so the key is joined without a heap buffer).
    fn with_key<T>(collection: &str, id: &str, f: impl FnOnce(&str) -> T) -> T {
        crate::joined::with_joined(&[collection, "\u{0}", id], f)
    }

    fn record(&self, collection: &str, id: &str, keys: &[Option<String>]) {
        Self::with_key(collection, id, |key| {
            self.lock().write(key, |m| fill_keys(&mut m.keys, keys))
        });
    }

    /// Rooms only: a status or tracked value from the book would be the latest, not the one before.
    fn rooms(&self, collection: &str, id: &str) -> Option<Memo> {
        Self::with_key(collection, id, |key| self.lock().get(key).cloned())
    }
}

/// How an engine uses an [`OwnerBook`].
#[derive(Debug, Clone)]
pub(crate) enum OwnerBookUse {
    /// The live stream: records every document's rooms.
    Record(Arc<OwnerBook>),
    /// An oplog replay: falls back to the book for documents it has not seen itself.
    Consult(Arc<OwnerBook>),
}

/// `slots` made equal to `keys` (ids longer than [`MAX_KEPT_LEN`] left out), reusing
/// the strings already there.
fn fill_keys(slots: &mut Vec<Option<String>>, keys: &[Option<String>]) {
    slots.truncate(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let k = k.as_deref().filter(|s| s.len() <= MAX_KEPT_LEN);
        match slots.get_mut(i) {
            Some(slot) => assign(slot, k),
            None => slots.push(k.map(str::to_owned)),
        }
    }
}

/// `*slot = v`, reusing the string already in `slot`.
fn assign(slot: &mut Option<String>, v: Option<&str>) {
    match (slot.as_mut(), v) {
        (Some(s), Some(v)) => {
            s.clear();
            s.push_str(v);
        }
        (_, v) => *slot = v.map(str::to_owned),
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

/// Event names per operation of one stream, as the engine uses them.
#[derive(Debug, Clone)]
/// Shared texts: each event takes its name by reference count, not by copy.
pub(crate) struct Names {
    pub(crate) created: Arc<str>,
    pub(crate) updated: Arc<str>,
    pub(crate) replaced: Arc<str>,
    /// `None`: a delete is no event of this stream (settings).
    pub(crate) deleted: Option<Arc<str>>,
    /// A change of the status field (only with a status table).
    pub(crate) status_changed: Option<Arc<str>>,
}

/// Where one room id comes from.
#[derive(Debug, Clone)]
pub(crate) enum KeyAt {
    /// The document's own id (always known, even for a delete without pre-image).
    DocId,
    /// The first present (non-null) of these dotted paths.
    Paths(Vec<String>),
}

/// One room id of a stream's documents.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    /// Named by issues (`missing_field`, `wrong_type`).
    pub(crate) label: &'static str,
    pub(crate) at: KeyAt,
}

/// A status field and the table its raw values go through.
#[derive(Debug, Clone)]
pub(crate) struct StatusRule {
    pub(crate) field: String,
    /// The document's type, which splits a `ready` target by pickup or delivery.
    pub(crate) type_field: Option<String>,
    pub(crate) table: Table,
}

/// A status table.
#[derive(Debug, Clone)]
pub(crate) enum Table {
    /// `[streams.status]`.
    Declared(StreamStatus),
    /// `[status.order]` with the pickup/delivery split (payloads carry `progress`).
    Order(StatusTable),
    /// `[status.payment]`.
    Payment(StatusTable),
}

impl Table {
    /// (status to show, progress, unknown); an unknown raw value passes through as itself.
    fn canonical(&self, raw: &str, kind: Option<&str>) -> (Cow<'static, str>, Option<u8>, bool) {
        match self {
            Self::Declared(st) => st.canonical(raw, kind),
            Self::Order(t) => match t.order_status(raw, kind) {
                Some(s) => (s.as_str().into(), s.progress(), false),
                None => (raw.to_owned().into(), None, true),
            },
            Self::Payment(t) => match t.payment_status(raw) {
                Some(s) => (s.as_str().into(), None, false),
                None => (raw.to_owned().into(), None, true),
            },
        }
    }
}

/// What a stream's payloads carry beyond the allowlisted projection: the one thing
/// the presets and the declarations differ in.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    /// `[[streams]]`: tracked fields and the status go only to audiences whose
    /// allowlist shows them; an update no audience field changed is not sent to it;
    /// a delete whose rooms are unknown still reaches those that need no document.
    Declared,
    /// Orders and payments as the Node apps sent them: every audience gets the status
    /// (orders with `progress`), `orderId`, for payments `paymentId`; a replace counts
    /// as a change of every top-level field and, unless it moves the status, as an
    /// update; a delete whose rooms are unknown is dropped.
    Record {
        /// Payments: `paymentId` is the document's id.
        payment: bool,
    },
    /// Settings: a change is news only for the sections it touches; each audience
    /// gets the fields of its sections (`storefront:` the public ones only).
    Settings(Vec<SettingsSection>),
}

/// Whose `order:` room a change belongs to (orders): read from the same document the
/// payloads come from, by the ownership lookup's own rule (`authz::extract_owner`).
#[derive(Debug, Clone)]
pub(crate) struct OwnerPaths {
    pub(crate) customer: Vec<String>,
    pub(crate) store: Vec<String>,
}

/// One watched collection as the engine runs it: a `[[streams]]` declaration
/// ([`Spec::declared`]) or a preset (`presets`).
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) collection: String,
    pub(crate) names: Names,
    pub(crate) keys: Vec<Key>,
    /// Room kind → index in `keys`, in delivery order; `admin` comes last.
    pub(crate) rooms: Vec<(RoomKind, usize)>,
    pub(crate) admin: bool,
    pub(crate) allow: StreamAllow,
    pub(crate) tracked: Vec<String>,
    pub(crate) status: Option<StatusRule>,
    pub(crate) shape: Shape,
    /// Set for a stream whose `order:` rooms follow the document's owners.
    pub(crate) owners: Option<OwnerPaths>,
    /// The field a change with neither document nor memory is reported missing.
    pub(crate) missing: &'static str,
}

impl Spec {
    /// The spec of a `[[streams]]` declaration.
    pub(crate) fn declared(d: &StreamDecl) -> Self {
        let keyed: Vec<(RoomKind, &str)> = d.rooms.keyed().collect();
        Self {
            collection: d.collection.clone(),
            names: Names {
                created: d.events.created.as_str().into(),
                updated: d.events.updated.as_str().into(),
                replaced: d.events.replaced.as_str().into(),
                deleted: Some(d.events.deleted.as_str().into()),
                status_changed: d.events.status_changed.as_deref().map(Arc::from),
            },
            keys: keyed
                .iter()
                .map(|(kind, path)| Key {
                    label: kind.as_str(),
                    at: if *path == "_id" {
                        KeyAt::DocId
                    } else {
                        KeyAt::Paths(vec![(*path).to_owned()])
                    },
                })
                .collect(),
            rooms: keyed
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (*k, i))
                .collect(),
            admin: d.rooms.admin,
            allow: d.allow.clone(),
            tracked: d.tracked.clone(),
            status: d.status.as_ref().map(|s| StatusRule {
                field: s.field.clone(),
                type_field: s.type_field.clone(),
                table: Table::Declared(s.clone()),
            }),
            shape: Shape::Declared,
            owners: None,
            missing: keyed.first().map_or(RoomKind::Admin, |k| k.0).as_str(),
        }
    }
}

/// What one change produced.
#[derive(Debug)]
pub(crate) struct Mapped {
    /// The event; its deliveries may be empty when no room could be named.
    pub event: RoutedEvent,
    /// For an order: its id and whether the change deleted it, for the ownership cache
    /// (the owners as of this change are `event.owner`).
    pub order: Option<(String, bool)>,
}

/// One stream and its memory.
#[derive(Debug)]
struct Stream {
    spec: Spec,
    memo: MemoCache,
    /// The spec's allowlists compiled, per audience.
    plans: Arc<Plans>,
}

/// Each audience's allowlist, and as a [`Plan`], compiled once per stream; shared by
/// the payload recipes of its changes.
#[derive(Debug)]
struct Plans {
    plans: [Plan; 5],
    allow: [Vec<String>; 5],
}

impl Plans {
    const KINDS: [RoomKind; 5] = [
        RoomKind::Customer,
        RoomKind::Store,
        RoomKind::Order,
        RoomKind::Storefront,
        RoomKind::Admin,
    ];

    fn of(allow: &StreamAllow) -> Self {
        Self {
            plans: Self::KINDS.map(|k| Plan::new(allow.of(k).iter().map(String::as_str))),
            allow: Self::KINDS.map(|k| allow.of(k).to_vec()),
        }
    }

    fn at(kind: RoomKind) -> usize {
        Self::KINDS.iter().position(|k| *k == kind).unwrap_or(0)
    }

    fn plan(&self, kind: RoomKind) -> &Plan {
        &self.plans[Self::at(kind)]
    }

    fn allow(&self, kind: RoomKind) -> &[String] {
        &self.allow[Self::at(kind)]
    }
}

/// Every stream of a configuration, presets and declarations; one per mapper (so
/// per live stream and per oplog replay).
#[derive(Debug)]
pub(crate) struct Declared {
    streams: Vec<Stream>,
    cap: usize,
    book: Option<OwnerBookUse>,
}

impl Declared {
    /// The engine of a configuration: orders, payments and settings, then `[[streams]]`;
    /// each stream remembers at most `normalize.state_cache_docs` documents.
    pub(crate) fn for_config(cfg: &Config) -> Self {
        let specs = crate::presets::presets(cfg)
            .into_iter()
            .chain(cfg.streams.iter().map(Spec::declared));
        Self::from_specs(specs, cfg.normalize.state_cache_docs)
    }

    /// The engine of `decls` alone (no presets); each stream remembers at most `memo_docs` documents.
    #[cfg(test)]
    pub(crate) fn new(decls: &[StreamDecl], memo_docs: usize) -> Self {
        Self::from_specs(decls.iter().map(Spec::declared), memo_docs)
    }

    pub(crate) fn from_specs(specs: impl IntoIterator<Item = Spec>, memo_docs: usize) -> Self {
        Self {
            streams: specs
                .into_iter()
                .map(|spec| Stream {
                    plans: Arc::new(Plans::of(&spec.allow)),
                    spec,
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

    /// Forgets every remembered document (after a gap in the stream).
    pub(crate) fn forget(&mut self) {
        for s in &mut self.streams {
            s.memo = MemoCache::new(self.cap);
        }
    }

    /// Maps one change, numbered `id` by the caller. `None` when it is no event (an
    /// operation that changes no document, an unwatched collection, a delete of an
    /// unknown order or of settings, a settings change outside every section).
    /// Never panics, whatever the document holds.
    pub(crate) fn map(
        &mut self,
        change: &RawDocument,
        id: EventId,
        issues: &mut Vec<Issue>,
    ) -> Option<Mapped> {
        let op = operation(change, issues)?;
        let coll = raw_doc(change, "ns").and_then(|ns| raw_str(ns, "coll"));
        let Some(stream) =
            coll.and_then(|c| self.streams.iter_mut().find(|s| s.spec.collection == c))
        else {
            issues.push(Issue::UnknownCollection {
                collection: truncate(coll.unwrap_or("<missing>")),
            });
            return None;
        };
        stream.map(op, change, id, self.book.as_ref(), issues)
    }
}

#[cfg(test)]
impl Declared {
    /// [`Declared::map`] of an owned document (tests build their changes with `doc!`).
    pub(crate) fn map_doc(
        &mut self,
        change: &Document,
        id: EventId,
        issues: &mut Vec<Issue>,
    ) -> Option<Mapped> {
        let raw = RawDocumentBuf::from_document(change).expect("a test change encodes");
        self.map(&raw, id, issues)
    }
}

/// The keys of a document, read in place (a key that is not UTF-8 is left out).
fn keys_of(d: &RawDocument) -> impl Iterator<Item = &str> {
    bsonscan::elements(d.as_bytes()).filter_map(|e| e.key_str())
}

/// The change's operation, or why it is none the engine maps.
fn operation(change: &RawDocument, issues: &mut Vec<Issue>) -> Option<Op> {
    let issue = match bsonscan::get(change, "operationType") {
        Some(RawBsonRef::String(s)) => match s {
            "insert" => return Some(Op::Insert),
            "update" => return Some(Op::Update),
            "replace" => return Some(Op::Replace),
            "delete" => return Some(Op::Delete),
            other if UNHANDLED_OPS.contains(&other) => Issue::UnhandledOperation {
                op: other.to_owned(),
            },
            other => Issue::UnknownOperation {
                op: truncate(other),
            },
        },
        Some(other) => Issue::UnknownOperation {
            op: format!("<{}>", raw_type_name(other)),
        },
        None => Issue::UnknownOperation {
            op: "<missing>".into(),
        },
    };
    issues.push(issue);
    None
}

impl Stream {
    fn map(
        &mut self,
        op: Op,
        change: &RawDocument,
        id: EventId,
        book: Option<&OwnerBookUse>,
        issues: &mut Vec<Issue>,
    ) -> Option<Mapped> {
        let Self { spec, memo, plans } = self;
        let ChangeParts {
            ts_ms,
            full,
            pre,
            id: key,
            update,
        } = ChangeParts::of(change, op);
        let id_bson = key.filter(|b| !matches!(b, RawBsonRef::Null));
        let doc_id = match id_bson {
            None => {
                issues.push(Issue::MissingField { field: "_id" });
                None
            }
            Some(b) => match raw_id_string(b) {
                Ok(s) => Some(s),
                Err(found) => {
                    issues.push(Issue::WrongType {
                        field: "_id",
                        found,
                    });
                    None
                }
            },
        };
        if op == Op::Delete && spec.names.deleted.is_none() {
            // Deleting a settings document changes no section a client shows.
            if let Some(i) = &doc_id {
                memo.remove(i);
            }
            issues.push(Issue::UnhandledOperation {
                op: "delete".into(),
            });
            return None;
        }

        let (updated, removed): (Option<&RawDocument>, Vec<&str>) = match update {
            Some(u) if op == Op::Update => (
                raw_doc(u, "updatedFields"),
                bsonscan::find(u.as_bytes(), "removedFields")
                    .filter(|e| e.kind == bsonscan::kind::ARRAY)
                    .map(|a| {
                        bsonscan::elements(a.value)
                            .filter_map(|v| v.str())
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            _ => (None, Vec::new()),
        };
        let record = matches!(spec.shape, Shape::Record { .. });
        let changed: Vec<String> = match op {
            Op::Update => updated
                .into_iter()
                .flat_map(|d| keys_of(d).map(str::to_owned))
                .chain(removed.iter().map(|s| (*s).to_owned()))
                .collect(),
            // A replace carries no update description: to a record any field may have
            // changed, so every field of the new document counts.
            Op::Replace if record => full
                .into_iter()
                .flat_map(keys_of)
                .filter(|k| *k != "_id")
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let source = if op == Op::Delete { pre } else { full };
        let consulted: Option<Memo>;
        let remembered: Option<&Memo> = match doc_id.as_deref() {
            None => None,
            Some(i) => match memo.get(i) {
                Some(m) => Some(m),
                None => {
                    consulted = match book {
                        Some(OwnerBookUse::Consult(b)) => b.rooms(&spec.collection, i),
                        _ => None,
                    };
                    consulted.as_ref()
                }
            },
        };

        // Room ids: from the document, else (a delete without pre-image, a lookup that
        // found nothing) from memory; the document's own id is always known.
        let mut keys: Vec<Option<String>> = Vec::with_capacity(spec.keys.len());
        let mut owner_unknown = false;
        for (i, k) in spec.keys.iter().enumerate() {
            let v = match (&k.at, source) {
                (KeyAt::DocId, _) => doc_id.clone(),
                (KeyAt::Paths(paths), Some(doc)) => match raw_lookup_id(doc, paths) {
                    Lookup::Found(s) => Some(s),
                    Lookup::Missing => {
                        issues.push(Issue::MissingField { field: k.label });
                        None
                    }
                    Lookup::WrongType(found) => {
                        issues.push(Issue::WrongType {
                            field: k.label,
                            found,
                        });
                        None
                    }
                },
                (KeyAt::Paths(_), None) => match remembered.and_then(|m| m.keys.get(i)) {
                    Some(known) => known.clone(),
                    None => {
                        owner_unknown = true;
                        None
                    }
                },
            };
            keys.push(v);
        }
        if owner_unknown && op == Op::Delete {
            issues.push(Issue::NoOwnerForDelete);
            if record {
                if let Some(i) = &doc_id {
                    memo.remove(i);
                }
                return None;
            }
        } else if owner_unknown {
            issues.push(Issue::MissingField {
                field: spec.missing,
            });
        }

        // Tracked values: (old, new), `None` = unknown, `Some(Null)` = absent.
        let tracked: Vec<(Option<Bson>, Option<Bson>)> = spec
            .tracked
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let new = match op {
                    Op::Delete => Some(Bson::Null),
                    // The update's own value first: the looked-up document may be newer.
                    Op::Update if removed.iter().any(|r| touches(r, path)) => Some(Bson::Null),
                    _ => updated
                        .and_then(|u| bsonscan::get(u, path).map(to_bson))
                        .or_else(|| full.map(|d| raw_path(d, path).map_or(Bson::Null, to_bson))),
                };
                let before = || {
                    pre.map(|p| raw_path(p, path).map_or(Bson::Null, to_bson))
                        .or_else(|| remembered.and_then(|m| m.tracked.get(i).cloned().flatten()))
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

        let status = spec.status.as_ref().map(|st| {
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
                remembered.map(|m| (m.status.as_deref(), m.kind.as_deref())),
                |raw, kind| st.table.canonical(raw, kind),
            );
            if let Some(found) = read.wrong_type {
                issues.push(Issue::WrongType {
                    field: "status",
                    found,
                });
            }
            if let Some(info) = read.info.as_ref().filter(|i| i.unknown) {
                issues.push(Issue::UnknownStatus {
                    value: truncate(&info.raw),
                });
            }
            read
        });
        let status_moved = status.as_ref().is_some_and(|s| s.touched);

        if let Some(i) = doc_id.as_deref().filter(|i| i.len() <= MAX_KEPT_LEN) {
            if let (Some(OwnerBookUse::Record(b)), true) = (book, op != Op::Delete) {
                b.record(&spec.collection, i, &keys);
            }
            if op == Op::Delete {
                memo.remove(i);
            } else {
                fn short<'s>(v: &'s Option<Cow<'_, str>>) -> Option<&'s str> {
                    v.as_deref().filter(|s| s.len() <= MAX_KEPT_LEN)
                }
                memo.write(i, |m| {
                    fill_keys(&mut m.keys, &keys);
                    m.tracked.clear();
                    m.tracked.extend(
                        tracked
                            .iter()
                            .map(|(_, new)| new.clone().filter(rememberable)),
                    );
                    assign(&mut m.status, status.as_ref().and_then(|s| short(&s.raw)));
                    assign(&mut m.kind, status.as_ref().and_then(|s| short(&s.kind)));
                });
            }
        }

        let owner = spec.owners.as_ref().and_then(|o| {
            let doc = source.filter(|d| !d.is_empty())?;
            Some(Arc::new(extract_owner(doc, &o.customer, &o.store)))
        });
        let order_key = spec
            .rooms
            .iter()
            .find(|(k, _)| *k == RoomKind::Order)
            .and_then(|(_, i)| keys.get(*i)?.as_deref());
        let order = order_key
            .filter(|_| spec.owners.is_some())
            .map(|o| (o.to_owned(), op == Op::Delete));

        let names = &spec.names;
        let name = match (op, names.status_changed.as_ref(), &names.deleted) {
            (Op::Update | Op::Replace, Some(moved), _) if status_moved => moved,
            (Op::Insert, ..) => &names.created,
            (Op::Update, ..) => &names.updated,
            (Op::Replace, ..) => &names.replaced,
            (Op::Delete, _, Some(deleted)) => deleted,
            (Op::Delete, _, None) => return None,
        };
        // Shared by the audiences' payload recipes.
        let status_info = status.and_then(|s: StatusRead| s.info).map(Arc::new);
        let empty = RawDocumentBuf::new();
        let deliveries = match &spec.shape {
            Shape::Settings(sections) => {
                let store = keys.first().and_then(Option::as_deref);
                let touched = settings_sections(sections, op, &changed, full, pre);
                if touched.is_empty() {
                    return None;
                }
                settings_deliveries(spec, &touched, &keys, store, full.unwrap_or(&empty), issues)
            }
            Shape::Record { payment } => {
                let extras = Extras {
                    order: order_key.map(Box::from),
                    payment: payment
                        .then_some(doc_id.as_deref())
                        .flatten()
                        .map(Box::from),
                    status: status_info.clone(),
                    progress: !payment,
                    tracked: None,
                };
                let plain = matches!(op, Op::Update | Op::Replace) && !status_moved;
                deliveries(
                    spec,
                    plans,
                    &keys,
                    source.unwrap_or(&empty),
                    changed,
                    plain,
                    extras,
                    |_| None,
                    issues,
                )
            }
            Shape::Declared => {
                // Deletes without a pre-image still show their `_id` to audiences allowed to see it.
                let doc = match source {
                    Some(d) => Cow::Borrowed(d),
                    None => {
                        let mut d = RawDocumentBuf::new();
                        if let Some(b) = id_bson {
                            d.append("_id", b.to_raw_bson());
                        }
                        Cow::Owned(d)
                    }
                };
                let status_field = spec.status.as_ref().map(|s| s.field.as_str());
                deliveries(
                    spec,
                    plans,
                    &keys,
                    &doc,
                    changed,
                    op == Op::Update,
                    Extras::default(),
                    |allow| {
                        let shows =
                            |path: &str| allow.iter().any(|a| a == path || is_under(path, a));
                        let mut tracked_out = Map::new();
                        for (path, (old, new)) in spec.tracked.iter().zip(&tracked) {
                            // A tracked field reaches only the audiences whose allowlist shows it.
                            if shows(path) {
                                tracked_out.insert(
                                    path.clone(),
                                    tracked_value(old.as_ref(), new.as_ref()),
                                );
                            }
                        }
                        Some(Extras {
                            order: None,
                            payment: None,
                            // Like a tracked field, the status reaches only the audiences that may see it.
                            status: status_info
                                .as_ref()
                                .filter(|_| status_field.is_some_and(shows))
                                .cloned(),
                            progress: false,
                            tracked: (!tracked_out.is_empty()).then(|| Value::Object(tracked_out)),
                        })
                    },
                    issues,
                )
            }
        };
        Some(Mapped {
            event: RoutedEvent {
                event: Event {
                    id,
                    name: name.clone(),
                    ts_ms,
                },
                deliveries,
                // Only orders re-check ownership per change; a declared stream's `order:`
                // rooms work as a payment's do (whoever owns the order may be in the room).
                owner,
                database: None,
            },
            order,
        })
    }
}

/// What a payload carries besides the projection; its fields override document fields
/// of the same name. Kept with the change's payload recipes (see [`Recipes`]).
#[derive(Default)]
struct Extras {
    order: Option<Box<str>>,
    payment: Option<Box<str>>,
    status: Option<Arc<crate::event::StatusInfo>>,
    progress: bool,
    /// A declared stream's `tracked` object.
    tracked: Option<Value>,
}

impl Extras {
    /// The top-level keys these fields take (and `changedFields` when `changes`).
    fn keys(&self, changes: bool) -> impl Iterator<Item = &'static str> + '_ {
        let status = self.status.as_ref().map_or(&[][..], |_| {
            if self.progress {
                &STATUS_KEYS[..]
            } else {
                &STATUS_KEYS[..STATUS_KEYS.len() - 1]
            }
        });
        self.order
            .as_ref()
            .map(|_| "orderId")
            .into_iter()
            .chain(self.payment.as_ref().map(|_| "paymentId"))
            .chain(status.iter().copied())
            .chain(self.tracked.as_ref().map(|_| TRACKED_KEY))
            .chain(changes.then_some("changedFields"))
    }

    fn write(&self, data: &mut Obj) {
        if let Some(order) = &self.order {
            data.str("orderId", order);
        }
        if let Some(id) = &self.payment {
            data.str("paymentId", id);
        }
        if let Some(st) = &self.status {
            write_status(data, st, self.progress);
        }
        if let Some(t) = &self.tracked {
            data.value(TRACKED_KEY, t);
        }
    }
}

/// One payload per room of `keys` (and admin): the allowlisted projection of `doc`,
/// what `extras` add (an audience's `own` when it returns some), and the changed paths
/// the audience may know of. With `skip_unseen`, an audience none of whose fields
/// changed is not sent the event. Payloads are written when first read, from one
/// [`Recipes`] per change.
#[allow(clippy::too_many_arguments)]
fn deliveries(
    spec: &Spec,
    plans: &Arc<Plans>,
    keys: &[Option<String>],
    doc: &RawDocument,
    changed: Vec<String>,
    skip_unseen: bool,
    extras: Extras,
    own: impl Fn(&[String]) -> Option<Extras>,
    issues: &mut Vec<Issue>,
) -> Vec<Delivery> {
    let targets = spec
        .rooms
        .iter()
        .filter_map(|(kind, i)| Some((*kind, keys.get(*i)?.as_deref()?)))
        .chain(spec.admin.then_some((RoomKind::Admin, "")));
    // Audiences with the same allowlist get the same payload (by default the customer
    // and `order:` rooms, and the store and admin): written once, shared after.
    let mut audiences: SmallVec<[(RoomKind, Option<Extras>); 3]> = SmallVec::new();
    let mut rooms: SmallVec<[(Room, usize); 5]> = SmallVec::new();
    for (kind, key) in targets {
        let Ok(room) = Room::new(kind, key) else {
            issues.push(Issue::InvalidRoomId { kind });
            continue;
        };
        let allow = spec.allow.of(kind);
        if let Some(i) = audiences
            .iter()
            .position(|(k, _)| spec.allow.of(*k) == allow)
        {
            rooms.push((room, i));
            continue;
        }
        // Updates that touch nothing an audience may see are not news to it.
        if skip_unseen && !any_visible(&changed, allow) {
            continue;
        }
        rooms.push((room, audiences.len()));
        audiences.push((kind, own(allow)));
    }
    if rooms.is_empty() {
        return Vec::new();
    }
    let n = audiences.len();
    let source: Arc<dyn Source> = Arc::new(Recipes {
        // One copy of the document's bytes per change, shared by its audiences.
        bytes: doc.as_bytes().into(),
        changed: (!changed.is_empty()).then_some(changed),
        plans: plans.clone(),
        extras,
        audiences,
    });
    let payloads: SmallVec<[Payload; 3]> =
        (0..n).map(|i| Payload::later(source.clone(), i)).collect();
    rooms
        .into_iter()
        .map(|(room, i)| Delivery {
            room,
            data: payloads[i].clone(),
        })
        .collect()
}

/// The makings of one change's payloads, shared by them and kept until the change's
/// last payload goes: the document's bytes (copied once per change), the changed
/// paths, the stream's plans, and per audience its room kind and, when it differs from
/// the change's, what it adds. One allocation per change (with the bytes and the
/// changed paths), where a boxed recipe per audience, each with its own list of
/// visible changes and its own extras, was before.
struct Recipes {
    bytes: Box<[u8]>,
    /// The change's changed paths; `None` when it lists none (no `changedFields`).
    changed: Option<Vec<String>>,
    plans: Arc<Plans>,
    extras: Extras,
    audiences: SmallVec<[(RoomKind, Option<Extras>); 3]>,
}

impl Source for Recipes {
    fn write(&self, at: usize) -> Written {
        // The JSON of a projection is about the size of the document's BSON or less;
        // the slack covers the extras and changed paths. Cut to size when finished.
        let mut data = Obj::with_capacity(self.bytes.len() + 256);
        let Some((kind, own)) = self.audiences.get(at) else {
            return data.written();
        };
        let extras = own.as_ref().unwrap_or(&self.extras);
        let visible = self
            .changed
            .as_ref()
            .map(|c| visible_changes(c, self.plans.allow(*kind)));
        let skip: SmallVec<[&str; 8]> = extras.keys(visible.is_some()).collect();
        // The bytes were a document when copied: read again, they still are.
        if let Ok(doc) = RawDocument::from_bytes(&self.bytes) {
            data.project(doc, self.plans.plan(*kind), &skip);
        }
        extras.write(&mut data);
        if let Some(visible) = &visible {
            data.strs("changedFields", visible.iter().copied());
        }
        data.written()
    }
}

/// The settings sections a change touches, with the fields of each it changed.
fn settings_sections<'a>(
    sections: &'a [SettingsSection],
    op: Op,
    changed: &[String],
    full: Option<&RawDocument>,
    pre: Option<&RawDocument>,
) -> Vec<(&'a SettingsSection, Vec<&'a str>)> {
    sections
        .iter()
        .filter_map(|sec| {
            let fields: Vec<&str> = sec
                .fields
                .iter()
                .filter(|f| match op {
                    Op::Update => changed.iter().any(|c| touches(c, f)),
                    // Insert/replace: with a pre-image only the fields that differ; else all present.
                    _ => {
                        let now = full.and_then(|d| raw_path(d, f));
                        match pre.filter(|_| op == Op::Replace) {
                            Some(pre) => raw_path(pre, f) != now,
                            None => now.is_some(),
                        }
                    }
                })
                .map(String::as_str)
                .collect();
            (!fields.is_empty()).then_some((sec, fields))
        })
        .collect()
}

/// Settings payloads: `store:` and admin get every touched section, `storefront:` the
/// public ones only (publicity from the spec, never from the document).
fn settings_deliveries(
    spec: &Spec,
    touched: &[(&SettingsSection, Vec<&str>)],
    keys: &[Option<String>],
    store: Option<&str>,
    doc: &RawDocument,
    issues: &mut Vec<Issue>,
) -> Vec<Delivery> {
    let targets = spec
        .rooms
        .iter()
        .map(|(kind, i)| (*kind, keys.get(*i).and_then(Option::as_deref)))
        .chain(spec.admin.then_some((RoomKind::Admin, Some(""))));
    let mut out = Vec::new();
    for (kind, key) in targets {
        let Some(key) = key else { continue };
        let public = kind == RoomKind::Storefront;
        let shown = || touched.iter().filter(move |(d, _)| !public || d.public);
        if shown().next().is_none() {
            continue;
        }
        let Ok(room) = Room::new(kind, key) else {
            issues.push(Issue::InvalidRoomId { kind });
            continue;
        };
        let plan = Plan::new(shown().flat_map(|(d, _)| d.fields.iter().map(String::as_str)));
        let mut data = Obj::new();
        let skip: &[&str] = if store.is_some() {
            &["storeId", "sections", "changedFields"]
        } else {
            &["sections", "changedFields"]
        };
        data.project(doc, &plan, skip);
        if let Some(s) = store {
            data.str("storeId", s);
        }
        data.strs("sections", shown().map(|(d, _)| d.name.as_str()));
        // Only the configured field names of visible sections, never the raw paths.
        data.strs(
            "changedFields",
            shown().flat_map(|(_, changed)| changed.iter().copied()),
        );
        out.push(Delivery {
            room,
            data: data.finish(),
        });
    }
    out
}

/// The document fields a declaration relies on, as (key in the declaration, path): its
/// rooms' fields (`"_id"` always exists, so it is left out) and its status field.
pub(crate) fn relied_on(decl: &StreamDecl) -> impl Iterator<Item = (&'static str, &str)> {
    decl.rooms
        .keyed()
        .filter(|(_, path)| *path != "_id")
        .map(|(kind, path)| (room_key(kind), path))
        .chain(
            decl.status
                .as_ref()
                .map(|s| ("status.field", s.field.as_str())),
        )
}

fn room_key(kind: RoomKind) -> &'static str {
    match kind {
        RoomKind::Customer => "rooms.customer",
        RoomKind::Store => "rooms.store",
        RoomKind::Order => "rooms.order",
        RoomKind::Storefront => "rooms.storefront",
        RoomKind::Admin => "rooms.admin",
    }
}

/// The fields a declaration relies on ([`relied_on`]) that no sampled document holds:
/// a typo in `[streams.rooms]` would route nothing there, one in `[streams.status]`
/// would make every change a plain update, silently. An empty sample says nothing.
pub(crate) fn unsampled_fields<'a>(
    decl: &'a StreamDecl,
    sample: &[Document],
) -> Vec<(&'static str, &'a str)> {
    if sample.is_empty() {
        return Vec::new();
    }
    relied_on(decl)
        .filter(|(_, path)| {
            !sample
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
    use bson::doc;
    use serde_json::json;

    #[test]
    fn the_owner_books_key_is_the_collection_a_nul_and_the_id_at_any_length() {
        for (coll, id) in [("orders", "o1"), ("é", "x"), ("c", &*"i".repeat(600))] {
            let key = OwnerBook::with_key(coll, id, str::to_owned);
            assert_eq!(key, format!("{coll}\u{0}{id}"));
        }
        let book = OwnerBook::new(4);
        book.record("orders", "o1", &[Some("c1".into()), None]);
        book.record("orders", "o1", &[Some("c2".into()), Some("s".repeat(200))]);
        let m = book.rooms("orders", "o1").unwrap();
        // Rewritten in place; ids too long to be room ids are not kept.
        assert_eq!(m.keys, [Some("c2".to_owned()), None]);
        assert!(book.rooms("other", "o1").is_none());
    }

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
        let r = e.map_doc(d, EventId::new("x"), &mut issues).unwrap().event;
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
        assert_eq!(&*r.event.name, "balance:created");
        assert_eq!(rooms(&r), ["customer:u1", "admin"]);
        assert_eq!(
            r.deliveries[0].data.value(),
            json!({"_id": "u1", "balance": 10, "tracked": {"balance": {"old": null, "new": 10, "delta": null, "known": true}}})
        );
        assert_eq!(r.deliveries[1].data.value()["email"], "a@b");

        let upd = update(
            "users",
            "u1",
            doc! {"_id": "u1", "balance": 25},
            doc! {"balance": 25},
        );
        let r = run(&mut e, &upd);
        assert_eq!(&*r.event.name, "balance:updated");
        assert_eq!(
            r.deliveries[0].data.value()["tracked"]["balance"],
            json!({"old": 10, "new": 25, "delta": 15, "known": true})
        );
        assert_eq!(
            r.deliveries[0].data.value()["changedFields"],
            json!(["balance"])
        );

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
            r.deliveries[0].data.value()["tracked"]["balance"],
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
            r.deliveries[0].data.value()["tracked"]["balance"],
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
            r.deliveries[0].data.value()["tracked"]["balance"],
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
        assert_eq!(&*r.event.name, "delivery:created");
        assert_eq!(rooms(&r), ["customer:c1", "store:s1"]);
        assert_eq!(r.deliveries[0].data.value(), json!({"status": "scheduled"}));
        assert_eq!(
            r.deliveries[1].data.value(),
            json!({"status": "scheduled", "notes": "gate code 12"})
        );

        // No pre-image: the rooms come from what the stream saw.
        let del = change("delete", "deliveries", Bson::String("d1".into()), None);
        let r = run(&mut e, &del);
        assert_eq!(&*r.event.name, "delivery:deleted");
        assert_eq!(rooms(&r), ["customer:c1", "store:s1"]);
        // Forgotten after the delete: a second delete has no owner.
        let mut issues = Vec::new();
        let r = e
            .map_doc(&del, EventId::new("y"), &mut issues)
            .unwrap()
            .event;
        assert!(r.deliveries.is_empty());
        assert_eq!(issues, [Issue::NoOwnerForDelete]);
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
            unsampled_fields(deliveries, &sample),
            [("rooms.store", "storeId")]
        );
        assert!(unsampled_fields(deliveries, &[]).is_empty());
        // "_id" needs no sample.
        assert!(unsampled_fields(&c.streams[0], &[doc! {}]).is_empty());
        // The status field is relied on too.
        let c = crate::config::test_config(WITH_STATUS, "t").unwrap();
        let sample = [doc! {"customerId": "c1", "storeId": "s1", "status": "x"}];
        assert_eq!(
            unsampled_fields(&c.streams[0], &sample),
            [("status.field", "state")]
        );
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
            r.deliveries[0].data.value()["tracked"]["balance"],
            json!({"old": 7, "new": 7, "delta": 0, "known": true})
        );
        let upd = update(
            "users",
            "u1",
            doc! {"_id": "u1", "balance": 9},
            doc! {"balance": 9},
        );
        let r = run(&mut e, &upd);
        assert_eq!(r.deliveries[0].data.value()["tracked"]["balance"]["old"], 7);
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
        assert_eq!(&*r.event.name, "delivery:created");
        // The customer may not see `state`: no status for them, as for a tracked field.
        assert_eq!(r.deliveries[0].data.value(), json!({"_id": "d1"}));
        assert_eq!(
            r.deliveries[1].data.value(),
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
        assert_eq!(&*r.event.name, "delivery:status_changed");
        assert_eq!(rooms(&r), ["store:s1"]);
        let d = &r.deliveries[0].data.value();
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
        assert_eq!(&*r.event.name, "delivery:updated");
        assert_eq!(
            r.deliveries[0].data.value()["previousStatus"],
            "ready_for_pickup"
        );

        // A replace that changes the raw value is a status change too.
        let rep = change(
            "replace",
            "deliveries",
            Bson::String("d1".into()),
            Some(delivery("d1", "dropped_off", "delivery")),
        );
        let r = run(&mut e, &rep);
        assert_eq!(&*r.event.name, "delivery:status_changed");
        assert_eq!(r.deliveries[1].data.value()["status"], "delivered");
        let r = run(&mut e, &rep);
        assert_eq!(&*r.event.name, "delivery:replaced");
    }

    #[test]
    fn aliases_may_filter_on_a_declared_streams_statuses() {
        let alias = |statuses: &str| {
            format!(
                "{WITH_STATUS}\n[[socketio.aliases]]\nevent = \"delivery:status_changed\"\nname = \"deliveryReady\"\nrooms = [\"store\"]\nstatuses = {statuses}\n"
            )
        };
        let c = crate::config::test_config(&alias(r#"["ready_for_pickup", "delivered"]"#), "t")
            .unwrap();
        assert_eq!(
            c.socketio.aliases[0].statuses.as_deref(),
            Some(&["ready_for_pickup".to_owned(), "delivered".to_owned()][..])
        );
        // Not one of this stream's targets (an order status is not enough).
        let err = crate::config::test_config(&alias(r#"["in_transit"]"#), "t").unwrap_err();
        assert!(
            err.to_string().contains("not a status of the stream"),
            "{err}"
        );
        // A stream without a status table has no statuses at all.
        let text = format!(
            "{USERS}\n[[socketio.aliases]]\nevent = \"delivery:updated\"\nname = \"d\"\nrooms = [\"store\"]\nstatuses = [\"pending\"]\n"
        );
        let err = crate::config::test_config(&text, "t").unwrap_err();
        assert!(err.to_string().contains("no status table"), "{err}");
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
        let r = e
            .map_doc(&ins, EventId::new("x"), &mut issues)
            .unwrap()
            .event;
        assert_eq!(
            issues,
            [Issue::UnknownStatus {
                value: "Lost".into()
            }]
        );
        let d = &r.deliveries[1].data.value();
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
        let r = e
            .map_doc(&ins, EventId::new("y"), &mut issues)
            .unwrap()
            .event;
        assert_eq!(
            issues,
            [Issue::WrongType {
                field: "status",
                found: "int"
            }]
        );
        assert!(r.deliveries[1].data.value().get("status").is_none());
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
        assert_eq!(&*r.event.name, "delivery:updated");
        assert_eq!(
            r.deliveries[0].data.value(),
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
