//! Source → mapper → output, one task per watched database, with checkpointing and the failure policy.
//!
//! Order of effects per change: map → hand to the output (hub or stdout) →
//! advance the checkpointer. The token is therefore never saved ahead of an
//! event the output has not taken: at-least-once into the hub.

use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore, CheckpointWriter};
use crate::event::{EventId, RoutedEvent};
use crate::health::Health;
use crate::hub::Hub;
use crate::mapper::MapperFactory;
use crate::metrics::Metrics;
use crate::sequence;
use crate::source::{ServerTraits, Source, SourceError, SourceSpec};
use crate::token::{self, StartAt};

/// How much longer than its `max_await` a getMore may take before the stream counts as
/// stalled (not ready): room for a slow server without flapping readiness under load.
const STALL_GRACE: Duration = Duration::from_secs(3);

/// Longest the start waits for the server's answer on starts before its history; without
/// one, time-only positions are not trusted (see `ServerTraits`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do when the stored token has fallen out of the oplog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HistoryLostPolicy {
    /// Exit non-zero and tell the operator the choices.
    Fail,
    /// Start from now and tell every room to resync.
    Resync,
}

/// What to do with a change event over the server's 16 MiB limit that the server
/// cannot split (no `$changeStreamSplitLargeEvent`, or one field alone is too large).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OversizePolicy {
    /// Skip that one change: count it (`events_dropped{reason="oversize"}`), log its id,
    /// tell its rooms to resync, go on.
    #[default]
    Skip,
    /// Stop with exit code 4 (`cli::exit::OVERSIZE`) and say which change it was.
    Fail,
}

/// Where routed events go.
#[derive(Clone)]
pub(crate) enum Output {
    /// The hub (normal operation).
    Hub(Arc<Hub>),
    /// One JSON line per routed event on stdout (`changecast tail`).
    Stdout,
}

/// Pipeline tunables (from config and CLI).
#[derive(Debug, Clone)]
pub(crate) struct PipelineConfig {
    /// Databases to watch, one stream each.
    pub(crate) databases: Vec<String>,
    /// Collections to keep.
    pub(crate) collections: Vec<String>,
    /// `maxAwaitTimeMS` of each `getMore`.
    pub(crate) max_await: Duration,
    /// Debounce interval of checkpoint saves.
    pub(crate) checkpoint_interval: Duration,
    /// Save at least every this many events.
    pub(crate) checkpoint_every: usize,
    /// History-lost policy.
    pub(crate) on_history_lost: HistoryLostPolicy,
    /// Oversized-event policy (`mongodb.oversize`).
    pub(crate) on_oversize: OversizePolicy,
    /// Paths into the documents that routing reads, kept when an oversized change is
    /// looked at without its documents (see `Source::peek_next`).
    pub(crate) routing_paths: Vec<String>,
    /// The document fields mapping reads (`SourceSpec::fields`); `None`: whole documents.
    pub(crate) document_fields: Option<Arc<[String]>>,
    /// Where to start instead of the stored checkpoint (CLI `--resume-token`, `--start-at`, `--from-now`).
    pub(crate) start_override: Option<StartAt>,
    /// Longest wait between reconnect attempts.
    pub(crate) max_backoff: Duration,
}

/// Everything the pipeline needs.
#[derive(Clone)]
pub(crate) struct Pipeline {
    /// Driver client.
    pub(crate) client: Client,
    /// Checkpoint store.
    pub(crate) store: Arc<CheckpointStore>,
    /// Output.
    pub(crate) output: Output,
    /// Metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Readiness.
    pub(crate) health: Arc<Health>,
    /// Builds one mapper per stream.
    pub(crate) mappers: MapperFactory,
    /// Tunables.
    pub(crate) cfg: PipelineConfig,
    /// Warms the hub's history from the oplog at start; `None` disables it.
    pub(crate) warm: Option<WarmUp>,
    /// What is known about the server (asked by the first stream; replays read it).
    pub(crate) server: Arc<ServerTraits>,
}

