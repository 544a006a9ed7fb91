//! Real MongoDB change events (`fixtures/`) through changecast's token and mapper code, and mongo-sim's events compared with them field by field.

#![allow(clippy::unwrap_used)] // a fixture that does not load is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bson::{doc, Bson, Document};
use changecast::config::Config;
use changecast::mapper::Mapper;
use changecast::metrics::{Metrics, ReasonLabels};
use changecast::sequence::{self, Sequencer};
use changecast::token;
use futures::StreamExt;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};

/// One file of `fixtures/`.
struct Fixture {
    /// Path relative to `fixtures/`, e.g. `mongoshake/insert.json`.
    name: String,
    /// `verbatim`, `verbatim-with-elisions`, `partial`, `reconstructed` or `adapted`.
    fidelity: String,
    /// `real` (the source printed the token) or `absent`.
    token: String,
    /// The server version the source names.
    server: String,
    /// Routing expectations (adapted fixtures only).
    expect: Option<serde_json::Value>,
    event: Document,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn load_all() -> Vec<Fixture> {
    let root = fixtures_dir();
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.strip_prefix(&root).unwrap().display().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let json: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let field = |k: &str| {
                json.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_else(|| panic!("{name}: no string field {k}"))
                    .to_owned()
            };
            let source = json
                .get("source")
                .unwrap_or_else(|| panic!("{name}: no source"));
            assert!(
                source.get("url").is_some() || source.get("repo").is_some(),
                "{name}: the source names neither a URL nor a repository"
            );
            let event = match Bson::try_from(json["event"].clone()) {
                Ok(Bson::Document(d)) => d,
                other => panic!("{name}: event is not extended JSON of a document: {other:?}"),
            };
            Fixture {
                server: source["server"].as_str().unwrap_or("?").to_owned(),
                fidelity: field("fidelity"),
                token: field("token"),
                expect: json.get("expect").cloned(),
                name,
                event,
            }
        })
        .collect()
}

fn config(toml: &str) -> Arc<Config> {
    let secret = |name: &str| {
        (name == "CHANGECAST_JWT_SECRET")
            .then(|| "fixture-secret-0123456789abcdef0123456789".into())
    };
    Arc::new(Config::from_toml_str_with_env(toml, "fixtures", &secret).unwrap())
}

fn dropped(metrics: &Metrics, reason: &'static str) -> u64 {
    metrics
        .events_dropped
        .get_or_create(&ReasonLabels { reason })
        .get()
}

fn dropped_total(metrics: &Metrics) -> u64 {
    changecast::metrics::DROP_REASONS
        .iter()
        .map(|r| dropped(metrics, r))
        .sum()
}

#[test]
fn the_collection_covers_every_kind_it_promises() {
    let all = load_all();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for f in &all {
        let op = f.event.get_str("operationType").unwrap_or("(fragment)");
        *kinds.entry(op.to_owned()).or_default() += 1;
        // A token is "real" exactly when the file carries one, and never made up for an "absent" one.
        let has = f
            .event
            .get_document("_id")
            .is_ok_and(|id| id.get_str("_data").is_ok());
        assert_eq!(has, f.token == "real", "{}: token field disagrees", f.name);
        if f.fidelity == "adapted" {
            assert!(
                f.expect.is_some(),
                "{}: adapted without expectations",
                f.name
            );
        }
    }
    for kind in [
        "insert",
        "update",
        "replace",
        "delete",
        "invalidate",
        "drop",
        "rename",
        "dropDatabase",
        "create",
        "createIndexes",
        "dropIndexes",
        "modify",
        "shardCollection",
        "reshardCollection",
        "refineCollectionShardKey",
        "(fragment)",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no fixture of kind {kind}: {kinds:?}"
        );
    }
    let real = all.iter().filter(|f| f.token == "real").count();
    assert!(real >= 25, "only {real} fixtures with real tokens");
}

