//! The built-in normalizer as it was before orders, payments and settings became presets of the declared-stream engine: kept only as the test oracle the presets are compared with (`former::prop`).
//!
//! Verbatim but for its imports: the Document-based helpers it used (`ChangeParts`,
//! `read_status`, ids at paths) are kept beside it (`shared`), as they were before the
//! engine read changes in place.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bson::{Bson, Document};

use super::shared::{
    id_string, lookup_id, read_status, type_name, ChangeParts, ChangeView, StatusRead,
};
use crate::config::{Collections, Config, FieldPaths, SettingsSection};
use crate::docpath::{get_path, touches, Lookup};
use crate::event::{EventId, StatusInfo};
use crate::normalize::{truncate, Op, UNHANDLED_OPS};
use crate::status::StatusTable;

/// Longest string kept in the state cache or copied into an [`Issue`]; longer
/// values cannot be valid room ids anyway and must not grow memory without bound.
const MAX_KEPT_LEN: usize = 128;

/// Which watched collection a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CollectionKind {
    /// `mongodb.collections.orders`
    Orders,
    /// `mongodb.collections.payments`
    Payments,
    /// `mongodb.collections.settings`
    Settings,
}

impl CollectionKind {
    /// A short label for metrics and logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Payments => "payments",
            Self::Settings => "settings",
        }
    }
}

/// Canonical event names produced by normalization (plus `system:resync`, sent by the pipeline).
///
/// `payment:deleted` exists alongside `order:deleted` so that removing a
/// payment is not silently lost; like every delete it is routed only when
/// the owners are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum EventName {
    /// An order was inserted.
    OrderCreated,
    /// An order's status field changed.
    OrderStatusChanged,
    /// Another change to an order.
    OrderUpdated,
    /// An order was deleted.
    OrderDeleted,
    /// A payment was inserted.
    PaymentCreated,
    /// A payment's status field changed.
    PaymentStatusChanged,
    /// Another change to a payment.
    PaymentUpdated,
    /// A payment was deleted.
    PaymentDeleted,
    /// One or more settings sections changed.
    SettingsUpdated,
    /// A room's history has a hole; clients must refetch (sent by the pipeline, never by normalization).
    SystemResync,
}

impl EventName {
    /// The wire name, e.g. `order:status_changed`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::OrderCreated => "order:created",
            Self::OrderStatusChanged => "order:status_changed",
            Self::OrderUpdated => "order:updated",
            Self::OrderDeleted => "order:deleted",
            Self::PaymentCreated => "payment:created",
            Self::PaymentStatusChanged => "payment:status_changed",
            Self::PaymentUpdated => "payment:updated",
            Self::PaymentDeleted => "payment:deleted",
            Self::SettingsUpdated => "settings:updated",
            Self::SystemResync => "system:resync",
        }
    }
}

/// The ids that decide rooms, read from the document at the configured paths
/// (or from the remembered state for deletes without a pre-image).
/// `None` means absent or unusable; normalization has already reported why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RouteKeys {
    /// `customer:{id}` (orders, payments).
    pub(crate) customer: Option<String>,
    /// `store:{id}` (all collections; settings also `storefront:{id}`).
    pub(crate) store: Option<String>,
    /// `order:{id}`: the order's `_id` for orders, the order id field for payments.
    pub(crate) order: Option<String>,
}

/// One settings section touched by a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SectionChange {
    /// Section name from `[routing.settings]`.
    pub(crate) name: String,
    /// Whether the section may reach `storefront:{id}`.
    pub(crate) public: bool,
    /// The section's fields (as configured) that changed.
    pub(crate) changed_fields: Vec<String>,
    /// All the section's configured fields, so routing can project them.
    pub(crate) fields: Vec<String>,
}

/// A named event derived from one change, before routing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DomainEvent {
    /// The change's id: its resume token here; the mapper replaces it with the
    /// stream-ordered id (`sequence`).
    pub(crate) id: EventId,
    /// Canonical name.
    pub(crate) name: EventName,
    /// Commit time, Unix ms: `wallTime` if present, else `clusterTime` seconds × 1000, else 0.
    pub(crate) ts_ms: i64,
    /// Source collection.
    pub(crate) collection: CollectionKind,
    /// The document's `_id` as a string (ObjectId as hex), when usable.
    pub(crate) doc_id: Option<String>,
    /// The document the payload is projected from: `fullDocument`, or for a
    /// delete its pre-image; empty when neither was sent. Never sent as is.
    pub(crate) document: Document,
    /// Status (orders and payments), when the document has one.
    pub(crate) status: Option<StatusInfo>,
    /// Room ids.
    pub(crate) keys: RouteKeys,
    /// Paths from `updateDescription` (updated, then removed) for updates; the new
    /// document's top-level fields for replaces; empty otherwise.
    pub(crate) changed_fields: Vec<String>,
    /// Settings sections touched (settings only, never empty for `settings:updated`).
    pub(crate) sections: Vec<SectionChange>,
}

