//! Pipeline: writes to the three collections → the expected events in the expected rooms, in commit order.

use std::time::Duration;

use bson::doc;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_lifecycle_is_normalized_in_commit_order() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;

    let orders = db.coll("orders");
    let id = bson::oid::ObjectId::new();
    orders
        .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "status": "new", "orderType": "delivery", "total": 12.5, "secretNote": "x"})
        .await
        .unwrap();
    for s in [
        "accepted",
        "packing",
        "ready",
        "out_for_delivery",
        "completed",
    ] {
        orders
            .update_one(doc! {"_id": id}, doc! {"$set": {"status": s}})
            .await
            .unwrap();
    }
    let evs = admin.events(6, Duration::from_secs(15)).await;
    let got: Vec<(String, String)> = evs
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["data"]["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("order:created", "pending"),
            ("order:status_changed", "processing"),
            ("order:status_changed", "processing"),
            ("order:status_changed", "ready_for_delivery"),
            ("order:status_changed", "in_transit"),
            ("order:status_changed", "delivered"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    // Ids are sealed resume tokens; the tokens sort in commit order.
    let ids: Vec<String> = evs
        .iter()
        .map(|e| token_of(e["id"].as_str().unwrap()))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(evs[3]["data"]["rawStatus"], "ready");
    assert_eq!(evs[5]["data"]["previousStatus"], "in_transit");
    assert_eq!(evs[5]["data"]["progress"], 100);
    // Payloads are allowlists: a field not listed never leaves.
    assert!(evs.iter().all(|e| e["data"].get("secretNote").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_and_settings_reach_their_rooms() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (mut store, _) = Client::connect(&server, &store_token("owner-1", &["s1"])).await;
    let (mut visitor, _) = Client::connect(&server, &customer_token("v1")).await;
    assert_eq!(
        visitor.subscribe("storefront:s1", None).await["type"],
        "subscribed"
    );

    db.coll("payments")
        .insert_one(doc! {"orderId": "o1", "customerId": "c1", "storeId": "s1", "amount": 10, "status": "pending"})
        .await
        .unwrap();
    db.coll("settings")
        .insert_one(doc! {"storeId": "s1", "storeBanner": "b.png", "paymentProvider": "stripe", "taxEnabled": true})
        .await
        .unwrap();
    db.coll("settings")
        .update_one(
            doc! {"storeId": "s1"},
            doc! {"$set": {"paymentProvider": "adyen"}},
        )
        .await
        .unwrap();
    db.coll("settings")
        .update_one(
            doc! {"storeId": "s1"},
            doc! {"$set": {"storeBanner": "c.png"}},
        )
        .await
        .unwrap();

    let evs = store.events(4, Duration::from_secs(15)).await;
    let names: Vec<&str> = evs.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "payment:created",
            "settings:updated",
            "settings:updated",
            "settings:updated"
        ]
    );
    assert_eq!(
        evs[2]["data"]["paymentProvider"], "adyen",
        "the store sees private settings"
    );

    // The storefront sees the two changes that touched public sections, and no private field.
    let seen = visitor.events(3, Duration::from_secs(3)).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    for e in &seen {
        assert_eq!(e["room"], "storefront:s1");
        let text = e["data"].to_string();
        assert!(
            !text.contains("stripe") && !text.contains("adyen") && !text.contains("taxEnabled"),
            "{text}"
        );
    }
    assert_eq!(seen[1]["data"]["storeBanner"], "c.png");
}

/// A server whose resume tokens do not sort (mongo-sim's `unordered_tokens`, as SecantusDB's
/// little-endian BSON tokens): ids come from each change's cluster time and its place in the
/// stream, so live delivery, recovery from history, a restart's warmed history and an oplog
/// replay each deliver exactly what was missed, in commit order (ordering by token dropped
/// events silently here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_tokens_do_not_sort_loses_and_repeats_nothing() {
    if skip_unless_sim(
        "a_server_whose_tokens_do_not_sort_loses_and_repeats_nothing",
        "mongo-sim's unordered_tokens option",
    ) {
        return;
    }
    let db = Db::start_with(mongo_sim::SimConfig {
        unordered_tokens: true,
        ..Default::default()
    })
    .await;
    let insert = |n: i32| {
        let db = &db;
        async move {
            db.coll("orders")
                .insert_one(
                    doc! {"customerId": "u", "storeId": "s1", "status": "new", "orderNumber": n},
                )
                .await
                .unwrap();
        }
    };
    let ns = |evs: &[serde_json::Value]| -> Vec<i64> {
        evs.iter()
            .map(|e| e["data"]["orderNumber"].as_i64().unwrap_or(-1))
            .collect()
    };
    let ids = |evs: &[serde_json::Value]| -> Vec<String> {
        evs.iter()
            .map(|e| token_of(e["id"].as_str().unwrap()))
            .collect()
    };
    let mut a = Server::start(&db, "").await;
    let (mut live, _) = Client::connect(&a, &customer_token("u")).await;
    let (mut away, _) = Client::connect(&a, &customer_token("u")).await;
    for n in 0..20 {
        insert(n).await;
    }
    let got = live.events(20, Duration::from_secs(20)).await;
    assert_eq!(
        ns(&got),
        (0..20).collect::<Vec<_>>(),
        "live, in commit order"
    );
    let opened = ids(&got);
    assert!(
        opened.windows(2).all(|w| w[0] < w[1]),
        "ids increase: {opened:?}"
    );
    // The tokens behind them do not (which is what this server is about).
    let tokens: Vec<String> = opened
        .iter()
        .map(|id| {
            changecast::sequence::token_of(&changecast::event::EventId::new(id.as_str()))
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        tokens.windows(2).any(|w| w[0] > w[1]),
        "tokens sorted: {tokens:?}"
    );

    // Recovery from history: away saw 5, comes back for the other 15.
    let first = away.events(20, Duration::from_secs(20)).await;
    drop(away);
    let since = first[4]["id"].as_str().unwrap().to_owned();
    let url = format!("{}?since={since}", a.ws_url());
    let mut back = Client::try_connect_url(&url, Some(&customer_token("u")), &[])
        .await
        .unwrap();
    assert_eq!(back.next_json().await["type"], "welcome");
    let again = back.events(15, Duration::from_secs(20)).await;
    assert_eq!(ns(&again), (5..20).collect::<Vec<_>>(), "from history");
    assert!(
        back.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "a repeat"
    );
    drop(back);
    let last = got[19]["id"].as_str().unwrap().to_owned();

    // Restart with writes while down: the warmed history serves the return.
    let dir = std::mem::replace(&mut a.dir, tempfile::tempdir().unwrap());
    a.stop().await.unwrap();
    for n in 20..30 {
        insert(n).await;
    }
    let b = Server::start_in(&db, "", dir, Default::default()).await;
    let url = format!("{}?since={last}", b.ws_url());
    let mut c = Client::try_connect_url(&url, Some(&customer_token("u")), &[])
        .await
        .unwrap();
    assert_eq!(c.next_json().await["type"], "welcome");
    let after = c.events(10, Duration::from_secs(20)).await;
    assert_eq!(ns(&after), (20..30).collect::<Vec<_>>(), "after a restart");
    assert!(
        c.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "a repeat"
    );
    drop(c);
    let (_, m) = b.get("/metrics").await;
    assert!(
        m.contains("changecast_recoveries_total{source=\"history\"} 1"),
        "{m}"
    );

    // Beyond a tiny history: the oplog replay starts from the `since`'s own token.
    let small = Server::start(&db, "[hub]\nhistory_len = 2\n").await;
    let (mut w, _) = Client::connect(&small, &customer_token("u")).await;
    for n in 30..40 {
        insert(n).await;
    }
    let seen = w.events(10, Duration::from_secs(20)).await;
    drop(w);
    let url = format!(
        "{}?since={}",
        small.ws_url(),
        seen[1]["id"].as_str().unwrap()
    );
    let mut r = Client::try_connect_url(&url, Some(&customer_token("u")), &[])
        .await
        .unwrap();
    let welcome = r.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    let replayed = r.events(8, Duration::from_secs(20)).await;
    assert_eq!(
        ns(&replayed),
        (32..40).collect::<Vec<_>>(),
        "from the oplog"
    );
    assert!(
        r.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "a repeat"
    );
    let (_, m) = small.get("/metrics").await;
    assert!(
        m.contains("changecast_recoveries_total{source=\"oplog\"} 1"),
        "{m}"
    );
}

/// `replaceOne` of an order with its status unchanged (a Node app saving a whole document)
/// reaches the owner's rooms as `order:updated`, with the replaced fields as
/// `changedFields`; it was dropped as "news to nobody" (no update description).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_order_reaches_its_rooms() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (mut c, _) = Client::connect(&server, &customer_token("rc")).await;
    let orders = db.coll("orders");
    orders
        .insert_one(doc! {"_id": "rp1", "customerId": "rc", "storeId": "rs", "status": "accepted", "total": 10})
        .await
        .unwrap();
    assert_eq!(c.events(1, Duration::from_secs(10)).await.len(), 1);
    orders
        .replace_one(
            doc! {"_id": "rp1"},
            doc! {"customerId": "rc", "storeId": "rs", "status": "accepted", "total": 12},
        )
        .await
        .unwrap();
    let got = c.events(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "the replace was not delivered");
    assert_eq!(got[0]["event"], "order:updated", "{}", got[0]);
    assert_eq!(got[0]["data"]["total"], 12);
    let changed = got[0]["data"]["changedFields"].as_array().unwrap();
    assert!(changed.iter().any(|f| f == "total"), "{}", got[0]);
    assert!(
        !changed.iter().any(|f| f == "customerId"),
        "not in the customer's allowlist: {}",
        got[0]
    );
}
