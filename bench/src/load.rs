//! One load run against one server: connect the clients, measure idle memory, then
//! drive workload T (fixed rate, then saturation) and workload B (saturation).
//!
//! "Saturation" is closed-loop at the delivery level: the writer keeps at most
//! `window` deliveries owed (written but not yet received), so the rate found is
//! the highest the server sustains without queues growing without bound (and
//! without tripping its slow-consumer limits, which would be reported as losses).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, Fleet, FleetStats, Protocol, Role, Spec, Stage};
use crate::procstat::{self, PeakRss};
use crate::sink::{Sink, Write, STATUSES, STOREFRONT};
use crate::token;
use crate::tracker::{Summary, Tracker, BROADCAST};

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Label in the report (`changecast /ws`, `node`, …).
    pub label: String,
    /// Client protocol.
    pub protocol: Protocol,
    /// WebSocket URL.
    pub url: String,
    /// Address the URL names.
    pub server: SocketAddr,
    /// Customers (C); dashboards are added at 1% (at least one).
    pub customers: u32,
    /// HS256 secret for tokens.
    pub secret: String,
    /// Server process to measure.
    pub server_pid: Option<u32>,
    /// The database process (mongo-sim) whose CPU time is reported beside the server's.
    pub db_pid: Option<u32>,
    /// Writes per second in the fixed-rate phase of workload T.
    pub fixed_rate: u32,
    /// Length of each writing phase.
    pub phase: Duration,
    /// How long deliveries may stall before the rest count as lost.
    pub drain_timeout: Duration,
    /// Writes in flight at once.
    pub concurrency: u32,
    /// Deliveries owed at once in workload T's saturation phase.
    pub window_t: u64,
    /// Writes owed at once in workload B (each owed by every client).
    pub window_b_writes: u64,
    /// Socket.IO event a client emits to join a room (payload `{"room": R}`, acked).
    pub sio_subscribe_event: String,
    /// Event names counted as deliveries.
    pub counted_events: Vec<String>,
    /// Source addresses for client sockets.
    pub sources: Vec<Ipv4Addr>,
    /// Most writes one run may issue.
    pub max_writes: usize,
}

/// Figures of one writing phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseResult {
    /// `T fixed`, `T saturation` or `B saturation`.
    pub name: String,
    /// Receipts and latencies.
    pub summary: Summary,
    /// Peak server RSS during the phase, KiB.
    pub rss_peak_kib: u64,
    /// Server CPU seconds during the phase (drain included).
    pub cpu_secs: f64,
    /// Server CPU seconds per million deliveries.
    pub cpu_secs_per_million: f64,
    /// Whether deliveries stalled (the rest were counted lost).
    pub stalled: bool,
    /// Write errors (their deliveries are not owed).
    pub write_errors: u64,
    /// Seconds the phase lasted (drain included): the window the CPU figures cover.
    #[serde(default)]
    pub wall_secs: f64,
    /// CPU seconds the whole machine was busy during the phase (all processes).
    #[serde(default)]
    pub machine_cpu_secs: f64,
    /// CPU seconds of the load tool itself during the phase.
    #[serde(default)]
    pub loadtool_cpu_secs: f64,
    /// CPU seconds of the database (mongo-sim) during the phase; 0 for the raw limit.
    #[serde(default)]
    pub db_cpu_secs: f64,
    /// The machine's 1-minute load average at the end of the phase.
    #[serde(default)]
    pub load_1m_end: f64,
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Server label.
    pub label: String,
    /// C.
    pub customers: u32,
    /// Connections opened (customers + dashboards).
    pub connections: u64,
    /// Connections that failed to open.
    pub failed_connections: u64,
    /// Connections lost during the run.
    pub dropped_connections: u64,
    /// Seconds to open and authenticate every connection.
    pub connect_secs: f64,
    /// Server RSS before connecting, KiB.
    pub rss_baseline_kib: u64,
    /// Server RSS with every connection open and idle, KiB.
    pub rss_idle_kib: u64,
    /// `(idle − baseline) / connections`, bytes.
    pub rss_per_idle_connection_bytes: f64,
    /// Phases in order.
    pub phases: Vec<PhaseResult>,
    /// Receipts for writes the client was not an audience of.
    pub misrouted: u64,
    /// Receipts carrying no known write.
    pub unknown: u64,
    /// Frames not counted as deliveries.
    pub other_frames: u64,
    /// A few of those frames, clipped.
    #[serde(default)]
    pub other_samples: Vec<String>,
    /// First errors seen.
    pub errors: Vec<String>,
}

impl RunResult {
    /// Events lost over all phases, plus misrouted receipts and dropped connections:
    /// anything that must be zero.
    pub fn failures(&self) -> u64 {
        self.phases.iter().map(|p| p.summary.lost).sum::<u64>()
            + self.misrouted
            + self.failed_connections
            + self.dropped_connections
    }
}

