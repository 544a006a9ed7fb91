//! Rooms → subscribers fan-out and the bounded recovery history; knows nothing of WebSockets or MongoDB.
//!
//! One publisher (the pipeline) and many sessions. Publishing never waits on a
//! session: every session owns one bounded mailbox, and a session whose mailbox
//! is full is kicked (its `kicked` token fires) instead of slowing the others.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher as _;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Delivery, EventId, OrderOwner, Payload, RoutedEvent};
use crate::idcodec::IdCodec;
use crate::metrics::Metrics;
use crate::room::{Room, RoomKind};
use crate::roomqueue::RoomQueue;

/// Hub tunables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most events kept for recovery (all rooms together).
    pub(crate) history_len: NonZeroUsize,
    /// Oldest event kept for recovery.
    pub(crate) history_age: Duration,
    /// Messages a session may have queued before it is cut off as a slow consumer.
    pub(crate) mailbox_capacity: NonZeroUsize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history_len: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            history_age: Duration::from_secs(300),
            mailbox_capacity: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// What a message carries.
#[derive(Debug)]
pub(crate) enum Body {
    /// A routed event.
    Event {
        /// Canonical event name.
        name: Arc<str>,
        /// Commit wall time, Unix ms.
        ts_ms: i64,
        /// The audience's payload, written once and shared by its rooms (its `status`
        /// is what Socket.IO aliases branch on).
        data: Payload,
    },
    /// The room's history has a hole: refetch state.
    Resync {
        /// Why, e.g. `history_lost`.
        reason: Arc<str>,
    },
}

/// One event addressed to one room, shared by every recipient of that room: a handle
/// on its change's block (cloning it is one reference count).
#[derive(Clone)]
pub struct Message {
    change: Arc<Change>,
    at: u32,
}

/// The messages of one change and what they share, in one allocation (plus the
/// buffer of its parts): history keeps every change for a while and frees it cold,
/// and one block per change instead of one per room, plus the id, was the larger
/// part of keeping history (see bench/analysis.md).
struct Change {
    /// Event id; `None` for resync notices of a lost history.
    id: Option<EventId>,
    /// `id` as clients see it: sealed on first use.
    wire_id: Option<WireId>,
    /// For `order:{id}` rooms: the order's owners as of this change (see
    /// [`RoutedEvent::owner`]); sessions that are not among them do not get it.
    owner: Option<Arc<OrderOwner>>,
    /// The database it came from when several are watched ([`RoutedEvent::database`]).
    database: Option<Arc<str>>,
    parts: Box<[Part]>,
}

/// One room's message of a change.
struct Part {
    room: Room,
    body: Body,
    /// Encodings per wire format, made by the first recipient that needs them. Boxed
    /// on first use: most parts in history are never sent (rooms nobody is in), and
    /// two inline slots were more than half of a part's size.
    encoded: OnceLock<Box<[OnceLock<Frames>; 2]>>,
}

impl Part {
    fn new(room: Room, body: Body) -> Self {
        Self {
            room,
            body,
            encoded: OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id())
            .field("room", self.room())
            .field("body", self.body())
            .finish_non_exhaustive()
    }
}

/// A message's text frames on one wire, as every socket of that wire sends them: made
/// by the first recipient, then shared (each recipient takes a reference, not a copy,
/// and nothing is validated again per recipient).
pub type Frames = SmallVec<[Utf8Bytes; 1]>;

/// Wire formats whose encodings a message caches.
#[derive(Debug, Clone, Copy)]
pub enum WireFormat {
    /// The native JSON protocol at `/ws`.
    Native = 0,
    /// The Socket.IO endpoint.
    SocketIo = 1,
}

/// An event's id as clients see it, sealed by the first encoding that needs it and
/// shared by the event's messages: a change that reaches nobody (most, on a replica
/// whose clients are elsewhere) is never sealed; HMAC plus AES-GCM per change was a
/// visible share of following the stream.
struct WireId {
    ids: Arc<IdCodec>,
    sealed: OnceLock<Box<str>>,
}

