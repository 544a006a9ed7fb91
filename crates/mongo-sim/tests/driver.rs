//! Driver-level acceptance tests with the official `mongodb` crate: CRUD, change-stream shapes,
//! resumption, fault injection, history loss, persistence; plus wire fuzzing of the sim.

// Test helpers outside #[test] functions unwrap too; a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod fuzz;
mod oversize;
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use mongo_sim::{MongoSim, SimConfig};
use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::{Error, ErrorKind};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};

use support::{backend, backend_with, Kind};

/// Generous bound for anything that should happen "now": never a tight timer.
const WAIT: Duration = Duration::from_secs(15);

async fn next(stream: &mut ChangeStream<Document>) -> Document {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("event within the wait")
        .expect("stream still open")
        .expect("no error")
}

fn token_data(ev: &Document) -> String {
    ev.get_document("_id")
        .unwrap()
        .get_str("_data")
        .unwrap()
        .to_owned()
}

fn token_of(ev: &Document) -> ResumeToken {
    let raw = mongodb::bson::to_document(ev.get_document("_id").unwrap()).unwrap();
    mongodb::bson::from_document(raw).unwrap()
}

fn code(e: &Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

async fn watch(coll: &mongodb::Collection<Document>) -> ChangeStream<Document> {
    coll.watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .unwrap()
        .with_type::<Document>()
}

#[tokio::test]
async fn crud_find_sort_projection_counts_and_duplicates() {
    let b = backend("crud").await;
    let coll = b.db().collection::<Document>("items");
    coll.insert_many((0..250).map(
        |i| doc! {"_id": i, "n": i % 7, "tags": ["a", format!("t{}", i % 3)], "sub": {"x": i}},
    ))
    .await
    .unwrap();
    let dup = coll.insert_one(doc! {"_id": 3}).await.unwrap_err();
    assert!(format!("{dup}").contains("E11000"), "{dup}");
    // 250 documents need a getMore after the first batch of 101.
    let all: Vec<Document> = coll
        .find(doc! {})
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(all.len(), 250);
    let some: Vec<Document> = coll
        .find(doc! {"n": {"$in": [1, 2]}, "tags": "t0", "sub.x": {"$gte": 10}})
        .sort(doc! {"_id": -1})
        .projection(doc! {"sub": 0, "tags": 0})
        .skip(1)
        .limit(3)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    let ids: Vec<i32> = some.iter().map(|d| d.get_i32("_id").unwrap()).collect();
    assert_eq!(ids, vec![240, 225, 219]);
    assert_eq!(some[0], doc! {"_id": 240, "n": 2});
    assert_eq!(coll.count_documents(doc! {"n": 0}).await.unwrap(), 36);
    assert_eq!(coll.estimated_document_count().await.unwrap(), 250);
    let r = coll
        .update_many(
            doc! {"n": 0},
            doc! {"$inc": {"n": 100}, "$push": {"tags": "z"}},
        )
        .await
        .unwrap();
    assert_eq!((r.matched_count, r.modified_count), (36, 36));
    let r = coll
        .update_one(
            doc! {"_id": 1000},
            doc! {"$set": {"x": 1}, "$setOnInsert": {"new": true}},
        )
        .upsert(true)
        .await
        .unwrap();
    assert_eq!(r.upserted_id, Some(Bson::Int32(1000)));
    assert_eq!(
        coll.find_one(doc! {"_id": 1000}).await.unwrap().unwrap(),
        doc! {"_id": 1000, "x": 1, "new": true}
    );
    let before = coll
        .find_one_and_update(doc! {"_id": 1000}, doc! {"$set": {"x": 2}})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.get_i32("x").unwrap(), 1);
    let r = coll.delete_many(doc! {"n": {"$gte": 100}}).await.unwrap();
    assert_eq!(r.deleted_count, 36);
    let names = b.db().list_collection_names().await.unwrap();
    assert!(names.contains(&"items".to_owned()));
}

