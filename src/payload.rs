//! Per-audience payloads as JSON text: allowlist plans, BSON written straight to JSON, and the shared [`Payload`]; no knowledge of rooms, collections or sockets.
//!
//! A payload is written at most once per audience, directly from the document's BSON
//! into one `String`, and shared (an `Arc`) by every room with the same allowlist and
//! by both wires' framing, which splice the text in: no `serde_json::Value` tree per
//! audience, no second serialization (issue 16). It is written when first read (a
//! recipient's encoding, a recovery, `tail`), not when the change is mapped: most rooms
//! have nobody in them when their change passes (a customer's app is closed, the
//! dashboards watch another replica), and their payloads are never written at all.

use std::fmt;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use bson::raw::RawDocument;

use crate::bsonscan::{elements, kind, Elem};

/// Deepest nesting written as JSON; deeper values become `null` so that a hostile
/// document cannot exhaust the stack.
const MAX_JSON_DEPTH: usize = 32;

/// One audience's payload: JSON text (an object; `null` for a notice with no document),
/// written on first read, cheap to clone and to share.
#[derive(Clone)]
pub struct Payload(Arc<Text>);

/// A payload's text, once written.
pub(crate) struct Written {
    json: Box<str>,
    /// The top-level `status` string, when there is one (Socket.IO aliases branch on it).
    status: Option<Arc<str>>,
}

/// What the payloads of one change are written from, shared by them (the document's
/// bytes, each audience's plan): one per change, where a boxed recipe per audience
/// was before, so a change that reaches nobody costs one allocation for all of its
/// payloads' makings, and history frees one.
pub(crate) trait Source: Send + Sync {
    /// The payload of audience `at` (an index the source handed out with it).
    fn write(&self, at: usize) -> Written;
}

enum Text {
    Ready(Written),
    /// Written by the first reader from its change's source. The source stays until the
    /// change's last payload goes (its history entry ages out), written or not.
    Later {
        written: OnceLock<Written>,
        source: Arc<dyn Source>,
        at: usize,
    },
}

impl Payload {
    /// Audience `at`'s payload of `source`, written when first read.
    pub(crate) fn later(source: Arc<dyn Source>, at: usize) -> Self {
        Self(Arc::new(Text::Later {
            written: OnceLock::new(),
            source,
            at,
        }))
    }

    fn written(&self) -> &Written {
        match &*self.0 {
            Text::Ready(w) => w,
            Text::Later {
                written,
                source,
                at,
            } => written.get_or_init(|| source.write(*at)),
        }
    }

    /// The JSON text (written now if nobody has read it before).
    pub fn as_str(&self) -> &str {
        &self.written().json
    }

    /// The top-level `status` field when it is a string.
    pub fn status(&self) -> Option<&Arc<str>> {
        self.written().status.as_ref()
    }

    /// The payload parsed (tests, debugging; the event path never parses).
    pub fn value(&self) -> serde_json::Value {
        // The text is written by this module or serialized from a `Value`: valid JSON.
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }

    /// A payload from a JSON value (notices with no document behind them, tests).
    pub fn from_value(v: &serde_json::Value) -> Self {
        let status = v.get("status").and_then(|s| s.as_str()).map(Arc::from);
        Self(Arc::new(Text::Ready(Written {
            json: v.to_string().into(),
            status,
        })))
    }
}

impl PartialEq for Payload {
    /// The same JSON value: equal text, or texts that parse to equal values (key order
    /// is not part of a JSON object's meaning).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || self.as_str() == other.as_str()
            || self.value() == other.value()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An allowlist compiled into a tree of keys: dotted paths share their ancestors, and
/// an ancestor included whole covers its descendants.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
struct Node {
    key: String,
    /// `None`: the whole value; else only these keys of a sub-document.
    sub: Option<Plan>,
}

impl Plan {
    /// The plan of `paths`, in their order of first mention.
    pub(crate) fn new<'a>(paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut plan = Plan::default();
        for p in paths {
            plan.add(&p.split('.').collect::<Vec<_>>());
        }
        plan
    }

    /// The node for `key`; plans are short (an allowlist), so a scan is the fastest,
    /// with the length and the last byte compared before the bytes.
    fn find(&self, key: &[u8]) -> Option<usize> {
        let last = key.last();
        self.nodes.iter().position(|n| {
            let k = n.key.as_bytes();
            k.len() == key.len() && k.last() == last && k == key
        })
    }

    fn add(&mut self, segs: &[&str]) {
        let Some((first, rest)) = segs.split_first() else {
            return;
        };
        let i = match self.find(first.as_bytes()) {
            Some(i) => i,
            None => {
                self.nodes.push(Node {
                    key: (*first).to_owned(),
                    sub: Some(Plan::default()),
                });
                self.nodes.len() - 1
            }
        };
        let node = &mut self.nodes[i];
        if rest.is_empty() {
            node.sub = None;
        } else if let Some(sub) = node.sub.as_mut() {
            sub.add(rest);
        }
    }
}

