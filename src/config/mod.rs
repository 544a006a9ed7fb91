//! The TOML configuration: raw serde mirror and its one-time conversion into typed per-component configs; reads no sockets or databases.
//!
//! Parse, don't validate: [`Config::from_toml_str`] turns the text into typed
//! values (`SocketAddr`, `Duration`, `NonZeroUsize`, [`Secret`], enums) once,
//! and every error names the dotted key and its `line:column` in the file.
//! Absent keys take the defaults documented on each field and in
//! `config.example.toml`.

mod auth;
mod checkpoint;
mod errors;
mod fields;
mod hub;
mod log;
mod mongodb;
mod normalize;
mod routing;
mod server;
mod socketio;
mod status;
mod streams;
#[cfg(test)]
mod tests;
mod values;

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

pub use checkpoint::{CheckpointConfig, CheckpointStoreConfig};
pub use errors::{ConfigError, Location};
pub(crate) use fields::FieldPaths;
pub use log::{LogConfig, LogFormat};
#[cfg(test)]
pub(crate) use mongodb::Collections;
pub(crate) use mongodb::MongoConfig;
pub(crate) use normalize::NormalizeConfig;
pub(crate) use routing::{Allowlists, RoutingConfig, SettingsSection};
pub(crate) use server::ServerConfig;
pub(crate) use socketio::{Alias, SocketIoConfig, EVENT_NAMES};
pub(crate) use values::Secret;

use crate::auth::AuthConfig;
use crate::declared::StreamDecl;
use crate::hub::HubConfig;
use crate::status::StatusTable;
use errors::{key_at, line_col, Ctx};
use values::format_duration;

