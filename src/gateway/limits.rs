//! Connection counting against the total and per-subject caps, released on drop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
