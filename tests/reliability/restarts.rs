//! Restarts and replica moves under a reconnect storm (issue 13): every client of a process
//! comes back at once with its `since` after a clean restart, after a SIGKILL (a real
//! `changecast run` child process killed with SIGKILL), and after its replica went away (to a
//! second replica that watched the same database all along). Owed events arrive exactly once,
//! nothing is missed, nobody is told to resync, and MongoDB sees at most a couple of replay
//! streams instead of one query per client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::doc;
use bson::oid::ObjectId;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::checker::{check, Ledger, Report, Seen};
use crate::support::*;
use crate::world::*;

/// `checkpoint.every_events` of the test config (support::config): the kill's repeat window.
const WINDOW: u64 = 100;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Move {
    /// Graceful stop, restart on the same checkpoint.
    Clean,
    /// SIGKILL of a `changecast run` process, restart (in-process) on its checkpoint file.
    Kill,
    /// Replica A stops; its clients move to replica B, which watched the database all along.
    Replica,
}

impl Move {
    fn label(self) -> &'static str {
        match self {
            Move::Clean => "clean_restart",
            Move::Kill => "sigkill_restart",
            Move::Replica => "replica_move",
        }
    }
}

/// One client's wire: native `/ws`, or Socket.IO over the Engine.IO websocket transport.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wire {
    Native,
    Sio,
}

/// What a client read off its socket.
enum Got {
    Event(Seen),
    Resync,
    Other,
}

struct Conn {
    ws: Ws,
    wire: Wire,
    room: String,
}