#[tokio::test]
async fn change_events_have_mongod_shapes_with_update_lookup() {
    let b = backend("shapes").await;
    let coll = b.db().collection::<Document>("orders");
    b.db().create_collection("orders").await.unwrap();
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": 1, "status": "new", "items": [1], "gone": true})
        .await
        .unwrap();
    coll.update_one(
        doc! {"_id": 1},
        doc! {"$set": {"status": "paid"}, "$unset": {"gone": ""}, "$push": {"items": 2}},
    )
    .await
    .unwrap();
    coll.replace_one(doc! {"_id": 1}, doc! {"status": "replaced"})
        .await
        .unwrap();
    coll.delete_one(doc! {"_id": 1}).await.unwrap();

    let ins = next(&mut cs).await;
    let upd = next(&mut cs).await;
    let rep = next(&mut cs).await;
    let del = next(&mut cs).await;
    let ns = doc! {"db": b.db_name.clone(), "coll": "orders"};
    for (ev, op) in [
        (&ins, "insert"),
        (&upd, "update"),
        (&rep, "replace"),
        (&del, "delete"),
    ] {
        assert_eq!(ev.get_str("operationType").unwrap(), op);
        assert_eq!(ev.get_document("ns").unwrap(), &ns);
        assert_eq!(ev.get_document("documentKey").unwrap(), &doc! {"_id": 1});
        assert!(
            matches!(ev.get("clusterTime"), Some(Bson::Timestamp(_))),
            "{ev}"
        );
        assert!(
            matches!(ev.get("wallTime"), Some(Bson::DateTime(_))),
            "{ev}"
        );
        let data = token_data(ev);
        assert!(data.chars().all(|c| c.is_ascii_hexdigit()), "{data}");
    }
    assert_eq!(
        ins.get_document("fullDocument").unwrap(),
        &doc! {"_id": 1, "status": "new", "items": [1], "gone": true}
    );
    let desc = upd.get_document("updateDescription").unwrap();
    assert_eq!(
        desc.get_document("updatedFields").unwrap(),
        &doc! {"status": "paid", "items.1": 2}
    );
    assert_eq!(
        desc.get_array("removedFields").unwrap(),
        &vec![Bson::String("gone".into())]
    );
    assert_eq!(desc.get_array("truncatedArrays").unwrap().len(), 0);
    // updateLookup reads the current document: by now it has been deleted.
    assert!(
        matches!(
            upd.get("fullDocument"),
            Some(Bson::Null) | Some(Bson::Document(_))
        ),
        "{upd}"
    );
    assert_eq!(
        rep.get_document("fullDocument").unwrap(),
        &doc! {"_id": 1, "status": "replaced"}
    );
    assert!(del.get("fullDocument").is_none() || del.get("fullDocument") == Some(&Bson::Null));
    if b.kind != Kind::Secantus {
        // mongod's tokens sort in commit order as strings; SecantusDB's need not.
        let tokens = [
            token_data(&ins),
            token_data(&upd),
            token_data(&rep),
            token_data(&del),
        ];
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    }
}

#[tokio::test]
async fn update_lookup_returns_the_post_image_when_current() {
    let b = backend("lookup").await;
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": "a", "v": 1}).await.unwrap();
    coll.update_one(doc! {"_id": "a"}, doc! {"$inc": {"v": 1}})
        .await
        .unwrap();
    next(&mut cs).await;
    let upd = next(&mut cs).await;
    assert_eq!(
        upd.get_document("fullDocument").unwrap(),
        &doc! {"_id": "a", "v": 2}
    );
}

async fn collect_ids(cs: &mut ChangeStream<Document>, n: usize) -> Vec<i32> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let ev = next(cs).await;
        ids.push(
            ev.get_document("documentKey")
                .unwrap()
                .get_i32("_id")
                .unwrap(),
        );
    }
    ids
}

/// After reading `want`, nothing else arrives (no duplicates) within one await period.
async fn assert_quiet(cs: &mut ChangeStream<Document>) {
    let extra = cs.next_if_any().await.unwrap();
    assert!(extra.is_none(), "unexpected extra event {extra:?}");
}

