//! Prometheus metrics: one registry, every family changecast exports; knows nothing of who increments them.
//!
//! Label values are bounded enums or configured collection names, never ids.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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
pub(crate) struct EventLabels {
    /// Canonical event name.
    pub(crate) event: String,
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
pub(crate) enum RecoveryKind {
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
pub(crate) struct RecoveryLabels {
    /// How the recovery was served.
    pub(crate) source: RecoveryKind,
}

/// `runtime_tasks`: the alive tasks of the tokio runtime the scrape runs on, read at each encode.
///
/// `/metrics` is served by changecast's own runtime, so that is the runtime counted (stable
/// `RuntimeMetrics::num_alive_tasks`, no `tokio_unstable`). Outside any runtime nothing is written.
#[derive(Debug)]
struct RuntimeTasks;

impl Collector for RuntimeTasks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let alive = runtime.metrics().num_alive_tasks();
        let tasks = ConstGauge::new(i64::try_from(alive).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "runtime_tasks",
            "Alive tokio tasks in changecast's runtime, sampled at scrape time",
            None,
            tasks.metric_type(),
        )?;
        tasks.encode(metric)
    }
}

/// Every `reason` of `changecast_events_dropped`, as the mapper reports them.
pub const DROP_REASONS: &[&str] = &[
    "missing_event_id",
    "unknown_operation",
    "unhandled_operation",
    "unknown_collection",
    "missing_field",
    "wrong_type",
    "no_owner_for_delete",
    "invalid_room_id",
    "no_rooms",
    "oversize",
    // A change handed over as an owned document that cannot be encoded (a key with a
    // NUL byte): never from a server, whose changes are read as the bytes it sent.
    "invalid_bson",
];

/// Every metric changecast exports.
pub struct Metrics {
    registry: Registry,
    /// Changes read from the streams.
    pub changes_read: Family<ChangeLabels, Counter>,
    /// Events handed to the hub.
    pub(crate) events_routed: Family<EventLabels, Counter>,
    /// Events or routes dropped, by reason.
    pub events_dropped: Family<ReasonLabels, Counter>,
    /// Unknown status values seen.
    pub(crate) unknown_statuses: Counter,
    /// Messages written to sockets, per wire format.
    pub(crate) deliveries: Family<WireLabels, Counter>,
    /// Commit time of the change → written to the socket, seconds.
    pub(crate) delivery_latency: Histogram,
    /// Open client connections.
    pub connections: Family<WireLabels, Gauge>,
    /// Rooms with at least one subscriber.
    pub(crate) rooms: Gauge,
    /// `/ws` sockets waiting for `auth` and Engine.IO sessions waiting for CONNECT
    /// (the pool `server.max_unauthenticated` caps), sampled at scrape time.
    pub(crate) unauthenticated: Gauge,
    /// Subscriptions refused, by reason.
    pub(crate) subscriptions_refused: Family<ReasonLabels, Counter>,
    /// Authentication failures, by reason.
    pub(crate) auth_failures: Family<ReasonLabels, Counter>,
    /// Sessions cut off because their mailbox was full.
    pub slow_consumer_disconnects: Counter,
    /// Reconnecting clients served, by source.
    pub(crate) recoveries: Family<RecoveryLabels, Counter>,
    /// Now minus the cluster time of the newest token seen, seconds.
    pub(crate) stream_lag_seconds: Gauge<f64, AtomicU64>,
    /// Seconds since the checkpoint was last saved.
    pub(crate) checkpoint_age_seconds: Gauge<f64, AtomicU64>,
    /// Change-stream reconnects.
    pub(crate) stream_reconnects: Counter,
    /// Change streams opened to replay history for recovering clients (one per database
    /// per shared scan, however many clients it serves).
    pub(crate) replay_streams_opened: Counter,
    /// Times the stored token had fallen out of the oplog.
    pub(crate) history_lost: Counter,
    /// Client messages refused as malformed or over a limit, and connections refused by
    /// the unauthenticated caps (`unauthenticated_overloaded`, `unauthenticated_per_ip`), by reason.
    pub(crate) client_errors: Family<ReasonLabels, Counter>,
    /// `deliveries` of `/ws` and Socket.IO, looked up once: the family's lookup takes a
    /// lock and hashes the label for every frame otherwise.
    delivered: [Counter; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Exports `events_routed` at 0 for event names beyond the built-in ones
    /// (declared streams': config, so still a bounded set).
    pub(crate) fn init_events<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for event in names {
            let _ = self.events_routed.get_or_create(&EventLabels {
                event: event.to_owned(),
            });
        }
    }