#[test]
fn real_tokens_decode_to_the_events_cluster_time() {
    let mut checked = 0;
    for f in load_all().iter().filter(|f| f.token == "real") {
        let id = f.event.get_document("_id").unwrap();
        let data = id.get_str("_data").unwrap();
        // The id changecast gives the change: its time, its index at that time, its token.
        let ct = f.event.get_timestamp("clusterTime").unwrap();
        let mut seq = Sequencer::fresh();
        let eid = seq
            .next(&bson::RawDocumentBuf::from_document(&f.event).unwrap())
            .unwrap();
        assert_eq!(sequence::token_of(&eid), Some(data), "{}", f.name);
        assert_eq!(
            sequence::position(&eid).unwrap().timestamp(),
            ct,
            "{}",
            f.name
        );
        // Operators paste tokens back in both forms `parse_token` accepts.
        assert_eq!(
            token::parse_token(data).unwrap().get_str("_data").unwrap(),
            data
        );
        let json = format!("{{\"_data\":\"{data}\"}}");
        assert_eq!(
            token::parse_token(&json).unwrap().get_str("_data").unwrap(),
            data
        );
        // The whole `_id` (with `_typeBits` where mongod sent them) goes back to the driver intact.
        let driver = token::from_document(id).unwrap_or_else(|| panic!("{}", f.name));
        assert_eq!(token::to_document(&driver).as_ref(), Some(id), "{}", f.name);
        let decoded = token::cluster_time(data)
            .unwrap_or_else(|| panic!("{}: not read as a KeyString token", f.name));
        assert_eq!(decoded, ct, "{}: token time vs clusterTime", f.name);
        // The position before the event's time sorts before its id.
        assert!(sequence::time_id(ct) < eid, "{}", f.name);
        checked += 1;
    }
    assert!(checked >= 25, "{checked}");
}

#[test]
fn tokens_of_one_session_sort_in_commit_order() {
    // The Tencent page's events are one session in commit order: ids must not go backwards
    // (the dropDatabase/invalidate pair shares one printed token).
    let all = load_all();
    let session: Vec<&Fixture> = all
        .iter()
        .filter(|f| f.name.starts_with("mongod-4.0-tencent/"))
        .collect();
    assert_eq!(session.len(), 8);
    // MongoDB's own tokens sort, and the ids changecast builds from clusterTime agree.
    let tokens: Vec<&str> = session
        .iter()
        .map(|f| {
            f.event
                .get_document("_id")
                .unwrap()
                .get_str("_data")
                .unwrap()
        })
        .collect();
    for w in tokens.windows(2) {
        assert!(w[0] <= w[1], "{:?} then {:?}", w[0], w[1]);
    }
    let mut seq = Sequencer::fresh();
    let ids: Vec<_> = session
        .iter()
        .map(|f| {
            seq.next(&bson::RawDocumentBuf::from_document(&f.event).unwrap())
                .unwrap()
        })
        .collect();
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "{:?} then {:?}", w[0], w[1]);
    }
}

#[test]
fn every_fixture_is_mapped_or_counted_never_panics() {
    // Twice: with the default collections (every real fixture is another app's, so it
    // must be counted as unknown) and with each fixture's own collection watched as
    // `orders`, `payments` and `settings`, so the real shapes go all the way through.
    let all = load_all();
    for f in &all {
        let coll = f
            .event
            .get_document("ns")
            .ok()
            .and_then(|ns| ns.get_str("coll").ok())
            .unwrap_or("none");
        let mut configs = vec![("default", config(""))];
        for role in ["orders", "payments", "settings"] {
            let others: Vec<String> = ["orders", "payments", "settings"]
                .iter()
                .filter(|r| **r != role)
                .map(|r| format!("{r} = \"x-{r}\""))
                .collect();
            let toml = format!(
                "[mongodb.collections]\n{role} = \"{coll}\"\n{}\n",
                others.join("\n")
            );
            configs.push((role, config(&toml)));
        }
        for (label, cfg) in configs {
            let metrics = Arc::new(Metrics::new());
            let mut mapper = Mapper::new(&cfg, metrics.clone());
            let before = dropped_total(&metrics);
            let out = mapper.map(&f.event).unwrap();
            let after = dropped_total(&metrics);
            // Labelled with the collection's own name when watched, else "other".
            let read: i64 = BTreeSet::from([coll, "other", "orders", "payments", "settings"])
                .iter()
                .flat_map(|c| {
                    ["insert", "update", "replace", "delete", "other"].map(|op| {
                        metrics
                            .changes_read
                            .get_or_create(&changecast::metrics::ChangeLabels {
                                collection: c.to_string(),
                                op: op.to_string(),
                            })
                            .get() as i64
                    })
                })
                .sum();
            assert_eq!(read, 1, "{} ({label}): not counted as read", f.name);
            let mut issues = Vec::new();
            for ev in &out {
                assert_eq!(
                    sequence::token_of(&ev.event.id),
                    f.event
                        .get_document("_id")
                        .ok()
                        .and_then(|d| d.get_str("_data").ok()),
                    "{} ({label}): an event's id does not carry its change's token",
                    f.name
                );
                assert!(!ev.deliveries.is_empty());
                issues.push(ev.event.name.clone());
            }
            // A settings change that touches no configured section is not news and is
            // not a data problem: it is counted as read only (normalize.rs `settings`).
            if out.is_empty() && label != "settings" {
                assert!(
                    after > before,
                    "{} ({label}): nothing routed and nothing counted",
                    f.name
                );
            }
            let op = f.event.get_str("operationType").unwrap_or("");
            let crud = matches!(op, "insert" | "update" | "replace" | "delete");
            if !crud || f.token != "real" {
                assert!(
                    out.is_empty(),
                    "{} ({label}): a DDL event, fragment or tokenless event produced {issues:?}",
                    f.name
                );
            }
            if label == "default" && f.fidelity != "adapted" {
                assert!(out.is_empty(), "{}: foreign collection routed", f.name);
            }
        }
    }
}

