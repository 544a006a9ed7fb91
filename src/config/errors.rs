//! Configuration errors with their dotted key and `line:column`, and how a key is found from a position; knows nothing of any section.

use std::fmt;
use std::path::PathBuf;

use toml::Spanned;

/// Where in the configuration a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file name (or `env NAME` for an environment override).
    pub(crate) origin: String,
    /// 1-based line and column, when the parser knows them.
    pub(crate) line_col: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_col {
            Some((l, c)) => write!(f, "{}:{l}:{c}", self.origin),
            None => f.write_str(&self.origin),
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key is unknown, has the wrong type, or a value is out of range.
    #[error("{at}: {key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `server.ping_interval`; empty when the error is about the whole file.
        key: String,
        /// File and position.
        at: Location,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about (empty for read errors).
    #[cfg(test)]
    pub(crate) fn key(&self) -> &str {
        match self {
            ConfigError::Read { .. } => "",
            ConfigError::Invalid { key, .. } => key,
        }
    }
}

/// Converts a byte offset into 1-based line and column (columns in characters).
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Is `line` a table header such as `[server]` or `[[socketio.aliases]]`? Returns its dotted name.
pub(super) fn header_name(line: &str) -> Option<String> {
    let t = line.split('#').next().unwrap_or("").trim();
    let inner = t
        .strip_prefix("[[")
        .and_then(|s| s.strip_suffix("]]"))
        .or_else(|| t.strip_prefix('[').and_then(|s| s.strip_suffix(']')))?;
    let inner = inner.trim();
    let ok = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'"' | b' '));
    ok.then(|| inner.replace(['"', ' '], ""))
}

/// The key assigned on `line`, as in `name = value` or `a.b = value`.
pub(super) fn assigned_key(line: &str) -> Option<String> {
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    let ok = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'"' | b' '));
    ok.then(|| k.replace(['"', ' '], ""))
}

/// The dotted key at a byte offset, recovered from the text: the toml crate
/// does not expose the key path of its errors, but every error carries a span.
pub(super) fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let (line_no, _) = line_col(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let mut key: Option<String> = None;
    let mut table = String::new();
    // Walk back from the error line: the nearest `key =` (a multi-line array's
    // opening line) names the key, the nearest header names the table.
    for i in (0..line_no.min(lines.len())).rev() {
        let line = lines.get(i).copied().unwrap_or("");
        if let Some(h) = header_name(line) {
            if key.is_none() && i + 1 == line_no {
                return h;
            }
            table = h;
            break;
        }
        if key.is_none() {
            key = assigned_key(line);
        }
    }
    match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (_, None) => table,
    }
}

/// Builds the error for a value whose position is known.
pub(super) fn invalid_at(
    text: &str,
    origin: &str,
    key: impl Into<String>,
    span: std::ops::Range<usize>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        at: Location {
            origin: origin.to_owned(),
            line_col: Some(line_col(text, span.start)),
        },
        message: message.into(),
    }
}

/// What a section's conversion needs to report semantic errors, and the environment.
pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a str,
    /// Environment lookups (the JWT secret); injectable so tests need not touch the process env.
    pub(super) env: &'a dyn Fn(&str) -> Option<std::ffi::OsString>,
}

impl Ctx<'_> {
    pub(super) fn err<T>(
        &self,
        key: impl Into<String>,
        s: &Spanned<T>,
        msg: impl Into<String>,
    ) -> ConfigError {
        invalid_at(self.text, self.origin, key, s.span(), msg)
    }

    pub(super) fn err_nospan(&self, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            at: Location {
                origin: self.origin.to_owned(),
                line_col: None,
            },
            message: msg.into(),
        }
    }
}
