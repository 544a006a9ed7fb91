//! Change document → routed events through the stream engine (`declared`), with numbering, counting and rate-limited logging of data problems.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::raw::RawDocument;
use bson::{Document, RawDocumentBuf};

use crate::authz::OrderOwners;
use crate::config::Config;
use crate::declared::{Declared, Mapped, OwnerBookUse};
use crate::docpath::{raw_doc, raw_str};
use crate::event::{Issue, RoutedEvent};
use crate::metrics::{ChangeLabels, Metrics, ReasonLabels};
use crate::sequence::{OrderError, Sequencer};
use prometheus_client::metrics::counter::Counter;

/// Builds a fresh mapper per stream (and per oplog replay).
pub(crate) type MapperFactory = Arc<dyn Fn() -> Mapper + Send + Sync>;

/// At most one warning per reason per this interval; the rest are counted only.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Distinct unknown status values logged once each; beyond this they are only counted.
const MAX_LOGGED_UNKNOWN: usize = 1000;

/// The operations `changes_read` counts by name; the rest as `other`.
const COUNTED_OPS: [&str; 4] = ["insert", "update", "replace", "delete"];

/// `changes_read`'s series per watched collection (then `other`) and operation (then
/// `other`), looked up once: a lookup per change built two label `String`s and hashed them.
fn change_counters(metrics: &Metrics, watched: &[String]) -> Vec<[Counter; 5]> {
    watched
        .iter()
        .map(String::as_str)
        .chain(["other"])
        .map(|coll| {
            std::array::from_fn(|i| {
                let op = COUNTED_OPS.get(i).copied().unwrap_or("other");
                metrics
                    .changes_read
                    .get_or_create(&ChangeLabels {
                        collection: coll.to_owned(),
                        op: op.to_owned(),
                    })
                    .clone()
            })
        })
        .collect()
}

/// Maps one stream's changes.
pub struct Mapper {
    config: Arc<Config>,
    /// Orders, payments and settings (presets) and the `[[streams]]` collections.
    engine: Declared,
    metrics: Arc<Metrics>,
    watched: Vec<String>,
    change_counters: Vec<[Counter; 5]>,
    last_warned: HashMap<&'static str, (Instant, u64)>,
    unknown_logged: HashSet<String>,
    book: Option<OwnerBookUse>,
    /// Told each order's owners as the stream sees them (live mappers only: a
    /// replay re-reads the past, which must not overwrite the present).
    owners: Option<Arc<dyn OrderOwners>>,
    /// Whether several databases are watched: events then carry theirs.
    multi_db: bool,
    /// Numbers the stream's changes into ids that sort on any server.
    sequence: Sequencer,
}

impl Mapper {
    /// A mapper for `config`.
    pub fn new(config: &Arc<Config>, metrics: Arc<Metrics>) -> Self {
        let c = &config.mongo.collections;
        let watched: Vec<String> = [&c.orders, &c.payments, &c.settings]
            .into_iter()
            .chain(config.streams.iter().map(|s| &s.collection))
            .cloned()
            .collect();
        Self {
            change_counters: change_counters(&metrics, &watched),
            watched,
            config: config.clone(),
            engine: Declared::for_config(config),
            metrics,
            last_warned: HashMap::new(),
            unknown_logged: HashSet::new(),
            book: None,
            owners: None,
            multi_db: config.mongo.databases.len() > 1,
            sequence: Sequencer::fresh(),
        }
    }

    /// Numbers the changes of a stream that resumes after `id` (a change id or a
    /// time-only position), so their ids match those of a stream that saw it.
    pub(crate) fn resume_after(&mut self, id: &crate::event::EventId) {
        self.sequence = Sequencer::after(id);
    }

    /// Numbers the changes of a stream whose start is unknown from 0 at their time.
    pub(crate) fn restart_numbering(&mut self) {
        self.sequence = Sequencer::fresh();
    }

    /// The id `change` would get if mapped next, without mapping it.
    pub(crate) fn peek_id(
        &self,
        change: &RawDocument,
    ) -> Result<crate::event::EventId, OrderError> {
        self.sequence.clone().next(change)
    }

    /// The id of the newest change this mapper read (its stream's position).
    pub(crate) fn position(&self) -> Option<&crate::event::EventId> {
        self.sequence.newest()
    }

    /// Reports every order's owners, as changes show them, to `owners` (its cache).
    pub(crate) fn with_owner_observer(mut self, owners: Arc<dyn OrderOwners>) -> Self {
        self.owners = Some(owners);
        self
    }

    /// A mapper whose engine records owners in, or consults, a shared owner book.
    pub(crate) fn with_owner_book(mut self, book: OwnerBookUse) -> Self {
        self.book = Some(book);
        self.engine = self.fresh_engine();
        self
    }

    /// Maps one change to the events to publish, counting what was read and dropped.
    ///
    /// `Err` when the change cannot be ordered (no `clusterTime`, or one older than the
    /// previous change's): the stream must stop rather than publish out of order.
    pub fn map(&mut self, change: &Document) -> Result<Vec<RoutedEvent>, OrderError> {
        match RawDocumentBuf::from_document(change) {
            Ok(raw) => self.map_raw(&raw),
            // Only a key with a NUL byte fails, which no server sends.
            Err(_) => {
                self.drop_reason("invalid_bson");
                Ok(Vec::new())
            }
        }
    }

