//! One change stream per watched database: open, read, resume; knows nothing of events or rooms.

use std::sync::Arc;
use std::time::Duration;

use bson::raw::{RawArray, RawBsonRef, RawDocument};
use bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::Client;

use crate::bsonscan;
use crate::token::{self, StartAt};

/// MongoDB's `ChangeStreamHistoryLost`: the resume point has fallen out of the oplog.
pub(crate) const HISTORY_LOST: i32 = 286;

/// MongoDB's `BSONObjectTooLarge`: a change event (after `updateLookup` and the pipeline)
/// is over the 16 MiB document limit. The `getMore` that would return it fails, and so
/// does every resume before it: see `Pipeline`'s oversize handling.
pub(crate) const TOO_LARGE: i32 = 10334;

/// MongoDB's answer when an event must be split but one of its fields alone is over the
/// fragment limit: the change cannot be returned either way, as with [`TOO_LARGE`].
pub(crate) const SPLIT_FIELD_TOO_LARGE: i32 = 7_182_500;

/// Server errors that retrying cannot fix, so the stream stops for the operator instead of
/// reconnecting forever: `Unauthorized` (13, the user lacks `changeStream`/`find`),
/// `InvalidResumeToken` (260, a token from another cluster or mistyped), the three ways
/// mongod refuses a token it cannot decode (`FailedToParse` 9 for one that is not hex,
/// 40649 for an empty one, 50811 for bytes that are no KeyString; SecantusDB answers 9 to
/// any token not its own), `ChangeStreamFatalError` (280), 40573 (change streams need a
/// replica set), and 40415 (an option the server does not know: `fullDocumentBeforeChange`
/// needs MongoDB 6.0+).
pub(crate) const FATAL_CODES: [i32; 8] = [9, 13, 260, 280, 40415, 40573, 40649, 50811];

/// Why a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The resume point is no longer in the oplog (code 286).
    #[error(
        "resume point of stream {database} is no longer in the oplog (ChangeStreamHistoryLost)"
    )]
    HistoryLost {
        /// The database whose stream failed.
        database: String,
    },
    /// The stream failed in a way a reconnect from the last token may fix.
    #[error("change stream on {database}: {detail}")]
    Mongo {
        /// The database.
        database: String,
        /// The server's or driver's reason, without the raw reply the driver's `Display` adds.
        detail: String,
    },
    /// The server refused the stream in a way no retry can fix (see [`FATAL_CODES`]).
    #[error("change stream on {database} refused: {detail}")]
    Fatal {
        /// The database.
        database: String,
        /// The server's reason.
        detail: String,
    },
    /// A change event is over the server's document limit (code 10334) and cannot be
    /// returned whole (the server cannot split it, or one field alone is too large).
    #[error("change stream on {database}: a change event is over the 16 MiB limit: {detail}")]
    TooLarge {
        /// The database.
        database: String,
        /// The server's reason.
        detail: String,
    },
    /// The server ended the stream (invalidate, e.g. the database was dropped).
    #[error("change stream on {database} was invalidated by the server")]
    Invalidated {
        /// The database.
        database: String,
    },
}

/// What the pipeline has found out about the server, shared with the replays.
#[derive(Debug, Default)]
pub(crate) struct ServerTraits {
    refuses_lost_history: std::sync::OnceLock<bool>,
    splits_large_events: std::sync::OnceLock<bool>,
}

impl ServerTraits {
    /// Whether a start at a time older than the server's history is known to fail loudly
    /// (see [`Source::refuses_lost_history`]); false until known.
    pub(crate) fn refuses_lost_history(&self) -> bool {
        self.refuses_lost_history.get().copied().unwrap_or(false)
    }

    /// Whether it has been asked yet.
    pub(crate) fn known(&self) -> bool {
        self.refuses_lost_history.get().is_some()
    }

    /// Records the answer (the first one counts).
    pub(crate) fn learn(&self, refuses_lost_history: bool) {
        let _ = self.refuses_lost_history.set(refuses_lost_history);
    }

