//! The durable resume token: a file or MongoDB store and the debounced checkpointer; knows nothing of events.
//!
//! Invariant: a token is saved only after every event before it reached the
//! hub, so a crash repeats at most one checkpoint window and a clean stop none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::Collection;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// What is saved per stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The resume token to restart after (may be a high-water mark newer than the last event).
    pub token: Document,
    /// Id of the newest event handed to the hub at save time, for operators and tests.
    pub last_event_id: Option<String>,
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
    pub fn file(path: impl Into<PathBuf>) -> Self {
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
                    saved_at: d.get_str("savedAt").unwrap_or_default().to_owned(),
                }))
            }
        }
    }

    /// Saves `cp` for `stream`, durably before returning.
    pub async fn save(&self, stream: &str, cp: &Checkpoint) -> Result<(), CheckpointError> {
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
                coll.replace_one(doc! {"_id": stream}, d)
                    .upsert(true)
                    .await?;
                Ok(())
            }
        }
    }

    /// Whether a save would succeed now (for `/readyz`), without changing any checkpoint.
    pub async fn probe(&self) -> Result<(), CheckpointError> {
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

/// Debounces saves of one stream's token: at most one save per `interval`,
/// or sooner after `every_events` events, and always on `flush`.
pub struct Checkpointer<'a> {
    store: &'a CheckpointStore,
    stream: String,
    interval: Duration,
    every_events: usize,
    pending: Option<(Document, Option<String>)>,
    events_since_save: usize,
    last_save: Instant,
    last_saved_token: Option<Document>,
}

impl<'a> Checkpointer<'a> {
    /// A checkpointer for `stream`.
    pub fn new(
        store: &'a CheckpointStore,
        stream: &str,
        interval: Duration,
        every_events: usize,
    ) -> Self {
        Self {
            store,
            stream: stream.to_owned(),
            interval,
            every_events: every_events.max(1),
            pending: None,
            events_since_save: 0,
            last_save: Instant::now(),
            last_saved_token: None,
        }
    }

    /// Records that everything up to `token` has reached the hub; `events` is how many events that covered.
    pub fn advance(&mut self, token: Document, last_event_id: Option<String>, events: usize) {
        let last = last_event_id.or_else(|| self.pending.as_ref().and_then(|(_, id)| id.clone()));
        self.pending = Some((token, last));
        self.events_since_save += events;
    }

    /// Saves if the debounce window has passed or enough events piled up.
    pub async fn maybe_save(&mut self) -> Result<bool, CheckpointError> {
        if self.pending.is_none() {
            return Ok(false);
        }
        if self.events_since_save >= self.every_events || self.last_save.elapsed() >= self.interval
        {
            self.flush().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Saves the pending token now (final save on shutdown).
    pub async fn flush(&mut self) -> Result<(), CheckpointError> {
        let Some((token, last_event_id)) = self.pending.clone() else {
            return Ok(());
        };
        if self.last_saved_token.as_ref() == Some(&token) {
            self.last_save = Instant::now();
            return Ok(());
        }
        let cp = Checkpoint {
            token: token.clone(),
            last_event_id,
            saved_at: now_rfc3339(),
        };
        // On failure the pending token stays and the next call retries it.
        self.store.save(&self.stream, &cp).await?;
        self.last_saved_token = Some(token);
        self.events_since_save = 0;
        self.last_save = Instant::now();
        Ok(())
    }

    /// Time since the last successful save.
    pub fn age(&self) -> Duration {
        self.last_save.elapsed()
    }
}

/// Current time as RFC 3339.
pub fn now_rfc3339() -> String {
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

    #[tokio::test]
    async fn checkpointer_debounces_and_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::file(dir.path().join("cp.json"));
        let mut cp = Checkpointer::new(&store, "app", Duration::from_secs(3600), 3);
        cp.advance(doc! {"_data": "8201"}, Some("8201".into()), 1);
        assert!(!cp.maybe_save().await.unwrap());
        assert_eq!(store.load("app").await.unwrap(), None);
        cp.advance(doc! {"_data": "8202"}, None, 2);
        assert!(cp.maybe_save().await.unwrap());
        let saved = store.load("app").await.unwrap().unwrap();
        assert_eq!(saved.token, doc! {"_data": "8202"});
        assert_eq!(saved.last_event_id.as_deref(), Some("8201"));
        cp.advance(doc! {"_data": "8203"}, None, 0);
        cp.flush().await.unwrap();
        assert_eq!(
            store.load("app").await.unwrap().unwrap().token,
            doc! {"_data": "8203"}
        );
    }
}
