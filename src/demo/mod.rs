//! `changecast demo`: the dashboard's embedded assets, its demo tokens and the traffic generator; the pipeline itself is the normal one.
//!
//! The page is static HTML/CSS/JS compiled into the binary (no build step).
//! The only thing generated at run time is a small `window.CHANGECAST_DEMO`
//! script carrying the demo's tokens, injected into the HTML. The page talks
//! to changecast through the public interfaces only: `/ws` (native protocol)
//! and `/socket.io/`; its operations panel reads the metrics at `/demo/metrics`
//! (see [`DemoMetrics`] for why there and not `/metrics`).
//!
//! [`run_demo`] is the `changecast demo` command: an embedded mongo-sim, the
//! ordinary app (`crate::app::start`) with a generated config, the traffic
//! generator and these assets, until Ctrl-C.

pub(crate) mod traffic;

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::{self, RunOptions};
use crate::cli::DemoArgs;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use traffic::{TrafficConfig, FOCUS_CUSTOMER, FOCUS_STORE, VISITOR};

/// Version of the vendored `socket.io-client` build (`assets/socket.io.min.js`, MIT, from npm).
pub(crate) const SOCKET_IO_CLIENT_VERSION: &str = "4.8.4";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const SOCKET_IO_JS: &str = include_str!("assets/socket.io.min.js");
/// Where `index.html` wants the injected config script.
const CONFIG_PLACEHOLDER: &str = "<!-- CHANGECAST_DEMO -->";

/// How long the demo's tokens are valid: a working day, so a demo left open keeps working.
const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Longest wait for the change stream to open before traffic starts anyway.
const READY_WAIT: Duration = Duration::from_secs(10);
/// Database the demo traffic writes to and changecast watches.
const DEMO_DATABASE: &str = "app";

/// The `auth.secret_env` of the demo's config. Only the demo answers it (with its
/// random secret); it is deliberately not `CHANGECAST_JWT_SECRET`.
const DEMO_SECRET_ENV: &str = "CHANGECAST_DEMO_ONLY_SECRET";

/// Subject of the store owner's token.
const STORE_OWNER: &str = "owner-s1";

/// Tokens and ids the dashboard uses, minted by [`mint_tokens`]. `Debug` never prints the tokens.
#[derive(Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DemoTokens {
    /// JWT of customer [`traffic::FOCUS_CUSTOMER`] (role `customer`, no stores).
    pub(crate) customer_token: String,
    /// JWT of the owner of store [`traffic::FOCUS_STORE`] (role `store`, `stores: [id]`).
    pub(crate) store_token: String,
    /// JWT of a storefront visitor (role `visitor`, no stores).
    pub(crate) visitor_token: String,
    /// The customer the tracker follows.
    pub(crate) customer_id: String,
    /// The store the board and the storefront preview show.
    pub(crate) store_id: String,
    /// The visitor's subject.
    pub(crate) visitor_id: String,
    /// When the tokens expire, seconds since the Unix epoch.
    pub(crate) expires_at: u64,
}

impl fmt::Debug for DemoTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoTokens")
            .field("customer_id", &self.customer_id)
            .field("store_id", &self.store_id)
            .field("visitor_id", &self.visitor_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    role: &'a str,
    stores: Vec<&'a str>,
    iat: u64,
    exp: u64,
}

/// Mints HS256 tokens (claims `sub`, `role`, `stores`, `iat`, `exp`) for the demo's
/// customer, store owner and visitor, valid for `ttl` from now.
///
/// The claim names are changecast's defaults, so the demo config needs no `[auth]` claim settings.
pub(crate) fn mint_tokens(
    secret: &[u8],
    ttl: Duration,
) -> Result<DemoTokens, jsonwebtoken::errors::Error> {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let exp = iat.saturating_add(ttl.as_secs());
    let key = EncodingKey::from_secret(secret);
    let header = Header::new(Algorithm::HS256);
    let sign = |sub: &str, role: &str, stores: Vec<&str>| {
        jsonwebtoken::encode(
            &header,
            &Claims {
                sub,
                role,
                stores,
                iat,
                exp,
            },
            &key,
        )
    };
    Ok(DemoTokens {
        customer_token: sign(FOCUS_CUSTOMER, "customer", vec![])?,
        store_token: sign(STORE_OWNER, "store", vec![FOCUS_STORE])?,
        visitor_token: sign(VISITOR, "visitor", vec![])?,
        customer_id: FOCUS_CUSTOMER.into(),
        store_id: FOCUS_STORE.into(),
        visitor_id: VISITOR.into(),
        expires_at: exp,
    })
}

