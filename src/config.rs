//! The TOML configuration: raw serde mirror and its one-time conversion into typed per-component configs; reads no sockets or databases.
//!
//! Parse, don't validate: [`Config::from_toml_str`] turns the text into typed
//! values (`SocketAddr`, `Duration`, `NonZeroUsize`, [`Secret`], enums) once,
//! and every error names the dotted key and its `line:column` in the file.
//! Absent keys take the defaults documented on each field and in
//! `config.example.toml`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::auth::{AuthConfig, RawAuthConfig};
use crate::declared::{EventNames, StreamAllow, StreamDecl, StreamRooms, StreamStatus};
use crate::hub::HubConfig;
use crate::room::RoomKind;

// ---------------------------------------------------------------------------
// Errors

/// Where in the configuration a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file name (or `env NAME` for an environment override).
    pub origin: String,
    /// 1-based line and column, when the parser knows them.
    pub line_col: Option<(usize, usize)>,
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
    pub fn key(&self) -> &str {
        match self {
            ConfigError::Read { .. } => "",
            ConfigError::Invalid { key, .. } => key,
        }
    }
}

/// Converts a byte offset into 1-based line and column (columns in characters).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Is `line` a table header such as `[server]` or `[[socketio.aliases]]`? Returns its dotted name.
fn header_name(line: &str) -> Option<String> {
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
fn assigned_key(line: &str) -> Option<String> {
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    let ok = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'"' | b' '));
    ok.then(|| k.replace(['"', ' '], ""))
}

/// The dotted key at a byte offset, recovered from the text: the toml crate
/// does not expose the key path of its errors, but every error carries a span.
fn key_at(text: &str, offset: usize) -> String {
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
fn invalid_at(
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

/// Accumulates the context needed to report semantic errors.
struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
    /// Environment lookups (the JWT secret); injectable so tests need not touch the process env.
    env: &'a dyn Fn(&str) -> Option<std::ffi::OsString>,
}

impl Ctx<'_> {
    fn err<T>(
        &self,
        key: impl Into<String>,
        s: &Spanned<T>,
        msg: impl Into<String>,
    ) -> ConfigError {
        invalid_at(self.text, self.origin, key, s.span(), msg)
    }

    fn err_nospan(&self, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
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

// ---------------------------------------------------------------------------
// Value types

/// A secret string whose `Debug`, `Display` and `Serialize` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
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

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`: a positive integer and a unit.
///
/// A bare number is refused because its unit would be a guess; zero is
/// refused because every duration here is an interval or a timeout, and a
/// zero interval makes `tokio::time::interval` panic.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
    if ms == 0 {
        return Err(format!("invalid duration {s:?}: must be greater than zero"));
    }
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way the config file writes it (largest exact unit).
pub fn format_duration(d: Duration) -> String {
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

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// A duration literal in TOML; its own deserializer so that errors carry the value's span.
#[derive(Debug, Clone, Copy)]
struct DurationLit(Duration);

impl<'de> Deserialize<'de> for DurationLit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationLit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\", \"250ms\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationLit, E> {
                parse_duration(v).map(DurationLit).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationLit, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{v}s\" or \"{v}ms\", not {v}"
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationLit, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{v}s\" or \"{v}ms\", not {v}"
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationLit, E> {
                Err(E::custom(format!(
                    "a duration needs a unit and an integer, e.g. \"250ms\", not {v}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// One dotted path or a list of them (first present wins), as TOML allows both spellings.
#[derive(Debug, Clone)]
struct OneOrMany(Vec<String>);

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

// ---------------------------------------------------------------------------
// Canonical statuses (the targets of the status table)

/// Canonical order statuses: the flow `pending → processing → ready_for_pickup |
/// ready_for_delivery → driver_assigned → picked_up → in_transit → delivered`, plus `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OrderStatus {
    /// `pending`
    Pending,
    /// `processing`
    Processing,
    /// `ready_for_pickup`
    ReadyForPickup,
    /// `ready_for_delivery`
    ReadyForDelivery,
    /// `driver_assigned`
    DriverAssigned,
    /// `picked_up`
    PickedUp,
    /// `in_transit`
    InTransit,
    /// `delivered`
    Delivered,
    /// `cancelled`
    Cancelled,
}

impl OrderStatus {
    /// Every canonical order status.
    pub const ALL: [OrderStatus; 9] = [
        Self::Pending,
        Self::Processing,
        Self::ReadyForPickup,
        Self::ReadyForDelivery,
        Self::DriverAssigned,
        Self::PickedUp,
        Self::InTransit,
        Self::Delivered,
        Self::Cancelled,
    ];

    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::ReadyForPickup => "ready_for_pickup",
            Self::ReadyForDelivery => "ready_for_delivery",
            Self::DriverAssigned => "driver_assigned",
            Self::PickedUp => "picked_up",
            Self::InTransit => "in_transit",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a canonical name (exact, lower case).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Position in the flow as a percentage: pending 0, processing 20, ready_* 40,
    /// driver_assigned 55, picked_up 70, in_transit 85, delivered 100.
    ///
    /// `cancelled` is terminal but not a point on the flow, so it has no
    /// progress (`None`) rather than a misleading 0 or 100.
    pub fn progress(self) -> Option<u8> {
        match self {
            Self::Pending => Some(0),
            Self::Processing => Some(20),
            Self::ReadyForPickup | Self::ReadyForDelivery => Some(40),
            Self::DriverAssigned => Some(55),
            Self::PickedUp => Some(70),
            Self::InTransit => Some(85),
            Self::Delivered => Some(100),
            Self::Cancelled => None,
        }
    }
}

/// What a raw order status maps to: a fixed canonical status, or `ready`,
/// which splits into `ready_for_pickup` / `ready_for_delivery` by the order's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderTarget {
    /// Always this status.
    Fixed(OrderStatus),
    /// `ready_for_pickup` when the order type is a pickup type, else `ready_for_delivery`.
    ReadyByType,
}

impl OrderTarget {
    fn parse(s: &str) -> Option<Self> {
        if s == "ready" {
            Some(Self::ReadyByType)
        } else {
            OrderStatus::parse(s).map(Self::Fixed)
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Fixed(s) => s.as_str(),
            Self::ReadyByType => "ready",
        }
    }
}

impl Serialize for OrderTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Canonical payment statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentStatus {
    /// `pending`
    Pending,
    /// `succeeded`
    Succeeded,
    /// `failed`
    Failed,
    /// `canceled` (Stripe's spelling, which the payment apps use)
    Canceled,
    /// `refunded`
    Refunded,
}

impl PaymentStatus {
    /// Every canonical payment status.
    pub const ALL: [PaymentStatus; 5] = [
        Self::Pending,
        Self::Succeeded,
        Self::Failed,
        Self::Canceled,
        Self::Refunded,
    ];

    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Refunded => "refunded",
        }
    }

    /// Parses a canonical name (exact, lower case).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl Serialize for PaymentStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Canonical event names (the names `/ws` clients see; Socket.IO aliases map from these).
pub const EVENT_NAMES: [&str; 10] = [
    "order:created",
    "order:status_changed",
    "order:updated",
    "order:deleted",
    "payment:created",
    "payment:status_changed",
    "payment:updated",
    "payment:deleted",
    "settings:updated",
    "system:resync",
];

// ---------------------------------------------------------------------------
// Typed configuration

/// The whole configuration, converted once from the TOML file.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[mongodb]`
    pub mongo: MongoConfig,
    /// `[fields]`
    pub fields: FieldPaths,
    /// `[status]`
    pub status: StatusTable,
    /// `[normalize]`
    pub normalize: NormalizeConfig,
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
    pub routing: RoutingConfig,
    /// `[[streams]]`: the app's own collections, declared (none by default).
    pub streams: Vec<StreamDecl>,
    /// `[auth]` (owned by `crate::auth`).
    pub auth: AuthConfig,
    /// The `[auth]` table as written, kept only to print it masked in `check-config`.
    auth_raw: toml::Table,
}

/// `[mongodb]`: where the data is and what to watch.
#[derive(Debug, Clone, Serialize)]
pub struct MongoConfig {
    /// Connection string; default `mongodb://127.0.0.1:27017/?replicaSet=rs0`.
    /// Overridden by the `MONGODB_URI` environment variable. Never printed unmasked.
    #[serde(serialize_with = "ser_masked_uri")]
    pub uri: Secret,
    /// Databases to watch, one change stream each; default `["app"]`.
    pub databases: Vec<String>,
    /// Collection names in each database.
    pub collections: Collections,
    /// Collection holding checkpoints when `checkpoint.store = "mongo"`; default `changecast_checkpoints`.
    pub checkpoint_collection: String,
    /// How long to wait for the server when connecting; default `10s`.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// A change event over 16 MiB that the server cannot split: `skip` (default) or `fail`.
    pub oversize: crate::pipeline::OversizePolicy,
}

