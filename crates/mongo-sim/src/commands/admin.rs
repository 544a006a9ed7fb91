//! Handshake, server info, namespaces (create/drop/list/collMod/rename/indexes) and fail points.

use std::sync::Arc;

use bson::{doc, Bson, DateTime, Document};

use super::{check_fields, coll_name, opt_bool, opt_doc, Conn};
use crate::error::{CmdError, CmdResult};
use crate::query::Filter;
use crate::server::{lock, Shared};
use crate::store::check_coll_name;

/// `hello` / `isMaster`: a single-node replica-set primary of MongoDB 7.0 (wire version 21).
/// No `topologyVersion`, so drivers poll instead of using the streaming protocol.
pub(super) fn hello(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    name: &str,
    body: &Document,
) -> CmdResult {
    if let Ok(client) = body.get_document("client") {
        if let Ok(app) = client
            .get_document("application")
            .and_then(|a| a.get_str("name"))
        {
            conn.app_name = Some(app.to_owned());
        }
    }
    let me = lock(&shared.me).clone();
    let (ts, wall) = shared.with_state(|st| {
        let ts = st.clock.now();
        let wall = st
            .oplog
            .entries()
            .back()
            .map(|e| e.wall)
            .unwrap_or_else(DateTime::now);
        (ts, wall)
    });
    let mut d = Document::new();
    if opt_bool(body, "helloOk") {
        d.insert("helloOk", true);
    }
    if name == "hello" {
        d.insert("isWritablePrimary", true);
    } else {
        d.insert("ismaster", true);
    }
    let optime = doc! {"ts": ts, "t": 1i64};
    d.extend(doc! {
        "hosts": [me.clone()],
        "setName": shared.cfg.repl_set.clone(),
        "setVersion": 1,
        "secondary": false,
        "primary": me.clone(),
        "me": me,
        "electionId": bson::oid::ObjectId::parse_str("7fffffff0000000000000001").unwrap_or_else(|_| bson::oid::ObjectId::new()),
        "lastWrite": {
            "opTime": optime.clone(),
            "lastWriteDate": wall,
            "majorityOpTime": optime,
            "majorityWriteDate": wall,
        },
        "maxBsonObjectSize": crate::limits::MAX_BSON_OBJECT_SIZE as i32,
        "maxMessageSizeBytes": shared.cfg.max_message_bytes as i32,
        "maxWriteBatchSize": 100_000,
        "localTime": DateTime::now(),
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": conn.id,
        "minWireVersion": 0,
        "maxWireVersion": 21,
        "readOnly": false,
        "ok": 1.0,
    });
    Ok(d)
}

/// `buildInfo`.
pub(super) fn build_info() -> Document {
    doc! {
        "version": "7.0.0",
        "gitVersion": "mongo-sim",
        "versionArray": [7, 0, 0, 0],
        "bits": 64,
        "debug": false,
        "maxBsonObjectSize": crate::limits::MAX_BSON_OBJECT_SIZE as i32,
        "storageEngines": ["mongo-sim-memory"],
        "javascriptEngine": "none",
        "modules": [],
        "ok": 1.0,
    }
}

/// `getParameter` for the one parameter drivers and tools ask about.
pub(super) fn get_parameter(body: &Document) -> CmdResult {
    if body.contains_key("featureCompatibilityVersion") {
        return Ok(doc! {"featureCompatibilityVersion": {"version": "7.0"}, "ok": 1.0});
    }
    let names: Vec<&String> = body
        .keys()
        .skip(1)
        .filter(|k| !k.starts_with('$') && *k != "lsid")
        .collect();
    Err(CmdError::unsupported(format!("getParameter for {names:?}")))
}

/// A minimal `serverStatus`.
pub(super) fn server_status(shared: &Shared) -> Document {
    doc! {
        "host": lock(&shared.me).clone(),
        "version": "7.0.0",
        "process": "mongod",
        "uptime": shared.started.elapsed().as_secs_f64(),
        "localTime": DateTime::now(),
        "ok": 1.0,
    }
}

