//! The Socket.IO endpoint at `/socket.io/`: Socket.IO v5 packets over our Engine.IO (`eio.rs`), handshake auth, client events and legacy event names over the shared session core and loop (`session.rs`, `driver.rs`).
//!
//! One connection is one task: the Engine.IO session, then, after CONNECT, one
//! [`Session`] (the same rooms, rules, recovery and limits as `/ws`) driven by the
//! same loop as `/ws`. Only the default namespace is served; binary packets are refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::driver::{self, Conn, Dialect, Exit, Flow, In, Link, Rate, WriteError};
use super::eio::{self, EioError, Packet, PollLink, Polls, Transport};
use super::limits::{RateWindow, SubjectPermit, TotalPermit, UnauthPermit, UnauthRefused};
use super::protocol::close;
use super::session::{Joined, Session};
use super::Gateway;
use crate::auth::{normalize_id, AuthError};
use crate::config::Alias;
use crate::hub::{Body, Frames, Message, WireFormat};
use crate::metrics::{ReasonLabels, Wire, WireLabels};
#[cfg(test)]
use crate::room::Room;
use crate::room::RoomKind;

/// The longest namespace a packet may name (ours is `/`; others are refused by name).
const MAX_NAMESPACE: usize = 128;

/// The largest ack id socket.io-client makes (a JavaScript safe integer).
const MAX_ACK_ID: u64 = (1 << 53) - 1;

/// What every Socket.IO connection shares.
pub(crate) struct Shared {
    gw: Arc<Gateway>,
    aliases: AliasTable,
    polls: Arc<Polls>,
    params: eio::Params,
}

/// The `/socket.io/` routes (both transports, GET and POST), CORS around them.
pub(crate) fn router(gw: Arc<Gateway>) -> Router {
    let params = eio::Params {
        ping_interval: gw.cfg.ping_interval,
        ping_timeout: gw.cfg.pong_timeout,
        max_payload: gw.cfg.max_message_bytes.get(),
    };
    let shared = Arc::new(Shared {
        aliases: AliasTable::new(&gw.sio.aliases),
        polls: Arc::default(),
        params,
        gw: gw.clone(),
    });
    Router::new()
        .route("/socket.io/", any(endpoint))
        .route("/socket.io", any(endpoint))
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(gw, cors))
}

/// CORS for the long-polling transport, which a browser dashboard on another origin
/// reaches with XHR (WebSockets need none). The origin must pass
/// `server.allowed_origins` (any origin when it is empty), and is echoed rather than
/// `*` because socket.io-client may send credentials.
async fn cors(
    State(gw): State<Arc<Gateway>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::{header, HeaderValue};
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .cloned()
        .filter(|_| gw.origin_allowed(req.headers()));
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = if origin.is_some() && preflight {
        StatusCode::NO_CONTENT.into_response()
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

/// Every `/socket.io/` request: a handshake (GET without `sid`, either transport), a
/// long-polling GET or POST, or a WebSocket taking a long-polling session over.
async fn endpoint(
    State(shared): State<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    body: axum::body::Body,
) -> Response {
    let gw = &shared.gw;
    let q = match eio::parse_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => {
            count(gw, "bad_request");
            return e.response();
        }
    };
    let max = gw.cfg.max_message_bytes.get();
    if let Some(sid) = q.sid {
        let Some(poll) = shared.polls.get(sid) else {
            return EioError::UnknownSid.response();
        };
        return match (q.transport, method) {
            (Transport::Polling, Method::GET) => {
                let wait = gw.cfg.ping_interval + gw.cfg.pong_timeout;
                poll.get(&shared.polls, wait).await
            }
            (Transport::Polling, Method::POST) => poll.post(body, max, gw.cfg.write_timeout).await,
            (Transport::WebSocket, Method::GET) => {
                let Ok(ws) = ws else {
                    return EioError::BadRequest.response();
                };
                if !poll.start_probe() {
                    return EioError::BadRequest.response();
                }
                let (tracker, deadline) = (gw.tracker.clone(), gw.cfg.pong_timeout);
                let failed = poll.clone();
                driver::websocket(ws, max)
                    .on_failed_upgrade(move |_| failed.end_probe())
                    .on_upgrade(move |socket| tracker.track_future(poll.probe(socket, deadline)))
            }
            _ => EioError::BadRequest.response(),
        };
    }
    if method != Method::GET {
        return EioError::BadHandshakeMethod.response();
    }
    if gw.stop.is_cancelled() {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server is shutting down",
        );
    }
    let ws = match (q.transport, ws) {
        (Transport::WebSocket, Ok(ws)) => Some(ws),
        (Transport::WebSocket, Err(_)) => return EioError::BadRequest.response(),
        (Transport::Polling, _) => None,
    };
    let handshake = match admit(gw, &headers, query.as_deref(), peer) {
        Ok(h) => h,
        Err(why) => {
            let status = match why {
                UnauthRefused::Total => StatusCode::SERVICE_UNAVAILABLE,
                UnauthRefused::PerIp => StatusCode::TOO_MANY_REQUESTS,
            };
            return refusal(status, why.code(), why.message());
        }
    };
    let shared = shared.clone();
    match ws {
        None => {
            let (link, sid) = PollLink::open(&shared.polls);
            let open = eio::open(&sid, true, &shared.params);
            let span = tracing::info_span!("sio", peer = %peer, transport = "polling");
            let tracker = shared.gw.tracker.clone();
            tracker.spawn(run(shared, Link::Poll(link), handshake, None).instrument(span));
            eio::open_response(open)
        }
        Some(ws) => {
            let open = eio::open(&eio::new_sid(), false, &shared.params);
            let tracker = shared.gw.tracker.clone();
            driver::websocket(ws, max).on_upgrade(move |socket| {
                let span = tracing::info_span!("sio", peer = %peer, transport = "websocket");
                tracker.track_future(
                    run(shared, Link::Ws(socket), handshake, Some(open)).instrument(span),
                )
            })
        }
    }
}

