//! Test backends: a fresh mongo-sim per test, or the server in `TEST_MONGODB_URI`
//! (`TEST_BACKEND=secantus` for SecantusDB), each test in its own database.

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use mongo_sim::{MongoSim, SimConfig, SimHandle};
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

/// Which server the tests talk to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// mongo-sim started by the test.
    Sim,
    /// SecantusDB at `TEST_MONGODB_URI`.
    Secantus,
    /// A real replica set at `TEST_MONGODB_URI`.
    Real,
}

/// A server and a client connected to it.
pub struct Backend {
    pub kind: Kind,
    pub uri: String,
    pub client: Client,
    pub sim: Option<SimHandle>,
    pub db_name: String,
    /// Held for the test's life on SecantusDB: see [`SECANTUS_ONE_AT_A_TIME`].
    _serial: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// SecantusDB starts a stream opened without a start point at its *visible tail*: below the
/// oldest write still in flight on any collection. While another test's write is in flight,
/// a stream opened after this test's acknowledged write therefore returns that write too
/// (mongod starts after it). The tests assert mongod's start point, so on SecantusDB they
/// run one at a time; the difference is listed in the README. (changecast itself opens at
/// an explicit operation time, where SecantusDB is exact.)
static SECANTUS_ONE_AT_A_TIME: LazyLock<Arc<tokio::sync::Mutex<()>>> =
    LazyLock::new(|| Arc::new(tokio::sync::Mutex::new(())));

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn external() -> Option<(String, Kind)> {
    let uri = std::env::var("TEST_MONGODB_URI")
        .ok()
        .filter(|u| !u.is_empty())?;
    let kind = match std::env::var("TEST_BACKEND").as_deref() {
        Ok("secantus") => Kind::Secantus,
        _ => Kind::Real,
    };
    Some((uri, kind))
}

/// Whether the tests run against mongo-sim.
pub fn is_sim() -> bool {
    external().is_none()
}

/// Connects a client with short timeouts so a dead server fails the test quickly.
pub async fn client(uri: &str) -> Client {
    let mut opts = ClientOptions::parse(uri).await.expect("valid uri");
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    opts.app_name = Some("mongo-sim-tests".to_owned());
    Client::with_options(opts).expect("client")
}

/// The backend for test `name` with the default sim configuration.
pub async fn backend(name: &str) -> Backend {
    backend_with(name, SimConfig::default()).await
}

/// The backend for test `name`; `cfg` is used when the backend is mongo-sim.
pub async fn backend_with(name: &str, cfg: SimConfig) -> Backend {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let db_name = format!(
        "t_{}_{}_{}",
        name.chars().take(30).collect::<String>(),
        std::process::id(),
        n
    );
    match external() {
        Some((uri, kind)) => {
            let serial = match kind {
                Kind::Secantus => Some(SECANTUS_ONE_AT_A_TIME.clone().lock_owned().await),
                _ => None,
            };
            let client = client(&uri).await;
            Backend {
                kind,
                uri,
                client,
                sim: None,
                db_name,
                _serial: serial,
            }
        }
        None => {
            let sim = MongoSim::start(cfg).await.expect("start mongo-sim");
            let uri = sim.uri();
            let client = client(&uri).await;
            Backend {
                kind: Kind::Sim,
                uri,
                client,
                sim: Some(sim),
                db_name,
                _serial: None,
            }
        }
    }
}

impl Backend {
    /// This test's database.
    pub fn db(&self) -> Database {
        self.client.database(&self.db_name)
    }

    /// Whether `configureFailPoint` may be used: always on mongo-sim, on a real server only
    /// when `TEST_MONGODB_FAILPOINTS=1` (it needs `enableTestCommands`), never on SecantusDB.
    pub fn failpoints(&self) -> bool {
        match self.kind {
            Kind::Sim => true,
            Kind::Real => std::env::var("TEST_MONGODB_FAILPOINTS").as_deref() == Ok("1"),
            Kind::Secantus => false,
        }
    }

    /// Sets `failCommand`.
    pub async fn fail_command(&self, mode: mongodb::bson::Bson, data: Document) {
        self.client
            .database("admin")
            .run_command(doc! {"configureFailPoint": "failCommand", "mode": mode, "data": data})
            .await
            .expect("configureFailPoint");
    }

    /// Turns `failCommand` off.
    pub async fn fail_command_off(&self) {
        let _ = self
            .client
            .database("admin")
            .run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"})
            .await;
    }
}

/// Prints why a test is skipped on this backend; tests `return` right after.
#[macro_export]
macro_rules! skip {
    ($test:expr, $($reason:tt)*) => {{
        eprintln!("SKIP {}: {}", $test, format!($($reason)*));
        return;
    }};
}
