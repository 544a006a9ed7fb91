//! The operations listener's routes: `/readyz`, `/metrics` and `/healthz`, apart from the client listener.
//!
//! `/metrics` names the databases and counts changes per collection, and
//! `/readyz` describes the streams: both are for the operator, not for whoever
//! can open a socket. They are served on `server.ops_listen` (default loopback),
//! as Centrifugo keeps its admin and metrics on an internal port. `/healthz`
//! says only "ok" and stays on both listeners for load balancers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Gateway;

/// `/healthz`, `/readyz` and `/metrics` for `gw`.
pub(crate) fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(gw)
}

/// Serves the operations routes on `listener` until `stop` fires. No sessions
/// live here, so the stop is immediate.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(gw))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Liveness: the process answers.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let ready = gw.health.is_ready() && !gw.stop.is_cancelled();
    let body = serde_json::json!({
        "ready": ready,
        "streams": gw.health.streams().into_iter().map(|(db, open)| serde_json::json!({"database": db, "open": open})).collect::<Vec<_>>(),
        "checkpointWritable": gw.health.checkpoint_ok(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.health.refresh_gauges(&gw.metrics);
    gw.metrics
        .unauthenticated
        .set(i64::try_from(gw.limits.unauthenticated()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics.encode(),
    )
        .into_response()
}
