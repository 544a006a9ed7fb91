//! What a client session is, whatever its wire format: principal, joined rooms, recovery and per-room dedup.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::Principal;
use crate::authz::owns;
use crate::event::EventId;
use crate::hub::{Mailbox, Message, Recovery};
use crate::metrics::{ReasonLabels, RecoveryKind, RecoveryLabels};
use crate::room::Room;

use super::Gateway;

/// A refused join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinError {
    /// Wire code: `forbidden`, `unavailable`, `bad_room`, `too_many_subscriptions`…
    pub(crate) code: &'static str,
    /// Human-readable reason (never contains a token).
    pub(crate) message: String,
}

/// The outcome of a join.
#[derive(Debug)]
pub(crate) struct Joined {
    /// The room.
    pub(crate) room: Room,
    /// True when `since` was given and everything after it is in `replay`.
    pub(crate) recovered: bool,
    /// True when `since` was given but neither history nor the oplog reached back.
    pub(crate) resync: bool,
    /// Messages to send before any live one, in order.
    pub(crate) replay: Vec<Message>,
    /// The newest event published before this join: a client that receives no event in the
    /// room before it disconnects passes this as `since`, so its first gap is recoverable too.
    pub(crate) position: Option<EventId>,
}

#[derive(Default)]
struct RoomState {
    /// The client has seen every event with an id ≤ this.
    since: Option<EventId>,
    /// Newest id sent in this room; live messages older than it are replays' overlap.
    last: Option<EventId>,
    /// Joined by `subscribe` (counts against `server.max_subscriptions_per_connection`),
    /// not automatically from the token: a store with many shops keeps its full quota.
    explicit: bool,
}

/// One session's rooms and identity. Dropping it leaves every room.
pub(crate) struct Session {
    gw: Arc<Gateway>,
    mailbox: Mailbox,
    principal: Principal,
    /// foldhash, seeded per session: looked up for every message the session is sent.
    rooms: HashMap<Room, RoomState, foldhash::fast::RandomState>,
    /// Order rooms left because a change moved the order to other owners, not yet
    /// told to the client (see [`Session::take_lost`]). At most one entry per room
    /// the session had joined, so bounded by its subscriptions.
    lost: Vec<Room>,
    /// Refused `order:` joins in the current window (each cost a MongoDB lookup).
    probes: ProbeWindow,
}

/// Refused `order:{id}` joins a connection may make per [`PROBE_WINDOW`] before further
/// order joins are refused without a lookup: guessing order ids costs MongoDB one query
/// each (unknown ids are cached for a second only, so that a just-created order can be
/// joined), and a client that is refused this often is probing, not using the app.
pub(crate) const MAX_REFUSED_ORDER_JOINS: u32 = 30;

/// The window [`MAX_REFUSED_ORDER_JOINS`] counts in.
pub(crate) const PROBE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Default)]
struct ProbeWindow {
    start: Option<std::time::Instant>,
    refused: u32,
}

impl ProbeWindow {
    fn exhausted(&mut self) -> bool {
        if self.start.is_none_or(|s| s.elapsed() >= PROBE_WINDOW) {
            self.start = Some(std::time::Instant::now());
            self.refused = 0;
        }
        self.refused >= MAX_REFUSED_ORDER_JOINS
    }
}

impl Session {
    /// A session with no rooms yet.
    pub(crate) fn new(gw: Arc<Gateway>, mailbox: Mailbox, principal: Principal) -> Self {
        Self {
            gw,
            mailbox,
            principal,
            rooms: HashMap::default(),
            lost: Vec::new(),
            probes: ProbeWindow::default(),
        }
    }

    /// Who this is.
    pub(crate) fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Replaces the principal after a token refresh; the subject must not change.
    ///
    /// Rights follow the token: rooms the new principal may not join (a store dropped from the
    /// `stores` claim, an admin role removed) are left and returned. A check that cannot be
    /// made (order lookup failed) leaves the room too: fail closed, the client may rejoin.
    pub(crate) async fn refresh(&mut self, p: Principal) -> Result<Vec<Room>, JoinError> {
        if p.subject != self.principal.subject {
            return Err(JoinError {
                code: "subject_changed",
                message: "a refreshed token must carry the same subject".into(),
            });
        }
        let mut left = Vec::new();
        let joined: Vec<Room> = self.rooms.keys().cloned().collect();
        for room in joined {
            if self.gw.authz.may_join(&p, &room).await.is_err() {
                // Queued messages of this room are dropped by `accept` from now on.
                self.rooms.remove(&room);
                self.gw.hub.unsubscribe(&room, self.mailbox.id());
                left.push(room);
            }
        }
        self.principal = p;
        Ok(left)
    }

