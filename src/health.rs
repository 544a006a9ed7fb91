//! Readiness and freshness state shared by the pipeline (writer) and `/readyz` + `/metrics` (readers).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::Metrics;

/// Per-stream state plus the checkpoint store's health.
pub struct Health {
    streams: Mutex<BTreeMap<String, bool>>,
    checkpoint_ok: AtomicBool,
    /// Cluster time (seconds) of the newest token any stream has seen.
    last_cluster_secs: AtomicU64,
    /// Wall time (Unix ms) of the last empty batch: the stream was current then, even
    /// when the server's post-batch token did not move (an idle oplog only advances with
    /// MongoDB's periodic no-op writes, every 10 s; mongo-sim's not at all).
    caught_up_ms: AtomicU64,
    /// Monotonic ms since `started` of the last successful checkpoint save.
    last_checkpoint_ms: AtomicU64,
    started: Instant,
}

impl Health {
    /// Health for the given stream names; every stream starts closed.
    pub fn new<'a>(streams: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            streams: Mutex::new(streams.into_iter().map(|s| (s.to_owned(), false)).collect()),
            checkpoint_ok: AtomicBool::new(true),
            last_cluster_secs: AtomicU64::new(0),
            caught_up_ms: AtomicU64::new(0),
            last_checkpoint_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Marks a stream open or closed.
    pub(crate) fn set_stream_open(&self, stream: &str, open: bool) {
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(stream.to_owned(), open);
    }

    /// Records the checkpoint store's last outcome.
    pub(crate) fn set_checkpoint_ok(&self, ok: bool) {
        self.checkpoint_ok.store(ok, Ordering::Relaxed);
        if ok {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_checkpoint_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Records the cluster time of a token just seen.
    pub(crate) fn observe_cluster_time(&self, secs: u32) {
        self.last_cluster_secs
            .fetch_max(u64::from(secs), Ordering::Relaxed);
    }

    /// Records that a getMore came back empty: nothing newer was committed.
    pub(crate) fn observe_caught_up(&self) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.caught_up_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// True while every stream is open and the checkpoint store is writable.
    pub fn is_ready(&self) -> bool {
        let s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        !s.is_empty() && s.values().all(|open| *open) && self.checkpoint_ok.load(Ordering::Relaxed)
    }

    /// Per-stream open flags, for `/readyz` bodies.
    pub(crate) fn streams(&self) -> Vec<(String, bool)> {
        let s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Whether the last checkpoint save succeeded.
    pub(crate) fn checkpoint_ok(&self) -> bool {
        self.checkpoint_ok.load(Ordering::Relaxed)
    }

    /// Refreshes the time-derived gauges just before a scrape.
    pub(crate) fn refresh_gauges(&self, metrics: &Metrics) {
        let cluster = self.last_cluster_secs.load(Ordering::Relaxed) as f64;
        let caught_up = self.caught_up_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let current_as_of = cluster.max(caught_up);
        if current_as_of > 0.0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            // Cluster time has one-second resolution; never report negative lag.
            metrics
                .stream_lag_seconds
                .set((now - current_as_of).max(0.0));
        }
        let saved_ms = self.last_checkpoint_ms.load(Ordering::Relaxed);
        let age = self.started.elapsed().as_secs_f64() - saved_ms as f64 / 1000.0;
        metrics.checkpoint_age_seconds.set(age.max(0.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_batch_keeps_the_lag_near_zero_when_the_token_is_old() {
        let h = Health::new(["db"]);
        let m = Metrics::new();
        let old = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            - 60;
        h.observe_cluster_time(u32::try_from(old).unwrap_or(u32::MAX));
        h.refresh_gauges(&m);
        assert!(m.stream_lag_seconds.get() >= 59.0);
        h.observe_caught_up();
        h.refresh_gauges(&m);
        assert!(m.stream_lag_seconds.get() < 1.0);
    }
}
