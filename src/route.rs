//! Rooms and per-audience payloads: allowlist projections of a document, the status fields, the changed paths an audience may know of, BSON → JSON; no I/O, knows nothing of who may join or which collection it is.
//!
//! Each audience gets an allowlisted projection of the document plus event
//! fields, never the raw document. `normalize` is its sibling that reads the
//! change; the engine (`declared`) uses both.

use bson::{Bson, Document};
use serde_json::{Map, Value};

use crate::docpath::{get_path, is_under};
use crate::event::StatusInfo;

/// Deepest nesting converted to JSON; deeper values become `null` so a hostile
/// document cannot exhaust the stack.
const MAX_JSON_DEPTH: usize = 32;

/// Field names changecast adds to the built-in collections' payloads (they override
/// document fields of the same name).
#[cfg(test)]
pub(crate) const EVENT_FIELDS: [&str; 10] = [
    "orderId",
    "paymentId",
    "storeId",
    "status",
    "rawStatus",
    "previousStatus",
    "progress",
    "unknown",
    "changedFields",
    "sections",
];

/// A status's event fields (`status`, `rawStatus`, `previousStatus`, `unknown`, and for
/// orders `progress`), the same for every collection that has a status table.
pub(crate) fn insert_status(data: &mut Map<String, Value>, st: &StatusInfo, progress: bool) {
    data.insert("status".into(), Value::String(st.status.clone()));
    data.insert("rawStatus".into(), Value::String(st.raw.clone()));
    data.insert(
        "previousStatus".into(),
        st.previous.clone().map_or(Value::Null, Value::String),
    );
    if progress {
        data.insert(
            "progress".into(),
            st.progress.map_or(Value::Null, Value::from),
        );
    }
    data.insert("unknown".into(), Value::Bool(st.unknown));
}

/// Changed paths an audience may know about: those inside an allowlisted path
/// as written, and for an ancestor of allowlisted paths, those paths.
pub(crate) fn visible_changes(changed: &[String], allow: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    };
    for c in changed {
        for a in allow {
            if c == a || is_under(c, a) {
                push(c);
            } else if is_under(a, c) {
                push(a);
            }
        }
    }
    out
}

/// The allowlisted paths of `doc` as a JSON object (nested for dotted paths).
pub(crate) fn project(doc: &Document, allow: &[String]) -> Map<String, Value> {
    project_paths(doc, allow.iter().map(String::as_str))
}

/// [`project`] over any sequence of paths (settings project several sections' lists).
pub(crate) fn project_paths<'a>(
    doc: &Document,
    paths: impl IntoIterator<Item = &'a str>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for path in paths {
        let Some(v) = get_path(doc, path) else {
            continue;
        };
        let segs: Vec<&str> = path.split('.').collect();
        insert_path(&mut out, &segs, bson_to_json(v));
    }
    out
}

/// Inserts `value` at `segs`, creating objects; an ancestor already included whole wins.
fn insert_path(map: &mut Map<String, Value>, segs: &[&str], value: Value) {
    match segs {
        [] => {}
        [last] => {
            map.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = map
                .entry((*first).to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = entry {
                insert_path(m, rest, value);
            }
        }
    }
}

/// BSON → the JSON clients see: ObjectId as hex, dates as RFC 3339, decimals as
/// strings, non-finite doubles and BSON-only types (binary, regex, code…) as `null`.
pub(crate) fn bson_to_json(b: &Bson) -> Value {
    to_json(b, 0)
}

fn to_json(b: &Bson, depth: usize) -> Value {
    if depth > MAX_JSON_DEPTH {
        return Value::Null;
    }
    match b {
        Bson::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Bson::String(s) | Bson::Symbol(s) => Value::String(s.clone()),
        Bson::Array(a) => Value::Array(a.iter().map(|v| to_json(v, depth + 1)).collect()),
        Bson::Document(d) => Value::Object(
            d.iter()
                .map(|(k, v)| (k.clone(), to_json(v, depth + 1)))
                .collect(),
        ),
        Bson::Boolean(x) => Value::Bool(*x),
        Bson::Int32(i) => Value::from(*i),
        Bson::Int64(i) => Value::from(*i),
        Bson::ObjectId(o) => Value::String(o.to_hex()),
        Bson::DateTime(d) => d
            .try_to_rfc3339_string()
            .map_or_else(|_| Value::from(d.timestamp_millis()), Value::String),
        Bson::Decimal128(d) => Value::String(d.to_string()),
        Bson::Timestamp(t) => Value::from(t.time),
        Bson::Null
        | Bson::Undefined
        | Bson::RegularExpression(_)
        | Bson::JavaScriptCode(_)
        | Bson::JavaScriptCodeWithScope(_)
        | Bson::Binary(_)
        | Bson::MaxKey
        | Bson::MinKey
        | Bson::DbPointer(_) => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, spec::BinarySubtype, Binary};

    #[test]
    fn projection_and_json() {
        let d = doc! {"a": {"b": 1, "c": 2}, "x": f64::NAN, "bin": Binary{subtype: BinarySubtype::Generic, bytes: vec![1]}, "dec": "1"};
        let p = project(
            &d,
            &["a.b".into(), "x".into(), "bin".into(), "missing".into()],
        );
        assert_eq!(
            Value::Object(p),
            serde_json::json!({"a": {"b": 1}, "x": null, "bin": null})
        );
        let mut deep = Bson::Int32(1);
        for _ in 0..200 {
            deep = Bson::Document(doc! {"d": deep});
        }
        let _ = bson_to_json(&deep);
    }
}
