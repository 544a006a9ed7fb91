//! The bounded oplog and resume tokens: what happened, in commit order; knows nothing of cursors.

use std::collections::VecDeque;

use bson::{Binary, DateTime, Document, Timestamp};
use serde::{Deserialize, Serialize};

use crate::clock::ts_key;

/// One committed change. Every write, DDL included, appends exactly one entry with its own
/// cluster timestamp, so `token` is unique and entries are sorted by it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The event's resume token `_data`.
    pub(crate) token: String,
    /// Cluster time of the commit.
    pub(crate) ts: Timestamp,
    /// Wall time of the commit.
    pub(crate) wall: DateTime,
    /// Database.
    pub(crate) db: String,
    /// Collection, absent for `dropDatabase`.
    pub(crate) coll: Option<String>,
    /// The collection's UUID (shown with `showExpandedEvents`).
    pub(crate) uuid: Option<Binary>,
    /// `insert`, `update`, `replace`, `delete`, `drop`, `rename`, `dropDatabase`, `create`,
    /// `modify`, `createIndexes`, `dropIndexes`.
    pub(crate) op: String,
    /// `{_id: …}` for document events.
    pub(crate) doc_key: Option<Document>,
    /// The document after the change (insert, replace, update post-image).
    pub(crate) post: Option<Document>,
    /// The document before the change; kept only when the collection records pre-images.
    pub(crate) pre: Option<Document>,
    /// Whether the collection had `changeStreamPreAndPostImages` enabled at commit time.
    pub(crate) images: bool,
    /// `updateDescription` for updates.
    pub(crate) desc: Option<Document>,
    /// Op-specific extras: rename's `to`, DDL's `operationDescription`.
    pub(crate) extra: Option<Document>,
}

/// Resume token byte that follows the timestamp in an event token (sorts before `HWM`).
const EVENT_TAG: &str = "2B";
/// High-water-mark tag: "everything at or before this time has been seen"; sorts after every
/// event token with the same timestamp and before every later one.
const HWM_TAG: &str = "FF";

/// Token of the event at `ts`, `index` within its operation; `invalidate` marks the invalidate
/// that follows a drop/rename/dropDatabase (same time, sorts right after it).
pub(crate) fn event_token(ts: Timestamp, index: u16, invalidate: bool) -> String {
    format!(
        "82{:08X}{:08X}{EVENT_TAG}{index:04X}{:02X}",
        ts.time, ts.increment, invalidate as u8
    )
}

/// [`event_token`] with the namespace and document key appended, as mongod's KeyString
/// tokens embed them (after the time, so order is unchanged): a consumer that shows
/// tokens to clients leaks document keys here exactly as it would against mongod.
pub(crate) fn event_token_for(ts: Timestamp, ns: &str, doc_key: Option<&Document>) -> String {
    let mut t = event_token(ts, 0, false);
    let mut tail = ns.as_bytes().to_vec();
    if let Some(k) = doc_key {
        tail.push(0);
        tail.extend_from_slice(&bson::to_vec(k).unwrap_or_default());
    }
    for b in tail {
        t.push_str(&format!("{b:02X}"));
    }
    t
}

/// Marks the end of a fragment token. It cannot end any other token: event tokens end in the
/// invalidate flag (`00`/`01`), a document key's BSON terminator (`00`) or a namespace byte,
/// and `FE` never occurs in UTF-8.
const FRAGMENT_END: &str = "FE";

/// Token of fragment `index` (0-based, as mongod's `fragmentNum`) of the split event whose
/// token is `event`: the event token, the index as 4 big-endian bytes, then [`FRAGMENT_END`].
/// Appended like mongod appends `fragmentNum` to its KeyString, so fragments sort after their
/// event's own token, in fragment order, and before every later event.
pub(crate) fn fragment_token(event: &str, index: u32) -> String {
    format!("{event}{index:08X}{FRAGMENT_END}")
}

/// Splits a fragment token into its event token and fragment index; `None` for other tokens.
pub(crate) fn split_fragment_token(data: &str) -> Option<(&str, u32)> {
    let body = data.strip_suffix(FRAGMENT_END)?;
    let (event, index) = body.split_at_checked(body.len().checked_sub(8)?)?;
    if event.len() < 26 || event.get(18..20) != Some(EVENT_TAG) {
        return None;
    }
    Some((event, u32::from_str_radix(index, 16).ok()?))
}

