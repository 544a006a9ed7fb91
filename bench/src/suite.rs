//! The whole benchmark: for each size, each server under test in turn (fresh mongo-sim,
//! fresh server, one load run), then BENCHMARKS.md. Child processes die with their handles.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::Protocol;
use crate::follow::{self, FollowResult};
use crate::load::{self, LoadConfig, RunResult};
use crate::report;
use crate::sink::{self, Sink};

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Target {
    /// changecast's native protocol at `/ws`.
    Native,
    /// changecast's Socket.IO endpoint.
    Socketio,
    /// The Node reference (Socket.IO 4 + the mongodb driver).
    Node,
    /// The raw tokio-tungstenite limit.
    Raw,
}

impl Target {
    /// Label in the report.
    pub fn label(self) -> &'static str {
        match self {
            Target::Native => "changecast /ws",
            Target::Socketio => "changecast Socket.IO",
            Target::Node => "Node Socket.IO",
            Target::Raw => "raw limit",
        }
    }
}

/// Suite settings.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// Directory holding `changecast`, `mongo-sim` and `changecast-bench-raw`.
    pub bin_dir: PathBuf,
    /// The Node peer's directory (with node_modules installed).
    pub node_dir: PathBuf,
    /// changecast's bench config; `@LISTEN@` and `@CHECKPOINT@` are filled in per run.
    pub changecast_config: PathBuf,
    /// Connection counts C.
    pub sizes: Vec<u32>,
    /// Servers, in the order run.
    pub targets: Vec<Target>,
    /// Seconds per writing phase.
    pub phase: Duration,
    /// Writes per second in workload T's fixed-rate phase.
    pub fixed_rate: u32,
    /// Logs, configs and per-run JSON.
    pub work_dir: PathBuf,
    /// Where BENCHMARKS.md goes.
    pub out: PathBuf,
    /// The command line to print in the report.
    pub command: String,
    /// Tiny sizes.
    pub smoke: bool,
    /// Lines for the report's notes.
    pub notes: Vec<String>,
    /// Hand-written Markdown appended to the report.
    pub appendix: Option<PathBuf>,
    /// Changes written in workload `follow` (no clients); 0 skips it.
    pub follow_changes: u64,
}

/// Everything one suite run measured.
#[derive(Debug, Clone, Default)]
pub struct SuiteResults {
    /// One per server and size.
    pub runs: Vec<RunResult>,
    /// Workload `follow`, one per server.
    pub follow: Vec<FollowResult>,
}

/// How long deliveries may make no progress before the rest count as lost. The smoke
/// runs debug builds on machines that are busy compiling, so it gets no shorter limit
/// than the full run: the limit only costs time when something is really lost.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// JWT secret every server under test verifies with.
const SECRET: &str = "changecast-bench-secret-0123456789abcdef";

/// Runs everything; returns the results (also written as JSON, BENCHMARKS.md and its plots).
pub async fn run(cfg: &SuiteConfig) -> anyhow::Result<SuiteResults> {
    std::fs::create_dir_all(&cfg.work_dir)?;
    // Servers run in their own directories: every path they get must be absolute.
    let absolute = |p: &Path| {
        std::fs::canonicalize(p).with_context(|| format!("no such path: {}", p.display()))
    };
    let mut cfg = cfg.clone();
    cfg.bin_dir = absolute(&cfg.bin_dir)?;
    cfg.work_dir = absolute(&cfg.work_dir)?;
    cfg.changecast_config = absolute(&cfg.changecast_config)?;
    if cfg.targets.contains(&Target::Node) {
        cfg.node_dir = absolute(&cfg.node_dir)?;
    }
    let cfg = &cfg;
    let facts = report::MachineFacts::collect();
    let started = Instant::now();
    let mut results = Vec::new();
    for &size in &cfg.sizes {
        for &target in &cfg.targets {
            eprintln!("bench: {} with C = {size}", target.label());
            let outcome = one(cfg, target, size).await;
            let result = match outcome {
                Ok(result) => result,
                Err(e) => {
                    eprintln!("bench: {} with C = {size} failed: {e:#}", target.label());
                    failed_run(target, size, format!("{e:#}"))
                }
            };
            eprintln!("bench: {}", report::one_line(&result));
            let json = cfg
                .work_dir
                .join(format!("{:?}-{size}.json", target).to_lowercase());
            std::fs::write(&json, serde_json::to_vec_pretty(&result)?)?;
            results.push(result);
        }
    }
    let follow = if cfg.follow_changes > 0 {
        follow::run_all(cfg, cfg.follow_changes).await
    } else {
        Vec::new()
    };
    std::fs::write(
        cfg.work_dir.join("follow.json"),
        serde_json::to_vec_pretty(&follow)?,
    )?;
    let mut markdown = report::render(cfg, &facts, &results, &follow, started.elapsed());
    if let Some(path) = &cfg.appendix {
        // Read at the end so an analysis edited during a long run is the one included;
        // a missing file must not cost the figures of a whole run.
        match std::fs::read_to_string(path) {
            Ok(text) => markdown.push_str(&text),
            Err(e) => markdown.push_str(&format!(
                "\n> The analysis {} could not be read: {e}\n",
                path.display()
            )),
        }
    }
    std::fs::write(&cfg.out, markdown).with_context(|| format!("writing {}", cfg.out.display()))?;
    crate::plot::write_all(&cfg.out, &crate::plot::points_from_results(&results))?;
    Ok(SuiteResults {
        runs: results,
        follow,
    })
}

