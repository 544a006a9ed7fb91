//! A lean reader of BSON bytes in place: the elements of a document as (key, type, value bytes), and one value by key; never allocates, never panics on hostile bytes.
//!
//! The bson crate's raw iterator validates every key as UTF-8 and wraps every element
//! in an error context; on the event path, where a change is read a few dozen times
//! (routing paths, status, projections), that cost more than the decoding it replaced
//! (issue 16's profile). This reader only finds element boundaries; values are
//! checked when they are used (a string when it is written, a document when entered).
//! A malformed element ends its document there: what came before it stays readable.

use bson::oid::ObjectId;
use bson::raw::{RawBinaryRef, RawBsonRef, RawDocument, RawRegexRef};
use bson::spec::BinarySubtype;
use bson::{DateTime, Decimal128, Timestamp};

/// BSON element types (the spec's type bytes).
pub(crate) mod kind {
    pub(crate) const DOUBLE: u8 = 0x01;
    pub(crate) const STRING: u8 = 0x02;
    pub(crate) const DOCUMENT: u8 = 0x03;
    pub(crate) const ARRAY: u8 = 0x04;
    pub(crate) const BINARY: u8 = 0x05;
    pub(crate) const UNDEFINED: u8 = 0x06;
    pub(crate) const OBJECT_ID: u8 = 0x07;
    pub(crate) const BOOLEAN: u8 = 0x08;
    pub(crate) const DATE_TIME: u8 = 0x09;
    pub(crate) const NULL: u8 = 0x0A;
    pub(crate) const REGEX: u8 = 0x0B;
    pub(crate) const DB_POINTER: u8 = 0x0C;
    pub(crate) const CODE: u8 = 0x0D;
    pub(crate) const SYMBOL: u8 = 0x0E;
    pub(crate) const CODE_WITH_SCOPE: u8 = 0x0F;
    pub(crate) const INT32: u8 = 0x10;
    pub(crate) const TIMESTAMP: u8 = 0x11;
    pub(crate) const INT64: u8 = 0x12;
    pub(crate) const DECIMAL128: u8 = 0x13;
    pub(crate) const MIN_KEY: u8 = 0xFF;
    pub(crate) const MAX_KEY: u8 = 0x7F;
}

/// One element of a document.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Elem<'a> {
    /// The key's bytes (not checked as UTF-8: compared as bytes, checked when written).
    pub(crate) key: &'a [u8],
    /// The type byte.
    pub(crate) kind: u8,
    /// The value's bytes, exactly (a string's include its length and trailing NUL).
    pub(crate) value: &'a [u8],
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The length of a NUL-terminated string starting at `at`, NUL included.
fn cstring_len(b: &[u8], at: usize) -> Option<usize> {
    Some(b.get(at..)?.iter().position(|&c| c == 0)? + 1)
}

/// The length of the value of type `kind` starting at `at` in `b`.
fn value_len(b: &[u8], at: usize, kind: u8) -> Option<usize> {
    let len = |extra: usize| -> Option<usize> {
        let n = usize::try_from(i32_at(b, at)?).ok()?;
        n.checked_add(extra)
    };
    match kind {
        kind::DOUBLE | kind::DATE_TIME | kind::TIMESTAMP | kind::INT64 => Some(8),
        kind::STRING | kind::CODE | kind::SYMBOL => len(4),
        kind::DOCUMENT | kind::ARRAY | kind::CODE_WITH_SCOPE => len(0),
        kind::BINARY => len(5),
        kind::UNDEFINED | kind::NULL | kind::MIN_KEY | kind::MAX_KEY => Some(0),
        kind::OBJECT_ID => Some(12),
        kind::BOOLEAN => Some(1),
        kind::REGEX => {
            let p = cstring_len(b, at)?;
            Some(p + cstring_len(b, at + p)?)
        }
        kind::DB_POINTER => len(4 + 12),
        kind::INT32 => Some(4),
        kind::DECIMAL128 => Some(16),
        _ => None,
    }
}

/// The elements of the document `doc` (its whole bytes, length prefix included).
pub(crate) fn elements(doc: &[u8]) -> Elements<'_> {
    // The declared length bounds the walk (a sub-document's bytes are exact already).
    let end = i32_at(doc, 0)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n >= 5 && *n <= doc.len())
        .map_or(0, |n| n - 1);
    Elements { doc, at: 4, end }
}