impl Conn {
    /// Connects (retrying a connection reset by an overflowing backlog), authenticates with
    /// `since`, and returns the welcome's `position` and the retries.
    async fn open(
        wire: Wire,
        addr: SocketAddr,
        customer: &str,
        since: Option<&str>,
    ) -> (Conn, Option<String>, u32) {
        let token = customer_token(customer);
        let url = match (wire, since) {
            (Wire::Native, Some(s)) => format!("ws://{addr}/ws?since={s}"),
            (Wire::Native, None) => format!("ws://{addr}/ws"),
            (Wire::Sio, _) => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
        };
        let mut retries = 0;
        let ws = loop {
            let mut req = url.as_str().into_client_request().unwrap();
            if wire == Wire::Native {
                req.headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            match tokio_tungstenite::connect_async(req).await {
                Ok((ws, _)) => break ws,
                Err(e) if retries < 100 => {
                    if retries == 0 {
                        eprintln!("restart storm connect: {e}; retrying");
                    }
                    retries += 1;
                    pause(50, 300).await;
                }
                Err(e) => panic!("connect failed after {retries} retries: {e}"),
            }
        };
        let mut c = Conn {
            ws,
            wire,
            room: format!("customer:{customer}"),
        };
        if wire == Wire::Sio {
            let open = c.frame(Duration::from_secs(20)).await.expect("EIO open");
            assert!(open.starts_with('0'), "{open}");
            let mut auth = json!({ "token": token });
            if let Some(s) = since {
                auth["since"] = json!(s);
            }
            c.ws.send(Message::Text(format!("40{auth}").into()))
                .await
                .unwrap();
            let ok = c.frame(Duration::from_secs(20)).await.expect("SIO connect");
            assert!(ok.starts_with("40"), "{ok}");
        }
        // The welcome comes first on both wires.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let welcome = c.raw(deadline).await.expect("no welcome within 30 s");
        let position = match wire {
            Wire::Native => {
                assert_eq!(welcome["type"], "welcome", "{welcome}");
                welcome["position"].as_str().map(str::to_owned)
            }
            Wire::Sio => {
                assert_eq!(welcome[0], "welcome", "{welcome}");
                welcome[1]["position"].as_str().map(str::to_owned)
            }
        };
        (c, position, retries)
    }

    /// The next Engine.IO text frame (pings answered), `None` on close or timeout.
    async fn frame(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?
            {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    let _ = self.ws.send(Message::Text("3".into())).await;
                }
                Some(Ok(Message::Text(t))) => return Some(t.as_str().to_owned()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// The next message as JSON: a native message, or a Socket.IO event's `[name, args…]`.
    async fn raw(&mut self, until: tokio::time::Instant) -> Option<Value> {
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.wire {
                Wire::Native => match tokio::time::timeout(left, self.ws.next()).await.ok()?? {
                    Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                },
                Wire::Sio => {
                    let f = self.frame(left).await?;
                    if let Some(ev) = f.strip_prefix("42") {
                        return Some(serde_json::from_str(ev).unwrap());
                    }
                    if f == "41" || f == "1" {
                        return None;
                    }
                }
            }
        }
    }

    async fn next(&mut self, until: tokio::time::Instant) -> Option<Got> {
        let v = self.raw(until).await?;
        Some(match self.wire {
            Wire::Native => match v["type"].as_str() {
                Some("event") => Seen::from_message(&v).map_or(Got::Other, Got::Event),
                Some("resync") => Got::Resync,
                _ => Got::Other,
            },
            Wire::Sio => match v[0].as_str() {
                Some("resync") => Got::Resync,
                // One change can go out under several names (legacy aliases): only the
                // canonical `kind:action` names map to a document key.
                Some(name) => match v[2].as_str() {
                    Some(id) => {
                        Seen::from_event(name, &self.room, id, &v[1]).map_or(Got::Other, Got::Event)
                    }
                    None => Got::Other,
                },
                None => Got::Other,
            },
        })
    }
}

/// One client of the storm.
struct Member {
    customer: String,
    wire: Wire,
    owed: bool,
    /// What reached it from the first process.
    before: Vec<Seen>,
    since: Option<String>,
}

/// Inserts an order of `customer`, records it in the ledger; the order's key.
async fn order_for(db: &Db, ledger: &mut Ledger, customer: &str) -> String {
    let id = ObjectId::new();
    let key = format!("order/{}", id.to_hex());
    ledger.own(&key, &[format!("customer:{customer}")]);
    db.coll("orders")
        .insert_one(doc! {"_id": id, "customerId": customer, "storeId": "s1", "status": "new", "total": 1i64})
        .await
        .unwrap();
    ledger.ack(&key);
    key
}

/// Waits until the process behind `ops` has read `n` changes from its stream.
async fn wait_read(ops: SocketAddr, n: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let read = metric(
            &http_get(ops, "/metrics").await.1,
            "changecast_changes_read_total",
        );
        if read >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "read {read} of {n} changes within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `GET /readyz` on `ops` answers 200.
async fn wait_readyz(ops: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ok = tokio::net::TcpStream::connect(ops).await.is_ok()
            && http_get(ops, "/readyz").await.0 == 200;
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "never ready within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `changecast run` as a child process on `db`, checkpointing into `dir` as support::config does.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
    ops: SocketAddr,
}

async fn spawn_child(
    db: &Db,
    dir: &std::path::Path,
    max_connections: usize,
    interval: &str,
) -> Child {
    let (addr, ops) = (free_port(), free_port());
    let cfg = dir.join("child.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[mongodb]
uri = "{uri}"
databases = ["{db}"]
connect_timeout = "5s"

[checkpoint]
store = "file"
path = "{cp}"
interval = "{interval}"
every_events = {WINDOW}

[auth]
algorithms = ["HS256"]
secret_env = "{env}"

[server]
listen = "{addr}"
ops_listen = "{ops}"
max_connections = {max_connections}
max_unauthenticated_per_ip = 0
"#,
            uri = db.uri,
            db = db.name,
            cp = dir.join("checkpoint.json").display(),
            env = SECRET_ENV,
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env(SECRET_ENV, SECRET)
        .env("CHANGECAST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = Child { child, addr, ops };
    wait_readyz(ops, Duration::from_secs(30)).await;
    c
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts changecast in-process on `dir`'s checkpoint; the server and when `/readyz` said yes.
async fn start_polled(db: &Db, extra: &str, dir: tempfile::TempDir) -> (Server, Instant, Duration) {
    let cfg = config(db, &dir.path().join("checkpoint.json"), extra);
    let started = Instant::now();
    let handle = changecast::app::start(&cfg, Default::default(), listeners().await, None)
        .await
        .expect("start changecast");
    let server = Server::new(handle, dir);
    let ops = server.app().ops_addr.unwrap();
    wait_readyz(ops, Duration::from_secs(30)).await;
    let ready = Instant::now();
    (server, ready, ready - started)
}

/// What one returning client saw.
struct Back {
    seen: Vec<Seen>,
    resyncs: u32,
    retries: u32,
    /// From ready (or the move) to its last owed event, s.
    owed_after: Option<f64>,
    /// From ready (or the move) to its welcome, s.
    welcomed_after: f64,
    /// From ready (or the move) to the end of its quiet period, s.
    done_after: f64,
}

/// `short_history`: the restarted process keeps 10 events of history, so every return
/// goes past it to the oplog (the shared replay scheduler under a restart storm).
async fn storm(kind: Move, short_history: bool) {
    let n = size("RESTART_CLIENTS", 300, 9_000) as usize;
    let others = size("RESTART_OTHER_WRITES", 1_000, 10_000);
    let sio_share = size("RESTART_SIO_PERCENT", 10, 10) as usize;
    let db = Db::start().await;
    // History long enough for everything written while the clients are away (the default
    // 10,000 events is less than a full-size run writes; past it every client goes to the
    // oplog, which the `short_history` variant measures on purpose).
    let history_len = (others as usize + 3 * n / 10 + 2 * WINDOW as usize + 1_000).max(10_000);
    // Every client here comes from 127.0.0.1, as behind a proxy: the per-address cap on
    // sockets awaiting their token is off, as config.example.toml advises there (with it,
    // the Socket.IO clients, whose token comes after the handshake, got 429 and retried).
    let extra = format!(
        "[server]\nmax_connections = {}\nmax_unauthenticated_per_ip = 0\n[hub]\nhistory_len = {history_len}\n",
        n + 100
    );
    let mut ledger = Ledger::default();

    // The first process (A), and for a move the replica B that stays.
    let a_dir = tempfile::tempdir().unwrap();
    let mut kept: Option<tempfile::TempDir> = None;
    let mut child = None;
    let mut a = None;
    let mut b = None;
    let a_addr = match kind {
        Move::Kill => {
            // Saves by count only (every WINDOW events; no timer within the test), so the
            // kill lands with a known unsaved window: the worst a SIGKILL can do.
            let c = spawn_child(&db, a_dir.path(), n + 100, "1h").await;
            let addr = c.addr;
            child = Some(c);
            kept = Some(a_dir);
            addr
        }
        Move::Clean | Move::Replica => {
            let s = Server::start_in(&db, &extra, a_dir, Default::default()).await;
            let addr = s.addr;
            a = Some(s);
            addr
        }
    };
    let a_ops = match (&child, &a) {
        (Some(c), _) => c.ops,
        (_, Some(s)) => s.app().ops_addr.unwrap(),
        _ => unreachable!(),
    };
    if kind == Move::Replica {
        b = Some(Server::start(&db, &extra).await);
    }
    // Traffic before the clients come: one change both replicas read (so welcome positions
    // are event ids, not stream starts); for the kill, one and a half checkpoint windows, so
    // the checkpoint sits on the WINDOW-th event and everything after it is unsaved.
    let before = if kind == Move::Kill {
        // Off the save step (every WINDOW / 2 events), so the owed events that follow do
        // not end exactly on a save either: a fast writer then still leaves a few unsaved.
        WINDOW + WINDOW / 2 + 7
    } else {
        1
    };
    for _ in 0..before {
        order_for(&db, &mut ledger, "nobody").await;
    }
    wait_read(a_ops, before as f64, Duration::from_secs(10)).await;
    if let Some(b) = &b {
        wait_read(
            b.app().ops_addr.unwrap(),
            before as f64,
            Duration::from_secs(10),
        )
        .await;
    }

    // Everyone connects to A; one in ten is owed (one event now, two while A is away).
    let mut members = Vec::new();
    let mut conns = Vec::new();
    for i in 0..n {
        let wire = if sio_share > 0 && (i / 10) % (100 / sio_share) == 0 {
            Wire::Sio
        } else {
            Wire::Native
        };
        let customer = format!("r{i}");
        let (c, position, _) = Conn::open(wire, a_addr, &customer, None).await;
        members.push(Member {
            customer,
            wire,
            owed: i % 10 == 0,
            before: Vec::new(),
            since: position,
        });
        conns.push(c);
    }
    for m in members.iter().filter(|m| m.owed) {
        order_for(&db, &mut ledger, &m.customer).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (m, c) in members.iter_mut().zip(conns.iter_mut()) {
        if !m.owed {
            continue;
        }
        loop {
            match c.next(deadline).await {
                Some(Got::Event(s)) => {
                    m.since = Some(s.wire.clone());
                    m.before.push(s);
                    break;
                }
                Some(_) => {}
                None => panic!("client of {} got no event before the stop", m.customer),
            }
        }
    }
    let owed = members.iter().filter(|m| m.owed).count();
    let sio = members.iter().filter(|m| m.wire == Wire::Sio).count();

    if kind == Move::Clean {
        // The last thing the stream passed is no event of ours: a change in a collection
        // changecast does not watch (as against MongoDB an idle stream's token moves on).
        db.coll("audit")
            .insert_one(doc! {"what": "unrelated"})
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // A goes away.
    let stopping = Instant::now();
    match kind {
        Move::Kill => {
            // With an unsaved window: a fast checkpoint writer may have saved the last owed
            // event already (release builds did, every run), so one more change is written
            // until one is read and not saved (the checkpoint file unchanged after A read
            // it); a save comes only every WINDOW / 2 changes, so two tries suffice.
            let mut c = child.take().unwrap();
            let cp_path = kept.as_ref().unwrap().path().join("checkpoint.json");
            let mut unsaved = false;
            for _ in 0..3 {
                let saved = std::fs::read_to_string(&cp_path).unwrap_or_default();
                let read = metric(
                    &http_get(c.ops, "/metrics").await.1,
                    "changecast_changes_read_total",
                );
                order_for(&db, &mut ledger, "nobody").await;
                wait_read(c.ops, read + 1.0, Duration::from_secs(10)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                if std::fs::read_to_string(&cp_path).unwrap_or_default() == saved {
                    unsaved = true;
                    break;
                }
            }
            assert!(unsaved, "every change was saved at once, three times");
            signal(&c.child, "-KILL");
            c.child.wait().unwrap();
            drop(conns);
        }
        Move::Clean | Move::Replica => {
            drop(conns);
            let mut s = a.take().unwrap();
            let dir = std::mem::replace(&mut s.dir, tempfile::tempdir().unwrap());
            s.stop().await.unwrap();
            kept = Some(dir);
        }
    }
    let stop_took = stopping.elapsed();

    // While A is away: two more events for each owed client, many for other customers.
    for m in members.iter().filter(|m| m.owed) {
        order_for(&db, &mut ledger, &m.customer).await;
        order_for(&db, &mut ledger, &m.customer).await;
    }
    for k in 0..others {
        order_for(&db, &mut ledger, &format!("elsewhere{}", k % 50)).await;
    }

    // Back: the restarted process on A's checkpoint, or replica B.
    let (server, t0, start_to_ready) = match kind {
        Move::Clean | Move::Kill => {
            let extra = if short_history {
                extra.replace(&format!("history_len = {history_len}"), "history_len = 10")
            } else {
                extra.clone()
            };
            start_polled(&db, &extra, kept.take().unwrap()).await
        }
        Move::Replica => (b.take().unwrap(), Instant::now(), Duration::ZERO),
    };
    let m0 = metrics(&server).await;
    let opened0 = metric(&m0, "changecast_replay_streams_opened_total");
    // The server's own count too (mongo-sim only): every change stream opened from here
    // on, by anyone, is a recovery's.
    let sim_opened0 = db.sim.as_ref().map(|s| s.change_streams_opened());
    let rec0 =
        |m: &str, s: &str| metric(m, &format!("changecast_recoveries_total{{source=\"{s}\"}}"));
    let (h0, o0, r0) = (
        rec0(&m0, "history"),
        rec0(&m0, "oplog"),
        rec0(&m0, "resync"),
    );
    let ledger = Arc::new(ledger);
    let mut tasks = Vec::new();
    for m in &members {
        let (wire, addr, customer, since, want) = (
            m.wire,
            server.addr,
            m.customer.clone(),
            m.since.clone(),
            if m.owed { 2 } else { 0 },
        );
        tasks.push(tokio::spawn(async move {
            let (mut c, _, retries) = Conn::open(wire, addr, &customer, since.as_deref()).await;
            let mut back = Back {
                seen: Vec::new(),
                resyncs: 0,
                retries,
                owed_after: None,
                welcomed_after: t0.elapsed().as_secs_f64(),
                done_after: 0.0,
            };
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut fresh = 0;
            // The owed events, then a quiet period in which anything more is a duplicate.
            while fresh < want {
                match c.next(until).await {
                    Some(Got::Event(s)) => {
                        back.seen.push(s);
                        fresh += 1;
                    }
                    Some(Got::Resync) => back.resyncs += 1,
                    Some(Got::Other) => {}
                    None => break,
                }
            }
            if want > 0 {
                back.owed_after = Some(t0.elapsed().as_secs_f64());
            }
            let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Some(g) = c.next(quiet).await {
                match g {
                    Got::Event(s) => back.seen.push(s),
                    Got::Resync => back.resyncs += 1,
                    Got::Other => {}
                }
            }
            back.done_after = t0.elapsed().as_secs_f64();
            back
        }));
    }
    let mut backs = Vec::new();
    for t in tasks {
        backs.push(t.await.unwrap());
    }
    let took = backs.iter().map(|b| b.done_after).fold(0.0, f64::max);
    // The ledger cut per room once (checking each client against the whole ledger is
    // O(clients × documents), which at mid sizes took longer than the storm).
    let mut per_room: std::collections::HashMap<&str, Ledger> = Default::default();
    for (key, rooms) in &ledger.owners {
        for room in rooms {
            let l = per_room.entry(room.as_str()).or_default();
            l.own(key, std::slice::from_ref(room));
            *l.writes.entry(key.clone()).or_default() = ledger.writes[key];
        }
    }
    let empty = Ledger::default();
    let mut total = Report::default();
    let (mut resyncs, mut retries, mut owed_s, mut welcome_s) = (0, 0, Vec::new(), Vec::new());
    for (m, back) in members.iter().zip(backs) {
        let room = format!("customer:{}", m.customer);
        let mine = per_room.get(room.as_str()).unwrap_or(&empty);
        let r = check(mine, |_| true, &[m.before.clone(), back.seen.clone()]);
        if r.missing + r.duplicated + r.cross_room + r.phantom > 0 {
            eprintln!(
                "client of {} ({:?}, owed {}): {}; since {:?}",
                m.customer,
                m.wire,
                m.owed,
                r.line(),
                m.since
            );
        }
        total.add(&r);
        resyncs += back.resyncs;
        retries += back.retries;
        owed_s.extend(back.owed_after);
        welcome_s.push(back.welcomed_after);
    }
    let away_writes = 2 * owed as u64 + others;
    if kind != Move::Replica {
        // Everything written while away has been read once the storm is over (owed events
        // were written first, `others` after); what more was read is the repeated window.
        let ops = server.app().ops_addr.unwrap();
        wait_read(ops, away_writes as f64, Duration::from_secs(30)).await;
    }
    let m1 = metrics(&server).await;
    let reread = metric(&m1, "changecast_changes_read_total") - away_writes as f64;
    let opened = metric(&m1, "changecast_replay_streams_opened_total") - opened0;
    let sim_opened = sim_opened0
        .zip(db.sim.as_ref())
        .map(|(before, s)| s.change_streams_opened() - before);
    let (history, oplog, resync_metric) = (
        rec0(&m1, "history") - h0,
        rec0(&m1, "oplog") - o0,
        rec0(&m1, "resync") - r0,
    );
    let (p50, p99, max) = (
        percentile(&mut owed_s, 0.5),
        percentile(&mut owed_s, 0.99),
        percentile(&mut owed_s, 1.0),
    );
    let (w50, w99, wmax) = (
        percentile(&mut welcome_s, 0.5),
        percentile(&mut welcome_s, 0.99),
        percentile(&mut welcome_s, 1.0),
    );
    let from = match kind {
        Move::Replica => "A's stop",
        _ => "/readyz true",
    };
    figure(
        &format!(
            "restarts.{}{}",
            kind.label(),
            if short_history { "_beyond_history" } else { "" }
        ),
        format!(
            "{n} clients ({sio} over Socket.IO), {owed} owed 2 events each, {others} other writes while away; A stopped in {:.2}s; start to ready {:.2}s; from {from}: welcomed p50 {w50:.2}s, p99 {w99:.2}s, all {wmax:.2}s; owed delivered p50 {p50:.2}s, p99 {p99:.2}s, all {max:.2}s, storm done {:.1}s; recoveries history {history}, oplog {oplog}, resync {resync_metric}; replay streams opened {opened} (the server counted {}); changes re-read from before the stop {}; connects retried {retries}; resyncs seen {resyncs}; {}",
            stop_took.as_secs_f64(),
            start_to_ready.as_secs_f64(),
            took,
            sim_opened.map_or("n/a".to_owned(), |n| n.to_string()),
            if kind == Move::Replica { "n/a".to_owned() } else { reread.to_string() },
            total.line()
        ),
    );
    assert_eq!(total.missing, 0, "{}", total.line());
    assert_eq!(
        total.cross_room + total.phantom + total.inversions,
        0,
        "{}",
        total.line()
    );
    match kind {
        // A kill repeats at most its checkpoint window; each owed client had one event from A.
        Move::Kill => {
            assert!(
                total.duplicated <= WINDOW.min(owed as u64),
                "{}",
                total.line()
            );
            // The kill did leave an unsaved window, which the new process read again.
            assert!(reread >= 1.0, "the kill left nothing unsaved");
        }
        _ => assert_eq!(total.duplicated, 0, "{}", total.line()),
    }
    assert_eq!(resyncs, 0, "clients told to resync");
    assert_eq!(resync_metric, 0.0);
    // Warmed history (restart) or live history (replica) covers every `since`: no client
    // costs a query (a checkpoint that is no event's token once sent all 300 to the oplog).
    if short_history {
        // All but those who came before the new process had read past their `since`.
        assert_eq!(history + oplog, n as f64, "every client recovered");
        assert!(
            oplog >= (n / 2) as f64,
            "only {oplog} recoveries from the oplog"
        );
    } else {
        assert_eq!(history, n as f64, "recoveries from history");
        assert_eq!(oplog, 0.0, "a recovery went to MongoDB");
    }
    if short_history {
        // One stream at a time serves everyone waiting; clients still arriving while one
        // runs wait for the next, so the count follows the storm's length over one scan
        // (150 ms gathering + the scan): 3-4 for 300 clients, 5-6 for 2000 here. The bound
        // is "a few, not one per client"; the issue's ≤ 2 holds where history covers.
        assert!(opened <= 10.0, "{opened} replay streams for one database");
    } else {
        assert!(opened <= 2.0, "{opened} replay streams for one database");
        if let Some(n) = sim_opened {
            assert!(
                n <= 2,
                "the server saw {n} change streams opened during the storm"
            );
        }
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_storm_recovers_every_client_from_warmed_history() {
    storm(Move::Clean, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_storm_beyond_history_shares_a_few_replay_streams() {
    storm(Move::Clean, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_restart_storm_misses_nothing_and_repeats_at_most_a_window() {
    storm(Move::Kill, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_moving_to_another_replica_recover_from_its_history() {
    storm(Move::Replica, false).await;
}