/// The registry the operations panel charts, served on the demo's client listener at
/// `/demo/metrics`.
///
/// `/metrics` itself stays on the operations listener only, in the demo as in `run`: the
/// page cannot reach that listener (another port, no CORS, and the port is random), and
/// answering CORS there in demo mode would make the ops listener's behaviour depend on
/// the mode. Instead this route exists only in [`assets_router`], which only `demo`
/// mounts, so `run`'s client listener keeps answering 404 for every metrics path. What
/// it exposes is the demo's own embedded database, as public as the demo's tokens.
///
/// The router is built before `app::start` creates the registry, hence the `OnceLock`:
/// filled once by [`serve_demo`], `503` until then.
#[derive(Clone, Default)]
pub(crate) struct DemoMetrics(Arc<OnceLock<(Arc<Metrics>, Arc<Health>)>>);

impl DemoMetrics {
    /// Points the route at the running app's registry; later calls are ignored.
    pub(crate) fn set(&self, metrics: Arc<Metrics>, health: Arc<Health>) {
        let _ = self.0.set((metrics, health));
    }

    /// The same text `/metrics` answers, with the time-derived gauges (lag, checkpoint
    /// age) refreshed as a scrape of `/metrics` refreshes them. The one gauge it does not
    /// refresh is `unauthenticated_connections` (the gateway's limits are private to it),
    /// which the panel does not chart.
    fn scrape(&self) -> Response {
        let Some((metrics, health)) = self.0.get() else {
            return (StatusCode::SERVICE_UNAVAILABLE, "changecast is starting\n").into_response();
        };
        health.refresh_gauges(metrics);
        (
            [
                (
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                (header::CACHE_CONTROL, "no-store"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            metrics.encode(),
        )
            .into_response()
    }
}

/// The dashboard's routes, to merge into the gateway's router:
/// `/` (HTML with the injected `window.CHANGECAST_DEMO`), `/demo/app.js`,
/// `/demo/style.css`, `/demo/socket.io.min.js`, `/demo/tokens.json` (the
/// same tokens, for a page that outlived a demo restart and whose old tokens
/// were refused) and `/demo/metrics` (see [`DemoMetrics`]).
pub(crate) fn assets_router(tokens: DemoTokens, metrics: DemoMetrics) -> Router {
    let html = Bytes::from(render_index(&tokens));
    let tokens_json = Bytes::from(serde_json::to_string(&tokens).unwrap_or_default());
    Router::new()
        .route(
            "/demo/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.scrape() }
            }),
        )
        .route(
            "/",
            get(move || {
                let html = html.clone();
                async move { dynamic("text/html; charset=utf-8", html) }
            }),
        )
        .route(
            "/demo/tokens.json",
            get(move || {
                let json = tokens_json.clone();
                async move { dynamic("application/json", json) }
            }),
        )
        .route(
            "/demo/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/demo/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/demo/socket.io.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", SOCKET_IO_JS) }),
        )
}

/// `changecast demo`: binds `args.listen`, runs [`serve_demo`] until Ctrl-C or SIGTERM.
///
/// The HS256 secret is 32 random bytes made at every start, never the operator's
/// `CHANGECAST_JWT_SECRET`: the demo hands its tokens (a store owner's among them)
/// to anyone who loads `/demo/tokens.json`, so they must be valid nowhere else.
/// A page left open across a restart is refused (45xx), fetches the new tokens
/// and reconnects. mongo-sim lives in this process, so a restart loses the data too.
pub async fn run_demo(args: &DemoArgs) -> anyhow::Result<()> {
    // Checked here too so a bad flag fails before anything starts, not after the banner.
    if !traffic::RATE_RANGE.contains(&args.rate) {
        anyhow::bail!(
            "--rate {} is outside {}..={} writes per second",
            args.rate,
            traffic::RATE_RANGE.start(),
            traffic::RATE_RANGE.end()
        );
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let listener = app::bind_listener(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let stop = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(stop.clone()));
    let r = serve_demo(listener, args.rate, &secret, stop).await;
    signals.abort();
    r
}

/// The first Ctrl-C or SIGTERM stops the demo gracefully; a second exits at
/// once, as `changecast run` does, so a stuck shutdown never traps the user.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    // Without a SIGTERM handler, Ctrl-C still works; a supervisor's SIGTERM then
    // kills the process outright, which is what it would do after its timeout anyway.
    let mut term = signal(SignalKind::terminate()).ok();
    for n in 0u32.. {
        let term_recv = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let ctrl_c = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = ctrl_c => {}
            () = term_recv => {}
        }
        if n == 0 {
            println!("signal received: stopping (send again to exit at once)");
            stop.cancel();
        } else {
            std::process::exit(i32::from(crate::cli::exit::FAILURE));
        }
    }
}

