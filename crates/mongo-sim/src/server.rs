//! Listener and connections: framing in, commands out; one task per connection, closed on
//! `stop`, on `drop_all_connections`, or on the first malformed message.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bson::{doc, Document};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::changestream::ChangeStream;
use crate::commands::{self, Conn, Outcome};
use crate::failpoint::FailPoint;
use crate::store::State;
use crate::wire::{self, Request};
use crate::SimConfig;

/// A server-side cursor.
#[derive(Debug)]
pub(crate) enum CursorKind {
    /// Remaining results of a find or aggregate.
    Docs(std::collections::VecDeque<Document>),
    /// A change stream.
    Change(Box<ChangeStream>),
}

/// A cursor and its namespace.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub(crate) ns: String,
    pub(crate) kind: CursorKind,
}

/// Everything the connections share. The store has one mutex: every command runs its data
/// part synchronously under it, which makes "tick the clock, apply, append to the oplog"
/// atomic and gives change streams a consistent view without finer locking.
pub(crate) struct Shared {
    pub(crate) cfg: SimConfig,
    state: Mutex<State>,
    pub(crate) cursors: Mutex<HashMap<i64, Cursor>>,
    pub(crate) failpoint: Mutex<Option<FailPoint>>,
    /// Latest commit sequence number; change-stream getMores and the flusher wait on it.
    pub(crate) commits: watch::Sender<u64>,
    next_cursor: AtomicI64,
    /// Change streams opened (`aggregate` with `$changeStream` that succeeded), for tests
    /// that bound how many a consumer opens.
    pub(crate) change_streams_opened: std::sync::atomic::AtomicU64,
    next_conn: AtomicI64,
    next_request: AtomicI32,
    /// The address clients must use: `hosts`/`me`/`primary` in `hello`.
    pub(crate) me: Mutex<String>,
    /// Cancelled by `drop_all_connections`, then replaced for later connections.
    conn_generation: Mutex<CancellationToken>,
    pub(crate) started: std::time::Instant,
}

/// Locks a std mutex, ignoring poisoning: no code path panics while holding these locks on
/// external input, and a poisoned lock must not take the whole test server down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn new(cfg: SimConfig, state: State) -> Arc<Self> {
        let seq = state.seq;
        Arc::new(Self {
            cfg,
            state: Mutex::new(state),
            cursors: Mutex::new(HashMap::new()),
            failpoint: Mutex::new(None),
            commits: watch::channel(seq).0,
            next_cursor: AtomicI64::new(1),
            change_streams_opened: std::sync::atomic::AtomicU64::new(0),
            next_conn: AtomicI64::new(1),
            next_request: AtomicI32::new(1),
            me: Mutex::new(String::new()),
            conn_generation: Mutex::new(CancellationToken::new()),
            started: std::time::Instant::now(),
        })
    }

    /// Runs `f` with the store locked; wakes waiters if it committed anything.
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = lock(&self.state);
        let before = st.seq;
        let r = f(&mut st);
        if st.seq != before {
            self.commits.send_replace(st.seq);
        }
        r
    }

    /// A fresh non-zero cursor id.
    pub(crate) fn cursor_id(&self) -> i64 {
        // Mixing the counter keeps ids non-sequential-looking (like mongod's) yet unique and > 0.
        let n = self.next_cursor.fetch_add(1, Ordering::Relaxed);
        (n.wrapping_mul(0x5851_F42D_4C95_7F2D) & 0x3FFF_FFFF_FFFF_FFFF) | 1 << 40
    }

    pub(crate) fn drop_connections(&self) {
        let old = std::mem::replace(&mut *lock(&self.conn_generation), CancellationToken::new());
        old.cancel();
    }

    fn generation(&self) -> CancellationToken {
        lock(&self.conn_generation).clone()
    }
}

/// Accepts connections until `stop` is cancelled.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let span = tracing::debug_span!("conn", id, %peer);
                let shared = shared.clone();
                let stop = stop.clone();
                let generation = shared.generation();
                tracker
                    .spawn(connection(shared, stream, peer, id, stop, generation).instrument(span));
            }
            Err(e) => {
                // Usually EMFILE; back off briefly so a full fd table does not spin the loop.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    id: i64,
    stop: CancellationToken,
    generation: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut conn = Conn {
        id,
        app_name: None,
        peer,
    };
    debug!("connected");
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => break,
            _ = generation.cancelled() => break,
            r = wire::read_message(&mut rd, shared.cfg.max_message_bytes) => r,
        };
        let (header, body) = match read {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(wire::WireError::Io(e)) => {
                debug!(error = %e, "connection closed mid-message");
                break;
            }
            Err(e) => {
                warn!(reason = %e, "closing connection after a bad message");
                break;
            }
        };
        let req = match wire::parse_message(&header, &body) {
            Ok(r) => r,
            Err(e) => {
                warn!(reason = %e, op_code = header.op_code, "closing connection after a bad message");
                break;
            }
        };
        let reply = tokio::select! {
            _ = stop.cancelled() => break,
            _ = generation.cancelled() => break,
            r = handle(&shared, &mut conn, req) => r,
        };
        let Some(bytes) = reply else { break };
        if bytes.is_empty() {
            continue;
        }
        if let Err(e) = wr.write_all(&bytes).await {
            debug!(error = %e, "write failed");
            break;
        }
    }
    debug!("disconnected");
}

/// Handles one request: `None` closes the connection, an empty vector means "no reply".
async fn handle(shared: &Arc<Shared>, conn: &mut Conn, req: Request) -> Option<Vec<u8>> {
    let reply_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
    match req {
        Request::Msg {
            request_id,
            flags,
            body,
        } => {
            let doc = match commands::run(shared, conn, body).await {
                Outcome::Reply(d) => d,
                Outcome::Close => return None,
            };
            if flags & wire::FLAG_MORE_TO_COME != 0 {
                return Some(Vec::new());
            }
            encode(wire::encode_msg(reply_id, request_id, &doc))
        }
        Request::Query {
            request_id,
            collection,
            query,
        } => {
            let (db, rest) = collection
                .split_once('.')
                .unwrap_or((collection.as_str(), ""));
            let mut cmd = match query.get_document("$query") {
                Ok(q) => q.clone(),
                Err(_) => query.clone(),
            };
            let name = cmd.keys().next().cloned().unwrap_or_default();
            let doc = if rest == "$cmd"
                && matches!(name.as_str(), "isMaster" | "ismaster" | "hello")
            {
                cmd.insert("$db", db);
                match commands::run(shared, conn, cmd).await {
                    Outcome::Reply(d) => d,
                    Outcome::Close => return None,
                }
            } else {
                let what = if rest == "$cmd" {
                    name
                } else {
                    format!("find on {collection}")
                };
                doc! {
                    "ok": 0.0,
                    "errmsg": format!("Unsupported OP_QUERY command: {what}. The client driver may require an upgrade. For more details see https://dochub.mongodb.org/core/legacy-opcode-removal"),
                    "code": 352,
                    "codeName": "UnsupportedOpQueryCommand",
                }
            };
            encode(wire::encode_reply(reply_id, request_id, &doc))
        }
    }
}

fn encode(r: Result<Vec<u8>, bson::ser::Error>) -> Option<Vec<u8>> {
    match r {
        Ok(b) => Some(b),
        Err(e) => {
            warn!(error = %e, "could not encode a reply; closing connection");
            None
        }
    }
}
