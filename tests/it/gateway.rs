//! Gateway: routing to the right sockets only, tokens, authorization, recovery, limits, health.

use std::time::Duration;

use bson::doc;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_reaches_its_customer_store_and_order_room_only() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let id = bson::oid::ObjectId::new();
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    db.coll("orders")
        .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "status": "new", "orderType": "pickup"})
        .await
        .unwrap();
    // Connect the others only once order:created has passed, so each sees exactly the update.
    assert_eq!(admin.events(1, Duration::from_secs(10)).await.len(), 1);

    let (mut customer, w) = Client::connect(&server, &customer_token("c1")).await;
    assert_eq!(w["rooms"], json!(["customer:c1"]));
    let (mut store, w) = Client::connect(&server, &store_token("owner-1", &["s1"])).await;
    assert!(w["rooms"].as_array().unwrap().contains(&json!("store:s1")));
    let (mut order_watcher, _) = Client::connect(&server, &customer_token("c1")).await;
    let sub = order_watcher.subscribe(&format!("order:{id}"), None).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    let (mut other_customer, _) = Client::connect(&server, &customer_token("c2")).await;
    let (mut other_store, _) = Client::connect(&server, &store_token("owner-2", &["s2"])).await;
    let denied = other_customer.subscribe(&format!("order:{id}"), None).await;
    assert_eq!(denied["code"], "forbidden", "{denied}");

    db.coll("orders")
        .update_one(doc! {"_id": id}, doc! {"$set": {"status": "ready"}})
        .await
        .unwrap();

    // The order watcher is the customer: it gets the change once per joined room.
    let mut rooms: Vec<String> = order_watcher
        .events(2, Duration::from_secs(10))
        .await
        .iter()
        .map(|e| e["room"].as_str().unwrap().to_owned())
        .collect();
    rooms.sort();
    assert_eq!(rooms, ["customer:c1".to_owned(), format!("order:{id}")]);
    for (c, room) in [
        (&mut customer, "customer:c1".to_owned()),
        (&mut store, "store:s1".to_owned()),
    ] {
        let evs = c.events(1, Duration::from_secs(10)).await;
        assert_eq!(evs.len(), 1, "{room} got nothing");
        assert_eq!(evs[0]["room"], room);
        assert_eq!(evs[0]["event"], "order:status_changed");
        assert_eq!(evs[0]["data"]["status"], "ready_for_pickup");
    }
    for c in [&mut other_customer, &mut other_store] {
        assert!(c.events(1, Duration::from_millis(500)).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_the_upgrade() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let expired = token(json!({"sub": "c1", "exp": now() - 3600}));
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "c1", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    let cases = [
        ("garbage", "token_malformed"),
        (expired.as_str(), "token_expired"),
        (wrong_key.as_str(), "token_bad_signature"),
    ];
    for (tok, code) in cases {
        let refused = Client::try_connect(&server, Some(tok), &[])
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 401);
        let body: serde_json::Value = serde_json::from_str(&refused.body).unwrap();
        assert_eq!(body["error"], code, "{}", refused.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_auth_and_its_deadline() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nauth_deadline = \"300ms\"").await;
    let mut c = Client::try_connect(&server, None, &[]).await.unwrap();
    c.send_json(json!({"type": "auth", "token": customer_token("c9")}))
        .await;
    let w = c.next_json().await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["rooms"], json!(["customer:c9"]));

    let mut silent = Client::try_connect(&server, None, &[]).await.unwrap();
    assert_eq!(silent.closed_with(Duration::from_secs(5)).await, Some(4502));

    let mut bad = Client::try_connect(&server, None, &[]).await.unwrap();
    bad.send_json(json!({"type": "auth", "token": "nope"}))
        .await;
    let e = bad.next_json().await;
    assert_eq!(e["type"], "error");
    assert_eq!(bad.closed_with(Duration::from_secs(5)).await, Some(4500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_since_recovers_exactly_what_was_missed() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let orders = db.coll("orders");
    let (mut c, _) = Client::connect(&server, &customer_token("c1")).await;
    orders
        .insert_one(doc! {"customerId": "c1", "storeId": "s1", "status": "new", "n": 0})
        .await
        .unwrap();
    let first = c.events(1, Duration::from_secs(10)).await;
    let last_id = first[0]["id"].as_str().unwrap().to_owned();
    drop(c);

    // An admin observer tells when the hub has them all, so recovery is from history.
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    for n in 1..=100 {
        orders
            .insert_one(doc! {"customerId": "c1", "storeId": "s1", "status": "new", "n": n})
            .await
            .unwrap();
    }
    assert_eq!(admin.events(100, Duration::from_secs(20)).await.len(), 100);

    let mut c = Client::try_connect_url(
        &format!("{}?since={last_id}", server.ws_url()),
        Some(&customer_token("c1")),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(c.next_json().await["type"], "welcome");
    let evs = c.events(100, Duration::from_secs(10)).await;
    assert_eq!(evs.len(), 100);
    // Wire ids are sealed; the resume tokens behind them sort in commit order.
    let ids: Vec<String> = evs
        .iter()
        .map(|e| token_of(e["id"].as_str().unwrap()))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "in order, no duplicates");
    // Then live.
    orders
        .insert_one(doc! {"customerId": "c1", "storeId": "s1", "status": "new", "n": 101})
        .await
        .unwrap();
    let live = c.events(1, Duration::from_secs(10)).await;
    assert_eq!(live.len(), 1);
    assert!(token_of(live[0]["id"].as_str().unwrap()) > ids[99]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_documented_answers_and_a_control_client_misses_nothing() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (mut control, _) = Client::connect(&server, &customer_token("c1")).await;
    let (mut c, _) = Client::connect(&server, &customer_token("c2")).await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{".into()), "bad_json"),
        (Message::Text(r#"{"type":"dance"}"#.into()), "unknown_type"),
        (
            Message::Text(r#"{"type":"subscribe"}"#.into()),
            "bad_request",
        ),
        (
            Message::Binary(vec![1, 2, 3].into()),
            "binary_not_supported",
        ),
        (
            Message::Text(r#"{"type":"subscribe","room":""}"#.into()),
            "bad_room",
        ),
        (
            Message::Text(r#"{"type":"subscribe","room":"order:*"}"#.into()),
            "bad_room",
        ),
        (
            Message::Text(r#"{"type":"subscribe","room":"order:../../x"}"#.into()),
            "bad_room",
        ),
        (
            Message::Text(
                format!(
                    r#"{{"type":"subscribe","room":"order:{}"}}"#,
                    "a".repeat(5000)
                )
                .into(),
            ),
            "bad_room",
        ),
        (
            Message::Text(r#"{"type":"subscribe","room":"customer:c1"}"#.into()),
            "forbidden",
        ),
        (
            Message::Text(r#"{"type":"subscribe","room":"store:s1"}"#.into()),
            "forbidden",
        ),
    ];
    for (m, code) in cases {
        c.send_raw(m).await;
        let e = c.next_json().await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], code, "{e}");
    }
    // Oversized message: the connection is closed with 1009, nothing else happens.
    c.send_raw(Message::Text("x".repeat(70_000).into())).await;
    assert_eq!(c.closed_with(Duration::from_secs(5)).await, Some(1009));

    db.coll("orders")
        .insert_one(doc! {"customerId": "c1", "storeId": "s1", "status": "new"})
        .await
        .unwrap();
    assert_eq!(control.events(1, Duration::from_secs(10)).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_metrics() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    assert_eq!(server.get("/healthz").await.0, 200);
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = server.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("changecast_stream_lag_seconds"),
        "{metrics}"
    );
    let _ = Client::try_connect(&server, Some("garbage"), &[]).await;
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("changecast_auth_failures_total{reason=\"malformed\"} 1"),
        "{metrics}"
    );
    // Metrics and readiness describe the databases and their traffic: they live on the
    // operations listener only. Whoever can open a socket gets 404 for them.
    let ops = server.app().ops_addr.unwrap();
    assert_ne!(ops, server.addr);
    for path in ["/metrics", "/readyz"] {
        let (status, body) = http_get(server.addr, path).await;
        assert_eq!(status, 404, "{path} on the client listener: {body}");
        assert!(!body.contains("changecast_"), "{body}");
        assert_eq!(
            http_get(ops, path).await.0,
            200,
            "{path} on the operations listener"
        );
    }
    assert_eq!(http_get(server.addr, "/healthz").await.0, 200);
    assert_eq!(http_get(ops, "/healthz").await.0, 200);
}
