//! `[checkpoint]`: where and how often the resume token is saved.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use super::values::{dur, format_duration, nz, DurationLit};

/// Where checkpoints are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointStoreConfig {
    /// A JSON file (temp + fsync + rename), relative to the working directory.
    File {
        /// Default `changecast.checkpoint`.
        path: PathBuf,
    },
    /// A MongoDB collection in each watched database (`mongodb.checkpoint_collection`).
    Mongo {
        /// The collection name, copied from `mongodb.checkpoint_collection`.
        collection: String,
    },
}

/// `[checkpoint]`: the durable resume token.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    /// Where; default a file.
    pub store: CheckpointStoreConfig,
    /// Most time between saves while events flow; default `1s`.
    pub(crate) interval: Duration,
    /// A crash repeats at most this many events (saves start after half of them); default 1000.
    pub(crate) every_events: NonZeroUsize,
}

impl Serialize for CheckpointConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match &self.store {
            CheckpointStoreConfig::File { path } => {
                m.serialize_entry("store", "file")?;
                m.serialize_entry("path", &path.display().to_string())?;
            }
            CheckpointStoreConfig::Mongo { .. } => m.serialize_entry("store", "mongo")?,
        }
        m.serialize_entry("interval", &format_duration(self.interval))?;
        m.serialize_entry("every_events", &self.every_events.get())?;
        m.end()
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawStoreKind {
    File,
    Mongo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheckpoint {
    store: Option<RawStoreKind>,
    path: Option<Spanned<PathBuf>>,
    interval: Option<DurationLit>,
    every_events: Option<NonZeroUsize>,
}

pub(super) fn convert(
    ctx: &Ctx<'_>,
    checkpoint: RawCheckpoint,
    checkpoint_collection: &str,
) -> Result<CheckpointConfig, ConfigError> {
    let store = match checkpoint.store.unwrap_or(RawStoreKind::File) {
        RawStoreKind::File => CheckpointStoreConfig::File {
            path: match checkpoint.path {
                Some(p) if p.get_ref().as_os_str().is_empty() => {
                    return Err(ctx.err("checkpoint.path", &p, "must not be empty"))
                }
                Some(p) => p.into_inner(),
                None => PathBuf::from("changecast.checkpoint"),
            },
        },
        RawStoreKind::Mongo => {
            if let Some(p) = checkpoint.path {
                return Err(ctx.err(
                        "checkpoint.path",
                        &p,
                        "only used with store = \"file\"; the mongo store uses mongodb.checkpoint_collection",
                    ));
            }
            CheckpointStoreConfig::Mongo {
                collection: checkpoint_collection.to_owned(),
            }
        }
    };
    let checkpoint = CheckpointConfig {
        store,
        interval: dur(checkpoint.interval, 1_000),
        every_events: nz(checkpoint.every_events, 1000),
    };
    Ok(checkpoint)
}