#[tokio::test]
async fn resume_after_start_after_and_start_at_operation_time_lose_and_repeat_nothing() {
    let b = backend("resume").await;
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = watch(&coll).await;
    for i in 1..=4 {
        coll.insert_one(doc! {"_id": i}).await.unwrap();
    }
    let first = next(&mut cs).await;
    let second = next(&mut cs).await;
    drop(cs);
    let tok = token_of(&first);

    let mut r = coll
        .watch()
        .resume_after(tok.clone())
        .await
        .unwrap()
        .with_type::<Document>();
    assert_eq!(collect_ids(&mut r, 3).await, vec![2, 3, 4]);
    let mut s = coll
        .watch()
        .start_after(tok)
        .await
        .unwrap()
        .with_type::<Document>();
    assert_eq!(collect_ids(&mut s, 3).await, vec![2, 3, 4]);
    let Some(Bson::Timestamp(t)) = second.get("clusterTime").cloned() else {
        panic!("{second}")
    };
    let mut a = coll
        .watch()
        .start_at_operation_time(t)
        .await
        .unwrap()
        .with_type::<Document>();
    assert_eq!(collect_ids(&mut a, 3).await, vec![2, 3, 4]);
    // New writes reach all three exactly once.
    coll.insert_one(doc! {"_id": 5}).await.unwrap();
    for cs in [&mut r, &mut s, &mut a] {
        assert_eq!(collect_ids(cs, 1).await, vec![5]);
    }
}

#[tokio::test]
async fn idle_stream_resume_token_advances_and_resumes_exactly() {
    let b = backend("idle").await;
    let coll = b.db().collection::<Document>("c");
    let other = b.db().collection::<Document>("other");
    b.db().create_collection("c").await.unwrap();
    let mut cs = coll
        .watch()
        .max_await_time(Duration::from_millis(200))
        .await
        .unwrap()
        .with_type::<Document>();
    let t0 = cs.resume_token().expect("initial postBatchResumeToken");
    other.insert_one(doc! {"x": 1}).await.unwrap();
    // The first call may only consume the (empty) first batch; the second runs a getMore.
    assert!(cs.next_if_any().await.unwrap().is_none());
    assert!(cs.next_if_any().await.unwrap().is_none());
    let t1 = cs.resume_token().expect("token after an empty batch");
    if b.kind == Kind::Sim {
        let d = |t: &ResumeToken| {
            mongodb::bson::to_document(t)
                .unwrap()
                .get_str("_data")
                .unwrap()
                .to_owned()
        };
        assert!(
            d(&t1) > d(&t0),
            "high-water mark must advance on empty batches"
        );
    }
    drop(cs);
    coll.insert_one(doc! {"_id": 7}).await.unwrap();
    let mut r = coll
        .watch()
        .resume_after(t1)
        .await
        .unwrap()
        .with_type::<Document>();
    assert_eq!(collect_ids(&mut r, 1).await, vec![7]);
}

#[tokio::test]
async fn driver_resumes_after_resumable_getmore_error() {
    let b = backend("resumable").await;
    if !b.failpoints() {
        skip!(
            "driver_resumes_after_resumable_getmore_error",
            "fail points unavailable on {:?}",
            b.kind
        );
    }
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": 1}).await.unwrap();
    assert_eq!(collect_ids(&mut cs, 1).await, vec![1]);
    b.fail_command(doc! {"times": 1}.into(), doc! {"failCommands": ["getMore"], "errorCode": 6, "errorLabels": ["ResumableChangeStreamError"]}).await;
    coll.insert_one(doc! {"_id": 2}).await.unwrap();
    coll.insert_one(doc! {"_id": 3}).await.unwrap();
    assert_eq!(collect_ids(&mut cs, 2).await, vec![2, 3]);
    assert_quiet(&mut cs).await;
    b.fail_command_off().await;
}

#[tokio::test]
async fn driver_resumes_after_closed_connection() {
    let b = backend("closed").await;
    if !b.failpoints() {
        skip!(
            "driver_resumes_after_closed_connection",
            "fail points unavailable on {:?}",
            b.kind
        );
    }
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": 1}).await.unwrap();
    assert_eq!(collect_ids(&mut cs, 1).await, vec![1]);
    b.fail_command(
        doc! {"times": 1}.into(),
        doc! {"failCommands": ["getMore"], "closeConnection": true},
    )
    .await;
    coll.insert_one(doc! {"_id": 2}).await.unwrap();
    assert_eq!(collect_ids(&mut cs, 1).await, vec![2]);
    if let Some(sim) = &b.sim {
        sim.drop_all_connections();
        coll.insert_one(doc! {"_id": 3}).await.unwrap();
        assert_eq!(collect_ids(&mut cs, 1).await, vec![3]);
    }
    assert_quiet(&mut cs).await;
}

