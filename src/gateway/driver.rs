//! The one loop every authenticated connection runs, whatever its wire (`/ws` or Socket.IO) and transport (WebSocket or Engine.IO long-polling); the wire's framing is its [`Dialect`].
//!
//! One task per connection, one `select!` over: the stop and kick signals, one timer
//! (ping, pong deadline, token expiry, position tick), the hub mailbox, the peer's
//! frames. No split tasks, so close is always clean, and nothing per connection but
//! this task's state, the transport's buffers and the session.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket};
use futures::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::eio::PollLink;
use super::limits::RateWindow;
use super::protocol::close;
use super::session::{Joined, Session};
use super::signals::{Signal, Signals};
use super::Gateway;
use crate::auth::Principal;
use crate::event::EventId;
use crate::hub::Message;
use crate::metrics::{ReasonLabels, Wire};

/// Most hub messages written before one flush; bounds the time between flushes under load.
const WRITE_BATCH: usize = 64;

/// Bytes a WebSocket reads per call, and the read buffer every connection holds from
/// the start (tungstenite's default is 128 KiB, zero-filled up to its capacity on every
/// read: it stayed resident per connection and the memset topped the fan-out profile,
/// bench/analysis.md). Clients send pongs, acks and `subscribe`s of a few hundred
/// bytes; a larger frame still arrives whole: tungstenite reserves its full length (at
/// most `server.max_message_bytes`) and reads it 1 KiB at a time.
pub(crate) const WS_READ_BUFFER: usize = 1024;

/// Bytes of written frames tungstenite gathers before it writes them to the socket.
/// Its buffer keeps the capacity it reached, so this also bounds what a burst leaves
/// behind per connection (the default, 128 KiB, let one burst pin that much); a batch
/// of small events still goes out in one write.
pub(crate) const WS_WRITE_BUFFER: usize = 8 * 1024;

/// The WebSocket settings of both endpoints: small buffers, frames and messages up
/// to `server.max_message_bytes`.
pub(crate) fn websocket(
    ws: axum::extract::WebSocketUpgrade,
    max: usize,
) -> axum::extract::WebSocketUpgrade {
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
}

/// Why a connection ends and what the peer is told: a close code and reason
/// (RFC 6455 / docs/PROTOCOL.md; Socket.IO maps them to its own packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exit(pub(crate) u16, pub(crate) &'static str);

/// Why a write did not complete.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The peer is gone (or the socket failed).
    Failed,
    /// The peer stopped reading: a write outlived `server.write_timeout`, or a
    /// long-polling session's outbound buffer is full.
    TimedOut,
    /// The hub cut the session off while it was writing.
    Kicked,
}

/// What the peer sent.
pub(crate) enum In {
    /// A text frame (one Engine.IO packet on `/socket.io/`).
    Text(Utf8Bytes),
    /// A binary frame (or an Engine.IO binary packet).
    Binary,
    /// A WebSocket pong.
    Pong,
    /// The transport was upgraded (long-polling → WebSocket): these frames were
    /// written to the old one and never polled, and go out again on the new one.
    Resend(Vec<Utf8Bytes>),
    /// The peer closed the transport, or it failed.
    Closed,
    /// A frame could not be read; the peer is told why.
    Refused(Exit),
}

/// The transport under a connection.
// The WebSocket stays inline: it is what almost every connection holds for its life.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Link {
    /// A WebSocket (`/ws`, or Engine.IO's websocket transport).
    Ws(WebSocket),
    /// Engine.IO long-polling, until it upgrades. Boxed: rarely used, and the
    /// variant would size every WebSocket connection's task.
    Poll(Box<PollLink>),
}

impl Link {
    /// The next frame from the peer. Cancel-safe (it is one branch of the loop).
    pub(crate) async fn recv(&mut self) -> In {
        let poll = match self {
            Link::Ws(ws) => loop {
                return match ws.recv().await {
                    None | Some(Ok(WsMessage::Close(_))) => In::Closed,
                    Some(Err(e)) => read_error_exit(&e).map_or(In::Closed, In::Refused),
                    Some(Ok(WsMessage::Text(t))) => In::Text(t),
                    Some(Ok(WsMessage::Binary(_))) => In::Binary,
                    Some(Ok(WsMessage::Pong(_))) => In::Pong,
                    // tungstenite answers pings itself.
                    Some(Ok(WsMessage::Ping(_))) => continue,
                };
            },
            Link::Poll(p) => p,
        };
        match poll.recv().await {
            Ok(i) => i,
            Err(ws) => {
                // Synchronous from here on: a cancelled `recv` cannot lose the socket.
                let left = poll.retire();
                *self = Link::Ws(*ws);
                In::Resend(left)
            }
        }
    }