    /// Joined rooms.
    pub(crate) fn rooms(&self) -> impl Iterator<Item = &Room> {
        self.rooms.keys()
    }

    /// Joins the rooms the token grants, recovering after `since` when given.
    pub(crate) async fn join_auto(&mut self, since: Option<&EventId>) -> Vec<Joined> {
        let mut out = Vec::new();
        for room in self.principal.auto_rooms() {
            out.push(self.join_checked(room, since.cloned()).await);
        }
        out
    }

    /// Joins a room the client asked for, after the authorization rules.
    pub(crate) async fn join(
        &mut self,
        room: &str,
        since: Option<&str>,
    ) -> Result<Joined, JoinError> {
        let refused = |code: &'static str, message: String| {
            self.gw
                .metrics
                .subscriptions_refused
                .get_or_create(&ReasonLabels { reason: code })
                .inc();
            JoinError { code, message }
        };
        let room: Room = room
            .parse()
            .map_err(|e: crate::room::RoomError| refused("bad_room", e.to_string()))?;
        let new = !self.rooms.contains_key(&room);
        let explicit = self.rooms.values().filter(|s| s.explicit).count();
        if new && explicit >= self.gw.cfg.max_subscriptions_per_connection.get() {
            return Err(refused(
                "too_many_subscriptions",
                format!(
                    "at most {} subscriptions per connection",
                    self.gw.cfg.max_subscriptions_per_connection
                ),
            ));
        }
        let order = room.kind() == crate::room::RoomKind::Order && !self.principal.is_admin;
        if order && new && self.probes.exhausted() {
            return Err(refused(
                "rate_limited",
                format!(
                    "more than {MAX_REFUSED_ORDER_JOINS} refused order subscriptions in {}s; wait",
                    PROBE_WINDOW.as_secs()
                ),
            ));
        }
        if let Err(d) = self.gw.authz.may_join(&self.principal, &room).await {
            if order && d.code == "forbidden" {
                self.probes.refused += 1;
            }
            return Err(refused(d.code, d.message));
        }
        let since = since.map(|s| self.gw.since(s));
        let joined = self.join_checked(room, since).await;
        if new {
            if let Some(st) = self.rooms.get_mut(&joined.room) {
                st.explicit = true;
            }
        }
        Ok(joined)
    }

    async fn join_checked(&mut self, room: Room, since: Option<EventId>) -> Joined {
        // Read before subscribing: anything published in between is after `position`, so
        // recovering from it may add events from just before the join but never skips one.
        let position = self.gw.hub.position();
        // Subscribe before reading history, so nothing falls between.
        let recovery = self.gw.hub.subscribe(&room, &self.mailbox, since.as_ref());
        self.rooms.insert(
            room.clone(),
            RoomState {
                since: since.clone(),
                last: None,
                explicit: self.rooms.get(&room).is_some_and(|s| s.explicit),
            },
        );
        let metrics = &self.gw.metrics;
        let mut joined = Joined {
            room: room.clone(),
            recovered: false,
            resync: false,
            replay: Vec::new(),
            position,
        };
        match (recovery, since) {
            (Recovery::Live, _) | (_, None) => {}
            // An id we could not open (see `Gateway::since`): nothing can be replayed.
            (_, Some(since)) if since.as_str().is_empty() => {
                count_recovery(metrics, RecoveryKind::Resync);
                joined.resync = true;
            }
            (Recovery::Recovered(replay), Some(_)) => {
                count_recovery(metrics, RecoveryKind::History);
                joined.recovered = true;
                joined.replay = replay;
            }
            (Recovery::NotCovered { head }, Some(since)) => {
                let replayed = match &self.gw.replayer {
                    Some(r) => {
                        r.replay(&room, &since, head, self.gw.cfg.replay_timeout)
                            .await
                    }
                    None => Err("no oplog replayer".to_owned()),
                };
                match replayed {
                    Ok(replay) => {
                        count_recovery(metrics, RecoveryKind::Oplog);
                        joined.recovered = true;
                        joined.replay = replay;
                    }
                    Err(reason) => {
                        tracing::info!(room = %room, reason = %reason, "recovery not possible; client told to resync");
                        count_recovery(metrics, RecoveryKind::Resync);
                        joined.resync = true;
                    }
                }
            }
        }
        joined
    }

    /// Leaves a room; false when it was not joined.
    pub(crate) fn leave(&mut self, room: &str) -> bool {
        let Ok(room) = room.parse::<Room>() else {
            return false;
        };
        if self.rooms.remove(&room).is_some() {
            self.gw.hub.unsubscribe(&room, self.mailbox.id());
            true
        } else {
            false
        }
    }

    /// Whether live `msg` should be sent: its room is joined, the session may still see
    /// it, and it is not older than what the client already has (replay/live overlap, or
    /// a `since` from a replica ahead of us).
    ///
    /// Rights follow the data: an `order:{id}` message carries the order's owners as of
    /// its change. A session no longer among them (the order moved to another customer
    /// or store) leaves the room with that change, gets nothing of it, and the room is
    /// queued for [`Session::take_lost`] so the client is told.
    pub(crate) fn accept(&mut self, msg: &Message) -> bool {
        if !self.same_database(msg) {
            return false;
        }
        // One lookup per message: the room's state serves the ownership check and dedup.
        let Some(state) = self.rooms.get_mut(msg.room()) else {
            return false;
        };
        if msg.owner().is_none_or(|owner| owns(&self.principal, owner)) {
            return dedup(state, msg);
        }
        self.rooms.remove(msg.room());
        self.gw.hub.unsubscribe(msg.room(), self.mailbox.id());
        self.gw
            .metrics
            .subscriptions_refused
            .get_or_create(&ReasonLabels {
                reason: "ownership_changed",
            })
            .inc();
        self.lost.push(msg.room().clone());
        false
    }

    /// Whether a replayed `msg` (history or oplog, sent right after a join) should be sent.
    /// An order's events from before this session's principal owned it belong to the
    /// previous owners (their names, their addresses): they are skipped, the room is kept.
    pub(crate) fn accept_replayed(&mut self, msg: &Message) -> bool {
        if !self.rooms.contains_key(msg.room()) || !self.same_database(msg) {
            return false;
        }
        if msg.owner().is_some_and(|o| !owns(&self.principal, o)) {
            return false;
        }
        self.dedup(msg)
    }

    /// Whether `msg` is of this session's database. With several watched databases a
    /// room name is shared by every tenant that has that id; a tenant's token sees its
    /// own database's events only. Resync notices (no id) concern every tenant.
    fn same_database(&self, msg: &Message) -> bool {
        match (&self.principal.database, msg.database()) {
            (Some(mine), Some(theirs)) => mine.as_str() == theirs,
            (Some(_), None) => msg.id().is_none(),
            (None, _) => true,
        }
    }

    /// Rooms left since the last call because their order changed owners; the wire
    /// layer tells the client (`unsubscribed` with reason `ownership_changed`).
    pub(crate) fn take_lost(&mut self) -> Vec<Room> {
        std::mem::take(&mut self.lost)
    }

    fn dedup(&mut self, msg: &Message) -> bool {
        self.rooms
            .get_mut(msg.room())
            .is_some_and(|state| dedup(state, msg))
    }

    /// The hub mailbox (for the kicked token).
    pub(crate) fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gw
            .hub
            .unsubscribe_all(self.rooms.keys(), self.mailbox.id());
    }
}

/// Whether `msg` is news in a room whose state is `state`, which then records it.
fn dedup(state: &mut RoomState, msg: &Message) -> bool {
    let Some(id) = msg.id() else {
        // A resync notice: whatever the client had is void.
        state.last = None;
        state.since = None;
        return true;
    };
    if state.since.as_ref().is_some_and(|s| id <= s) || state.last.as_ref().is_some_and(|l| id < l)
    {
        return false;
    }
    state.last = Some(id.clone());
    true
}

/// Counts one recovery in `recoveries{source}`.
fn count_recovery(metrics: &crate::metrics::Metrics, source: RecoveryKind) {
    metrics
        .recoveries
        .get_or_create(&RecoveryLabels { source })
        .inc();
}
