//! The native `/ws` endpoint: upgrade checks, in-band auth, and the native dialect of the shared loop (`driver.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::driver::{self, Conn, Dialect, Exit, Flow, In, Link, Rate, WriteError};
use super::limits::{RateWindow, SubjectPermit, TotalPermit, UnauthPermit, UnauthRefused};
use super::protocol::{self, close, ClientMsg};
use super::session::{Joined, Session};
use super::Gateway;
use crate::auth::{AuthError, Principal};
use crate::event::EventId;
use crate::hub::{Message, WireFormat};
use crate::metrics::{ReasonLabels, Wire, WireLabels};

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
    let mut ws = driver::websocket(ws, gw.cfg.max_message_bytes.get());
    if let Some(p) = found.subprotocol {
        ws.set_selected_protocol(HeaderValue::from_static(p));
    }
    let tracker = gw.tracker.clone();
    ws.on_upgrade(move |socket| {
        let span = tracing::info_span!("ws", peer = %peer);
        tracker.track_future(
            async move {
                let native = Native {
                    rate: driver::rate_window(&gw),
                    total,
                    unauth,
                    subject_permit,
                };
                let conn = Conn {
                    gw,
                    link: Link::Ws(socket),
                    kicked: CancellationToken::new(),
                    dialect: native,
                };
                run(conn, principal, since).await;
            }
            .instrument(span),
        )
    })
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

/// The native dialect, and what a `/ws` connection holds besides its session.
struct Native {
    /// `server.max_messages_per_second`, before authentication too.
    rate: RateWindow,
    /// The slot in `max_connections`; taken once the socket has authenticated.
    total: Option<TotalPermit>,
    /// The slot in the unauthenticated pool, until the socket authenticates. Boxed:
    /// inline it would add its ~32 bytes to every session's task for its whole life
    /// (see `serve` on task size classes); boxed, an authenticated session keeps 8.
    unauth: Option<Box<UnauthPermit>>,
    subject_permit: Option<SubjectPermit>,
}

async fn run(mut conn: Conn<Native>, principal: Option<Principal>, since: Option<EventId>) {
    let wire = WireLabels { wire: Wire::Native };
    conn.gw.metrics.connections.get_or_create(&wire).inc();
    let exit = serve(&mut conn, principal, since).await;
    conn.gw.metrics.connections.get_or_create(&wire).dec();
    if let Some(Exit(code, reason)) = exit {
        tracing::info!(code, reason, "closing");
    }
    let timeout = conn.gw.cfg.write_timeout;
    conn.link.close(exit, timeout).await;
}

/// Waits for `{"type":"auth"}` within the deadline.
async fn authenticate(
    conn: &mut Conn<Native>,
) -> Result<(Principal, Option<EventId>), Option<Exit>> {
    let deadline = tokio::time::sleep(conn.gw.cfg.auth_deadline);
    tokio::pin!(deadline);
    let stop = conn.gw.stop.clone();
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => return Err(Some(Exit(close::AUTH_TIMEOUT, "auth_timeout"))),
            _ = stop.cancelled() => return Err(Some(Exit(close::GOING_AWAY, "shutting_down"))),
            m = conn.link.recv() => m,
        };
        let text = match msg {
            In::Closed => return Err(None),
            In::Refused(exit) => return Err(Some(exit)),
            In::Pong | In::Resend(_) => continue,
            In::Text(t) => Some(t),
            In::Binary => None,
        };
        // The rate limit holds before authentication too: an anonymous peer must not
        // get unlimited parsing for the whole deadline.
        let reply = match limited(conn)? {
            Some(refusal) => refusal,
            None => match text.as_deref().map(protocol::parse) {
                None => binary_refusal(),
                Some(Ok(ClientMsg::Auth { token, since })) => {
                    match conn.gw.verifier.verify(&token, SystemTime::now()) {
                        Ok(p) => return Ok((p, since.map(|s| conn.gw.since(&s)))),
                        Err(e) => {
                            count_auth_failure(&conn.gw, &e);
                            let _ = conn
                                .send_text(protocol::error(e.code(), &e.to_string(), None))
                                .await;
                            return Err(Some(Exit(close::AUTH_FAILED, "auth_failed")));
                        }
                    }
                }
                Some(Ok(ClientMsg::Ping)) => protocol::pong().to_owned(),
                Some(Ok(_)) => protocol::error(
                    "unauthenticated",
                    "send {\"type\":\"auth\",\"token\":…} first",
                    None,
                ),
                Some(Err(e)) => protocol::error(e.code(), &e.to_string(), None),
            },
        };
        if reply.is_empty() {
            continue;
        }
        conn.send_text(reply).await.map_err(|_| None)?;
    }
}

