//! Integration tests: change events over MongoDB's 16 MiB limit (issue 18): split and put back together where the server can, skipped with `resync` or fatal where it cannot, and never a restart loop.

use std::time::Duration;

use bson::doc;
use serde_json::Value;

use crate::resume::{spawn_logging, write_config};
use crate::support::*;

const MIB: usize = 1024 * 1024;

/// An order of customer `cb` at store `sb` carrying `mib` MiB in `notes`, a field the
/// store's allowlist names (so the stream asks for it: a field no allowlist names stays
/// on the server, see `a_large_field_no_audience_sees_never_makes_an_event_too_large`)
/// and the customer's does not.
async fn big_order(db: &Db, id: &str, mib: usize) {
    db.coll("orders")
        .insert_one(doc! {
            "_id": id, "customerId": "cb", "storeId": "sb", "status": "new",
            "orderNumber": 7, "notes": "a".repeat(mib * MIB),
        })
        .await
        .unwrap();
}

/// Replaces the notes with 9 MiB and moves the status on: the update's event carries
/// the 9 MiB in `updateDescription` and again in the looked-up `fullDocument`, about
/// 18 MiB in all.
async fn big_update(db: &Db, id: &str) {
    db.coll("orders")
        .update_one(
            doc! {"_id": id},
            doc! {"$set": {"status": "accepted", "notes": "b".repeat(9 * MIB)}},
        )
        .await
        .unwrap();
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The next `event` or `resync` message of `room`, skipping others.
async fn next_in(c: &mut Client, room: &str, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = c.next_json_within(left).await?;
        if (m["type"] == "event" || m["type"] == "resync") && m["room"] == room {
            return Some(m);
        }
    }
}

/// A 10 MiB order updated with a 9 MiB `$set`: the event is over 16 MiB, the server splits
/// it, changecast puts the fragments back together and the customer gets the status change
/// with its allowlisted fields only; the checkpoint is the last fragment's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_16_mib_is_delivered_through_split_events() {
    let db = Db::start().await;
    let mut server = Server::start(&db, "").await;
    let (mut c, _) = Client::connect(&server, &customer_token("cb")).await;
    big_order(&db, "big1", 10).await;
    let created = next_in(&mut c, "customer:cb", Duration::from_secs(20))
        .await
        .expect("order:created");
    assert_eq!(created["event"], "order:created", "{created}");
    big_update(&db, "big1").await;
    let changed = next_in(&mut c, "customer:cb", Duration::from_secs(20))
        .await
        .expect("the status change of the 18 MiB event");
    assert_eq!(changed["event"], "order:status_changed", "{changed}");
    assert_eq!(changed["data"]["status"], "processing");
    assert_eq!(changed["data"]["orderNumber"], 7);
    assert!(changed["data"].get("notes").is_none());
    let (_, metrics) = server.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "changecast_events_dropped_total{reason=\"oversize\"}"
        ),
        0.0
    );
    assert_eq!(metric(&metrics, "changecast_stream_reconnects_total"), 0.0);
    if backend().await == Backend::MongoSim {
        // mongo-sim's fragment tokens end in FE: the saved position is after the whole
        // event, never between its fragments.
        let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
        server.stop().await.unwrap();
        let cp: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("checkpoint.json")).unwrap(),
        )
        .unwrap();
        let token = cp["streams"][&db.name]["token"]["_data"].as_str().unwrap();
        assert!(
            token.ends_with("00000001FE"),
            "not the second fragment's token: {token}"
        );
    }
}