/// How a starting process fills its history from the oplog, so that clients who come
/// back after a restart, a deploy or a move from another replica recover from memory
/// instead of each opening a change stream.
#[derive(Clone)]
pub(crate) struct WarmUp {
    /// Mappers for the re-read changes (with metrics of their own: they were counted
    /// by the process that published them).
    pub(crate) mappers: MapperFactory,
    /// How far before the checkpoint to start (`hub.history_age`).
    pub(crate) age: Duration,
    /// Most changes read (`hub.history_len` plus margin): the hub keeps no more anyway.
    pub(crate) max_changes: usize,
    /// Longest the warm-up may take before the stream goes live without it.
    pub(crate) timeout: Duration,
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
    /// A change event over 16 MiB under `mongodb.oversize = "fail"`.
    #[error(
        "{0}. It was not published and the checkpoint stays before it. Choose one: set \
         mongodb.oversize = \"skip\" (skip it and tell its rooms to resync), use MongoDB 7.0 or \
         6.0.9+ (changecast then asks for split events), shrink the document, or restart \
         with --resume-token after it"
    )]
    Oversize(String),
    /// The server's change events cannot be put in commit order (no `clusterTime`, or
    /// one going back): refused loudly rather than publishing out of order.
    #[error(
        "{0}. changecast orders events, history and recovery by each change's clusterTime \
         (resume tokens are not assumed to sort), so it cannot run on this server. No event \
         was dropped: the stream stopped before publishing it. See README's supported servers"
    )]
    Unordered(String),
}

