//! What the writer sent and what the clients received, and when: the source of every figure.
//!
//! Each write gets a sequence number (`seq`) that travels inside the document
//! (`bseq-N` in a field the server forwards), so a receipt is matched to its
//! write without trusting the server's ids. Times are microseconds since one
//! `Instant` in this process: writer and clients share the clock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// `target` of a write every client should receive.
pub const BROADCAST: u32 = u32::MAX;

/// Receipt-log shards; a client appends to `index % SHARDS`, so two runtime
/// threads rarely contend.
const SHARDS: usize = 64;

/// (write index, receipt time µs).
type Receipt = (u32, u64);

/// Per-write bookkeeping and the receipt log.
pub struct Tracker {
    base: Instant,
    /// Issue time + 1 (0: not issued).
    issued_us: Box<[AtomicU64]>,
    /// Acknowledgement time + 1 (0: not acknowledged yet).
    acked_us: Box<[AtomicU64]>,
    expected: Box<[AtomicU32]>,
    received: Box<[AtomicU32]>,
    /// Which client may receive the write: an order index, or `BROADCAST`.
    target: Box<[AtomicU32]>,
    delivered: AtomicU64,
    expected_total: AtomicU64,
    misrouted: AtomicU64,
    unknown: AtomicU64,
    receipts: Box<[Mutex<Vec<Receipt>>]>,
}

