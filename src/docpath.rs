//! Dotted paths into BSON documents and the ids found there; no knowledge of collections, rooms or events.

use bson::raw::{RawBsonRef, RawDocument};
use bson::spec::ElementType;

use crate::bsonscan;
use bson::{Bson, Document};

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

/// Outcome of reading an id at the first present of several paths.
pub(crate) enum Lookup {
    /// An id usable in a room name.
    Found(String),
    /// No path holds a non-null value.
    Missing,
    /// The first present value is no id; its BSON type.
    WrongType(&'static str),
}

/// The value at a dotted path of a raw document, as [`get_path`]; a part that is not
/// valid BSON counts as absent (the server sends none; a hostile byte never panics).
pub(crate) fn raw_path<'a>(doc: &'a RawDocument, path: &str) -> Option<RawBsonRef<'a>> {
    let mut cur = doc;
    let mut segs = path.split('.').peekable();
    while let Some(seg) = segs.next() {
        if segs.peek().is_none() {
            return bsonscan::get(cur, seg);
        }
        cur = raw_doc(cur, seg)?;
    }
    None
}

/// The sub-document at `key`, when it is one.
pub(crate) fn raw_doc<'a>(doc: &'a RawDocument, key: &str) -> Option<&'a RawDocument> {
    let e = bsonscan::find(doc.as_bytes(), key)?;
    if e.kind != bsonscan::kind::DOCUMENT {
        return None;
    }
    RawDocument::from_bytes(e.value).ok()
}

/// The string at `key`, when it is one.
pub(crate) fn raw_str<'a>(doc: &'a RawDocument, key: &str) -> Option<&'a str> {
    bsonscan::find(doc.as_bytes(), key)?.str()
}

/// The type name of a raw value, as [`type_name`] names it.
pub(crate) fn raw_type_name(b: RawBsonRef<'_>) -> &'static str {
    match b.element_type() {
        ElementType::Double => "double",
        ElementType::String => "string",
        ElementType::Array => "array",
        ElementType::EmbeddedDocument => "object",
        ElementType::Boolean => "bool",
        ElementType::Null => "null",
        ElementType::RegularExpression => "regex",
        ElementType::JavaScriptCode | ElementType::JavaScriptCodeWithScope => "javascript",
        ElementType::Int32 => "int",
        ElementType::Int64 => "long",
        ElementType::Timestamp => "timestamp",
        ElementType::Binary => "binData",
        ElementType::ObjectId => "objectId",
        ElementType::DateTime => "date",
        ElementType::Symbol => "symbol",
        ElementType::Decimal128 => "decimal",
        ElementType::Undefined => "undefined",
        ElementType::MaxKey => "maxKey",
        ElementType::MinKey => "minKey",
        ElementType::DbPointer => "dbPointer",
    }
}

/// [`id_string`] of a raw value.
pub(crate) fn raw_id_string(b: RawBsonRef<'_>) -> Result<String, &'static str> {
    match b {
        RawBsonRef::ObjectId(o) => Ok(o.to_hex()),
        RawBsonRef::String(s) => Ok(s.to_owned()),
        RawBsonRef::Int32(i) => Ok(i.to_string()),
        RawBsonRef::Int64(i) => Ok(i.to_string()),
        other => Err(raw_type_name(other)),
    }
}

/// [`lookup_id`] in a raw document.
pub(crate) fn raw_lookup_id(doc: &RawDocument, paths: &[String]) -> Lookup {
    for p in paths {
        match raw_path(doc, p) {
            None | Some(RawBsonRef::Null) => continue,
            Some(v) => {
                return match raw_id_string(v) {
                    Ok(s) => Lookup::Found(s),
                    Err(t) => Lookup::WrongType(t),
                }
            }
        }
    }
    Lookup::Missing
}

/// A raw value as an owned one (values the engine remembers or compares); a part
/// that is not valid BSON becomes `Null`.
pub(crate) fn to_bson(v: RawBsonRef<'_>) -> Bson {
    v.to_raw_bson().try_into().unwrap_or(Bson::Null)
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
