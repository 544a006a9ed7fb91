//! Wiring: builds client, hub, pipeline and gateway from a `Config` and runs them under one stop token.
//!
//! The library never binds a port or reads signals: callers pass the listener
//! and cancel the token (main does it on SIGTERM/SIGINT, tests on drop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use mongodb::options::ClientOptions;
use mongodb::Client;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::authz::{Authorizer, CachedOrderOwners, MongoOrderOwners, OrderOwners};
use crate::checkpoint::CheckpointStore;
use crate::config::{CheckpointStoreConfig, Config};
use crate::declared::StreamDecl;
use crate::declared::{OwnerBook, OwnerBookUse};
use crate::gateway::{self, Gateway};
use crate::health::Health;
use crate::hub::Hub;
use crate::idcodec::IdCodec;
use crate::mapper::{Mapper, MapperFactory};
use crate::metrics::Metrics;
use crate::pipeline::{HistoryLostPolicy, Output, Pipeline, PipelineConfig, PipelineError, WarmUp};
use crate::replay::{OplogReplayer, ReplayConfig};
use crate::source::ServerTraits;
use crate::token::StartAt;

/// How long one change-stream `getMore` waits; also the idle token's refresh period.
const MAX_AWAIT: Duration = Duration::from_secs(1);
/// Longest wait between change-stream reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most changes one oplog replay scans before answering `resync` instead.
const MAX_REPLAY_CHANGES: usize = 100_000;

/// Runtime choices from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where to start instead of the stored checkpoint.
    pub start_override: Option<StartAt>,
    /// History-lost policy.
    pub on_history_lost: HistoryLostPolicy,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            start_override: None,
            on_history_lost: HistoryLostPolicy::Fail,
        }
    }
}

/// Why the app could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The MongoDB URI or client options are invalid.
    #[error("mongodb.uri: {0}")]
    Mongo(#[source] mongodb::error::Error),
    /// The pipeline stopped for good.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Server(#[source] std::io::Error),
}

impl AppError {
    /// Whether this is history loss under the `fail` policy (its own exit code).
    pub fn is_history_lost(&self) -> bool {
        matches!(self, AppError::Pipeline(PipelineError::HistoryLost(_)))
    }

    /// Whether this is an oversized change under `mongodb.oversize = "fail"` (its own exit code).
    pub fn is_oversize(&self) -> bool {
        matches!(self, AppError::Pipeline(PipelineError::Oversize(_)))
    }
}

/// The listeners a caller bound for [`start`] (the library never binds a port).
pub struct Listeners {
    /// Clients: `/ws`, `/socket.io/`, `/healthz`.
    pub client: TcpListener,
    /// Operators: `/metrics`, `/readyz`, `/healthz`; `None` serves them nowhere.
    pub ops: Option<TcpListener>,
}

/// A running changecast.
pub struct AppHandle {
    /// Where the gateway listens.
    pub addr: SocketAddr,
    /// Where the operations listener listens, if one was given.
    pub ops_addr: Option<SocketAddr>,
    /// The hub (for tests and the demo).
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub health: Arc<Health>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
}

impl AppHandle {
    /// Starts a graceful stop (sockets closed with 1001, final checkpoint).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The stop token.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until everything has stopped; the first critical failure, if any.
    pub async fn wait(self) -> Result<(), AppError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(AppError::Pipeline(PipelineError::Task(e.to_string()))),
        }
    }
}

/// The driver client for `config`.
pub(crate) async fn mongo_client(config: &Config) -> Result<Client, AppError> {
    let mut opts = ClientOptions::parse(config.mongo.uri.expose())
        .await
        .map_err(AppError::Mongo)?;
    opts.app_name = Some("changecast".into());
    opts.connect_timeout = Some(config.mongo.connect_timeout);
    opts.server_selection_timeout = Some(config.mongo.connect_timeout);
    Client::with_options(opts).map_err(AppError::Mongo)
}

/// The key that seals event ids on the wire (see `idcodec`): shared by every replica
/// that has the same `CHANGECAST_ID_SECRET` or HMAC JWT secret, else random.
fn id_codec(config: &Config) -> IdCodec {
    match config.auth.shared_id_material() {
        Some((material, source)) => IdCodec::from_secret(&material, source),
        None => {
            tracing::warn!(
                env = crate::idcodec::ID_SECRET_ENV,
                "no shared key for event ids (asymmetric JWT keys and no id secret): ids are \
                 random per process, so a client that reconnects to another replica or after a \
                 restart is told to resync; set the same id secret on every replica"
            );
            IdCodec::random()
        }
    }
}

