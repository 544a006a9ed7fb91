//! Change-stream cursors: option parsing, start positions, turning oplog entries into events
//! shaped as mongod shapes them, the 16 MiB event limit and `$changeStreamSplitLargeEvent`.
//! Waiting for new events is the server's job.

use std::collections::VecDeque;

use bson::{doc, Bson, Document, Timestamp};

use crate::error::{CmdError, CmdResult};
use crate::limits::{
    doc_size, element_size, BATCH_BYTES, BSON_OBJECT_TOO_LARGE, CHANGE_STREAM_FATAL_ERROR,
    MAX_CHANGE_EVENT_SIZE, SPLIT_EVENT_THRESHOLD, SPLIT_FRAGMENT_TOO_LARGE, SPLIT_STAGE_NOT_LAST,
};
use crate::oplog::{
    event_token, fragment_token, hwm_token, parse_token, position_ts, start_position, Entry,
};
use crate::pipeline::Stage;
use crate::store::{id_key, State};

/// Where the pipeline has `$changeStreamSplitLargeEvent`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SplitStage {
    /// Not in the pipeline: an event over [`MAX_CHANGE_EVENT_SIZE`] fails the command.
    Absent,
    /// Once, as the last stage: events over [`SPLIT_EVENT_THRESHOLD`] are split.
    Last,
    /// Anywhere else, or more than once: refused as mongod refuses it.
    Misplaced,
}

/// A document built for the client but not yet returned: the fragments of a split event
/// beyond the current batch, or an event that did not fit in the batch's byte budget.
#[derive(Debug, Clone)]
struct Out {
    doc: Document,
    /// The stream position once this document has been returned (its internal token).
    token: String,
    /// An invalidate closes the stream once returned.
    invalidate: bool,
}

/// What a stream watches.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scope {
    /// One collection.
    Coll(String, String),
    /// One database.
    Db(String),
    /// Every non-internal database.
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FullDoc {
    Default,
    UpdateLookup,
    WhenAvailable,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Before {
    Off,
    WhenAvailable,
    Required,
}

/// An open change stream.
#[derive(Debug, Clone)]
pub(crate) struct ChangeStream {
    scope: Scope,
    full: FullDoc,
    before: Before,
    expanded: bool,
    /// What the client has been given: the token of the last document returned, a
    /// high-water mark, the resume token it started from, or a `startAtOperationTime` prefix.
    /// Reported as `postBatchResumeToken`.
    pos: String,
    /// How far the oplog has been read: the stream goes on with entries whose token sorts
    /// after this. Equal to `pos` except while `pending` holds documents of the entry read last.
    scan: String,
    /// Built but not yet returned, in order; always drained before the oplog is read further.
    pending: VecDeque<Out>,
    stages: Vec<Stage>,
    /// Whether the pipeline ends with `$changeStreamSplitLargeEvent`.
    split: bool,
    /// Resuming from a fragment's token: the split event's own token and the fragment
    /// index. The stream must start by re-reading that event; cleared once it has.
    resume_split: Option<(String, u32)>,
    /// Set once an invalidate has been returned.
    pub(crate) closed: bool,
    /// Tokens go out in the unordered wire form (`SimConfig::unordered_tokens`).
    unordered: bool,
}

/// The wire form of an internal token: itself, or (unordered mode) a `3C` tag and the
/// hex reversed, so that later events no longer sort after earlier ones as strings.
fn wire_token(t: &str, unordered: bool) -> String {
    if unordered {
        format!("3C{}", t.chars().rev().collect::<String>())
    } else {
        t.to_owned()
    }
}

/// The internal token behind a wire form [`wire_token`] made.
fn unwire_token(t: &str, unordered: bool) -> String {
    match t.strip_prefix("3C").or_else(|| t.strip_prefix("3c")) {
        Some(rest) if unordered => rest.chars().rev().collect(),
        _ => t.to_owned(),
    }
}

fn internal_db(db: &str) -> bool {
    matches!(db, "admin" | "config" | "local")
}

fn internal_coll(coll: &str) -> bool {
    coll.starts_with("system.")
}

fn enum_value<T: Copy>(field: &str, v: &Bson, options: &[(&str, T)]) -> CmdResult<T> {
    let Bson::String(s) = v else {
        return Err(CmdError::type_mismatch(format!(
            "BSON field '$changeStream.{field}' is the wrong type '{}', expected type 'string'",
            v.element_type() as u8
        )));
    };
    options
        .iter()
        .find(|(name, _)| name == s)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            CmdError::bad_value(format!(
                "Enumeration value '{s}' for field '$changeStream.{field}' is not a valid value."
            ))
        })
}

