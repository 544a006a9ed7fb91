//! Writes (insert, update, delete, findAndModify) and the counting reads (count, distinct).

use bson::{doc, oid::ObjectId, Bson, Document};

use super::{check_fields, coll_name, opt_bool, opt_doc, opt_i64};
use crate::error::{CmdError, CmdResult};
use crate::limits::{doc_size, MAX_BSON_OBJECT_SIZE};
use crate::pipeline::Projection;
use crate::query::{bson_eq, values_at, Filter, Sort};
use crate::server::Shared;
use crate::store::{check_coll_name, id_key, State};
use crate::update::{set_path, Update};

/// Puts `_id` first, generating an ObjectId when missing, and rejects what mongod would not store.
pub(super) fn prepare_new(doc: Document) -> CmdResult<Document> {
    for k in doc.keys() {
        if k.starts_with('$') {
            return Err(CmdError::new(
                2,
                format!("Document can't have $ prefixed field names: {k}"),
            ));
        }
    }
    let id = doc
        .get("_id")
        .cloned()
        .unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
    if matches!(
        id,
        Bson::Array(_) | Bson::RegularExpression(_) | Bson::Undefined
    ) {
        return Err(CmdError::new(
            53,
            format!("The '_id' value cannot be of type {:?}", id.element_type()),
        ));
    }
    let mut out = doc! {"_id": id};
    for (k, v) in doc {
        if k != "_id" {
            out.insert(k, v);
        }
    }
    Ok(out)
}

fn write_error(index: usize, e: &CmdError) -> Bson {
    let mut d = doc! {"index": index as i32, "code": e.code, "errmsg": e.msg.clone()};
    if e.code == 11000 {
        d.insert("keyPattern", doc! {"_id": 1});
    }
    Bson::Document(d)
}

fn statements(body: &Document, field: &str, cmd: &str) -> CmdResult<Vec<Document>> {
    match body.get(field) {
        Some(Bson::Array(a)) => a
            .iter()
            .map(|x| match x {
                Bson::Document(d) => Ok(d.clone()),
                _ => Err(CmdError::type_mismatch(format!(
                    "BSON field '{cmd}.{field}' must contain objects"
                ))),
            })
            .collect(),
        _ => Err(CmdError::failed_to_parse(format!(
            "BSON field '{cmd}.{field}' is missing but a required field"
        ))),
    }
}

pub(super) fn insert(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "insert",
        body,
        &["documents", "ordered", "bypassDocumentValidation"],
        &[],
    )?;
    let coll = coll_name(body, "insert")?;
    check_coll_name(db, coll)?;
    let docs = statements(body, "documents", "insert")?;
    let ordered = body.get_bool("ordered").unwrap_or(true);
    let mut errors = Vec::new();
    let mut n = 0;
    shared.with_state(|st| {
        for (i, d) in docs.into_iter().enumerate() {
            match prepare_new(d)
                .and_then(check_insert_size)
                .and_then(|d| st.insert(db, coll, d))
            {
                Ok(()) => n += 1,
                Err(e) => {
                    errors.push(write_error(i, &e));
                    if ordered {
                        break;
                    }
                }
            }
        }
    });
    let mut out = doc! {"n": n};
    if !errors.is_empty() {
        out.insert("writeErrors", errors);
    }
    out.insert("ok", 1.0);
    Ok(out)
}

/// Keys of the documents matching `filter`, in natural order (at most one if `!multi`).
pub(super) fn matching_keys(
    st: &State,
    db: &str,
    coll: &str,
    filter: &Filter,
    multi: bool,
) -> Vec<Vec<u8>> {
    let Some(c) = st.coll(db, coll) else {
        return Vec::new();
    };
    if let Some(id) = filter.id_equality() {
        let k = id_key(id);
        return c
            .docs
            .get(&k)
            .filter(|d| filter.matches(d))
            .map(|_| vec![k])
            .unwrap_or_default();
    }
    let mut out = Vec::new();
    for (k, d) in &c.docs {
        if filter.matches(d) {
            out.push(k.clone());
            if !multi {
                break;
            }
        }
    }
    out
}