/// The configured checkpoint store, connecting to MongoDB only when it lives there
/// (`token show` reads a file store without a database).
pub async fn open_checkpoint_store(config: &Config) -> Result<CheckpointStore, AppError> {
    match &config.checkpoint.store {
        CheckpointStoreConfig::File { path } => Ok(CheckpointStore::file(path.clone())),
        CheckpointStoreConfig::Mongo { .. } => {
            Ok(checkpoint_store(config, &mongo_client(config).await?))
        }
    }
}

fn checkpoint_store(config: &Config, client: &Client) -> CheckpointStore {
    match &config.checkpoint.store {
        CheckpointStoreConfig::File { path } => CheckpointStore::file(path.clone()),
        CheckpointStoreConfig::Mongo { collection } => {
            let db = config
                .mongo
                .databases
                .first()
                .map(String::as_str)
                .unwrap_or("admin");
            CheckpointStore::Mongo(client.database(db).collection(collection))
        }
    }
}

/// Documents read per declared stream and database at start, to warn of room fields none has.
const ROOM_FIELD_SAMPLE: i64 = 20;

/// Warns of declared rooms whose field no sampled document holds (best effort: a
/// failed read is logged at debug and skipped; it never delays or stops the start).
async fn warn_unsampled_rooms(client: Client, databases: Vec<String>, streams: Vec<StreamDecl>) {
    use futures::TryStreamExt;
    for db in &databases {
        for s in &streams {
            let mut projection = bson::Document::new();
            for (_, path) in crate::declared::relied_on(s) {
                projection.insert(path, 1);
            }
            if projection.is_empty() {
                continue;
            }
            let found = client
                .database(db)
                .collection::<bson::Document>(&s.collection)
                .find(bson::doc! {})
                .projection(projection)
                .limit(ROOM_FIELD_SAMPLE)
                .await;
            let sample: Vec<bson::Document> = match found {
                Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(database = %db, collection = %s.collection, error = %e, "could not sample a declared stream's documents");
                    continue;
                }
            };
            for (key, field) in crate::declared::unsampled_fields(s, &sample) {
                tracing::warn!(
                    database = %db,
                    collection = %s.collection,
                    declared = key,
                    field,
                    sampled = sample.len(),
                    "no sampled document has this declared field; check [[streams]]"
                );
            }
        }
    }
}

/// The collections every change stream (live and replay) watches: the built-in
/// three, then the declared streams'.
fn watched_collections(config: &Config) -> Vec<String> {
    let c = &config.mongo.collections;
    [&c.orders, &c.payments, &c.settings]
        .into_iter()
        .chain(config.streams.iter().map(|s| &s.collection))
        .cloned()
        .collect()
}

fn mapper_factory(config: &Config, metrics: &Arc<Metrics>, book: OwnerBookUse) -> MapperFactory {
    let config = Arc::new(config.clone());
    let metrics = metrics.clone();
    Arc::new(move || Mapper::new(&config, metrics.clone()).with_owner_book(book.clone()))
}

fn pipeline(
    config: &Config,
    opts: &RunOptions,
    client: &Client,
    output: Output,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    book: &Arc<OwnerBook>,
) -> Pipeline {
    Pipeline {
        client: client.clone(),
        store: Arc::new(checkpoint_store(config, client)),
        output,
        metrics: metrics.clone(),
        health: health.clone(),
        mappers: mapper_factory(config, metrics, OwnerBookUse::Record(book.clone())),
        cfg: PipelineConfig {
            databases: config.mongo.databases.clone(),
            collections: watched_collections(config),
            max_await: MAX_AWAIT,
            checkpoint_interval: config.checkpoint.interval,
            checkpoint_every: config.checkpoint.every_events.get(),
            on_history_lost: opts.on_history_lost,
            on_oversize: config.mongo.oversize,
            routing_paths: routing_paths(config),
            document_fields: Some(document_fields(config)),
            start_override: opts.start_override.clone(),
            max_backoff: MAX_BACKOFF,
        },
        warm: None,
        server: Arc::default(),
    }
}

/// Longest a starting process spends warming its history before going live without it.
const WARM_TIMEOUT: Duration = Duration::from_secs(30);

/// Pending connections the kernel queues before `accept`. Tokio's default (1024)
/// resets connections during a reconnect storm (thousands of clients returning
/// at once after a deploy); the kernel caps it at `net.core.somaxconn` anyway.
const LISTEN_BACKLOG: u32 = 8192;