fn failed_run(target: Target, size: u32, error: String) -> RunResult {
    RunResult {
        label: target.label().to_owned(),
        customers: size,
        connections: 0,
        failed_connections: 1,
        dropped_connections: 0,
        connect_secs: 0.0,
        rss_baseline_kib: 0,
        rss_idle_kib: 0,
        rss_per_idle_connection_bytes: 0.0,
        phases: Vec::new(),
        misrouted: 0,
        unknown: 0,
        other_frames: 0,
        other_samples: Vec::new(),
        errors: vec![error],
    }
}

async fn one(cfg: &SuiteConfig, target: Target, size: u32) -> anyhow::Result<RunResult> {
    let tag = format!("{target:?}-{size}").to_lowercase();
    let log = |name: &str| cfg.work_dir.join(format!("{tag}-{name}.log"));
    let mut load = LoadConfig {
        label: target.label().to_owned(),
        protocol: Protocol::Native,
        url: String::new(),
        server: SocketAddr::from(([127, 0, 0, 1], 0)),
        customers: size,
        secret: SECRET.to_owned(),
        server_pid: None,
        db_pid: None,
        fixed_rate: cfg.fixed_rate,
        phase: cfg.phase,
        drain_timeout: DRAIN_TIMEOUT,
        concurrency: 64,
        window_t: 4096,
        window_b_writes: 4,
        sio_subscribe_event: "subscribe".to_owned(),
        // order:updated too: whether a raw status step inside one canonical status
        // (accepted → packing) is a status change is the server's policy, and either
        // way the change reached its audience.
        counted_events: vec![
            "order:status_changed".into(),
            "order:updated".into(),
            "settings:updated".into(),
        ],
        sources: (1..=16).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect(),
        max_writes: if cfg.smoke { 100_000 } else { 3_000_000 },
    };

    if target == Target::Raw {
        let mut raw = spawn(
            Command::new(cfg.bin_dir.join("changecast-bench-raw")),
            &log("server"),
            true,
        )?;
        let line = first_line_with(&mut raw, "raw listening", Duration::from_secs(30)).await?;
        let field = |key: &str| -> anyhow::Result<SocketAddr> {
            let value = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in {line:?}"))?;
            Ok(value.parse()?)
        };
        let (ws, control) = (field("ws=")?, field("control=")?);
        load.server = ws;
        load.url = format!("ws://{ws}/ws");
        load.server_pid = raw.id();
        let sink = Arc::new(Sink::raw(control).await?);
        let result = load::run(&load, sink).await;
        stop(&mut raw).await;
        return result;
    }

    let stores = (size / 100).max(1);
    let mut backed = start(cfg, target, &tag, |uri| async move {
        sink::seed(&uri, size, stores)
            .await
            .context("seeding mongo-sim")
    })
    .await?;
    let addr = backed.addr;
    load.server = addr;
    load.server_pid = backed.server.id();
    load.db_pid = backed.mongo.id();
    (load.protocol, load.url) = match target {
        Target::Native => (Protocol::Native, format!("ws://{addr}/ws")),
        _ => (
            Protocol::SocketIo,
            format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
        ),
    };
    let sink = Arc::new(Sink::mongo(&backed.uri, load.concurrency).await?);
    let result = load::run(&load, sink).await;
    backed.stop().await;
    result
}

/// A server under test with its own fresh mongo-sim; both die with it.
pub(crate) struct Backed {
    pub(crate) mongo: Child,
    pub(crate) server: Child,
    /// mongo-sim's connection string.
    pub(crate) uri: String,
    /// The server's client listener.
    pub(crate) addr: SocketAddr,
    /// changecast's operations listener (`/metrics`, `/readyz`); the Node peer's one port.
    pub(crate) ops_addr: SocketAddr,
}

impl Backed {
    pub(crate) async fn stop(&mut self) {
        stop(&mut self.server).await;
        stop(&mut self.mongo).await;
    }
}

