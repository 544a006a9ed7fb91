//! Integration tests: slow consumers, message rate, room names, dead peers, `Origin`, connection caps; a control client misses nothing.

use std::time::{Duration, Instant};

use bson::doc;
use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use changecast::metrics::{Wire, WireLabels};

use crate::support::*;

/// A client whose socket never reads: a tiny receive buffer, so the server's writes block soon.
pub(crate) async fn connect_stalled(server: &Server, token: &str) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(server.addr).await.unwrap();
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    Client { ws }
}

/// Reads everything a stalled client was sent, then returns its close code.
pub(crate) async fn drain_to_close(c: &mut Client, d: Duration) -> (usize, Option<u16>) {
    let deadline = tokio::time::Instant::now() + d;
    let mut events = 0;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) => return (events, None),
            Ok(Some(Ok(Message::Text(_)))) => events += 1,
            Ok(Some(Ok(Message::Close(f)))) => {
                return (events, Some(f.map_or(1005, |f| f.code.into())))
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (events, Some(1006)),
        }
    }
}

/// A padding string, so that a few hundred events fill socket buffers.
fn pad() -> String {
    "x".repeat(8192)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_cut_off_and_200_others_miss_nothing() {
    let db = Db::start().await;
    let server = Server::start(&db, "[hub]\nmailbox_capacity = 256").await;
    let orders = db.coll("orders");
    let n_clients = 200;
    let per_client = 5;

    let mut stalled = connect_stalled(&server, &admin_token()).await;
    let mut readers = Vec::new();
    for i in 0..n_clients {
        let (c, _) = Client::connect(&server, &customer_token(&format!("c{i}"))).await;
        readers.push(tokio::spawn(async move {
            let mut c = c;
            let evs = c.events(per_client, Duration::from_secs(60)).await;
            (i, evs)
        }));
    }
    // The control reads every event (as an admin, like the stalled one).
    let total = n_clients * per_client;
    let (control, _) = Client::connect(&server, &admin_token()).await;
    let control = tokio::spawn(async move {
        let mut c = control;
        c.events(total, Duration::from_secs(60)).await
    });

    let started = Instant::now();
    for round in 0..per_client {
        let docs: Vec<_> = (0..n_clients)
            .map(|i| doc! {"customerId": format!("c{i}"), "storeId": "s1", "status": "new", "round": round as i32, "notes": pad()})
            .collect();
        orders.insert_many(docs).await.unwrap();
    }
    let m = &server.app().metrics;
    let mut cut_after = None;
    while started.elapsed() < Duration::from_secs(30) {
        if m.slow_consumer_disconnects.get() > 0 {
            cut_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut_after = cut_after.expect("the stalled client was never cut off");

    for r in readers {
        let (i, evs) = r.await.unwrap();
        assert_eq!(evs.len(), per_client, "client c{i} missed events");
        assert!(evs.iter().all(|e| e["room"] == format!("customer:c{i}")));
    }
    let seen = control.await.unwrap();
    assert_eq!(seen.len(), total, "the control missed events");
    assert_eq!(
        m.slow_consumer_disconnects.get(),
        1,
        "only the stalled client is cut off"
    );

    // Once it reads again it finds what was buffered, then the reconnect close code.
    let (buffered, code) = drain_to_close(&mut stalled, Duration::from_secs(15)).await;
    eprintln!(
        "slow consumer: cut off {} ms after the burst began, {buffered} of {total} events had reached it",
        cut_after.as_millis()
    );
    assert_eq!(code, Some(4000), "after {buffered} events");
    assert!(buffered < total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_is_limited_and_a_flood_is_closed() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nmax_messages_per_second = 50").await;
    let (mut control, _) = Client::connect(&server, &customer_token("ctl")).await;

    // Just over the limit: the extra messages are dropped with one `rate_limited`; the socket lives.
    let (mut c, _) = Client::connect(&server, &customer_token("c1")).await;
    for _ in 0..60 {
        c.send_json(json!({"type": "ping"})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while let Some(v) = c.next_json_within(Duration::from_millis(500)).await {
        match v["type"].as_str().unwrap() {
            "pong" => pongs += 1,
            "error" => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            _ => panic!("{v}"),
        }
    }
    assert_eq!(limited, 1);
    assert!((50..60).contains(&pongs), "{pongs} pongs");
    // The next window is open again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send_json(json!({"type": "ping"})).await;
    assert_eq!(c.next_json().await["type"], "pong");

    // 1,000 subscribes in well under a second: answered up to the limit, then closed with 4002.
    let (mut flood, _) = Client::connect(&server, &customer_token("c2")).await;
    let t = Instant::now();
    for i in 0..1000 {
        flood
            .send_raw(Message::Text(
                json!({"type": "subscribe", "room": format!("storefront:s{i}")})
                    .to_string()
                    .into(),
            ))
            .await;
    }
    let sent_in = t.elapsed();
    let mut subscribed = 0;
    let mut rate_errors = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), flood.ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str().unwrap() {
                    "subscribed" => subscribed += 1,
                    "error" if v["code"] == "rate_limited" => rate_errors += 1,
                    _ => panic!("{v}"),
                }
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    eprintln!(
        "flood: 1000 subscribes sent in {sent_in:?}; {subscribed} answered, closed with {code:?}"
    );
    assert_eq!(code, Some(4002));
    assert!(subscribed <= 50 * 2, "{subscribed}");
    assert_eq!(rate_errors, 1);
    let (_, m) = server.get("/metrics").await;
    assert!(
        m.contains("changecast_client_errors_total{reason=\"rate_limited\"}"),
        "{m}"
    );

    control_sees_a_new_order(&db, &mut control, "ctl").await;
}

/// The control client still gets its events.
async fn control_sees_a_new_order(db: &Db, control: &mut Client, customer: &str) {
    db.coll("orders")
        .insert_one(doc! {"customerId": customer, "storeId": "s1", "status": "new"})
        .await
        .unwrap();
    let evs = control.events(1, Duration::from_secs(10)).await;
    assert_eq!(evs.len(), 1, "the control client missed its event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_names_empty_huge_wildcards_and_path_tricks_are_bad_rooms() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (mut control, _) = Client::connect(&server, &customer_token("ctl")).await;
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    let huge = format!("storefront:{}", "a".repeat(129));
    let very_huge = format!("order:{}", "b".repeat(60_000));
    let bad = [
        "",
        ":",
        "order:",
        "storefront:",
        "*",
        "#",
        "order:*",
        "store:s*",
        "customer:?",
        "storefront:s1/../s2",
        "order:../../etc/passwd",
        "order:..",
        "order:.",
        "order:a%2F..",
        "order:a\\b",
        "order:a b",
        "order:a\u{0}b",
        "order:ｃ1",
        "order:a:b",
        "admin:x",
        "ORDER:x",
        "nothing:x",
        "customer",
        "storefront:s1\n",
        huge.as_str(),
        very_huge.as_str(),
    ];
    // Admins may join any room, so only the name itself can refuse these.
    for room in bad {
        let r = admin.subscribe(room, None).await;
        assert_eq!(r["type"], "error", "{room:?}: {r}");
        assert_eq!(r["code"], "bad_room", "{room:?}: {r}");
    }
    // The longest valid id is still a room.
    let longest = format!("storefront:{}", "a".repeat(128));
    assert_eq!(admin.subscribe(&longest, None).await["type"], "subscribed");
    let (_, m) = server.get("/metrics").await;
    assert!(
        m.contains(&format!(
            "changecast_subscriptions_refused_total{{reason=\"bad_room\"}} {}",
            bad.len()
        )),
        "{m}"
    );
    control_sees_a_new_order(&db, &mut control, "ctl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let db = Db::start().await;
    let server = Server::start(
        &db,
        "[server]\nping_interval = \"100ms\"\npong_timeout = \"300ms\"",
    )
    .await;
    let (mut control, _) = Client::connect(&server, &customer_token("ctl")).await;
    // The control answers pings because it keeps reading (tungstenite replies on read).
    let ctl = tokio::spawn(async move {
        let evs = control.events(1, Duration::from_secs(2)).await;
        assert!(evs.is_empty());
        control
    });
    // tungstenite answers pings only while the socket is read: not reading = a dead peer.
    let (mut dead, _) = Client::connect(&server, &customer_token("c1")).await;
    let t = Instant::now();
    let gauge = || {
        server
            .app()
            .metrics
            .connections
            .get_or_create(&WireLabels { wire: Wire::Native })
            .get()
    };
    while gauge() > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the dead peer was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped_after = t.elapsed();
    eprintln!("dead peer dropped after {dropped_after:?} (ping 100ms, pong timeout 300ms)");
    assert!(dropped_after >= Duration::from_millis(300));
    let (_, code) = drain_to_close(&mut dead, Duration::from_secs(5)).await;
    assert_eq!(code, Some(4001));
    let mut control = ctl.await.unwrap();
    control_sees_a_new_order(&db, &mut control, "ctl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disallowed_origin_is_refused_before_the_upgrade() {
    let db = Db::start().await;
    let server = Server::start(
        &db,
        "[server]\nallowed_origins = [\"https://shop.example\"]",
    )
    .await;
    let tok = customer_token("c1");
    for origin in [
        "https://evil.example",
        "https://shop.example.evil.example",
        "null",
        "http://shop.example",
    ] {
        let r = Client::try_connect(&server, Some(&tok), &[("origin", origin)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{origin} was let in"));
        assert_eq!(r.status, 403, "{origin}");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], "origin_not_allowed");
    }
    // Even without a token: the origin check comes first.
    let r = Client::try_connect(&server, None, &[("origin", "https://evil.example")])
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 403);
    let mut ok = Client::try_connect(&server, Some(&tok), &[("origin", "https://shop.example")])
        .await
        .unwrap();
    assert_eq!(ok.next_json().await["type"], "welcome");
    // Non-browser clients send no Origin.
    let (mut control, _) = Client::connect(&server, &customer_token("ctl")).await;
    control_sees_a_new_order(&db, &mut control, "ctl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_subject_and_total_connection_caps() {
    let db = Db::start().await;
    let server = Server::start(
        &db,
        "[server]\nmax_connections_per_subject = 2\nmax_connections = 5\nauth_deadline = \"2s\"",
    )
    .await;
    let (mut control, _) = Client::connect(&server, &customer_token("ctl")).await;
    let tok = customer_token("c1");
    let (a, _) = Client::connect(&server, &tok).await;
    let (_b, _) = Client::connect(&server, &tok).await;
    // Third by header: refused before the upgrade.
    let r = Client::try_connect(&server, Some(&tok), &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(r.status, 429);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["error"],
        "too_many_connections"
    );
    // Third in-band: upgraded (the subject is not known yet), then closed with 4003.
    let mut c = Client::try_connect(&server, None, &[]).await.unwrap();
    c.send_json(json!({"type": "auth", "token": tok})).await;
    assert_eq!(c.closed_with(Duration::from_secs(5)).await, Some(4003));
    drop(c);
    // A slot frees when a connection leaves.
    drop(a);
    let t = Instant::now();
    let again = loop {
        match Client::try_connect(&server, Some(&tok), &[]).await {
            Ok(c) => break c,
            Err(r) => {
                assert_eq!(r.status, 429);
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "the slot was never released"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Total: control + 2×c1 open; two more fill it. A socket still waiting for
    // `auth` does not count: it is in the unauthenticated pool.
    let _anon = Client::try_connect(&server, None, &[]).await.unwrap();
    let (_d, _) = Client::connect(&server, &customer_token("c4")).await;
    let (_e, _) = Client::connect(&server, &customer_token("c2")).await;
    let r = Client::try_connect(&server, Some(&customer_token("c3")), &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(r.status, 503);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["error"],
        "overloaded"
    );
    drop(again);
    control_sees_a_new_order(&db, &mut control, "ctl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_before_authentication_too() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nmax_messages_per_second = 50").await;
    let (mut control, _) = Client::connect(&server, &customer_token("ctl")).await;
    // A flood from a socket that never authenticates: answered `unauthenticated` up to the
    // limit, one `rate_limited`, then closed with 4002 long before the 10 s auth deadline.
    let mut anon = Client::try_connect(&server, None, &[]).await.unwrap();
    let t = Instant::now();
    for _ in 0..1000 {
        anon.send_raw(Message::Text(
            r#"{"type":"subscribe","room":"storefront:s1"}"#.into(),
        ))
        .await;
    }
    let (answers, code) = drain_to_close(&mut anon, Duration::from_secs(5)).await;
    assert_eq!(code, Some(4002), "after {answers} answers");
    assert!(answers <= 51, "{answers}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // An oversized first message gets 1009, not a silent drop.
    let mut big = Client::try_connect(&server, None, &[]).await.unwrap();
    big.send_raw(Message::Text("x".repeat(70_000).into())).await;
    assert_eq!(big.closed_with(Duration::from_secs(5)).await, Some(1009));
    control_sees_a_new_order(&db, &mut control, "ctl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_count_explicit_rooms_only() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nmax_subscriptions_per_connection = 2").await;
    // Five auto-joined store rooms do not use up the quota.
    let stores = ["s1", "s2", "s3", "s4", "s5"];
    let (mut c, w) = Client::connect(&server, &store_token("owner", &stores)).await;
    assert_eq!(w["rooms"].as_array().unwrap().len(), 5);
    for room in ["storefront:a", "storefront:b"] {
        assert_eq!(
            c.subscribe(room, None).await["type"],
            "subscribed",
            "{room}"
        );
    }
    let r = c.subscribe("storefront:c", None).await;
    assert_eq!(r["code"], "too_many_subscriptions", "{r}");
    // Joining a room again is not a new subscription; leaving one frees a slot.
    assert_eq!(
        c.subscribe("storefront:a", None).await["type"],
        "subscribed"
    );
    assert_eq!(c.subscribe("store:s1", None).await["type"], "subscribed");
    c.send_json(json!({"type": "unsubscribe", "room": "storefront:b"}))
        .await;
    assert_eq!(c.next_json().await["type"], "unsubscribed");
    assert_eq!(
        c.subscribe("storefront:c", None).await["type"],
        "subscribed"
    );
    // The refused room delivers nothing; the joined ones do.
    db.coll("settings")
        .insert_one(doc! {"storeId": "s1", "storeBanner": "x"})
        .await
        .unwrap();
    let evs = c.events(1, Duration::from_secs(10)).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0]["room"], "store:s1");
}
