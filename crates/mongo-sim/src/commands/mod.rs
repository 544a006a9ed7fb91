//! Command dispatch: fail points, the reply envelope (cluster time, error labels) and routing
//! to the command families.

mod admin;
mod crud;
mod cursor;

use std::net::SocketAddr;
use std::sync::Arc;

use bson::{doc, spec::BinarySubtype, Binary, Bson, Document};

use crate::error::{is_resumable_change_stream_code, is_retryable_write_code, CmdError, CmdResult};
use crate::server::{lock, Shared};

/// Per-connection state.
pub(crate) struct Conn {
    pub(crate) id: i64,
    pub(crate) app_name: Option<String>,
    pub(crate) peer: SocketAddr,
}

/// What to do after a command.
pub(crate) enum Outcome {
    /// Send this reply.
    Reply(Document),
    /// Close the connection without replying (fail point `closeConnection`).
    Close,
}

/// Fields any command may carry that change nothing here.
const GENERIC: &[&str] = &[
    "$db",
    "lsid",
    "$clusterTime",
    "txnNumber",
    "autocommit",
    "$readPreference",
    "readConcern",
    "writeConcern",
    "apiVersion",
    "apiStrict",
    "apiDeprecationErrors",
    "comment",
    "maxTimeMS",
    "$audit",
    "$client",
    "$configServerState",
    "mayBypassWriteBlocking",
];

/// Rejects unknown fields (as mongod's IDL does, code 40415) and names supported-by-mongod
/// but unimplemented ones.
pub(crate) fn check_fields(
    cmd: &str,
    body: &Document,
    known: &[&str],
    unsupported: &[&str],
) -> CmdResult<()> {
    for (i, k) in body.keys().enumerate() {
        if i == 0 || GENERIC.contains(&k.as_str()) || known.contains(&k.as_str()) {
            continue;
        }
        if unsupported.contains(&k.as_str()) {
            return Err(CmdError::unsupported(format!("the {cmd} option '{k}'")));
        }
        return Err(CmdError::unknown_field(cmd, k));
    }
    Ok(())
}

