//! Engine.IO v4, what Socket.IO v5 rides on: the packet codec, the handshake and its error answers, and the long-polling transport with its upgrade to WebSocket; knows nothing of Socket.IO, sessions or the hub.
//!
//! A WebSocket transport is the connection's own socket ([`Link::Ws`]). A long-polling
//! session is a [`PollLink`] owned by the connection task plus a [`Poll`] shared with the
//! HTTP requests that carry it (GET drains the outbound queue, POST hands a payload
//! to the task), found by `sid` in [`Polls`] until it closes or upgrades.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::driver::{Exit, In, Link, WriteError};
use super::protocol::close;

/// The record separator between packets of one long-polling payload.
const SEPARATOR: char = '\x1e';

/// Bytes a long-polling session may hold for its next GET, each frame counted with
/// [`POLL_FRAME_OVERHEAD`]. The long-polling counterpart of a WebSocket's write
/// timeout: a client that stops polling while events arrive fills it. Bounded by bytes,
/// not frames: an event goes out once per alias name (1–4 frames), and a replay of a
/// few hundred events between two polls is not a slow consumer. Overflow policy: the
/// frame is refused and the session closed as a slow consumer (counted); its backlog is
/// then dropped for the closing frames ([`PollLink::shed`]). One frame larger than the
/// bound is still taken into an empty queue.
const POLL_BUFFER_BYTES: usize = 1 << 20;

/// What a queued frame costs beyond its text (its slot in the queue), so that many
/// tiny frames cannot hold more memory than the byte bound says.
const POLL_FRAME_OVERHEAD: usize = std::mem::size_of::<Utf8Bytes>();

/// The most one GET's body carries: whole frames up to this many bytes (at least one
/// frame), the rest left for the next GET, which Engine.IO clients send at once. A
/// response has no write deadline; this bounds what a client that stops reading one holds.
const POLL_RESPONSE_BYTES: usize = 64 * 1024;

/// POST payloads handed to a long-polling session's task and not yet read. Clients
/// send one at a time (socket.io-client waits for each POST's answer). Overflow policy:
/// the POST is answered 400 `Bad request` and its packets dropped.
const POLL_INBOUND: usize = 4;

/// How long a closed long-polling session keeps its last frames (its close packet)
/// for a GET before its `sid` is forgotten.
const POLL_LINGER: Duration = Duration::from_secs(5);

/// One Engine.IO packet, as the client sends them.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Packet<'a> {
    /// `1`: the client closes the session.
    Close,
    /// `2` (+ data): only `2probe` during an upgrade is valid from a v4 client.
    Ping(&'a str),
    /// `3` (+ data): the answer to our ping (`3probe` during an upgrade).
    Pong(&'a str),
    /// `4…`: a Socket.IO packet.
    Message(&'a str),
    /// `5`: the upgrade is complete.
    Upgrade,
    /// `6`.
    Noop,
    /// `b…` (long-polling) or a binary frame: not supported.
    Binary,
}

/// A packet that is not Engine.IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PacketError {
    /// Empty.
    #[error("empty engine.io packet")]
    Empty,
    /// A type other than 1–6 (or `0`/open, which only a server sends).
    #[error("unknown engine.io packet type")]
    UnknownType,
}

/// Parses one Engine.IO packet.
pub(crate) fn parse(text: &str) -> Result<Packet<'_>, PacketError> {
    let mut chars = text.chars();
    let ty = chars.next().ok_or(PacketError::Empty)?;
    let rest = chars.as_str();
    Ok(match ty {
        '1' => Packet::Close,
        '2' => Packet::Ping(rest),
        '3' => Packet::Pong(rest),
        '4' => Packet::Message(rest),
        '5' => Packet::Upgrade,
        '6' => Packet::Noop,
        'b' => Packet::Binary,
        _ => return Err(PacketError::UnknownType),
    })
}

