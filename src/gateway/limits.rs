//! Connection counting against the total and per-subject caps (released on drop), and the per-connection message rate window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts open connections.
#[derive(Default)]
pub struct ConnLimits {
    total: AtomicUsize,
    per_subject: Mutex<HashMap<String, usize>>,
}

/// Held while a connection counts against the total.
pub struct TotalPermit(Arc<ConnLimits>);

/// Held while a connection counts against its subject.
pub struct SubjectPermit(Arc<ConnLimits>, String);

impl ConnLimits {
    /// Takes a slot in the total, or `None` when `max` are open.
    pub fn acquire_total(self: &Arc<Self>, max: usize) -> Option<TotalPermit> {
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(TotalPermit(self.clone()))
    }

    /// Takes a slot for `subject`, or `None` when it already has `max` connections.
    pub fn acquire_subject(self: &Arc<Self>, subject: &str, max: usize) -> Option<SubjectPermit> {
        let mut m = self.per_subject.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(subject.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SubjectPermit(self.clone(), subject.to_owned()))
    }

    /// Open connections.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for TotalPermit {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for SubjectPermit {
    fn drop(&mut self) {
        let mut m = self.0.per_subject.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                // Keep the map as small as the set of connected subjects.
                m.remove(&self.1);
            }
        }
    }
}

/// Messages-per-second accounting for one connection.
pub struct RateWindow {
    limit: u32,
    start: Instant,
    count: u32,
    refused: u32,
}

impl RateWindow {
    pub fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            start: Instant::now(),
            count: 0,
            refused: 0,
        }
    }

    /// Counts one message; false when over the limit in this one-second window.
    pub fn allow(&mut self) -> bool {
        if self.start.elapsed() >= Duration::from_secs(1) {
            self.start = Instant::now();
            self.count = 0;
            self.refused = 0;
        }
        self.count = self.count.saturating_add(1);
        if self.count > self.limit {
            self.refused = self.refused.saturating_add(1);
            return false;
        }
        true
    }

    /// The first refusal in this window (reply once, then drop silently).
    pub fn first_refusal(&self) -> bool {
        self.refused == 1
    }

    /// Far over the limit: close rather than keep parsing.
    pub fn abusive(&self) -> bool {
        self.count > self.limit.saturating_mul(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_releases() {
        let l = Arc::new(ConnLimits::default());
        let a = l.acquire_total(2).unwrap();
        let _b = l.acquire_total(2).unwrap();
        assert!(l.acquire_total(2).is_none());
        drop(a);
        assert!(l.acquire_total(2).is_some());
        let s1 = l.acquire_subject("u1", 1).unwrap();
        assert!(l.acquire_subject("u1", 1).is_none());
        assert!(l.acquire_subject("u2", 1).is_some());
        drop(s1);
        assert!(l.acquire_subject("u1", 1).is_some());
        assert!(l.per_subject.lock().unwrap().is_empty());
    }
}
