//! The durable resume token: a file or MongoDB store and the debounced checkpointer; knows nothing of events.
//!
//! Invariant: a token is saved only after every event before it reached the
//! hub, so a crash repeats at most one checkpoint window and a clean stop none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::Collection;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Mutex};

use crate::event::EventId;
use crate::health::Health;

/// What is saved per stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The resume token to restart after (may be a high-water mark newer than the last event).
    pub token: Document,
    /// Id of the newest event handed to the hub at save time, for operators and tests.
    pub last_event_id: Option<String>,
    /// The stream's position at `token` (see `sequence`): the id of the last change read,
    /// or where the stream started. A restart numbers the next changes from it and
    /// warms its history up to it. Absent in checkpoints of earlier versions.
    pub position: Option<String>,
    /// When it was saved (RFC 3339).
    pub saved_at: String,
}

/// A checkpoint store failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("checkpoint file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a checkpoint this version wrote.
    #[error("checkpoint file {path} is not valid: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The MongoDB collection store failed.
    #[error("checkpoint collection: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// The writer task is gone (it panicked), so nothing more can be saved.
    #[error("the checkpoint writer task stopped")]
    WriterGone,
    /// The driver's resume token could not be written as a document (never seen; a
    /// newer token is tried at the next save).
    #[error("the server's resume token cannot be saved as a document")]
    Token,
}

/// A resume token as handed to the writer: per change the driver's own form (a byte
/// copy), turned into a document only when a save needs it. Converting every change's
/// token (through serde) was a visible share of following the stream.
#[derive(Debug, Clone)]
pub(crate) enum HandedToken {
    /// Already a document (a start point, a token from a checkpoint or the CLI).
    Doc(Document),
    /// The driver's token after a change or batch.
    Driver(ResumeToken),
}

impl From<Document> for HandedToken {
    fn from(d: Document) -> Self {
        Self::Doc(d)
    }
}

impl From<ResumeToken> for HandedToken {
    fn from(t: ResumeToken) -> Self {
        Self::Driver(t)
    }
}