/// `{"error","message"}` with `status`, as `/ws` refusals are.
fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "message": message})),
    )
        .into_response()
}

/// What an Engine.IO session counts against until its Socket.IO CONNECT succeeds.
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

/// What the handshake request leaves for CONNECT; dropped once it succeeds.
struct Handshake {
    /// `None` while CONNECT holds its slots (and after it succeeded: the anonymous
    /// slot is freed, the session counts in `max_connections`).
    admission: Option<Admission>,
    origin_ok: bool,
    /// The token of the handshake's `Authorization` (or `?token=`), CONNECT's fallback.
    token: Option<String>,
}

/// Counts a request that opens an Engine.IO session against the unauthenticated pool,
/// or, when it carries a valid token, against `max_connections` and its subject.
fn admit(
    gw: &Gateway,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: SocketAddr,
) -> Result<Handshake, UnauthRefused> {
    let token = crate::auth::token_from_headers(headers, gw.allow_query_token, query)
        .token
        .map(|(_, t)| t.expose().to_owned());
    let origin_ok = gw.origin_allowed(headers);
    // A bad or missing token is not refused here: CONNECT's `auth.token` comes first
    // and is checked there. Over `max_connections` or its subject's cap, the token
    // holder is anonymous here and is refused at CONNECT.
    let principal = token
        .as_deref()
        .and_then(|t| gw.verifier.verify(t, SystemTime::now()).ok());
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
            return Ok(Handshake {
                admission: Some(Admission::Authenticated { total, subject }),
                origin_ok,
                token,
            });
        }
    }
    let permit = gw
        .limits
        .acquire_unauth(
            Some(peer.ip()),
            gw.cfg.max_unauthenticated.get(),
            gw.cfg.max_unauthenticated_per_ip,
        )
        .inspect_err(|why| count(gw, why.code()))?;
    Ok(Handshake {
        admission: Some(Admission::Anonymous { _permit: permit }),
        origin_ok,
        token,
    })
}

