//! The cluster clock: one monotonic `Timestamp` source (seconds = wall clock, increment = counter).

use bson::Timestamp;

/// Issues strictly increasing cluster timestamps. Not synchronized: it lives inside the
/// store's mutex so that "tick, apply, append to oplog" is one atomic step.
#[derive(Debug, Clone)]
pub(crate) struct ClusterClock {
    last: Timestamp,
}

/// Seconds since the epoch, saturating into `u32` as BSON timestamps require.
pub(crate) fn wall_secs() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Total order on timestamps (time, then increment).
pub(crate) fn ts_key(ts: Timestamp) -> (u32, u32) {
    (ts.time, ts.increment)
}

impl ClusterClock {
    /// A clock that never goes below `floor` (the persisted clock after a restart).
    pub(crate) fn new(floor: Option<Timestamp>) -> Self {
        let now = Timestamp {
            time: wall_secs(),
            increment: 0,
        };
        let last = match floor {
            Some(f) if ts_key(f) > ts_key(now) => f,
            _ => now,
        };
        Self { last }
    }

    /// The latest issued time.
    pub(crate) fn now(&self) -> Timestamp {
        self.last
    }

    /// Issues the next timestamp.
    pub(crate) fn tick(&mut self) -> Timestamp {
        let wall = wall_secs();
        self.last = if wall > self.last.time {
            Timestamp {
                time: wall,
                increment: 1,
            }
        } else if self.last.increment == u32::MAX {
            Timestamp {
                time: self.last.time.saturating_add(1),
                increment: 1,
            }
        } else {
            Timestamp {
                time: self.last.time,
                increment: self.last.increment + 1,
            }
        };
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing() {
        let mut c = ClusterClock::new(Some(Timestamp {
            time: u32::MAX - 1,
            increment: 5,
        }));
        let mut prev = c.now();
        for _ in 0..1000 {
            let t = c.tick();
            assert!(ts_key(t) > ts_key(prev));
            prev = t;
        }
    }
}
