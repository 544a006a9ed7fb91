//! The raw limit: a minimal tokio-tungstenite fan-out server with no database and no routing,
//! told what to publish over a line-based TCP control channel.
//!
//! Clients connect exactly as they do to changecast's `/ws` (Bearer token in the
//! `Authorization` header, `subscribe` messages); the token is decoded without
//! verification and only names the rooms. The control channel takes lines
//! `ROOM[ ROOM…]\tFRAME\n` and answers `+\n` as soon as a line is parsed, before
//! fanning out, the way a database acknowledges a write before its change
//! stream delivers it; latency is then measured the same way for every server.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::token;

/// Frames one connection may have queued; beyond it the client is a slow
/// consumer and is disconnected (counted), as changecast's hub does.
pub const MAILBOX_CAPACITY: usize = 1024;

/// Read buffer per connection; clients send only tiny control messages.
const READ_BUFFER_BYTES: usize = 4096;

type Members = HashMap<u64, mpsc::Sender<Message>>;

/// Rooms → members; the only shared state.
#[derive(Default)]
struct Rooms {
    rooms: Mutex<HashMap<String, Members>>,
    next_id: AtomicU64,
    slow_consumers: AtomicU64,
}

impl Rooms {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Members>> {
        // A panic while holding the lock cannot leave the map half-updated in a
        // way that matters to a benchmark, so poisoning is ignored.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(&self, room: &str, id: u64, tx: &mpsc::Sender<Message>) {
        self.lock()
            .entry(room.to_owned())
            .or_default()
            .insert(id, tx.clone());
    }

    fn leave_all(&self, rooms: &[String], id: u64) {
        let mut map = self.lock();
        for room in rooms {
            if let Some(members) = map.get_mut(room) {
                members.remove(&id);
                // Rooms are dropped with their last member so the map never only grows.
                if members.is_empty() {
                    map.remove(room);
                }
            }
        }
    }

    fn publish(&self, room: &str, frame: &Message) {
        let map = self.lock();
        let Some(members) = map.get(room) else {
            return;
        };
        for tx in members.values() {
            // Full mailbox (slow consumer): the frame is dropped and counted; the
            // load tool then reports it as lost, so it can never pass unnoticed.
            if tx.try_send(frame.clone()).is_err() {
                self.slow_consumers.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Serves WebSocket clients on `ws` and publish commands on `control` until `stop` fires.
pub async fn serve(
    ws: TcpListener,
    control: TcpListener,
    stop: CancellationToken,
) -> io::Result<()> {
    let rooms = Arc::new(Rooms::default());
    let tasks = TaskTracker::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = ws.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let rooms = rooms.clone();
                let stop = stop.clone();
                tasks.spawn(async move {
                    let _ = connection(stream, rooms, stop).await;
                });
            }
            accepted = control.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let rooms = rooms.clone();
                let stop = stop.clone();
                tasks.spawn(async move {
                    let _ = control_connection(stream, rooms, stop).await;
                });
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

async fn connection(
    stream: TcpStream,
    rooms: Arc<Rooms>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut bearer = None;
    // The handshake never fails here: a missing token is answered with a close after it.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        bearer = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        Ok(response)
    };
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let mut ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    let claims = bearer.as_deref().and_then(token::unverified_claims);
    let Some(claims) = claims else {
        ws.close(None).await?;
        return Ok(());
    };

    let id = rooms.next_id.fetch_add(1, Ordering::Relaxed);
    // Bounded; overflow policy in `Rooms::publish` (counted, frames dropped).
    let (tx, mut rx) = mpsc::channel::<Message>(MAILBOX_CAPACITY);
    let mut joined = vec![format!("customer:{}", claims.sub)];
    joined.extend(claims.stores.iter().map(|s| format!("store:{s}")));
    for room in &joined {
        rooms.join(room, id, &tx);
    }
    let welcome = serde_json::json!({
        "type": "welcome", "session": id, "subject": claims.sub, "rooms": joined,
    });
    let outcome = async {
        ws.send(Message::text(welcome.to_string())).await?;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    ws.feed(frame).await?;
                    // Batch whatever else is queued into one flush (one write syscall).
                    while let Ok(more) = rx.try_recv() {
                        ws.feed(more).await?;
                    }
                    ws.flush().await?;
                }
                inbound = ws.next() => {
                    let Some(inbound) = inbound else { break };
                    match inbound? {
                        Message::Text(text) => {
                            if let Some(room) = subscribe_room(&text) {
                                rooms.join(&room, id, &tx);
                                joined.push(room.clone());
                                let reply = serde_json::json!({
                                    "type": "subscribed", "room": room, "recovered": false,
                                });
                                ws.send(Message::text(reply.to_string())).await?;
                            }
                        }
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    rooms.leave_all(&joined, id);
    outcome
}

fn subscribe_room(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value.get("type")?.as_str()? != "subscribe" {
        return None;
    }
    Some(value.get("room")?.as_str()?.to_owned())
}

async fn control_connection(
    stream: TcpStream,
    rooms: Arc<Rooms>,
    stop: CancellationToken,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            line = lines.next_line() => line?,
        };
        let Some(line) = line else { return Ok(()) };
        let Some((targets, frame)) = line.split_once('\t') else {
            write.write_all(b"-malformed\n").await?;
            continue;
        };
        // Acknowledge first, like a database acknowledging the write before its
        // change stream fires; see the module docs.
        write.write_all(b"+\n").await?;
        let frame = Message::Text(Utf8Bytes::from(frame.to_owned()));
        for room in targets.split(' ').filter(|r| !r.is_empty()) {
            rooms.publish(room, &frame);
        }
    }
}
