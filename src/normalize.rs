//! Reading a change: its operation, time, documents and key, and a status field through a status table; no I/O, knows nothing of rooms, payloads or which collection it is.
//!
//! Input is the raw change event as the server sent it (`RawDocument`), read in
//! place: never the driver's typed `ChangeStreamEvent` (nothing a hostile or odd
//! document contains can fail deserialization: every field may be missing, null,
//! wrong-typed or huge), and never an owned copy (issue 16: decoding was a fifth of
//! a change's CPU).
//! The engine that turns a change into an event (`declared`) reads through here;
//! `route` is its sibling for rooms and payloads.

use std::borrow::Cow;

use bson::raw::{RawBsonRef, RawDocument};

use crate::bsonscan;
use crate::docpath::{raw_path, raw_type_name, touches};
use crate::event::StatusInfo;

/// Longest string copied into an issue.
const MAX_KEPT_LEN: usize = 128;

/// The operations that change a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Insert,
    Update,
    Replace,
    Delete,
}

/// Operations MongoDB documents that carry no document change we turn into events.
pub(crate) const UNHANDLED_OPS: [&str; 12] = [
    "drop",
    "rename",
    "dropDatabase",
    "invalidate",
    "create",
    "createIndexes",
    "dropIndexes",
    "modify",
    "shardCollection",
    "refineCollectionShardKey",
    "reshardCollection",
    "createSearchIndexes",
];

/// What every change event carries whatever its collection.
pub(crate) struct ChangeParts<'a> {
    /// Commit time, Unix ms: `wallTime` if present, else `clusterTime` seconds × 1000, else 0.
    pub ts_ms: i64,
    /// `fullDocument` (never for a delete).
    pub full: Option<&'a RawDocument>,
    /// `fullDocumentBeforeChange`.
    pub pre: Option<&'a RawDocument>,
    /// The document's identity: documentKey._id is authoritative; the full document's
    /// (then the pre-image's) `_id` stands in when a hostile or partial event lacks it.
    pub id: Option<RawBsonRef<'a>>,
    /// `updateDescription`.
    pub update: Option<&'a RawDocument>,
}

impl<'a> ChangeParts<'a> {
    /// Read in one pass over the change's top level (each field looked up on its own
    /// walked the change up to it, a dozen times per change).
    pub(crate) fn of(change: &'a RawDocument, op: Op) -> Self {
        let mut found: [Option<bsonscan::Elem<'a>>; 6] = [None; 6];
        for e in bsonscan::elements(change.as_bytes()) {
            let slot = match e.key {
                b"wallTime" => 0,
                b"clusterTime" => 1,
                b"fullDocument" => 2,
                b"fullDocumentBeforeChange" => 3,
                b"documentKey" => 4,
                b"updateDescription" => 5,
                _ => continue,
            };
            // The first of a repeated key, as a lookup by key finds.
            found[slot].get_or_insert(e);
        }
        let [wall, cluster, full, pre, key, update] =
            found.map(|e| e.and_then(|e| e.to_ref(change)));
        let ts_ms = match (wall, cluster) {
            (Some(RawBsonRef::DateTime(d)), _) => d.timestamp_millis(),
            (_, Some(RawBsonRef::Timestamp(t))) => i64::from(t.time) * 1000,
            _ => 0,
        };
        let doc = |b: Option<RawBsonRef<'a>>| match b {
            Some(RawBsonRef::Document(d)) => Some(d),
            _ => None,
        };
        let full = doc(full).filter(|_| op != Op::Delete);
        let pre = doc(pre);
        let id_in = |d: &'a RawDocument| bsonscan::get(d, "_id");
        let id = doc(key)
            .and_then(id_in)
            .or_else(|| full.and_then(id_in))
            .or_else(|| pre.and_then(id_in));
        Self {
            ts_ms,
            full,
            pre,
            id,
            update: doc(update),
        }
    }
}

/// At most 128 bytes of `s`, cut at a character boundary (for issues, never ids).
pub(crate) fn truncate(s: &str) -> String {
    if s.len() <= MAX_KEPT_LEN {
        return s.to_owned();
    }
    let mut end = MAX_KEPT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("").to_owned()
}

/// The parts of a change a status is read from.
pub(crate) struct ChangeView<'a> {
    pub(crate) op: Op,
    /// `fullDocumentBeforeChange`.
    pub(crate) pre: Option<&'a RawDocument>,
    /// The document keys and payloads come from: the full document, or a delete's pre-image.
    pub(crate) source: Option<&'a RawDocument>,
    /// `updateDescription.updatedFields` of an update.
    pub(crate) updated: Option<&'a RawDocument>,
    /// Paths the update changed (updated, then removed).
    pub(crate) changed: &'a [String],
}