/// A refused CONNECT: `44{"message":"<code>: <text>","data":{"code"}}`.
#[derive(Debug)]
struct Refused {
    code: &'static str,
    message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
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

/// A successful CONNECT.
struct Connected {
    session: Session,
    rx: mpsc::Receiver<Message>,
    joined: Vec<Joined>,
    recover: bool,
    permits: (TotalPermit, Option<SubjectPermit>),
}

/// The Socket.IO dialect of the shared loop.
struct Sio {
    shared: Arc<Shared>,
    rate: RateWindow,
}

impl Sio {
    /// A hub message's frames: one per event name (the event's own, then its aliases).
    /// Cached in the message for every Socket.IO recipient: the alias table is the
    /// process's one `[socketio]` configuration.
    fn encode(&self, m: &Message) -> Frames {
        match m.body() {
            Body::Event { name, data, .. } => {
                let tail = encode_tail(m);
                self.shared
                    .aliases
                    .names(name, m.room().kind(), data.status().map(|s| &**s))
                    .map(|n| event_frame(n, &tail))
                    .collect()
            }
            Body::Resync { reason } => smallvec::smallvec![event(
                "resync",
                &json!({"room": m.room().as_str(), "reason": &**reason}),
            )],
        }
    }
}

/// One connection from its Engine.IO open packet to its close.
async fn run(shared: Arc<Shared>, link: Link, handshake: Handshake, open: Option<String>) {
    let gw = shared.gw.clone();
    let rate = driver::rate_window(&gw);
    let mut conn = Conn {
        gw: gw.clone(),
        link,
        kicked: CancellationToken::new(),
        dialect: Sio { shared, rate },
    };
    if let Some(open) = open {
        if conn.send_text(open).await.is_err() {
            return;
        }
    }
    // Boxed: what waiting for CONNECT holds is freed once it is done.
    let (connected, next_ping) = match Box::pin(conn.await_connect(handshake)).await {
        Ok(c) => c,
        Err(exit) => return conn.finish(exit, false).await,
    };
    let Connected {
        mut session,
        mut rx,
        joined,
        recover,
        permits,
    } = connected;
    conn.kicked = session.mailbox().kicked().clone();
    let wire = WireLabels {
        wire: Wire::SocketIo,
    };
    gw.metrics.connections.get_or_create(&wire).inc();
    // The last position this client was told (or event id it was sent): see `tell_position`.
    let told = joined.first().and_then(|j| j.position.clone());
    let exit = match Box::pin(conn.greet(&mut session, joined, recover)).await {
        Ok(()) => conn.drive(&mut session, &mut rx, told, next_ping).await,
        Err(e) => conn.write_failed(e),
    };
    gw.metrics.connections.get_or_create(&wire).dec();
    // Leave the rooms first: nothing more is queued for a client on its way out.
    drop(session);
    drop(rx);
    drop(permits);
    conn.finish(exit, true).await;
}

impl Conn<Sio> {
    /// The Engine.IO session before CONNECT: pings, and CONNECT within `server.auth_deadline`
    /// (a refused CONNECT does not stop that clock). Returns when the next ping is due,
    /// for the connected loop to go on from.
    async fn await_connect(
        &mut self,
        mut hs: Handshake,
    ) -> Result<(Connected, tokio::time::Instant), Option<Exit>> {
        let gw = self.gw.clone();
        let deadline = tokio::time::sleep(gw.cfg.auth_deadline);
        let ping = tokio::time::sleep(gw.cfg.ping_interval);
        tokio::pin!(deadline, ping);
        let mut awaiting_pong: Option<Instant> = None;
        loop {
            let frame = tokio::select! {
                biased;
                _ = gw.stop.cancelled() => return Err(Some(Exit(close::GOING_AWAY, "shutting_down"))),
                _ = &mut deadline => return Err(Some(Exit(close::AUTH_TIMEOUT, "auth_timeout"))),
                _ = &mut ping => {
                    if awaiting_pong.is_some_and(|at| at.elapsed() >= gw.cfg.pong_timeout) {
                        return Err(Some(Exit(close::PING_TIMEOUT, "ping_timeout")));
                    }
                    awaiting_pong.get_or_insert_with(Instant::now);
                    self.send_text("2").await.map_err(|e| self.write_failed(e))?;
                    ping.as_mut().reset(tokio::time::Instant::now() + gw.cfg.ping_interval);
                    continue;
                }
                i = self.link.recv() => i,
            };
            let text = match frame {
                In::Closed => return Err(None),
                In::Refused(exit) => return Err(Some(exit)),
                In::Pong => continue,
                In::Resend(frames) => {
                    for f in frames {
                        self.feed(WsMessage::Text(f))
                            .await
                            .map_err(|e| self.write_failed(e))?;
                    }
                    self.flush().await.map_err(|e| self.write_failed(e))?;
                    continue;
                }
                In::Binary => {
                    self.count_error("binary_not_supported");
                    self.count_frame()?;
                    continue;
                }
                In::Text(t) => t,
            };
            let packet = match eio::parse(&text) {
                Ok(p) => p,
                Err(_) => {
                    self.count_error("bad_request");
                    return Err(Some(Exit(close::PROTOCOL_ERROR, "bad_packet")));
                }
            };
            let data = match packet {
                Packet::Pong(_) => {
                    awaiting_pong = None;
                    continue;
                }
                Packet::Close => return Err(None),
                Packet::Noop => {
                    self.count_frame()?;
                    continue;
                }
                Packet::Binary => {
                    self.count_error("binary_not_supported");
                    self.count_frame()?;
                    continue;
                }
                Packet::Ping(_) | Packet::Upgrade => {
                    self.count_error("bad_request");
                    return Err(Some(Exit(close::PROTOCOL_ERROR, "bad_packet")));
                }
                Packet::Message(m) => m,
            };
            // The rate limit holds before CONNECT too: an anonymous peer must not get
            // unlimited parsing for the whole deadline.
            match driver::rate(&self.gw, &mut self.dialect.rate) {
                Rate::Allowed => {}
                Rate::Refused { .. } => continue,
                Rate::Abusive => return Err(Some(Exit(close::RATE_LIMITED, "rate_limited"))),
            }
            let reply = match parse_packet(data) {
                Ok(p) if p.kind == Kind::Connect && p.nsp == "/" => {
                    match self.authenticate(&mut hs, p.data).await {
                        Ok(c) => return Ok((c, ping.deadline())),
                        Err(r) => {
                            json!({"message": r.to_string(), "data": {"code": r.code}}).to_string()
                        }
                    }
                }
                Ok(p) if p.kind == Kind::Connect => {
                    self.count_error("bad_namespace");
                    format!("{},{}", p.nsp, json!({"message": "Invalid namespace"}))
                }
                Ok(_) | Err(_) => {
                    // Nothing but CONNECT has a namespace to go to yet.
                    self.count_error("unauthenticated");
                    continue;
                }
            };
            self.send_text(format!("44{reply}"))
                .await
                .map_err(|e| self.write_failed(e))?;
        }
    }