/// The document an upsert inserts before applying the update.
fn upsert_seed(filter: &Filter, update: &Update) -> CmdResult<Document> {
    let mut seed = Document::new();
    let mut eqs = Vec::new();
    filter.equalities(&mut eqs);
    for (path, v) in eqs {
        if !path.starts_with('$') {
            set_path(&mut seed, &path, v)?;
        }
    }
    Ok(match update {
        Update::Replace(r) => {
            let mut d = Document::new();
            if let Some(id) = r.get("_id").or_else(|| seed.get("_id")) {
                d.insert("_id", id.clone());
            }
            for (k, v) in r {
                if k != "_id" {
                    d.insert(k.clone(), v.clone());
                }
            }
            d
        }
        Update::Ops(_) => seed,
    })
}

/// One parsed update statement.
struct Statement<'a> {
    filter: &'a Filter,
    upd: &'a Update,
    multi: bool,
    upsert: bool,
    /// Only findAndModify sorts, to pick which document it modifies.
    sort: Option<&'a Sort>,
}

/// What an update statement did.
struct Applied {
    matched: usize,
    modified: usize,
    upserted: Option<Bson>,
    /// The last (before, after) pair, for findAndModify's `value`.
    last: Option<(Document, Document)>,
}

/// Applies one update statement.
/// mongod refuses to store a document over 16 MiB: the insert path with `BadValue`.
fn check_insert_size(d: Document) -> CmdResult<Document> {
    let size = doc_size(&d);
    if size > MAX_BSON_OBJECT_SIZE {
        return Err(CmdError::bad_value(format!(
            "object to insert too large. size in bytes: {size}, max size: {MAX_BSON_OBJECT_SIZE}"
        )));
    }
    Ok(d)
}

/// The update path's refusal (mongod 7.0's update stage; later versions say
/// `BSONObjectTooLarge` with the same message).
fn check_update_size(d: &Document) -> CmdResult<()> {
    if doc_size(d) > MAX_BSON_OBJECT_SIZE {
        return Err(CmdError::new(
            17419,
            format!("Resulting document after update is larger than {MAX_BSON_OBJECT_SIZE}"),
        ));
    }
    Ok(())
}

fn update_one_statement(
    st: &mut State,
    db: &str,
    coll: &str,
    s: &Statement<'_>,
) -> CmdResult<Applied> {
    let Statement {
        filter,
        upd,
        multi,
        upsert,
        sort,
    } = *s;
    let keys = match sort {
        Some(s) if !s.is_empty() => {
            let mut docs: Vec<(Vec<u8>, Document)> = matching_keys(st, db, coll, filter, true)
                .into_iter()
                .filter_map(|k| {
                    st.coll(db, coll)
                        .and_then(|c| c.docs.get(&k))
                        .map(|d| (k, d.clone()))
                })
                .collect();
            docs.sort_by(|a, b| s.compare(&a.1, &b.1));
            docs.into_iter().take(1).map(|(k, _)| k).collect()
        }
        _ => matching_keys(st, db, coll, filter, multi),
    };
    let mut modified = 0;
    let mut last = None;
    for k in &keys {
        let Some(old) = st.coll(db, coll).and_then(|c| c.docs.get(k)).cloned() else {
            continue;
        };
        let mut new = old.clone();
        let now = st.next_time();
        let touched = upd.apply(&mut new, false, now)?;
        check_update_size(&new)?;
        let touched = match upd {
            Update::Ops(_) => Some(touched),
            Update::Replace(_) => None,
        };
        if st.write_doc(db, coll, k, new.clone(), touched.as_deref(), now.1)? {
            modified += 1;
        }
        last = Some((old, new));
    }
    if keys.is_empty() && upsert {
        let mut doc = upsert_seed(filter, upd)?;
        if let Update::Ops(_) = upd {
            let now = st.next_time();
            upd.apply(&mut doc, true, now)?;
        }
        let doc = prepare_new(doc)?;
        check_update_size(&doc)?;
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        st.insert(db, coll, doc.clone())?;
        return Ok(Applied {
            matched: 1,
            modified: 0,
            upserted: Some(id),
            last: Some((Document::new(), doc)),
        });
    }
    Ok(Applied {
        matched: keys.len(),
        modified,
        upserted: None,
        last,
    })
}