/// The watched collection names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Collections {
    /// Orders; default `orders`.
    pub orders: String,
    /// Payments; default `payments`.
    pub payments: String,
    /// Store settings; default `settings`.
    pub settings: String,
}

/// `[fields]`: dotted paths into the full document. Where a list is given, the first path present wins.
#[derive(Debug, Clone, Serialize)]
pub struct FieldPaths {
    /// The customer id in orders and payments; default `["customerId"]`.
    pub customer: Vec<String>,
    /// The store id in orders and payments; default `["storeId", "sellerId"]`.
    pub store: Vec<String>,
    /// The order id in payments; default `["orderId"]`.
    pub order_id: Vec<String>,
    /// The order status; default `status`.
    pub status: String,
    /// The order type (pickup vs delivery); default `orderType`.
    pub order_type: String,
    /// The payment status; default `status`.
    pub payment_status: String,
    /// The store id in settings documents; default `["storeId", "sellerId"]`.
    pub settings_store: Vec<String>,
}

/// `[status]`: raw status values → canonical ones. Lookups are case-insensitive and trim whitespace.
#[derive(Debug, Clone, Serialize)]
pub struct StatusTable {
    /// Raw order status (lower case) → target; defaults in [`default_order_map`],
    /// `[status.order]` entries are added on top of them.
    pub order: BTreeMap<String, OrderTarget>,
    /// Order type values (lower case) meaning pickup; anything else is delivery.
    /// Default `["pickup", "collection", "takeaway"]`.
    pub pickup_types: Vec<String>,
    /// Raw payment status (lower case) → canonical; defaults in [`default_payment_map`],
    /// `[status.payment]` entries are added on top of them.
    pub payment: BTreeMap<String, PaymentStatus>,
}

impl StatusTable {
    /// The canonical order status of `raw` for an order of type `order_type`; `None` when unknown.
    pub fn order_status(&self, raw: &str, order_type: Option<&str>) -> Option<OrderStatus> {
        let key = raw.trim().to_ascii_lowercase();
        match self.order.get(&key)? {
            OrderTarget::Fixed(s) => Some(*s),
            OrderTarget::ReadyByType => Some(if self.is_pickup(order_type) {
                OrderStatus::ReadyForPickup
            } else {
                OrderStatus::ReadyForDelivery
            }),
        }
    }

    /// Whether `order_type` is one of the pickup types (absent = delivery).
    pub fn is_pickup(&self, order_type: Option<&str>) -> bool {
        is_pickup_type(&self.pickup_types, order_type)
    }

    /// The canonical payment status of `raw`; `None` when unknown.
    pub fn payment_status(&self, raw: &str) -> Option<PaymentStatus> {
        self.payment.get(&raw.trim().to_ascii_lowercase()).copied()
    }
}

impl Default for StatusTable {
    fn default() -> Self {
        Self {
            order: default_order_map(),
            pickup_types: vec!["pickup".into(), "collection".into(), "takeaway".into()],
            payment: default_payment_map(),
        }
    }
}

/// Whether `kind` is one of `pickup_types` (lower case), case-insensitively; absent
/// means delivery. The rule of every `ready` split (orders, declared streams).
pub fn is_pickup_type(pickup_types: &[String], kind: Option<&str>) -> bool {
    kind.is_some_and(|t| {
        let t = t.trim().to_ascii_lowercase();
        pickup_types.contains(&t)
    })
}