/// Engine.IO's handshake and request errors (the codes its clients know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EioError {
    /// A transport other than `polling` or `websocket`.
    UnknownTransport = 0,
    /// A `sid` that names no open session.
    UnknownSid = 1,
    /// A handshake that is not a GET.
    BadHandshakeMethod = 2,
    /// Anything else malformed.
    BadRequest = 3,
    /// `EIO` other than 4 (Engine.IO v3 clients, socket.io-client 2.x).
    UnsupportedProtocolVersion = 5,
}

impl EioError {
    fn message(self) -> &'static str {
        match self {
            Self::UnknownTransport => "Transport unknown",
            Self::UnknownSid => "Session ID unknown",
            Self::BadHandshakeMethod => "Bad handshake method",
            Self::BadRequest => "Bad request",
            Self::UnsupportedProtocolVersion => "Unsupported protocol version",
        }
    }

    /// HTTP 400 with Engine.IO's `{"code","message"}` body.
    pub(crate) fn response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"code": self as u8, "message": self.message()})),
        )
            .into_response()
    }
}

/// Engine.IO's transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Polling,
    WebSocket,
}

/// What a `/socket.io/` request's query says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Query<'a> {
    pub(crate) transport: Transport,
    /// The session a request belongs to; `None` for a handshake.
    pub(crate) sid: Option<&'a str>,
}

/// Reads `EIO`, `transport` and `sid`; other parameters (`t`, the client's own) are
/// ignored. Values are compared raw: none of the accepted ones needs decoding.
pub(crate) fn parse_query(query: Option<&str>) -> Result<Query<'_>, EioError> {
    let (mut eio, mut transport, mut sid) = (None, None, None);
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match k {
            "EIO" => eio = Some(v),
            "transport" => transport = Some(v),
            "sid" => sid = Some(v),
            _ => {}
        }
    }
    // A client without `EIO` speaks v3, as Engine.IO's own server assumes.
    if eio != Some("4") {
        return Err(EioError::UnsupportedProtocolVersion);
    }
    let transport = match transport {
        Some("polling") => Transport::Polling,
        Some("websocket") => Transport::WebSocket,
        _ => return Err(EioError::UnknownTransport),
    };
    let sid = match sid {
        None => None,
        Some(s) if valid_sid(s) => Some(s),
        Some(_) => return Err(EioError::UnknownSid),
    };
    Ok(Query { transport, sid })
}

/// The length of the session ids we make (hex).
const SID_LEN: usize = 32;

