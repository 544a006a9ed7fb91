//! Integration tests: every operations metric moves as it should, and the logs of a whole run hold no token or secret.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMsg;

use crate::support::*;

/// `/metrics` over HTTP, as `name{labels}` → value (comments dropped).
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// How much `key` moved between two scrapes.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, key: &str) -> f64 {
    get(after, key) - get(before, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_moves_as_expected() {
    let db = Db::start().await;
    let server = Server::start(&db, "[hub]\nmailbox_capacity = 256").await;
    let ops = server.app().ops_addr.unwrap();
    let orders = db.coll("orders");

    let m0 = scrape(ops).await;
    for family in [
        "changecast_stream_lag_seconds",
        "changecast_checkpoint_age_seconds",
        "changecast_rooms",
        "changecast_slow_consumer_disconnects_total",
        "changecast_stream_reconnects_total",
        "changecast_history_lost_total",
        "changecast_delivery_latency_seconds_count",
        "changecast_runtime_tasks",
    ] {
        assert!(m0.contains_key(family), "{family} is not exported: {m0:?}");
    }
    // Sampled at scrape time: at least the task serving this scrape is alive.
    assert!(get(&m0, "changecast_runtime_tasks") >= 1.0, "{m0:?}");

    // An order update: deliveries per wire format and the latency histogram.
    let id = ObjectId::new();
    let (mut admin, _) = Client::connect(&server, &admin_token()).await;
    let (mut customer, _) = Client::connect(&server, &customer_token("c1")).await;
    orders
        .insert_one(doc! {"_id": id, "customerId": "c1", "storeId": "s1", "status": "new"})
        .await
        .unwrap();
    orders
        .update_one(doc! {"_id": id}, doc! {"$set": {"status": "accepted"}})
        .await
        .unwrap();
    let got = admin.events(2, Duration::from_secs(10)).await.len()
        + customer.events(2, Duration::from_secs(10)).await.len();
    assert_eq!(got, 4);
    let m1 = scrape(ops).await;
    let native = "changecast_deliveries_total{wire=\"native\"}";
    assert_eq!(delta(&m0, &m1, native), got as f64, "one per event written");
    assert_eq!(
        delta(&m0, &m1, "changecast_delivery_latency_seconds_count"),
        got as f64
    );
    let latency = delta(&m0, &m1, "changecast_delivery_latency_seconds_sum");
    assert!(latency >= 0.0 && latency < 5.0 * got as f64, "{latency}");
    assert_eq!(
        delta(
            &m0,
            &m1,
            "changecast_changes_read_total{collection=\"orders\",op=\"insert\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &m0,
            &m1,
            "changecast_changes_read_total{collection=\"orders\",op=\"update\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &m0,
            &m1,
            "changecast_events_routed_total{event=\"order:status_changed\"}"
        ),
        1.0
    );

    // Data problems: a missing routing field is dropped for that route and counted; an
    // unknown status passes through, counted.
    orders
        .insert_one(doc! {"storeId": "s1", "status": "new"})
        .await
        .unwrap();
    orders
        .insert_one(doc! {"customerId": "c1", "storeId": "s1", "status": "teleported"})
        .await
        .unwrap();
    assert_eq!(admin.events(2, Duration::from_secs(10)).await.len(), 2);
    let unknown = customer.events(1, Duration::from_secs(10)).await;
    assert_eq!(unknown[0]["data"]["unknown"], true, "{unknown:?}");
    let m_data = scrape(ops).await;
    assert_eq!(
        delta(
            &m1,
            &m_data,
            "changecast_events_dropped_total{reason=\"missing_field\"}"
        ),
        1.0,
        "{m_data:?}"
    );
    assert_eq!(
        delta(&m1, &m_data, "changecast_unknown_statuses_total"),
        1.0
    );

    // Bad tokens: auth failures by reason.
    let expired = token(json!({"sub": "c1", "exp": now() - 3600}));
    for t in ["garbage", expired.as_str()] {
        assert!(Client::try_connect(&server, Some(t), &[]).await.is_err());
    }
    // Refused subscriptions, by reason.
    assert_eq!(
        customer.subscribe("customer:c2", None).await["code"],
        "forbidden"
    );
    assert_eq!(
        customer.subscribe("order:*", None).await["code"],
        "bad_room"
    );
    // A reconnect with `since` recovered from history.
    let last = {
        let (mut c, _) = Client::try_connect_url(
            &format!("{}?since=00", server.ws_url()),
            Some(&customer_token("c1")),
            &[],
        )
        .await
        .map(|c| (c, ()))
        .unwrap();
        assert_eq!(c.next_json().await["type"], "welcome");
        c.events(2, Duration::from_secs(5)).await.len()
    };
    let m2 = scrape(ops).await;
    assert_eq!(
        delta(
            &m1,
            &m2,
            "changecast_auth_failures_total{reason=\"malformed\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &m1,
            &m2,
            "changecast_auth_failures_total{reason=\"expired\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &m1,
            &m2,
            "changecast_subscriptions_refused_total{reason=\"forbidden\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &m1,
            &m2,
            "changecast_subscriptions_refused_total{reason=\"bad_room\"}"
        ),
        1.0
    );
    // `since=00` is below the hub's floor in a fresh process: oplog replay or resync, counted either way.
    let recovered: f64 = ["history", "oplog", "resync"]
        .iter()
        .map(|s| {
            delta(
                &m1,
                &m2,
                &format!("changecast_recoveries_total{{source=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(recovered, 1.0, "{m2:?} after {last} replayed events");

    // A stalled client: slow-consumer disconnects. The admin keeps reading meanwhile.
    let reader = tokio::spawn(async move {
        let n = admin.events(1000, Duration::from_secs(30)).await.len();
        (admin, n)
    });
    let stalled = crate::limits::connect_stalled(&server, &admin_token()).await;
    let docs: Vec<_> = (0..1000)
        .map(|i| doc! {"customerId": "c9", "storeId": "s9", "status": "new", "i": i, "notes": "y".repeat(8192)})
        .collect();
    orders.insert_many(docs).await.unwrap();
    let t = Instant::now();
    loop {
        let m = scrape(ops).await;
        if get(&m, "changecast_slow_consumer_disconnects_total") >= 1.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "stalled client never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The admin kept reading and got all 1000 (its mailbox of 256 never overflowed).
    let (admin, n) = reader.await.unwrap();
    assert_eq!(n, 1000);
    assert_eq!(
        get(
            &scrape(ops).await,
            "changecast_slow_consumer_disconnects_total"
        ),
        1.0
    );
    drop(stalled);

    // Idle: empty-batch tokens keep the lag near zero (cluster time has 1 s resolution).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = scrape(ops).await;
    let lag = get(&idle, "changecast_stream_lag_seconds");
    assert!(
        lag < 3.0,
        "lag {lag} s after 4 s idle: the token does not advance on empty batches"
    );
    assert!(
        get(&idle, "changecast_checkpoint_age_seconds") < 4.0,
        "{idle:?}"
    );

    // Gauges come back to zero once every client is gone.
    assert!(get(&idle, "changecast_connections{wire=\"native\"}") >= 2.0);
    assert!(get(&idle, "changecast_rooms") >= 2.0);
    drop(admin);
    drop(customer);
    let t = Instant::now();
    loop {
        let m = scrape(ops).await;
        let conns = get(&m, "changecast_connections{wire=\"native\"}");
        let rooms = get(&m, "changecast_rooms");
        if conns == 0.0 && rooms == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "connections {conns}, rooms {rooms} after every client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `changecast` child process whose stderr and stdout are collected line by line.
struct Child {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Child {
    fn spawn(config: &std::path::Path, env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_changecast"));
        cmd.args(["run", "--config"])
            .arg(config)
            .args(["--log-format", "json", "--listen", "127.0.0.1:0"])
            .args(["--ops-listen", "127.0.0.1:0"])
            .env("CHANGECAST_LOG", "debug")
            .env_remove("MONGODB_URI")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn changecast");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(l);
                }
            });
        }
        Child { child, lines }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The client listener's address, from the "listening" log line.
    async fn addr(&self) -> SocketAddr {
        self.logged_addr("listening").await
    }

    /// The address of the first log line whose message starts with `message`.
    async fn logged_addr(&self, message: &str) -> SocketAddr {
        let t = Instant::now();
        loop {
            for l in self.lines.lock().unwrap().iter() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                    if v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message))
                    {
                        return v["addr"].as_str().unwrap().parse().unwrap();
                    }
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no listening line: {}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM by pid, then the exit code (killed after 20 s).
    async fn stop(mut self) -> (Option<i32>, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(Duration::from_secs(20)).await
    }

    async fn wait(&mut self, d: Duration) -> (Option<i32>, String) {
        let t = Instant::now();
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code();
            }
            if t.elapsed() > d {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let the reader threads take the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (code, self.text())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn assert_clean(logs: &str, secrets: &[(&str, &str)]) {
    for (what, s) in secrets {
        assert!(!s.is_empty());
        if let Some(at) = logs.find(s) {
            let line = logs[..at].rsplit('\n').next().unwrap_or("");
            panic!("{what} appears in the logs: …{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_whole_run_hold_no_token_or_secret() {
    let db = Db::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("changecast.toml");
    let auth = format!(
        "algorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\"\nallow_query_token = true"
    );
    std::fs::write(
        &config,
        crate::authn::config_text(&db, &dir.path().join("cp.json"), &auth, ""),
    )
    .unwrap();
    // At trace level: the WebSocket and HTTP libraries log whole frames and heads there.
    let child = Child::spawn(
        &config,
        &[(SECRET_ENV, SECRET), ("CHANGECAST_LOG", "trace")],
    );
    let addr = child.addr().await;
    let ops = child.logged_addr("operations listener").await;
    let t = Instant::now();
    while http_get(ops, "/readyz").await.0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", child.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("ws://{addr}/ws");

    // Every way a token can arrive, good and bad.
    let good = customer_token("log-c1");
    let refresh = customer_token("log-c1");
    let query = customer_token("log-c2");
    let proto = customer_token("log-c3");
    let inband = customer_token("log-c4");
    let expired = token(json!({"sub": "log-c5", "exp": now() - 600}));
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "log-c6", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"forged-forged-forged-forged-forged-forged"),
    )
    .unwrap();
    let garbage = "not.a.jwt-9f86d081884c7d659a2feaa0c55ad015";
    let sio = customer_token("log-c7");

    let mut c1 = Client::try_connect_url(&url, Some(&good), &[])
        .await
        .unwrap();
    assert_eq!(c1.next_json().await["type"], "welcome");
    c1.send_json(json!({"type": "auth", "token": refresh}))
        .await;
    assert_eq!(c1.next_json().await["type"], "authenticated");
    c1.send_json(json!({"type": "auth", "token": forged})).await;
    assert_eq!(c1.next_json().await["type"], "error");
    let mut c2 = Client::try_connect_url(&format!("{url}?token={query}"), None, &[])
        .await
        .unwrap();
    assert_eq!(c2.next_json().await["type"], "welcome");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("changecast.v1, bearer.{proto}").parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c3 = Client { ws };
    assert_eq!(c3.next_json().await["type"], "welcome");
    let mut c4 = Client::try_connect_url(&url, None, &[]).await.unwrap();
    c4.send_json(json!({"type": "auth", "token": inband})).await;
    assert_eq!(c4.next_json().await["type"], "welcome");
    for bad in [expired.as_str(), forged.as_str(), garbage] {
        assert!(Client::try_connect_url(&url, Some(bad), &[]).await.is_err());
        assert!(
            Client::try_connect_url(&format!("{url}?token={bad}"), None, &[])
                .await
                .is_err()
        );
        let mut c = Client::try_connect_url(&url, None, &[]).await.unwrap();
        c.send_json(json!({"type": "auth", "token": bad})).await;
        assert_eq!(c.next_json().await["type"], "error");
    }
    // A Socket.IO CONNECT carries its token in the packet.
    let sio_url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut c5, _) = tokio_tungstenite::connect_async(sio_url).await.unwrap();
    let open = c5.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with('0'), "{open:?}");
    c5.send(WsMsg::Text(format!("40{}", json!({"token": sio})).into()))
        .await
        .unwrap();
    // Engine.IO may ping ("2") before the CONNECT reply; answer and read on.
    let connected = loop {
        let m = c5.next().await.unwrap().unwrap();
        if m.to_text().unwrap() != "2" {
            break m;
        }
        c5.send(WsMsg::Text("3".into())).await.unwrap();
    };
    assert!(
        connected.to_text().unwrap().starts_with("40{"),
        "{connected:?}"
    );
    db.coll("orders")
        .insert_one(doc! {"customerId": "log-c1", "storeId": "s1", "status": "new"})
        .await
        .unwrap();
    assert_eq!(c1.events(1, Duration::from_secs(10)).await.len(), 1);
    drop((c1, c2, c3, c4, c5));

    let (code, logs) = child.stop().await;
    assert_eq!(code, Some(0), "{logs}");
    // The run was logged at debug level, so a clean result means something.
    assert!(logs.lines().count() > 10, "{logs}");
    assert!(logs.contains("\"level\":\"DEBUG\""), "{logs}");
    let mut secrets: Vec<(&str, &str)> = vec![("the JWT secret", SECRET)];
    let all = [
        ("header token", good.as_str()),
        ("refresh token", refresh.as_str()),
        ("query token", query.as_str()),
        ("subprotocol token", proto.as_str()),
        ("in-band token", inband.as_str()),
        ("expired token", expired.as_str()),
        ("forged token", forged.as_str()),
        ("garbage token", garbage),
        ("Socket.IO handshake token", sio.as_str()),
    ];
    for (what, t) in &all {
        secrets.push((what, t));
        // The signature alone is as unique as the whole token.
        if let Some(sig) = t.rsplit('.').next().filter(|s| s.len() > 16) {
            secrets.push((what, sig));
        }
    }
    assert_clean(&logs, &secrets);

    // A MongoDB URI with a password for a user no server here has (mongo-sim does not do
    // SCRAM at all), so the login fails and the failure is logged: the password must not
    // be in what changecast prints.
    let password = "pw-7c4a8d09ca3762af61e59520943dc26494f8941b";
    let host = db.uri.trim_start_matches("mongodb://");
    let host = host.split(['/', '?']).next().unwrap();
    let uri = format!("mongodb://changecast:{password}@{host}/?authSource=admin");
    let child = Child::spawn(
        &config,
        &[(SECRET_ENV, SECRET), ("MONGODB_URI", uri.as_str())],
    );
    // The failed login is logged as a stream failure (and retried): wait for it, then stop.
    let t = Instant::now();
    while !child.text().contains("SCRAM") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no login failure logged: {}",
            child.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, logs) = child.stop().await;
    assert_clean(
        &logs,
        &[
            ("the MongoDB password", password),
            ("the JWT secret", SECRET),
        ],
    );
}

/// A freshly started process exports every family with its known label values at 0, so
/// dashboards read 0 rather than "no data" and alerts can tell zero from missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_process_exports_every_family_at_zero() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let m = scrape(server.app().ops_addr.unwrap()).await;
    for series in [
        "changecast_changes_read_total{collection=\"orders\",op=\"insert\"}",
        "changecast_changes_read_total{collection=\"settings\",op=\"delete\"}",
        "changecast_events_routed_total{event=\"order:status_changed\"}",
        "changecast_events_dropped_total{reason=\"no_owner_for_delete\"}",
        "changecast_connections{wire=\"native\"}",
        "changecast_connections{wire=\"socketio\"}",
        "changecast_recoveries_total{source=\"oplog\"}",
        "changecast_recoveries_total{source=\"resync\"}",
        "changecast_auth_failures_total{reason=\"expired\"}",
        "changecast_subscriptions_refused_total{reason=\"forbidden\"}",
        "changecast_client_errors_total{reason=\"rate_limited\"}",
        "changecast_replay_streams_opened_total",
        "changecast_history_lost_total",
        "changecast_slow_consumer_disconnects_total",
    ] {
        assert_eq!(
            m.get(series),
            Some(&0.0),
            "{series} missing or not 0 in {m:?}"
        );
    }
}
