//! Source → mapper → output, one task per watched database, with checkpointing and the failure policy.
//!
//! Order of effects per change: map → hand to the output (hub or stdout) →
//! advance the checkpointer. The token is therefore never saved ahead of an
//! event the output has not taken: at-least-once into the hub.

use std::sync::Arc;
use std::time::Duration;

use bson::Document;
use mongodb::Client;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{CheckpointError, CheckpointStore, CheckpointWriter};
use crate::event::{EventId, RoutedEvent};
use crate::health::Health;
use crate::hub::Hub;
use crate::mapper::MapperFactory;
use crate::metrics::Metrics;
use crate::source::{Source, SourceError, SourceSpec};
use crate::token::{self, StartAt};

/// How much longer than its `max_await` a getMore may take before the stream counts as
/// stalled (not ready): room for a slow server without flapping readiness under load.
const STALL_GRACE: Duration = Duration::from_secs(3);

/// What to do when the stored token has fallen out of the oplog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HistoryLostPolicy {
    /// Exit non-zero and tell the operator the choices.
    Fail,
    /// Start from now and tell every room to resync.
    Resync,
}

/// Where routed events go.
#[derive(Clone)]
pub enum Output {
    /// The hub (normal operation).
    Hub(Arc<Hub>),
    /// One JSON line per routed event on stdout (`changecast tail`).
    Stdout,
}

/// Pipeline tunables (from config and CLI).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Databases to watch, one stream each.
    pub databases: Vec<String>,
    /// Collections to keep.
    pub collections: Vec<String>,
    /// `maxAwaitTimeMS` of each `getMore`.
    pub max_await: Duration,
    /// Debounce interval of checkpoint saves.
    pub checkpoint_interval: Duration,
    /// Save at least every this many events.
    pub checkpoint_every: usize,
    /// History-lost policy.
    pub on_history_lost: HistoryLostPolicy,
    /// Where to start instead of the stored checkpoint (CLI `--resume-token`, `--start-at`, `--from-now`).
    pub start_override: Option<StartAt>,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
}

/// Everything the pipeline needs.
#[derive(Clone)]
pub struct Pipeline {
    /// Driver client.
    pub client: Client,
    /// Checkpoint store.
    pub store: Arc<CheckpointStore>,
    /// Output.
    pub output: Output,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Builds one mapper per stream.
    pub mappers: MapperFactory,
    /// Tunables.
    pub cfg: PipelineConfig,
    /// Warms the hub's history from the oplog at start; `None` disables it.
    pub warm: Option<WarmUp>,
}

/// How a starting process fills its history from the oplog, so that clients who come
/// back after a restart, a deploy or a move from another replica recover from memory
/// instead of each opening a change stream.
#[derive(Clone)]
pub struct WarmUp {
    /// Mappers for the re-read changes (with metrics of their own: they were counted
    /// by the process that published them).
    pub mappers: MapperFactory,
    /// How far before the checkpoint to start (`hub.history_age`).
    pub age: Duration,
    /// Most changes read (`hub.history_len` plus margin): the hub keeps no more anyway.
    pub max_changes: usize,
    /// Longest the warm-up may take before the stream goes live without it.
    pub timeout: Duration,
}