/// SIGKILL of `changecast tail` after the first fragment of a split event was read and
/// before the second: the restarted process reads the whole event again and prints it
/// once; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_fragments_loses_nothing() {
    if skip_unless_sim(
        "a_kill_between_fragments_loses_nothing",
        "mongo-sim's failCommand blockConnection, to hold getMore between fragments",
    ) {
        return;
    }
    let db = Db::start().await;
    big_order(&db, "big2", 10).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let mut first = spawn_logging(
        &["tail", "--config", cfg_s, "--from-now"],
        dir.path().join("first.jsonl"),
        true,
        "info,changecast::source=debug",
    );
    first
        .wait_stderr("change stream open", Duration::from_secs(20))
        .await;
    // From now on every getMore waits 5 s before it runs: the one already waiting returns
    // the first fragment (each fragment fills a batch), the next one holds the second.
    db.client
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["getMore"], "blockConnection": true, "blockTimeMS": 5000},
        })
        .await
        .unwrap();
    big_update(&db, "big2").await;
    first
        .wait_stderr("fragment=1 of=2", Duration::from_secs(20))
        .await;
    assert!(
        !first.stderr().contains("fragment=2 of=2"),
        "both fragments were read before the kill"
    );
    signal(&first.child, "-KILL");
    first.wait_exit(Duration::from_secs(5)).await;
    assert!(first.lines().is_empty(), "{:?}", first.lines());
    db.client
        .database("admin")
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .await
        .unwrap();

    let second = spawn_logging(
        &["tail", "--config", cfg_s],
        dir.path().join("second.jsonl"),
        true,
        "info",
    );
    let lines = second
        .lines_until(Duration::from_secs(30), |l| {
            l["event"] == "order:status_changed"
        })
        .await;
    let changes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "order:status_changed")
        .collect();
    assert_eq!(changes.len(), 1, "{lines:?}");
    let customer = changes[0]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["room"] == "customer:cb")
        .expect("delivered to the customer");
    assert_eq!(customer["data"]["status"], "processing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = second
        .lines()
        .iter()
        .filter(|l| l["event"] == "order:status_changed")
        .count();
    assert_eq!(again, 1, "printed twice");
}