#[tokio::test]
async fn driver_resumes_across_a_primary_restart() {
    let b = backend("restart").await;
    let Some(sim) = &b.sim else {
        skip!(
            "driver_resumes_across_a_primary_restart",
            "needs the mongo-sim handle"
        );
    };
    let coll = b.db().collection::<Document>("c");
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": 1}).await.unwrap();
    assert_eq!(collect_ids(&mut cs, 1).await, vec![1]);
    sim.restart().await.unwrap();
    coll.insert_one(doc! {"_id": 2}).await.unwrap();
    assert_eq!(collect_ids(&mut cs, 1).await, vec![2]);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
}

#[tokio::test]
async fn non_resumable_error_surfaces() {
    let b = backend("nonresumable").await;
    if !b.failpoints() {
        skip!(
            "non_resumable_error_surfaces",
            "fail points unavailable on {:?}",
            b.kind
        );
    }
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = watch(&coll).await;
    b.fail_command(
        doc! {"times": 1}.into(),
        doc! {"failCommands": ["getMore"], "errorCode": 2},
    )
    .await;
    coll.insert_one(doc! {"_id": 1}).await.unwrap();
    let err = tokio::time::timeout(WAIT, cs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&err), Some(2), "{err}");
}

#[tokio::test]
async fn history_lost_surfaces_as_286() {
    let b = backend_with(
        "history",
        SimConfig {
            oplog_size: 8,
            ..SimConfig::default()
        },
    )
    .await;
    if b.kind != Kind::Sim {
        skip!(
            "history_lost_surfaces_as_286",
            "cannot shrink the oplog of {:?}",
            b.kind
        );
    }
    let coll = b.db().collection::<Document>("c");
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": 0}).await.unwrap();
    let first = next(&mut cs).await;
    drop(cs);
    for i in 1..=20 {
        coll.insert_one(doc! {"_id": i}).await.unwrap();
    }
    let err = coll
        .watch()
        .resume_after(token_of(&first))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(286), "{err}");
    assert!(
        format!("{err}").contains("may no longer be in the oplog"),
        "{err}"
    );
    // The oldest retained entry is still a valid resume point.
    let mut cs = watch(&coll).await;
    coll.insert_one(doc! {"_id": 100}).await.unwrap();
    let recent = next(&mut cs).await;
    let ok = coll.watch().resume_after(token_of(&recent)).await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn drop_gives_drop_then_invalidate() {
    let b = backend("drop").await;
    let coll = b.db().collection::<Document>("c");
    coll.insert_one(doc! {"_id": 1}).await.unwrap();
    let mut cs = watch(&coll).await;
    coll.drop().await.unwrap();
    let d = next(&mut cs).await;
    assert_eq!(d.get_str("operationType").unwrap(), "drop");
    assert_eq!(
        d.get_document("ns").unwrap(),
        &doc! {"db": b.db_name.clone(), "coll": "c"}
    );
    let inv = next(&mut cs).await;
    assert_eq!(inv.get_str("operationType").unwrap(), "invalidate");
    if b.kind != Kind::Secantus {
        assert!(token_data(&inv) > token_data(&d));
    }
    let after = tokio::time::timeout(WAIT, cs.next()).await.unwrap();
    assert!(
        after.is_none(),
        "stream must end after invalidate: {after:?}"
    );
    // startAfter the invalidate opens a new stream on the recreated collection.
    let mut again = coll
        .watch()
        .start_after(token_of(&inv))
        .await
        .unwrap()
        .with_type::<Document>();
    coll.insert_one(doc! {"_id": 2}).await.unwrap();
    assert_eq!(collect_ids(&mut again, 1).await, vec![2]);
    // resumeAfter an invalidate is refused.
    let err = coll.watch().resume_after(token_of(&inv)).await;
    if b.kind != Kind::Secantus {
        assert!(err.is_err());
    }
}

