//! The load tool's client connections: native `/ws` and Socket.IO over WebSocket, one task each.
//!
//! Socket.IO is spoken directly (Engine.IO v4 / Socket.IO v5 framing over a
//! WebSocket): `0{…}` open, `40{auth}` connect, `40{"sid"…}` accepted, `2`/`3`
//! ping/pong, `42[name,data]` events, `421[…]`/`431[…]` an emit with its ack.
//! Frames are scanned, not parsed: the client must be cheaper than the server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::tracker::Tracker;

/// Wire protocol of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// changecast's JSON protocol (also spoken by the raw server).
    Native,
    /// Socket.IO v5 over an Engine.IO v4 WebSocket.
    SocketIo,
}

/// Who a connection is, which decides what it may receive.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Customer `i`: owns order `i`.
    Customer(u32),
    /// Dashboard of store `j` of `stores`: sees orders `i` with `i % stores == j`.
    Store {
        /// Store index.
        index: u32,
        /// Number of stores.
        stores: u32,
    },
}

impl Role {
    fn accepts(self, target: u32) -> bool {
        match self {
            Role::Customer(i) => target == i,
            Role::Store { index, stores } => stores > 0 && target % stores == index,
        }
    }
}

/// One connection to open.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its identity.
    pub role: Role,
    /// Its JWT.
    pub token: String,
}

/// What every connection shares.
pub struct Fleet {
    /// Protocol spoken.
    pub protocol: Protocol,
    /// Full URL (`ws://…/ws` or `ws://…/socket.io/?EIO=4&transport=websocket`).
    pub url: String,
    /// Server address the URL names.
    pub server: SocketAddr,
    /// Source addresses, used round-robin so no one address runs out of ports.
    pub sources: Vec<Ipv4Addr>,
    /// Event names whose frames count as deliveries.
    pub counted_events: Vec<String>,
    /// How a Socket.IO client joins a room: event name; the payload is `{"room": R}`.
    pub sio_subscribe_event: String,
    /// Handshakes in flight at once, so the accept backlog never overflows.
    pub handshakes: Semaphore,
    /// The receipts.
    pub tracker: Arc<Tracker>,
    /// Counters.
    pub stats: FleetStats,
}

/// Connection counters.
#[derive(Default)]
pub struct FleetStats {
    /// Handshakes completed (welcome / Socket.IO connect received).
    pub connected: AtomicU64,
    /// Connections that failed to open.
    pub failed: AtomicU64,
    /// Connections that confirmed their subscription.
    pub subscribed: AtomicU64,
    /// Connections closed by the server or broken before the end.
    pub dropped: AtomicU64,
    /// Frames that were not counted deliveries (aliases, pings, acks…).
    pub other_frames: AtomicU64,
    /// First few distinct errors, for the report.
    pub errors: Mutex<Vec<String>>,
    /// First few distinct text frames that were not counted deliveries (clipped), so a
    /// server that renames or reshapes an event shows what it sent instead.
    pub other_samples: Mutex<Vec<String>>,
}

impl FleetStats {
    fn error(&self, what: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 5 && !errors.contains(&what) {
            errors.push(what);
        }
    }
}

/// Stages every connection walks through together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Open and authenticate, then idle.
    Connect,
    /// Subscribe to this room, then read events.
    Subscribe,
}

type Ws = WebSocketStream<TcpStream>;

const READ_BUFFER_BYTES: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one connection until `stop`; failures are counted in `fleet.stats`.
pub async fn run(
    fleet: Arc<Fleet>,
    index: usize,
    spec: Spec,
    subscribe_room: Option<String>,
    mut stage: watch::Receiver<Stage>,
    stop: CancellationToken,
) {
    let opened = {
        let _permit = fleet.handshakes.acquire().await;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, open(&fleet, index, &spec)).await
    };
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            fleet.stats.failed.fetch_add(1, Ordering::Relaxed);
            fleet.stats.error(format!("connect: {e:#}"));
            return;
        }
        Err(_) => {
            fleet.stats.failed.fetch_add(1, Ordering::Relaxed);
            fleet.stats.error("connect: handshake timed out".into());
            return;
        }
    };
    fleet.stats.connected.fetch_add(1, Ordering::Relaxed);
    let outcome = async {
        // Idle until told to subscribe; pings are still answered.
        while *stage.borrow() < Stage::Subscribe {
            tokio::select! {
                _ = stop.cancelled() => return anyhow::Ok(()),
                changed = stage.changed() => if changed.is_err() { return Ok(()) },
                frame = ws.next() => handle(&fleet, index, spec.role, &mut ws, frame).await?,
            }
        }
        if let Some(room) = &subscribe_room {
            subscribe(&fleet, index, spec.role, &mut ws, room).await?;
        }
        fleet.stats.subscribed.fetch_add(1, Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                frame = ws.next() => handle(&fleet, index, spec.role, &mut ws, frame).await?,
            }
        }
    }
    .await;
    if let Err(e) = outcome {
        fleet.stats.dropped.fetch_add(1, Ordering::Relaxed);
        fleet.stats.error(format!("connection: {e:#}"));
    }
}

