//! The data: databases, collections, documents, and the write path that stamps every change
//! with a cluster time and appends it to the oplog. Callers hold the one store mutex.

use std::collections::BTreeMap;

use bson::{doc, spec::BinarySubtype, Binary, Bson, DateTime, Document, Timestamp};
use indexmap::IndexMap;

use crate::clock::ClusterClock;
use crate::error::{CmdError, CmdResult};
use crate::oplog::{event_token_for, Entry, Oplog};

/// One collection.
#[derive(Debug, Clone)]
pub(crate) struct Collection {
    /// Its UUID, as `listCollections` and expanded change events show it.
    pub(crate) uuid: Binary,
    /// Creation options (`changeStreamPreAndPostImages`, …).
    pub(crate) options: Document,
    /// Index specs beyond `_id_` (recorded, not used for queries).
    pub(crate) indexes: Vec<Document>,
    /// Documents in insertion order, keyed by their canonical `_id`.
    pub(crate) docs: IndexMap<Vec<u8>, Document>,
}

impl Collection {
    fn new(options: Document) -> Self {
        Self {
            uuid: Binary {
                subtype: BinarySubtype::Uuid,
                bytes: bson::Uuid::new().bytes().to_vec(),
            },
            options,
            indexes: Vec::new(),
            docs: IndexMap::new(),
        }
    }

    /// Whether pre- and post-images are recorded for change streams.
    pub(crate) fn images_enabled(&self) -> bool {
        self.options
            .get_document("changeStreamPreAndPostImages")
            .ok()
            .and_then(|d| d.get_bool("enabled").ok())
            .unwrap_or(false)
    }
}

/// A database: its collections by name.
pub(crate) type Database = BTreeMap<String, Collection>;

/// The whole server's data.
#[derive(Debug, Clone)]
pub(crate) struct State {
    /// The cluster clock; ticks only here, under the store lock.
    pub(crate) clock: ClusterClock,
    /// Databases by name.
    pub(crate) dbs: BTreeMap<String, Database>,
    /// History for change streams.
    pub(crate) oplog: Oplog,
    /// Count of committed changes, to wake waiters and the flusher.
    pub(crate) seq: u64,
    /// Tokens leave the server in an order-scrambling wire form (`SimConfig::unordered_tokens`).
    pub(crate) unordered_tokens: bool,
    /// `$changeStreamSplitLargeEvent` is an unknown stage (`SimConfig::no_split_stage`).
    pub(crate) no_split_stage: bool,
}

/// Canonical key for an `_id`: numbers that compare equal map to the same key (1 == 1.0).
pub(crate) fn id_key(id: &Bson) -> Vec<u8> {
    let norm = match id {
        Bson::Int32(v) => Bson::Int64(*v as i64),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Bson::Int64(*f as i64),
        other => other.clone(),
    };
    let mut out = Vec::new();
    // Serializing a single-field document cannot fail for values that came out of BSON.
    let _ = doc! {"k": norm}.to_writer(&mut out);
    out
}

/// Validates a database name as mongod does.
pub(crate) fn check_db_name(db: &str) -> CmdResult<()> {
    if db.is_empty()
        || db.len() > 63
        || db
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '.' | ' ' | '"' | '$' | '\0'))
    {
        return Err(CmdError::new(73, format!("Invalid database name: '{db}'")));
    }
    Ok(())
}

/// Validates a collection name as mongod does.
pub(crate) fn check_coll_name(db: &str, coll: &str) -> CmdResult<()> {
    check_db_name(db)?;
    if coll.is_empty() || coll.contains('$') || coll.contains('\0') || coll.starts_with('.') {
        return Err(CmdError::new(
            73,
            format!("Invalid collection name: {db}.{coll}"),
        ));
    }
    Ok(())
}

/// What a write entry carries besides its namespace.
#[derive(Default)]
struct Change {
    doc_key: Option<Document>,
    post: Option<Document>,
    pre: Option<Document>,
    images: bool,
    desc: Option<Document>,
    extra: Option<Document>,
}