pub(super) fn list_databases(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "listDatabases",
        body,
        &["filter", "nameOnly", "authorizedDatabases"],
        &[],
    )?;
    if db != "admin" {
        return Err(CmdError::new(
            13,
            "listDatabases may only be run against the admin database.",
        ));
    }
    let filter = match opt_doc(body, "filter")? {
        Some(f) => Some(Filter::parse(f)?),
        None => None,
    };
    let name_only = opt_bool(body, "nameOnly");
    let infos: Vec<Document> = shared.with_state(|st| {
        st.dbs
            .iter()
            .map(|(name, colls)| {
                let size: usize = colls.values().map(|c| c.docs.len() * 64).sum();
                doc! {"name": name.clone(), "sizeOnDisk": size as i64, "empty": colls.values().all(|c| c.docs.is_empty())}
            })
            .collect()
    });
    let dbs: Vec<Bson> = infos
        .into_iter()
        .filter(|d| filter.as_ref().is_none_or(|f| f.matches(d)))
        .map(|d| {
            if name_only {
                doc! {"name": d.get("name").cloned().unwrap_or(Bson::Null)}
            } else {
                d
            }
        })
        .map(Bson::Document)
        .collect();
    let mut out = doc! {"databases": dbs};
    if !name_only {
        out.insert("totalSize", 0i64);
        out.insert("totalSizeMb", 0i64);
    }
    out.insert("ok", 1.0);
    Ok(out)
}