#[test]
fn unknown_shapes_are_counted_by_reason() {
    let cfg = config("");
    let metrics = Arc::new(Metrics::new());
    let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
    for f in load_all() {
        let op = f.event.get_str("operationType").ok();
        let reason = if f.token != "real" {
            "missing_event_id"
        } else {
            match op {
                Some("insert" | "update" | "replace" | "delete") if f.fidelity == "adapted" => {
                    continue;
                }
                Some("insert" | "update" | "replace" | "delete") => "unknown_collection",
                Some(_) => "unhandled_operation",
                None => "unknown_operation",
            }
        };
        *expected.entry(reason).or_default() += 1;
        // A mapper per fixture: fixtures from different sources are not one stream, and
        // their cluster times go back and forth (which one stream would refuse).
        let mut mapper = Mapper::new(&cfg, metrics.clone());
        let _ = mapper.map(&f.event);
    }
    for (reason, n) in &expected {
        assert_eq!(dropped(&metrics, reason), *n, "{reason}");
    }
    assert!(expected["unhandled_operation"] >= 14, "{expected:?}");
}

/// Adapted fixtures whose expectation changecast does not meet today, each a bug
/// reported with its cause. The test checks they still fail the way described, so
/// a fix makes it fail until the entry is removed.
const KNOWN_CHANGECAST_BUGS: &[(&str, &str)] = &[];

#[test]
fn adapted_fixtures_route_to_their_owners_rooms() {
    let cfg = config("");
    let mut n = 0;
    for f in load_all().into_iter().filter(|f| f.fidelity == "adapted") {
        let expect = f.expect.as_ref().unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut mapper = Mapper::new(&cfg, metrics.clone());
        let out = mapper.map(&f.event).unwrap();
        if let Some((_, why)) = KNOWN_CHANGECAST_BUGS.iter().find(|(n, _)| *n == f.name) {
            let reason = why.split(':').next().unwrap();
            let reason: &'static str = changecast::metrics::DROP_REASONS
                .iter()
                .find(|r| **r == reason)
                .unwrap();
            assert!(
                out.is_empty() && dropped(&metrics, reason) == 1,
                "{}: the known bug no longer reproduces; remove it from KNOWN_CHANGECAST_BUGS: {out:?}",
                f.name
            );
            n += 1;
            continue;
        }
        if let Some(reason) = expect.get("dropped").and_then(|r| r.as_str()) {
            assert!(out.is_empty(), "{}: {out:?}", f.name);
            let reason: &'static str = changecast::metrics::DROP_REASONS
                .iter()
                .find(|r| **r == reason)
                .unwrap();
            assert_eq!(dropped(&metrics, reason), 1, "{}", f.name);
            n += 1;
            continue;
        }
        assert_eq!(out.len(), 1, "{}: {out:?}", f.name);
        let ev = &out[0];
        assert_eq!(
            &*ev.event.name,
            expect["event"].as_str().unwrap(),
            "{}",
            f.name
        );
        let rooms: BTreeSet<String> = ev.deliveries.iter().map(|d| d.room.to_string()).collect();
        let want: BTreeSet<String> = expect["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(rooms, want, "{}", f.name);
        if let Some(status) = expect.get("status").and_then(|s| s.as_str()) {
            // Every audience of a record is told its normalized status.
            for d in &ev.deliveries {
                assert_eq!(
                    d.data.value()["status"].as_str(),
                    Some(status),
                    "{}",
                    f.name
                );
            }
        }
        assert_eq!(dropped_total(&metrics), 0, "{}", f.name);
        n += 1;
    }
    assert!(n >= 9, "{n}");
}

// ---------------------------------------------------------------------------
// mongo-sim against the fixtures
// ---------------------------------------------------------------------------

/// Subtrees that hold the user's data, not the event's structure: compared by type only.
const OPAQUE: [&str; 6] = [
    "fullDocument",
    "fullDocumentBeforeChange",
    "documentKey",
    "updateDescription.updatedFields",
    "updateDescription.disambiguatedPaths",
    "stateBeforeChange",
];

/// Subtrees whose keys are structure but whose values are the command's options.
const KEYS_ONLY: [&str; 1] = ["operationDescription"];

fn type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Null => "null",
        Bson::Int32(_) => "int",
        Bson::Timestamp(_) => "timestamp",
        Bson::Int64(_) => "long",
        _ => "other",
    }
}

