//! Dotted paths into BSON documents and the ids found there; no knowledge of collections, rooms or events.

use bson::{Bson, Document};

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

/// The value at a dotted path; does not descend into arrays (an index would be a guess).
pub(crate) fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut cur = doc;
    let mut segs = path.split('.').peekable();
    while let Some(seg) = segs.next() {
        let v = cur.get(seg)?;
        if segs.peek().is_none() {
            return Some(v);
        }
        match v {
            Bson::Document(d) => cur = d,
            _ => return None,
        }
    }
    None
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

/// Outcome of reading an id at the first present of several paths.
pub(crate) enum Lookup {
    /// An id usable in a room name.
    Found(String),
    /// No path holds a non-null value.
    Missing,
    /// The first present value is no id; its BSON type.
    WrongType(&'static str),
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

/// Whether `path` lies strictly inside `ancestor` (`a.b` is under `a`, `ab` is not).
pub(crate) fn is_under(path: &str, ancestor: &str) -> bool {
    path.len() > ancestor.len()
        && path.starts_with(ancestor)
        && path.as_bytes().get(ancestor.len()) == Some(&b'.')
}

/// Whether a changed path touches `target`: equal, an ancestor of it, or inside it.
pub(crate) fn touches(changed: &str, target: &str) -> bool {
    changed == target || is_under(target, changed) || is_under(changed, target)
}