    /// CONNECT's token (else the handshake's), origin and limits, then the session and
    /// its auto-joins, before CONNECT is acknowledged: a client that saw `connect`
    /// misses no event published after it.
    async fn authenticate(&mut self, hs: &mut Handshake, auth: &str) -> Result<Connected, Refused> {
        let gw = self.gw.clone();
        if gw.stop.is_cancelled() {
            return Err(refused("shutting_down", "server is shutting down"));
        }
        if !hs.origin_ok {
            self.count_error("origin_not_allowed");
            return Err(refused(
                "origin_not_allowed",
                "origin is not in server.allowed_origins",
            ));
        }
        let auth: HandshakeAuth = serde_json::from_str(auth).unwrap_or_default();
        let token = auth
            .token
            .filter(|t| !t.trim().is_empty())
            .or_else(|| hs.token.clone());
        let principal = match token {
            Some(t) => gw.verifier.verify(&t, SystemTime::now()),
            None => Err(AuthError::Missing),
        }
        .map_err(|e| {
            e.record(&gw.metrics);
            refused(e.code(), e.to_string())
        })?;
        let (total, held_subject) = match hs.admission.take() {
            Some(Admission::Authenticated { total, subject }) => (total, subject),
            anonymous => {
                hs.admission = anonymous;
                // A refusal leaves the session counted where it was until the deadline closes it.
                let total = gw
                    .limits
                    .acquire_total(gw.cfg.max_connections.get())
                    .ok_or_else(|| refused("overloaded", "too many connections"))?;
                (total, None)
            }
        };
        let reused = hs.admission.is_none();
        // CONNECT's `auth.token` may name another subject than the handshake's.
        let held_subject =
            held_subject.filter(|p| Some(p.subject()) == principal.subject.as_deref());
        let subject = match principal.subject.as_deref() {
            Some(sub) => match held_subject.or_else(|| {
                gw.limits
                    .acquire_subject(sub, gw.cfg.max_connections_per_subject.get())
            }) {
                Some(p) => Some(p),
                None => {
                    if reused {
                        hs.admission = Some(Admission::Authenticated {
                            total,
                            subject: None,
                        });
                    }
                    return Err(refused(
                        "too_many_connections",
                        "too many connections for this subject",
                    ));
                }
            },
            None => None,
        };
        let since = auth
            .since
            .filter(|s| valid_event_id(s))
            .map(|s| gw.since(&s));
        let (mailbox, rx) = gw.hub.mailbox();
        let mut session = Session::new(gw.clone(), mailbox, principal);
        let joined = session.join_auto(since.as_ref()).await;
        Ok(Connected {
            session,
            rx,
            joined,
            recover: since.is_some(),
            permits: (total, subject),
        })
    }

    /// CONNECT's answer `40{sid}`, `welcome`, then the auto-joins' replays when the
    /// client asked to recover.
    async fn greet(
        &mut self,
        session: &mut Session,
        joined: Vec<Joined>,
        recover: bool,
    ) -> Result<(), WriteError> {
        let connect = format!("40{}", json!({"sid": eio::new_sid()}));
        self.feed(WsMessage::Text(connect.into())).await?;
        let rooms: Vec<&str> = session.rooms().map(|r| r.as_str()).collect();
        // The `since` to use before any event has arrived (see `Joined::position`).
        let position = joined.first().and_then(|j| j.position.as_ref());
        let welcome = json!({
            "session": session.mailbox().id(),
            "subject": session.principal().subject,
            "rooms": rooms,
            "position": position.map(|p| self.gw.wire_id(p)),
        });
        self.feed(WsMessage::Text(event("welcome", &welcome)))
            .await?;
        if recover {
            for j in joined {
                self.replay(session, j).await?;
            }
        }
        self.flush().await
    }