/// `path -> type` for every structural field of an event.
fn shape(doc: &Document) -> BTreeMap<String, &'static str> {
    // A modify event's operationDescription is the collMod's own options: which keys
    // appear depends on the command, not on the server.
    let modify = doc.get_str("operationType") == Ok("modify");
    fn walk(prefix: &str, d: &Document, modify: bool, out: &mut BTreeMap<String, &'static str>) {
        for (k, v) in d {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone(), type_name(v));
            if OPAQUE.contains(&path.as_str()) || (modify && path == "operationDescription") {
                continue;
            }
            let keys_only = KEYS_ONLY.contains(&path.as_str());
            match v {
                Bson::Document(sub) if keys_only => {
                    for (k2, v2) in sub {
                        out.insert(format!("{path}.{k2}"), type_name(v2));
                    }
                }
                Bson::Document(sub) => walk(&path, sub, modify, out),
                Bson::Array(items) => {
                    for item in items {
                        match item {
                            Bson::Document(sub) => walk(&format!("{path}[]"), sub, modify, out),
                            other => {
                                out.insert(format!("{path}[]"), type_name(other));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", doc, modify, &mut out);
    out
}

/// Whether `path` lies inside an array that `other` has but holds empty: then the
/// elements' shape is unknown there, not different.
fn inside_empty_array(path: &str, other: &BTreeMap<String, &'static str>) -> bool {
    let Some(i) = path.find("[]") else {
        return false;
    };
    let array = &path[..i];
    other.get(array) == Some(&"array")
        && !other.keys().any(|k| k.starts_with(&format!("{array}[]")))
}

/// Which mongo-sim event a fixture is compared with.
fn variant(ev: &Document) -> String {
    if ev.contains_key("splitEvent") {
        return "fragment".into();
    }
    let op = ev.get_str("operationType").unwrap_or("fragment");
    let mut v = op.to_owned();
    if op == "update" && ev.contains_key("fullDocument") {
        v.push_str("+fullDocument");
    }
    if ev.contains_key("fullDocumentBeforeChange") {
        v.push_str("+preImage");
    }
    if ev
        .get_document("updateDescription")
        .is_ok_and(|u| u.contains_key("disambiguatedPaths"))
    {
        v.push_str("+expanded");
    }
    v
}

/// Fields a MongoDB release added after the fixture's server: their absence in an
/// older fixture is not a difference of mongo-sim (which answers as 7.0).
fn newer_than(server: &str, path: &str) -> bool {
    let old = server.starts_with("4.");
    old && matches!(path, "wallTime" | "updateDescription.truncatedArrays")
}

/// The differences the comparison found on the day it was written, each explained
/// in fixtures/README.md. The test fails on any other difference, and on a listed
/// one that no longer occurs, so this list and the README stay true.
const KNOWN_DIFFERENCES: &[&str] = &[
    "createIndexes: missing _id._typeBits: binData",
    "dropIndexes: missing _id._typeBits: binData",
];

/// Kinds mongo-sim cannot produce, and the measured reason.
fn expected_unproducible(kind: &str) -> Option<&'static str> {
    match kind {
        "shardCollection" | "reshardCollection" | "refineCollectionShardKey" => {
            Some("mongo-sim is a single replica-set member: no sharding")
        }
        _ => None,
    }
}

async fn next(stream: &mut mongodb::change_stream::ChangeStream<Document>) -> Document {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("no change event within 10 s")
        .expect("stream ended")
        .expect("stream error")
}

async fn read_one_each(
    streams: &mut [&mut mongodb::change_stream::ChangeStream<Document>],
    out: &mut BTreeMap<String, Document>,
) {
    for stream in streams.iter_mut() {
        let ev = next(stream).await;
        out.entry(variant(&ev)).or_insert(ev);
    }
}

/// Runs on mongo-sim the operations the fixtures record, and returns one event per variant.
async fn sim_events(client: &mongodb::Client) -> BTreeMap<String, Document> {
    let mut out = BTreeMap::new();
    let db = client.database("fx");
    let coll = db.collection::<Document>("test");
    coll.insert_one(doc! {"_id": 0, "seed": true})
        .await
        .unwrap();
    db.run_command(doc! {"collMod": "test", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();

    let mut plain = db.watch().await.unwrap().with_type::<Document>();
    let mut lookup = db
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .unwrap()
        .with_type::<Document>();
    let mut pre = db
        .watch()
        .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
        .await
        .unwrap()
        .with_type::<Document>();
    let mut expanded = db
        .watch()
        .show_expanded_events(true)
        .await
        .unwrap()
        .with_type::<Document>();

    // CRUD, each read from every stream before the next write, so an update's
    // `updateLookup` finds the document it describes.
    coll.insert_one(doc! {"_id": 1, "a": {"1": 1}, "ok": true})
        .await
        .unwrap();
    read_one_each(
        &mut [&mut plain, &mut lookup, &mut pre, &mut expanded],
        &mut out,
    )
    .await;
    coll.update_one(
        doc! {"_id": 1},
        doc! {"$set": {"a.1": 2}, "$unset": {"ok": 1}},
    )
    .await
    .unwrap();
    read_one_each(
        &mut [&mut plain, &mut lookup, &mut pre, &mut expanded],
        &mut out,
    )
    .await;
    coll.replace_one(doc! {"_id": 1}, doc! {"kick": 10})
        .await
        .unwrap();
    read_one_each(
        &mut [&mut plain, &mut lookup, &mut pre, &mut expanded],
        &mut out,
    )
    .await;
    coll.delete_one(doc! {"_id": 1}).await.unwrap();
    read_one_each(
        &mut [&mut plain, &mut lookup, &mut pre, &mut expanded],
        &mut out,
    )
    .await;

    // DDL: expanded events first (create, createIndexes, modify, dropIndexes), then the
    // classic rename/drop/dropDatabase/invalidate a database stream sees.
    // As the fixture's create: with pre- and post-images on.
    db.create_collection("made")
        .change_stream_pre_and_post_images(
            mongodb::options::ChangeStreamPreAndPostImages::builder()
                .enabled(true)
                .build(),
        )
        .await
        .unwrap();
    db.run_command(doc! {"createIndexes": "made", "indexes": [{"key": {"a": 1}, "name": "a_1"}]})
        .await
        .unwrap();
    db.run_command(doc! {"collMod": "made", "changeStreamPreAndPostImages": {"enabled": false}})
        .await
        .unwrap();
    db.run_command(doc! {"dropIndexes": "made", "index": "a_1"})
        .await
        .unwrap();
    client
        .database("admin")
        .run_command(doc! {"renameCollection": "fx.test", "to": "fx.test1"})
        .await
        .unwrap();
    db.collection::<Document>("test1").drop().await.unwrap();
    db.drop().await.unwrap();
    loop {
        let ev = next(&mut expanded).await;
        let op = ev.get_str("operationType").unwrap_or("").to_owned();
        out.entry(variant(&ev)).or_insert(ev);
        if op == "invalidate" {
            break;
        }
    }
    loop {
        let ev = next(&mut plain).await;
        let op = ev.get_str("operationType").unwrap_or("").to_owned();
        // The plain stream's DDL events are the classic (non-expanded) form; keep those.
        out.insert(variant(&ev), ev);
        if op == "invalidate" {
            break;
        }
    }
    out
}

#[tokio::test]
async fn mongo_sim_events_have_the_fixtures_fields_and_types() {
    let sim = mongo_sim::MongoSim::start(mongo_sim::SimConfig::default())
        .await
        .unwrap();
    let client = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
    let sim_events = sim_events(&client).await;

    let mut found: BTreeSet<String> = BTreeSet::new();
    for f in load_all()
        .iter()
        .filter(|f| f.fidelity != "adapted" && f.event.contains_key("operationType"))
    {
        let kind = variant(&f.event);
        let Some(sim_ev) = sim_events.get(&kind) else {
            // Fragments need `$changeStreamSplitLargeEvent`, whose refusal is recorded below.
            if kind == "fragment" {
                continue;
            }
            let op = f.event.get_str("operationType").unwrap();
            match expected_unproducible(op) {
                Some(_) => continue,
                None => {
                    found.insert(format!("{kind}: mongo-sim produced no such event"));
                    continue;
                }
            }
        };
        let want = shape(&f.event);
        let got = shape(sim_ev);
        // Partial or elided fixtures say nothing about the fields they leave out.
        let complete = f.token == "real";
        for (path, ty) in &want {
            match got.get(path) {
                None if inside_empty_array(path, &got) => {}
                None => {
                    found.insert(format!("{kind}: missing {path}: {ty}"));
                }
                Some(t) if t != ty => {
                    found.insert(format!("{kind}: {path} is {t}, mongod {ty}"));
                }
                Some(_) => {}
            }
        }
        if complete {
            for (path, ty) in &got {
                if !want.contains_key(path)
                    && !newer_than(&f.server, path)
                    && !inside_empty_array(path, &want)
                {
                    found.insert(format!("{kind}: extra {path}: {ty}"));
                }
            }
        }
    }
    // `$changeStreamSplitLargeEvent` (the fragments' stage): measured, not assumed. An
    // update of about 18 MiB is split; each fragment's token and `splitEvent` must have
    // the fixtures' shape (the other fields depend on how the event was cut).
    let split = client
        .database("fx2")
        .watch()
        .pipeline([doc! {"$changeStreamSplitLargeEvent": {}}])
        .full_document(mongodb::options::FullDocumentType::UpdateLookup)
        .await;
    match split {
        Err(e) => {
            let code = match *e.kind {
                mongodb::error::ErrorKind::Command(ref c) => c.code,
                _ => -1,
            };
            found.insert(format!(
                "fragment: $changeStreamSplitLargeEvent refused with code {code}"
            ));
        }
        Ok(stream) => {
            // Fragments after the first have no operationType: read them as documents.
            let mut stream = stream.with_type::<Document>();
            let coll = client.database("fx2").collection::<Document>("big");
            coll.insert_one(doc! {"_id": 1, "blob": "a"}).await.unwrap();
            let nine = "b".repeat(9 * 1024 * 1024);
            coll.update_one(doc! {"_id": 1}, doc! {"$set": {"blob": nine}})
                .await
                .unwrap();
            let mut fragments = Vec::new();
            while fragments.len() < 8 {
                let Some(ev) = stream.next_if_any().await.unwrap() else {
                    continue;
                };
                let last = ev
                    .get_document("splitEvent")
                    .is_ok_and(|s| s.get("fragment") == s.get("of"));
                if ev.contains_key("splitEvent") {
                    fragments.push(ev);
                }
                if last {
                    break;
                }
            }
            if fragments.len() < 2 {
                found.insert("fragment: an 18 MiB update was not split".into());
            }
            for f in load_all()
                .iter()
                .filter(|f| f.event.contains_key("splitEvent"))
            {
                let want = shape(&f.event);
                for sim in &fragments {
                    let got = shape(sim);
                    for (path, ty) in want
                        .iter()
                        .filter(|(p, _)| p.starts_with("_id.") || p.starts_with("splitEvent"))
                    {
                        if got.get(path) != Some(ty) {
                            found.insert(format!(
                                "fragment: {path} is {:?}, mongod {ty}",
                                got.get(path)
                            ));
                        }
                    }
                }
            }
        }
    }

    let known: BTreeSet<String> = KNOWN_DIFFERENCES.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "mongo-sim vs mongod fixtures changed.\nnew differences (fix mongo-sim or explain them in fixtures/README.md and KNOWN_DIFFERENCES):\n{}\nlisted but no longer found:\n{}",
        new.iter().map(|s| format!("  {s:?},")).collect::<Vec<_>>().join("\n"),
        gone.iter().map(|s| format!("  {s:?},")).collect::<Vec<_>>().join("\n"),
    );
    sim.shutdown().await;
}