/// Runs the workloads against a server that is already up; `sink` writes where it listens.
pub async fn run(cfg: &LoadConfig, sink: Arc<Sink>) -> anyhow::Result<RunResult> {
    let stores = (cfg.customers / 100).max(1);
    let tracker = Arc::new(Tracker::new(cfg.max_writes));
    let fleet = Arc::new(Fleet {
        protocol: cfg.protocol,
        url: cfg.url.clone(),
        server: cfg.server,
        sources: cfg.sources.clone(),
        counted_events: cfg.counted_events.clone(),
        sio_subscribe_event: cfg.sio_subscribe_event.clone(),
        handshakes: Semaphore::new(128),
        tracker: tracker.clone(),
        stats: FleetStats::default(),
    });
    let secret = cfg.secret.as_bytes();
    let mut specs = Vec::with_capacity((cfg.customers + stores) as usize);
    for i in 0..cfg.customers {
        specs.push(Spec {
            role: Role::Customer(i),
            token: token::mint(secret, &token::customer(format!("c{i}")))?,
        });
    }
    for j in 0..stores {
        specs.push(Spec {
            role: Role::Store { index: j, stores },
            token: token::mint(
                secret,
                &token::store(format!("s{j}-owner"), format!("s{j}")),
            )?,
        });
    }
    let connections = specs.len() as u64;
    let pid = cfg.server_pid;
    let rss = |pid: Option<u32>| pid.and_then(procstat::rss_kib).unwrap_or(0);
    let rss_baseline_kib = rss(pid);

    let (stage_tx, stage_rx) = watch::channel(Stage::Connect);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let started = Instant::now();
    let room = format!("storefront:{STOREFRONT}");
    for (index, spec) in specs.into_iter().enumerate() {
        tasks.spawn(client::run(
            fleet.clone(),
            index,
            spec,
            Some(room.clone()),
            stage_rx.clone(),
            stop.clone(),
        ));
    }
    let stats = &fleet.stats;
    let settled = |n: u64| {
        stats.connected.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed) >= n
    };
    wait_until(Duration::from_secs(600), || settled(connections)).await;
    let connect_secs = started.elapsed().as_secs_f64();
    let connected = stats.connected.load(Ordering::Relaxed);
    // Let the server finish per-connection setup and the allocator settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_kib = rss(pid);
    let rss_per_idle_connection_bytes = if connected > 0 {
        (rss_idle_kib.saturating_sub(rss_baseline_kib) * 1024) as f64 / connected as f64
    } else {
        0.0
    };

    let _ = stage_tx.send(Stage::Subscribe);
    wait_until(Duration::from_secs(300), || {
        stats.subscribed.load(Ordering::Relaxed)
            + stats.dropped.load(Ordering::Relaxed)
            + stats.failed.load(Ordering::Relaxed)
            >= connections
    })
    .await;

    let mut phases = Vec::new();
    let mut next_seq = 0u64;
    if connected > 0 {
        let customers = cfg.customers;
        let order_write = move |seq: u64| {
            let order = (seq % u64::from(customers)) as u32;
            let round = seq / u64::from(customers);
            let status = STATUSES[((round + 1) % STATUSES.len() as u64) as usize];
            let write = Write::Order {
                order,
                stores,
                status,
            };
            // The customer and the store's dashboard.
            (write, order, 2)
        };
        let audience = stats.subscribed.load(Ordering::Relaxed) as u32;
        let banner_write = move |_seq: u64| (Write::Banner, BROADCAST, audience);

        // Writes `period` apart rewrite one document (see `phase`).
        let orders_period = u64::from(customers);
        let phase_plan: [(&str, Mode, &MakeWrite, u64); 3] = [
            (
                "T fixed",
                Mode::Fixed(cfg.fixed_rate),
                &order_write,
                orders_period,
            ),
            // An order is rewritten every C writes, so fewer than C/2 writes (C
            // deliveries) may be owed: see `sink::STOREFRONT_DOCS` for why.
            (
                "T saturation",
                Mode::Window(cfg.window_t.min(u64::from(customers))),
                &order_write,
                orders_period,
            ),
            (
                "B saturation",
                Mode::Window(cfg.window_b_writes * u64::from(audience.max(1))),
                &banner_write,
                crate::sink::STOREFRONT_DOCS,
            ),
        ];
        for (name, mode, make, period) in phase_plan {
            let write = Writes { make, period };
            let result = phase(cfg, &sink, &tracker, name, mode, &mut next_seq, write).await;
            phases.push(result);
        }
    }

    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await;
    let errors = stats
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let other_samples = stats
        .other_samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(RunResult {
        label: cfg.label.clone(),
        customers: cfg.customers,
        connections,
        failed_connections: stats.failed.load(Ordering::Relaxed),
        dropped_connections: stats.dropped.load(Ordering::Relaxed),
        connect_secs,
        rss_baseline_kib,
        rss_idle_kib,
        rss_per_idle_connection_bytes,
        phases,
        misrouted: tracker.misrouted(),
        unknown: tracker.unknown(),
        other_frames: stats.other_frames.load(Ordering::Relaxed),
        other_samples,
        errors,
    })
}

