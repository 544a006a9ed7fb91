//! Declared streams (`[[streams]]`): the app's own collections as events, with config.example.toml's `users` and `deliveries` declarations as shipped.

use std::time::Duration;

use bson::{doc, oid::ObjectId};
use serde_json::{json, Value};

use crate::support::*;

/// The `[[streams]]` tables of config.example.toml, as shipped.
fn example_streams() -> String {
    let ex = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    let start = ex
        .find("\n[[streams]]")
        .expect("the example declares streams");
    let end = ex.find("\n[auth]").unwrap();
    ex[start..end].to_owned()
}

/// A `users` stream like the example's, also routed to `admin`, who sees more.
const USERS_WITH_ADMIN: &str = r#"
[[streams]]
collection = "users"
module = "balance"
tracked = ["balance"]
[streams.rooms]
customer = "_id"
admin = true
[streams.allow]
customer = ["_id", "balance", "currency"]
admin = ["_id", "balance", "currency", "email"]
"#;

/// Events of `room` among what `c` receives within `d`.
async fn events_in(c: &mut Client, room: &str, n: usize, d: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + d;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_json_within(left).await {
            Some(v) if v["type"] == "event" && v["room"] == room => out.push(v),
            Some(_) => {}
            None => break,
        }
    }
    out
}

/// The next event of `room` that `c` receives; panics after 15 s.
async fn next_in(c: &mut Client, room: &str) -> Value {
    let mut got = events_in(c, room, 1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1, "no event in {room}");
    got.remove(0)
}