/// See [`elements`].
pub(crate) struct Elements<'a> {
    doc: &'a [u8],
    at: usize,
    end: usize,
}

impl<'a> Iterator for Elements<'a> {
    type Item = Elem<'a>;

    fn next(&mut self) -> Option<Elem<'a>> {
        let b = self.doc;
        if self.at >= self.end {
            return None;
        }
        let found = (|| {
            let kind = *b.get(self.at)?;
            let key_at = self.at + 1;
            let klen = cstring_len(b, key_at)?;
            let value_at = key_at + klen;
            let vlen = value_len(b, value_at, kind)?;
            let value_end = value_at.checked_add(vlen).filter(|e| *e <= self.end)?;
            Some((
                Elem {
                    key: b.get(key_at..value_at - 1)?,
                    kind,
                    value: b.get(value_at..value_end)?,
                },
                value_end,
            ))
        })();
        match found {
            Some((e, next)) => {
                self.at = next;
                Some(e)
            }
            None => {
                // Malformed: the document ends here.
                self.at = self.end;
                None
            }
        }
    }
}

/// The first element of `doc` keyed `key`.
pub(crate) fn find<'a>(doc: &'a [u8], key: &str) -> Option<Elem<'a>> {
    elements(doc).find(|e| e.key == key.as_bytes())
}

impl<'a> Elem<'a> {
    /// A string's text, when it is one and valid UTF-8.
    pub(crate) fn str(&self) -> Option<&'a str> {
        (self.kind == kind::STRING)
            .then(|| self.text_bytes())
            .flatten()
            .and_then(utf8)
    }

    /// The bytes of a string, symbol or code value (without length and NUL).
    pub(crate) fn text_bytes(&self) -> Option<&'a [u8]> {
        match self.kind {
            kind::STRING | kind::SYMBOL | kind::CODE => {
                self.value.get(4..self.value.len().checked_sub(1)?)
            }
            _ => None,
        }
    }

    /// The key as text (keys of a valid document are UTF-8).
    pub(crate) fn key_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.key).ok()
    }

    pub(crate) fn f64(&self) -> Option<f64> {
        Some(f64::from_le_bytes(self.value.get(..8)?.try_into().ok()?))
    }

    pub(crate) fn i32(&self) -> Option<i32> {
        i32_at(self.value, 0)
    }

    pub(crate) fn i64(&self) -> Option<i64> {
        i64_at(self.value, 0)
    }

    pub(crate) fn bool(&self) -> Option<bool> {
        self.value.first().map(|b| *b != 0)
    }

    pub(crate) fn object_id(&self) -> Option<ObjectId> {
        Some(ObjectId::from_bytes(self.value.get(..12)?.try_into().ok()?))
    }

    pub(crate) fn timestamp(&self) -> Option<Timestamp> {
        Some(Timestamp {
            increment: u32_at(self.value, 0)?,
            time: u32_at(self.value, 4)?,
        })
    }

    pub(crate) fn date_time(&self) -> Option<DateTime> {
        self.i64().map(DateTime::from_millis)
    }

    pub(crate) fn decimal(&self) -> Option<Decimal128> {
        Some(Decimal128::from_bytes(
            self.value.get(..16)?.try_into().ok()?,
        ))
    }

    /// The value as the bson crate's raw reference (`None` when malformed; arrays and
    /// the rare kinds through the crate's own reader of `parent`).
    pub(crate) fn to_ref(self, parent: &'a RawDocument) -> Option<RawBsonRef<'a>> {
        Some(match self.kind {
            kind::DOUBLE => RawBsonRef::Double(self.f64()?),
            kind::STRING => RawBsonRef::String(self.str()?),
            kind::SYMBOL => RawBsonRef::Symbol(utf8(self.text_bytes()?)?),
            kind::CODE => RawBsonRef::JavaScriptCode(utf8(self.text_bytes()?)?),
            kind::DOCUMENT => RawBsonRef::Document(RawDocument::from_bytes(self.value).ok()?),
            kind::BOOLEAN => RawBsonRef::Boolean(self.bool()?),
            kind::NULL => RawBsonRef::Null,
            kind::UNDEFINED => RawBsonRef::Undefined,
            kind::MIN_KEY => RawBsonRef::MinKey,
            kind::MAX_KEY => RawBsonRef::MaxKey,
            kind::INT32 => RawBsonRef::Int32(self.i32()?),
            kind::INT64 => RawBsonRef::Int64(self.i64()?),
            kind::OBJECT_ID => RawBsonRef::ObjectId(self.object_id()?),
            kind::DATE_TIME => RawBsonRef::DateTime(self.date_time()?),
            kind::TIMESTAMP => RawBsonRef::Timestamp(self.timestamp()?),
            kind::DECIMAL128 => RawBsonRef::Decimal128(self.decimal()?),
            kind::BINARY => {
                let subtype = BinarySubtype::from(*self.value.get(4)?);
                let bytes = self.value.get(5..)?;
                if subtype == BinarySubtype::BinaryOld {
                    // The old binary subtype nests a second length: the crate's reader knows it.
                    return parent.get(self.key_str()?).ok()?;
                }
                RawBsonRef::Binary(RawBinaryRef { subtype, bytes })
            }
            kind::REGEX => {
                let p = cstring_len(self.value, 0)?;
                let pattern = std::str::from_utf8(self.value.get(..p - 1)?).ok()?;
                let options = std::str::from_utf8(self.value.get(p..self.value.len() - 1)?).ok()?;
                RawBsonRef::RegularExpression(RawRegexRef { pattern, options })
            }
            // Arrays (the crate's `RawArray` has no public constructor), code with
            // scope and DB pointers: the crate's own lookup.
            _ => parent.get(self.key_str()?).ok()??,
        })
    }
}