/// A server that cannot split (MongoDB before 6.0.9; mongo-sim's `no_split_stage`): under
/// the default `oversize = "skip"` the event is skipped, counted and logged, its rooms get
/// `resync` (live, and from history for a client that comes back from before it), the
/// stream goes on at once, and the stream never restarts in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_split_an_oversized_event_is_skipped_with_resync_and_the_stream_goes_on() {
    if skip_unless_sim(
        "without_split_an_oversized_event_is_skipped_with_resync_and_the_stream_goes_on",
        "a server that refuses $changeStreamSplitLargeEvent and enforces the 16 MiB limit (mongo-sim no_split_stage; SecantusDB has no limit)",
    ) {
        return;
    }
    let db = Db::start_with(mongo_sim::SimConfig {
        no_split_stage: true,
        ..Default::default()
    })
    .await;
    let server = Server::start(&db, "").await;
    let (mut c, _) = Client::connect(&server, &customer_token("cb")).await;
    let (mut store, _) = Client::connect(&server, &store_token("staff", &["sb"])).await;
    big_order(&db, "big3", 10).await;
    let created = next_in(&mut c, "customer:cb", Duration::from_secs(20))
        .await
        .unwrap();
    let before = created["id"].as_str().unwrap().to_owned();
    // Two small changes around the big one, in one burst: the one before reaches the
    // client first (one-change batches find the big one without losing it), the one after
    // within a second of the skip.
    let orders = db.coll("orders");
    orders
        .insert_one(doc! {"_id": "small1", "customerId": "cb", "storeId": "sb", "status": "new", "orderNumber": 1})
        .await
        .unwrap();
    big_update(&db, "big3").await;
    orders
        .insert_one(doc! {"_id": "small2", "customerId": "cb", "storeId": "sb", "status": "new", "orderNumber": 2})
        .await
        .unwrap();
    let written = tokio::time::Instant::now();
    let got: Vec<Value> = {
        let mut got = Vec::new();
        while got.len() < 3 {
            match next_in(&mut c, "customer:cb", Duration::from_secs(20)).await {
                Some(m) => got.push(m),
                None => break,
            }
        }
        got
    };
    let kinds: Vec<String> = got
        .iter()
        .map(|m| {
            if m["type"] == "resync" {
                format!("resync:{}", m["reason"].as_str().unwrap_or(""))
            } else {
                format!(
                    "{}#{}",
                    m["event"].as_str().unwrap(),
                    m["data"]["orderNumber"]
                )
            }
        })
        .collect();
    assert_eq!(
        kinds,
        ["order:created#1", "resync:oversize", "order:created#2"],
        "{got:?}"
    );
    eprintln!(
        "oversized change skipped; the change after it arrived {:?} after the writes",
        written.elapsed()
    );
    // The store's room too: big3's creation, small1, the notice, small2.
    let mut store_msgs = Vec::new();
    while let Some(m) = next_in(&mut store, "store:sb", Duration::from_secs(2)).await {
        store_msgs.push(m["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(store_msgs, ["event", "event", "resync", "event"]);

    // A client that comes back from before the gap is told too, in its place.
    let (mut back, _) = Client::connect(&server, &admin_token()).await;
    let ack = back.subscribe("customer:cb", Some(&before)).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let mut replay = Vec::new();
    while let Some(m) = next_in(&mut back, "customer:cb", Duration::from_millis(800)).await {
        replay.push(m["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(replay, ["event", "resync", "event"]);

    let (_, metrics) = server.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "changecast_events_dropped_total{reason=\"oversize\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "changecast_stream_reconnects_total"),
        0.0,
        "{metrics}"
    );
    // And it stays put: no loop on the same change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, later) = server.get("/metrics").await;
    assert_eq!(metric(&later, "changecast_stream_reconnects_total"), 0.0);
    assert_eq!(
        metric(
            &later,
            "changecast_events_dropped_total{reason=\"oversize\"}"
        ),
        1.0
    );
}

/// `oversize = "fail"` on a server that cannot split: `tail` stops with exit code 4 and
/// names the change; the checkpoint stays before it (a restart meets it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_an_oversized_event_stops_with_exit_code_4() {
    if skip_unless_sim(
        "with_fail_an_oversized_event_stops_with_exit_code_4",
        "a server that refuses $changeStreamSplitLargeEvent and enforces the 16 MiB limit (mongo-sim no_split_stage)",
    ) {
        return;
    }
    let db = Db::start_with(mongo_sim::SimConfig {
        no_split_stage: true,
        ..Default::default()
    })
    .await;
    big_order(&db, "big4", 10).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&db, dir.path(), "");
    // The [mongodb] table is written by write_config; the key goes into it.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[mongodb]\n",
        "[mongodb]\noversize = \"fail\"\n",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let mut p = spawn_logging(
        &["tail", "--config", cfg_s, "--from-now"],
        dir.path().join("out.jsonl"),
        true,
        "info",
    );
    p.wait_stderr("change stream open", Duration::from_secs(20))
        .await;
    big_update(&db, "big4").await;
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(4), "{}", p.stderr());
    let err = p.stderr();
    assert!(err.contains("over the 16 MiB"), "{err}");
    assert!(err.contains("big4"), "the change is named: {err}");
    assert!(p
        .lines()
        .iter()
        .all(|l| l["event"] != "order:status_changed"));
}

/// A 10 MiB `attachment` that no audience's allowlist names, then a 9 MiB `$set` of it
/// with a status change: the stream asks the server for only the fields mapping reads
/// (`$project`), so the event carries the 9 MiB once (in its update description), not
/// again in the looked-up document, and stays under 16 MiB on a server that cannot split
/// events: the status change is delivered, nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_field_no_audience_sees_never_makes_an_event_too_large() {
    if skip_unless_sim(
        "a_large_field_no_audience_sees_never_makes_an_event_too_large",
        "a server that enforces the 16 MiB limit and cannot split (mongo-sim no_split_stage; SecantusDB has no limit, a real mongod would split)",
    ) {
        return;
    }
    let db = Db::start_with(mongo_sim::SimConfig {
        no_split_stage: true,
        ..Default::default()
    })
    .await;
    let server = Server::start(&db, "").await;
    let (mut c, _) = Client::connect(&server, &customer_token("cb")).await;
    let orders = db.coll("orders");
    orders
        .insert_one(doc! {
            "_id": "att1", "customerId": "cb", "storeId": "sb", "status": "new",
            "orderNumber": 9, "attachment": "a".repeat(10 * MIB),
        })
        .await
        .unwrap();
    let created = next_in(&mut c, "customer:cb", Duration::from_secs(20))
        .await
        .expect("order:created");
    assert_eq!(created["event"], "order:created", "{created}");
    orders
        .update_one(
            doc! {"_id": "att1"},
            doc! {"$set": {"status": "accepted", "attachment": "b".repeat(9 * MIB)}},
        )
        .await
        .unwrap();
    let changed = next_in(&mut c, "customer:cb", Duration::from_secs(20))
        .await
        .expect("the status change");
    assert_eq!(changed["type"], "event", "{changed}");
    assert_eq!(changed["event"], "order:status_changed", "{changed}");
    assert_eq!(changed["data"]["status"], "processing");
    assert_eq!(changed["data"]["orderNumber"], 9);
    let (_, metrics) = server.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "changecast_events_dropped_total{reason=\"oversize\"}"
        ),
        0.0,
        "{metrics}"
    );
}
