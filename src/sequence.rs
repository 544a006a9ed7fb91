//! Event ids that sort in commit order on any server: the change's cluster time, its index among the stream's changes at that time, then the resume token.
//!
//! MongoDB's resume tokens (KeyString) sort in commit order, but nothing in the protocol
//! promises it: SecantusDB's are little-endian BSON, and compatible services (DocumentDB,
//! Cosmos DB, FerretDB) say nothing about theirs. Every change event does carry
//! `clusterTime`, equal for the changes of one transaction and increasing otherwise, and
//! a stream hands changes out in commit order. So an id is
//!
//! `V` + cluster time (16 hex) + index within that time (8 hex) + `-` + token hex
//!
//! which sorts as a string in commit order (all fields are fixed-width upper-case hex),
//! is the same in every process watching the same stream (the index counts the stream's
//! changes at that time, from the first), and carries the token a replay resumes after.
//! A time-only id (`V` + 16 hex) is a stream position that is no change: it sorts before
//! every change at that time and after every earlier one. Ids of the earlier form (a bare
//! token, before 0.2) start with a hex digit and so sort before every id of this form:
//! a client or checkpoint holding one is sent to the oplog, never skipped past events.

use bson::raw::{RawBsonRef, RawDocument};
use bson::Timestamp;

use crate::bsonscan;
use crate::event::EventId;

const MARK: char = 'V';
const TIME_HEX: usize = 16;
const INDEX_HEX: usize = 8;

/// A stream position read back from an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The change's cluster time.
    pub(crate) time: (u32, u32),
    /// Its index among the stream's changes at that time; `None` for a time-only position.
    pub(crate) index: Option<u32>,
}

impl Position {
    /// The cluster time as a BSON timestamp.
    pub fn timestamp(&self) -> Timestamp {
        Timestamp {
            time: self.time.0,
            increment: self.time.1,
        }
    }
}

/// The id of the change at `time`, `index`-th at that time in its stream, with `token`.
pub(crate) fn change_id(time: Timestamp, index: u32, token: &str) -> EventId {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut head = [0u8; 1 + TIME_HEX + 8];
    head[0] = MARK as u8;
    for (i, n) in [time.time, time.increment, index].into_iter().enumerate() {
        for d in 0..8 {
            head[1 + i * 8 + d] = HEX[(n >> (28 - 4 * d)) as usize & 0xf];
        }
    }
    // ASCII: the check cannot fail. Joined without a heap buffer and copied once into the
    // id's shared text (`format!` built a String per change only for it to be copied).
    let head = std::str::from_utf8(&head).unwrap_or_default();
    crate::joined::with_joined(&[head, "-", token], |s| EventId::new(s))
}

/// The position just before every change at `time`.
pub fn time_id(time: Timestamp) -> EventId {
    EventId::new(format!("{MARK}{:08X}{:08X}", time.time, time.increment))
}

/// The position an id stands for; `None` for an id of another form.
pub fn position(id: &EventId) -> Option<Position> {
    let s = id.as_str();
    let rest = s.strip_prefix(MARK)?;
    let hex = |r: std::ops::Range<usize>| {
        rest.get(r)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    let time = (hex(0..8)?, hex(8..16)?);
    if rest.len() == TIME_HEX {
        return Some(Position { time, index: None });
    }
    let index = hex(16..24)?;
    let token = rest.get(TIME_HEX + INDEX_HEX..)?.strip_prefix('-')?;
    (!token.is_empty()).then_some(Position {
        time,
        index: Some(index),
    })
}

/// The resume token (hex `_data`) an id carries: after the `-` of a change id, the whole
/// of an id in the earlier bare-token form, none for a time-only position.
pub fn token_of(id: &EventId) -> Option<&str> {
    let s = id.as_str();
    if let Some(rest) = s.strip_prefix(MARK) {
        return rest
            .get(TIME_HEX + INDEX_HEX..)
            .and_then(|t| t.strip_prefix('-'))
            .filter(|t| !t.is_empty());
    }
    (!s.is_empty()).then_some(s)
}

/// Why a change cannot be given an id that sorts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    /// The change has no `clusterTime` timestamp.
    #[error("a change event carries no clusterTime, so its commit order cannot be known")]
    NoClusterTime,
    /// The change has no resume token `_id: {_data: …}`.
    #[error("a change event carries no resume token (_id._data)")]
    NoToken,
    /// A change's cluster time is older than the one before it in the same stream.
    #[error("the server sent a change at cluster time {now} after one at {before}: its stream is not in commit order")]
    Backwards {
        /// The newer change's time, `t:i`.
        now: String,
        /// The earlier change's time.
        before: String,
    },
}

/// Numbers one stream's changes. Lives as long as the stream (and its resumes): the
/// index at a time continues across a resume from a change id.
#[derive(Debug, Clone, Default)]
pub struct Sequencer {
    last: Option<((u32, u32), Option<u32>)>,
    newest: Option<EventId>,
}

impl Sequencer {
    /// A stream that starts at `time` (inclusive: `startAtOperationTime`), or after the
    /// change or position `id` (`resumeAfter` its token).
    pub(crate) fn after(id: &EventId) -> Self {
        let last = position(id).map(|p| (p.time, p.index));
        Self {
            last,
            newest: last.map(|_| id.clone()),
        }
    }

    /// A stream whose start is not known (from now, or a bare token an operator gave):
    /// the first change is numbered 0 at its time.
    pub fn fresh() -> Self {
        Self::default()
    }

