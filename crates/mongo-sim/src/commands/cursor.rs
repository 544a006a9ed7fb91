//! Cursor commands: find, aggregate (including `$changeStream`), getMore (which waits for
//! commits on change streams) and killCursors.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document};

use super::{check_fields, coll_name, opt_bool, opt_doc, opt_i64};
use crate::changestream::{ChangeStream, SplitStage};
use crate::error::{CmdError, CmdResult};
use crate::limits::BATCH_BYTES;
use crate::pipeline::{self, Projection, Stage};
use crate::query::{Filter, Sort};
use crate::server::{lock, Cursor, CursorKind, Shared};
use crate::store::{check_coll_name, id_key};

/// Default size of a first batch, as in mongod.
const DEFAULT_FIRST_BATCH: usize = 101;
/// Default `getMore` wait on a change stream (mongod's awaitData default).
const DEFAULT_AWAIT_MS: u64 = 1000;
/// Largest batch a change-stream `getMore` returns when the client gives no `batchSize`.
const DEFAULT_CHANGE_BATCH: usize = 1000;

fn doc_len(d: &Document) -> usize {
    let mut v = Vec::new();
    let _ = d.to_writer(&mut v);
    v.len()
}

fn take_batch(docs: &mut VecDeque<Document>, n: usize) -> Vec<Bson> {
    let mut out = Vec::new();
    let mut bytes = 0;
    while out.len() < n {
        let Some(front) = docs.front() else { break };
        let len = doc_len(front);
        if !out.is_empty() && bytes + len > BATCH_BYTES {
            break;
        }
        bytes += len;
        if let Some(d) = docs.pop_front() {
            out.push(Bson::Document(d));
        }
    }
    out
}

/// The stage that splits oversized change events; parsed here because it only makes sense
/// at the end of a change stream's pipeline.
const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

fn getmore_error(e: CmdError) -> CmdError {
    e.context("Executor error during getMore")
}