fn names(evs: &[Value]) -> Vec<&str> {
    evs.iter().map(|e| e["event"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_replace_delete_reach_the_declared_rooms_through_their_allowlists() {
    let db = Db::start().await;
    let server = Server::start(&db, &example_streams()).await;
    let (mut customer, _) = Client::connect(&server, &customer_token("c1")).await;
    let (mut store, _) = Client::connect(&server, &store_token("owner-1", &["s1"])).await;

    let deliveries = db.coll("deliveries");
    let id = ObjectId::new();
    // Each write waits for the store's event before the next: payloads come from the
    // document looked up when the change is read (`updateLookup`), as for orders.
    let mut s = Vec::new();
    deliveries
        .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "date": "2026-12-02", "quantity": 2, "status": "scheduled", "notes": "gate 12", "internal": "x"})
        .await
        .unwrap();
    s.push(next_in(&mut store, "store:s1").await);
    deliveries
        .update_one(doc! {"_id": id}, doc! {"$set": {"status": "delivered"}})
        .await
        .unwrap();
    s.push(next_in(&mut store, "store:s1").await);
    // Only the store may see notes: the customer is not told of this update.
    deliveries
        .update_one(doc! {"_id": id}, doc! {"$set": {"notes": "gate 13"}})
        .await
        .unwrap();
    s.push(next_in(&mut store, "store:s1").await);
    deliveries
        .replace_one(
            doc! {"_id": id},
            doc! {"customerId": "c1", "storeId": "s1", "date": "2026-12-03", "quantity": 3, "status": "scheduled"},
        )
        .await
        .unwrap();
    s.push(next_in(&mut store, "store:s1").await);
    // No pre-images here: the delete is routed from what the stream saw.
    deliveries.delete_one(doc! {"_id": id}).await.unwrap();
    s.push(next_in(&mut store, "store:s1").await);

    let c = events_in(&mut customer, "customer:c1", 4, Duration::from_secs(15)).await;
    assert_eq!(
        names(&c),
        [
            "delivery:created",
            "delivery:updated",
            "delivery:replaced",
            "delivery:deleted"
        ]
    );
    let hex = id.to_hex();
    assert_eq!(
        c[0]["data"],
        json!({"_id": hex, "date": "2026-12-02", "quantity": 2, "status": "scheduled"})
    );
    assert_eq!(
        c[1]["data"],
        json!({"_id": hex, "date": "2026-12-02", "quantity": 2, "status": "delivered", "changedFields": ["status"]})
    );
    assert_eq!(c[2]["data"]["quantity"], 3);
    assert_eq!(c[3]["data"], json!({"_id": hex}));

    assert_eq!(
        names(&s),
        [
            "delivery:created",
            "delivery:updated",
            "delivery:updated",
            "delivery:replaced",
            "delivery:deleted"
        ]
    );
    assert_eq!(s[0]["data"]["notes"], "gate 12");
    assert_eq!(s[0]["data"]["customerId"], "c1");
    assert_eq!(s[2]["data"]["notes"], "gate 13");
    assert_eq!(s[2]["data"]["changedFields"], json!(["notes"]));
    for e in c.iter().chain(&s) {
        assert!(e["data"].get("internal").is_none(), "{e}");
    }
    // Ids are the same path as the built-ins': one per change, in commit order.
    let ids: Vec<String> = s
        .iter()
        .map(|e| token_of(e["id"].as_str().unwrap()))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted);

    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics
            .contains("changecast_changes_read_total{collection=\"deliveries\",op=\"insert\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("changecast_events_routed_total{event=\"delivery:created\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_from_10_to_25_reaches_only_its_customer_with_old_new_and_delta() {
    let db = Db::start().await;
    let server = Server::start(&db, &example_streams()).await;
    let user = ObjectId::new();
    let (mut me, welcome) = Client::connect(&server, &customer_token(&user.to_hex())).await;
    assert_eq!(
        welcome["rooms"],
        json!([format!("customer:{}", user.to_hex())])
    );
    let (mut other, _) = Client::connect(&server, &customer_token("someone-else")).await;
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;

    let users = db.coll("users");
    users
        .insert_one(doc! {"_id": user, "name": "Ann", "email": "ann@example.com", "balance": 10, "currency": "EUR"})
        .await
        .unwrap();
    users
        .update_one(doc! {"_id": user}, doc! {"$set": {"balance": 25}})
        .await
        .unwrap();
    let room = format!("customer:{}", user.to_hex());
    let evs = events_in(&mut me, &room, 2, Duration::from_secs(15)).await;
    assert_eq!(names(&evs), ["balance:created", "balance:updated"]);
    assert_eq!(
        evs[1]["data"],
        json!({
            "_id": user.to_hex(), "balance": 25, "currency": "EUR", "changedFields": ["balance"],
            "tracked": {"balance": {"old": 10, "new": 25, "delta": 15, "known": true}},
        })
    );
    // Nowhere else: not another customer, not the admin room (the example routes to the customer only).
    assert!(other
        .drain(Duration::from_millis(500))
        .await
        .iter()
        .all(|m| m["type"] != "event"));
    assert!(admin
        .drain(Duration::from_millis(300))
        .await
        .iter()
        .all(|m| m["type"] != "event"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pre_images_a_first_update_of_an_unseen_document_has_an_unknown_old_value() {
    let db = Db::start().await;
    let users = db.coll("users");
    let user = ObjectId::new();
    // Written before changecast starts: this process never saw the balance of 10.
    users
        .insert_one(doc! {"_id": user, "balance": 10})
        .await
        .unwrap();
    let server = Server::start(&db, &example_streams()).await;
    let (mut me, _) = Client::connect(&server, &customer_token(&user.to_hex())).await;
    users
        .update_one(doc! {"_id": user}, doc! {"$set": {"balance": 25}})
        .await
        .unwrap();
    users
        .update_one(doc! {"_id": user}, doc! {"$inc": {"balance": -5}})
        .await
        .unwrap();
    let room = format!("customer:{}", user.to_hex());
    let evs = events_in(&mut me, &room, 2, Duration::from_secs(15)).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(
        evs[0]["data"]["tracked"]["balance"],
        json!({"old": null, "new": 25, "delta": null, "known": false})
    );
    // Then the state cache knows it.
    assert_eq!(
        evs[1]["data"]["tracked"]["balance"],
        json!({"old": 25, "new": 20, "delta": -5, "known": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pre_images_the_old_value_of_an_unseen_document_is_known() {
    const TEST: &str = "declared::with_pre_images_the_old_value_of_an_unseen_document_is_known";
    let db = Db::start().await;
    let created = db
        .client
        .database(&db.name)
        .run_command(doc! {"create": "users", "changeStreamPreAndPostImages": {"enabled": true}})
        .await;
    if let Err(e) = created {
        skip(TEST, &format!("the server does not record pre-images: {e}"));
        return;
    }
    let users = db.coll("users");
    let user = ObjectId::new();
    users
        .insert_one(doc! {"_id": user, "balance": 10})
        .await
        .unwrap();
    let server = Server::start(&db, &example_streams()).await;
    let (mut me, _) = Client::connect(&server, &customer_token(&user.to_hex())).await;
    users
        .update_one(doc! {"_id": user}, doc! {"$set": {"balance": 25}})
        .await
        .unwrap();
    users.delete_one(doc! {"_id": user}).await.unwrap();
    let room = format!("customer:{}", user.to_hex());
    let evs = events_in(&mut me, &room, 2, Duration::from_secs(15)).await;
    assert_eq!(names(&evs), ["balance:updated", "balance:deleted"]);
    let tracked = &evs[0]["data"]["tracked"]["balance"];
    if tracked["known"] == false && backend().await != Backend::MongoSim {
        skip(
            TEST,
            "the server accepted changeStreamPreAndPostImages but sent no fullDocumentBeforeChange",
        );
        return;
    }
    assert_eq!(
        *tracked,
        json!({"old": 10, "new": 25, "delta": 15, "known": true})
    );
    // The delete's payload comes from its pre-image.
    assert_eq!(
        evs[1]["data"],
        json!({"_id": user.to_hex(), "balance": 25, "tracked": {"balance": {"old": 25, "new": null, "delta": null, "known": true}}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_audience_sees_its_own_allowlist() {
    let db = Db::start().await;
    let server = Server::start(&db, USERS_WITH_ADMIN).await;
    let user = ObjectId::new();
    let (mut me, _) = Client::connect(&server, &customer_token(&user.to_hex())).await;
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    let users = db.coll("users");
    // Each write waits for the admin's event: payloads come from the looked-up document.
    let mut theirs = Vec::new();
    users
        .insert_one(
            doc! {"_id": user, "balance": 1, "email": "ann@example.com", "password": "hash"},
        )
        .await
        .unwrap();
    theirs.push(next_in(&mut admin, "admin").await);
    // email is the admin's only: the customer hears nothing of this update.
    users
        .update_one(
            doc! {"_id": user},
            doc! {"$set": {"email": "ann@example.org"}},
        )
        .await
        .unwrap();
    theirs.push(next_in(&mut admin, "admin").await);
    users
        .update_one(doc! {"_id": user}, doc! {"$set": {"balance": 2}})
        .await
        .unwrap();
    theirs.push(next_in(&mut admin, "admin").await);
    let room = format!("customer:{}", user.to_hex());
    let mine = events_in(&mut me, &room, 2, Duration::from_secs(15)).await;
    assert_eq!(names(&mine), ["balance:created", "balance:updated"]);
    assert_eq!(
        names(&theirs),
        ["balance:created", "balance:updated", "balance:updated"]
    );
    assert!(mine.iter().all(|e| e["data"].get("email").is_none()));
    assert_eq!(theirs[0]["data"]["email"], "ann@example.com");
    assert_eq!(theirs[1]["data"]["changedFields"], json!(["email"]));
    // The unchanged balance is known not to have moved.
    assert_eq!(theirs[1]["data"]["tracked"]["balance"]["delta"], 0);
    assert_eq!(mine[1]["data"]["tracked"]["balance"]["old"], 1);
    assert!(mine
        .iter()
        .chain(&theirs)
        .all(|e| e["data"].get("password").is_none()));
    // The same change, the same id, whichever room it reached.
    assert_eq!(mine[1]["id"], theirs[2]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_customer_recovers_missed_declared_events_from_history() {
    let db = Db::start().await;
    let server = Server::start(&db, &example_streams()).await;
    let user = ObjectId::new();
    let token = customer_token(&user.to_hex());
    let room = format!("customer:{}", user.to_hex());
    let users = db.coll("users");
    let (mut me, _) = Client::connect(&server, &token).await;
    users
        .insert_one(doc! {"_id": user, "balance": 10})
        .await
        .unwrap();
    let first = events_in(&mut me, &room, 1, Duration::from_secs(15)).await;
    let since = first[0]["id"].as_str().unwrap().to_owned();
    drop(me);

    for b in [20, 30] {
        users
            .update_one(doc! {"_id": user}, doc! {"$set": {"balance": b}})
            .await
            .unwrap();
    }
    // An observer makes sure both are in history before the reconnect.
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    assert_eq!(
        admin.subscribe(&room, Some(&since)).await["type"],
        "subscribed"
    );
    assert_eq!(
        events_in(&mut admin, &room, 2, Duration::from_secs(15))
            .await
            .len(),
        2
    );

    let mut again = Client::try_connect_url(
        &format!("{}?since={since}", server.ws_url()),
        Some(&token),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(again.next_json().await["type"], "welcome");
    let missed = events_in(&mut again, &room, 2, Duration::from_secs(10)).await;
    let deltas: Vec<&Value> = missed
        .iter()
        .map(|e| &e["data"]["tracked"]["balance"]["delta"])
        .collect();
    assert_eq!(deltas, [&json!(10), &json!(10)]);
    assert_eq!(names(&missed), ["balance:updated", "balance:updated"]);
    // Nothing twice, then live.
    users
        .update_one(doc! {"_id": user}, doc! {"$set": {"balance": 31}})
        .await
        .unwrap();
    let live = events_in(&mut again, &room, 1, Duration::from_secs(10)).await;
    assert_eq!(live[0]["data"]["balance"], 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_history_declared_events_are_replayed_from_the_oplog() {
    let db = Db::start().await;
    let server = Server::start(
        &db,
        &format!("[hub]\nhistory_len = 2\n{}", example_streams()),
    )
    .await;
    let user = ObjectId::new();
    let room = format!("customer:{}", user.to_hex());
    let users = db.coll("users");
    let (mut watch, _) = Client::connect(&server, &customer_token(&user.to_hex())).await;
    users
        .insert_one(doc! {"_id": user, "balance": 0})
        .await
        .unwrap();
    let since = events_in(&mut watch, &room, 1, Duration::from_secs(15)).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for b in 1..=5 {
        users
            .update_one(doc! {"_id": user}, doc! {"$set": {"balance": b}})
            .await
            .unwrap();
    }
    let want = events_in(&mut watch, &room, 5, Duration::from_secs(15)).await;
    assert_eq!(want.len(), 5);

    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    let ack = admin.subscribe(&room, Some(&since)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["recovered"], true, "{ack}");
    let got = events_in(&mut admin, &room, 5, Duration::from_secs(15)).await;
    let ids = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&got), ids(&want));
    // The looked-up document is today's (balance 5 in every payload, as for orders), but a
    // tracked field's new value is read from the update itself.
    let balances: Vec<&Value> = got
        .iter()
        .map(|e| &e["data"]["tracked"]["balance"]["new"])
        .collect();
    assert_eq!(
        balances,
        [&json!(1), &json!(2), &json!(3), &json!(4), &json!(5)]
    );
}

/// Oplog replay of changes to a declared document deleted since: the update and the delete
/// reach the customer's and store's rooms as they did live, though the replay's lookup finds
/// nothing and no pre-image exists (the rooms come from what the live stream saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_replay_routes_changes_to_declared_documents_deleted_since() {
    let db = Db::start().await;
    let server = Server::start(
        &db,
        &format!("[hub]\nhistory_len = 3\n{}", example_streams()),
    )
    .await;
    let (mut watch, _) = Client::connect(&server, &store_token("owner-1", &["s1"])).await;
    let (mut c, _) = Client::connect(&server, &customer_token("c1")).await;
    let deliveries = db.coll("deliveries");
    deliveries
        .insert_one(doc! {"_id": "d1", "customerId": "c1", "storeId": "s1", "status": "scheduled"})
        .await
        .unwrap();
    let since = events_in(&mut c, "customer:c1", 1, Duration::from_secs(15)).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(c);
    deliveries
        .update_one(doc! {"_id": "d1"}, doc! {"$set": {"status": "delivered"}})
        .await
        .unwrap();
    deliveries.delete_one(doc! {"_id": "d1"}).await.unwrap();
    // Enough other changes to push the two out of history.
    for n in 0..5 {
        deliveries
            .insert_one(doc! {"customerId": "c2", "storeId": "s1", "status": "scheduled", "n": n})
            .await
            .unwrap();
    }
    let live: Vec<Value> = events_in(&mut watch, "store:s1", 8, Duration::from_secs(15)).await;
    assert_eq!(live.len(), 8);
    assert_eq!(names(&live[1..3]), ["delivery:updated", "delivery:deleted"]);

    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    let ack = admin.subscribe("customer:c1", Some(&since)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["recovered"], true, "{ack}");
    let got = events_in(&mut admin, "customer:c1", 2, Duration::from_secs(15)).await;
    assert_eq!(names(&got), ["delivery:updated", "delivery:deleted"]);
    assert_eq!(got[0]["id"], live[1]["id"]);
    assert_eq!(got[1]["id"], live[2]["id"]);
}

/// The example's `deliveries` stream with a status table of its own (`[streams.status]`).
const DELIVERIES_WITH_STATUS: &str = r#"
[[streams]]
collection = "deliveries"
module = "delivery"
[streams.rooms]
customer = "customerId"
store = "storeId"
[streams.allow]
customer = ["_id", "date", "state"]
store = ["_id", "date", "state", "notes"]
[streams.status]
field = "state"
type_field = "mode"
[streams.status.map]
scheduled = "pending"
loaded = "ready"
dropped_off = "delivered"
"#;

/// Status changes of a declared stream are `{module}:status_changed` with `status`,
/// `previousStatus` and `rawStatus` as orders' are; `ready` splits by the type field; an
/// unknown raw value passes through marked `unknown: true` and is counted, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_status_table_gives_status_changed_events_like_orders() {
    let db = Db::start().await;
    let server = Server::start(&db, DELIVERIES_WITH_STATUS).await;
    let (mut customer, _) = Client::connect(&server, &customer_token("c1")).await;
    let (mut store, _) = Client::connect(&server, &store_token("owner-1", &["s1"])).await;
    let deliveries = db.coll("deliveries");
    let id = ObjectId::new();
    let hex = id.to_hex();

    deliveries
        .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "date": "2026-12-02", "state": "scheduled", "mode": "pickup", "notes": "n"})
        .await
        .unwrap();
    let created = next_in(&mut store, "store:s1").await;
    deliveries
        .update_one(doc! {"_id": id}, doc! {"$set": {"state": "loaded"}})
        .await
        .unwrap();
    let loaded = next_in(&mut store, "store:s1").await;
    // Not the status: a plain update, to the store only (the customer may not see notes).
    deliveries
        .update_one(doc! {"_id": id}, doc! {"$set": {"notes": "gate 12"}})
        .await
        .unwrap();
    let noted = next_in(&mut store, "store:s1").await;
    deliveries
        .update_one(doc! {"_id": id}, doc! {"$set": {"state": "Misplaced"}})
        .await
        .unwrap();
    let unknown = next_in(&mut store, "store:s1").await;

    assert_eq!(
        names(&[
            created.clone(),
            loaded.clone(),
            noted.clone(),
            unknown.clone()
        ]),
        [
            "delivery:created",
            "delivery:status_changed",
            "delivery:updated",
            "delivery:status_changed"
        ]
    );
    assert_eq!(
        created["data"],
        json!({"_id": hex, "date": "2026-12-02", "state": "scheduled", "notes": "n",
               "status": "pending", "rawStatus": "scheduled", "previousStatus": null, "unknown": false})
    );
    assert_eq!(
        loaded["data"],
        json!({"_id": hex, "date": "2026-12-02", "state": "loaded", "notes": "n",
               "status": "ready_for_pickup", "rawStatus": "loaded", "previousStatus": "pending",
               "unknown": false, "changedFields": ["state"]})
    );
    assert_eq!(noted["data"]["status"], "ready_for_pickup");
    assert_eq!(noted["data"]["previousStatus"], "ready_for_pickup");
    assert_eq!(
        (
            &unknown["data"]["status"],
            &unknown["data"]["rawStatus"],
            &unknown["data"]["previousStatus"],
            &unknown["data"]["unknown"]
        ),
        (
            &json!("Misplaced"),
            &json!("Misplaced"),
            &json!("ready_for_pickup"),
            &json!(true)
        )
    );

    let mine = events_in(&mut customer, "customer:c1", 3, Duration::from_secs(15)).await;
    assert_eq!(
        names(&mine),
        [
            "delivery:created",
            "delivery:status_changed",
            "delivery:status_changed"
        ]
    );
    assert_eq!(mine[1]["data"]["status"], "ready_for_pickup");
    assert!(mine.iter().all(|e| e["data"].get("notes").is_none()));

    // Counted as an unknown status (as orders' are), not as a dropped event.
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("changecast_unknown_statuses_total 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("changecast_events_dropped_total{reason=\"unknown_status\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("changecast_events_routed_total{event=\"delivery:status_changed\"} 2"),
        "{metrics}"
    );
}