    /// Whether the server accepts `$changeStreamSplitLargeEvent` (MongoDB 7.0, 6.0.9);
    /// false until known.
    pub(crate) fn splits_large_events(&self) -> bool {
        self.splits_large_events.get().copied().unwrap_or(false)
    }

    /// Whether that has been asked yet.
    pub(crate) fn split_known(&self) -> bool {
        self.splits_large_events.get().is_some()
    }

    /// Records whether the server splits large events (the first answer counts).
    pub(crate) fn learn_split(&self, splits: bool) {
        let _ = self.splits_large_events.set(splits);
    }
}

/// Changes per batch unless a caller asks otherwise. Without it the server fills each
/// `getMore` up to 16 MiB while a stream catches up (a restart, a burst of writes, an
/// `updateMany`): the driver reads such a reply whole into buffers of that size before
/// the first of its changes is mapped. A thousand ~1 KiB changes is about 1 MiB per
/// reply, and a round trip per thousand changes costs nothing next to them (a follow of
/// 60,000 changes used the same CPU within its noise either way).
pub(crate) const BATCH_CHANGES: u32 = 1000;

/// What the stream watches and how.
#[derive(Debug, Clone)]
pub(crate) struct SourceSpec {
    /// The database to watch.
    pub(crate) database: String,
    /// Collections kept by the `$match` (the app's orders, payments, settings).
    pub(crate) collections: Vec<String>,
    /// How long one `getMore` waits for changes; also how often an idle token advances.
    pub(crate) max_await: Duration,
    /// Ask the server to split events over 16 MiB into fragments (`Source::next`
    /// reassembles them); only where `ServerTraits::splits_large_events` says it can.
    pub(crate) split_large_events: bool,
    /// Changes per batch ([`BATCH_CHANGES`] by default); `Some(1)` while the pipeline
    /// looks for an oversized event (the failing `getMore` then holds that event alone).
    pub(crate) batch_size: Option<u32>,
    /// The top-level fields of `fullDocument` / `fullDocumentBeforeChange` that mapping
    /// reads (see `app::document_fields`); the server drops the rest before sending the
    /// event. `None`: whole documents.
    pub(crate) fields: Option<Arc<[String]>>,
}

impl SourceSpec {
    /// A spec with the defaults for the optional parts (no splitting, [`BATCH_CHANGES`]).
    pub(crate) fn new(database: &str, collections: Vec<String>, max_await: Duration) -> Self {
        Self {
            database: database.to_owned(),
            collections,
            max_await,
            split_large_events: false,
            batch_size: Some(BATCH_CHANGES),
            fields: None,
        }
    }

    /// The same spec, asking for only `fields` of the documents.
    pub(crate) fn with_fields(mut self, fields: Option<Arc<[String]>>) -> Self {
        self.fields = fields;
        self
    }
}

/// The parts of a change event that mapping, numbering and resuming read, beside the
/// documents. A `$project` naming them is an inclusion projection: anything not named
/// (the apps' large fields, `collectionUUID`, a rename's `to`) stays on the server.
/// `splitEvent` too: mongod adds it after every user stage, but SecantusDB splits before
/// them, and an inclusion projection without it strips its fragments' tags, which turns
/// one split change into several whole ones with parts of its documents.
const EVENT_FIELDS: [&str; 9] = [
    "operationType",
    "clusterTime",
    "wallTime",
    "ns",
    "documentKey",
    "updateDescription",
    "txnNumber",
    "lsid",
    "splitEvent",
];

/// `{$project: ...}` keeping `event` (the event's own fields) and, of its documents,
/// only `paths` (top-level names on the live stream: a dotted allowlist path keeps its
/// whole first field, so what routing reads of it — arrays, scalars where a document was
/// expected — is exactly what the full document held). `_id` (the resume token) is
/// always kept.
fn projection(event: &[&str], paths: &[String]) -> Document {
    let mut p = doc! {};
    for f in event {
        p.insert(*f, 1);
    }
    for f in paths {
        p.insert(format!("fullDocument.{f}"), 1);
        p.insert(format!("fullDocumentBeforeChange.{f}"), 1);
    }
    p
}

