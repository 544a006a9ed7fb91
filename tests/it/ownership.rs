//! Integration tests: rights to `order:{id}` follow the order's owners as changes move it, on both wires and in replay.

use std::time::Duration;

use bson::{doc, oid::ObjectId};
use serde_json::Value;

use crate::support::*;

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
        let got = c.drain(Duration::from_millis(300)).await;
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
        let got = c.drain(Duration::from_millis(500)).await;
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
    let got = b.drain(Duration::from_millis(500)).await;
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

fn hex_upper(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02X}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_positions_reveal_no_document_key_and_a_forged_since_resyncs() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let orders = db.coll("orders");
    let (mut a, _) = Client::connect(&server, &customer_token("pos-a")).await;
    // Another customer's order: its id must not reach customer A in any form.
    orders
        .insert_one(
            doc! {"_id": "secret-order-b", "customerId": "pos-b", "storeId": "s1", "status": "new"},
        )
        .await
        .unwrap();
    orders
        .insert_one(
            doc! {"_id": "own-order-a", "customerId": "pos-a", "storeId": "s1", "status": "new"},
        )
        .await
        .unwrap();
    let own = a.events(1, Duration::from_secs(10)).await;
    assert_eq!(own.len(), 1);
    orders
        .insert_one(
            doc! {"_id": "secret-order-c", "customerId": "pos-b", "storeId": "s1", "status": "new"},
        )
        .await
        .unwrap();
    // A later welcome's position is the newest event: B's order.
    let mut newest = None;
    for _ in 0..100 {
        let (_, welcome) = Client::connect(&server, &customer_token("pos-a")).await;
        let p = welcome["position"].as_str().unwrap().to_owned();
        // MongoDB's and mongo-sim's tokens are upper-case hex, SecantusDB's lower-case.
        if token_of(&p)
            .to_ascii_uppercase()
            .contains(&hex_upper("secret-order-c"))
        {
            newest = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let position = newest.expect("the position never reached B's order");
    // mongo-sim's tokens embed the document key, as mongod's and SecantusDB's do: the raw
    // token would leak it…
    let raw = token_of(&position);
    assert!(
        raw.to_ascii_uppercase()
            .contains(&hex_upper("secret-order-c")),
        "{raw}"
    );
    // …the wire forms do not, in upper or lower case.
    let own_id = own[0]["id"].as_str().unwrap();
    for wire in [position.as_str(), own_id] {
        for needle in ["secret-order", "own-order", "orders"] {
            assert!(
                !wire.to_ascii_uppercase().contains(&hex_upper(needle)),
                "{wire} reveals {needle}"
            );
            assert!(!wire.contains(needle), "{wire}");
        }
        assert!(!wire.eq_ignore_ascii_case(&raw));
    }

    // A `since` that is not one of ours (altered, or a raw token) is never trusted:
    // the client is told to resync.
    let mut altered = position.clone().into_bytes();
    altered[10] = if altered[10] == b'a' { b'b' } else { b'a' };
    let altered = String::from_utf8(altered).unwrap();
    for since in [altered.as_str(), raw.as_str(), "not-an-id"] {
        let ack = a.subscribe("storefront:s1", Some(since)).await;
        assert_eq!(ack["recovered"], false, "{ack}");
        let next = a.next_json().await;
        assert_eq!(next["type"], "resync", "since {since}: {next}");
        a.send_json(serde_json::json!({"type": "unsubscribe", "room": "storefront:s1"}))
            .await;
        assert_eq!(a.next_json().await["type"], "unsubscribed");
    }
    // A genuine one recovers.
    let ack = a.subscribe("storefront:s1", Some(&position)).await;
    assert_eq!(ack["recovered"], true, "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_order_ids_is_cut_off_before_it_costs_a_lookup_each() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nmax_messages_per_second = 1000\n").await;
    db.coll("orders")
        .insert_one(
            doc! {"_id": "mine-1", "customerId": "probe-a", "storeId": "s1", "status": "new"},
        )
        .await
        .unwrap();
    let (mut prober, _) = Client::connect(&server, &customer_token("probe-a")).await;
    let mut codes = Vec::new();
    for n in 0..40 {
        let ack = prober.subscribe(&format!("order:guess-{n}"), None).await;
        codes.push(ack["code"].as_str().unwrap_or("").to_owned());
    }
    let forbidden = codes.iter().filter(|c| *c == "forbidden").count();
    let limited = codes.iter().filter(|c| *c == "rate_limited").count();
    assert_eq!((forbidden, limited), (30, 10), "{codes:?}");
    // Another connection of the same customer is not affected, and its own order opens.
    let (mut other, _) = Client::connect(&server, &customer_token("probe-a")).await;
    assert_eq!(
        other.subscribe("order:mine-1", None).await["type"],
        "subscribed"
    );
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("changecast_subscriptions_refused_total{reason=\"rate_limited\"} 10"),
        "{metrics}"
    );
}