fn token_of(field: &str, v: &Bson, unordered: bool) -> CmdResult<String> {
    let data = match v {
        Bson::Document(d) => d.get_str("_data").ok(),
        _ => None,
    };
    let data = data.ok_or_else(|| {
        CmdError::new(
            260,
            format!("Bad resume token: '{field}' must be a document with a string '_data' field"),
        )
    })?;
    let data = &unwire_token(data, unordered);
    parse_token(data).ok_or_else(|| CmdError::new(260, format!("Bad resume token: '_data' of {field} is not a resume token this server issued: {data}")))?;
    Ok(data.to_ascii_uppercase())
}

impl ChangeStream {
    /// Opens a stream from the `$changeStream` spec and the stages after it. `coll` is `None`
    /// for `aggregate: 1` (a database, or the cluster on `admin`).
    pub(crate) fn open(
        db: &str,
        coll: Option<&str>,
        spec: &Document,
        stages: Vec<Stage>,
        split: SplitStage,
        state: &State,
    ) -> CmdResult<ChangeStream> {
        if state.no_split_stage && split != SplitStage::Absent {
            // As mongod before 6.0.9 answers a stage it does not know.
            return Err(CmdError::new(
                40324,
                "Unrecognized pipeline stage name: '$changeStreamSplitLargeEvent'",
            ));
        }
        let mut full = FullDoc::Default;
        let mut before = Before::Off;
        let mut expanded = false;
        let mut all_cluster = false;
        let mut resume: Option<String> = None;
        let mut start_after: Option<String> = None;
        let mut start_at: Option<Timestamp> = None;
        for (k, v) in spec {
            match k.as_str() {
                "fullDocument" => {
                    full = enum_value(k, v, &[("default", FullDoc::Default), ("updateLookup", FullDoc::UpdateLookup), ("whenAvailable", FullDoc::WhenAvailable), ("required", FullDoc::Required)])?
                }
                "fullDocumentBeforeChange" => before = enum_value(k, v, &[("off", Before::Off), ("whenAvailable", Before::WhenAvailable), ("required", Before::Required)])?,
                "resumeAfter" => resume = Some(token_of(k, v, state.unordered_tokens)?),
                "startAfter" => start_after = Some(token_of(k, v, state.unordered_tokens)?),
                "startAtOperationTime" => match v {
                    Bson::Timestamp(t) => start_at = Some(*t),
                    _ => return Err(CmdError::type_mismatch("BSON field '$changeStream.startAtOperationTime' is the wrong type, expected type 'timestamp'")),
                },
                "allChangesForCluster" => all_cluster = matches!(v, Bson::Boolean(true)),
                "showExpandedEvents" => expanded = matches!(v, Bson::Boolean(true)),
                "showSystemEvents" | "showRawUpdateDescription" | "allowToRunOnConfigDB" | "allowToRunOnSystemNS" => {
                    return Err(CmdError::unsupported(format!("the $changeStream option '{k}'")))
                }
                other => return Err(CmdError::unknown_field("$changeStream", other)),
            }
        }
        if resume.is_some() && start_after.is_some() {
            return Err(CmdError::new(
                50865,
                "Do not specify both 'resumeAfter' and 'startAfter' in a $changeStream stage",
            ));
        }
        if start_at.is_some() && (resume.is_some() || start_after.is_some()) {
            return Err(CmdError::new(
                40674,
                "Only one type of resume option is allowed, but multiple were found.",
            ));
        }
        let scope = match coll {
            Some(c) => {
                if all_cluster {
                    return Err(CmdError::bad_value("A $changeStream with 'allChangesForCluster:true' may only be opened on the 'admin' database, and with no collection name"));
                }
                if internal_db(db) || internal_coll(c) {
                    return Err(CmdError::new(
                        73,
                        format!(
                            "$changeStream may not be opened on the internal {db}.{c} collection"
                        ),
                    ));
                }
                Scope::Coll(db.to_owned(), c.to_owned())
            }
            None if db == "admin" => {
                if !all_cluster {
                    return Err(CmdError::new(
                        73,
                        "$changeStream may not be opened on the internal admin database",
                    ));
                }
                Scope::Cluster
            }
            None => {
                if all_cluster {
                    return Err(CmdError::bad_value("A $changeStream with 'allChangesForCluster:true' may only be opened on the 'admin' database, and with no collection name"));
                }
                if internal_db(db) {
                    return Err(CmdError::new(
                        73,
                        format!("$changeStream may not be opened on the internal {db} database"),
                    ));
                }
                Scope::Db(db.to_owned())
            }
        };
        for s in &stages {
            if !s.is_streaming() {
                return Err(CmdError::new(20, "Only $match, $project, $addFields, $set, $unset, $replaceRoot, $replaceWith and $changeStreamSplitLargeEvent are permitted in a $changeStream pipeline"));
            }
        }
        // mongod checks these in this order: the stages allowed, then a fragment token
        // without the split stage, then the split stage's position.
        let resume_split = resume
            .as_deref()
            .or(start_after.as_deref())
            .and_then(parse_token)
            .and_then(|i| i.fragment);
        if resume_split.is_some() && split == SplitStage::Absent {
            return Err(CmdError::new(
                CHANGE_STREAM_FATAL_ERROR,
                "To resume from a split event, the $changeStream pipeline must include a $changeStreamSplitLargeEvent stage",
            ));
        }
        if split == SplitStage::Misplaced {
            return Err(CmdError::new(
                SPLIT_STAGE_NOT_LAST,
                "$changeStreamSplitLargeEvent must be the last stage in the pipeline",
            ));
        }
        let pos = if let Some(t) = resume {
            if parse_token(&t).is_some_and(|i| i.invalidate) {
                return Err(CmdError::new(260, "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification."));
            }
            t
        } else if let Some(t) = start_after {
            t
        } else if let Some(ts) = start_at {
            start_position(ts)
        } else {
            hwm_token(state.clock.now())
        };
        let cs = ChangeStream {
            scope,
            full,
            before,
            expanded,
            scan: pos.clone(),
            pos,
            pending: VecDeque::new(),
            stages,
            split: split == SplitStage::Last,
            resume_split,
            closed: false,
            unordered: state.unordered_tokens,
        };
        cs.check_history(state)?;
        Ok(cs)
    }