/// The stage that makes the server split an event over 16 MiB (it must come last).
const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

/// An event whose fragments are being read.
struct Partial {
    /// The fields so far (without `_id` and `splitEvent`).
    doc: Document,
    /// The fragment expected next (1-based) and how many there are.
    next: i32,
    of: i32,
    /// The resume token before the event's first fragment: checkpoints and reconnects
    /// never stop between fragments, so a crash repeats the whole event.
    before: Option<ResumeToken>,
}

/// An open change stream and the newest token it has handed out.
pub(crate) struct Source {
    spec: SourceSpec,
    /// Raw events, converted here: the driver's own decoding goes through serde's
    /// visitors, which cost about twice a direct walk of the bytes (bench/analysis.md).
    stream: ChangeStream<RawDocumentBuf>,
    partial: Option<Partial>,
}

impl Source {
    /// Opens the stream at `start`.
    pub(crate) async fn open(
        client: &Client,
        spec: SourceSpec,
        start: &StartAt,
    ) -> Result<Self, SourceError> {
        // Only the configured collections: the checkpoint collection and the
        // app's other collections never reach normalization.
        let mut pipeline = vec![doc! {"$match": {"ns.coll": {"$in": &spec.collections}}}];
        if let Some(fields) = &spec.fields {
            pipeline.push(doc! {"$project": projection(&EVENT_FIELDS, fields)});
        }
        if spec.split_large_events {
            pipeline.push(doc! {SPLIT_STAGE: {}});
        }
        Self::open_with(client, spec, start, pipeline).await
    }

    /// Opens the stream at `start` with `pipeline` (the collection `$match` first).
    async fn open_with(
        client: &Client,
        spec: SourceSpec,
        start: &StartAt,
        pipeline: Vec<Document>,
    ) -> Result<Self, SourceError> {
        let db = client.database(&spec.database);
        let mut watch = db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            // Pre-images where the collection records them (`changeStreamPreAndPostImages`,
            // MongoDB 6.0+): the owners of a delete, and of an update whose document is gone
            // by lookup time, then come from MongoDB rather than this process's memory.
            .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
            .max_await_time(spec.max_await);
        if let Some(n) = spec.batch_size {
            watch = watch.batch_size(n);
        }
        match start {
            StartAt::Token(t) => {
                // startAfter (not resumeAfter) also accepts an invalidate's token.
                let t = token::from_document(t).ok_or_else(|| SourceError::Fatal {
                    database: spec.database.clone(),
                    detail: "the resume token is not a BSON document".into(),
                })?;
                watch = watch.start_after(t);
            }
            StartAt::Time(ts) => watch = watch.start_at_operation_time(*ts),
            StartAt::Now => {}
        }
        let stream = watch.await.map_err(|e| classify(&spec.database, e))?;
        Ok(Self {
            spec,
            stream: stream.with_type::<RawDocumentBuf>(),
            partial: None,
        })
    }

    /// Whether the server accepts `$changeStreamSplitLargeEvent`: a stream with it is
    /// opened at "now" and closed. `None` when the answer is unclear (server unreachable).
    pub(crate) async fn splits_large_events(client: &Client, spec: &SourceSpec) -> Option<bool> {
        let opened = client
            .database(&spec.database)
            .watch()
            .pipeline([
                doc! {"$match": {"ns.coll": {"$in": &spec.collections}}},
                doc! {SPLIT_STAGE: {}},
            ])
            .max_await_time(Duration::from_millis(100))
            .await;
        match opened {
            Ok(_) => Some(true),
            // A refusal with a server code (40324, an unknown stage, on MongoDB before
            // 6.0.9; other servers answer their own): the server cannot split.
            Err(e) if error_code(&e).is_some() => Some(false),
            Err(_) => None,
        }
    }

