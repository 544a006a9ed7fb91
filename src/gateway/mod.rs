//! The client listener (`/ws`, `/socket.io/`, `/healthz`) and the operations listener's routes; owns client sessions, not the hub.

pub mod limits;
pub mod ops;
pub mod protocol;
pub mod session;
pub mod sio;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use axum::routing::get;
use axum::serve::ListenerExt;
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
    /// Messages for `room` after `since` up to and including `until`, in order; `Err` means resync.
    fn replay<'a>(
        &'a self,
        room: &'a Room,
        since: &'a EventId,
        until: Option<EventId>,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, String>>;
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
    /// Whether a browser `Origin` may open a socket (an empty allowlist allows all).
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
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

/// [`router`] with `extra` routes (the demo page) merged in first: the
/// Socket.IO layer wraps only what the router holds when it is added, and a
/// later `merge` swaps in an unlayered fallback, so `/socket.io/` would 404.
pub fn router_with(gw: Arc<Gateway>, extra: Option<Router>) -> Router {
    let sio = gw.sio.enabled.then(|| sio::layer(gw.clone()));
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(ops::healthz))
        .with_state(gw.clone());
    if let Some(extra) = extra {
        router = router.merge(extra);
    }
    match sio {
        // socketioxide answers `/socket.io/` and passes every other request through;
        // CORS wraps it so cross-origin long-polling works.
        Some(layer) => router
            .layer(layer)
            .layer(axum::middleware::from_fn_with_state(gw, sio::cors)),
        None => router,
    }
}

/// Serves `app` on `listener` until `stop` fires, then waits up to `grace` for sessions to close.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    gw: Arc<Gateway>,
    grace: Duration,
) -> std::io::Result<()> {
    let stop = gw.stop.clone();
    // Events are small frames written as they happen: without TCP_NODELAY, Nagle holds a
    // frame back while the previous one is unacknowledged, and the peer's delayed ACK
    // turns that into a ~40 ms stall (it set the p99 in the benchmark).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
    });
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await });
    server.await?;
    gw.tracker.close();
    if tokio::time::timeout(grace, gw.tracker.wait())
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
