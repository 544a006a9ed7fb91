//! Clients: many reconnecting clients at a steady event rate, recovery beyond the history window,
//! one client that stops reading among many, a reconnect storm served from history, and the
//! room/connection gauges back at zero and the task count back at its baseline once everyone has
//! left (changecast runs on a runtime of its own here, see `OwnRuntimeServer`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::checker::{check, Report, Seen};
use crate::support::*;
use crate::world::*;

/// What one reconnecting client saw over all its connections.
#[derive(Debug, Default)]
struct Life {
    seen: Vec<Seen>,
    /// The `since` of each connection, for diagnostics.
    sinces: Vec<Option<String>>,
    resyncs: u32,
    connections: u32,
    unexpected_closes: Vec<String>,
}

fn url_since(server: &Server, since: Option<&str>) -> String {
    match since {
        Some(s) => format!("{}?since={s}", server.ws_url()),
        None => server.ws_url(),
    }
}

/// One text message, or `None` at the deadline / on close (the close code goes to `closed`).
async fn recv(
    ws: &mut Ws,
    until: tokio::time::Instant,
    closed: &mut Option<String>,
) -> Option<Value> {
    loop {
        match tokio::time::timeout_at(until, ws.next()).await.ok()? {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => {
                *closed = Some(format!("{f:?}"));
                return None;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                *closed = Some(e.to_string());
                return None;
            }
            None => {
                *closed = Some("eof".into());
                return None;
            }
        }
    }
}