/// Write `seq` → (the write, its target, deliveries owed).
type MakeWrite = dyn Fn(u64) -> (Write, u32, u32);

/// A phase's writes: what write `seq` is, and how many writes apart one document is
/// rewritten.
///
/// `updateLookup` shows a document as the server finds it when it reads the change, so
/// a change read after a later write to the same document carries that write's values
/// (MongoDB's documented behaviour, which changecast keeps: a payload mixing two
/// versions could show one owner's data to another). The writer therefore never
/// rewrites a document while an earlier write to it is undelivered. The windows alone
/// did not ensure it: concurrent writes commit out of issue order, and one write
/// acknowledged 3 ms after its neighbours was read after the next write to its
/// document (one lost, one duplicated at C = 60, about one run in six).
struct Writes<'a> {
    make: &'a MakeWrite,
    period: u64,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Writes per second, open loop.
    Fixed(u32),
    /// Deliveries owed at most, closed loop.
    Window(u64),
}

async fn phase(
    cfg: &LoadConfig,
    sink: &Arc<Sink>,
    tracker: &Arc<Tracker>,
    name: &str,
    mode: Mode,
    next_seq: &mut u64,
    writes: Writes<'_>,
) -> PhaseResult {
    let pid = cfg.server_pid;
    let cpu_before = pid.and_then(procstat::cpu_secs).unwrap_or(0.0);
    // The machine is shared (other builds, mongo-sim, this tool): record how busy it was.
    let own_pid = std::process::id();
    let own_before = procstat::cpu_secs(own_pid).unwrap_or(0.0);
    let db_before = cfg.db_pid.and_then(procstat::cpu_secs).unwrap_or(0.0);
    let machine_before = procstat::machine_busy_secs().unwrap_or(0.0);
    let peak = pid.map(|p| PeakRss::start(p, Duration::from_millis(200)));
    let first = *next_seq;
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1) as usize));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let limit = tracker.capacity() as u64;
    while started.elapsed() < cfg.phase && *next_seq < limit {
        match mode {
            Mode::Fixed(rate) => {
                let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
                if *next_seq - first >= due {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    continue;
                }
            }
            Mode::Window(window) => {
                if tracker.outstanding() >= window {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    continue;
                }
            }
        }
        // The last write to this document must have arrived everywhere first (see
        // `Writes`); one lost for good is counted at the drain, so stop waiting then.
        let seq = *next_seq;
        if let Some(prev) = seq.checked_sub(writes.period).filter(|p| *p >= first) {
            let since = Instant::now();
            while !tracker.settled(prev) && since.elapsed() < cfg.drain_timeout {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        *next_seq += 1;
        let (write, target, expected) = (writes.make)(seq);
        tracker.issue(seq, target, expected);
        let (sink, tracker, errors) = (sink.clone(), tracker.clone(), errors.clone());
        tokio::spawn(async move {
            match sink.write(seq, write).await {
                Ok(()) => tracker.ack(seq),
                Err(_) => {
                    tracker.cancel(seq);
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    // Every write acknowledged (or failed) before draining.
    let _ = permits.acquire_many(cfg.concurrency.max(1)).await;
    let mut stalled = false;
    let mut last = (tracker.delivered(), Instant::now());
    while tracker.outstanding() > 0 {
        let now = tracker.delivered();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > cfg.drain_timeout {
            stalled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let summary = tracker.summarize(first, *next_seq);
    tracker.settle();
    let cpu_secs = pid.and_then(procstat::cpu_secs).unwrap_or(0.0) - cpu_before;
    let loadtool_cpu_secs = procstat::cpu_secs(own_pid).unwrap_or(0.0) - own_before;
    let db_cpu_secs = cfg.db_pid.and_then(procstat::cpu_secs).unwrap_or(0.0) - db_before;
    let machine_cpu_secs = procstat::machine_busy_secs().unwrap_or(0.0) - machine_before;
    let cpu_secs_per_million = if summary.delivered > 0 {
        cpu_secs * 1e6 / summary.delivered as f64
    } else {
        0.0
    };
    PhaseResult {
        name: name.to_owned(),
        summary,
        rss_peak_kib: peak.map(PeakRss::finish).unwrap_or(0),
        cpu_secs,
        cpu_secs_per_million,
        stalled,
        write_errors: errors.load(Ordering::Relaxed),
        wall_secs: started.elapsed().as_secs_f64(),
        machine_cpu_secs,
        loadtool_cpu_secs,
        db_cpu_secs,
        load_1m_end: procstat::load_1m().unwrap_or(0.0),
    }
}

async fn wait_until(limit: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