    fn check_history(&self, state: &State) -> CmdResult<()> {
        let ts = position_ts(&self.pos).unwrap_or(Timestamp {
            time: 0,
            increment: 0,
        });
        if state.oplog.history_lost(ts) {
            return Err(CmdError::new(286, "Resume of change stream was not possible, as the resume point may no longer be in the oplog."));
        }
        Ok(())
    }

    /// The `postBatchResumeToken` to report now.
    pub(crate) fn resume_token(&self) -> Document {
        doc! {"_data": wire_token(&self.pos, self.unordered)}
    }

    /// Whether an entry concerns this stream: `None` if not, `Some(invalidates)` if so.
    fn relevant(&self, e: &Entry) -> Option<bool> {
        let ddl = matches!(
            e.op.as_str(),
            "create" | "modify" | "createIndexes" | "dropIndexes"
        );
        if ddl && !self.expanded {
            return None;
        }
        match &self.scope {
            Scope::Coll(db, coll) => {
                if &e.db != db || e.coll.as_deref() != Some(coll.as_str()) {
                    return None;
                }
                Some(matches!(e.op.as_str(), "drop" | "rename"))
            }
            Scope::Db(db) => {
                if &e.db != db || e.coll.as_deref().is_some_and(internal_coll) {
                    return None;
                }
                Some(e.op == "dropDatabase")
            }
            Scope::Cluster => {
                if internal_db(&e.db) || e.coll.as_deref().is_some_and(internal_coll) {
                    return None;
                }
                Some(false)
            }
        }
    }