pub(super) fn list_collections(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "listCollections",
        body,
        &["filter", "nameOnly", "authorizedCollections", "cursor"],
        &[],
    )?;
    let filter = match opt_doc(body, "filter")? {
        Some(f) => Some(Filter::parse(f)?),
        None => None,
    };
    let name_only = opt_bool(body, "nameOnly");
    let infos: Vec<Document> = shared.with_state(|st| {
        st.dbs
            .get(db)
            .map(|colls| {
                colls
                    .iter()
                    .map(|(name, c)| {
                        doc! {
                            "name": name.clone(),
                            "type": "collection",
                            "options": c.options.clone(),
                            "info": {"readOnly": false, "uuid": Bson::Binary(c.uuid.clone())},
                            "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    let batch: Vec<Bson> = infos
        .into_iter()
        .filter(|d| filter.as_ref().is_none_or(|f| f.matches(d)))
        .map(|d| {
            if name_only {
                doc! {"name": d.get("name").cloned().unwrap_or(Bson::Null), "type": "collection"}
            } else {
                d
            }
        })
        .map(Bson::Document)
        .collect();
    Ok(
        doc! {"cursor": {"id": 0i64, "ns": format!("{db}.$cmd.listCollections"), "firstBatch": batch}, "ok": 1.0},
    )
}

pub(super) fn list_indexes(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("listIndexes", body, &["cursor"], &[])?;
    let coll = coll_name(body, "listIndexes")?;
    let specs = shared.with_state(|st| st.coll(db, coll).map(|c| c.indexes.clone()));
    let Some(specs) = specs else {
        return Err(CmdError::new(26, format!("ns does not exist: {db}.{coll}")));
    };
    let mut batch = vec![Bson::Document(
        doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"},
    )];
    batch.extend(specs.into_iter().map(|mut s| {
        if !s.contains_key("v") {
            s.insert("v", 2);
        }
        Bson::Document(s)
    }));
    Ok(
        doc! {"cursor": {"id": 0i64, "ns": format!("{db}.$cmd.listIndexes.{coll}"), "firstBatch": batch}, "ok": 1.0},
    )
}

pub(super) fn create(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "create",
        body,
        &["changeStreamPreAndPostImages", "idIndex", "writeConcern"],
        &[
            "capped",
            "size",
            "max",
            "validator",
            "validationLevel",
            "validationAction",
            "viewOn",
            "pipeline",
            "collation",
            "timeseries",
            "clusteredIndex",
            "expireAfterSeconds",
            "storageEngine",
            "indexOptionDefaults",
            "encryptedFields",
        ],
    )?;
    let coll = coll_name(body, "create")?;
    let mut options = Document::new();
    if let Some(v) = body.get("changeStreamPreAndPostImages") {
        options.insert("changeStreamPreAndPostImages", images_option(v)?);
    }
    shared.with_state(|st| st.create(db, coll, options))?;
    Ok(doc! {"ok": 1.0})
}

fn images_option(v: &Bson) -> CmdResult<Document> {
    match v {
        Bson::Document(d) => match d.get("enabled") {
            Some(Bson::Boolean(b)) if d.len() == 1 => Ok(doc! {"enabled": *b}),
            _ => Err(CmdError::bad_value(
                "changeStreamPreAndPostImages must be {enabled: <bool>}",
            )),
        },
        _ => Err(CmdError::type_mismatch(
            "BSON field 'changeStreamPreAndPostImages' is the wrong type, expected type 'object'",
        )),
    }
}

pub(super) fn drop(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("drop", body, &[], &[])?;
    let coll = coll_name(body, "drop")?;
    check_coll_name(db, coll)?;
    // mongod 7.0 answers ok for a missing collection too.
    shared.with_state(|st| st.drop_coll(db, coll));
    Ok(doc! {"ns": format!("{db}.{coll}"), "nIndexesWas": 1, "ok": 1.0})
}

pub(super) fn drop_database(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("dropDatabase", body, &[], &[])?;
    if matches!(db, "admin" | "config" | "local") {
        return Err(CmdError::new(
            20,
            format!("Dropping the '{db}' database is prohibited."),
        ));
    }
    shared.with_state(|st| st.drop_db(db));
    Ok(doc! {"dropped": db, "ok": 1.0})
}

pub(super) fn coll_mod(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "collMod",
        body,
        &["changeStreamPreAndPostImages"],
        &[
            "validator",
            "validationLevel",
            "validationAction",
            "index",
            "viewOn",
            "pipeline",
            "expireAfterSeconds",
            "timeseries",
            "clusteredIndex",
        ],
    )?;
    let coll = coll_name(body, "collMod")?;
    let mut changes = Document::new();
    if let Some(v) = body.get("changeStreamPreAndPostImages") {
        changes.insert("changeStreamPreAndPostImages", images_option(v)?);
    }
    shared.with_state(|st| st.coll_mod(db, coll, changes))?;
    Ok(doc! {"ok": 1.0})
}

pub(super) fn rename(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields(
        "renameCollection",
        body,
        &["to", "dropTarget", "stayTemp"],
        &[],
    )?;
    if db != "admin" {
        return Err(CmdError::new(
            13,
            "renameCollection may only be run against the admin database.",
        ));
    }
    let split = |field: &str| -> CmdResult<(String, String)> {
        let ns = body.get_str(field).map_err(|_| {
            CmdError::type_mismatch(format!("'{field}' must be a namespace string"))
        })?;
        ns.split_once('.')
            .map(|(d, c)| (d.to_owned(), c.to_owned()))
            .ok_or_else(|| CmdError::new(73, format!("Invalid namespace specified '{ns}'")))
    };
    let (from_db, from) = split("renameCollection")?;
    let (to_db, to) = split("to")?;
    if from_db != to_db {
        return Err(CmdError::unsupported("renameCollection across databases"));
    }
    let drop_target = opt_bool(body, "dropTarget");
    shared.with_state(|st| st.rename(&from_db, &from, &to_db, &to, drop_target))?;
    Ok(doc! {"ok": 1.0})
}

pub(super) fn create_indexes(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("createIndexes", body, &["indexes", "commitQuorum"], &[])?;
    let coll = coll_name(body, "createIndexes")?;
    check_coll_name(db, coll)?;
    let Ok(indexes) = body.get_array("indexes") else {
        return Err(CmdError::type_mismatch(
            "BSON field 'createIndexes.indexes' is missing or not an array",
        ));
    };
    let mut specs = Vec::new();
    for i in indexes {
        let Bson::Document(spec) = i else {
            return Err(CmdError::type_mismatch(
                "index specification must be an object",
            ));
        };
        if spec.get_document("key").is_err() || spec.get_str("name").is_err() {
            return Err(CmdError::failed_to_parse(
                "index specification needs 'key' (object) and 'name' (string)",
            ));
        }
        for (k, v) in spec {
            match k.as_str() {
                "key"
                | "name"
                | "v"
                | "background"
                | "sparse"
                | "expireAfterSeconds"
                | "partialFilterExpression"
                | "hidden" => {}
                // An index that would change query or write results cannot be ignored silently.
                "unique" if !opt_bool(spec, "unique") => {}
                "unique" => {
                    return Err(CmdError::unsupported(format!(
                        "unique indexes (index '{}')",
                        spec.get_str("name").unwrap_or_default()
                    )))
                }
                other => {
                    let _ = v;
                    return Err(CmdError::unsupported(format!("the index option '{other}'")));
                }
            }
        }
        specs.push(spec.clone());
    }
    let existed = shared.with_state(|st| st.coll(db, coll).is_some());
    let (before, after) = shared.with_state(|st| st.create_indexes(db, coll, specs))?;
    Ok(
        doc! {"numIndexesBefore": before as i32, "numIndexesAfter": after as i32, "createdCollectionAutomatically": !existed, "ok": 1.0},
    )
}

pub(super) fn drop_indexes(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    check_fields("dropIndexes", body, &["index"], &[])?;
    let coll = body
        .get_str("dropIndexes")
        .or_else(|_| body.get_str("deleteIndexes"))
        .map_err(|_| CmdError::new(73, "collection name has invalid type"))?;
    let names: Vec<String> = match body.get("index") {
        Some(Bson::String(s)) => vec![s.clone()],
        Some(Bson::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        Some(Bson::Document(key)) => {
            let spec = shared.with_state(|st| {
                st.coll(db, coll).and_then(|c| {
                    c.indexes
                        .iter()
                        .find(|i| i.get_document("key").ok() == Some(key))
                        .cloned()
                })
            });
            match spec.and_then(|s| s.get_str("name").ok().map(str::to_owned)) {
                Some(n) => vec![n],
                None => {
                    return Err(CmdError::new(
                        27,
                        format!("can't find index with key: {key}"),
                    ))
                }
            }
        }
        _ => {
            return Err(CmdError::type_mismatch(
                "BSON field 'dropIndexes.index' is missing or has the wrong type",
            ))
        }
    };
    for n in names {
        if n == "_id_" {
            return Err(CmdError::new(72, "cannot drop _id index"));
        }
        shared.with_state(|st| st.drop_indexes(db, coll, &n))?;
    }
    Ok(doc! {"nIndexesWas": 1, "ok": 1.0})
}

pub(super) fn configure_fail_point(shared: &Shared, db: &str, body: &Document) -> CmdResult {
    if db != "admin" {
        return Err(CmdError::new(
            13,
            "configureFailPoint may only be run against the admin database.",
        ));
    }
    let fp = crate::failpoint::parse(body)?;
    let was = lock(&shared.failpoint).replace_with_opt(fp);
    Ok(doc! {"count": i32::from(was), "ok": 1.0})
}

trait ReplaceOpt<T> {
    fn replace_with_opt(&mut self, v: Option<T>) -> bool;
}

impl<T> ReplaceOpt<T> for Option<T> {
    /// Sets the value; returns whether one was set before.
    fn replace_with_opt(&mut self, v: Option<T>) -> bool {
        let was = self.is_some();
        *self = v;
        was
    }
}
