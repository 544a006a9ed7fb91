//! The Socket.IO endpoint at `/socket.io/`: handshake auth, client events and legacy event names over the shared session core; Engine.IO/Socket.IO framing is socketioxide's.
//!
//! One connection is one [`Session`] (the same rooms, rules, recovery and
//! limits as `/ws`) driven by one `select!` loop. socketioxide runs a task per
//! inbound event; those handlers only parse and forward a [`Cmd`] to the loop,
//! so joins, replays and live events are written in one order by one owner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::{DisconnectReason, Sid};
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::limits::{RateWindow, SubjectPermit, TotalPermit, UnauthPermit, UnauthRefused};
use super::session::{Joined, Session};
use super::ws::{expiry_in, observe_latency};
use super::Gateway;
use crate::auth::{normalize_id, AuthError};
use crate::config::Alias;
use crate::event::EventId;
use crate::hub::{Body, Message};
use crate::metrics::{ReasonLabels, Wire, WireLabels};
#[cfg(test)]
use crate::room::Room;
use crate::room::RoomKind;

/// Packets socketioxide may hold for one client before `emit` fails; the
/// Socket.IO counterpart of the hub mailbox (the loop drains the mailbox into
/// it at once, so this is where a slow client's backlog sits).
/// Overflow policy: the client is disconnected and counted as a slow consumer.
const SIO_BUFFER_PACKETS: usize = 1024;

/// Bytes tungstenite reads per call on a Socket.IO WebSocket, and the read buffer
/// every connection holds from the start (engineioxide's default, 4096, is 3 KiB
/// more per idle connection). Clients send pongs, acks and `subscribe`s of a few
/// hundred bytes; a larger frame still arrives whole: tungstenite reserves its full
/// length (at most `server.max_message_bytes`) and reads it 1 KiB at a time.
const SIO_WS_READ_BUFFER: usize = 1024;

/// Client commands waiting for the session loop. socketioxide runs one task per
/// inbound event; a client that outpaces its loop by this much is flooding.
/// Commands travel boxed: tokio allocates a channel's first block of 32 slots up
/// front, so 32 pointers rather than 32 commands stay resident per connection.
/// Overflow policy: the command is refused with `rate_limited`, never queued.
const CMD_QUEUE: usize = 32;

/// Most hub messages emitted per loop turn, so commands and shutdown are not starved.
const EMIT_BATCH: usize = 64;

/// How long an authenticated handshake may wait for socketioxide to call the
/// connect handler; past it the pending session is dropped (its CONNECT failed).
const PENDING_TTL: Duration = Duration::from_secs(30);

/// How often a disconnect is retried while the client's buffer is full.
const DISCONNECT_RETRY: Duration = Duration::from_millis(50);

/// Builds the Socket.IO layer for `gw` and starts the task that closes every
/// Socket.IO transport when `gw.stop` fires.
pub(crate) fn layer(gw: Arc<Gateway>) -> SocketIoLayer {
    let cfg = &gw.cfg;
    let max_msg = cfg.max_message_bytes.get();
    let (layer, io) = SocketIo::builder()
        .ping_interval(cfg.ping_interval)
        .ping_timeout(cfg.pong_timeout)
        .connect_timeout(cfg.auth_deadline)
        .max_payload(max_msg as u64)
        .ws_max_message_size(max_msg)
        .ws_max_frame_size(max_msg)
        .max_buffer_size(SIO_BUFFER_PACKETS)
        .ws_read_buffer_size(SIO_WS_READ_BUFFER)
        .build_layer();
    let shared = Arc::new(Shared {
        aliases: AliasTable::new(&gw.sio.aliases),
        pending: Mutex::new(HashMap::new()),
        gw: gw.clone(),
    });
    let on_connect = {
        let shared = shared.clone();
        move |s: SocketRef| {
            let shared = shared.clone();
            async move { shared.connected(s) }
        }
    };
    let authenticate = {
        let shared = shared.clone();
        move |s: SocketRef, TryData(auth): TryData<Value>| {
            let shared = shared.clone();
            async move { shared.authenticate(&s, auth.ok()).await }
        }
    };
    io.ns("/", on_connect.with(authenticate));

    // Shutdown closes the transports rather than sending DISCONNECT: clients
    // then see "transport close" and reconnect (to another replica), as /ws's 1001 asks.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let stop = gw.stop.clone();
        rt.spawn(gw.tracker.track_future(async move {
            stop.cancelled().await;
            io.close().await;
        }));
    }
    layer
}