/// The demo on `listener` until `stop` fires: mongo-sim on a free loopback
/// port, changecast with a generated config (the same config, pipeline and
/// gateway users run) plus the dashboard routes, and `rate` writes per second
/// of traffic. `secret` is the HS256 secret both the config and the page's
/// tokens use; it is handed to the config as `CHANGECAST_JWT_SECRET` would be.
pub(crate) async fn serve_demo(
    listener: TcpListener,
    rate: f64,
    secret: &str,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let traffic_cfg = TrafficConfig {
        database: DEMO_DATABASE.into(),
        rate_per_sec: rate,
        ..TrafficConfig::default()
    };
    let addr = listener.local_addr()?;
    let sim = mongo_sim::MongoSim::start(mongo_sim::SimConfig {
        port: 0,
        ..Default::default()
    })
    .await
    .context("cannot start the embedded mongo-sim")?;
    let uri = sim.uri();
    let config = demo_config(&uri, addr, secret)?;
    let tokens =
        mint_tokens(secret.as_bytes(), TOKEN_TTL).context("cannot sign the demo tokens")?;
    // The operations routes on a loopback port of their own, as `run` serves them.
    let ops = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .context("cannot bind the operations listener")?;
    let listeners = app::Listeners {
        client: listener,
        ops: Some(ops),
    };
    let demo_metrics = DemoMetrics::default();
    let handle = app::start(
        &config,
        RunOptions::default(),
        listeners,
        Some(assets_router(tokens, demo_metrics.clone())),
    )
    .await
    .context("cannot start changecast")?;
    demo_metrics.set(handle.metrics.clone(), handle.health.clone());

    // Traffic written before the change stream opens would never reach the page.
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    while !handle.health.is_ready() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let client = app::mongo_client(&config).await?;
    let traffic_stop = stop.child_token();
    let mut traffic = tokio::spawn(traffic::run(
        client,
        traffic_cfg.clone(),
        traffic_stop.clone(),
    ));

    let p = traffic_cfg.principals();
    println!("changecast demo");
    println!("  embedded MongoDB   mongo-sim at {uri}");
    println!(
        "  traffic            {rate} writes/s into `{DEMO_DATABASE}`: orders, payments and settings of stores {} for customers {}, and {FOCUS_CUSTOMER}'s balance (a declared stream)",
        p.stores.join(", "),
        p.customers.join(", ")
    );
    println!("  changecast         /ws (native), /socket.io/, /healthz, /demo/metrics (the page's charts)");
    if let Some(ops) = handle.ops_addr {
        println!("  operations         http://{ops}/metrics, /readyz");
    }
    println!(
        "  dashboard          {}  (store {FOCUS_STORE}, customer {FOCUS_CUSTOMER}, storefront visitor)",
        page_url(addr)
    );
    println!("Ctrl-C to stop.");

    let app_stop = handle.stop_token();
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        _ = app_stop.cancelled() => Err(anyhow::anyhow!("changecast stopped unexpectedly")),
        r = &mut traffic => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("demo traffic failed")),
            Err(e) => Err(anyhow::anyhow!("demo traffic task failed: {e}")),
        },
    };
    println!("stopping: closing sockets, saving the checkpoint, stopping mongo-sim…");
    traffic_stop.cancel();
    handle.stop();
    let app_result = handle.wait().await;
    if !traffic.is_finished() {
        let _ = traffic.await;
    }
    sim.shutdown().await;
    println!("stopped.");
    outcome?;
    app_result.context("changecast")?;
    Ok(())
}

