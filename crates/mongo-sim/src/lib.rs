//! mongo-sim: an in-memory MongoDB stand-in that official drivers accept as a single-node
//! replica-set primary (wire version 21), with change streams, fail points and persistence.
//!
//! Modules in reading order: [`wire`] (framing), `server` (connections), `commands`
//! (dispatch and handlers), `query`/`update`/`pipeline` (the document engine), `store` and
//! `oplog` (data and history), `changestream`, [`limits`] (mongod's size limits and their
//! error codes), `failpoint`, `persist`, `clock`.

pub mod limits;
pub mod wire;

mod changestream;
mod clock;
mod commands;
mod error;
mod failpoint;
mod oplog;
mod persist;
mod pipeline;
mod query;
mod server;
mod store;
mod update;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::server::{lock, Shared};

/// How long the flusher lets writes accumulate before saving the data file: bounds both the
/// write amplification under load and the window of writes a crash of the sim could lose.
const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// Server configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// TCP port; 0 picks a free one.
    pub port: u16,
    /// Address to bind (default 127.0.0.1).
    pub host: IpAddr,
    /// Replica-set name reported by `hello` (default `rs0`).
    pub repl_set: String,
    /// Oplog capacity in entries (one per write or DDL); older entries are dropped, and
    /// resuming before the oldest kept one fails with 286 `ChangeStreamHistoryLost`.
    pub oplog_size: usize,
    /// When set, data, clock and oplog are loaded from and saved to this file.
    pub data_file: Option<PathBuf>,
    /// Largest accepted message in bytes (default 48 MB, mongod's `maxMessageSizeBytes`).
    pub max_message_bytes: usize,
    /// Issue resume tokens that do NOT sort in commit order as strings (as SecantusDB's
    /// little-endian BSON tokens do, and as MongoDB-compatible services may), while
    /// still resuming from them exactly: for testing consumers that must not assume order.
    /// Off by default (mongod's KeyString tokens sort).
    pub unordered_tokens: bool,
    /// Answer `$changeStreamSplitLargeEvent` as MongoDB before 6.0.9 and 7.0 does (40324,
    /// unrecognized stage): for testing consumers on servers that cannot split events
    /// over 16 MiB. Off by default (mongo-sim reports 7.0, which splits).
    pub no_split_stage: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            port: 0,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            repl_set: "rs0".to_owned(),
            oplog_size: 100_000,
            data_file: None,
            max_message_bytes: 48_000_000,
            unordered_tokens: false,
            no_split_stage: false,
        }
    }
}

/// Entry point.
pub struct MongoSim;

struct Running {
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// A running (or stopped) server. Dropping it stops the server.
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: std::sync::Mutex<Option<Running>>,
    flusher_stop: CancellationToken,
    flusher: TaskTracker,
}

impl MongoSim {
    /// Loads the data file (if configured), binds and starts serving.
    pub async fn start(cfg: SimConfig) -> std::io::Result<SimHandle> {
        let state = match &cfg.data_file {
            Some(p) => persist::load(p, cfg.oplog_size)?,
            None => None,
        }
        .unwrap_or_else(|| store::State::new(cfg.oplog_size));
        let mut state = state;
        state.unordered_tokens = cfg.unordered_tokens;
        state.no_split_stage = cfg.no_split_stage;
        let listener = TcpListener::bind(SocketAddr::new(cfg.host, cfg.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(cfg, state);
        *lock(&shared.me) = format!("{}:{}", addr.ip(), addr.port());
        let handle = SimHandle {
            shared: shared.clone(),
            addr,
            running: std::sync::Mutex::new(None),
            flusher_stop: CancellationToken::new(),
            flusher: TaskTracker::new(),
        };
        handle.serve(listener);
        if shared.cfg.data_file.is_some() {
            handle
                .flusher
                .spawn(flusher(shared.clone(), handle.flusher_stop.clone()));
        }
        info!(%addr, "mongo-sim listening");
        Ok(handle)
    }
}

impl SimHandle {
    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(server::accept_loop(
            self.shared.clone(),
            listener,
            stop.clone(),
            tracker.clone(),
        ));
        *lock(&self.running) = Some(Running { stop, tracker });
    }

    /// `mongodb://HOST:PORT/?replicaSet=NAME`.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://{}:{}/?replicaSet={}",
            self.addr.ip(),
            self.addr.port(),
            self.shared.cfg.repl_set
        )
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Change streams opened so far (each successful `aggregate` with `$changeStream`):
    /// what a consumer costs the server, counted on the server's side.
    pub fn change_streams_opened(&self) -> u64 {
        self.shared
            .change_streams_opened
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every open connection (the listener keeps accepting), like a network blip.
    pub fn drop_all_connections(&self) {
        self.shared.drop_connections();
    }

    /// Closes the listener and every connection; keeps the data. Open cursors are lost,
    /// as they would be in a restarted mongod.
    pub async fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(r) = running {
            r.stop.cancel();
            r.tracker.close();
            r.tracker.wait().await;
        }
        lock(&self.shared.cursors).clear();
        self.flush().await;
    }

    /// Starts serving again on the same port (a primary restart).
    pub async fn restart(&self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    /// Flushes the data file and stops.
    pub async fn shutdown(self) {
        self.stop().await;
        self.flusher_stop.cancel();
        self.flusher.close();
        self.flusher.wait().await;
    }

    async fn flush(&self) {
        save(&self.shared).await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            r.stop.cancel();
        }
        self.flusher_stop.cancel();
        // Best effort: a dropped handle cannot await, so save synchronously.
        if let Some(path) = &self.shared.cfg.data_file {
            match self.shared.with_state(|st| persist::snapshot(st)) {
                Ok(bytes) => {
                    if let Err(e) = persist::write_atomic(path, &bytes) {
                        warn!(error = %e, "could not save the data file on drop");
                    }
                }
                Err(e) => warn!(error = %e, "could not snapshot on drop"),
            }
        }
    }
}

/// Saves the data file if one is configured.
async fn save(shared: &Arc<Shared>) {
    let Some(path) = shared.cfg.data_file.clone() else {
        return;
    };
    let bytes = match shared.with_state(|st| persist::snapshot(st)) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "could not snapshot the data");
            return;
        }
    };
    let written = tokio::task::spawn_blocking(move || persist::write_atomic(&path, &bytes)).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "could not write the data file"),
        Err(e) => warn!(error = %e, "data file writer failed"),
    }
}

/// Saves after each burst of commits, at most once per `FLUSH_DELAY`.
async fn flusher(shared: Arc<Shared>, stop: CancellationToken) {
    let mut commits = shared.commits.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = commits.changed() => if r.is_err() { break },
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(FLUSH_DELAY) => {}
        }
        commits.mark_unchanged();
        save(&shared).await;
    }
    save(&shared).await;
}