/// The request with its head copied out of hyper's read buffer.
///
/// hyper hands the URI and header values out as slices of the 8 KiB buffer it
/// read the request into (and axum's `OriginalUri` is one more), and engineioxide
/// keeps the handshake request's head for the socket's whole life
/// (`SocketRef::req_parts`). Those slices kept that buffer resident per
/// connection, and with it a second 8 KiB buffer hyper allocated for its next
/// read because the first was still shared: 16 KiB of heap per idle connection,
/// 7.6 KiB of RSS at C = 10000. The copies are the size of the head. Headers nothing
/// reads ([`UNREAD_HEADERS`]) are left out; otherwise nothing changes: same method,
/// version, URI, other headers (and their sensitivity), extensions.
fn detach(req: axum::extract::Request) -> axum::extract::Request {
    use axum::http::{HeaderMap, HeaderValue, Uri};
    let (mut parts, body) = req.into_parts();
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if unread(name) {
            continue;
        }
        let copy = match HeaderValue::from_bytes(value.as_bytes()) {
            Ok(mut v) => {
                v.set_sensitive(value.is_sensitive());
                v
            }
            Err(_) => value.clone(),
        };
        headers.append(name.clone(), copy);
    }
    parts.headers = headers;
    if let Ok(uri) = Uri::try_from(parts.uri.to_string()) {
        parts.uri = uri;
    }
    if let Some(o) = parts.extensions.get_mut::<axum::extract::OriginalUri>() {
        o.0 = parts.uri.clone();
    }
    axum::extract::Request::from_parts(parts, body)
}

/// Request headers that neither changecast nor the Socket.IO engine reads (the engine
/// reads `Content-Type` and `Sec-WebSocket-Key`; changecast `Origin`, `Authorization`
/// and `Sec-WebSocket-Protocol`), yet the engine would keep for the socket's life: a
/// browser's cookies, user agent and client hints are 1–3 KB per connection.
const UNREAD_HEADERS: [axum::http::HeaderName; 8] = [
    axum::http::header::COOKIE,
    axum::http::header::USER_AGENT,
    axum::http::header::ACCEPT,
    axum::http::header::ACCEPT_LANGUAGE,
    axum::http::header::ACCEPT_ENCODING,
    axum::http::header::REFERER,
    axum::http::header::CACHE_CONTROL,
    axum::http::header::PRAGMA,
];

fn unread(name: &axum::http::HeaderName) -> bool {
    let n = name.as_str();
    UNREAD_HEADERS.contains(name) || n.starts_with("sec-ch-") || n.starts_with("sec-fetch-")
}

/// The middleware in front of socketioxide: every `/socket.io/` request is
/// [`detach`]ed first, and one that opens an Engine.IO session is counted in the
/// unauthenticated pool ([`admit`]; refused past its caps). Then CORS for the long-polling transport, which a browser
/// dashboard on another origin reaches with XHR (WebSockets need none). Only `/socket.io/` answers;
/// the origin must pass `server.allowed_origins` (any origin when it is empty),
/// and is echoed rather than `*` because socket.io-client may send credentials.
pub(crate) async fn cors(
    axum::extract::State(gw): axum::extract::State<Arc<Gateway>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, HeaderValue, Method, StatusCode};
    use axum::response::IntoResponse;

    let scoped = req.uri().path().starts_with("/socket.io/");
    let req = if scoped { detach(req) } else { req };
    let origin = req.headers().get(header::ORIGIN).cloned();
    let origin = origin.filter(|_| scoped && gw.origin_allowed(req.headers()));
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = if origin.is_some() && preflight {
        StatusCode::NO_CONTENT.into_response()
    } else if scoped {
        let mut req = req;
        match admit(&gw, &mut req) {
            Ok(()) => next.run(req).await,
            Err(why) => unauth_refusal(why),
        }
    } else {
        next.run(req).await
    };
    let Some(origin) = origin else {
        return resp;
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type, authorization"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

/// What one Engine.IO session counts against until its Socket.IO CONNECT succeeds.
enum Admission {
    /// The unauthenticated pool (held for its release on drop).
    Anonymous { _permit: UnauthPermit },
    /// `max_connections` and the token's subject: the handshake request carried a
    /// valid token (as on `/ws`, a token holder never depends on room in the
    /// anonymous pool, and is held to its subject's cap from the start).
    Authenticated {
        total: TotalPermit,
        subject: Option<SubjectPermit>,
    },
}

/// The [`Admission`] of one Engine.IO session, carried in its handshake request's
/// extensions: engineioxide keeps that request head for the session's life, so
/// the slot is freed when the session closes (by the client, the heartbeat, or
/// socketioxide's `connect_timeout` = `server.auth_deadline`), or when its CONNECT
/// succeeds ([`Shared::authenticate`] takes it over).
#[derive(Clone)]
struct HandshakeSlot(Arc<Mutex<Option<Admission>>>);

impl HandshakeSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Admission>> {
        // Only whole values are swapped under the lock; a panic cannot leave one half-made.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `max_connections` (and subject) slots taken at the handshake, if that is what it holds.
    fn take_total(&self) -> Option<(TotalPermit, Option<SubjectPermit>)> {
        let mut held = self.lock();
        match held.take() {
            Some(Admission::Authenticated { total, subject }) => Some((total, subject)),
            other => {
                *held = other;
                None
            }
        }
    }

    fn put_back(&self, a: Admission) {
        *self.lock() = Some(a);
    }

    /// Frees what it holds (the session has its own slot now).
    fn release(&self) {
        // Taken out and dropped outside the lock.
        let held = self.lock().take();
        drop(held);
    }
}

/// Counts a request that opens an Engine.IO session (a GET without `sid`: the
/// polling handshake, or a WebSocket opened directly) against the unauthenticated
/// pool; past a cap the caller answers it ([`unauth_refusal`]) and it never reaches
/// the engine. Requests of an existing session pass untouched.
fn admit(gw: &Gateway, req: &mut axum::extract::Request) -> Result<(), UnauthRefused> {
    let has_sid = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("sid")));
    if req.method() != axum::http::Method::GET || has_sid {
        return Ok(());
    }
    // A valid token on the handshake itself (Authorization, or `?token=` when allowed)
    // takes a `max_connections` slot instead. A bad or missing one is not refused here:
    // CONNECT's `auth.token` comes first and is checked there.
    let found =
        crate::auth::token_from_headers(req.headers(), gw.allow_query_token, req.uri().query());
    // Over `max_connections` or its subject's cap, the token holder is anonymous here
    // and is refused at CONNECT.
    let principal = found
        .token
        .and_then(|(_, t)| gw.verifier.verify(t.expose(), SystemTime::now()).ok());
    if let Some(p) = principal {
        let subject = match p.subject.as_deref() {
            Some(sub) => gw
                .limits
                .acquire_subject(sub, gw.cfg.max_connections_per_subject.get())
                .map(Some),
            None => Some(None),
        };
        let total = gw.limits.acquire_total(gw.cfg.max_connections.get());
        if let (Some(subject), Some(total)) = (subject, total) {
            req.extensions_mut()
                .insert(HandshakeSlot(Arc::new(Mutex::new(Some(
                    Admission::Authenticated { total, subject },
                )))));
            return Ok(());
        }
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let permit = gw
        .limits
        .acquire_unauth(
            peer,
            gw.cfg.max_unauthenticated.get(),
            gw.cfg.max_unauthenticated_per_ip,
        )
        .inspect_err(|why| {
            gw.metrics
                .client_errors
                .get_or_create(&ReasonLabels { reason: why.code() })
                .inc();
        })?;
    req.extensions_mut()
        .insert(HandshakeSlot(Arc::new(Mutex::new(Some(
            Admission::Anonymous { _permit: permit },
        )))));
    Ok(())
}