    /// Tells the peer why, and closes the transport. A disconnect the client must not
    /// retry blindly (slow consumer, expired token, flood) is a Socket.IO DISCONNECT
    /// (`io server disconnect`), after an `error` event saying why; shutdown and transport
    /// failures just close the transport, so clients reconnect (to another replica).
    /// Before CONNECT there is no Socket.IO session to disconnect: the transport closes.
    async fn finish(&mut self, exit: Option<Exit>, connected: bool) {
        tracing::info!(reason = exit.map(|e| e.1), "closing");
        let say: Option<Value> = match exit {
            Some(Exit(close::TOKEN_EXPIRED, _)) => Some(
                json!({"code": "token_expired", "message": "token has expired; reconnect with a fresh one"}),
            ),
            Some(Exit(close::RATE_LIMITED, _)) => {
                Some(json!({"code": "rate_limited", "message": "too many messages per second"}))
            }
            Some(Exit(close::SLOW_CONSUMER, _)) => Some(
                json!({"code": "slow_consumer", "message": "too far behind; reconnect with since"}),
            ),
            _ => None,
        };
        let disconnect = connected
            && matches!(
                exit,
                Some(Exit(
                    close::TOKEN_EXPIRED | close::RATE_LIMITED | close::SLOW_CONSUMER,
                    _
                ))
            );
        if disconnect {
            // A fresh deadline: the write that failed may have been cut by the kick.
            self.kicked = CancellationToken::new();
            if matches!(exit, Some(Exit(close::SLOW_CONSUMER, _))) {
                // Over long-polling its backlog is what filled the queue: the last
                // frames go in its place, and are all that lingers for it.
                self.link.shed();
            }
            // A write that times out here is not retried: a stalled peer costs one
            // `write_timeout` before its transport is closed, not one per frame.
            let said = match say {
                Some(body) => self.feed(WsMessage::Text(event("error", &body))).await,
                None => Ok(()),
            };
            if said.is_ok() {
                let _ = self.send_text("41").await;
            }
        }
        let timeout = self.gw.cfg.write_timeout;
        self.link.close(exit, timeout).await;
    }

    /// Answers one Socket.IO packet.
    async fn socket_io(&mut self, session: &mut Session, text: &str) -> Result<(), Option<Exit>> {
        let parsed = parse_packet(text);
        // Malformed packets count too: each costs a reply.
        match driver::rate(&self.gw, &mut self.dialect.rate) {
            Rate::Allowed => {}
            Rate::Refused { first } => {
                if first {
                    let ack = parsed.as_ref().ok().and_then(|p| p.ack);
                    let msg = "too many messages per second; message dropped";
                    self.reply_error(ack, "rate_limited", msg, None).await;
                }
                return Ok(());
            }
            Rate::Abusive => return Err(Some(Exit(close::RATE_LIMITED, "rate_limited"))),
        }
        let p = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.reply_error(None, e.code(), &e.to_string(), None).await;
                return Ok(());
            }
        };
        if p.nsp != "/" {
            if p.kind == Kind::Connect {
                self.count_error("bad_namespace");
                let reply = format!("44{},{}", p.nsp, json!({"message": "Invalid namespace"}));
                self.send_text(reply)
                    .await
                    .map_err(|e| self.write_failed(e))?;
            } else if p.kind != Kind::Disconnect {
                let msg = format!("namespace {:?} is not connected", truncate(p.nsp, 64));
                self.reply_error(p.ack, "bad_request", &msg, None).await;
            }
            return Ok(());
        }
        match p.kind {
            Kind::Disconnect => Err(None),
            Kind::Event => {
                let (name, arg) = match event_args(p.data) {
                    Ok(a) => a,
                    Err(e) => {
                        self.reply_error(p.ack, e.code(), &e.to_string(), None)
                            .await;
                        return Ok(());
                    }
                };
                self.on_event(session, &name, arg, p.ack).await
            }
            Kind::Connect => {
                self.reply_error(p.ack, "bad_request", "already connected", None)
                    .await;
                Ok(())
            }
            Kind::Ack | Kind::ConnectError => {
                let msg = "the server asks for no acks and sends CONNECT_ERROR only itself";
                self.reply_error(None, "bad_request", msg, None).await;
                Ok(())
            }
        }
    }

    /// One client event: the legacy join/leave names, `subscribe`/`unsubscribe`, `ping`;
    /// anything else is refused as `unknown_event`.
    async fn on_event(
        &mut self,
        session: &mut Session,
        event_name: &str,
        arg: Value,
        ack: Option<u64>,
    ) -> Result<(), Option<Exit>> {
        let (room, since, join) = match event_name {
            "subscribe" | "unsubscribe" => {
                let Some(room) = arg.get("room").and_then(Value::as_str) else {
                    self.reply_error(ack, "bad_request", "expected {\"room\": …}", None)
                        .await;
                    return Ok(());
                };
                let since = arg.get("since").and_then(Value::as_str).map(str::to_owned);
                (room.to_owned(), since, event_name == "subscribe")
            }
            "ping" => {
                let pong = json!({ "ts": now_ms() });
                let r = async {
                    self.feed(WsMessage::Text(event("pong", &pong))).await?;
                    if let Some(id) = ack {
                        self.feed(WsMessage::Text(ack_frame(id, &pong))).await?;
                    }
                    self.flush().await
                };
                return r.await.map_err(|e| self.write_failed(e));
            }
            _ => {
                let Some(&(_, kind, field, join)) = ROOM_EVENTS.iter().find(|e| e.0 == event_name)
                else {
                    let msg = format!("unknown event {:?}", truncate(event_name, 64));
                    self.reply_error(ack, "unknown_event", &msg, None).await;
                    return Ok(());
                };
                let Some(id) = legacy_id(&arg, field) else {
                    let msg = format!("expected {{\"{field}\": <id>}} or the id itself");
                    self.reply_error(ack, "bad_request", &msg, None).await;
                    return Ok(());
                };
                let since = arg.get("since").and_then(Value::as_str).map(str::to_owned);
                (format!("{}:{}", kind.as_str(), id), since, join)
            }
        };
        if !join {
            if session.leave(&room) {
                if let Some(id) = ack {
                    let r = self
                        .send_text(ack_frame(id, &json!({ "ok": true, "room": room })))
                        .await;
                    r.map_err(|e| self.write_failed(e))?;
                }
            } else {
                let msg = "not subscribed to this room";
                self.reply_error(ack, "not_subscribed", msg, Some(&room))
                    .await;
            }
            return Ok(());
        }
        let since = since.filter(|s| valid_event_id(s));
        match session.join(&room, since.as_deref()).await {
            Ok(j) => {
                let r = async {
                    if let Some(id) = ack {
                        let body = json!({
                            "ok": true,
                            "room": j.room.as_str(),
                            "recovered": j.recovered,
                            "position": j.position.as_ref().map(|p| self.gw.wire_id(p)),
                        });
                        self.feed(WsMessage::Text(ack_frame(id, &body))).await?;
                    }
                    self.replay(session, j).await
                };
                r.await.map_err(|e| self.write_failed(e))
            }
            Err(e) => {
                self.reply_error(ack, e.code, &e.message, Some(&room)).await;
                Ok(())
            }
        }
    }

    /// A refusal: an `error` event `{message, code, room?}`, and the same (with `ok:false`)
    /// as the ack when one was asked; counted in `client_errors` unless it is a join's
    /// (those count in `subscriptions_refused`). A write that fails here shows at the
    /// loop's next write.
    async fn reply_error(
        &mut self,
        ack: Option<u64>,
        code: &str,
        message: &str,
        room: Option<&str>,
    ) {
        if let Some(reason) = COUNTED.iter().find(|c| **c == code) {
            self.count_error(reason);
        }
        let mut body = json!({ "message": message, "code": code });
        if let Some(r) = room {
            body["room"] = Value::from(r);
        }
        let _ = self.feed(WsMessage::Text(event("error", &body))).await;
        if let Some(id) = ack {
            body["ok"] = Value::Bool(false);
            let _ = self.feed(WsMessage::Text(ack_frame(id, &body))).await;
        }
        let _ = self.flush().await;
    }
}

