//! mongod's size limits and the error codes tied to them, and BSON encoded sizes; knows
//! nothing of streams or commands. The constants are public so tests can aim just over them.

use bson::{Bson, Document};

/// `BSONObjMaxUserSize`: the largest document a client may store, and `hello`'s
/// `maxBsonObjectSize` (16 MiB).
pub const MAX_BSON_OBJECT_SIZE: usize = 16 * 1024 * 1024;

/// `BSONObjMaxInternalSize` (16 MiB + 16 KiB): mongod serializes every change event it
/// returns against this bound, so a larger event fails the `aggregate`/`getMore` with
/// [`BSON_OBJECT_TOO_LARGE`] unless `$changeStreamSplitLargeEvent` splits it. Measured after
/// the stream's own stages, so a `$project` can bring an event back under it.
pub const MAX_CHANGE_EVENT_SIZE: usize = MAX_BSON_OBJECT_SIZE + 16 * 1024;

/// `kBSONObjMaxChangeEventSize` (`BSONObjMaxInternalSize` − 8 KiB = 16 MiB + 8 KiB):
/// `$changeStreamSplitLargeEvent` leaves events of at most this size whole and splits larger
/// ones into fragments of at most this size minus the event's resume-token document, which
/// leaves room in the reply for `postBatchResumeToken`.
pub const SPLIT_EVENT_THRESHOLD: usize = MAX_CHANGE_EVENT_SIZE - 8 * 1024;

/// `BSONObjectTooLarge`: an oversized event without the split stage.
pub const BSON_OBJECT_TOO_LARGE: i32 = 10334;

/// `ChangeStreamFatalError`: among others, resuming from a fragment's token without the
/// split stage, or when the resumed pipeline splits the event differently.
pub const CHANGE_STREAM_FATAL_ERROR: i32 = 280;

/// `$changeStreamSplitLargeEvent` anywhere but last (or twice).
pub const SPLIT_STAGE_NOT_LAST: i32 = 7182802;

/// A split whose fragment cannot fit, because one top-level field alone is too large.
pub const SPLIT_FRAGMENT_TOO_LARGE: i32 = 7182500;

/// A cursor batch stops growing once the next document would take it past this many bytes
/// (mongod's 16 MB reply budget, minus headroom); the first document always goes.
pub(crate) const BATCH_BYTES: usize = MAX_BSON_OBJECT_SIZE - 64 * 1024;

/// Encoded size of a document (length prefix, elements, terminator).
pub(crate) fn doc_size(d: &Document) -> usize {
    4 + d.iter().map(|(k, v)| element_size(k, v)).sum::<usize>() + 1
}

/// Encoded size of one element: type byte, key, NUL, value.
pub(crate) fn element_size(key: &str, v: &Bson) -> usize {
    1 + key.len() + 1 + value_size(v)
}

fn value_size(v: &Bson) -> usize {
    let string = |s: &str| 4 + s.len() + 1;
    match v {
        Bson::Double(_) | Bson::DateTime(_) | Bson::Timestamp(_) | Bson::Int64(_) => 8,
        Bson::Int32(_) => 4,
        Bson::Boolean(_) => 1,
        Bson::Null | Bson::Undefined | Bson::MaxKey | Bson::MinKey => 0,
        Bson::ObjectId(_) => 12,
        Bson::Decimal128(_) => 16,
        Bson::String(s) | Bson::JavaScriptCode(s) | Bson::Symbol(s) => string(s),
        Bson::Document(d) => doc_size(d),
        Bson::Array(a) => {
            4 + a
                .iter()
                .enumerate()
                .map(|(i, v)| element_size(&i.to_string(), v))
                .sum::<usize>()
                + 1
        }
        Bson::Binary(b) => {
            // The old binary subtype repeats the length inside the payload.
            let old = if b.subtype == bson::spec::BinarySubtype::BinaryOld {
                4
            } else {
                0
            };
            4 + 1 + old + b.bytes.len()
        }
        Bson::RegularExpression(r) => r.pattern.len() + 1 + r.options.len() + 1,
        // Rare enough to measure by encoding.
        other => bson::to_vec(&bson::doc! {"": other.clone()})
            .map(|v| v.len() - 4 - 1 - 2)
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, Binary, DateTime, Timestamp};

    #[test]
    fn sizes_match_the_encoder() {
        let d = doc! {
            "_id": {"_data": "8200"},
            "s": "héllo",
            "n": 1, "l": 2i64, "f": 1.5, "b": true, "z": null,
            "o": ObjectId::new(), "t": Timestamp {time: 1, increment: 2}, "w": DateTime::now(),
            "a": [1, "x", {"y": [null]}],
            "bin": Binary {subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3]},
            "re": bson::Regex {pattern: "a.*".into(), options: "i".into()},
            "code": Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope {code: "x".into(), scope: doc! {"q": 1}}),
        };
        assert_eq!(doc_size(&d), bson::to_vec(&d).unwrap().len());
        assert_eq!(
            MAX_CHANGE_EVENT_SIZE, 16_793_600,
            "the bound in mongod's error message"
        );
        assert_eq!(SPLIT_EVENT_THRESHOLD, 16_785_408);
    }
}