/// 503 `unauthenticated_overloaded` or 429 `unauthenticated_per_ip`, with the
/// `{"error","message"}` body `/ws` refusals have.
fn unauth_refusal(why: UnauthRefused) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let status = match why {
        UnauthRefused::Total => StatusCode::SERVICE_UNAVAILABLE,
        UnauthRefused::PerIp => StatusCode::TOO_MANY_REQUESTS,
    };
    (
        status,
        axum::Json(json!({"error": why.code(), "message": why.message()})),
    )
        .into_response()
}

/// What the middleware hands to the connect handler for one socket.
struct Pending {
    at: Instant,
    session: Session,
    rx: mpsc::Receiver<Arc<Message>>,
    joined: Vec<Joined>,
    recover: bool,
    _total: TotalPermit,
    _subject: Option<SubjectPermit>,
}

struct Shared {
    gw: Arc<Gateway>,
    aliases: AliasTable,
    /// Sessions authenticated by the middleware, taken by the connect handler.
    /// Both run in one socketioxide connect future, so an entry outlives it only
    /// when the CONNECT packet could not be sent; `PENDING_TTL` sweeps those.
    /// Bounded by `max_connections`: every entry holds a `TotalPermit` (no entry is
    /// made without one, so the overflow policy is the CONNECT refusal `overloaded`).
    pending: Mutex<HashMap<Sid, Pending>>,
}

/// A refused handshake. socketioxide's CONNECT_ERROR carries only `{message}`,
/// so the code leads the message: `"token_expired: token has expired"`.
#[derive(Debug)]
struct Refused {
    code: &'static str,
    message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

/// The CONNECT packet's auth object; unknown fields are ignored (clients add their own).
#[derive(Debug, Default, serde::Deserialize)]
struct HandshakeAuth {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    since: Option<String>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Sid, Pending>> {
        // Entries are inserted or removed whole; a panic elsewhere cannot leave one half-made.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connect middleware: token, origin and limits, then the session and its
    /// auto-joins — before CONNECT is acknowledged, so a client that saw `connect`
    /// misses no event published after it.
    async fn authenticate(&self, s: &SocketRef, auth: Option<Value>) -> Result<(), Refused> {
        let gw = &self.gw;
        if gw.stop.is_cancelled() {
            return Err(refused("shutting_down", "server is shutting down"));
        }
        let parts = s.req_parts();
        if !gw.origin_allowed(&parts.headers) {
            self.count_error("origin_not_allowed");
            return Err(refused(
                "origin_not_allowed",
                "origin is not in server.allowed_origins",
            ));
        }
        let auth: HandshakeAuth = auth
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let token = match auth.token.filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(t),
            None => crate::auth::token_from_headers(
                &parts.headers,
                gw.allow_query_token,
                parts.uri.query(),
            )
            .token
            .map(|(_, t)| t.expose().to_owned()),
        };
        let principal = match token {
            Some(t) => gw.verifier.verify(&t, SystemTime::now()),
            None => Err(AuthError::Missing),
        }
        .map_err(|e| {
            e.record(&gw.metrics);
            refused(e.code(), e.to_string())
        })?;
        let slot = parts.extensions.get::<HandshakeSlot>();
        let from_handshake = slot.and_then(HandshakeSlot::take_total);
        let reused = from_handshake.is_some();
        let (total, held_subject) = match from_handshake {
            Some(held) => held,
            // A refusal leaves the session counted where it was until the deadline closes it.
            None => (
                gw.limits
                    .acquire_total(gw.cfg.max_connections.get())
                    .ok_or_else(|| refused("overloaded", "too many connections"))?,
                None,
            ),
        };
        // CONNECT's `auth.token` may name another subject than the handshake's.
        let held_subject =
            held_subject.filter(|p| Some(p.subject()) == principal.subject.as_deref());
        let subject = match principal.subject.as_deref() {
            Some(sub) => {
                match held_subject.or_else(|| {
                    gw.limits
                        .acquire_subject(sub, gw.cfg.max_connections_per_subject.get())
                }) {
                    Some(p) => Some(p),
                    None => {
                        if let (true, Some(slot)) = (reused, slot) {
                            slot.put_back(Admission::Authenticated {
                                total,
                                subject: None,
                            });
                        }
                        return Err(refused(
                            "too_many_connections",
                            "too many connections for this subject",
                        ));
                    }
                }
            }
            None => None,
        };
        // Authenticated and counted in `max_connections`: out of the anonymous pool.
        if let Some(slot) = slot {
            slot.release();
        }
        let since = auth
            .since
            .filter(|s| valid_event_id(s))
            .map(|s| gw.since(&s));
        let (mailbox, rx) = gw.hub.mailbox();
        let mut session = Session::new(gw.clone(), mailbox, principal);
        let joined = session.join_auto(since.as_ref()).await;
        let pending = Pending {
            at: Instant::now(),
            session,
            rx,
            joined,
            recover: since.is_some(),
            _total: total,
            _subject: subject,
        };
        let mut map = self.pending();
        map.retain(|_, p| p.at.elapsed() < PENDING_TTL);
        map.insert(s.id, pending);
        Ok(())
    }