/// Which nodes of a plan a pass has written.
enum Seen {
    Bits(u64),
    Many(Vec<bool>),
}

impl Seen {
    fn new(n: usize) -> Self {
        if n <= 64 {
            Self::Bits(0)
        } else {
            Self::Many(vec![false; n])
        }
    }

    /// Marks node `i`; false when it was marked already.
    fn insert(&mut self, i: usize) -> bool {
        match self {
            Self::Bits(b) => {
                let bit = 1u64 << i;
                let new = *b & bit == 0;
                *b |= bit;
                new
            }
            Self::Many(v) => !std::mem::replace(&mut v[i], true),
        }
    }
}

/// Writes one JSON object; fields are added once each, by the caller's rules.
pub(crate) struct Obj {
    buf: String,
    empty: bool,
    status: Option<Arc<str>>,
}

impl Obj {
    /// An empty object, with room for a typical payload.
    pub(crate) fn new() -> Self {
        Self::with_capacity(512)
    }

    /// An empty object with room for `bytes` of text (a payload written from a
    /// document: about the document's size, so that it is written without growing).
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        let mut buf = String::with_capacity(bytes);
        buf.push('{');
        Self {
            buf,
            empty: true,
            status: None,
        }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.buf.push(',');
        }
        self.empty = false;
        write_str(&mut self.buf, key);
        self.buf.push(':');
    }

    /// The fields of `doc` that `plan` names, leaving out the top-level keys in `skip`
    /// (the event fields the caller writes itself override document fields).
    pub(crate) fn project(&mut self, doc: &RawDocument, plan: &Plan, skip: &[&str]) {
        // One pass over the document, matching its keys against the plan: a lookup
        // per planned key would re-read the document from its start.
        let mut seen = Seen::new(plan.nodes.len());
        for e in elements(doc.as_bytes()) {
            let Some(i) = plan.find(e.key) else {
                continue;
            };
            let node = &plan.nodes[i];
            // A key repeated in the document: the first one counts, as a lookup finds.
            if !seen.insert(i) || skip.contains(&node.key.as_str()) {
                continue;
            }
            let mark = (self.buf.len(), self.empty);
            self.key(&node.key);
            let wrote = match &node.sub {
                None => {
                    if node.key == "status" {
                        self.status = e.str().map(Arc::from);
                    }
                    write_value(&mut self.buf, e, 1);
                    true
                }
                Some(sub) => match e.kind {
                    kind::DOCUMENT => write_projection(&mut self.buf, e.value, sub, 1),
                    _ => false,
                },
            };
            if !wrote {
                // No path under this key is present: the key is not shown at all.
                self.buf.truncate(mark.0);
                self.empty = mark.1;
            }
        }
    }

    /// `key: "s"`.
    pub(crate) fn str(&mut self, key: &str, s: &str) {
        if key == "status" {
            self.status = Some(Arc::from(s));
        }
        self.key(key);
        write_str(&mut self.buf, s);
    }

    /// `key: "s"` or `key: null`.
    pub(crate) fn opt_str(&mut self, key: &str, s: Option<&str>) {
        match s {
            Some(s) => self.str(key, s),
            None => self.raw(key, "null"),
        }
    }

    /// `key: true|false`.
    pub(crate) fn bool(&mut self, key: &str, b: bool) {
        self.raw(key, if b { "true" } else { "false" });
    }

    /// `key: n` or `key: null`.
    pub(crate) fn opt_u8(&mut self, key: &str, n: Option<u8>) {
        self.key(key);
        match n {
            Some(n) => {
                let _ = write!(self.buf, "{n}");
            }
            None => self.buf.push_str("null"),
        }
    }

    /// `key: ["a", …]`.
    pub(crate) fn strs<'a>(&mut self, key: &str, items: impl IntoIterator<Item = &'a str>) {
        self.key(key);
        self.buf.push('[');
        for (i, s) in items.into_iter().enumerate() {
            if i > 0 {
                self.buf.push(',');
            }
            write_str(&mut self.buf, s);
        }
        self.buf.push(']');
    }

    /// `key: <json>`, where `json` is valid JSON text.
    pub(crate) fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.buf.push_str(json);
    }

    /// `key: <value>`.
    pub(crate) fn value(&mut self, key: &str, v: &serde_json::Value) {
        if key == "status" {
            self.status = v.as_str().map(Arc::from);
        }
        self.key(key);
        // Writing a `Value` into a `String` cannot fail.
        let _ = write!(self.buf, "{v}");
    }

    /// The finished payload.
    pub(crate) fn finish(self) -> Payload {
        Payload(Arc::new(Text::Ready(self.written())))
    }

    /// The object closed, for a [`Payload::later`] recipe.
    pub(crate) fn written(mut self) -> Written {
        self.buf.push('}');
        Written {
            json: self.buf.into(),
            status: self.status,
        }
    }
}