    /// The first change after `start` that the stream would return, with its big parts
    /// left on the server: the event's id, time, namespace, document key and, of its
    /// documents, only `keep` (the paths routing reads). Used after a `getMore` of one
    /// change failed with `BSONObjectTooLarge`, to learn which change that was and skip it.
    pub(crate) async fn peek_next(
        client: &Client,
        spec: &SourceSpec,
        start: &StartAt,
        keep: &[String],
    ) -> Result<Option<Document>, SourceError> {
        // Without the update description (it may be what made the change too large) and
        // without `splitEvent` (this stream does not ask for splitting).
        let event: Vec<&str> = EVENT_FIELDS
            .into_iter()
            .filter(|f| !matches!(*f, "updateDescription" | "splitEvent"))
            .collect();
        let projection = projection(&event, keep);
        let spec = SourceSpec {
            batch_size: Some(1),
            split_large_events: false,
            ..spec.clone()
        };
        let pipeline = vec![
            doc! {"$match": {"ns.coll": {"$in": &spec.collections}}},
            doc! {"$project": projection},
        ];
        let mut source = Self::open_with(client, spec, start, pipeline).await?;
        // The change exists (the failed getMore met it), so a short wait suffices; an
        // empty batch first is possible while the server scans.
        for _ in 0..5 {
            if let Some(change) = source.next().await? {
                return Ok(Some(decode(&change).map_err(|e| source.invalid(&e))?));
            }
        }
        Ok(None)
    }

    /// The server's current operation time, read from a one-document `find` in a session:
    /// a stream opened at it (inclusive) starts exactly "now" at a known position, which
    /// `StartAt::Now` does not tell. `None` when the server does not report it.
    pub(crate) async fn server_time(client: &Client, spec: &SourceSpec) -> Option<bson::Timestamp> {
        let coll = spec.collections.first()?;
        let mut session = client.start_session().await.ok()?;
        client
            .database(&spec.database)
            .collection::<Document>(coll)
            .find_one(doc! {})
            .session(&mut session)
            .await
            .ok()?;
        session.operation_time()
    }

    /// Whether the server refuses a stream that starts at a time older than its history
    /// (MongoDB: `ChangeStreamHistoryLost`) rather than silently starting later
    /// (SecantusDB does). Only where it refuses is a time-only position a safe start
    /// point. Asked once with a start in 1970; `None` when the answer is unclear.
    pub(crate) async fn refuses_lost_history(client: &Client, spec: &SourceSpec) -> Option<bool> {
        let probe = SourceSpec {
            max_await: Duration::from_millis(100),
            ..spec.clone()
        };
        let epoch = StartAt::Time(bson::Timestamp {
            time: 1,
            increment: 0,
        });
        match Self::open(client, probe, &epoch).await {
            Err(SourceError::HistoryLost { .. }) => Some(true),
            Err(_) => None,
            Ok(mut s) => match s.next().await {
                Err(SourceError::HistoryLost { .. }) => Some(true),
                Err(_) => None,
                Ok(_) => Some(false),
            },
        }
    }