/// The default order status map of the Node apps.
pub fn default_order_map() -> BTreeMap<String, OrderTarget> {
    use OrderStatus::*;
    use OrderTarget::*;
    [
        ("new", Fixed(Pending)),
        ("pending", Fixed(Pending)),
        ("accepted", Fixed(Processing)),
        ("processing", Fixed(Processing)),
        ("packing", Fixed(Processing)),
        ("ready", ReadyByType),
        ("ready_for_pickup", Fixed(ReadyForPickup)),
        ("ready_for_delivery", Fixed(ReadyForDelivery)),
        ("driver_assigned", Fixed(DriverAssigned)),
        ("picked_up", Fixed(PickedUp)),
        ("out_for_delivery", Fixed(InTransit)),
        ("in_transit", Fixed(InTransit)),
        ("completed", Fixed(Delivered)),
        ("delivered", Fixed(Delivered)),
        ("cancelled", Fixed(Cancelled)),
        ("canceled", Fixed(Cancelled)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The default payment status map (Stripe-like values).
pub fn default_payment_map() -> BTreeMap<String, PaymentStatus> {
    use PaymentStatus::*;
    [
        ("succeeded", Succeeded),
        ("paid", Succeeded),
        ("completed", Succeeded),
        ("pending", Pending),
        ("processing", Pending),
        ("requires_action", Pending),
        ("failed", Failed),
        ("canceled", Canceled),
        ("cancelled", Canceled),
        ("refunded", Refunded),
        ("partially_refunded", Refunded),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `[normalize]`: memory normalization may use.
#[derive(Debug, Clone, Serialize)]
pub struct NormalizeConfig {
    /// Most documents per stream whose last-seen status and owners are remembered
    /// (for `previousStatus` and for routing deletes without a pre-image); oldest
    /// evicted first. About 200 bytes each. Default 100000; 0 disables.
    pub state_cache_docs: usize,
}

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
    pub interval: Duration,
    /// A crash repeats at most this many events (saves start after half of them); default 1000.
    pub every_events: NonZeroUsize,
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

/// `[server]`: the listener and per-connection limits.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address for clients: `/ws`, `/socket.io/`, `/healthz`; default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Address for operators: `/metrics`, `/readyz`, `/healthz`; default `127.0.0.1:8081`
    /// (loopback: metrics name databases and count changes, which clients must not see).
    /// In a container, bind it to `0.0.0.0:8081` and do not publish the port publicly.
    pub ops_listen: SocketAddr,
    /// `Origin` values allowed to open sockets (exact match, e.g. `https://shop.example`).
    /// Empty (the default) allows every origin: then any web page a logged-in
    /// user visits can open a socket with their cookies/tokens (cross-site
    /// WebSocket hijacking) — set it in production.
    pub allowed_origins: Vec<String>,
    /// Largest inbound message, bytes; default 65536.
    pub max_message_bytes: NonZeroUsize,
    /// Rooms one connection may join explicitly; default 100.
    pub max_subscriptions_per_connection: NonZeroUsize,
    /// Inbound messages per second per connection; default 50.
    pub max_messages_per_second: NonZeroUsize,
    /// Simultaneous connections per token subject; default 20.
    pub max_connections_per_subject: NonZeroUsize,
    /// Simultaneous connections in total; default 50000.
    pub max_connections: NonZeroUsize,
    /// Time an unauthenticated socket may stay open; default `10s`. On `/ws` the
    /// `auth` message must come within it; on `/socket.io/` the Socket.IO CONNECT
    /// must succeed within it, or the Engine.IO session is closed.
    #[serde(serialize_with = "ser_duration")]
    pub auth_deadline: Duration,
    /// Time a client has to send a whole HTTP request head, counted from the
    /// moment the server waits for one: a new connection, and an idle keep-alive
    /// connection between requests (which is then closed); default `5s`.
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// Unauthenticated connections open at once: `/ws` sockets before a valid token
    /// and Engine.IO sessions before a successful Socket.IO CONNECT; default 1024.
    /// A pool apart from `max_connections`: a socket moves to that one when it
    /// authenticates, so anonymous peers never take a token holder's slot.
    /// Past it `/ws` answers 503 and the Engine.IO handshake 503, both
    /// `unauthenticated_overloaded`.
    pub max_unauthenticated: NonZeroUsize,
    /// Unauthenticated connections open at once from one peer address (IPv6 is
    /// counted by its /64); default 16; `0` disables the per-address cap. The address
    /// is the TCP peer's: behind a reverse proxy or load balancer every client
    /// shares the proxy's, so set `0` there (or a value near `max_unauthenticated`)
    /// and cap per client at the proxy. `X-Forwarded-For` is not trusted: any
    /// client could set it. Past it: 429 `unauthenticated_per_ip`.
    pub max_unauthenticated_per_ip: usize,
    /// Time between server pings; default `25s`.
    #[serde(serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// Time to wait for a pong before dropping the peer; default `20s`.
    #[serde(serialize_with = "ser_duration")]
    pub pong_timeout: Duration,
    /// Longest a single socket write may take; default `10s`.
    #[serde(serialize_with = "ser_duration")]
    pub write_timeout: Duration,
    /// Time for clients and the checkpoint to finish on shutdown; default `10s`.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Longest an oplog replay for `since` may run before answering `resync`; default `5s`.
    #[serde(serialize_with = "ser_duration")]
    pub replay_timeout: Duration,
}

/// `[socketio]`: the Socket.IO endpoint and its legacy event names.
#[derive(Debug, Clone, Serialize)]
pub struct SocketIoConfig {
    /// Serve `/socket.io/`; default true.
    pub enabled: bool,
    /// Extra names under which canonical events are also emitted.
    pub aliases: Vec<Alias>,
}

/// One legacy event name: when `event` is delivered to a room of one of `rooms`'
/// kinds (and, if `statuses` is set, the payload's normalized `status` is one of
/// them), Socket.IO clients in that room also receive it as `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alias {
    /// Canonical event name, one of [`EVENT_NAMES`].
    pub event: String,
    /// The legacy name, e.g. `newOrder`.
    pub name: String,
    /// Audience room kinds.
    #[serde(serialize_with = "ser_room_kinds")]
    pub rooms: Vec<RoomKind>,
    /// Only when the normalized status is one of these (canonical names: of orders and
    /// payments, or for a declared stream its `[streams.status]` targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statuses: Option<Vec<String>>,
}

/// The legacy event names the Node apps emit, on by default (config.example.toml lists
/// the same, and a test keeps the two equal).
pub fn default_aliases() -> Vec<Alias> {
    use RoomKind::{Customer, Order, Store, Storefront};
    let a = |event: &str, name: &str, rooms: &[RoomKind], statuses: Option<&[&str]>| Alias {
        event: event.to_owned(),
        name: name.to_owned(),
        rooms: rooms.to_vec(),
        statuses: statuses.map(|s| s.iter().map(|x| (*x).to_owned()).collect()),
    };
    vec![
        a("order:created", "newOrder", &[Store], None),
        a(
            "order:status_changed",
            "orderStatusUpdated",
            &[Store, Customer],
            None,
        ),
        a(
            "order:status_changed",
            "customer_order_update",
            &[Customer],
            None,
        ),
        a(
            "order:status_changed",
            "delivery_update",
            &[Customer, Order],
            Some(&["driver_assigned", "picked_up", "in_transit", "delivered"]),
        ),
        a("payment:created", "payment:added", &[Store], None),
        a(
            "payment:status_changed",
            "payment:updated",
            &[Store, Customer],
            None,
        ),
        a(
            "settings:updated",
            "settings:updated",
            &[Store, Storefront],
            None,
        ),
    ]
}

fn ser_room_kinds<S: Serializer>(kinds: &[RoomKind], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(kinds.iter().map(|k| k.as_str()))
}

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

/// Fields (dotted paths) each audience may see of one collection's documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allowlists {
    /// `customer:{id}` rooms.
    pub customer: Vec<String>,
    /// `store:{id}` rooms.
    pub store: Vec<String>,
    /// `order:{id}` rooms (joined by the order's customer and store, so no more than the customer sees).
    pub order: Vec<String>,
    /// The `admin` room.
    pub admin: Vec<String>,
}

/// One settings section: a group of settings fields with one visibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingsSection {
    /// Section name, e.g. `branding`.
    pub name: String,
    /// Dotted paths in the settings document belonging to the section.
    pub fields: Vec<String>,
    /// Public sections also go to `storefront:{id}`; private ones never do.
    pub public: bool,
}

/// `[routing]`: what each audience may see.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingConfig {
    /// Orders.
    pub orders: Allowlists,
    /// Payments.
    pub payments: Allowlists,
    /// Settings sections (sorted by name); fields outside every section are never delivered.
    pub settings_sections: Vec<SettingsSection>,
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Default order allowlists: conservative; the customer's own delivery address is included.
pub fn default_order_allowlists() -> Allowlists {
    let customer = strs(&[
        "_id",
        "orderNumber",
        "status",
        "orderType",
        "total",
        "subtotal",
        "currency",
        "items",
        "createdAt",
        "updatedAt",
        "estimatedDeliveryTime",
        "deliveryAddress",
    ]);
    let mut store = customer.clone();
    store.extend(strs(&["customerId", "storeId", "customerName", "notes"]));
    Allowlists {
        order: customer.clone(),
        admin: store.clone(),
        customer,
        store,
    }
}

/// Default payment allowlists.
pub fn default_payment_allowlists() -> Allowlists {
    let all = strs(&[
        "_id",
        "orderId",
        "amount",
        "currency",
        "status",
        "method",
        "createdAt",
        "updatedAt",
    ]);
    Allowlists {
        customer: all.clone(),
        store: all.clone(),
        order: all.clone(),
        admin: all,
    }
}

/// The settings sections table of design.md.
pub fn default_settings_sections() -> Vec<SettingsSection> {
    let s = |name: &str, fields: &[&str], public: bool| SettingsSection {
        name: name.to_owned(),
        fields: strs(fields),
        public,
    };
    let mut v = vec![
        s(
            "branding",
            &[
                "storeBanner",
                "storeLogo",
                "shippingPolicy",
                "returnsPolicy",
            ],
            true,
        ),
        s(
            "contact",
            &[
                "aboutStory",
                "contactEmail",
                "socialInstagram",
                "socialTwitter",
                "socialTiktok",
                "socialSnapchat",
                "socialWebsite",
            ],
            true,
        ),
        s("store_status", &["storeActive"], true),
        s("terms", &["termsSource", "termsPdfUrl"], true),
        s("username", &["username"], true),
        s(
            "warehouse",
            &[
                "warehouse",
                "warehouseAddress",
                "warehouseAddress2",
                "warehouseCity",
                "warehouseState",
                "warehouseZip",
                "warehousePostalCode",
                "warehouseCountry",
                "warehousePhone",
            ],
            false,
        ),
        s("payment_provider", &["paymentProvider"], false),
        s(
            "tax_settings",
            &[
                "taxEnabled",
                "taxNexusCountries",
                "taxNexusStates",
                "taxProductCode",
            ],
            false,
        ),
        s(
            "custom_domain",
            &["customDomain", "customDomainVerified"],
            false,
        ),
        s("shipping", &["shippingPrice"], false),
    ];
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

// ---------------------------------------------------------------------------
// Raw mirror of the TOML

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    mongodb: RawMongo,
    #[serde(default)]
    fields: RawFields,
    #[serde(default)]
    status: RawStatus,
    #[serde(default)]
    normalize: RawNormalize,
    #[serde(default)]
    hub: RawHub,
    #[serde(default)]
    checkpoint: RawCheckpoint,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    socketio: RawSocketIo,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    streams: Vec<Spanned<RawStream>>,
    #[serde(default)]
    auth: RawAuthConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMongo {
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
enum RawOversize {
    Skip,
    Fail,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollections {
    orders: Option<Spanned<String>>,
    payments: Option<Spanned<String>>,
    settings: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFields {
    customer: Option<Spanned<OneOrMany>>,
    store: Option<Spanned<OneOrMany>>,
    order_id: Option<Spanned<OneOrMany>>,
    status: Option<Spanned<String>>,
    order_type: Option<Spanned<String>>,
    payment_status: Option<Spanned<String>>,
    settings_store: Option<Spanned<OneOrMany>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    #[serde(default)]
    order: BTreeMap<String, Spanned<String>>,
    pickup_types: Option<Vec<String>>,
    #[serde(default)]
    payment: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNormalize {
    state_cache_docs: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    history_len: Option<NonZeroUsize>,
    history_age: Option<DurationLit>,
    mailbox_capacity: Option<NonZeroUsize>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawStoreKind {
    File,
    Mongo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    store: Option<RawStoreKind>,
    path: Option<Spanned<PathBuf>>,
    interval: Option<DurationLit>,
    every_events: Option<NonZeroUsize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<SocketAddr>,
    ops_listen: Option<SocketAddr>,
    allowed_origins: Option<Vec<Spanned<String>>>,
    max_message_bytes: Option<NonZeroUsize>,
    max_subscriptions_per_connection: Option<NonZeroUsize>,
    max_messages_per_second: Option<NonZeroUsize>,
    max_connections_per_subject: Option<NonZeroUsize>,
    max_connections: Option<NonZeroUsize>,
    auth_deadline: Option<DurationLit>,
    header_read_timeout: Option<DurationLit>,
    max_unauthenticated: Option<NonZeroUsize>,
    max_unauthenticated_per_ip: Option<usize>,
    ping_interval: Option<DurationLit>,
    pong_timeout: Option<DurationLit>,
    write_timeout: Option<DurationLit>,
    /// Never read by any version: refused with a pointer to `auth.order_cache_ttl`.
    order_owner_cache_ttl: Option<Spanned<toml::Value>>,
    shutdown_grace: Option<DurationLit>,
    replay_timeout: Option<DurationLit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocketIo {
    enabled: Option<bool>,
    aliases: Option<Vec<RawAlias>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlias {
    event: Spanned<String>,
    name: Spanned<String>,
    rooms: Vec<Spanned<String>>,
    statuses: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Spanned<String>>,
    format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    #[serde(default)]
    orders: RawAllowlists,
    #[serde(default)]
    payments: RawAllowlists,
    #[serde(default)]
    settings: BTreeMap<String, Spanned<RawSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowlists {
    customer: Option<Vec<Spanned<String>>>,
    store: Option<Vec<Spanned<String>>>,
    order: Option<Vec<Spanned<String>>>,
    admin: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    collection: Spanned<String>,
    module: Spanned<String>,
    #[serde(default)]
    events: RawStreamEvents,
    rooms: Spanned<RawStreamRooms>,
    #[serde(default)]
    allow: RawStreamAllow,
    #[serde(default)]
    tracked: Vec<Spanned<String>>,
    status: Option<Spanned<RawStreamStatus>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreamEvents {
    created: Option<Spanned<String>>,
    updated: Option<Spanned<String>>,
    replaced: Option<Spanned<String>>,
    deleted: Option<Spanned<String>>,
    status_changed: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreamStatus {
    field: Spanned<String>,
    type_field: Option<Spanned<String>>,
    pickup_types: Option<Spanned<Vec<String>>>,
    map: Spanned<BTreeMap<String, Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreamRooms {
    customer: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    order: Option<Spanned<String>>,
    storefront: Option<Spanned<String>>,
    admin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreamAllow {
    customer: Option<Vec<Spanned<String>>>,
    store: Option<Vec<Spanned<String>>>,
    order: Option<Vec<Spanned<String>>>,
    storefront: Option<Vec<Spanned<String>>>,
    admin: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSection {
    fields: Vec<Spanned<String>>,
    public: bool,
}

// ---------------------------------------------------------------------------
// Conversion

fn dur(v: Option<DurationLit>, default_ms: u64) -> Duration {
    v.map_or(Duration::from_millis(default_ms), |d| d.0)
}

fn nz(v: Option<NonZeroUsize>, default: usize) -> NonZeroUsize {
    v.or(NonZeroUsize::new(default))
        .unwrap_or(NonZeroUsize::MIN)
}

/// A dotted path is usable when no segment is empty and none starts with `$`.
fn check_path(ctx: &Ctx<'_>, key: &str, p: &Spanned<String>) -> Result<String, ConfigError> {
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

fn check_name(ctx: &Ctx<'_>, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if s.trim().is_empty() {
        return Err(ctx.err(key, v, "must not be empty"));
    }
    Ok(s.clone())
}

fn paths(
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

fn path(
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

fn room_kind(s: &str) -> Option<RoomKind> {
    Some(match s {
        "customer" => RoomKind::Customer,
        "store" => RoomKind::Store,
        "order" => RoomKind::Order,
        "storefront" => RoomKind::Storefront,
        "admin" => RoomKind::Admin,
        _ => return None,
    })
}

fn allowlist(
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

fn allowlists(
    ctx: &Ctx<'_>,
    key: &str,
    raw: RawAllowlists,
    d: Allowlists,
) -> Result<Allowlists, ConfigError> {
    Ok(Allowlists {
        customer: allowlist(ctx, &format!("{key}.customer"), raw.customer, &d.customer)?,
        store: allowlist(ctx, &format!("{key}.store"), raw.store, &d.store)?,
        order: allowlist(ctx, &format!("{key}.order"), raw.order, &d.order)?,
        admin: allowlist(ctx, &format!("{key}.admin"), raw.admin, &d.admin)?,
    })
}

/// Longest declared module or event name.
const MAX_EVENT_NAME_LEN: usize = 64;

fn name_chars_ok(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= MAX_EVENT_NAME_LEN
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') || extra.contains(&b)
        })
}

/// A declared event name: `module:action`, so it can never be a Socket.IO reserved
/// name (`connect`, `disconnect`…) or our own `resync`; never a built-in event's name.
fn check_event_name(ctx: &Ctx<'_>, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if !name_chars_ok(s, b":") || !s.contains(':') {
        return Err(ctx.err(
            key,
            v,
            format!(
                "invalid event name {s:?}: expected \"module:action\", 1-{MAX_EVENT_NAME_LEN} characters of A-Z a-z 0-9 _ . - :"
            ),
        ));
    }
    if EVENT_NAMES.contains(&s.as_str()) || s.starts_with("system:") {
        return Err(ctx.err(
            key,
            v,
            format!("{s:?} is a built-in event name; choose another module or action"),
        ));
    }
    Ok(s.clone())
}

/// `[[streams]]`: each declaration checked against the built-in collections, the
/// checkpoint collection and the other declarations.
fn streams(
    ctx: &Ctx<'_>,
    raw: Vec<Spanned<RawStream>>,
    collections: &Collections,
    checkpoint_collection: &str,
) -> Result<Vec<StreamDecl>, ConfigError> {
    let mut out: Vec<StreamDecl> = Vec::new();
    for st in raw {
        let st = st.into_inner();
        let collection = check_name(ctx, "streams.collection", &st.collection)?;
        let taken = [
            collections.orders.as_str(),
            collections.payments.as_str(),
            collections.settings.as_str(),
        ];
        if taken.contains(&collection.as_str()) {
            return Err(ctx.err(
                "streams.collection",
                &st.collection,
                format!("{collection:?} is a built-in collection (mongodb.collections); it cannot also be declared"),
            ));
        }
        if collection == checkpoint_collection {
            return Err(ctx.err(
                "streams.collection",
                &st.collection,
                format!(
                    "{collection:?} is the checkpoint collection (mongodb.checkpoint_collection)"
                ),
            ));
        }
        if out.iter().any(|d| d.collection == collection) {
            return Err(ctx.err(
                "streams.collection",
                &st.collection,
                format!("{collection:?} is declared twice"),
            ));
        }
        let module = st.module.get_ref();
        if !name_chars_ok(module, b"") {
            return Err(ctx.err(
                "streams.module",
                &st.module,
                format!("invalid module {module:?}: expected 1-{MAX_EVENT_NAME_LEN} characters of A-Z a-z 0-9 _ . -"),
            ));
        }
        let event = |action: &str, v: Option<Spanned<String>>| match v {
            Some(v) => check_event_name(ctx, &format!("streams.events.{action}"), &v),
            None => check_event_name(
                ctx,
                "streams.module",
                &Spanned::new(st.module.span(), format!("{module}:{action}")),
            ),
        };
        let status = st
            .status
            .map(|raw| stream_status(ctx, raw.into_inner()))
            .transpose()?;
        let status_changed = match (&status, st.events.status_changed) {
            (Some(_), v) => Some(event("status_changed", v)?),
            (None, Some(v)) => return Err(ctx.err(
                "streams.events.status_changed",
                &v,
                "names the event of a status change, but the stream declares no [streams.status]",
            )),
            (None, None) => None,
        };
        let events = EventNames {
            created: event("created", st.events.created)?,
            updated: event("updated", st.events.updated)?,
            replaced: event("replaced", st.events.replaced)?,
            deleted: event("deleted", st.events.deleted)?,
            status_changed,
        };
        let rooms_span = st.rooms.span();
        let r = st.rooms.into_inner();
        let room_path = |kind: &str, v: Option<Spanned<String>>| {
            v.map(|p| check_path(ctx, &format!("streams.rooms.{kind}"), &p))
                .transpose()
        };
        let rooms = StreamRooms {
            customer: room_path("customer", r.customer)?,
            store: room_path("store", r.store)?,
            order: room_path("order", r.order)?,
            storefront: room_path("storefront", r.storefront)?,
            admin: r.admin.unwrap_or(false),
        };
        if rooms.keyed().next().is_none() && !rooms.admin {
            return Err(invalid_at(
                ctx.text,
                ctx.origin,
                "streams.rooms",
                rooms_span,
                "declares no room: name at least one of customer, store, order, storefront (a field path) or admin = true",
            ));
        }
        // An allowlist per declared room, and none for a room not declared: what an
        // audience sees is always written down, never a default.
        let a = st.allow;
        let lists = [
            ("customer", rooms.customer.is_some(), a.customer),
            ("store", rooms.store.is_some(), a.store),
            ("order", rooms.order.is_some(), a.order),
            ("storefront", rooms.storefront.is_some(), a.storefront),
            ("admin", rooms.admin, a.admin),
        ];
        let mut allow: Vec<Vec<String>> = Vec::new();
        for (kind, declared, list) in lists {
            let key = format!("streams.allow.{kind}");
            match (declared, list) {
                (true, Some(l)) if l.is_empty() => {
                    return Err(invalid_at(
                        ctx.text,
                        ctx.origin,
                        key,
                        rooms_span.clone(),
                        "needs at least one field path (an audience that may see nothing needs no room)",
                    ))
                }
                (true, Some(l)) => allow.push(allowlist(ctx, &key, Some(l), &[])?),
                (true, None) => {
                    return Err(invalid_at(
                        ctx.text,
                        ctx.origin,
                        key,
                        rooms_span.clone(),
                        format!("the stream of {collection:?} routes to {kind} rooms but has no allowlist for them ([streams.allow] {kind} = [...])"),
                    ))
                }
                (false, Some(l)) => {
                    let at = l.first().map_or(rooms_span.clone(), Spanned::span);
                    return Err(invalid_at(
                        ctx.text,
                        ctx.origin,
                        key,
                        at,
                        format!("an allowlist for {kind} rooms, but [streams.rooms] declares none"),
                    ));
                }
                (false, None) => allow.push(Vec::new()),
            }
        }
        let [customer, store, order, storefront, admin]: [Vec<String>; 5] =
            allow.try_into().unwrap_or_default();
        let mut tracked: Vec<String> = Vec::new();
        for t in &st.tracked {
            let p = check_path(ctx, "streams.tracked", t)?;
            if tracked.contains(&p) {
                return Err(ctx.err("streams.tracked", t, format!("{p:?} is listed twice")));
            }
            tracked.push(p);
        }
        out.push(StreamDecl {
            collection,
            module: module.clone(),
            events,
            rooms,
            allow: StreamAllow {
                customer,
                store,
                order,
                storefront,
                admin,
            },
            tracked,
            status,
        });
    }
    Ok(out)
}

/// `[streams.status]`: the field, its table and the optional `ready` split.
fn stream_status(ctx: &Ctx<'_>, raw: RawStreamStatus) -> Result<StreamStatus, ConfigError> {
    let field = check_path(ctx, "streams.status.field", &raw.field)?;
    let type_field = raw
        .type_field
        .map(|p| check_path(ctx, "streams.status.type_field", &p))
        .transpose()?;
    let pickup_types = match (&type_field, raw.pickup_types) {
        (None, Some(p)) => {
            return Err(ctx.err(
                "streams.status.pickup_types",
                &p,
                "splits `ready` by type, but no type_field says where the type is",
            ))
        }
        (Some(_), Some(p)) if p.get_ref().is_empty() => {
            return Err(ctx.err(
                "streams.status.pickup_types",
                &p,
                "needs at least one type (leave it out for the default)",
            ))
        }
        (Some(_), Some(p)) => p
            .into_inner()
            .iter()
            .map(|t| t.trim().to_ascii_lowercase())
            .collect(),
        (Some(_), None) => StatusTable::default().pickup_types,
        (None, None) => Vec::new(),
    };
    if raw.map.get_ref().is_empty() {
        return Err(ctx.err(
            "streams.status.map",
            &raw.map,
            "needs at least one raw = \"canonical\" entry",
        ));
    }
    let mut map = BTreeMap::new();
    for (k, v) in raw.map.into_inner() {
        let key = format!("streams.status.map.{k}");
        if !name_chars_ok(v.get_ref(), b"") {
            return Err(ctx.err(
                &key,
                &v,
                format!(
                    "invalid canonical status {:?}: expected 1-{MAX_EVENT_NAME_LEN} characters of A-Z a-z 0-9 _ . -",
                    v.get_ref()
                ),
            ));
        }
        if map
            .insert(k.trim().to_ascii_lowercase(), v.get_ref().clone())
            .is_some()
        {
            return Err(ctx.err(
                &key,
                &v,
                "is listed twice (raw values compare trimmed and case-insensitively)",
            ));
        }
    }
    Ok(StreamStatus {
        field,
        type_field,
        pickup_types,
        map,
    })
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

    fn convert(ctx: &Ctx<'_>, raw: Raw, auth_raw: toml::Table) -> Result<Config, ConfigError> {
        let Raw {
            mongodb,
            fields,
            status,
            normalize,
            hub,
            checkpoint,
            server,
            socketio,
            log,
            routing,
            streams: raw_streams,
            auth,
        } = raw;

        // [mongodb]
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
                    && d.get_ref().iter().all(|n| {
                        !n.is_empty() && !n.contains(['/', '\\', '.', ' ', '"', '$', '\0'])
                    });
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
        let streams = streams(ctx, raw_streams, &collections, &checkpoint_collection)?;
        let mongo = MongoConfig {
            uri: Secret::new(uri),
            databases,
            collections,
            checkpoint_collection: checkpoint_collection.clone(),
            connect_timeout: dur(mongodb.connect_timeout, 10_000),
            oversize: match mongodb.oversize {
                None | Some(RawOversize::Skip) => crate::pipeline::OversizePolicy::Skip,
                Some(RawOversize::Fail) => crate::pipeline::OversizePolicy::Fail,
            },
        };

        // [fields]
        let fields = FieldPaths {
            customer: paths(ctx, "fields.customer", fields.customer, &["customerId"])?,
            store: paths(ctx, "fields.store", fields.store, &["storeId", "sellerId"])?,
            order_id: paths(ctx, "fields.order_id", fields.order_id, &["orderId"])?,
            status: path(ctx, "fields.status", fields.status, "status")?,
            order_type: path(ctx, "fields.order_type", fields.order_type, "orderType")?,
            payment_status: path(
                ctx,
                "fields.payment_status",
                fields.payment_status,
                "status",
            )?,
            settings_store: paths(
                ctx,
                "fields.settings_store",
                fields.settings_store,
                &["storeId", "sellerId"],
            )?,
        };

        // [status]
        let mut order = default_order_map();
        for (k, v) in status.order {
            let key = format!("status.order.{k}");
            let target = OrderTarget::parse(v.get_ref()).ok_or_else(|| {
                ctx.err(
                    &key,
                    &v,
                    format!(
                        "unknown canonical order status {:?}; expected ready or one of: {}",
                        v.get_ref(),
                        OrderStatus::ALL.map(OrderStatus::as_str).join(", ")
                    ),
                )
            })?;
            order.insert(k.trim().to_ascii_lowercase(), target);
        }
        let mut payment = default_payment_map();
        for (k, v) in status.payment {
            let key = format!("status.payment.{k}");
            let target = PaymentStatus::parse(v.get_ref()).ok_or_else(|| {
                ctx.err(
                    &key,
                    &v,
                    format!(
                        "unknown canonical payment status {:?}; expected one of: {}",
                        v.get_ref(),
                        PaymentStatus::ALL.map(PaymentStatus::as_str).join(", ")
                    ),
                )
            })?;
            payment.insert(k.trim().to_ascii_lowercase(), target);
        }
        let status = StatusTable {
            order,
            pickup_types: status
                .pickup_types
                .map(|v| v.iter().map(|s| s.trim().to_ascii_lowercase()).collect())
                .unwrap_or_else(|| StatusTable::default().pickup_types),
            payment,
        };

        let normalize = NormalizeConfig {
            state_cache_docs: normalize.state_cache_docs.unwrap_or(100_000),
        };

        let hub = HubConfig {
            history_len: nz(hub.history_len, 10_000),
            history_age: dur(hub.history_age, 300_000),
            mailbox_capacity: nz(hub.mailbox_capacity, 1024),
        };

        // [checkpoint]
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
                    collection: checkpoint_collection,
                }
            }
        };
        let checkpoint = CheckpointConfig {
            store,
            interval: dur(checkpoint.interval, 1_000),
            every_events: nz(checkpoint.every_events, 1000),
        };

        // [server]
        let mut allowed_origins = Vec::new();
        for o in server.allowed_origins.unwrap_or_default() {
            let s = o.get_ref().trim().trim_end_matches('/');
            if !(s.starts_with("http://") || s.starts_with("https://")) {
                return Err(ctx.err(
                    "server.allowed_origins",
                    &o,
                    format!(
                        "origin {:?} must start with http:// or https://",
                        o.get_ref()
                    ),
                ));
            }
            allowed_origins.push(s.to_ascii_lowercase());
        }
        if let Some(v) = &server.order_owner_cache_ttl {
            return Err(ctx.err(
                "server.order_owner_cache_ttl",
                v,
                "this key was never read; ownership lookups are cached per auth.order_cache_ttl \
                 (and refreshed by the change stream itself): move the value there",
            ));
        }
        let server = ServerConfig {
            listen: server
                .listen
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
            ops_listen: server
                .ops_listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8081))),
            allowed_origins,
            max_message_bytes: nz(server.max_message_bytes, 65_536),
            max_subscriptions_per_connection: nz(server.max_subscriptions_per_connection, 100),
            max_messages_per_second: nz(server.max_messages_per_second, 50),
            max_connections_per_subject: nz(server.max_connections_per_subject, 20),
            max_connections: nz(server.max_connections, 50_000),
            auth_deadline: dur(server.auth_deadline, 10_000),
            header_read_timeout: dur(server.header_read_timeout, 5_000),
            max_unauthenticated: nz(server.max_unauthenticated, 1024),
            max_unauthenticated_per_ip: server.max_unauthenticated_per_ip.unwrap_or(16),
            ping_interval: dur(server.ping_interval, 25_000),
            pong_timeout: dur(server.pong_timeout, 20_000),
            write_timeout: dur(server.write_timeout, 10_000),
            shutdown_grace: dur(server.shutdown_grace, 10_000),
            replay_timeout: dur(server.replay_timeout, 5_000),
        };

        // [socketio]
        // Unset: the Node apps' legacy names, so a minimal config keeps the drop-in
        // promise; `aliases = []` turns them off; a list given replaces them.
        let defaulted = socketio.aliases.is_none();
        let mut aliases = Vec::new();
        for a in socketio.aliases.unwrap_or_default() {
            let key = "socketio.aliases";
            // Declared streams' names are events like the built-ins' (checked above).
            let known = EVENT_NAMES
                .iter()
                .copied()
                .chain(streams.iter().flat_map(|s| s.events.all()))
                .collect::<Vec<&str>>();
            if !known.contains(&a.event.get_ref().as_str()) {
                return Err(ctx.err(
                    format!("{key}.event"),
                    &a.event,
                    format!(
                        "unknown event {:?}; expected one of: {}",
                        a.event.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
            let name = check_name(ctx, &format!("{key}.name"), &a.name)?;
            if a.rooms.is_empty() {
                return Err(ctx.err(
                    format!("{key}.rooms"),
                    &a.name,
                    "needs at least one room kind",
                ));
            }
            let mut rooms = Vec::new();
            for r in &a.rooms {
                let k = room_kind(r.get_ref()).ok_or_else(|| {
                    ctx.err(
                        format!("{key}.rooms"),
                        r,
                        format!(
                            "unknown room kind {:?}; expected customer, store, order, storefront or admin",
                            r.get_ref()
                        ),
                    )
                })?;
                if !rooms.contains(&k) {
                    rooms.push(k);
                }
            }
            let statuses = match a.statuses {
                None => None,
                Some(list) => {
                    let mut out = Vec::new();
                    for s in list {
                        let v = s.get_ref();
                        // A declared stream's statuses are its own table's targets.
                        let verdict =
                            match crate::declared::alias_status(&streams, a.event.get_ref(), v) {
                                Some(verdict) => verdict,
                                None if OrderStatus::parse(v).is_some()
                                    || PaymentStatus::parse(v).is_some() =>
                                {
                                    Ok(())
                                }
                                None => {
                                    Err(format!("{v:?} is not a canonical order or payment status"))
                                }
                            };
                        if let Err(message) = verdict {
                            return Err(ctx.err(format!("{key}.statuses"), &s, message));
                        }
                        out.push(v.clone());
                    }
                    Some(out)
                }
            };
            aliases.push(Alias {
                event: a.event.into_inner(),
                name,
                rooms,
                statuses,
            });
        }
        if defaulted {
            aliases = default_aliases();
        }
        let socketio = SocketIoConfig {
            enabled: socketio.enabled.unwrap_or(true),
            aliases,
        };

        // [log]
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

        // [routing]
        let mut sections: BTreeMap<String, SettingsSection> = default_settings_sections()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        for (name, sec) in routing.settings {
            let key = format!("routing.settings.{name}");
            if name.is_empty() {
                return Err(ctx.err(key, &sec, "section name must not be empty"));
            }
            let sec = sec.into_inner();
            let fields = sec
                .fields
                .iter()
                .map(|p| check_path(ctx, &format!("{key}.fields"), p))
                .collect::<Result<Vec<_>, _>>()?;
            sections.insert(
                name.clone(),
                SettingsSection {
                    name,
                    fields,
                    public: sec.public,
                },
            );
        }
        let routing = RoutingConfig {
            orders: allowlists(
                ctx,
                "routing.orders",
                routing.orders,
                default_order_allowlists(),
            )?,
            payments: allowlists(
                ctx,
                "routing.payments",
                routing.payments,
                default_payment_allowlists(),
            )?,
            settings_sections: sections.into_values().collect(),
        };

        let mut auth = AuthConfig::from_raw_with_env(&auth, ctx.env).map_err(|e| {
            let key = if e.key.starts_with("auth") {
                e.key.clone()
            } else {
                format!("auth.{}", e.key)
            };
            // Position of the key's line when it is written in the file.
            let leaf = key.rsplit('.').next().unwrap_or("");
            let line_col = find_key_in_table(ctx.text, "auth", leaf);
            ConfigError::Invalid {
                key,
                at: Location {
                    origin: ctx.origin.to_owned(),
                    line_col,
                },
                message: e.message,
            }
        })?;
        auth.databases = mongo.databases.clone();

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
        put("auth", Ok(mask_table(&self.auth_raw)));
        if !self.streams.is_empty() {
            if let Ok(v) = toml::Value::try_from(&self.streams) {
                root.insert("streams".into(), v);
            }
        }
        toml::to_string(&root).unwrap_or_default()
    }
}

/// Line and column of `leaf = …` inside `[table]`, for errors reported by other modules.
fn find_key_in_table(text: &str, table: &str, leaf: &str) -> Option<(usize, usize)> {
    let mut current = String::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(h) = header_name(line) {
            current = h;
        } else if current == table && assigned_key(line).as_deref() == Some(leaf) {
            let indent = line.len() - line.trim_start().len();
            return Some(line_col(text, offset + indent));
        }
        offset += line.len();
    }
    None
}

/// Masks values of keys that look secret (secret, password, token, key material).
fn mask_table(t: &toml::Table) -> toml::Table {
    t.iter()
        .map(|(k, v)| {
            let lk = k.to_ascii_lowercase();
            let secret = ["secret", "password", "token", "private", "credential"]
                .iter()
                .any(|w| lk.contains(w));
            let v = match v {
                toml::Value::Table(inner) => toml::Value::Table(mask_table(inner)),
                _ if secret => toml::Value::String("***".into()),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// `mongodb://user:pass@host/...` → `mongodb://user:***@host/...`.
pub fn mask_uri_password(uri: &str) -> String {
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

/// Test helper: parses `text` with a fixed JWT secret in place of the process environment.
#[cfg(test)]
pub(crate) fn test_config(text: &str, origin: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str_with_env(text, origin, &|name| {
        (name == crate::auth::DEFAULT_SECRET_ENV)
            .then(|| "unit-test-secret-unit-test-secret-0123".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        test_config(text, "test.toml")
    }

    fn invalid(text: &str) -> (String, Option<(usize, usize)>, String) {
        match parse(text) {
            Err(ConfigError::Invalid { key, at, message }) => (key, at.line_col, message),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn example_parses_and_matches_defaults() {
        let ex = test_config(EXAMPLE, "config.example.toml").unwrap();
        let def = parse("").unwrap();
        // The example documents the defaults; keep them in sync.
        assert_eq!(ex.mongo.databases, def.mongo.databases);
        assert_eq!(ex.mongo.collections, def.mongo.collections);
        assert_eq!(ex.mongo.uri, def.mongo.uri);
        assert_eq!(ex.mongo.connect_timeout, def.mongo.connect_timeout);
        assert_eq!(ex.fields.store, def.fields.store);
        assert_eq!(ex.status.order, def.status.order);
        assert_eq!(ex.status.payment, def.status.payment);
        assert_eq!(ex.status.pickup_types, def.status.pickup_types);
        assert_eq!(ex.hub.history_len, def.hub.history_len);
        assert_eq!(ex.hub.history_age, def.hub.history_age);
        assert_eq!(ex.checkpoint.store, def.checkpoint.store);
        assert_eq!(ex.checkpoint.interval, def.checkpoint.interval);
        assert_eq!(ex.server.listen, def.server.listen);
        assert_eq!(ex.server.ping_interval, def.server.ping_interval);
        assert_eq!(ex.server.auth_deadline, def.server.auth_deadline);
        assert_eq!(
            ex.server.header_read_timeout,
            def.server.header_read_timeout
        );
        assert_eq!(
            ex.server.max_unauthenticated,
            def.server.max_unauthenticated
        );
        assert_eq!(
            ex.server.max_unauthenticated_per_ip,
            def.server.max_unauthenticated_per_ip
        );
        assert_eq!(ex.server.replay_timeout, def.server.replay_timeout);
        assert_eq!(ex.routing.orders, def.routing.orders);
        assert_eq!(ex.routing.payments, def.routing.payments);
        assert_eq!(ex.routing.settings_sections, def.routing.settings_sections);
        assert_eq!(ex.log.level, def.log.level);
        // The example lists the built-in aliases exactly (deleting them changes nothing),
        // plus one for its declared `users` stream. Declared streams are examples, not
        // defaults: a config without `[[streams]]` has neither them nor their aliases.
        let declared: Vec<&str> = ex.streams.iter().flat_map(|s| s.events.all()).collect();
        let (for_declared, builtin): (Vec<Alias>, Vec<Alias>) = ex
            .socketio
            .aliases
            .iter()
            .cloned()
            .partition(|a| declared.contains(&a.event.as_str()));
        assert_eq!(builtin, def.socketio.aliases);
        assert_eq!(
            for_declared
                .iter()
                .map(|a| (a.event.as_str(), a.name.as_str()))
                .collect::<Vec<_>>(),
            [("balance:updated", "balance-updated")]
        );
        assert!(def.streams.is_empty());
        let colls: Vec<&str> = ex.streams.iter().map(|s| s.collection.as_str()).collect();
        assert_eq!(colls, ["users", "deliveries"]);
        let users = &ex.streams[0];
        assert_eq!(users.tracked, ["balance"]);
        assert_eq!(users.rooms.customer.as_deref(), Some("_id"));
        assert_eq!(users.events.updated, "balance:updated");
        let deliveries = &ex.streams[1];
        assert_eq!(deliveries.rooms.customer.as_deref(), Some("customerId"));
        assert_eq!(deliveries.rooms.store.as_deref(), Some("storeId"));
        // The example ships the Node apps' aliases.
        let names: Vec<&str> = ex
            .socketio
            .aliases
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        for n in [
            "newOrder",
            "orderStatusUpdated",
            "customer_order_update",
            "delivery_update",
            "payment:added",
            "payment:updated",
            "settings:updated",
        ] {
            assert!(names.contains(&n), "alias {n} missing");
        }
        let delivery = ex
            .socketio
            .aliases
            .iter()
            .find(|a| a.name == "delivery_update")
            .unwrap();
        assert_eq!(
            delivery.statuses.as_deref().unwrap(),
            ["driver_assigned", "picked_up", "in_transit", "delivered"]
        );
        assert_eq!(delivery.rooms, [RoomKind::Customer, RoomKind::Order]);
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.max_message_bytes.get(), 65_536);
        assert_eq!(c.server.auth_deadline, Duration::from_secs(10));
        assert_eq!(c.hub.history_age, Duration::from_secs(300));
        assert_eq!(c.checkpoint.every_events.get(), 1000);
        assert_eq!(
            c.checkpoint.store,
            CheckpointStoreConfig::File {
                path: "changecast.checkpoint".into()
            }
        );
        assert_eq!(c.fields.customer, ["customerId"]);
        assert_eq!(c.fields.store, ["storeId", "sellerId"]);
        assert_eq!(c.mongo.checkpoint_collection, "changecast_checkpoints");
        // The legacy names are on unless turned off.
        assert!(c.socketio.enabled && c.socketio.aliases == default_aliases());
        let off = parse("[socketio]\naliases = []\n").unwrap();
        assert!(off.socketio.aliases.is_empty());
        assert_eq!(c.log.format, LogFormat::Pretty);
        assert_eq!(c.normalize.state_cache_docs, 100_000);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in [
            "30",
            "",
            "s",
            "1.5s",
            "-1s",
            "0s",
            "10 days",
            "99999999999999999999s",
            "5mm",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        for d in ["250ms", "30s", "5m", "1h", "1500ms"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn the_never_read_owner_cache_key_points_to_the_one_that_works() {
        let (key, pos, msg) = invalid("[server]\norder_owner_cache_ttl = \"1s\"\n");
        assert_eq!(key, "server.order_owner_cache_ttl");
        assert_eq!(pos.map(|p| p.0), Some(2));
        assert!(msg.contains("auth.order_cache_ttl"), "{msg}");
    }

    #[test]
    fn unknown_key_names_key_and_position() {
        let (key, pos, msg) = invalid("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert_eq!(key, "server.lisen");
        assert_eq!(pos, Some((3, 1)));
        assert!(msg.contains("unknown field"), "{msg}");
        let err = parse("[server]\nlisen = 1\n").unwrap_err().to_string();
        assert!(
            err.starts_with("test.toml:2:1: server.lisen: unknown field"),
            "{err}"
        );

        let (key, pos, _) = invalid("\n[nope]\na = 1\n");
        assert_eq!(key, "nope");
        assert_eq!(pos.map(|p| p.0), Some(2));
    }

    #[test]
    fn wrong_type_names_key_and_position() {
        let (key, pos, msg) = invalid("[hub]\nhistory_len = \"many\"\n");
        assert_eq!(key, "hub.history_len");
        assert_eq!(pos, Some((2, 15)));
        assert!(msg.contains("invalid type"), "{msg}");
        let (key, pos, _) = invalid("[hub]\nhistory_len = 0\n");
        assert_eq!((key.as_str(), pos), ("hub.history_len", Some((2, 15))));
        let (key, _, _) = invalid("[server]\nlisten = \"localhost\"\n");
        assert_eq!(key, "server.listen");
    }

    #[test]
    fn bad_duration_names_key_and_position() {
        let (key, pos, msg) = invalid("[server]\n# c\nping_interval = \"25 parsecs\"\n");
        assert_eq!(key, "server.ping_interval");
        assert_eq!(pos, Some((3, 17)));
        assert!(msg.contains("unknown unit"), "{msg}");
        let (key, _, msg) = invalid("[checkpoint]\ninterval = 30\n");
        assert_eq!(key, "checkpoint.interval");
        assert!(msg.contains("needs a unit"), "{msg}");
    }

    #[test]
    fn semantic_errors_have_positions() {
        let (key, pos, msg) = invalid("[status.order]\nshipped = \"sent\"\n");
        assert_eq!(key, "status.order.shipped");
        assert_eq!(pos, Some((2, 11)));
        assert!(msg.contains("unknown canonical order status"), "{msg}");

        let text =
            "[[socketio.aliases]]\nevent = \"order:exploded\"\nname = \"x\"\nrooms = [\"store\"]\n";
        let (key, pos, _) = invalid(text);
        assert_eq!(
            (key.as_str(), pos),
            ("socketio.aliases.event", Some((2, 9)))
        );

        let text = "[[socketio.aliases]]\nevent = \"order:created\"\nname = \"x\"\nrooms = [\"store\", \"planet\"]\n";
        let (key, pos, _) = invalid(text);
        assert_eq!(
            (key.as_str(), pos),
            ("socketio.aliases.rooms", Some((4, 19)))
        );

        let (key, _, _) = invalid("[fields]\ncustomer = \"a..b\"\n");
        assert_eq!(key, "fields.customer");
        let (key, _, _) = invalid("[checkpoint]\nstore = \"mongo\"\npath = \"x\"\n");
        assert_eq!(key, "checkpoint.path");
        let (key, _, _) = invalid("[checkpoint]\nstore = \"redis\"\n");
        assert_eq!(key, "checkpoint.store");
        let (key, _, _) = invalid("[log]\nformat = \"xml\"\n");
        assert_eq!(key, "log.format");
    }

    #[test]
    fn overrides_merge_over_defaults() {
        let c = parse(
            "[status.order]\nShipped = \"in_transit\"\n[status]\npickup_types = [\"Curbside\"]\n\
             [routing.settings.loyalty]\nfields = [\"loyaltyProgram\"]\npublic = true\n\
             [routing.orders]\ncustomer = [\"_id\", \"status\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.status.order_status("SHIPPED", None),
            Some(OrderStatus::InTransit)
        );
        assert_eq!(
            c.status.order_status("new", None),
            Some(OrderStatus::Pending)
        );
        assert!(c.status.is_pickup(Some("curbside")));
        assert!(!c.status.is_pickup(Some("pickup")));
        assert!(c
            .routing
            .settings_sections
            .iter()
            .any(|s| s.name == "loyalty" && s.public));
        assert_eq!(c.routing.settings_sections.len(), 11);
        assert_eq!(c.routing.orders.customer, ["_id", "status"]);
        assert_eq!(c.routing.orders.store, default_order_allowlists().store);
    }

    #[test]
    fn secrets_are_masked() {
        let mut c =
            parse("[mongodb]\nuri = \"mongodb://app:hunter2@db1:27017,db2/?replicaSet=rs0\"\n")
                .unwrap();
        assert_eq!(format!("{:?}", c.mongo.uri), "***");
        assert_eq!(c.mongo.uri.to_string(), "***");
        assert!(!format!("{c:?}").contains("hunter2"));
        let out = c.effective_toml_masked();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(
            out.contains("mongodb://app:***@db1:27017,db2/?replicaSet=rs0"),
            "{out}"
        );
        // The effective config is itself a valid config.
        let again = parse(&out).unwrap();
        assert_eq!(again.server.listen, c.server.listen);
        assert_eq!(again.routing.settings_sections, c.routing.settings_sections);

        c.apply_env(|k| (k == "MONGODB_URI").then(|| "mongodb://u:s3cret@h/".to_owned()))
            .unwrap();
        assert_eq!(c.mongo.uri.expose(), "mongodb://u:s3cret@h/");
        assert!(!c.effective_toml_masked().contains("s3cret"));
        assert!(c.apply_env(|_| Some("http://x".into())).is_err());

        assert_eq!(mask_uri_password("mongodb://h/db"), "mongodb://h/db");
        assert_eq!(mask_uri_password("mongodb://u@h/db"), "mongodb://u@h/db");
        assert_eq!(
            mask_uri_password(
                "mongodb+srv://u:p@c.example/?authMechanismProperties=AWS_SESSION_TOKEN:t"
            ),
            "mongodb+srv://u:***@c.example/?authMechanismProperties=***"
        );
        let t: toml::Table = toml::from_str(
            "secret = \"s\"\nalgorithms = [\"HS256\"]\n[jwks]\nprivate_key = \"k\"\n",
        )
        .unwrap();
        let m = mask_table(&t);
        assert_eq!(m["secret"].as_str(), Some("***"));
        assert_eq!(m["jwks"]["private_key"].as_str(), Some("***"));
        assert!(m["algorithms"].is_array());
    }

    #[test]
    fn example_effective_output_round_trips() {
        let ex = test_config(EXAMPLE, "config.example.toml").unwrap();
        let out = ex.effective_toml_masked();
        let again = parse(&out).unwrap();
        assert_eq!(again.socketio.aliases, ex.socketio.aliases);
        assert_eq!(again.status.order, ex.status.order);
        assert_eq!(again.fields.settings_store, ex.fields.settings_store);
        assert_eq!(again.streams, ex.streams);
    }

    const STREAM: &str = "[[streams]]\ncollection = \"users\"\nmodule = \"balance\"\n\
        tracked = [\"balance\"]\n[streams.rooms]\ncustomer = \"_id\"\nadmin = true\n\
        [streams.allow]\ncustomer = [\"balance\"]\nadmin = [\"balance\", \"email\"]\n";

    #[test]
    fn declared_streams_parse_with_default_and_overridden_names() {
        let c = parse(STREAM).unwrap();
        let s = &c.streams[0];
        assert_eq!(
            s.events.all(),
            [
                "balance:created",
                "balance:updated",
                "balance:replaced",
                "balance:deleted"
            ]
        );
        assert!(s.rooms.admin);
        assert_eq!(s.allow.admin, ["balance", "email"]);
        let c = parse(&format!(
            "{STREAM}[streams.events]\nupdated = \"wallet:changed\"\n"
        ))
        .unwrap();
        assert_eq!(c.streams[0].events.updated, "wallet:changed");
        assert_eq!(c.streams[0].events.created, "balance:created");
        // An alias may name a declared event; without the declaration it may not.
        let alias = "[[socketio.aliases]]\nevent = \"balance:updated\"\nname = \"balance-updated\"\nrooms = [\"customer\"]\n";
        let c = parse(&format!("{alias}{STREAM}")).unwrap();
        assert_eq!(c.socketio.aliases[0].event, "balance:updated");
        let (key, _, msg) = invalid(alias);
        assert_eq!(key, "socketio.aliases.event");
        assert!(msg.contains("unknown event"), "{msg}");
    }

    /// Each text is refused with the key, line and message part given.
    fn assert_invalid_at<const N: usize>(cases: [(String, &str, usize, &str); N]) {
        let mut wrong = Vec::new();
        for (text, want_key, want_line, want_msg) in cases {
            let (key, at, msg) = invalid(&text);
            if key != want_key || at.map(|a| a.0) != Some(want_line) || !msg.contains(want_msg) {
                wrong.push(format!(
                    "{key} at {at:?}: {msg} (wanted {want_key} at line {want_line}: …{want_msg}…)"
                ));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    const STATUS: &str = "[streams.status]\nfield = \"state\"\n[streams.status.map]\n\
        Scheduled = \"pending\"\nloaded = \"ready\"\n";

    #[test]
    fn a_declared_status_table_parses_and_round_trips() {
        let c = parse(&format!("{STREAM}{STATUS}")).unwrap();
        let st = c.streams[0].status.as_ref().unwrap();
        assert_eq!(st.field, "state");
        assert_eq!(st.map.get("scheduled").map(String::as_str), Some("pending"));
        assert!(st.type_field.is_none() && st.pickup_types.is_empty());
        assert_eq!(
            c.streams[0].events.status_changed.as_deref(),
            Some("balance:status_changed")
        );
        assert_eq!(c.streams[0].events.all().len(), 5);
        // A type field brings the default pickup types; a name of one's own is kept.
        let c = parse(&format!(
            "{STREAM}[streams.events]\nstatus_changed = \"wallet:moved\"\n{STATUS}"
        ))
        .unwrap();
        assert_eq!(
            c.streams[0].events.status_changed.as_deref(),
            Some("wallet:moved")
        );
        let c = parse(&format!(
            "{STREAM}{}",
            STATUS.replace(
                "[streams.status.map]",
                "type_field = \"kind\"\n[streams.status.map]"
            )
        ))
        .unwrap();
        let st = c.streams[0].status.as_ref().unwrap();
        assert_eq!(st.pickup_types, StatusTable::default().pickup_types);
        let again = parse(&c.effective_toml_masked()).unwrap();
        assert_eq!(again.streams, c.streams);
        // Without [streams.status] nothing changes.
        assert!(parse(STREAM).unwrap().streams[0].status.is_none());
    }

    #[test]
    fn declared_status_errors_name_key_and_position() {
        let cases: [(String, &str, usize, &str); 6] = [
            (
                format!("{STREAM}{}", STATUS.replace("\"pending\"", "\"pend ing\"")),
                "streams.status.map.Scheduled",
                14,
                "invalid canonical status",
            ),
            (
                format!("{STREAM}{}", STATUS.replace("loaded", "scheduled")),
                "streams.status.map.scheduled",
                15,
                "twice",
            ),
            (
                format!("{STREAM}[streams.status]\nfield = \"state\"\nmap = {{}}\n"),
                "streams.status.map",
                13,
                "at least one",
            ),
            (
                format!(
                    "{STREAM}{}",
                    STATUS.replace(
                        "[streams.status.map]",
                        "pickup_types = [\"x\"]\n[streams.status.map]"
                    )
                ),
                "streams.status.pickup_types",
                13,
                "no type_field",
            ),
            (
                format!("{STREAM}[streams.events]\nstatus_changed = \"balance:moved\"\n"),
                "streams.events.status_changed",
                12,
                "no [streams.status]",
            ),
            (
                format!("{STREAM}{}", STATUS.replace("field", "feld")),
                "streams.status.feld",
                12,
                "unknown field",
            ),
        ];
        assert_invalid_at(cases);
    }

    #[test]
    fn declared_stream_errors_name_key_and_position() {
        let cases: [(String, &str, usize, &str); 9] = [
            (
                STREAM.replace("\"users\"", "\"orders\""),
                "streams.collection",
                2,
                "built-in",
            ),
            (
                STREAM.replace("\"users\"", "\"changecast_checkpoints\""),
                "streams.collection",
                2,
                "checkpoint",
            ),
            (
                format!("{STREAM}{STREAM}"),
                "streams.collection",
                12,
                "twice",
            ),
            (
                STREAM.replace("tracked", "trackd"),
                "streams.trackd",
                4,
                "unknown field",
            ),
            (
                STREAM.replace("\"balance\"\ntracked", "\"bal ance\"\ntracked"),
                "streams.module",
                3,
                "invalid module",
            ),
            (
                format!("{STREAM}[streams.events]\ncreated = \"order:created\"\n"),
                "streams.events.created",
                12,
                "built-in",
            ),
            (
                format!("{STREAM}[streams.events]\ndeleted = \"gone\"\n"),
                "streams.events.deleted",
                12,
                "module:action",
            ),
            (
                STREAM.replace("admin = [\"balance\", \"email\"]\n", ""),
                "streams.allow.admin",
                5,
                "no allowlist",
            ),
            (
                STREAM.replace("customer = \"_id\"\nadmin = true\n", ""),
                "streams.rooms",
                5,
                "declares no room",
            ),
        ];
        assert_invalid_at(cases);
    }
}
