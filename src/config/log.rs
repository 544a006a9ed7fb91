//! `[log]`: the tracing filter and the line format.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `changecast=debug,info`; default `info`.
    /// `RUST_LOG` takes precedence when set (applied by `main`).
    pub level: String,
    /// Default `pretty`; the CLI's `--log-format` overrides it.
    pub format: LogFormat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    level: Option<Spanned<String>>,
    format: Option<LogFormat>,
}

pub(super) fn convert(ctx: &Ctx<'_>, log: RawLog) -> Result<LogConfig, ConfigError> {
    let level = match log.level {
        None => "info".to_owned(),
        Some(l) => {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(l.get_ref()) {
                return Err(ctx.err("log.level", &l, format!("invalid filter: {e}")));
            }
            l.into_inner()
        }
    };
    let log = LogConfig {
        level,
        format: log.format.unwrap_or(LogFormat::Pretty),
    };
    Ok(log)
}