/// Refusal codes counted in `client_errors` by [`Conn::reply_error`] (`rate_limited`
/// is counted where the rate is checked).
const COUNTED: [&str; 3] = ["bad_request", "unknown_event", "binary_not_supported"];

impl Dialect for Sio {
    const WIRE: Wire = Wire::SocketIo;

    fn ping(&self) -> WsMessage {
        WsMessage::Text(Utf8Bytes::from_static("2"))
    }

    fn frames<'a>(&'a self, m: &'a Message) -> impl Iterator<Item = Utf8Bytes> + Send + 'a {
        // The names depend on the message and the server's alias table only, so every
        // Socket.IO recipient of a message sends the same frames: made once.
        m.encoded(WireFormat::SocketIo, |m| self.encode(m))
            .iter()
            .cloned()
    }

    fn lost(&self, room: &str) -> Utf8Bytes {
        event(
            "unsubscribed",
            &json!({"room": room, "reason": "ownership_changed"}),
        )
    }

    fn resync(&self, room: &str) -> Utf8Bytes {
        event(
            "resync",
            &json!({"room": room, "reason": "history_unavailable"}),
        )
    }

    fn position(&self, wire: &str) -> Utf8Bytes {
        event("position", &json!({ "position": wire }))
    }

    async fn handle(
        conn: &mut Conn<Self>,
        session: &mut Session,
        frame: Option<Utf8Bytes>,
    ) -> Result<Flow, Option<Exit>> {
        let Some(text) = frame else {
            conn.binary_refused().await?;
            return Ok(Flow::Continue);
        };
        let packet = match eio::parse(&text) {
            Ok(p) => p,
            Err(_) => {
                conn.count_error("bad_request");
                return Err(Some(Exit(close::PROTOCOL_ERROR, "bad_packet")));
            }
        };
        match packet {
            Packet::Pong(_) => Ok(Flow::Pong),
            Packet::Close => Err(None),
            Packet::Noop => {
                // Cheap, but not free: a stream of noops counts like any message.
                conn.count_frame()?;
                Ok(Flow::Continue)
            }
            Packet::Binary => {
                conn.binary_refused().await?;
                Ok(Flow::Continue)
            }
            // A v4 client never pings, and upgrades only on a probing socket.
            Packet::Ping(_) | Packet::Upgrade => {
                conn.count_error("bad_request");
                Err(Some(Exit(close::PROTOCOL_ERROR, "bad_packet")))
            }
            Packet::Message(m) => conn.socket_io(session, m).await.map(|()| Flow::Continue),
        }
    }
}