pub(super) fn update(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "update",
        body,
        &["updates", "ordered", "bypassDocumentValidation"],
        &["let"],
    )?;
    let coll = coll_name(body, "update")?;
    check_coll_name(db, coll)?;
    let stmts = statements(body, "updates", "update")?;
    let ordered = body.get_bool("ordered").unwrap_or(true);
    let (mut n, mut n_modified) = (0usize, 0usize);
    let mut upserted = Vec::new();
    let mut errors = Vec::new();
    for (i, s) in stmts.iter().enumerate() {
        let result = (|| -> CmdResult<(usize, usize, Option<Bson>)> {
            check_fields(
                "update.updates",
                &prefixed(s),
                &["q", "u", "upsert", "multi", "hint", "upsertSupplied"],
                &["arrayFilters", "collation", "c", "sort"],
            )?;
            let filter = Filter::parse(s.get_document("q").map_err(|_| {
                CmdError::failed_to_parse(
                    "BSON field 'update.updates.q' is missing but a required field",
                )
            })?)?;
            let upd = Update::parse(s.get("u").ok_or_else(|| {
                CmdError::failed_to_parse(
                    "BSON field 'update.updates.u' is missing but a required field",
                )
            })?)?;
            let multi = opt_bool(s, "multi");
            if multi && matches!(upd, Update::Replace(_)) {
                return Err(CmdError::failed_to_parse(
                    "multi update is not supported for replacement-style update",
                ));
            }
            let upsert = opt_bool(s, "upsert");
            let stmt = Statement {
                filter: &filter,
                upd: &upd,
                multi,
                upsert,
                sort: None,
            };
            let a = shared.with_state(|st| update_one_statement(st, db, coll, &stmt))?;
            Ok((a.matched, a.modified, a.upserted))
        })();
        match result {
            Ok((m, md, id)) => {
                n += m;
                n_modified += md;
                if let Some(id) = id {
                    upserted.push(Bson::Document(doc! {"index": i as i32, "_id": id}));
                }
            }
            Err(e) => {
                errors.push(write_error(i, &e));
                if ordered {
                    break;
                }
            }
        }
    }
    let mut out = doc! {"n": n as i32, "nModified": n_modified as i32};
    if !upserted.is_empty() {
        out.insert("upserted", upserted);
    }
    if !errors.is_empty() {
        out.insert("writeErrors", errors);
    }
    out.insert("ok", 1.0);
    Ok(out)
}

/// A statement document with a placeholder first key, so `check_fields` (which skips the
/// command-name key) checks all of its fields.
fn prefixed(s: &Document) -> Document {
    let mut d = doc! {"": 1};
    d.extend(s.clone());
    d
}

pub(super) fn delete(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("delete", body, &["deletes", "ordered"], &["let"])?;
    let coll = coll_name(body, "delete")?;
    check_coll_name(db, coll)?;
    let stmts = statements(body, "deletes", "delete")?;
    let ordered = body.get_bool("ordered").unwrap_or(true);
    let mut n = 0usize;
    let mut errors = Vec::new();
    for (i, s) in stmts.iter().enumerate() {
        let result = (|| -> CmdResult<usize> {
            check_fields(
                "delete.deletes",
                &prefixed(s),
                &["q", "limit", "hint"],
                &["collation"],
            )?;
            let filter = Filter::parse(s.get_document("q").map_err(|_| {
                CmdError::failed_to_parse(
                    "BSON field 'delete.deletes.q' is missing but a required field",
                )
            })?)?;
            let limit = opt_i64(s, "limit")?.unwrap_or(0);
            if limit != 0 && limit != 1 {
                return Err(CmdError::failed_to_parse(format!(
                    "The limit field in delete objects must be 0 or 1. Got {limit}"
                )));
            }
            Ok(shared.with_state(|st| {
                let keys = matching_keys(st, db, coll, &filter, limit == 0);
                keys.iter().filter(|k| st.delete_doc(db, coll, k)).count()
            }))
        })();
        match result {
            Ok(c) => n += c,
            Err(e) => {
                errors.push(write_error(i, &e));
                if ordered {
                    break;
                }
            }
        }
    }
    let mut out = doc! {"n": n as i32};
    if !errors.is_empty() {
        out.insert("writeErrors", errors);
    }
    out.insert("ok", 1.0);
    Ok(out)
}