/// High-water-mark token for an idle stream that has seen everything up to `ts`.
pub(crate) fn hwm_token(ts: Timestamp) -> String {
    format!("82{:08X}{:08X}{HWM_TAG}", ts.time, ts.increment)
}

/// Position just before every event at `ts` (for `startAtOperationTime`).
pub(crate) fn start_position(ts: Timestamp) -> String {
    format!("82{:08X}{:08X}", ts.time, ts.increment)
}

/// What a resume token says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenInfo {
    /// Its cluster time.
    pub(crate) ts: Timestamp,
    /// Whether it is the token of an invalidate event.
    pub(crate) invalidate: bool,
    /// Whether it is a high-water-mark token.
    pub(crate) hwm: bool,
    /// For the token of a split event's fragment: the event's token and the fragment index.
    pub(crate) fragment: Option<(String, u32)>,
}

/// Parses a token this server issued; `None` for anything else.
pub(crate) fn parse_token(data: &str) -> Option<TokenInfo> {
    let data = data.to_ascii_uppercase();
    let hex = |r: std::ops::Range<usize>| data.get(r).and_then(|s| u32::from_str_radix(s, 16).ok());
    if !data.starts_with("82") {
        return None;
    }
    let ts = Timestamp {
        time: hex(2..10)?,
        increment: hex(10..18)?,
    };
    if data.len() == 18 {
        // A stream opened at a time reports its start as its resume token until it
        // reads past it; like mongod's initial high-water mark, it can be resumed from.
        return Some(TokenInfo {
            ts,
            invalidate: false,
            hwm: true,
            fragment: None,
        });
    }
    match data.get(18..20)? {
        HWM_TAG if data.len() == 20 => Some(TokenInfo {
            ts,
            invalidate: false,
            hwm: true,
            fragment: None,
        }),
        // The fixed part, then (for data events) the namespace and key: any even-length hex.
        EVENT_TAG if data.len() >= 26 && data.len() % 2 == 0 => {
            hex(20..24)?;
            let flag = hex(24..26)?;
            let fragment = split_fragment_token(&data).map(|(e, i)| (e.to_owned(), i));
            Some(TokenInfo {
                ts,
                invalidate: flag == 1,
                hwm: false,
                fragment,
            })
        }
        _ => None,
    }
}

/// The oplog: a bounded queue of entries, oldest dropped first.
#[derive(Debug, Clone)]
pub(crate) struct Oplog {
    entries: VecDeque<Entry>,
    cap: usize,
    truncated: bool,
    /// When the oplog began (mongod's "initiating set" entry): a start before it needs
    /// history this server never had, which mongod refuses as it does dropped history.
    origin: Timestamp,
}

impl Oplog {
    /// An empty oplog keeping at most `cap` entries (at least one).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            cap: cap.max(1),
            truncated: false,
            origin: Timestamp {
                time: crate::clock::wall_secs(),
                increment: 0,
            },
        }
    }

    /// Restores persisted entries; `truncated` says whether older ones were dropped.
    pub(crate) fn restore(cap: usize, entries: Vec<Entry>, truncated: bool) -> Self {
        let mut log = Self::new(cap);
        log.truncated = truncated;
        if let Some(first) = entries.first() {
            // The original start is not persisted; the oldest entry kept is the best known.
            log.origin = first.ts;
        }
        for e in entries {
            log.push(e);
        }
        log
    }

    /// Appends, dropping the oldest entry when full (the capped-collection policy of mongod's oplog).
    pub(crate) fn push(&mut self, e: Entry) {
        if self.entries.len() >= self.cap {
            self.entries.pop_front();
            self.truncated = true;
        }
        self.entries.push_back(e);
    }

    /// Whether entries have ever been dropped.
    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    /// All retained entries, oldest first.
    pub(crate) fn entries(&self) -> &VecDeque<Entry> {
        &self.entries
    }

    /// Whether resuming from a position at `ts` would need entries that were dropped or
    /// that predate the oplog: the position must be at or after the oldest entry, as
    /// mongod requires (it fails a scan whose start has "fallen off the oplog", including
    /// a start before the replica set's first entry).
    pub(crate) fn history_lost(&self, ts: Timestamp) -> bool {
        let oldest = match (self.truncated, self.entries.front()) {
            (true, Some(front)) => front.ts,
            _ => self.origin,
        };
        ts_key(ts) < ts_key(oldest)
    }

    /// Index of the first entry whose token sorts at or after `token`.
    pub(crate) fn first_at(&self, token: &str) -> usize {
        self.entries.partition_point(|e| e.token.as_str() < token)
    }

    /// Index of the first entry whose token sorts after `pos`.
    pub(crate) fn first_after(&self, pos: &str) -> usize {
        self.entries.partition_point(|e| e.token.as_str() <= pos)
    }
}