/// Binds the client listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (a
/// restart can bind while old connections sit in TIME_WAIT).
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Starts the worker: pipeline into the hub, gateway on `listeners.client` (with
/// `extra` routes merged), operations routes on `listeners.ops`.
pub async fn start(
    config: &Config,
    opts: RunOptions,
    listeners: Listeners,
    extra: Option<Router>,
) -> Result<AppHandle, AppError> {
    let Listeners {
        client: listener,
        ops: ops_listener,
    } = listeners;
    let addr = listener.local_addr().map_err(AppError::Server)?;
    let ops_addr = match &ops_listener {
        Some(l) => Some(l.local_addr().map_err(AppError::Server)?),
        None => None,
    };
    let client = mongo_client(config).await?;
    let metrics = Arc::new(Metrics::new());
    let watched = watched_collections(config);
    metrics.init_known(&watched.iter().map(String::as_str).collect::<Vec<_>>());
    metrics.init_events(config.streams.iter().flat_map(|s| s.events.all()));
    let health = Arc::new(Health::new(
        config.mongo.databases.iter().map(String::as_str),
    ));
    let stop = CancellationToken::new();

    let orders: Vec<_> = config
        .mongo
        .databases
        .iter()
        .map(|db| {
            client
                .database(db)
                .collection(&config.mongo.collections.orders)
        })
        .collect();
    let f = &config.fields;
    let owners = MongoOrderOwners::new(
        orders,
        f.customer.clone(),
        f.store.clone(),
        config.auth.order_lookup.timeout,
    );
    let owners: Arc<dyn OrderOwners> =
        Arc::new(CachedOrderOwners::new(owners, &config.auth.order_lookup));
    let book = Arc::new(OwnerBook::new(config.normalize.state_cache_docs));
    let ids = Arc::new(id_codec(config));
    let hub = Arc::new(Hub::new(config.hub.clone(), metrics.clone()).with_ids(ids.clone()));
    let server = Arc::new(ServerTraits::default());
    let replayer = OplogReplayer::start(ReplayConfig {
        client: client.clone(),
        server: server.clone(),
        databases: config.mongo.databases.clone(),
        collections: watched_collections(config),
        document_fields: Some(document_fields(config)),
        // Replays get metrics of their own: the changes they re-read were counted live.
        mappers: mapper_factory(
            config,
            &Arc::new(Metrics::new()),
            OwnerBookUse::Consult(book.clone()),
        ),
        max_changes: MAX_REPLAY_CHANGES,
        ids,
        metrics: metrics.clone(),
    });
    let gw = Arc::new(Gateway {
        hub: hub.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        verifier: Arc::new(Verifier::new(&config.auth)),
        authz: Arc::new(Authorizer::new(
            owners.clone(),
            config.auth.allow_anonymous_storefront,
        )),
        replayer: Some(Arc::new(replayer)),
        cfg: config.server.clone(),
        allow_query_token: config.auth.allow_query_token,
        limits: Arc::default(),
        stop: stop.child_token(),
        tracker: TaskTracker::new(),
        sio: config.socketio.clone(),
    });
    let router = gateway::router_with(gw.clone(), extra);

    let mut pipe = pipeline(
        config,
        &opts,
        &client,
        Output::Hub(hub.clone()),
        &metrics,
        &health,
        &book,
    );
    // The live stream keeps the ownership cache current: a change that moves an order
    // replaces the cached owners at once (replays re-read the past and must not).
    pipe.server = server;
    let live = pipe.mappers.clone();
    pipe.mappers = Arc::new(move || live().with_owner_observer(owners.clone()));
    // Warm history needs one order for all history: with several databases their
    // streams' events do not interleave in id order, so it is left off there.
    if config.mongo.databases.len() == 1 {
        pipe.warm = Some(WarmUp {
            mappers: mapper_factory(
                config,
                &Arc::new(Metrics::new()),
                OwnerBookUse::Record(book.clone()),
            ),
            age: config.hub.history_age,
            max_changes: config
                .hub
                .history_len
                .get()
                .saturating_mul(2)
                .saturating_add(1_000),
            timeout: WARM_TIMEOUT,
        });
    }
    if !config.streams.is_empty() {
        let check = warn_unsampled_rooms(
            client.clone(),
            config.mongo.databases.clone(),
            config.streams.clone(),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = check => {}
                () = stop.cancelled() => {}
            }
        });
    }
    let grace = config.server.shutdown_grace;
    let task_stop = stop.clone();
    let task = tokio::spawn(async move {
        let server = {
            let (gw, stop) = (gw.clone(), task_stop.clone());
            tokio::spawn(async move {
                let r = gateway::serve(listener, router, gw, grace).await;
                // The gateway is critical too: if it dies, everything stops.
                stop.cancel();
                r
            })
        };
        // The operations listener is critical as well: without it nobody sees readiness.
        let ops_server = ops_listener.map(|l| {
            let (gw, stop) = (gw.clone(), task_stop.clone());
            tokio::spawn(async move {
                let r = gateway::ops::serve(l, gw, stop.clone()).await;
                stop.cancel();
                r
            })
        });
        let pipe_stop = task_stop.clone();
        let mut piped = tokio::spawn(async move { pipe.run(pipe_stop).await });
        let pipe_result = tokio::select! {
            r = &mut piped => {
                // The pipeline ended on its own: a critical failure stops the gateway.
                task_stop.cancel();
                flatten(r)
            }
            // A stop: the pipeline flushes its checkpoint, sessions close with 1001,
            // both within the grace period (a checkpoint store that hangs must not hold the exit).
            _ = task_stop.cancelled() => match tokio::time::timeout(grace, &mut piped).await {
                Ok(r) => flatten(r),
                Err(_) => {
                    piped.abort();
                    Err(PipelineError::Task(
                        "the pipeline did not stop within server.shutdown_grace; the final checkpoint may not be saved".into(),
                    ))
                }
            },
        };
        let server_result = flatten_io(server.await);
        let ops_result = match ops_server {
            Some(t) => flatten_io(t.await),
            None => Ok(()),
        };
        pipe_result
            .map_err(AppError::from)
            .and(server_result)
            .and(ops_result)
    });
    Ok(AppHandle {
        addr,
        ops_addr,
        hub,
        metrics,
        health,
        stop,
        task,
    })
}