    /// The connect handler: registers the client events and starts the session loop.
    fn connected(self: &Arc<Self>, s: SocketRef) {
        let Some(p) = self.pending().remove(&s.id) else {
            // The middleware always leaves an entry; without one there is nothing to serve.
            let _ = s.disconnect();
            return;
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let gone = CancellationToken::new();
        let abuse = CancellationToken::new();
        register_events(&s, cmd_tx, &self.gw, abuse.clone());
        {
            let gone = gone.clone();
            s.on_disconnect(move |_: DisconnectReason| {
                gone.cancel();
                async {}
            });
        }
        let conn = Conn {
            shared: self.clone(),
            socket: s.clone(),
            gone,
            abuse,
        };
        let span = tracing::info_span!("sio", sid = %s.id, transport = ?s.transport_type());
        self.gw.tracker.spawn(conn.run(p, cmd_rx).instrument(span));
    }

    fn count_error(&self, reason: &'static str) {
        self.gw
            .metrics
            .client_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// A `since` as a client may send it: non-empty and bounded (same rule as `/ws?since=`);
/// whether it opens is `Gateway::since`'s call.
fn valid_event_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= crate::idcodec::MAX_WIRE_LEN
}

/// A client request, parsed by the event handler and executed by the loop.
enum Cmd {
    Join {
        room: String,
        since: Option<String>,
        ack: AckSender,
    },
    Leave {
        room: String,
        ack: AckSender,
    },
}

/// The legacy join/leave events: name, room kind, the id field of their payload, join or leave.
const ROOM_EVENTS: [(&str, RoomKind, &str, bool); 8] = [
    ("join-order-room", RoomKind::Order, "orderId", true),
    ("leave-order-room", RoomKind::Order, "orderId", false),
    ("join-user-room", RoomKind::Customer, "userId", true),
    ("leave-user-room", RoomKind::Customer, "userId", false),
    ("join-store-room", RoomKind::Store, "storeId", true),
    ("leave-store-room", RoomKind::Store, "storeId", false),
    ("join-storefront", RoomKind::Storefront, "storeId", true),
    ("leave-storefront", RoomKind::Storefront, "storeId", false),
];

/// Registers the client events on `s`: one fallback handler that dispatches on the
/// event name. socketioxide keeps a `HashMap` of boxed handlers per socket, so one
/// registration per name cost about 1 KiB per connection for these eleven names.
fn register_events(
    s: &SocketRef,
    cmd_tx: mpsc::Sender<Box<Cmd>>,
    gw: &Arc<Gateway>,
    abuse: CancellationToken,
) {
    let gw = gw.clone();
    // Every inbound event counts, answered here or forwarded: `ping` and unknown
    // names are cheap to send and cost a reply each, so they must not bypass the limit.
    let rate = Arc::new(Mutex::new(RateWindow::new(
        u32::try_from(gw.cfg.max_messages_per_second.get()).unwrap_or(u32::MAX),
    )));
    s.on_fallback(
        move |s: SocketRef, Event(event): Event, TryData(arg): TryData<Value>, ack: AckSender| {
            let (tx, gw, rate, abuse) = (cmd_tx.clone(), gw.clone(), rate.clone(), abuse.clone());
            async move {
                let verdict = {
                    let mut w = rate.lock().unwrap_or_else(|e| e.into_inner());
                    if w.allow() {
                        None
                    } else {
                        Some((w.abusive(), w.first_refusal()))
                    }
                };
                match verdict {
                    None => on_event(&s, &tx, &gw, &event, arg.ok(), ack),
                    // Far over the limit: the loop disconnects with `rate_limited`, as `/ws` closes with 4002.
                    Some((true, _)) => abuse.cancel(),
                    // Over the limit: one `error` per window, then dropped silently (as on `/ws`).
                    Some((false, first)) => {
                        count(&gw, "rate_limited");
                        if first {
                            let msg = "too many messages per second; message dropped";
                            reply_error(&s, ack, "rate_limited", msg, None);
                        }
                    }
                }
            }
        },
    );
}

/// One client event: the legacy join/leave names, `subscribe`/`unsubscribe`, `ping`;
/// anything else is refused as `unknown_event`.
fn on_event(
    s: &SocketRef,
    tx: &mpsc::Sender<Box<Cmd>>,
    gw: &Gateway,
    event: &str,
    arg: Option<Value>,
    ack: AckSender,
) {
    let arg = arg.unwrap_or(Value::Null);
    match event {
        "subscribe" | "unsubscribe" => {
            let Some(room) = arg.get("room").and_then(Value::as_str) else {
                count(gw, "bad_request");
                return reply_error(s, ack, "bad_request", "expected {\"room\": …}", None);
            };
            let room = room.to_owned();
            let cmd = if event == "subscribe" {
                let since = arg.get("since").and_then(Value::as_str).map(str::to_owned);
                Cmd::Join { room, since, ack }
            } else {
                Cmd::Leave { room, ack }
            };
            forward(s, tx, gw, cmd);
        }
        // Answered here, not by the loop: a health check must not queue behind joins.
        "ping" => {
            let pong = json!({ "ts": now_ms() });
            let _ = s.emit("pong", &pong);
            let _ = ack.send(&pong);
        }
        _ => {
            let Some(&(_, kind, field, join)) = ROOM_EVENTS.iter().find(|e| e.0 == event) else {
                count(gw, "unknown_event");
                let msg = format!("unknown event {:?}", truncate(event, 64));
                return reply_error(s, ack, "unknown_event", &msg, None);
            };
            let Some(id) = legacy_id(&arg, field) else {
                count(gw, "bad_request");
                let msg = format!("expected {{\"{field}\": <id>}} or the id itself");
                return reply_error(s, ack, "bad_request", &msg, None);
            };
            let room = format!("{}:{}", kind.as_str(), id);
            let cmd = if join {
                let since = arg.get("since").and_then(Value::as_str).map(str::to_owned);
                Cmd::Join { room, since, ack }
            } else {
                Cmd::Leave { room, ack }
            };
            forward(s, tx, gw, cmd);
        }
    }
}

/// The id a legacy event names: the payload itself (string or number) or its `field`.
fn legacy_id(arg: &Value, field: &str) -> Option<String> {
    let v = match arg {
        Value::Object(o) => o.get(field)?,
        v => v,
    };
    match v {
        Value::String(s) if !s.is_empty() => Some(normalize_id(s)),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn forward(s: &SocketRef, tx: &mpsc::Sender<Box<Cmd>>, gw: &Gateway, cmd: Cmd) {
    match tx.try_send(Box::new(cmd)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(cmd)) => {
            count(gw, "rate_limited");
            let ack = match *cmd {
                Cmd::Join { ack, .. } | Cmd::Leave { ack, .. } => ack,
            };
            reply_error(s, ack, "rate_limited", "too many requests in flight", None);
        }
        // The loop has ended: the socket is being disconnected.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

fn count(gw: &Gateway, reason: &'static str) {
    gw.metrics
        .client_errors
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// A refusal: an `error` event `{message, code, room?}`, and the same (with `ok:false`) as the ack when one was asked.
fn reply_error(s: &SocketRef, ack: AckSender, code: &str, message: &str, room: Option<&str>) {
    let mut body = json!({ "message": message, "code": code });
    if let Some(r) = room {
        body["room"] = Value::from(r);
    }
    let _ = s.emit("error", &body);
    body["ok"] = Value::Bool(false);
    let _ = ack.send(&body);
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Aliases indexed by canonical event name.
struct AliasTable(HashMap<String, Vec<Alias>>);

impl AliasTable {
    fn new(aliases: &[Alias]) -> Self {
        let mut m: HashMap<String, Vec<Alias>> = HashMap::new();
        for a in aliases {
            m.entry(a.event.clone()).or_default().push(a.clone());
        }
        Self(m)
    }

    /// Every name `event` goes out under in a room of `kind`: canonical first, then matching aliases.
    fn names<'a>(
        &'a self,
        event: &'a str,
        kind: RoomKind,
        status: Option<&'a str>,
    ) -> impl Iterator<Item = &'a str> {
        let aliases = self.0.get(event).map(Vec::as_slice).unwrap_or_default();
        std::iter::once(event).chain(
            aliases
                .iter()
                .filter(move |a| {
                    a.rooms.contains(&kind)
                        && a.statuses
                            .as_ref()
                            .is_none_or(|st| status.is_some_and(|s| st.iter().any(|x| x == s)))
                })
                .map(|a| a.name.as_str())
                // An alias equal to the canonical name (listed "for clarity") is not sent twice.
                .filter(move |n| *n != event),
        )
    }
}

/// The arguments of an event packet: `(data, id)`; the id last, as Socket.IO's
/// recovery offsets are. `data` is written as the raw bytes the hub serialized.
struct EventArgs<'a> {
    data: &'a RawValue,
    id: &'a str,
}

impl Serialize for EventArgs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(self.data)?;
        t.serialize_element(self.id)?;
        t.end()
    }
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The client disconnected or the transport died.
    Gone,
    /// Server shutdown: the shutdown task closes the transport.
    Shutdown,
    /// The hub cut the session off: its mailbox was full (the hub counted it).
    Kicked,
    /// The client's socketioxide buffer was full.
    BufferFull,
    /// The token expired.
    TokenExpired,
    /// The client kept exceeding its message rate.
    RateLimited,
}

struct Conn {
    shared: Arc<Shared>,
    socket: SocketRef,
    gone: CancellationToken,
    /// Fired by the event handler when the client floods far past its rate.
    abuse: CancellationToken,
}

/// An emit the client's buffer could not take.
struct Full;

impl Conn {
    async fn run(self, p: Pending, mut cmd_rx: mpsc::Receiver<Box<Cmd>>) {
        let gw = self.shared.gw.clone();
        let wire = WireLabels {
            wire: Wire::SocketIo,
        };
        gw.metrics.connections.get_or_create(&wire).inc();
        let Pending {
            mut session,
            mut rx,
            joined,
            recover,
            _total,
            _subject,
            ..
        } = p;
        let exit = self
            .serve(&mut session, &mut rx, &mut cmd_rx, joined, recover)
            .await;
        gw.metrics.connections.get_or_create(&wire).dec();
        // Leave the rooms first: nothing more is queued for a client on its way out.
        drop(session);
        drop(rx);
        tracing::info!(reason = ?exit, "closing");
        match exit {
            Exit::Gone | Exit::Shutdown => {}
            Exit::Kicked => self.disconnect(&gw).await,
            Exit::BufferFull => {
                gw.metrics.slow_consumer_disconnects.inc();
                self.disconnect(&gw).await;
            }
            Exit::TokenExpired => {
                let _ = self.socket.emit(
                    "error",
                    &json!({"code": "token_expired", "message": "token has expired; reconnect with a fresh one"}),
                );
                self.disconnect(&gw).await;
            }
            Exit::RateLimited => {
                let _ = self.socket.emit(
                    "error",
                    &json!({"code": "rate_limited", "message": "too many messages per second"}),
                );
                self.disconnect(&gw).await;
            }
        }
    }

    async fn serve(
        &self,
        session: &mut Session,
        rx: &mut mpsc::Receiver<Arc<Message>>,
        cmd_rx: &mut mpsc::Receiver<Box<Cmd>>,
        joined: Vec<Joined>,
        recover: bool,
    ) -> Exit {
        let gw = self.shared.gw.clone();
        let kicked = session.mailbox().kicked().clone();
        // The last position this client was told (or event id it was sent): see `tell_position`.
        let mut told = joined.first().and_then(|j| j.position.clone());
        if self.greet(session, joined, recover).is_err() {
            return Exit::BufferFull;
        }
        // Made once, as on `/ws`: per turn they would cost a timer-wheel insert and
        // removal and three waiter-list locks per delivery. The principal never changes
        // on this endpoint (no in-band refresh), so neither does the expiry. One timer
        // serves the expiry and the position tick (Engine.IO pings on its own).
        let stopping = gw.stop.cancelled();
        let going = self.gone.cancelled();
        let kicking = kicked.cancelled();
        let flooding = self.abuse.cancelled();
        let tick_every = gw.cfg.ping_interval;
        let now = tokio::time::Instant::now();
        let expires = now + expiry_in(session.principal(), gw.verifier.leeway());
        let mut next_tick = now + tick_every;
        // Whether an event was emitted since the last tick: only an idle client is told
        // the position.
        let mut delivered = false;
        let timer = tokio::time::sleep_until(next_tick.min(expires));
        tokio::pin!(stopping, going, kicking, flooding, timer);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopping => return Exit::Shutdown,
                _ = &mut going => return Exit::Gone,
                _ = &mut kicking => return Exit::Kicked,
                _ = &mut flooding => return Exit::RateLimited,
                _ = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= expires {
                        // Counted apart from refused tokens, as on `/ws`.
                        gw.metrics
                            .auth_failures
                            .get_or_create(&ReasonLabels { reason: "expired_in_session" })
                            .inc();
                        return Exit::TokenExpired;
                    }
                    if now >= next_tick {
                        next_tick = now + tick_every;
                        if !std::mem::take(&mut delivered) && self.tell_position(rx, &mut told).is_err() {
                            return Exit::BufferFull;
                        }
                    }
                    timer.as_mut().reset(next_tick.min(expires));
                }
                cmd = cmd_rx.recv() => {
                    let Some(cmd) = cmd else { return Exit::Gone };
                    // Boxed: a join (authorization, replay) is the largest future the loop
                    // awaits; inline, it sized every idle session's task (256 B more).
                    if Box::pin(self.handle(session, *cmd)).await.is_err() {
                        return Exit::BufferFull;
                    }
                }
                msg = rx.recv() => {
                    let mut next = msg;
                    if next.is_none() {
                        return Exit::Gone;
                    }
                    let mut n = 0;
                    // The last event emitted (kept whole: its id is cloned once per batch).
                    let mut last: Option<Arc<Message>> = None;
                    while let Some(m) = next.take() {
                        // A refused message may have cost the room (ownership moved):
                        // the notice goes out in its place, before anything later.
                        let accepted = session.accept(&m);
                        let sent = if accepted {
                            self.emit_message(&m)
                        } else {
                            self.emit_lost(session)
                        };
                        if sent.is_err() {
                            return Exit::BufferFull;
                        }
                        if accepted && m.id.is_some() {
                            last = Some(m);
                        }
                        n += 1;
                        if n < EMIT_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    if let Some(m) = last {
                        told = m.id.clone();
                        delivered = true;
                    }
                }
            }
        }
    }

