//! Change-stream cursors: option parsing, start positions, and turning oplog entries into
//! events shaped as mongod shapes them. Waiting for new events is the server's job.

use bson::{doc, Bson, Document, Timestamp};

use crate::error::{CmdError, CmdResult};
use crate::oplog::{event_token, hwm_token, parse_token, position_ts, start_position, Entry};
use crate::pipeline::Stage;
use crate::store::{id_key, State};

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
    /// Position: the stream returns entries whose token sorts after this string. It is always
    /// a resume token (event or high-water mark) or a `startAtOperationTime` prefix.
    pos: String,
    stages: Vec<Stage>,
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
        state: &State,
    ) -> CmdResult<ChangeStream> {
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
                return Err(CmdError::new(20, "Only $match, $project, $addFields, $set, $unset, $replaceRoot and $replaceWith are permitted in a $changeStream pipeline"));
            }
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
            pos,
            stages,
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

    /// Returns up to `batch_size` events after the current position and advances it; when
    /// the whole oplog has been scanned the position becomes a high-water mark at the current
    /// cluster time, so idle streams' resume tokens keep up. Call with the store locked.
    pub(crate) fn next_batch(
        &mut self,
        state: &State,
        batch_size: usize,
    ) -> CmdResult<Vec<Document>> {
        let mut out = Vec::new();
        if self.closed {
            return Ok(out);
        }
        self.check_history(state)?;
        let start = state.oplog.first_after(&self.pos);
        for e in state.oplog.entries().range(start..) {
            if out.len() >= batch_size {
                return Ok(out);
            }
            let Some(invalidates) = self.relevant(e) else {
                self.pos.clone_from(&e.token);
                continue;
            };
            let ev = self.build(e, state)?;
            if let Some(ev) = self.transform(ev)? {
                out.push(ev);
            }
            self.pos.clone_from(&e.token);
            if invalidates {
                let token = event_token(e.ts, 0, true);
                out.push(doc! {
                    "_id": {"_data": wire_token(&token, self.unordered)},
                    "operationType": "invalidate",
                    "clusterTime": e.ts,
                    "wallTime": e.wall,
                });
                self.pos = token;
                self.closed = true;
                return Ok(out);
            }
        }
        let hwm = hwm_token(state.clock.now());
        if hwm > self.pos {
            self.pos = hwm;
        }
        Ok(out)
    }
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