/// The whole configuration, converted once from the TOML file.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[mongodb]`
    pub mongo: MongoConfig,
    /// `[fields]`
    pub(crate) fields: FieldPaths,
    /// `[status]`
    pub(crate) status: StatusTable,
    /// `[normalize]`
    pub(crate) normalize: NormalizeConfig,
    /// `[hub]`
    pub hub: HubConfig,
    /// `[checkpoint]`
    pub checkpoint: CheckpointConfig,
    /// `[server]`
    pub server: ServerConfig,
    /// `[socketio]`
    pub socketio: SocketIoConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[routing]`
    pub(crate) routing: RoutingConfig,
    /// `[[streams]]`: the app's own collections, declared (none by default).
    pub(crate) streams: Vec<StreamDecl>,
    /// `[auth]` (owned by `crate::auth`).
    pub auth: AuthConfig,
    /// The `[auth]` table as written, kept only to print it masked in `check-config`.
    auth_raw: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    mongodb: mongodb::RawMongo,
    #[serde(default)]
    fields: fields::RawFields,
    #[serde(default)]
    status: status::RawStatus,
    #[serde(default)]
    normalize: normalize::RawNormalize,
    #[serde(default)]
    hub: hub::RawHub,
    #[serde(default)]
    checkpoint: checkpoint::RawCheckpoint,
    #[serde(default)]
    server: server::RawServer,
    #[serde(default)]
    socketio: socketio::RawSocketIo,
    #[serde(default)]
    log: log::RawLog,
    #[serde(default)]
    routing: routing::RawRouting,
    #[serde(default)]
    streams: Vec<Spanned<streams::RawStream>>,
    #[serde(default)]
    auth: auth::RawAuth,
}

impl Config {
    /// Reads, parses and converts the file at `path`, then applies environment overrides
    /// (`MONGODB_URI` → `mongodb.uri`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::from_toml_str(&text, &path.display().to_string())?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Parses and converts TOML text; `origin` names it in errors (usually the file path).
    /// Reads only the environment variable `[auth] secret_env` names (the JWT secret).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::from_toml_str_with_env(text, origin, &|name| std::env::var_os(name))
    }

    /// [`Config::from_toml_str`] with the environment supplied by the caller.
    pub fn from_toml_str_with_env(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let (key, line_col) = match e.span() {
                Some(span) => (key_at(text, span.start), Some(line_col(text, span.start))),
                None => (String::new(), None),
            };
            ConfigError::Invalid {
                key,
                at: Location {
                    origin: origin.to_owned(),
                    line_col,
                },
                message: e.message().trim().to_owned(),
            }
        })?;
        // The masked echo of `[auth]` in `check-config` needs the table as written.
        let auth_raw = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|mut t| t.remove("auth"))
            .and_then(|v| match v {
                toml::Value::Table(t) => Some(t),
                _ => None,
            })
            .unwrap_or_default();
        let ctx = Ctx { text, origin, env };
        Self::convert(&ctx, raw, auth_raw)
    }

    /// Applies environment overrides: `MONGODB_URI` replaces `mongodb.uri` when set and non-empty.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(uri) = get("MONGODB_URI").filter(|s| !s.trim().is_empty()) {
            if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
                return Err(ConfigError::Invalid {
                    key: "mongodb.uri".into(),
                    at: Location {
                        origin: "env MONGODB_URI".into(),
                        line_col: None,
                    },
                    message: "must start with mongodb:// or mongodb+srv://".into(),
                });
            }
            self.mongo.uri = Secret::new(uri);
        }
        Ok(())
    }

    /// One conversion per section, in the order their errors are reported.
    fn convert(ctx: &Ctx<'_>, raw: Raw, auth_raw: toml::Table) -> Result<Config, ConfigError> {
        let mongo = mongodb::convert(ctx, raw.mongodb)?;
        let streams = streams::convert(
            ctx,
            raw.streams,
            &mongo.collections,
            &mongo.checkpoint_collection,
        )?;
        let fields = fields::convert(ctx, raw.fields)?;
        let status = status::convert(ctx, raw.status)?;
        let normalize = normalize::convert(raw.normalize);
        let hub = hub::convert(raw.hub);
        let checkpoint = checkpoint::convert(ctx, raw.checkpoint, &mongo.checkpoint_collection)?;
        let server = server::convert(ctx, raw.server)?;
        let socketio = socketio::convert(ctx, raw.socketio, &streams)?;
        let log = log::convert(ctx, raw.log)?;
        let routing = routing::convert(ctx, raw.routing)?;
        let auth = auth::convert(ctx, raw.auth, &mongo.databases)?;
        Ok(Config {
            mongo,
            fields,
            status,
            normalize,
            hub,
            checkpoint,
            server,
            socketio,
            log,
            routing,
            streams,
            auth,
            auth_raw,
        })
    }

    /// The effective configuration as TOML with secrets masked (`mongodb.uri`'s
    /// password, and every `[auth]` key that names a secret), for `changecast check-config`.
    pub fn effective_toml_masked(&self) -> String {
        let mut root = toml::Table::new();
        let mut put = |name: &str, v: Result<toml::Table, toml::ser::Error>| {
            if let Ok(t) = v {
                root.insert(name.to_owned(), toml::Value::Table(t));
            }
        };
        put("mongodb", toml::Table::try_from(&self.mongo));
        put("fields", toml::Table::try_from(&self.fields));
        put("status", toml::Table::try_from(&self.status));
        put("normalize", toml::Table::try_from(&self.normalize));
        let mut hub = toml::Table::new();
        hub.insert(
            "history_len".into(),
            toml::Value::Integer(i64::try_from(self.hub.history_len.get()).unwrap_or(i64::MAX)),
        );
        hub.insert(
            "history_age".into(),
            toml::Value::String(format_duration(self.hub.history_age)),
        );
        hub.insert(
            "mailbox_capacity".into(),
            toml::Value::Integer(
                i64::try_from(self.hub.mailbox_capacity.get()).unwrap_or(i64::MAX),
            ),
        );
        put("hub", Ok(hub));
        put("checkpoint", toml::Table::try_from(&self.checkpoint));
        put("server", toml::Table::try_from(&self.server));
        put("socketio", toml::Table::try_from(&self.socketio));
        put("log", toml::Table::try_from(&self.log));
        let routing = toml::Table::try_from(&self.routing).map(|mut t| {
            // Written back in the input's shape: `[routing.settings.<name>]`.
            t.remove("settings_sections");
            let mut secs = toml::Table::new();
            for s in &self.routing.settings_sections {
                let mut st = toml::Table::new();
                st.insert("public".into(), toml::Value::Boolean(s.public));
                st.insert(
                    "fields".into(),
                    toml::Value::Array(s.fields.iter().cloned().map(toml::Value::String).collect()),
                );
                secs.insert(s.name.clone(), toml::Value::Table(st));
            }
            t.insert("settings".into(), toml::Value::Table(secs));
            t
        });
        put("routing", routing);
        put("auth", Ok(auth::mask_table(&self.auth_raw)));
        if !self.streams.is_empty() {
            if let Ok(v) = toml::Value::try_from(&self.streams) {
                root.insert("streams".into(), v);
            }
        }
        toml::to_string(&root).unwrap_or_default()
    }
}

/// Test helper: parses `text` with a fixed JWT secret in place of the process environment.
#[cfg(test)]
pub(crate) fn test_config(text: &str, origin: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str_with_env(text, origin, &|name| {
        (name == crate::auth::DEFAULT_SECRET_ENV)
            .then(|| "unit-test-secret-unit-test-secret-0123".into())
    })
}