    /// Emits `position` `{position}` to an idle client, as `/ws` sends its `position`
    /// message (see `ws.rs`): the position is read first and emitted only when the
    /// mailbox is empty after that, so every event of this session's rooms up to it has
    /// already been emitted; nothing when the client was last told the same.
    fn tell_position(
        &self,
        rx: &mpsc::Receiver<Arc<Message>>,
        told: &mut Option<EventId>,
    ) -> Result<(), Full> {
        let Some(p) = self.shared.gw.hub.position() else {
            return Ok(());
        };
        if !rx.is_empty() || told.as_ref() == Some(&p) {
            return Ok(());
        }
        self.emit_raw("position", &json!({"position": self.shared.gw.wire_id(&p)}))?;
        *told = Some(p);
        Ok(())
    }

    /// `welcome`, then the auto-joins' replays when the client asked to recover. Not
    /// async: what it builds is freed on return, not kept in the loop's future for the
    /// connection's life.
    fn greet(&self, session: &mut Session, joined: Vec<Joined>, recover: bool) -> Result<(), Full> {
        let rooms: Vec<&str> = session.rooms().map(|r| r.as_str()).collect();
        // The `since` to use before any event has arrived (see `Joined::position`).
        let position = joined.first().and_then(|j| j.position.as_ref());
        let welcome = json!({
            "session": session.mailbox().id(),
            "subject": session.principal().subject,
            "rooms": rooms,
            "position": position.map(|p| self.shared.gw.wire_id(p)),
        });
        self.emit_raw("welcome", &welcome)?;
        if recover {
            for j in joined {
                self.send_joined(session, j)?;
            }
        }
        Ok(())
    }