fn flatten(
    r: Result<Result<(), PipelineError>, tokio::task::JoinError>,
) -> Result<(), PipelineError> {
    r.unwrap_or_else(|e| Err(PipelineError::Task(e.to_string())))
}

fn flatten_io(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), AppError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AppError::Server(e)),
        Err(e) => Err(AppError::Pipeline(PipelineError::Task(e.to_string()))),
    }
}

/// `changecast tail`: the pipeline printing routed events to stdout, no sockets.
pub async fn tail(
    config: &Config,
    opts: RunOptions,
    stop: CancellationToken,
) -> Result<(), AppError> {
    let client = mongo_client(config).await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(
        config.mongo.databases.iter().map(String::as_str),
    ));
    // `tail` serves no replays; its book is only written.
    let book = Arc::new(OwnerBook::new(0));
    pipeline(
        config,
        &opts,
        &client,
        Output::Stdout,
        &metrics,
        &health,
        &book,
    )
    .run(stop)
    .await
    .map_err(AppError::from)
}

/// The top-level fields of the watched documents that mapping reads: routing paths,
/// status and type fields, every audience's allowlist, settings sections and declared
/// streams' fields. The server leaves the rest out of the change events (`$project`),
/// so a wide or large document costs neither transfer nor decoding, nor brings an event
/// near 16 MiB. Whole top-level fields, never sub-paths: what routing then reads of a
/// field is exactly what the document held.
fn document_fields(config: &Config) -> Arc<[String]> {
    let r = &config.routing;
    let lists = |a: &crate::config::Allowlists| {
        [&a.customer, &a.store, &a.order, &a.admin]
            .into_iter()
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
    };
    let declared = config.streams.iter().flat_map(|s| {
        let a = &s.allow;
        [&a.customer, &a.store, &a.order, &a.storefront, &a.admin]
            .into_iter()
            .flatten()
            .cloned()
            .chain(
                s.status
                    .iter()
                    .flat_map(|st| std::iter::once(st.field.clone()).chain(st.type_field.clone())),
            )
            .collect::<Vec<_>>()
    });
    let mut top: Vec<String> = routing_paths(config)
        .into_iter()
        .chain(lists(&r.orders))
        .chain(lists(&r.payments))
        .chain(
            r.settings_sections
                .iter()
                .flat_map(|s| s.fields.iter().cloned()),
        )
        .chain(declared)
        .chain(["_id".to_owned()])
        .map(|p| p.split('.').next().unwrap_or_default().to_owned())
        .filter(|f| !f.is_empty())
        .collect();
    top.sort();
    top.dedup();
    top.into()
}

/// Every document path routing reads (`[fields]`): what an oversized change keeps of its
/// documents when it is looked at to tell its rooms.
fn routing_paths(config: &Config) -> Vec<String> {
    let f = &config.fields;
    // A declared stream's room fields and tracked fields too: the skipped change's
    // rooms come from them, and its tracked values are remembered from them.
    let declared = config.streams.iter().flat_map(|s| {
        s.rooms
            .keyed()
            .map(|(_, p)| p.to_owned())
            .chain(s.tracked.iter().cloned())
    });
    let mut paths: Vec<String> = f
        .customer
        .iter()
        .chain(&f.store)
        .chain(&f.order_id)
        .chain(&f.settings_store)
        .chain([&f.status, &f.order_type, &f.payment_status])
        .cloned()
        .chain(declared)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}