impl WireId {
    /// The sealed form of `id` (see [`IdCodec::seal`]); `id` is always its change's.
    fn get(&self, id: &EventId) -> &str {
        self.sealed.get_or_init(|| self.ids.seal(id).into())
    }
}

impl std::fmt::Debug for WireId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The clear id is what the seal hides: never in logs.
        f.write_str("WireId(..)")
    }
}

impl Message {
    /// One message per part of `change`, in order.
    fn all(change: Arc<Change>) -> impl Iterator<Item = Message> {
        (0..change.parts.len() as u32).map(move |at| Message {
            change: change.clone(),
            at,
        })
    }

    fn part(&self) -> &Part {
        &self.change.parts[self.at as usize]
    }

    /// Event id; `None` for resync notices of a lost history.
    pub(crate) fn id(&self) -> Option<&EventId> {
        self.change.id.as_ref()
    }

    /// The room it was addressed to.
    pub(crate) fn room(&self) -> &Room {
        &self.part().room
    }

    /// What it carries.
    pub(crate) fn body(&self) -> &Body {
        &self.part().body
    }

    /// For `order:{id}` rooms: the order's owners as of this change; sessions that are
    /// not among them do not get it. `None` for every other room.
    pub(crate) fn owner(&self) -> Option<&OrderOwner> {
        self.change
            .owner
            .as_deref()
            .filter(|_| self.room().kind() == RoomKind::Order)
    }

    /// The database it came from when several are watched.
    pub(crate) fn database(&self) -> Option<&str> {
        self.change.database.as_deref()
    }

    /// The frames of this message for `format`, made by `encode` on first use and shared after.
    pub fn encoded(
        &self,
        format: WireFormat,
        encode: impl FnOnce(&Self) -> Frames,
    ) -> &[Utf8Bytes] {
        self.part().encoded.get_or_init(Box::default)[format as usize].get_or_init(|| encode(self))
    }

    /// The event id as clients see it (`""` for notices that carry none).
    pub(crate) fn wire_id(&self) -> &str {
        match (&self.change.wire_id, &self.change.id) {
            (Some(w), Some(id)) => w.get(id),
            _ => "",
        }
    }

    /// Commit time of the event, Unix ms (None for resync notices).
    pub(crate) fn ts_ms(&self) -> Option<i64> {
        match self.body() {
            Body::Event { ts_ms, .. } => Some(*ts_ms),
            Body::Resync { .. } => None,
        }
    }
}

/// A session's handle in the hub: its id, its mailbox sender and the token fired when it is kicked.
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    id: u64,
    tx: mpsc::Sender<Message>,
    kicked: CancellationToken,
    /// Set with `kicked`, and read instead of it by the fan-out: the token's own check
    /// takes its mutex, once per recipient of every message (~0.7% of a busy server).
    kicked_flag: Arc<AtomicBool>,
}

impl Mailbox {
    /// Fires when the hub cut this session off because its mailbox was full.
    pub(crate) fn kicked(&self) -> &CancellationToken {
        &self.kicked
    }