#[tokio::test]
async fn database_and_cluster_streams() {
    let b = backend("scopes").await;
    let db = b.db();
    db.create_collection("a").await.unwrap();
    let mut dbs = db.watch().await.unwrap().with_type::<Document>();
    let mut all = b.client.watch().await.unwrap().with_type::<Document>();
    db.collection::<Document>("a")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    db.collection::<Document>("b")
        .insert_one(doc! {"_id": 2})
        .await
        .unwrap();
    let e1 = next(&mut dbs).await;
    let e2 = next(&mut dbs).await;
    assert_eq!(e1.get_document("ns").unwrap().get_str("coll").unwrap(), "a");
    assert_eq!(e2.get_document("ns").unwrap().get_str("coll").unwrap(), "b");
    // The cluster stream sees the same events with the same tokens (other tests may add more).
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = next(&mut all).await;
        if ev
            .get_document("ns")
            .ok()
            .and_then(|n| n.get_str("db").ok())
            == Some(b.db_name.as_str())
        {
            seen.push(token_data(&ev));
        }
    }
    assert_eq!(seen, vec![token_data(&e1), token_data(&e2)]);
    if b.kind == Kind::Secantus {
        return;
    }
    db.drop().await.unwrap();
    let mut ops = Vec::new();
    loop {
        let ev = next(&mut dbs).await;
        let op = ev.get_str("operationType").unwrap().to_owned();
        ops.push(op.clone());
        if op == "invalidate" {
            break;
        }
    }
    assert_eq!(ops, vec!["drop", "drop", "dropDatabase", "invalidate"]);
}

#[tokio::test]
async fn match_and_project_run_on_events() {
    let b = backend("stages").await;
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = coll
        .watch()
        .pipeline([
            doc! {"$match": {"operationType": "insert", "fullDocument.keep": true}},
            doc! {"$project": {"fullDocument.secret": 0}},
        ])
        .await
        .unwrap()
        .with_type::<Document>();
    coll.insert_one(doc! {"_id": 1, "keep": false})
        .await
        .unwrap();
    coll.insert_one(doc! {"_id": 2, "keep": true, "secret": "x"})
        .await
        .unwrap();
    let ev = next(&mut cs).await;
    assert_eq!(
        ev.get_document("fullDocument").unwrap(),
        &doc! {"_id": 2, "keep": true}
    );
}

#[tokio::test]
async fn pre_images_appear_when_enabled() {
    let b = backend("preimages").await;
    let db = b.db();
    db.run_command(doc! {"create": "with", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    db.create_collection("without").await.unwrap();
    let with = db.collection::<Document>("with");
    let without = db.collection::<Document>("without");
    with.insert_one(doc! {"_id": 1, "v": "old"}).await.unwrap();
    without
        .insert_one(doc! {"_id": 1, "v": "old"})
        .await
        .unwrap();
    let mut cw = with
        .watch()
        .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
        .full_document(FullDocumentType::WhenAvailable)
        .await
        .unwrap()
        .with_type::<Document>();
    let mut co = without
        .watch()
        .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
        .await
        .unwrap()
        .with_type::<Document>();
    with.update_one(doc! {"_id": 1}, doc! {"$set": {"v": "new"}})
        .await
        .unwrap();
    with.delete_one(doc! {"_id": 1}).await.unwrap();
    without
        .update_one(doc! {"_id": 1}, doc! {"$set": {"v": "new"}})
        .await
        .unwrap();
    let upd = next(&mut cw).await;
    assert_eq!(
        upd.get_document("fullDocumentBeforeChange").unwrap(),
        &doc! {"_id": 1, "v": "old"}
    );
    if b.kind == Kind::Secantus {
        // mongod documents `fullDocument: whenAvailable` as returning the stored post-image;
        // SecantusDB 0.7 answers null. Recorded in the README's list of differences.
        eprintln!("SKIP pre_images_appear_when_enabled (post-image part): SecantusDB returns null for fullDocument: whenAvailable");
    } else {
        assert_eq!(
            upd.get_document("fullDocument").unwrap(),
            &doc! {"_id": 1, "v": "new"}
        );
    }
    let del = next(&mut cw).await;
    assert_eq!(
        del.get_document("fullDocumentBeforeChange").unwrap(),
        &doc! {"_id": 1, "v": "new"}
    );
    let other = next(&mut co).await;
    assert_eq!(other.get("fullDocumentBeforeChange"), Some(&Bson::Null));
    // collMod turns them on for an existing collection.
    db.run_command(doc! {"collMod": "without", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    without
        .update_one(doc! {"_id": 1}, doc! {"$set": {"v": "newer"}})
        .await
        .unwrap();
    let after = next(&mut co).await;
    assert_eq!(
        after.get_document("fullDocumentBeforeChange").unwrap(),
        &doc! {"_id": 1, "v": "new"}
    );
}

#[tokio::test]
async fn get_more_is_woken_by_a_commit() {
    let b = backend("wake").await;
    let coll = b.db().collection::<Document>("c");
    b.db().create_collection("c").await.unwrap();
    let mut cs = coll
        .watch()
        .max_await_time(Duration::from_secs(5))
        .await
        .unwrap()
        .with_type::<Document>();
    let writer = coll.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.insert_one(doc! {"_id": 1}).await.unwrap();
    });
    let ev = next(&mut cs).await;
    let took = started.elapsed();
    task.await.unwrap();
    assert_eq!(ev.get_str("operationType").unwrap(), "insert");
    assert!(
        took < Duration::from_millis(2500),
        "event took {took:?}, the getMore was not woken by the commit"
    );
}

#[tokio::test]
async fn unsupported_features_answer_with_named_errors() {
    let b = backend("unsupported").await;
    let db = b.db();
    let err = db.run_command(doc! {"frobnicate": 1}).await.unwrap_err();
    assert_eq!(code(&err), Some(59));
    assert!(format!("{err}").contains("frobnicate"), "{err}");
    let coll = db.collection::<Document>("c");
    coll.insert_one(doc! {"a": 1}).await.unwrap();
    let err = coll
        .aggregate([doc! {"$frobnicate": {}}])
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(40324), "{err}");
    assert!(format!("{err}").contains("$frobnicate"), "{err}");
    let err = coll.find(doc! {"a": {"$frob": 1}}).await.unwrap_err();
    assert_eq!(code(&err), Some(2), "{err}");
    assert!(format!("{err}").contains("$frob"), "{err}");
    if b.kind != Kind::Sim {
        return;
    }
    // Features mongod has and mongo-sim does not: named, never silently wrong.
    let err = coll.find(doc! {"a": {"$regex": "x"}}).await.unwrap_err();
    assert!(format!("{err}").contains("$regex"), "{err}");
    let err = coll
        .aggregate([doc! {"$lookup": {"from": "x"}}])
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("$lookup"), "{err}");
    let err = coll
        .update_one(doc! {}, doc! {"$set": {"a.$[x]": 1}})
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("positional"), "{err}");
    let err = coll
        .find(doc! {})
        .collation(mongodb::options::Collation::builder().locale("fr").build())
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("collation"), "{err}");
    let mut session = b.client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    let err = coll
        .insert_one(doc! {"a": 2})
        .session(&mut session)
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("transactions"), "{err}");
}