    fn build(&self, e: &Entry, state: &State) -> CmdResult<Document> {
        let mut ev = doc! {
            "_id": {"_data": wire_token(&e.token, self.unordered)},
            "operationType": e.op.clone(),
            "clusterTime": e.ts,
            "wallTime": e.wall,
        };
        if self.expanded {
            if let Some(u) = &e.uuid {
                ev.insert("collectionUUID", Bson::Binary(u.clone()));
            }
        }
        let ns = match &e.coll {
            Some(c) => doc! {"db": e.db.clone(), "coll": c.clone()},
            None => doc! {"db": e.db.clone()},
        };
        let key = e.doc_key.clone().unwrap_or_default();
        let missing = |what: &str| {
            CmdError::new(47, format!("Change stream was configured to require a {what} for all update, delete and replace events, but the {what} was not found for event: {}", e.token))
        };
        let pre = || -> CmdResult<Option<Bson>> {
            Ok(match self.before {
                Before::Off => None,
                Before::WhenAvailable => Some(
                    e.pre
                        .clone()
                        .filter(|_| e.images)
                        .map(Bson::Document)
                        .unwrap_or(Bson::Null),
                ),
                Before::Required => Some(Bson::Document(
                    e.pre
                        .clone()
                        .filter(|_| e.images)
                        .ok_or_else(|| missing("pre-image"))?,
                )),
            })
        };
        match e.op.as_str() {
            "insert" => {
                ev.insert(
                    "fullDocument",
                    e.post.clone().map(Bson::Document).unwrap_or(Bson::Null),
                );
                ev.insert("ns", ns);
                ev.insert("documentKey", key);
            }
            "update" => {
                ev.insert("ns", ns);
                ev.insert("documentKey", key.clone());
                let mut desc = e.desc.clone().unwrap_or_default();
                // mongod (6.1+) adds `disambiguatedPaths` (empty when nothing is
                // ambiguous) only for `showExpandedEvents` streams.
                if self.expanded {
                    if !desc.contains_key("disambiguatedPaths") {
                        desc.insert("disambiguatedPaths", Document::new());
                    }
                } else {
                    desc.remove("disambiguatedPaths");
                }
                ev.insert("updateDescription", desc);
                let post = match self.full {
                    FullDoc::Default => None,
                    FullDoc::UpdateLookup => Some(lookup(state, e, &key)),
                    FullDoc::WhenAvailable => Some(
                        e.post
                            .clone()
                            .filter(|_| e.images)
                            .map(Bson::Document)
                            .unwrap_or(Bson::Null),
                    ),
                    FullDoc::Required => Some(Bson::Document(
                        e.post
                            .clone()
                            .filter(|_| e.images)
                            .ok_or_else(|| missing("post-image"))?,
                    )),
                };
                if let Some(p) = post {
                    ev.insert("fullDocument", p);
                }
                if let Some(p) = pre()? {
                    ev.insert("fullDocumentBeforeChange", p);
                }
            }
            "replace" => {
                ev.insert(
                    "fullDocument",
                    e.post.clone().map(Bson::Document).unwrap_or(Bson::Null),
                );
                ev.insert("ns", ns);
                ev.insert("documentKey", key);
                if let Some(p) = pre()? {
                    ev.insert("fullDocumentBeforeChange", p);
                }
            }
            "delete" => {
                ev.insert("ns", ns);
                ev.insert("documentKey", key);
                if let Some(p) = pre()? {
                    ev.insert("fullDocumentBeforeChange", p);
                }
            }
            "rename" => {
                ev.insert("ns", ns);
                if let Some(x) = &e.extra {
                    if let Ok(to) = x.get_document("to") {
                        ev.insert("to", to.clone());
                    }
                }
            }
            _ => {
                ev.insert("ns", ns);
                if let Some(x) = &e.extra {
                    if let Ok(d) = x.get_document("operationDescription") {
                        ev.insert("operationDescription", d.clone());
                    }
                    if let Ok(d) = x.get_document("stateBeforeChange") {
                        ev.insert("stateBeforeChange", d.clone());
                    }
                }
            }
        }
        Ok(ev)
    }

    fn transform(&self, ev: Document) -> CmdResult<Option<Document>> {
        let id = ev.get("_id").cloned();
        let mut cur = ev;
        for s in &self.stages {
            match s.apply_one(cur)? {
                Some(d) => cur = d,
                None => return Ok(None),
            }
        }
        if cur.get("_id") != id.as_ref() {
            return Err(CmdError::new(280, "Encountered an event whose _id field, which contains the resume token, was modified by the pipeline. Modifying the _id field of an event makes it impossible to resume the stream from that point. Only transformations that retain the unmodified _id field are allowed."));
        }
        Ok(Some(cur))
    }