fn utf8(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// The first value of `doc` keyed `key`, as the crate's raw reference.
pub(crate) fn get<'a>(doc: &'a RawDocument, key: &str) -> Option<RawBsonRef<'a>> {
    find(doc.as_bytes(), key)?.to_ref(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Bson, RawDocumentBuf};

    fn sample() -> bson::Document {
        doc! {
            "d": 1.5, "s": "x\u{e9}", "doc": {"a": 1, "b": [1, "y"]}, "arr": [1, {"k": null}],
            "bin": bson::Binary { subtype: BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "old": bson::Binary { subtype: BinarySubtype::BinaryOld, bytes: vec![4, 5] },
            "u": Bson::Undefined, "o": ObjectId::new(), "t": true, "f": false,
            "dt": DateTime::from_millis(1_700_000_000_000), "n": null,
            "re": bson::Regex { pattern: "a+".into(), options: "i".into() },
            "code": Bson::JavaScriptCode("f()".into()),
            "scope": Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope { code: "g()".into(), scope: doc! {"x": 1} }),
            "sym": Bson::Symbol("sy".into()), "i": 7, "ts": Timestamp { time: 5, increment: 9 },
            "l": -8_i64, "dec": Decimal128::from_bytes([3; 16]), "min": Bson::MinKey, "max": Bson::MaxKey,
        }
    }

    #[test]
    fn every_value_reads_as_the_crate_reads_it() {
        let raw = RawDocumentBuf::from_document(&sample()).unwrap();
        let keys: Vec<&[u8]> = elements(raw.as_bytes()).map(|e| e.key).collect();
        let theirs: Vec<&str> = raw.iter().map(|r| r.unwrap().0).collect();
        assert_eq!(
            keys,
            theirs.iter().map(|k| k.as_bytes()).collect::<Vec<_>>()
        );
        for (k, v) in raw.iter().map(Result::unwrap) {
            assert_eq!(get(&raw, k), Some(v), "{k}");
        }
        assert_eq!(get(&raw, "missing"), None);
    }

    #[test]
    fn hostile_bytes_end_the_document_without_panicking() {
        let raw = RawDocumentBuf::from_document(&sample()).unwrap();
        let bytes = raw.as_bytes();
        // Every truncation and every single-byte change: no panic, and never more
        // elements than the whole document has.
        let whole = elements(bytes).count();
        for cut in 0..bytes.len() {
            assert!(elements(&bytes[..cut]).count() <= whole);
        }
        for i in 0..bytes.len() {
            for x in [0u8, 1, 0x7f, 0xff] {
                let mut b = bytes.to_vec();
                b[i] = x;
                for e in elements(&b) {
                    let _ = (e.str(), e.f64(), e.timestamp(), e.key_str());
                    if matches!(e.kind, kind::DOCUMENT | kind::ARRAY) {
                        let _ = elements(e.value).count();
                    }
                }
            }
        }
    }
}