#[tokio::test]
async fn data_file_survives_a_process_restart() {
    if !support::is_sim() {
        skip!("data_file_survives_a_process_restart", "needs mongo-sim");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = SimConfig {
        data_file: Some(dir.path().join("sim.bson")),
        ..SimConfig::default()
    };
    let sim = MongoSim::start(cfg.clone()).await.unwrap();
    let client = support::client(&sim.uri()).await;
    let coll = client.database("persist").collection::<Document>("c");
    client
        .database("persist")
        .run_command(doc! {"create": "c", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    let mut cs = coll.watch().await.unwrap().with_type::<Document>();
    coll.insert_one(doc! {"_id": 1}).await.unwrap();
    let ev = next(&mut cs).await;
    let Some(Bson::Timestamp(t1)) = ev.get("clusterTime").cloned() else {
        panic!()
    };
    coll.insert_one(doc! {"_id": 2}).await.unwrap();
    drop(cs);
    drop(client);
    sim.shutdown().await;

    let sim = MongoSim::start(cfg).await.unwrap();
    let client = support::client(&sim.uri()).await;
    let coll = client.database("persist").collection::<Document>("c");
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    let mut r = coll
        .watch()
        .resume_after(token_of(&ev))
        .await
        .unwrap()
        .with_type::<Document>();
    assert_eq!(collect_ids(&mut r, 1).await, vec![2]);
    coll.insert_one(doc! {"_id": 3}).await.unwrap();
    let e3 = next(&mut r).await;
    let Some(Bson::Timestamp(t3)) = e3.get("clusterTime").cloned() else {
        panic!()
    };
    assert!(
        (t3.time, t3.increment) > (t1.time, t1.increment),
        "clock must not go back: {t1:?} {t3:?}"
    );
    let opts = client
        .database("persist")
        .list_collections()
        .await
        .unwrap()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        opts.options
            .change_stream_pre_and_post_images
            .map(|o| o.enabled),
        Some(true)
    );
    let _: Timestamp = t3;
}