impl Tracker {
    /// A tracker for at most `capacity` writes.
    pub fn new(capacity: usize) -> Self {
        fn zeros64(n: usize) -> Box<[AtomicU64]> {
            (0..n).map(|_| AtomicU64::new(0)).collect()
        }
        fn zeros32(n: usize) -> Box<[AtomicU32]> {
            (0..n).map(|_| AtomicU32::new(0)).collect()
        }
        Self {
            base: Instant::now(),
            issued_us: zeros64(capacity),
            acked_us: zeros64(capacity),
            expected: zeros32(capacity),
            received: zeros32(capacity),
            target: zeros32(capacity),
            delivered: AtomicU64::new(0),
            expected_total: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            receipts: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Most writes this tracker can follow.
    pub fn capacity(&self) -> usize {
        self.expected.len()
    }

    /// Microseconds since the tracker was made.
    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Records a write about to be sent; must precede the send so no receipt
    /// can arrive for an unknown write.
    pub fn issue(&self, seq: u64, target: u32, expected: u32) {
        let Some(i) = self.index(seq) else { return };
        self.target[i].store(target, Ordering::Relaxed);
        self.expected[i].store(expected, Ordering::Relaxed);
        self.expected_total
            .fetch_add(u64::from(expected), Ordering::Relaxed);
        self.issued_us[i].store(self.now_us() + 1, Ordering::Release);
    }

    /// Records the write's acknowledgement by the database (or control channel).
    pub fn ack(&self, seq: u64) {
        if let Some(i) = self.index(seq) {
            self.acked_us[i].store(self.now_us() + 1, Ordering::Release);
        }
    }

    /// Forgets a write that failed: nobody should receive it.
    pub fn cancel(&self, seq: u64) {
        if let Some(i) = self.index(seq) {
            let expected = self.expected[i].swap(0, Ordering::Relaxed);
            self.expected_total
                .fetch_sub(u64::from(expected), Ordering::Relaxed);
        }
    }

    /// Whether write `seq` reached every client it is owed to (or was never issued,
    /// or failed).
    pub fn settled(&self, seq: u64) -> bool {
        self.index(seq).is_none_or(|i| {
            self.received[i].load(Ordering::Relaxed) >= self.expected[i].load(Ordering::Relaxed)
        })
    }

    /// Records one receipt by client `client`; `accepts(target)` says whether
    /// that client may receive a write addressed to `target`.
    pub fn receive(&self, seq: u64, client: usize, accepts: impl Fn(u32) -> bool) {
        let t = self.now_us();
        let Some(i) = self.index(seq) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.issued_us[i].load(Ordering::Acquire) == 0 {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let target = self.target[i].load(Ordering::Relaxed);
        if target != BROADCAST && !accepts(target) {
            self.misrouted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.received[i].fetch_add(1, Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let shard = &self.receipts[client % SHARDS];
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((i as u32, t));
    }

    /// Deliveries still owed: expected so far minus received so far.
    pub fn outstanding(&self) -> u64 {
        self.expected_total
            .load(Ordering::Relaxed)
            .saturating_sub(self.delivered.load(Ordering::Relaxed))
    }

    /// Writes off whatever is still owed (after a phase is summarized), so a stalled
    /// phase cannot hold the next phase's window shut.
    pub fn settle(&self) {
        self.expected_total
            .store(self.delivered.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Receipts counted so far (duplicates included).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Receipts for writes the client was not an audience of.
    pub fn misrouted(&self) -> u64 {
        self.misrouted.load(Ordering::Relaxed)
    }

    /// Receipts carrying no known write.
    pub fn unknown(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    fn index(&self, seq: u64) -> Option<usize> {
        let i = usize::try_from(seq).ok()?;
        (i < self.expected.len()).then_some(i)
    }

    /// Summarizes writes `from..to`; receipts of those writes are taken out of the log.
    pub fn summarize(&self, from: u64, to: u64) -> Summary {
        let range = from as usize..(to as usize).min(self.capacity());
        let mut s = Summary::default();
        let mut first_issue = u64::MAX;
        let mut last_ack = 0;
        for i in range.clone() {
            let expected = u64::from(self.expected[i].load(Ordering::Relaxed));
            let received = u64::from(self.received[i].load(Ordering::Relaxed));
            let issued = self.issued_us[i].load(Ordering::Acquire);
            if issued == 0 {
                continue;
            }
            s.writes += 1;
            first_issue = first_issue.min(issued - 1);
            let acked = self.acked_us[i].load(Ordering::Acquire);
            if acked > 0 {
                last_ack = last_ack.max(acked - 1);
            }
            s.expected += expected;
            s.delivered += received.min(expected);
            s.lost += expected.saturating_sub(received);
            s.duplicates += received.saturating_sub(expected);
        }
        let mut latencies = Vec::with_capacity(s.delivered as usize);
        let mut last_receipt = 0;
        for shard in self.receipts.iter() {
            let mut log = shard.lock().unwrap_or_else(|e| e.into_inner());
            log.retain(|&(i, t)| {
                if !range.contains(&(i as usize)) {
                    return true;
                }
                last_receipt = last_receipt.max(t);
                let acked = self.acked_us[i as usize].load(Ordering::Acquire);
                if acked == 0 {
                    s.unacked_receipts += 1;
                } else if t < acked - 1 {
                    // The change stream can beat the driver's reply to the writer;
                    // such a receipt counts as zero latency and is reported.
                    s.early_receipts += 1;
                    latencies.push(0);
                } else {
                    latencies.push(t - (acked - 1));
                }
                false
            });
        }
        if s.writes > 0 {
            let span = last_receipt.max(last_ack).saturating_sub(first_issue);
            s.span_secs = span as f64 / 1e6;
            let write_span = last_ack.saturating_sub(first_issue);
            if write_span > 0 {
                s.writes_per_sec = s.writes as f64 * 1e6 / write_span as f64;
            }
            if span > 0 {
                s.deliveries_per_sec = s.delivered as f64 * 1e6 / span as f64;
            }
        }
        s.latency = Percentiles::of(&mut latencies);
        s
    }
}

/// Figures for a range of writes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Writes issued.
    pub writes: u64,
    /// Writes acknowledged per second (first issue → last acknowledgement).
    pub writes_per_sec: f64,
    /// Deliveries owed.
    pub expected: u64,
    /// Deliveries received (each at most once).
    pub delivered: u64,
    /// Owed but never received.
    pub lost: u64,
    /// Received more than once.
    pub duplicates: u64,
    /// Receipts before the writer saw the acknowledgement (latency recorded as 0).
    pub early_receipts: u64,
    /// Receipts of writes never acknowledged (failed writes that still arrived).
    pub unacked_receipts: u64,
    /// First issue → last receipt, seconds.
    pub span_secs: f64,
    /// `delivered / span_secs`.
    pub deliveries_per_sec: f64,
    /// Acknowledgement → receipt.
    pub latency: Percentiles,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Percentiles {
    /// Percentiles of microsecond samples (sorts them).
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
            samples.get(rank - 1).copied().unwrap_or(0) as f64 / 1e3
        };
        let sum: u128 = samples.iter().map(|&v| u128::from(v)).sum();
        Self {
            count: samples.len() as u64,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
            mean_ms: sum as f64 / samples.len() as f64 / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lost_duplicate_and_misrouted_deliveries() {
        let t = Tracker::new(10);
        t.issue(0, 1, 2);
        t.ack(0);
        t.issue(1, BROADCAST, 1);
        t.ack(1);
        t.receive(0, 0, |target| target == 1);
        t.receive(0, 1, |target| target == 2); // wrong client
        t.receive(1, 2, |_| false); // broadcast reaches anyone
        t.receive(1, 3, |_| false); // …but only once is owed
        t.receive(7, 0, |_| true); // never issued
        let s = t.summarize(0, 2);
        assert_eq!(s.writes, 2);
        assert_eq!(s.expected, 3);
        assert_eq!(s.delivered, 2);
        assert_eq!(s.lost, 1);
        assert_eq!(s.duplicates, 1);
        assert_eq!(t.misrouted(), 1);
        assert_eq!(t.unknown(), 1);
        assert_eq!(s.latency.count, 3);
    }

    #[test]
    fn a_receipt_before_the_ack_counts_as_early_with_zero_latency() {
        let t = Tracker::new(1);
        t.issue(0, BROADCAST, 1);
        t.receive(0, 0, |_| true);
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.ack(0);
        let s = t.summarize(0, 1);
        assert_eq!(s.early_receipts, 1);
        assert_eq!(s.latency.max_ms, 0.0);
    }

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<u64> = (1..=1000).map(|ms| ms * 1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.p999_ms, 999.0);
        assert_eq!(p.max_ms, 1000.0);
    }
}