impl State {
    /// Empty state.
    pub(crate) fn new(oplog_size: usize) -> Self {
        Self {
            clock: ClusterClock::new(None),
            dbs: BTreeMap::new(),
            oplog: Oplog::new(oplog_size),
            seq: 0,
            unordered_tokens: false,
            no_split_stage: false,
        }
    }

    /// The next cluster time and wall time, for operators like `$currentDate` that need it
    /// before the commit; the commit then uses this same time.
    pub(crate) fn next_time(&mut self) -> (DateTime, Timestamp) {
        (DateTime::now(), self.clock.tick())
    }

    fn commit(
        &mut self,
        ts: Option<Timestamp>,
        db: &str,
        coll: Option<&str>,
        op: &str,
        c: Change,
    ) -> Timestamp {
        let ts = ts.unwrap_or_else(|| self.clock.tick());
        let uuid = coll
            .and_then(|c| self.dbs.get(db).and_then(|d| d.get(c)))
            .map(|c| c.uuid.clone());
        let ns = match coll {
            Some(c) => format!("{db}.{c}"),
            None => db.to_owned(),
        };
        self.oplog.push(Entry {
            token: event_token_for(ts, &ns, c.doc_key.as_ref()),
            ts,
            wall: DateTime::now(),
            db: db.to_owned(),
            coll: coll.map(str::to_owned),
            uuid,
            op: op.to_owned(),
            doc_key: c.doc_key,
            post: c.post,
            pre: c.pre,
            images: c.images,
            desc: c.desc,
            extra: c.extra,
        });
        self.seq += 1;
        ts
    }

    /// A collection, if it exists.
    pub(crate) fn coll(&self, db: &str, coll: &str) -> Option<&Collection> {
        self.dbs.get(db)?.get(coll)
    }

    /// Creates the collection if missing (as mongod does implicitly on first write).
    pub(crate) fn ensure_coll(&mut self, db: &str, coll: &str) -> CmdResult<()> {
        if self.coll(db, coll).is_none() {
            self.create(db, coll, Document::new())?;
        }
        Ok(())
    }

