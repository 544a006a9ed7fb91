//! One change stream per watched database: open, read, resume; knows nothing of events or rooms.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::change_stream::ChangeStream;
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::Client;

use crate::token::{self, StartAt};

/// MongoDB's `ChangeStreamHistoryLost`: the resume point has fallen out of the oplog.
pub const HISTORY_LOST: i32 = 286;

/// Server errors that retrying cannot fix, so the stream stops for the operator instead of
/// reconnecting forever: `Unauthorized` (13, the user lacks `changeStream`/`find`),
/// `InvalidResumeToken` (260, a token from another cluster or mistyped), the three ways
/// mongod refuses a token it cannot decode (`FailedToParse` 9 for one that is not hex,
/// 40649 for an empty one, 50811 for bytes that are no KeyString; SecantusDB answers 9 to
/// any token not its own), `ChangeStreamFatalError` (280), 40573 (change streams need a
/// replica set), and 40415 (an option the server does not know: `fullDocumentBeforeChange`
/// needs MongoDB 6.0+).
pub const FATAL_CODES: [i32; 8] = [9, 13, 260, 280, 40415, 40573, 40649, 50811];

/// Why a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The resume point is no longer in the oplog (code 286).
    #[error(
        "resume point of stream {database} is no longer in the oplog (ChangeStreamHistoryLost)"
    )]
    HistoryLost {
        /// The database whose stream failed.
        database: String,
    },
    /// The stream failed in a way a reconnect from the last token may fix.
    #[error("change stream on {database}: {detail}")]
    Mongo {
        /// The database.
        database: String,
        /// The server's or driver's reason, without the raw reply the driver's `Display` adds.
        detail: String,
    },
    /// The server refused the stream in a way no retry can fix (see [`FATAL_CODES`]).
    #[error("change stream on {database} refused: {detail}")]
    Fatal {
        /// The database.
        database: String,
        /// The server's reason.
        detail: String,
    },
    /// The server ended the stream (invalidate, e.g. the database was dropped).
    #[error("change stream on {database} was invalidated by the server")]
    Invalidated {
        /// The database.
        database: String,
    },
}

/// What the pipeline has found out about the server, shared with the replays.
#[derive(Debug, Default)]
pub struct ServerTraits {
    refuses_lost_history: std::sync::OnceLock<bool>,
}

impl ServerTraits {
    /// Whether a start at a time older than the server's history is known to fail loudly
    /// (see [`Source::refuses_lost_history`]); false until known.
    pub fn refuses_lost_history(&self) -> bool {
        self.refuses_lost_history.get().copied().unwrap_or(false)
    }

    /// Whether it has been asked yet.
    pub fn known(&self) -> bool {
        self.refuses_lost_history.get().is_some()
    }

    /// Records the answer (the first one counts).
    pub fn learn(&self, refuses_lost_history: bool) {
        let _ = self.refuses_lost_history.set(refuses_lost_history);
    }
}

/// What the stream watches and how.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// The database to watch.
    pub database: String,
    /// Collections kept by the `$match` (the app's orders, payments, settings).
    pub collections: Vec<String>,
    /// How long one `getMore` waits for changes; also how often an idle token advances.
    pub max_await: Duration,
}

/// An open change stream and the newest token it has handed out.
pub struct Source {
    spec: SourceSpec,
    stream: ChangeStream<Document>,
}

impl Source {
    /// Opens the stream at `start`.
    pub async fn open(
        client: &Client,
        spec: SourceSpec,
        start: &StartAt,
    ) -> Result<Self, SourceError> {
        let db = client.database(&spec.database);
        // Only the configured collections: the checkpoint collection and the
        // app's other collections never reach normalization.
        let pipeline = [doc! {"$match": {"ns.coll": {"$in": &spec.collections}}}];
        let mut watch = db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            // Pre-images where the collection records them (`changeStreamPreAndPostImages`,
            // MongoDB 6.0+): the owners of a delete, and of an update whose document is gone
            // by lookup time, then come from MongoDB rather than this process's memory.
            .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
            .max_await_time(spec.max_await);
        match start {
            StartAt::Token(t) => {
                // startAfter (not resumeAfter) also accepts an invalidate's token.
                let t = token::from_document(t).ok_or_else(|| SourceError::Fatal {
                    database: spec.database.clone(),
                    detail: "the resume token is not a BSON document".into(),
                })?;
                watch = watch.start_after(t);
            }
            StartAt::Time(ts) => watch = watch.start_at_operation_time(*ts),
            StartAt::Now => {}
        }
        let stream = watch.await.map_err(|e| classify(&spec.database, e))?;
        Ok(Self {
            spec,
            stream: stream.with_type::<Document>(),
        })
    }

    /// The server's current operation time, read from a one-document `find` in a session:
    /// a stream opened at it (inclusive) starts exactly "now" at a known position, which
    /// `StartAt::Now` does not tell. `None` when the server does not report it.
    pub async fn server_time(client: &Client, spec: &SourceSpec) -> Option<bson::Timestamp> {
        let coll = spec.collections.first()?;
        let mut session = client.start_session().await.ok()?;
        client
            .database(&spec.database)
            .collection::<Document>(coll)
            .find_one(doc! {})
            .session(&mut session)
            .await
            .ok()?;
        session.operation_time()
    }

    /// Whether the server refuses a stream that starts at a time older than its history
    /// (MongoDB: `ChangeStreamHistoryLost`) rather than silently starting later
    /// (SecantusDB does). Only where it refuses is a time-only position a safe start
    /// point. Asked once with a start in 1970; `None` when the answer is unclear.
    pub async fn refuses_lost_history(client: &Client, spec: &SourceSpec) -> Option<bool> {
        let probe = SourceSpec {
            max_await: Duration::from_millis(100),
            ..spec.clone()
        };
        let epoch = StartAt::Time(bson::Timestamp {
            time: 1,
            increment: 0,
        });
        match Self::open(client, probe, &epoch).await {
            Err(SourceError::HistoryLost { .. }) => Some(true),
            Err(_) => None,
            Ok(mut s) => match s.next().await {
                Err(SourceError::HistoryLost { .. }) => Some(true),
                Err(_) => None,
                Ok(_) => Some(false),
            },
        }
    }

    /// One `getMore`'s worth: the next change, or `None` when the batch was empty
    /// (the token still advances then, so an idle stream's checkpoint stays fresh).
    pub async fn next(&mut self) -> Result<Option<Document>, SourceError> {
        if !self.stream.is_alive() {
            return Err(SourceError::Invalidated {
                database: self.spec.database.clone(),
            });
        }
        self.stream
            .next_if_any()
            .await
            .map_err(|e| classify(&self.spec.database, e))
    }

    /// The token to resume after everything returned so far.
    pub fn token(&self) -> Option<Document> {
        self.stream
            .resume_token()
            .as_ref()
            .and_then(token::to_document)
    }

    /// The database watched.
    pub fn database(&self) -> &str {
        &self.spec.database
    }
}

/// The server error code of a driver error, if it carries one.
pub fn error_code(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

fn classify(database: &str, e: MongoError) -> SourceError {
    let database = database.to_owned();
    // The error kind alone: the driver's full `Display` appends the raw server reply as bytes.
    let detail = e.kind.to_string();
    match error_code(&e) {
        Some(HISTORY_LOST) => SourceError::HistoryLost { database },
        Some(code) if FATAL_CODES.contains(&code) => SourceError::Fatal { database, detail },
        _ => SourceError::Mongo { database, detail },
    }
}