    async fn feed(&mut self, m: WsMessage) -> Result<(), WriteError> {
        match self {
            Link::Ws(ws) => ws.feed(m).await.map_err(|_| WriteError::Failed),
            Link::Poll(p) => p.feed(m),
        }
    }

    async fn flush(&mut self) -> Result<(), WriteError> {
        match self {
            Link::Ws(ws) => ws.flush().await.map_err(|_| WriteError::Failed),
            Link::Poll(p) => {
                p.flush();
                Ok(())
            }
        }
    }

    /// Drops what a long-polling client has not polled (it is cut off as a slow
    /// consumer: its last frames must reach it, and nothing else be kept for it).
    /// A WebSocket's buffer is tungstenite's, and its close has a deadline.
    pub(crate) fn shed(&mut self) {
        if let Link::Poll(p) = self {
            p.shed();
        }
    }

    /// Tells the peer why (a close frame, or an Engine.IO close packet) and closes.
    /// A WebSocket waits for the peer's close reply (RFC 6455 §7.1.1), so a peer that
    /// writes after we closed does not reset the connection and lose our close frame.
    pub(crate) async fn close(&mut self, exit: Option<Exit>, timeout: Duration) {
        match self {
            Link::Ws(ws) => {
                let Some(Exit(code, reason)) = exit else {
                    return;
                };
                let frame = axum::extract::ws::CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                let sent =
                    tokio::time::timeout(timeout, ws.send(WsMessage::Close(Some(frame)))).await;
                if matches!(sent, Ok(Ok(()))) {
                    let _ = tokio::time::timeout(CLOSE_LINGER, async {
                        while let Some(Ok(m)) = ws.recv().await {
                            if matches!(m, WsMessage::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
            }
            Link::Poll(p) => p.close(),
        }
    }
}

/// Longest wait for the peer's close frame after ours (RFC 6455 §7.1.1 closing handshake).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What to tell a peer whose frame could not be read. tungstenite reports an
/// oversized message or invalid UTF-8 as a read error; the peer deserves the
/// RFC 6455 code rather than a dropped TCP connection.
fn read_error_exit(e: &axum::Error) -> Option<Exit> {
    let text = e.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") {
        Some(Exit(close::TOO_BIG, "message_too_big"))
    } else if text.contains("UTF-8") {
        Some(Exit(close::INVALID_DATA, "invalid_utf8"))
    } else if text.contains("Protocol") {
        Some(Exit(close::PROTOCOL_ERROR, "protocol_error"))
    } else {
        None
    }
}

/// A connection: the gateway, its transport, and its wire's framing and state.
pub(crate) struct Conn<D> {
    pub(crate) gw: Arc<Gateway>,
    pub(crate) link: Link,
    /// The hub's kick for this session's mailbox (a never-fired token until authenticated):
    /// a write blocked on a stalled peer gives up as soon as the hub cuts the session off.
    pub(crate) kicked: CancellationToken,
    pub(crate) dialect: D,
}

/// What a handled frame changes for the loop.
pub(crate) enum Flow {
    /// Nothing.
    Continue,
    /// The answer to our ping.
    Pong,
    /// The principal may have changed (a token refresh): its expiry is read again.
    Refreshed,
}

/// A wire's framing and its answers to client frames.
pub(crate) trait Dialect: Send + Sized {
    /// Deliveries are counted under this wire.
    const WIRE: Wire;
    /// The frame that pings the peer.
    fn ping(&self) -> WsMessage;
    /// Every frame one hub message goes out as.
    fn frames<'a>(&'a self, m: &'a Message) -> impl Iterator<Item = Utf8Bytes> + Send + 'a;
    /// `unsubscribed` for a room lost to an ownership change.
    fn lost(&self, room: &str) -> Utf8Bytes;
    /// `resync` for a room whose history could not be replayed.
    fn resync(&self, room: &str) -> Utf8Bytes;
    /// `position` for an idle client.
    fn position(&self, wire: &str) -> Utf8Bytes;
    /// Answers one frame from the peer (binary frames as `None`); `Err` ends the connection.
    fn handle(
        conn: &mut Conn<Self>,
        session: &mut Session,
        frame: Option<Utf8Bytes>,
    ) -> impl Future<Output = Result<Flow, Option<Exit>>> + Send;
}

impl<D: Dialect> Conn<D> {
    /// Runs the session until it ends; returns why (`None`: the peer left).
    /// `told` is the last position the client was given (see [`Conn::tell_position`]);
    /// `next_ping`, when the first ping is due (at once if it is past). Socket.IO carries
    /// its schedule over from before CONNECT: its client expects a ping within
    /// `pingInterval` (+ `pingTimeout`) of the last, however long CONNECT and its
    /// replays took. A ping still unanswered then is not held against the client: its
    /// pong may be unread behind CONNECT, and the next tick checks again.
    pub(crate) async fn drive(
        &mut self,
        session: &mut Session,
        rx: &mut mpsc::Receiver<Message>,
        mut told: Option<EventId>,
        mut next_ping: tokio::time::Instant,
    ) -> Option<Exit> {
        // Whether an event was written since the last ping tick: an idle session is told
        // the current position on the tick instead (see `tell_position`).
        let mut delivered = false;
        let mut awaiting_pong: Option<Instant> = None;
        let leeway = self.gw.verifier.leeway();
        let ping_every = self.gw.cfg.ping_interval;
        let mut expires = tokio::time::Instant::now() + expiry_in(session.principal(), leeway);
        // Made once and kept across turns of the loop: a fresh sleep and fresh
        // cancellation waiters per turn cost a timer-wheel insert and removal and
        // waiter-list locks (one on the token every session shares) per delivery, and
        // the tokens are looked at only when one of them fires (see `signals`). One
        // timer serves the ping and the token's expiry (an `Interval` would be a
        // second, boxed timer per connection).
        let signals = Signals::new(self.gw.stop.clone(), self.kicked.clone());
        let timer = tokio::time::sleep_until(next_ping.min(expires));
        tokio::pin!(signals, timer);
        loop {
            tokio::select! {
                biased;
                signal = &mut signals => return Some(match signal {
                    Signal::Stop => Exit(close::GOING_AWAY, "shutting_down"),
                    Signal::Kick => Exit(close::SLOW_CONSUMER, "slow_consumer"),
                }),
                _ = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= expires {
                        // Counted apart from refused tokens: this one was valid when it came.
                        self.gw.metrics.auth_failures.get_or_create(&ReasonLabels { reason: "expired_in_session" }).inc();
                        return Some(Exit(close::TOKEN_EXPIRED, "token_expired"));
                    }
                    if now >= next_ping {
                        next_ping = now + ping_every;
                        if let Some(sent) = awaiting_pong {
                            if sent.elapsed() >= self.gw.cfg.pong_timeout {
                                return Some(Exit(close::PING_TIMEOUT, "ping_timeout"));
                            }
                        } else {
                            awaiting_pong = Some(Instant::now());
                        }
                        let ping = self.dialect.ping();
                        if let Err(e) = self.send(ping).await { return self.write_failed(e); }
                        if !std::mem::take(&mut delivered) {
                            if let Err(e) = self.tell_position(rx, &mut told).await { return self.write_failed(e); }
                        }
                    }
                    timer.as_mut().reset(next_ping.min(expires));
                }
                msg = rx.recv() => {
                    let msg = msg?;
                    match self.write_batch(session, msg, rx).await {
                        Ok(Some(id)) => {
                            told = Some(id);
                            delivered = true;
                        }
                        Ok(None) => {}
                        Err(e) => return self.write_failed(e),
                    }
                }
                inbound = self.link.recv() => {
                    let frame = match inbound {
                        In::Closed => return None,
                        In::Refused(exit) => return Some(exit),
                        In::Pong => { awaiting_pong = None; continue; }
                        In::Resend(frames) => {
                            if let Err(e) = self.resend(frames).await { return self.write_failed(e); }
                            continue;
                        }
                        In::Text(t) => Some(t),
                        In::Binary => None,
                    };
                    // Boxed: a join (authorization, replay) is the largest future the loop
                    // awaits; inline, it sized every idle session's task for its whole life
                    // (a task just over 4 KiB took mimalloc's 5 KiB size class).
                    match Box::pin(D::handle(self, session, frame)).await {
                        Err(exit) => return exit,
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Pong) => awaiting_pong = None,
                        Ok(Flow::Refreshed) => {
                            expires = tokio::time::Instant::now() + expiry_in(session.principal(), leeway);
                            timer.as_mut().reset(next_ping.min(expires));
                        }
                    }
                }
            }
        }
    }

    /// A join's resync notice or replay, before any live message of that room; flushed.
    pub(crate) async fn replay(
        &mut self,
        session: &mut Session,
        j: Joined,
    ) -> Result<(), WriteError> {
        if j.resync {
            let text = self.dialect.resync(j.room.as_str());
            self.feed(WsMessage::Text(text)).await?;
        }
        for m in j.replay {
            if session.accept_replayed(&m) {
                self.feed_message(&m).await?;
            }
        }
        self.flush().await
    }

    /// Frames left on a transport that was upgraded away.
    async fn resend(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), WriteError> {
        for f in frames {
            self.feed(WsMessage::Text(f)).await?;
        }
        self.flush().await
    }

    /// Tells the client about order rooms it lost to an ownership change.
    async fn feed_lost(&mut self, session: &mut Session) -> Result<(), WriteError> {
        for room in session.take_lost() {
            let text = self.dialect.lost(room.as_str());
            self.feed(WsMessage::Text(text)).await?;
        }
        Ok(())
    }

    /// Tells an idle client the current position, so that its `since` stays within
    /// every replica's history however long it waits for an event. The position is
    /// read first and sent only when the mailbox is empty after that: the hub delivers
    /// into mailboxes under the lock `position()` takes, so every event of this
    /// session's rooms up to it is then already written (nothing it covers is
    /// skipped). Nothing is sent when it is what the client was last told.
    async fn tell_position(
        &mut self,
        rx: &mpsc::Receiver<Message>,
        told: &mut Option<EventId>,
    ) -> Result<(), WriteError> {
        let Some(p) = self.gw.hub.position() else {
            return Ok(());
        };
        if !rx.is_empty() || told.as_ref() == Some(&p) {
            return Ok(());
        }
        let text = self.dialect.position(&self.gw.wire_id(&p));
        self.send(WsMessage::Text(text)).await?;
        *told = Some(p);
        Ok(())
    }

    /// Writes `first` and whatever else is already queued (up to a batch), then flushes
    /// once; returns the id of the last event written, if any.
    async fn write_batch(
        &mut self,
        session: &mut Session,
        first: Message,
        rx: &mut mpsc::Receiver<Message>,
    ) -> Result<Option<EventId>, WriteError> {
        let mut next = Some(first);
        let mut last: Option<Message> = None;
        let mut n = 0;
        while let Some(m) = next.take() {
            if session.accept(&m) {
                self.feed_message(&m).await?;
                if m.id().is_some() {
                    last = Some(m);
                }
            } else {
                // A refused message may have cost the room (ownership moved): the
                // notice goes out in its place, before anything later.
                self.feed_lost(session).await?;
            }
            n += 1;
            if n < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        self.flush().await?;
        Ok(last.and_then(|m| m.id().cloned()))
    }

    /// Every frame of one hub message; counts the delivery once.
    pub(crate) async fn feed_message(&mut self, m: &Message) -> Result<(), WriteError> {
        for text in self.dialect.frames(m) {
            timed(
                self.gw.cfg.write_timeout,
                &self.kicked,
                self.link.feed(WsMessage::Text(text)),
            )
            .await?;
        }
        self.gw.metrics.delivered(D::WIRE);
        if let Some(ts) = m.ts_ms() {
            observe_latency(&self.gw, ts);
        }
        Ok(())
    }
}

impl<D> Conn<D> {
    /// Queues one frame (written at the next flush, or when the buffer fills).
    pub(crate) async fn feed(&mut self, m: WsMessage) -> Result<(), WriteError> {
        timed(self.gw.cfg.write_timeout, &self.kicked, self.link.feed(m)).await
    }

    pub(crate) async fn flush(&mut self) -> Result<(), WriteError> {
        timed(self.gw.cfg.write_timeout, &self.kicked, self.link.flush()).await
    }

    /// One frame, written now.
    pub(crate) async fn send(&mut self, m: WsMessage) -> Result<(), WriteError> {
        self.feed(m).await?;
        self.flush().await
    }

    pub(crate) async fn send_text(&mut self, text: impl Into<Utf8Bytes>) -> Result<(), WriteError> {
        self.send(WsMessage::Text(text.into())).await
    }

    /// What to do after a failed write: a peer that stopped reading is a slow
    /// consumer (told 4000 if it ever reads again, and counted once: the hub
    /// already counted a kick), a broken socket just ends.
    pub(crate) fn write_failed(&self, e: WriteError) -> Option<Exit> {
        match e {
            WriteError::Failed => None,
            WriteError::TimedOut => {
                if !self.kicked.is_cancelled() {
                    self.gw.metrics.slow_consumer_disconnects.inc();
                }
                Some(Exit(close::SLOW_CONSUMER, "slow_consumer"))
            }
            WriteError::Kicked => Some(Exit(close::SLOW_CONSUMER, "slow_consumer")),
        }
    }

    pub(crate) fn count_error(&self, reason: &'static str) {
        self.gw
            .metrics
            .client_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// What the message rate allows for one client message.
pub(crate) enum Rate {
    /// Within the limit.
    Allowed,
    /// Over it: the first refusal of the window is answered, the rest dropped unanswered.
    Refused { first: bool },
    /// Far over it: close rather than keep parsing.
    Abusive,
}

/// Counts one client message against `w` (and `client_errors{rate_limited}` when refused).
pub(crate) fn rate(gw: &Gateway, w: &mut RateWindow) -> Rate {
    let count = || {
        gw.metrics
            .client_errors
            .get_or_create(&ReasonLabels {
                reason: "rate_limited",
            })
            .inc()
    };
    if w.allow() {
        return Rate::Allowed;
    }
    if w.abusive() {
        count();
        return Rate::Abusive;
    }
    let first = w.first_refusal();
    if first {
        count();
    }
    Rate::Refused { first }
}

/// A rate window for `server.max_messages_per_second`.
pub(crate) fn rate_window(gw: &Gateway) -> RateWindow {
    RateWindow::new(u32::try_from(gw.cfg.max_messages_per_second.get()).unwrap_or(u32::MAX))
}

/// Every write has a timeout, and gives up when the hub kicks the session: a peer
/// that stops reading cannot hold a session forever. Dropping a pending write is
/// safe: tungstenite keeps whole frames in its buffer.
async fn timed(
    timeout: Duration,
    kicked: &CancellationToken,
    write: impl Future<Output = Result<(), WriteError>>,
) -> Result<(), WriteError> {
    tokio::pin!(write);
    // Almost every write finishes on its first poll (the socket buffer has room); only
    // one that waits needs the timer and the kick waiter, which cost a clock read and
    // a waiter registration per frame when made up front.
    if let std::task::Poll::Ready(r) = futures::poll!(write.as_mut()) {
        return r;
    }
    tokio::select! {
        biased;
        r = tokio::time::timeout(timeout, write) => match r {
            Ok(r) => r,
            Err(_) => Err(WriteError::TimedOut),
        },
        _ = kicked.cancelled() => Err(WriteError::Kicked),
    }
}

/// Records commit-to-socket latency.
pub(crate) fn observe_latency(gw: &Gateway, ts_ms: i64) {
    if ts_ms <= 0 {
        return;
    }
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    gw.metrics
        .delivery_latency
        .observe(((now_ms - ts_ms).max(0) as f64) / 1000.0);
}

/// Time until the principal's token expires (plus leeway); far future when it has no expiry.
pub(crate) fn expiry_in(p: &Principal, leeway: Duration) -> Duration {
    match p.expires_at {
        Some(at) => (at + leeway)
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
        None => Duration::from_secs(365 * 24 * 3600),
    }
}