    async fn handle(&self, session: &mut Session, cmd: Cmd) -> Result<(), Full> {
        match cmd {
            Cmd::Join { room, since, ack } => {
                let since = since.filter(|s| valid_event_id(s));
                match session.join(&room, since.as_deref()).await {
                    Ok(j) => {
                        let _ = ack.send(&json!({
                            "ok": true,
                            "room": j.room.as_str(),
                            "recovered": j.recovered,
                            "position": j.position.as_ref().map(|p| self.shared.gw.wire_id(p)),
                        }));
                        self.send_joined(session, j)
                    }
                    Err(e) => {
                        reply_error(&self.socket, ack, e.code, &e.message, Some(&room));
                        Ok(())
                    }
                }
            }
            Cmd::Leave { room, ack } => {
                if session.leave(&room) {
                    let _ = ack.send(&json!({ "ok": true, "room": room }));
                } else {
                    reply_error(
                        &self.socket,
                        ack,
                        "not_subscribed",
                        "not subscribed to this room",
                        Some(&room),
                    );
                }
                Ok(())
            }
        }
    }

    /// A join's resync notice or replay, before any live message of that room.
    fn send_joined(&self, session: &mut Session, j: Joined) -> Result<(), Full> {
        if j.resync {
            self.emit_raw(
                "resync",
                &json!({"room": j.room.as_str(), "reason": "history_unavailable"}),
            )?;
        }
        for m in j.replay {
            if session.accept_replayed(&m) {
                self.emit_message(&m)?;
            }
        }
        Ok(())
    }

