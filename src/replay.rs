//! Recovery beyond the in-memory history: shared oplog scans, one change stream per database at a time however many clients wait.
//!
//! A restart, a deploy or a replica move brings thousands of clients back at once.
//! One change stream per client would put that storm on the app's primary (MongoDB
//! warns that more change streams than pool connections delay notifications). So
//! requests queue to one scheduler: it takes every request waiting, opens one stream
//! per database from the oldest `since` among them, and hands each request the events
//! of its room after its own `since` (up to its `until`). A batch gathers while
//! requests keep arriving (up to a second); requests that arrive during a scan wait
//! for the next one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::doc;
use futures::future::BoxFuture;
use mongodb::Client;
use tokio::sync::{mpsc, oneshot};

use crate::event::EventId;
use crate::gateway::Replayer;
use crate::hub::{messages_for, Message};
use crate::idcodec::IdCodec;
use crate::mapper::MapperFactory;
use crate::metrics::Metrics;
use crate::room::Room;
use crate::sequence;
use crate::source::{Source, SourceSpec};
use crate::token::StartAt;

/// Requests that may wait for a scan. Overflow policy: the request is refused at once
/// (the client is told to resync); nothing is queued beyond it.
pub(crate) const MAX_WAITING: usize = 20_000;

/// Longest a recovery waits for its shared scan to begin (a storm's later arrivals wait
/// for the scan ahead of them); past it the client is told to resync.
pub(crate) const MAX_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// How long the scheduler waits for one more request before it scans: a storm's
/// clients arrive over a while, and one scan should serve as many as it can. A lone
/// recovery pays this once.
const GATHER: Duration = Duration::from_millis(150);

/// Longest a batch keeps gathering while requests keep arriving, so a long storm
/// still gets scans started.
const GATHER_MAX: Duration = Duration::from_secs(1);

/// What a replay scans and with what.
pub(crate) struct ReplayConfig {
    /// Driver client.
    pub(crate) client: Client,
    /// Watched databases.
    pub(crate) databases: Vec<String>,
    /// Watched collections.
    pub(crate) collections: Vec<String>,
    /// The document fields mapping reads (`SourceSpec::fields`): a replay asks for what
    /// the live stream does, so its payloads are the live ones.
    pub(crate) document_fields: Option<Arc<[String]>>,
    /// A fresh mapper per scan.
    pub(crate) mappers: MapperFactory,
    /// Most changes one scan may read before the requests it serves give up (resync).
    pub(crate) max_changes: usize,
    /// Seals the replayed events' ids as the hub does.
    pub(crate) ids: Arc<IdCodec>,
    /// Counts the change streams opened.
    pub(crate) metrics: Arc<Metrics>,
    /// Whether a start at a time is safe (the server refuses one before its history).
    pub(crate) server: Arc<crate::source::ServerTraits>,
}

/// One client's recovery: the events of `room` after `since`, up to `until`.
struct Request {
    room: Room,
    since: EventId,
    until: Option<EventId>,
    /// Told when the scan serving this request begins: `server.replay_timeout` counts
    /// from there, not from the wait behind other clients' scans.
    started: Option<oneshot::Sender<()>>,
    reply: oneshot::Sender<Result<Vec<Message>, String>>,
}

/// The [`Replayer`] the gateway uses: a handle to the shared scheduler.
pub(crate) struct OplogReplayer {
    tx: mpsc::Sender<Request>,
}

impl OplogReplayer {
    /// Starts the scheduler task (it ends when every handle is dropped).
    pub(crate) fn start(cfg: ReplayConfig) -> Self {
        let (tx, rx) = mpsc::channel(MAX_WAITING);
        tokio::spawn(schedule(cfg, rx));
        Self { tx }
    }
}

impl Replayer for OplogReplayer {
    fn replay<'a>(
        &'a self,
        room: &'a Room,
        since: &'a EventId,
        until: Option<EventId>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<Message>, String>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let (started, begun) = oneshot::channel();
            let req = Request {
                room: room.clone(),
                since: since.clone(),
                until,
                started: Some(started),
                reply,
            };
            self.tx
                .try_send(req)
                .map_err(|_| format!("more than {MAX_WAITING} recoveries waiting for the oplog"))?;
            match tokio::time::timeout(MAX_QUEUE_WAIT, begun).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("the replay scheduler stopped".into()),
                Err(_) => return Err("waited too long for a replay scan".into()),
            }
            match tokio::time::timeout(timeout, answer).await {
                Ok(r) => r.unwrap_or_else(|_| Err("the replay scheduler stopped".into())),
                Err(_) => Err("timed out".into()),
            }
        })
    }
}

