//! The shared workload: sizes (fast or `RELIABILITY_FULL=1`), figures, the writer that fills the
//! ledger, observers that record deliveries, and small readers of `/metrics` and `/readyz`.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bson::doc;
use bson::oid::ObjectId;
use futures::StreamExt;
use rand::Rng;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::checker::{Ledger, Seen};
use crate::support::{Client, Db, Server};

/// Whether the long versions run.
pub fn full() -> bool {
    std::env::var("RELIABILITY_FULL").is_ok_and(|v| v == "1")
}

/// `fast` by default, `long` under `RELIABILITY_FULL=1`; `RELIABILITY_<NAME>` overrides either
/// (for mid-size runs when the long one does not fit the time at hand).
pub fn size(name: &str, fast: u64, long: u64) -> u64 {
    if let Some(v) = std::env::var(format!("RELIABILITY_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return v;
    }
    if full() {
        long
    } else {
        fast
    }
}

/// How this test binary was built: timing figures mean little without it.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Cores this machine offers the test.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Prints one figure and appends it to `$RELIABILITY_FIGURES` (scripts/reliability collects them).
pub fn figure(name: &str, value: impl std::fmt::Display) {
    // libtest names the test's thread after the test, which gives the command to rerun it.
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let line = format!(
        "FIGURE | {name} | {value} | {} {} | {test}",
        if full() { "full" } else { "fast" },
        build_profile()
    );
    eprintln!("{line}");
    if let Ok(path) = std::env::var("RELIABILITY_FIGURES") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts panics in this process from now on (the server runs in-process, so a panicking
/// connection task would otherwise be swallowed by tokio).
pub fn panics() -> u64 {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}

/// One order and who it belongs to.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: ObjectId,
    pub customer: String,
    pub store: String,
}

/// The declared `deliveries` stream's table; a macro so that its variant below extends it.
macro_rules! deliveries_stream {
    () => {
        r#"
[[streams]]
collection = "deliveries"
module = "delivery"
[streams.rooms]
customer = "customerId"
store = "storeId"
admin = true
[streams.allow]
customer = ["_id", "quantity"]
store = ["_id", "quantity", "customerId", "state"]
admin = ["_id", "quantity", "customerId", "storeId", "state"]
"#
    };
}

/// A declared stream (`[[streams]]`) over the workload's `deliveries` documents, routed to
/// their customer, their store and admin.
pub const DELIVERIES_STREAM: &str = deliveries_stream!();

/// [`DELIVERIES_STREAM`] with a status table: `state` changes are
/// `delivery:status_changed`, whose status only the store and admin may see (the
/// customer's allowlist has no `state`, so a change of it alone is not sent there).
pub const DELIVERIES_STREAM_WITH_STATUS: &str = concat!(
    deliveries_stream!(),
    r#"[streams.status]
field = "state"
[streams.status.map]
scheduled = "pending"
loaded = "in_transit"
dropped_off = "delivered"
"#
);

/// Orders, payments (one per second order) and one settings document per store; optionally
/// deliveries of a declared stream ([`DELIVERIES_STREAM`]).
#[derive(Clone)]
pub struct Workload {
    pub customers: Vec<String>,
    pub stores: Vec<String>,
    pub orders: Vec<Order>,
    pub payments: Vec<(ObjectId, Order)>,
    /// Documents of the declared `deliveries` stream (`id` is the delivery's); none by default.
    pub deliveries: Vec<Order>,
    /// Whether every other write to a delivery changes its `state` (serve
    /// [`DELIVERIES_STREAM_WITH_STATUS`]) rather than its `quantity`.
    pub delivery_states: bool,
    pub ledger: Arc<Mutex<Ledger>>,
}

impl Workload {
    pub fn new(customers: usize, stores: usize, orders: usize) -> Workload {
        let customers: Vec<String> = (0..customers).map(|i| format!("c{i}")).collect();
        let stores: Vec<String> = (0..stores).map(|i| format!("s{i}")).collect();
        let orders: Vec<Order> = (0..orders)
            .map(|i| Order {
                id: ObjectId::new(),
                customer: customers[i % customers.len()].clone(),
                store: stores[(i / customers.len().max(1) + i) % stores.len()].clone(),
            })
            .collect();
        let payments: Vec<(ObjectId, Order)> = orders
            .iter()
            .step_by(2)
            .map(|o| (ObjectId::new(), o.clone()))
            .collect();
        let mut ledger = Ledger::default();
        for o in &orders {
            ledger.own(
                &format!("order/{}", o.id.to_hex()),
                &[
                    format!("customer:{}", o.customer),
                    format!("store:{}", o.store),
                    format!("order:{}", o.id.to_hex()),
                    "admin".into(),
                ],
            );
        }
        for (p, o) in &payments {
            let (p, o): (&ObjectId, &Order) = (p, o);
            ledger.own(
                &format!("payment/{}", p.to_hex()),
                &[
                    format!("customer:{}", o.customer),
                    format!("store:{}", o.store),
                    format!("order:{}", o.id.to_hex()),
                    "admin".into(),
                ],
            );
        }
        for s in &stores {
            ledger.own(
                &format!("settings/{s}"),
                &[
                    format!("store:{s}"),
                    format!("storefront:{s}"),
                    "admin".into(),
                ],
            );
        }
        Workload {
            customers,
            stores,
            orders,
            payments,
            deliveries: Vec::new(),
            delivery_states: false,
            ledger: Arc::new(Mutex::new(ledger)),
        }
    }

    /// Adds `n` deliveries (a declared stream's documents: serve [`DELIVERIES_STREAM`]);
    /// then every fourth write changes one.
    pub fn with_deliveries(mut self, n: usize) -> Workload {
        let mut ledger = self.ledger.lock().unwrap();
        for i in 0..n {
            let d = Order {
                id: ObjectId::new(),
                customer: self.customers[i % self.customers.len()].clone(),
                store: self.stores[(i * 3) % self.stores.len()].clone(),
            };
            ledger.own(
                &format!("delivery/{}", d.id.to_hex()),
                &[
                    format!("customer:{}", d.customer),
                    format!("store:{}", d.store),
                    "admin".into(),
                ],
            );
            self.deliveries.push(d);
        }
        drop(ledger);
        self
    }

    /// Every other write to a delivery moves its `state` (see [`DELIVERIES_STREAM_WITH_STATUS`]).
    pub fn with_delivery_states(mut self) -> Workload {
        self.delivery_states = true;
        self
    }

    /// Inserts every document. Call before the watcher starts: inserts are not in the ledger.
    pub async fn seed(&self, db: &Db) {
        let orders: Vec<_> = self
            .orders
            .iter()
            .map(|o| doc! {"_id": o.id, "customerId": &o.customer, "storeId": &o.store, "status": "new", "total": -1i64})
            .collect();
        if !orders.is_empty() {
            db.coll("orders").insert_many(orders).await.unwrap();
        }
        let payments: Vec<_> = self
            .payments
            .iter()
            .map(|(p, o)| doc! {"_id": p, "orderId": o.id, "customerId": &o.customer, "storeId": &o.store, "status": "pending", "amount": -1i64})
            .collect();
        if !payments.is_empty() {
            db.coll("payments").insert_many(payments).await.unwrap();
        }
        let settings: Vec<_> = self
            .stores
            .iter()
            .map(|s| doc! {"storeId": s, "storeLogo": "logo.png"})
            .collect();
        db.coll("settings").insert_many(settings).await.unwrap();
        let deliveries: Vec<_> = self
            .deliveries
            .iter()
            .map(|d| doc! {"_id": d.id, "customerId": &d.customer, "storeId": &d.store, "quantity": -1i64, "state": "scheduled"})
            .collect();
        if !deliveries.is_empty() {
            db.coll("deliveries").insert_many(deliveries).await.unwrap();
        }
    }

    /// Write number `seq`: 60% orders, 30% payments, 10% settings (with deliveries, every
    /// fourth write is to one of them instead); recorded once acknowledged.
    pub async fn write(&self, db: &Db, seq: u64) -> String {
        let slot = seq % 10;
        let pick = (seq / 10) as usize;
        let key = if !self.deliveries.is_empty() && seq % 4 == 3 {
            let d = &self.deliveries[pick % self.deliveries.len()];
            let set = if self.delivery_states && seq % 8 == 7 {
                let states = ["scheduled", "loaded", "dropped_off", "lost"];
                doc! {"state": states[(seq / 8) as usize % states.len()]}
            } else {
                doc! {"quantity": seq as i64}
            };
            db.coll("deliveries")
                .update_one(doc! {"_id": d.id}, doc! {"$set": set})
                .await
                .unwrap();
            format!("delivery/{}", d.id.to_hex())
        } else if slot < 6 && !self.orders.is_empty() {
            let o = &self.orders[pick % self.orders.len()];
            db.coll("orders")
                .update_one(doc! {"_id": o.id}, doc! {"$set": {"total": seq as i64}})
                .await
                .unwrap();
            format!("order/{}", o.id.to_hex())
        } else if slot < 9 && !self.payments.is_empty() {
            let (p, _) = &self.payments[pick % self.payments.len()];
            db.coll("payments")
                .update_one(doc! {"_id": p}, doc! {"$set": {"amount": seq as i64}})
                .await
                .unwrap();
            format!("payment/{}", p.to_hex())
        } else {
            let s = &self.stores[pick % self.stores.len()];
            db.coll("settings")
                .update_one(
                    doc! {"storeId": s},
                    doc! {"$set": {"storeLogo": format!("logo-{seq}.png")}},
                )
                .await
                .unwrap();
            format!("settings/{s}")
        };
        self.ledger.lock().unwrap().ack(&key);
        key
    }

    /// Writes `n` changes at `rate` per second (as fast as acknowledged when `None`).
    pub async fn write_n(&self, db: &Db, first: u64, n: u64, rate: Option<u32>) {
        let mut tick = rate.map(|r| {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r)));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        for seq in first..first + n {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            self.write(db, seq).await;
        }
    }

    /// A writer task: at least `min` changes, and on until `stop` fires; returns how many.
    pub fn spawn_writer(
        &self,
        db: Arc<Db>,
        min: u64,
        rate: Option<u32>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<u64> {
        let w = self.clone();
        tokio::spawn(async move {
            let mut tick = rate.map(|r| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r)));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut seq = 0;
            while seq < min || !stop.is_cancelled() {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                w.write(&db, seq).await;
                seq += 1;
            }
            seq
        })
    }

    pub fn ledger(&self) -> Ledger {
        self.ledger.lock().unwrap().clone()
    }

    /// Rooms of the documents of customer `c` (for the cross-room check of a customer client).
    pub fn customer_keys(&self, c: &str) -> impl Fn(&str) -> bool + '_ {
        let c = format!("customer:{c}");
        move |k: &str| {
            self.ledger
                .lock()
                .unwrap()
                .owners
                .get(k)
                .is_some_and(|r| r.contains(&c))
        }
    }
}

