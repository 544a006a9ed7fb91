//! `[mongodb]`: where the data is and what to watch.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use super::values::{check_name, dur, ser_duration, DurationLit, Secret};

/// `[mongodb]`: where the data is and what to watch.
#[derive(Debug, Clone, Serialize)]
pub struct MongoConfig {
    /// Connection string; default `mongodb://127.0.0.1:27017/?replicaSet=rs0`.
    /// Overridden by the `MONGODB_URI` environment variable. Never printed unmasked.
    #[serde(serialize_with = "ser_masked_uri")]
    pub(crate) uri: Secret,
    /// Databases to watch, one change stream each; default `["app"]`.
    pub databases: Vec<String>,
    /// Collection names in each database.
    pub(crate) collections: Collections,
    /// Collection holding checkpoints when `checkpoint.store = "mongo"`; default `changecast_checkpoints`.
    pub(crate) checkpoint_collection: String,
    /// How long to wait for the server when connecting; default `10s`.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) connect_timeout: Duration,
    /// A change event over 16 MiB that the server cannot split: `skip` (default) or `fail`.
    pub(crate) oversize: crate::pipeline::OversizePolicy,
}

/// The watched collection names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Collections {
    /// Orders; default `orders`.
    pub(crate) orders: String,
    /// Payments; default `payments`.
    pub(crate) payments: String,
    /// Store settings; default `settings`.
    pub(crate) settings: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMongo {
    uri: Option<String>,
    databases: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    collections: RawCollections,
    checkpoint_collection: Option<Spanned<String>>,
    connect_timeout: Option<DurationLit>,
    oversize: Option<RawOversize>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawOversize {
    Skip,
    Fail,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCollections {
    orders: Option<Spanned<String>>,
    payments: Option<Spanned<String>>,
    settings: Option<Spanned<String>>,
}

pub(super) fn convert(ctx: &Ctx<'_>, mongodb: RawMongo) -> Result<MongoConfig, ConfigError> {
    let uri = mongodb
        .uri
        .unwrap_or_else(|| "mongodb://127.0.0.1:27017/?replicaSet=rs0".to_owned());
    if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        // Not echoing the value: it may hold a password.
        return Err(ctx.err_nospan(
            "mongodb.uri",
            "must start with mongodb:// or mongodb+srv://",
        ));
    }
    let databases = match mongodb.databases {
        None => vec!["app".to_owned()],
        Some(d) => {
            let ok = !d.get_ref().is_empty()
                && d.get_ref()
                    .iter()
                    .all(|n| !n.is_empty() && !n.contains(['/', '\\', '.', ' ', '"', '$', '\0']));
            if !ok {
                return Err(ctx.err(
                    "mongodb.databases",
                    &d,
                    "needs at least one database name, without / \\ . space \" $",
                ));
            }
            d.into_inner()
        }
    };
    let coll = |key: &str, v: Option<Spanned<String>>, d: &str| match v {
        Some(v) => check_name(ctx, key, &v),
        None => Ok(d.to_owned()),
    };
    let collections = Collections {
        orders: coll(
            "mongodb.collections.orders",
            mongodb.collections.orders,
            "orders",
        )?,
        payments: coll(
            "mongodb.collections.payments",
            mongodb.collections.payments,
            "payments",
        )?,
        settings: coll(
            "mongodb.collections.settings",
            mongodb.collections.settings,
            "settings",
        )?,
    };
    let checkpoint_collection = coll(
        "mongodb.checkpoint_collection",
        mongodb.checkpoint_collection,
        "changecast_checkpoints",
    )?;
    let mongo = MongoConfig {
        uri: Secret::new(uri),
        databases,
        collections,
        checkpoint_collection,
        connect_timeout: dur(mongodb.connect_timeout, 10_000),
        oversize: match mongodb.oversize {
            None | Some(RawOversize::Skip) => crate::pipeline::OversizePolicy::Skip,
            Some(RawOversize::Fail) => crate::pipeline::OversizePolicy::Fail,
        },
    };
    Ok(mongo)
}

/// `mongodb://user:pass@host/...` → `mongodb://user:***@host/...`.
pub(super) fn mask_uri_password(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "***".to_owned();
    };
    // The userinfo ends at the last '@' before the first '/' (passwords may contain '@' only escaped, but be safe).
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = rest.get(..authority_end).unwrap_or(rest);
    let tail = rest.get(authority_end..).unwrap_or("");
    let tail = mask_query_secrets(tail);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = authority.get(..at).unwrap_or("");
            let hosts = authority.get(at + 1..).unwrap_or("");
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{hosts}{tail}")
            } else {
                format!("{scheme}://{user}@{hosts}{tail}")
            }
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// Masks query options that carry credentials (e.g. `authMechanismProperties=AWS_SESSION_TOKEN:…`).
fn mask_query_secrets(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _))
                if k.eq_ignore_ascii_case("authMechanismProperties")
                    || k.to_ascii_lowercase().contains("password") =>
            {
                format!("{k}=***")
            }
            _ => kv.to_owned(),
        })
        .collect();
    format!("{path}?{}", masked.join("&"))
}

fn ser_masked_uri<S: Serializer>(uri: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_uri_password(uri.expose()))
}