    /// The id of the next change of the stream.
    pub fn next(&mut self, change: &RawDocument) -> Result<EventId, OrderError> {
        let token = match bsonscan::get(change, "_id") {
            Some(RawBsonRef::Document(t)) => match bsonscan::get(t, "_data") {
                Some(RawBsonRef::String(s)) if !s.is_empty() => s,
                _ => return Err(OrderError::NoToken),
            },
            _ => return Err(OrderError::NoToken),
        };
        let ts = match bsonscan::get(change, "clusterTime") {
            Some(RawBsonRef::Timestamp(ts)) => ts,
            _ => return Err(OrderError::NoClusterTime),
        };
        let time = (ts.time, ts.increment);
        let index = match self.last {
            Some((t, _)) if t > time => {
                return Err(OrderError::Backwards {
                    now: format!("{}:{}", time.0, time.1),
                    before: format!("{}:{}", t.0, t.1),
                })
            }
            Some((t, Some(i))) if t == time => i + 1,
            _ => 0,
        };
        self.last = Some((time, Some(index)));
        let id = change_id(ts, index, token);
        self.newest = Some(id.clone());
        Ok(id)
    }

    /// The id of the newest change numbered (or the start it resumed after).
    pub(crate) fn newest(&self) -> Option<&EventId> {
        self.newest.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(t: u32, i: u32, token: &str) -> bson::RawDocumentBuf {
        bson::rawdoc! {"_id": {"_data": token}, "clusterTime": Timestamp { time: t, increment: i }}
    }

    #[test]
    fn an_id_is_the_mark_the_time_the_index_and_the_token_for_any_token_length() {
        for (t, i, n, token) in [
            (0, 0, 0, "8201".to_owned()),
            (0x6756_ABCD, 0xFFFF_FFFF, 7, "x".repeat(300)),
            (u32::MAX, 1, u32::MAX, "é".repeat(400)),
        ] {
            let id = change_id(
                Timestamp {
                    time: t,
                    increment: i,
                },
                n,
                &token,
            );
            assert_eq!(id.as_str(), format!("V{t:08X}{i:08X}{n:08X}-{token}"));
        }
    }

    #[test]
    fn ids_sort_by_time_then_index_whatever_the_tokens() {
        let mut s = Sequencer::fresh();
        // Tokens that sort backwards (as SecantusDB's little-endian ones may).
        let a = s.next(&change(100, 1, "FF")).unwrap();
        let b = s.next(&change(100, 1, "EE")).unwrap(); // same transaction
        let c = s.next(&change(100, 2, "01")).unwrap();
        let d = s.next(&change(101, 0, "00")).unwrap();
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(position(&b).unwrap().index, Some(1));
        assert_eq!(position(&c).unwrap().index, Some(0));
        assert_eq!(token_of(&b), Some("EE"));
        // A time-only position sits before every change at its time, after earlier ones.
        let floor = time_id(Timestamp {
            time: 100,
            increment: 2,
        });
        assert!(b < floor && floor < c);
        assert_eq!(token_of(&floor), None);
        assert_eq!(position(&floor).unwrap().index, None);
    }

    #[test]
    fn a_resumed_stream_numbers_a_transaction_as_one_that_saw_its_start() {
        let changes = [
            change(7, 1, "A0"),
            change(7, 1, "A1"),
            change(7, 1, "A2"),
            change(8, 1, "B0"),
        ];
        let mut whole = Sequencer::fresh();
        let ids: Vec<_> = changes.iter().map(|c| whole.next(c).unwrap()).collect();
        // Resumed after the first change of the transaction.
        let mut resumed = Sequencer::after(&ids[0]);
        let again: Vec<_> = changes[1..]
            .iter()
            .map(|c| resumed.next(c).unwrap())
            .collect();
        assert_eq!(again, ids[1..]);
        // Started at the transaction's time (inclusive): numbered from 0.
        let mut at = Sequencer::after(&time_id(Timestamp {
            time: 7,
            increment: 1,
        }));
        assert_eq!(at.next(&changes[0]).unwrap(), ids[0]);
    }

    #[test]
    fn a_stream_going_back_in_time_or_without_times_is_refused() {
        let mut s = Sequencer::fresh();
        s.next(&change(10, 5, "AA")).unwrap();
        assert!(matches!(
            s.next(&change(10, 4, "BB")),
            Err(OrderError::Backwards { .. })
        ));
        assert_eq!(
            s.next(&bson::rawdoc! {"_id": {"_data": "CC"}}),
            Err(OrderError::NoClusterTime)
        );
        assert_eq!(
            s.next(&bson::rawdoc! {"clusterTime": Timestamp { time: 11, increment: 0 }}),
            Err(OrderError::NoToken)
        );
    }

    #[test]
    fn earlier_bare_token_ids_sort_before_every_new_id_and_keep_their_token() {
        let old = EventId::new("8265F0A1B2000000012B0429296E1404");
        let new = change_id(
            Timestamp {
                time: 1,
                increment: 0,
            },
            0,
            "00",
        );
        assert!(old < new);
        assert_eq!(position(&old), None);
        assert_eq!(token_of(&old), Some(old.as_str()));
        for bad in [
            "V",
            "V123",
            "V0000000100000000",
            "V000000010000000000000000-",
            "VZZ",
        ] {
            let id = EventId::new(bad);
            assert!(
                bad == "V0000000100000000" || position(&id).is_none(),
                "{bad}"
            );
        }
    }
}