    /// Tells the client about order rooms it lost to an ownership change.
    fn emit_lost(&self, session: &mut Session) -> Result<(), Full> {
        for room in session.take_lost() {
            self.emit_raw(
                "unsubscribed",
                &json!({"room": room.as_str(), "reason": "ownership_changed"}),
            )?;
        }
        Ok(())
    }

    /// Emits one hub message under its canonical name and every matching alias.
    fn emit_message(&self, m: &Message) -> Result<(), Full> {
        let gw = &self.shared.gw;
        match &m.body {
            Body::Event {
                name,
                ts_ms,
                data,
                status,
            } => {
                let id = m.wire_id.as_deref().unwrap_or("");
                let args = EventArgs { data, id };
                for event in self
                    .shared
                    .aliases
                    .names(name, m.room.kind(), status.as_deref())
                {
                    self.emit_raw(event, &args)?;
                }
                observe_latency(gw, *ts_ms);
            }
            Body::Resync { reason } => {
                self.emit_raw(
                    "resync",
                    &json!({"room": m.room.as_str(), "reason": &**reason}),
                )?;
            }
        }
        gw.metrics.delivered(Wire::SocketIo);
        Ok(())
    }

    /// `emit`, mapping a full buffer to [`Full`]; a closed socket is left to `gone`.
    fn emit_raw<T: ?Sized + Serialize>(&self, event: &str, data: &T) -> Result<(), Full> {
        match self.socket.emit(event, data) {
            Ok(()) => Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => Err(Full),
            Err(e) => {
                tracing::debug!(error = %e, "emit failed");
                Ok(())
            }
        }
    }

