//! The Document-based readers the former normalizer used (a change's parts, its status, ids at paths), as they were before the engine read changes in place; test-only, part of the oracle.

use bson::{Bson, Document};

use crate::docpath::{get_path, touches, Lookup};
use crate::event::StatusInfo;
use crate::normalize::Op;

/// The BSON type name, for issues.
pub(crate) fn type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Array(_) => "array",
        Bson::Document(_) => "object",
        Bson::Boolean(_) => "bool",
        Bson::Null => "null",
        Bson::RegularExpression(_) => "regex",
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) => "javascript",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::Timestamp(_) => "timestamp",
        Bson::Binary(_) => "binData",
        Bson::ObjectId(_) => "objectId",
        Bson::DateTime(_) => "date",
        Bson::Symbol(_) => "symbol",
        Bson::Decimal128(_) => "decimal",
        Bson::Undefined => "undefined",
        Bson::MaxKey => "maxKey",
        Bson::MinKey => "minKey",
        Bson::DbPointer(_) => "dbPointer",
    }
}

/// An id usable in a room name: ObjectId → hex, string as is, int/long → decimal.
/// Anything else is refused (a double or a date as an id would be a guess).
pub(crate) fn id_string(b: &Bson) -> Result<String, &'static str> {
    match b {
        Bson::ObjectId(o) => Ok(o.to_hex()),
        Bson::String(s) => Ok(s.clone()),
        Bson::Int32(i) => Ok(i.to_string()),
        Bson::Int64(i) => Ok(i.to_string()),
        other => Err(type_name(other)),
    }
}

/// The id at the first present (non-null) path; a present value of the wrong type is
/// reported, never skipped in favour of a later path.
pub(crate) fn lookup_id(doc: &Document, paths: &[String]) -> Lookup {
    for p in paths {
        match get_path(doc, p) {
            None | Some(Bson::Null) => continue,
            Some(v) => {
                return match id_string(v) {
                    Ok(s) => Lookup::Found(s),
                    Err(t) => Lookup::WrongType(t),
                }
            }
        }
    }
    Lookup::Missing
}

/// What every change event carries whatever its collection.
pub(crate) struct ChangeParts<'a> {
    /// Commit time, Unix ms: `wallTime` if present, else `clusterTime` seconds × 1000, else 0.
    pub ts_ms: i64,
    /// `fullDocument` (never for a delete).
    pub full: Option<&'a Document>,
    /// `fullDocumentBeforeChange`.
    pub pre: Option<&'a Document>,
    /// The document's identity: documentKey._id is authoritative; the full document's
    /// (then the pre-image's) `_id` stands in when a hostile or partial event lacks it.
    pub id: Option<&'a Bson>,
}

impl<'a> ChangeParts<'a> {
    pub(crate) fn of(change: &'a Document, op: Op) -> Self {
        let ts_ms = match change.get("wallTime") {
            Some(Bson::DateTime(d)) => d.timestamp_millis(),
            _ => match change.get("clusterTime") {
                Some(Bson::Timestamp(t)) => i64::from(t.time) * 1000,
                _ => 0,
            },
        };
        let full = match change.get("fullDocument") {
            Some(Bson::Document(d)) if op != Op::Delete => Some(d),
            _ => None,
        };
        let pre = match change.get("fullDocumentBeforeChange") {
            Some(Bson::Document(d)) => Some(d),
            _ => None,
        };
        let id = match change.get("documentKey") {
            Some(Bson::Document(k)) => k.get("_id"),
            _ => None,
        }
        .or_else(|| full.and_then(|d| d.get("_id")))
        .or_else(|| pre.and_then(|d| d.get("_id")));
        Self {
            ts_ms,
            full,
            pre,
            id,
        }
    }
}

/// The parts of a change a status is read from.
pub(crate) struct ChangeView<'a> {
    pub(crate) op: Op,
    /// `fullDocumentBeforeChange`.
    pub(crate) pre: Option<&'a Document>,
    /// The document keys and payloads come from: the full document, or a delete's pre-image.
    pub(crate) source: Option<&'a Document>,
    /// `updateDescription.updatedFields` of an update.
    pub(crate) updated: Option<&'a Document>,
    /// Paths the update changed (updated, then removed).
    pub(crate) changed: &'a [String],
}

/// A status field as one change shows it. Orders, payments and declared streams'
/// `[streams.status]` read it by this one rule, so their `status`, `previousStatus`
/// and `rawStatus` mean the same everywhere.
pub(crate) struct StatusRead {
    /// The raw value now (`None` when absent or not a string).
    pub(crate) raw: Option<String>,
    /// The document's type now, which splits a `ready` target.
    pub(crate) kind: Option<String>,
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
pub(crate) fn read_status(
    v: &ChangeView<'_>,
    path: &str,
    type_path: Option<&str>,
    remembered: Option<(Option<&str>, Option<&str>)>,
    canonical: impl Fn(&str, Option<&str>) -> (String, Option<u8>, bool),
) -> StatusRead {
    let (mem_raw, mem_kind) = remembered.unwrap_or((None, None));
    // This update's own value first: the looked-up document may be later.
    let status_bson: Option<&Bson> = match v.op {
        Op::Update => v
            .updated
            .and_then(|u| status_in_updated(u, path))
            .or_else(|| v.source.and_then(|d| get_path(d, path))),
        _ => v.source.and_then(|d| get_path(d, path)),
    };
    let mut wrong_type = None;
    let raw: Option<String> = match status_bson {
        None | Some(Bson::Null) => {
            if v.op == Op::Delete || v.op == Op::Update {
                mem_raw.map(str::to_owned)
            } else {
                None
            }
        }
        Some(Bson::String(s)) => Some(s.clone()),
        Some(other) => {
            wrong_type = Some(type_name(other));
            None
        }
    };
    let string_at = |d: &Document, p: &str| match get_path(d, p) {
        Some(Bson::String(s)) => Some(s.clone()),
        _ => None,
    };
    let kind: Option<String> = type_path.and_then(|tp| {
        v.source
            .and_then(|d| string_at(d, tp))
            .or_else(|| mem_kind.map(str::to_owned))
    });

    // Previous status: pre-image first, then memory.
    let previous_raw: Option<String> = v
        .pre
        .filter(|_| v.op != Op::Delete)
        .and_then(|p| string_at(p, path))
        .or_else(|| mem_raw.map(str::to_owned));
    let previous = previous_raw.as_deref().map(|r| {
        let pre_kind = type_path
            .and_then(|tp| v.pre.and_then(|p| string_at(p, tp)))
            .or_else(|| kind.clone());
        canonical(r, pre_kind.as_deref()).0
    });
    let info = raw.as_ref().map(|r| {
        let (status, progress, unknown) = canonical(r, kind.as_deref());
        StatusInfo {
            status: status.into(),
            raw: r.clone(),
            previous: if v.op == Op::Insert {
                None
            } else {
                previous.clone().map(Into::into)
            },
            progress,
            unknown,
        }
    });
    let touched = match v.op {
        Op::Update => v.changed.iter().any(|c| touches(c, path)),
        Op::Replace => match (&previous_raw, &raw) {
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
fn status_in_updated<'a>(updated: &'a Document, path: &str) -> Option<&'a Bson> {
    if let Some(v) = updated.get(path) {
        return Some(v);
    }
    for (k, v) in updated {
        if let Some(rest) = path
            .strip_prefix(k.as_str())
            .and_then(|r| r.strip_prefix('.'))
        {
            if let Bson::Document(d) = v {
                return get_path(d, rest);
            }
        }
    }
    None
}
