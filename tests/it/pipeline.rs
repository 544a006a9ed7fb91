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
/// little-endian BSON tokens): changecast refuses at start and says why, rather than ordering
/// events, history and recovery by tokens that lie (which dropped events silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_tokens_do_not_sort_is_refused_loudly() {
    if skip_unless_sim(
        "a_server_whose_tokens_do_not_sort_is_refused_loudly",
        "mongo-sim's unordered_tokens option",
    ) {
        return;
    }
    let db = Db::start_with(mongo_sim::SimConfig {
        unordered_tokens: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &dir.path().join("cp.json"), "");
    let handle = changecast::app::start(&cfg, Default::default(), listeners().await, None)
        .await
        .unwrap();
    let health = handle.health.clone();
    let r = tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .expect("changecast stops on its own");
    let err = r.expect_err("refused").to_string();
    assert!(err.contains("not MongoDB KeyString tokens"), "{err}");
    assert!(err.contains("No event was dropped"), "{err}");
    assert!(!health.is_ready());
}
