//! `[server]`: the listeners and the per-connection limits.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::errors::{ConfigError, Ctx};
use super::values::{dur, nz, ser_duration, DurationLit};

/// `[server]`: the listener and per-connection limits.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address for clients: `/ws`, `/socket.io/`, `/healthz`; default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Address for operators: `/metrics`, `/readyz`, `/healthz`; default `127.0.0.1:8081`
    /// (loopback: metrics name databases and count changes, which clients must not see).
    /// In a container, bind it to `0.0.0.0:8081` and do not publish the port publicly.
    pub ops_listen: SocketAddr,
    /// `Origin` values allowed to open sockets (exact match, e.g. `https://shop.example`).
    /// Empty (the default) allows every origin: then any web page a logged-in
    /// user visits can open a socket with their cookies/tokens (cross-site
    /// WebSocket hijacking) — set it in production.
    pub(crate) allowed_origins: Vec<String>,
    /// Largest inbound message, bytes; default 65536.
    pub(crate) max_message_bytes: NonZeroUsize,
    /// Rooms one connection may join explicitly; default 100.
    pub(crate) max_subscriptions_per_connection: NonZeroUsize,
    /// Inbound messages per second per connection; default 50.
    pub(crate) max_messages_per_second: NonZeroUsize,
    /// Simultaneous connections per token subject; default 20.
    pub(crate) max_connections_per_subject: NonZeroUsize,
    /// Simultaneous connections in total; default 50000.
    pub(crate) max_connections: NonZeroUsize,
    /// Time an unauthenticated socket may stay open; default `10s`. On `/ws` the
    /// `auth` message must come within it; on `/socket.io/` the Socket.IO CONNECT
    /// must succeed within it, or the Engine.IO session is closed.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) auth_deadline: Duration,
    /// Time a client has to send a whole HTTP request head, counted from the
    /// moment the server waits for one: a new connection, and an idle keep-alive
    /// connection between requests (which is then closed); default `5s`.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) header_read_timeout: Duration,
    /// Unauthenticated connections open at once: `/ws` sockets before a valid token
    /// and Engine.IO sessions before a successful Socket.IO CONNECT; default 1024.
    /// A pool apart from `max_connections`: a socket moves to that one when it
    /// authenticates, so anonymous peers never take a token holder's slot.
    /// Past it `/ws` answers 503 and the Engine.IO handshake 503, both
    /// `unauthenticated_overloaded`.
    pub(crate) max_unauthenticated: NonZeroUsize,
    /// Unauthenticated connections open at once from one peer address (IPv6 is
    /// counted by its /64); default 16; `0` disables the per-address cap. The address
    /// is the TCP peer's: behind a reverse proxy or load balancer every client
    /// shares the proxy's, so set `0` there (or a value near `max_unauthenticated`)
    /// and cap per client at the proxy. `X-Forwarded-For` is not trusted: any
    /// client could set it. Past it: 429 `unauthenticated_per_ip`.
    pub(crate) max_unauthenticated_per_ip: usize,
    /// Time between server pings; default `25s`.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) ping_interval: Duration,
    /// Time to wait for a pong before dropping the peer; default `20s`.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) pong_timeout: Duration,
    /// Longest a single socket write may take; default `10s`.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) write_timeout: Duration,
    /// Time for clients and the checkpoint to finish on shutdown; default `10s`.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Longest an oplog replay for `since` may run before answering `resync`; default `5s`.
    #[serde(serialize_with = "ser_duration")]
    pub(crate) replay_timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<SocketAddr>,
    ops_listen: Option<SocketAddr>,
    allowed_origins: Option<Vec<Spanned<String>>>,
    max_message_bytes: Option<NonZeroUsize>,
    max_subscriptions_per_connection: Option<NonZeroUsize>,
    max_messages_per_second: Option<NonZeroUsize>,
    max_connections_per_subject: Option<NonZeroUsize>,
    max_connections: Option<NonZeroUsize>,
    auth_deadline: Option<DurationLit>,
    header_read_timeout: Option<DurationLit>,
    max_unauthenticated: Option<NonZeroUsize>,
    max_unauthenticated_per_ip: Option<usize>,
    ping_interval: Option<DurationLit>,
    pong_timeout: Option<DurationLit>,
    write_timeout: Option<DurationLit>,
    /// Never read by any version: refused with a pointer to `auth.order_cache_ttl`.
    order_owner_cache_ttl: Option<Spanned<toml::Value>>,
    shutdown_grace: Option<DurationLit>,
    replay_timeout: Option<DurationLit>,
}

pub(super) fn convert(ctx: &Ctx<'_>, server: RawServer) -> Result<ServerConfig, ConfigError> {
    let mut allowed_origins = Vec::new();
    for o in server.allowed_origins.unwrap_or_default() {
        let s = o.get_ref().trim().trim_end_matches('/');
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(ctx.err(
                "server.allowed_origins",
                &o,
                format!(
                    "origin {:?} must start with http:// or https://",
                    o.get_ref()
                ),
            ));
        }
        allowed_origins.push(s.to_ascii_lowercase());
    }
    if let Some(v) = &server.order_owner_cache_ttl {
        return Err(ctx.err(
            "server.order_owner_cache_ttl",
            v,
            "this key was never read; ownership lookups are cached per auth.order_cache_ttl \
                 (and refreshed by the change stream itself): move the value there",
        ));
    }
    let server = ServerConfig {
        listen: server
            .listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
        ops_listen: server
            .ops_listen
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8081))),
        allowed_origins,
        max_message_bytes: nz(server.max_message_bytes, 65_536),
        max_subscriptions_per_connection: nz(server.max_subscriptions_per_connection, 100),
        max_messages_per_second: nz(server.max_messages_per_second, 50),
        max_connections_per_subject: nz(server.max_connections_per_subject, 20),
        max_connections: nz(server.max_connections, 50_000),
        auth_deadline: dur(server.auth_deadline, 10_000),
        header_read_timeout: dur(server.header_read_timeout, 5_000),
        max_unauthenticated: nz(server.max_unauthenticated, 1024),
        max_unauthenticated_per_ip: server.max_unauthenticated_per_ip.unwrap_or(16),
        ping_interval: dur(server.ping_interval, 25_000),
        pong_timeout: dur(server.pong_timeout, 20_000),
        write_timeout: dur(server.write_timeout, 10_000),
        shutdown_grace: dur(server.shutdown_grace, 10_000),
        replay_timeout: dur(server.replay_timeout, 5_000),
    };
    Ok(server)
}
