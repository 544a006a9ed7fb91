//! Rooms and per-audience payloads: allowlist projections of a document, the status fields, the changed paths an audience may know of, BSON → JSON; no I/O, knows nothing of who may join or which collection it is.
//!
//! Each audience gets an allowlisted projection of the document plus event
//! fields, never the raw document. `normalize` is its sibling that reads the
//! change; the engine (`declared`) uses both.

use bson::Bson;
use serde_json::Value;
use smallvec::SmallVec;

use crate::docpath::is_under;
use crate::event::StatusInfo;
use crate::payload::Obj;

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
pub(crate) fn write_status(data: &mut Obj, st: &StatusInfo, progress: bool) {
    data.str("status", &st.status);
    data.str("rawStatus", &st.raw);
    data.opt_str("previousStatus", st.previous.as_deref());
    if progress {
        data.opt_u8("progress", st.progress);
    }
    data.bool("unknown", st.unknown);
}

/// The keys [`write_status`] writes.
pub(crate) const STATUS_KEYS: [&str; 5] = [
    "status",
    "rawStatus",
    "previousStatus",
    "progress",
    "unknown",
];

/// Changed paths an audience may know about: those inside an allowlisted path
/// as written, and for an ancestor of allowlisted paths, those paths.
pub(crate) fn visible_changes<'a>(
    changed: &'a [String],
    allow: &'a [String],
) -> SmallVec<[&'a str; 8]> {
    // Borrowed, not copied: every payload of an update lists them once per audience.
    let mut out: SmallVec<[&'a str; 8]> = SmallVec::new();
    let mut push = |s: &'a str| {
        if !out.contains(&s) {
            out.push(s);
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

/// Whether [`visible_changes`] would list anything, without listing.
pub(crate) fn any_visible(changed: &[String], allow: &[String]) -> bool {
    changed.iter().any(|c| {
        allow
            .iter()
            .any(|a| c == a || is_under(c, a) || is_under(a, c))
    })
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
    use bson::doc;

    #[test]
    fn deep_values_end_in_null() {
        let mut deep = Bson::Int32(1);
        for _ in 0..200 {
            deep = Bson::Document(doc! {"d": deep});
        }
        assert!(bson_to_json(&deep).is_object());
    }

    #[test]
    fn visible_changes_follow_the_allowlist() {
        let allow = vec!["a.b".to_owned(), "c".to_owned()];
        let changed = vec!["a".to_owned(), "c.d".to_owned(), "e".to_owned()];
        assert_eq!(visible_changes(&changed, &allow).as_slice(), ["a.b", "c.d"]);
    }

    #[test]
    fn any_visible_says_whether_visible_changes_lists_anything() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let allows = [s(&["a.b", "c"]), s(&["x"]), s(&[]), s(&["a"])];
        let changes = [
            s(&["a"]),
            s(&["a.b.c"]),
            s(&["c.d", "e"]),
            s(&["e"]),
            s(&["ab", "a.bc"]),
            s(&[]),
        ];
        for allow in &allows {
            for changed in &changes {
                assert_eq!(
                    any_visible(changed, allow),
                    !visible_changes(changed, allow).is_empty(),
                    "{changed:?} under {allow:?}"
                );
            }
        }
    }
}