async fn schedule(cfg: ReplayConfig, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        // Gather while requests keep coming (each one extends the wait by GATHER),
        // up to GATHER_MAX.
        let last_call = tokio::time::Instant::now() + GATHER_MAX;
        loop {
            let wait = GATHER.min(last_call.saturating_duration_since(tokio::time::Instant::now()));
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        // Clients that gave up (their join timed out) need no scan.
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        for r in &mut batch {
            if let Some(s) = r.started.take() {
                let _ = s.send(());
            }
        }
        let outcome = scan(&cfg, &batch).await;
        for (r, result) in batch.into_iter().zip(outcome) {
            let _ = r.reply.send(result);
        }
    }
}

/// Serves `batch` with one stream per database; one result per request, in order.
async fn scan(cfg: &ReplayConfig, batch: &[Request]) -> Vec<Result<Vec<Message>, String>> {
    let mut out: Vec<Result<Vec<Message>, String>> = batch.iter().map(|_| Ok(Vec::new())).collect();
    // A position that is no change can only be resumed at its time, which a server that
    // silently starts later than asked would answer with a hole: those clients resync.
    if !cfg.server.refuses_lost_history() {
        for (r, o) in batch.iter().zip(out.iter_mut()) {
            if sequence::position(&r.since).is_some_and(|p| p.index.is_none()) {
                *o = Err(
                    "a position without a change cannot be resumed safely on this server".into(),
                );
            }
        }
    }
    let open: Vec<bool> = out.iter().map(Result::is_ok).collect();
    for db in &cfg.databases {
        if let Err(e) = scan_db(cfg, db, batch, &open, &mut out).await {
            for o in out.iter_mut().filter(|o| o.is_ok()) {
                *o = Err(e.clone());
            }
        }
    }
    for o in out.iter_mut().flatten() {
        // Streams of several databases interleave in commit order by id.
        o.sort_by(|a, b| a.id().cmp(&b.id()));
    }
    out
}

async fn scan_db(
    cfg: &ReplayConfig,
    database: &str,
    batch: &[Request],
    open: &[bool],
    out: &mut [Result<Vec<Message>, String>],
) -> Result<(), String> {
    let served = || batch.iter().zip(open).filter(|(_, o)| **o).map(|(r, _)| r);
    let Some(oldest) = served().map(|r| &r.since).min() else {
        return Ok(());
    };
    // The scan ends at the newest `until` (or the present when one has none).
    let until: Option<&EventId> = if served().any(|r| r.until.is_none()) {
        None
    } else {
        served().filter_map(|r| r.until.as_ref()).max()
    };
    let mut by_room: HashMap<&Room, Vec<usize>> = HashMap::new();
    for (i, r) in batch.iter().enumerate().filter(|(i, _)| open[*i]) {
        by_room.entry(&r.room).or_default().push(i);
    }
    // Short waits: an empty batch means the scan has caught up with the present.
    let mut spec = SourceSpec::new(database, cfg.collections.clone(), Duration::from_millis(50))
        .with_fields(cfg.document_fields.clone());
    // A change over 16 MiB fails the scan unless the server splits it: those clients are
    // told to resync (the live stream skipped it the same way, or reassembled it too).
    spec.split_large_events = cfg.server.splits_large_events();
    let mut mapper = (cfg.mappers)();
    // After the oldest `since`'s change (its token), at its time when it is a position
    // that is no change, or after a bare token of the earlier id form.
    let start = match (sequence::position(oldest), sequence::token_of(oldest)) {
        (Some(p), None) => StartAt::Time(p.timestamp()),
        (_, Some(token)) => StartAt::Token(doc! {"_data": token}),
        (None, None) => return Err(format!("unusable position {oldest}")),
    };
    match sequence::position(oldest) {
        Some(_) => mapper.resume_after(oldest),
        None => mapper.restart_numbering(),
    }
    cfg.metrics.replay_streams_opened.inc();
    let mut source = Source::open(&cfg.client, spec, &start)
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..cfg.max_changes {
        let Some(change) = source.next().await.map_err(|e| e.to_string())? else {
            // An empty batch: caught up with the present, unless the hub is still ahead
            // (its newest event, which this stream will read, is not read yet).
            let reached = match until {
                None => true,
                Some(u) => mapper.position().is_some_and(|p| p >= u),
            };
            if reached {
                return Ok(());
            }
            continue;
        };
        for ev in mapper.map_raw(&change).map_err(|e| e.to_string())? {
            let id = &ev.event.id;
            if until.is_some_and(|u| id > u) {
                return Ok(());
            }
            let mut messages: Option<Vec<Message>> = None;
            for d in &ev.deliveries {
                let Some(waiting) = by_room.get(&d.room) else {
                    continue;
                };
                let msgs = messages.get_or_insert_with(|| messages_for(&ev, &cfg.ids));
                let Some(m) = msgs.iter().find(|m| *m.room() == d.room) else {
                    continue;
                };
                for &i in waiting {
                    let r = &batch[i];
                    if *id > r.since && r.until.as_ref().is_none_or(|u| id <= u) {
                        if let Ok(v) = &mut out[i] {
                            v.push(m.clone());
                        }
                    }
                }
            }
        }
    }
    Err(format!("more than {} changes to replay", cfg.max_changes))
}