/// The demo's configuration: the example defaults plus the sim's URI, a
/// checkpoint in the sim itself (no file left behind), a short shutdown grace and
/// the example's declared `users` stream (the tracker's balance).
/// The secret is supplied as the value of `secret_env`, the way users supply it,
/// but under a name of the demo's own that only this closure answers: the process
/// environment is never read for it.
fn demo_config(uri: &str, listen: SocketAddr, secret: &str) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[mongodb]
uri = "{uri}"
databases = ["{DEMO_DATABASE}"]
connect_timeout = "5s"

[checkpoint]
store = "mongo"
interval = "1s"

[server]
listen = "{listen}"
shutdown_grace = "2s"

[auth]
algorithms = ["HS256"]
secret_env = "{DEMO_SECRET_ENV}"

# One declared stream, config.example.toml's: the customer's balance on the tracker.
[[streams]]
collection = "{USERS}"
module = "balance"
tracked = ["balance"]

[streams.rooms]
customer = "_id"

[streams.allow]
customer = ["_id", "balance", "currency"]
"#,
        USERS = traffic::USERS_COLLECTION
    );
    let env = |name: &str| (name == DEMO_SECRET_ENV).then(|| OsString::from(secret));
    Config::from_toml_str_with_env(&text, "<demo config>", &env).context("demo config")
}

/// The URL to open: a wildcard listen address is reachable on loopback.
fn page_url(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("http://{host}:{}/", addr.port())
}

