//! The Socket.IO endpoint end to end: a hand-written Engine.IO client, the real `socket.io-client` (Node), and `/ws` side by side on one hub.

// Helpers outside `#[test]` fns unwrap too: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMsg;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use changecast::auth::Verifier;
use changecast::authz::{Authorizer, LookupError, OrderOwner, OrderOwners};
use changecast::config::Config;
use changecast::event::{Delivery, Event, EventId, RoutedEvent};
use changecast::gateway::{self, Gateway};
use changecast::health::Health;
use changecast::hub::Hub;
use changecast::metrics::Metrics;
use changecast::room::Room;

const SECRET: &str = "changecast-sio-test-secret-0123456789abcdef";

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A secret env var per server, so parallel tests never race on one variable.
fn config(mongo_uri: &str, db: &str, checkpoint: &std::path::Path, extra: &str) -> Config {
    let env = format!(
        "CHANGECAST_SIO_TEST_SECRET_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    std::env::set_var(&env, SECRET);
    let text = format!(
        r#"
[mongodb]
uri = "{mongo_uri}"
databases = ["{db}"]
connect_timeout = "5s"

[checkpoint]
store = "file"
path = "{cp}"
interval = "100ms"
every_events = 100

[auth]
algorithms = ["HS256"]
secret_env = "{env}"
leeway = "0s"

# No [[socketio.aliases]] here: the Node apps' legacy names are the built-in default,
# so suites run on them; the socket.io-client suites append config.example.toml's list
# (the same names plus one for its declared stream) as `extra`.
{extra}
"#,
        cp = checkpoint.display(),
    );
    Config::from_toml_str(&text, "sio-test.toml").expect("test config")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn customer_token(id: &str) -> String {
    token(json!({"sub": id, "role": "customer"}))
}

fn store_token(sub: &str, stores: &[&str]) -> String {
    token(json!({"sub": sub, "role": "store", "stores": stores}))
}

/// In-memory order owners for the hub-only server.
#[derive(Default)]
struct Owners(Mutex<HashMap<String, OrderOwner>>);

impl OrderOwners for Owners {
    fn owners<'a>(
        &'a self,
        order_id: &str,
        _database: Option<&str>,
    ) -> BoxFuture<'a, Result<Option<OrderOwner>, LookupError>> {
        let found = self.0.lock().unwrap().get(order_id).cloned();
        Box::pin(async move { Ok(found) })
    }
}

/// The gateway on port 0 over a hub the test publishes into directly (no MongoDB); stopped on drop.
struct HubServer {
    addr: SocketAddr,
    /// `/metrics` and `/readyz`.
    ops_addr: SocketAddr,
    hub: Arc<Hub>,
    owners: Arc<Owners>,
    stop: CancellationToken,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    next_id: AtomicU64,
    _dir: tempfile::TempDir,
}

