//! The native `/ws` endpoint: upgrade checks, in-band auth, and the one `select!` loop per socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::limits::{RateWindow, SubjectPermit, TotalPermit, UnauthPermit, UnauthRefused};
use super::protocol::{self, close, ClientMsg};
use super::session::{Joined, Session};
use super::Gateway;
use crate::auth::{AuthError, Principal};
use crate::event::EventId;
use crate::hub::{Message, WireFormat};
use crate::metrics::{ReasonLabels, Wire, WireLabels};

/// Most hub messages written before one flush; bounds the time between flushes under load.
const WRITE_BATCH: usize = 64;
/// Read buffer per `/ws` connection (Socket.IO's engine uses the same 4 KiB).
const WS_READ_BUFFER_BYTES: usize = 4096;
/// Longest wait for the peer's close frame after ours (RFC 6455 §7.1.1 closing handshake).
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// `GET /ws`: checks origin, token (when sent in headers) and limits before upgrading.
pub(crate) async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if gw.stop.is_cancelled() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server is shutting down",
        );
    }
    if !gw.origin_allowed(&headers) {
        gw.metrics
            .client_errors
            .get_or_create(&ReasonLabels {
                reason: "origin_not_allowed",
            })
            .inc();
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "origin is not in server.allowed_origins",
        );
    }
    let found = crate::auth::token_from_headers(&headers, gw.allow_query_token, query.as_deref());
    let principal = match &found.token {
        Some((_, t)) => match gw.verifier.verify(t.expose(), SystemTime::now()) {
            Ok(p) => Some(p),
            Err(e) => {
                count_auth_failure(&gw, &e);
                return refuse(StatusCode::UNAUTHORIZED, e.code(), &e.to_string());
            }
        },
        None => None,
    };
    // A socket with a token counts against `max_connections` at once; one without
    // waits for `auth` in the unauthenticated pool, so anonymous sockets cannot fill
    // the slots token holders need. It moves over when it authenticates.
    let (total, unauth) = if principal.is_some() {
        let Some(total) = gw.limits.acquire_total(gw.cfg.max_connections.get()) else {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many connections",
            );
        };
        (Some(total), None)
    } else {
        match gw.limits.acquire_unauth(
            Some(peer.ip()),
            gw.cfg.max_unauthenticated.get(),
            gw.cfg.max_unauthenticated_per_ip,
        ) {
            Ok(p) => (None, Some(Box::new(p))),
            Err(why) => {
                gw.metrics
                    .client_errors
                    .get_or_create(&ReasonLabels { reason: why.code() })
                    .inc();
                let status = match why {
                    UnauthRefused::Total => StatusCode::SERVICE_UNAVAILABLE,
                    UnauthRefused::PerIp => StatusCode::TOO_MANY_REQUESTS,
                };
                return refuse(status, why.code(), why.message());
            }
        }
    };
    let subject_permit = match principal.as_ref().and_then(|p| p.subject.as_deref()) {
        Some(sub) => match gw
            .limits
            .acquire_subject(sub, gw.cfg.max_connections_per_subject.get())
        {
            Some(p) => Some(p),
            None => {
                return refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    "too many connections for this subject",
                )
            }
        },
        None => None,
    };
    let since = query.as_deref().and_then(since_param).map(|s| gw.since(s));
    // tungstenite's default read buffer is 128 KiB and is zero-filled up to its capacity
    // on every read, so it stayed resident per connection and the memset was the top of
    // the fan-out profile (bench/analysis.md); clients send only small control messages,
    // and a larger one still grows the buffer up to max_message_bytes.
    let mut ws = ws
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .max_message_size(gw.cfg.max_message_bytes.get())
        .max_frame_size(gw.cfg.max_message_bytes.get());
    if let Some(p) = found.subprotocol {
        ws.set_selected_protocol(HeaderValue::from_static(p));
    }
    let tracker = gw.tracker.clone();
    ws.on_upgrade(move |socket| {
        let span = tracing::info_span!("ws", peer = %peer);
        tracker.track_future(
            async move {
                let conn = Conn {
                    gw,
                    socket,
                    kicked: CancellationToken::new(),
                    total,
                    unauth,
                    subject_permit,
                };
                conn.run(principal, since).await;
            }
            .instrument(span),
        )
    })
}

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

/// The `since` query parameter (an event id is hex, so no percent-decoding is needed).
fn since_param(query: &str) -> Option<&str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "since")
        .map(|(_, v)| v)
        // Sealed ids are hex; anything else is still a `since` (one we cannot open:
        // the client is told to resync rather than silently served from now).
        .filter(|v| !v.is_empty() && v.len() <= crate::idcodec::MAX_WIRE_LEN)
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": code, "message": message})),
    )
        .into_response()
}