/// Responses carrying tokens: never cached, so a restarted demo's page gets the new ones.
fn dynamic(content_type: &'static str, body: Bytes) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

/// Static assets; `no-cache` so a rebuilt binary's assets are picked up on reload.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// `index.html` with the config script in place of its placeholder.
fn render_index(tokens: &DemoTokens) -> String {
    let mut cfg = serde_json::to_value(tokens).unwrap_or_default();
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert(
            "socketIoClientVersion".into(),
            SOCKET_IO_CLIENT_VERSION.into(),
        );
    }
    // Inside <script>, `</script>` or `<!--` in a value would end or derail the
    // element; JSON allows escaping `<`, `>` and `&`, so no value can.
    let json = cfg
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let script = format!("<script>window.CHANGECAST_DEMO = {json};</script>");
    INDEX_HTML.replacen(CONFIG_PLACEHOLDER, &script, 1)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use jsonwebtoken::{DecodingKey, Validation};
    use tower::ServiceExt;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[derive(serde::Deserialize, Debug)]
    struct Decoded {
        sub: String,
        role: String,
        stores: Vec<String>,
        iat: u64,
        exp: u64,
    }

    fn decode(token: &str) -> Decoded {
        let mut v = Validation::new(Algorithm::HS256);
        v.required_spec_claims = ["exp", "sub"].into_iter().map(String::from).collect();
        jsonwebtoken::decode::<Decoded>(token, &DecodingKey::from_secret(SECRET), &v)
            .unwrap()
            .claims
    }

    #[test]
    fn tokens_carry_the_demo_principals() {
        let t = mint_tokens(SECRET, Duration::from_secs(3600)).unwrap();
        let c = decode(&t.customer_token);
        assert_eq!((c.sub.as_str(), c.role.as_str()), ("c1", "customer"));
        assert!(c.stores.is_empty());
        assert_eq!(c.exp - c.iat, 3600);
        let s = decode(&t.store_token);
        assert_eq!(
            (s.role.as_str(), s.stores.clone()),
            ("store", vec!["s1".to_owned()])
        );
        let v = decode(&t.visitor_token);
        assert_eq!((v.sub.as_str(), v.role.as_str()), ("visitor-1", "visitor"));
        assert_eq!((t.customer_id.as_str(), t.store_id.as_str()), ("c1", "s1"));
        // A token signed with another secret is refused.
        let other =
            mint_tokens(b"another secret, also 32 bytes ok", Duration::from_secs(60)).unwrap();
        let mut val = Validation::new(Algorithm::HS256);
        val.required_spec_claims.clear();
        assert!(jsonwebtoken::decode::<Decoded>(
            &other.store_token,
            &DecodingKey::from_secret(SECRET),
            &val
        )
        .is_err());
    }

    #[test]
    fn debug_hides_tokens() {
        let t = mint_tokens(SECRET, Duration::from_secs(60)).unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&t.customer_token[..20]), "{dbg}");
        assert!(dbg.contains("c1"));
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, String, String) {
        let res = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let ct = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serves_page_with_injected_tokens_and_assets() {
        let tokens = mint_tokens(SECRET, Duration::from_secs(60)).unwrap();
        let router = assets_router(tokens.clone(), DemoMetrics::default());

        let (status, ct, html) = get(&router, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct, "text/html; charset=utf-8");
        assert!(!html.contains(CONFIG_PLACEHOLDER));
        let start =
            html.find("window.CHANGECAST_DEMO = ").unwrap() + "window.CHANGECAST_DEMO = ".len();
        let end = start + html[start..].find(";</script>").unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&html[start..end]).unwrap();
        assert_eq!(cfg["customerToken"], tokens.customer_token.as_str());
        assert_eq!(cfg["storeToken"], tokens.store_token.as_str());
        assert_eq!(cfg["visitorToken"], tokens.visitor_token.as_str());
        assert_eq!(cfg["storeId"], "s1");
        assert_eq!(cfg["socketIoClientVersion"], SOCKET_IO_CLIENT_VERSION);
        // The page loads exactly the assets this router serves.
        for src in ["/demo/app.js", "/demo/style.css", "/demo/socket.io.min.js"] {
            assert!(html.contains(src), "{src} not referenced");
        }

        let (status, ct, js) = get(&router, "/demo/app.js").await;
        assert_eq!(
            (status, ct.as_str()),
            (StatusCode::OK, "text/javascript; charset=utf-8")
        );
        assert!(js.contains("CHANGECAST_DEMO"));
        let (_, ct, _) = get(&router, "/demo/style.css").await;
        assert_eq!(ct, "text/css; charset=utf-8");
        let (status, _, sio) = get(&router, "/demo/socket.io.min.js").await;
        assert_eq!(status, StatusCode::OK);
        assert!(sio.contains(&format!("Socket.IO v{SOCKET_IO_CLIENT_VERSION}")));

        let (status, ct, json) = get(&router, "/demo/tokens.json").await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, "application/json"));
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["visitorToken"], tokens.visitor_token.as_str());

        let (status, _, _) = get(&router, "/demo/nope.js").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// `/demo/metrics` answers the registry's text once the app is set, 503 before;
    /// the router adds nothing at `/metrics`, which stays on the operations listener.
    #[tokio::test]
    async fn serves_the_registry_for_the_operations_panel() {
        let tokens = mint_tokens(SECRET, Duration::from_secs(60)).unwrap();
        let source = DemoMetrics::default();
        let router = assets_router(tokens, source.clone());
        let (status, _, _) = get(&router, "/demo/metrics").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

        let metrics = Arc::new(Metrics::new());
        metrics.init_known(&["orders"]);
        metrics.delivered(crate::metrics::Wire::Native);
        let health = Arc::new(Health::new(["app"]));
        // A change seen ten seconds ago: the scrape must refresh the lag gauge from it.
        let ten_ago = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 10;
        health.observe_cluster_time(u32::try_from(ten_ago).unwrap());
        source.set(metrics, health);
        let (status, ct, text) = get(&router, "/demo/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        assert!(
            text.contains("changecast_deliveries_total{wire=\"native\"} 1"),
            "{text}"
        );
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("changecast_stream_lag_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no lag sample in {text}"));
        assert!((9.0..60.0).contains(&lag), "lag {lag}");
        for path in ["/metrics", "/demo/metrics/", "/readyz"] {
            let (status, _, _) = get(&router, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn ws_auth(addr: SocketAddr, token: &str) -> (Ws, serde_json::Value) {
        use futures::SinkExt;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        let auth = serde_json::json!({"type": "auth", "token": token}).to_string();
        ws.send(tokio_tungstenite::tungstenite::Message::text(auth))
            .await
            .unwrap();
        let welcome = next_json(&mut ws).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }

    async fn next_json(ws: &mut Ws) -> serde_json::Value {
        use futures::StreamExt;
        loop {
            let m = ws.next().await.expect("socket open").expect("frame");
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    /// The next `event` the socket receives; panics after 60 s.
    async fn next_event(ws: &mut Ws, event: &str) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let m = next_json(ws).await;
                if m["type"] == "event" && m["event"] == event {
                    return m;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {event} within 60s"))
    }

    /// End to end through the public interfaces: the demo's traffic reaches a
    /// store owner's socket as normalized events, the storefront room gets
    /// public settings only, the page is served with working tokens, and a
    /// stop shuts everything down cleanly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn demo_runs_end_to_end_and_stops_cleanly() {
        use futures::SinkExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let demo = tokio::spawn(serve_demo(
            listener,
            25.0,
            std::str::from_utf8(SECRET).unwrap(),
            stop.clone(),
        ));
        let tokens = mint_tokens(SECRET, Duration::from_secs(600)).unwrap();

        let html = http_get(addr, "/").await;
        assert!(html.starts_with("HTTP/1.1 200"), "{html}");
        assert!(html.contains("window.CHANGECAST_DEMO = "));
        // The Socket.IO layer still answers beside the demo's routes (an
        // Engine.IO handshake needs no token; the namespace connect does).
        let eio = http_get(addr, "/socket.io/?EIO=4&transport=polling").await;
        assert!(eio.starts_with("HTTP/1.1 200"), "{eio}");
        assert!(eio.contains("\"sid\""), "{eio}");

        let (mut store, welcome) = ws_auth(addr, &tokens.store_token).await;
        assert!(
            welcome["rooms"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "store:s1"),
            "{welcome}"
        );
        let (mut visitor, _) = ws_auth(addr, &tokens.visitor_token).await;
        let sub = serde_json::json!({"type": "subscribe", "room": "storefront:s1"}).to_string();
        visitor
            .send(tokio_tungstenite::tungstenite::Message::text(sub))
            .await
            .unwrap();

        let canonical = [
            "pending",
            "processing",
            "ready_for_pickup",
            "ready_for_delivery",
            "in_transit",
            "delivered",
            "cancelled",
        ];
        let moved = next_event(&mut store, "order:status_changed").await;
        assert_eq!(moved["room"], "store:s1");
        let status = moved["data"]["status"].as_str().unwrap();
        assert!(canonical.contains(&status), "{moved}");
        assert!(moved["data"]["rawStatus"].is_string(), "{moved}");
        assert!(
            moved["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{moved}"
        );

        let private = [
            "paymentProvider",
            "taxEnabled",
            "shippingPrice",
            "customDomain",
            "warehouseCity",
        ];
        let settings = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let m = next_json(&mut visitor).await;
                assert_ne!(m["type"], "error", "{m}");
                if m["type"] == "event" {
                    return m;
                }
            }
        })
        .await
        .expect("no storefront event within 60s");
        assert_eq!(settings["room"], "storefront:s1");
        assert_eq!(settings["event"], "settings:updated");
        for k in private {
            assert!(
                settings["data"].get(k).is_none(),
                "{k} leaked to the storefront: {settings}"
            );
        }

        // The declared stream: the customer's balance, its old and new value and their difference.
        let (mut customer, _) = ws_auth(addr, &tokens.customer_token).await;
        let balance = next_event(&mut customer, "balance:updated").await;
        assert_eq!(balance["room"], "customer:c1");
        let t = &balance["data"]["tracked"]["balance"];
        assert_eq!(t["known"], true, "{balance}");
        let (old, new) = (t["old"].as_i64().unwrap(), t["new"].as_i64().unwrap());
        assert_eq!(t["delta"].as_i64(), Some(new - old), "{balance}");
        assert_ne!(old, new, "{balance}");

        // The panel's source on the client listener counts what this test received;
        // `/metrics` stays off it, as in `run`.
        let scrape = http_get(addr, "/demo/metrics").await;
        assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
        let native: f64 = scrape
            .lines()
            .find_map(|l| l.strip_prefix("changecast_deliveries_total{wire=\"native\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no native deliveries in {scrape}"));
        assert!(native >= 2.0, "{native}");
        assert!(
            scrape.contains("changecast_stream_lag_seconds "),
            "{scrape}"
        );
        let metrics = http_get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 404"), "{metrics}");

        stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), demo)
            .await
            .expect("demo did not stop");
        r.unwrap().unwrap();
    }

    #[test]
    fn injected_values_cannot_close_the_script() {
        let mut t = mint_tokens(SECRET, Duration::from_secs(60)).unwrap();
        t.store_id = "</script><script>alert(1)</script>".into();
        let html = render_index(&t);
        assert_eq!(
            html.matches("</script>").count(),
            INDEX_HTML.matches("</script>").count() + 1
        );
    }
}