    /// One `getMore`'s worth: the next change, or `None` when the batch was empty
    /// (the token still advances then, so an idle stream's checkpoint stays fresh).
    ///
    /// A split event (`splitEvent: {fragment, of}`) comes back whole: its fragments, which
    /// the server sends one after another, are read and merged first, and the event
    /// carries the last fragment's token, after which a resume continues.
    pub(crate) async fn next(&mut self) -> Result<Option<RawDocumentBuf>, SourceError> {
        loop {
            if !self.stream.is_alive() {
                return Err(SourceError::Invalidated {
                    database: self.spec.database.clone(),
                });
            }
            // The driver's token before this change (a small byte copy, converted only if
            // the change turns out to be a first fragment).
            let before = self.partial.is_none().then(|| self.stream.resume_token());
            let got = self
                .stream
                .next_if_any()
                .await
                .map_err(|e| classify(&self.spec.database, e))?;
            let Some(raw) = got else {
                if self.partial.is_some() {
                    // The rest of a split event is on its way: keep reading.
                    continue;
                }
                return Ok(None);
            };
            // A whole event goes on as the server sent it, read in place downstream;
            // only the fragments of a split one are decoded, to be merged.
            if self.partial.is_none() && bsonscan::find(raw.as_bytes(), "splitEvent").is_none() {
                return Ok(Some(raw));
            }
            let change = decode(&raw).map_err(|e| self.invalid(&e))?;
            match fragment(&change) {
                None if self.partial.is_some() => {
                    return Err(self.broken_split("a whole event arrived between fragments"))
                }
                None => return Ok(Some(raw)),
                Some(Err(why)) => return Err(self.broken_split(why)),
                Some(Ok((n, of))) => {
                    if let Some(whole) = self.assemble(change, n, of, before.flatten())? {
                        let whole =
                            RawDocumentBuf::from_document(&whole).map_err(|e| self.invalid(&e))?;
                        return Ok(Some(whole));
                    }
                }
            }
        }
    }

    fn invalid(&self, e: &dyn std::fmt::Display) -> SourceError {
        SourceError::Mongo {
            database: self.spec.database.clone(),
            detail: format!("a change event that is not valid BSON: {e}"),
        }
    }

    /// Adds fragment `n` of `of`; the whole event once the last one is in.
    fn assemble(
        &mut self,
        change: Document,
        n: i32,
        of: i32,
        before: Option<ResumeToken>,
    ) -> Result<Option<Document>, SourceError> {
        if n == 1 {
            self.partial = Some(Partial {
                doc: Document::new(),
                next: 1,
                of,
                before,
            });
        }
        let Some(p) = self.partial.as_mut() else {
            return Err(self.broken_split("a fragment arrived without the first one"));
        };
        if n != p.next || of != p.of {
            let why = format!(
                "fragment {n} of {of} arrived, {} of {} expected",
                p.next, p.of
            );
            return Err(self.broken_split(&why));
        }
        let id = change.get("_id").cloned();
        for (k, v) in change {
            if k != "_id" && k != "splitEvent" {
                p.doc.insert(k, v);
            }
        }
        p.next += 1;
        tracing::debug!(database = %self.spec.database, fragment = n, of, "read a fragment of a split change event");
        if n < of {
            return Ok(None);
        }
        let mut whole = Document::new();
        if let Some(id) = id {
            // The last fragment's token: resuming after it continues after the event.
            whole.insert("_id", id);
        }
        let p = self.partial.take().expect("checked above");
        whole.extend(p.doc);
        Ok(Some(whole))
    }

    /// A split event that cannot be put back together: the stream reconnects from the
    /// token before its first fragment and reads it again.
    fn broken_split(&mut self, why: &str) -> SourceError {
        tracing::warn!(database = %self.spec.database, reason = why, "split change event out of order; reading it again");
        SourceError::Mongo {
            database: self.spec.database.clone(),
            detail: format!("split change event out of order: {why}"),
        }
    }

    /// The token to resume after everything returned so far: while a split event is
    /// half read, the token before it, so no save and no reconnect lands between fragments.
    /// In the driver's form (a byte copy; see [`Self::token`] for a document).
    pub(crate) fn resume_token(&self) -> Option<ResumeToken> {
        match &self.partial {
            Some(p) => p.before.clone(),
            None => self.stream.resume_token(),
        }
    }

    /// [`Self::resume_token`] as a document (start points, operators' logs).
    pub(crate) fn token(&self) -> Option<Document> {
        self.resume_token().as_ref().and_then(token::to_document)
    }
}