/// The rate limit for one client message: `Ok(None)` within it, `Ok(Some(reply))` over
/// it (the refusal once per window, then `""`: dropped unanswered), `Err` far over it.
fn limited(conn: &mut Conn<Native>) -> Result<Option<String>, Option<Exit>> {
    match driver::rate(&conn.gw, &mut conn.dialect.rate) {
        Rate::Allowed => Ok(None),
        Rate::Abusive => Err(Some(Exit(close::RATE_LIMITED, "rate_limited"))),
        Rate::Refused { first: true } => Ok(Some(protocol::error(
            "rate_limited",
            "too many messages per second; message dropped",
            None,
        ))),
        Rate::Refused { first: false } => Ok(Some(String::new())),
    }
}

fn binary_refusal() -> String {
    protocol::error("binary_not_supported", "send JSON text frames", None)
}

async fn serve(
    conn: &mut Conn<Native>,
    principal: Option<Principal>,
    since: Option<EventId>,
) -> Option<Exit> {
    let (principal, since) = match principal {
        Some(p) => (p, since),
        // The futures awaited once per connection are boxed (in-band auth here, then
        // the auto-joins and their replay, and `handle` in the loop): inline, they sized
        // every session's task for its whole life, and a task just over 4 KiB takes
        // mimalloc's 5 KiB size class (measured: 1 KiB more per idle connection).
        None => match Box::pin(authenticate(conn)).await {
            Ok((p, s)) => (p, s.or(since)),
            Err(exit) => return exit,
        },
    };
    let gw = conn.gw.clone();
    if conn.dialect.total.is_none() {
        match gw.limits.acquire_total(gw.cfg.max_connections.get()) {
            Some(t) => conn.dialect.total = Some(t),
            None => return Some(Exit(close::OVERLOADED, "overloaded")),
        }
    }
    // Authenticated: out of the anonymous pool.
    conn.dialect.unauth = None;
    if conn.dialect.subject_permit.is_none() {
        if let Some(sub) = principal.subject.as_deref() {
            match gw
                .limits
                .acquire_subject(sub, gw.cfg.max_connections_per_subject.get())
            {
                Some(p) => conn.dialect.subject_permit = Some(p),
                None => return Some(Exit(close::OVERLOADED, "too_many_connections")),
            }
        }
    }
    let (mailbox, mut rx) = gw.hub.mailbox();
    conn.kicked = mailbox.kicked().clone();
    let mut session = Session::new(gw.clone(), mailbox, principal);
    tracing::debug!(session = session.mailbox().id(), "authenticated");

    let joined = Box::pin(session.join_auto(since.as_ref())).await;
    // Auto rooms are joined in turn, so the first position is at or before every other.
    // Kept as the last position this client was told (see the position tick).
    let told = joined.first().and_then(|j| j.position.clone());
    if let Err(e) = Box::pin(greet(conn, &mut session, joined, since.is_some())).await {
        return conn.write_failed(e);
    }
    let first_ping = tokio::time::Instant::now() + gw.cfg.ping_interval;
    conn.drive(&mut session, &mut rx, told, first_ping).await
}