    /// Sends DISCONNECT, retrying while the buffer is full. A client that never
    /// drains it is closed by Engine.IO's heartbeat (`ping_interval + pong_timeout`).
    async fn disconnect(&self, gw: &Gateway) {
        let deadline = tokio::time::sleep(gw.cfg.write_timeout);
        tokio::pin!(deadline);
        loop {
            match self.socket.clone().disconnect() {
                Err(SocketError::InternalChannelFull) => {}
                Ok(()) | Err(_) => return,
            }
            tokio::select! {
                _ = self.gone.cancelled() => return,
                _ = gw.stop.cancelled() => return,
                _ = &mut deadline => return,
                _ = tokio::time::sleep(DISCONNECT_RETRY) => {}
            }
        }
    }
}

/// Ensures a `Room` string for tests and callers that build rooms from legacy events.
#[cfg(test)]
fn legacy_room(kind: RoomKind, arg: &Value, field: &str) -> Option<Room> {
    Room::new(kind, &legacy_id(arg, field)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(event: &str, name: &str, rooms: &[RoomKind], statuses: Option<&[&str]>) -> Alias {
        Alias {
            event: event.into(),
            name: name.into(),
            rooms: rooms.to_vec(),
            statuses: statuses.map(|s| s.iter().map(|x| x.to_string()).collect()),
        }
    }

    #[test]
    fn detach_keeps_what_is_read_and_drops_what_is_not() {
        let req = axum::http::Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket&token=t")
            .header("origin", "https://shop.example")
            .header("authorization", "Bearer abc")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", "changecast.v1")
            .header("content-type", "text/plain")
            .header("cookie", "session=".to_owned() + &"x".repeat(2000))
            .header("user-agent", "Mozilla/5.0")
            .header("accept-language", "en")
            .header("sec-ch-ua", "\"Chromium\"")
            .header("sec-fetch-mode", "websocket")
            .body(axum::body::Body::empty())
            .expect("request");
        let out = detach(req);
        let names: Vec<&str> = out.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "origin",
                "authorization",
                "sec-websocket-key",
                "sec-websocket-protocol",
                "content-type"
            ]
        );
        assert_eq!(out.headers()["authorization"], "Bearer abc");
        assert_eq!(out.uri().query(), Some("EIO=4&transport=websocket&token=t"));
    }

    #[test]
    fn aliases_follow_room_kind_and_status() {
        let t = AliasTable::new(&[
            alias(
                "order:status_changed",
                "orderStatusUpdated",
                &[RoomKind::Store, RoomKind::Customer],
                None,
            ),
            alias(
                "order:status_changed",
                "customer_order_update",
                &[RoomKind::Customer],
                None,
            ),
            alias(
                "order:status_changed",
                "delivery_update",
                &[RoomKind::Customer, RoomKind::Order],
                Some(&["in_transit", "delivered"]),
            ),
            alias(
                "settings:updated",
                "settings:updated",
                &[RoomKind::Store],
                None,
            ),
        ]);
        let names = |e, k, s| t.names(e, k, s).collect::<Vec<_>>();
        assert_eq!(
            names(
                "order:status_changed",
                RoomKind::Customer,
                Some("processing")
            ),
            [
                "order:status_changed",
                "orderStatusUpdated",
                "customer_order_update"
            ]
        );
        assert_eq!(
            names(
                "order:status_changed",
                RoomKind::Customer,
                Some("in_transit")
            ),
            [
                "order:status_changed",
                "orderStatusUpdated",
                "customer_order_update",
                "delivery_update"
            ]
        );
        assert_eq!(
            names("order:status_changed", RoomKind::Store, Some("in_transit")),
            ["order:status_changed", "orderStatusUpdated"]
        );
        assert_eq!(
            names("order:status_changed", RoomKind::Order, None),
            ["order:status_changed"]
        );
        assert_eq!(
            names("settings:updated", RoomKind::Store, None),
            ["settings:updated"]
        );
        assert_eq!(
            names("payment:created", RoomKind::Admin, None),
            ["payment:created"]
        );
    }

    #[test]
    fn legacy_payloads_name_rooms() {
        let order = |v: Value| legacy_room(RoomKind::Order, &v, "orderId");
        assert_eq!(
            order(json!({"orderId": "65F0A1B2C3D4E5F601234567"}))
                .unwrap()
                .as_str(),
            "order:65f0a1b2c3d4e5f601234567"
        );
        assert_eq!(order(json!("abc")).unwrap().as_str(), "order:abc");
        assert_eq!(order(json!(42)).unwrap().as_str(), "order:42");
        assert!(order(json!({"orderId": "a/b"})).is_none());
        assert!(order(json!({"id": "x"})).is_none());
        assert!(order(json!(null)).is_none());
        assert!(order(json!([1])).is_none());
    }

    #[test]
    fn refusals_put_the_code_first() {
        let r = refused("token_expired", "token has expired");
        assert_eq!(r.to_string(), "token_expired: token has expired");
    }
}