fn batch_size(body: &Document, field: &str) -> CmdResult<Option<usize>> {
    match opt_i64(body, field)? {
        Some(n) if n < 0 => Err(CmdError::bad_value(format!(
            "BSON field '{field}' value must be >= 0, actual value '{n}'"
        ))),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

/// Registers the rest of a result set as a cursor, returning the first batch reply.
fn docs_cursor(
    shared: &Shared,
    ns: String,
    docs: Vec<Document>,
    first: usize,
    single: bool,
) -> Document {
    let mut rest: VecDeque<Document> = docs.into();
    let batch = take_batch(&mut rest, first);
    let id = if rest.is_empty() || single {
        0
    } else {
        let id = shared.cursor_id();
        lock(&shared.cursors).insert(
            id,
            Cursor {
                ns: ns.clone(),
                kind: CursorKind::Docs(rest),
            },
        );
        id
    };
    doc! {"cursor": {"firstBatch": batch, "id": id, "ns": ns}, "ok": 1.0}
}

pub(super) fn find(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "find",
        body,
        &[
            "filter",
            "sort",
            "projection",
            "hint",
            "skip",
            "limit",
            "batchSize",
            "singleBatch",
            "noCursorTimeout",
            "allowPartialResults",
            "allowDiskUse",
            "readOnce",
        ],
        &[
            "collation",
            "tailable",
            "awaitData",
            "min",
            "max",
            "returnKey",
            "showRecordId",
            "let",
            "oplogReplay",
        ],
    )?;
    let coll = coll_name(body, "find")?;
    check_coll_name(db, coll)?;
    let filter = Filter::parse(opt_doc(body, "filter")?.unwrap_or(&Document::new()))?;
    let sort = Sort::parse(opt_doc(body, "sort")?.unwrap_or(&Document::new()))?;
    let proj = Projection::parse(opt_doc(body, "projection")?.unwrap_or(&Document::new()))?;
    let skip = match opt_i64(body, "skip")? {
        Some(n) if n < 0 => {
            return Err(CmdError::bad_value(format!(
                "BSON field 'skip' value must be >= 0, actual value '{n}'"
            )))
        }
        n => n.unwrap_or(0) as usize,
    };
    let limit = opt_i64(body, "limit")?.unwrap_or(0);
    let mut single = opt_bool(body, "singleBatch");
    // A negative limit is the legacy "single batch of |n|".
    if limit < 0 {
        single = true;
    }
    let limit = limit.unsigned_abs() as usize;
    let batch = batch_size(body, "batchSize")?;
    let mut docs: Vec<Document> = shared.with_state(|st| {
        let Some(c) = st.coll(db, coll) else {
            return Vec::new();
        };
        if let Some(id) = filter.id_equality() {
            return c
                .docs
                .get(&id_key(id))
                .filter(|d| filter.matches(d))
                .cloned()
                .into_iter()
                .collect();
        }
        c.docs
            .values()
            .filter(|d| filter.matches(d))
            .cloned()
            .collect()
    });
    sort.apply(&mut docs);
    let mut docs: Vec<Document> = docs.into_iter().skip(skip).collect();
    if limit > 0 {
        docs.truncate(limit);
    }
    if let Some(p) = &proj {
        docs = docs.iter().map(|d| p.apply(d)).collect::<CmdResult<_>>()?;
    }
    let mut first = batch.unwrap_or(DEFAULT_FIRST_BATCH);
    if limit > 0 {
        first = first.min(limit);
    }
    Ok(docs_cursor(
        shared,
        format!("{db}.{coll}"),
        docs,
        first,
        single,
    ))
}

pub(super) fn aggregate(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "aggregate",
        body,
        &[
            "pipeline",
            "cursor",
            "allowDiskUse",
            "hint",
            "bypassDocumentValidation",
        ],
        &["explain", "collation", "let"],
    )?;
    let coll: Option<&str> = match body.get("aggregate") {
        Some(Bson::String(s)) => {
            check_coll_name(db, s)?;
            Some(s)
        }
        Some(v) if crate::query::as_f64(v) == Some(1.0) => None,
        _ => {
            return Err(CmdError::new(
                73,
                "Invalid aggregate namespace: 'aggregate' must be a collection name or 1",
            ))
        }
    };
    let Ok(raw) = body.get_array("pipeline") else {
        return Err(CmdError::type_mismatch(
            "'pipeline' option must be specified as an array",
        ));
    };
    let Some(cursor_opts) = opt_doc(body, "cursor")? else {
        return Err(CmdError::failed_to_parse(
            "The 'cursor' option is required, except for aggregate with the explain argument",
        ));
    };
    let first = batch_size(cursor_opts, "batchSize")?.unwrap_or(DEFAULT_FIRST_BATCH);
    let mut stage_docs = Vec::new();
    for s in raw {
        match s {
            Bson::Document(d) => stage_docs.push(d),
            _ => {
                return Err(CmdError::type_mismatch(
                    "Each element of the 'pipeline' array must be an object",
                ))
            }
        }
    }
    let change_spec = match stage_docs.first().and_then(|d| d.get("$changeStream")) {
        Some(Bson::Document(spec)) => Some(spec.clone()),
        Some(_) => {
            return Err(CmdError::failed_to_parse(
                "the $changeStream stage must be specified as an object",
            ))
        }
        None => None,
    };
    if stage_docs
        .iter()
        .skip(usize::from(change_spec.is_some()))
        .any(|d| d.contains_key("$changeStream"))
    {
        return Err(CmdError::new(
            40602,
            "$changeStream is only valid as the first stage in a pipeline.",
        ));
    }
    let rest = &stage_docs[usize::from(change_spec.is_some())..];
    let mut stages: Vec<Stage> = Vec::new();
    let mut split_at: Vec<usize> = Vec::new();
    for (i, d) in rest.iter().enumerate() {
        match d.get(SPLIT_STAGE) {
            Some(spec) if d.len() == 1 => {
                if !matches!(spec, Bson::Document(s) if s.is_empty()) {
                    return Err(CmdError::new(
                        7182800,
                        "$changeStreamSplitLargeEvent spec should be an empty object",
                    ));
                }
                split_at.push(i);
            }
            _ => stages.push(Stage::parse(d)?),
        }
    }
    let split = match split_at.as_slice() {
        [] => SplitStage::Absent,
        [i] if *i + 1 == rest.len() => SplitStage::Last,
        _ => SplitStage::Misplaced,
    };
    if change_spec.is_none() && split != SplitStage::Absent {
        return Err(CmdError::new(
            20,
            "$changeStreamSplitLargeEvent can only be used in a $changeStream pipeline",
        ));
    }
    if let Some(spec) = change_spec {
        let ns = match coll {
            Some(c) => format!("{db}.{c}"),
            None => format!("{db}.$cmd.aggregate"),
        };
        let (cs, batch) = shared.with_state(|st| -> CmdResult<_> {
            let mut cs = ChangeStream::open(db, coll, &spec, stages, split, st)?;
            let batch = cs
                .next_batch(st, first)
                .map_err(|e| e.context("PlanExecutor error during aggregation"))?;
            Ok((cs, batch))
        })?;
        shared
            .change_streams_opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = cs.resume_token();
        let id = if cs.closed {
            0
        } else {
            let id = shared.cursor_id();
            lock(&shared.cursors).insert(
                id,
                Cursor {
                    ns: ns.clone(),
                    kind: CursorKind::Change(Box::new(cs)),
                },
            );
            id
        };
        return Ok(
            doc! {"cursor": {"firstBatch": batch, "postBatchResumeToken": token, "id": id, "ns": ns}, "ok": 1.0},
        );
    }
    let Some(coll) = coll else {
        return Err(CmdError::unsupported(
            "collectionless aggregations (aggregate: 1) other than $changeStream",
        ));
    };
    let docs: Vec<Document> = shared.with_state(|st| {
        st.coll(db, coll)
            .map(|c| c.docs.values().cloned().collect())
            .unwrap_or_default()
    });
    let docs = pipeline::run(&stages, docs)?;
    Ok(docs_cursor(
        shared,
        format!("{db}.{coll}"),
        docs,
        first,
        false,
    ))
}