/// `welcome`, then the auto-joins' replays when the client asked to recover.
async fn greet(
    conn: &mut Conn<Native>,
    session: &mut Session,
    joined: Vec<Joined>,
    recover: bool,
) -> Result<(), WriteError> {
    let rooms: Vec<String> = session.rooms().map(|r| r.to_string()).collect();
    let position = joined
        .first()
        .and_then(|j| j.position.as_ref())
        .map(|p| conn.gw.wire_id(p));
    let welcome = protocol::welcome(
        session.mailbox().id(),
        &rooms,
        session.principal().subject.as_deref(),
        position.as_deref(),
    );
    conn.send_text(welcome).await?;
    if recover {
        for j in joined {
            conn.replay(session, j).await?;
        }
    }
    Ok(())
}

impl Dialect for Native {
    const WIRE: Wire = Wire::Native;

    fn ping(&self) -> WsMessage {
        WsMessage::Ping(bytes::Bytes::new())
    }

    fn frames<'a>(&'a self, m: &'a Message) -> impl Iterator<Item = Utf8Bytes> + Send + 'a {
        m.encoded(WireFormat::Native, |m| {
            smallvec::smallvec![protocol::encode_message(m).into()]
        })
        .iter()
        .cloned()
    }

    fn lost(&self, room: &str) -> Utf8Bytes {
        protocol::unsubscribed_because(room, "ownership_changed").into()
    }

    fn resync(&self, room: &str) -> Utf8Bytes {
        protocol::resync(room, "history_unavailable").into()
    }

    fn position(&self, wire: &str) -> Utf8Bytes {
        protocol::position(wire).into()
    }

    async fn handle(
        conn: &mut Conn<Self>,
        session: &mut Session,
        frame: Option<Utf8Bytes>,
    ) -> Result<Flow, Option<Exit>> {
        if let Some(refusal) = limited(conn)? {
            if !refusal.is_empty() {
                conn.send_text(refusal)
                    .await
                    .map_err(|e| conn.write_failed(e))?;
            }
            return Ok(Flow::Continue);
        }
        let Some(text) = frame else {
            conn.count_error("binary_not_supported");
            conn.send_text(binary_refusal())
                .await
                .map_err(|e| conn.write_failed(e))?;
            return Ok(Flow::Continue);
        };
        let mut flow = Flow::Continue;
        let reply = match protocol::parse(&text) {
            Err(e) => {
                conn.count_error(e.code());
                protocol::error(e.code(), &e.to_string(), None)
            }
            Ok(ClientMsg::Ping) => protocol::pong().to_owned(),
            Ok(ClientMsg::Auth { token, .. }) => {
                flow = Flow::Refreshed;
                match conn.gw.verifier.verify(&token, SystemTime::now()) {
                    Ok(p) => match session.refresh(p).await {
                        Ok(left) => {
                            let left: Vec<&str> = left.iter().map(|r| r.as_str()).collect();
                            serde_json::json!({"type": "authenticated", "left": left}).to_string()
                        }
                        Err(e) => protocol::error(e.code, &e.message, None),
                    },
                    Err(e) => {
                        count_auth_failure(&conn.gw, &e);
                        protocol::error(e.code(), &e.to_string(), None)
                    }
                }
            }
            Ok(ClientMsg::Subscribe { room, since }) => {
                match session.join(&room, since.as_deref()).await {
                    Ok(j) => {
                        let position = j.position.as_ref().map(|p| conn.gw.wire_id(p));
                        let ack =
                            protocol::subscribed(j.room.as_str(), j.recovered, position.as_deref());
                        let r = async {
                            conn.feed(WsMessage::Text(ack.into())).await?;
                            conn.replay(session, j).await
                        };
                        r.await.map_err(|e| conn.write_failed(e))?;
                        return Ok(flow);
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
        conn.send_text(reply)
            .await
            .map_err(|e| conn.write_failed(e))?;
        Ok(flow)
    }
}