/// Why the pipeline stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// History lost under the `fail` policy.
    #[error(
        "{0}. The resume token is older than the oldest oplog entry, so changes were missed. \
         Choose one: restart with --on-history-lost=resync (start from now and tell clients to resync), \
         --from-now (ignore the stored token), --start-at <time> (replay from a time still in the oplog), \
         or enlarge the oplog to avoid this in future"
    )]
    // The cause is the first sentence of the message, so it is not also a `source`
    // (main prints the source chain, which would repeat it).
    HistoryLost(SourceError),
    /// The server refused the stream for good (bad resume token, missing privilege, no replica set).
    #[error(
        "{0}. If the resume token is the problem (from another cluster, or mistyped), restart \
         with --from-now or --start-at <time>"
    )]
    Refused(SourceError),
    /// The stored checkpoint exists but cannot be used.
    #[error(
        "the stored checkpoint cannot be used; fix or remove it, or restart with --from-now or \
         --start-at <time> (the next save then replaces it)"
    )]
    Checkpoint(#[source] CheckpointError),
    /// Writing to stdout failed (e.g. the reader of `tail` went away).
    #[error("output closed: {0}")]
    Output(#[source] std::io::Error),
    /// A stream task panicked or was aborted.
    #[error("stream task failed: {0}")]
    Task(String),
}

impl Pipeline {
    /// Runs one stream per database until `stop` fires or one fails for good;
    /// a failure stops the others (they flush their checkpoints) and is returned.
    pub async fn run(self, stop: CancellationToken) -> Result<(), PipelineError> {
        let inner_stop = stop.child_token();
        let mut set = tokio::task::JoinSet::new();
        for db in self.cfg.databases.clone() {
            let p = self.clone();
            let s = inner_stop.clone();
            set.spawn(async move { p.run_stream(db, s).await });
        }
        let mut result = Ok(());
        while let Some(joined) = set.join_next().await {
            let outcome = joined.unwrap_or_else(|e| Err(PipelineError::Task(e.to_string())));
            if let Err(e) = outcome {
                inner_stop.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    async fn run_stream(&self, db: String, stop: CancellationToken) -> Result<(), PipelineError> {
        // An explicit start point ignores the stored one, even one that cannot be read.
        let stored = match &self.cfg.start_override {
            Some(_) => None,
            None => self.load_checkpoint(&db, &stop).await?,
        };
        let mut start = match (&self.cfg.start_override, stored) {
            (Some(o), _) => o.clone(),
            (None, Some(token)) => StartAt::Token(token),
            (None, None) => StartAt::Now,
        };
        // Saves run beside the stream, so a slow fsync never holds up the next change.
        let mut cp = CheckpointWriter::start(
            self.store.clone(),
            self.health.clone(),
            &db,
            self.cfg.checkpoint_interval,
            self.cfg.checkpoint_every,
        );
        let mut mapper = (self.mappers)();
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        let mut first_open = true;
        // Set when history was lost under `resync`: rooms are told once the new stream is
        // open, so a client that refetches on the notice cannot miss a change made after it.
        let mut resync_pending = false;
        let spec = SourceSpec {
            database: db.clone(),
            collections: self.cfg.collections.clone(),
            max_await: self.cfg.max_await,
        };
        if let (Output::Hub(hub), StartAt::Token(t), Some(warm)) =
            (&self.output, &start, &self.warm)
        {
            let warmed = tokio::select! {
                _ = stop.cancelled() => None,
                r = tokio::time::timeout(warm.timeout, warm_history(&self.client, &spec, hub, t, warm)) => Some(r),
            };
            match warmed {
                Some(Ok(Ok(n))) => {
                    tracing::info!(database = %db, changes = n, "history warmed from the oplog")
                }
                Some(Ok(Err(why))) => {
                    hub.discard_preload();
                    tracing::info!(database = %db, reason = %why, "history not warmed; recoveries before this start use the oplog");
                }
                Some(Err(_)) => {
                    hub.discard_preload();
                    tracing::warn!(database = %db, "history warm-up timed out; recoveries before this start use the oplog");
                }
                None => hub.discard_preload(),
            }
        }

        'reconnect: loop {
            if stop.is_cancelled() {
                break;
            }
            let opened = tokio::select! {
                _ = stop.cancelled() => break,
                r = Source::open(&self.client, spec.clone(), &start) => r,
            };
            let mut source = match opened {
                Ok(s) => s,
                Err(e) => {
                    if let Some(next) = self.on_error(&db, e, &mut mapper)? {
                        // A new start after a gap: a new floor and a new saved start point.
                        start = next;
                        first_open = true;
                        resync_pending = true;
                        continue 'reconnect;
                    }
                    if !backoff.wait(&stop).await {
                        break;
                    }
                    continue 'reconnect;
                }
            };
            self.health.set_stream_open(&db, true);
            if first_open {
                first_open = false;
                let floor = match &start {
                    StartAt::Token(t) => token::event_id(t),
                    _ => source.token().as_ref().and_then(token::event_id),
                };
                match &self.output {
                    Output::Hub(hub) if resync_pending => hub.resync_all("history_lost", floor),
                    Output::Hub(hub) => {
                        if let Some(floor) = floor {
                            hub.set_floor(floor);
                        }
                    }
                    Output::Stdout if resync_pending => print_line(&serde_json::json!({
                        "event": "system:resync", "reason": "history_lost", "database": &db,
                    }))
                    .map_err(PipelineError::Output)?,
                    Output::Stdout => {}
                }
                resync_pending = false;
                // Save where this stream starts before handing out any event, so a
                // crash before the first debounced save resumes here, not at "now".
                if let Some(t) = source.token() {
                    // The writer reports the outcome to health and retries a failure itself.
                    if let Err(e) = cp.flush_at(t, None).await {
                        tracing::warn!(database = %db, error = %e, "cannot save the starting checkpoint; will retry");
                    }
                }
                tracing::info!(database = %db, start = ?start_label(&start), "change stream open");
            } else {
                tracing::info!(database = %db, "change stream resumed");
            }

            loop {
                let next = {
                    // The driver retries a failed getMore internally (server selection can
                    // take `connect_timeout`), so an unreachable server shows up here as a
                    // getMore that outlives its `max_await`: not ready until it answers.
                    let fut = source.next();
                    tokio::pin!(fut);
                    let stall = tokio::time::sleep(self.cfg.max_await + STALL_GRACE);
                    tokio::pin!(stall);
                    let mut stalled = false;
                    let r = loop {
                        tokio::select! {
                            _ = stop.cancelled() => break 'reconnect,
                            r = &mut fut => break r,
                            _ = &mut stall, if !stalled => {
                                stalled = true;
                                self.health.set_stream_open(&db, false);
                                tracing::warn!(database = %db, "change stream stalled: the server has not answered; not ready until it does");
                            }
                        }
                    };
                    if stalled && r.is_ok() {
                        self.health.set_stream_open(&db, true);
                        tracing::info!(database = %db, "change stream answering again");
                    }
                    r
                };
                let change = match next {
                    Ok(c) => c,
                    Err(e) => {
                        self.health.set_stream_open(&db, false);
                        self.metrics.stream_reconnects.inc();
                        if let Some(t) = source.token() {
                            start = StartAt::Token(t);
                        }
                        if let Some(next) = self.on_error(&db, e, &mut mapper)? {
                            start = next;
                            first_open = true;
                            resync_pending = true;
                            continue 'reconnect;
                        }
                        if !backoff.wait(&stop).await {
                            break 'reconnect;
                        }
                        continue 'reconnect;
                    }
                };
                backoff.reset();
                let Some(tok) = source.token() else { continue };
                let (mut last_id, mut count) = (None, 0);
                if change.is_none() {
                    // An empty batch: the server had nothing newer, so the stream is current now.
                    self.health.observe_caught_up();
                }
                if let Some(change) = change {
                    let events = mapper.map(&change);
                    for ev in &events {
                        self.emit(ev)?;
                        last_id = Some(ev.event.id.as_str().to_owned());
                        count += 1;
                    }
                    if let Ok(ts) = change.get_timestamp("clusterTime") {
                        self.health.observe_cluster_time(ts.time);
                    }
                }
                if let Some(ts) = tok.get_str("_data").ok().and_then(token::cluster_time) {
                    self.health.observe_cluster_time(ts.time);
                }
                start = StartAt::Token(tok.clone());
                cp.advance(tok, last_id, count);
                // A crash repeats at most one checkpoint window: when a whole window is
                // handed out but unsaved (the disk slower than the stream), wait for the save.
                tokio::select! {
                    _ = stop.cancelled() => break 'reconnect,
                    () = cp.wait_for_room() => {}
                }
            }
        }

        self.health.set_stream_open(&db, false);
        match cp.finish().await {
            Ok(()) => tracing::info!(database = %db, "final checkpoint saved"),
            Err(e) => tracing::error!(database = %db, error = %e, "final checkpoint save failed"),
        }
        Ok(())
    }

    async fn load_checkpoint(
        &self,
        db: &str,
        stop: &CancellationToken,
    ) -> Result<Option<Document>, PipelineError> {
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        loop {
            match self.store.load(db).await {
                Ok(cp) => {
                    self.health.set_checkpoint_ok(true);
                    return Ok(cp.map(|c| c.token));
                }
                // Retrying cannot repair a file; the operator must choose.
                Err(e @ CheckpointError::Corrupt { .. }) => {
                    return Err(PipelineError::Checkpoint(e))
                }
                Err(e) => {
                    self.health.set_checkpoint_ok(false);
                    tracing::warn!(database = %db, error = %e, "cannot load checkpoint; retrying");
                    if !backoff.wait(stop).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Decides what a stream error means: `Ok(Some(start))` history was lost under
    /// `resync`, restart at `start` at once and tell every room; `Ok(None)` back off and
    /// retry from the last token; `Err` stop.
    fn on_error(
        &self,
        db: &str,
        e: SourceError,
        mapper: &mut crate::mapper::Mapper,
    ) -> Result<Option<StartAt>, PipelineError> {
        match e {
            SourceError::HistoryLost { .. } => {
                self.metrics.history_lost.inc();
                match self.cfg.on_history_lost {
                    HistoryLostPolicy::Fail => Err(PipelineError::HistoryLost(e)),
                    HistoryLostPolicy::Resync => {
                        tracing::warn!(database = %db, "history lost: starting from now and telling every room to resync");
                        // What the mapper remembers (previous statuses, delete owners) may be stale after the gap.
                        mapper.forget();
                        Ok(Some(StartAt::Now))
                    }
                }
            }
            SourceError::Fatal { .. } => Err(PipelineError::Refused(e)),
            other => {
                tracing::warn!(database = %db, error = %other, "change stream failed; reconnecting from the last token");
                Ok(None)
            }
        }
    }

    fn emit(&self, ev: &RoutedEvent) -> Result<(), PipelineError> {
        self.metrics
            .events_routed
            .get_or_create(&crate::metrics::EventLabels {
                event: ev.event.name.clone(),
            })
            .inc();
        match &self.output {
            Output::Hub(hub) => {
                hub.publish(ev);
                Ok(())
            }
            Output::Stdout => print_line(&tail_json(ev)).map_err(PipelineError::Output),
        }
    }
}

fn start_label(s: &StartAt) -> String {
    match s {
        StartAt::Token(t) => format!("after token {}", t.get_str("_data").unwrap_or("?")),
        StartAt::Time(ts) => format!("at {}", token::describe_time(*ts)),
        StartAt::Now => "now".into(),
    }
}

/// The `tail` line for one routed event.
pub fn tail_json(ev: &RoutedEvent) -> serde_json::Value {
    serde_json::json!({
        "id": ev.event.id,
        "event": ev.event.name,
        "ts": ev.event.ts_ms,
        "deliveries": ev.deliveries.iter().map(|d| serde_json::json!({"room": d.room, "data": d.data})).collect::<Vec<_>>(),
    })
}

fn print_line(v: &serde_json::Value) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    // Flushed per line: a SIGKILL must not lose lines whose token may already be checkpointed.
    out.write_all(b"\n")?;
    out.flush()
}

/// Exponential backoff between reconnects: 100 ms doubling to `max`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    /// Sleeps the current delay; false when `stop` fired first.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Re-reads the changes from `warm.age` before the checkpoint token `t` up to and
/// including `t` into the hub's history, without delivering them (the previous process
/// did). `Err` when the read could not be shown to reach the checkpoint's position: the
/// caller discards what was read, because a history with a hole would recover clients wrongly.
///
/// The checkpoint is not always an event's token: a stream that passed changes it does not
/// deliver (other collections, MongoDB's idle high-water marks) saves the post-batch token.
/// Resume tokens order as their `_data` (KeyString: cluster time first), so the warm-up is
/// complete at the first change past `t`, or when a batch's post-batch token reaches `t`.
async fn warm_history(
    client: &Client,
    spec: &SourceSpec,
    hub: &Hub,
    t: &Document,
    warm: &WarmUp,
) -> Result<usize, String> {
    let target = t
        .get_str("_data")
        .map_err(|_| "the checkpoint token has no _data")?;
    let until = token::cluster_time(target)
        .ok_or("the checkpoint token's time cannot be read (not a MongoDB KeyString token)")?;
    let from = bson::Timestamp {
        time: until
            .time
            .saturating_sub(u32::try_from(warm.age.as_secs()).unwrap_or(u32::MAX)),
        increment: 0,
    };
    let mut source = Source::open(client, spec.clone(), &StartAt::Time(from))
        .await
        .map_err(|e| e.to_string())?;
    // Everything from `from` on will be in history: the KeyString prefix of that time
    // sorts before every token at or after it (and after every earlier one), so it is
    // the floor; a position handed out by the previous process after `from` is covered.
    hub.set_floor(EventId::new(token::time_prefix(from)));
    let mut mapper = (warm.mappers)();
    let reached = |source: &Source| {
        source
            .token()
            .as_ref()
            .and_then(|d| d.get_str("_data").ok().map(|d| d >= target))
            .unwrap_or(false)
    };
    let mut n = 0;
    while n < warm.max_changes {
        let Some(change) = source.next().await.map_err(|e| e.to_string())? else {
            // An empty batch: complete if its post-batch token is at or past the checkpoint.
            if reached(&source) {
                return Ok(n);
            }
            continue;
        };
        let id = change
            .get_document("_id")
            .ok()
            .and_then(|d| d.get_str("_data").ok());
        let Some(id) = id else {
            return Err("a change without a resume token".into());
        };
        if id > target {
            // Past the checkpoint: the live stream publishes it.
            return Ok(n);
        }
        n += 1;
        for ev in mapper.map(&change) {
            hub.preload(&ev);
        }
        if id == target {
            return Ok(n);
        }
    }
    Err(format!(
        "more than {} changes before the checkpoint",
        warm.max_changes
    ))
}

/// The id of the newest event the hub holds, for the SIGTERM test and `token show`.
pub fn head_id(hub: &Hub) -> Option<EventId> {
    hub.head()
}