fn count_auth_failure(gw: &Gateway, e: &AuthError) {
    e.record(&gw.metrics);
}

struct Conn {
    gw: Arc<Gateway>,
    socket: WebSocket,
    /// The hub's kick for this session's mailbox (a never-fired token until authenticated):
    /// a write blocked on a stalled peer gives up as soon as the hub cuts the session off.
    kicked: CancellationToken,
    /// The slot in `max_connections`; taken once the socket has authenticated.
    total: Option<TotalPermit>,
    /// The slot in the unauthenticated pool, until the socket authenticates. Boxed:
    /// inline it would add its ~32 bytes to every session's task for its whole life
    /// (see `serve` on task size classes); boxed, an authenticated session keeps 8.
    unauth: Option<Box<UnauthPermit>>,
    subject_permit: Option<SubjectPermit>,
}

/// Why the loop ended, and what to tell the peer.
struct Exit(u16, &'static str);

/// Why a socket write did not complete.
#[derive(Debug)]
enum WriteError {
    /// The peer is gone (or the socket failed).
    Failed,
    /// The write took longer than `server.write_timeout`: the peer stopped reading.
    TimedOut,
    /// The hub cut the session off while it was writing.
    Kicked,
}

impl Conn {
    async fn run(mut self, principal: Option<Principal>, since: Option<EventId>) {
        self.gw
            .metrics
            .connections
            .get_or_create(&WireLabels { wire: Wire::Native })
            .inc();
        let exit = self.serve(principal, since).await;
        self.gw
            .metrics
            .connections
            .get_or_create(&WireLabels { wire: Wire::Native })
            .dec();
        if let Some(Exit(code, reason)) = exit {
            tracing::info!(code, reason, "closing");
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let sent = tokio::time::timeout(
                self.gw.cfg.write_timeout,
                self.socket.send(WsMessage::Close(Some(frame))),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                // Wait for the peer's close reply before dropping the TCP connection:
                // a peer that writes (a pong, a message) after we closed would get a
                // reset, and a reset makes its kernel discard our unread close frame.
                let _ = tokio::time::timeout(CLOSE_LINGER, async {
                    while let Some(Ok(m)) = self.socket.recv().await {
                        if matches!(m, WsMessage::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
    }

    /// Waits for `{"type":"auth"}` within the deadline.
    async fn authenticate(&mut self) -> Result<(Principal, Option<EventId>), Option<Exit>> {
        let deadline = tokio::time::sleep(self.gw.cfg.auth_deadline);
        tokio::pin!(deadline);
        // The rate limit holds before authentication too: an anonymous peer must not
        // get unlimited parsing for the whole deadline.
        let mut rate = RateWindow::new(
            u32::try_from(self.gw.cfg.max_messages_per_second.get()).unwrap_or(u32::MAX),
        );
        loop {
            let msg = tokio::select! {
                _ = &mut deadline => return Err(Some(Exit(close::AUTH_TIMEOUT, "auth_timeout"))),
                _ = self.gw.stop.cancelled() => return Err(Some(Exit(close::GOING_AWAY, "shutting_down"))),
                m = self.socket.recv() => m,
            };
            if matches!(msg, Some(Ok(WsMessage::Text(_) | WsMessage::Binary(_)))) && !rate.allow() {
                if rate.abusive() {
                    self.count_error("rate_limited");
                    return Err(Some(Exit(close::RATE_LIMITED, "rate_limited")));
                }
                if rate.first_refusal() {
                    self.count_error("rate_limited");
                    self.send_text(protocol::error(
                        "rate_limited",
                        "too many messages per second; message dropped",
                        None,
                    ))
                    .await
                    .map_err(|_| None)?;
                }
                continue;
            }
            let text = match msg {
                None | Some(Ok(WsMessage::Close(_))) => return Err(None),
                Some(Err(e)) => return Err(read_error_exit(&e)),
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(WsMessage::Binary(_))) => {
                    self.send_text(protocol::error(
                        "binary_not_supported",
                        "send JSON text frames",
                        None,
                    ))
                    .await
                    .map_err(|_| None)?;
                    continue;
                }
            };
            match protocol::parse(&text) {
                Ok(ClientMsg::Auth { token, since }) => {
                    match self.gw.verifier.verify(&token, SystemTime::now()) {
                        Ok(p) => return Ok((p, since.map(|s| self.gw.since(&s)))),
                        Err(e) => {
                            count_auth_failure(&self.gw, &e);
                            let _ = self
                                .send_text(protocol::error(e.code(), &e.to_string(), None))
                                .await;
                            return Err(Some(Exit(close::AUTH_FAILED, "auth_failed")));
                        }
                    }
                }
                Ok(ClientMsg::Ping) => self
                    .send_text(protocol::pong().to_owned())
                    .await
                    .map_err(|_| None)?,
                Ok(_) => self
                    .send_text(protocol::error(
                        "unauthenticated",
                        "send {\"type\":\"auth\",\"token\":…} first",
                        None,
                    ))
                    .await
                    .map_err(|_| None)?,
                Err(e) => self
                    .send_text(protocol::error(e.code(), &e.to_string(), None))
                    .await
                    .map_err(|_| None)?,
            }
        }
    }

    async fn serve(
        &mut self,
        principal: Option<Principal>,
        since: Option<EventId>,
    ) -> Option<Exit> {
        let (principal, since) = match principal {
            Some(p) => (p, since),
            // The futures awaited once per connection are boxed (in-band auth here, then
            // the auto-joins and their replay, and `handle` in the loop): inline, they sized
            // every session's task for its whole life, and a task just over 4 KiB takes
            // mimalloc's 5 KiB size class (measured: 1 KiB more per idle connection).
            None => match Box::pin(self.authenticate()).await {
                Ok((p, s)) => (p, s.or(since)),
                Err(exit) => return exit,
            },
        };
        if self.total.is_none() {
            match self
                .gw
                .limits
                .acquire_total(self.gw.cfg.max_connections.get())
            {
                Some(t) => self.total = Some(t),
                None => return Some(Exit(close::OVERLOADED, "overloaded")),
            }
        }
        // Authenticated: out of the anonymous pool.
        self.unauth = None;
        if self.subject_permit.is_none() {
            if let Some(sub) = principal.subject.as_deref() {
                match self
                    .gw
                    .limits
                    .acquire_subject(sub, self.gw.cfg.max_connections_per_subject.get())
                {
                    Some(p) => self.subject_permit = Some(p),
                    None => return Some(Exit(close::OVERLOADED, "too_many_connections")),
                }
            }
        }
        let (mailbox, mut rx) = self.gw.hub.mailbox();
        let kicked = mailbox.kicked().clone();
        self.kicked = kicked.clone();
        let mut session = Session::new(self.gw.clone(), mailbox, principal);
        tracing::debug!(session = session.mailbox().id(), "authenticated");

        let joined = Box::pin(session.join_auto(since.as_ref())).await;
        let rooms: Vec<String> = session.rooms().map(|r| r.to_string()).collect();
        // Auto rooms are joined in turn, so the first position is at or before every other.
        // Kept as the last position this client was told (see the position tick below).
        let mut told = joined.first().and_then(|j| j.position.clone());
        let position = told.as_ref().map(|p| self.gw.wire_id(p));
        let welcome = protocol::welcome(
            session.mailbox().id(),
            &rooms,
            session.principal().subject.as_deref(),
            position.as_deref(),
        );
        drop(position);
        if let Err(e) = self.send_text(welcome).await {
            return self.write_failed(e);
        }
        for j in joined {
            if since.is_some() {
                if let Err(e) = Box::pin(self.send_joined(&mut session, j, false)).await {
                    return self.write_failed(e);
                }
            }
        }

        // Whether an event was written since the last ping tick: an idle session is told
        // the current position on the tick instead (see `tell_position`).
        let mut delivered = false;
        let mut awaiting_pong: Option<Instant> = None;
        let mut rate = RateWindow::new(
            u32::try_from(self.gw.cfg.max_messages_per_second.get()).unwrap_or(u32::MAX),
        );
        let leeway = self.gw.verifier.leeway();
        let ping_every = self.gw.cfg.ping_interval;
        let mut next_ping = tokio::time::Instant::now() + ping_every;
        let mut expires = tokio::time::Instant::now() + expiry_in(session.principal(), leeway);
        // Made once and kept across turns of the loop: a fresh sleep and two fresh
        // cancellation waiters per turn cost a timer-wheel insert and removal and two
        // waiter-list locks (one on the token every session shares) per delivery. One
        // timer serves both the ping and the token's expiry (an `Interval` would be a
        // second, boxed timer per connection).
        let stop = self.gw.stop.clone();
        let stopping = stop.cancelled();
        let kicking = kicked.cancelled();
        let timer = tokio::time::sleep_until(next_ping.min(expires));
        tokio::pin!(stopping, kicking, timer);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopping => return Some(Exit(close::GOING_AWAY, "shutting_down")),
                _ = &mut kicking => return Some(Exit(close::SLOW_CONSUMER, "slow_consumer")),
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
                        if let Err(e) = self.send(WsMessage::Ping(bytes::Bytes::new())).await { return self.write_failed(e); }
                        if !std::mem::take(&mut delivered) {
                            if let Err(e) = self.tell_position(&rx, &mut told).await { return self.write_failed(e); }
                        }
                    }
                    timer.as_mut().reset(next_ping.min(expires));
                }
                msg = rx.recv() => {
                    let msg = msg?;
                    match self.write_batch(&mut session, msg, &mut rx).await {
                        Ok(Some(id)) => {
                            told = Some(id);
                            delivered = true;
                        }
                        Ok(None) => {}
                        Err(e) => return self.write_failed(e),
                    }
                }
                inbound = self.socket.recv() => {
                    let text = match inbound {
                        None => return None,
                        Some(Err(e)) => return read_error_exit(&e),
                        Some(Ok(WsMessage::Close(_))) => return None,
                        Some(Ok(WsMessage::Pong(_))) => { awaiting_pong = None; continue; }
                        Some(Ok(WsMessage::Ping(_))) => continue,
                        Some(Ok(WsMessage::Binary(_))) => {
                            if !rate.allow() { if rate.abusive() { return Some(Exit(close::RATE_LIMITED, "rate_limited")); } continue; }
                            self.count_error("binary_not_supported");
                            if let Err(e) = self.send_text(protocol::error("binary_not_supported", "send JSON text frames", None)).await { return self.write_failed(e); }
                            continue;
                        }
                        Some(Ok(WsMessage::Text(t))) => t,
                    };
                    if !rate.allow() {
                        if rate.abusive() {
                            self.count_error("rate_limited");
                            return Some(Exit(close::RATE_LIMITED, "rate_limited"));
                        }
                        if rate.first_refusal() {
                            self.count_error("rate_limited");
                            if let Err(e) = self.send_text(protocol::error("rate_limited", "too many messages per second; message dropped", None)).await { return self.write_failed(e); }
                        }
                        continue;
                    }
                    if let Err(exit) = Box::pin(self.handle(&mut session, &text)).await {
                        return exit;
                    }
                    // An `auth` message may have replaced the principal and its expiry.
                    expires = tokio::time::Instant::now() + expiry_in(session.principal(), leeway);
                    timer.as_mut().reset(next_ping.min(expires));
                }
            }
        }
    }

    /// Handles one client message; `Err` ends the connection.
    async fn handle(&mut self, session: &mut Session, text: &str) -> Result<(), Option<Exit>> {
        let reply = match protocol::parse(text) {
            Err(e) => {
                self.count_error(e.code());
                protocol::error(e.code(), &e.to_string(), None)
            }
            Ok(ClientMsg::Ping) => protocol::pong().to_owned(),
            Ok(ClientMsg::Auth { token, .. }) => {
                match self.gw.verifier.verify(&token, SystemTime::now()) {
                    Ok(p) => match session.refresh(p).await {
                        Ok(left) => {
                            let left: Vec<&str> = left.iter().map(|r| r.as_str()).collect();
                            serde_json::json!({"type": "authenticated", "left": left}).to_string()
                        }
                        Err(e) => protocol::error(e.code, &e.message, None),
                    },
                    Err(e) => {
                        count_auth_failure(&self.gw, &e);
                        protocol::error(e.code(), &e.to_string(), None)
                    }
                }
            }
            Ok(ClientMsg::Subscribe { room, since }) => {
                match session.join(&room, since.as_deref()).await {
                    Ok(j) => {
                        return self
                            .send_joined(session, j, true)
                            .await
                            .map_err(|e| self.write_failed(e))
                    }
                    Err(e) => protocol::error(e.code, &e.message, Some(&room)),
                }
            }
            Ok(ClientMsg::Unsubscribe { room }) => {
                if session.leave(&room) {
                    protocol::unsubscribed(&room)
                } else {
                    protocol::error("not_subscribed", "not subscribed to this room", Some(&room))
                }
            }
        };
        self.send_text(reply)
            .await
            .map_err(|e| self.write_failed(e))
    }

    /// `subscribed` (when asked), then the replay or a resync notice.
    async fn send_joined(
        &mut self,
        session: &mut Session,
        j: Joined,
        ack: bool,
    ) -> Result<(), WriteError> {
        if ack {
            let position = j.position.as_ref().map(|p| self.gw.wire_id(p));
            self.send_text(protocol::subscribed(
                j.room.as_str(),
                j.recovered,
                position.as_deref(),
            ))
            .await?;
        }
        if j.resync {
            self.send_text(protocol::resync(j.room.as_str(), "history_unavailable"))
                .await?;
        }
        for m in j.replay {
            if session.accept_replayed(&m) {
                self.feed_message(&m).await?;
            }
        }
        self.flush().await
    }

    /// Tells the client about order rooms it lost to an ownership change.
    async fn feed_lost(&mut self, session: &mut Session) -> Result<(), WriteError> {
        for room in session.take_lost() {
            let text = protocol::unsubscribed_because(room.as_str(), "ownership_changed");
            timed(
                self.gw.cfg.write_timeout,
                &self.kicked,
                self.socket.feed(WsMessage::Text(text.into())),
            )
            .await?;
        }
        Ok(())
    }

    /// Tells an idle client the current position, `{"type":"position",…}`, so that
    /// its `since` stays within every replica's history however long it waits for an
    /// event. The position is read first and sent only when the mailbox is empty after
    /// that: the hub delivers into mailboxes under the lock `position()` takes, so every
    /// event of this session's rooms up to it is then already written (nothing it
    /// covers is skipped). Nothing is sent when it is what the client was last told.
    async fn tell_position(
        &mut self,
        rx: &tokio::sync::mpsc::Receiver<Arc<Message>>,
        told: &mut Option<EventId>,
    ) -> Result<(), WriteError> {
        let Some(p) = self.gw.hub.position() else {
            return Ok(());
        };
        if !rx.is_empty() || told.as_ref() == Some(&p) {
            return Ok(());
        }
        let text = protocol::position(&self.gw.wire_id(&p));
        self.send_text(text).await?;
        *told = Some(p);
        Ok(())
    }

    /// Writes `first` and whatever else is already queued (up to a batch), then flushes
    /// once; returns the id of the last event written, if any.
    async fn write_batch(
        &mut self,
        session: &mut Session,
        first: Arc<Message>,
        rx: &mut tokio::sync::mpsc::Receiver<Arc<Message>>,
    ) -> Result<Option<EventId>, WriteError> {
        let mut next = Some(first);
        let mut last: Option<Arc<Message>> = None;
        let mut n = 0;
        while let Some(m) = next.take() {
            if session.accept(&m) {
                self.feed_message(&m).await?;
                if m.id.is_some() {
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
        Ok(last.and_then(|m| m.id.clone()))
    }

    async fn feed_message(&mut self, m: &Message) -> Result<(), WriteError> {
        let bytes = m.encoded(WireFormat::Native, protocol::encode_message);
        let text = Utf8Bytes::try_from(bytes).map_err(|_| WriteError::Failed)?;
        timed(
            self.gw.cfg.write_timeout,
            &self.kicked,
            self.socket.feed(WsMessage::Text(text)),
        )
        .await?;
        self.gw.metrics.delivered(Wire::Native);
        if let Some(ts) = m.ts_ms() {
            observe_latency(&self.gw, ts);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), WriteError> {
        timed(self.gw.cfg.write_timeout, &self.kicked, self.socket.flush()).await
    }

    async fn send_text(&mut self, text: String) -> Result<(), WriteError> {
        self.send(WsMessage::Text(text.into())).await
    }

    async fn send(&mut self, m: WsMessage) -> Result<(), WriteError> {
        timed(self.gw.cfg.write_timeout, &self.kicked, self.socket.send(m)).await
    }

    /// What to do after a failed write: a peer that stopped reading is a slow
    /// consumer (told 4000 if it ever reads again, and counted once: the hub
    /// already counted a kick), a broken socket just ends.
    fn write_failed(&self, e: WriteError) -> Option<Exit> {
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

    fn count_error(&self, reason: &'static str) {
        self.gw
            .metrics
            .client_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// Every socket write has a timeout, and gives up when the hub kicks the
/// session: a peer that stops reading cannot hold a session forever. Dropping
/// a pending write is safe: tungstenite keeps whole frames in its buffer.
async fn timed(
    timeout: Duration,
    kicked: &CancellationToken,
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
) -> Result<(), WriteError> {
    tokio::pin!(write);
    // Almost every write finishes on its first poll (the socket buffer has room); only
    // one that waits needs the timer and the kick waiter, which cost a clock read and
    // a waiter registration per frame when made up front.
    if let std::task::Poll::Ready(r) = futures::poll!(write.as_mut()) {
        return r.map_err(|_| WriteError::Failed);
    }
    tokio::select! {
        biased;
        r = tokio::time::timeout(timeout, write) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteError::Failed),
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