/// The cluster time encoded by a position string (token or start position).
pub(crate) fn position_ts(pos: &str) -> Option<Timestamp> {
    let hex = |r: std::ops::Range<usize>| pos.get(r).and_then(|s| u32::from_str_radix(s, 16).ok());
    Some(Timestamp {
        time: hex(2..10)?,
        increment: hex(10..18)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn ts(time: u32, increment: u32) -> Timestamp {
        Timestamp { time, increment }
    }

    #[test]
    fn tokens_sort_in_commit_order() {
        let a = event_token(ts(10, 1), 0, false);
        let inv = event_token(ts(10, 1), 0, true);
        let hwm = hwm_token(ts(10, 1));
        let b = event_token(ts(10, 2), 0, false);
        let c = event_token(ts(11, 0), 0, false);
        let start = start_position(ts(10, 1));
        assert!(start < a && a < inv && inv < hwm && hwm < b && b < c);
        assert!(hwm_token(ts(9, u32::MAX)) < start);
        assert!(parse_token(&inv).unwrap().invalidate);
        assert!(parse_token(&hwm).unwrap().hwm);
        assert!(parse_token(&start).unwrap().hwm, "a start position resumes");
        assert!(parse_token("82ZZ").is_none());
    }

    #[test]
    fn fragment_tokens_sort_between_their_event_and_the_next() {
        let key = doc! {"_id": 7};
        let e = event_token_for(ts(10, 1), "d.c", Some(&key));
        let f0 = fragment_token(&e, 0);
        let f1 = fragment_token(&e, 1);
        let inv = event_token(ts(10, 1), 0, true);
        let next = event_token_for(ts(10, 2), "d.c", Some(&key));
        assert!(e < f0 && f0 < f1 && f1 < inv && f1 < hwm_token(ts(10, 1)) && f1 < next);
        assert_eq!(split_fragment_token(&f1), Some((e.as_str(), 1)));
        assert_eq!(parse_token(&f1).unwrap().fragment, Some((e.clone(), 1)));
        // Ordinary tokens are never taken for fragments, whatever their tail.
        assert_eq!(parse_token(&e).unwrap().fragment, None);
        assert_eq!(
            split_fragment_token(&event_token_for(ts(1, 1), "d.c", None)),
            None
        );
        assert_eq!(split_fragment_token(&inv), None);
    }

    #[test]
    fn history_lost_only_before_oldest_retained() {
        let mut log = Oplog::new(2);
        for i in 1..=3 {
            log.push(Entry {
                token: event_token(ts(10, i), 0, false),
                ts: ts(10, i),
                wall: DateTime::now(),
                db: "d".into(),
                coll: Some("c".into()),
                uuid: None,
                op: "insert".into(),
                doc_key: None,
                post: None,
                pre: None,
                images: false,
                desc: None,
                extra: None,
            });
        }
        assert!(log.history_lost(ts(10, 1)));
        assert!(!log.history_lost(ts(10, 2)));
        assert!(!log.history_lost(ts(10, 3)));
        assert_eq!(log.first_after(&event_token(ts(10, 2), 0, false)), 1);
    }

    #[test]
    fn a_start_before_the_oplog_began_is_history_lost_even_untruncated() {
        let log = Oplog::new(10);
        assert!(log.history_lost(ts(1, 0)), "1970 is before this oplog");
        let now = crate::clock::wall_secs();
        assert!(!log.history_lost(ts(now + 1, 0)));
    }
}
