//! Value parsers shared by the sections: durations, secrets, field paths and names; knows no section.

use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::errors::{invalid_at, ConfigError, Ctx};

/// A secret string whose `Debug`, `Display` and `Serialize` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub(crate) fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`: an integer and a unit. The one
/// duration parser of the file: every duration, `[auth]`'s included, is read
/// through [`DurationLit`] or [`DurationOrZero`], which call it.
///
/// A bare number is refused because its unit would be a guess. Zero is not
/// refused here but by [`DurationLit`], the type of every interval and timeout.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: expected a positive integer and a unit (ms, s, m, h), e.g. \"30s\""
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => {
            return Err(format!(
                "invalid duration {s:?}: a unit is required (ms, s, m, h), e.g. \"{n}s\""
            ))
        }
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?}, expected ms, s, m or h"
            ))
        }
    };
    let ms = n
        .checked_mul(ms_per)
        .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way the config file writes it (largest exact unit).
pub(super) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms != 0 && ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms != 0 && ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms != 0 && ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

pub(super) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// A duration literal in TOML, more than zero (every interval and timeout: a zero
/// interval makes `tokio::time::interval` panic); its own deserializer so that
/// errors carry the value's span.
#[derive(Debug, Clone, Copy)]
pub(super) struct DurationLit(pub(super) Duration);

/// A duration literal in TOML that may be zero (`auth.leeway`, `auth.order_cache_ttl`).
#[derive(Debug, Clone, Copy)]
pub(super) struct DurationOrZero(pub(super) Duration);

struct DurationVisitor {
    zero_ok: bool,
}

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string such as \"30s\", \"250ms\" or \"5m\"")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        match parse_duration(v) {
            Ok(d) if d.is_zero() && !self.zero_ok => Err(E::custom(format!(
                "invalid duration {:?}: must be greater than zero",
                v.trim()
            ))),
            Ok(d) => Ok(d),
            Err(e) => Err(E::custom(e)),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "a duration needs a unit: write \"{v}s\" or \"{v}ms\", not {v}"
        )))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "a duration needs a unit: write \"{v}s\" or \"{v}ms\", not {v}"
        )))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "a duration needs a unit and an integer, e.g. \"250ms\", not {v}"
        )))
    }
}

impl<'de> Deserialize<'de> for DurationLit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor { zero_ok: false })
            .map(DurationLit)
    }
}

impl<'de> Deserialize<'de> for DurationOrZero {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor { zero_ok: true })
            .map(DurationOrZero)
    }
}

/// One dotted path or a list of them (first present wins), as TOML allows both spellings.
#[derive(Debug, Clone)]
pub(super) struct OneOrMany(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a dotted field path or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

pub(super) fn dur(v: Option<DurationLit>, default_ms: u64) -> Duration {
    v.map_or(Duration::from_millis(default_ms), |d| d.0)
}

pub(super) fn nz(v: Option<NonZeroUsize>, default: usize) -> NonZeroUsize {
    v.or(NonZeroUsize::new(default))
        .unwrap_or(NonZeroUsize::MIN)
}

/// A dotted path is usable when no segment is empty and none starts with `$`.
pub(super) fn check_path(
    ctx: &Ctx<'_>,
    key: &str,
    p: &Spanned<String>,
) -> Result<String, ConfigError> {
    let s = p.get_ref();
    if s.is_empty()
        || s.split('.')
            .any(|seg| seg.is_empty() || seg.starts_with('$'))
    {
        return Err(ctx.err(
            key,
            p,
            format!("invalid field path {s:?}: expected dot-separated field names, e.g. \"customer.id\""),
        ));
    }
    Ok(s.clone())
}

pub(super) fn check_name(
    ctx: &Ctx<'_>,
    key: &str,
    v: &Spanned<String>,
) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if s.trim().is_empty() {
        return Err(ctx.err(key, v, "must not be empty"));
    }
    Ok(s.clone())
}

pub(super) fn paths(
    ctx: &Ctx<'_>,
    key: &str,
    v: Option<Spanned<OneOrMany>>,
    default: &[&str],
) -> Result<Vec<String>, ConfigError> {
    let Some(v) = v else {
        return Ok(strs(default));
    };
    let span = v.span();
    let list = v.into_inner().0;
    if list.is_empty() {
        return Err(invalid_at(
            ctx.text,
            ctx.origin,
            key,
            span,
            "needs at least one field path",
        ));
    }
    list.into_iter()
        .map(|p| check_path(ctx, key, &Spanned::new(span.clone(), p)))
        .collect()
}

pub(super) fn path(
    ctx: &Ctx<'_>,
    key: &str,
    v: Option<Spanned<String>>,
    default: &str,
) -> Result<String, ConfigError> {
    match v {
        Some(v) => check_path(ctx, key, &v),
        None => Ok(default.to_owned()),
    }
}

pub(super) fn allowlist(
    ctx: &Ctx<'_>,
    key: &str,
    v: Option<Vec<Spanned<String>>>,
    default: &[String],
) -> Result<Vec<String>, ConfigError> {
    match v {
        None => Ok(default.to_vec()),
        Some(list) => list.iter().map(|p| check_path(ctx, key, p)).collect(),
    }
}