pub(super) async fn get_more(shared: &Arc<Shared>, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "getMore",
        body,
        &[
            "collection",
            "batchSize",
            "maxTimeMS",
            "term",
            "lastKnownCommittedOpTime",
        ],
        &[],
    )?;
    let id = match body.get("getMore") {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => *v as i64,
        _ => {
            return Err(CmdError::type_mismatch(
                "BSON field 'getMore.getMore' is the wrong type, expected type 'long'",
            ))
        }
    };
    let coll = body.get_str("collection").map_err(|_| {
        CmdError::failed_to_parse("BSON field 'getMore.collection' is missing but a required field")
    })?;
    let ns = format!("{db}.{coll}");
    let batch = batch_size(body, "batchSize")?.filter(|n| *n > 0);
    // Take the cursor out while this getMore runs, so a concurrent getMore on it finds nothing.
    let cursor = {
        let mut cursors = lock(&shared.cursors);
        match cursors.get(&id) {
            None => return Err(CmdError::new(43, format!("cursor id {id} not found"))),
            Some(c) if c.ns != ns => {
                return Err(CmdError::new(13, format!("Requested getMore on namespace '{ns}', but cursor belongs to a different namespace {}", c.ns)));
            }
            Some(_) => cursors.remove(&id),
        }
    };
    let Some(cursor) = cursor else {
        return Err(CmdError::new(43, format!("cursor id {id} not found")));
    };
    match cursor.kind {
        CursorKind::Docs(mut rest) => {
            let out = take_batch(&mut rest, batch.unwrap_or(usize::MAX));
            let next_id = if rest.is_empty() {
                0
            } else {
                lock(&shared.cursors).insert(
                    id,
                    Cursor {
                        ns: cursor.ns.clone(),
                        kind: CursorKind::Docs(rest),
                    },
                );
                id
            };
            Ok(doc! {"cursor": {"nextBatch": out, "id": next_id, "ns": cursor.ns}, "ok": 1.0})
        }
        CursorKind::Change(mut cs) => {
            let wait = match opt_i64(body, "maxTimeMS")? {
                Some(ms) if ms > 0 => Duration::from_millis(ms as u64),
                _ => Duration::from_millis(DEFAULT_AWAIT_MS),
            };
            let deadline = tokio::time::Instant::now() + wait;
            let n = batch.unwrap_or(DEFAULT_CHANGE_BATCH);
            let events = loop {
                // Subscribe before scanning, so a commit between the scan and the wait still wakes us.
                let mut commits = shared.commits.subscribe();
                // On an error the cursor is not put back: mongod kills a cursor whose getMore
                // failed, and the client resumes from the last token it was given.
                let events = shared
                    .with_state(|st| cs.next_batch(st, n))
                    .map_err(getmore_error)?;
                if !events.is_empty() || cs.closed || tokio::time::Instant::now() >= deadline {
                    break events;
                }
                tokio::select! {
                    r = commits.changed() => {
                        if r.is_err() {
                            break events;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        // One last scan so the resume token reflects the time we waited until.
                        break shared
                            .with_state(|st| cs.next_batch(st, n))
                            .map_err(getmore_error)?;
                    }
                }
            };
            let token = cs.resume_token();
            let next_id = if cs.closed {
                0
            } else {
                lock(&shared.cursors).insert(
                    id,
                    Cursor {
                        ns: cursor.ns.clone(),
                        kind: CursorKind::Change(cs),
                    },
                );
                id
            };
            Ok(
                doc! {"cursor": {"nextBatch": events, "postBatchResumeToken": token, "id": next_id, "ns": cursor.ns}, "ok": 1.0},
            )
        }
    }
}

pub(super) fn kill_cursors(shared: &Shared, _db: &str, body: &Document) -> CmdResult {
    check_fields("killCursors", body, &["cursors"], &[])?;
    let Ok(ids) = body.get_array("cursors") else {
        return Err(CmdError::failed_to_parse(
            "BSON field 'killCursors.cursors' is missing but a required field",
        ));
    };
    let mut killed = Vec::new();
    let mut not_found = Vec::new();
    let mut cursors = lock(&shared.cursors);
    for v in ids {
        let id = match v {
            Bson::Int64(i) => *i,
            Bson::Int32(i) => *i as i64,
            _ => continue,
        };
        if cursors.remove(&id).is_some() {
            killed.push(Bson::Int64(id));
        } else {
            not_found.push(Bson::Int64(id));
        }
    }
    Ok(
        doc! {"cursorsKilled": killed, "cursorsNotFound": not_found, "cursorsAlive": [], "cursorsUnknown": [], "ok": 1.0},
    )
}