impl Conn<Sio> {
    /// A binary frame or packet: refused with an `error` event (attachments that follow
    /// a binary packet are refused the same way, each counting against the rate).
    async fn binary_refused(&mut self) -> Result<(), Option<Exit>> {
        match driver::rate(&self.gw, &mut self.dialect.rate) {
            Rate::Allowed => {
                let msg = "binary packets are not supported; send JSON";
                self.reply_error(None, "binary_not_supported", msg, None)
                    .await;
                Ok(())
            }
            Rate::Refused { .. } => Ok(()),
            Rate::Abusive => Err(Some(Exit(close::RATE_LIMITED, "rate_limited"))),
        }
    }

    /// Counts a frame that needs no answer (a noop, or anything before CONNECT) against
    /// the rate limit: every frame costs a wake-up, so each one counts, as on `/ws`.
    fn count_frame(&mut self) -> Result<(), Option<Exit>> {
        match driver::rate(&self.gw, &mut self.dialect.rate) {
            Rate::Abusive => Err(Some(Exit(close::RATE_LIMITED, "rate_limited"))),
            Rate::Allowed | Rate::Refused { .. } => Ok(()),
        }
    }
}

/// `42["name",<data>]`.
fn event(name: &str, data: &Value) -> Utf8Bytes {
    format!("42{}", json!([name, data])).into()
}

/// `43<id>[<data>]`.
fn ack_frame(id: u64, data: &Value) -> Utf8Bytes {
    format!("43{id}{}", json!([data])).into()
}

/// The part of an event's frame after its name, `,<data>,"<id>"]`: written once per
/// message and spliced into the frame of each of its names. The id goes last, as Socket.IO's
/// recovery offsets do; `data` is the payload's JSON text.
fn encode_tail(m: &Message) -> String {
    let data = match m.body() {
        Body::Event { data, .. } => data.as_str(),
        Body::Resync { .. } => "null",
    };
    let id = m.wire_id();
    let mut s = String::with_capacity(data.len() + id.len() + 8);
    s.push(',');
    s.push_str(data);
    s.push(',');
    crate::payload::write_str(&mut s, id);
    s.push(']');
    s
}

/// `42["<name>"` + tail.
fn event_frame(name: &str, tail: &str) -> Utf8Bytes {
    let mut s = String::with_capacity(5 + name.len() + tail.len());
    s.push_str("42[");
    crate::payload::write_str(&mut s, name);
    s.push_str(tail);
    s.into()
}

/// Socket.IO v5 packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
}

/// A Socket.IO packet: `<type>[<namespace>,][<ack id>][<JSON>]`.
#[derive(Debug, PartialEq, Eq)]
struct SioPacket<'a> {
    kind: Kind,
    nsp: &'a str,
    ack: Option<u64>,
    data: &'a str,
}

/// Why a Socket.IO packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum SioError {
    #[error("not a socket.io packet")]
    BadType,
    #[error("malformed or overlong namespace")]
    BadNamespace,
    #[error("ack id is not an integer below 2^53")]
    BadAckId,
    #[error("an event is a JSON array starting with its name")]
    BadEvent,
    #[error("binary packets are not supported; send JSON")]
    Binary,
}

impl SioError {
    fn code(self) -> &'static str {
        match self {
            SioError::Binary => "binary_not_supported",
            _ => "bad_request",
        }
    }
}

/// Parses a Socket.IO packet's header; the JSON is read by whoever needs it.
fn parse_packet(s: &str) -> Result<SioPacket<'_>, SioError> {
    let kind = match s.as_bytes().first() {
        Some(b'0') => Kind::Connect,
        Some(b'1') => Kind::Disconnect,
        Some(b'2') => Kind::Event,
        Some(b'3') => Kind::Ack,
        Some(b'4') => Kind::ConnectError,
        Some(b'5' | b'6') => return Err(SioError::Binary),
        _ => return Err(SioError::BadType),
    };
    let mut rest = &s[1..];
    let nsp = if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        let nsp = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        if nsp.len() > MAX_NAMESPACE || nsp.chars().any(|c| c.is_control() || c == '"') {
            return Err(SioError::BadNamespace);
        }
        nsp
    } else {
        "/"
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack = if digits == 0 {
        None
    } else {
        let id: u64 = rest[..digits].parse().map_err(|_| SioError::BadAckId)?;
        if id > MAX_ACK_ID {
            return Err(SioError::BadAckId);
        }
        rest = &rest[digits..];
        Some(id)
    };
    if kind == Kind::Ack && ack.is_none() {
        return Err(SioError::BadAckId);
    }
    Ok(SioPacket {
        kind,
        nsp,
        ack,
        data: rest,
    })
}