impl HubServer {
    async fn start(extra: &str) -> HubServer {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            "mongodb://127.0.0.1:1/?replicaSet=rs0",
            "app",
            &dir.path().join("cp"),
            extra,
        );
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(cfg.hub.clone(), metrics.clone()));
        // History covers everything from the first id on, as after a fresh start from "now".
        hub.set_floor(EventId::new("0000000000000000"));
        let owners = Arc::new(Owners::default());
        let stop = CancellationToken::new();
        let gw = Arc::new(Gateway {
            hub: hub.clone(),
            metrics: metrics.clone(),
            health: Arc::new(Health::new(["app"])),
            verifier: Arc::new(Verifier::new(&cfg.auth)),
            authz: Arc::new(Authorizer::new(owners.clone(), false)),
            replayer: None,
            cfg: cfg.server.clone(),
            allow_query_token: cfg.auth.allow_query_token,
            limits: Arc::default(),
            stop: stop.clone(),
            tracker: TaskTracker::new(),
            sio: cfg.socketio.clone(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = gateway::router(gw.clone());
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops_addr = ops.local_addr().unwrap();
        tokio::spawn(gateway::ops::serve(ops, gw.clone(), stop.clone()));
        let served = tokio::spawn(gateway::serve(listener, router, gw, Duration::from_secs(5)));
        HubServer {
            addr,
            ops_addr,
            hub,
            owners,
            stop,
            served: Some(served),
            next_id: AtomicU64::new(1),
            _dir: dir,
        }
    }

    fn add_order(&self, id: &str, customer: &str, store: &str) {
        self.owners.0.lock().unwrap().insert(
            id.into(),
            OrderOwner {
                customer: Some(customer.into()),
                stores: vec![store.into()],
            },
        );
    }

    /// The wire form of an event id published here (ids are sealed).
    fn wire(&self, id: &str) -> String {
        self.hub.ids().seal(&EventId::new(id))
    }

    /// Publishes `name` with `data` to `rooms`; returns the event id as clients see it.
    fn publish(&self, name: &str, rooms: &[&str], data: Value) -> String {
        self.publish_owned(name, rooms, data, None)
    }

    /// As `publish`, for a change of an order now owned by `owner` (as the mapper sets it).
    fn publish_owned(
        &self,
        name: &str,
        rooms: &[&str],
        data: Value,
        owner: Option<OrderOwner>,
    ) -> String {
        let id = format!("{:016X}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        self.hub.publish(&RoutedEvent {
            owner: owner.map(Arc::new),
            database: None,
            event: Event {
                id: EventId::new(id.clone()),
                name: name.into(),
                ts_ms: ms,
            },
            deliveries: rooms
                .iter()
                .map(|r| Delivery {
                    room: r.parse::<Room>().unwrap(),
                    data: changecast::event::Payload::from_value(&data),
                })
                .collect(),
        });
        self.wire(&id)
    }

    /// What normalization would publish for an order's status change.
    fn status_changed(&self, order: &str, customer: &str, store: &str, status: &str) -> String {
        let data = json!({"_id": order, "orderId": order, "status": status});
        self.publish(
            "order:status_changed",
            &[
                &format!("customer:{customer}"),
                &format!("store:{store}"),
                &format!("order:{order}"),
            ],
            data,
        )
    }

    async fn metrics_text(&self) -> String {
        http(self.ops_addr, "GET", "/metrics", None).await.1
    }

    async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(s) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(10), s)
                .await
                .expect("gateway stops within 10s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A minimal HTTP/1.1 request; returns status and body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The value of the sample `series` (name and labels as exposed) in an OpenMetrics text; 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What a Socket.IO client sees.
#[derive(Debug)]
enum Seen {
    /// `42["name", args…]`
    Event(String, Vec<Value>),
    /// `43<id>[args…]`
    Ack(u64, Vec<Value>),
    /// `41`: the server disconnected this socket.
    Disconnect,
    /// The transport closed.
    Closed,
}

/// A hand-written Engine.IO v4 / Socket.IO v5 client over the websocket transport.
struct SioClient {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    next_ack: u64,
}

impl SioClient {
    /// Opens the transport and sends CONNECT with `auth`; `Err` carries the CONNECT_ERROR payload.
    async fn connect(
        addr: SocketAddr,
        auth: Value,
        headers: &[(&str, &str)],
    ) -> Result<(SioClient, Value), Value> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("ws open");
        let mut c = SioClient { ws, next_ack: 1 };
        let open = c.frame().await.expect("open packet");
        assert!(open.starts_with('0'), "{open}");
        c.send(format!("40{auth}")).await;
        let reply = c.frame().await.expect("connect reply");
        if let Some(ok) = reply.strip_prefix("40") {
            Ok((c, serde_json::from_str(ok).unwrap()))
        } else if let Some(err) = reply.strip_prefix("44") {
            Err(serde_json::from_str(err).unwrap())
        } else {
            panic!("unexpected connect reply {reply}")
        }
    }

    async fn send(&mut self, text: String) {
        self.ws.send(WsMsg::Text(text.into())).await.unwrap();
    }

    /// The next Engine.IO message (pings answered), within 10 s; `None` when closed.
    async fn frame(&mut self) -> Option<String> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("nothing within 10s");
            match m {
                Some(Ok(WsMsg::Text(t))) if t.as_str() == "2" => {
                    // A failed pong shows as the close that follows.
                    let _ = self.ws.send(WsMsg::Text("3".into())).await;
                }
                Some(Ok(WsMsg::Text(t))) => return Some(t.as_str().to_owned()),
                Some(Ok(WsMsg::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    async fn next(&mut self) -> Seen {
        let Some(f) = self.frame().await else {
            return Seen::Closed;
        };
        if f == "41" {
            return Seen::Disconnect;
        }
        if f == "1" {
            // Engine.IO close: the transport ends (socket.io-client reconnects).
            return Seen::Closed;
        }
        if let Some(ev) = f.strip_prefix("42") {
            let v: Vec<Value> = serde_json::from_str(ev).unwrap();
            let name = v[0].as_str().unwrap().to_owned();
            return Seen::Event(name, v[1..].to_vec());
        }
        if let Some(ack) = f.strip_prefix("43") {
            let i = ack.find('[').unwrap();
            return Seen::Ack(
                ack[..i].parse().unwrap(),
                serde_json::from_str(&ack[i..]).unwrap(),
            );
        }
        panic!("unexpected packet {f}")
    }

    /// The next event (acks are skipped).
    async fn event(&mut self) -> (String, Vec<Value>) {
        loop {
            match self.next().await {
                Seen::Event(n, a) => return (n, a),
                Seen::Ack(..) => continue,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// Emits `name` with `arg` and waits for its ack, collecting events seen meanwhile.
    async fn call(&mut self, name: &str, arg: Value) -> (Value, Vec<(String, Vec<Value>)>) {
        let id = self.next_ack;
        self.next_ack += 1;
        self.send(format!("42{id}{}", json!([name, arg]))).await;
        let mut events = Vec::new();
        loop {
            match self.next().await {
                Seen::Ack(i, mut a) if i == id => return (a.remove(0), events),
                Seen::Ack(..) => {}
                Seen::Event(n, a) => events.push((n, a)),
                other => panic!("expected ack {id}, got {other:?}"),
            }
        }
    }
}

/// A `/ws` client with `Authorization: Bearer`.
async fn ws_client(
    addr: SocketAddr,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}

async fn ws_next(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("nothing within 10s")
            .unwrap()
            .unwrap();
        if let WsMsg::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_and_socket_io_clients_get_the_same_events_from_one_hub() {
    let srv = HubServer::start("").await;
    let mut ws = ws_client(srv.addr, &customer_token("c1")).await;
    assert_eq!(ws_next(&mut ws).await["type"], "welcome");
    let (mut sio, ack) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    assert!(ack["sid"].is_string(), "{ack}");
    let (name, args) = sio.event().await;
    assert_eq!(name, "welcome");
    assert_eq!(args[0]["rooms"], json!(["customer:c1"]));

    let id = srv.status_changed("o1", "c1", "s1", "in_transit");
    let native = ws_next(&mut ws).await;
    assert_eq!(native["type"], "event");
    assert_eq!(native["event"], "order:status_changed");
    assert_eq!(native["id"], id);
    let mut names = Vec::new();
    for _ in 0..4 {
        let (name, args) = sio.event().await;
        assert_eq!(args, vec![native["data"].clone(), json!(id)], "{name}");
        names.push(name);
    }
    assert_eq!(
        names,
        [
            "order:status_changed",
            "orderStatusUpdated",
            "customer_order_update",
            "delivery_update"
        ]
    );
    let text = srv.metrics_text().await;
    assert_eq!(
        metric(&text, "changecast_deliveries_total{wire=\"socketio\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "changecast_deliveries_total{wire=\"native\"}"),
        1.0,
        "{text}"
    );
    srv.shutdown().await;
}

/// config.example.toml's `[[socketio.aliases]]` (the built-in ones and `balance-updated`)
/// and its `[[streams]]`, as TOML to append to a test config.
fn example_aliases_and_streams() -> String {
    let ex = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    let section =
        |from: &str, to: &str| ex[ex.find(from).unwrap()..ex.find(to).unwrap()].to_owned();
    section("\n[[socketio.aliases]]", "\n[routing.orders]") + &section("\n[[streams]]", "\n[auth]")
}

/// A declared stream's event goes out under its alias as well: config.example.toml's
/// `balance-updated` for the declared `users` stream's `balance:updated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_events_go_out_under_their_aliases() {
    let srv = HubServer::start(&example_aliases_and_streams()).await;
    let (mut sio, _) = SioClient::connect(srv.addr, json!({"token": customer_token("u1")}), &[])
        .await
        .unwrap();
    assert_eq!(sio.event().await.0, "welcome");
    let data = json!({"_id": "u1", "balance": 25, "tracked": {"balance": {"old": 10, "new": 25, "delta": 15, "known": true}}});
    let id = srv.publish("balance:updated", &["customer:u1"], data.clone());
    for want in ["balance:updated", "balance-updated"] {
        let (name, args) = sio.event().await;
        assert_eq!(name, want);
        assert_eq!(args, vec![data.clone(), json!(id)]);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_a_readable_connect_error() {
    let srv = HubServer::start("").await;
    let expired = token(json!({"sub": "c1", "role": "customer", "exp": now() - 60}));
    let cases = [
        (json!({"token": "not-a-jwt"}), "token_malformed: "),
        (
            json!({"token": expired}),
            "token_expired: token has expired",
        ),
        (json!({}), "token_missing: no token was presented"),
    ];
    for (auth, want) in cases {
        let err = SioClient::connect(srv.addr, auth.clone(), &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{auth} was accepted"));
        let msg = err["message"].as_str().unwrap();
        assert!(msg.starts_with(want), "{auth}: {msg}");
    }
    // The handshake's Authorization header is the other way in.
    let bearer = format!("Bearer {}", customer_token("c2"));
    let (mut c, _) = SioClient::connect(srv.addr, json!({}), &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(c.event().await.1[0]["rooms"], json!(["customer:c2"]));
    let text = srv.metrics_text().await;
    assert_eq!(
        metric(&text, "changecast_auth_failures_total{reason=\"expired\"}"),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_follow_the_ws_rules_and_answer_with_acks_or_error_events() {
    let srv = HubServer::start("").await;
    srv.add_order("o1", "c1", "s1");
    srv.add_order("o2", "c2", "s2");
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    c.event().await; // welcome

    let (ack, _) = c.call("join-order-room", json!({"orderId": "o1"})).await;
    assert_eq!(
        ack,
        // Nothing published yet: the recovery position is where the stream started (the floor).
        json!({"ok": true, "room": "order:o1", "recovered": false, "position": srv.wire("0000000000000000")})
    );

    let (ack, seen) = c.call("join-order-room", json!({"orderId": "o2"})).await;
    assert_eq!(ack["ok"], false);
    assert_eq!(ack["code"], "forbidden");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "error");
    assert_eq!(seen[0].1[0]["code"], "forbidden");
    assert_eq!(seen[0].1[0]["room"], "order:o2");

    // Without a callback the refusal still arrives, as an `error` event.
    c.send(format!(
        "42{}",
        json!(["join-store-room", {"storeId": "s2"}])
    ))
    .await;
    let (name, args) = c.event().await;
    assert_eq!(
        (name.as_str(), &args[0]["code"]),
        ("error", &json!("forbidden"))
    );

    // Order room events flow; the generic subscribe and unsubscribe work too.
    let id = srv.publish("order:updated", &["order:o1"], json!({"orderId": "o1"}));
    assert_eq!(
        c.event().await,
        (
            "order:updated".into(),
            vec![json!({"orderId": "o1"}), json!(id)]
        )
    );
    let (ack, _) = c.call("leave-order-room", json!("o1")).await;
    assert_eq!(ack, json!({"ok": true, "room": "order:o1"}));
    let (ack, _) = c.call("unsubscribe", json!({"room": "order:o1"})).await;
    assert_eq!(ack["code"], "not_subscribed");
    let (ack, _) = c.call("subscribe", json!({"room": "bogus"})).await;
    assert_eq!(ack["code"], "bad_room");

    // ping → pong, with the ack as well.
    let (ack, seen) = c.call("ping", json!(null)).await;
    assert!(ack["ts"].is_i64(), "{ack}");
    assert_eq!(seen[0].0, "pong");
    let (ack, _) = c.call("no-such-event", json!(1)).await;
    assert_eq!(ack["code"], "unknown_event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_since_recovers_exactly_the_missed_events() {
    let srv = HubServer::start("").await;
    srv.add_order("o1", "c1", "s1");
    let first = srv.status_changed("o1", "c1", "s1", "processing");
    let second = srv.status_changed("o1", "c1", "s1", "ready_for_pickup");
    let third = srv.status_changed("o1", "c1", "s1", "delivered");
    // The auto-joined room replays from `auth.since`.
    let (mut c, _) = SioClient::connect(
        srv.addr,
        json!({"token": store_token("u1", &["s1"]), "since": first}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(c.event().await.0, "welcome");
    let mut got = Vec::new();
    for _ in 0..4 {
        let (name, args) = c.event().await;
        got.push((name, args[0]["status"].clone(), args[1].clone()));
    }
    assert_eq!(
        got,
        [
            (
                "order:status_changed".into(),
                json!("ready_for_pickup"),
                json!(second)
            ),
            (
                "orderStatusUpdated".into(),
                json!("ready_for_pickup"),
                json!(second)
            ),
            (
                "order:status_changed".into(),
                json!("delivered"),
                json!(third)
            ),
            (
                "orderStatusUpdated".into(),
                json!("delivered"),
                json!(third)
            ),
        ]
    );
    // An explicit join with `since` replays that room.
    let (ack, seen) = c
        .call("join-order-room", json!({"orderId": "o1", "since": second}))
        .await;
    assert_eq!(ack["recovered"], true);
    let (ack_ok, replay) = if seen.is_empty() {
        (true, vec![c.event().await])
    } else {
        (true, seen)
    };
    assert!(ack_ok);
    assert_eq!(replay[0].0, "order:status_changed");
    assert_eq!(replay[0].1[1], json!(third));
}

/// An idle client gets a `position` event on the tick (issue 13), with the id of the newest
/// event published elsewhere; not again while the position has not moved, nor after an event
/// of its own that is the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_is_told_the_position() {
    let srv = HubServer::start("[server]\nping_interval = \"200ms\"\n").await;
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    let (name, welcome) = c.event().await;
    assert_eq!(name, "welcome");
    let start = welcome[0]["position"].clone();
    let elsewhere = srv.publish("order:created", &["customer:c2"], json!({"n": 1}));
    let told = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let (name, args) = c.event().await;
            assert_eq!(name, "position", "{args:?}");
            if args[0]["position"] != start {
                return args[0]["position"].clone();
            }
        }
    })
    .await
    .expect("a position event within 2 s");
    assert_eq!(told, json!(elsewhere));
    // Its own event is the newest: the event's id is its position, nothing more is sent.
    let mine = srv.publish("order:created", &["customer:c1"], json!({"n": 2}));
    let (name, args) = c.event().await;
    assert_eq!((name.as_str(), &args[1]), ("order:created", &json!(mine)));
    let quiet = tokio::time::timeout(Duration::from_millis(700), c.event()).await;
    assert!(
        quiet.is_err(),
        "nothing while the position stays: {quiet:?}"
    );
    // Moved elsewhere again: told again.
    let again = srv.publish("order:created", &["customer:c2"], json!({"n": 3}));
    let (name, args) = tokio::time::timeout(Duration::from_secs(2), c.event())
        .await
        .expect("a second position event");
    assert_eq!(
        (name.as_str(), &args[0]["position"]),
        ("position", &json!(again))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_as_a_slow_consumer() {
    let srv = HubServer::start("[hub]\nmailbox_capacity = 100000\n").await;
    // Long-polling, and then never polling again: nothing drains its buffer.
    let (_, open) = http(srv.addr, "GET", "/socket.io/?EIO=4&transport=polling", None).await;
    let open: Value = serde_json::from_str(open.trim_start_matches('0')).unwrap();
    let sid = open["sid"].as_str().unwrap();
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let auth = format!("40{}", json!({"token": customer_token("c1")}));
    let (status, _) = http(srv.addr, "POST", &path, Some(&auth)).await;
    assert_eq!(status, 200);
    // A poll may carry an Engine.IO ping ("2") first: answer it as a client does.
    let mut connected = String::new();
    for _ in 0..3 {
        connected = http(srv.addr, "GET", &path, None).await.1;
        if connected.contains("40{") {
            break;
        }
        if connected == "2" {
            http(srv.addr, "POST", &path, Some("3")).await;
        }
    }
    assert!(connected.contains("40{"), "{connected}");
    // A control client that reads everything must not be affected.
    let (mut control, _) =
        SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
            .await
            .unwrap();
    control.event().await;
    // Chunks the control reads before the next, so only the stuck client falls behind
    // (by bytes: 1,500 events of 1 KiB each, more than its 1 MiB).
    let pad = "x".repeat(1024);
    for chunk in 0..15 {
        for i in 0..100 {
            srv.publish(
                "order:updated",
                &["customer:c1"],
                json!({"n": chunk * 100 + i, "pad": pad}),
            );
        }
        for i in 0..100 {
            let (name, args) = control.event().await;
            assert_eq!(
                (name.as_str(), &args[0]),
                ("order:updated", &json!({"n": chunk * 100 + i, "pad": pad}))
            );
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = srv.metrics_text().await;
        if metric(&text, "changecast_slow_consumer_disconnects_total") == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its next poll is told why and disconnected, in place of the backlog (a poll made
    // as it was being cut off may still take one body of it).
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let (status, body) = http(srv.addr, "GET", &path, None).await;
        assert_eq!(status, 200, "{body}");
        let last = body.ends_with("\x1e1");
        bodies.push(body);
        if last {
            break;
        }
    }
    let last = bodies.last().unwrap();
    let frames: Vec<&str> = last.split('\x1e').collect();
    assert_eq!(frames.len(), 3, "{:?}", &last[..last.len().min(300)]);
    let error: Value = serde_json::from_str(frames[0].strip_prefix("42").unwrap()).unwrap();
    assert_eq!(
        (&error[0], &error[1]["code"]),
        (&json!("error"), &json!("slow_consumer"))
    );
    assert_eq!(&frames[1..], ["41", "1"]);
    assert!(bodies.iter().all(|b| b.len() <= 64 * 1024 + 2048));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ping_schedule_runs_on_from_the_open_packet_across_connect() {
    let srv = HubServer::start("[server]\nping_interval = \"2s\"\n").await;
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", srv.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = ws.next().await.unwrap().unwrap();
    let opened = tokio::time::Instant::now();
    assert!(open.to_text().unwrap().starts_with('0'), "{open:?}");
    // CONNECT late in the first ping interval: the first ping still comes one interval
    // after the open packet, not one after CONNECT.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let auth = format!("40{}", json!({"token": customer_token("c1")}));
    ws.send(WsMsg::Text(auth.into())).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a ping within 5s")
            .unwrap()
            .unwrap();
        if m.to_text().unwrap() == "2" {
            break;
        }
    }
    let first = opened.elapsed();
    assert!(
        first < Duration::from_millis(2700),
        "first ping {first:?} after the open packet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_moved_to_other_owners_leaves_its_room_with_an_unsubscribed_event() {
    let srv = HubServer::start("").await;
    srv.add_order("o1", "c1", "s1");
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    c.event().await; // welcome
    let (ack, _) = c.call("join-order-room", json!({"orderId": "o1"})).await;
    assert_eq!(ack["ok"], true, "{ack}");
    let owned = |customer: &str, store: &str| {
        Some(OrderOwner {
            customer: Some(customer.into()),
            stores: vec![store.into()],
        })
    };
    let first = srv.publish_owned(
        "order:updated",
        &["order:o1"],
        json!({"n": 1}),
        owned("c1", "s1"),
    );
    assert_eq!(
        c.event().await,
        ("order:updated".into(), vec![json!({"n": 1}), json!(first)])
    );
    // The change that moves the order is not delivered to the old owner: it is told instead.
    srv.publish_owned(
        "order:updated",
        &["order:o1"],
        json!({"address": "B's"}),
        owned("c2", "s2"),
    );
    srv.publish_owned(
        "order:updated",
        &["order:o1"],
        json!({"n": 3}),
        owned("c2", "s2"),
    );
    let marker = srv.publish("order:updated", &["customer:c1"], json!({"marker": true}));
    let (name, args) = c.event().await;
    assert_eq!(name, "unsubscribed", "{args:?}");
    assert_eq!(
        args[0],
        json!({"room": "order:o1", "reason": "ownership_changed"})
    );
    assert_eq!(
        c.event().await,
        (
            "order:updated".into(),
            vec![json!({"marker": true}), json!(marker)]
        )
    );
}

/// Floods `name` far past a 20/s limit; returns what the client saw before the server cut it off.
async fn flood_until_cut_off(srv: &HubServer, name: &str) -> Vec<Seen> {
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    c.event().await; // welcome
    for i in 0..1500 {
        let packet = format!("42{i}{}", json!([name, null]));
        // The server may cut the flood off before it is all sent.
        if c.ws.send(WsMsg::Text(packet.into())).await.is_err() {
            break;
        }
    }
    let mut seen = Vec::new();
    loop {
        let s = c.next().await;
        let end = matches!(s, Seen::Closed | Seen::Disconnect);
        seen.push(s);
        if end {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_counts_against_the_rate_limit_and_a_flood_disconnects() {
    let srv = HubServer::start("[server]\nmax_messages_per_second = 20\n").await;
    // Within the limit, pings and unknown events are answered.
    let (mut polite, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c2")}), &[])
        .await
        .unwrap();
    polite.event().await;
    for _ in 0..5 {
        let (ack, _) = polite.call("ping", json!(null)).await;
        assert!(ack["ts"].is_i64(), "{ack}");
        let (ack, _) = polite.call("no-such-event", json!(1)).await;
        assert_eq!(ack["code"], "unknown_event");
    }
    for name in ["ping", "no-such-event", "subscribe"] {
        let seen = flood_until_cut_off(&srv, name).await;
        let acks = seen.iter().filter(|s| matches!(s, Seen::Ack(..))).count();
        // At most two windows' worth answered (a flood may straddle the one-second
        // boundary), each with its one rate_limited refusal, and never the whole flood:
        // the server stops parsing and disconnects.
        assert!(
            acks <= 2 * (20 + 1),
            "{name}: {acks} acks answered: {seen:?}"
        );
        let limited = seen.iter().any(
            |s| matches!(s, Seen::Event(n, a) if n == "error" && a[0]["code"] == "rate_limited"),
        );
        assert!(
            limited,
            "{name}: no rate_limited error before the cut: {seen:?}"
        );
        assert!(matches!(seen.last(), Some(Seen::Disconnect | Seen::Closed)));
    }
    let text = srv.metrics_text().await;
    assert!(
        metric(
            &text,
            "changecast_client_errors_total{reason=\"rate_limited\"}"
        ) >= 3.0,
        "{text}"
    );
    // The polite client is still served.
    let id = srv.publish("order:updated", &["customer:c2"], json!({"n": 1}));
    let (name, args) = polite.event().await;
    assert_eq!((name.as_str(), &args[1]), ("order:updated", &json!(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_transport_so_clients_reconnect() {
    let srv = HubServer::start("").await;
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    c.event().await;
    srv.shutdown().await;
    // No DISCONNECT packet (which would tell socket.io-client not to reconnect): the transport just ends.
    loop {
        match c.next().await {
            Seen::Closed => break,
            Seen::Disconnect => panic!("shutdown sent a namespace DISCONNECT"),
            _ => {}
        }
    }
}

/// Opens an Engine.IO session by polling handshake; `Ok(sid)` or `Err((status, body))`.
async fn eio_handshake(addr: SocketAddr) -> Result<String, (u16, String)> {
    let (status, body) = http(addr, "GET", "/socket.io/?EIO=4&transport=polling", None).await;
    if status != 200 {
        return Err((status, body));
    }
    let open: Value = serde_json::from_str(body.strip_prefix('0').unwrap()).unwrap();
    Ok(open["sid"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_io_sessions_without_connect_are_capped_and_closed_by_the_deadline() {
    let srv = HubServer::start(
        "[server]\nmax_unauthenticated = 5\nmax_unauthenticated_per_ip = 0\nauth_deadline = \"1s\"",
    )
    .await;
    let mut sids = Vec::new();
    for _ in 0..4 {
        sids.push(eio_handshake(srv.addr).await.unwrap());
    }
    // The fifth over a WebSocket opened directly: the transport itself must be closed.
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", srv.addr);
    let (mut direct, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let open = direct.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with('0'), "{open:?}");
    let opened = std::time::Instant::now();
    // Beyond the cap: refused before the engine makes a session, by polling...
    let (status, body) = eio_handshake(srv.addr).await.unwrap_err();
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unauthenticated_overloaded");
    // ...and by a WebSocket opened directly.
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected a 503 refusal, got {:?}", other.map(|_| ())),
    }
    // A /ws token holder is not affected by the full anonymous pool.
    let mut ws = ws_client(srv.addr, &customer_token("w1")).await;
    assert_eq!(ws_next(&mut ws).await["type"], "welcome");
    // The deadline closes the sessions that never sent CONNECT, which empties the pool.
    let sid = loop {
        match eio_handshake(srv.addr).await {
            Ok(sid) => break sid,
            Err((503, _)) => {
                assert!(opened.elapsed() < Duration::from_secs(4), "never closed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    eprintln!(
        "Engine.IO sessions without CONNECT freed {:?} after they were opened (deadline 1s)",
        opened.elapsed()
    );
    drop(sid);
    // The WebSocket session was closed by the server (its first ping is 25 s away).
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match direct.next().await {
                Some(Ok(WsMsg::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the Engine.IO WebSocket stayed open past the deadline"
    );
    for old in &sids {
        // The session is gone: the engine no longer knows its id.
        let poll = format!("/socket.io/?EIO=4&transport=polling&sid={old}");
        let (status, _) =
            tokio::time::timeout(Duration::from_secs(5), http(srv.addr, "GET", &poll, None))
                .await
                .expect("a closed session answers at once");
        assert_eq!(status, 400, "session {old} still open");
    }
    // A valid Socket.IO client connects, and CONNECT moves it out of the anonymous pool.
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    assert_eq!(c.event().await.0, "welcome");
    let t = std::time::Instant::now();
    let mut open = 0;
    while open < 4 {
        // One slot is the session opened above, until its deadline.
        match eio_handshake(srv.addr).await {
            Ok(_) => open += 1,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(3), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let text = srv.metrics_text().await;
    assert!(
        metric(
            &text,
            "changecast_client_errors_total{reason=\"unauthenticated_overloaded\"}"
        ) >= 2.0,
        "{text}"
    );
    // The connected client still gets events.
    srv.status_changed("o1", "c1", "s1", "processing");
    let (name, _) = c.event().await;
    assert_eq!(name, "order:status_changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_a_valid_token_does_not_need_the_anonymous_pool() {
    let srv = HubServer::start(
        "[server]\nmax_unauthenticated = 2\nmax_unauthenticated_per_ip = 0\nmax_connections = 3",
    )
    .await;
    eio_handshake(srv.addr).await.unwrap();
    eio_handshake(srv.addr).await.unwrap();
    assert_eq!(eio_handshake(srv.addr).await.unwrap_err().0, 503);
    // The anonymous pool is full; a token on the handshake counts in max_connections instead.
    let bearer = format!("Bearer {}", customer_token("c1"));
    let (mut c, _) = SioClient::connect(srv.addr, json!({}), &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(c.event().await.0, "welcome");
    // A bad token on the handshake is no way around the pool.
    let (status, _) = http(srv.addr, "GET", "/socket.io/?EIO=4&transport=polling", None).await;
    assert_eq!(status, 503);
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", srv.addr);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer not-a-jwt".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected a 503 refusal, got {:?}", other.map(|_| ())),
    }
    // The handshake's slot became the session's: two more token holders fit, a third does not.
    let (_d, _) = SioClient::connect(srv.addr, json!({}), &[("authorization", &bearer)])
        .await
        .unwrap();
    let mut w = ws_client(srv.addr, &customer_token("w1")).await;
    assert_eq!(ws_next(&mut w).await["type"], "welcome");
    let mut req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503 overloaded, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_tokens_are_held_to_their_subjects_cap() {
    let srv = HubServer::start(
        "[server]\nmax_connections_per_subject = 1\nmax_unauthenticated = 1\nmax_unauthenticated_per_ip = 0",
    )
    .await;
    let bearer = format!("Bearer {}", customer_token("c1"));
    let (mut c, _) = SioClient::connect(srv.addr, json!({}), &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(c.event().await.0, "welcome");
    // c1 is at its cap: more handshakes with its token are anonymous, so the pool (1) bounds them.
    let handshake = |addr: SocketAddr, bearer: String| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    };
    let first = handshake(srv.addr, bearer.clone()).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = handshake(srv.addr, bearer.clone()).await;
    assert!(second.starts_with("HTTP/1.1 503"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_io_handshakes_have_a_per_address_cap() {
    let srv = HubServer::start("[server]\nmax_unauthenticated_per_ip = 2").await;
    eio_handshake(srv.addr).await.unwrap();
    eio_handshake(srv.addr).await.unwrap();
    let (status, body) = eio_handshake(srv.addr).await.unwrap_err();
    assert_eq!(status, 429, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unauthenticated_per_ip");
    let text = srv.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "changecast_client_errors_total{reason=\"unauthenticated_per_ip\"}"
        ),
        1.0,
        "{text}"
    );
}

/// Runs tests/node/sio.test.mjs against `url`, serving its driver requests with `drive`.
async fn run_node<F>(url: &str, mut drive: F)
where
    F: FnMut(Value) -> BoxFuture<'static, Value>,
{
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    if !dir.join("node_modules/socket.io-client").exists() {
        let npm = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .await;
        match npm {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("npm ci failed: {s}"),
            Err(e) => {
                eprintln!("skipping the socket.io-client suite: node_modules missing and npm unavailable ({e})");
                return;
            }
        }
    }
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("sio.test.mjs")
        .current_dir(&dir)
        .env("CC_URL", url)
        .env("CC_SECRET", SECRET)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("node is installed");
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stdout = child.stdout.take().unwrap();
    let out = tokio::spawn(async move {
        let mut s = String::new();
        stdout.read_to_string(&mut s).await.unwrap();
        s
    });
    let mut log = String::new();
    let serve = async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            match line.strip_prefix("@@drive ") {
                Some(req) => {
                    let reply = drive(serde_json::from_str(req).unwrap()).await;
                    stdin
                        .write_all(format!("{reply}\n").as_bytes())
                        .await
                        .unwrap();
                    stdin.flush().await.unwrap();
                }
                None => {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), serve)
        .await
        .expect("node suite finished within 120s");
    let status = child.wait().await.unwrap();
    let out = out.await.unwrap();
    println!("{out}");
    assert!(status.success(), "node suite failed:\n{out}\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_client_suite_against_the_hub() {
    let srv = Arc::new(HubServer::start(&example_aliases_and_streams()).await);
    let url = format!("http://{}", srv.addr);
    let s = srv.clone();
    run_node(&url, move |req| {
        let s = s.clone();
        Box::pin(async move { drive_hub(&s, req) })
    })
    .await;
}

/// The driver requests of sio.test.mjs, served by publishing what normalization would.
fn drive_hub(srv: &HubServer, req: Value) -> Value {
    let s = |k: &str| req[k].as_str().unwrap_or_default().to_owned();
    match req["op"].as_str() {
        Some("order") => {
            srv.add_order(&s("id"), &s("customer"), &s("store"));
            json!({"ok": true})
        }
        Some("status") => {
            let canonical = match s("status").as_str() {
                "out_for_delivery" => "in_transit".to_owned(),
                "accepted" => "processing".to_owned(),
                "completed" => "delivered".to_owned(),
                other => other.to_owned(),
            };
            let id = srv.status_changed(&s("id"), &s("customer"), &s("store"), &canonical);
            json!({"ok": true, "id": id})
        }
        Some("balance") => {
            // What the declared `users` stream publishes for a balance `from` → `to`.
            let (from, to) = (req["from"].as_i64().unwrap(), req["to"].as_i64().unwrap());
            let user = s("user");
            let data = json!({"_id": user, "balance": to, "changedFields": ["balance"],
                "tracked": {"balance": {"old": from, "new": to, "delta": to - from, "known": true}}});
            let id = srv.publish("balance:updated", &[&format!("customer:{user}")], data);
            json!({"ok": true, "id": id})
        }
        other => json!({"ok": false, "error": format!("unknown op {other:?}")}),
    }
}

/// changecast itself (change streams, normalization, routing) against a private mongo-sim; stopped on drop.
struct AppServer {
    app: Option<changecast::app::AppHandle>,
    orders: mongodb::Collection<bson::Document>,
    users: mongodb::Collection<bson::Document>,
    _sim: mongo_sim::SimHandle,
    _dir: tempfile::TempDir,
}

impl AppServer {
    async fn start() -> AppServer {
        let sim = mongo_sim::MongoSim::start(mongo_sim::SimConfig {
            port: 0,
            ..Default::default()
        })
        .await
        .expect("start mongo-sim");
        let uri = sim.uri();
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sio_{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let cfg = config(
            &uri,
            &db,
            &dir.path().join("checkpoint.json"),
            &example_aliases_and_streams(),
        );
        let listeners = changecast::app::Listeners {
            client: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            ops: None,
        };
        let app = changecast::app::start(
            &cfg,
            changecast::app::RunOptions::default(),
            listeners,
            None,
        )
        .await
        .expect("start changecast");
        // Ready means the change streams are open: writes from now on are seen.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !app.health.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "changecast never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
        AppServer {
            app: Some(app),
            orders: client.database(&db).collection("orders"),
            users: client.database(&db).collection("users"),
            _sim: sim,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.app.as_ref().unwrap().addr
    }

    /// The driver requests of sio.test.mjs, served by writing to MongoDB.
    async fn drive(&self, req: Value) -> Value {
        let oid = |k: &str| {
            bson::oid::ObjectId::parse_str(req[k].as_str().unwrap_or_default()).expect("24-hex id")
        };
        match req["op"].as_str() {
            Some("order") => {
                let doc = bson::doc! {
                    "_id": oid("id"),
                    "customerId": oid("customer"),
                    "storeId": oid("store"),
                    "status": "new",
                    "orderType": "delivery",
                    "total": 12.5,
                };
                self.orders.insert_one(doc).await.unwrap();
                json!({"ok": true})
            }
            Some("status") => {
                let status = req["status"].as_str().unwrap_or_default();
                let r = self
                    .orders
                    .update_one(
                        bson::doc! {"_id": oid("id")},
                        bson::doc! {"$set": {"status": status}},
                    )
                    .await
                    .unwrap();
                assert_eq!(r.matched_count, 1);
                json!({"ok": true})
            }
            Some("balance") => {
                // The declared `users` stream of config.example.toml.
                let (from, to) = (req["from"].as_i64().unwrap(), req["to"].as_i64().unwrap());
                self.users
                    .insert_one(bson::doc! {"_id": oid("user"), "balance": from})
                    .await
                    .unwrap();
                self.users
                    .update_one(
                        bson::doc! {"_id": oid("user")},
                        bson::doc! {"$set": {"balance": to}},
                    )
                    .await
                    .unwrap();
                json!({"ok": true})
            }
            other => json!({"ok": false, "error": format!("unknown op {other:?}")}),
        }
    }

    async fn stop(mut self) {
        let app = self.app.take().unwrap();
        app.stop();
        tokio::time::timeout(Duration::from_secs(15), app.wait())
            .await
            .expect("changecast stops within 15s")
            .unwrap();
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        if let Some(app) = &self.app {
            app.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_client_suite_against_changecast_and_mongo_sim() {
    let srv = Arc::new(AppServer::start().await);
    let url = format!("http://{}", srv.addr());
    let s = srv.clone();
    run_node(&url, move |req| {
        let s = s.clone();
        Box::pin(async move { s.drive(req).await })
    })
    .await;
    Arc::try_unwrap(srv).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_and_socket_io_get_the_same_order_update_from_mongo_sim() {
    let srv = AppServer::start().await;
    let (order, customer, store) = (
        bson::oid::ObjectId::new(),
        bson::oid::ObjectId::new(),
        bson::oid::ObjectId::new(),
    );
    let tok = customer_token(&customer.to_hex());
    let mut ws = ws_client(srv.addr(), &tok).await;
    assert_eq!(ws_next(&mut ws).await["type"], "welcome");
    let (mut sio, _) = SioClient::connect(srv.addr(), json!({"token": tok}), &[])
        .await
        .unwrap();
    assert_eq!(sio.event().await.0, "welcome");
    let req = |op: &str, status: &str| {
        json!({"op": op, "id": order.to_hex(), "customer": customer.to_hex(),
               "store": store.to_hex(), "status": status})
    };
    srv.drive(req("order", "")).await;
    srv.drive(req("status", "out_for_delivery")).await;

    // /ws: order:created, then order:status_changed.
    let created = ws_next(&mut ws).await;
    assert_eq!(created["event"], "order:created", "{created}");
    let changed = ws_next(&mut ws).await;
    assert_eq!(changed["event"], "order:status_changed", "{changed}");
    assert_eq!(changed["data"]["status"], "in_transit", "{changed}");

    // Socket.IO: the same events, same payloads and ids, under canonical and legacy names.
    let mut got = Vec::new();
    for _ in 0..5 {
        let (name, args) = sio.event().await;
        got.push(name.clone());
        let native = if name == "order:created" {
            &created
        } else {
            &changed
        };
        assert_eq!(
            args,
            vec![native["data"].clone(), native["id"].clone()],
            "{name}"
        );
    }
    assert_eq!(
        got,
        [
            "order:created",
            "order:status_changed",
            "orderStatusUpdated",
            "customer_order_update",
            "delivery_update"
        ]
    );
    srv.stop().await;
}

/// A polling session: handshake, then requests with its `sid`.
struct Polling {
    addr: SocketAddr,
    path: String,
}

impl Polling {
    async fn open(addr: SocketAddr) -> Polling {
        let sid = eio_handshake(addr).await.unwrap();
        Polling {
            addr,
            path: format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
        }
    }

    async fn post(&self, body: &str) -> (u16, String) {
        http(self.addr, "POST", &self.path, Some(body)).await
    }

    async fn get(&self) -> (u16, String) {
        tokio::time::timeout(
            Duration::from_secs(10),
            http(self.addr, "GET", &self.path, None),
        )
        .await
        .expect("a poll answers within 10 s")
    }

    /// Polls until a packet satisfying `want` arrives (answering pings); returns the packets seen.
    async fn until(&self, want: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        for _ in 0..20 {
            let (status, body) = self.get().await;
            assert_eq!(status, 200, "{body}");
            for p in body.split('\x1e') {
                if p == "2" {
                    self.post("3").await;
                }
                seen.push(p.to_owned());
                if want(p) {
                    return seen;
                }
            }
        }
        panic!("never saw the packet; got {seen:?}")
    }
}

/// Engine.IO's error JSON and status for every malformed request, and never a session for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_engine_io_requests_get_engine_io_errors() {
    let srv = HubServer::start("[server]\nmax_message_bytes = 4096\n").await;
    let sid = "0123456789abcdef0123456789abcdef";
    let cases = [
        (
            "GET",
            "/socket.io/?EIO=3&transport=polling".to_owned(),
            400,
            5,
        ),
        ("GET", "/socket.io/?transport=polling".to_owned(), 400, 5),
        (
            "GET",
            "/socket.io/?EIO=4&transport=flashsocket".to_owned(),
            400,
            0,
        ),
        ("GET", "/socket.io/?EIO=4".to_owned(), 400, 0),
        (
            "POST",
            "/socket.io/?EIO=4&transport=polling".to_owned(),
            400,
            2,
        ),
        (
            "GET",
            format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
            400,
            1,
        ),
        (
            "GET",
            "/socket.io/?EIO=4&transport=polling&sid=../x".to_owned(),
            400,
            1,
        ),
        // A WebSocket transport without the upgrade headers.
        (
            "GET",
            "/socket.io/?EIO=4&transport=websocket".to_owned(),
            400,
            3,
        ),
    ];
    for (method, path, status, code) in cases {
        let (got, body) = http(srv.addr, method, &path, None).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert_eq!(v["code"], code, "{method} {path}: {body}");
        assert!(v["message"].is_string(), "{body}");
    }
    // A payload over maxPayload: 413, and the session is closed.
    let p = Polling::open(srv.addr).await;
    let (status, _) = p.post(&"4".repeat(5000)).await;
    assert_eq!(status, 413);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = p.get().await;
        if status == 400 || body.ends_with('1') {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
    }
    // Two GETs at once: the second is refused, the first keeps its turn.
    let p = Polling::open(srv.addr).await;
    let first = tokio::spawn({
        let (addr, path) = (p.addr, p.path.clone());
        async move { http(addr, "GET", &path, None).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = p.get().await;
    assert_eq!((status, body.contains("\"code\":3")), (400, true), "{body}");
    p.post(&format!("40{}", json!({"token": customer_token("c1")})))
        .await;
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("40{"), "{body}");
    // No session was made for any of the refused handshakes.
    let text = srv.metrics_text().await;
    assert_eq!(
        metric(&text, "changecast_unauthenticated_connections"),
        0.0,
        "{text}"
    );
}

/// Garbage at every layer: Engine.IO garbage closes the session, Socket.IO garbage is
/// answered with an `error` event (and the ack, when one was asked), and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_packets_get_clear_errors() {
    let srv = HubServer::start("").await;
    let (mut c, _) = SioClient::connect(srv.addr, json!({"token": customer_token("c1")}), &[])
        .await
        .unwrap();
    c.event().await; // welcome
    let cases: [(&str, &str); 8] = [
        ("4zzz", "bad_request"),
        ("42", "bad_request"),
        ("42{\"a\":1}", "bad_request"),
        ("42[1,2]", "bad_request"),
        ("4299999999999999999999[\"ping\"]", "bad_request"),
        (
            "451-[\"x\",{\"_placeholder\":true,\"num\":0}]",
            "binary_not_supported",
        ),
        ("42/admin,[\"ping\"]", "bad_request"),
        ("43[]", "bad_request"),
    ];
    for (packet, code) in cases {
        c.send(packet.to_owned()).await;
        let (name, args) = c.event().await;
        assert_eq!(
            (name.as_str(), &args[0]["code"]),
            ("error", &json!(code)),
            "{packet}: {args:?}"
        );
    }
    // A binary frame too.
    c.ws.send(WsMsg::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let (name, args) = c.event().await;
    assert_eq!(args[0]["code"], "binary_not_supported", "{name}");
    // A refused event with an ack id is refused in the ack as well.
    c.send("4212[\"nope\"]".into()).await;
    let seen = [c.next().await, c.next().await];
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Ack(12, a) if a[0]["code"] == "unknown_event")),
        "{seen:?}"
    );
    // Another namespace is refused by name, the session stays.
    c.send("40/admin,{}".into()).await;
    assert_eq!(
        c.frame().await.unwrap(),
        "44/admin,{\"message\":\"Invalid namespace\"}"
    );
    let (ack, _) = c.call("ping", json!(null)).await;
    assert!(ack["ts"].is_i64(), "{ack}");
    // Engine.IO garbage ends the transport.
    c.send("9garbage".into()).await;
    assert!(matches!(c.next().await, Seen::Closed));
    let text = srv.metrics_text().await;
    assert!(
        metric(
            &text,
            "changecast_client_errors_total{reason=\"bad_request\"}"
        ) >= 6.0,
        "{text}"
    );
}

/// A CONNECT to another namespace before authenticating is refused by name; a bad
/// token can be retried on the same Engine.IO session until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_name_the_namespace_and_the_code() {
    let srv = HubServer::start("").await;
    let p = Polling::open(srv.addr).await;
    p.post("40/admin,{}").await;
    let seen = p.until(|s| s.starts_with("44")).await;
    assert_eq!(
        seen.last().unwrap(),
        "44/admin,{\"message\":\"Invalid namespace\"}"
    );
    p.post("40{\"token\":\"nope\"}").await;
    let seen = p.until(|s| s.starts_with("44")).await;
    let err: Value = serde_json::from_str(&seen.last().unwrap()[2..]).unwrap();
    assert_eq!(err["data"]["code"], "token_malformed", "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .starts_with("token_malformed: "));
    p.post(&format!("40{}", json!({"token": customer_token("c1")})))
        .await;
    let seen = p.until(|s| s.contains("\"welcome\"")).await;
    assert!(
        seen.iter().any(|s| s.starts_with("40{\"sid\":")),
        "{seen:?}"
    );
}

/// Anonymous polling floods: a burst of events before CONNECT is cut off by the rate
/// limit, and a session that never polls again is closed by the heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_polling_sessions_are_cut_off() {
    let srv = HubServer::start(
        "[server]\nmax_messages_per_second = 20\nping_interval = \"200ms\"\npong_timeout = \"300ms\"\nauth_deadline = \"30s\"\n",
    )
    .await;
    // 300 events in one POST before CONNECT: far over the rate, the session is closed.
    let flood = Polling::open(srv.addr).await;
    let batch = vec!["42[\"x\"]"; 300].join("\x1e");
    assert_eq!(flood.post(&batch).await.0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = flood.get().await;
        if status == 400 || body.ends_with('1') {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
    }
    // Connected, then never polling again: its pings go unanswered and it is closed.
    let quiet = Polling::open(srv.addr).await;
    quiet
        .post(&format!("40{}", json!({"token": customer_token("c1")})))
        .await;
    quiet.until(|s| s.contains("\"welcome\"")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = srv.metrics_text().await;
        if metric(&text, "changecast_connections{wire=\"socketio\"}") == 0.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = srv.metrics_text().await;
    assert!(
        metric(
            &text,
            "changecast_client_errors_total{reason=\"rate_limited\"}"
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "changecast_unauthenticated_connections"),
        0.0,
        "{text}"
    );
}

/// A WebSocket that starts the upgrade and never finishes it is dropped after the
/// probe deadline; the session goes on polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_upgrade_leaves_the_session_polling() {
    let srv = HubServer::start("[server]\npong_timeout = \"500ms\"\n").await;
    let p = Polling::open(srv.addr).await;
    p.post(&format!("40{}", json!({"token": customer_token("c1")})))
        .await;
    p.until(|s| s.contains("\"welcome\"")).await;
    let sid = p.path.rsplit('=').next().unwrap().to_owned();
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&sid={sid}",
        srv.addr
    );
    let (mut probe, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    probe.send(WsMsg::Text("2probe".into())).await.unwrap();
    let reply = probe.next().await.unwrap().unwrap();
    assert_eq!(reply.to_text().unwrap(), "3probe");
    // A second prober is refused while the first holds its turn.
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("expected a 400, got {:?}", other.map(|_| ())),
    }
    // No "5": the probe is dropped at its deadline.
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match probe.next().await {
                Some(Ok(WsMsg::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the probe stayed open");
    let id = srv.publish("order:updated", &["customer:c1"], json!({"n": 1}));
    let seen = p.until(|s| s.contains("order:updated")).await;
    assert!(seen.last().unwrap().contains(&id), "{seen:?}");
}