    /// [`Mapper::map`] of a change as the server sent it, read in place: the live
    /// stream's path.
    pub fn map_raw(&mut self, change: &RawDocument) -> Result<Vec<RoutedEvent>, OrderError> {
        self.count_change(change);
        let id = match self.sequence.next(change) {
            Ok(id) => id,
            Err(OrderError::NoToken) => {
                // The driver refuses such a change before we see it; counted, not fatal.
                self.report(change, &Issue::MissingEventId);
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let database: Option<Arc<str>> = if self.multi_db {
            raw_doc(change, "ns")
                .and_then(|ns| raw_str(ns, "db"))
                .map(Arc::from)
        } else {
            None
        };
        let mut issues = Vec::new();
        let mapped = self.engine.map(change, id, &mut issues);
        for issue in &issues {
            self.report(change, issue);
        }
        let Some(Mapped { mut event, order }) = mapped else {
            return Ok(Vec::new());
        };
        if let (Some(observer), Some((id, deleted))) = (&self.owners, order) {
            // Rights follow the data: the ownership cache learns each order's owners
            // as the stream sees them (a delete forgets them).
            let now = if deleted {
                None
            } else {
                event.owner.as_deref()
            };
            if deleted || now.is_some() {
                observer.observe(&id, database.as_deref(), now);
            }
        }
        if event.deliveries.is_empty() {
            self.drop_reason("no_rooms");
            return Ok(Vec::new());
        }
        event.database = database;
        Ok(vec![event])
    }

    /// Takes a change the server could not return whole (over 16 MiB, see
    /// `Source::peek_next`) out of the stream: it is numbered like any other change, so
    /// the ids after it are the same in every process, counted as dropped (`oversize`),
    /// and routed from what `reduced` holds (its document key and the routing fields of
    /// its documents) so that its rooms can be told to resync. The routing uses an
    /// engine of its own: the reduced documents must not become remembered statuses.
    pub(crate) fn skip(&mut self, reduced: &Document) -> Result<Vec<RoutedEvent>, OrderError> {
        // Rooms follow the document's owners, not what changed (the update description
        // stayed on the server): a change that still has its document is routed as the
        // document's appearance, which reaches every room it belongs to.
        let mut probe = reduced.clone();
        if probe.get_document("fullDocument").is_ok()
            && matches!(probe.get_str("operationType"), Ok("update" | "replace"))
        {
            probe.insert("operationType", "insert");
        }
        let throwaway = self.fresh_engine();
        let kept = std::mem::replace(&mut self.engine, throwaway);
        let routed = self.map(&probe);
        self.engine = kept;
        self.drop_reason("oversize");
        let mut routed = routed?;
        if routed.iter().all(|r| r.deliveries.is_empty()) {
            // Nothing tells its owners (no document, none remembered): the admins at least.
            if let Some(id) = self.position() {
                routed = vec![RoutedEvent {
                    event: crate::event::Event {
                        id: id.clone(),
                        name: "system:oversize".into(),
                        ts_ms: 0,
                    },
                    deliveries: vec![crate::event::Delivery {
                        room: crate::room::Room::admin(),
                        data: crate::event::Payload::from_value(&serde_json::Value::Null),
                    }],
                    owner: None,
                    database: self
                        .multi_db
                        .then(|| reduced.get_document("ns").ok()?.get_str("db").ok())
                        .flatten()
                        .map(Arc::from),
                }];
            }
        }
        Ok(routed)
    }

    fn fresh_engine(&self) -> Declared {
        let e = Declared::for_config(&self.config);
        match &self.book {
            Some(book) => e.with_owner_book(book.clone()),
            None => e,
        }
    }

    /// Forgets remembered document state (after a gap in the stream).
    pub(crate) fn forget(&mut self) {
        // The owner book stays: owners outlive a gap in the stream far better than statuses.
        self.engine.forget();
    }

    fn count_change(&self, change: &RawDocument) {
        let coll = raw_doc(change, "ns")
            .and_then(|ns| raw_str(ns, "coll"))
            .and_then(|c| self.watched.iter().position(|w| w == c))
            .unwrap_or(self.watched.len());
        // Not `RawDocument::get_str`: bson builds its error (a copy of the key) before
        // knowing whether it is needed, an allocation per change.
        let op = raw_str(change, "operationType")
            .and_then(|op| COUNTED_OPS.iter().position(|o| *o == op))
            .unwrap_or(COUNTED_OPS.len());
        self.change_counters[coll][op].inc();
    }

    fn report(&mut self, change: &RawDocument, issue: &Issue) {
        match issue {
            Issue::UnknownStatus { value } => {
                let coll = raw_doc(change, "ns")
                    .and_then(|ns| raw_str(ns, "coll"))
                    .unwrap_or("");
                self.unknown_status(coll, value);
            }
            Issue::UnhandledOperation { .. } => self.drop_reason(issue.reason()),
            other => {
                self.drop_reason(other.reason());
                self.warn(other.reason(), || format!("{other:?}"));
            }
        }
    }

    /// A raw status not in its table: passed through marked unknown, not dropped;
    /// counted, and logged once per value.
    fn unknown_status(&mut self, collection: &str, value: &str) {
        self.metrics.unknown_statuses.inc();
        if self.unknown_logged.len() < MAX_LOGGED_UNKNOWN
            && self.unknown_logged.insert(value.to_owned())
        {
            tracing::warn!(collection, value = %value, "unknown status value (logged once per value)");
        }
    }

    fn drop_reason(&self, reason: &'static str) {
        self.metrics
            .events_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Rate-limited warning for data problems: one line per reason per interval, with the suppressed count.
    fn warn(&mut self, reason: &'static str, detail: impl FnOnce() -> String) {
        let now = Instant::now();
        let entry = self
            .last_warned
            .entry(reason)
            .or_insert((now - WARN_EVERY, 0));
        if now.duration_since(entry.0) >= WARN_EVERY {
            tracing::warn!(reason, suppressed = entry.1, detail = %detail(), "data problem in a change; route skipped");
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
    }
}