/// Runs one command document and wraps the result.
pub(crate) async fn run(shared: &Arc<Shared>, conn: &mut Conn, body: Document) -> Outcome {
    let name = body.keys().next().cloned().unwrap_or_default();
    let mut write_concern_error = None;
    if name != "configureFailPoint" {
        let triggered = {
            let mut fp = lock(&shared.failpoint);
            match fp.as_mut() {
                Some(p) => {
                    let (t, exhausted) = p.trigger(&name, conn.app_name.as_deref());
                    if exhausted {
                        *fp = None;
                    }
                    t
                }
                None => None,
            }
        };
        if let Some(t) = triggered {
            tracing::debug!(command = %name, "failCommand triggered");
            if let Some(ms) = t.block_ms {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            if t.close {
                return Outcome::Close;
            }
            if let Some((code, labels)) = t.error {
                let mut e = CmdError::new(code, "Failing command via 'failCommand' failpoint");
                e.labels = match labels {
                    Some(l) => l,
                    None => auto_labels(&name, &body, code),
                };
                return Outcome::Reply(envelope(shared, e.to_doc()));
            }
            write_concern_error = t.write_concern_error;
        }
    }
    let result = match body.get("$db") {
        Some(Bson::String(db)) => {
            let db = db.clone();
            if matches!(body.get("startTransaction"), Some(Bson::Boolean(true))) {
                Err(CmdError::new(
                    20,
                    "mongo-sim does not support transactions (startTransaction)",
                ))
            } else {
                dispatch(shared, conn, &name, &db, &body).await
            }
        }
        _ => Err(CmdError::new(
            40571,
            "OP_MSG requests require a $db argument",
        )),
    };
    let mut reply = match result {
        Ok(d) => d,
        Err(mut e) => {
            if e.labels.is_empty() {
                e.labels = auto_labels(&name, &body, e.code);
            }
            e.to_doc()
        }
    };
    if let Some(w) = write_concern_error {
        reply.insert("writeConcernError", w);
    }
    Outcome::Reply(envelope(shared, reply))
}

/// Labels mongod attaches by itself: resumable change-stream errors on getMore, retryable
/// write errors on writes sent with a transaction number.
fn auto_labels(name: &str, body: &Document, code: i32) -> Vec<String> {
    let mut labels = Vec::new();
    if name == "getMore" && is_resumable_change_stream_code(code) {
        labels.push("ResumableChangeStreamError".to_owned());
    }
    if matches!(name, "insert" | "update" | "delete" | "findAndModify")
        && body.contains_key("txnNumber")
        && is_retryable_write_code(code)
    {
        labels.push("RetryableWriteError".to_owned());
    }
    labels
}

/// Adds `ok`, `operationTime` and `$clusterTime`.
fn envelope(shared: &Shared, mut reply: Document) -> Document {
    let now = shared.with_state(|st| st.clock.now());
    if !reply.contains_key("ok") {
        reply.insert("ok", 1.0);
    }
    reply.insert("operationTime", now);
    reply.insert(
        "$clusterTime",
        doc! {
            "clusterTime": now,
            "signature": {
                "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0u8; 20] },
                "keyId": 0i64,
            },
        },
    );
    reply
}

async fn dispatch(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    name: &str,
    db: &str,
    body: &Document,
) -> CmdResult {
    match name {
        "hello" | "isMaster" | "ismaster" => admin::hello(shared, conn, name, body),
        "ping" => Ok(doc! {"ok": 1.0}),
        "buildInfo" | "buildinfo" => Ok(admin::build_info()),
        "endSessions"
        | "killSessions"
        | "killAllSessions"
        | "killAllSessionsByPattern"
        | "refreshSessions" => Ok(doc! {"ok": 1.0}),
        "startSession" => Ok(
            doc! {"id": {"id": Binary { subtype: BinarySubtype::Uuid, bytes: bson::Uuid::new().bytes().to_vec() }}, "timeoutMinutes": 30, "ok": 1.0},
        ),
        "whatsmyuri" => Ok(doc! {"you": conn.peer.to_string(), "ok": 1.0}),
        "connectionStatus" => Ok(
            doc! {"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}, "ok": 1.0},
        ),
        "getParameter" => admin::get_parameter(body),
        "serverStatus" => Ok(admin::server_status(shared)),
        "listDatabases" => admin::list_databases(shared, db, body),
        "listCollections" => admin::list_collections(shared, db, body),
        "listIndexes" => admin::list_indexes(shared, db, body),
        "create" => admin::create(shared, db, body),
        "drop" => admin::drop(shared, db, body),
        "dropDatabase" => admin::drop_database(shared, db, body),
        "collMod" => admin::coll_mod(shared, db, body),
        "renameCollection" => admin::rename(shared, db, body),
        "createIndexes" => admin::create_indexes(shared, db, body),
        "dropIndexes" | "deleteIndexes" => admin::drop_indexes(shared, db, body),
        "configureFailPoint" => admin::configure_fail_point(shared, db, body),
        "insert" => crud::insert(shared, db, body),
        "update" => crud::update(shared, db, body),
        "delete" => crud::delete(shared, db, body),
        "findAndModify" | "findandmodify" => crud::find_and_modify(shared, db, body),
        "count" => crud::count(shared, db, body),
        "distinct" => crud::distinct(shared, db, body),
        "find" => cursor::find(shared, db, body),
        "aggregate" => cursor::aggregate(shared, db, body),
        "getMore" => cursor::get_more(shared, db, body).await,
        "killCursors" => cursor::kill_cursors(shared, db, body),
        "commitTransaction" | "abortTransaction" => Err(CmdError::new(
            20,
            format!("mongo-sim does not support transactions ({name})"),
        )),
        other => Err(CmdError::new(59, format!("no such command: '{other}'"))),
    }
}

/// The collection named by the command's first field.
pub(crate) fn coll_name<'a>(body: &'a Document, cmd: &str) -> CmdResult<&'a str> {
    match body.get(cmd) {
        Some(Bson::String(s)) => Ok(s),
        _ => Err(CmdError::new(
            73,
            format!("collection name has invalid type for {cmd}"),
        )),
    }
}

/// An optional sub-document field.
pub(crate) fn opt_doc<'a>(body: &'a Document, field: &str) -> CmdResult<Option<&'a Document>> {
    match body.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Document(d)) => Ok(Some(d)),
        Some(_) => Err(CmdError::type_mismatch(format!(
            "BSON field '{field}' is the wrong type, expected type 'object'"
        ))),
    }
}

/// An optional non-negative integer field.
pub(crate) fn opt_i64(body: &Document, field: &str) -> CmdResult<Option<i64>> {
    match body.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(v) => match crate::query::as_f64(v) {
            Some(f) if f.fract() == 0.0 => Ok(Some(f as i64)),
            _ => Err(CmdError::type_mismatch(format!(
                "BSON field '{field}' is the wrong type, expected a number"
            ))),
        },
    }
}

/// A boolean field (numbers count as truthy, as mongod accepts them).
pub(crate) fn opt_bool(body: &Document, field: &str) -> bool {
    match body.get(field) {
        Some(Bson::Boolean(b)) => *b,
        Some(v) => crate::query::as_f64(v).is_some_and(|f| f != 0.0),
        None => false,
    }
}