/// An observer: a client whose every delivery is recorded in arrival order by a background task.
pub struct Observer {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Commit-to-receipt latency of each event, ms.
    pub latency: Arc<Mutex<Vec<f64>>>,
    pub other: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub fn spawn(client: Client) -> Observer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let other = Arc::new(Mutex::new(Vec::new()));
        let latency = Arc::new(Mutex::new(Vec::new()));
        let (s, o, l) = (seen.clone(), other.clone(), latency.clone());
        let mut ws = client.ws;
        let task = tokio::spawn(async move {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        match Seen::from_message(&v) {
                            Some(seen) => {
                                if let Some(ts) = v["ts"].as_i64() {
                                    l.lock().unwrap().push((now_ms() - ts) as f64);
                                }
                                s.lock().unwrap().push(seen)
                            }
                            None => o.lock().unwrap().push(v),
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Observer {
            seen,
            latency,
            other,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done(seen)` holds, up to `within`; false on timeout.
    pub async fn wait(&self, within: Duration, done: impl Fn(&[Seen]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if done(&self.seen.lock().unwrap()) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Number of distinct (document, event) pairs in `seen`.
pub fn distinct(seen: &[Seen]) -> u64 {
    seen.iter()
        .map(|s| (&s.key, &s.id))
        .collect::<std::collections::HashSet<_>>()
        .len() as u64
}

/// changecast on a tokio runtime of its own (2 workers, as the tests' runtime), so that its
/// `changecast_runtime_tasks` counts changecast's tasks only; the test's clients, writers and
/// mongo-sim stay on the test's runtime. Derefs to the `Server`.
pub struct OwnRuntimeServer {
    server: Option<Server>,
    runtime: Option<tokio::runtime::Runtime>,
    /// `changecast_runtime_tasks` once ready, before any client connected.
    pub tasks_at_start: f64,
}

impl OwnRuntimeServer {
    pub async fn start(db: &Db, extra: &str) -> OwnRuntimeServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("changecast-server")
            .enable_all()
            .build()
            .unwrap();
        let server = Server::start_on(runtime.handle(), db, extra).await;
        let tasks_at_start = metric(&metrics(&server).await, "changecast_runtime_tasks");
        OwnRuntimeServer {
            server: Some(server),
            runtime: Some(runtime),
            tasks_at_start,
        }
    }
}

impl std::ops::Deref for OwnRuntimeServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        self.server.as_ref().unwrap()
    }
}

impl Drop for OwnRuntimeServer {
    fn drop(&mut self) {
        // A graceful stop on a thread of its own (this is an async context, where a runtime
        // cannot block or be dropped): dropping the runtime with changecast's tasks still
        // running makes the driver panic (a cursor's kill after its pool is gone).
        let (Some(mut server), Some(runtime)) = (self.server.take(), self.runtime.take()) else {
            return;
        };
        let handle = server.handle.take();
        std::thread::spawn(move || {
            if let Some(h) = handle {
                h.stop();
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), h.wait()).await;
                });
            }
            drop(server);
            drop(runtime);
        });
    }
}

/// The sum of the samples of `name` (a family name, or a name with its `{labels}`) in `/metrics`.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let ok = rest.starts_with(' ') || (!name.contains('{') && rest.starts_with('{'));
            ok.then(|| l.rsplit(' ').next()?.parse::<f64>().ok())?
        })
        .sum()
}

pub async fn metrics(server: &Server) -> String {
    server.get("/metrics").await.1
}

/// Waits until `/metrics` shows `name` at `want`, up to `within`; the last value seen.
pub async fn wait_metric(server: &Server, name: &str, want: f64, within: Duration) -> f64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = metric(&metrics(server).await, name);
        if v == want || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident set size of this process in kB (Linux), for the leak figures.
pub fn rss_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A random pause in `lo..hi` milliseconds.
pub async fn pause(lo: u64, hi: u64) {
    let ms = rand::thread_rng().gen_range(lo..hi);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A value `p`-th percentile of `v` (sorted in place).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Wall clock, Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