fn valid_sid(s: &str) -> bool {
    s.len() == SID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A fresh session id: 128 random bits. A long-polling `sid` is all a request needs
/// to read or write the session, so it must not be guessable.
pub(crate) fn new_sid() -> String {
    use rand::RngCore;
    let mut b = [0u8; SID_LEN / 2];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Session parameters announced in the open packet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub(crate) ping_interval: Duration,
    pub(crate) ping_timeout: Duration,
    /// The largest packet (WebSocket) or POST payload (long-polling) accepted.
    pub(crate) max_payload: usize,
}

/// The open packet: `0{"sid","upgrades","pingInterval","pingTimeout","maxPayload"}`.
pub(crate) fn open(sid: &str, upgrades: bool, p: &Params) -> String {
    let upgrades: &[&str] = if upgrades { &["websocket"] } else { &[] };
    format!(
        "0{}",
        serde_json::json!({
            "sid": sid,
            "upgrades": upgrades,
            "pingInterval": p.ping_interval.as_millis() as u64,
            "pingTimeout": p.ping_timeout.as_millis() as u64,
            "maxPayload": p.max_payload,
        })
    )
}

/// A long-polling response body. Never cached: every answer is a session's own.
fn text_response(body: String) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=UTF-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// The handshake's answer on long-polling: the open packet.
pub(crate) fn open_response(open: String) -> Response {
    text_response(open)
}

/// Open long-polling sessions by `sid`. Bounded by the sessions themselves: every
/// entry belongs to a session counted in the unauthenticated pool or in
/// `max_connections`, and leaves with it (at most [`POLL_LINGER`] after it closed).
#[derive(Default)]
pub(crate) struct Polls(Mutex<HashMap<Box<str>, Arc<Poll>>>);

impl Polls {
    fn map(&self) -> MutexGuard<'_, HashMap<Box<str>, Arc<Poll>>> {
        // Entries are inserted or removed whole; a panic cannot leave one half-made.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session `sid` names.
    pub(crate) fn get(&self, sid: &str) -> Option<Arc<Poll>> {
        self.map().get(sid).cloned()
    }

    fn remove(&self, sid: &str) {
        let gone = self.map().remove(sid);
        drop(gone);
    }

    /// Open sessions.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

/// What a long-polling session shares with the HTTP requests that carry it.
pub(crate) struct Poll {
    sid: Box<str>,
    state: Mutex<PollState>,
    /// A frame was queued, or the session closed: the waiting GET answers.
    readable: Notify,
    /// POST payloads and the upgraded socket, to the connection task.
    inbound: mpsc::Sender<Inbound>,
}

#[derive(Default)]
struct PollState {
    out: VecDeque<Utf8Bytes>,
    bytes: usize,
    /// The session ended (or upgraded): what is queued is the last of it.
    closed: bool,
    /// A GET is waiting (Engine.IO allows one at a time).
    polling: bool,
    /// A POST body is being read (one at a time too: each holds a connection and up
    /// to `max_message_bytes`, and without the rule one session could hold thousands).
    posting: bool,
    /// A WebSocket is probing to take this session over.
    probing: bool,
}

impl PollState {
    /// Queues a frame past the bound (the bound is checked by [`PollLink::feed`]).
    fn push(&mut self, f: Utf8Bytes) {
        self.bytes += f.len() + POLL_FRAME_OVERHEAD;
        self.out.push_back(f);
    }
}

enum Inbound {
    Payload(Bytes),
    /// Boxed: the channel's slots are allocated up front.
    Upgrade(Box<WebSocket>),
    Refused(Exit),
}

impl Poll {
    fn state(&self) -> MutexGuard<'_, PollState> {
        // Only whole values are written under the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET ?sid=`: the queued frames (up to [`POLL_RESPONSE_BYTES`]), waiting up to
    /// `max_wait` for one (then a noop).
    pub(crate) async fn get(self: Arc<Self>, polls: &Polls, max_wait: Duration) -> Response {
        {
            let mut st = self.state();
            if st.polling {
                // A second pending GET: a broken or hostile client; the first keeps its turn.
                return EioError::BadRequest.response();
            }
            if st.closed && st.out.is_empty() {
                return EioError::UnknownSid.response();
            }
            st.polling = true;
        }
        // Cleared however this request ends (the client may drop the connection).
        struct Polling<'a>(&'a Poll);
        impl Drop for Polling<'_> {
            fn drop(&mut self) {
                self.0.state().polling = false;
            }
        }
        let _polling = Polling(&self);
        let deadline = tokio::time::sleep(max_wait);
        tokio::pin!(deadline);
        loop {
            // Made before the queue is read: a frame queued in between leaves its
            // permit for it (`notify_one`), so no wake-up is lost.
            let notified = self.readable.notified();
            {
                let mut st = self.state();
                if st.probing && st.out.is_empty() && !st.closed {
                    // An upgrade is under way: every GET is answered at once, so the
                    // client can pause polling whichever GET took the probe's noop.
                    return text_response("6".into());
                }
                if !st.out.is_empty() || st.closed {
                    let mut body = String::new();
                    while let Some(f) = st.out.front() {
                        if !body.is_empty() && body.len() + 1 + f.len() > POLL_RESPONSE_BYTES {
                            break;
                        }
                        if !body.is_empty() {
                            body.push(SEPARATOR);
                        }
                        body.push_str(f.as_str());
                        st.bytes -= f.len() + POLL_FRAME_OVERHEAD;
                        st.out.pop_front();
                    }
                    if st.closed && st.out.is_empty() {
                        if body.is_empty() {
                            body.push('1');
                        }
                        drop(st);
                        polls.remove(&self.sid);
                    }
                    return text_response(body);
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = &mut deadline => return text_response("6".into()),
            }
        }
    }

    /// `POST ?sid=`: hands the payload (at most `max` bytes, read within `within`) to
    /// the session. One POST at a time, as Engine.IO asks: a second one meanwhile gets 400.
    pub(crate) async fn post(
        &self,
        body: axum::body::Body,
        max: usize,
        within: Duration,
    ) -> Response {
        {
            let mut st = self.state();
            if st.closed {
                return EioError::UnknownSid.response();
            }
            if st.posting {
                return EioError::BadRequest.response();
            }
            st.posting = true;
        }
        // Cleared however this request ends (the client may drop the connection).
        struct Posting<'a>(&'a Poll);
        impl Drop for Posting<'_> {
            fn drop(&mut self) {
                self.0.state().posting = false;
            }
        }
        let _posting = Posting(self);
        // A body trickled in slowly would hold the connection and its buffer for as long
        // as the client likes (hyper's header timeout covers only the head).
        let read = tokio::time::timeout(within, axum::body::to_bytes(body, max)).await;
        let Ok(read) = read else {
            return EioError::BadRequest.response();
        };
        let bytes = match read {
            Ok(b) => b,
            Err(_) => {
                // Over maxPayload (or a broken body): Engine.IO closes such a session.
                let _ = self
                    .inbound
                    .try_send(Inbound::Refused(Exit(close::TOO_BIG, "message_too_big")));
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    axum::Json(serde_json::json!({"code": EioError::BadRequest as u8, "message": "Payload too large"})),
                )
                    .into_response();
            }
        };
        if std::str::from_utf8(&bytes).is_err() {
            let _ = self
                .inbound
                .try_send(Inbound::Refused(Exit(close::INVALID_DATA, "invalid_utf8")));
            return EioError::BadRequest.response();
        }
        match self.inbound.try_send(Inbound::Payload(bytes)) {
            Ok(()) => text_response("ok".into()),
            Err(_) => EioError::BadRequest.response(),
        }
    }

    /// Whether a WebSocket may start probing to take this session over (one at a time).
    pub(crate) fn start_probe(&self) -> bool {
        let mut st = self.state();
        if st.closed || st.probing {
            return false;
        }
        st.probing = true;
        true
    }

    /// A probe that never got its socket (the HTTP upgrade failed): another may start.
    pub(crate) fn end_probe(&self) {
        self.state().probing = false;
    }

    /// The upgrade (runs on the new WebSocket, beside the session's task, until it hands
    /// the socket over): `2probe` → `3probe`, a noop to the pending GET so the client can
    /// finish polling, then `5`. Within `deadline`, or the socket is dropped and the
    /// session goes on polling.
    pub(crate) async fn probe(self: Arc<Self>, mut ws: WebSocket, deadline: Duration) {
        let upgraded = tokio::time::timeout(deadline, async {
            expect(&mut ws, "2probe").await?;
            ws.send(WsMessage::Text("3probe".into())).await.ok()?;
            {
                let mut st = self.state();
                st.push(Utf8Bytes::from_static("6"));
            }
            self.readable.notify_one();
            expect(&mut ws, "5").await
        })
        .await;
        if matches!(upgraded, Ok(Some(()))) {
            if let Ok(()) = self.inbound.send(Inbound::Upgrade(Box::new(ws))).await {
                return;
            }
        }
        self.state().probing = false;
    }
}