/// The server error code of a driver error, if it carries one.
pub(crate) fn error_code(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// `Some((fragment, of))` for a fragment of a split event, `None` for a whole one.
fn fragment(change: &Document) -> Option<Result<(i32, i32), &'static str>> {
    let split = change.get("splitEvent")?;
    let parsed = split.as_document().and_then(|d| {
        let n = d.get("fragment").and_then(number)?;
        let of = d.get("of").and_then(number)?;
        (1..=of).contains(&n).then_some((n, of))
    });
    Some(parsed.ok_or("splitEvent is not {fragment, of} with 1 <= fragment <= of"))
}

fn number(v: &bson::Bson) -> Option<i32> {
    match v {
        bson::Bson::Int32(n) => Some(*n),
        bson::Bson::Int64(n) => i32::try_from(*n).ok(),
        _ => None,
    }
}

fn classify(database: &str, e: MongoError) -> SourceError {
    let database = database.to_owned();
    // The error kind alone: the driver's full `Display` appends the raw server reply as bytes.
    let detail = e.kind.to_string();
    match error_code(&e) {
        Some(HISTORY_LOST) => SourceError::HistoryLost { database },
        Some(TOO_LARGE | SPLIT_FIELD_TOO_LARGE) => SourceError::TooLarge { database, detail },
        Some(code) if FATAL_CODES.contains(&code) => SourceError::Fatal { database, detail },
        _ => SourceError::Mongo { database, detail },
    }
}

/// A fragment of a split change event as an owned document, to be merged, element by
/// element (the driver's `Document::try_from` copies every sub-document into an owned
/// raw buffer first, once per nesting level).
fn decode(raw: &RawDocument) -> bson::raw::Result<Document> {
    let mut out = Document::new();
    for el in raw {
        let (k, v) = el?;
        out.insert(k, decode_value(v)?);
    }
    Ok(out)
}

fn decode_array(raw: &RawArray) -> bson::raw::Result<Vec<Bson>> {
    raw.into_iter().map(|v| decode_value(v?)).collect()
}

fn decode_value(v: RawBsonRef<'_>) -> bson::raw::Result<Bson> {
    Ok(match v {
        RawBsonRef::Double(f) => Bson::Double(f),
        RawBsonRef::String(s) => Bson::String(s.to_owned()),
        RawBsonRef::Document(d) => Bson::Document(decode(d)?),
        RawBsonRef::Array(a) => Bson::Array(decode_array(a)?),
        RawBsonRef::Boolean(b) => Bson::Boolean(b),
        RawBsonRef::Null => Bson::Null,
        RawBsonRef::Int32(i) => Bson::Int32(i),
        RawBsonRef::Int64(i) => Bson::Int64(i),
        RawBsonRef::ObjectId(o) => Bson::ObjectId(o),
        RawBsonRef::DateTime(d) => Bson::DateTime(d),
        RawBsonRef::Timestamp(t) => Bson::Timestamp(t),
        RawBsonRef::Decimal128(d) => Bson::Decimal128(d),
        // The rare types through the driver's own conversion.
        other => Bson::try_from(other.to_raw_bson())?,
    })
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    #[test]
    fn decoding_matches_the_drivers_conversion() {
        let d = doc! {
            "_id": {"_data": "82AB"}, "f": 1.5, "s": "x", "n": null, "b": true, "i": 1, "l": 2_i64,
            "o": bson::oid::ObjectId::new(), "dt": bson::DateTime::now(),
            "ts": bson::Timestamp { time: 1, increment: 2 },
            "arr": [1, {"a": [2, "y"]}], "deep": {"a": {"b": {"c": 1}}},
            "re": bson::Regex { pattern: "a".into(), options: "i".into() },
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
            "dec": bson::Decimal128::from_bytes([0; 16]), "u": Bson::Undefined, "min": Bson::MinKey,
        };
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        assert_eq!(
            decode(&raw).unwrap(),
            Document::try_from(raw.as_ref()).unwrap()
        );
        assert_eq!(decode(&raw).unwrap(), d);
    }
}
