//! Integration tests: bounded unauthenticated state — the HTTP head deadline, the unauthenticated pool apart from `max_connections`, and the per-address cap.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The value of `series` (name and labels as exposed) in `/metrics`; 0 when absent.
async fn metric(server: &Server, series: &str) -> f64 {
    let (_, text) = server.get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Reads until the server closes the connection (EOF or reset); `None` when it is
/// still open after `within`. Returns what was read and when the close came.
async fn read_until_closed(mut s: TcpStream, within: Duration) -> Option<(Vec<u8>, Instant)> {
    let mut buf = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut buf)).await {
        Ok(_) => Some((buf, Instant::now())),
        Err(_) => None,
    }
}

fn refusal_code(body: &str) -> Value {
    serde_json::from_str::<Value>(body).unwrap()["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_silent_and_idle_connections_close_at_the_header_deadline() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nheader_read_timeout = \"1s\"").await;
    let t0 = Instant::now();
    let mut half = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half.push(s);
    }
    let opened = t0.elapsed();
    // A connection that never sends a byte, and a keep-alive one that goes quiet after a request.
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let within = Duration::from_secs(6);
    let closed =
        futures::future::join_all(half.into_iter().map(|s| read_until_closed(s, within))).await;
    let open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(
        open, 0,
        "{open} of 200 half-sent heads still open after {within:?}"
    );
    let last = closed
        .iter()
        .flatten()
        .map(|(_, at)| at.duration_since(t0))
        .max()
        .unwrap();
    eprintln!("200 half-sent heads opened in {opened:?}, all closed {last:?} after the first");
    // 1 s deadline from each open, plus scheduling slack on a 2-core machine.
    assert!(last < opened + Duration::from_secs(3), "{last:?}");
    let (_, at) = read_until_closed(silent, within)
        .await
        .expect("a silent connection is closed");
    assert!(at.duration_since(t0) < opened + Duration::from_secs(3));
    let (resp, at) = read_until_closed(idle, within)
        .await
        .expect("an idle keep-alive connection is closed");
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok\n"), "{resp}");
    assert!(at.duration_since(t0) < opened + Duration::from_secs(3));
    // The server still serves.
    assert_eq!(server.get("/healthz").await.0, 200);
    let (_c, w) = Client::connect(&server, &customer_token("c1")).await;
    assert_eq!(w["type"], "welcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sockets_cannot_take_a_token_holders_slot() {
    let db = Db::start().await;
    let server = Server::start(
        &db,
        "[server]\nmax_connections = 20\nmax_unauthenticated = 30\nmax_unauthenticated_per_ip = 0\nauth_deadline = \"3s\"",
    )
    .await;
    let mut anon = Vec::new();
    let mut refused = 0;
    for _ in 0..50 {
        match Client::try_connect(&server, None, &[]).await {
            Ok(c) => anon.push(c),
            Err(r) => {
                assert_eq!(r.status, 503, "{}", r.body);
                assert_eq!(refusal_code(&r.body), "unauthenticated_overloaded");
                refused += 1;
            }
        }
    }
    assert_eq!((anon.len(), refused), (30, 20));
    assert_eq!(
        metric(&server, "changecast_unauthenticated_connections").await,
        30.0
    );
    assert_eq!(
        metric(
            &server,
            "changecast_client_errors_total{reason=\"unauthenticated_overloaded\"}"
        )
        .await,
        20.0
    );
    // The token holder is not pushed out: max_connections counts authenticated sockets only.
    let (_a, w) = Client::connect(&server, &customer_token("c1")).await;
    assert_eq!(w["type"], "welcome");
    // Authenticating in-band moves a socket to the authenticated pool, freeing its anonymous slot.
    let mut moved = anon.pop().unwrap();
    moved
        .send_json(json!({"type": "auth", "token": customer_token("c2")}))
        .await;
    assert_eq!(moved.next_json().await["type"], "welcome");
    let t = Instant::now();
    let _next = loop {
        match Client::try_connect(&server, None, &[]).await {
            Ok(c) => break c,
            Err(r) => {
                assert_eq!(r.status, 503);
                assert!(t.elapsed() < Duration::from_secs(2), "slot never moved");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The deadline closes the rest (4502) and empties the pool.
    assert_eq!(
        anon[0].closed_with(Duration::from_secs(6)).await,
        Some(4502)
    );
    drop(anon);
    let t = Instant::now();
    let mut again = Vec::new();
    while again.len() < 25 {
        match Client::try_connect(&server, None, &[]).await {
            Ok(c) => again.push(c),
            Err(_) => {
                assert!(t.elapsed() < Duration::from_secs(5), "pool never emptied");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_cap_refuses_more_anonymous_sockets_but_not_token_holders() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nmax_unauthenticated_per_ip = 3").await;
    let mut anon = Vec::new();
    for _ in 0..3 {
        anon.push(Client::try_connect(&server, None, &[]).await.unwrap());
    }
    let r = Client::try_connect(&server, None, &[])
        .await
        .err()
        .expect("a 4th anonymous socket from 127.0.0.1 is refused");
    assert_eq!(r.status, 429);
    assert_eq!(refusal_code(&r.body), "unauthenticated_per_ip");
    assert_eq!(
        metric(
            &server,
            "changecast_client_errors_total{reason=\"unauthenticated_per_ip\"}"
        )
        .await,
        1.0
    );
    // A token in the request never enters the anonymous pool.
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(Client::connect(&server, &customer_token(&format!("c{i}"))).await);
    }
    // One anonymous socket authenticates in-band: the address gets a slot back.
    let mut a = anon.pop().unwrap();
    a.send_json(json!({"type": "auth", "token": customer_token("c9")}))
        .await;
    assert_eq!(a.next_json().await["type"], "welcome");
    let mut fourth = Client::try_connect(&server, None, &[]).await.unwrap();
    fourth
        .send_json(json!({"type": "auth", "token": customer_token("c10")}))
        .await;
    assert_eq!(fourth.next_json().await["type"], "welcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_auth_needs_an_authenticated_slot() {
    let db = Db::start().await;
    let server = Server::start(&db, "[server]\nmax_connections = 2").await;
    let (_a, _) = Client::connect(&server, &customer_token("c1")).await;
    let (b, _) = Client::connect(&server, &customer_token("c2")).await;
    // max_connections is full, but waiting for `auth` uses the other pool.
    let mut anon = Client::try_connect(&server, None, &[]).await.unwrap();
    anon.send_json(json!({"type": "auth", "token": customer_token("c3")}))
        .await;
    assert_eq!(anon.closed_with(Duration::from_secs(5)).await, Some(4003));
    // With a slot free, the same in-band auth is welcomed.
    drop(b);
    let t = Instant::now();
    loop {
        let mut c = Client::try_connect(&server, None, &[]).await.unwrap();
        c.send_json(json!({"type": "auth", "token": customer_token("c3")}))
            .await;
        // Until the server has seen `b` leave, this one is closed with 4003 too.
        let reply = tokio::time::timeout(Duration::from_secs(5), c.ws.next())
            .await
            .expect("an answer");
        match reply {
            Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => break,
            other => {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "slot never freed: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