impl Pipeline {
    /// Runs one stream per database until `stop` fires or one fails for good;
    /// a failure stops the others (they flush their checkpoints) and is returned.
    pub(crate) async fn run(self, stop: CancellationToken) -> Result<(), PipelineError> {
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
        let mut mapper = (self.mappers)();
        // Where the stream starts, and the position (see `sequence`) it starts after when
        // known: the hub's floor and the numbering of the first changes follow from it.
        let (mut start, mut at) = match (&self.cfg.start_override, stored) {
            (Some(o), _) => (o.clone(), None),
            (None, Some(cp)) => (StartAt::Token(cp.token), cp.position.map(EventId::new)),
            (None, None) => (StartAt::Now, None),
        };
        // Saves run beside the stream, so a slow fsync never holds up the next change.
        let mut routed = RoutedCounters::default();
        let mut cp = CheckpointWriter::start(
            self.store.clone(),
            self.health.clone(),
            &db,
            self.cfg.checkpoint_interval,
            self.cfg.checkpoint_every,
        );
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        let mut first_open = true;
        // Set when history was lost under `resync`: rooms are told once the new stream is
        // open, so a client that refetches on the notice cannot miss a change made after it.
        let mut resync_pending = false;
        let mut spec = SourceSpec::new(&db, self.cfg.collections.clone(), self.cfg.max_await)
            .with_fields(self.cfg.document_fields.clone());
        // Set while looking for a change over 16 MiB: one change per batch, so the failing
        // `getMore` holds that change alone (see `skip_oversized`).
        let mut careful = false;
        if matches!(self.output, Output::Hub(_)) && !self.server.known() {
            // Asked once per process, before the history and the replays rely on it.
            let asked = tokio::select! {
                _ = stop.cancelled() => None,
                r = tokio::time::timeout(PROBE_TIMEOUT, Source::refuses_lost_history(&self.client, &spec)) => r.ok().flatten(),
            };
            if let Some(answer) = asked {
                tracing::info!(database = %db, refuses_lost_history = answer, "asked the server whether it refuses a start before its history");
                self.server.learn(answer);
            }
        }
        self.ask_split(&db, &mut spec, &stop).await;
        if let (Output::Hub(hub), StartAt::Token(_), Some(target), Some(warm)) =
            (&self.output, &start, &at, &self.warm)
        {
            let strict = self.server.refuses_lost_history();
            let warmed = tokio::select! {
                _ = stop.cancelled() => None,
                r = tokio::time::timeout(warm.timeout, warm_history(&self.client, &spec, hub, target, warm, strict)) => Some(r),
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
            if first_open {
                // "Now" becomes the server's present operation time, so the stream's start
                // is a position clients can be given and recover from (the token of an
                // empty stream is opaque on servers whose tokens do not sort).
                if start == StartAt::Now {
                    let now = tokio::select! {
                        _ = stop.cancelled() => break,
                        t = Source::server_time(&self.client, &spec) => t,
                    };
                    if let Some(t0) = now {
                        // Every change at `t0` committed before that read: "now" is after them.
                        let ts = match t0.increment.checked_add(1) {
                            Some(increment) => bson::Timestamp {
                                time: t0.time,
                                increment,
                            },
                            None => bson::Timestamp {
                                time: t0.time.saturating_add(1),
                                increment: 0,
                            },
                        };
                        start = StartAt::Time(ts);
                        at = Some(sequence::time_id(ts));
                    }
                }
                match &at {
                    Some(p) => mapper.resume_after(p),
                    None => mapper.restart_numbering(),
                }
            }
            // Asked again while unknown (the server was unreachable when the stream began).
            self.ask_split(&db, &mut spec, &stop).await;
            let open_spec = SourceSpec {
                batch_size: if careful { Some(1) } else { spec.batch_size },
                ..spec.clone()
            };
            let opened = tokio::select! {
                _ = stop.cancelled() => break,
                r = Source::open(&self.client, open_spec, &start) => r,
            };
            let mut source = match opened {
                Ok(s) => s,
                Err(SourceError::TooLarge { detail, .. }) => {
                    if careful {
                        if let Some(next) = self
                            .skip_oversized(&db, &spec, &start, &mut mapper, &mut cp)
                            .await?
                        {
                            start = next;
                            careful = false;
                            continue 'reconnect;
                        }
                    } else {
                        tracing::warn!(database = %db, error = %detail, "a change event is over 16 MiB; reading one change at a time to find it");
                        careful = true;
                        continue 'reconnect;
                    }
                    if !backoff.wait(&stop).await {
                        break;
                    }
                    continue 'reconnect;
                }
                Err(e) => {
                    if let Some(next) = self.on_error(&db, e, &mut mapper)? {
                        // A new start after a gap: a new floor and a new saved start point.
                        start = next;
                        at = None;
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
                // Events after `at` are all read here; without it (an operator's token or
                // time, or a server that does not report its time) the first change read
                // becomes the floor.
                match &self.output {
                    Output::Hub(hub) if resync_pending => {
                        hub.resync_all("history_lost", at.clone())
                    }
                    Output::Hub(hub) => {
                        if let Some(floor) = &at {
                            hub.set_floor(floor.clone());
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
                    if let Err(e) = cp.flush_at(t, None, at.clone()).await {
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
                    Err(SourceError::TooLarge { detail, .. }) => {
                        // Not a reconnect of the stream's own making: the server cannot
                        // return the next change, and resuming would meet it again.
                        if let Some(t) = source.token() {
                            start = StartAt::Token(t);
                        }
                        if careful {
                            match self
                                .skip_oversized(&db, &spec, &start, &mut mapper, &mut cp)
                                .await?
                            {
                                Some(next) => {
                                    start = next;
                                    careful = false;
                                }
                                None => {
                                    if !backoff.wait(&stop).await {
                                        break 'reconnect;
                                    }
                                }
                            }
                        } else {
                            tracing::warn!(database = %db, error = %detail, "a change event is over 16 MiB; reading one change at a time to find it");
                            careful = true;
                        }
                        continue 'reconnect;
                    }
                    Err(e) => {
                        self.health.set_stream_open(&db, false);
                        self.metrics.stream_reconnects.inc();
                        if let Some(t) = source.token() {
                            start = StartAt::Token(t);
                        }
                        if let Some(next) = self.on_error(&db, e, &mut mapper)? {
                            start = next;
                            at = None;
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
                // The driver's token as it is: made a document only by a save or a reconnect.
                let Some(tok) = source.resume_token() else {
                    continue;
                };
                let caught_up = change.is_none();
                let (mut last_id, mut count) = (None, 0);
                if change.is_none() {
                    // An empty batch: the server had nothing newer, so the stream is current now.
                    self.health.observe_caught_up();
                }
                if let Some(change) = change {
                    let events = match mapper.map_raw(&change) {
                        Ok(events) => events,
                        Err(e) => {
                            self.health.set_stream_open(&db, false);
                            tracing::error!(database = %db, error = %e, "change events out of commit order");
                            return Err(PipelineError::Unordered(format!("database {db}: {e}")));
                        }
                    };
                    if at.is_none() {
                        // The first change of a stream whose start is not known.
                        if let (Output::Hub(hub), Some(p)) = (&self.output, mapper.position()) {
                            hub.set_floor(p.clone());
                        }
                        at = mapper.position().cloned();
                    }
                    for ev in &events {
                        self.emit(ev, &mut routed)?;
                        last_id = Some(ev.event.id.clone());
                        count += 1;
                    }
                    if let Some(bson::RawBsonRef::Timestamp(ts)) =
                        crate::bsonscan::get(&change, "clusterTime")
                    {
                        self.health.observe_cluster_time(ts.time);
                    }
                }
                // `start` is brought up to the source's token where the stream is left
                // (errors, and here): not per change.
                cp.advance(tok, last_id, mapper.position().cloned(), count);
                if careful && caught_up {
                    // The oversized change is gone (changed or deleted before it was
                    // read again, so the lookup returns less): back to full batches.
                    if let Some(t) = source.token() {
                        start = StartAt::Token(t);
                    }
                    careful = false;
                    continue 'reconnect;
                }
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
    ) -> Result<Option<Checkpoint>, PipelineError> {
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        loop {
            match self.store.load(db).await {
                Ok(cp) => {
                    self.health.set_checkpoint_ok(true);
                    return Ok(cp);
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

    /// Learns, once per process, whether the server splits events over 16 MiB, and sets
    /// `spec` to ask for it where it does; a no-op once known.
    async fn ask_split(&self, db: &str, spec: &mut SourceSpec, stop: &CancellationToken) {
        if !self.server.split_known() {
            let asked = tokio::select! {
                _ = stop.cancelled() => None,
                r = tokio::time::timeout(PROBE_TIMEOUT, Source::splits_large_events(&self.client, spec)) => r.ok().flatten(),
            };
            if let Some(answer) = asked {
                tracing::info!(database = %db, splits_large_events = answer, "asked the server whether it splits change events over 16 MiB");
                self.server.learn_split(answer);
            }
        }
        spec.split_large_events = self.server.splits_large_events();
    }

    /// After a one-change `getMore` from `start` failed with `BSONObjectTooLarge`: looks at
    /// the next change without its documents, then stops (`fail`) or publishes `resync`
    /// to its rooms in its place and returns the start after it (`skip`). `Ok(None)` when
    /// it could not be looked at (retry later).
    async fn skip_oversized(
        &self,
        db: &str,
        spec: &SourceSpec,
        start: &StartAt,
        mapper: &mut crate::mapper::Mapper,
        cp: &mut CheckpointWriter,
    ) -> Result<Option<StartAt>, PipelineError> {
        let reduced = match Source::peek_next(&self.client, spec, start, &self.cfg.routing_paths)
            .await
        {
            Ok(Some(c)) => c,
            Ok(None) => {
                tracing::warn!(database = %db, "the change over 16 MiB was not found again; retrying");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(database = %db, error = %e, "cannot look at the change over 16 MiB; retrying");
                return Ok(None);
            }
        };
        let Ok(token) = reduced.get_document("_id").cloned() else {
            tracing::warn!(database = %db, "the change over 16 MiB has no resume token; retrying");
            return Ok(None);
        };
        let what = describe(&reduced);
        if self.cfg.on_oversize == OversizePolicy::Fail {
            return Err(PipelineError::Oversize(format!(
                "database {db}: {what} is over the 16 MiB change event limit"
            )));
        }
        let events = mapper
            .skip(&reduced)
            .map_err(|e| PipelineError::Unordered(format!("database {db}: {e}")))?;
        let position = mapper.position().cloned();
        let id = position.as_ref().map(|p| p.as_str().to_owned());
        let rooms: Vec<String> = events
            .iter()
            .flat_map(|ev| ev.deliveries.iter().map(|d| d.room.as_str().to_owned()))
            .collect();
        tracing::warn!(database = %db, change = %what, id = id.as_deref().unwrap_or("-"), rooms = ?rooms, "skipped a change event over 16 MiB (mongodb.oversize = \"skip\"); its rooms are told to resync");
        match &self.output {
            Output::Hub(hub) => {
                for ev in &events {
                    hub.publish_gap(ev, "oversize");
                }
            }
            Output::Stdout => print_line(&serde_json::json!({
                "event": "system:resync", "reason": "oversize", "database": db,
                "id": id, "rooms": rooms,
            }))
            .map_err(PipelineError::Output)?,
        }
        let last = (!events.is_empty()).then(|| position.clone()).flatten();
        cp.advance(token.clone(), last, position, events.len());
        Ok(Some(StartAt::Token(token)))
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

    fn emit(&self, ev: &RoutedEvent, routed: &mut RoutedCounters) -> Result<(), PipelineError> {
        routed.get(&self.metrics, &ev.event.name).inc();
        match &self.output {
            Output::Hub(hub) => {
                hub.publish(ev);
                Ok(())
            }
            Output::Stdout => print_line(&tail_json(ev)).map_err(PipelineError::Output),
        }
    }
}

/// A stream's `events_routed` counters by event name: looking one up in the metric family
/// per event cost a name copy, a lock and a hash. Bounded by the event names a stream's
/// declarations and presets can produce (events share their stream's name texts, so the
/// pointer usually settles it).
#[derive(Default)]
struct RoutedCounters(Vec<(Arc<str>, Counter)>);

impl RoutedCounters {
    fn get(&mut self, metrics: &Metrics, name: &Arc<str>) -> &Counter {
        let i = match self
            .0
            .iter()
            .position(|(n, _)| Arc::ptr_eq(n, name) || n == name)
        {
            Some(i) => i,
            None => {
                let counter = metrics
                    .events_routed
                    .get_or_create(&crate::metrics::EventLabels {
                        event: name.to_string(),
                    })
                    .clone();
                self.0.push((name.clone(), counter));
                self.0.len() - 1
            }
        };
        &self.0[i].1
    }
}

/// A change by what identifies it without its documents, for logs and errors.
fn describe(change: &bson::Document) -> String {
    let ns = change.get_document("ns").ok();
    let part = |k: &str| ns.and_then(|n| n.get_str(k).ok()).unwrap_or("?");
    let key = change
        .get_document("documentKey")
        .map(|k| k.to_string())
        .unwrap_or_else(|_| "?".into());
    let time = change
        .get_timestamp("clusterTime")
        .map(|t| format!("{}:{}", t.time, t.increment))
        .unwrap_or_else(|_| "?".into());
    format!(
        "the {} of {}.{} {key} at cluster time {time}",
        change.get_str("operationType").unwrap_or("change"),
        part("db"),
        part("coll"),
    )
}

fn start_label(s: &StartAt) -> String {
    match s {
        StartAt::Token(t) => format!("after token {}", t.get_str("_data").unwrap_or("?")),
        StartAt::Time(ts) => format!("at {}", token::describe_time(*ts)),
        StartAt::Now => "now".into(),
    }
}

/// The `tail` line for one routed event.
pub(crate) fn tail_json(ev: &RoutedEvent) -> serde_json::Value {
    serde_json::json!({
        "id": ev.event.id,
        "token": sequence::token_of(&ev.event.id),
        "event": ev.event.name,
        "ts": ev.event.ts_ms,
        "deliveries": ev.deliveries.iter().map(|d| serde_json::json!({"room": d.room, "data": d.data.value()})).collect::<Vec<_>>(),
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

/// Re-reads the changes from `warm.age` before the checkpoint's position `target` up to
/// and including it into the hub's history, without delivering them (the previous
/// process did). Everything at or before `target` was published, and everything after
/// it the live stream publishes, so the warm-up ends at the first change after it (not
/// preloaded) or when it has caught up with the present. `Err` when it cannot read that
/// far: the caller discards what was read, because a history with a hole would recover
/// clients wrongly.
async fn warm_history(
    client: &Client,
    spec: &SourceSpec,
    hub: &Hub,
    target: &EventId,
    warm: &WarmUp,
    strict: bool,
) -> Result<usize, String> {
    let target_at = sequence::position(target)
        .ok_or("the checkpoint holds no stream position (saved by an earlier version)")?;
    let until = target_at.timestamp();
    let mut from = until
        .time
        .saturating_sub(u32::try_from(warm.age.as_secs()).unwrap_or(u32::MAX));
    let open_at = |time: u32| {
        let at = StartAt::Time(bson::Timestamp { time, increment: 0 });
        async move { Source::open(client, spec.clone(), &at).await }
    };
    // A server that keeps less history than `history_age` refuses the start (MongoDB does
    // when it is before the oplog's first entry): try later starts, halving the gap...
    let mut refused = None;
    let mut source = loop {
        match open_at(from).await {
            Ok(s) => break s,
            Err(SourceError::HistoryLost { .. }) if from < until.time => {
                refused = Some(from);
                from += (until.time - from).div_ceil(2);
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    // ...then back towards the oldest start it accepts, to the second: the first accepted
    // halving step can lie far after the oldest change kept (a server started 25 s ago
    // refuses 37 s back and accepts 18 s back), and clients whose `since` lies in that gap
    // would cost an oplog scan each. At most log2(history_age) more opens, once per start.
    while let Some(lo) = refused.filter(|lo| from - lo > 1) {
        let mid = lo + (from - lo) / 2;
        match open_at(mid).await {
            Ok(s) => {
                source = s;
                from = mid;
            }
            Err(SourceError::HistoryLost { .. }) => refused = Some(mid),
            Err(e) => return Err(e.to_string()),
        }
    }
    let from = bson::Timestamp {
        time: from,
        increment: 0,
    };
    let mut mapper = (warm.mappers)();
    mapper.resume_after(&sequence::time_id(from));
    if strict {
        // The server would have refused a start before its history: everything from
        // `from` on is read, so a position handed out after `from` is covered.
        hub.set_floor(sequence::time_id(from));
    }
    let mut n = 0;
    let mut empty_batches = 0;
    while n < warm.max_changes {
        let Some(change) = source.next().await.map_err(|e| e.to_string())? else {
            // An empty batch ends the warm-up once the stream has read the checkpoint's
            // change (a first batch may be empty with a backlog behind it): then nothing
            // after it exists yet. A checkpoint that is a position without a change (no
            // change was read before it) is passed once a `getMore`, not the first
            // batch, finds nothing newer. The caller's timeout bounds the wait.
            empty_batches += 1;
            let reached = mapper.position().is_some_and(|p| p >= target)
                || (target_at.index.is_none() && empty_batches >= 2);
            if reached {
                return Ok(n);
            }
            continue;
        };
        if mapper.peek_id(&change).is_ok_and(|id| id > *target) {
            // Past the checkpoint: the live stream publishes it.
            return Ok(n);
        }
        let events = mapper.map_raw(&change).map_err(|e| e.to_string())?;
        if n == 0 && !strict {
            // History covers what follows the oldest change read, not `from`: a server
            // that silently starts later than asked (SecantusDB does when `from` is older
            // than its history) must not make the hub claim changes it never saw.
            if let Some(p) = mapper.position() {
                hub.set_floor(p.clone());
            }
        }
        n += 1;
        for ev in events {
            hub.preload(&ev);
        }
    }
    Err(format!(
        "more than {} changes before the checkpoint",
        warm.max_changes
    ))
}