/// Connects `disconnects + 1` times, each time with `since` = the last event id seen, and
/// drops the socket without a close frame at a random point; the last connection lasts until
/// `finish` fires.
async fn reconnecting_client(
    url: String,
    token: String,
    disconnects: u32,
    life_ms: (u64, u64),
    finish: CancellationToken,
    welcomed: Arc<std::sync::atomic::AtomicUsize>,
) -> Life {
    let mut life = Life::default();
    let mut last: Option<String> = None;
    let mut round = 0;
    while round <= disconnects {
        let u = match &last {
            Some(s) => format!("{url}?since={s}"),
            None => url.clone(),
        };
        let Ok(mut c) = Client::try_connect_url(&u, Some(&token), &[]).await else {
            life.unexpected_closes.push("refused".into());
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        life.connections += 1;
        life.sinces.push(last.clone());
        let until = if round < disconnects {
            let ms = rand::Rng::gen_range(&mut rand::thread_rng(), life_ms.0..life_ms.1);
            tokio::time::Instant::now() + Duration::from_millis(ms)
        } else {
            tokio::time::Instant::now() + Duration::from_secs(3600)
        };
        let mut closed = None;
        loop {
            let msg = tokio::select! {
                m = recv(&mut c.ws, until, &mut closed) => m,
                _ = finish.cancelled(), if round == disconnects => None,
            };
            let Some(v) = msg else { break };
            match v["type"].as_str() {
                Some("event") => {
                    if let Some(s) = Seen::from_message(&v) {
                        last = Some(s.wire.clone());
                        life.seen.push(s);
                    }
                }
                Some("welcome") => {
                    if life.connections == 1 {
                        welcomed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    // Before the first event, the welcome's position is the recovery point.
                    if last.is_none() {
                        last = v["position"].as_str().map(str::to_owned);
                    }
                }
                Some("resync") => life.resyncs += 1,
                _ => {}
            }
        }
        if let Some(why) = closed {
            life.unexpected_closes.push(why);
        } else {
            round += 1;
        }
        // Dropped without a close frame: the server sees the TCP connection go away.
        drop(c);
    }
    life
}

/// Waits until `/metrics` shows no rooms, no native connections and no more changecast tasks
/// than `server` had before any client connected. The server runs on its own runtime, so the
/// task gauge counts changecast's tasks only (one per open socket, plus the scrape being served),
/// never the test's clients or mongo-sim. No tolerance: every fast run measured the baseline
/// exactly; fewer would mean a start-up task still running at the baseline, not a leak.
async fn leak_check(server: &OwnRuntimeServer, label: &str) {
    let rooms = wait_metric(server, "changecast_rooms", 0.0, Duration::from_secs(10)).await;
    let conns = wait_metric(
        server,
        "changecast_connections{wire=\"native\"}",
        0.0,
        Duration::from_secs(10),
    )
    .await;
    let before = server.tasks_at_start;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let tasks = loop {
        let v = metric(&metrics(server).await, "changecast_runtime_tasks");
        if v <= before || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    figure(
        &format!("leaks.{label}"),
        format!(
            "after all clients left: rooms {rooms}, connections {conns}; changecast tasks {before} before the clients → {tasks} after"
        ),
    );
    assert_eq!(rooms, 0.0, "rooms gauge after everyone left");
    assert_eq!(conns, 0.0, "connections gauge after everyone left");
    assert!(before > 0.0, "no changecast_runtime_tasks at the start");
    assert!(
        tasks <= before,
        "changecast tasks {tasks} after everyone left, {before} before the clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_clients_inside_the_history_window_miss_nothing() {
    let clients = size("CLIENTS", 100, 1_000) as usize;
    let disconnects = size("DISCONNECTS", 5, 20) as u32;
    let rate = size("EVENT_RATE", 100, 100) as u32;
    let secs = size("CLIENT_SECS", 6, 60);
    let db = Arc::new(Db::start().await);
    let customers = clients / 2;
    let work = Workload::new(customers, 20, customers * 2);
    work.seed(&db).await;
    let server = OwnRuntimeServer::start(&db, "[server]\nmax_connections_per_subject = 20\n").await;
    // The reference: one admin that never disconnects sees every change's id.
    let reference = Observer::spawn(Client::connect(&server, &admin_token()).await.0);
    let finish = CancellationToken::new();
    let life_ms = (100, (secs * 1000 / u64::from(disconnects + 1)).max(200));
    let welcomed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let c = work.customers[i % customers].clone();
        tasks.push((
            c.clone(),
            tokio::spawn(reconnecting_client(
                server.ws_url(),
                customer_token(&c),
                disconnects,
                life_ms,
                finish.clone(),
                welcomed.clone(),
            )),
        ));
    }
    // A client is owed the changes after its first join: write once everyone has joined.
    let deadline = Instant::now() + Duration::from_secs(60);
    while welcomed.load(std::sync::atomic::Ordering::SeqCst) < clients {
        assert!(Instant::now() < deadline, "clients never all connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let warm = {
        let (db, work) = (db.clone(), work.clone());
        tokio::spawn(async move {
            work.write_n(&db, 0, secs * u64::from(rate), Some(rate))
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_warm = rss_kb();
    warm.await.unwrap();
    let wrote_for = started.elapsed();
    // Let the clients finish their disconnects and catch up with the last writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settle = Instant::now() + Duration::from_secs(if full() { 120 } else { 30 });
    let ledger = work.ledger();
    loop {
        let done = tasks.iter().all(|(_, t)| t.is_finished());
        if done || Instant::now() > settle {
            break;
        }
        // The last connection of each client stays until told; give it time to drain.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if started.elapsed() > wrote_for + Duration::from_secs(5) {
            finish.cancel();
        }
    }
    finish.cancel();
    let mut total = Report::default();
    let (mut resyncs, mut conns, mut odd) = (0, 0, Vec::new());
    for (c, t) in tasks {
        let life = t.await.unwrap();
        let r = check(
            &ledger,
            work.customer_keys(&c),
            std::slice::from_ref(&life.seen),
        );
        if r.missing > 0 && odd.len() < 3 {
            let must = work.customer_keys(&c);
            let got: std::collections::HashSet<&str> =
                life.seen.iter().map(|s| s.id.as_str()).collect();
            let lost: Vec<String> = reference
                .seen()
                .iter()
                .filter(|s| must(&s.key) && !got.contains(s.id.as_str()))
                .map(|s| s.id.clone())
                .collect();
            eprintln!(
                "client of {c}: missing {lost:?}; connections since {:?}; seen {:?}",
                life.sinces,
                life.seen.iter().map(|s| &s.id).collect::<Vec<_>>()
            );
            odd.push(format!("missing for {c}"));
        }
        total.add(&r);
        resyncs += life.resyncs;
        conns += life.connections;
        odd.extend(life.unexpected_closes);
    }
    figure(
        "clients.reconnect_in_window",
        format!(
            "{clients} clients × {disconnects} forced disconnects ({conns} connections), {} changes at {rate}/s: {}; resyncs {resyncs}; unexpected closes {}",
            ledger.total(|_| true),
            total.line(),
            odd.len()
        ),
    );
    figure(
        "leaks.rss",
        format!(
            "test process (server and {clients} clients) RSS after 2s warm-up {:?} kB, at the end {:?} kB over {secs}s",
            rss_warm,
            rss_kb()
        ),
    );
    assert!(
        odd.is_empty(),
        "unexpected closes: {:?}",
        &odd[..odd.len().min(5)]
    );
    assert_eq!(
        total.missing + total.duplicated + total.inversions + total.cross_room,
        0,
        "{}",
        total.line()
    );
    assert_eq!(resyncs, 0);
    drop(reference);
    leak_check(&server, "reconnect_in_window").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_history_window_clients_get_resync_and_no_partial_replay() {
    if external() {
        eprintln!("SKIP beyond_the_history_window_clients_get_resync_and_no_partial_replay: needs mongo-sim's oplog size");
        return;
    }
    const OPLOG: usize = 300;
    let db = Db::start_with(mongo_sim::SimConfig {
        oplog_size: OPLOG,
        ..Default::default()
    })
    .await;
    let work = Workload::new(4, 2, 8);
    work.seed(&db).await;
    let server = OwnRuntimeServer::start(&db, "[hub]\nhistory_len = 20\n").await;
    let c0 = work.customers[0].clone();
    let token = customer_token(&c0);
    let must = work.customer_keys(&c0);

    // Live: learn the last id.
    let obs = Observer::spawn(Client::connect(&server, &token).await.0);
    work.write_n(&db, 0, 20, None).await;
    let want = work.ledger().total(&must);
    assert!(
        obs.wait(Duration::from_secs(10), |s| distinct(s) >= want)
            .await
    );
    let mut seen = obs.seen();
    drop(obs);
    let last = seen.last().unwrap().wire.clone();

    // Beyond the hub's history, inside the oplog: recovered exactly from the oplog.
    let oplog_before = metric(
        &metrics(&server).await,
        "changecast_recoveries_total{source=\"oplog\"}",
    );
    work.write_n(&db, 20, 100, None).await;
    let want = work.ledger().total(&must);
    // Only once the worker has read the writes is `last` out of the hub's history (20): a
    // client that came sooner would be served from history, not the oplog. Every write is one
    // change read and the stream started after the seed, so the worker has read them all when
    // `changes_read` reaches the ledger's total (the last one is published right after).
    let written = work.ledger().total(|_| true) as f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = metric(&metrics(&server).await, "changecast_changes_read_total");
        if read >= written {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker read {read} of {written} changes in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (c, _) = connect_url(&url_since(&server, Some(&last)), &token).await;
    let obs = Observer::spawn(c);
    let recovered = obs
        .wait(Duration::from_secs(10), |s| {
            distinct(s) + distinct(&seen) >= want
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    seen.extend(obs.seen());
    let r = check(&work.ledger(), &must, &[seen.clone()]);
    let oplog_used = metric(
        &metrics(&server).await,
        "changecast_recoveries_total{source=\"oplog\"}",
    ) - oplog_before;
    drop(obs);
    let last = seen.last().unwrap().wire.clone();

    // Beyond the oplog too: an explicit resync and nothing replayed.
    work.write_n(&db, 120, OPLOG as u64 * 2, None).await;
    // Wait until the worker has read everything, so the client's since is the only thing that is old.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut head = server.app().hub.head();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = server.app().hub.head();
        if now == head || Instant::now() > deadline {
            break;
        }
        head = now;
    }
    let (c, _) = connect_url(&url_since(&server, Some(&last)), &token).await;
    let obs = Observer::spawn(c);
    let told = obs
        .wait(Duration::from_secs(10), |_| {
            obs.other
                .lock()
                .unwrap()
                .iter()
                .any(|m| m["type"] == "resync")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let partial = obs.seen().len();
    // Live service goes on after the resync.
    let before = work.ledger().total(&must);
    work.write_n(&db, 10_000, 10, None).await;
    let live_want = work.ledger().total(&must) - before;
    let live = obs
        .wait(Duration::from_secs(10), |s| {
            distinct(s) >= live_want + partial as u64
        })
        .await;
    figure(
        "clients.beyond_history",
        format!(
            "beyond the hub history (20), inside the oplog: recovered from the oplog ({oplog_used} oplog recoveries), {}; beyond the oplog ({OPLOG}): resync sent {told}, events replayed before live {partial}, live afterwards {live}",
            r.line()
        ),
    );
    assert!(recovered);
    assert_eq!(
        r.missing + r.duplicated + r.inversions + r.cross_room,
        0,
        "{}",
        r.line()
    );
    assert_eq!(oplog_used, 1.0);
    assert!(told, "no resync beyond the oplog");
    assert_eq!(partial, 0, "a partial replay before the resync");
    assert!(live);
    drop(obs);
    leak_check(&server, "beyond_history").await;
}

async fn connect_url(url: &str, token: &str) -> (Client, Value) {
    let mut c = Client::try_connect_url(url, Some(token), &[])
        .await
        .expect("connect");
    let w = c.next_json().await;
    assert_eq!(w["type"], "welcome", "{w}");
    (c, w)
}

/// Connects as a real client would: a connection reset (the listen backlog overflowing under a
/// storm) is retried after a short random pause. Returns the client (welcome read) and the retries.
async fn connect_retrying(url: &str, token: &str) -> (Client, u32) {
    let mut retries = 0;
    loop {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                let mut c = Client { ws };
                let w = c.next_json().await;
                assert_eq!(w["type"], "welcome", "{w}");
                return (c, retries);
            }
            Err(tokio_tungstenite::tungstenite::Error::Io(e)) if retries < 10 => {
                eprintln!("storm connect: {e}; retrying");
                retries += 1;
                pause(50, 300).await;
            }
            Err(e) => panic!("connect failed after {retries} retries: {e}"),
        }
    }
}

/// A client with a small receive buffer that reads its welcome and then nothing.
async fn stalled_client(server: &Server, token: &str) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(server.addr).await.unwrap();
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let w = ws.next().await.unwrap().unwrap();
    assert!(w.to_text().unwrap().contains("welcome"));
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_the_others_miss_nothing() {
    let others = size("SLOW_OTHERS", 50, 1_000) as usize;
    let db = Arc::new(Db::start().await);
    let customers = (others / 2).max(1);
    let work = Workload::new(customers, 5, customers);
    work.seed(&db).await;
    let server = OwnRuntimeServer::start(&db, "[hub]\nmailbox_capacity = 64\n").await;
    let mut obs = Vec::new();
    for i in 0..others {
        let c = &work.customers[i % customers];
        obs.push((
            c.clone(),
            Observer::spawn(Client::connect(&server, &customer_token(c)).await.0),
        ));
    }
    let admin = Observer::spawn(Client::connect(&server, &admin_token()).await.0);

    // The same paced changes twice: first with everyone reading (the baseline), then with one
    // admin that has stopped reading; its socket buffers fill, then its mailbox. The big field
    // (`notes`) is store/admin-only, so customers get small payloads and their latency measures
    // the server, not this machine's JSON throughput.
    let big = "x".repeat(32 * 1024);
    let rate = 100u32;
    let mut seq = 0u64;
    let write_big = |seq: u64| {
        let o = work.orders[(seq as usize) % work.orders.len()].clone();
        let (db, ledger, big) = (db.clone(), work.ledger.clone(), big.clone());
        async move {
            db.coll("orders")
                .update_one(
                    bson::doc! {"_id": o.id},
                    bson::doc! {"$set": {"total": seq as i64, "notes": big}},
                )
                .await
                .unwrap();
            ledger
                .lock()
                .unwrap()
                .ack(&format!("order/{}", o.id.to_hex()));
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let baseline_n = 300;
    while seq < baseline_n {
        tick.tick().await;
        write_big(seq).await;
        seq += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut base: Vec<f64> = obs
        .iter()
        .flat_map(|(_, o)| o.latency.lock().unwrap().clone())
        .collect();
    let base_p99 = percentile(&mut base, 0.99);
    for (_, o) in &obs {
        o.latency.lock().unwrap().clear();
    }
    let slow = stalled_client(&server, &admin_token()).await;
    let conns_before = metric(
        &metrics(&server).await,
        "changecast_connections{wire=\"native\"}",
    );
    let started = Instant::now();
    let (mut kicked_at, mut cut_at) = (None, None);
    while cut_at.is_none() && started.elapsed() < Duration::from_secs(40) {
        tick.tick().await;
        write_big(seq).await;
        seq += 1;
        if seq % 10 == 0 {
            let m = metrics(&server).await;
            if kicked_at.is_none()
                && metric(&m, "changecast_slow_consumer_disconnects_total") >= 1.0
            {
                kicked_at = Some(started.elapsed());
            }
            if metric(&m, "changecast_connections{wire=\"native\"}") < conns_before {
                cut_at = Some(started.elapsed());
            }
        }
    }
    // As many again after the cut, so the others' latency covers the whole episode.
    let extra = seq - baseline_n;
    for _ in 0..extra.min(baseline_n) {
        tick.tick().await;
        write_big(seq).await;
        seq += 1;
    }
    let ledger = work.ledger();
    let all = ledger.total(|_| true);
    let caught = admin
        .wait(Duration::from_secs(30), |s| distinct(s) >= all)
        .await;
    let mut total = check(&ledger, |_| true, &[admin.seen()]);
    for (c, o) in &obs {
        let want = ledger.total(work.customer_keys(c));
        o.wait(Duration::from_secs(10), |s| distinct(s) >= want)
            .await;
        total.add(&check(&ledger, work.customer_keys(c), &[o.seen()]));
    }
    let mut during: Vec<f64> = obs
        .iter()
        .flat_map(|(_, o)| o.latency.lock().unwrap().clone())
        .collect();
    let p99 = percentile(&mut during, 0.99);
    let cut_delay = match (kicked_at, cut_at) {
        (Some(k), Some(c)) => format!("{:.2}s", c.saturating_sub(k).as_secs_f64()),
        _ => "n/a".into(),
    };
    figure(
        "clients.slow_consumer",
        format!(
            "1 stalled client among {} (mailbox 64, changes with 32 KB of admin-only notes at {rate}/s): kicked {:?} after the big writes began, connection closed {:?}, {cut_delay} from kick to close; others {}; others' p99 latency {p99:.0} ms vs baseline {base_p99:.0} ms",
            others + 1,
            kicked_at.map(|d| format!("{:.1}s", d.as_secs_f64())),
            cut_at.map(|d| format!("{:.1}s", d.as_secs_f64())),
            total.line()
        ),
    );
    drop(slow);
    assert!(cut_at.is_some(), "the stalled client was never cut off");
    assert!(caught);
    assert_eq!(
        total.missing + total.duplicated + total.inversions + total.cross_room,
        0,
        "{}",
        total.line()
    );
    drop(obs);
    drop(admin);
    leak_check(&server, "slow_consumer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_served_from_history_without_a_query_per_client() {
    // 9,000 at full size: each client holds two descriptors in this one process (its socket
    // and the server's), and the limit here is 20,000.
    let n = size("STORM_CLIENTS", 300, 9_000) as usize;
    let db = Arc::new(Db::start().await);
    let customers = (n / 10).max(1);
    let work = Workload::new(customers, 10, customers);
    work.seed(&db).await;
    let server = OwnRuntimeServer::start(
        &db,
        &format!("[server]\nmax_connections = {}\n", n * 2 + 100),
    )
    .await;
    // Every client first sees one change of its customer, so it has a `since`.
    let mut clients = Vec::new();
    for i in 0..n {
        let c = work.customers[i % customers].clone();
        let (cl, _) = Client::connect(&server, &customer_token(&c)).await;
        clients.push((c, cl));
    }
    let orders = work.orders.clone();
    for (i, o) in orders.iter().enumerate() {
        db.coll("orders")
            .update_one(
                bson::doc! {"_id": o.id},
                bson::doc! {"$set": {"total": -1000 - i as i64}},
            )
            .await
            .unwrap();
        work.ledger
            .lock()
            .unwrap()
            .ack(&format!("order/{}", o.id.to_hex()));
    }
    let mut since = Vec::new();
    for (c, cl) in &mut clients {
        let ev = cl.events(1, Duration::from_secs(20)).await;
        assert_eq!(ev.len(), 1, "client of {c} got no first event");
        since.push((c.clone(), Seen::from_message(&ev[0]).unwrap()));
    }
    drop(clients);
    wait_metric(
        &server,
        "changecast_connections{wire=\"native\"}",
        0.0,
        Duration::from_secs(20),
    )
    .await;
    // Missed while away.
    work.write_n(&db, 0, (customers * 4) as u64, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m0 = metrics(&server).await;
    let (h0, o0) = (
        metric(&m0, "changecast_recoveries_total{source=\"history\"}"),
        metric(&m0, "changecast_recoveries_total{source=\"oplog\"}"),
    );
    let ledger = work.ledger();
    let started = Instant::now();
    let spread = Duration::from_secs(if full() { 5 } else { 2 });
    let mut tasks = Vec::new();
    for (i, (c, first)) in since.into_iter().enumerate() {
        let url = url_since(&server, Some(&first.wire));
        let token = customer_token(&c);
        let delay = spread.mul_f64(i as f64 / n as f64);
        let ledger = ledger.clone();
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let began = Instant::now();
            let (mut cl, retries) = connect_retrying(&url, &token).await;
            let must = work.customer_keys(&c);
            let want = ledger.total(&must) - 1;
            let evs = cl.events(want as usize, Duration::from_secs(60)).await;
            let took = (started.elapsed(), began.elapsed());
            // Anything more within a short quiet period would be a duplicate.
            let extra = cl.events(1, Duration::from_millis(200)).await;
            let mut seen = vec![first];
            seen.extend(
                evs.iter()
                    .chain(extra.iter())
                    .filter_map(Seen::from_message),
            );
            let r = check(&ledger, &must, &[seen]);
            let _ = cl.ws.close(None).await;
            (r, took, retries)
        }));
    }
    let mut total = Report::default();
    let (mut took_s, mut own_s) = (Vec::new(), Vec::new());
    let mut retried = 0;
    for t in tasks {
        let (r, (took, own), retries) = t.await.unwrap();
        total.add(&r);
        took_s.push(took.as_secs_f64());
        own_s.push(own.as_secs_f64());
        retried += retries;
    }
    let (p50, p99, slowest) = (
        percentile(&mut took_s, 0.5),
        percentile(&mut took_s, 0.99),
        percentile(&mut took_s, 1.0),
    );
    let (own50, own99, own_max) = (
        percentile(&mut own_s, 0.5),
        percentile(&mut own_s, 0.99),
        percentile(&mut own_s, 1.0),
    );
    let m1 = metrics(&server).await;
    let history = metric(&m1, "changecast_recoveries_total{source=\"history\"}") - h0;
    let oplog = metric(&m1, "changecast_recoveries_total{source=\"oplog\"}") - o0;
    figure(
        "clients.reconnect_storm",
        format!(
            "{n} clients reconnecting within {:.0}s: each recovered p50 {own50:.2}s, p99 {own99:.2}s, slowest {own_max:.2}s after its own reconnect; from the storm's start p50 {p50:.1}s, p99 {p99:.1}s, all {slowest:.1}s ({} build, server and clients in one process, {} cores); connects reset at the TCP level and retried {retried}; recoveries from history {history}, from the oplog {oplog}; {}",
            spread.as_secs_f64(),
            build_profile(),
            cores(),
            total.line()
        ),
    );
    assert_eq!(history, n as f64);
    assert_eq!(oplog, 0.0, "a reconnect went to MongoDB");
    assert_eq!(
        total.missing + total.duplicated + total.inversions + total.cross_room,
        0,
        "{}",
        total.line()
    );
    leak_check(&server, "reconnect_storm").await;
}