    /// Returns up to `batch_size` documents (and at most [`BATCH_BYTES`] beyond the first)
    /// after the current position and advances it; when the whole oplog has been scanned the
    /// position becomes a high-water mark at the current cluster time, so idle streams'
    /// resume tokens keep up. Call with the store locked.
    ///
    /// An event too large to return fails the call; the caller drops the cursor, as mongod
    /// kills a cursor whose `getMore` failed, and resuming from the last token the client
    /// holds meets the same event again.
    pub(crate) fn next_batch(
        &mut self,
        state: &State,
        batch_size: usize,
    ) -> CmdResult<Vec<Document>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if self.closed {
            return Ok(out);
        }
        self.check_history(state)?;
        if !self.drain(&mut out, &mut bytes, batch_size) {
            return Ok(out);
        }
        let start = match &self.resume_split {
            Some((event, _)) => state.oplog.first_at(event),
            None => state.oplog.first_after(&self.scan),
        };
        for e in state.oplog.entries().range(start..) {
            if out.len() >= batch_size {
                return Ok(out);
            }
            let resuming = self.resume_split.take();
            if let Some((event, _)) = &resuming {
                if &e.token != event {
                    return Err(self.token_not_found(event));
                }
            }
            self.scan.clone_from(&e.token);
            let Some(invalidates) = self.relevant(e) else {
                if let Some((event, _)) = &resuming {
                    return Err(self.token_not_found(event));
                }
                self.pos.clone_from(&e.token);
                continue;
            };
            let ev = self.build(e, state)?;
            match self.transform(ev)? {
                Some(ev) => {
                    let outs = self.outputs(e, ev, resuming)?;
                    self.pending.extend(outs);
                }
                None => {
                    if let Some((event, _)) = &resuming {
                        return Err(self.token_not_found(event));
                    }
                }
            }
            if self.pending.is_empty() {
                // Filtered out, or resumed after its last fragment: the client is past it.
                self.pos.clone_from(&e.token);
            }
            if invalidates {
                let token = event_token(e.ts, 0, true);
                self.pending.push_back(Out {
                    doc: doc! {
                        "_id": {"_data": wire_token(&token, self.unordered)},
                        "operationType": "invalidate",
                        "clusterTime": e.ts,
                        "wallTime": e.wall,
                    },
                    token,
                    invalidate: true,
                });
            }
            if !self.drain(&mut out, &mut bytes, batch_size) {
                return Ok(out);
            }
        }
        // Until the fragment a stream resumed from has been found again, its position must
        // stay there: a high-water mark would skip the rest of that event.
        if self.resume_split.is_none() {
            let hwm = hwm_token(state.clock.now());
            if hwm > self.pos {
                self.pos.clone_from(&hwm);
                self.scan = hwm;
            }
        }
        Ok(out)
    }

    /// Moves pending documents into the batch while they fit; `false` once the batch is full
    /// (count or bytes) or the stream closed, so the caller stops reading the oplog.
    fn drain(&mut self, out: &mut Vec<Document>, bytes: &mut usize, batch_size: usize) -> bool {
        while let Some(next) = self.pending.front() {
            let len = doc_size(&next.doc);
            // The first document always goes, whatever its size, so the stream progresses.
            if out.len() >= batch_size || (!out.is_empty() && *bytes + len > BATCH_BYTES) {
                return false;
            }
            let Some(next) = self.pending.pop_front() else {
                break;
            };
            *bytes += len;
            self.pos = next.token;
            out.push(next.doc);
            if next.invalidate {
                self.closed = true;
                return false;
            }
        }
        true
    }

    /// What the client receives for one event after the stream's stages: the event itself,
    /// or with the split stage and over [`SPLIT_EVENT_THRESHOLD`], its fragments (those after
    /// the one resumed from, when resuming from a fragment).
    fn outputs(
        &self,
        e: &Entry,
        ev: Document,
        resuming: Option<(String, u32)>,
    ) -> CmdResult<Vec<Out>> {
        let size = doc_size(&ev);
        let whole = |ev| {
            vec![Out {
                doc: ev,
                token: e.token.clone(),
                invalidate: false,
            }]
        };
        if !self.split {
            if size > MAX_CHANGE_EVENT_SIZE {
                return Err(too_large(size, &ev));
            }
            return Ok(whole(ev));
        }
        if size <= SPLIT_EVENT_THRESHOLD {
            if resuming.is_some() {
                return Err(CmdError::new(CHANGE_STREAM_FATAL_ERROR, "Attempted to resume from a split event fragment, but the event in the resumed stream was not large enough to be split"));
            }
            return Ok(whole(ev));
        }
        let fragments = split_event(&ev, &e.token, self.unordered)?;
        let skip = resuming.map_or(0, |(_, i)| i as usize + 1);
        if fragments.len() < skip {
            return Err(CmdError::new(CHANGE_STREAM_FATAL_ERROR, "Attempted to resume from a split event, but the resumed stream produced a different split. Ensure that the pipeline used to resume is the same as the original"));
        }
        Ok(fragments.into_iter().skip(skip).collect())
    }

    /// mongod's error when the event a stream resumes from is no longer what it reads first.
    fn token_not_found(&self, event: &str) -> CmdError {
        CmdError::new(
            CHANGE_STREAM_FATAL_ERROR,
            format!(
                "cannot resume stream; the resume token was not found. {{_data: \"{}\"}}",
                wire_token(event, self.unordered)
            ),
        )
    }
}