/// Something in a change that could not be used; counted and logged by the caller.
/// Carried strings are truncated to 128 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Issue {
    /// The change has no usable `_id._data` resume token; the change is dropped.
    MissingEventId,
    /// `operationType` is missing or not one MongoDB documents.
    UnknownOperation {
        /// The value, or `<missing>`.
        op: String,
    },
    /// A valid operation changecast does not turn into events (`drop`, `rename`,
    /// `invalidate`, DDL, or a settings `delete`).
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
        /// Source collection.
        collection: CollectionKind,
        /// Which key (`customer`, `store`, `order_id`, `_id`, `status`).
        field: &'static str,
    },
    /// A field has a type that cannot be used (e.g. an id that is an array).
    WrongType {
        /// Source collection.
        collection: CollectionKind,
        /// Which key.
        field: &'static str,
        /// The BSON type found, e.g. `array`.
        found: &'static str,
    },
    /// A status value not in the table; passed through with `unknown: true`.
    UnknownStatus {
        /// Source collection.
        collection: CollectionKind,
        /// The raw value.
        value: String,
    },
    /// A delete whose owners are unknown (no pre-image, not seen before); dropped.
    NoOwnerForDelete {
        /// Source collection.
        collection: CollectionKind,
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
            Issue::NoOwnerForDelete { .. } => "no_owner_for_delete",
        }
    }
}

/// What one change produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Normalized {
    /// Zero or one event today (one per change keeps "one id, one event" for recovery).
    pub(crate) events: Vec<DomainEvent>,
    /// Problems found, in the order met.
    pub(crate) issues: Vec<Issue>,
}

/// Last state seen of one document.
#[derive(Debug, Clone, Default)]
struct DocState {
    raw_status: Option<String>,
    order_type: Option<String>,
    keys: RouteKeys,
}

/// Bounded map of document → last state; evicts the least recently written.
///
/// Bound: `cap` entries (each a few short strings, ~200 bytes), plus an
/// insertion queue compacted when it exceeds twice that.
#[derive(Debug)]
struct StateCache {
    cap: usize,
    gen: u64,
    map: HashMap<(CollectionKind, String), (u64, DocState)>,
    order: VecDeque<(u64, (CollectionKind, String))>,
}