/// Starts a fresh mongo-sim, runs `prepare` against it (seeding), then starts `target`
/// (changecast or the Node peer) on it and waits until it answers `/readyz`.
pub(crate) async fn start<F, Fut>(
    cfg: &SuiteConfig,
    target: Target,
    tag: &str,
    prepare: F,
) -> anyhow::Result<Backed>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let log = |name: &str| cfg.work_dir.join(format!("{tag}-{name}.log"));
    let mut mongo = spawn(
        {
            let mut c = Command::new(cfg.bin_dir.join("mongo-sim"));
            c.args(["--port", "0", "--repl-set", "rs0"]);
            c
        },
        &log("mongo-sim"),
        true,
    )?;
    let line = first_line_with(&mut mongo, "listening on", Duration::from_secs(30)).await?;
    let mongo_addr = line
        .rsplit(' ')
        .next()
        .context("mongo-sim printed no address")?
        .trim()
        .to_owned();
    let uri = format!("mongodb://{mongo_addr}/?replicaSet=rs0");
    if let Err(e) = prepare(uri.clone()).await {
        stop(&mut mongo).await;
        return Err(e);
    }

    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // changecast answers `/readyz` on its operations listener; the Node peer on its one port.
    let ops_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let ready_addr = match target {
        Target::Native | Target::Socketio => ops_addr,
        _ => addr,
    };
    let mut server = match target {
        Target::Native | Target::Socketio => {
            let run_dir = cfg.work_dir.join(tag);
            let _ = std::fs::remove_dir_all(&run_dir);
            std::fs::create_dir_all(&run_dir)?;
            let template = std::fs::read_to_string(&cfg.changecast_config)
                .with_context(|| format!("reading {}", cfg.changecast_config.display()))?;
            let config = template
                .replace("@LISTEN@", &addr.to_string())
                .replace("@OPS_LISTEN@", &ops_addr.to_string())
                .replace(
                    "@CHECKPOINT@",
                    &run_dir.join("checkpoint").display().to_string(),
                );
            let config_path = run_dir.join("changecast.toml");
            std::fs::write(&config_path, config)?;
            let mut c = Command::new(cfg.bin_dir.join("changecast"));
            c.arg("run")
                .arg("--config")
                .arg(&config_path)
                .arg("--from-now")
                .current_dir(&run_dir)
                .env("MONGODB_URI", &uri)
                .env("CHANGECAST_JWT_SECRET", SECRET)
                .env("RUST_LOG", "warn");
            spawn(c, &log("server"), false)?
        }
        Target::Node => {
            let mut c = Command::new("node");
            c.arg("server.js")
                .current_dir(&cfg.node_dir)
                .env("PORT", port.to_string())
                .env("MONGODB_URI", &uri)
                .env("JWT_SECRET", SECRET);
            spawn(c, &log("server"), false)?
        }
        Target::Raw => unreachable_raw()?,
    };
    let ready = wait_ready(ready_addr, &mut server, Duration::from_secs(60)).await;
    if let Err(e) = ready {
        stop(&mut server).await;
        stop(&mut mongo).await;
        return Err(e);
    }
    Ok(Backed {
        mongo,
        server,
        uri,
        addr,
        ops_addr: ready_addr,
    })
}

fn unreachable_raw() -> anyhow::Result<Child> {
    anyhow::bail!("the raw server has no database")
}

fn spawn(mut command: Command, log: &Path, piped_stdout: bool) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stderr(file.try_clone()?)
        .kill_on_drop(true);
    if piped_stdout {
        command.stdout(Stdio::piped());
    } else {
        command.stdout(file);
    }
    command
        .spawn()
        .with_context(|| format!("starting {:?}", command.as_std().get_program()))
}

/// Reads the child's stdout until a line containing `needle`; the rest of stdout is drained in the background.
async fn first_line_with(
    child: &mut Child,
    needle: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("stdout not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(limit, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return anyhow::Ok(line);
            }
        }
        anyhow::bail!("exited before printing {needle:?}")
    })
    .await
    .with_context(|| format!("no {needle:?} within {limit:?}"))??;
    // Keep draining so a chatty child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

fn free_port() -> anyhow::Result<u16> {
    // Bind-and-release: the port could be taken in between, which only fails this run loudly.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `GET /readyz` until it answers 200, or the child exits.
async fn wait_ready(addr: SocketAddr, child: &mut Child, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("server exited before ready: {status}");
        }
        if let Ok(200) = http_status(addr, "/readyz").await {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "server not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    let text = std::str::from_utf8(&head)?;
    Ok(text.get(9..12).context("short status line")?.parse()?)
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SIGTERM first so servers can close sockets; SIGKILL after a grace period.
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}