/// Reads the next text frame and checks it is `want`.
async fn expect(ws: &mut WebSocket, want: &str) -> Option<()> {
    loop {
        match ws.recv().await? {
            Ok(WsMessage::Text(t)) if t.as_str() == want => return Some(()),
            Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// The connection task's end of a long-polling session.
pub(crate) struct PollLink {
    poll: Arc<Poll>,
    polls: Arc<Polls>,
    rx: mpsc::Receiver<Inbound>,
    /// The rest of the last POST payload, packets not yet read.
    pending: Bytes,
    /// Upgraded: the session lives on on its WebSocket.
    retired: bool,
}

impl PollLink {
    /// A new session in `polls`; returns its link and sid.
    pub(crate) fn open(polls: &Arc<Polls>) -> (Box<PollLink>, Box<str>) {
        let (tx, rx) = mpsc::channel(POLL_INBOUND);
        let mut map = polls.map();
        let sid: Box<str> = loop {
            let s: Box<str> = new_sid().into();
            if !map.contains_key(&s) {
                break s;
            }
        };
        let poll = Arc::new(Poll {
            sid: sid.clone(),
            state: Mutex::new(PollState::default()),
            readable: Notify::new(),
            inbound: tx,
        });
        map.insert(sid.clone(), poll.clone());
        drop(map);
        let link = PollLink {
            poll,
            polls: polls.clone(),
            rx,
            pending: Bytes::new(),
            retired: false,
        };
        (Box::new(link), sid)
    }

    /// The next packet; `Err` with the socket that has taken the session over.
    pub(crate) async fn recv(&mut self) -> Result<In, Box<WebSocket>> {
        loop {
            if !self.pending.is_empty() {
                let at = self.pending.iter().position(|&b| b == SEPARATOR as u8);
                let packet = match at {
                    Some(i) => {
                        let p = self.pending.split_to(i);
                        let _separator = self.pending.split_to(1);
                        p
                    }
                    None => std::mem::take(&mut self.pending),
                };
                // The payload was checked to be UTF-8, and is split at an ASCII byte.
                return Ok(match Utf8Bytes::try_from(packet) {
                    Ok(t) => In::Text(t),
                    Err(_) => In::Refused(Exit(close::INVALID_DATA, "invalid_utf8")),
                });
            }
            match self.rx.recv().await {
                // The sender lives in `poll`, which this link holds.
                None => return Ok(In::Closed),
                Some(Inbound::Payload(b)) if b.is_empty() => {
                    return Ok(In::Refused(Exit(close::PROTOCOL_ERROR, "empty_payload")))
                }
                Some(Inbound::Payload(b)) => self.pending = b,
                Some(Inbound::Refused(exit)) => return Ok(In::Refused(exit)),
                Some(Inbound::Upgrade(ws)) => return Err(ws),
            }
        }
    }

    /// Queues a text frame for the next GET.
    pub(crate) fn feed(&mut self, m: WsMessage) -> Result<(), WriteError> {
        let WsMessage::Text(t) = m else {
            return Ok(());
        };
        let mut st = self.poll.state();
        if st.closed {
            return Err(WriteError::Failed);
        }
        if !st.out.is_empty() && st.bytes + t.len() + POLL_FRAME_OVERHEAD > POLL_BUFFER_BYTES {
            return Err(WriteError::TimedOut);
        }
        st.push(t);
        Ok(())
    }

    /// Drops the frames no GET took, for a client cut off as a slow consumer: its
    /// closing frames then fit, and the backlog is not kept while the session lingers.
    pub(crate) fn shed(&mut self) {
        let dropped = {
            let mut st = self.poll.state();
            st.bytes = 0;
            std::mem::take(&mut st.out)
        };
        drop(dropped);
    }

    /// Wakes the pending GET.
    pub(crate) fn flush(&mut self) {
        self.poll.readable.notify_one();
    }

    /// Ends the session. Its last frames (an `error`, a DISCONNECT) and a close packet
    /// wait for the next GET, as does a GET already waiting; a session with nothing left
    /// to say is forgotten at once, and a later GET is told its `sid` is unknown.
    pub(crate) fn close(&mut self) {
        {
            let mut st = self.poll.state();
            if st.polling || !st.out.is_empty() {
                st.push(Utf8Bytes::from_static("1"));
            }
            st.closed = true;
        }
        self.poll.readable.notify_one();
    }

    /// After an upgrade: the frames no GET took (noops left out); the `sid` no longer
    /// takes requests.
    pub(crate) fn retire(&mut self) -> Vec<Utf8Bytes> {
        self.retired = true;
        let left = {
            let mut st = self.poll.state();
            st.closed = true;
            st.bytes = 0;
            std::mem::take(&mut st.out)
        };
        self.poll.readable.notify_one();
        self.polls.remove(&self.poll.sid);
        left.into_iter().filter(|f| f.as_str() != "6").collect()
    }
}

impl Drop for PollLink {
    fn drop(&mut self) {
        if self.retired {
            return;
        }
        let undelivered = {
            let mut st = self.poll.state();
            st.closed = true;
            !st.out.is_empty()
        };
        self.poll.readable.notify_one();
        if !undelivered {
            self.polls.remove(&self.poll.sid);
            return;
        }
        // The last frames (the close packet, an error) wait a while for a GET.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (polls, sid) = (self.polls.clone(), self.poll.sid.clone());
            rt.spawn(async move {
                tokio::time::sleep(POLL_LINGER).await;
                polls.remove(&sid);
            });
        } else {
            self.polls.remove(&self.poll.sid);
        }
    }
}

impl From<Box<PollLink>> for Link {
    fn from(p: Box<PollLink>) -> Self {
        Link::Poll(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_packet_type_and_refuses_the_rest() {
        assert_eq!(parse("1"), Ok(Packet::Close));
        assert_eq!(parse("2probe"), Ok(Packet::Ping("probe")));
        assert_eq!(parse("3"), Ok(Packet::Pong("")));
        assert_eq!(parse("42[\"a\"]"), Ok(Packet::Message("2[\"a\"]")));
        assert_eq!(parse("5"), Ok(Packet::Upgrade));
        assert_eq!(parse("6"), Ok(Packet::Noop));
        assert_eq!(parse("bAQID"), Ok(Packet::Binary));
        assert_eq!(parse(""), Err(PacketError::Empty));
        for bad in ["0", "7", "x", "{}", "é"] {
            assert_eq!(parse(bad), Err(PacketError::UnknownType), "{bad}");
        }
    }

    #[test]
    fn queries_name_version_transport_and_session() {
        let sid = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_query(Some("EIO=4&transport=polling&t=abc")),
            Ok(Query {
                transport: Transport::Polling,
                sid: None
            })
        );
        assert_eq!(
            parse_query(Some(&format!("EIO=4&transport=websocket&sid={sid}"))),
            Ok(Query {
                transport: Transport::WebSocket,
                sid: Some(sid)
            })
        );
        let cases = [
            (None, EioError::UnsupportedProtocolVersion),
            (
                Some("transport=polling"),
                EioError::UnsupportedProtocolVersion,
            ),
            (
                Some("EIO=3&transport=polling"),
                EioError::UnsupportedProtocolVersion,
            ),
            (Some("EIO=4"), EioError::UnknownTransport),
            (
                Some("EIO=4&transport=flashsocket"),
                EioError::UnknownTransport,
            ),
            (Some("EIO=4&transport=polling&sid=x"), EioError::UnknownSid),
            (
                Some("EIO=4&transport=polling&sid=../../etc"),
                EioError::UnknownSid,
            ),
        ];
        for (q, want) in cases {
            assert_eq!(parse_query(q), Err(want), "{q:?}");
        }
    }

    #[test]
    fn errors_are_engine_io_json_with_status_400() {
        let r = EioError::UnknownTransport.response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(EioError::UnsupportedProtocolVersion as u8, 5);
        assert_eq!(EioError::UnknownSid.message(), "Session ID unknown");
    }

    #[test]
    fn open_packet_announces_the_session() {
        let p = Params {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_payload: 65536,
        };
        let o = open("abc", true, &p);
        let v: serde_json::Value = serde_json::from_str(o.strip_prefix('0').unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"sid": "abc", "upgrades": ["websocket"], "pingInterval": 25000,
                "pingTimeout": 20000, "maxPayload": 65536})
        );
        assert!(open("abc", false, &p).contains("\"upgrades\":[]"));
        assert_eq!(new_sid().len(), SID_LEN);
        assert!(valid_sid(&new_sid()));
    }

    async fn body_of(r: Response) -> Bytes {
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_polling_queue_is_bounded_by_bytes_and_closes_with_a_close_packet() {
        let polls = Arc::new(Polls::default());
        let (mut link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        // Many small frames fit (a replay burst, each event under every alias name):
        // the bound is bytes, not frames.
        let frame = "42[\"x\"]";
        let fits = POLL_BUFFER_BYTES / (frame.len() + POLL_FRAME_OVERHEAD);
        assert!(fits > 4096, "{fits}");
        for _ in 0..fits {
            link.feed(WsMessage::Text(frame.into())).unwrap();
        }
        assert!(matches!(
            link.feed(WsMessage::Text(frame.into())),
            Err(WriteError::TimedOut)
        ));
        // GETs take them in bodies of whole frames up to POLL_RESPONSE_BYTES each.
        let mut got = 0;
        let mut gets = 0;
        while got < fits {
            let body = body_of(poll.clone().get(&polls, Duration::from_secs(1)).await).await;
            assert!(body.len() <= POLL_RESPONSE_BYTES, "{}", body.len());
            assert!(body.split(|&b| b == 0x1e).all(|f| f == frame.as_bytes()));
            got += body.split(|&b| b == 0x1e).count();
            gets += 1;
        }
        assert_eq!((got, poll.state().bytes), (fits, 0));
        assert!(gets > 1);
        // One oversized frame still goes into an empty queue, and out whole in one body.
        let big = "x".repeat(POLL_BUFFER_BYTES + 1);
        link.feed(WsMessage::Text(big.clone().into())).unwrap();
        assert!(link.feed(WsMessage::Text("y".into())).is_err());
        let body = body_of(poll.clone().get(&polls, Duration::from_secs(1)).await).await;
        assert_eq!(&body[..], big.as_bytes());
        link.feed(WsMessage::Text("41".into())).unwrap();
        link.close();
        drop(link);
        let last = body_of(poll.clone().get(&polls, Duration::from_secs(1)).await).await;
        assert_eq!(&last[..], b"41\x1e1");
        assert_eq!(polls.len(), 0);
        // Nothing left to say: forgotten at once.
        let (mut link, sid) = PollLink::open(&polls);
        link.close();
        drop(link);
        assert!(polls.get(&sid).is_none());
    }

    #[tokio::test]
    async fn a_closed_session_keeps_its_sid_until_a_capped_backlog_is_polled() {
        let polls = Arc::new(Polls::default());
        let (mut link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        let frame = "4".repeat(1000);
        for _ in 0..100 {
            link.feed(WsMessage::Text(frame.as_str().into())).unwrap();
        }
        link.close();
        drop(link);
        let first = body_of(poll.clone().get(&polls, Duration::from_secs(1)).await).await;
        assert_eq!(
            first.split(|&b| b == 0x1e).count(),
            POLL_RESPONSE_BYTES / 1001
        );
        assert!(polls.get(&sid).is_some());
        let rest = body_of(poll.clone().get(&polls, Duration::from_secs(1)).await).await;
        assert!(rest.ends_with(b"\x1e1"));
        assert_eq!(
            rest.split(|&b| b == 0x1e).count(),
            100 - POLL_RESPONSE_BYTES / 1001 + 1
        );
        assert!(polls.get(&sid).is_none());
    }

    #[tokio::test]
    async fn a_slow_consumer_sheds_its_backlog_for_its_closing_frames() {
        let polls = Arc::new(Polls::default());
        let (mut link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        let frame = "4".repeat(1000);
        while link.feed(WsMessage::Text(frame.as_str().into())).is_ok() {}
        link.shed();
        link.feed(WsMessage::Text("42[\"error\"]".into())).unwrap();
        link.feed(WsMessage::Text("41".into())).unwrap();
        link.close();
        drop(link);
        let last = body_of(poll.clone().get(&polls, Duration::from_secs(1)).await).await;
        assert_eq!(&last[..], b"42[\"error\"]\x1e41\x1e1");
        assert!(polls.get(&sid).is_none());
    }

    #[tokio::test]
    async fn posted_payloads_are_read_packet_by_packet() {
        let polls = Arc::new(Polls::default());
        let (mut link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        let r = poll
            .post(
                axum::body::Body::from("3\x1e42[\"ping\"]"),
                100,
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let mut got = Vec::new();
        for _ in 0..2 {
            match link.recv().await {
                Ok(In::Text(t)) => got.push(t.as_str().to_owned()),
                _ => panic!("expected text"),
            }
        }
        assert_eq!(got, ["3", "42[\"ping\"]"]);
        // Over maxPayload: 413, and the session is told to close.
        let r = poll
            .post(
                axum::body::Body::from("4".repeat(101)),
                100,
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(matches!(
            link.recv().await,
            Ok(In::Refused(Exit(close::TOO_BIG, _)))
        ));
        // Not UTF-8: 400, and closed.
        let r = poll
            .post(
                axum::body::Body::from(vec![0x34, 0xff, 0xfe]),
                100,
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(matches!(
            link.recv().await,
            Ok(In::Refused(Exit(close::INVALID_DATA, _)))
        ));
    }

    #[tokio::test]
    async fn one_post_at_a_time_and_a_trickled_body_is_cut_off() {
        let polls = Arc::new(Polls::default());
        let (_link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        // A body that never ends: its first chunk, then nothing.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tx.send(Ok(Bytes::from_static(b"4"))).await.unwrap();
        let stalled = axum::body::Body::from_stream(tokio_stream_of(rx));
        let first = tokio::spawn({
            let poll = poll.clone();
            async move { poll.post(stalled, 100, Duration::from_millis(300)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A second POST while the first is read: refused, the session's one slot is taken.
        let second = poll
            .post(axum::body::Body::from("3"), 100, Duration::from_secs(5))
            .await;
        assert_eq!(second.status(), StatusCode::BAD_REQUEST);
        // The trickled one is cut off at its deadline, and the slot is free again.
        let first = first.await.unwrap();
        assert_eq!(first.status(), StatusCode::BAD_REQUEST);
        drop(tx);
        let third = poll
            .post(axum::body::Body::from("3"), 100, Duration::from_secs(5))
            .await;
        assert_eq!(third.status(), StatusCode::OK);
    }

    /// The receiving half of a channel as a body stream.
    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn while_probing_every_get_is_answered_at_once() {
        let polls = Arc::new(Polls::default());
        let (_link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        assert!(poll.start_probe());
        let started = std::time::Instant::now();
        let r = poll.clone().get(&polls, Duration::from_secs(5)).await;
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(&body[..], b"6");
        assert!(started.elapsed() < Duration::from_secs(1));
        // A probe that never got its socket frees the way for another.
        assert!(!poll.start_probe());
        poll.end_probe();
        assert!(poll.start_probe());
    }

    #[tokio::test]
    async fn one_get_at_a_time_and_an_idle_get_ends_with_a_noop() {
        let polls = Arc::new(Polls::default());
        let (_link, sid) = PollLink::open(&polls);
        let poll = polls.get(&sid).unwrap();
        let first = tokio::spawn({
            let (poll, polls) = (poll.clone(), polls.clone());
            async move { poll.get(&polls, Duration::from_millis(300)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = poll.clone().get(&polls, Duration::from_millis(300)).await;
        assert_eq!(second.status(), StatusCode::BAD_REQUEST);
        let first = first.await.unwrap();
        assert_eq!(first.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(&body_of(first).await[..], b"6");
    }
}
