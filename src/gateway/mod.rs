//! The client listener (`/ws`, `/socket.io/`, `/healthz`) and the operations listener's routes; owns client sessions, not the hub.

pub(crate) mod driver;
pub(crate) mod eio;
pub(crate) mod limits;
pub mod ops;
pub mod protocol;
pub(crate) mod session;
pub(crate) mod signals;
pub(crate) mod sio;
pub(crate) mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::authz::Authorizer;
use crate::config::ServerConfig;
use crate::event::EventId;
use crate::health::Health;
use crate::hub::{Hub, Message};
use crate::metrics::Metrics;
use crate::room::Room;

/// Replays a room's events from the oplog when the in-memory history does not reach back.
pub trait Replayer: Send + Sync {
    /// Messages for `room` after `since` up to and including `until`, in order; `Err` means
    /// resync. `timeout` bounds the replay itself, from when it starts reading; waiting for
    /// a shared scan to begin is bounded by the replayer.
    fn replay<'a>(
        &'a self,
        room: &'a Room,
        since: &'a EventId,
        until: Option<EventId>,
        timeout: std::time::Duration,
    ) -> BoxFuture<'a, Result<Vec<Message>, String>>;
}

/// Everything a session needs, shared by all of them.
pub struct Gateway {
    /// Fan-out.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Room authorization.
    pub authz: Arc<Authorizer>,
    /// Oplog replay for recovery beyond history; `None` disables it.
    pub replayer: Option<Arc<dyn Replayer>>,
    /// Limits and timeouts.
    pub cfg: ServerConfig,
    /// Whether `?token=` is accepted (`auth.allow_query_token`).
    pub allow_query_token: bool,
    /// Connection counting.
    pub limits: Arc<limits::ConnLimits>,
    /// Fires on shutdown: sessions close with 1001.
    pub stop: CancellationToken,
    /// Sessions, so shutdown can wait for them to close.
    pub tracker: TaskTracker,
    /// The Socket.IO endpoint: whether it is served, and its legacy event names.
    pub sio: crate::config::SocketIoConfig,
}

impl Gateway {
    /// The event id a client's `since` names. An id we cannot open (altered, from a
    /// deployment with another key, or random bytes) becomes the empty id, which no
    /// history or oplog reaches: the client is told to resync, never trusted.
    pub(crate) fn since(&self, wire: &str) -> EventId {
        self.hub
            .ids()
            .open(wire)
            .unwrap_or_else(|| EventId::new(""))
    }

    /// A position or event id as clients see it (sealed).
    pub(crate) fn wire_id(&self, id: &EventId) -> String {
        self.hub.ids().seal(id)
    }

    /// Whether a browser `Origin` may open a socket (an empty allowlist allows all).
    pub(crate) fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.cfg.allowed_origins.is_empty() {
            return true;
        }
        match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            // Non-browser clients send no Origin; hijacking needs a browser, which always sends one.
            None => true,
            Some(origin) => self.cfg.allowed_origins.iter().any(|a| a == origin),
        }
    }
}

/// The HTTP routes, with the Socket.IO layer when enabled.
pub fn router(gw: Arc<Gateway>) -> Router {
    router_with(gw, None)
}

/// [`router`] with `extra` routes (the demo page).
pub(crate) fn router_with(gw: Arc<Gateway>, extra: Option<Router>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(ops::healthz))
        .with_state(gw.clone());
    if gw.sio.enabled {
        router = router.merge(sio::router(gw));
    }
    if let Some(extra) = extra {
        router = router.merge(extra);
    }
    router
}

/// Serves `app` on `listener` until `stop` fires, then waits up to `grace` for
/// in-flight requests and sessions to close.
///
/// The accept loop is ours rather than `axum::serve`'s because that one gives no
/// access to hyper's builder: without a timer hyper enforces no header-read
/// timeout, so a peer that sent half a request head (or nothing) held its
/// connection, descriptor and task forever. Here every connection must deliver
/// each request head within `server.header_read_timeout`, counted from when the
/// server starts waiting for it, so a silent new connection and an idle
/// keep-alive connection are closed at that deadline too. HTTP/1 only, as before
/// (axum was built without its `http2` feature).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    gw: Arc<Gateway>,
    grace: Duration,
) -> std::io::Result<()> {
    let stop = gw.stop.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(gw.cfg.header_read_timeout);
    // HTTP connections (not upgraded sockets, which `gw.tracker` holds) so shutdown
    // can wait for in-flight requests.
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // Events are small frames written as they happen: without TCP_NODELAY, Nagle holds a
        // frame back while the previous one is unacknowledged, and the peer's delayed ACK
        // turns that into a ~40 ms stall (it set the p99 in the benchmark).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        let app = app.clone();
        // `ConnectInfo<SocketAddr>` as axum's connect-info service would insert it.
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
                tower::ServiceExt::oneshot(app.clone(), req.map(axum::body::Body::new))
            });
        let conn = http
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
            .with_upgrades();
        let stop = stop.clone();
        conns.spawn(async move {
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.cancelled() => None,
            };
            let r = match done {
                Some(r) => r,
                None => {
                    // Finish the request in flight, then close; an idle connection closes now.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + grace;
    conns.close();
    if tokio::time::timeout_at(deadline, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "HTTP connections still open after the grace period"
        );
    }
    gw.tracker.close();
    if tokio::time::timeout_at(deadline, gw.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = gw.tracker.len(),
            "sessions still open after the grace period"
        );
    }
    Ok(())
}

/// An accept error: one connection's (reset before accept) is skipped; any other
/// (out of descriptors, EMFILE) pauses accepting briefly, as axum does, rather than
/// spinning on an error that only closing connections can clear.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed; pausing accepts");
    tokio::time::sleep(ACCEPT_PAUSE).await;
}

/// How long accepting pauses after a non-connection accept error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