impl StateCache {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            gen: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, kind: CollectionKind, id: &str) -> Option<&DocState> {
        self.map.get(&(kind, id.to_owned())).map(|(_, s)| s)
    }

    fn put(&mut self, kind: CollectionKind, id: &str, st: DocState) {
        if self.cap == 0 || id.len() > MAX_KEPT_LEN {
            return;
        }
        self.gen += 1;
        let key = (kind, id.to_owned());
        self.map.insert(key.clone(), (self.gen, st));
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

    fn remove(&mut self, kind: CollectionKind, id: &str) {
        self.map.remove(&(kind, id.to_owned()));
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Owners (route keys) of the documents the live stream has seen, kept after their
/// deletion, shared with oplog replays.
///
/// A replay starts at a client's `since`, so a change to a document written before
/// that point and deleted since (the lookup finds nothing, no pre-image) would have
/// no owner there and be dropped — a silent gap the live clients never had.
/// Bound: `normalize.state_cache_docs` entries (~150 bytes each), least recently
/// written evicted first.
#[derive(Debug)]
pub(crate) struct OwnerBook {
    owners: Mutex<StateCache>,
}

impl OwnerBook {
    /// A book of at most `cap` documents (0 disables it).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            owners: Mutex::new(StateCache::new(cap)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateCache> {
        // A cache update cannot be left half-done in a way worse than losing it.
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, kind: CollectionKind, id: &str, keys: &RouteKeys) {
        let st = DocState {
            keys: keys.clone(),
            ..DocState::default()
        };
        self.lock().put(kind, id, st);
    }

    fn owners(&self, kind: CollectionKind, id: &str) -> Option<RouteKeys> {
        self.lock().get(kind, id).map(|s| s.keys.clone())
    }
}

/// How a normalizer uses an [`OwnerBook`].
#[derive(Debug, Clone)]
pub(crate) enum OwnerBookUse {
    /// The live stream: records every document's owners.
    Record(Arc<OwnerBook>),
    /// An oplog replay: falls back to the book for documents it has not seen itself.
    Consult(Arc<OwnerBook>),
}

/// Turns change events into domain events. Deterministic; its only state is the bounded last-seen cache.
#[derive(Debug)]
pub(crate) struct Normalizer {
    fields: FieldPaths,
    status: StatusTable,
    collections: Collections,
    sections: Vec<SettingsSection>,
    cache: StateCache,
    book: Option<OwnerBookUse>,
}

/// A value worth remembering: too long a value is forgotten, never cut, because
/// a cut id would be a different, possibly valid, room id.
fn keep(s: &str) -> Option<String> {
    (s.len() <= MAX_KEPT_LEN).then(|| s.to_owned())
}

impl Normalizer {
    /// Builds a normalizer from the whole configuration.
    pub(crate) fn new(cfg: &Config) -> Self {
        Self::from_parts(
            cfg.fields.clone(),
            cfg.status.clone(),
            cfg.mongo.collections.clone(),
            cfg.routing.settings_sections.clone(),
            cfg.normalize.state_cache_docs,
        )
    }

    /// Builds a normalizer from its pieces; `state_cache_docs` bounds the last-seen map (0 disables it).
    pub(crate) fn from_parts(
        fields: FieldPaths,
        status: StatusTable,
        collections: Collections,
        sections: Vec<SettingsSection>,
        state_cache_docs: usize,
    ) -> Self {
        Self {
            fields,
            status,
            collections,
            sections,
            cache: StateCache::new(state_cache_docs),
            book: None,
        }
    }

    /// Records owners in, or consults, a shared [`OwnerBook`].
    pub(crate) fn with_owner_book(mut self, book: OwnerBookUse) -> Self {
        self.book = Some(book);
        self
    }

    fn remember(&mut self, kind: CollectionKind, id: &str, st: DocState) {
        if let Some(OwnerBookUse::Record(book)) = &self.book {
            book.record(kind, id, &st.keys);
        }
        self.cache.put(kind, id, st);
    }

    /// Documents currently remembered (bounded by `normalize.state_cache_docs`).
    pub(crate) fn remembered(&self) -> usize {
        self.cache.len()
    }

    /// Normalizes one raw change event. Never panics, whatever the document holds.
    pub(crate) fn normalize(&mut self, change: &Document) -> Normalized {
        let mut out = Normalized::default();
        let ev = self.normalize_inner(change, &mut out.issues);
        out.events.extend(ev);
        out
    }

    fn normalize_inner(
        &mut self,
        change: &Document,
        issues: &mut Vec<Issue>,
    ) -> Option<DomainEvent> {
        let id = match change.get("_id") {
            Some(Bson::Document(t)) => match t.get("_data") {
                Some(Bson::String(s)) if !s.is_empty() => EventId::new(s.as_str()),
                _ => {
                    issues.push(Issue::MissingEventId);
                    return None;
                }
            },
            _ => {
                issues.push(Issue::MissingEventId);
                return None;
            }
        };

        let op = match change.get("operationType") {
            Some(Bson::String(s)) => match s.as_str() {
                "insert" => Op::Insert,
                "update" => Op::Update,
                "replace" => Op::Replace,
                "delete" => Op::Delete,
                other if UNHANDLED_OPS.contains(&other) => {
                    issues.push(Issue::UnhandledOperation {
                        op: other.to_owned(),
                    });
                    return None;
                }
                other => {
                    issues.push(Issue::UnknownOperation {
                        op: truncate(other),
                    });
                    return None;
                }
            },
            Some(other) => {
                issues.push(Issue::UnknownOperation {
                    op: format!("<{}>", type_name(other)),
                });
                return None;
            }
            None => {
                issues.push(Issue::UnknownOperation {
                    op: "<missing>".into(),
                });
                return None;
            }
        };

        let coll_name = match change.get("ns") {
            Some(Bson::Document(ns)) => match ns.get("coll") {
                Some(Bson::String(c)) => Some(c.as_str()),
                _ => None,
            },
            _ => None,
        };
        let kind = match coll_name {
            Some(c) if c == self.collections.orders => CollectionKind::Orders,
            Some(c) if c == self.collections.payments => CollectionKind::Payments,
            Some(c) if c == self.collections.settings => CollectionKind::Settings,
            other => {
                issues.push(Issue::UnknownCollection {
                    collection: truncate(other.unwrap_or("<missing>")),
                });
                return None;
            }
        };

        let ChangeParts {
            ts_ms,
            full,
            pre,
            id: id_bson,
        } = ChangeParts::of(change, op);
        let doc_id = match id_bson {
            None | Some(Bson::Null) => {
                issues.push(Issue::MissingField {
                    collection: kind,
                    field: "_id",
                });
                None
            }
            Some(b) => match id_string(b) {
                Ok(s) => Some(s),
                Err(found) => {
                    issues.push(Issue::WrongType {
                        collection: kind,
                        field: "_id",
                        found,
                    });
                    None
                }
            },
        };

        let (updated, removed) = match change.get("updateDescription") {
            Some(Bson::Document(u)) if op == Op::Update => {
                let upd = match u.get("updatedFields") {
                    Some(Bson::Document(d)) => Some(d),
                    _ => None,
                };
                let rem: Vec<String> = match u.get("removedFields") {
                    Some(Bson::Array(a)) => a
                        .iter()
                        .filter_map(|b| match b {
                            Bson::String(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                (upd, rem)
            }
            _ => (None, Vec::new()),
        };
        let mut changed_fields: Vec<String> = Vec::new();
        if op == Op::Update {
            changed_fields.extend(updated.iter().flat_map(|d| d.keys().cloned()));
            changed_fields.extend(removed.iter().cloned());
        }
        if op == Op::Replace {
            // A replace carries no update description: any field may have changed, so
            // every field of the new document counts (without this, routing took a
            // replace with no status change for news to nobody and dropped it).
            changed_fields.extend(
                full.iter()
                    .flat_map(|d| d.keys())
                    .filter(|k| k.as_str() != "_id")
                    .cloned(),
            );
        }

        let remembered = doc_id.as_deref().and_then(|id| {
            self.cache
                .get(kind, id)
                .cloned()
                .or_else(|| match &self.book {
                    // Owners only: a status from the book is the latest, not the one before this change.
                    Some(OwnerBookUse::Consult(book)) => {
                        book.owners(kind, id).map(|keys| DocState {
                            keys,
                            ..DocState::default()
                        })
                    }
                    _ => None,
                })
        });

        let base = Base {
            id,
            ts_ms,
            kind,
            op,
            doc_id,
            full,
            pre,
            updated,
            changed_fields,
            remembered,
        };
        match kind {
            CollectionKind::Orders | CollectionKind::Payments => self.record(base, issues),
            CollectionKind::Settings => self.settings(base, issues),
        }
    }

    /// Orders and payments.
    fn record(&mut self, b: Base<'_>, issues: &mut Vec<Issue>) -> Option<DomainEvent> {
        let kind = b.kind;
        let is_order = kind == CollectionKind::Orders;
        let status_path = if is_order {
            self.fields.status.clone()
        } else {
            self.fields.payment_status.clone()
        };

        // The document the keys and payload come from.
        // An update whose fullDocument is gone (deleted since, or lookup off) uses what we remember.
        let source = match b.op {
            Op::Delete => b.pre,
            _ => b.full,
        };

        let keys = match source {
            Some(doc) => self.keys_from(kind, doc, b.doc_id.as_deref(), issues),
            None => match &b.remembered {
                Some(st) => st.keys.clone(),
                None if b.op == Op::Delete => {
                    issues.push(Issue::NoOwnerForDelete { collection: kind });
                    if let Some(id) = &b.doc_id {
                        self.cache.remove(kind, id);
                    }
                    return None;
                }
                None => {
                    // No document and no memory: only the order room (orders) is known.
                    issues.push(Issue::MissingField {
                        collection: kind,
                        field: if is_order { "customer" } else { "order_id" },
                    });
                    RouteKeys {
                        order: if is_order { b.doc_id.clone() } else { None },
                        ..RouteKeys::default()
                    }
                }
            },
        };

        let read = read_status(
            &ChangeView {
                op: b.op,
                pre: b.pre,
                source,
                updated: b.updated,
                changed: &b.changed_fields,
            },
            &status_path,
            Some(&self.fields.order_type),
            b.remembered
                .as_ref()
                .map(|r| (r.raw_status.as_deref(), r.order_type.as_deref())),
            |raw, ty| self.canonical(kind, raw, ty),
        );
        if let Some(found) = read.wrong_type {
            issues.push(Issue::WrongType {
                collection: kind,
                field: "status",
                found,
            });
        }
        if let Some(st) = read.info.as_ref().filter(|st| st.unknown) {
            issues.push(Issue::UnknownStatus {
                collection: kind,
                value: truncate(&st.raw),
            });
        }
        let StatusRead {
            raw: raw_status,
            kind: order_type,
            info: status,
            touched: status_touched,
            ..
        } = read;
        let name = match (kind, b.op, status_touched) {
            (CollectionKind::Orders, Op::Insert, _) => EventName::OrderCreated,
            (CollectionKind::Orders, Op::Delete, _) => EventName::OrderDeleted,
            (CollectionKind::Orders, _, true) => EventName::OrderStatusChanged,
            (CollectionKind::Orders, _, false) => EventName::OrderUpdated,
            (_, Op::Insert, _) => EventName::PaymentCreated,
            (_, Op::Delete, _) => EventName::PaymentDeleted,
            (_, _, true) => EventName::PaymentStatusChanged,
            (_, _, false) => EventName::PaymentUpdated,
        };

        if let Some(id) = &b.doc_id {
            if b.op == Op::Delete {
                self.cache.remove(kind, id);
            } else {
                let st = DocState {
                    raw_status: raw_status.as_deref().and_then(keep),
                    order_type: order_type.as_deref().and_then(keep),
                    keys: RouteKeys {
                        customer: keys.customer.as_deref().and_then(keep),
                        store: keys.store.as_deref().and_then(keep),
                        order: keys.order.as_deref().and_then(keep),
                    },
                };
                self.remember(kind, id, st);
            }
        }

        Some(DomainEvent {
            id: b.id,
            name,
            ts_ms: b.ts_ms,
            collection: kind,
            doc_id: b.doc_id,
            document: source.cloned().unwrap_or_default(),
            status,
            keys,
            changed_fields: b.changed_fields,
            sections: Vec::new(),
        })
    }

    /// (status to show, progress, unknown)
    fn canonical(
        &self,
        kind: CollectionKind,
        raw: &str,
        order_type: Option<&str>,
    ) -> (String, Option<u8>, bool) {
        if kind == CollectionKind::Orders {
            match self.status.order_status(raw, order_type) {
                Some(s) => (s.as_str().to_owned(), s.progress(), false),
                None => (raw.to_owned(), None, true),
            }
        } else {
            match self.status.payment_status(raw) {
                Some(s) => (s.as_str().to_owned(), None, false),
                None => (raw.to_owned(), None, true),
            }
        }
    }

    fn keys_from(
        &self,
        kind: CollectionKind,
        doc: &Document,
        doc_id: Option<&str>,
        issues: &mut Vec<Issue>,
    ) -> RouteKeys {
        let mut get = |field: &'static str, paths: &[String]| match lookup_id(doc, paths) {
            Lookup::Found(s) => Some(s),
            Lookup::Missing => {
                issues.push(Issue::MissingField {
                    collection: kind,
                    field,
                });
                None
            }
            Lookup::WrongType(found) => {
                issues.push(Issue::WrongType {
                    collection: kind,
                    field,
                    found,
                });
                None
            }
        };
        match kind {
            CollectionKind::Orders => RouteKeys {
                customer: get("customer", &self.fields.customer),
                store: get("store", &self.fields.store),
                order: doc_id.map(str::to_owned),
            },
            CollectionKind::Payments => RouteKeys {
                customer: get("customer", &self.fields.customer),
                store: get("store", &self.fields.store),
                order: get("order_id", &self.fields.order_id),
            },
            CollectionKind::Settings => RouteKeys {
                store: get("store", &self.fields.settings_store),
                ..RouteKeys::default()
            },
        }
    }

    fn settings(&mut self, b: Base<'_>, issues: &mut Vec<Issue>) -> Option<DomainEvent> {
        let kind = CollectionKind::Settings;
        if b.op == Op::Delete {
            // Deleting a settings document changes no section a client shows.
            if let Some(id) = &b.doc_id {
                self.cache.remove(kind, id);
            }
            issues.push(Issue::UnhandledOperation {
                op: "delete".into(),
            });
            return None;
        }
        let keys = match b.full {
            Some(doc) => self.keys_from(kind, doc, b.doc_id.as_deref(), issues),
            None => match &b.remembered {
                Some(st) => st.keys.clone(),
                None => {
                    issues.push(Issue::MissingField {
                        collection: kind,
                        field: "store",
                    });
                    RouteKeys::default()
                }
            },
        };
        if let Some(id) = &b.doc_id {
            let st = DocState {
                keys: RouteKeys {
                    store: keys.store.as_deref().and_then(keep),
                    ..RouteKeys::default()
                },
                ..DocState::default()
            };
            self.remember(kind, id, st);
        }

        let mut sections = Vec::new();
        for sec in &self.sections {
            let changed: Vec<String> = sec
                .fields
                .iter()
                .filter(|f| match b.op {
                    Op::Update => b.changed_fields.iter().any(|c| touches(c, f)),
                    // Insert/replace: with a pre-image only the fields that differ; else all present.
                    _ => {
                        let now = b.full.and_then(|d| get_path(d, f));
                        match b.pre.filter(|_| b.op == Op::Replace) {
                            Some(pre) => get_path(pre, f) != now,
                            None => now.is_some(),
                        }
                    }
                })
                .cloned()
                .collect();
            if !changed.is_empty() {
                sections.push(SectionChange {
                    name: sec.name.clone(),
                    public: sec.public,
                    changed_fields: changed,
                    fields: sec.fields.clone(),
                });
            }
        }
        if sections.is_empty() {
            return None;
        }
        Some(DomainEvent {
            id: b.id,
            name: EventName::SettingsUpdated,
            ts_ms: b.ts_ms,
            collection: kind,
            doc_id: b.doc_id,
            document: b.full.cloned().unwrap_or_default(),
            status: None,
            keys,
            changed_fields: b.changed_fields,
            sections,
        })
    }
}

/// The parts of a change every collection handler needs.
struct Base<'a> {
    id: EventId,
    ts_ms: i64,
    kind: CollectionKind,
    op: Op,
    doc_id: Option<String>,
    full: Option<&'a Document>,
    pre: Option<&'a Document>,
    updated: Option<&'a Document>,
    changed_fields: Vec<String>,
    remembered: Option<DocState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::testing::change;
    use crate::status::OrderStatus;
    use bson::{doc, oid::ObjectId};

    fn normalizer() -> Normalizer {
        Normalizer::new(&crate::config::test_config("", "t").unwrap())
    }

    fn one(n: &mut Normalizer, d: &Document) -> DomainEvent {
        let out = n.normalize(d);
        assert_eq!(out.events.len(), 1, "{out:?}");
        out.events.into_iter().next().unwrap()
    }

    fn order_insert(status: &str, order_type: &str) -> Document {
        change(
            "insert",
            "orders",
            Bson::String("o1".into()),
            Some(
                doc! {"_id": "o1", "customerId": "c1", "storeId": "s1", "status": status, "orderType": order_type},
            ),
        )
    }

    #[test]
    fn every_default_order_mapping() {
        let cases = [
            ("new", "pending"),
            ("pending", "pending"),
            ("accepted", "processing"),
            ("processing", "processing"),
            ("packing", "processing"),
            ("ready_for_pickup", "ready_for_pickup"),
            ("ready_for_delivery", "ready_for_delivery"),
            ("driver_assigned", "driver_assigned"),
            ("picked_up", "picked_up"),
            ("out_for_delivery", "in_transit"),
            ("in_transit", "in_transit"),
            ("completed", "delivered"),
            ("delivered", "delivered"),
            ("cancelled", "cancelled"),
            ("canceled", "cancelled"),
            ("  Accepted ", "processing"),
        ];
        let mut n = normalizer();
        for (raw, want) in cases {
            let ev = one(&mut n, &order_insert(raw, "delivery"));
            let st = ev.status.unwrap();
            assert_eq!(st.status, want, "{raw}");
            assert_eq!(st.raw, raw);
            assert!(!st.unknown);
        }
    }

    #[test]
    fn ready_splits_by_order_type() {
        let mut n = normalizer();
        for (t, want) in [
            ("pickup", "ready_for_pickup"),
            ("Collection", "ready_for_pickup"),
            ("takeaway", "ready_for_pickup"),
            ("delivery", "ready_for_delivery"),
            ("", "ready_for_delivery"),
        ] {
            let ev = one(&mut n, &order_insert("ready", t));
            assert_eq!(ev.status.unwrap().status, want, "{t}");
        }
        // No order type at all: delivery.
        let d = change(
            "insert",
            "orders",
            Bson::Int32(7),
            Some(doc! {"customerId": "c", "storeId": "s", "status": "ready"}),
        );
        assert_eq!(one(&mut n, &d).status.unwrap().status, "ready_for_delivery");
    }

    #[test]
    fn progress_follows_the_flow() {
        let p = |s: OrderStatus| s.progress();
        assert_eq!(p(OrderStatus::Pending), Some(0));
        assert_eq!(p(OrderStatus::Processing), Some(20));
        assert_eq!(p(OrderStatus::ReadyForPickup), Some(40));
        assert_eq!(p(OrderStatus::ReadyForDelivery), Some(40));
        assert_eq!(p(OrderStatus::DriverAssigned), Some(55));
        assert_eq!(p(OrderStatus::PickedUp), Some(70));
        assert_eq!(p(OrderStatus::InTransit), Some(85));
        assert_eq!(p(OrderStatus::Delivered), Some(100));
        assert_eq!(p(OrderStatus::Cancelled), None);
    }

    #[test]
    fn every_default_payment_mapping() {
        let mut n = normalizer();
        for (raw, want) in [
            ("succeeded", "succeeded"),
            ("paid", "succeeded"),
            ("completed", "succeeded"),
            ("pending", "pending"),
            ("processing", "pending"),
            ("requires_action", "pending"),
            ("failed", "failed"),
            ("canceled", "canceled"),
            ("cancelled", "canceled"),
            ("refunded", "refunded"),
            ("partially_refunded", "refunded"),
        ] {
            let d = change(
                "insert",
                "payments",
                Bson::String("p1".into()),
                Some(doc! {"orderId": "o1", "customerId": "c1", "storeId": "s1", "status": raw}),
            );
            let ev = one(&mut n, &d);
            assert_eq!(ev.name, EventName::PaymentCreated);
            let st = ev.status.unwrap();
            assert_eq!((&*st.status, st.unknown, st.progress), (want, false, None));
            assert_eq!(ev.keys.order.as_deref(), Some("o1"));
        }
    }

    #[test]
    fn unknown_status_passes_through() {
        let mut n = normalizer();
        let out = n.normalize(&order_insert("teleported", "delivery"));
        let st = out.events[0].status.clone().unwrap();
        assert_eq!(st.status, "teleported");
        assert!(st.unknown);
        assert_eq!(st.progress, None);
        assert_eq!(
            out.issues,
            [Issue::UnknownStatus {
                collection: CollectionKind::Orders,
                value: "teleported".into()
            }]
        );
    }

    #[test]
    fn status_change_uses_memory_for_previous() {
        let mut n = normalizer();
        let oid = ObjectId::new();
        let full = |s: &str| doc! {"_id": oid, "customerId": oid, "storeId": 42_i64, "status": s};
        one(
            &mut n,
            &change("insert", "orders", Bson::ObjectId(oid), Some(full("new"))),
        );
        let mut upd = change(
            "update",
            "orders",
            Bson::ObjectId(oid),
            Some(full("accepted")),
        );
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"status": "accepted", "updatedAt": 1}, "removedFields": []},
        );
        let ev = one(&mut n, &upd);
        assert_eq!(ev.name, EventName::OrderStatusChanged);
        let st = ev.status.unwrap();
        assert_eq!(st.status, "processing");
        assert_eq!(st.previous.as_deref(), Some("pending"));
        assert_eq!(st.progress, Some(20));
        assert_eq!(ev.keys.customer, Some(oid.to_hex()));
        assert_eq!(ev.keys.store.as_deref(), Some("42"));
        assert_eq!(ev.keys.order, Some(oid.to_hex()));

        // Not touching status: order:updated, current status still reported.
        let mut upd = change(
            "update",
            "orders",
            Bson::ObjectId(oid),
            Some(full("accepted")),
        );
        upd.insert("updateDescription", doc! {"updatedFields": {"notes": "x"}});
        let ev = one(&mut n, &upd);
        assert_eq!(ev.name, EventName::OrderUpdated);
        assert_eq!(ev.changed_fields, ["notes"]);

        // Replace with a different status than remembered: status_changed.
        let ev = one(
            &mut n,
            &change(
                "replace",
                "orders",
                Bson::ObjectId(oid),
                Some(full("ready")),
            ),
        );
        assert_eq!(ev.name, EventName::OrderStatusChanged);
        assert_eq!(ev.status.unwrap().previous.as_deref(), Some("processing"));

        // Delete without pre-image: routed from memory.
        let ev = one(
            &mut n,
            &change("delete", "orders", Bson::ObjectId(oid), None),
        );
        assert_eq!(ev.name, EventName::OrderDeleted);
        assert_eq!(ev.keys.customer, Some(oid.to_hex()));
        // Forgotten after the delete: a second delete has no owner.
        let out = n.normalize(&change("delete", "orders", Bson::ObjectId(oid), None));
        assert!(out.events.is_empty());
        assert_eq!(
            out.issues,
            [Issue::NoOwnerForDelete {
                collection: CollectionKind::Orders
            }]
        );
    }

    #[test]
    fn pre_image_wins_for_previous_and_delete() {
        let mut n = normalizer();
        let mut upd = change(
            "update",
            "orders",
            Bson::String("o9".into()),
            Some(doc! {"customerId": "c", "storeId": "s", "status": "out_for_delivery"}),
        );
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"status": "out_for_delivery"}},
        );
        upd.insert("fullDocumentBeforeChange", doc! {"status": "picked_up"});
        let ev = one(&mut n, &upd);
        let st = ev.status.unwrap();
        assert_eq!(
            (&*st.status, st.previous.as_deref()),
            ("in_transit", Some("picked_up"))
        );

        let mut del = change("delete", "payments", Bson::String("p".into()), None);
        del.insert(
            "fullDocumentBeforeChange",
            doc! {"_id": "p", "customerId": "c2", "storeId": "s2", "orderId": "o2", "status": "paid"},
        );
        let ev = one(&mut n, &del);
        assert_eq!(ev.name, EventName::PaymentDeleted);
        assert_eq!(ev.keys.customer.as_deref(), Some("c2"));
        assert_eq!(ev.document.get_str("orderId").unwrap(), "o2");
    }

    #[test]
    fn update_status_from_update_description_not_later_lookup() {
        let mut n = normalizer();
        let mut upd = change(
            "update",
            "orders",
            Bson::String("o".into()),
            // fullDocument was looked up later and already says delivered.
            Some(doc! {"customerId": "c", "storeId": "s", "status": "delivered"}),
        );
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"status": "picked_up"}},
        );
        assert_eq!(one(&mut n, &upd).status.unwrap().status, "picked_up");
    }

    #[test]
    fn settings_sections_from_updated_fields() {
        let mut n = normalizer();
        let mut upd = change(
            "update",
            "settings",
            Bson::ObjectId(ObjectId::new()),
            Some(doc! {"sellerId": "s1", "storeLogo": "l.png", "taxEnabled": true, "secret": 1}),
        );
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"storeLogo": "l.png", "taxEnabled": true, "secret": 1, "warehouse.city": "Oslo"}},
        );
        let ev = one(&mut n, &upd);
        assert_eq!(ev.name, EventName::SettingsUpdated);
        assert_eq!(ev.keys.store.as_deref(), Some("s1"));
        let got: Vec<(&str, bool, Vec<String>)> = ev
            .sections
            .iter()
            .map(|s| (s.name.as_str(), s.public, s.changed_fields.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("branding", true, vec!["storeLogo".to_owned()]),
                ("tax_settings", false, vec!["taxEnabled".to_owned()]),
                ("warehouse", false, vec!["warehouse".to_owned()]),
            ]
        );

        // A change outside every section produces nothing.
        let mut upd = change(
            "update",
            "settings",
            Bson::Int64(5),
            Some(doc! {"storeId": "s1"}),
        );
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"internalFlag": 1}},
        );
        let out = n.normalize(&upd);
        assert!(out.events.is_empty() && out.issues.is_empty(), "{out:?}");
    }

    #[test]
    fn settings_insert_all_present_sections() {
        let mut n = normalizer();
        let d = change(
            "insert",
            "settings",
            Bson::Int32(1),
            Some(doc! {"storeId": "s1", "username": "bob", "shippingPrice": 5}),
        );
        let ev = one(&mut n, &d);
        let names: Vec<&str> = ev.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shipping", "username"]);
    }

    #[test]
    fn hostile_basics() {
        let mut n = normalizer();
        assert_eq!(n.normalize(&doc! {}).issues, [Issue::MissingEventId]);
        let mut d = order_insert("new", "x");
        d.insert("operationType", "frobnicate");
        assert_eq!(n.normalize(&d).issues[0].reason(), "unknown_operation");
        d.insert("operationType", "drop");
        assert_eq!(n.normalize(&d).issues[0].reason(), "unhandled_operation");
        let mut d = order_insert("new", "x");
        d.insert("ns", doc! {"coll": "users"});
        assert_eq!(n.normalize(&d).issues[0].reason(), "unknown_collection");
        let d = change(
            "insert",
            "orders",
            Bson::Array(vec![]),
            Some(doc! {"customerId": 1.5, "sellerId": "s", "status": 3}),
        );
        let out = n.normalize(&d);
        let ev = &out.events[0];
        assert_eq!(
            ev.keys,
            RouteKeys {
                customer: None,
                store: Some("s".into()),
                order: None
            }
        );
        assert!(ev.status.is_none());
        let reasons: Vec<&str> = out.issues.iter().map(Issue::reason).collect();
        assert_eq!(reasons, ["wrong_type", "wrong_type", "wrong_type"]);
    }

    #[test]
    fn long_ids_are_forgotten_not_cut() {
        let mut n = normalizer();
        let long = "x".repeat(MAX_KEPT_LEN + 2);
        let d = change(
            "insert",
            "payments",
            Bson::String("p".into()),
            Some(doc! {"orderId": long.as_str(), "customerId": "c"}),
        );
        assert_eq!(one(&mut n, &d).keys.order.as_deref(), Some(long.as_str()));
        // No fullDocument: keys come from memory, which must not hold a cut id.
        let d = change("update", "payments", Bson::String("p".into()), None);
        let ev = one(&mut n, &d);
        assert_eq!(ev.keys.order, None);
        assert_eq!(ev.keys.customer.as_deref(), Some("c"));
    }

    #[test]
    fn a_replay_finds_owners_the_live_stream_recorded_even_after_a_delete() {
        let book = Arc::new(OwnerBook::new(10));
        let mut live = normalizer().with_owner_book(OwnerBookUse::Record(book.clone()));
        let full = doc! {"_id": "o1", "customerId": "c1", "storeId": "s1", "status": "new"};
        one(
            &mut live,
            &change("insert", "orders", Bson::String("o1".into()), Some(full)),
        );
        one(
            &mut live,
            &change("delete", "orders", Bson::String("o1".into()), None),
        );

        // A replay starting after the insert: the update's lookup found nothing, then the delete.
        let mut upd = change("update", "orders", Bson::String("o1".into()), None);
        upd.insert(
            "updateDescription",
            doc! {"updatedFields": {"status": "accepted"}},
        );
        let del = change("delete", "orders", Bson::String("o1".into()), None);
        assert_eq!(normalizer().normalize(&upd).events[0].keys.customer, None);
        assert!(normalizer().normalize(&del).events.is_empty());

        let mut replay = normalizer().with_owner_book(OwnerBookUse::Consult(book.clone()));
        let ev = one(&mut replay, &upd);
        assert_eq!(ev.keys.customer.as_deref(), Some("c1"));
        assert_eq!(ev.keys.store.as_deref(), Some("s1"));
        let st = ev.status.unwrap();
        assert_eq!(st.status, "processing");
        assert_eq!(
            st.previous, None,
            "a status from the book would be a later one"
        );
        assert_eq!(one(&mut replay, &del).name, EventName::OrderDeleted);
        // Consulting never writes.
        replay.normalize(&change(
            "insert",
            "orders",
            Bson::String("o2".into()),
            Some(doc! {"customerId": "c2"}),
        ));
        assert_eq!(book.owners(CollectionKind::Orders, "o2"), None);
    }

    #[test]
    fn state_cache_is_bounded() {
        let cfg = crate::config::test_config("[normalize]\nstate_cache_docs = 3\n", "t").unwrap();
        let mut n = Normalizer::new(&cfg);
        for i in 0..100 {
            let d = change(
                "insert",
                "orders",
                Bson::Int32(i),
                Some(doc! {"customerId": "c", "storeId": "s", "status": "new"}),
            );
            n.normalize(&d);
            // Rewrites of the same document must not grow the queue either.
            n.normalize(&change(
                "replace",
                "orders",
                Bson::Int32(0),
                Some(doc! {"status": "new"}),
            ));
        }
        assert_eq!(n.remembered(), 3);
        assert!(n.cache.order.len() <= 3 * 2 + 16);
        // The oldest were evicted: a delete of document 1 has no owner.
        let out = n.normalize(&change("delete", "orders", Bson::Int32(1), None));
        assert!(out.events.is_empty());
    }
}