impl HandedToken {
    fn into_document(self) -> Option<Document> {
        match self {
            Self::Doc(d) => Some(d),
            Self::Driver(t) => crate::token::to_document(&t),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct FileFormat {
    version: u32,
    streams: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileEntry {
    token: serde_json::Value,
    last_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<String>,
    saved_at: String,
}

/// Where checkpoints live.
pub enum CheckpointStore {
    /// A JSON file written with temp + fsync + rename; the mutex serializes streams sharing it.
    File {
        /// The file.
        path: PathBuf,
        /// Serializes read-modify-write between streams.
        lock: Mutex<()>,
    },
    /// A collection (for containers without a volume); excluded from the stream by its name.
    Mongo(Collection<Document>),
}

impl CheckpointStore {
    /// A file store.
    pub(crate) fn file(path: impl Into<PathBuf>) -> Self {
        Self::File {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }

    /// Loads the checkpoint of `stream` (a database name), if any.
    pub async fn load(&self, stream: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        match self {
            Self::File { path, lock } => {
                let _g = lock.lock().await;
                let file = read_file(path).await?;
                file.streams
                    .get(stream)
                    .map(|e| entry_to_checkpoint(path, e))
                    .transpose()
            }
            Self::Mongo(coll) => {
                let Some(d) = coll.find_one(doc! {"_id": stream}).await? else {
                    return Ok(None);
                };
                let token = d.get_document("token").cloned().map_err(|_| {
                    CheckpointError::Mongo(mongodb::error::Error::custom(
                        "checkpoint document has no token",
                    ))
                })?;
                Ok(Some(Checkpoint {
                    token,
                    last_event_id: d.get_str("lastEventId").ok().map(str::to_owned),
                    position: d.get_str("position").ok().map(str::to_owned),
                    saved_at: d.get_str("savedAt").unwrap_or_default().to_owned(),
                }))
            }
        }
    }

    /// Saves `cp` for `stream`, durably before returning.
    pub(crate) async fn save(&self, stream: &str, cp: &Checkpoint) -> Result<(), CheckpointError> {
        match self {
            Self::File { path, lock } => {
                let _g = lock.lock().await;
                let mut file = match read_file(path).await {
                    Ok(f) => f,
                    // Only reachable when the operator chose to ignore the stored token
                    // (a plain start refuses a corrupt file): replace it.
                    Err(e @ CheckpointError::Corrupt { .. }) => {
                        tracing::warn!(error = %e, "replacing the unreadable checkpoint file");
                        FileFormat::default()
                    }
                    Err(e) => return Err(e),
                };
                let token = bson::Bson::Document(cp.token.clone()).into_relaxed_extjson();
                file.version = 1;
                file.streams.insert(
                    stream.to_owned(),
                    FileEntry {
                        token,
                        last_event_id: cp.last_event_id.clone(),
                        position: cp.position.clone(),
                        saved_at: cp.saved_at.clone(),
                    },
                );
                let bytes =
                    serde_json::to_vec_pretty(&file).map_err(|e| CheckpointError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                write_atomically(path, &bytes)
                    .await
                    .map_err(|source| CheckpointError::Io {
                        path: path.clone(),
                        source,
                    })
            }
            Self::Mongo(coll) => {
                let mut d =
                    doc! {"_id": stream, "token": cp.token.clone(), "savedAt": &cp.saved_at};
                if let Some(id) = &cp.last_event_id {
                    d.insert("lastEventId", id);
                }
                if let Some(p) = &cp.position {
                    d.insert("position", p);
                }
                coll.replace_one(doc! {"_id": stream}, d)
                    .upsert(true)
                    .await?;
                Ok(())
            }
        }
    }

    /// Whether a save would succeed now, without changing any checkpoint (tested, not yet used).
    #[cfg(test)]
    pub(crate) async fn probe(&self) -> Result<(), CheckpointError> {
        match self {
            Self::File { path, .. } => {
                let dir = parent_dir(path);
                let probe = dir.join(format!(".changecast-probe-{}", std::process::id()));
                let io = |source| CheckpointError::Io {
                    path: probe.clone(),
                    source,
                };
                tokio::fs::write(&probe, b"ok").await.map_err(io)?;
                tokio::fs::remove_file(&probe).await.map_err(io)?;
                Ok(())
            }
            Self::Mongo(coll) => {
                coll.find_one(doc! {"_id": "__probe__"}).await?;
                Ok(())
            }
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

async fn read_file(path: &Path) -> Result<FileFormat, CheckpointError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileFormat::default()),
        Err(source) => Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn entry_to_checkpoint(path: &Path, e: &FileEntry) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |reason: &str| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let token = match bson::Bson::try_from(e.token.clone()) {
        Ok(bson::Bson::Document(d)) => d,
        _ => return Err(corrupt("token is not a document")),
    };
    Ok(Checkpoint {
        token,
        last_event_id: e.last_event_id.clone(),
        position: e.position.clone(),
        saved_at: e.saved_at.clone(),
    })
}

/// Temp file in the same directory, fsync, rename, fsync the directory: a
/// crash leaves either the old or the new checkpoint, never a torn one.
async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(bytes).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(&tmp, path).await?;
    if let Ok(d) = tokio::fs::File::open(&dir).await {
        // Directory fsync makes the rename durable; not all filesystems allow it.
        let _ = d.sync_all().await;
    }
    Ok(())
}

/// Saves one stream's token off the read path: the stream hands over its newest
/// token with [`CheckpointWriter::advance`] and never waits for the disk (an fsync
/// can take tens of milliseconds, and every change behind it would wait too).
///
/// At most one save per `interval`, or sooner once half of `every_events` events are
/// unsaved, and at once on [`CheckpointWriter::flush`]. The queue is one slot deep (a
/// `watch`): overflow policy — a newer token replaces an unsaved older one, which is safe
/// because the newer token covers every event before it.
///
/// A crash repeats at most `every_events` events: when that many are handed over and
/// unsaved (a save slower than the stream), [`CheckpointWriter::wait_for_room`] holds the
/// stream until the save in flight lands. Saves start at half a window so that this wait
/// only happens when the disk cannot keep up, not at every save.
pub(crate) struct CheckpointWriter {
    tx: watch::Sender<Pending>,
    outcome: watch::Receiver<Outcome>,
    task: tokio::task::JoinHandle<()>,
    seq: u64,
    events: u64,
    every_events: u64,
}

/// The newest token handed over (seq 0: none yet).
#[derive(Clone, Default)]
struct Pending {
    token: Option<HandedToken>,
    last_event_id: Option<EventId>,
    /// The stream's position at `token`.
    position: Option<EventId>,
    /// Events handed off in total, for the `every_events` trigger.
    events: u64,
    seq: u64,
    /// Tokens up to this seq are saved now, not at the end of the debounce window.
    urgent_seq: u64,
}

/// The result of the writer's newest attempt.
#[derive(Clone, Default)]
struct Outcome {
    /// Highest seq saved (or found already saved).
    saved: u64,
    /// The events handed over in total up to that seq.
    saved_events: u64,
    /// The seq of the newest failed attempt and why.
    failed: Option<(u64, Arc<CheckpointError>)>,
}

/// Wait after a failed save before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl CheckpointWriter {
    /// Starts the writer task of `stream`; its outcomes go to `health`.
    pub(crate) fn start(
        store: Arc<CheckpointStore>,
        health: Arc<Health>,
        stream: &str,
        interval: Duration,
        every_events: usize,
    ) -> Self {
        let (tx, rx) = watch::channel(Pending::default());
        let (outcome_tx, outcome) = watch::channel(Outcome::default());
        let every_events = every_events.max(1) as u64;
        let task = tokio::spawn(write_loop(WriteLoop {
            store,
            health,
            stream: stream.to_owned(),
            interval,
            save_after: every_events.div_ceil(2),
            rx,
            outcome: outcome_tx,
        }));
        Self {
            tx,
            outcome,
            task,
            seq: 0,
            events: 0,
            every_events,
        }
    }

    /// Records that everything up to `token` has reached the output; `events` is how many
    /// events that covered, `last_event_id` the newest of them and `position` the stream's
    /// position at `token` (see `Checkpoint::position`). Never waits.
    pub(crate) fn advance(
        &mut self,
        token: impl Into<HandedToken>,
        last_event_id: Option<EventId>,
        position: Option<EventId>,
        events: usize,
    ) {
        self.hand_over(token.into(), last_event_id, position, events, false);
    }

    /// Waits while `every_events` handed-over events are unsaved, so that a crash never
    /// repeats more than that; returns at once otherwise. Does not wait while the store is
    /// failing (the writer retries, logs and reports it to health): a broken store must
    /// not stop the stream.
    pub(crate) async fn wait_for_room(&mut self) {
        loop {
            {
                let o = self.outcome.borrow_and_update();
                let failing = o.failed.as_ref().is_some_and(|(seq, _)| *seq > o.saved);
                if self.events - o.saved_events < self.every_events || failing {
                    return;
                }
            }
            if self.outcome.changed().await.is_err() {
                return;
            }
        }
    }

    /// Hands over `token` and waits until it is saved (the start of a stream, shutdown).
    pub(crate) async fn flush_at(
        &mut self,
        token: Document,
        last_event_id: Option<EventId>,
        position: Option<EventId>,
    ) -> Result<(), Arc<CheckpointError>> {
        let seq = self.hand_over(token.into(), last_event_id, position, 0, true);
        self.wait_for(seq).await
    }

    /// Saves the newest handed-over token now and waits for the outcome.
    pub(crate) async fn flush(&mut self) -> Result<(), Arc<CheckpointError>> {
        let seq = self.seq;
        if seq == 0 {
            return Ok(());
        }
        self.tx.send_modify(|p| p.urgent_seq = seq);
        self.wait_for(seq).await
    }

    /// Flushes, then stops the writer task.
    pub(crate) async fn finish(mut self) -> Result<(), Arc<CheckpointError>> {
        let r = self.flush().await;
        drop(self.tx);
        let _ = self.task.await;
        r
    }

    fn hand_over(
        &mut self,
        token: HandedToken,
        last_event_id: Option<EventId>,
        position: Option<EventId>,
        events: usize,
        urgent: bool,
    ) -> u64 {
        self.seq += 1;
        self.events += events as u64;
        let (seq, total) = (self.seq, self.events);
        self.tx.send_modify(|p| {
            // An event-less token keeps the newest event id already handed over.
            if last_event_id.is_some() {
                p.last_event_id = last_event_id;
            }
            if position.is_some() {
                p.position = position;
            }
            p.token = Some(token);
            p.events = total;
            p.seq = seq;
            if urgent {
                p.urgent_seq = seq;
            }
        });
        seq
    }

    async fn wait_for(&mut self, seq: u64) -> Result<(), Arc<CheckpointError>> {
        loop {
            {
                let o = self.outcome.borrow_and_update();
                if o.saved >= seq {
                    return Ok(());
                }
                if let Some((failed, e)) = &o.failed {
                    if *failed >= seq {
                        return Err(e.clone());
                    }
                }
            }
            if self.outcome.changed().await.is_err() {
                return Err(Arc::new(CheckpointError::WriterGone));
            }
        }
    }
}

struct WriteLoop {
    store: Arc<CheckpointStore>,
    health: Arc<Health>,
    stream: String,
    interval: Duration,
    /// Unsaved events that make a save due before the interval ends (half a window).
    save_after: u64,
    rx: watch::Receiver<Pending>,
    outcome: watch::Sender<Outcome>,
}

async fn write_loop(mut w: WriteLoop) {
    let mut saved_seq = 0u64;
    let mut saved_events = 0u64;
    let mut saved_token: Option<Document> = None;
    let mut last_save = Instant::now();
    let mut retry_at: Option<Instant> = None;
    let mut open = true;
    loop {
        let cur = w.rx.borrow_and_update().clone();
        let Some(token) = cur.token.filter(|_| cur.seq > saved_seq) else {
            // Nothing unsaved: wait for a token, or stop once the stream is gone.
            if !open || w.rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let due =
            if !open || cur.urgent_seq > saved_seq || cur.events - saved_events >= w.save_after {
                Instant::now()
            } else {
                last_save + w.interval
            };
        // After a failure, wait out the retry delay even when urgent (a flush waiting on
        // this seq has already been told of the failure).
        let due = retry_at.map_or(due, |r| due.max(r));
        if Instant::now() < due {
            // One timer per window; new tokens only end the wait when they make a save due.
            let sleep = tokio::time::sleep_until(due.into());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    // Once the stream is gone, only the timer ends the wait (a closed
                    // channel answers at once: selecting on it would spin).
                    r = w.rx.changed(), if open => {
                        if r.is_err() {
                            open = false;
                            break;
                        }
                        let p = w.rx.borrow();
                        if retry_at.is_none()
                            && (p.urgent_seq > saved_seq || p.events - saved_events >= w.save_after)
                        {
                            break;
                        }
                    }
                    _ = &mut sleep => break,
                }
            }
            continue;
        }
        let token = token.into_document();
        let result = match &token {
            None => Err(CheckpointError::Token),
            // The same token (an idle stream): nothing new to write.
            Some(t) if saved_token.as_ref() == Some(t) => Ok(()),
            Some(t) => {
                let text = |id: &Option<EventId>| id.as_ref().map(|i| i.as_str().to_owned());
                let cp = Checkpoint {
                    token: t.clone(),
                    last_event_id: text(&cur.last_event_id),
                    position: text(&cur.position),
                    saved_at: now_rfc3339(),
                };
                w.store.save(&w.stream, &cp).await
            }
        };
        match result {
            Ok(()) => {
                saved_seq = cur.seq;
                saved_events = cur.events;
                saved_token = token;
                last_save = Instant::now();
                retry_at = None;
                w.health.set_checkpoint_ok(true);
                w.outcome.send_modify(|o| {
                    o.saved = cur.seq;
                    o.saved_events = cur.events;
                });
            }
            Err(e) => {
                w.health.set_checkpoint_ok(false);
                tracing::warn!(database = %w.stream, error = %e, "checkpoint save failed; will retry");
                retry_at = Some(Instant::now() + RETRY_AFTER);
                w.outcome
                    .send_modify(|o| o.failed = Some((cur.seq, Arc::new(e))));
                if !open {
                    // The stream is gone and the final save failed: nothing more to try.
                    return;
                }
            }
        }
    }
}

/// Current time as RFC 3339.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_per_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::file(dir.path().join("cp.json"));
        assert_eq!(store.load("app").await.unwrap(), None);
        let cp = Checkpoint {
            token: doc! {"_data": "8200000001"},
            last_event_id: Some("8200000001".into()),
            position: None,
            saved_at: now_rfc3339(),
        };
        store.save("app", &cp).await.unwrap();
        store
            .save(
                "other",
                &Checkpoint {
                    token: doc! {"_data": "82FF"},
                    ..cp.clone()
                },
            )
            .await
            .unwrap();
        assert_eq!(store.load("app").await.unwrap(), Some(cp));
        assert_eq!(
            store.load("other").await.unwrap().unwrap().token,
            doc! {"_data": "82FF"}
        );
        store.probe().await.unwrap();
    }

    #[tokio::test]
    async fn corrupt_file_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = CheckpointStore::file(&path).load("app").await.unwrap_err();
        assert!(err.to_string().contains("is not valid"), "{err}");
    }

    /// Polls the store until `want` is saved for "app" (the writer saves in the background).
    async fn saved_token(store: &CheckpointStore, want: &Document) -> bool {
        for _ in 0..200 {
            if store.load("app").await.unwrap().map(|c| c.token).as_ref() == Some(want) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// A writer saving to a fresh file store, and that store (the directory lives as long as the guard).
    fn file_writer(
        interval: Duration,
        every_events: usize,
    ) -> (tempfile::TempDir, Arc<CheckpointStore>, CheckpointWriter) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CheckpointStore::file(dir.path().join("cp.json")));
        let health = Arc::new(Health::new(["app"]));
        let w = CheckpointWriter::start(store.clone(), health, "app", interval, every_events);
        (dir, store, w)
    }

    #[tokio::test]
    async fn writer_debounces_saves_by_count_and_flushes() {
        let (_dir, store, mut w) = file_writer(Duration::from_secs(3600), 3);
        w.advance(doc! {"_data": "8201"}, Some(EventId::new("8201")), None, 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            store.load("app").await.unwrap(),
            None,
            "saved before the window"
        );
        // The third event crosses half of every_events: saved without waiting for the interval.
        w.advance(doc! {"_data": "8202"}, None, None, 2);
        assert!(saved_token(&store, &doc! {"_data": "8202"}).await);
        let saved = store.load("app").await.unwrap().unwrap();
        assert_eq!(saved.last_event_id.as_deref(), Some("8201"));
        w.advance(doc! {"_data": "8203"}, None, None, 0);
        w.finish().await.unwrap();
        assert_eq!(
            store.load("app").await.unwrap().unwrap().token,
            doc! {"_data": "8203"}
        );
    }

    #[tokio::test]
    async fn writer_saves_after_the_interval_and_flush_at_waits() {
        let (_dir, store, mut w) = file_writer(Duration::from_millis(100), 1_000_000);
        w.flush_at(doc! {"_data": "8200"}, None, None)
            .await
            .unwrap();
        assert_eq!(
            store.load("app").await.unwrap().unwrap().token,
            doc! {"_data": "8200"}
        );
        w.advance(doc! {"_data": "8205"}, Some(EventId::new("8205")), None, 1);
        assert!(saved_token(&store, &doc! {"_data": "8205"}).await);
        w.finish().await.unwrap();
    }

    /// Whether `wait_for_room` returns within `d`.
    async fn room(
        w: &mut CheckpointWriter,
        d: Duration,
    ) -> Result<(), tokio::time::error::Elapsed> {
        tokio::time::timeout(d, w.wait_for_room()).await
    }

    #[tokio::test]
    async fn the_stream_waits_only_while_a_whole_window_is_unsaved() {
        let (_dir, store, mut w) = file_writer(Duration::from_secs(3600), 4);
        // A save that cannot finish yet: the store's lock is held.
        let CheckpointStore::File { lock, .. } = &*store else {
            unreachable!()
        };
        let held = lock.lock().await;
        // Half a window makes a save due; the stream goes on while it is in flight.
        w.advance(doc! {"_data": "8201"}, Some(EventId::new("8201")), None, 2);
        room(&mut w, Duration::from_millis(300))
            .await
            .expect("waited with half a window unsaved");
        w.advance(doc! {"_data": "8202"}, Some(EventId::new("8202")), None, 1);
        room(&mut w, Duration::from_millis(300))
            .await
            .expect("waited with 3 of 4 unsaved");
        // A whole window unsaved: a crash now would repeat 4 events, so no more until a save lands.
        w.advance(doc! {"_data": "8203"}, Some(EventId::new("8203")), None, 1);
        room(&mut w, Duration::from_millis(300))
            .await
            .expect_err("went on with a whole window unsaved");
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), w.wait_for_room())
            .await
            .expect("still waiting after the save could finish");
        w.finish().await.unwrap();
        assert_eq!(
            store.load("app").await.unwrap().unwrap().token,
            doc! {"_data": "8203"}
        );
    }

    #[tokio::test]
    async fn a_failing_store_does_not_hold_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        std::fs::create_dir(&path).unwrap();
        let store = Arc::new(CheckpointStore::file(&path));
        let health = Arc::new(Health::new(["app"]));
        let mut w =
            CheckpointWriter::start(store, health.clone(), "app", Duration::from_secs(3600), 2);
        for i in 0..5u8 {
            w.advance(doc! {"_data": format!("820{i}")}, None, None, 1);
            tokio::time::timeout(Duration::from_secs(10), w.wait_for_room())
                .await
                .expect("held by a failing store");
        }
        assert!(!health.checkpoint_ok());
        assert!(w.finish().await.is_err());
    }

    #[tokio::test]
    async fn a_failed_save_is_reported_to_flush_and_health_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: every save fails.
        let path = dir.path().join("cp.json");
        std::fs::create_dir(&path).unwrap();
        let store = Arc::new(CheckpointStore::file(&path));
        let health = Arc::new(Health::new(["app"]));
        let mut w = CheckpointWriter::start(
            store.clone(),
            health.clone(),
            "app",
            Duration::from_millis(10),
            1,
        );
        let err = w
            .flush_at(doc! {"_data": "8201"}, None, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cp.json"), "{err}");
        assert!(!health.checkpoint_ok());
        // Once the store works again the retry saves the pending token.
        std::fs::remove_dir(&path).unwrap();
        assert!(saved_token(&store, &doc! {"_data": "8201"}).await);
        assert!(health.checkpoint_ok());
        w.finish().await.unwrap();
    }
}
