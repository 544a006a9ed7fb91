//! Connection counting against the total, per-subject and unauthenticated caps (released on drop), and the per-connection message rate window.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts open connections.
#[derive(Default)]
pub struct ConnLimits {
    total: AtomicUsize,
    /// Connections per token subject. Bounded: an entry exists only while a permit
    /// for it is alive, and every permit belongs to a connection that holds (or is
    /// about to hold) a `total` slot. Overflow policy: past a subject's cap the new
    /// connection is refused.
    per_subject: Mutex<HashMap<String, usize>>,
    /// Sockets and Engine.IO sessions not yet authenticated: a pool apart from
    /// `total`, so anonymous peers can never take a token holder's slot.
    unauth: AtomicUsize,
    /// Unauthenticated connections per peer address. Bounded: an entry exists only
    /// while a permit for it is alive, and permits are capped by `unauth`'s maximum.
    /// Overflow policy: past either cap the new connection is refused, never queued.
    unauth_per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Held while a connection counts against the total.
pub(crate) struct TotalPermit(Arc<ConnLimits>);

/// Held while a connection counts against its subject.
pub(crate) struct SubjectPermit(Arc<ConnLimits>, String);

/// Held while a connection is unauthenticated; dropped when it authenticates or closes.
pub(crate) struct UnauthPermit(Arc<ConnLimits>, Option<IpAddr>);

/// Why an unauthenticated connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnauthRefused {
    /// `server.max_unauthenticated` are open.
    Total,
    /// `server.max_unauthenticated_per_ip` are open from this address.
    PerIp,
}

impl UnauthRefused {
    /// The error code (HTTP body and `changecast_client_errors_total` reason).
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::Total => "unauthenticated_overloaded",
            Self::PerIp => "unauthenticated_per_ip",
        }
    }

    /// The human-readable message.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Total => "too many unauthenticated connections",
            Self::PerIp => "too many unauthenticated connections from this address",
        }
    }
}

/// The key an address is counted under: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by
/// its /64, the smallest block one subscriber is usually given (a peer varying the
/// low 64 bits would otherwise get a fresh allowance per address).
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl ConnLimits {
    /// Takes a slot in the total, or `None` when `max` are open.
    pub(crate) fn acquire_total(self: &Arc<Self>, max: usize) -> Option<TotalPermit> {
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(TotalPermit(self.clone()))
    }

    /// Takes a slot for `subject`, or `None` when it already has `max` connections.
    pub(crate) fn acquire_subject(
        self: &Arc<Self>,
        subject: &str,
        max: usize,
    ) -> Option<SubjectPermit> {
        let mut m = self.per_subject.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(subject.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SubjectPermit(self.clone(), subject.to_owned()))
    }

    /// Takes a slot in the unauthenticated pool: at most `max` in all and `per_ip`
    /// from one address (`0` = no per-address cap; `None` address = not counted per address).
    pub(crate) fn acquire_unauth(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        max: usize,
        per_ip: usize,
    ) -> Result<UnauthPermit, UnauthRefused> {
        let prev = self.unauth.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.unauth.fetch_sub(1, Ordering::AcqRel);
            return Err(UnauthRefused::Total);
        }
        let key = ip.filter(|_| per_ip > 0).map(ip_key);
        if let Some(key) = key {
            let mut m = self.unauth_per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(key).or_insert(0);
            if *n >= per_ip {
                drop(m);
                self.unauth.fetch_sub(1, Ordering::AcqRel);
                return Err(UnauthRefused::PerIp);
            }
            *n += 1;
        }
        Ok(UnauthPermit(self.clone(), key))
    }

    /// Open unauthenticated connections.
    pub(crate) fn unauthenticated(&self) -> usize {
        self.unauth.load(Ordering::Acquire)
    }
}

impl SubjectPermit {
    /// The subject this permit counts against.
    pub(crate) fn subject(&self) -> &str {
        &self.1
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

impl Drop for UnauthPermit {
    fn drop(&mut self) {
        if let Some(key) = self.1 {
            let mut m = self
                .0
                .unauth_per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&key);
                }
            }
        }
        self.0.unauth.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Messages-per-second accounting for one connection.
pub(crate) struct RateWindow {
    limit: u32,
    start: Instant,
    count: u32,
    refused: u32,
}

impl RateWindow {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            start: Instant::now(),
            count: 0,
            refused: 0,
        }
    }

    /// Counts one message; false when over the limit in this one-second window.
    pub(crate) fn allow(&mut self) -> bool {
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
    pub(crate) fn first_refusal(&self) -> bool {
        self.refused == 1
    }

    /// Far over the limit: close rather than keep parsing.
    pub(crate) fn abusive(&self) -> bool {
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

    #[test]
    fn unauthenticated_pool_caps_total_and_per_address() {
        let l = Arc::new(ConnLimits::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.acquire_unauth(Some(a), 3, 2).unwrap();
        let _a2 = l.acquire_unauth(Some(a), 3, 2).unwrap();
        assert_eq!(
            l.acquire_unauth(Some(a), 3, 2).err(),
            Some(UnauthRefused::PerIp)
        );
        // The per-address refusal gave its total slot back.
        let _b1 = l.acquire_unauth(Some(b), 3, 2).unwrap();
        assert_eq!(
            l.acquire_unauth(Some(b), 3, 2).err(),
            Some(UnauthRefused::Total)
        );
        assert_eq!(l.unauthenticated(), 3);
        // The pool is apart from the authenticated total.
        assert!(l.acquire_total(1).is_some());
        drop(a1);
        assert!(l.acquire_unauth(Some(a), 3, 2).is_ok());
        // 0 disables the per-address cap.
        let l = Arc::new(ConnLimits::default());
        let all: Vec<_> = (0..5)
            .map(|_| l.acquire_unauth(Some(a), 5, 0).unwrap())
            .collect();
        assert!(l.unauth_per_ip.lock().unwrap().is_empty());
        drop(all);
        assert_eq!(l.unauthenticated(), 0);
    }

    #[test]
    fn ipv6_is_counted_by_its_64_and_mapped_v4_as_v4() {
        let l = Arc::new(ConnLimits::default());
        let p1: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let p2: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = l.acquire_unauth(Some(p1), 10, 1).unwrap();
        assert_eq!(
            l.acquire_unauth(Some(p2), 10, 1).err(),
            Some(UnauthRefused::PerIp)
        );
        assert!(l.acquire_unauth(Some(other), 10, 1).is_ok());
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let _y = l.acquire_unauth(Some(v4), 10, 1).unwrap();
        assert_eq!(
            l.acquire_unauth(Some(mapped), 10, 1).err(),
            Some(UnauthRefused::PerIp)
        );
    }
}