/// An EVENT's name and first argument (`null` when none).
fn event_args(data: &str) -> Result<(String, Value), SioError> {
    let v: Vec<Value> = serde_json::from_str(data).map_err(|_| SioError::BadEvent)?;
    let mut args = v.into_iter();
    let Some(Value::String(name)) = args.next() else {
        return Err(SioError::BadEvent);
    };
    Ok((name, args.next().unwrap_or(Value::Null)))
}

/// A `since` as a client may send it: non-empty and bounded (same rule as `/ws?since=`);
/// whether it opens is `Gateway::since`'s call.
fn valid_event_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= crate::idcodec::MAX_WIRE_LEN
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

fn count(gw: &Gateway, reason: &'static str) {
    gw.metrics
        .client_errors
        .get_or_create(&ReasonLabels { reason })
        .inc();
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
    ) -> impl Iterator<Item = &'a str> + Send + 'a {
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

    fn packet<'a>(kind: Kind, nsp: &'a str, ack: Option<u64>, data: &'a str) -> SioPacket<'a> {
        SioPacket {
            kind,
            nsp,
            ack,
            data,
        }
    }

    #[test]
    fn parses_socket_io_packets() {
        assert_eq!(parse_packet("0"), Ok(packet(Kind::Connect, "/", None, "")));
        assert_eq!(
            parse_packet("0{\"token\":\"t\"}"),
            Ok(packet(Kind::Connect, "/", None, "{\"token\":\"t\"}"))
        );
        assert_eq!(
            parse_packet("0/admin,{}"),
            Ok(packet(Kind::Connect, "/admin", None, "{}"))
        );
        assert_eq!(
            parse_packet("1/admin"),
            Ok(packet(Kind::Disconnect, "/admin", None, ""))
        );
        assert_eq!(
            parse_packet("212[\"ping\"]"),
            Ok(packet(Kind::Event, "/", Some(12), "[\"ping\"]"))
        );
        assert_eq!(
            parse_packet("2/x,7[\"a\"]"),
            Ok(packet(Kind::Event, "/x", Some(7), "[\"a\"]"))
        );
        assert_eq!(
            parse_packet("33[]"),
            Ok(packet(Kind::Ack, "/", Some(3), "[]"))
        );
    }

    #[test]
    fn refuses_malformed_packets_with_codes() {
        let cases = [
            ("", SioError::BadType),
            ("9", SioError::BadType),
            ("x[]", SioError::BadType),
            (
                "51-[\"a\",{\"_placeholder\":true,\"num\":0}]",
                SioError::Binary,
            ),
            ("61-0[{\"_placeholder\":true,\"num\":0}]", SioError::Binary),
            ("299999999999999999999[\"a\"]", SioError::BadAckId),
            ("29007199254740992[\"a\"]", SioError::BadAckId),
            ("3[]", SioError::BadAckId),
            ("2/a\"b,[\"a\"]", SioError::BadNamespace),
        ];
        for (text, want) in cases {
            assert_eq!(parse_packet(text), Err(want), "{text}");
        }
        let long = format!("2/{},[\"a\"]", "n".repeat(MAX_NAMESPACE));
        assert_eq!(parse_packet(&long), Err(SioError::BadNamespace));
        assert_eq!(SioError::Binary.code(), "binary_not_supported");
        assert_eq!(SioError::BadAckId.code(), "bad_request");
        // The largest safe ack id is fine.
        assert!(parse_packet("29007199254740991[\"a\"]").is_ok());
    }

    #[test]
    fn event_args_need_a_name_first() {
        assert_eq!(
            event_args("[\"join-order-room\",{\"orderId\":\"o1\"}]"),
            Ok(("join-order-room".into(), json!({"orderId": "o1"})))
        );
        assert_eq!(event_args("[\"ping\"]"), Ok(("ping".into(), Value::Null)));
        for bad in ["", "[]", "[1]", "{}", "[\"a\"", "null", "\"a\""] {
            assert_eq!(event_args(bad), Err(SioError::BadEvent), "{bad}");
        }
    }

    #[test]
    fn frames_put_the_name_first_and_the_id_last() {
        let tail = ",{\"a\":1},\"ID\"]";
        assert_eq!(
            event_frame("orderStatusUpdated", tail).as_str(),
            "42[\"orderStatusUpdated\",{\"a\":1},\"ID\"]"
        );
        assert_eq!(
            event_frame("we\"ird", tail).as_str(),
            "42[\"we\\\"ird\",{\"a\":1},\"ID\"]"
        );
        assert_eq!(
            ack_frame(4, &json!({"ok": true})).as_str(),
            "434[{\"ok\":true}]"
        );
        assert_eq!(
            event("pong", &json!({"ts": 1})).as_str(),
            "42[\"pong\",{\"ts\":1}]"
        );
    }

    proptest::proptest! {
        #[test]
        fn packet_parsing_never_panics(s in ".{0,200}") {
            if let Ok(p) = parse_packet(&s) {
                let _ = event_args(p.data);
            }
            let _ = eio::parse(&s);
        }
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