/// mongod's `BSONObjectTooLarge` for a document it cannot serialize: its size against
/// `BSONObjMaxInternalSize`, and the first element (the event's `_id`).
fn too_large(size: usize, ev: &Document) -> CmdError {
    let first = ev
        .iter()
        .next()
        .map(|(k, v)| format!("{k}: {}", shell_form(v)))
        .unwrap_or_else(|| "EOO".to_owned());
    CmdError::new(
        BSON_OBJECT_TOO_LARGE,
        format!("BSONObj size: {size} (0x{size:X}) is invalid. Size must be between 0 and {MAX_CHANGE_EVENT_SIZE}(16MB) First element: {first}"),
    )
}

/// A value as mongod's error messages print it: `{ _data: "82…" }`.
fn shell_form(v: &Bson) -> String {
    match v {
        Bson::String(s) => format!("{s:?}"),
        Bson::Document(d) if d.is_empty() => "{}".to_owned(),
        Bson::Document(d) => {
            let fields: Vec<String> = d
                .iter()
                .map(|(k, v)| format!("{k}: {}", shell_form(v)))
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        Bson::Array(a) => {
            let items: Vec<String> = a.iter().map(shell_form).collect();
            format!("[ {} ]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Splits an oversized event as mongod's `splitChangeEvent` does: every top-level field but
/// `_id`, ordered by encoded size then name (smallest first, so the first fragment carries as
/// many fields, the event's context, as possible), fills fragments greedily; each fragment
/// starts with its own `_id` (fragment token) and `splitEvent: {fragment, of}` (1-based).
/// A fragment holds at least one field; one that alone cannot fit fails the split.
fn split_event(ev: &Document, token: &str, unordered: bool) -> CmdResult<Vec<Out>> {
    let event_id = doc! {"_data": wire_token(token, unordered)};
    // Room for `postBatchResumeToken` in the same reply.
    let max = SPLIT_EVENT_THRESHOLD - doc_size(&event_id);
    let mut fields: Vec<(usize, &str, &Bson)> = ev
        .iter()
        .filter(|(k, _)| k.as_str() != "_id")
        .map(|(k, v)| (element_size(k, v), k.as_str(), v))
        .collect();
    fields.sort_by(|a, b| (a.0, a.1.as_bytes()).cmp(&(b.0, b.1.as_bytes())));
    if fields.is_empty() {
        return Err(CmdError::new(
            7182502,
            "Cannot split an empty event or an event containing solely '_id' field",
        ));
    }
    let mut fragments: Vec<Out> = Vec::new();
    let mut rest = fields.into_iter().peekable();
    while rest.peek().is_some() {
        let index = fragments.len() as u32;
        let ftoken = fragment_token(token, index);
        let id = doc! {"_data": wire_token(&ftoken, unordered)};
        let mut frag = doc! {
            "_id": id.clone(),
            "splitEvent": {"fragment": index as i32 + 1, "of": 0},
        };
        // mongod measures a fragment with its metadata, the sort key `$sortKey: [token]`.
        let mut size =
            doc_size(&frag) + element_size("$sortKey", &Bson::Array(vec![Bson::Document(id)]));
        while let Some((len, k, v)) = rest.next() {
            frag.insert(k, v.clone());
            size += len;
            match rest.peek() {
                Some((next, ..)) if size + next <= max => {}
                _ => break,
            }
        }
        if size > max {
            return Err(CmdError::new(
                SPLIT_FRAGMENT_TOO_LARGE,
                format!("Splitting change event failed: fragment size {size} is greater than maximum allowed fragment size {max}"),
            ));
        }
        fragments.push(Out {
            doc: frag,
            token: ftoken,
            invalidate: false,
        });
    }
    let of = fragments.len() as i32;
    for f in &mut fragments {
        if let Ok(s) = f.doc.get_document_mut("splitEvent") {
            s.insert("of", of);
        }
    }
    Ok(fragments)
}

fn lookup(state: &State, e: &Entry, key: &Document) -> Bson {
    let (Some(coll), Some(id)) = (&e.coll, key.get("_id")) else {
        return Bson::Null;
    };
    state
        .coll(&e.db, coll)
        .and_then(|c| c.docs.get(&id_key(id)))
        .cloned()
        .map(Bson::Document)
        .unwrap_or(Bson::Null)
}