    /// `create`: fails with 48 if the collection exists.
    pub(crate) fn create(&mut self, db: &str, coll: &str, options: Document) -> CmdResult<()> {
        check_coll_name(db, coll)?;
        if self.coll(db, coll).is_some() {
            return Err(CmdError::new(
                48,
                format!("Collection {db}.{coll} already exists."),
            ));
        }
        self.dbs
            .entry(db.to_owned())
            .or_default()
            .insert(coll.to_owned(), Collection::new(options.clone()));
        let mut desc = doc! {"idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}};
        for (k, v) in options {
            desc.insert(k, v);
        }
        self.commit(
            None,
            db,
            Some(coll),
            "create",
            Change {
                extra: Some(doc! {"operationDescription": desc}),
                ..Change::default()
            },
        );
        Ok(())
    }

    /// Inserts one document (which must have `_id` first); 11000 on a duplicate `_id`.
    pub(crate) fn insert(&mut self, db: &str, coll: &str, doc: Document) -> CmdResult<()> {
        self.ensure_coll(db, coll)?;
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        let key = id_key(&id);
        let c = self
            .dbs
            .get_mut(db)
            .and_then(|d| d.get_mut(coll))
            .ok_or_else(|| CmdError::new(1, "collection vanished"))?;
        if c.docs.contains_key(&key) {
            return Err(dup_key(db, coll, &id));
        }
        c.docs.insert(key, doc.clone());
        let images = c.images_enabled();
        self.commit(
            None,
            db,
            Some(coll),
            "insert",
            Change {
                doc_key: Some(doc! {"_id": id}),
                post: Some(doc),
                images,
                ..Change::default()
            },
        );
        Ok(())
    }

    /// Replaces the stored document under `key` with `new`. `touched` = `Some(paths)` for an
    /// operator update (an `update` event), `None` for a replacement (a `replace` event).
    /// A change that leaves the document identical commits nothing, as in mongod.
    pub(crate) fn write_doc(
        &mut self,
        db: &str,
        coll: &str,
        key: &[u8],
        new: Document,
        touched: Option<&[String]>,
        ts: Timestamp,
    ) -> CmdResult<bool> {
        let c = self
            .dbs
            .get_mut(db)
            .and_then(|d| d.get_mut(coll))
            .ok_or_else(|| CmdError::new(26, format!("ns does not exist: {db}.{coll}")))?;
        let Some(slot) = c.docs.get_mut(key) else {
            return Ok(false);
        };
        if *slot == new {
            return Ok(false);
        }
        let old = std::mem::replace(slot, new.clone());
        let images = c.images_enabled();
        let id = new.get("_id").cloned().unwrap_or(Bson::Null);
        let change = match touched {
            Some(paths) => Change {
                doc_key: Some(doc! {"_id": id}),
                desc: Some(crate::update::describe(&old, &new, paths)),
                post: images.then_some(new),
                pre: images.then_some(old),
                images,
                extra: None,
            },
            None => Change {
                doc_key: Some(doc! {"_id": id}),
                post: Some(new),
                pre: images.then_some(old),
                images,
                desc: None,
                extra: None,
            },
        };
        self.commit(
            Some(ts),
            db,
            Some(coll),
            if touched.is_some() {
                "update"
            } else {
                "replace"
            },
            change,
        );
        Ok(true)
    }

    /// Deletes the document under `key`.
    pub(crate) fn delete_doc(&mut self, db: &str, coll: &str, key: &[u8]) -> bool {
        let Some(c) = self.dbs.get_mut(db).and_then(|d| d.get_mut(coll)) else {
            return false;
        };
        let Some(old) = c.docs.shift_remove(key) else {
            return false;
        };
        let images = c.images_enabled();
        let id = old.get("_id").cloned().unwrap_or(Bson::Null);
        self.commit(
            None,
            db,
            Some(coll),
            "delete",
            Change {
                doc_key: Some(doc! {"_id": id}),
                pre: images.then_some(old),
                images,
                ..Change::default()
            },
        );
        true
    }

    /// Drops a collection; `false` if it did not exist.
    pub(crate) fn drop_coll(&mut self, db: &str, coll: &str) -> bool {
        if self.coll(db, coll).is_none() {
            return false;
        }
        // The entry is committed before removal so it still carries the collection's UUID.
        self.commit(None, db, Some(coll), "drop", Change::default());
        if let Some(d) = self.dbs.get_mut(db) {
            d.remove(coll);
            if d.is_empty() {
                self.dbs.remove(db);
            }
        }
        true
    }

    /// Drops a database: one `drop` per collection, then `dropDatabase`, as mongod logs it.
    pub(crate) fn drop_db(&mut self, db: &str) {
        let Some(names) = self
            .dbs
            .get(db)
            .map(|d| d.keys().cloned().collect::<Vec<_>>())
        else {
            return;
        };
        for n in &names {
            self.drop_coll(db, n);
        }
        self.dbs.remove(db);
        self.commit(None, db, None, "dropDatabase", Change::default());
    }

    /// `collMod` of the options change streams care about.
    pub(crate) fn coll_mod(&mut self, db: &str, coll: &str, changes: Document) -> CmdResult<()> {
        let c = self
            .dbs
            .get_mut(db)
            .and_then(|d| d.get_mut(coll))
            .ok_or_else(|| CmdError::new(26, format!("ns does not exist: {db}.{coll}")))?;
        // mongod's `modify` events carry the options as they were before the collMod.
        let mut before = doc! {"uuid": c.uuid.clone()};
        for (k, v) in &c.options {
            before.insert(k.clone(), v.clone());
        }
        for (k, v) in &changes {
            c.options.insert(k.clone(), v.clone());
        }
        self.commit(
            None,
            db,
            Some(coll),
            "modify",
            Change {
                extra: Some(doc! {
                    "operationDescription": changes,
                    "stateBeforeChange": {"collectionOptions": before},
                }),
                ..Change::default()
            },
        );
        Ok(())
    }

    /// `renameCollection`.
    pub(crate) fn rename(
        &mut self,
        db: &str,
        from: &str,
        to_db: &str,
        to: &str,
        drop_target: bool,
    ) -> CmdResult<()> {
        check_coll_name(to_db, to)?;
        if self.coll(db, from).is_none() {
            return Err(CmdError::new(26, "Source collection does not exist"));
        }
        if self.coll(to_db, to).is_some() {
            if !drop_target {
                return Err(CmdError::new(48, "target namespace exists"));
            }
            self.drop_coll(to_db, to);
        }
        self.commit(
            None,
            db,
            Some(from),
            "rename",
            Change {
                extra: Some(doc! {"to": {"db": to_db, "coll": to}}),
                ..Change::default()
            },
        );
        let c = self
            .dbs
            .get_mut(db)
            .and_then(|d| d.remove(from))
            .ok_or_else(|| CmdError::new(26, "Source collection does not exist"))?;
        if self.dbs.get(db).is_some_and(|d| d.is_empty()) {
            self.dbs.remove(db);
        }
        self.dbs
            .entry(to_db.to_owned())
            .or_default()
            .insert(to.to_owned(), c);
        Ok(())
    }

    /// Records index specs (not used to answer queries).
    pub(crate) fn create_indexes(
        &mut self,
        db: &str,
        coll: &str,
        specs: Vec<Document>,
    ) -> CmdResult<(usize, usize)> {
        self.ensure_coll(db, coll)?;
        let c = self
            .dbs
            .get_mut(db)
            .and_then(|d| d.get_mut(coll))
            .ok_or_else(|| CmdError::new(26, "ns does not exist"))?;
        let before = c.indexes.len() + 1;
        let mut added = Vec::new();
        for s in specs {
            let name = s.get_str("name").unwrap_or_default().to_owned();
            if !c
                .indexes
                .iter()
                .any(|i| i.get_str("name").ok() == Some(name.as_str()))
            {
                c.indexes.push(s.clone());
                added.push(Bson::Document(s));
            }
        }
        let after = c.indexes.len() + 1;
        if !added.is_empty() {
            self.commit(
                None,
                db,
                Some(coll),
                "createIndexes",
                Change {
                    extra: Some(doc! {"operationDescription": {"indexes": added}}),
                    ..Change::default()
                },
            );
        }
        Ok((before, after))
    }

    /// Drops indexes by name (`*` = all but `_id_`).
    pub(crate) fn drop_indexes(&mut self, db: &str, coll: &str, name: &str) -> CmdResult<()> {
        let c = self
            .dbs
            .get_mut(db)
            .and_then(|d| d.get_mut(coll))
            .ok_or_else(|| CmdError::new(26, format!("ns not found {db}.{coll}")))?;
        let dropped: Vec<Bson> = if name == "*" {
            c.indexes.drain(..).map(Bson::Document).collect()
        } else {
            let Some(i) = c
                .indexes
                .iter()
                .position(|i| i.get_str("name").ok() == Some(name))
            else {
                return Err(CmdError::new(
                    27,
                    format!("index not found with name [{name}]"),
                ));
            };
            vec![Bson::Document(c.indexes.remove(i))]
        };
        if !dropped.is_empty() {
            self.commit(
                None,
                db,
                Some(coll),
                "dropIndexes",
                Change {
                    extra: Some(doc! {"operationDescription": {"indexes": dropped}}),
                    ..Change::default()
                },
            );
        }
        Ok(())
    }
}

/// The duplicate-key error mongod gives for `_id`.
pub(crate) fn dup_key(db: &str, coll: &str, id: &Bson) -> CmdError {
    CmdError::new(11000, format!("E11000 duplicate key error collection: {db}.{coll} index: _id_ dup key: {{ _id: {id} }}"))
}