    /// The session id (unique per hub).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// What subscribing with `since` found.
#[derive(Debug)]
pub(crate) enum Recovery {
    /// No `since` was given: live events only.
    Live,
    /// History covers everything after `since`: these messages, in order, then live.
    Recovered(Vec<Message>),
    /// History does not reach back to `since`; the caller must replay from the oplog
    /// everything after `since` up to and including `head`, or tell the client to resync.
    NotCovered {
        /// The newest event published before this subscription; later ones reach the mailbox.
        head: Option<EventId>,
    },
}

struct Entry {
    id: EventId,
    /// The entry's place in history (`State::next_seq`): compared where ids would be,
    /// without reading an id's text from memory that has gone cold.
    seq: u64,
    at: Instant,
    /// The `by_room` keys its messages went under: the queues own the messages, and an
    /// evicted entry pops its own from them without reading a message or a room name
    /// (memory that has gone cold by then). Inline: an order's change has four rooms.
    rooms: SmallVec<[u64; 4]>,
}

/// Room maps hash with foldhash, seeded per process: SipHash was a visible share of
/// every publish (each message looks its room up twice), and a random seed keeps room
/// names that clients or documents choose from degrading the map.
type RoomMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct State {
    rooms: RoomMap<Room, RoomMap<u64, Mailbox>>,
    history: VecDeque<Entry>,
    /// `history` per room: the first message of each entry for that room, in id order.
    /// A recovery reads its room's messages only; scanning every entry for every
    /// returning client made a restart storm O(clients × history) under this lock.
    /// Each message with its entry's `seq`. Keyed by the room's 64-bit hash under
    /// `room_keys`: a lookup compares numbers, not names in memory gone cold, and no
    /// name is cloned per room; rooms whose keys collide (seeded, so no client can aim
    /// for it) share a queue, and readers filter it by room.
    by_room: RoomMap<u64, RoomQueue<(u64, Message)>>,
    room_keys: foldhash::fast::RandomState,
    /// Tests: every room gets the same key, as if all collided.
    #[cfg(test)]
    collide: bool,
    /// The next entry's `seq`.
    next_seq: u64,
    /// Every event with an id ≤ floor may be missing from `history`;
    /// `None` means the hub does not yet know where its stream started.
    floor: Option<EventId>,
    head: Option<EventId>,
}

impl State {
    /// A room's key in `by_room`.
    fn room_key(&self, room: &Room) -> u64 {
        #[cfg(test)]
        if self.collide {
            return 0;
        }
        self.room_keys.hash_one(room)
    }
}

/// Rooms, subscribers and recent history.
pub struct Hub {
    cfg: HubConfig,
    metrics: Arc<Metrics>,
    /// Seals event ids for the wire (one key for every replica of a deployment).
    ids: Arc<IdCodec>,
    next_id: AtomicU64,
    state: Mutex<State>,
}

impl Hub {
    /// An empty hub.
    pub fn new(cfg: HubConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            metrics,
            ids: Arc::new(IdCodec::random()),
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Seals wire ids with `ids` (a key the replicas share) instead of a random key.
    pub(crate) fn with_ids(mut self, ids: Arc<IdCodec>) -> Self {
        self.ids = ids;
        self
    }

    /// The wire-id codec: positions to seal, `since` values to open.
    pub fn ids(&self) -> &Arc<IdCodec> {
        &self.ids
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way
        // that matters more than stopping fan-out would, so recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session mailbox; the receiver is the session's only inbound queue.
    ///
    /// Overflow policy: when full, the hub fires `kicked` and drops the session
    /// from every room; the session closes its socket with a reconnect code.
    pub(crate) fn mailbox(&self) -> (Mailbox, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(self.cfg.mailbox_capacity.get());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (
            Mailbox {
                id,
                tx,
                kicked: CancellationToken::new(),
                kicked_flag: Arc::new(AtomicBool::new(false)),
            },
            rx,
        )
    }

    /// Declares that this process's stream starts after `token`: events at or
    /// before it were never seen here, so recovery from earlier ids needs the oplog.
    pub fn set_floor(&self, token: EventId) {
        let mut st = self.state();
        if st.floor.as_ref().is_none_or(|f| *f < token) && st.history.is_empty() {
            st.floor = Some(token);
        }
    }

    /// The newest event id published.
    pub fn head(&self) -> Option<EventId> {
        self.state().head.clone()
    }

    /// The `since` a client should use before any event reached it: the newest event
    /// published, or, before the first one (or after a resync moved the floor past it),
    /// where the stream started. `None` only before any stream has opened.
    pub(crate) fn position(&self) -> Option<EventId> {
        let st = self.state();
        match (&st.head, &st.floor) {
            (Some(h), Some(f)) => Some(h.max(f).clone()),
            (h, f) => h.clone().or_else(|| f.clone()),
        }
    }

    /// Joins `room` and, when `since` is given, returns what history holds after it.
    ///
    /// Subscribing and reading history happen under one lock, so an event is
    /// either in the returned replay or delivered to the mailbox — never both, never neither.
    pub(crate) fn subscribe(
        &self,
        room: &Room,
        mailbox: &Mailbox,
        since: Option<&EventId>,
    ) -> Recovery {
        let mut st = self.state();
        let recovery = match since {
            None => Recovery::Live,
            Some(since) => {
                let covered = st.floor.as_ref().is_some_and(|floor| since >= floor);
                if covered {
                    let replay = st
                        .by_room
                        .get(&st.room_key(room))
                        .map(|msgs| {
                            let start =
                                msgs.partition_point(|(_, m)| m.id().is_some_and(|id| id <= since));
                            // Rooms whose keys collide share a queue: this room's only.
                            msgs.iter_from(start)
                                .filter(|(_, m)| m.room() == room)
                                .map(|(_, m)| m.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    Recovery::Recovered(replay)
                } else {
                    Recovery::NotCovered {
                        head: st.head.clone(),
                    }
                }
            }
        };
        let subs = st.rooms.entry(room.clone()).or_default();
        subs.insert(mailbox.id, mailbox.clone());
        self.metrics.rooms.set(st.rooms.len() as i64);
        recovery
    }

    /// Leaves `room`; the room is dropped when its last subscriber leaves.
    pub(crate) fn unsubscribe(&self, room: &Room, mailbox_id: u64) {
        let mut st = self.state();
        remove_sub(&mut st, room, mailbox_id);
        self.metrics.rooms.set(st.rooms.len() as i64);
    }

    /// Leaves every room in `rooms` (on disconnect).
    pub(crate) fn unsubscribe_all<'a>(
        &self,
        rooms: impl IntoIterator<Item = &'a Room>,
        mailbox_id: u64,
    ) {
        let mut st = self.state();
        for room in rooms {
            remove_sub(&mut st, room, mailbox_id);
        }
        self.metrics.rooms.set(st.rooms.len() as i64);
    }

    /// Number of rooms with at least one subscriber.
    #[cfg(test)]
    pub(crate) fn room_count(&self) -> usize {
        self.state().rooms.len()
    }

    /// Records `ev` in history and hands it to every subscriber of its rooms. Never waits.
    pub fn publish(&self, ev: &RoutedEvent) {
        let change = change_for(ev, &self.ids, |d| Body::Event {
            name: ev.event.name.clone(),
            ts_ms: ev.event.ts_ms,
            data: d.data.clone(),
        });
        let mut st = self.state();
        self.record(&mut st, &ev.event.id, change, true);
    }

    /// Publishes, in place of `ev`, a `resync` notice to each of its rooms: the change
    /// could not be read whole (`reason` says why), so its rooms must refetch. The notices
    /// carry the change's id and go into history like events, so a client that comes
    /// back with an older `since` is told too, in order, and never silently misses it.
    pub(crate) fn publish_gap(&self, ev: &RoutedEvent, reason: &str) {
        let reason: Arc<str> = reason.into();
        let change = change_for(ev, &self.ids, |_| Body::Resync {
            reason: reason.clone(),
        });
        let mut st = self.state();
        self.record(&mut st, &ev.event.id, change, true);
    }

    /// Records `ev`, an event a previous process already published, in history only: a
    /// starting process warms its history from the oplog so that clients who come back
    /// after a restart recover from memory. Without a floor set before (`set_floor`
    /// with the warm-up's start), the first preloaded event becomes the floor.
    pub(crate) fn preload(&self, ev: &RoutedEvent) {
        let change = change_for(ev, &self.ids, |d| Body::Event {
            name: ev.event.name.clone(),
            ts_ms: ev.event.ts_ms,
            data: d.data.clone(),
        });
        let mut st = self.state();
        if st.history.is_empty() && st.floor.is_none() {
            st.floor = Some(ev.event.id.clone());
        }
        self.record(&mut st, &ev.event.id, change, false);
    }

    /// Forgets a warm-up that could not reach its end (history must have no hole).
    pub(crate) fn discard_preload(&self) {
        let mut st = self.state();
        st.history.clear();
        st.by_room.clear();
        st.floor = None;
        st.head = None;
    }

    /// Keeps `change` (of event `id`) in history and, with `deliver`, hands each of its
    /// messages to its room's subscribers: under one lock, so the order of the two is
    /// not observable.
    fn record(&self, st: &mut State, id: &EventId, change: Arc<Change>, deliver: bool) {
        let now = Instant::now();
        // Several events can share one change (and one id); history keeps them
        // in one entry so replay from that id includes or excludes all of them.
        let merge = st
            .history
            .back()
            .filter(|last| last.id == *id)
            .map(|last| last.seq);
        let seq = merge.unwrap_or(st.next_seq);
        let mut keys = SmallVec::<[u64; 4]>::new();
        for m in Message::all(change) {
            if deliver {
                self.deliver(st, &m);
            }
            let key = st.room_key(m.room());
            if !keys.contains(&key) {
                keys.push(key);
            }
            let msgs = st.by_room.entry(key).or_default();
            // One message per entry and room (the first), as a scan of the entry would find.
            let seen = msgs
                .iter()
                .rev()
                .take_while(|(s, _)| *s == seq)
                .any(|(_, b)| b.room() == m.room());
            if !seen {
                msgs.push_back((seq, m));
            }
        }
        match st.history.back_mut() {
            Some(last) if merge.is_some() => {
                keys.retain(|k| !last.rooms.contains(k));
                last.rooms.extend(keys);
            }
            _ => {
                st.next_seq += 1;
                st.history.push_back(Entry {
                    id: id.clone(),
                    seq,
                    at: now,
                    rooms: keys,
                });
            }
        }
        while st.history.len() > self.cfg.history_len.get()
            || st
                .history
                .front()
                .is_some_and(|e| now.duration_since(e.at) > self.cfg.history_age)
        {
            if let Some(old) = st.history.pop_front() {
                for key in old.rooms {
                    if let Some(msgs) = st.by_room.get_mut(&key) {
                        while msgs.front().is_some_and(|(s, _)| *s == old.seq) {
                            msgs.pop_front();
                        }
                        if msgs.is_empty() {
                            st.by_room.remove(&key);
                        }
                    }
                }
                st.floor = Some(old.id);
            }
        }
        st.head = Some(id.clone());
    }

    /// Tells every room to resync and forgets history: used when the stream had to
    /// restart after a gap (history lost). `new_floor` is where the new stream starts.
    pub(crate) fn resync_all(&self, reason: &str, new_floor: Option<EventId>) {
        let mut st = self.state();
        st.history.clear();
        st.by_room.clear();
        st.floor = new_floor;
        let reason: Arc<str> = reason.into();
        let parts: Box<[Part]> = st
            .rooms
            .keys()
            .map(|room| {
                Part::new(
                    room.clone(),
                    Body::Resync {
                        reason: reason.clone(),
                    },
                )
            })
            .collect();
        let change = Arc::new(Change {
            id: None,
            wire_id: None,
            owner: None,
            database: None,
            parts,
        });
        for msg in Message::all(change) {
            self.deliver(&mut st, &msg);
        }
    }

    fn deliver(&self, st: &mut State, msg: &Message) {
        let Some(subs) = st.rooms.get_mut(msg.room()) else {
            return;
        };
        let mut gone = Vec::new();
        for (id, mb) in subs.iter() {
            // Kicked from another room already: the hub is the only one that kicks, and
            // it does so under this lock, so a relaxed read sees it.
            if mb.kicked_flag.load(Ordering::Relaxed) {
                gone.push(*id);
                continue;
            }
            match mb.tx.try_send(msg.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    mb.kicked_flag.store(true, Ordering::Relaxed);
                    mb.kicked.cancel();
                    self.metrics.slow_consumer_disconnects.inc();
                    gone.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        if !gone.is_empty() {
            for id in gone {
                subs.remove(&id);
            }
            if subs.is_empty() {
                st.rooms.remove(msg.room());
                self.metrics.rooms.set(st.rooms.len() as i64);
            }
        }
    }
}

/// The block of `ev`'s messages, one per delivery with the body `body` makes of it
/// (payloads shared, the id sealed once on first use).
fn change_for(
    ev: &RoutedEvent,
    ids: &Arc<IdCodec>,
    body: impl Fn(&Delivery) -> Body,
) -> Arc<Change> {
    Arc::new(Change {
        id: Some(ev.event.id.clone()),
        wire_id: Some(WireId {
            ids: ids.clone(),
            sealed: OnceLock::new(),
        }),
        owner: ev.owner.clone(),
        database: ev.database.clone(),
        parts: ev
            .deliveries
            .iter()
            .map(|d| Part::new(d.room.clone(), body(d)))
            .collect(),
    })
}

/// One shared message per delivery of `ev` (payloads shared, the id sealed once on first use).
pub fn messages_for(ev: &RoutedEvent, ids: &Arc<IdCodec>) -> Vec<Message> {
    let change = change_for(ev, ids, |d| Body::Event {
        name: ev.event.name.clone(),
        ts_ms: ev.event.ts_ms,
        data: d.data.clone(),
    });
    Message::all(change).collect()
}

fn remove_sub(st: &mut State, room: &Room, mailbox_id: u64) {
    if let Some(subs) = st.rooms.get_mut(room) {
        subs.remove(&mailbox_id);
        if subs.is_empty() {
            st.rooms.remove(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Delivery, Event};

    fn ev(id: &str, rooms: &[&str]) -> RoutedEvent {
        RoutedEvent {
            owner: None,
            database: None,
            event: Event {
                id: EventId::new(id),
                name: "order:status_changed".into(),
                ts_ms: 1,
            },
            deliveries: rooms
                .iter()
                .map(|r| Delivery {
                    room: r.parse().unwrap(),
                    data: crate::event::Payload::from_value(
                        &serde_json::json!({"status": "processing", "r": r}),
                    ),
                })
                .collect(),
        }
    }

    fn hub(history: usize, mailbox: usize) -> Hub {
        Hub::new(
            HubConfig {
                history_len: NonZeroUsize::new(history).unwrap(),
                history_age: Duration::from_secs(60),
                mailbox_capacity: NonZeroUsize::new(mailbox).unwrap(),
            },
            Arc::new(Metrics::new()),
        )
    }

    fn ids(v: &[Message]) -> Vec<&str> {
        v.iter().map(|m| m.id().unwrap().as_str()).collect()
    }

    #[test]
    fn delivers_only_to_subscribers_of_the_room() {
        let h = hub(10, 10);
        let (a, mut ra) = h.mailbox();
        let (b, mut rb) = h.mailbox();
        let r1: Room = "customer:c1".parse().unwrap();
        let r2: Room = "customer:c2".parse().unwrap();
        h.subscribe(&r1, &a, None);
        h.subscribe(&r2, &b, None);
        h.publish(&ev("8201", &["customer:c1", "store:s1"]));
        let m = ra.try_recv().unwrap();
        assert_eq!(*m.room(), r1);
        assert!(rb.try_recv().is_err());
        assert!(ra.try_recv().is_err());
    }

    #[test]
    fn recovery_splits_exactly_between_replay_and_live() {
        let h = hub(100, 100);
        let room: Room = "customer:c1".parse().unwrap();
        h.set_floor(EventId::new("8200"));
        for i in 1..=5 {
            h.publish(&ev(&format!("82{i:02}"), &["customer:c1", "customer:c2"]));
        }
        let (mb, mut rx) = h.mailbox();
        let Recovery::Recovered(replay) = h.subscribe(&room, &mb, Some(&EventId::new("8202")))
        else {
            panic!("expected history recovery");
        };
        assert_eq!(ids(&replay), ["8203", "8204", "8205"]);
        assert!(replay.iter().all(|m| *m.room() == room));
        h.publish(&ev("8206", &["customer:c1"]));
        assert_eq!(rx.try_recv().unwrap().id().unwrap().as_str(), "8206");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn per_room_history_follows_eviction_and_shared_ids() {
        let h = hub(3, 100);
        h.set_floor(EventId::new("8200"));
        let c1: Room = "customer:c1".parse().unwrap();
        let c2: Room = "customer:c2".parse().unwrap();
        h.publish(&ev("8201", &["customer:c1"]));
        h.publish(&ev("8202", &["customer:c2"]));
        // Two events of one change (one id) in one room: replayed once, as before.
        h.publish(&ev("8203", &["customer:c1"]));
        h.publish(&ev("8203", &["customer:c1", "customer:c2"]));
        h.publish(&ev("8204", &["customer:c2"]));
        // 8201 is evicted (history 3: 8202, 8203, 8204); the floor moved to it.
        let (mb, _rx) = h.mailbox();
        let replay =
            |room: &Room, since: &str| match h.subscribe(room, &mb, Some(&EventId::new(since))) {
                Recovery::Recovered(r) => ids(&r).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                Recovery::NotCovered { .. } => vec!["not covered".to_owned()],
                Recovery::Live => unreachable!(),
            };
        assert_eq!(replay(&c1, "8201"), ["8203"]);
        assert_eq!(replay(&c2, "8201"), ["8202", "8203", "8204"]);
        assert_eq!(replay(&c2, "8203"), ["8204"]);
        assert_eq!(replay(&c1, "8200"), ["not covered"]);
        h.publish(&ev("8205", &["customer:c2"]));
        h.publish(&ev("8206", &["customer:c2"]));
        // 8203 is gone, and with it c1's only message.
        assert_eq!(replay(&c1, "8203"), Vec::<String>::new());
        let st = h.state();
        assert_eq!(st.by_room.get(&st.room_key(&c1)).map(RoomQueue::len), None);
    }

    #[test]
    fn rooms_whose_keys_collide_recover_their_own_events_only() {
        let h = hub(3, 10);
        h.state().collide = true;
        h.set_floor(EventId::new("8200"));
        h.publish(&ev("8201", &["customer:c1", "customer:c2"]));
        h.publish(&ev("8202", &["customer:c2"]));
        h.publish(&ev("8203", &["customer:c1", "store:s1"]));
        h.publish(&ev("8204", &["store:s1"]));
        let (mb, _rx) = h.mailbox();
        let replay = |room: &str, since: &str| match h.subscribe(
            &room.parse().unwrap(),
            &mb,
            Some(&EventId::new(since)),
        ) {
            Recovery::Recovered(r) => ids(&r).iter().map(|s| s.to_string()).collect(),
            _ => vec!["not recovered".to_owned()],
        };
        // 8201 is evicted (history 3), for both rooms it went to.
        assert_eq!(replay("customer:c1", "8201"), ["8203"]);
        assert_eq!(replay("customer:c2", "8201"), ["8202"]);
        assert_eq!(replay("store:s1", "8201"), ["8203", "8204"]);
        assert_eq!(replay("store:s1", "8203"), ["8204"]);
        // Every room shares the one queue, which holds each entry's messages once per room.
        let st = h.state();
        let queue = &st.by_room[&0];
        assert_eq!(queue.len(), 4);
    }

    #[test]
    fn position_is_the_floor_until_the_first_event() {
        let h = hub(10, 10);
        assert_eq!(h.position(), None);
        h.set_floor(EventId::new("8200"));
        assert_eq!(h.position(), Some(EventId::new("8200")));
        // A client that joins now with since = position gets the first event from history.
        h.publish(&ev("8201", &["customer:c1"]));
        assert_eq!(h.position(), Some(EventId::new("8201")));
        let (mb, _rx) = h.mailbox();
        let room: Room = "customer:c1".parse().unwrap();
        match h.subscribe(&room, &mb, Some(&EventId::new("8200"))) {
            Recovery::Recovered(replay) => assert_eq!(replay.len(), 1),
            _ => panic!("since = the floor must be covered"),
        }
    }

    #[test]
    fn since_below_the_floor_is_not_covered() {
        let h = hub(2, 100);
        let room: Room = "customer:c1".parse().unwrap();
        let (mb, _rx) = h.mailbox();
        // Unknown start: nothing can be promised.
        assert!(matches!(
            h.subscribe(&room, &mb, Some(&EventId::new("8201"))),
            Recovery::NotCovered { .. }
        ));
        h.set_floor(EventId::new("8200"));
        for i in 1..=4 {
            h.publish(&ev(&format!("82{i:02}"), &["customer:c1"]));
        }
        // History holds 8203, 8204; 8202 was evicted, so the floor is 8202.
        assert!(
            matches!(h.subscribe(&room, &mb, Some(&EventId::new("8201"))), Recovery::NotCovered { head: Some(ref h) } if h.as_str() == "8204")
        );
        let Recovery::Recovered(r) = h.subscribe(&room, &mb, Some(&EventId::new("8202"))) else {
            panic!()
        };
        assert_eq!(ids(&r), ["8203", "8204"]);
    }

    #[test]
    fn a_full_mailbox_kicks_only_that_session() {
        let h = hub(10, 2);
        let room: Room = "storefront:s1".parse().unwrap();
        let (slow, _slow_rx) = h.mailbox();
        let (fast, mut fast_rx) = h.mailbox();
        h.subscribe(&room, &slow, None);
        h.subscribe(&room, &fast, None);
        for i in 0..3 {
            h.publish(&ev(&format!("82{i:02}"), &["storefront:s1"]));
            assert!(fast_rx.try_recv().is_ok());
        }
        assert!(slow.kicked().is_cancelled());
        assert!(!fast.kicked().is_cancelled());
        assert_eq!(h.metrics.slow_consumer_disconnects.get(), 1);
        h.publish(&ev("8299", &["storefront:s1"]));
        assert!(fast_rx.try_recv().is_ok());
        assert_eq!(
            h.metrics.slow_consumer_disconnects.get(),
            1,
            "a kicked session is counted once"
        );
    }

    #[test]
    fn rooms_are_dropped_when_empty_and_resync_reaches_everyone() {
        let h = hub(10, 10);
        let (a, mut rx) = h.mailbox();
        let r1: Room = "customer:c1".parse().unwrap();
        let r2: Room = "store:s1".parse().unwrap();
        h.subscribe(&r1, &a, None);
        h.subscribe(&r2, &a, None);
        assert_eq!(h.room_count(), 2);
        h.resync_all("history_lost", None);
        let got: Vec<_> = (0..2).map(|_| rx.try_recv().unwrap()).collect();
        assert!(got
            .iter()
            .all(|m| matches!(m.body(), Body::Resync { .. }) && m.id().is_none()));
        h.unsubscribe_all([&r1, &r2], a.id());
        assert_eq!(h.room_count(), 0);
        assert_eq!(h.metrics.rooms.get(), 0);
    }
}