/// `{…}` of the `plan` fields of `doc` (its bytes); false (and nothing meaningful
/// written) when none is present, as a caller then removes the key.
fn write_projection(buf: &mut String, doc: &[u8], plan: &Plan, depth: usize) -> bool {
    if depth > MAX_JSON_DEPTH {
        buf.push_str("null");
        return true;
    }
    buf.push('{');
    let mut any = false;
    let mut seen = Seen::new(plan.nodes.len());
    for e in elements(doc) {
        let Some(i) = plan.find(e.key) else {
            continue;
        };
        if !seen.insert(i) {
            continue;
        }
        let node = &plan.nodes[i];
        let mark = buf.len();
        if any {
            buf.push(',');
        }
        write_str(buf, &node.key);
        buf.push(':');
        let wrote = match &node.sub {
            None => {
                write_value(buf, e, depth + 1);
                true
            }
            Some(sub) => match e.kind {
                kind::DOCUMENT => write_projection(buf, e.value, sub, depth + 1),
                _ => false,
            },
        };
        if wrote {
            any = true;
        } else {
            buf.truncate(mark);
        }
    }
    buf.push('}');
    any
}

/// BSON → the JSON clients see: ObjectId as hex, dates as RFC 3339, decimals as
/// strings, non-finite doubles and BSON-only types (binary, regex, code…) as `null`;
/// read in place from the server's bytes (a malformed part ends its document or
/// array there; text that is not UTF-8 is written with replacement characters).
pub(crate) fn write_value(buf: &mut String, e: Elem<'_>, depth: usize) {
    if depth > MAX_JSON_DEPTH {
        buf.push_str("null");
        return;
    }
    let done = match e.kind {
        kind::DOUBLE => e.f64().filter(|f| f.is_finite()).map(|f| {
            // As serde_json writes a finite f64 (shortest round-trip form).
            buf.push_str(ryu::Buffer::new().format_finite(f));
        }),
        kind::STRING | kind::SYMBOL => e.text_bytes().map(|t| write_text(buf, t)),
        kind::ARRAY => {
            buf.push('[');
            for (i, v) in elements(e.value).enumerate() {
                if i > 0 {
                    buf.push(',');
                }
                write_value(buf, v, depth + 1);
            }
            buf.push(']');
            Some(())
        }
        kind::DOCUMENT => {
            buf.push('{');
            for (i, v) in elements(e.value).enumerate() {
                if i > 0 {
                    buf.push(',');
                }
                write_text(buf, v.key);
                buf.push(':');
                write_value(buf, v, depth + 1);
            }
            buf.push('}');
            Some(())
        }
        kind::BOOLEAN => e
            .bool()
            .map(|x| buf.push_str(if x { "true" } else { "false" })),
        kind::INT32 => e.i32().map(|i| buf.push_str(itoa::Buffer::new().format(i))),
        kind::INT64 => e.i64().map(|i| buf.push_str(itoa::Buffer::new().format(i))),
        kind::OBJECT_ID => e.object_id().map(|o| {
            buf.push('"');
            for byte in o.bytes() {
                buf.push(HEX[usize::from(byte >> 4)] as char);
                buf.push(HEX[usize::from(byte & 0xf)] as char);
            }
            buf.push('"');
        }),
        kind::DATE_TIME => e.date_time().map(|d| match d.try_to_rfc3339_string() {
            Ok(s) => write_str(buf, &s),
            Err(_) => buf.push_str(itoa::Buffer::new().format(d.timestamp_millis())),
        }),
        kind::DECIMAL128 => e.decimal().map(|d| write_str(buf, &d.to_string())),
        kind::TIMESTAMP => e
            .timestamp()
            .map(|t| buf.push_str(itoa::Buffer::new().format(t.time))),
        _ => None,
    };
    if done.is_none() {
        buf.push_str("null");
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Text from BSON bytes as a JSON string: UTF-8 as it is, anything else with
/// replacement characters (a server sends none; a hostile byte never makes bad JSON).
fn write_text(buf: &mut String, t: &[u8]) {
    match std::str::from_utf8(t) {
        Ok(s) => write_str(buf, s),
        Err(_) => write_str(buf, &String::from_utf8_lossy(t)),
    }
}

/// A JSON string literal, escaped as serde_json escapes (quote, backslash, controls).
pub(crate) fn write_str(buf: &mut String, s: &str) {
    buf.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // One table lookup per byte; almost every byte needs no escape.
        if !NEEDS_ESCAPE[usize::from(b)] {
            continue;
        }
        buf.push_str(&s[start..i]);
        match b {
            b'"' => buf.push_str("\\\""),
            b'\\' => buf.push_str("\\\\"),
            b'\n' => buf.push_str("\\n"),
            b'\r' => buf.push_str("\\r"),
            b'\t' => buf.push_str("\\t"),
            0x08 => buf.push_str("\\b"),
            0x0c => buf.push_str("\\f"),
            _ => {
                let _ = write!(buf, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    buf.push_str(&s[start..]);
    buf.push('"');
}

/// Bytes a JSON string cannot hold as they are: controls, `"` and `\\`.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, Document, RawDocumentBuf};
    use serde_json::json;

    fn projected(d: &Document, paths: &[&str], skip: &[&str]) -> serde_json::Value {
        let mut o = Obj::new();
        let raw = RawDocumentBuf::from_document(d).unwrap();
        o.project(&raw, &Plan::new(paths.iter().copied()), skip);
        o.finish().value()
    }

    #[test]
    fn projection_nests_dotted_paths_and_an_ancestor_wins() {
        let d = doc! {"a": {"b": 1, "c": 2, "d": {"e": 3}}, "x": f64::NAN, "s": "q\"\\\n\u{1}é",
        "bin": Binary{subtype: BinarySubtype::Generic, bytes: vec![1]}};
        assert_eq!(
            projected(&d, &["a.b", "x", "bin", "missing", "s"], &[]),
            json!({"a": {"b": 1}, "x": null, "bin": null, "s": "q\"\\\n\u{1}é"})
        );
        assert_eq!(
            projected(&d, &["a.b", "a"], &[]),
            json!({"a": {"b": 1, "c": 2, "d": {"e": 3}}})
        );
        assert_eq!(
            projected(&d, &["a", "a.b"], &[]),
            json!({"a": {"b": 1, "c": 2, "d": {"e": 3}}})
        );
        assert_eq!(
            projected(&d, &["a.d.e", "a.z"], &[]),
            json!({"a": {"d": {"e": 3}}})
        );
        // A path whose parts are absent or not documents shows nothing, not an empty object.
        assert_eq!(
            projected(&d, &["a.z", "s.t", "x.y", "a.b.c"], &[]),
            json!({})
        );
        assert_eq!(
            projected(&d, &["a", "s"], &["s"]),
            json!({"a": {"b": 1, "c": 2, "d": {"e": 3}}})
        );
    }

    #[test]
    fn values_are_written_as_serde_json_would_write_them() {
        let oid = ObjectId::new();
        let d = doc! {
            "f": 1.5, "g": 1e300, "h": -0.0, "i": 7_i64, "j": -3, "t": true, "n": null,
            "o": oid, "dt": bson::DateTime::from_millis(1_700_000_000_123),
            "arr": [1, "x", {"k": [2.0]}], "ts": bson::Timestamp{time: 9, increment: 1},
            "inf": f64::INFINITY,
        };
        let mut o = Obj::new();
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        o.project(&raw, &Plan::new(d.keys().map(String::as_str)), &[]);
        let p = o.finish();
        let mut reference = serde_json::Map::new();
        for (k, v) in &d {
            reference.insert(k.clone(), crate::route::bson_to_json(v));
        }
        assert_eq!(p.value(), serde_json::Value::Object(reference));
        assert!(p.as_str().contains(&format!("\"{}\"", oid.to_hex())));
    }

    #[test]
    fn deep_documents_end_in_null_and_status_is_seen() {
        let mut deep = Bson::Int32(1);
        for _ in 0..200 {
            deep = Bson::Document(doc! {"d": deep});
        }
        let d = doc! {"deep": deep, "status": "ready"};
        let mut o = Obj::new();
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        o.project(&raw, &Plan::new(["deep", "status"]), &[]);
        o.strs("changedFields", ["a", "b"]);
        o.opt_u8("progress", Some(40));
        let p = o.finish();
        assert!(p.value().is_object());
        assert_eq!(p.status().map(|s| &**s), Some("ready"));
        let mut o = Obj::new();
        o.str("status", "delivered");
        o.opt_str("previousStatus", None);
        assert_eq!(
            o.finish().value(),
            json!({"status": "delivered", "previousStatus": null})
        );
    }

    #[test]
    fn equality_is_by_json_value() {
        let a = Payload::from_value(&json!({"a": 1, "b": [true]}));
        let mut o = Obj::new();
        o.raw("b", "[true]");
        o.raw("a", "1");
        assert_eq!(a, o.finish());
        assert_ne!(a, Payload::from_value(&json!({"a": 2, "b": [true]})));
    }
}