async fn open(fleet: &Fleet, index: usize, spec: &Spec) -> anyhow::Result<Ws> {
    let source = fleet
        .sources
        .get(index % fleet.sources.len().max(1))
        .copied()
        .unwrap_or(Ipv4Addr::LOCALHOST);
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    // Bind before connect: each source address has its own ephemeral port range.
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(fleet.server).await?;
    stream.set_nodelay(true)?;
    let mut request = fleet.url.as_str().into_client_request()?;
    if fleet.protocol == Protocol::Native {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {}", spec.token).parse()?);
    }
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    match fleet.protocol {
        Protocol::Native => {
            let first = next_text(&mut ws).await?;
            anyhow::ensure!(
                first.contains("\"welcome\""),
                "expected welcome, got {}",
                clip(&first)
            );
        }
        Protocol::SocketIo => {
            let open = next_text(&mut ws).await?;
            anyhow::ensure!(
                open.starts_with('0'),
                "expected engine.io open, got {}",
                clip(&open)
            );
            let connect = format!("40{}", serde_json::json!({ "token": spec.token }));
            ws.send(Message::text(connect)).await?;
            loop {
                let reply = next_text(&mut ws).await?;
                if reply == "2" {
                    ws.send(Message::text("3")).await?;
                } else if reply.starts_with("40") {
                    break;
                } else {
                    anyhow::bail!("socket.io connect refused: {}", clip(&reply));
                }
            }
        }
    }
    Ok(ws)
}

async fn subscribe(
    fleet: &Fleet,
    index: usize,
    role: Role,
    ws: &mut Ws,
    room: &str,
) -> anyhow::Result<()> {
    let (request, answered): (String, fn(&str) -> bool) = match fleet.protocol {
        Protocol::Native => (
            serde_json::json!({ "type": "subscribe", "room": room }).to_string(),
            |t| t.contains("\"subscribed\"") || t.contains("\"error\""),
        ),
        Protocol::SocketIo => (
            format!(
                "421{}",
                serde_json::json!([fleet.sio_subscribe_event, { "room": room }])
            ),
            |t| t.starts_with("431"),
        ),
    };
    ws.send(Message::text(request)).await?;
    loop {
        let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("subscribe to {room} not answered"))?;
        let Some(frame) = frame else {
            anyhow::bail!("closed while subscribing");
        };
        if let Message::Text(text) = frame? {
            if answered(&text) {
                anyhow::ensure!(
                    !text.contains("\"error\""),
                    "subscribe refused: {}",
                    clip(&text)
                );
                return Ok(());
            }
            on_text(fleet, index, role, ws, &text).await?;
        }
    }
}

async fn handle(
    fleet: &Fleet,
    index: usize,
    role: Role,
    ws: &mut Ws,
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> anyhow::Result<()> {
    match frame {
        None => anyhow::bail!("closed by the server"),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Message::Text(text))) => on_text(fleet, index, role, ws, &text).await,
        Some(Ok(Message::Close(close))) => anyhow::bail!("closed by the server: {close:?}"),
        Some(Ok(_)) => Ok(()),
    }
}

async fn on_text(
    fleet: &Fleet,
    index: usize,
    role: Role,
    ws: &mut Ws,
    text: &str,
) -> anyhow::Result<()> {
    let name = match fleet.protocol {
        Protocol::Native => text
            .contains("\"type\":\"event\"")
            .then(|| between(text, "\"event\":\""))
            .flatten(),
        Protocol::SocketIo => {
            if text == "2" {
                ws.send(Message::text("3")).await?;
                return Ok(());
            }
            text.strip_prefix("42[\"")
                .and_then(|rest| rest.split('"').next())
        }
    };
    let counted = name.is_some_and(|n| fleet.counted_events.iter().any(|c| c == n));
    match (counted, seq_of(text)) {
        (true, Some(seq)) => fleet
            .tracker
            .receive(seq, index, |target| role.accepts(target)),
        _ => {
            if fleet.stats.other_frames.fetch_add(1, Ordering::Relaxed) < 1000 {
                let mut samples = fleet
                    .stats
                    .other_samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                // One sample per kind of frame: the first 20 characters name it
                // (`42["welcome",{"ses`, `{"type":"resync","r`).
                let kind: String = text.chars().take(20).collect();
                if samples.len() < 3 && !samples.iter().any(|s| s.starts_with(&kind)) {
                    samples.push(clip(text));
                }
            }
        }
    }
    Ok(())
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            None => anyhow::bail!("closed during handshake"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => anyhow::bail!("closed during handshake: {c:?}"),
            Some(Ok(_)) => {}
        }
    }
}

/// The string after `prefix` up to the next `"`.
fn between<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    text.get(start..)?.split('"').next()
}

/// The write sequence number a frame carries (`bseq-N`).
pub fn seq_of(text: &str) -> Option<u64> {
    let start = text.find("bseq-")? + "bseq-".len();
    let digits: &str = text.get(start..)?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits.get(..end)?.parse().ok()
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_sequence_number() {
        assert_eq!(seq_of(r#"{"updatedAt":"bseq-42"}"#), Some(42));
        assert_eq!(
            seq_of(r#"42["x",{"storeBanner":"https://c/bseq-7.png"}]"#),
            Some(7)
        );
        assert_eq!(seq_of("bseq-"), None);
        assert_eq!(seq_of("nothing"), None);
    }

    #[test]
    fn roles_accept_their_orders_only() {
        assert!(Role::Customer(3).accepts(3));
        assert!(!Role::Customer(3).accepts(4));
        let store = Role::Store {
            index: 1,
            stores: 10,
        };
        assert!(store.accepts(21));
        assert!(!store.accepts(22));
    }
}
