//! Integration tests: rights to `order:{id}` follow the order's owners as changes move it, on both wires and in replay.

use std::time::Duration;

use bson::{doc, oid::ObjectId};
use serde_json::Value;

use crate::support::*;

/// Every JSON message `c` receives within `d`.
async fn drain(c: &mut Client, d: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + d;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_json_within(left).await {
            Some(v) => out.push(v),
            None => return out,
        }
    }
}

fn mentions(msgs: &[Value], needle: &str) -> bool {
    msgs.iter().any(|m| m.to_string().contains(needle))
}

/// Waits until the admin observer has seen `n` more events (so everything was published).
async fn published(admin: &mut Client, n: usize) {
    let got = admin.events(n, Duration::from_secs(10)).await;
    assert_eq!(got.len(), n, "the admin observer missed events: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_rooms_follow_a_change_of_owner() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let orders = db.coll("orders");
    let id = ObjectId::new();
    let room = format!("order:{}", id.to_hex());
    let (mut admin, welcome) = Client::connect(&server, &admin_token()).await;
    let before = welcome["position"].as_str().map(str::to_owned);
    orders
        .insert_one(
            doc! {"_id": id, "customerId": "own-a", "storeId": "own-s1", "status": "new",
            "deliveryAddress": "1 A Street", "notes": "ring A"},
        )
        .await
        .unwrap();
    published(&mut admin, 1).await;

    let (mut a, _) = Client::connect(&server, &customer_token("own-a")).await;
    let (mut s1, _) = Client::connect(&server, &store_token("own-s1-staff", &["own-s1"])).await;
    let (mut b, _) = Client::connect(&server, &customer_token("own-b")).await;
    assert_eq!(a.subscribe(&room, None).await["type"], "subscribed");
    assert_eq!(s1.subscribe(&room, None).await["type"], "subscribed");
    assert_eq!(b.subscribe(&room, None).await["code"], "forbidden");

    // While A and S1 own it, its order room delivers to them.
    orders
        .update_one(doc! {"_id": id}, doc! {"$set": {"status": "accepted"}})
        .await
        .unwrap();
    published(&mut admin, 1).await;
    for c in [&mut a, &mut s1] {
        let got = drain(c, Duration::from_millis(300)).await;
        assert!(
            got.iter()
                .any(|m| m["room"] == room.as_str() && m["data"]["status"] == "processing"),
            "{got:?}"
        );
    }

    // The order moves to customer B and store S2, then changes twice more.
    orders
        .update_one(
            doc! {"_id": id},
            doc! {"$set": {"customerId": "own-b", "storeId": "own-s2", "deliveryAddress": "2 B Road", "notes": "ring B"}},
        )
        .await
        .unwrap();
    orders
        .update_one(
            doc! {"_id": id},
            doc! {"$set": {"status": "packing", "deliveryAddress": "2 B Road, flat 3"}},
        )
        .await
        .unwrap();
    orders
        .update_one(doc! {"_id": id}, doc! {"$set": {"status": "ready"}})
        .await
        .unwrap();
    published(&mut admin, 3).await;
    for (who, c) in [("customer A", &mut a), ("store S1", &mut s1)] {
        let got = drain(c, Duration::from_millis(500)).await;
        for secret in ["2 B Road", "ring B", "own-b", "own-s2"] {
            assert!(
                !mentions(&got, secret),
                "{who} saw {secret:?} after the move: {got:?}"
            );
        }
        let events = got.iter().filter(|m| m["type"] == "event").count();
        assert_eq!(
            events, 0,
            "{who} got events of an order it no longer owns: {got:?}"
        );
        let left: Vec<&Value> = got.iter().filter(|m| m["type"] == "unsubscribed").collect();
        assert_eq!(left.len(), 1, "{who}: {got:?}");
        assert_eq!(left[0]["room"], room.as_str());
        assert_eq!(left[0]["reason"], "ownership_changed");
        // The stream refreshed the ownership cache: no rejoin within its ttl.
        assert_eq!(
            c.subscribe(&room, None).await["code"],
            "forbidden",
            "{who} rejoined"
        );
    }

    // The new owner joins with a `since` from before the move: the replay holds the
    // order's events since B owns it, never A's (A's address, A's notes).
    let (mut b, _) = Client::connect(&server, &customer_token("own-b")).await;
    let ack = b.subscribe(&room, before.as_deref()).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["recovered"], true, "{ack}");
    let got = drain(&mut b, Duration::from_millis(500)).await;
    for secret in ["1 A Street", "ring A", "own-a"] {
        assert!(
            !mentions(&got, secret),
            "B was replayed {secret:?}: {got:?}"
        );
    }
    let replayed: Vec<&Value> = got
        .iter()
        .filter(|m| m["type"] == "event" && m["room"] == room.as_str())
        .collect();
    assert_eq!(replayed.len(), 3, "B's replay: {got:?}");
    assert_eq!(
        replayed[2]["data"]["status"], "ready_for_delivery",
        "{got:?}"
    );

    // And B is served live from here.
    orders
        .update_one(doc! {"_id": id}, doc! {"$set": {"status": "completed"}})
        .await
        .unwrap();
    let live = b.events(1, Duration::from_secs(10)).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["data"]["status"], "delivered");
}