/// A status field as one change shows it. Orders, payments and declared streams'
/// `[streams.status]` read it by this one rule, so their `status`, `previousStatus`
/// and `rawStatus` mean the same everywhere.
pub(crate) struct StatusRead<'a> {
    /// The raw value now (`None` when absent or not a string). Borrowed from the
    /// change unless it came from memory: no copy per change.
    pub(crate) raw: Option<Cow<'a, str>>,
    /// The document's type now, which splits a `ready` target.
    pub(crate) kind: Option<Cow<'a, str>>,
    /// What the payloads carry; `None` when the document has no status.
    pub(crate) info: Option<StatusInfo>,
    /// Whether the change moved the status: an update touching its path, or a replace
    /// whose value differs from the one known before (a replace carries no field list).
    pub(crate) touched: bool,
    /// The BSON type found where a string status was expected.
    pub(crate) wrong_type: Option<&'static str>,
}

/// Reads the status at `path` (and the type at `type_path`) from a change. `remembered`
/// is the (raw status, type) this process last saw of the document; `canonical` maps a
/// raw value and a type to (status to show, progress, unknown).
pub(crate) fn read_status<'a>(
    v: &ChangeView<'a>,
    path: &str,
    type_path: Option<&str>,
    remembered: Option<(Option<&str>, Option<&str>)>,
    canonical: impl Fn(&str, Option<&str>) -> (Cow<'static, str>, Option<u8>, bool),
) -> StatusRead<'a> {
    let (mem_raw, mem_kind) = remembered.unwrap_or((None, None));
    // What memory holds is copied: the memory is rewritten before the read is done with.
    let owned = |s: &str| Cow::Owned(s.to_owned());
    // This update's own value first: the looked-up document may be later.
    let status_bson: Option<RawBsonRef<'a>> = match v.op {
        Op::Update => v
            .updated
            .and_then(|u| status_in_updated(u, path))
            .or_else(|| v.source.and_then(|d| raw_path(d, path))),
        _ => v.source.and_then(|d| raw_path(d, path)),
    };
    let mut wrong_type = None;
    let raw: Option<Cow<'a, str>> = match status_bson {
        None | Some(RawBsonRef::Null) => {
            if v.op == Op::Delete || v.op == Op::Update {
                mem_raw.map(owned)
            } else {
                None
            }
        }
        Some(RawBsonRef::String(s)) => Some(Cow::Borrowed(s)),
        Some(other) => {
            wrong_type = Some(raw_type_name(other));
            None
        }
    };
    let string_at = |d: &'a RawDocument, p: &str| match raw_path(d, p) {
        Some(RawBsonRef::String(s)) => Some(s),
        _ => None,
    };
    let kind: Option<Cow<'a, str>> = type_path.and_then(|tp| {
        v.source
            .and_then(|d| string_at(d, tp))
            .map(Cow::Borrowed)
            .or_else(|| mem_kind.map(owned))
    });

    // Previous status: pre-image first, then memory.
    let previous_raw: Option<&str> = v
        .pre
        .filter(|_| v.op != Op::Delete)
        .and_then(|p| string_at(p, path))
        .or(mem_raw);
    let previous = previous_raw.map(|r| {
        let pre_kind = type_path
            .and_then(|tp| v.pre.and_then(|p| string_at(p, tp)))
            .or(kind.as_deref());
        canonical(r, pre_kind).0
    });
    let info = raw.as_deref().map(|r| {
        let (status, progress, unknown) = canonical(r, kind.as_deref());
        StatusInfo {
            status,
            raw: r.to_owned(),
            previous: if v.op == Op::Insert {
                None
            } else {
                previous.clone()
            },
            progress,
            unknown,
        }
    });
    let touched = match v.op {
        Op::Update => v.changed.iter().any(|c| touches(c, path)),
        Op::Replace => match (previous_raw, raw.as_deref()) {
            (Some(p), Some(n)) => p != n,
            _ => false,
        },
        _ => false,
    };
    StatusRead {
        raw,
        kind,
        info,
        touched,
        wrong_type,
    }
}

/// The status value inside `updatedFields`: the key itself, or nested under an updated ancestor.
fn status_in_updated<'a>(updated: &'a RawDocument, path: &str) -> Option<RawBsonRef<'a>> {
    if let Some(v) = bsonscan::get(updated, path) {
        return Some(v);
    }
    for e in bsonscan::elements(updated.as_bytes()) {
        let rest = e
            .key_str()
            .and_then(|k| path.strip_prefix(k))
            .and_then(|r| r.strip_prefix('.'));
        if let (Some(rest), bsonscan::kind::DOCUMENT) = (rest, e.kind) {
            return raw_path(RawDocument::from_bytes(e.value).ok()?, rest);
        }
    }
    None
}

/// Used by the tests of the engine, its presets and the former oracle to build inputs.
#[cfg(test)]
pub(crate) mod testing {
    use bson::{doc, Bson, Document};

    /// A change event as the driver would return it.
    pub(crate) fn change(op: &str, coll: &str, id: Bson, full: Option<Document>) -> Document {
        let mut d = doc! {
            "_id": { "_data": "8265F0A1B2000000012B022C0100296E5A1004" },
            "operationType": op,
            "ns": { "db": "app", "coll": coll },
            "documentKey": { "_id": id },
            "clusterTime": bson::Timestamp { time: 1_700_000_000, increment: 1 },
        };
        if let Some(f) = full {
            d.insert("fullDocument", f);
        }
        d
    }
}