pub(super) fn find_and_modify(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    let cmd = body.keys().next().cloned().unwrap_or_default();
    check_fields(
        &cmd,
        body,
        &[
            "query",
            "sort",
            "remove",
            "update",
            "new",
            "fields",
            "upsert",
            "bypassDocumentValidation",
            "hint",
        ],
        &["arrayFilters", "collation", "let"],
    )?;
    let coll = coll_name(body, &cmd)?;
    check_coll_name(db, coll)?;
    let filter = Filter::parse(opt_doc(body, "query")?.unwrap_or(&Document::new()))?;
    let sort = Sort::parse(opt_doc(body, "sort")?.unwrap_or(&Document::new()))?;
    let proj = Projection::parse(opt_doc(body, "fields")?.unwrap_or(&Document::new()))?;
    let remove = opt_bool(body, "remove");
    let return_new = opt_bool(body, "new");
    let upsert = opt_bool(body, "upsert");
    let project = |d: Document| -> CmdResult<Bson> {
        Ok(Bson::Document(match &proj {
            Some(p) => p.apply(&d)?,
            None => d,
        }))
    };
    match (remove, body.get("update")) {
        (true, Some(_)) => Err(CmdError::failed_to_parse(
            "Cannot specify both an update and remove=true",
        )),
        (true, None) => {
            if upsert || return_new {
                return Err(CmdError::failed_to_parse(
                    "Cannot specify both upsert=true and remove=true, or new=true and remove=true",
                ));
            }
            let old = shared.with_state(|st| {
                let mut docs: Vec<(Vec<u8>, Document)> =
                    matching_keys(st, db, coll, &filter, !sort.is_empty())
                        .into_iter()
                        .filter_map(|k| {
                            st.coll(db, coll)
                                .and_then(|c| c.docs.get(&k))
                                .map(|d| (k, d.clone()))
                        })
                        .collect();
                docs.sort_by(|a, b| sort.compare(&a.1, &b.1));
                let (k, d) = docs.into_iter().next()?;
                st.delete_doc(db, coll, &k);
                Some(d)
            });
            let n = i32::from(old.is_some());
            Ok(
                doc! {"lastErrorObject": {"n": n}, "value": old.map(project).transpose()?.unwrap_or(Bson::Null), "ok": 1.0},
            )
        }
        (false, Some(u)) => {
            let upd = Update::parse(u)?;
            let stmt = Statement {
                filter: &filter,
                upd: &upd,
                multi: false,
                upsert,
                sort: Some(&sort),
            };
            let Applied {
                matched,
                upserted,
                last: pair,
                ..
            } = shared.with_state(|st| update_one_statement(st, db, coll, &stmt))?;
            let mut leo =
                doc! {"n": matched as i32, "updatedExisting": upserted.is_none() && matched > 0};
            if let Some(id) = &upserted {
                leo.insert("upserted", id.clone());
            }
            let value = match pair {
                Some((old, new)) => {
                    if return_new {
                        project(new)?
                    } else if upserted.is_some() {
                        Bson::Null
                    } else {
                        project(old)?
                    }
                }
                None => Bson::Null,
            };
            Ok(doc! {"lastErrorObject": leo, "value": value, "ok": 1.0})
        }
        (false, None) => Err(CmdError::failed_to_parse(
            "Either an update or remove=true must be specified",
        )),
    }
}

pub(super) fn count(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "count",
        body,
        &["query", "limit", "skip", "hint", "fields"],
        &["collation"],
    )?;
    let coll = coll_name(body, "count")?;
    let filter = Filter::parse(opt_doc(body, "query")?.unwrap_or(&Document::new()))?;
    let skip = opt_i64(body, "skip")?.unwrap_or(0).max(0) as usize;
    let limit = opt_i64(body, "limit")?.unwrap_or(0).unsigned_abs() as usize;
    let n = shared.with_state(|st| {
        st.coll(db, coll)
            .map(|c| c.docs.values().filter(|d| filter.matches(d)).count())
            .unwrap_or(0)
    });
    let mut n = n.saturating_sub(skip);
    if limit > 0 {
        n = n.min(limit);
    }
    Ok(doc! {"n": n as i32, "ok": 1.0})
}

pub(super) fn distinct(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("distinct", body, &["key", "query", "hint"], &["collation"])?;
    let coll = coll_name(body, "distinct")?;
    let key = body.get_str("key").map_err(|_| {
        CmdError::failed_to_parse("BSON field 'distinct.key' is missing but a required field")
    })?;
    let filter = Filter::parse(opt_doc(body, "query")?.unwrap_or(&Document::new()))?;
    let values = shared.with_state(|st| {
        let mut out: Vec<Bson> = Vec::new();
        if let Some(c) = st.coll(db, coll) {
            for d in c.docs.values().filter(|d| filter.matches(d)) {
                for v in values_at(d, key) {
                    let items: Vec<&Bson> = match v {
                        Bson::Array(a) => a.iter().collect(),
                        other => vec![other],
                    };
                    for it in items {
                        if !out.iter().any(|o| bson_eq(o, it)) {
                            out.push(it.clone());
                        }
                    }
                }
            }
        }
        out
    });
    Ok(doc! {"values": values, "ok": 1.0})
}
