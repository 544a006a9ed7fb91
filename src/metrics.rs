//! Prometheus metrics: one registry, every family changecast exports; knows nothing of who increments them.
//!
//! Label values are bounded enums or configured collection names, never ids.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// `collection` + `op` labels for changes read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// Watched collection name (from config, so bounded).
    pub collection: String,
    /// Operation type: insert, update, replace, delete, other.
    pub op: String,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short fixed reason string chosen by the code, never data.
    pub reason: &'static str,
}

/// `event` label (canonical event names are a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// Canonical event name.
    pub event: String,
}

/// Wire formats for deliveries.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Wire {
    /// `/ws`
    Native,
    /// `/socket.io/`
    SocketIo,
}

// Written by hand: the derive would print `Native`, and Prometheus label values are lowercase by convention.
impl EncodeLabelValue for Wire {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let v = match self {
            Wire::Native => "native",
            Wire::SocketIo => "socketio",
        };
        EncodeLabelValue::encode(&v, encoder)
    }
}

/// `wire` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WireLabels {
    /// Which endpoint.
    pub wire: Wire,
}

/// Recovery outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum RecoveryKind {
    /// Served from the in-memory history.
    History,
    /// Replayed from the oplog with a short-lived change stream.
    Oplog,
    /// Neither reached back: the client was told to resync.
    Resync,
}

impl EncodeLabelValue for RecoveryKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let v = match self {
            RecoveryKind::History => "history",
            RecoveryKind::Oplog => "oplog",
            RecoveryKind::Resync => "resync",
        };
        EncodeLabelValue::encode(&v, encoder)
    }
}

/// `source` label for recoveries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveryLabels {
    /// How the recovery was served.
    pub source: RecoveryKind,
}

/// Every metric changecast exports.
pub struct Metrics {
    registry: Registry,
    /// Changes read from the streams.
    pub changes_read: Family<ChangeLabels, Counter>,
    /// Events handed to the hub.
    pub events_routed: Family<EventLabels, Counter>,
    /// Events or routes dropped, by reason.
    pub events_dropped: Family<ReasonLabels, Counter>,
    /// Unknown status values seen.
    pub unknown_statuses: Counter,
    /// Messages written to sockets, per wire format.
    pub deliveries: Family<WireLabels, Counter>,
    /// Commit time of the change → written to the socket, seconds.
    pub delivery_latency: Histogram,
    /// Open client connections.
    pub connections: Family<WireLabels, Gauge>,
    /// Rooms with at least one subscriber.
    pub rooms: Gauge,
    /// Subscriptions refused, by reason.
    pub subscriptions_refused: Family<ReasonLabels, Counter>,
    /// Authentication failures, by reason.
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// Sessions cut off because their mailbox was full.
    pub slow_consumer_disconnects: Counter,
    /// Reconnecting clients served, by source.
    pub recoveries: Family<RecoveryLabels, Counter>,
    /// Now minus the cluster time of the newest token seen, seconds.
    pub stream_lag_seconds: Gauge<f64, AtomicU64>,
    /// Seconds since the checkpoint was last saved.
    pub checkpoint_age_seconds: Gauge<f64, AtomicU64>,
    /// Change-stream reconnects.
    pub stream_reconnects: Counter,
    /// Times the stored token had fallen out of the oplog.
    pub history_lost: Counter,
    /// Client messages refused as malformed or over a limit, by reason.
    pub client_errors: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `changecast_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("changecast");
        let m = Self {
            changes_read: Family::default(),
            events_routed: Family::default(),
            events_dropped: Family::default(),
            unknown_statuses: Counter::default(),
            deliveries: Family::default(),
            // 0.5 ms .. ~8 s: covers loopback delivery up to a badly lagging stream.
            delivery_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 15),
            ),
            connections: Family::default(),
            rooms: Gauge::default(),
            subscriptions_refused: Family::default(),
            auth_failures: Family::default(),
            slow_consumer_disconnects: Counter::default(),
            recoveries: Family::default(),
            stream_lag_seconds: Gauge::default(),
            checkpoint_age_seconds: Gauge::default(),
            stream_reconnects: Counter::default(),
            history_lost: Counter::default(),
            client_errors: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "changes_read",
            "Changes read from MongoDB change streams",
            m.changes_read.clone(),
        );
        r.register(
            "events_routed",
            "Events handed to the hub",
            m.events_routed.clone(),
        );
        r.register(
            "events_dropped",
            "Events or routes dropped, by reason",
            m.events_dropped.clone(),
        );
        r.register(
            "unknown_statuses",
            "Status values not in the normalization table",
            m.unknown_statuses.clone(),
        );
        r.register(
            "deliveries",
            "Messages written to client sockets",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Commit time of the change to written on the socket",
            m.delivery_latency.clone(),
        );
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "rooms",
            "Rooms with at least one subscriber",
            m.rooms.clone(),
        );
        r.register(
            "subscriptions_refused",
            "Subscriptions refused, by reason",
            m.subscriptions_refused.clone(),
        );
        r.register(
            "auth_failures",
            "Authentication failures, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "slow_consumer_disconnects",
            "Sessions cut off because their bounded queue was full",
            m.slow_consumer_disconnects.clone(),
        );
        r.register(
            "recoveries",
            "Reconnecting clients served, by source",
            m.recoveries.clone(),
        );
        r.register(
            "stream_lag_seconds",
            "Now minus the cluster time of the newest change-stream token",
            m.stream_lag_seconds.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Seconds since the resume token was last saved",
            m.checkpoint_age_seconds.clone(),
        );
        r.register(
            "stream_reconnects",
            "Change-stream reconnects",
            m.stream_reconnects.clone(),
        );
        r.register(
            "history_lost",
            "Times the stored resume token had fallen out of the oplog",
            m.history_lost.clone(),
        );
        r.register(
            "client_errors",
            "Client messages refused, by reason",
            m.client_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