    /// Creates every known label value at 0, so a fresh process exports each family
    /// (HELP, TYPE and samples) before anything happens: a dashboard then reads 0, and an
    /// alert can tell "zero" from "missing" (Prometheus's own advice). `collections` are
    /// the watched collection names.
    pub(crate) fn init_known(&self, collections: &[&str]) {
        for coll in collections.iter().copied().chain(["other"]) {
            for op in ["insert", "update", "replace", "delete", "other"] {
                let _ = self.changes_read.get_or_create(&ChangeLabels {
                    collection: coll.to_owned(),
                    op: op.to_owned(),
                });
            }
        }
        for event in crate::config::EVENT_NAMES {
            let _ = self.events_routed.get_or_create(&EventLabels {
                event: event.to_owned(),
            });
        }
        let families: [(&Family<ReasonLabels, Counter>, &[&'static str]); 4] = [
            (&self.events_dropped, DROP_REASONS),
            // Token failures (`AuthError::REASONS`) and expiry while connected.
            (&self.auth_failures, &["expired_in_session"]),
            (
                &self.subscriptions_refused,
                &[
                    "bad_room",
                    "forbidden",
                    "unavailable",
                    "unauthenticated",
                    "too_many_subscriptions",
                    "rate_limited",
                    "ownership_changed",
                ],
            ),
            (
                &self.client_errors,
                &[
                    "bad_json",
                    "bad_request",
                    "unknown_type",
                    "unknown_event",
                    "binary_not_supported",
                    "rate_limited",
                    "origin_not_allowed",
                    "unauthenticated_overloaded",
                    "unauthenticated_per_ip",
                ],
            ),
        ];
        for reason in crate::auth::AuthError::REASONS {
            let _ = self.auth_failures.get_or_create(&ReasonLabels { reason });
        }
        for (family, reasons) in families {
            for reason in reasons {
                let _ = family.get_or_create(&ReasonLabels { reason });
            }
        }
        for wire in [Wire::Native, Wire::SocketIo] {
            let _ = self.connections.get_or_create(&WireLabels { wire });
        }
        for source in [
            RecoveryKind::History,
            RecoveryKind::Oplog,
            RecoveryKind::Resync,
        ] {
            let _ = self.recoveries.get_or_create(&RecoveryLabels { source });
        }
    }

    /// Counts one frame written to a client over `wire`.
    pub(crate) fn delivered(&self, wire: Wire) {
        let i = match wire {
            Wire::Native => 0,
            Wire::SocketIo => 1,
        };
        self.delivered[i].inc();
    }

    /// Registers every family under the `changecast_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("changecast");
        let mut m = Self {
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
            unauthenticated: Gauge::default(),
            subscriptions_refused: Family::default(),
            auth_failures: Family::default(),
            slow_consumer_disconnects: Counter::default(),
            recoveries: Family::default(),
            stream_lag_seconds: Gauge::default(),
            checkpoint_age_seconds: Gauge::default(),
            stream_reconnects: Counter::default(),
            replay_streams_opened: Counter::default(),
            history_lost: Counter::default(),
            client_errors: Family::default(),
            delivered: Default::default(),
            registry: Registry::default(),
        };
        m.delivered = [Wire::Native, Wire::SocketIo]
            .map(|wire| m.deliveries.get_or_create(&WireLabels { wire }).clone());
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
            "replay_streams_opened",
            "Change streams opened to replay the oplog for recovering clients",
            m.replay_streams_opened.clone(),
        );
        r.register(
            "history_lost",
            "Times the stored resume token had fallen out of the oplog",
            m.history_lost.clone(),
        );
        r.register(
            "unauthenticated_connections",
            "Sockets and Socket.IO sessions not yet authenticated",
            m.unauthenticated.clone(),
        );
        r.register(
            "client_errors",
            "Client messages and unauthenticated connections refused, by reason",
            m.client_errors.clone(),
        );
        r.register_collector(Box::new(RuntimeTasks));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `changecast_runtime_tasks` sample in `text`, if any.
    fn runtime_tasks(text: &str) -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix("changecast_runtime_tasks "))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn runtime_tasks_is_sampled_at_each_encode() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let m = Metrics::new();
        rt.block_on(async {
            // `block_on`'s own future is not a spawned task.
            let idle = runtime_tasks(&m.encode());
            assert_eq!(idle, Some(0));
            let text = m.encode();
            assert!(
                text.contains("# TYPE changecast_runtime_tasks gauge"),
                "{text}"
            );
            let stop = tokio_util::sync::CancellationToken::new();
            let parked: Vec<_> = (0..3)
                .map(|_| {
                    let stop = stop.clone();
                    tokio::spawn(async move { stop.cancelled().await })
                })
                .collect();
            assert_eq!(runtime_tasks(&m.encode()), idle.map(|n| n + 3));
            stop.cancel();
            for t in parked {
                let _ = t.await;
            }
            assert_eq!(runtime_tasks(&m.encode()), idle);
        });
    }

    #[test]
    fn runtime_tasks_is_left_out_outside_a_runtime() {
        let text = Metrics::new().encode();
        assert!(!text.contains("changecast_runtime_tasks"), "{text}");
        assert!(text.contains("changecast_rooms"), "{text}");
    }
}
