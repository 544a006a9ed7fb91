//! The data file: a snapshot of collections, clock and oplog written atomically (temp file,
//! fsync, rename) and read back at start.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bson::{doc, Bson, Document, Timestamp};

use crate::clock::ClusterClock;
use crate::oplog::{Entry, Oplog};
use crate::store::{id_key, Collection, State};

/// Format version written in the header record.
const VERSION: i32 = 1;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Serializes the state as a sequence of BSON records (header, collections, documents, oplog),
/// so no single record approaches the 16 MB document limit.
pub(crate) fn snapshot(st: &State) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut put = |d: Document| d.to_writer(&mut out).map_err(|e| invalid(e.to_string()));
    put(
        doc! {"kind": "header", "version": VERSION, "clock": st.clock.now(), "truncated": st.oplog.truncated(), "seq": st.seq as i64},
    )?;
    for (db, colls) in &st.dbs {
        for (name, c) in colls {
            put(
                doc! {"kind": "coll", "db": db, "coll": name, "uuid": Bson::Binary(c.uuid.clone()), "options": c.options.clone(), "indexes": c.indexes.iter().cloned().map(Bson::Document).collect::<Vec<_>>()},
            )?;
            for d in c.docs.values() {
                put(doc! {"kind": "doc", "db": db, "coll": name, "doc": d.clone()})?;
            }
        }
    }
    for e in st.oplog.entries() {
        let entry = bson::to_document(e).map_err(|e| invalid(e.to_string()))?;
        put(doc! {"kind": "oplog", "entry": entry})?;
    }
    Ok(out)
}

/// Rebuilds state from a snapshot.
pub(crate) fn restore(bytes: &[u8], oplog_size: usize) -> io::Result<State> {
    let mut rd = bytes;
    let mut st = State::new(oplog_size);
    let mut entries: Vec<Entry> = Vec::new();
    let mut truncated = false;
    let mut seen_header = false;
    while !rd.is_empty() {
        let d = Document::from_reader(&mut rd)
            .map_err(|e| invalid(format!("corrupt data file: {e}")))?;
        match d.get_str("kind").unwrap_or_default() {
            "header" => {
                if d.get_i32("version").ok() != Some(VERSION) {
                    return Err(invalid("unsupported data file version"));
                }
                let clock = d.get_timestamp("clock").unwrap_or(Timestamp {
                    time: 0,
                    increment: 0,
                });
                st.clock = ClusterClock::new(Some(clock));
                truncated = d.get_bool("truncated").unwrap_or(false);
                st.seq = d.get_i64("seq").unwrap_or(0).max(0) as u64;
                seen_header = true;
            }
            "coll" => {
                let (db, coll) = names(&d)?;
                let mut c = Collection {
                    uuid: match d.get("uuid") {
                        Some(Bson::Binary(b)) => b.clone(),
                        _ => return Err(invalid("collection without uuid")),
                    },
                    options: d.get_document("options").cloned().unwrap_or_default(),
                    indexes: Vec::new(),
                    docs: Default::default(),
                };
                if let Ok(ix) = d.get_array("indexes") {
                    c.indexes = ix.iter().filter_map(|i| i.as_document().cloned()).collect();
                }
                st.dbs.entry(db).or_default().insert(coll, c);
            }
            "doc" => {
                let (db, coll) = names(&d)?;
                let doc = d
                    .get_document("doc")
                    .map_err(|_| invalid("document record without doc"))?
                    .clone();
                let key = id_key(doc.get("_id").unwrap_or(&Bson::Null));
                let c = st
                    .dbs
                    .get_mut(&db)
                    .and_then(|x| x.get_mut(&coll))
                    .ok_or_else(|| invalid("document before its collection"))?;
                c.docs.insert(key, doc);
            }
            "oplog" => {
                let e = d
                    .get_document("entry")
                    .map_err(|_| invalid("oplog record without entry"))?;
                entries.push(bson::from_document(e.clone()).map_err(|e| invalid(e.to_string()))?);
            }
            other => return Err(invalid(format!("unknown record kind '{other}'"))),
        }
    }
    if !seen_header {
        return Err(invalid("data file has no header"));
    }
    // A smaller --oplog-size than when saved drops the oldest entries, which counts as truncation.
    let dropped = entries.len() > oplog_size.max(1);
    st.oplog = Oplog::restore(oplog_size, entries, truncated || dropped);
    Ok(st)
}

fn names(d: &Document) -> io::Result<(String, String)> {
    Ok((
        d.get_str("db")
            .map_err(|_| invalid("record without db"))?
            .to_owned(),
        d.get_str("coll")
            .map_err(|_| invalid("record without coll"))?
            .to_owned(),
    ))
}

/// Reads the data file; `Ok(None)` if it does not exist yet.
pub(crate) fn load(path: &Path, oplog_size: usize) -> io::Result<Option<State>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    restore(&bytes, oplog_size).map(Some)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename,
/// then fsync of the directory so the rename itself is durable.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| invalid("data file path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips() {
        let mut st = State::new(10);
        st.insert("d", "c", doc! {"_id": 1, "a": "x"}).unwrap();
        st.create(
            "d",
            "p",
            doc! {"changeStreamPreAndPostImages": {"enabled": true}},
        )
        .unwrap();
        let bytes = snapshot(&st).unwrap();
        let back = restore(&bytes, 10).unwrap();
        assert_eq!(back.coll("d", "c").unwrap().docs.len(), 1);
        assert!(back.coll("d", "p").unwrap().images_enabled());
        assert_eq!(back.oplog.entries().len(), st.oplog.entries().len());
        assert!(back.clock.now().time >= st.clock.now().time);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data.bson");
        write_atomic(&p, &bytes).unwrap();
        assert!(load(&p, 10).unwrap().is_some());
    }
}
